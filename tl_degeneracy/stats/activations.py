"""``activation_stats``: streaming float64 Gram, mean and count per hook point (METHODS §4).

One forward pass per batch captures every requested hook through ``run_with_hooks``; each hook
function selects the sample rows (METHODS §0: mask of counted positions), converts them to
float64 and folds them into its accumulator in place with one matrix product. Nothing is cached,
so memory is O(Σ_hooks D²) whatever the amount of data.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..data import token_batches
from ..errors import MissingHookError
from ..memory import check_batches, hook_width, moment_held
from ..models.adapt import adapt
from ..numerics import carried_dtype, warn_sample_limited
from .accumulators import MomentAccumulator
from ..distributed import distributed_context, failing_together
from .passes import FeatureLayout, HookTarget, feature_layout, resolve_targets
from .gram_stats import ActivationStats, HookStats
from .samples import SampleIndex
from .stream import Step, stream

__all__ = ["activation_stats", "moment_pass"]


class _Collector:
    """Forward hooks that fold each batch's sample rows into one accumulator per hook point (and,
    with ``half``, those of the data's even-numbered sequences into a second one)."""

    def __init__(self, targets: list[HookTarget], per_head: bool, device: torch.device, half: bool = False):
        self.targets, self.per_head, self.device, self.half = targets, per_head, device, half
        self.layouts: dict[str, FeatureLayout] = {}
        self.units: dict[str, str] = {}
        self.accs: dict[str, MomentAccumulator] = {}
        self.half_accs: dict[str, MomentAccumulator] = {}
        self.dtypes: dict[str, torch.dtype] = {}  # as the forward produced them: the rank rule's precision
        self.index: SampleIndex | None = None
        self.flags: dict[str, torch.Tensor] = {}
        self.accumulate = True

    def hook_fn(self, target: HookTarget):
        name = target.name

        def hook(act: torch.Tensor, hook=None) -> None:
            if name in self.flags:
                raise RuntimeError(f"hook {name!r} fired twice in one forward pass; its statistics would count samples twice")
            unit = self.index.unit(tuple(act.shape), name)
            if name not in self.layouts:
                layout = feature_layout(target.kind, tuple(act.shape[2:]), self.per_head)
                self.layouts[name], self.units[name], self.dtypes[name] = layout, unit, act.dtype
                self.accs[name] = MomentAccumulator(layout.groups, layout.dim, device=self.device)
                if self.half:
                    self.half_accs[name] = MomentAccumulator(layout.groups, layout.dim, device=self.device)
            elif unit != self.units[name]:
                raise ValueError(f"hook {name!r} changed its position axis between batches ({self.units[name]} → {unit})")
            if not self.accumulate:
                self.flags[name] = torch.ones((), dtype=torch.bool, device=act.device)
                return None
            layout = self.layouts[name]
            rows = self.index.rows(act.detach(), unit).reshape(-1, layout.groups, layout.dim)
            self.flags[name] = self.accs[name].update(rows)
            if self.half:
                self.half_accs[name].update(rows[self.index.half(unit)])
            return None  # the activation is only read, never replaced

        return hook

    def on_batch(self, runner):
        """The collector's work for one :class:`~tl_degeneracy.stats.stream.Step` of the stream."""

        def run(step: Step) -> None:
            self.index, self.flags, self.accumulate = step.index, step.flags, step.count
            runner.run_with_hooks(step.batch.tokens, fwd_hooks=[(t.name, self.hook_fn(t)) for t in self.targets])
            silent = [t.name for t in self.targets if t.name not in self.flags]
            if silent:
                raise MissingHookError(
                    f"hook(s) {silent} did not fire during the forward pass of this {type(runner.model).__name__}; "
                    "they exist but are not used (e.g. disabled by a model setting)"
                )

        return run


def moment_pass(runner, batches, targets: list[HookTarget], per_head: bool, device=None, progress: bool = True,
                desc: str = "activation_stats", half: bool = False) -> _Collector:
    """One no-grad pass over ``batches`` folding every target's sample rows into its float64
    :class:`MomentAccumulator` (``collector.accs``; with ``half`` also the rows of the data's
    even-numbered sequences into ``collector.half_accs``), summed across ``torch.distributed`` ranks.

    ``runner``: anything with ``run_with_hooks(tokens, fwd_hooks)``, ``.model`` and ``.device`` (a
    ModelAdapter, or the interaction basis's runner for plain HookedRootModules).
    """
    acc_device = torch.device(device) if device is not None else runner.device
    collector = _Collector(targets, per_head, acc_device, half)
    stream(runner.device, batches, collector.on_batch(runner), desc=desc, progress=progress, what="activation",
           reduce=lambda: [*(collector.accs[t.name] for t in targets),  # the same order on every rank
                           *(collector.half_accs[t.name] for t in targets if half)])
    return collector


