"""Interaction edges between adjacent node layers (METHODS §5, the companion paper's "squared" formula).

For nodes l → l+1 with coordinates f̂^l = C^l (f^l − μ^l) and f̂^{l+1}:

    E_ij = (1/n_l) Σ_x Σ_t ( Σ_s ∂f̂^{l+1}_{t,i}/∂f̂^l_{s,j} · f̂^l_{s,j} )²      ≥ 0,

a tensor [kept_{l+1}, kept_l] (i: direction of node l+1, j: of node l). x runs over sequences, t
over the counted output positions of node l+1 and s over the counted input positions of node l
(padding and, when skipped, BOS count on neither side), and n_l is node l's sample count, the n of
its Gram. Derivatives with respect to f̂^l are taken along the kept subspace: ∂/∂f̂^l = C^{l+}ᵀ ∂/∂f^l
(see ``basis``), and the cross-position terms s ≠ t through attention are included.

One vector-Jacobian product gives, for one cotangent on f̂^{l+1}, the whole row A_{t,i,·} for every
sequence of the batch at once. ``sources=None`` (exact) uses the cotangents e_{t,i} for every counted
output position t and direction i: P_out · kept_{l+1} VJPs per batch. ``sources=r`` uses r random
±1 position vectors φ per batch instead of the positions, cotangent Σ_t φ_t e_{t,i}: since
E[φ_t φ_t'] = δ_tt', E[(Σ_t φ_t A_t)²] = Σ_t A_t², unbiased, with r · kept_{l+1} VJPs per batch; with
one output position (sequence-level nodes) one source is exact. Chunks of cotangents go through one
batched backward call. Accumulation is float64; nothing per cotangent is stored.
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from ..errors import NumericalError
from ..stats.distributed import all_reduce_sum_, distributed_context
from ..stats.jacobian import CHUNK_ELEMENTS
from ..stats.passes import HookTarget, run_until, shard
from ..stats.samples import SampleIndex
from ..stats.vjp import Backward, differentiable_capture, probe_generator
from .basis import NodeBasis

__all__ = ["edge_pass"]

#: Probe-generator stream of the edge sources (the Jacobian probes use the default stream).
EDGE_STREAM = 1


def _sample_mask(index: SampleIndex, act: Tensor, name: str) -> Bool[Tensor, "batch pos"]:
    return index.mask if index.unit(tuple(act.shape), name) == "position" else index.seq_mask[:, None]


def _edge_cotangents(
    coords: Float[Tensor, "k D"],
    mask: Bool[Tensor, "batch pos"],
    sources: int | None,
    seed: int,
    batch_number: int,
    pair: int,
    chunk: int,
):
    """Chunks of (cotangents [J, batch, pos, D] on f^{l+1}, direction index i [J], weight): the
    cotangent of e_{t,i} (or Σ_t φ_t e_{t,i}) on f̂^{l+1} is C^{l+1}[i] at position t (chain rule)."""
    b, P = mask.shape
    k, D = coords.shape
    m = mask.to(torch.float64)
    if sources is None:
        patterns = []
        for t in mask.any(0).nonzero().flatten().tolist():
            one_hot = torch.zeros(b, P, dtype=torch.float64, device=mask.device)
            one_hot[:, t] = 1.0
            patterns.append(one_hot * m)
        weight = 1.0
    else:
        patterns = []
        for s in range(sources):
            g = probe_generator(seed, batch_number, s, mask.device, stream=(EDGE_STREAM, pair))
            signs = torch.randint(0, 2, (b, P), generator=g, device=mask.device).to(torch.float64) * 2 - 1
            patterns.append(signs * m)
        weight = 1.0 / sources
    jobs = [(p, i) for p in patterns for i in range(k)]
    for start in range(0, len(jobs), chunk):
        part = jobs[start : start + chunk]
        cot = torch.stack([p[:, :, None] * coords[i][None, None, :] for p, i in part])
        rows = torch.tensor([i for _, i in part], device=coords.device)
        yield cot, rows, weight


def edge_pass(
    engine,
    batches,
    nodes: list[HookTarget],
    bases: dict[str, NodeBasis],
    scaling: str,
    counts: dict[str, int],
    sources: int | None,
    seed: int,
    method: str = "auto",
    device: torch.device | None = None,
    progress: bool = True,
) -> dict[tuple[str, str], Float[Tensor, "k1 k0"]]:
    """E for every adjacent pair of ``nodes`` in one pass over ``batches`` (module docstring).

    One forward per batch captures every node (and stops at the last one); each pair then takes its
    VJPs from node l+1 back to node l. ``counts``: n_l per node (the Gram pass's sample counts).
    Under ``torch.distributed`` each rank takes its shard and the sums are reduced at the end.
    """
    ctx = distributed_context()
    acc_device = torch.device(device) if device is not None else engine.device
    backward = Backward(method)
    names = [t.name for t in nodes]
    pairs = list(zip(names[:-1], names[1:]))
    C = {n: bases[n].matrix(scaling).to(acc_device) for n in names}
    C_inv = {n: bases[n].right_inverse(scaling).to(acc_device) for n in names}
    means = {n: bases[n].whitening.mean.to(acc_device) for n in names}
    totals = {(a, b): torch.zeros(C[b].shape[0], C[a].shape[0], dtype=torch.float64, device=acc_device) for a, b in pairs}

    for batch in shard(batches, ctx, engine.device, progress, "interaction edges"):
        index = SampleIndex.from_batch(batch)
        acts: dict[str, Tensor] = {}
        fwd = [(n, differentiable_capture(acts, n)) for n in names]
        with torch.enable_grad():
            run_until(engine, batch.tokens, fwd, stop_after=names[-1], when=lambda: len(acts) == len(names))
        for p, (a, b) in enumerate(pairs):
            f_a, f_b = acts[a], acts[b]
            if totals[a, b].numel() == 0 or not f_b.requires_grad:
                continue
            mask_a, mask_b = _sample_mask(index, f_a, a), _sample_mask(index, f_b, b)
            x = f_a.detach().flatten(2).to(device=acc_device, dtype=torch.float64)
            fhat = (x - means[a]) @ C[a].mT * mask_a.to(acc_device)[:, :, None]  # [batch, pos_a, k_a]
            per = max(1, f_b.numel(), f_a.numel())
            chunk = max(1, CHUNK_ELEMENTS // per)
            for cot, rows, weight in _edge_cotangents(C[b].to(f_b.device), mask_b, sources, seed, batch.number, p, chunk):
                (g,) = backward(f_b, [f_a], cot.to(f_b.dtype).view(len(rows), *f_b.shape))
                if g is None:  # node l+1 does not depend on node l
                    break
                h = g.flatten(3).to(device=acc_device, dtype=torch.float64) @ C_inv[a]  # ∂f̂^{l+1}_{t,i}/∂f̂^l_{s,j}
                attribution = (h * fhat).sum(2)  # [J, batch, k_a]: Σ_s ∂f̂_{t,i}/∂f̂_{s,j} · f̂_{s,j}
                totals[a, b].index_add_(0, rows.to(acc_device), attribution.square().sum(1), alpha=weight)
    for pair in pairs:  # the same order on every rank
        all_reduce_sum_(totals[pair])
    edges = {}
    for a, b in pairs:
        e = totals[a, b] / max(counts[a], 1)
        if not bool(torch.isfinite(e).all()):
            raise NumericalError(f"non-finite interaction edges between {a!r} and {b!r}")
        edges[a, b] = e
    return edges
