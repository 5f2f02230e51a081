"""Minibatch weighting of the behavioral loss (METHODS §1).

L_B is a mean over every counted position of the whole data, never a mean of per-batch means: each
minibatch's loss is its sum over its counted positions divided by the mean count per batch, so over
a cycle of ragged batches (sequences of different lengths, padding, a short last batch) the losses,
their gradients and the curvature average to the one-full-batch L_B. All in float64: the
comparisons are exact up to float64 rounding of sums of a few hundred terms (rtol 1e-10). The
dynamics still see the split: the largest batch's step meets w_max = max_b n_b/n̄ times the
curvature, which the step-size rule uses and a run warns about.
"""

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from tl_degeneracy.llc import behavioral_llc
from tl_degeneracy.llc.layout import ParameterLayout, selection_masks
from tl_degeneracy.llc.targets import make_target
from tl_degeneracy.llc.stepsize import top_hessian_eigenvalue

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


def cycle_prediction(h: np.ndarray, nbeta: float, gamma: float, step_size: float, weights) -> float:
    """E[nβ L_B,b] of SGLD on ½ Σ h_i δ_i² cycling over batches whose losses carry weights w_b (n_b/n̄):
    per direction the step on batch b contracts the variance by c_b² = (1 − η(nβ w_b h + γ)/2)² and adds
    η; the cycle's fixed point, averaged over the cycle's recorded losses ½ nβ w_b h V_b. One batch of
    weight 1 gives the full-batch value ½ nβ h/(a(1 − η a/4)) (METHODS (1.7))."""
    w = np.asarray(weights, dtype=np.float64)[:, None]
    c2 = (1 - step_size * (nbeta * w * h + gamma) / 2) ** 2  # [batch, direction]
    added = np.zeros_like(h)
    for b in range(len(w)):
        added = c2[b] * added + step_size
    v = added / (1 - np.prod(c2, 0))  # variance before the cycle's first step
    total = 0.0
    for b in range(len(w)):
        total += float(np.sum(0.5 * nbeta * w[b] * h * v))
        v = c2[b] * v + step_size
    return total / len(w)


def _llc_and_ragged_warnings(model, x, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = behavioral_llc(model, x, **kw)
    return res, [str(w.message) for w in caught if "ragged minibatches" in str(w.message)]


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
    # The rule's curvature is the largest batch's (Lanczos upper estimate, CURVATURE_RTOL 2 %) ...
    assert ragged.diagnostics["h_max"] == pytest.approx(weights[0] * h.max(), rel=0.03)
    assert full.diagnostics["h_max"] == pytest.approx(h.max(), rel=0.03)
    # ... so η is about w_max times smaller (an even split leaves it alone).
    assert ragged.step_size == pytest.approx(full.step_size / weights[0], rel=0.1)
    assert even.step_size == pytest.approx(full.step_size, rel=0.1)
    # The SGLD value of the (999, 1) cycle at that η (exact on this quadratic) ...
    assert cycle_prediction(h, full.nbeta, full.gamma, full.step_size, [1.0]) == pytest.approx(
        quadratic_prediction(h, full.nbeta, full.gamma, full.step_size), rel=1e-12)
    expected = cycle_prediction(h, ragged.nbeta, ragged.gamma, ragged.step_size, weights)
    assert abs(ragged.llc - expected) < 4 * ragged.llc_stderr
    # ... is the full batch's within the method's error, and the bias bound covers the distance to d/2.
    assert abs(ragged.llc - full.llc) < 4 * np.hypot(ragged.llc_stderr, full.llc_stderr)
    bound = ragged.diagnostics["bias_bound"]
    assert ragged.diagnostics["bias_bound_chosen"] <= 0.05 / 0.95 + 1e-9
    assert abs(ragged.llc - d / 2) < (d / 2)  * bound + 4 * ragged.llc_stderr


def test_largest_batch_weight_and_the_curvature_factor():
    from tl_degeneracy.llc.stepsize import largest_batch_factor

    x = torch.zeros(1000, 2)
    model = nn.Linear(2, 1, bias=False)
    for batch_size, w_max, factor in [(None, 1.0, 1.0), (250, 1.0, 1.0), (999, 1.998, 1.998),
                                      (300, 1.2, 1.2),  # (300, 300, 300, 100): all four measured
                                      (64, 1.024, 1.0)]:  # 15 × 64 + 40: the first four batches are full
        target = make_target(model, x, "mse", batch_size)
        assert target.largest_batch_weight == pytest.approx(w_max) and largest_batch_factor(target) == pytest.approx(factor)
        if w_max <= 1.2:
            assert target.ragged_warning() is None
        else:
            assert "batch_size=500" in target.ragged_warning()
