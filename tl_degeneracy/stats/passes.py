"""What every statistics pass shares: hook resolution, feature layout, sharding, progress, checks."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..data import Batch, TokenBatches
from ..errors import MissingHookError, NumericalError
from ..models.adapter import ModelAdapter
from ..models.hooks import PATTERN_KINDS
from ..distributed import DistributedContext

__all__ = ["HookTarget", "FeatureLayout", "resolve_targets", "feature_layout", "shard", "raise_if_not_finite", "run_until"]

#: Per-head kinds whose cross-head Gram no method needs: per_head=True keeps only their blocks.
HEAD_BLOCK_ONLY_KINDS = ("q", "k")


@dataclass(frozen=True)
class HookTarget:
    name: str
    kind: str | None
    layer: int | None


@dataclass(frozen=True)
class FeatureLayout:
    """How one sample's activation [*feature_shape] is laid out for an accumulator [groups, dim]."""

    feature_shape: tuple[int, ...]
    groups: int
    dim: int

    @property
    def head_blocks_only(self) -> bool:
        return self.groups > 1


def resolve_targets(adapter: ModelAdapter, hooks: str | Sequence[str], what: str) -> list[HookTarget]:
    """Hook kinds / names → hook points, refusing attention patterns (their "features" are key
    positions, which differ between sequences, so a Gram over them has no meaning)."""
    names = adapter.hook_names(hooks)
    targets = []
    for name in names:
        kl = adapter.hook_kind(name)
        kind, layer = kl if kl is not None else (None, None)
        if kind in PATTERN_KINDS or name.endswith(("hook_pattern", "hook_attn_scores")):
            raise ValueError(
                f"{what} cannot take the attention pattern hook {name!r}: its last axis is key positions, "
                "not features, so a Gram over it is meaningless. Compare patterns between heads with "
                "tld.head_synchronization(model, data); use q/k/v/z hooks for per-head statistics."
            )
        targets.append(HookTarget(name, kind, layer))
    return targets


def feature_layout(kind: str | None, feature_shape: tuple[int, ...], per_head: bool) -> FeatureLayout:
    """Flattened features (one Gram over all of them), except q/k per head when ``per_head``."""
    if len(feature_shape) == 0:
        feature_shape = (1,)
    if len(feature_shape) == 2 and per_head and kind in HEAD_BLOCK_ONLY_KINDS:
        return FeatureLayout(feature_shape, feature_shape[0], feature_shape[1])
    if len(feature_shape) > 2:
        feature_shape = (math.prod(feature_shape),)
    return FeatureLayout(tuple(feature_shape), 1, math.prod(feature_shape))


def show_progress(progress: bool, rank: int = 0) -> bool:
    """Whether a progress bar is drawn: asked for (``progress``), on rank 0, and not switched off by
    the TQDM_DISABLE environment variable (the one rule for every bar of the package)."""
    return bool(progress) and rank == 0 and os.environ.get("TQDM_DISABLE", "").lower() in ("", "0", "false")


def shard(batches: TokenBatches, ctx: DistributedContext, device, progress: bool, desc: str) -> Iterator[Batch]:
    """This rank's batches (``rank::world_size``), on ``device``, with a progress bar on rank 0
    (off when ``progress=False`` or the environment sets TQDM_DISABLE)."""
    numbers = range(ctx.rank, len(batches), ctx.world_size)
    bar = tqdm(numbers, desc=desc, total=len(numbers), disable=not show_progress(progress, ctx.rank), unit="batch")
    for number in bar:
        yield batches.batch(number, device=device)


def raise_if_not_finite(flags: dict[str, torch.Tensor], batch: Batch, what: str) -> None:
    """One device sync per batch: raise NumericalError naming the first hook with a non-finite value."""
    if not flags:
        return
    ok = torch.stack([f.to(next(iter(flags.values())).device) for f in flags.values()]).cpu()
    if bool(ok.all()):
        return
    bad = [name for name, good in zip(flags, ok.tolist()) if not good]
    raise NumericalError(
        f"non-finite (NaN or inf) {what} at hook {bad[0]!r} in batch {batch.number} "
        f"(sequences {batch.index.tolist()[:8]}{'…' if len(batch.index) > 8 else ''})"
        + (f"; also at {bad[1:]}" if len(bad) > 1 else "")
        + ". Check the model's weights and dtype (float16 overflow?) and the input tokens."
    )


class _StopForward(Exception):
    """Raised by the stopping hook of :func:`run_until`; never leaves it."""


def run_until(runner, tokens, fwd_hooks: list, stop_after: str | None = None,
              when: Callable[[], bool] = lambda: True) -> torch.Tensor | None:
    """``runner.run_with_hooks(tokens, fwd_hooks)``; with ``stop_after`` (a hook name), the forward
    pass is abandoned right after that hook's functions ran (if ``when()`` then holds), so nothing
    downstream of it (later blocks, the unembedding) is computed. Returns the output, or None when
    stopped. Hooks are removed on the way out by TransformerLens's own ``finally``."""
    if stop_after is None:
        return runner.run_with_hooks(tokens, fwd_hooks=fwd_hooks)
    fired = []

    def stop(act, hook=None):
        fired.append(True)
        if when():
            raise _StopForward

    try:
        out = runner.run_with_hooks(tokens, fwd_hooks=[*fwd_hooks, (stop_after, stop)])
    except _StopForward:
        return None
    if not fired:
        raise MissingHookError(f"hook {stop_after!r} did not fire during the forward pass of this {type(runner.model).__name__}")
    return out
