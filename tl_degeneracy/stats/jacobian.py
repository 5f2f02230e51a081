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

Output positions that count are the same samples as at the hooks (the batch mask; for an output
with a position axis of length 1, each sequence that has a counted position). Probe j of batch m
is drawn from its own generator seeded by (seed, m, j), so results do not depend on chunking,
on the backward method, or on how batches are split across processes.

All backward passes of a batch share ONE forward pass: either k separate ``autograd.grad`` calls
with ``retain_graph`` (``method="loop"``) or one vmapped call over a chunk of probes
(``method="batched"``, ``is_grads_batched=True``); ``"auto"`` tries the batched one and falls back
to the loop where an operation does not support it. Measured on CPU: batched is 5–8× faster on a
tiny model (per-call overhead dominates) and on par on toy:bytelm at 16×128 tokens, 8 probes.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..data import token_batches
from ..errors import MissingHookError, NumericalError
from ..models.adapt import adapt
from .accumulators import SecondMomentAccumulator
from .distributed import distributed_context
from .passes import FeatureLayout, HookTarget, feature_layout, raise_if_not_finite, resolve_targets, run_until, shard
from .results import JacobianHookStats, JacobianStats
from .samples import SampleIndex
from .vjp import Backward, cotangents, differentiable_capture

__all__ = ["JacobianPass", "jacobian_pass", "jacobian_stats"]

OBJECTIVES = ("kl", "mse")
METHODS_ = ("auto", "batched", "loop")
#: Default budget for one chunk of cotangents (elements of [chunk, batch, pos, out_dim]).
CHUNK_ELEMENTS = 1 << 24


@dataclass
class JacobianPass:
    """What one pass accumulated: per hook its float64 accumulator, feature layout and sample unit."""

    accs: dict[str, SecondMomentAccumulator] = field(default_factory=dict)
    layouts: dict[str, FeatureLayout] = field(default_factory=dict)
    units: dict[str, str] = field(default_factory=dict)
    output_unit: str | None = None
    no_gradient: set[str] = field(default_factory=set)


