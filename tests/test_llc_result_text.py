"""How an estimate and its standard error are printed (``value_with_error``): the value to the
decimal place of its ± (2 significant digits), so that rounding moves the printed value by at most
a twentieth of the ± (audit 15b: N_eff 1234.6 ± 2.2 read "1.23e+03 ± 2.2", 2.1 standard errors off)."""

from __future__ import annotations

import math

import pytest

from tl_degeneracy.llc.llc_result import estimate_text, value_with_error


@pytest.mark.parametrize("value, stderr, text", [
    (101.44, 0.78, "101.44 ± 0.78"),  # README's default N_eff, which printed "101 ± 0.78"
    (1234.6, 2.2, "1,234.6 ± 2.2"),
    (10469.2, 8.0, "10,469.2 ± 8.0"),
    (50.7213, 0.39, "50.72 ± 0.39"),
    (0.0263, 0.0013, "0.0263 ± 0.0013"),
    (3.2e9, 1.1e7, "3,200,000,000 ± 11,000,000"),
])
def test_the_value_is_printed_to_the_decimal_place_of_its_error(value, stderr, text):
    assert value_with_error(value, stderr) == text
    shown, error = (float(x.replace(",", "")) for x in text.split(" ± "))
    assert abs(shown - value) <= error / 20 + 1e-12 * abs(value)


def test_where_the_error_fixes_no_place_the_value_keeps_its_own_digits():
    assert value_with_error(1e-6, 0.5) == "1e-06 ± 0.5"  # would print as 0.00
    assert value_with_error(5.0, 0.0) == "5 ± 0"
    assert value_with_error(0.0263, math.inf, ".3g") == "0.0263 ± inf"
    assert estimate_text(0.5, math.nan, 1) == "0.5 ± unknown (1 healthy chain: no spread to measure)"
