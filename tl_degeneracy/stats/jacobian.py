"""``jacobian_stats``: Jacobian Grams of the outputs with respect to hooked activations (METHODS §4).

For a hook with activation f_t at each sample t (one (sequence, position); METHODS §0) and an
objective built from the outputs o_{t'} of the same sequence, the Gram is

    K = (1/n) Σ_t E_probe[ g_t g_tᵀ ],      g_t = ∂ objective / ∂ f_t,

n = the number of samples counted at the hook (exactly as for ``activation_stats``). The
expectation over random probes gives (J_{t't} = ∂o_{t'}/∂f_t, o = logits unless stated):

- ``mse``: objective uᵀo with u ~ N(0, I) over every counted output entry. E_u[g gᵀ] =
  Σ_{t'} J_{t't}ᵀ J_{t't} exactly, cross-position (attention) terms included. ``o`` may instead be
  a hook's activation (``output="<hook name>"``), optionally mapped by ``output_transform``
  (e.g. onto the next layer's basis for the local interaction basis, METHODS §5).
- ``kl``: objective Σ_{t'} log p(y_{t'}) with y_{t'} ~ softmax(o_{t'}) drawn independently at every
  counted output position; ∂ log p(y)/∂o = e_y − p, E[(e_y − p)(e_y − p)ᵀ] = diag(p) − p pᵀ = F_{t'}
  (the softmax Fisher) and cross-position terms vanish in expectation, so
  E_y[g gᵀ] = Σ_{t'} J_{t't}ᵀ F_{t'} J_{t't}: the Fisher-weighted Gram. At the reference model it
  is the Hessian of Σ_{t'} KL(p*_{t'} ‖ p_{t'}) with respect to f (METHODS §1's behavioral loss;
  the gradient with respect to the logits vanishes there, so the Gauss-Newton form is exact).

With k probes per batch each contributes g gᵀ / k: an unbiased estimate whose error falls as
1/√k. ``exact=True`` replaces the probes by one backward pass per output entry: cotangent e_v at
one output position t' for ``mse``, and the columns s_v = √p_v (e_v − p) of a square root of F_{t'}
for ``kl`` (Σ_v s_v s_vᵀ = F_{t'}), which gives K exactly (use it for small vocabularies and tests).
``exact="auto"`` takes the exact Gram where it costs at most ``EXACT_FACTOR`` (16) times the probes'
backward passes per batch: P·V ≤ 16·k, P the most output positions a sequence of the data counts
and V the output width. The choice is made once per pass from the data, never per batch, so
cutting the same data into other batches cannot change the method.

Output positions that count are the same samples as at the hooks (the batch mask; for an output
with a position axis of length 1, each sequence that has a counted position). Probe j of a
sequence is drawn from its own generator seeded by (seed, the sequence's number in the data, j),
in float64 whatever the model's dtype, so results do not depend on chunking, on the backward
method, on how batches are split across processes, or (beyond rounding) on the model's dtype.

All backward passes of a batch share ONE forward pass: either k separate ``autograd.grad`` calls
with ``retain_graph`` (``method="loop"``) or one vmapped call over a chunk of probes
(``method="batched"``, ``is_grads_batched=True``); ``"auto"`` tries the batched one and falls back
to the loop where an operation does not support it. Measured on CPU: batched is 5–8× faster on a
tiny model (per-call overhead dominates) and on par on toy:bytelm at 16×128 tokens, 8 probes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..autograd import gradients_enabled, refuse_inference_mode
from ..data import as_seed, token_batches
from ..errors import MissingHookError, NumericalError
from ..memory import check_batches, half_gram_bytes, hook_width
from ..models.adapt import adapt
from ..numerics import carried_dtype
from .accumulators import SecondMomentAccumulator
from .cuts import refuse_off_stream
from ..distributed import distributed_context, failing_together, warn_once
from .passes import FeatureLayout, HookTarget, feature_layout, resolve_targets, run_until
from .gram_stats import JacobianHookStats, JacobianStats
from .samples import SampleIndex
from .stream import Step, stream
from .vjp import Backward, cotangents, differentiable_capture

__all__ = ["EXACT_FACTOR", "JacobianPass", "check_memory", "jacobian_pass", "jacobian_stats", "max_counted_positions", "resolve_exact"]

OBJECTIVES = ("kl", "mse")
METHODS_ = ("auto", "batched", "loop")
#: Default budget for one chunk of cotangents (elements of [chunk, batch, pos, out_dim]).
CHUNK_ELEMENTS = 1 << 24
#: ``exact="auto"`` takes the exact Gram where it needs at most this many times the probes'
#: cotangents per batch. All VJPs of a batch share one forward and run batched, so the wall-time
#: ratio is far smaller: on toy:modadd (96 exact cotangents against 8 probes, 12×) the exact
#: Jacobian pass took 4× the probe pass's time (0.16 s against 0.04 s, 64 sequences, 1 thread).
EXACT_FACTOR = 16


@dataclass
class JacobianPass:
    """What one pass accumulated: per hook its float64 accumulator, feature layout and sample unit;
    whether the Grams are exact (``exact``, decided once for the pass); with ``halves`` and probes,
    per hook two more accumulators, each the Gram estimate from one half of every batch's probes
    (probes 0 … ⌊k/2⌋−1 and ⌊k/2⌋ … k−1), from the same backward passes; with ``half``, per hook the
    estimate from the data's even-numbered sequences alone (every probe)."""

    accs: dict[str, SecondMomentAccumulator] = field(default_factory=dict)
    layouts: dict[str, FeatureLayout] = field(default_factory=dict)
    units: dict[str, str] = field(default_factory=dict)
    dtypes: dict[str, torch.dtype] = field(default_factory=dict)  # of the activations: the backward's precision
    output_unit: str | None = None
    no_gradient: set[str] = field(default_factory=set)
    exact: bool | None = None
    halves: dict[str, tuple[SecondMomentAccumulator, ...]] = field(default_factory=dict)
    half: dict[str, SecondMomentAccumulator] = field(default_factory=dict)