def activation_stats(
    model,
    data,
    hooks: str | Sequence[str] = ("resid_pre",),
    batch_size: int = 32,
    center: bool = False,
    per_head: bool = True,
    progress: bool = True,
    device: torch.device | str | None = None,
    seq_len: int | None = None,
    skip_bos: bool | None = None,
    half: bool = False,
) -> ActivationStats:
    """Streaming float64 statistics of the activations at ``hooks`` over ``data`` (METHODS §4, §0).

    For every hook point: n (samples counted), μ = (1/n) Σ f, the second moment
    G = (1/n) Σ f fᵀ (``.gram``, METHODS §4) and the covariance (1/n) Σ (f − μ)(f − μ)ᵀ
    (``.covariance()``; METHODS §5 step 1), all float64 whatever the model's dtype.

    Args:
        model: a model (or adapter) that ``tld.adapt`` accepts.
        data: anything :func:`tl_degeneracy.token_batches` accepts (a TokenBatches is used as it is,
            but for ``causal``, which the model decides; ``batch_size``, ``seq_len`` and ``skip_bos``
            apply only when the data still needs batching).
        hooks: hook kinds (every layer, e.g. ``"resid_pre"``) and/or exact hook names. Attention
            patterns/scores are refused: compare them with ``tld.head_synchronization``.
        center: the default of ``.eigenvalues()`` / ``.rank()`` / ``to_frame``: covariance (True)
            or uncentred second moment (False, METHODS §4's G). Both are always available.
        per_head: q and k activations get only their per-head Grams [H, d, d] (the cross-head Gram
            of queries or keys is used by no method and costs H× more); ``False`` accumulates the
            full [H·d, H·d] Gram for them too. v and z always get the full cross-head Gram (METHODS
            §3 needs block ranks), whose diagonal blocks are the per-head Grams.
        progress: a tqdm bar (rank 0 only; the TQDM_DISABLE environment variable turns it off).
        device: where the float64 accumulators live (default: the model's device).
        half: also the statistics of the data's even-numbered sequences alone (``.half`` of each
            hook's statistics; twice the accumulators): a rank that is lower there than on all the
            data is still growing with the data (``degeneracy_counts``' ``data_limited``).

    Samples: with an activation position axis as long as the tokens', every counted token position
    (``data.positions``: padding never, BOS not by default); with a position axis of length 1, one
    sample per sequence that has a counted position. Under ``torch.distributed`` each rank takes
    the batches ``rank::world_size`` and the accumulators are summed in float64 at the end.

    Raises:
        NumericalError: a NaN/inf activation (naming the hook and batch). DataError: bad data.
        MissingHookError: unknown hooks, or hooks that never fire.
        MemoryBudgetError: a batch's forward pass would not fit the memory budget (``tld.memory``),
        before anything runs.
    """
    with failing_together("activation_stats"):
        adapter = adapt(model)
        batches = token_batches(data, adapter, batch_size=batch_size, seq_len=seq_len, skip_bos=skip_bos)
        targets = resolve_targets(adapter, hooks, "activation_stats")
        # fail before the first forward, as the others; the hooks' float64 Grams (and half-data twins) stay alive
        widths = [hook_width(adapter, t.kind, t.name) for t in targets]
        check_batches(adapter, "forward", batches, "activation_stats", held=moment_held(widths, half))
        collector = moment_pass(adapter, batches, targets, per_head, device, progress, half=half)

        def hook_stats(t: HookTarget, acc: MomentAccumulator, half_stats: HookStats | None = None,
                       whole: bool = True) -> HookStats:
            layout = collector.layouts[t.name]
            cov = acc.covariance()
            return HookStats(
                name=t.name,
                kind=t.kind,
                layer=t.layer,
                count=acc.count,
                distinct=batches.distinct(acc.count, collector.units[t.name]) if whole else None,
                unit=collector.units[t.name],
                feature_shape=layout.feature_shape,
                mean=acc.mean.flatten(),
                centered=bool(center),
                cov=None if layout.head_blocks_only else cov[0],
                head_cov=cov if layout.head_blocks_only else None,
                dtype=carried_dtype(collector.dtypes[t.name], adapter.dtype),
                half=half_stats,
            )

        stats = {t.name: hook_stats(t, collector.accs[t.name],
                                    hook_stats(t, collector.half_accs[t.name], whole=False) if half else None)
                 for t in targets}
        # audit 14b F5: rank 6 of 32 on 6 samples, with no word
        limited = [s.name for s in stats.values() if s.has_full and s.limited_by_samples(s.rank(), s.dim)]
        warn_sample_limited("activation_stats", len(limited), len(stats), "hooks' Grams", min(s.n_distinct for s in stats.values()))
        return ActivationStats(
            stats=stats,
            positions=batches.positions,
            n_layers=adapter.n_layers,
            centered=bool(center),
            per_head=bool(per_head),
            n_batches=len(batches),
            world_size=distributed_context().world_size,
        )
