"""Minibatch weighting of the behavioral loss (METHODS §1).

L_B is a mean over every counted position of the whole data, never a mean of per-batch means: each
minibatch's loss is its sum over its counted positions divided by the mean count per batch, so over
a cycle of ragged batches (sequences of different lengths, padding, a short last batch) the losses,
their gradients and the curvature average to the one-full-batch L_B. All in float64: the
comparisons are exact up to float64 rounding of sums of a few hundred terms (rtol 1e-10). The
dynamics still see the split: each step meets its own batch's loss, so the stiffest batch sets the
stability of a step and the batches' gradients' spread adds to the injected noise; the step-size
rule and the bias bound use both, and a ragged split warns.
"""

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from tl_degeneracy.llc import behavioral_llc
from tl_degeneracy.llc.layout import ParameterLayout, selection_masks
from tl_degeneracy.llc.targets import make_target
from tl_degeneracy.llc.stepsize import (SPREAD_BATCHES, batch_curvature, cycle_sample, gradient_spread,
                                        top_hessian_eigenvalue)

from .fixtures.toys import TINY_TOY_KWARGS, make_tiny_toy_transformer

RTOL = 1e-10
#: Sequence lengths whose batches of 2 hold 23, 3, 12 and 16 counted positions (the toy has no BOS).
LENGTHS = (12, 11, 2, 1, 9, 3, 16)


def _ragged_tokens() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return [torch.randint(0, TINY_TOY_KWARGS["d_vocab"], (n,), generator=g) for n in LENGTHS]


def _deltas(target, chains: int = 2, scale: float = 0.2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {n: scale * torch.randn((chains, *t.shape), generator=g, dtype=t.dtype) for n, t in target.star.items()}


def _mean_of_batch_means(target, deltas) -> torch.Tensor:
    """The old, wrong L_B: each batch's own mean, averaged over batches."""
    return sum(target.loss(deltas, b) * (target.mean_positions / target.positions(b))
               for b in range(target.n_batches)) / target.n_batches


def test_ragged_token_minibatches_give_the_full_batch_loss_and_gradient():
    model = make_tiny_toy_transformer().double()
    tokens = _ragged_tokens()
    full = make_target(model, tokens, "kl", None)
    mini = make_target(model, tokens, "kl", 2)
    assert full.n_batches == 1 and mini.n_batches == 4
    assert [mini.positions(b) for b in range(4)] == [23, 3, 12, 16]
    assert mini.n_samples == full.n_samples == sum(LENGTHS) and mini.mean_positions == sum(LENGTHS) / 4

    deltas = {n: d.requires_grad_(True) for n, d in _deltas(full).items()}
    reference = full.loss(deltas, 0)  # one batch: the plain mean over every counted position
    assert bool((reference > 0).all())
    # The sampler's per-step losses average over one cycle to the dataset's L_B ...
    cycle = sum(mini.loss(deltas, b) for b in range(4)) / 4
    torch.testing.assert_close(cycle, reference, rtol=RTOL, atol=0)
    torch.testing.assert_close(mini.mean_loss(deltas), reference, rtol=RTOL, atol=0)
    torch.testing.assert_close(full.mean_loss(deltas), reference, rtol=RTOL, atol=0)
    # ... and so do their gradients, which drive the SGLD steps.
    g_cycle = torch.autograd.grad(cycle.sum(), list(deltas.values()), retain_graph=True)
    g_full = torch.autograd.grad(reference.sum(), list(deltas.values()), retain_graph=True)
    # Some entries are 0 but for rounding (b_U: softmax ignores a shift), so atol is set by the largest.
    scale = max(float(g.abs().max()) for g in g_full)
    for a, b in zip(g_cycle, g_full):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=RTOL * scale)
    # A subset of batches: its own position-weighted mean (batches 1 and 3: 3 + 16 positions).
    part = (mini.loss(deltas, 1) + mini.loss(deltas, 3)) * mini.mean_positions / 19
    torch.testing.assert_close(mini.mean_loss(deltas, [1, 3]), part, rtol=RTOL, atol=0)
    # The case discriminates: a mean of batch means is far off here (for the second chain, 8 %).
    wrong = _mean_of_batch_means(mini, deltas).detach()
    assert float(((wrong - reference.detach()).abs() / reference.detach()).max()) > 0.05, (wrong, reference)


