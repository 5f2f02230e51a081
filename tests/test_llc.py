"""Behavioral LLC on models with known learning coefficients, at default settings (METHODS §1).

Tolerances come from the method's own error: the predicted step-size bias (exact for SGLD on a
quadratic) plus a few Monte-Carlo standard errors; for the deep linear networks the issue's 10 %.
"""

import numpy as np
import pytest
import torch
from torch import nn

from tl_degeneracy.errors import NumericalError
from tl_degeneracy.llc import DEFAULT_NBETA, LLCResult, behavioral_llc
from tl_degeneracy.theory import dln_learning_coefficient


def linear_regression(d: int = 10, n: int = 1000):
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(1))
    model = nn.Linear(d, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, d, generator=torch.Generator().manual_seed(2)))
    return model, x


def deep_linear_network(rank: int, seed: int = 0) -> nn.Module:
    """Widths (3, 2, 3); θ* realises a rank-`rank` product with orthonormal factors and the unused
    hidden units switched off in both layers (the most singular point of the fibre, as training from
    small initialisation finds it)."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 2, bias=False), nn.Linear(2, 3, bias=False))
    q1, _ = torch.linalg.qr(torch.randn(3, 3, generator=g))
    q2, _ = torch.linalg.qr(torch.randn(3, 3, generator=g))
    with torch.no_grad():
        model[0].weight.zero_()
        model[1].weight.zero_()
        model[0].weight[:rank] = q1[:rank]
        model[1].weight[:, :rank] = q2[:, :rank]
    return model


def dln_inputs(n: int = 1000) -> torch.Tensor:
    return torch.randn(n, 3, generator=torch.Generator().manual_seed(1))


def quadratic_prediction(hessian_eigenvalues: np.ndarray, nbeta: float, gamma: float, step_size: float) -> float:
    """E[nβ L] of discretised Langevin on ½ Σ h_i w_i²: per direction ½ nβ h/(a(1 − η a/4)), a = nβ h + γ."""
    a = nbeta * hessian_eigenvalues + gamma
    return float(np.sum(0.5 * nbeta * hessian_eigenvalues / (a * (1 - step_size * a / 4))))


def test_regular_model_gives_half_the_parameter_count():
    model, x = linear_regression()
    before = model.weight.detach().clone()
    res = behavioral_llc(model, x)
    d = 10
    assert isinstance(res, LLCResult)
    assert res.nbeta == DEFAULT_NBETA and res.n_params == d and not res.failed
    # L_B = ½ (w − w*)ᵀ (XᵀX/n) (w − w*): the SGLD stationary mean is known exactly.
    h = np.linalg.eigvalsh((x.T @ x / len(x)).double().numpy())
    predicted = quadratic_prediction(h, res.nbeta, res.gamma, res.step_size)
    assert abs(res.llc - predicted) < 4 * res.llc_stderr
    # And the stated bias bound covers the distance to d/2.
    bound = res.diagnostics["bias_bound"]
    assert bound <= 0.05 + 1e-9
    assert abs(res.llc - d / 2) < (d / 2) * bound / (1 - bound) + 4 * res.llc_stderr
    assert torch.equal(model.weight, before)  # θ* untouched
    assert res.n_eff == pytest.approx(2 * res.llc)


@pytest.mark.parametrize("rank", [0, 1, 2])
def test_deep_linear_network_matches_aoyagi_at_default_settings(rank):
    expected = dln_learning_coefficient((3, 2, 3), rank).llc  # 2.5, 3.5, 4.0
    res = behavioral_llc(deep_linear_network(rank), dln_inputs())
    assert res.loss == "mse" and not res.failed
    assert abs(res.llc - expected) <= 0.10 * expected, (res.llc, expected, res.diagnostics["calibration"])


def test_diagnostics_and_frame():
    model, x = linear_regression(d=4, n=200)
    res = behavioral_llc(model, x, chains=3, draws=100, burnin=20)
    assert res.trace.shape == (3, 120)
    assert np.all(res.trace >= 0)  # KL-type loss: never below L_B(θ*) = 0
    np.testing.assert_allclose(res.llc_per_chain, res.trace[:, 20:].mean(1), rtol=1e-12)
    assert res.llc_std == pytest.approx(np.std(res.llc_per_chain, ddof=1))
    assert res.llc_stderr == pytest.approx(res.llc_std / np.sqrt(3))
    frame = res.to_frame()
    assert list(frame.columns) == ["chain", "llc", "failed_at", "grad_norm", "prior_norm", "noise_norm", "distance"]
    assert (frame["failed_at"] == -1).all() and (frame[["grad_norm", "noise_norm", "distance"]] > 0).all().all()
    assert res.diagnostics["step_size_source"] == "automatic"
    # Burn-in adaptation at half and end of burn-in, never raising η; end-of-run bound recorded.
    assert [a["step"] for a in res.diagnostics["adaptations"]] == [10, 20]
    assert all(a["step_size"] >= res.step_size for a in res.diagnostics["adaptations"])
    assert 0 < res.diagnostics["bias_bound_end"] < 0.2
    assert res.diagnostics["h_max_at_reference"] > 0
    fig = res.plot()
    assert len(fig.data) == 3
    assert res.summary()["n_params"] == 4


def test_loss_scale_is_inverse_nbeta_and_conflicts_are_refused():
    model, x = linear_regression(d=3, n=50)
    a = behavioral_llc(model, x, loss_scale=1e-2, chains=2, draws=20, burnin=5)
    b = behavioral_llc(model, x, nbeta=100, chains=2, draws=20, burnin=5)
    assert a.nbeta == b.nbeta == 100 and a.loss_scale == pytest.approx(1e-2)
    np.testing.assert_array_equal(a.trace, b.trace)
    with pytest.raises(ValueError, match="disagree"):
        behavioral_llc(model, x, nbeta=10, loss_scale=1.0)


def test_given_step_size_reports_its_bias_bound():
    model, x = linear_regression(d=3, n=50)
    res = behavioral_llc(model, x, step_size=1e-5, chains=2, draws=10, burnin=0)
    assert res.step_size == 1e-5 and res.diagnostics["step_size_source"] == "given"
    h = res.diagnostics["h_max"]
    assert res.diagnostics["bias_bound"] == pytest.approx(1e-5 * (res.nbeta * h + res.gamma) / 4)


def test_end_of_run_bias_warning_names_a_smaller_step_size():
    model, x = linear_regression(d=3, n=50)
    # A given η far above the automatic one: the chains end where η(nβ h + γ)/4 ≫ 0.05.
    with pytest.warns(RuntimeWarning, match="smaller step_size"):
        res = behavioral_llc(model, x, step_size=2e-2, nbeta=100, chains=2, draws=50, burnin=10)
    assert res.diagnostics["bias_bound_end"] > 0.1


def test_every_chain_diverging_raises_with_advice():
    model, x = linear_regression(d=3, n=50)
    with pytest.raises(NumericalError, match="reduce step_size"):
        behavioral_llc(model, x, step_size=1.0, chains=2, draws=50, burnin=0)


class _BlowsUp(nn.Module):
    """Output w·x, NaN once w[0] > 0.2: chains with different noise fail at different steps."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(2))

    def forward(self, x):
        y = x @ self.w
        return torch.where(self.w[0] > 0.2, torch.full_like(y, float("nan")), y)


