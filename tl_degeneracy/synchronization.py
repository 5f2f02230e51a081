"""Synchronization degeneracy of attention heads and MLP neurons (METHODS §3).

Heads: two heads of one layer whose attention patterns agree on the data act as one head with the
summed OV circuit, A·X·(OV_h + OV_h'), so their value/output weights can be re-mixed. Neurons: two
ReLU neurons whose firing patterns r = f/p agree act as one neuron with summed output weights.

Both analyses stream over the data with memory independent of its size: head pattern distances
accumulate into [L, H, H] sums, value Grams into [L, n_kv·d, n_kv·d], neuron firing-pattern Grams
into [L, F, F] (E[(r_i − r_j)²] = E[r_i²] + E[r_j²] − 2 E[r_i r_j] comes from one Gram of r).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from .data import token_batches
from .errors import MissingHookError
from .models.adapt import adapt
from .stats.accumulators import MomentAccumulator, descending_eigvalsh
from .stats.passes import raise_if_not_finite, shard
from .stats.distributed import distributed_context
from .stats.results import numerical_rank
from .stats.samples import SampleIndex

__all__ = ["HeadSyncResult", "NeuronSyncResult", "head_synchronization", "neuron_synchronization", "synchronized_blocks"]

#: Activation functions for which r = f/p is exactly piecewise constant in the input (METHODS §3).
EXACT_ACTIVATIONS = ("relu",)


def _check_tol(tol: float) -> float:
    tol = float(tol)
    if not (0.0 <= tol <= 1.0) or math.isnan(tol):
        raise ValueError(f"tol must lie in [0, 1] (a distance between patterns); got {tol}")
    return tol


def synchronized_blocks(distance: Float[np.ndarray, "n n"], tol: float) -> list[list[int]]:
    """Partition 0..n−1 into blocks in which every pair is within ``tol`` (distance ≤ tol).

    Deterministic greedy clique cover: units are taken in index order and each joins the first
    existing block all of whose members are within tol of it, else starts a new block. When
    "within tol" is transitive on the data (the usual case: synchronized groups far apart from the
    rest) this is exactly the set of connected groups.
    """
    n = distance.shape[0]
    blocks: list[list[int]] = []
    for i in range(n):
        for block in blocks:
            if all(distance[i, j] <= tol for j in block):
                block.append(i)
                break
        else:
            blocks.append([i])
    return blocks


def _rank_rtol(dim: int, dtype: torch.dtype) -> float:
    """Relative eigenvalue cut-off of an activation Gram: activations carry a relative rounding
    error of ~√dim·eps(dtype) per vector, so numerically-zero directions have eigenvalues up to
    about (√dim·eps)²·λ_max; a factor 10 of margin on the singular-value scale."""
    eps = torch.finfo(dtype).eps
    return (10 * math.sqrt(dim) * eps) ** 2


def _gram_rank(gram: Tensor, rtol: float) -> int:
    if gram.numel() == 0:
        return 0
    return int(numerical_rank(descending_eigvalsh(gram), rtol))


# ---------------------------------------------------------------------------------------------- heads
@dataclass(eq=False)
class HeadSyncResult:
    """Head synchronization (METHODS §3). ``distance`` [L, H, H]: mean total-variation distance between
    the attention patterns of two heads over counted (sequence, query position) samples; ``blocks``:
    per layer, the synchronized blocks (lists of heads); ``value_gram`` [L, n_kv·d, n_kv·d]: uncentred
    Gram of the value activations (hook_v, stored KV heads) from which all ranks are computed."""

    distance: Float[np.ndarray, "layer head head"]
    tol: float
    blocks: list[list[list[int]]]
    value_gram: Tensor = field(repr=False)
    head_rank: Int[np.ndarray, "layer head"]
    n_samples: int
    n_kv_heads: int
    d_head: int
    rank_rtol: float
    positions: object = field(repr=False, default=None)

    def block_rank(self, layer: int, heads: list[int]) -> int:
        """s_S: rank of the concatenated value activations of the (distinct KV heads of the) block."""
        group = len(self.head_rank[layer]) // self.n_kv_heads
        kvs = sorted({h // group for h in heads})
        idx = torch.cat([torch.arange(kv * self.d_head, (kv + 1) * self.d_head) for kv in kvs])
        return _gram_rank(self.value_gram[layer][idx][:, idx], self.rank_rtol)

    def to_frame(self) -> pd.DataFrame:
        """One row per block (singletons included): layer, heads, size, max pairwise distance,
        s_block, s_heads, free_block = s_S², free_separate = Σ s_h², extra = free_block − free_separate."""
        rows = []
        group = self.head_rank.shape[1] // self.n_kv_heads
        for layer, blocks in enumerate(self.blocks):
            for heads in blocks:
                s_block = self.block_rank(layer, heads)
                # Heads of one GQA group share their value vectors: count each KV head once.
                kv_first = {}
                for h in heads:
                    kv_first.setdefault(h // group, h)
                s_heads = [int(self.head_rank[layer, h]) for h in heads]
                separate = sum(int(self.head_rank[layer, h]) ** 2 for h in kv_first.values())
                sub = self.distance[layer][np.ix_(heads, heads)]
                rows.append({
                    "layer": layer,
                    "heads": tuple(heads),
                    "size": len(heads),
                    "max_distance": float(sub.max()),
                    "s_block": s_block,
                    "s_heads": tuple(s_heads),
                    "free_block": s_block**2,
                    "free_separate": separate,
                    "extra_freedom": s_block**2 - separate,
                })
        return pd.DataFrame(rows)

    @property
    def extra_freedom(self) -> int:
        """Total extra free directions from synchronization, over all layers."""
        return int(self.to_frame()["extra_freedom"].sum())

    def to_dict(self) -> dict:
        return {"kind": "head_synchronization", "tol": self.tol, "n_samples": self.n_samples,
                "rank_rtol": self.rank_rtol, "distance": self.distance.tolist(),
                "blocks": self.to_frame().to_dict(orient="records")}

    def plot(self):
        """Heatmap of the pairwise pattern distances, one panel per layer."""
        from .plots import plot_distance_heatmaps

        return plot_distance_heatmaps(self.distance, "head", f"attention-pattern TV distance (tol {self.tol})")


def head_synchronization(
    model,
    data,
    tol: float = 0.05,
    batch_size: int = 16,
    rank_rtol: float | None = None,
    progress: bool = False,
    seq_len: int | None = None,
    skip_bos: bool | None = None,
) -> HeadSyncResult:
    """Synchronized attention heads and the freedom they add (METHODS §3).

    Streams once over ``data``: for every layer the [H, H] sums of the total-variation distance
    ½ Σ_k |p_h(k) − p_h'(k)| between the attention distributions of two heads at each counted
    (sequence, query position), and the uncentred float64 Gram of the value activations. Memory is
    O(L·H² + L·(n_kv·d)²), independent of the amount of data.

    Heads whose patterns are all pairwise within ``tol`` form a block S (:func:`synchronized_blocks`).
    s_h = rank of head h's value activations, s_S = rank of the block's concatenated value
    activations; the block's free directions are s_S², the heads alone have Σ s_h², and
    synchronization adds s_S² − Σ s_h² (2·d² for a pair of full-rank heads with independent values).
    GQA: heads of a group share one value head, so a block's values are those of its distinct KV
    heads and Σ s_h² counts each KV head once.

    Args:
        tol: distance threshold in [0, 1] (TV distance lies in [0, 1]).
        rank_rtol: relative eigenvalue cut-off for value ranks (default from the model's dtype).

    Raises:
        ValueError: tol outside [0, 1]. DataError: data without tokens. MissingHookError: a model
        without attention patterns. TypeError: a model ``tld.adapt`` does not take.
    """
    tol = _check_tol(tol)
    adapter = adapt(model)
    try:
        pattern_names = [adapter.hook_name("attn_pattern", layer) for layer in range(adapter.n_layers)]
        value_names = [adapter.hook_name("v", layer) for layer in range(adapter.n_layers)]
    except MissingHookError as e:
        raise MissingHookError(f"head_synchronization needs attention patterns and values: {e}") from None
    if not adapter.n_heads:
        raise MissingHookError("head_synchronization needs a model with attention heads; this one has none")
    batches = token_batches(data, adapter, batch_size=batch_size, seq_len=seq_len, skip_bos=skip_bos)
    L, H, d, n_kv = adapter.n_layers, adapter.n_heads, adapter.d_head, adapter.n_kv_heads
    dev = adapter.device
    tv_sum = torch.zeros(L, H, H, dtype=torch.float64, device=dev)
    count = torch.zeros(L, dtype=torch.float64, device=dev)
    values = [MomentAccumulator(1, n_kv * d, device=dev) for _ in range(L)]
    ctx = distributed_context()

    def on_pattern(layer: int, index: SampleIndex, flags: dict):
        def hook(pattern: Tensor, hook=None) -> None:
            # [batch, head, query, key] → sample rows [n, head, key] (one per counted query position)
            rows = pattern.detach().transpose(1, 2)
            unit = index.unit(tuple(rows.shape), pattern_names[layer])
            rows = index.rows(rows, unit).to(torch.float64)
            for h in range(H):
                tv = 0.5 * (rows[:, h : h + 1] - rows).abs().sum(-1)  # [n, H]
                tv_sum[layer, h] += tv.sum(0)
            count[layer] += rows.shape[0]
            flags[pattern_names[layer]] = torch.isfinite(tv_sum[layer]).all()

        return hook

    def on_value(layer: int, index: SampleIndex, flags: dict):
        def hook(v: Tensor, hook=None) -> None:
            unit = index.unit(tuple(v.shape), value_names[layer])
            rows = index.rows(v.detach(), unit)
            flags[value_names[layer]] = values[layer].update(rows.reshape(rows.shape[0], 1, -1))

        return hook

    with torch.no_grad():
        for batch in shard(batches, ctx, dev, progress, "head_synchronization"):
            index, flags = SampleIndex.from_batch(batch), {}
            hooks = [(pattern_names[l], on_pattern(l, index, flags)) for l in range(L)]
            hooks += [(value_names[l], on_value(l, index, flags)) for l in range(L)]
            adapter.run_with_hooks(batch.tokens, fwd_hooks=hooks)
            raise_if_not_finite(flags, batch, "attention pattern or value")
    if ctx.active:
        from .stats.distributed import all_reduce_sum_

        all_reduce_sum_(tv_sum)
        all_reduce_sum_(count)
        for acc in values:
            acc.all_reduce()
    if float(count.min()) == 0:
        raise MissingHookError("the attention pattern hooks did not fire (or no position counted); nothing to compare")
    distance = (tv_sum / count[:, None, None]).cpu().numpy()
    distance = (distance + distance.transpose(0, 2, 1)) / 2  # symmetric up to rounding already
    grams = torch.stack([acc.gram()[0] for acc in values]).cpu()
    rtol = _rank_rtol(n_kv * d, adapter.dtype) if rank_rtol is None else float(rank_rtol)
    group = H // n_kv
    head_rank = np.zeros((L, H), dtype=np.int64)
    for layer in range(L):
        for h in range(H):
            kv = h // group
            block = grams[layer, kv * d : (kv + 1) * d, kv * d : (kv + 1) * d]
            head_rank[layer, h] = _gram_rank(block, rtol)
    blocks = [synchronized_blocks(distance[layer], tol) for layer in range(L)]
    return HeadSyncResult(
        distance=distance, tol=tol, blocks=blocks, value_gram=grams, head_rank=head_rank,
        n_samples=int(count[0]), n_kv_heads=n_kv, d_head=d, rank_rtol=rtol, positions=batches.positions,
    )


# ---------------------------------------------------------------------------------------------- neurons
#: r = act(p)/p for the activation functions of gated MLPs (whose hook_post is act(gate)·linear).
_RATIOS = {
    "relu": lambda p: (p > 0).to(p.dtype),
    "gelu": lambda p: torch.special.ndtr(p),  # gelu(p)/p = Φ(p)
    "silu": torch.sigmoid,  # silu(p)/p = σ(p)
    "swish": torch.sigmoid,
}


@dataclass(eq=False)
class NeuronSyncResult:
    """Neuron synchronization (METHODS §3). ``distance`` [L, F, F]: E[(r_i − r_j)²] over counted
    samples, r = f/p the firing pattern; ``blocks``: per layer, the synchronized blocks (lists of
    neurons, singletons left out of ``to_frame`` unless asked); ``pre_gram`` [L, F, F]: uncentred
    Gram of the pre-activations, from which block ranks s_a come. ``approximate`` is True for
    smooth activations (GELU, SiLU), where r varies continuously and synchronization is only
    approximate."""

    distance: Float[np.ndarray, "layer neuron neuron"]
    tol: float
    blocks: list[list[list[int]]]
    pre_gram: Tensor = field(repr=False)
    n_samples: int
    act_fn: str | None
    approximate: bool
    rank_rtol: float
    positions: object = field(repr=False, default=None)

    def block_rank(self, layer: int, neurons: list[int]) -> int:
        """s_a: rank of the block's pre-activations on the data (paper eq. 21–22)."""
        idx = torch.as_tensor(neurons)
        return _gram_rank(self.pre_gram[layer][idx][:, idx], self.rank_rtol)

    def to_frame(self, singletons: bool = False) -> pd.DataFrame:
        """One row per block of ≥ 2 neurons (all blocks with ``singletons=True``): layer, neurons,
        size, max pairwise distance, s_block, free_block = s_a² (METHODS §3), free_separate = the
        per-neuron rescalings (one per neuron with nonzero pre-activations), extra_freedom, approximate.

        A block whose pre-activations are linearly dependent (a neuron duplicated as a multiple of
        another) has s_a < size and a negative extra_freedom: those directions are not lost, they
        appear as activation degeneracy of W_out's input instead (METHODS §4, ``degeneracy_counts``)."""
        rows = []
        for layer, blocks in enumerate(self.blocks):
            for neurons in blocks:
                if len(neurons) < 2 and not singletons:
                    continue
                s = self.block_rank(layer, neurons)
                separate = sum(self.block_rank(layer, [i]) for i in neurons)
                sub = self.distance[layer][np.ix_(neurons, neurons)]
                rows.append({"layer": layer, "neurons": tuple(neurons), "size": len(neurons),
                             "max_distance": float(sub.max()), "s_block": s, "free_block": s * s,
                             "free_separate": separate, "extra_freedom": s * s - separate,
                             "approximate": self.approximate})
        columns = ["layer", "neurons", "size", "max_distance", "s_block", "free_block", "free_separate",
                   "extra_freedom", "approximate"]
        return pd.DataFrame(rows, columns=columns)

    def to_dict(self) -> dict:
        return {"kind": "neuron_synchronization", "tol": self.tol, "n_samples": self.n_samples,
                "act_fn": self.act_fn, "approximate": self.approximate,
                "blocks": self.to_frame().to_dict(orient="records")}

    def plot(self):
        """Heatmap of E[(r_i − r_j)²], one panel per layer."""
        from .plots import plot_distance_heatmaps

        return plot_distance_heatmaps(self.distance, "neuron", f"firing-pattern distance (tol {self.tol})")


def neuron_synchronization(
    model,
    data,
    tol: float = 0.05,
    batch_size: int = 16,
    rank_rtol: float | None = None,
    progress: bool = False,
    seq_len: int | None = None,
    skip_bos: bool | None = None,
) -> NeuronSyncResult:
    """Synchronized MLP neurons (METHODS §3): neurons whose firing patterns r_i = f_i/p_i agree.

    One streaming pass accumulates, per layer, the uncentred float64 Grams E[r rᵀ] and E[p pᵀ]
    (F×F each): the distance E[(r_i − r_j)²] = E[r_i²] + E[r_j²] − 2 E[r_i r_j] of every pair comes
    from the first, so memory is O(L·F²) whatever the amount of data. For ReLU r ∈ {0, 1} and the
    distance is the fraction of samples on which two neurons disagree about firing; for GELU r = Φ(p),
    for SiLU r = σ(p), both in (0, 1), and the result is labelled ``approximate``.

    f is ``hook_post`` and p ``hook_pre`` (r = 1 where p = 0). Gated MLPs (post = act(gate)·linear):
    r = act(p)/p of the gate pre-activation p = ``hook_pre`` (from the model's ``act_fn``).

    Raises:
        ValueError: tol outside [0, 1], or a gated MLP with an unknown activation function.
        MissingHookError: a model without MLP layers. DataError: data without tokens.
    """
    tol = _check_tol(tol)
    adapter = adapt(model)
    if adapter.d_mlp is None:
        raise MissingHookError(f"neuron_synchronization needs MLP layers; this {type(adapter.model).__name__} has none")
    act_fn = adapter.cfg.act_fn
    gated = adapter.cfg.gated_mlp
    ratio = None
    if gated:
        key = (act_fn or "").lower()
        key = "gelu" if key.startswith("gelu") else key
        if key not in _RATIOS:
            raise ValueError(f"gated MLP with activation {act_fn!r}: no firing-pattern formula (known: {sorted(_RATIOS)})")
        ratio = _RATIOS[key]
    approximate = (act_fn or "").lower() not in EXACT_ACTIVATIONS
    batches = token_batches(data, adapter, batch_size=batch_size, seq_len=seq_len, skip_bos=skip_bos)
    L, F = adapter.n_layers, adapter.d_mlp
    dev = adapter.device
    pre_names = [adapter.hook_name("mlp_pre", layer) for layer in range(L)]
    post_names = [adapter.hook_name("mlp_post", layer) for layer in range(L)]
    r_acc = [MomentAccumulator(1, F, device=dev) for _ in range(L)]
    p_acc = [MomentAccumulator(1, F, device=dev) for _ in range(L)]
    ctx = distributed_context()

    with torch.no_grad():
        for batch in shard(batches, ctx, dev, progress, "neuron_synchronization"):
            index, flags, pre = SampleIndex.from_batch(batch), {}, {}

            def on_pre(layer: int):
                def hook(p: Tensor, hook=None) -> None:
                    rows = index.rows(p.detach(), index.unit(tuple(p.shape), pre_names[layer])).to(torch.float64)
                    pre[layer] = rows
                    flags[pre_names[layer]] = p_acc[layer].update(rows[:, None])
                    if ratio is not None:
                        r_acc[layer].update(ratio(rows)[:, None])

                return hook

            def on_post(layer: int):
                def hook(f: Tensor, hook=None) -> None:
                    if ratio is not None:
                        return None
                    p = pre.pop(layer)
                    f = index.rows(f.detach(), index.unit(tuple(f.shape), post_names[layer])).to(torch.float64)
                    # r = f/p, and 1 where p = 0 (METHODS §3)
                    r = torch.where(p == 0, torch.ones_like(p), f / torch.where(p == 0, torch.ones_like(p), p))
                    flags[post_names[layer]] = r_acc[layer].update(r[:, None])
                    return None

                return hook

            hooks = [(pre_names[l], on_pre(l)) for l in range(L)] + [(post_names[l], on_post(l)) for l in range(L)]
            adapter.run_with_hooks(batch.tokens, fwd_hooks=hooks)
            raise_if_not_finite(flags, batch, "MLP activation")
    if ctx.active:
        for acc in r_acc + p_acc:
            acc.all_reduce()
    if r_acc[0].count == 0:
        raise MissingHookError("the MLP hooks did not fire (or no position counted); nothing to compare")
    distance = []
    for acc in r_acc:
        G = acc.gram()[0]
        diag = G.diagonal()
        dist = (diag[:, None] + diag[None, :] - 2 * G).clamp_min(0)  # rounding can dip below 0
        dist.fill_diagonal_(0)
        distance.append(dist)
    distance_np = torch.stack(distance).cpu().numpy()
    rtol = _rank_rtol(F, adapter.dtype) if rank_rtol is None else float(rank_rtol)
    blocks = [_fast_blocks(distance_np[layer], tol) for layer in range(L)]
    return NeuronSyncResult(
        distance=distance_np, tol=tol, blocks=blocks, pre_gram=torch.stack([a.gram()[0] for a in p_acc]).cpu(),
        n_samples=r_acc[0].count, act_fn=act_fn, approximate=approximate, rank_rtol=rtol,
        positions=batches.positions,
    )


def _fast_blocks(distance: np.ndarray, tol: float) -> list[list[int]]:
    """:func:`synchronized_blocks` for many units: candidates are found with one vectorised
    comparison, and only units with a partner within tol go through the greedy clique cover."""
    close = distance <= tol
    np.fill_diagonal(close, False)
    partnered = np.flatnonzero(close.any(1))
    blocks = [[i] for i in range(distance.shape[0]) if i not in set(partnered.tolist())]
    if len(partnered):
        sub = synchronized_blocks(distance[np.ix_(partnered, partnered)], tol)
        blocks += [[int(partnered[i]) for i in b] for b in sub]
    return sorted(blocks, key=lambda b: b[0])