def _ragged_regression():
    """y = w·x on 7 rows in batches of 3, 3, 1 whose last row is 10× larger: the batch means differ."""
    x = torch.full((7, 2), 0.1, dtype=torch.float64)
    x[:, 1] = torch.linspace(-0.1, 0.1, 7, dtype=torch.float64)
    x[6] = torch.tensor([1.0, -2.0], dtype=torch.float64)
    model = nn.Linear(2, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.5, -1.0]], dtype=torch.float64))
    return model, x


def test_short_last_batch_is_weighted_by_its_positions():
    model, x = _ragged_regression()
    mini = make_target(model, x, "mse", 3)
    assert [mini.positions(b) for b in range(3)] == [3, 3, 1] and mini.n_samples == 7
    delta = torch.tensor([[0.3, 0.7], [-1.0, 0.2]], dtype=torch.float64)
    # mse L_B = mean over the 7 rows of ½ (δ·x)² (the ½ of METHODS §1).
    expected = 0.5 * ((delta @ x.T) ** 2).mean(1)
    cycle = sum(mini.loss({"weight": delta[:, None, :]}, b) for b in range(3)) / 3
    torch.testing.assert_close(cycle, expected, rtol=RTOL, atol=0)
    # The old weighting gives ((s₁ + s₂)/3·... ) a different number: the last row counted 7/3 times.
    wrong = _mean_of_batch_means(mini, {"weight": delta[:, None, :]})
    assert float(((wrong - expected).abs() / expected).min()) > 0.5


def test_curvature_of_ragged_minibatches_is_the_full_data_hessian():
    # L_B = ½ δᵀ (XᵀX/N) δ: the step size's h_max must be the top eigenvalue of XᵀX/N, not of the
    # mean of the batches' own XᵀX/n_b (which counts the short batch's row 7/3 times).
    model, x = _ragged_regression()
    mini = make_target(model, x, "mse", 3)
    _, masks = selection_masks(mini, None)
    layout = ParameterLayout(tuple(masks), tuple(tuple(mini.star[n].shape) for n in masks))
    mask = layout.flatten(masks)
    h = top_hessian_eigenvalue(mini, layout, mask, torch.zeros(1, 2, dtype=torch.float64), rtol=0.0, iters=10)
    expected = np.linalg.eigvalsh((x.T @ x / 7).numpy()).max()
    wrong = np.mean([np.linalg.eigvalsh((x[s].T @ x[s] / len(x[s])).numpy()) for s in (slice(0, 3), slice(3, 6), slice(6, 7))], 0).max()
    assert abs(wrong - expected) > 0.5 * expected  # the case discriminates
    assert float(h[0]) == pytest.approx(expected, rel=1e-9)


def test_llc_reports_the_counted_positions_of_ragged_data():
    model, x = _ragged_regression()
    res = behavioral_llc(model, x, batch_size=3, chains=1, draws=6, burnin=0, step_size=1e-4)
    d = res.diagnostics
    assert d["n_samples"] == 7 and d["n_batches"] == 3 and d["mean_positions_per_batch"] == pytest.approx(7 / 3)
    assert np.isfinite(res.llc)


def cycle_prediction(hessians, nbeta: float, gamma: float, step_size: float) -> float:
    """E[nβ L_B,b] of SGLD on the quadratics L_B,b(δ) = ½ δᵀ H_b δ, one step on each batch in turn
    (the sampler's cycle; the recorded loss is the step's batch loss): the step on batch b maps the
    covariance Σ to M_b Σ M_bᵀ + η I, M_b = I − η(nβ H_b + γ)/2; the cycle's fixed point Σ_0 solves
    (I − Φ ⊗ Φ) vec Σ_0 = vec Q (Φ the cycle's product of the M_b, Q the noise it accumulates), and the
    value is the cycle's mean of ½ nβ tr(H_b Σ_b). Exact, for any batch Hessians; one batch H gives
    the full-batch value ½ Σ nβ h/(a(1 − η a/4)) (METHODS (1.7))."""
    hessians = [np.asarray(h, dtype=np.float64) for h in hessians]
    eye = np.eye(len(hessians[0]))
    steps = [eye - step_size * (nbeta * h + gamma * eye) / 2 for h in hessians]
    phi, q = eye, np.zeros_like(eye)
    for m in steps:
        phi, q = m @ phi, m @ q @ m.T + step_size * eye
    sigma = np.linalg.solve(np.eye(eye.size) - np.kron(phi, phi), q.reshape(-1)).reshape(eye.shape)
    total = 0.0
    for h, m in zip(hessians, steps):
        total += 0.5 * nbeta * float(np.trace(h @ sigma))
        sigma = m @ sigma @ m.T + step_size * eye
    return total / len(hessians)