def test_a_diverging_chain_is_flagged_and_excluded():
    x = torch.randn(50, 2, generator=torch.Generator().manual_seed(0))
    with pytest.warns(RuntimeWarning, match="diverged and are excluded"):
        res = behavioral_llc(_BlowsUp(), x, nbeta=100, step_size=1e-3, chains=8, draws=200, burnin=0)
    assert 0 < len(res.failed) < 8
    for c, step in res.failed.items():
        assert np.isnan(res.llc_per_chain[c])
        assert np.all(np.isnan(res.trace[c, step:]))
        assert np.all(np.isfinite(res.trace[c, :step]))
    healthy = [c for c in range(8) if c not in res.failed]
    assert res.llc == pytest.approx(np.mean(res.llc_per_chain[healthy]))


def test_kl_on_a_plain_classifier_and_chain_independence():
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
    res = behavioral_llc(model, x, loss="kl", chains=4, draws=60, burnin=10, batch_size=16)
    assert np.isfinite(res.llc) and res.llc > 0 and res.diagnostics["n_batches"] == 4
    # A chain's path depends only on its own seed: the first two chains of a 2-chain run are the same.
    two = behavioral_llc(model, x, loss="kl", chains=2, draws=60, burnin=10, batch_size=16)
    np.testing.assert_allclose(two.trace, res.trace[:2], rtol=1e-5, atol=1e-7)


def test_rmsprop_sampler_on_regular_model():
    model, x = linear_regression(d=4, n=200)
    res = behavioral_llc(model, x, sampler="rmsprop", chains=4, draws=1500, burnin=500)
    assert res.sampler == "rmsprop" and not res.failed
    # RMSProp rescales directions, so the per-direction bias formula does not apply; stay within 15 %.
    assert abs(res.llc - 2.0) < 0.15 * 2.0 + 4 * res.llc_stderr


def test_bad_arguments():
    model, x = linear_regression(d=3, n=20)
    with pytest.raises(ValueError, match="sampler"):
        behavioral_llc(model, x, sampler="hmc")
    with pytest.raises(ValueError, match="unknown behavioral loss"):
        behavioral_llc(model, x, loss="ce")
    with pytest.raises(ValueError, match="gamma"):
        behavioral_llc(model, x, gamma=-1.0)
    with pytest.raises(ValueError, match="flat"):
        behavioral_llc(deep_linear_network(0), dln_inputs(10), gamma=0.0)
