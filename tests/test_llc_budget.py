"""Budgets instead of step counts: ``behavioral_llc(draws="auto", max_draws=…, time_limit=…)``
continues the same chains by blocks until the convergence verdict of METHODS §1 holds or the budget
is spent (estimate.py ``_continue_until_converged``); the report's LLC budget and ``step_size``.

No tolerances: continuing the chains is compared with one fixed run of the same draws bit for bit
(the same generators, steps and arithmetic), and the budget's stops are exact counts.
"""

import warnings

import numpy as np
import pytest
import torch

from tl_degeneracy.llc import ConvergenceWarning, SamplerConfig, behavioral_llc
from tl_degeneracy.report import degeneracy_report
from tl_degeneracy.report.sections import VERDICTS
from tl_degeneracy.report.settings import resolve_settings
from tests.fixtures.toys import TINY_TOY_KWARGS, make_tiny_toy_transformer

from .test_llc import deep_linear_network, dln_inputs, linear_regression

#: Cannot converge within a few hundred draws: a step far below the automatic one and no burn-in,
#: so the chains are still leaving θ* (flat at W = 0 for a rank-0 deep linear network) when the draws
#: end (test_llc_convergence's drifting run).
STUCK = dict(step_size=2e-6, burnin=0, chains=4)


def _stuck(**kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = behavioral_llc(deep_linear_network(0), dln_inputs(200), progress=False, **STUCK, **kwargs)
    return res, [str(w.message) for w in caught if issubclass(w.category, ConvergenceWarning)]


def _same_run(a, b) -> None:
    assert a.draws == b.draws and a.step_size == b.step_size
    np.testing.assert_array_equal(a.trace, b.trace)
    np.testing.assert_array_equal(a.llc_per_chain, b.llc_per_chain)
    assert a.llc == b.llc and a.converged == b.converged


def test_auto_stops_converged_early_on_linear_regression():
    model, x = linear_regression()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = behavioral_llc(model, x, draws="auto", draws_block=200, max_draws=20_000, progress=False)
    budget = res.diagnostics["budget"]
    assert res.converged and not [w for w in caught if issubclass(w.category, ConvergenceWarning)]
    assert budget["stopped"] == "converged" and not budget["budget_exhausted"] and budget["reason"] == ""
    assert res.draws < 20_000 and res.draws % 200 == 0 and budget["blocks"] == res.draws // 200
    assert budget["total_draws"] == res.draws and res.trace.shape == (8, res.burnin + res.draws)
    # The estimate uses every post-burn-in draw of every block.
    assert res.llc == pytest.approx(np.mean(res.trace[:, res.burnin:].mean(1)), rel=1e-12)
    assert res.convergence_reason == ""


def test_auto_that_cannot_converge_stops_at_max_draws_with_the_reason():
    res, messages = _stuck(draws="auto", draws_block=100, max_draws=250)
    budget = res.diagnostics["budget"]
    assert not res.converged and res.draws == 250  # blocks of 100, 100 and the 50 left
    assert budget == {**budget, "blocks": 3, "total_draws": 250, "stopped": "max_draws", "budget_exhausted": True}
    assert budget["reason"] == "budget spent: max_draws = 250"
    assert len(messages) == 1 and "max_draws = 250" in messages[0] and "lower bound" in messages[0]
    assert res.convergence_reason.endswith("; budget spent: max_draws = 250")
    verdict = VERDICTS["llc"]({"loss_scale": 1e-3, **res.summary()})
    assert verdict.startswith("λ̂ not converged — lower bound: R̂ ") and "max_draws = 250" in verdict


def test_auto_progress_bar_says_it_grows_by_blocks_and_shows_each_verdict(monkeypatch, capsys):
    # audit 13b F16: the bar read 100 % at the end of each block, then dropped back, unexplained.
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        behavioral_llc(deep_linear_network(0), dln_inputs(200), progress=True, **STUCK, draws="auto",
                       draws_block=100, max_draws=250)
    err = capsys.readouterr().err
    assert "4 chains × (0 burn-in + blocks of 100 draws until converged)" in err
    assert "after 100 draws: " in err and "after 200 draws: " in err and "(max 1.05)" in err


def test_auto_stops_at_the_time_limit():
    # The first block always runs; the next would end past 1 ms.
    res, messages = _stuck(draws="auto", draws_block=100, max_draws=10**6, time_limit=1e-3)
    budget = res.diagnostics["budget"]
    assert not res.converged and res.draws == 100 and budget["blocks"] == 1
    assert budget["stopped"] == "time_limit" and budget["budget_exhausted"]
    assert budget["reason"].startswith("budget spent: time_limit = 0.001 s")
    assert "time_limit = 0.001 s" in res.convergence_reason and "time_limit = 0.001 s" in messages[0]


def test_continuing_equals_one_long_run_bit_for_bit():
    auto, _ = _stuck(draws="auto", draws_block=100, max_draws=250)
    fixed, _ = _stuck(draws=250)
    _same_run(auto, fixed)
    assert fixed.diagnostics["budget"] is None
    # Automatic η with burn-in adaptation: the pilots' length is given, so both runs choose the same η.
    model, x = linear_regression()
    kwargs = dict(chains=4, burnin=100, pilot_steps=20, progress=False)
    auto = behavioral_llc(model, x, draws="auto", draws_block=60, max_draws=5000, **kwargs)
    assert auto.diagnostics["budget"]["blocks"] >= 2 and auto.diagnostics["step_size_source"] == "automatic"
    _same_run(auto, behavioral_llc(model, x, draws=auto.draws, **kwargs))


def test_auto_resumes_from_its_checkpoint_and_continues_under_a_larger_budget(tmp_path):
    fixed, _ = _stuck(draws=300)
    # Interrupted in the middle of the second block, then resumed.
    _stuck(draws="auto", draws_block=100, max_draws=300, checkpoint_dir=tmp_path / "a", checkpoint_every=16,
           _stop_after=150)
    _same_run(_stuck(draws="auto", draws_block=100, max_draws=300, checkpoint_dir=tmp_path / "a")[0], fixed)
    # A finished run continues from its checkpoint when given more draws.
    first, _ = _stuck(draws="auto", draws_block=100, max_draws=200, checkpoint_dir=tmp_path / "b")
    assert first.draws == 200
    more, _ = _stuck(draws="auto", draws_block=100, max_draws=300, checkpoint_dir=tmp_path / "b")
    assert more.diagnostics["step_size_source"] == "given"
    _same_run(more, fixed)
    # Audit 14a F13: resumed under a smaller budget, the record said "max_draws = 200" beside 300 draws.
    less, messages = _stuck(draws="auto", draws_block=100, max_draws=200, checkpoint_dir=tmp_path / "b")
    _same_run(less, fixed)
    assert less.diagnostics["budget"]["reason"] == "budget spent: max_draws = 200 (the run resumed had drawn 300 already)"


def test_a_time_limit_without_max_draws_returns_its_result(tmp_path):
    """Audit 14a F1: draws="auto" with time_limit and no max_draws (max_draws None) crashed formatting
    the budget's reason after all the sampling, and again on resuming its checkpoint."""
    model, x = linear_regression()
    res = behavioral_llc(model, x, draws="auto", time_limit=600.0, progress=False, checkpoint_dir=tmp_path / "c")
    budget = res.diagnostics["budget"]
    assert res.converged and budget["max_draws"] is None and budget["stopped"] == "converged" and budget["reason"] == ""
    again = behavioral_llc(model, x, draws="auto", time_limit=600.0, progress=False, checkpoint_dir=tmp_path / "c")
    assert again.llc == res.llc and again.draws == res.draws


@pytest.mark.parametrize("bad, match", [
    (dict(draws="many"), "draws must be an integer ≥ 1 or \"auto\""),
    (dict(draws=100, max_draws=200), "max_draws set a budget for draws=\"auto\""),
    (dict(draws=100, time_limit=5.0, draws_block=10), "time_limit, draws_block set a budget"),
    (dict(draws="auto", max_draws=0), "max_draws must be an integer ≥ 1"),
    (dict(draws="auto", draws_block=1.5), "draws_block must be an integer ≥ 1"),
    (dict(draws="auto", time_limit=-1.0), "time_limit must be a finite number > 0"),
    (dict(draws="auto", time_limit=float("inf")), "time_limit must be a finite number > 0"),
])
def test_bad_budgets_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        SamplerConfig(**bad)


def test_auto_config_defaults():
    assert SamplerConfig(draws="auto").first_draws == 500 and SamplerConfig(draws="auto").draw_budget == 20_000
    assert SamplerConfig(draws="auto", time_limit=10.0).draw_budget is None
    assert SamplerConfig(draws="auto", max_draws=50).first_draws == 50  # the block is cut to the budget
    assert SamplerConfig(draws=300).first_draws == 300 and SamplerConfig(draws=300).steps == 800


def test_report_settings_accept_step_size_and_the_llc_budget():
    s = resolve_settings("quick", {"step_size": "1e-6", "llc_max_draws": "500", "llc_time_limit": "none"})
    assert (s.step_size, s.llc_max_draws, s.llc_time_limit) == (1e-6, 500, None)
    assert resolve_settings("quick").step_size is None and resolve_settings("quick", {"step_size": "none"}).step_size is None
    assert resolve_settings("quick", {"llc_time_limit": "2.5"}).llc_time_limit == 2.5
    for bad in ("0", "-1e-6", "inf", "nan"):
        with pytest.raises(ValueError, match="report setting step_size must be None or a finite number > 0"):
            resolve_settings("quick", {"step_size": bad})
    with pytest.raises(ValueError, match="step_size='fast': not a valid value"):
        resolve_settings("quick", {"step_size": "fast"})
    with pytest.raises(ValueError, match="report setting llc_time_limit must be None or a finite number > 0"):
        resolve_settings("quick", {"llc_time_limit": "0"})
    with pytest.raises(ValueError, match="report setting llc_max_draws must be an integer ≥ 1"):
        resolve_settings("quick", {"llc_max_draws": "0"})


@pytest.mark.filterwarnings("ignore:report section 'llc'", "ignore::tl_degeneracy.llc.ConvergenceWarning")
def test_report_step_size_reaches_the_sampler_and_the_budget_is_reported():
    overrides = {"chains": 2, "draws": 12, "burnin": 4, "loss_scales": (1e-3,), "llc_max_draws": 36,
                 "step_size": "1e-6"}
    tokens = torch.randint(0, TINY_TOY_KWARGS["d_vocab"], (4, 12), generator=torch.Generator().manual_seed(0))
    rep = degeneracy_report(make_tiny_toy_transformer(), tokens, sections=["llc"], overrides=overrides, progress=False)
    values = rep["llc"].values
    assert values["step_size"] == 1e-6 and values["diagnostics"]["step_size_source"] == "given"
    budget = values["diagnostics"]["budget"]
    # η = 1e-6 barely moves the chains: they cannot converge within 36 draws.
    assert values["converged"] is False and values["draws"] == 36 and budget["stopped"] == "max_draws"
    assert "max_draws = 36" in VERDICTS["llc"](values)
