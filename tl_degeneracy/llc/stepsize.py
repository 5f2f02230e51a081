"""Automatic SGLD step size from the top Hessian eigenvalue of L_B (METHODS §1).

On a quadratic with curvature h the discretised Langevin dynamics of sampler.py has stationary
variance 1/(a(1 − η a/4)) per direction, a = nβ h + γ, instead of 1/a, so

    λ̂ ≈ λ / (1 − η (nβ h + γ)/4).

The step size is set so that the bias bound  b = η (nβ h_max + γ)/4  equals ``bias_bound``
(default 0.05, i.e. at most ≈ 5 % over-estimate from the stiffest direction).

h_max is the largest positive eigenvalue of the Hessian of L_B restricted to the selected
coordinates, found by Lanczos iteration on Hessian-vector products (double backward, all points at
once along the chain axis); negative curvature (a chain away from the minimum) cannot mask it. At θ* a singular model can be flat (e.g. a deep linear network at W = 0 has zero Hessian),
while the posterior it samples is curved, so the curvature is also measured where the sampler
goes: short pilot runs from θ* with the current η, h_max re-measured at their end points, η
recomputed from the larger of that and h_max at θ*, until η changes by less than 25 % in a round
whose pilots all stayed healthy. A pilot whose chains all diverge divides η by 10; once any pilot
chain has diverged at some η, no later pilot (and not the result) goes above half of it. Pilots use their own seeds and a fixed number of chains, so the chosen
η is the same on every rank and for every number of chains.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from jaxtyping import Bool, Float
from torch import Tensor
from tqdm.auto import tqdm

from ..errors import NumericalError
from ..stats.distributed import broadcast_float, max_over_ranks
from .config import SamplerConfig
from .layout import ParameterLayout, Selection
from .sampler import Dynamics, SamplerState, chain_seed, initial_state, run_chains
from .targets import SamplingTarget

#: Fractions of the burn-in after which the automatic η is re-adapted to the chains' curvature. The
#: last one leaves a quarter of the burn-in to run under the final η, so the chains re-equilibrate
#: to it before any draw counts (an adaptation at the very end of burn-in would let the first draws
#: carry the transient of the η change). At the bias bound b the stiffest direction contracts by
#: 1 − 2b per step (10 steps' relaxation time at b = 0.05), so the default burn-in's last 125 steps
#: are ≈ 12 relaxation times.
ADAPT_AT = (0.25, 0.5, 0.75)


def top_hessian_eigenvalue(
    target: SamplingTarget,
    layout: ParameterLayout,
    mask: Bool[Tensor, " D"],
    points: Float[Tensor, "P D"],
    *,
    max_batches: int = 4,
    iters: int = 30,
    rtol: float = 1e-3,
    seed: int = 0,
    point_seeds: list[int] | None = None,
) -> Float[Tensor, " P"]:
    """Upper estimate of the largest *positive* eigenvalue h_max of ∇²L_B at θ* + points[p]
    (masked coordinates), for every point at once; 0 where the Hessian has no positive eigenvalue
    (METHODS §1, SGLD step-size bias).

    Lanczos on Hessian-vector products: after k products the Krylov space of the start vector gives
    a k × k tridiagonal matrix T whose largest eigenvalue (Ritz value) θ approaches the largest
    *algebraic* eigenvalue of the Hessian from below. Power iteration would find the eigenvalue of
    largest magnitude instead, which away from a minimum can be a large negative one (negative
    curvature), and clamping it to 0 would hide the real positive curvature that limits η. The
    three-term recurrence keeps only two vectors per point (memory O(P·D), as power iteration);
    without full reorthogonalisation Ritz values stay inside the spectrum and the largest one is
    still accurate (duplicated "ghost" values do not exceed it).

    Stopping and the value returned: the top Ritz pair (θ, y) has residual ‖H y − θ y‖ = r = β_k |s_k|
    (β_k the next off-diagonal, s_k the last entry of T's top eigenvector), so the Hessian has an
    eigenvalue in [θ − r, θ + r]; since θ ≤ h_max, the value returned, θ + r, is an upper bound of
    h_max whenever that eigenvalue is the top one, and it exceeds the Ritz value by at most r. (From
    a random start, P(θ_k < (1 − ε) h_max) ≤ 1.648 √D exp(−√ε (2k − 1)) after k products:
    Kuczyński & Woźniakowski 1992, Thm 4.2; missing the top eigenvalue altogether is that unlikely.)
    A point stops (and keeps its value) once r ≤ ``rtol`` · |θ| (the stated accuracy: h_max within
    ``rtol`` relative, from above), when its
    Krylov space is exhausted (next residual at rounding level, e.g. a flat Hessian; then θ is exact
    and returned), or after ``iters`` products (θ + r, a looser bound). Stopped points leave the
    batched computation, and each point's iteration depends on its own values only, so its result
    does not depend on which other points are computed beside it (``point_seeds``: one start vector
    per point from its own seed; else one generator seeded by ``seed`` for all).

    Uses the first ``max_batches`` batches: the mean of their Hessians of L_B,b, each batch's loss
    weighted by its counted positions (targets.py), so that with no more batches than that it is
    the Hessian of the dataset's L_B (METHODS §1), however ragged the batches.
    """
    m = mask.to(points.dtype)
    P = points.shape[0]
    if point_seeds is None:
        g = torch.Generator(device=points.device).manual_seed(seed)
        q = torch.randn(points.shape, generator=g, device=points.device, dtype=points.dtype)
    else:
        q = torch.stack([
            torch.randn(points.shape[1], generator=torch.Generator(device=points.device).manual_seed(int(ps)),
                        device=points.device, dtype=points.dtype)
            for ps in point_seeds
        ])
    q = q * m
    q = q / q.norm(dim=1, keepdim=True).clamp_min(1e-30)
    q_prev = torch.zeros_like(q)
    n_b = min(max_batches, target.n_batches)
    # T is accumulated in float64 (its eigenvalues are the result), whatever the model dtype.
    alphas = torch.zeros(P, 0, dtype=torch.float64, device=points.device)
    betas = torch.zeros(P, 0, dtype=torch.float64, device=points.device)
    beta_prev = torch.zeros(P, 1, dtype=points.dtype, device=points.device)
    active = torch.ones(P, dtype=torch.bool, device=points.device)
    top = torch.zeros(P, dtype=torch.float64, device=points.device)
    # Relative size below which a residual means the Krylov space is exhausted (rounding level).
    breakdown = torch.finfo(points.dtype).eps ** 0.5
    for _ in range(iters):
        rows = active.nonzero()[:, 0]
        hq = torch.zeros_like(q)
        for b in range(n_b):
            d = points[rows].detach().requires_grad_(True)
            loss = target.loss(layout.unflatten(d), b).sum()
            (grad,) = torch.autograd.grad(loss, d, create_graph=True)
            (h,) = torch.autograd.grad((grad * q[rows]).sum(), d)
            hq[rows] += h.detach() / n_b
        hq = hq * m
        alpha = (q * hq).sum(1, keepdim=True)
        w = hq - alpha * q - beta_prev * q_prev
        # One pass of local reorthogonalisation against the last two vectors (cheap, keeps the
        # recurrence from drifting in float32).
        w = w - (w * q).sum(1, keepdim=True) * q - (w * q_prev).sum(1, keepdim=True) * q_prev
        beta = w.norm(dim=1, keepdim=True)
        # A stopped point's value is final: its T is padded with zeros and never read again.
        alpha = torch.where(active[:, None], alpha, torch.zeros_like(alpha))
        alphas = torch.cat([alphas, alpha.to(torch.float64)], 1)
        k = alphas.shape[1]
        T = torch.diag_embed(alphas)
        if k > 1:
            T = T + torch.diag_embed(betas, offset=1) + torch.diag_embed(betas, offset=-1)
        evals, evecs = torch.linalg.eigh(T)
        theta, beta64 = evals[:, -1], beta[:, 0].to(torch.float64)
        resid = beta64 * evecs[:, -1, -1].abs()
        scale = torch.cat([alphas.abs(), betas.abs()], 1).amax(1).clamp_min(1e-300)
        exhausted = beta64 <= breakdown * scale
        top = torch.where(active, torch.where(exhausted, theta, theta + resid), top)
        active = active & ~exhausted & ~(resid <= rtol * theta.abs())
        if not bool(active.any()):
            break
        beta = torch.where(active[:, None], beta, torch.zeros_like(beta))
        betas = torch.cat([betas, beta.to(torch.float64)], 1)
        q_prev, q = q, torch.where(active[:, None], w / beta.clamp_min(1e-30), torch.zeros_like(w))
        beta_prev = beta
    return top.clamp_min(0).to(points.dtype)


def step_size_for(h_max: float, nbeta: float, gamma: float, bias_bound: float) -> float:
    """η with η (nβ h_max + γ)/4 = bias_bound."""
    curvature = nbeta * h_max + gamma
    if not curvature > 0:
        raise ValueError(
            "the behavioral loss is flat at θ* in every sampled direction and gamma = 0, so no step size "
            "can be derived; set gamma > 0 (localization) or pass step_size"
        )
    return 4.0 * bias_bound / curvature


def bias_bound_of(step_size: float, h_max: float, nbeta: float, gamma: float) -> float:
    """b = η (nβ h_max + γ)/4: λ̂ ≲ λ/(1 − b) from the stiffest direction."""
    return step_size * (nbeta * h_max + gamma) / 4.0


@dataclass
class StepSizeChoice:
    step_size: float
    h_max: float
    h_max_at_reference: float
    bias_bound: float
    history: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"step_size": self.step_size, "h_max": self.h_max, "h_max_at_reference": self.h_max_at_reference,
                "bias_bound": self.bias_bound, "calibration": self.history}


def choose_step_size(
    target: SamplingTarget,
    layout: ParameterLayout,
    mask: Bool[Tensor, " D"],
    *,
    nbeta: float,
    gamma: float,
    bias_bound: float = 0.05,
    explode_at: float = float("inf"),
    pilot_chains: int = 4,
    pilot_steps: int = 200,
    max_rounds: int = 8,
    seed: int = 0,
    progress: bool = False,
) -> StepSizeChoice:
    """Choose η so that the bias bound η (nβ h_max + γ)/4 is ``bias_bound`` (module docstring).
    ``progress``: a bar over each pilot round's steps (one bar, reset per round)."""
    dtype = target.dtype
    origin = torch.zeros(1, layout.numel, device=target.device, dtype=dtype)
    h_ref = float(top_hessian_eigenvalue(target, layout, mask, origin, seed=seed)[0])
    h_used = h_ref
    eta = step_size_for(h_ref, nbeta, gamma, bias_bound)
    history: list[dict] = []
    # The smallest η at which a pilot chain diverged: no later pilot (nor the result) reaches half of
    # it. Without this memory a pilot at a much smaller η, whose chains cover less ground in
    # ``pilot_steps`` and so meet less curvature, proposes an η back near the diverging one; on a
    # model whose curvature grows fast away from θ* (a confident classifier: the KL Hessian ∝
    # p*(1 − p*) is tiny at θ* and O(1) once the margins shrink) the rounds then alternate between
    # diverging and healthy pilots until they run out.
    ceiling = float("inf")
    # Pilot seeds live far from the sampling chains' seeds (chain_seed of a large negative index).
    seeds = [chain_seed(seed, -1000 - c) for c in range(pilot_chains)]
    with tqdm(total=pilot_steps, unit="step", leave=False, disable=not progress) as bar:
        for rnd in range(max_rounds):
            bar.reset()
            bar.set_description(f"LLC step size: pilot round {rnd + 1} (η = {eta:.3g})")
            dynamics = Dynamics(nbeta=nbeta, step_size=eta, gamma=gamma, steps=pilot_steps, explode_at=explode_at)
            state = run_chains(target, layout, mask, dynamics, initial_state(target, layout, seeds, dynamics), bar=bar)
            alive = state.alive
            diverged = not bool(alive.all())
            if diverged:
                ceiling = min(ceiling, eta)
            if not bool(alive.any()):
                history.append({"round": rnd, "step_size": eta, "h_max": float("nan"), "diverged": True})
                eta = eta / 10
                continue
            h_pilot = float(top_hessian_eigenvalue(target, layout, mask, state.delta[alive], seed=seed + rnd + 1).max())
            history.append({"round": rnd, "step_size": eta, "h_max": h_pilot, "diverged": diverged})
            h_used = max(h_ref, h_pilot)
            # After a divergence never go back up to it: at most half the smallest diverging η.
            eta_new = min(step_size_for(h_used, nbeta, gamma, bias_bound), ceiling / 2)
            if not diverged and abs(eta_new - eta) <= 0.25 * eta:
                eta = min(eta, eta_new)
                return StepSizeChoice(eta, h_used, h_ref, bias_bound_of(eta, h_used, nbeta, gamma), history)
            # The curvature a pilot sees depends on the η it ran with, so the fixed point is approached
            # with geometric damping (plain iteration can oscillate on singular models).
            eta = eta_new if diverged or len(history) < 2 or history[-2]["diverged"] else (eta * eta_new) ** 0.5
        healthy = [h["step_size"] for h in history if not h["diverged"]]
        if not healthy:
            tried = min(h["step_size"] for h in history)
            raise NumericalError(
                f"automatic step size: pilot chains diverged at every step size tried, down to {tried:.3g}; the behavioral "
                f"loss may be non-finite near θ* or nβ = {nbeta:g} too large; try a larger loss_scale, a larger gamma, or pass step_size"
            )
        # Not converged within max_rounds: the next proposal, which is below every diverging η (the
        # burn-in adaptation lowers it further if the chains find stiffer regions).
        return StepSizeChoice(eta, h_used, h_ref, bias_bound_of(eta, h_used, nbeta, gamma), history)


def initial_step_size(
    target: SamplingTarget, selection: Selection, config: SamplerConfig, *, nbeta: float, explode_at: float, seed: int,
    saved: dict | None = None, progress: bool = False,
) -> tuple[StepSizeChoice, str]:
    """The step size sampling starts with, and where it came from: the one given in ``config`` (its
    bias bound measured at θ*), the one a checkpoint saved (``saved``: ``StepSizeChoice.to_dict()``),
    or the automatic one (:func:`choose_step_size`, the same on every rank)."""
    layout, mask, gamma = selection.layout, selection.mask, config.gamma
    if config.step_size is not None:
        origin = torch.zeros(1, layout.numel, device=target.device, dtype=target.dtype)
        h_ref = float(top_hessian_eigenvalue(target, layout, mask, origin, seed=seed)[0])
        eta = float(config.step_size)
        return StepSizeChoice(eta, h_ref, h_ref, bias_bound_of(eta, h_ref, nbeta, gamma), []), "given"
    if saved is not None:
        choice = StepSizeChoice(**{k: saved[k] for k in ("step_size", "h_max", "h_max_at_reference", "bias_bound")},
                                history=saved["calibration"])
        return choice, "automatic (from checkpoint)"
    choice = choose_step_size(target, layout, mask, nbeta=nbeta, gamma=gamma, bias_bound=config.bias_bound,
                              explode_at=explode_at, pilot_steps=config.pilot_length, seed=seed, progress=progress)
    # Every rank computes the same η (same seeds); broadcasting rules out last-bit differences.
    choice.step_size = broadcast_float(choice.step_size)
    return choice, "automatic"


def chain_curvature(target: SamplingTarget, selection: Selection, state: SamplerState, point_seeds: Sequence[int]) -> float:
    """Largest top-Hessian eigenvalue (Lanczos upper estimate) over the healthy chains of every rank,
    at their current points (0 where none is healthy)."""
    alive = state.alive.cpu()
    h = 0.0
    if bool(alive.any()):
        points = state.delta[state.alive]
        seeds = [s for s, a in zip(point_seeds, alive.tolist()) if a]
        h = float(top_hessian_eigenvalue(target, selection.layout, selection.mask, points, iters=20, point_seeds=seeds).max())
    return max_over_ranks(h)


def round_down(x: float, digits: int = 3) -> float:
    """``x`` > 0 rounded *down* to ``digits`` significant figures (a readable η that never exceeds
    the one the bias bound allows)."""
    exponent = math.floor(math.log10(x)) - digits + 1
    # Written back through its decimal form, so that 8e-05 is not 7.999999999999999e-05.
    return float(f"{math.floor(x / 10.0**exponent)}e{exponent}")


def adapted_step_size(h_now: float, current: float, nbeta: float, config: SamplerConfig) -> float:
    """The η a burn-in check proposes for curvature ``h_now`` (:data:`ADAPT_AT`): the bias bound's η,
    RMSProp-scaled and rounded down; ``current`` where the posterior is flat (nβ h + γ = 0). The
    caller keeps the smaller of it and ``current`` (η is lowered, never raised)."""
    if not nbeta * h_now + config.gamma > 0:
        return current
    return round_down(step_size_for(h_now, nbeta, config.gamma, config.bias_bound) * config.rms_factor)
