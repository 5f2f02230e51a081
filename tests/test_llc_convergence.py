"""The convergence verdict of an LLC run (METHODS §1 "Convergence") and the LLC's progress bars.

Tolerances: R̂/ESS are ArviZ's own numbers (compared exactly); the ESS and drift standard errors of
an AR(1) chain are checked against their closed forms within the Monte-Carlo error of 20 replicas.
"""

import warnings

import numpy as np
import pytest
import torch
from arviz_stats.base import array_stats

from tl_degeneracy.llc import (ConvergenceWarning, SamplerConfig, assess_convergence, behavioral_llc, llc_by_component,
                               llc_sweep)
from tl_degeneracy.report.sections import VERDICTS

from .test_llc import _BlowsUp, deep_linear_network, dln_inputs, linear_regression, quadratic_prediction


def _ar1(rho: float, chains: int, draws: int, seed: int = 0) -> np.ndarray:
    """Stationary AR(1) chains x_t = ρ x_{t−1} + √(1 − ρ²) ξ_t with unit variance, [chains, draws]."""
    rng = np.random.default_rng(seed)
    x = np.empty((chains, draws))
    x[:, 0] = rng.normal(size=chains)
    noise = rng.normal(size=(chains, draws)) * np.sqrt(1 - rho**2)
    for t in range(1, draws):
        x[:, t] = rho * x[:, t - 1] + noise[:, t]
    return x


def _convergence_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, ConvergenceWarning)]


@pytest.fixture(scope="module")
def regression_run():
    model, x = linear_regression()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = behavioral_llc(model, x)
    return res, caught


def test_a_regular_model_at_defaults_is_converged_near_theory(regression_run):
    res, caught = regression_run
    assert res.converged is True and not _convergence_warnings(caught)
    d = res.diagnostics
    assert d["rhat"] <= 1.05 and d["ess"] >= 100 and abs(d["drift"]) <= 2
    assert d["n_diverged"] == 0 and d["diverged_chains"] == [] and d["convergence"]["failed"] == {}
    # λ = d/2 = 5 up to the stated step-size bias bound and 4 standard errors (as in test_llc).
    bound = d["bias_bound"]
    assert abs(res.llc - 5.0) < 5.0  * bound + 4 * res.llc_stderr
    # The verdict travels with the result: summary, to_dict, to_frame, repr, report verdict.
    s = res.summary()
    assert s["converged"] is True and s["rhat"] == d["rhat"] and s["ess"] == d["ess"] and s["drift"] == d["drift"]
    assert res.to_dict()["convergence"]["converged"] is True
    frame = res.to_frame()
    assert frame.attrs["converged"] is True and frame.attrs["rhat"] == d["rhat"] and (frame["failed_at"] == -1).all()
    assert "converged=True" in repr(res) and "rhat=" in repr(res) and "ess=" in repr(res)
    assert VERDICTS["llc"]({"loss_scale": 1e-3, **s}).startswith("λ̂ converged")


@pytest.mark.tl_agnostic  # a plain torch network (no TransformerLens): once, in the TransformerLens 4.x run
def test_a_full_rank_deep_linear_network_at_defaults_is_converged_near_aoyagi():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = behavioral_llc(deep_linear_network(2), dln_inputs())
    assert res.converged and not _convergence_warnings(caught)
    assert abs(res.llc - 4.0) < 0.1 * 4.0  # Aoyagi: 4.0; test_llc's 10 %


