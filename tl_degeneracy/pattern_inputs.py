"""What a synchronized block of heads passes on: its common pattern applied to the input and the values.

Inside a block S the heads share one attention pattern A, so the block computes A·x·W_V·W_O (METHODS
§3): the input of its value-output map on the data is A·x, one row per (sequence, query position),
and its value vectors are A·v. Where A mixes positions generically these span what x and v span, and
the counts may read x and v; where it sits on fixed positions they span less (a pattern on a BOS sink
passes on one constant row), and so does the Jacobian of the block's output (audit 22a F1: a copied
head attending only to BOS read 57 extra free directions where the Jacobian says 0). This module
accumulates the moments of A·n (n: the normalized block input, :func:`counts.block_input_hook`) and
of A·v for every block of two or more heads, over the rows of all of its heads, in one pass over the data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from .counts import block_input_affine, block_input_hook, input_moment, input_rank_bound
from .models.adapter import ModelAdapter
from .stats.accumulators import MomentAccumulator
from .stats.stream import Step, stream

Block = tuple[int, tuple[int, ...]]  # (layer, heads)

ROUNDING_TERMS = 4
"""(A·f)_q = Σ_k A_qk f_k carries the rounding of the pattern's entries and of the activations, each up
to eps relative: |δ| ≤ 2·eps·Σ_k A_qk |f_k| ≤ 2·eps·(Σ_k A_qk f_k²)^½ (the rows of A sum to 1), so the
second moments that bound it are 2² times E[Σ_k A_qk f_k²], not E[(A·f)²] (a float64 pattern on a BOS
sink, A_q0 = 1 − O(eps), left a spread 1.3·eps of |A·n| that the covariance floor at E[(A·n)²] counted)."""


@dataclass(frozen=True)
class PatternInputs:
    """The moments of one block's pattern-weighted input and values (module docstring), all float64:
    ``input_moment`` [D, D] of x = n·w + b read through the pattern (its covariance where ``centered``,
    else its Gram; :func:`counts.input_moment`), ``input_scale`` [D] the scale of the rounding the
    covariance carries (``numerics.covariance_floor``'s second moments: :data:`ROUNDING_TERMS` times
    E[Σ_k A_qk (n_k·w)²]), the same two over the data's even-numbered sequences alone (``*_half``),
    ``value_moment`` [G·d, G·d] of A·v for the block's KV heads ``kvs`` side by side (covariance where
    ``centered``) and ``value_scale`` [G·d] its rounding's scale likewise, and ``bound`` the most
    directions the input can span (:func:`counts.input_rank_bound`)."""

    kvs: tuple[int, ...]
    centered: bool
    bound: int
    input_moment: Float[Tensor, "D D"]
    input_scale: Float[Tensor, " D"]
    input_moment_half: Float[Tensor, "D D"]
    input_scale_half: Float[Tensor, " D"]
    value_moment: Float[Tensor, "kv_dim kv_dim"]
    value_scale: Float[Tensor, " kv_dim"]


def pattern_inputs(adapter: ModelAdapter, batches, blocks: Sequence[Block], kv_of_head: Sequence[int],
                   centered: bool, progress: bool) -> dict[Block, PatternInputs]:
    """:class:`PatternInputs` of every block in ``blocks`` (each of ≥ 2 heads), from one streaming pass
    over ``batches``. The rows of every head of a block are taken together, so the block's spans hold
    each head's: one pattern's where they agree, and where they differ (a block found at ``tol`` > 0)
    at least any of its heads' (review 54 #1: a block read through its first head alone, a pure sink,
    read 0 where its other heads' Jacobian drops 18, below the upper estimate it is labelled). Under
    ``torch.distributed`` the accumulators are summed over the ranks."""
    d, n_kv = adapter.d_head, adapter.n_kv_heads
    layers = sorted({layer for layer, _ in blocks})
    kvs = {block: tuple(sorted({kv_of_head[h] for h in block[1]})) for block in blocks}
    dev = adapter.device
    inputs = {b: MomentAccumulator(1, adapter.d_model, device=dev) for b in blocks}
    halves = {b: MomentAccumulator(1, adapter.d_model, device=dev) for b in blocks}
    values = {b: MomentAccumulator(1, len(kvs[b]) * d, device=dev) for b in blocks}
    # Σ over the rows of Σ_k A_qk f_k² (ROUNDING_TERMS): the input's, its half's, the values'
    spread = {b: [torch.zeros(adapter.d_model, dtype=torch.float64, device=dev) for _ in range(2)]
              + [torch.zeros(len(kvs[b]) * d, dtype=torch.float64, device=dev)] for b in blocks}
    names = {layer: (block_input_hook(adapter, layer, "ln1"), adapter.hook_name("v", layer),
                     adapter.hook_name("attn_pattern", layer)) for layer in layers}

    def on_batch(step: Step) -> None:
        if not step.count:
            return
        index, flags = step.index, step.flags
        held: dict[tuple[int, str], Tensor] = {}

        def keep(layer: int, what: str):
            def hook(act: Tensor, hook=None) -> None:
                held.setdefault((layer, what), act.detach())  # ln1 may fire once per q, k, v input: the first

            return hook

        def on_pattern(layer: int):
            def hook(pattern: Tensor, hook=None) -> None:
                n = held[layer, "input"].to(torch.float64)  # [batch, key, D]
                v = held[layer, "v"].to(torch.float64).reshape(*n.shape[:2], n_kv, d)  # [batch, key, kv, d]
                half = index.half("position")
                for block in (b for b in blocks if b[0] == layer):
                    own = v[:, :, list(kvs[block])].flatten(2)
                    for head in block[1]:  # every head's rows: their span holds each head's
                        A = pattern[:, head].to(torch.float64)  # [batch, query, key]
                        rows, squares = index.rows(A @ n, "position"), index.rows(A @ n.square(), "position")
                        ok = inputs[block].update(rows[:, None])
                        flags[names[layer][2]] = ok & flags.get(names[layer][2], ok)
                        halves[block].update(rows[half][:, None])
                        values[block].update(index.rows(A @ own, "position")[:, None])
                        for total, part in zip(spread[block], (squares, squares[half],
                                                               index.rows(A @ own.square(), "position"))):
                            total += part.sum(0)

            return hook

        hooks = []
        for layer in layers:
            input_name, value_name, pattern_name = names[layer]
            hooks += [(input_name, keep(layer, "input")), (value_name, keep(layer, "v")), (pattern_name, on_pattern(layer))]
        adapter.run_with_hooks(step.batch.tokens, fwd_hooks=hooks)

    stream(dev, batches, on_batch, reduce=lambda: [item for b in blocks
                                                   for item in (inputs[b], halves[b], values[b], *spread[b])],
           desc="head_synchronization (blocks)", progress=progress, what="attention pattern, value or input")

    def scale(total: Tensor, acc: MomentAccumulator, w: Tensor | None = None) -> Tensor:
        mean = total.cpu() / max(acc.count, 1)
        return ROUNDING_TERMS * (mean if w is None else mean * w.detach().to(mean).cpu().square())

    out = {}
    for block in blocks:
        layer, (whole, half, value_spread) = block[0], spread[block]
        w = block_input_affine(adapter, layer, "ln1")[0]
        value = values[block].covariance()[0] if centered else values[block].gram()[0]
        out[block] = PatternInputs(
            kvs[block], centered, input_rank_bound(adapter, centered),
            input_moment(adapter, layer, "ln1", inputs[block], centered).cpu(), scale(whole, inputs[block], w),
            input_moment(adapter, layer, "ln1", halves[block], centered).cpu(), scale(half, halves[block], w),
            value.cpu(), scale(value_spread, values[block]))
    return out