def _llc_and_ragged_warnings(model, x, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = behavioral_llc(model, x, **kw)
    return res, [str(w.message) for w in caught if "ragged minibatches" in str(w.message)]


@pytest.mark.tl_agnostic  # a plain torch network (no TransformerLens): once, in the TransformerLens 4.x run
def test_a_tiny_last_batch_shrinks_the_step_size_and_warns():
    # n = 1000 in batches (999, 1): the 999-row batch's loss is (its sum)/500, so its steps meet
    # w_max = 1.998× the curvature of L_B. The automatic η is chosen for that curvature, so λ̂ keeps
    # the full batch's bias; at the full batch's η it rose by 5 standard errors (+4 %) without a word.
    from .test_llc import linear_regression, quadratic_prediction

    model, x = linear_regression()
    h = np.linalg.eigvalsh((x.T @ x / len(x)).double().numpy())
    d = 10
    full, none = _llc_and_ragged_warnings(model, x)
    even, none_even = _llc_and_ragged_warnings(model, x, batch_size=250)
    ragged, warned = _llc_and_ragged_warnings(model, x, batch_size=999)
    assert not none and not none_even and len(warned) == 1
    assert "2.00× the mean 500" in warned[0] and "batch_size=500 divides the 1,000 rows" in warned[0]
    weights = (999 / 500, 1 / 500)
    # The rule's curvature is the stiffest batch's (Lanczos upper estimate, CURVATURE_RTOL 2 %) ...
    assert ragged.diagnostics["h_max"] == pytest.approx(weights[0] * h.max(), rel=0.03)
    assert full.diagnostics["h_max"] == pytest.approx(h.max(), rel=0.03)
    # ... and the weights' spread (Var w = 0.996) enters through the gradients' spread S, which the rule
    # counts twice (cycled batches: up to (η/4) nβ² S, stepsize.py): η is about 1 + 2 Var w times smaller.
    # An even split into 4 × 250 rows has a small spread: η 20 % smaller.
    assert ragged.step_size == pytest.approx(full.step_size / (1 + 2 * np.var(weights)), rel=0.1)
    assert 0.7 * full.step_size < even.step_size < 1.05 * full.step_size
    # The SGLD value of the (999, 1) cycle at that η (exact on this quadratic) ...
    assert cycle_prediction([np.diag(h)], full.nbeta, full.gamma, full.step_size) == pytest.approx(
        quadratic_prediction(h, full.nbeta, full.gamma, full.step_size), rel=1e-12)
    expected = cycle_prediction([w * np.diag(h) for w in weights], ragged.nbeta, ragged.gamma, ragged.step_size)
    assert abs(ragged.llc - expected) < 4 * ragged.llc_stderr
    # ... is the full batch's within the method's error, and the bias bound covers the distance to d/2.
    assert abs(ragged.llc - full.llc) < 4 * np.hypot(ragged.llc_stderr, full.llc_stderr)
    bound = ragged.diagnostics["bias_bound"]
    assert ragged.diagnostics["bias_bound_chosen"] <= 0.05 / 0.95 + 1e-9
    assert abs(ragged.llc - d / 2) < (d / 2)  * bound + 4 * ragged.llc_stderr


def test_largest_batch_weight_and_the_curvature_factor():
    from types import SimpleNamespace

    from tl_degeneracy.llc.stepsize import unmeasured_batch_factor

    x = torch.zeros(1000, 2)
    model = nn.Linear(2, 1, bias=False)
    # Each batch's own curvature (L_B,b carries w_b) is measured on the first four batches; the factor
    # covers a larger batch beyond them.
    for batch_size, w_max in [(None, 1.0), (250, 1.0), (999, 1.998), (300, 1.2), (64, 1.024)]:
        target = make_target(model, x, "mse", batch_size)
        assert target.largest_batch_weight == pytest.approx(w_max) and unmeasured_batch_factor(target) == 1.0
        if w_max <= 1.2:
            assert target.ragged_warning() is None
        else:
            assert "batch_size=500" in target.ragged_warning()
    # Sequences of different lengths: batches 0, 2, 3 and 5 are measured (spread over the cycle); the
    # fifth counts 4× the positions of the largest of them.
    assert cycle_sample(6, 4) == [0, 2, 3, 5] and cycle_sample(3, 4) == [0, 1, 2] and cycle_sample(100, 1) == [0]
    assert unmeasured_batch_factor(SimpleNamespace(batch_positions=(10, 8, 10, 9, 40, 3), n_batches=6)) == 4.0


def _regression_batches(batch_size: int):
    """The linear regression of test_llc in float64, its target in batches of ``batch_size`` and their
    Hessians H_b = X_bᵀX_b / batch_size (L_B,b = ½ δᵀ H_b δ; equal batches)."""
    from .test_llc import linear_regression

    model, x = linear_regression()
    model, x = model.double(), x.double()
    target = make_target(model, x, "mse", batch_size)
    hessians = [(x[i:i + batch_size].T @ x[i:i + batch_size] / batch_size).numpy() for i in range(0, len(x), batch_size)]
    return model, x, target, hessians


def _layout(target):
    _, masks = selection_masks(target, None)
    layout = ParameterLayout(tuple(masks), tuple(tuple(target.star[n].shape) for n in masks))
    return layout, layout.flatten(masks)


def test_gradient_spread_and_the_stiffest_batch_are_exact_on_a_quadratic():
    # ∇L_B,b(δ) = H_b δ: S = (1/B) Σ_b ‖H_b δ − H δ‖² over the B = 10 batches of 100 (all measured), and
    # from SPREAD_BATCHES of B = 100 batches of 10, spread over the cycle, their sample variance times (B − 1)/B.
    points = torch.randn(3, 10, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for batch_size in (100, 10):
        _, _, target, hessians = _regression_batches(batch_size)
        layout, mask = _layout(target)
        grads = np.stack([points.numpy() @ h for h in hessians])  # [B, P, D]
        B = len(hessians)
        measured = cycle_sample(B, SPREAD_BATCHES)
        k = len(measured)
        sample = ((grads[measured] - grads[measured].mean(0)) ** 2).sum(2).sum(0) / (k - 1)
        expected = sample * (B - 1) / B
        if k == B:
            np.testing.assert_allclose(expected, ((grads - grads.mean(0)) ** 2).sum(2).mean(0), rtol=1e-12)
        np.testing.assert_allclose(gradient_spread(target, layout, mask, points).numpy(), expected, rtol=1e-10)
        # The stiffest of four batches' Hessians spread over the cycle, not that of their mean.
        top = batch_curvature(target, layout, mask, points[:1], rtol=0.0, iters=10)
        four = cycle_sample(B, 4)
        assert float(top[0]) == pytest.approx(max(np.linalg.eigvalsh(hessians[b]).max() for b in four), rel=1e-9)
    one = make_target(*_regression_batches(10)[:2], "mse", None)
    assert torch.equal(gradient_spread(one, *_layout(one), points), torch.zeros(3, dtype=torch.float64))


@pytest.mark.tl_agnostic  # a plain torch network (no TransformerLens): once, in the TransformerLens 4.x run
def test_small_equal_minibatches_raise_the_bias_and_the_bound_covers_it():
    # Linear regression, d = 10, n = 1000, in 100 batches of 10 samples (audit 8a F14): each step meets
    # its batch's Hessian, whose spread around H adds to the injected noise. At the full batch's η the
    # exact SGLD value of that cycle is 8.9 % above λ while the old rule, which read only the mean
    # Hessian, printed the full batch's 4 %: λ̂ = 5.37 ± 0.04 over 3 seeds against 5.18 ± 0.04.
    from .test_llc import linear_regression, quadratic_prediction

    model, x = linear_regression()
    hessians = _regression_batches(10)[3]
    h = np.linalg.eigvalsh(np.mean(hessians, 0))
    full = behavioral_llc(model, x, progress=False)
    mini = behavioral_llc(model, x, batch_size=10, progress=False)
    nb, gamma = mini.nbeta, mini.gamma
    truth = float(np.sum(0.5 * nb * h / (nb * h + gamma)))  # λ at this γ (4.995)
    old = cycle_prediction(hessians, nb, gamma, full.step_size)
    assert (old - truth) / truth > 2 * full.diagnostics["bias_bound"]  # the case discriminates
    assert full.diagnostics["gradient_spread"] == 0 and mini.diagnostics["gradient_spread"] > 0
    # The automatic η is smaller, and the bound it prints covers the exact bias of the run's own η ...
    assert mini.step_size < 0.6 * full.step_size
    exact = cycle_prediction(hessians, nb, gamma, mini.step_size)
    assert (exact - truth) / truth <= mini.diagnostics["bias_bound"] <= 0.1
    # ... of which the spread term is the first-order part: (η/8) tr(W V) ≤ (η/8) nβ² S, W ⪯ I.
    excess = exact - quadratic_prediction(h, nb, gamma, mini.step_size)
    predicted = mini.step_size / 8 * nb**2 * mini.diagnostics["gradient_spread_end"]
    assert 0.5 * predicted < excess < 1.5 * predicted
    # The chains are the SGLD this oracle computes.
    assert abs(mini.llc - exact) < 4 * mini.llc_stderr


@pytest.mark.tl_agnostic  # a plain torch network (no TransformerLens): once, in the TransformerLens 4.x run
def test_cycled_minibatch_bias_is_covered_where_gamma_holds_the_spread():
    """With γ comparable to nβh (W = nβH(nβH + γ)⁻¹ well below I) the cycled sampler's spread term is up
    to (η/4) nβ² S, twice the (η/8) tr(W V) of batches drawn independently each step (review of the
    minibatch rule: 1.5× (η/8) nβ² S at γ = 10³, 1.9× at 10⁴). The rule counts 2 nβ S, so the printed
    bound covers the exact bias of the cycle there too."""
    from .test_llc import linear_regression

    model, x = linear_regression()
    hessians = _regression_batches(10)[3]
    h = np.linalg.eigvalsh(np.mean(hessians, 0))
    for gamma in (1e3, 1e4):
        res = behavioral_llc(model, x, batch_size=10, gamma=gamma, progress=False)
        nb = res.nbeta
        truth = float(np.sum(0.5 * nb * h / (nb * h + gamma)))
        exact = cycle_prediction(hessians, nb, gamma, res.step_size)
        assert 0 < (exact - truth) / truth <= res.diagnostics["bias_bound"], (gamma, exact, truth, res.diagnostics["bias_bound"])
        assert abs(res.llc - exact) < 4 * res.llc_stderr


def test_a_stiff_batch_at_the_end_of_the_cycle_is_measured_and_its_chains_are_not_dropped():
    """Audit 14a F2, F3: one batch of 10 (of 100) with inputs ×4 has top curvature 49.9 against 1.54 for
    the mean. Put last, it was never measured (the first 4 batches were): h_max read 4.03, η came out
    28× too large for it, and 5 of 8 chains were dropped as diverged. Put first, healthy chains were
    dropped because that one batch's nβ L_b (≈ ½ tr(H_b H⁻¹), up to B× the whole data's) crossed a
    threshold sized for the whole data, and λ̂ read 4.80 for 5.00."""
    from .test_llc import linear_regression

    model, x = linear_regression()
    x = x.clone()
    x[-10:] *= 4.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # short chains at a small η: not converged
        res = behavioral_llc(model, x, batch_size=10, chains=4, burnin=500, draws=1000, progress=False)
    assert res.diagnostics["h_max"] > 45 and not res.failed
    assert res.diagnostics["step_size"] < 4e-6  # set by the stiff batch: b_max ≤ ½ there