def _weak_directions_regression(n: int = 4000):
    """Linear regression with 40 weights and XᵀX/n = diag(h): 10 directions of h = 1 and 30 of h = 3·10⁻⁴,
    i.e. nβh = 0.3 at the default nβ = 1000, the order of the default γ = 1 (the audit's case)."""
    h = np.array([1.0] * 10 + [3e-4] * 30)
    q, _ = torch.linalg.qr(torch.randn(n, 40, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    x = (q * np.sqrt(n) * torch.tensor(np.sqrt(h))).float()
    return torch.nn.Linear(40, 1, bias=False), x, np.linalg.eigvalsh((x.T.double() @ x.double() / n).numpy())


@pytest.mark.tl_agnostic  # a linear model's chains for over a minute: once, in the TransformerLens 4.x run
def test_a_run_whose_weak_directions_have_not_relaxed_is_not_converged():
    """Criterion (v), relaxation. With a given burn-in of 4,750 steps the chains pass split-R̂, ESS and the
    drift test (they share the transient from θ*), but the 30 weak directions have relaxed only to
    1 − e^{−a·s} ≈ 80 % of their variance: λ̂ read 7.46 ± 0.18 against an exact 8.71 at this η, z = −7,
    and was labelled converged. δ·∇U shows it: its mean over the draws is ≈ 0.88·d, not d."""
    model, x, h = _weak_directions_regression()
    with pytest.warns(ConvergenceWarning, match="relaxation"):
        res = behavioral_llc(model, x, burnin=4750, progress=False)
    exact = quadratic_prediction(h, res.nbeta, res.gamma, res.step_size)
    assert (exact - res.llc) / res.llc_stderr > 3  # the number is low, as the verdict now says
    conv = res.diagnostics["convergence"]
    assert not res.converged and "relaxation" in conv["failed"] and conv["relaxation"] < 0.95
    assert {"rhat", "ess", "drift"}.isdisjoint(conv["failed"])  # the other criteria saw nothing
    # burnin="auto" (the default) extends the burn-in until the directions have relaxed: right and converged.
    auto = behavioral_llc(model, x, progress=False)
    exact = quadratic_prediction(h, auto.nbeta, auto.gamma, auto.step_size)
    assert auto.converged and auto.burnin > 4750 and auto.diagnostics["relaxation"] >= 0.95
    assert abs(auto.llc - exact) < 3 * auto.llc_stderr


def test_relaxation_is_the_mean_virial_over_the_coordinates():
    """assess_convergence's criterion (v) on constructed traces: r = mean δ·∇U / d with ArviZ's MCSE; a
    run that recorded none (virial None, or NaN from an old checkpoint) is judged without it."""
    draws = _ar1(0.0, 4, 400)
    rng = np.random.default_rng(0)
    relaxed = 40 + np.sqrt(80) * rng.standard_normal((4, 400))  # Σ a δ² over 40 coordinates: mean 40, var 80
    ok = assess_convergence(draws, virial=relaxed, n_coordinates=40)
    assert ok.converged and abs(ok.relaxation - 1) < 4 * ok.relaxation_mcse
    assert ok.relaxation_mcse == pytest.approx(float(array_stats.mcse(relaxed / 40, chain_axis=0, draw_axis=1)))
    low = assess_convergence(draws, virial=0.8 * relaxed, n_coordinates=40)
    assert not low.converged and set(low.failed) == {"relaxation"} and "relaxation 79.8%" in low.brief
    for missing in (None, np.full((4, 400), np.nan)):
        assert assess_convergence(draws, virial=missing, n_coordinates=40).converged


def test_a_step_that_spreads_the_chains_far_beyond_the_posterior_is_not_converged():
    """Criterion (vi), audit 17b F2: a regression (λ = 5) at a given η with b_max = 0.9 mixes well (R̂ 1.00,
    ESS 5,000) around a distribution far wider than the posterior: λ̂ read 24.7 ± 0.2, "converged", at
    r = 4.95. r far above 1 says so whatever the model; more draws do not change it, so draws="auto"
    stops at once, and the value is no lower bound."""
    draws = _ar1(0.0, 4, 400)
    rng = np.random.default_rng(0)
    relaxed = 40 + np.sqrt(80) * rng.standard_normal((4, 400))
    wide = assess_convergence(draws, virial=2.0 * relaxed, n_coordinates=40)
    assert not wide.converged and set(wide.failed) == {"step_size"} and not wide.lower_bound
    assert "relaxation 200% (max 150%): step size too large" == wide.brief
    assert assess_convergence(draws, virial=1.2 * relaxed, n_coordinates=40).converged  # a small step's excess passes

    model, x = linear_regression()
    h = np.linalg.eigvalsh((x.T @ x / len(x)).double().numpy())
    eta = 0.9 * 4 / (1000 * h.max() + 1)
    with pytest.warns(ConvergenceWarning, match=r"is not converged \(METHODS §1\), so read it as too high: step size: the "
                                                r"draws' mean δ·∇U is 4\d\d\.\d%"):
        res = behavioral_llc(model, x, step_size=eta, burnin=200, draws=500, chains=4, seed=0, progress=False)
    assert not res.converged and not res.lower_bound and res.llc > 4 * 5
    # and every text reads it so (review 42: the report said "≈ … uncertain" under a "too high" warning)
    from tl_degeneracy.report.sections import VERDICTS

    summary = res.summary()
    assert res.upper_bound and summary["upper_bound"]
    import re

    assert re.search(r"λ̂ not converged — too high \(the step size\): relaxation 4\d\d% \(max 150%\): step size too large",
                     VERDICTS["llc"](summary))
    assert "N_eff ≤ " in VERDICTS["llc"](summary)
    # numpy's booleans read as Python's (review 43 F6: `upper_bound is True` read np.True_ as "≈")
    from tl_degeneracy.llc.llc_result import relation, unconverged_text

    assert relation(False, np.False_, np.True_) == "≤" and unconverged_text(np.False_, np.True_) == "too high (the step size)"
    assert relation(False, np.False_, np.False_) == "≈" and relation(False, None, float("nan")) == "≥"
    auto = behavioral_llc(model, x, step_size=eta, burnin=200, draws="auto", draws_block=500, max_draws=4000, chains=4,
                          seed=0, progress=False)
    assert auto.diagnostics["budget"]["stopped"] == "step_size" and auto.draws == 500
    advice = res.diagnostics["convergence"]["suggestions"]
    assert len(advice) == 1 and advice[0].startswith("a smaller step_size (≤ ")  # no "more draws" beside it


def test_a_drifting_chain_is_not_converged_and_warns_once_with_a_budget():
    # A step far below the automatic one and no burn-in: the chains are still leaving θ* (flat at
    # W = 0 for a rank-0 deep linear network) when the draws end.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = behavioral_llc(deep_linear_network(0), dln_inputs(200), step_size=2e-6, burnin=0, draws=300, chains=4)
    assert res.converged is False
    messages = _convergence_warnings(caught)
    assert len(messages) == 1, messages
    failed = res.diagnostics["convergence"]["failed"]
    assert "rhat" in failed and "ess" in failed
    assert f"split-R̂ {res.diagnostics['rhat']:.3g} > 1.05" in messages[0] and "lower bound" in messages[0]
    # The budget: draws from the observed ESS per draw, and the burn-in that equilibrates flat directions.
    conv = res.diagnostics["convergence"]
    assert conv["suggested_draws"] >= 300 * 100 / res.diagnostics["ess"]
    assert conv["suggested_burnin"] == int(np.ceil(5 / (2e-6 * res.gamma)))
    assert f"draws ≥ {conv['suggested_draws']:,}" in messages[0] and "larger γ" in messages[0]
    assert res.summary()["converged"] is False and "converged=False" in repr(res)
    verdict = VERDICTS["llc"]({"loss_scale": 1e-3, **res.summary()})
    assert verdict.startswith(f"λ̂ not converged — lower bound: R̂ {res.diagnostics['rhat']:.3g} (max 1.05), ESS ")


def test_a_trend_fails_rhat_and_drift_on_a_constructed_trace():
    rng = np.random.default_rng(1)
    flat = rng.normal(size=(4, 400))
    assert assess_convergence(flat).converged
    trend = flat + np.linspace(0, 3, 400)  # every chain still rising by 3 standard deviations
    verdict = assess_convergence(trend, step_size=1e-3, gamma=1.0, burnin=100)
    assert not verdict.converged and {"rhat", "drift"} <= set(verdict.failed)
    assert verdict.drift > 2 and verdict.drift_means[1] > verdict.drift_means[0]
    assert verdict.suggested_burnin == 5000 and "γ ≈ 50" in verdict.message(1.0)


def test_the_suggested_burnin_is_longer_than_the_one_that_failed():
    """The advice for a failed R̂ or drift: at least twice the burn-in used (it once suggested 834 steps
    after 2,625 had failed), and, once ηγ·burnin ≥ 5 has relaxed every direction, not a burn-in at all."""
    rng = np.random.default_rng(1)
    trend = rng.normal(size=(4, 400)) + np.linspace(0, 3, 400)
    long = assess_convergence(trend, step_size=1e-3, gamma=1.0, burnin=4000)  # 5/(ηγ) = 5,000 < 2 · 4,000
    assert long.suggested_burnin == 8000
    # chains that each settled at its own level: R̂ (and so ESS) fails, nothing drifts, and the burn-in
    # relaxed everything
    apart = rng.normal(size=(4, 2000)) + np.array([0.0, 0.0, 1.0, 1.0])[:, None]
    verdict = assess_convergence(apart, step_size=1e-3, gamma=1.0, burnin=6000)
    assert set(verdict.failed) == {"rhat", "ess"} and verdict.suggested_burnin is None
    assert "more draws or chains, or a larger γ" in verdict.message(1.0)


def test_only_failures_that_bias_low_make_a_lower_bound():
    """Audit 8a: every unconverged λ̂ was printed as a lower bound ("N_eff ≥"), but chains that only
    disagree (R̂, ESS) are noisy in both directions (4 of 8 such regression runs above the exact
    value). A lower bound needs draws still rising (drift, or unrelaxed chains whose draws rise) or
    many diverged chains, and a step size that does not raise λ̂ (audit 14a F5)."""
    rng = np.random.default_rng(1)
    apart = rng.normal(size=(4, 2000)) + np.array([0.0, 0.0, 1.0, 1.0])[:, None]
    noisy = assess_convergence(apart)
    assert set(noisy.failed) == {"rhat", "ess"} and not noisy.lower_bound
    assert "uncertain beyond its ± in either direction" in noisy.message(1.0) and "lower bound" not in noisy.message(1.0)
    assert noisy.to_dict()["lower_bound"] is False
    flat = rng.normal(size=(4, 400))
    rising = assess_convergence(flat + np.linspace(0, 3, 400))
    falling = assess_convergence(flat - np.linspace(0, 3, 400))
    assert "drift" in rising.failed and rising.lower_bound and "read it as a lower bound" in rising.message(1.0)
    assert "drift" in falling.failed and not falling.lower_bound
    relaxed = 40 + np.sqrt(80) * rng.standard_normal((4, 400))
    rising_unrelaxed = assess_convergence(_ar1(0.0, 4, 400) + np.linspace(0, 0.1, 400), virial=0.8 * relaxed,
                                          n_coordinates=40)
    assert "relaxation" in rising_unrelaxed.failed and rising_unrelaxed.drift > 0 and rising_unrelaxed.lower_bound
    # Audit 14a F4: unrelaxed with draws that do not rise is uncertain both ways (flat directions carry no
    # loss; a deep linear network's gauge directions read high before they relax).
    level_unrelaxed = assess_convergence(_ar1(0.0, 4, 400) - np.linspace(0, 0.1, 400), virial=0.8 * relaxed,
                                         n_coordinates=40)
    assert set(level_unrelaxed.failed) == {"relaxation"} and level_unrelaxed.drift < 0
    assert not level_unrelaxed.lower_bound and "either direction" in level_unrelaxed.message(1.0)
    assert "read it as a lower bound" not in rising_unrelaxed.message(1.0, step_biased=True)
    diverged = assess_convergence(_ar1(0.0, 8, 400), {5: 50, 1: 10, 6: 10})
    assert "diverged" in diverged.failed and diverged.lower_bound
    v = {"loss_scale": 1e-3, "gamma": 1.0, "n_eff": 12.1, "n_params": 10, "llc": 6.05, "llc_stderr": 0.5,
         "converged": False, "lower_bound": False, "convergence_reason": noisy.brief}
    assert VERDICTS["llc"](v).startswith("λ̂ not converged — uncertain in both directions: R̂ ")
    assert "N_eff ≈ 12.1" in VERDICTS["llc"](v) and "N_eff above the parameter count" in VERDICTS["llc"](v)


def test_rhat_and_ess_are_arviz_numbers():
    trace = _ar1(0.7, 4, 300, seed=3) + np.arange(4)[:, None] * 0.05
    verdict = assess_convergence(trace)
    assert verdict.rhat == float(array_stats.rhat(trace, chain_axis=0, draw_axis=1))
    assert verdict.ess == float(array_stats.ess(trace, chain_axis=0, draw_axis=1, method="bulk"))
    # Diverged chains are left out of both.
    masked = trace.copy()
    masked[2, 100:] = np.nan
    verdict = assess_convergence(masked, {2: 100})
    kept = trace[[0, 1, 3]]
    assert verdict.rhat == float(array_stats.rhat(kept, chain_axis=0, draw_axis=1))
    assert verdict.ess == float(array_stats.ess(kept, chain_axis=0, draw_axis=1, method="bulk"))


@pytest.mark.parametrize("rho", [0.0, 0.9])
def test_ess_and_drift_standard_errors_account_for_autocorrelation(rho):
    """AR(1): ESS = N(1 − ρ)/(1 + ρ) and a half's standard error √((1 + ρ)/((1 − ρ) n)); on
    stationary chains the drift z is about standard normal (a little narrower: halves are correlated)."""
    chains, draws = 4, 2000
    runs = [assess_convergence(_ar1(rho, chains, draws, seed=s)) for s in range(20)]
    ess = np.mean([v.ess for v in runs])
    assert ess == pytest.approx(chains * draws * (1 - rho) / (1 + rho), rel=0.15)
    se = np.mean([v.drift_stderrs[0] for v in runs])
    assert se == pytest.approx(np.sqrt((1 + rho) / ((1 - rho) * chains * draws / 2)), rel=0.15)
    z = np.array([v.drift for v in runs])
    assert 0.5 < z.std() < 1.4 and np.mean(np.abs(z) > 2) <= 0.15


def test_diverged_chains_are_counted_and_more_than_a_quarter_is_not_converged():
    trace = _ar1(0.0, 8, 400, seed=2)
    trace[5, 50:] = np.nan
    one = assess_convergence(trace, {5: 50})
    assert one.converged and one.n_diverged == 1 and one.diverged_chains == (5,)
    assert "biases λ̂ low" in one.divergence
    for c in (1, 6):
        trace[c, 10:] = np.nan
    three = assess_convergence(trace, {5: 50, 1: 10, 6: 10}, divergence_advice="reduce step_size")
    assert not three.converged and three.n_diverged == 3 and three.diverged_chains == (1, 5, 6)
    assert set(three.failed) == {"diverged"} and "3 of 8 chains diverged" in three.reason
    assert "biases λ̂ low" in three.reason and "reduce step_size" in three.suggestions
    with pytest.raises(ValueError, match="finite"):
        assess_convergence(trace, {5: 50})  # chains 1 and 6 hold NaN but are not marked diverged


def test_diverged_chains_of_a_run_are_reported():
    x = torch.randn(50, 2, generator=torch.Generator().manual_seed(0))
    with pytest.warns(RuntimeWarning, match="diverged and are excluded .*biases λ̂ low"):
        res = behavioral_llc(_BlowsUp(), x, nbeta=100, step_size=1e-3, chains=8, draws=200, burnin=0)
    d = res.diagnostics
    assert 0 < d["n_diverged"] == len(res.failed) and d["diverged_chains"] == sorted(res.failed)
    frame = res.to_frame()
    assert list(frame["failed_at"] >= 0) == [c in res.failed for c in range(8)]
    assert frame.attrs["n_diverged"] == len(res.failed)
    if d["n_diverged"] > 2:
        assert not res.converged and "diverged" in d["convergence"]["failed"]


def test_pilot_steps_scale_with_the_budget_unless_given():
    assert SamplerConfig().pilot_length == 200  # default budget 2500 steps
    assert SamplerConfig(draws=80, burnin=20).pilot_length == 20
    assert SamplerConfig(draws=900, burnin=100).pilot_length == 100
    assert SamplerConfig(draws=80, burnin=20, pilot_steps=7).pilot_length == 7
    model, x = linear_regression(d=3, n=40)
    res = behavioral_llc(model, x, chains=2, draws=150, burnin=50, progress=False)
    assert res.diagnostics["pilot_steps"] == 20


def test_progress_bars_show_steps_and_time_left(monkeypatch, capsys, tiny_toy_transformer, tiny_toy_tokens):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    model, x = linear_regression(d=3, n=40)
    behavioral_llc(model, x, chains=2, draws=30, burnin=10, pilot_steps=5, progress=True)
    err = capsys.readouterr().err
    assert "LLC: SGLD, 2 chains × (10 burn-in + 30 draws)" in err and "40/40" in err and "pilot round 1" in err
    assert "<" in err  # tqdm's elapsed<remaining
    frame = llc_sweep(model, x, [1e-2, 1e-3], chains=2, draws=20, burnin=5, pilot_steps=5, progress=True)
    assert "llc_sweep: loss scales" in capsys.readouterr().err
    assert {"converged", "rhat", "ess", "drift", "convergence_reason"} <= set(frame.columns)
    comps = llc_by_component(tiny_toy_transformer, tiny_toy_tokens, components=["blocks.0.attn.head0"], chains=2,
                             draws=5, burnin=1, step_size=1e-6, nbeta=100, progress=True)
    assert "llc_by_component" in capsys.readouterr().err and "converged" in comps.columns
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # short chains: not converged (a warning would print where pytest does not catch it)
        behavioral_llc(model, x, chains=2, draws=30, burnin=10, pilot_steps=5, progress=False)
        assert capsys.readouterr().err == ""
        monkeypatch.setenv("TQDM_DISABLE", "1")
        behavioral_llc(model, x, chains=2, draws=30, burnin=10, pilot_steps=5, progress=True)
        assert capsys.readouterr().err == ""


def test_the_standard_error_says_when_it_may_under_state_the_uncertainty():
    from tl_degeneracy.llc.llc_result import stderr_caveat

    rng = np.random.default_rng(0)
    # two independent AR(1) chains of strong autocorrelation: ArviZ's MCSE sees the few effective draws
    phi, T = 0.99, 2000
    x = np.zeros((2, T))
    for t in range(1, T):
        x[:, t] = phi * x[:, t - 1] + rng.normal(size=2)
    verdict = assess_convergence(x)
    sd_over_ess = x.std() / np.sqrt(verdict.ess)
    assert verdict.mcse == pytest.approx(sd_over_ess, rel=0.3)  # ArviZ's sd/√ESS_mean, of the same order
    assert "only 2 healthy chain(s)" in stderr_caveat(2) and stderr_caveat(4) is None


def test_with_a_given_step_r_hat_alone_adds_draws_rather_than_burn_in():
    """Audit 17b F3: with a given η, burnin="auto" turned every block whose split-R̂ failed by chance
    (1.05 < R̂ with ESS ≈ 150, no drift, relaxed) into burn-in, though an extension changes nothing but
    the burn-in's length there: burn-ins of 1,750 to 19,875 steps over 16 seeds of one run. R̂ alone
    now asks for more draws where η is given and draws are "auto"; drift and unfinished relaxation
    still extend the burn-in, and so does R̂ where η is chosen (an extension re-adapts it)."""
    from dataclasses import replace

    from tl_degeneracy.llc.estimate import _still_moving

    verdict = assess_convergence(_ar1(0.0, 4, 400))
    rhat = replace(verdict, converged=False, rhat=1.07, failed={"rhat": "split-R̂ 1.07 > 1.05"})
    undefined = replace(rhat, rhat=float("nan"))
    drift = replace(rhat, failed={**rhat.failed, "drift": "drift"})
    given = SamplerConfig.merged(None, step_size=1e-4, draws="auto")
    chosen = SamplerConfig.merged(None, draws="auto")
    fixed_draws = SamplerConfig.merged(None, step_size=1e-4, draws=500)
    assert not _still_moving(given, rhat) and _still_moving(given, drift)
    assert _still_moving(chosen, rhat) and _still_moving(fixed_draws, rhat)
    assert not _still_moving(chosen, undefined)  # audit 14a F8
    assert not _still_moving(SamplerConfig.merged(None, burnin=100, draws="auto"), drift)  # a burn-in given
    # criterion (vi): only an automatic η changes at an extension (review 42), so only it extends
    step = replace(rhat, failed={"step_size": "step size", "drift": "drift"})
    assert _still_moving(chosen, step) and not _still_moving(given, step) and not _still_moving(fixed_draws, step)
