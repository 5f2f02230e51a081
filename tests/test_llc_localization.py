"""Localization γ and step size chosen so that chains can converge (METHODS §1, issue 15 item 3).

Ground truths are exact: on a linear model under mse, L_B is a quadratic with known curvatures, so
the stationary mean of discretised SGLD is known in closed form (test_llc.quadratic_prediction) for
any η and γ. Tolerances: that prediction within 4 standard errors; the step-size rule's predicted
bias is an upper bound on a quadratic (stepsize.py), checked against the closed form.
"""

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from tl_degeneracy.llc import ConvergenceWarning, SamplerConfig, behavioral_llc, llc_sweep, plot_llc_sweep
from tl_degeneracy.llc.config import GAMMA_RELAXATION
from tl_degeneracy.llc.stepsize import predicted_bias, step_size_for

from .test_llc import quadratic_prediction


def scaled_regression(scales, n: int = 400, seed: int = 0):
    """y = w·(x ⊙ scales) through nn.Linear on inputs whose columns are orthonormal-ish and scaled:
    L_B = ½ δᵀ Σ δ, Σ = XᵀX/n, with curvatures ≈ scales²."""
    g = torch.Generator().manual_seed(seed)
    d = len(scales)
    q, _ = torch.linalg.qr(torch.randn(n, d, generator=g, dtype=torch.float64))
    x = (q * np.sqrt(n) * torch.tensor(scales, dtype=torch.float64)).float()
    model = nn.Linear(d, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, d, generator=g))
    return model, x


def _curvatures(x) -> np.ndarray:
    return np.linalg.eigvalsh((x.T.double() @ x.double() / len(x)).numpy())


#: 3 stiff directions (h = 1) and 100 slow ones (nβh = 1 at nβ = 1000): at γ = 1 the slow ones
#: relax at rate nβh + γ = 2 per unit cumulative step, i.e. over ~s = 1.5 (10⁴ steps at η = 1.5·10⁻⁴),
#: far beyond these runs; each adds ½·nβh/(nβh + γ) at equilibrium (¼ at γ = 1, ≈ 0.005 at γ = 100).
SLOW = [1.0] * 3 + [0.001**0.5] * 100


