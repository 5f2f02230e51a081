"""Known learning coefficients (tl_degeneracy.theory)."""

import itertools

import pytest

from tl_degeneracy.theory import (
    dln_learning_coefficient,
    regular_learning_coefficient,
    rrr_learning_coefficient,
)


@pytest.mark.parametrize("rank,expected", [(0, 2.5), (1, 3.5), (2, 4.0)])
def test_dln_323_values_from_methods(rank, expected):
    lc = dln_learning_coefficient((3, 2, 3), rank)
    assert lc.llc == expected
    assert lc.n_eff == 2 * expected


def test_dln_323_rank1_multiplicity_two():
    assert dln_learning_coefficient((3, 2, 3), 1).multiplicity == 2


def test_aoyagi_general_formula_equals_two_layer_closed_form():
    # Every two-layer network with widths ≤ 6 and every admissible rank, multiplicities included.
    for M, H, N in itertools.product(range(1, 7), repeat=3):
        for r in range(min(M, H, N) + 1):
            general = dln_learning_coefficient((M, H, N), r)
            closed = rrr_learning_coefficient(M, H, N, r)
            assert general.llc == pytest.approx(closed.llc, abs=1e-12), (M, H, N, r)
            assert general.multiplicity == closed.multiplicity, (M, H, N, r)


@pytest.mark.parametrize(
    "widths,expected",
    # devinterp's rrr_test.py values (true rank 0), research/llc.md §2.
    [((5, 3, 5), 6.5), ((5, 4, 5), 8.0), ((4, 3, 8), 6.0), ((8, 3, 4), 6.0), ((3, 8, 4), 6.0)],
)
def test_rank_zero_reference_values(widths, expected):
    assert dln_learning_coefficient(widths, 0).llc == expected


def test_full_rank_regular_limits():
    # A single layer (no hidden layer) is linear regression: regular, λ = d/2.
    assert dln_learning_coefficient((4, 3), 3).llc == regular_learning_coefficient(12).llc
    # Never above half the parameter count.
    for widths in [(3, 2, 3), (2, 4, 4, 2), (5, 3, 2, 4)]:
        d = sum(a * b for a, b in zip(widths[:-1], widths[1:]))
        for r in range(min(widths) + 1):
            assert 0 <= dln_learning_coefficient(widths, r).llc <= d / 2


def test_deeper_networks_monotone_in_rank():
    for widths in [(2, 4, 4, 2), (3, 3, 3, 3), (4, 2, 5, 3)]:
        values = [dln_learning_coefficient(widths, r).llc for r in range(min(widths) + 1)]
        assert values == sorted(values)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="rank"):
        dln_learning_coefficient((3, 2, 3), 3)
    with pytest.raises(ValueError, match="widths"):
        dln_learning_coefficient((3,), 0)
    with pytest.raises(ValueError):
        regular_learning_coefficient(-1)
