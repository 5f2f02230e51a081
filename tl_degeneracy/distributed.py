"""``torch.distributed`` helpers: the one place that tells whether a process group is active.

When a process group is initialised, every statistics pass processes the batches
``rank, rank + world_size, …`` of the data (a disjoint shard per rank) and sums its float64
accumulators across ranks at the end, and ``behavioral_llc`` shards its chains and gathers them,
so every rank returns the same, complete result; warnings about that result are given once
(:func:`warn_once`). Probes are seeded per batch (not per rank), so the result does not depend on
the number of processes, up to float rounding: a chain alone on its rank runs another kernel
path than chains batched together (3 processes against 1 on toy:sma: λ̂ 1e-7 to 1e-5 relative
apart; 2 processes: identical, audit 10b). The report's memory and time fits, which each rank
could make differently, are rank 0's (:func:`from_rank0`), and files every rank shares are written
by rank 0 (:func:`on_rank0`). Without a process group everything runs in the one process.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from .errors import TLDegeneracyError

__all__ = ["DistributedContext", "distributed_context", "all_reduce_sum_", "broadcast_float", "max_over_ranks", "reduce_device",
           "gather_objects", "from_rank0", "on_rank0", "warn_once"]


@dataclass(frozen=True)
class DistributedContext:
    """Rank and world size of the default process group (0 and 1 without one)."""

    rank: int = 0
    world_size: int = 1

    @property
    def active(self) -> bool:
        return self.world_size > 1


def distributed_context(group=None) -> DistributedContext:
    if dist.is_available() and dist.is_initialized():
        return DistributedContext(dist.get_rank(group), dist.get_world_size(group))
    return DistributedContext()


def reduce_device(t: Tensor, group=None) -> torch.device:
    """Device on which ``t`` can take part in a collective of ``group``'s backend.

    NCCL reduces only CUDA tensors, so CPU tensors (statistics kept with device="cpu", scalars built
    on the host) go through the current GPU; other backends use ``t``'s own device.
    """
    if dist.get_backend(group) == "nccl" and t.device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return t.device


def all_reduce_sum_(t: Tensor, group=None) -> Tensor:
    """Sum ``t`` over the ranks of ``group`` in place (no-op without a process group)."""
    if not distributed_context(group).active:
        return t
    device = reduce_device(t, group)
    if device == t.device:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    else:
        buf = t.to(device)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
        t.copy_(buf)
    return t


def _scalar_collective(value: float, collective, group=None) -> float:
    t = torch.tensor([float(value)], dtype=torch.float64)
    t = t.to(reduce_device(t, group))  # NCCL takes CUDA tensors only
    collective(t)
    return float(t[0])


def broadcast_float(value: float, src: int = 0, group=None) -> float:
    """Rank ``src``'s ``value`` on every rank (``value`` itself without a process group)."""
    if not distributed_context(group).active:
        return float(value)
    return _scalar_collective(value, lambda t: dist.broadcast(t, src, group=group), group)


def max_over_ranks(value: float, group=None) -> float:
    """The largest ``value`` over the ranks (``value`` itself without a process group)."""
    if not distributed_context(group).active:
        return float(value)
    return _scalar_collective(value, lambda t: dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group), group)


def gather_objects(obj, group=None) -> list:
    """Every rank's ``obj`` (picklable), in rank order: ``[obj]`` without a process group."""
    context = distributed_context(group)
    if not context.active:
        return [obj]
    parts = [None] * context.world_size
    dist.all_gather_object(parts, obj, group=group)
    return parts


def from_rank0(obj, group=None):
    """Rank 0's ``obj`` (picklable) on every rank: a decision every rank must share although each
    could reach another (a fit to the machine's time or memory); ``obj`` without a process group."""
    return gather_objects(obj, group)[0]


def on_rank0(action: Callable[[], None], group=None) -> None:
    """Run ``action`` on rank 0 only, and let every rank go on once it is done: writes to files that
    all ranks share, whose content every rank holds alike. Where it fails on rank 0, every rank
    raises (rank 0 its error, the others a :class:`TLDegeneracyError` quoting it), so that no rank
    goes on alone to wait in a later collective."""
    context = distributed_context(group)
    error = None
    if context.rank == 0:
        try:
            action()
        except Exception as err:  # re-raised below, after the other ranks have heard of it
            error = err
    failed = from_rank0(None if error is None else f"{type(error).__name__}: {error}", group)
    if error is not None:
        raise error
    if failed is not None:
        raise TLDegeneracyError(f"rank 0 failed writing files all ranks share ({failed}); see its error")


def warn_once(message: str, category: type[Warning], stacklevel: int = 2) -> None:
    """``warnings.warn`` on rank 0 only (everywhere without a process group).

    For warnings about a result that every rank shares (all-reduced statistics, gathered chains, the
    same data and model on every rank): a ``torchrun`` job of N processes would otherwise print each
    one N times. ``stacklevel`` counts as for ``warnings.warn`` called where this is called."""
    if distributed_context().rank == 0:
        warnings.warn(message, category, stacklevel=stacklevel + 1)