def _run(model, x, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = behavioral_llc(model, x, progress=False, **kwargs)
    return res, [str(w.message) for w in caught if issubclass(w.category, ConvergenceWarning)]


def test_auto_gamma_rule():
    cfg = SamplerConfig(gamma="auto", burnin=200)
    assert cfg.auto_gamma(1e-4) == pytest.approx(GAMMA_RELAXATION / (1e-4 * 200)) == pytest.approx(150.0)
    assert cfg.auto_gamma(1.0) == 1.0  # never below the floor (default 1)
    assert SamplerConfig(gamma="auto", min_gamma=500.0, burnin=200).auto_gamma(1e-4) == 500.0
    # No burn-in: the first block of draws is the window.
    assert SamplerConfig(gamma="auto", burnin=0, draws=300).auto_gamma(1e-3) == pytest.approx(10.0)
    assert SamplerConfig(gamma=7.0).auto_gamma(1e-9) == 7.0  # a given γ is used as given
    with pytest.raises(ValueError, match="min_gamma"):
        SamplerConfig(gamma=2.0, min_gamma=1.0)
    with pytest.raises(ValueError, match="gamma"):
        SamplerConfig(gamma="big")


def test_slow_directions_drift_at_gamma_one_and_converge_at_auto_gamma():
    model, x = scaled_regression(SLOW)
    h = _curvatures(x)
    # γ = 1: the slow directions are still spreading when the draws end — not converged, one warning.
    res1, warned1 = _run(model, x, step_size=1.5e-4, gamma=1.0, chains=4, burnin=200, draws=800)
    assert not res1.converged and len(warned1) == 1 and "lower bound" in warned1[0]
    assert res1.llc < quadratic_prediction(h, res1.nbeta, 1.0, 1.5e-4) - 4 * res1.llc_stderr
    # γ = "auto" at the same budget: γ·s over the burn-in is GAMMA_RELAXATION, the chains converge,
    # and λ̂ is the exact stationary value at that γ (λ(ε, γ): the slow directions count ≈ nβh/(2γ)).
    res, warned = _run(model, x, step_size=1.5e-4, gamma="auto", chains=4, burnin=200, draws=800)
    assert res.gamma == pytest.approx(GAMMA_RELAXATION / (1.5e-4 * 200))
    assert res.gamma * res.step_size * res.burnin >= GAMMA_RELAXATION * (1 - 1e-12)
    assert res.diagnostics["cumulative_step"] == pytest.approx(1.5e-4 * 1000)
    assert res.converged and not warned
    assert res.diagnostics["gamma_source"].startswith("auto")
    expected = quadratic_prediction(h, res.nbeta, res.gamma, res.step_size)
    assert abs(res.llc - expected) < 4 * res.llc_stderr, (res.llc, expected, res.llc_stderr)


def test_automatic_gamma_with_automatic_step_is_the_fixed_point():
    model, x = scaled_regression(SLOW)
    res, _ = _run(model, x, gamma="auto", chains=4, burnin=100, draws=200)
    # γ was chosen for the η sampling started with (the burn-in checks may lower η afterwards).
    eta0 = res.diagnostics["step_size_initial"]
    assert res.step_size <= eta0
    assert res.gamma == pytest.approx(max(1.0, GAMMA_RELAXATION / (eta0 * 100)))
    # The γ stated everywhere: result, summary, frame, label.
    assert res.summary()["gamma"] == res.gamma and res.to_frame().attrs["gamma"] == res.gamma
    assert res.label == f"λ̂(ε = 0.001, γ = {res.gamma:.3g})" and res.summary()["quantity"] == res.label
    assert f"gamma={res.gamma:.4g}" in repr(res)


def test_step_rule_is_far_larger_than_the_stiffest_direction_bound_on_a_wide_spectrum_and_unbiased():
    """2 stiff directions (h = 100) and 20 moderate ones (h = 1): the old rule set η by the stiffest
    (b_max = 0.05, η = 2·10⁻⁶); the bias of λ̂ is the w-weighted mean of b_i/(1 − b_i), dominated by
    the 20 moderate ones, so η may be ≈ 6× larger for a 5 % bias."""
    model, x = scaled_regression([10.0] * 2 + [1.0] * 20)
    h = _curvatures(x)
    res, _ = _run(model, x, chains=8, burnin=300, draws=1500, seed=3)
    cautious = step_size_for(h.max(), res.nbeta, res.gamma, 0.05 / 1.05)
    assert res.step_size >= 3 * cautious, (res.step_size, cautious)
    assert not res.failed
    # The exact stationary mean at this η: λ̂ within 4 standard errors of it.
    expected = quadratic_prediction(h, res.nbeta, res.gamma, res.step_size)
    assert abs(res.llc - expected) < 4 * res.llc_stderr, (res.llc, expected, res.llc_stderr)
    # The true relative bias (closed form against η → 0) is within the bias aimed for, and the
    # predicted bias with the exact trace and λ is an upper bound of it.
    exact0 = quadratic_prediction(h, res.nbeta, res.gamma, 0.0)
    true_bias = expected / exact0 - 1
    assert 0 < true_bias <= 0.05 * 1.1
    bound = predicted_bias(res.step_size, h.max(), h.sum(), exact0, res.nbeta, res.gamma)
    assert true_bias <= bound
    # The reported bias is the rule's estimate with measured curvature (Lanczos, Hutchinson) and λ̂.
    assert res.diagnostics["bias_bound"] == pytest.approx(bound, rel=0.5)
    assert res.diagnostics["stiff_bound"] <= 0.5 + 1e-9


def test_llc_sweep_over_gammas_states_gamma_and_falls_as_gamma_rises(tmp_path):
    model, x = scaled_regression(SLOW, n=200)
    frame = llc_sweep(model, x, [1e-3], gammas=[30.0, 300.0, 3000.0], step_size=1.5e-4, chains=2, burnin=100, draws=200,
                      checkpoint_dir=tmp_path, progress=False)
    assert list(frame["gamma"]) == [30.0, 300.0, 3000.0] and (frame["gamma_source"] == "given").all()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "loss_scale_0.001_gamma_30.0", "loss_scale_0.001_gamma_300.0", "loss_scale_0.001_gamma_3000.0"]
    assert frame["llc"].is_monotonic_decreasing
    fig = plot_llc_sweep(frame)
    assert fig.layout.xaxis.title.text == "localization γ"
    with pytest.raises(ValueError, match="not both"):
        llc_sweep(model, x, [1e-3], gammas=[1.0], gamma=2.0)


def test_report_settings_gamma():
    from tl_degeneracy.report.settings import PRESETS, resolve_settings

    assert PRESETS["quick"].gamma == "auto" and PRESETS["thorough"].gammas
    s = resolve_settings("quick", {"gamma": "1e3", "gammas": "1,10"})
    assert s.gamma == 1000.0 and s.gammas == (1.0, 10.0)
    assert resolve_settings("quick", {"gamma": "auto"}).gamma == "auto"
    with pytest.raises(ValueError, match="gamma"):
        resolve_settings("quick", {"gamma": "-1"})
