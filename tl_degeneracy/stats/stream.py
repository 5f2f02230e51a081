"""The one streaming loop every statistics pass runs (METHODS §0, §4).

For each batch of this rank's shard: move it to the model's device, build its :class:`SampleIndex`
(which positions count: padding never, BOS by the data's rule), hand it to the analysis, and check
the values the analysis flagged for NaN/inf with one device sync. At the end the analysis's float64
accumulators are summed across ``torch.distributed`` ranks, in the same order on every rank.

An analysis supplies only what it accumulates: ``on_batch(step)``, called with a :class:`Step`.
When ``step.count`` is False (a rank of a process group that got no batch of its own), the
analysis must create its accumulators from the batch's shapes without adding anything, so that
this rank still joins the reductions with tensors of the right shape.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from ..autograd import gradients_enabled, ordinary, refuse_inference_mode
from ..data import Batch
from ..distributed import all_reduce_sum_, distributed_context, failing_together
from .passes import raise_if_not_finite, shard
from .samples import SampleIndex

__all__ = ["Step", "stream"]


@dataclass
class Step:
    """One batch of a streaming pass: the batch (on the model's device), its sample index, the
    finiteness flags the analysis fills (hook or quantity name → 0-d bool tensor), and whether
    this batch counts (False only for the shape-learning call of a rank without batches)."""

    batch: Batch
    index: SampleIndex
    flags: dict[str, Tensor] = field(default_factory=dict)
    count: bool = True


def _for_autograd(batch: Batch) -> Batch:
    """``batch`` with its tensors usable by autograd: copies of those made under ``inference_mode``
    (a caller's input tensors, which ``TensorBatches`` slices; ``TokenBatches`` makes fresh ones)."""
    return replace(batch, tokens=ordinary(batch.tokens), mask=ordinary(batch.mask), lengths=ordinary(batch.lengths))


Reducible = Tensor | object  # a float64 tensor (summed in place) or an accumulator with .all_reduce()


def stream(
    device: torch.device,
    batches,
    on_batch: Callable[[Step], None],
    *,
    reduce: Callable[[], Iterable[Reducible]] = lambda: (),
    desc: str = "statistics",
    progress: bool = True,
    grad: bool = False,
    what: str = "activation",
) -> int:
    """Run ``on_batch`` over this rank's batches of ``batches`` and reduce across ranks.

    Args:
        device: where batches go (the model's device).
        batches: a :class:`~tl_degeneracy.data.TokenBatches` (or anything with ``len()`` and
            ``.batch(number, device)``).
        on_batch: the analysis's work for one :class:`Step`.
        reduce: called once after the loop on every rank; the tensors and accumulators it returns
            are summed across ranks (tensors in place with ``all_reduce_sum_``, accumulators with
            their ``all_reduce()``), in the order given.
        grad: run with autograd enabled (Jacobian passes), also when the caller is under
            ``torch.no_grad()``; refused under ``torch.inference_mode()`` (:mod:`tl_degeneracy.
            autograd`), and input tensors made under it earlier are copied. Otherwise under
            ``torch.no_grad()``.
        what: what the flags check, for the NaN/inf error message.

    Returns the number of batches this rank processed.
    """
    ctx = distributed_context()
    n_mine = 0
    if grad:
        refuse_inference_mode(f"this analysis (its {desc!r} pass)")
    ready = _for_autograd if grad else (lambda batch: batch)
    with gradients_enabled() if grad else torch.no_grad():
        with failing_together(f"the {desc!r} pass"):
            for batch in map(ready, shard(batches, ctx, device, progress, desc)):
                step = Step(batch, SampleIndex.from_batch(batch))
                on_batch(step)
                raise_if_not_finite(step.flags, batch, what)
                n_mine += 1
            if ctx.active and n_mine == 0:
                first = ready(batches.batch(0, device=device))
                on_batch(Step(first, SampleIndex.from_batch(first), count=False))
        if ctx.active:
            for item in reduce():
                if isinstance(item, Tensor):
                    all_reduce_sum_(item)
                else:
                    item.all_reduce()
    return n_mine

