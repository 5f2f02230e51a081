"""Vectorised SGLD over a chain axis (METHODS §1).

All chains live in one flat tensor δ ∈ R^{C×D} (δ = θ − θ*, D = entries of the sampled parameters)
and advance together: one chain-batched forward/backward per step, no host synchronisation inside
the loop on an accelerator. Per step t, on batch b = t mod n_batches (the same batch for every chain):

    δ ← δ − (η/2) G ⊙ m ⊙ [ nβ ∇L_B,b(θ* + δ) + γ δ ] + √η √G ⊙ m ⊙ ξ,     ξ ~ N(0, I)

with m the selection mask (restricted LLC: it multiplies gradient, prior and noise, so unselected
coordinates never move) and G = 1 (SGLD) or the RMSProp preconditioner G = 1/(eps + √V),
V ← αV + (1 − α)(nβ∇L)² until step ``adapt_until`` and constant after it (a V that keeps following
the chain's position needs a correction term that this update lacks: review 42). L_B,b is batch b's estimate of the dataset's L_B, weighted by its counted
positions (targets.py), so that over a cycle of ragged batches the drift averages to nβ∇L_B. The
loss L_B,b(θ_t) evaluated for the gradient (before the update) is recorded per chain and step on
the device and copied out in blocks, and so is δ·∇U = δ·(nβ ∇L_B,b + γ δ) (over the selected
coordinates, the only ones δ has), whose mean over the draws is d at equilibrium (convergence.py,
criterion (v): the relaxation of the directions only weakly held).

A chain whose loss becomes non-finite or explodes (nβ L > ``explode_at``) is frozen at θ* and
flagged with the step it failed at; the check is a device-side ``where``, read at block ends (on
the CPU, where a read is free, also every step, so that the parking pass is skipped while every
chain is healthy).
Each chain has its own generator seeded from its global chain index, so its noise does not depend
on which other chains run beside it (sharding across ranks) or on interruptions (resume). Its path
depends on its seed and on the step size η, which all chains share: with a given ``step_size`` a
chain's path is independent of the other chains, but the automatic η is lowered during burn-in to
the largest curvature over *all* chains (estimate.py), so there the number of chains (and the other
chains' paths) can change every chain's path.

The flat layout and the mask m are layout.py's; the state's checkpoints are checkpoint.py's.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from jaxtyping import Bool
from torch import Tensor

from .layout import ParameterLayout
from .loss_grad import LossGrad
from .targets import SamplingTarget

#: Steps per block: traces are copied to the host, failures read and checkpoints written at block ends.
BLOCK = 256
#: Columns of the per-chain norm sums (means over steps are reported). All four are lengths in
#: parameter space, on the scale of one update δ ← δ − grad_step − prior_step + noise_step (module
#: docstring): grad_step = ‖(η/2) G ⊙ m ⊙ nβ∇L_B,b‖, prior_step = ‖(η/2) G ⊙ m ⊙ γδ‖,
#: noise_step = ‖√η √G ⊙ m ⊙ ξ‖ (so the three compare directly: drift-dominated steps have
#: grad_step ≫ noise_step), and distance = ‖δ‖ = ‖θ − θ*‖ before the step.
NORMS = ("grad_step", "prior_step", "noise_step", "distance")


@dataclass(frozen=True)
class Dynamics:
    """The update one :func:`run_chains` call applies (module docstring): nβ, η, γ, the number of
    steps, the RMSProp preconditioner's α and eps where it is on, and the divergence threshold on nβ L.
    ``adapt_until``: the step from which the RMSProp preconditioner stays as it is (``behavioral_llc``:
    halfway through the first burn-in, whose rest settles the chains under it; None: it adapts at
    every step). A preconditioner that keeps following the chain's position has no
    correction term and samples another distribution than the posterior: λ̂ read 1.65 for λ = 0.5 and
    6.4–9.9 for 5 on regressions, at a step whose bias is ~1 % (review 42). Fixed, it is a constant
    metric, under which SGLD's stationary law is the posterior again (up to the step's bias)."""

    nbeta: float
    step_size: float
    gamma: float
    steps: int
    rmsprop: bool = False
    rms_alpha: float = 0.99
    rms_eps: float = 0.1
    explode_at: float = float("inf")
    adapt_until: int | None = None


@dataclass
class SamplerState:
    """Everything needed to continue a run bit for bit (what a checkpoint holds: checkpoint.py)."""

    delta: Tensor
    v: Tensor | None
    generators: list[torch.Generator]
    step: int
    trace: np.ndarray  # [steps, C] float64 losses L_B,b(θ_t); NaN after a chain failed
    virial: np.ndarray  # [steps, C] float64 δ_t·∇U(θ_t), the same steps and chains
    alive: Tensor
    failed_at: Tensor
    norms: Tensor  # [C, len(NORMS)] sums over steps
    wall_s: float = 0.0
    extra: dict = field(default_factory=dict)

    def generator_states(self) -> list[Tensor]:
        return [g.get_state() for g in self.generators]

    def grow(self, steps: int) -> None:
        """Make room in ``trace`` and ``virial`` for ``steps`` steps in all (NaN until sampled)."""
        more = steps - len(self.trace)
        if more > 0:
            self.trace = np.concatenate([self.trace, np.full((more, self.trace.shape[1]), np.nan)])
            self.virial = np.concatenate([self.virial, np.full((more, self.virial.shape[1]), np.nan)])


def chain_seed(seed: int, chain: int) -> int:
    """Seed of global chain ``chain``: independent of sharding and of the number of chains."""
    return (int(seed) * 1_000_003 + 7919 * (int(chain) + 1)) % (2**63 - 1)


def initial_state(target: SamplingTarget, layout: ParameterLayout, seeds: Sequence[int], dynamics: Dynamics) -> SamplerState:
    """Every chain at θ* (δ = 0), its generator seeded by ``seeds[c]``, nothing sampled yet."""
    device = target.device
    dtype = target.dtype
    C = len(seeds)
    gens = []
    for s in seeds:
        g = torch.Generator(device=device)
        g.manual_seed(int(s))
        gens.append(g)
    return SamplerState(
        delta=torch.zeros(C, layout.numel, device=device, dtype=dtype),
        v=torch.zeros(C, layout.numel, device=device, dtype=dtype) if dynamics.rmsprop else None,
        generators=gens,
        step=0,
        trace=np.full((dynamics.steps, C), np.nan),
        virial=np.full((dynamics.steps, C), np.nan),
        alive=torch.ones(C, dtype=torch.bool, device=device),
        failed_at=torch.full((C,), -1, dtype=torch.long, device=device),
        norms=torch.zeros(C, len(NORMS), dtype=torch.float64, device=device),
    )


def run_chains(
    target: SamplingTarget,
    layout: ParameterLayout,
    mask: Bool[Tensor, " D"],
    dynamics: Dynamics,
    state: SamplerState,
    on_block: Callable[[SamplerState], None] | None = None,
    stop_after: int | None = None,
    loss_grad: LossGrad | None = None,
    bar=None,
) -> SamplerState:
    """Advance ``state`` to ``dynamics.steps`` (or to ``stop_after`` steps, for tests of resume).

    ``on_block(state)`` runs at every block end (checkpointing); it sees a consistent state.
    ``loss_grad`` computes each step's losses and gradient (default: uncompiled ``LossGrad``).
    ``bar`` (a tqdm bar, or None) advances by one per step, all chains together.
    """
    loss_grad = LossGrad(target, layout) if loss_grad is None else loss_grad
    eta, nbeta, gamma = dynamics.step_size, dynamics.nbeta, dynamics.gamma
    # The update is applied in place (one pass per term instead of a new tensor per product), on
    # copies, so the caller's state is never changed behind its back.
    delta = state.delta.clone()
    v = None if state.v is None else state.v.clone()
    alive, failed_at, norms = state.alive, state.failed_at, state.norms
    C, D = delta.shape
    # With every coordinate selected the mask is all ones and its products are skipped.
    m = None if bool(mask.all()) else mask.to(delta.dtype)
    end = dynamics.steps if stop_after is None else min(dynamics.steps, stop_after)
    block_trace = torch.empty(BLOCK, C, dtype=torch.float64, device=delta.device)
    block_virial = torch.empty(BLOCK, C, dtype=torch.float64, device=delta.device)
    block_start = state.step
    sqrt_eta = eta**0.5
    c_grad, c_prior = 0.5 * eta * nbeta, 0.5 * eta * gamma
    noise = torch.empty_like(delta)
    # Plain SGLD on every coordinate: the noise term's norm is √η ‖ξ‖.
    plain = v is None and m is None
    noise_norm = torch.empty(C, device=delta.device, dtype=delta.dtype)
    # Reading a flag on the CPU costs nothing (there is no queue of kernels to drain), so there the
    # pass that parks failed chains runs only once a chain has failed; on an accelerator it runs
    # every step, since reading the flag would stall the queue at every step.
    park_always = delta.device.type != "cpu"
    t0 = time.perf_counter()
    for t in range(state.step, end):
        loss, grad = loss_grad(delta, t % target.n_batches)
        for c, g in enumerate(state.generators):
            torch.randn(D, generator=g, device=delta.device, dtype=delta.dtype, out=noise[c])
            if plain:
                # ‖ξ_c‖ while the row is still in cache (a pass over all rows afterwards re-reads them).
                torch.linalg.vector_norm(noise[c : c + 1], dim=1, out=noise_norm[c : c + 1])
        distance = delta.norm(dim=1)
        # δ·∇U before the update, at the point the gradient was taken (δ is zero off the selection).
        virial = nbeta * torch.linalg.vecdot(delta, grad).to(torch.float64) + gamma * distance.to(torch.float64) ** 2
        if v is not None:
            drift = nbeta * grad
            if dynamics.adapt_until is None or t < dynamics.adapt_until:
                v.mul_(dynamics.rms_alpha).addcmul_(drift, drift, value=1 - dynamics.rms_alpha)
            precond = (v.sqrt() + dynamics.rms_eps).reciprocal_()
            if m is not None:
                precond.mul_(m)
            grad_step = (0.5 * eta) * precond * drift
            prior_step = (0.5 * eta * gamma) * precond * delta
            noise_step = precond.sqrt_().mul_(noise).mul_(sqrt_eta)
            step_norms = torch.stack([grad_step.norm(dim=1), prior_step.norm(dim=1), noise_step.norm(dim=1), distance], 1)
            delta.add_(noise_step).sub_(grad_step).sub_(prior_step)
        else:
            if m is not None:
                grad, noise_m = grad * m, noise * m
                prior_norm, noise_m_norm = (delta * m).norm(dim=1), noise_m.norm(dim=1)
            else:
                noise_m, prior_norm, noise_m_norm = noise, distance, noise_norm
            # The three terms' norms are scalar multiples of these, so no term is materialised.
            step_norms = torch.stack([c_grad * grad.norm(dim=1), c_prior * prior_norm,
                                      sqrt_eta * noise_m_norm, distance], 1)
            if m is not None:
                delta.addcmul_(delta, m, value=-c_prior)
            else:
                delta.mul_(1 - c_prior)
            delta.add_(grad, alpha=-c_grad).add_(noise_m, alpha=sqrt_eta)
        step_norms = step_norms.to(torch.float64)
        lossd = loss.to(torch.float64)
        # Failure: non-finite loss or one far beyond anything a posterior at this nβ reaches, or a
        # non-finite update (then one of its terms' norms is non-finite).
        bad = ~torch.isfinite(lossd) | (nbeta * lossd > dynamics.explode_at) | ~torch.isfinite(step_norms).all(1)
        newly = bad & alive
        failed_at = torch.where(newly, torch.full_like(failed_at, t), failed_at)
        alive = alive & ~bad
        block_trace[(t - block_start) % BLOCK] = torch.where(alive | newly, lossd, torch.full_like(lossd, float("nan")))
        block_virial[(t - block_start) % BLOCK] = torch.where(alive | newly, virial, torch.full_like(virial, float("nan")))
        norms = norms + torch.where(alive[:, None], step_norms, torch.zeros_like(step_norms))
        # A failed chain is parked at θ* (δ = 0) so that its NaNs never reach the other chains' arithmetic.
        if park_always or not bool(alive.all()):
            delta.masked_fill_(~alive[:, None], 0.0)
            if v is not None:
                v.masked_fill_(~alive[:, None], 0.0)
        if bar is not None:
            bar.update()
        if (t + 1) % BLOCK == 0 or t + 1 == end:
            n = t + 1 - block_start
            state.trace[block_start : t + 1] = block_trace[:n].cpu().numpy()
            state.virial[block_start : t + 1] = block_virial[:n].cpu().numpy()
            state.delta, state.v, state.alive, state.failed_at, state.norms = delta, v, alive, failed_at, norms
            state.step = t + 1
            state.wall_s += time.perf_counter() - t0
            t0 = time.perf_counter()
            block_start = t + 1
            if on_block is not None:
                on_block(state)
    state.delta, state.v, state.alive, state.failed_at, state.norms = delta, v, alive, failed_at, norms
    return state
