"""Synchronization degeneracy of attention heads and MLP neurons (METHODS §3).

Heads: heads of one layer whose attention patterns agree on the data act as one head with the
summed OV circuit, A·X·Σ_h W_V^h W_O^h, so only the sum of their value/output maps is pinned down.
The freedom this adds is the drop in the rank of the Jacobian from the value and output weights to
the function when the heads' separate outputs are replaced by their sum (METHODS §3, corrected;
:func:`synchronization_freedom`). Neurons: two ReLU neurons whose firing patterns r = f/p agree act
as one neuron with summed output weights.

Both analyses are one streaming pass each (``stats.stream``) with memory independent of the amount
of data: head pattern distances accumulate into [L, H, H] sums, value Grams into [L, n_kv·d, n_kv·d],
the heads' input moments into [L, D, D], neuron firing-pattern Grams into [L, F, F]
(E[(r_i − r_j)²] = E[r_i²] + E[r_j²] − 2 E[r_i r_j] comes from one Gram of r).

Ranks follow the package's one rank rule (``tl_degeneracy.numerics``): activation Grams at the
precision of the forward pass that produced them, products of stored weights at float64.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from .counts import block_input_affine, block_input_hook
from .data import token_batches
from .errors import MissingHookError
from .invariants import center_writing
from .memory import check_batches
from .models.adapt import adapt
from .models.adapter import ModelAdapter
from .numerics import activation_precision, numerical_rank
from .stats.accumulators import MomentAccumulator, descending_eigvalsh
from .stats.stream import Step, stream

__all__ = [
    "HeadSyncResult",
    "NeuronSyncResult",
    "SyncJacobian",
    "head_synchronization",
    "neuron_synchronization",
    "pattern_tv_sums",
    "synchronization_freedom",
    "synchronized_blocks",
]

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


def _gram_rank(gram: Float[Tensor, "k k"], precision: torch.dtype, rtol: float | None) -> int:
    """Rank of an activation Gram by the package's rule at the forward's ``precision`` (``rtol``
    overrides the relative eigenvalue cut-off)."""
    if gram.numel() == 0:
        return 0
    return int(numerical_rank(descending_eigvalsh(gram), precision=precision, gram=True, rtol=rtol))


def _weight_rank(matrix: Float[Tensor, "m n"]) -> int:
    """Rank of a matrix formed from stored weights: float64 SVD, float64 rule (METHODS §2)."""
    matrix = matrix.to(torch.float64)
    return int(numerical_rank(torch.linalg.svdvals(matrix), tuple(matrix.shape), precision=torch.float64))


# ---------------------------------------------------------------------------------------------- heads
@dataclass(frozen=True)
class SyncJacobian:
    """Jacobian ranks of one block of heads (METHODS §3): ``j_apart`` with the heads' outputs
    separate, ``j_sync`` with them summed under one pattern; ``extra_freedom`` = j_apart − j_sync."""

    j_apart: int
    j_sync: int

    @property
    def extra_freedom(self) -> int:
        return self.j_apart - self.j_sync


def synchronization_freedom(
    input_rank: int,
    value_ranks: Sequence[int],
    block_value_rank: int,
    W_O: Sequence[Float[Tensor, "heads d_head d_model"]],
    d_out: int | None = None,
) -> SyncJacobian:
    """Free directions that synchronizing a block S of heads adds (METHODS §3, corrected).

    The heads of S are grouped by their value map: group g = the m_g query heads that read one value
    head (m_g = 1 without GQA). On n samples let X (n × D) be the heads' input, D_in = rank X, and for
    group g let A_g = X W_V^g (n × d) be its value vectors, s_g = rank A_g, and
    A_S = [A_1 … A_G] (n × G·d) the block's value vectors side by side, s_S = rank A_S.

    The Jacobian ranks are those of two maps from the value and output weights
    θ = (W_V^g for each group, W_O^h for each head) to the function:

    - heads apart: F_apart(θ) = (X W_V^{g(h)} W_O^h)_{h ∈ S}, each head's output on its own (heads
      with different patterns are told apart by the function); its Jacobian rank is
      J_apart = Σ_g [D_in·rank(B_g^cat) + m_g·D_out·s_g − s_g·rank(B_g^cat)],
      B_g^cat = [W_O^h for h ∈ g] side by side (d × m_g·D_out);
    - heads synchronized: F_sync(θ) = Σ_{h ∈ S} X W_V^{g(h)} W_O^h, the sum the common pattern
      multiplies (taken as injective on it); its Jacobian rank is
      J_sync = D_in·rank(B_S) + D_out·s_S − s_S·rank(B_S),
      B_S = [Σ_{h ∈ g} W_O^h for each g] stacked (G·d × D_out).

    Both follow from dim{P B + A Q} = D_in·rank B + D_out·rank A − rank A·rank B, the Jacobian rank of
    (P, B) ↦ A B with A = X P. Synchronization adds J_apart − J_sync ≥ 0 free directions: 2·d² for a
    pair of full-rank heads with independent values (the paper's s_S² − Σ s_h²), d·(D_in + D_out − d)
    for an exact copy of a head, d·D_out for two GQA query heads of one value head.
    (:func:`head_synchronization` applies this to the model's centred input and values, whose means
    only add a constant to the output; see there.)

    Args:
        input_rank: D_in.
        value_ranks: s_g, one per group, in the order of ``W_O``.
        block_value_rank: s_S.
        W_O: per group, the output weights [m_g, d, D] of its heads in S (any float dtype; the
            ranks of B_g^cat and B_S are float64 weight ranks).
        d_out: D_out, the dimension of the space the heads write into that the function reads
            (default D; D − 1 under LayerNorm, which never reads the mean direction). The rows of
            ``W_O`` must lie in that space.

    Raises:
        ValueError: no groups, ``value_ranks`` and ``W_O`` of different lengths, groups of different
        d or D_out, or ranks that no data can produce (s_g > s_S, s_S > D_in or Σ s_g).
    """
    if not W_O or len(value_ranks) != len(W_O):
        raise ValueError(f"need one value rank per group of output weights; got {len(value_ranks)} ranks "
                         f"for {len(W_O)} groups")
    shapes = {tuple(w.shape[1:]) for w in W_O}
    if len(shapes) != 1 or any(w.ndim != 3 or w.shape[0] == 0 for w in W_O):
        raise ValueError(f"W_O groups must be non-empty [m_g, d, D] stacks of one d and D; got "
                         f"{[tuple(w.shape) for w in W_O]}")
    s = [int(r) for r in value_ranks]
    s_S, d_in = int(block_value_rank), int(input_rank)
    if min(s) < 0 or max(s) > s_S or s_S > min(d_in, sum(s)):
        raise ValueError(f"inconsistent ranks: value ranks {s}, block value rank {s_S}, input rank {d_in} "
                         "(need s_g ≤ s_S ≤ min(D_in, Σ s_g))")
    d_out = W_O[0].shape[-1] if d_out is None else int(d_out)
    if not 0 < d_out <= W_O[0].shape[-1]:
        raise ValueError(f"d_out must lie in 1..{W_O[0].shape[-1]} (W_O's output dimension); got {d_out}")
    j_apart = 0
    for s_g, w in zip(s, W_O):
        r_cat = _weight_rank(w.permute(1, 0, 2).reshape(w.shape[1], -1))
        j_apart += d_in * r_cat + w.shape[0] * d_out * s_g - s_g * r_cat
    r_sum = _weight_rank(torch.cat([w.to(torch.float64).sum(0) for w in W_O]))
    j_sync = d_in * r_sum + d_out * s_S - s_S * r_sum
    return SyncJacobian(j_apart=int(j_apart), j_sync=int(j_sync))


@dataclass(eq=False)
class HeadSyncResult:
    """Head synchronization (METHODS §3). ``distance`` [L, H, H]: mean total-variation distance between
    the attention patterns of two heads over counted (sequence, query position) samples; ``blocks``:
    per layer, the synchronized blocks (lists of heads); ``value_gram`` [L, n_kv·d, n_kv·d]: uncentred
    Gram of the value activations (hook_v, stored KV heads) and ``value_cov`` their covariance, from
    which the value ranks s come; ``head_rank`` [L, H]: s of each head's value head; ``input_rank``
    [L]: D_in, the rank of the covariance of the heads' input; ``W_O`` [L, H, d, D]: the effective
    output weights (float64; W_O P under LayerNorm) and ``d_out`` the dimension D_out they write into
    (D − 1 under LayerNorm, else D). ``rank_rtol`` is the caller's relative eigenvalue cut-off for
    activation ranks, or None for the package's rule at ``precision`` (activation_precision of the model)."""

    distance: Float[np.ndarray, "layer head head"]
    tol: float
    blocks: list[list[list[int]]]
    value_gram: Tensor = field(repr=False)
    head_rank: Int[np.ndarray, "layer head"]
    n_samples: int
    n_kv_heads: int
    d_head: int
    rank_rtol: float | None
    value_cov: Float[Tensor, "layer kv_dim kv_dim"] = field(repr=False)
    input_rank: Int[np.ndarray, " layer"]
    W_O: Float[Tensor, "layer head d_head d_model"] = field(repr=False)
    d_out: int
    precision: torch.dtype = torch.float32
    positions: object = field(repr=False, default=None)

    def block_rank(self, layer: int, heads: list[int]) -> int:
        """s_S: rank of the (centred) value activations of the block's distinct KV heads side by side."""
        kvs = sorted(self._value_groups(heads))
        cov = self.value_cov[layer]
        idx = torch.cat([torch.arange(kv * self.d_head, (kv + 1) * self.d_head, device=cov.device) for kv in kvs])
        return _gram_rank(cov[idx][:, idx], self.precision, self.rank_rtol)

    def _value_groups(self, heads: list[int]) -> dict[int, list[int]]:
        """The block's heads grouped by the KV head whose values they read."""
        group = self.head_rank.shape[1] // self.n_kv_heads
        groups: dict[int, list[int]] = {}
        for h in heads:
            groups.setdefault(h // group, []).append(h)
        return groups

    def block_freedom(self, layer: int, heads: list[int]) -> SyncJacobian:
        """J_apart and J_sync of one block (:func:`synchronization_freedom`)."""
        groups = self._value_groups(heads)
        return synchronization_freedom(
            int(self.input_rank[layer]), [int(self.head_rank[layer, g[0]]) for g in groups.values()],
            self.block_rank(layer, heads), [self.W_O[layer, g] for g in groups.values()], self.d_out,
        )

    def to_frame(self) -> pd.DataFrame:
        """One row per block (singletons included): layer, heads, size, max pairwise distance,
        s_block (s_S), s_heads (s of each head's values), input_rank (D_in), n_params (the block's
        W_V and W_O entries, each stored value head once), j_apart, j_sync, free_block =
        n_params − j_sync, free_separate = n_params − j_apart, extra_freedom = j_apart − j_sync
        (METHODS §3, corrected)."""
        rows = []
        d, D = self.d_head, self.W_O.shape[-1]
        for layer, blocks in enumerate(self.blocks):
            for heads in blocks:
                jac = self.block_freedom(layer, heads)
                n_params = len(self._value_groups(heads)) * D * d + len(heads) * d * D
                sub = self.distance[layer][np.ix_(heads, heads)]
                rows.append({
                    "layer": layer,
                    "heads": tuple(heads),
                    "size": len(heads),
                    "max_distance": float(sub.max()),
                    "s_block": self.block_rank(layer, heads),
                    "s_heads": tuple(int(self.head_rank[layer, h]) for h in heads),
                    "input_rank": int(self.input_rank[layer]),
                    "n_params": n_params,
                    "j_apart": jac.j_apart,
                    "j_sync": jac.j_sync,
                    "free_block": n_params - jac.j_sync,
                    "free_separate": n_params - jac.j_apart,
                    "extra_freedom": jac.extra_freedom,
                })
        return pd.DataFrame(rows)

    @property
    def extra_freedom(self) -> int:
        """Total extra free directions from synchronization, over all layers."""
        return int(self.to_frame()["extra_freedom"].sum())

    def to_dict(self) -> dict:
        return {"kind": "head_synchronization", "tol": self.tol, "n_samples": self.n_samples,
                "rank_rtol": self.rank_rtol, "precision": str(self.precision).removeprefix("torch."),
                "distance": self.distance.tolist(), "blocks": self.to_frame().to_dict(orient="records")}

    def plot(self):
        """Heatmap of the pairwise pattern distances, one panel per layer."""
        from .plots import plot_distance_heatmaps

        return plot_distance_heatmaps(self.distance, "head", f"attention-pattern TV distance (tol {self.tol})")


def _attention_input(adapter: ModelAdapter, layer: int) -> tuple[str, Tensor | None]:
    """The hook carrying the heads' input and the gain w still to apply to it (``counts.
    block_input_hook`` / ``block_input_affine``; the norm's bias only shifts the mean, which the
    covariance drops): the normalized residual stream, or the residual stream itself in a model
    without normalization."""
    try:
        return block_input_hook(adapter, layer, "ln1"), block_input_affine(adapter, layer, "ln1")[0]
    except MissingHookError:
        if adapter.cfg.normalization is None:
            return adapter.hook_name("resid_pre", layer), None
        raise


def _input_covariance(acc: MomentAccumulator, w: Tensor | None) -> Float[Tensor, "D D"]:
    """Covariance of the heads' input x = n·w + b from that of the hooked n: diag(w) Cov(n) diag(w)."""
    cov = acc.covariance()[0]
    if w is None:
        return cov
    w = w.detach().to(cov)
    return w[:, None] * cov * w[None, :]


#: Bytes of one chunk of attention-pattern rows in :func:`pattern_tv_sums` (float64 copy included).
PATTERN_CHUNK_BYTES = 1 << 26


def pattern_tv_sums(
    pattern: Float[Tensor, "batch head query key"],
    mask: Bool[Tensor, "batch query"],
    chunk_bytes: int | None = None,
) -> Float[Tensor, "head head"]:
    """Σ over the counted (sequence, query) rows of the total-variation distance
    ½ Σ_k |p_h(k) − p_h'(k)| between the attention distributions of every two heads (METHODS §3).

    The rows are gathered and widened to float64 a chunk at a time, at most ``chunk_bytes`` (default
    :data:`PATTERN_CHUNK_BYTES`) of them, at least one row: memory is O(H²) plus one chunk whatever
    the number of positions, where a float64 copy of all rows [n, H, K] would be 2·n·H·K·8 bytes
    (68 GB at 32 heads and 4k positions of one sequence). Chunking changes only the order of the
    float64 sum.
    """
    _, H, _, K = pattern.shape
    per_row = H * K * (pattern.element_size() + 8) + H * H * 8  # the gathered row, its float64 copy, its [H, H]
    rows_per_chunk = max(1, int(chunk_bytes or PATTERN_CHUNK_BYTES) // per_row)
    seq, query = mask.nonzero(as_tuple=True)  # counted rows, in the order of pattern[mask]
    total = torch.zeros(H, H, dtype=torch.float64, device=pattern.device)
    for start in range(0, len(seq), rows_per_chunk):
        part = slice(start, start + rows_per_chunk)
        rows = pattern[seq[part], :, query[part], :].to(torch.float64)  # [c, head, key]
        total += torch.cdist(rows, rows, p=1).sum(0)  # Σ_k |p_h(k) − p_h'(k)| for every head pair
    return 0.5 * total


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
    """Synchronized attention heads and the freedom they add (METHODS §3, corrected).

    Streams once over ``data``: for every layer the [H, H] sums of the total-variation distance
    ½ Σ_k |p_h(k) − p_h'(k)| between the attention distributions of two heads at each counted
    (sequence, query position), and the float64 mean and covariance of the value activations
    (``hook_v``) and of the heads' input (the normalized residual stream; ``hook_resid_pre`` without
    a norm). Memory is O(L·H² + L·(n_kv·d)² + L·D²), independent of the amount of data, plus one
    chunk of pattern rows (:func:`pattern_tv_sums`): the attention patterns are never copied whole.

    Heads whose patterns are all pairwise within ``tol`` form a block S (:func:`synchronized_blocks`).
    Each block's extra freedom is J_apart − J_sync (:func:`synchronization_freedom`) from D_in = rank
    of the covariance of the heads' input, s_g = rank of the covariance of each value head's
    activations, s_S = the same for the block's value heads side by side, and the effective output
    weights (GQA: query heads that share a KV head form one value group). Covariances, not Grams:
    attention rows sum to one, so the mean value vector v̄ reaches the output as the constant v̄·W_O,
    which every head adds alike, synchronized or not, and b_O absorbs (TransformerLens'
    ``fold_value_biases`` moves b_V into b_O for this reason); the mean of the input reaches only
    that constant. Under LayerNorm the residual stream's mean direction is never read, so W_O is
    taken as W_O P and D_out = D − 1 (METHODS §2's effective maps); the count is then the same for
    an unfolded bridge, a compatibility-mode bridge and a HookedTransformer of one checkpoint.

    Args:
        tol: distance threshold in [0, 1] (TV distance lies in [0, 1]).
        rank_rtol: relative eigenvalue cut-off for the activation ranks (D_in, s); default: the
            package's rank rule at activation_precision of the model (``tl_degeneracy.numerics``). Weight ranks
            always use the float64 rule.

    Raises:
        ValueError: tol outside [0, 1]. DataError: data without tokens. MissingHookError: a model
        without attention patterns, values or a findable attention input. TypeError: a model
        ``tld.adapt`` does not take. MemoryBudgetError: batches too large for the memory budget
        (``tld.memory``), before anything runs.
    """
    tol = _check_tol(tol)
    adapter = adapt(model)
    if not adapter.n_heads:
        raise MissingHookError("head_synchronization needs a model with attention heads; this one has none")
    L, H, d, n_kv, D = adapter.n_layers, adapter.n_heads, adapter.d_head, adapter.n_kv_heads, adapter.d_model
    try:
        pattern_names = [adapter.hook_name("attn_pattern", layer) for layer in range(L)]
        value_names = [adapter.hook_name("v", layer) for layer in range(L)]
        attn_inputs = [_attention_input(adapter, layer) for layer in range(L)]
    except MissingHookError as e:
        raise MissingHookError(f"head_synchronization needs attention patterns, values and inputs: {e}") from None
    input_names = [name for name, _ in attn_inputs]
    batches = token_batches(data, adapter, batch_size=batch_size, seq_len=seq_len, skip_bos=skip_bos)
    check_batches(adapter, "head_sync", batches, "head_synchronization")  # fail before the first forward
    dev = adapter.device
    tv_sum = torch.zeros(L, H, H, dtype=torch.float64, device=dev)
    count = torch.zeros(L, dtype=torch.float64, device=dev)
    values = [MomentAccumulator(1, n_kv * d, device=dev) for _ in range(L)]
    inputs = [MomentAccumulator(1, D, device=dev) for _ in range(L)]

    def on_batch(step: Step) -> None:
        if not step.count:
            return  # the accumulators exist already, with their shapes
        index, flags = step.index, step.flags
        seen: set[int] = set()

        def on_pattern(layer: int):
            def hook(pattern: Tensor, hook=None) -> None:
                b, _, q, k = pattern.shape
                unit = index.unit((b, q, H, k), pattern_names[layer])  # sample rows: [batch, query] positions
                mask = index.mask if unit == "position" else index.seq_mask[:, None]
                tv_sum[layer] += pattern_tv_sums(pattern.detach(), mask)
                count[layer] += index.count(unit)
                flags[pattern_names[layer]] = torch.isfinite(tv_sum[layer]).all()

            return hook

        def rows_into(acc: MomentAccumulator, name: str):
            def hook(act: Tensor, hook=None) -> None:
                rows = index.rows(act.detach(), index.unit(tuple(act.shape), name))
                flags[name] = acc.update(rows.reshape(rows.shape[0], 1, -1))

            return hook

        def on_input(layer: int):
            record = rows_into(inputs[layer], input_names[layer])

            def hook(x: Tensor, hook=None) -> None:
                # HookedTransformer applies ln1 separately to the query, key and value inputs: the
                # hook fires up to three times per forward with identical values; count it once.
                if layer not in seen:
                    seen.add(layer)
                    record(x)

            return hook

        hooks = [(pattern_names[l], on_pattern(l)) for l in range(L)]
        hooks += [(value_names[l], rows_into(values[l], value_names[l])) for l in range(L)]
        hooks += [(input_names[l], on_input(l)) for l in range(L)]
        adapter.run_with_hooks(step.batch.tokens, fwd_hooks=hooks)

    stream(dev, batches, on_batch, reduce=lambda: [tv_sum, count, *values, *inputs],
           desc="head_synchronization", progress=progress, what="attention pattern, value or input")
    if float(count.min()) == 0 or min(acc.count for acc in values + inputs) == 0:
        raise MissingHookError("the attention pattern, value or input hooks did not fire (or no position "
                               "counted); nothing to compare")
    distance = (tv_sum / count[:, None, None]).cpu().numpy()
    distance = (distance + distance.transpose(0, 2, 1)) / 2  # symmetric up to rounding already
    grams = torch.stack([acc.gram()[0] for acc in values]).cpu()
    covs = torch.stack([acc.covariance()[0] for acc in values]).cpu()
    precision = activation_precision(adapter.dtype)  # activation Grams: the forward's precision (numerics)
    rtol = None if rank_rtol is None else float(rank_rtol)
    input_rank = np.array([_gram_rank(_input_covariance(inputs[layer], attn_inputs[layer][1]).cpu(), precision, rtol)
                           for layer in range(L)], dtype=np.int64)
    kv_rank = np.array([
        [_gram_rank(covs[layer, kv * d : (kv + 1) * d, kv * d : (kv + 1) * d], precision, rtol) for kv in range(n_kv)]
        for layer in range(L)
    ], dtype=np.int64).reshape(L, n_kv)
    head_rank = kv_rank[:, np.arange(H) // (H // n_kv)]
    W_O = adapter.attention_weights().W_O
    norms = [adapter.norm_weights(layer, "ln1") for layer in range(L)]
    W_O = torch.stack([center_writing(W_O[layer], norms[layer]) for layer in range(L)]).cpu()
    blocks = [synchronized_blocks(distance[layer], tol) for layer in range(L)]
    return HeadSyncResult(
        distance=distance, tol=tol, blocks=blocks, value_gram=grams, head_rank=head_rank,
        n_samples=int(count[0]), n_kv_heads=n_kv, d_head=d, rank_rtol=rtol, value_cov=covs,
        input_rank=input_rank, W_O=W_O, d_out=D - int(norms[0].kind == "layernorm"), precision=precision,
        positions=batches.positions,
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
    Gram of the pre-activations, from which block ranks s_a come (``rank_rtol``: the caller's
    eigenvalue cut-off, or None for the package's rule at ``precision``, activation_precision of the model).
    ``approximate`` is True for smooth activations (GELU, SiLU), where r varies continuously and
    synchronization is only approximate."""

    distance: Float[np.ndarray, "layer neuron neuron"]
    tol: float
    blocks: list[list[list[int]]]
    pre_gram: Tensor = field(repr=False)
    n_samples: int
    act_fn: str | None
    approximate: bool
    rank_rtol: float | None
    precision: torch.dtype = torch.float32
    positions: object = field(repr=False, default=None)

    def block_rank(self, layer: int, neurons: list[int]) -> int:
        """s_a: rank of the block's pre-activations on the data (paper eq. 21–22)."""
        gram = self.pre_gram[layer]
        idx = torch.as_tensor(neurons, device=gram.device)
        return _gram_rank(gram[idx][:, idx], self.precision, self.rank_rtol)

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

    Args:
        tol: distance threshold in [0, 1].
        rank_rtol: relative eigenvalue cut-off for the pre-activation ranks s_a; default: the
            package's rank rule at activation_precision of the model (``tl_degeneracy.numerics``).

    Raises:
        ValueError: tol outside [0, 1], or a gated MLP with an unknown activation function.
        MissingHookError: a model without MLP layers. DataError: data without tokens.
        MemoryBudgetError: batches too large for the memory budget (``tld.memory``), before anything runs.
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
    check_batches(adapter, "neuron_sync", batches, "neuron_synchronization")  # fail before the first forward
    L, F = adapter.n_layers, adapter.d_mlp
    dev = adapter.device
    pre_names = [adapter.hook_name("mlp_pre", layer) for layer in range(L)]
    post_names = [adapter.hook_name("mlp_post", layer) for layer in range(L)]
    r_acc = [MomentAccumulator(1, F, device=dev) for _ in range(L)]
    p_acc = [MomentAccumulator(1, F, device=dev) for _ in range(L)]

    def on_batch(step: Step) -> None:
        if not step.count:
            return  # the accumulators exist already, with their shapes
        index, flags, pre = step.index, step.flags, {}

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
        adapter.run_with_hooks(step.batch.tokens, fwd_hooks=hooks)

    stream(dev, batches, on_batch, reduce=lambda: [*r_acc, *p_acc], desc="neuron_synchronization",
           progress=progress, what="MLP activation")
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
    blocks = [_fast_blocks(distance_np[layer], tol) for layer in range(L)]
    return NeuronSyncResult(
        distance=distance_np, tol=tol, blocks=blocks, pre_gram=torch.stack([a.gram()[0] for a in p_acc]).cpu(),
        n_samples=r_acc[0].count, act_fn=act_fn, approximate=approximate,
        rank_rtol=None if rank_rtol is None else float(rank_rtol), precision=activation_precision(adapter.dtype),
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
