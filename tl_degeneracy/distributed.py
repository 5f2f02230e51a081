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
by rank 0 (:func:`on_rank0`). An error raised on one rank only is raised on every rank
(:func:`failing_together`: the statistics passes, every public analysis — the statistics,
``degeneracy_counts``, the synchronizations, ``interaction_basis``, ``sparsify``, ``behavioral_llc``
and its sweeps — each report section and the report), so that no rank is left waiting for the others in a collective. Without a process group
everything runs in the one process.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable
from contextlib import contextmanager, suppress
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from .errors import TLDegeneracyError

__all__ = ["DistributedContext", "distributed_context", "all_reduce_sum_", "broadcast_float", "max_over_ranks", "reduce_device",
           "gather_objects", "from_rank0", "on_rank0", "failing_together", "raise_on_every_rank", "warn_once"]


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

    NCCL reduces only CUDA tensors, so CPU tensors (statistics kept with device="cpu") go through the
    current GPU; other backends use ``t``'s own device. (Objects and scalars are exchanged with
    ``all_gather_object``, which places them itself.)
    """
    if dist.get_backend(group) == "nccl" and t.device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return t.device


def all_reduce_sum_(t: Tensor, group=None) -> Tensor:
    """Sum ``t`` over the ranks of ``group`` in place (no-op without a process group)."""
    return _all_reduce_(t, "SUM", group)


def all_reduce_max_(t: Tensor, group=None) -> Tensor:
    """The elementwise maximum of ``t`` over the ranks of ``group``, in place (no-op without a process group)."""
    return _all_reduce_(t, "MAX", group)


def _all_reduce_(t: Tensor, op: str, group=None) -> Tensor:
    if not distributed_context(group).active:
        return t
    device = reduce_device(t, group)
    if device == t.device:
        dist.all_reduce(t, op=getattr(dist.ReduceOp, op), group=group)
    else:
        buf = t.to(device)
        dist.all_reduce(buf, op=getattr(dist.ReduceOp, op), group=group)
        t.copy_(buf)
    return t


def broadcast_float(value: float, src: int = 0, group=None) -> float:
    """Rank ``src``'s ``value`` on every rank (``value`` itself without a process group)."""
    return float(gather_objects(float(value), group)[src])


def max_over_ranks(value: float, group=None) -> float:
    """The largest ``value`` over the ranks, NaN where any is (``value`` itself without a process group)."""
    return float(np.max(gather_objects(float(value), group)))


def gather_objects(obj, group=None) -> list:
    """Every rank's ``obj`` (picklable), in rank order: ``[obj]`` without a process group.

    Where another rank sends its failure instead (:func:`raise_on_every_rank`, :func:`failing_together`),
    this rank raises it: a rank that failed between two collectives meets the others in the next one
    they reach, which is then where they learn of it."""
    world = distributed_context(group).world_size
    return _exchange(obj, None, lambda rank, name, text: f"rank {rank} of {world} failed with {name}: {text}",
                     RuntimeError, group)


def from_rank0(obj, group=None):
    """Rank 0's ``obj`` (picklable) on every rank: a decision every rank must share although each
    could reach another (a fit to the machine's time or memory); ``obj`` without a process group."""
    return gather_objects(obj, group)[0]


def on_rank0(action: Callable[[], None], group=None) -> None:
    """Run ``action`` on rank 0 only, and let every rank go on once it is done: writes to files that
    all ranks share, whose content every rank holds alike. Where it fails on rank 0, every rank
    raises (:func:`raise_on_every_rank`: rank 0 its error, the others a :class:`TLDegeneracyError`
    quoting it), so that no rank goes on alone to wait in a later collective."""
    error = None
    if distributed_context(group).rank == 0:
        try:
            action()
        except Exception as err:  # re-raised below, after the other ranks have heard of it
            error = err
    raise_on_every_rank(error, lambda rank, name, text: f"rank {rank} failed writing files all ranks share "
                                                        f"({name}: {text}); see its error",
                        fallback=TLDegeneracyError, group=group)


@contextmanager
def failing_together(what: str, group=None):
    """Run a block whose ranks meet in collectives (a ``with`` block: unlike a decorator it adds no
    frame, so warnings raised inside keep pointing at the caller) so that an error raised on one rank
    only raises on every rank: the failing rank sends it in place of its next collective
    (:func:`raise_on_every_rank`), and the others hear of it in whichever collective they are
    waiting in, or where the block ends. Without this a rank that raised alone
    left the others waiting in their next collective for good (audit 16b F1: non-finite values in one
    rank's batches, an error in one rank's chains or in a report section's code). An error every
    rank has already raised together passes through unchanged, so blocks nest; without a process
    group the block runs as it is. A peer hears of the error where it waits, which may be another
    block than the one it began in: a caller that records errors (a report section) enters its block
    together with the others (an exchange just before), so that an error from outside is not taken
    for its own. Not exchanged: KeyboardInterrupt (torchrun stops every process on a signal) and an
    error inside a tensor reduction itself (the statistics' all-reduce after a pass)."""
    error = None
    try:
        yield
    except Exception as err:
        if getattr(err, _RAISED_ON_EVERY_RANK, False) or not distributed_context(group).active:
            raise
        error = err
    context = distributed_context(group)
    if context.active:
        raise_on_every_rank(error, lambda rank, name, text: f"{what} failed on rank {rank} of {context.world_size}: "
                                                            f"{name}: {text}", group=group)


