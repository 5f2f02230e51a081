"""``burnin="auto"`` (the default): the burn-in is extended while the draws still drift (METHODS §1,
"Convergence"; estimate.py ``_continue_until_converged``).

The drifting run is test_llc_convergence's: a step far below the automatic one on a rank-0 deep
linear network, so the chains are still leaving θ* whatever the burn-in the budget allows, and every
window's verdict fails; that makes the extensions and the budget that stops them deterministic.
"""

import warnings
from types import SimpleNamespace

import numpy as np
import pytest

from tl_degeneracy.llc import ConvergenceWarning, SamplerConfig, behavioral_llc
from tl_degeneracy.llc.config import DEFAULT_BURNIN, DEFAULT_MAX_BURNIN
from tl_degeneracy.llc.convergence import FLAT_RELAXATION
from tl_degeneracy.llc.estimate import _burnin_refusal

from .test_llc import deep_linear_network, dln_inputs

#: Still leaving θ* after thousands of steps (s·γ = 2e-6 per step).
DRIFTING = dict(step_size=2e-6, chains=4, progress=False)
SETTLE = DEFAULT_BURNIN // 4  # the first burn-in runs its last quarter under its final η; an extension as long


def _drifting(**kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = behavioral_llc(deep_linear_network(0), dln_inputs(200), **DRIFTING, **kwargs)
    return res, [str(w.message) for w in caught if issubclass(w.category, ConvergenceWarning)]


def test_config_defaults_and_refusals():
    cfg = SamplerConfig()
    assert cfg.burnin == "auto" and cfg.auto_burnin and cfg.initial_burnin == DEFAULT_BURNIN == 500
    assert cfg.burnin_budget == DEFAULT_MAX_BURNIN and cfg.steps == 2500 and cfg.pilot_length == 200
    assert SamplerConfig(burnin=80).initial_burnin == 80 and not SamplerConfig(burnin=80).auto_burnin
    assert SamplerConfig(max_burnin=3000).burnin_budget == 3000
    assert cfg.fixed(100, 925).burnin == 925 and cfg.fixed(100).burnin == 500 and cfg.fixed(100).max_burnin is None
    with pytest.raises(ValueError, match="burnin"):
        SamplerConfig(burnin="long")
    with pytest.raises(ValueError, match="max_burnin"):
        SamplerConfig(burnin=100, max_burnin=1000)
    with pytest.raises(ValueError, match="max_burnin"):
        SamplerConfig(max_burnin=-1)


def test_a_drifting_run_extends_its_burn_in_until_the_budget_and_says_so():
    res, messages = _drifting(draws=300, max_burnin=1000)
    auto = res.diagnostics["burnin_auto"]
    # 500 + 300 drift → the draws become burn-in (+125 to settle) → 925 + 300 drift → 1350 > 1000: no more.
    assert [e["step"] for e in auto["extensions"]] == [800] and [e["burnin"] for e in auto["extensions"]] == [925]
    assert set(auto["extensions"][0]["failed"]) & {"drift", "rhat"}
    assert res.burnin == auto["used"] == 800 + SETTLE and res.draws == 300
    assert res.trace.shape == (4, res.burnin + 300) and np.isfinite(res.trace).all()
    assert res.llc == pytest.approx(res.trace[:, res.burnin:].mean(1).mean(), rel=1e-12)
    assert not res.converged and auto["budget_exhausted"]
    assert auto["reason"] == "burn-in budget spent: max_burnin = 1,000 steps (burn-in 925)"
    assert len(messages) == 1 and auto["reason"] in messages[0] and "lower bound" in messages[0]
    assert res.convergence_reason.endswith(auto["reason"])
    assert res.summary()["burnin"] == 925
    # by the criteria that failed (review 43 F3: "drifted" whatever had)
    assert res.summary()["burnin_source"] == ("auto: 500 steps, extended 1× to 925 while the draws had not relaxed and "
                                              "disagreed between chains (R̂) (max_burnin 1,000)")


def test_a_given_burn_in_is_never_extended():
    res, messages = _drifting(draws=300, burnin=500)
    assert res.burnin == 500 and res.trace.shape == (4, 800)
    assert res.diagnostics["burnin_auto"] is None and res.diagnostics["burnin_source"] == "given"
    assert not res.converged and len(messages) == 1 and "max_burnin" not in messages[0]
    # The same chains as the auto run's first 800 steps: an extension only continues them.
    auto, _ = _drifting(draws=300, max_burnin=1000)
    np.testing.assert_array_equal(auto.trace[:, :800], res.trace)


def test_extensions_with_draws_auto_restart_the_blocks_and_both_budgets_are_reported():
    res, messages = _drifting(draws="auto", draws_block=100, max_draws=200, max_burnin=900)
    auto, budget = res.diagnostics["burnin_auto"], res.diagnostics["budget"]
    # 500 + 100 → burn-in 725 + 100 → 950 > 900: the burn-in stops, the draws go on to max_draws.
    assert res.burnin == 600 + SETTLE and [e["step"] for e in auto["extensions"]] == [600]
    assert res.draws == budget["total_draws"] == 200 and budget["blocks"] == 2 and budget["stopped"] == "max_draws"
    assert res.trace.shape == (4, res.burnin + res.draws)
    assert auto["budget_exhausted"] and budget["budget_exhausted"] and len(messages) == 1
    assert "max_burnin = 900" in messages[0] and "max_draws = 200" in messages[0]


def test_resuming_across_an_extension_equals_the_uninterrupted_run(tmp_path):
    full, _ = _drifting(draws=300, max_burnin=1000)
    # Interrupted inside the extended window (burn-in 925, steps 800..1225), then resumed.
    partial, _ = _drifting(draws=300, max_burnin=1000, checkpoint_dir=tmp_path, checkpoint_every=64, _stop_after=1000)
    assert partial.diagnostics["steps_done"] == 1000
    resumed, _ = _drifting(draws=300, max_burnin=1000, checkpoint_dir=tmp_path)
    assert resumed.burnin == full.burnin == 925
    np.testing.assert_array_equal(resumed.trace, full.trace)
    assert resumed.llc == full.llc and resumed.diagnostics["burnin_auto"] == full.diagnostics["burnin_auto"]


def test_no_extension_past_the_relaxation_of_the_directions_only_gamma_holds():
    """s·γ ≥ FLAT_RELAXATION over the burn-in: even a direction with no curvature has relaxed to
    e⁻⁵ of its equilibrium, so a still-failing verdict is no transient; below it only the budget stops."""
    config = SamplerConfig()
    run = config.fixed(2000, 10_000)
    state = SimpleNamespace(extra={"adaptations": []}, step=12_000)
    unit = SimpleNamespace(gamma=1.0)
    refusal = _burnin_refusal(config, run, unit, state, eta0=FLAT_RELAXATION / 10_000)
    assert "s·γ = 5 ≥ 5" in refusal and "only γ holds have relaxed" in refusal
    assert _burnin_refusal(config, run, unit, state, eta0=1e-4) == ""  # s·γ = 1
    # The cumulative step follows the η adaptations: halved at step 5000, s·γ = 0.5 + 0.25 < 5.
    state.extra["adaptations"] = [{"step": 5000, "step_size": 5e-5, "h_max": 1.0}]
    assert _burnin_refusal(config, run, unit, state, eta0=1e-4) == ""
    assert _burnin_refusal(config, run, SimpleNamespace(gamma=0.0), state, eta0=1.0) == ""  # γ = 0: no relaxation clock
    assert "max_burnin = 20,000" in _burnin_refusal(config, run, unit, SimpleNamespace(extra={}, step=19_900), eta0=1e-4)


def test_one_chain_does_not_extend_the_burn_in_for_an_undefined_rhat():
    """Audit 14a F8: with one chain split-R̂ is undefined, which burnin="auto" read as moving traces:
    it extended the burn-in to max_burnin (8× the time), then advised a longer one. Now the burn-in
    stays, and the advice is a second chain."""
    from .test_llc import linear_regression

    model, x = linear_regression()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = behavioral_llc(model, x, chains=1, progress=False)
    assert res.burnin == DEFAULT_BURNIN and not res.diagnostics["burnin_auto"]["extensions"]
    message = next(str(w.message) for w in caught if issubclass(w.category, ConvergenceWarning))
    assert "R̂ undefined" in message and "chains ≥ 2 (split-R̂ compares chains; 1 healthy chain(s) here)" in message
    assert "longer chains" not in message
    # nor draws more blocks (review 36: it drew to max_draws)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        auto = behavioral_llc(model, x, chains=1, draws="auto", draws_block=200, max_draws=5000, progress=False)
    assert auto.draws == 200 and auto.diagnostics["budget"]["stopped"] == "one_chain"
    assert "split-R̂ needs ≥ 2 healthy chains" in auto.convergence_reason


def test_the_divergence_advice_names_bias_bound_only_for_an_automatic_step():
    """Audit 14a F11: with a given step_size, "reduce … bias_bound" was advised, which changes nothing then."""
    model, x = deep_linear_network(2), dln_inputs(200)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            behavioral_llc(model, x, step_size=0.05, chains=4, draws=50, burnin=10, progress=False)
        except Exception as e:  # every chain diverged: the advice is in the error
            caught.append(SimpleNamespace(message=e))
    advice = [str(w.message) for w in caught if "reduce step_size" in str(w.message)]
    assert advice and all("bias_bound" not in a for a in advice)


def test_a_step_too_large_at_an_automatic_step_size_that_stays_as_it_is_ends_the_run():
    """Review 43 F3: criterion (vi) failed at an automatic η that the bounds themselves allow (d = 1
    regression, bias_bound = stiff_bound = 0.9), and every extension re-adapted it to the same η and
    threw its draws away: 3 extensions, 2,875 steps for 1,000, "while the draws drifted", and advice
    to leave step_size unset, which it was. The re-adapted η is now compared first: unchanged, the
    run stops there, too high, and says which bounds lower it, and not that a budget was spent."""
    from .test_llc import linear_regression

    model, x = linear_regression(d=1)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        res = behavioral_llc(model, x, chains=4, progress=False, seed=0, draws=500, bias_bound=0.9, stiff_bound=0.9)
    auto, conv = res.diagnostics["burnin_auto"], res.diagnostics["convergence"]
    assert auto["extensions"] == [] and res.burnin == 500 and res.diagnostics["steps_done"] == 1000
    assert set(conv["failed"]) == {"step_size"} and res.upper_bound and not res.converged
    assert res.diagnostics["adaptations"][-1]["step"] == 1000  # the check at the chains that found η unchanged
    assert "lower bias_bound or stiff_bound" in conv["suggestions"][0] and "leave it unset" not in conv["suggestions"][0]
    assert auto["reason"].startswith("the step size fails criterion (vi), and re-adapted at the chains (step 1,000)")
    assert res.summary()["burnin_source"] == f"auto: 500 steps, not extended ({auto['reason']}) (max_burnin 20,000)"
    assert auto["reason"] in res.convergence_reason
    # Review 45 L2: no budget ran out (max_burnin 20,000, 500 used); the reason is said all the same.
    assert not auto["budget_exhausted"]


def test_the_rmsprop_metric_is_frozen_halfway_through_the_first_burn_in(monkeypatch):
    """Review 43 F1/F2: frozen at the first draw, the chains began the draws in the law the adapting
    metric had led them to, and the first 5k draws read λ̂ 7.71 ± 0.63 for λ = 5 (16 chains, burn-in
    20k); frozen halfway through the burn-in, 4.91 ± 0.45. No test failed when behavioral_llc's
    wiring was undone: every run_chains call, of a given burn-in and of an extended one, must get
    half the first burn-in, and a checkpoint written under another freeze must not be resumed."""
    from tl_degeneracy.llc import estimate

    real, seen = estimate.run_chains, []

    def spy(target, layout, mask, dynamics, state, **kwargs):
        seen.append(dynamics.adapt_until)
        return real(target, layout, mask, dynamics, state, **kwargs)

    monkeypatch.setattr(estimate, "run_chains", spy)
    res, _ = _drifting(draws=300, max_burnin=1000, sampler="rmsprop")
    assert [e["step"] for e in res.diagnostics["burnin_auto"]["extensions"]] == [800]  # an extension ran
    assert seen and set(seen) == {DEFAULT_BURNIN // 2}
    seen.clear()
    _drifting(draws=30, burnin=40, sampler="rmsprop")
    assert seen and set(seen) == {20}
    cfg = SamplerConfig(burnin=40, sampler="rmsprop")
    assert estimate._metric_frozen_at(cfg) == 20