def max_counted_positions(batches) -> int:
    """The most output positions a sequence of ``batches`` can count: their longest sequence, less
    a skipped BOS. A property of the data, not of how they are cut into batches."""
    n = int(batches.max_len)
    return n - 1 if getattr(batches, "bos", False) and getattr(batches, "skip_bos", False) and n > 1 else n


def resolve_exact(exact: bool | str, n_probes: int, n_exact: int) -> bool:
    """``exact="auto"``: the exact Gram where its ``n_exact`` cotangents per batch (one per counted
    output entry) are at most :data:`EXACT_FACTOR` times the ``n_probes`` probes (METHODS §5)."""
    if exact == "auto":
        return n_exact <= EXACT_FACTOR * n_probes
    return bool(exact)


def check_exact(exact, n_probes) -> None:
    """ValueError for an ``exact`` other than True/False/"auto", or probes that may be used and are
    not a positive integer."""
    if exact not in (True, False, "auto"):
        raise ValueError(f"exact must be True, False or 'auto'; got {exact!r}")
    if exact is not True and (not isinstance(n_probes, int) or isinstance(n_probes, bool) or n_probes < 1):
        raise ValueError(f"n_probes must be a positive integer; got {n_probes!r}")


def check_memory(adapter, batches, targets: list[HookTarget], *, output_hook: str | None, n_probes: int,
                 exact: bool | str, what: str = "jacobian_stats", held: int = 0, halves: bool | str = False,
                 half: bool = False, out_width: int | None = None) -> None:
    """:class:`~tl_degeneracy.memory.MemoryBudgetError` now, before any forward, when one batch of
    the Jacobian pass would not fit the memory budget (``tld.memory.estimate("jacobian")``: the
    forward's autograd graph, a chunk of cotangents on the output, their gradients at ``targets``,
    the targets' float64 Grams (two sets more with ``halves``, one with ``halves="first"``, one more
    with ``half``), and ``held``
    bytes of earlier passes' results). ``out_width``: features per position of the output the
    cotangents sit on, where an ``output_transform`` changes them (default: the vocabulary, or
    ``output_hook``'s width)."""
    if out_width is None:
        out_width = adapter.d_vocab if output_hook is None else hook_width(adapter, None, output_hook)
    n_exact = max_counted_positions(batches) * out_width
    is_exact = resolve_exact(exact, n_probes, n_exact)
    n_cot = n_exact if is_exact else n_probes
    widths = [hook_width(adapter, t.kind, t.name) for t in targets]
    probe_sets = (1 if halves == "first" else 2) if halves and not is_exact and n_probes > 1 else 0
    held += half_gram_bytes(widths, sets=probe_sets + int(half))
    check_batches(adapter, "jacobian", batches, what, n_cotangents=n_cot, chunk_elements=CHUNK_ELEMENTS,
                  target_widths=widths, out_width=out_width, held=held)