def raise_on_every_rank(error: Exception | None, message: Callable[[int, str, str], str],
                        fallback: type[Exception] = RuntimeError, group=None) -> None:
    """Every rank calls this with its own ``error`` (None where it has none) and raises where any rank
    has one: a rank that raised alone would leave the others waiting in their next collective for
    good (audit 16b: non-finite values in one rank's batches hung a report until gloo's 30-minute
    timeout). A failing rank raises its own error; the others raise the first failing rank's error
    class where it is one of the package's (so that a report classifies it alike), else ``fallback``,
    with ``message(rank, class name, its text)``. Only names and text cross between ranks: an
    exception class need not pickle (review 39: a local class lost the real error and hung the
    other rank). Without a process group: ``error``, if any, is raised."""
    _exchange(None, error, message, fallback, group)


#: Set on an error that every rank raises together, so that an enclosing :func:`failing_together`
#: does not send it a second time (which no other rank would receive).
_RAISED_ON_EVERY_RANK = "_tld_raised_on_every_rank"


def _exchange(obj, error: Exception | None, message: Callable[[int, str, str], str], fallback: type[Exception],
              group=None) -> list:
    """The one object collective of this module: every rank sends ``(its failure or None, obj)``; the rank
    that has ``error`` raises it, and every rank raises where any rank failed; else every ``obj``."""
    context = distributed_context(group)
    if not context.active:
        if error is not None:
            raise error
        return [obj]
    failure = None if error is None else (f"{type(error).__module__}.{type(error).__qualname__}", _text(error))
    parts = [None] * context.world_size
    dist.all_gather_object(parts, (failure, obj), group=group)
    if error is not None:
        raise _raised_on_every_rank(error)
    first = next(((rank, f) for rank, (f, _) in enumerate(parts) if f is not None), None)
    if first is None:
        return [o for _, o in parts]
    rank, (name, text) = first
    cls = _package_error(name) or fallback
    try:
        exc = cls(message(rank, name.rsplit(".", 1)[-1], text))
    except TypeError:  # an error class that takes other arguments
        exc = fallback(message(rank, name.rsplit(".", 1)[-1], text))
    raise _raised_on_every_rank(exc)


def _raised_on_every_rank(error: Exception) -> Exception:
    with suppress(AttributeError):  # an exception class with __slots__ takes no mark
        setattr(error, _RAISED_ON_EVERY_RANK, True)
    return error


def _package_error(name: str) -> type[Exception] | None:
    """The TLDegeneracyError subclass called ``name`` (module.qualname), else None."""
    todo = [TLDegeneracyError]
    while todo:
        cls = todo.pop()
        if f"{cls.__module__}.{cls.__qualname__}" == name:
            return cls
        todo.extend(cls.__subclasses__())
    return None


def _text(error: Exception) -> str:
    """``str(error)``, or its class name where that fails (the gather must still happen: review 40)."""
    try:
        return str(error)
    except Exception:  # noqa: BLE001 - an error's own __str__ may raise anything
        return f"{type(error).__name__} (its message could not be read)"


def warn_once(message: str, category: type[Warning], stacklevel: int | None = 2) -> None:
    """``warnings.warn`` on rank 0 only (everywhere without a process group).

    For warnings about a result that every rank shares (all-reduced statistics, gathered chains, the
    same data and model on every rank): a ``torchrun`` job of N processes would otherwise print each
    one N times. ``stacklevel`` counts as for ``warnings.warn`` called where this is called; None:
    the caller's line (the frame that called into the package), and once from it (a loop calling
    again from that line too, as Python's default filter does), for a warning that several analyses
    inside one call raise alike (review 47 F6: the dtype's warning
    twice from sparsify, pointing at two lines inside the package; the package's own
    ``catch_warnings`` blocks reset Python's once-per-line record between them)."""
    if distributed_context().rank != 0:
        return
    if stacklevel is not None:
        warnings.warn(message, category, stacklevel=stacklevel + 1)
        return
    level, caller = _caller_outside()
    # The frame's id alone may be a later frame's (ids are reused): with its place, it is at worst the
    # same line again, which Python's own once-per-line filter would not show either.
    where = (caller.f_code.co_filename, caller.f_lineno, caller.f_lasti) if caller is not None else None
    key = (id(caller), where, category, message)
    if key not in _WARNED_AT_CALL:
        _WARNED_AT_CALL[key] = None
        while len(_WARNED_AT_CALL) > 64:
            _WARNED_AT_CALL.pop(next(iter(_WARNED_AT_CALL)))
        warnings.warn(message, category, stacklevel=level)


#: The recent (caller frame, instruction, category, message) of :func:`warn_once` ``stacklevel=None``.
_WARNED_AT_CALL: dict = {}


@contextmanager
def own_warnings():
    """A block whose warnings are recorded on their own (a report section's): what
    :func:`warn_once` ``stacklevel=None`` showed before it is shown again inside it once, though the
    caller's line is the same (every section runs from the one call of the report)."""
    _WARNED_AT_CALL.clear()
    yield


def _caller_outside():
    """(``warnings.warn``'s stacklevel called in :func:`warn_once`, frame) of the frame that called
    into this package: the one beyond its outermost frame (torch's frames between the package's own,
    a hook's, are passed over)."""
    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    frame, level, outermost, caller = sys._getframe(2), 2, 2, None  # warn_once's caller: level 2
    while frame is not None:
        if os.path.abspath(frame.f_code.co_filename).startswith(package):
            outermost, caller = level, frame.f_back
        frame, level = frame.f_back, level + 1
    return outermost + 1, caller