def jacobian_pass(
    runner,
    batches,
    targets: list[HookTarget],
    *,
    objective: str,
    output_hook: str | None = None,
    output_transform: Callable[[Tensor], Tensor] | None = None,
    n_probes: int = 8,
    exact: bool = False,
    seed: int = 0,
    per_head: bool = True,
    device: torch.device | None = None,
    progress: bool = True,
    method: str = "auto",
    probe_chunk: int | None = None,
    desc: str = "jacobian_stats",
) -> JacobianPass:
    """One pass over ``batches`` accumulating K = (1/n) Σ_t E[g_t g_tᵀ] at ``targets`` (module docstring).

    ``runner`` is anything with ``run_with_hooks(tokens, fwd_hooks)`` returning the output
    [batch, pos, …], ``.model`` and ``.device``: a ModelAdapter, or the interaction basis's runner
    for plain HookedRootModules. ``batches`` has ``len()`` and ``.batch(number, device)`` (a
    TokenBatches or alike). With ``output_hook`` the forward stops right after that hook fired.
    Under ``torch.distributed`` each rank takes its shard and the accumulators are summed.
    """
    ctx = distributed_context()
    acc_device = torch.device(device) if device is not None else runner.device
    backward = Backward(method)
    res = JacobianPass()

    def one_batch(batch, accumulate: bool = True) -> None:
        index = SampleIndex.from_batch(batch)
        acts: dict[str, Tensor] = {}
        captured: dict[str, Tensor] = {}

        def keep_output(act: Tensor, hook=None) -> None:
            captured["out"] = act

        fwd = [(t.name, differentiable_capture(acts, t.name)) for t in targets]
        if output_hook is not None:
            fwd.append((output_hook, keep_output))  # after the captures: sees their replacements
        with torch.enable_grad():
            # Stop at the output hook once every target has fired; a target after it keeps a zero Gram.
            logits = run_until(runner, batch.tokens, fwd, stop_after=output_hook, when=lambda: len(acts) == len(targets))
            out = captured["out"] if output_hook is not None else logits
            if output_transform is not None:
                out = output_transform(out)
        silent = [t.name for t in targets if t.name not in acts]
        if silent:
            raise MissingHookError(f"hook(s) {silent} did not fire during the forward pass of this {type(runner.model).__name__}")
        out_name = output_hook or "logits"
        unit_o = index.unit(tuple(out.shape), out_name)
        out = out.flatten(2) if out.ndim > 3 else (out[..., None] if out.ndim == 2 else out)
        out_mask = index.mask if unit_o == "position" else index.seq_mask[:, None]
        res.output_unit = unit_o
        if not bool(torch.isfinite(out.detach()[out_mask]).all()):
            raise NumericalError(f"non-finite (NaN or inf) output {out_name!r} in batch {batch.number}; check the model's weights and dtype")

        for t in targets:
            act = acts[t.name]
            unit = index.unit(tuple(act.shape), t.name)
            if t.name not in res.layouts:
                layout = feature_layout(t.kind, tuple(act.shape[2:]), per_head)
                res.layouts[t.name], res.units[t.name] = layout, unit
                res.accs[t.name] = SecondMomentAccumulator(layout.groups, layout.dim, device=acc_device)
        if not accumulate:
            return
        names = [t.name for t in targets]
        inputs = [acts[n] for n in names]
        flags: dict[str, Tensor] = {}
        if out.requires_grad:
            n_cot = (int(out_mask.any(0).sum()) * out.shape[-1]) if exact else n_probes
            per = max(1, out.shape[0] * out.shape[1] * out.shape[2])
            chunk = probe_chunk or max(1, min(n_cot, CHUNK_ELEMENTS // per))
            for cot, weight in cotangents(objective, out, out_mask, n_probes, exact, seed, batch.number, chunk):
                grads = backward(out, inputs, cot)
                for name, g in zip(names, grads):
                    if g is None:  # the output does not depend on this hook: a zero contribution
                        res.no_gradient.add(name)
                        continue
                    layout = res.layouts[name]
                    rows = index.rows(g, res.units[name], lead=1)  # [J, n, *feature]
                    rows = rows.reshape(-1, layout.groups, layout.dim)
                    ok = res.accs[name].update(rows, weight=weight)
                    flags[name] = ok if name not in flags else flags[name] & ok
        for name in names:
            res.accs[name].add_samples(index.count(res.units[name]))
        raise_if_not_finite(flags, batch, "gradient")

    n_mine = 0
    for batch in shard(batches, ctx, runner.device, progress, desc):
        one_batch(batch)
        n_mine += 1
    if ctx.active:
        if n_mine == 0:  # more ranks than batches: learn shapes from batch 0, count nothing
            one_batch(batches.batch(0, device=runner.device), accumulate=False)
        for t in targets:
            res.accs[t.name].all_reduce()
    return res


def jacobian_stats(
    model,
    data,
    hooks: str | Sequence[str] = ("resid_pre",),
    output: str = "kl",
    n_probes: int = 8,
    exact: bool = False,
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
        exact: one backward pass per (output position, output entry) instead of probes.
        seed: probe j of batch m uses a generator seeded by (seed, m, j).
        probe_chunk: cotangents per backward call (default: as many as fit ~16M output elements).
        method: ``"batched"`` (vmapped backward), ``"loop"`` (one backward per cotangent, graph
            retained) or ``"auto"`` (batched where the model's ops support it).

    Returns:
        :class:`JacobianStats`: hook → ``.gram`` [D, D] (and ``.head_gram`` [H, d, d] for q/k/v/z),
        ``.count`` = n, all float64. A hook the output does not depend on gets a zero Gram.

    Raises:
        NumericalError: non-finite outputs or gradients (naming the hook and batch).
    """
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
    if not exact and (not isinstance(n_probes, int) or n_probes < 1):
        raise ValueError(f"n_probes must be a positive integer; got {n_probes!r}")
    batches = token_batches(data, adapter, batch_size=batch_size, seq_len=seq_len, skip_bos=skip_bos)
    targets = resolve_targets(adapter, hooks, "jacobian_stats")
    res = jacobian_pass(
        adapter, batches, targets, objective=objective, output_hook=output_hook, output_transform=output_transform,
        n_probes=n_probes, exact=exact, seed=seed, per_head=per_head, device=device, progress=progress,
        method=method, probe_chunk=probe_chunk,
    )
    no_gradient, accs, layouts, units = res.no_gradient, res.accs, res.layouts, res.units

    if no_gradient and output_hook is None:
        # Every hook of a transformer feeds its logits; no gradient means the backend did not
        # continue the forward from the hooked tensor (or the hook sits on a dead branch).
        warnings.warn(
            f"the logits do not depend on hook(s) {sorted(no_gradient)} as hooked: their Jacobian Grams are zero",
            RuntimeWarning,
            stacklevel=2,
        )
    stats = {}
    for t in targets:
        acc, layout = accs[t.name], layouts[t.name]
        gram = acc.gram()
        stats[t.name] = JacobianHookStats(
            name=t.name,
            kind=t.kind,
            layer=t.layer,
            count=acc.count,
            unit=units[t.name],
            feature_shape=layout.feature_shape,
            full=None if layout.head_blocks_only else gram[0],
            head_full=gram if layout.head_blocks_only else None,
        )
    return JacobianStats(
        stats=stats,
        positions=batches.positions,
        n_layers=adapter.n_layers,
        output=objective,
        output_hook=output_hook,
        n_probes=None if exact else n_probes,
        exact=bool(exact),
        seed=int(seed),
        n_batches=len(batches),
        world_size=distributed_context().world_size,
        output_unit=res.output_unit or "position",
    )