def jacobian_pass(
    runner,
    batches,
    targets: list[HookTarget],
    *,
    objective: str,
    output_hook: str | None = None,
    output_transform: Callable[[Tensor], Tensor] | None = None,
    n_probes: int = 8,
    exact: bool | str = False,
    halves: bool | str = False,
    half: bool = False,
    seed: int = 0,
    per_head: bool = True,
    device: torch.device | None = None,
    progress: bool = True,
    method: str = "auto",
    probe_chunk: int | None = None,
    desc: str = "jacobian_stats",
    sequences: str | None = None,
) -> JacobianPass:
    """One pass over ``batches`` accumulating K = (1/n) Σ_t E[g_t g_tᵀ] at ``targets`` (module docstring).

    ``runner`` is anything with ``run_with_hooks(tokens, fwd_hooks)`` returning the output
    [batch, pos, …], ``.model`` and ``.device``: a ModelAdapter, or the interaction basis's runner
    for plain HookedRootModules. ``batches`` has ``len()``, ``.max_len`` and ``.batch(number,
    device)`` (a TokenBatches or alike). With ``output_hook`` the forward stops right after that hook
    fired. ``exact="auto"`` is decided from the first batch's output width and the data's
    :func:`max_counted_positions` (the same on every batch and process, so a different batch split
    never changes the method). ``halves``: also accumulate the two half-probe estimates
    (:class:`JacobianPass`; ``"first"``: only the first half's); ``half``: also the estimate from
    the data's even-numbered sequences alone (``res.half``). ``sequences="even"`` / ``"odd"``: only
    those sequences of each batch are differentiated (the others dropped before the forward; their
    probes keyed by their places in the data as in a whole pass), so that ``res.accs`` holds that half
    alone at half the cost. Under ``torch.distributed`` each rank takes its shard and the accumulators
    are summed (``stream``).
    """
    if sequences not in (None, "even", "odd"):
        raise ValueError(f"sequences must be None, 'even' or 'odd'; got {sequences!r}")
    acc_device = torch.device(device) if device is not None else runner.device
    backward = Backward(method)
    res = JacobianPass()
    names = [t.name for t in targets]
    n_half = n_probes // 2  # probes [0, n_half) form half A, [n_half, n_probes) half B

    def forward(step: Step) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        """The output [batch, pos, out] of one batch, its differentiable target activations and its mask."""
        index = step.index
        acts: dict[str, Tensor] = {}
        captured: dict[str, Tensor] = {}

        def keep_output(act: Tensor, hook=None) -> None:
            captured["out"] = act

        fwd = [(t.name, differentiable_capture(acts, t.name)) for t in targets]
        if output_hook is not None:
            fwd.append((output_hook, keep_output))  # after the captures: sees their replacements
        # Stop at the output hook once every target has fired; a target after it keeps a zero Gram.
        logits = run_until(runner, step.batch.tokens, fwd, stop_after=output_hook, when=lambda: len(acts) == len(targets))
        out = captured["out"] if output_hook is not None else logits
        if output_transform is not None:
            out = output_transform(out)
        silent = [n for n in names if n not in acts]
        if silent:
            raise MissingHookError(f"hook(s) {silent} did not fire during the forward pass of this {type(runner.model).__name__}")
        out_name = output_hook or "logits"
        unit_o = index.unit(tuple(out.shape), out_name)
        out = out.flatten(2) if out.ndim > 3 else (out[..., None] if out.ndim == 2 else out)
        out_mask = index.mask if unit_o == "position" else index.seq_mask[:, None]
        res.output_unit = unit_o
        if not bool(torch.isfinite(out.detach()[out_mask]).all()):
            raise NumericalError(f"non-finite (NaN or inf) output {out_name!r} in batch {step.batch.number}; check the model's weights and dtype")
        return out, acts, out_mask

    def setup(step: Step, out: Tensor, acts: dict[str, Tensor]) -> None:
        """Accumulators from the first batch's shapes, and the exact-or-probes decision."""
        if res.exact is None:
            positions = max_counted_positions(batches) if res.output_unit == "position" else 1
            res.exact = resolve_exact(exact, n_probes, positions * out.shape[-1])
        for t in targets:
            if t.name in res.layouts:
                continue
            act = acts[t.name]
            layout = feature_layout(t.kind, tuple(act.shape[2:]), per_head)
            res.layouts[t.name], res.units[t.name] = layout, step.index.unit(tuple(act.shape), t.name)
            res.dtypes[t.name] = act.dtype
            res.accs[t.name] = SecondMomentAccumulator(layout.groups, layout.dim, device=acc_device)
            if halves and not res.exact and n_half > 0:
                res.halves[t.name] = tuple(SecondMomentAccumulator(layout.groups, layout.dim, device=acc_device)
                                           for _ in range(1 if halves == "first" else 2))
            if half:
                res.half[t.name] = SecondMomentAccumulator(layout.groups, layout.dim, device=acc_device)

    def on_batch(step: Step) -> None:
        if sequences is not None:
            keep = step.index.even if sequences == "even" else ~step.index.even
            part = step.batch.select(keep)
            if part is None:  # none of this half here: only the accumulators' shapes, where still unknown
                if not res.accs:
                    setup(step, *forward(step)[:2])
                return
            step = Step(part, SampleIndex.from_batch(part), step.flags, step.count)
        out, acts, out_mask = forward(step)
        setup(step, out, acts)
        if not step.count:
            return
        index = step.index
        inputs = [acts[n] for n in names]
        if out.requires_grad:  # autograd is on (stream); False only where no target feeds the output
            n_cot = (int(out_mask.any(0).sum()) * out.shape[-1]) if res.exact else n_probes
            per = max(1, out.shape[0] * out.shape[1] * out.shape[2])
            chunk = probe_chunk or max(1, min(n_cot, CHUNK_ELEMENTS // per))
            first = 0  # index of the chunk's first probe
            for cot, weight in cotangents(objective, out, out_mask, n_probes, res.exact, seed, step.batch.index, chunk):
                grads = backward(out, inputs, cot)
                for name, g in zip(names, grads):
                    if g is None:  # the output does not depend on this hook: a zero contribution
                        res.no_gradient.add(name)
                        continue
                    layout = res.layouts[name]
                    rows = index.rows(g, res.units[name], lead=1)  # [J, n, *feature]
                    rows = rows.reshape(rows.shape[0], -1, layout.groups, layout.dim)
                    ok = res.accs[name].update(rows.flatten(0, 1), weight=weight)
                    if name in res.halves:
                        split = min(max(n_half - first, 0), rows.shape[0])
                        a, *b = res.halves[name]
                        a.update(rows[:split].flatten(0, 1), weight=1.0 / n_half)
                        for acc in b:
                            acc.update(rows[split:].flatten(0, 1), weight=1.0 / (n_probes - n_half))
                    if name in res.half:
                        res.half[name].update(rows[:, index.half(res.units[name])].flatten(0, 1), weight=weight)
                    step.flags[name] = ok if name not in step.flags else step.flags[name] & ok
                first += cot.shape[0]
        for name in names:
            n = index.count(res.units[name])
            res.accs[name].add_samples(n)
            for acc in res.halves.get(name, ()):
                acc.add_samples(n)
            if name in res.half:
                res.half[name].add_samples(int(index.half(res.units[name]).sum()))

    def reduce():
        for name in names:
            yield res.accs[name]
            yield from res.halves.get(name, ())
            if name in res.half:
                yield res.half[name]

    with gradients_enabled(runner.model):  # refuses weights made under inference_mode; stream turns autograd on
        stream(runner.device, batches, on_batch, reduce=reduce, desc=desc, progress=progress, grad=True,
               what="gradient")
    return res


def _half_grams(accs, head_blocks_only: bool) -> tuple[Tensor, Tensor] | None:
    """The half-probe Grams in :class:`JacobianHookStats`' layout (None where none were accumulated)."""
    if accs is None:
        return None
    return tuple(acc.gram() if head_blocks_only else acc.gram()[0] for acc in accs)


def jacobian_stats(
    model,
    data,
    hooks: str | Sequence[str] = ("resid_pre",),
    output: str = "kl",
    n_probes: int = 8,
    exact: bool | str = False,
    seed: int = 0,
    batch_size: int = 32,
    per_head: bool = True,
    progress: bool = True,
    device: torch.device | str | None = None,
    output_transform: Callable[[Tensor], Tensor] | None = None,
    probe_chunk: int | None = None,
    method: str = "auto",
    seq_len: int | None = None,
    skip_bos: bool | None = None,
    halves: bool | str = False,
    half: bool = False,
) -> JacobianStats:
    """Jacobian-probe Grams K = (1/n) Σ_t E[g_t g_tᵀ] at ``hooks`` (METHODS §4; module docstring).

    Args:
        model, data, hooks, batch_size, per_head, progress, device, seq_len, skip_bos: as for
            :func:`activation_stats` (hooks are the activations f the gradients are taken at).
        output: ``"kl"`` (Fisher-weighted, on the logits), ``"mse"`` (on the logits), or a hook
            name: ``mse`` on that hook's activation (flattened per position).
        output_transform: for ``mse``, a differentiable map applied to the output [batch, pos, …]
            before the probes (e.g. projection onto a basis); the result must keep [batch, pos, …].
        n_probes: random probes per batch (ignored with ``exact=True``).
        exact: one backward pass per (output position, output entry) instead of probes; ``"auto"``:
            exact where that is at most :data:`EXACT_FACTOR` × ``n_probes`` backward passes per
            batch (decided once for the data; ``.exact`` of the result says which).
        seed: probe j of a sequence uses a generator seeded by (seed, the sequence's number in the data, j).
        probe_chunk: cotangents per backward call (default: as many as fit ~16M output elements).
        method: ``"batched"`` (vmapped backward), ``"loop"`` (one backward per cotangent, graph
            retained) or ``"auto"`` (batched where the model's ops support it).
        halves: with probes (≥ 2), also accumulate the Grams of the first and second half of each
            batch's probes in the same pass (``.half_grams()``; two more Grams per hook, one with
            ``"first"``, which keeps the first half's only): where
            their ranks fall short of the whole estimate's, the probes have not found all of K's
            range yet (``degeneracy_counts``' ``probe_limited``).
        half: also the Grams from the data's even-numbered sequences alone (``.half`` of each hook's
            statistics; one more Gram per hook): a rank lower there than on all the data is still
            growing with the data (``degeneracy_counts``' ``data_limited``).

    Returns:
        :class:`JacobianStats`: hook → ``.gram`` [D, D] (and ``.head_gram`` [H, d, d] for q/k/v/z),
        ``.count`` = n, all float64. A hook the output does not depend on gets a zero Gram. From
        probes (not ``exact``) each Gram is an estimate: its rank a lower bound on K's, its trace
        unbiased (``to_frame``'s ``estimated``).

    Raises:
        NumericalError: non-finite outputs or gradients (naming the hook and batch).
        MemoryBudgetError: a batch's pass would not fit the memory budget (``tld.memory``), raised
        before the first forward, saying what to lower.
        RuntimeError: called under ``torch.inference_mode()`` (``torch.no_grad()`` and a frozen
        model are fine), or the model's weights were made under it.
    """
    with failing_together("jacobian_stats"):
        refuse_inference_mode("jacobian_stats")  # before any work (stream would refuse it later)
        seed = as_seed(seed)
        if method not in METHODS_:
            raise ValueError(f"method must be one of {METHODS_}; got {method!r}")
        adapter = adapt(model)
        if output in OBJECTIVES:
            objective, output_hook = output, None
        else:
            objective = "mse"
            output_hook = adapter.hook_names(output)
            if len(output_hook) != 1:
                raise ValueError(f"output={output!r} names {len(output_hook)} hooks; pass one hook name, 'kl' or 'mse'")
            output_hook = output_hook[0]
        if output_transform is not None and objective != "mse":
            raise ValueError("output_transform applies to mse outputs (output='mse' or a hook name), not to kl")
        check_exact(exact, n_probes)
        batches = token_batches(data, adapter, batch_size=batch_size, seq_len=seq_len, skip_bos=skip_bos)
        targets = resolve_targets(adapter, hooks, "jacobian_stats")
        refuse_off_stream(adapter, batches.batch(0, device=adapter.device).tokens, targets, "jacobian_stats", output_hook)
        check_memory(adapter, batches, targets, output_hook=output_hook, n_probes=n_probes, exact=exact, halves=halves,
                     half=half)
        res = jacobian_pass(
            adapter, batches, targets, objective=objective, output_hook=output_hook, output_transform=output_transform,
            n_probes=n_probes, exact=exact, halves=halves, half=half, seed=seed, per_head=per_head, device=device,
            progress=progress, method=method, probe_chunk=probe_chunk,
        )
        no_gradient, accs, layouts, units = res.no_gradient, res.accs, res.layouts, res.units

        if no_gradient and output_hook is None:
            # Every hook of a transformer feeds its logits; no gradient means the backend did not
            # continue the forward from the hooked tensor (or the hook sits on a dead branch).
            warn_once(
                f"the logits do not depend on hook(s) {sorted(no_gradient)} as hooked: their Jacobian Grams are zero",
                RuntimeWarning,
                stacklevel=2,
            )
        def hook_stats(t: HookTarget, acc: SecondMomentAccumulator, halves=None, half_stats=None) -> JacobianHookStats:
            layout = layouts[t.name]
            gram = acc.gram()
            return JacobianHookStats(
                name=t.name,
                kind=t.kind,
                layer=t.layer,
                count=acc.count,
                unit=units[t.name],
                feature_shape=layout.feature_shape,
                full=None if layout.head_blocks_only else gram[0],
                head_full=gram if layout.head_blocks_only else None,
                halves=_half_grams(halves, layout.head_blocks_only),
                half=half_stats,
                dtype=carried_dtype(res.dtypes[t.name], adapter.dtype),
            )

        stats = {t.name: hook_stats(t, accs[t.name], res.halves.get(t.name),
                                    hook_stats(t, res.half[t.name]) if t.name in res.half else None) for t in targets}
        return JacobianStats(
            stats=stats,
            positions=batches.positions,
            n_layers=adapter.n_layers,
            output=objective,
            output_hook=output_hook,
            n_probes=None if res.exact else n_probes,
            exact=bool(res.exact),
            seed=int(seed),
            n_batches=len(batches),
            world_size=distributed_context().world_size,
            output_unit=res.output_unit or "position",
        )
