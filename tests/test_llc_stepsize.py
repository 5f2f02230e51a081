"""Automatic step size (METHODS §1, SGLD): the curvature it is derived from, and when it is adapted."""

import numpy as np
import pytest
import torch

from tl_degeneracy.llc import behavioral_llc
from tl_degeneracy.llc.stepsize import ADAPT_AT
from tl_degeneracy.llc.layout import ParameterLayout
from tl_degeneracy.llc.stepsize import top_hessian_eigenvalue

from .test_llc import deep_linear_network, dln_inputs, linear_regression


class _Quadratic:
    """L(θ* + δ) = ½ δᵀ A δ for every chain: a target whose Hessian is A everywhere."""

    n_batches = 1

    def __init__(self, A):
        self.A = A

    def loss(self, deltas, b):
        d = deltas["w"]
        return 0.5 * torch.einsum("ci,ij,cj->c", d, self.A, d)


def _with_spectrum(spectrum, dtype):
    q, _ = torch.linalg.qr(torch.randn(len(spectrum), len(spectrum), generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    return (q @ torch.diag(torch.tensor(spectrum, dtype=torch.float64)) @ q.T).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_top_eigenvalue_is_the_largest_positive_one_beside_a_larger_negative_one(dtype):
    # |−50| dominates: power iteration converges to −50 (then clamped to 0), hiding the curvature 4
    # that limits η. The Lanczos value is the largest algebraic eigenvalue.
    spectrum = [-50.0, 4.0, 3.0, 2.0, 1.0, 0.5, -1.0, 0.0, -20.0, 3.9]
    n = len(spectrum)
    target = _Quadratic(_with_spectrum(spectrum, dtype))
    layout, mask = ParameterLayout(("w",), ((n,),)), torch.ones(n, dtype=torch.bool)
    points = torch.zeros(3, n, dtype=dtype)
    tol = 1e-4 if dtype == torch.float32 else 1e-9  # rounding of the 50-scale products
    # Default stopping: the Ritz value plus its residual, an upper bound within rtol = 1e-3 of 4.
    top = top_hessian_eigenvalue(target, layout, mask, points).numpy()
    assert np.all(top >= 4.0 - tol) and np.all(top <= 4.0 * (1 + 1e-3) + tol), top
    # rtol = 0: run until the 10-dimensional Krylov space is exhausted, where the Ritz value is exact.
    top = top_hessian_eigenvalue(target, layout, mask, points, rtol=0.0, iters=30, point_seeds=[1, 2, 3])
    np.testing.assert_allclose(top.numpy(), 4.0, atol=tol)
    # No positive curvature at all: 0 (the step size then comes from γ alone).
    target = _Quadratic(_with_spectrum([-5.0, -1.0, -0.1, -3.0], dtype))
    layout, mask = ParameterLayout(("w",), ((4,),)), torch.ones(4, dtype=torch.bool)
    assert torch.equal(top_hessian_eigenvalue(target, layout, mask, torch.zeros(2, 4, dtype=dtype)), torch.zeros(2, dtype=dtype))


def test_top_eigenvalue_matches_the_dense_hessian_of_a_network_away_from_its_minimum():
    from tl_degeneracy.llc.targets import make_target

    model = deep_linear_network(1).double()
    x = dln_inputs(50).double()
    target = make_target(model, x, None, None)
    names = list(target.star)
    layout = ParameterLayout(tuple(names), tuple(tuple(target.star[n].shape) for n in names))
    mask = torch.ones(layout.numel, dtype=torch.bool)
    points = 0.7 * torch.randn(4, layout.numel, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    lanczos = top_hessian_eigenvalue(target, layout, mask, points, rtol=0.0, iters=layout.numel)
    for p, point in enumerate(points):
        hess = torch.autograd.functional.hessian(lambda d: target.loss(layout.unflatten(d[None]), 0)[0], point)
        eig = torch.linalg.eigvalsh(hess)
        assert float(lanczos[p]) == pytest.approx(max(float(eig[-1]), 0.0), rel=1e-8, abs=1e-10)


def test_last_step_size_adaptation_leaves_burn_in_steps_under_the_final_step_size():
    # A rank-0 DLN at its flat θ*: the chains find stiffer regions during burn-in, so η is lowered.
    burnin = 80
    res = behavioral_llc(deep_linear_network(0), dln_inputs(200), chains=3, draws=20, burnin=burnin, pilot_steps=10)
    steps = [a["step"] for a in res.diagnostics["adaptations"]]
    assert steps == [int(burnin * f) for f in ADAPT_AT] == [20, 40, 60]
    assert burnin - max(steps) == burnin // 4  # a quarter of the burn-in runs under the final η
    assert res.step_size == res.diagnostics["adaptations"][-1]["step_size"]
    # A given step size is never adapted.
    model, x = linear_regression(d=3, n=30)
    assert behavioral_llc(model, x, step_size=1e-4, chains=2, draws=10, burnin=20).diagnostics["adaptations"] == []


class _FlatThenWall:
    """L(θ* + δ) = ‖δ‖¹⁶: flat near θ* (zero Hessian there), a steep wall at ‖δ‖ ≈ 1.

    The shape of a confident classifier's KL (its Hessian ∝ p*(1 − p*) is tiny at θ* and O(1) once
    the margins shrink, e.g. toy:sma): a pilot at a large η reaches the wall and diverges, one at a
    small η stays in the flat region for its few steps and sees almost no curvature.
    """

    n_batches = 1
    batch_positions = (1,)  # one batch: the step meets the measured curvature (largest_batch_factor 1)
    device = torch.device("cpu")
    dtype = torch.float64  # what the sampler keeps its state in (SamplingTarget.dtype)

    def __init__(self, dim):
        self.star = {"w": torch.zeros(dim, dtype=torch.float64)}

    def loss(self, deltas, b):
        return deltas["w"].square().sum(1) ** 8


def test_automatic_step_size_stays_below_every_step_size_whose_pilots_diverged():
    # The pilots' healthy small-η rounds see little curvature and propose an η near the diverging
    # ones again; the choice must remember the divergences (before the fix it alternated between
    # diverging and healthy rounds and returned η = 0.2, where every pilot had diverged).
    from tl_degeneracy.llc.sampler import Dynamics, chain_seed, initial_state, run_chains
    from tl_degeneracy.llc.stepsize import choose_step_size

    dim = 100
    target, layout, mask = _FlatThenWall(dim), ParameterLayout(("w",), ((dim,),)), torch.ones(dim, dtype=torch.bool)
    explode_at = 10.0 * dim + 100.0
    choice = choose_step_size(target, layout, mask, nbeta=1000.0, gamma=1.0, explode_at=explode_at, pilot_steps=50)
    diverged = [h["step_size"] for h in choice.history if h["diverged"]]
    assert diverged, "the case must make some pilots diverge to test anything"
    assert choice.step_size <= min(diverged) / 2
    # And the chosen η samples: chains from θ* survive 4× the pilots' length at it.
    settings = Dynamics(nbeta=1000.0, step_size=choice.step_size, gamma=1.0, steps=200, explode_at=explode_at)
    state = run_chains(target, layout, mask, settings, initial_state(target, layout, [chain_seed(5, c) for c in range(4)], settings))
    assert bool(state.alive.all()), state.failed_at


def test_automatic_step_size_error_names_a_step_size_that_was_tried():
    # Non-finite loss away from θ*: every pilot diverges; the message reports the smallest η that
    # actually ran (not the next, untried proposal).
    from tl_degeneracy.errors import NumericalError
    from tl_degeneracy.llc.stepsize import choose_step_size, step_size_for

    class _Cliff(_FlatThenWall):
        def loss(self, deltas, b):
            r2 = deltas["w"].square().sum(1)
            return torch.where(r2 > 0, torch.full_like(r2, float("nan")), r2)

    target, layout, mask = _Cliff(10), ParameterLayout(("w",), ((10,),)), torch.ones(10, dtype=torch.bool)
    # At θ* the loss is ‖δ‖² (h = 2): the first pilot runs at step_size_for(2), each next one at a tenth.
    smallest_tried = step_size_for(2.0, 1000.0, 1.0, 0.05) / 10**7
    with pytest.raises(NumericalError, match=f"diverged at every step size tried, down to {smallest_tried:.3g};"):
        choose_step_size(target, layout, mask, nbeta=1000.0, gamma=1.0, pilot_steps=5, max_rounds=8)


def _dln_points(n: int):
    """A float64 deep linear network's sampling target, its layout and full mask, and ``n`` points
    well away from θ* (where the Hessian is not that at the minimum)."""
    from tl_degeneracy.llc.targets import make_target

    model = deep_linear_network(1).double()
    target = make_target(model, dln_inputs(50).double(), None, None)
    names = list(target.star)
    layout = ParameterLayout(tuple(names), tuple(tuple(target.star[n].shape) for n in names))
    mask = torch.ones(layout.numel, dtype=torch.bool)
    points = 0.7 * torch.randn(n, layout.numel, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    return target, layout, mask, points


def test_stopped_lanczos_is_an_upper_bound_within_rtol_and_independent_of_the_other_points():
    target, layout, mask, points = _dln_points(3)
    rtol = 1e-2
    together = top_hessian_eigenvalue(target, layout, mask, points, rtol=rtol, point_seeds=[4, 5, 6])
    for p, point in enumerate(points):
        alone = top_hessian_eigenvalue(target, layout, mask, point[None], rtol=rtol, point_seeds=[4 + p])
        assert float(alone[0]) == pytest.approx(float(together[p]), rel=1e-12)
        hess = torch.autograd.functional.hessian(lambda d: target.loss(layout.unflatten(d[None]), 0)[0], point)
        exact = float(torch.linalg.eigvalsh(hess)[-1])
        assert exact * (1 - 1e-12) <= float(together[p]) <= exact * (1 + rtol)


def test_hessian_products_that_do_not_fit_are_computed_in_smaller_groups_with_the_same_result(monkeypatch):
    """A device out of memory for all points' double backward at once (a 135M-parameter model's 8
    chains on a GPU) halves the group of points until it fits; each point's product is its own."""
    from tl_degeneracy.llc import stepsize
    from tl_degeneracy.models.chains import OUT_OF_MEMORY

    target, layout, mask, points = _dln_points(5)
    together = top_hessian_eigenvalue(target, layout, mask, points, point_seeds=[1, 2, 3, 4, 5])
    fits, sizes = stepsize._batched_hvp, []

    def two_at_most(target, layout, points, q, n_b):
        sizes.append(points.shape[0])
        if points.shape[0] > 2:
            raise OUT_OF_MEMORY("CUDA out of memory (simulated)")
        return fits(target, layout, points, q, n_b)

    monkeypatch.setattr(stepsize, "_batched_hvp", two_at_most)
    grouped = top_hessian_eigenvalue(target, layout, mask, points, point_seeds=[1, 2, 3, 4, 5])
    assert max(s for s in sizes if s <= 2) == 2 and 5 in sizes
    torch.testing.assert_close(grouped, together, rtol=1e-12, atol=0)
