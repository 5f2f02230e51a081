"""The report's time fit: how much of the costly sections a preset's time per section allows.

Two sections grow much faster than a forward pass with the model:

- the interaction edges (METHODS §5) take one forward-mode JVP per kept direction of each node, and
  the kept directions are at most the positions read, so about ``IB_COST`` · min(D, n) forward
  passes over the section's n positions (cost ∝ n² until n reaches the width D); its modules
  (METHODS §6) run Louvain in Python on the edge matrices, whatever the device, about
  ``MODULES_COST`` seconds per entry of the matrices, one per pair of adjacent nodes, of min(D, n)²
  entries; and before any pass its cut checks (``stats.cuts``) take ``CUT_PASSES`` gradient passes
  per pair on ``CHECK_POSITIONS`` tokens, whatever n (SmolLM2-135M: 23 s of 111 s);
- an LLC run (METHODS §1) takes chains · (burnin + draws) chain-steps, each a forward and backward
  pass over the LLC tokens, plus the step-size calibration's Hessian-vector products, about
  ``LLC_CALIBRATION`` chain-steps; the first block of draws always runs, further blocks until
  ``llc_max_draws`` or ``llc_time_limit``.

Both are predicted from passes timed here on the model and its data, and the settings the user did
not give are lowered, in a fixed order, until the prediction fits ``section_time``: the
interaction basis's token budget is halved; the LLC is first restricted to the last layer's
attention (a restricted LLC, METHODS §1), then given fewer tokens, then run at the main loss scale
only. What changed, and the predictions, go to the report header; so on a small model nothing
changes, and on a 135M-parameter model on a CPU the report still finishes. The scope thus follows
the machine's speed (and its load, near a threshold), except the modules' term, which runs on the
CPU whatever the device: on a GPU it alone lowers the tokens of a model of 36 layers of D ≥ 504.
Reports meant to be compared should set these settings, or ``section_time=none``, explicitly.

Before the time fit, :func:`fit_llc_memory` lowers the same LLC settings in the same order until its
chains fit the report's memory budget (the statistics passes are fitted by
``ReportContext.fit_memory``).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

#: Forward passes per kept direction of the interaction section, all nodes' bases and edges together
#: (the whole data's and each half's refitted ones), the modules and the cut checks aside. Measured
#: on SmolLM2-135M (30 layers, D = 576), 2 CPU threads, idle machine, version 0.4.16: 256 tokens,
#: 238.6 s of Jacobians and edges for 252 kept directions per node at 0.54 s per forward (1.75
#: each); before the half-data refits (2026-12-04), 128 tokens, 32 s for 127 at 0.15 s (1.7 each).
IB_COST = 2.0
#: Seconds per edge-matrix entry that the modules take (:func:`~tl_degeneracy.interaction.modules.find_modules`:
#: 5 Louvain restarts on the whole data's graph and on each half's, then their modularity). Measured,
#: 2 CPU threads, idle machine, version 0.4.16: SmolLM2-135M, 67.9 s for 30 pairs of 252 × 252 entries
#: (3.6e-5 s each) and 15.9 s for 30 of 126 × 126 (3.3e-5); toy:bytelm, 0.52 s for 2 pairs of
#: 128 × 128 (1.6e-5 s each).
MODULES_COST = 3.5e-5
#: Gradient passes of the cut checks per pair of adjacent nodes: ``refuse_off_stream``, two per
#: residual-stream node (is it read; is the embedding's gradient all through it), and
#: ``find_bypasses``, two per pair (with the later node held and without); 4·30 + 1 = 121 on SmolLM2-135M.
CUT_PASSES = 4
#: Chain-steps that one LLC run's step size and curvature checks cost (pilots, Lanczos and
#: Hutchinson probes before and after sampling). Measured: SmolLM2-135M restricted to its last
#: layer's attention, 32 tokens, 4 chains: 64 s besides sampling at 0.059 s per chain-step.
LLC_CALIBRATION = 1000
#: The time fit lowers no token budget below these.
MIN_IB_TOKENS = 64
MIN_LLC_SEQ_LEN = 16

#: Settings the time fit may change (those the user gave are left alone).
SCOPED = ("ib_tokens", "llc_params", "llc_sequences", "llc_seq_len", "loss_scales", "gammas")


def _seconds(run: Callable[[], object]) -> float:
    """Wall time of ``run()``, the faster of two calls (the first pays one-off costs)."""
    times = []
    for _ in range(2):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def _forward_seconds(ctx) -> float:
    """One forward pass over all of the interaction section's batches."""
    adapter, batches = ctx.adapter, ctx.ib_batches

    def run():
        with torch.no_grad(), adapter.eval_mode():
            for i in range(len(batches)):
                adapter.forward(batches.batch(i, device=adapter.device).tokens)

    return _seconds(run)


def _cut_pass_seconds(ctx, nodes: list[str]) -> float:
    """One gradient pass of the cut checks (``stats.cuts``): the first sequence's first
    ``CHECK_POSITIONS`` tokens, the outputs' gradient at the first node with the second held, and
    without (two passes, halved)."""
    from ..stats.cuts import CHECK_POSITIONS, gradient_share_around

    adapter = ctx.adapter
    tokens = ctx.ib_batches.batch(0, device=adapter.device).tokens[:1, :CHECK_POSITIONS]
    return _seconds(lambda: gradient_share_around(adapter, tokens, nodes[0], nodes[1])) / 2


def _chain_step_seconds(ctx) -> float:
    """Seconds per chain-step of the LLC's own chain-batched loss and gradient (``LossGrad``) on the
    LLC batch, all chains together at θ*, divided by the chains."""
    from ..llc.layout import select_coordinates
    from ..llc.loss_grad import LossGrad
    from ..llc.targets import make_target

    s = ctx.settings
    target = make_target(ctx.adapter, ctx.llc_batches, None, None)
    with target.engine.eval_mode():
        layout = select_coordinates(target, s.llc_params).layout
        step = LossGrad(target, layout)
        delta = torch.zeros(s.chains, layout.numel, dtype=target.dtype, device=target.device)
        return _seconds(lambda: step(delta, 0)) / s.chains


def _llc_runs(settings) -> int:
    """LLC runs of the report's llc section: the main one, the other loss scales, the γ-curve."""
    others = [e for e in settings.loss_scales if abs(e - settings.loss_scale) > 1e-12 * settings.loss_scale]
    return 1 + len(others) + len(settings.gammas)


def _fit_interaction(ctx, explicit: set[str], info: dict) -> None:
    from ..interaction.runner import default_transformer_nodes

    s, limit = ctx.settings, ctx.settings.section_time
    nodes = default_transformer_nodes(ctx.adapter)  # the section's nodes
    pairs = len(nodes) - 1
    n, seconds = ctx.ib_batches.n_samples, _forward_seconds(ctx)
    checks = CUT_PASSES * pairs * _cut_pass_seconds(ctx, nodes)
    width = ctx.adapter.d_model
    # Fewer tokens than ib_tokens in the data: a lower ib_tokens changes nothing until it is below them.
    available = sum(len(q[: s.ib_seq_len]) for q in ctx.batches.sequences)

    def predicted(tokens: int) -> float:
        share = min(tokens, available) / min(s.ib_tokens, available)  # forward time and positions scale with the tokens
        kept = min(width, n * share)
        return IB_COST * kept * seconds * share + MODULES_COST * pairs * kept**2 + checks

    tokens = s.ib_tokens
    if "ib_tokens" not in explicit:
        while predicted(tokens) > limit and min(tokens, available) // 2 >= MIN_IB_TOKENS:
            tokens = min(tokens, available) // 2
    info["predicted"]["interaction"] = predicted(tokens)
    if tokens != s.ib_tokens:
        info["lowered"]["ib_tokens"] = [s.ib_tokens, tokens]
        info["predicted_before"]["interaction"] = predicted(s.ib_tokens)
        ctx.update_settings(ib_tokens=tokens)


def _lower_llc(ctx, explicit: set[str], lowered: dict, over: Callable[[], bool], runs: bool) -> None:
    """Lower the LLC's settings not in ``explicit`` while ``over()``, in the fixed order (module
    docstring): the selection to the last layer's attention, the sequences halved down to one, their
    length halved down to :data:`MIN_LLC_SEQ_LEN`, and (``runs``: they cost time, not memory) the
    other loss scales and the γ-curve dropped. Each setting lowered goes to ``lowered`` as
    ``[before, after]``."""
    def lower(name: str, value) -> None:
        before = ctx.settings.to_dict()[name]
        lowered.setdefault(name, [before, value])[1] = value
        ctx.update_settings(**{name: value})

    def used(name: str, available: int) -> int:
        """How many sequences / positions the LLC batch really has under setting ``name`` (None: all):
        halving a setting above what the data hold would change nothing."""
        value = ctx.settings.to_dict()[name]
        return available if value is None else min(value, available)

    sequences = ctx.batches.sequences
    n_sequences, longest = len(sequences), max(len(q) for q in sequences)
    if over() and "llc_params" not in explicit and ctx.settings.llc_params is None and ctx.adapter.n_layers:
        lower("llc_params", f"blocks.{ctx.adapter.n_layers - 1}.attn")
    while over() and "llc_sequences" not in explicit and used("llc_sequences", n_sequences) > 1:
        lower("llc_sequences", used("llc_sequences", n_sequences) // 2)
    while over() and "llc_seq_len" not in explicit and used("llc_seq_len", longest) // 2 >= MIN_LLC_SEQ_LEN:
        lower("llc_seq_len", used("llc_seq_len", longest) // 2)
    if runs and over() and _llc_runs(ctx.settings) > 1:
        if "loss_scales" not in explicit and len(ctx.settings.loss_scales) > 1:
            lower("loss_scales", (ctx.settings.loss_scale,))
        if "gammas" not in explicit and ctx.settings.gammas:
            lower("gammas", ())


def _fit_llc(ctx, explicit: set[str], info: dict) -> None:
    limit = ctx.settings.section_time
    timed: dict[tuple, float] = {}  # chain-step seconds per (selection, LLC data): fewer runs need no new timing

    def predicted() -> float:
        s = ctx.settings
        key = (s.llc_params, s.llc_sequences, s.llc_seq_len)
        if key not in timed:
            timed[key] = _chain_step_seconds(ctx)
        step = timed[key]
        first = (s.chains * (s.burnin + s.draws) + LLC_CALIBRATION) * step  # the first block always runs
        whole = (s.chains * (s.burnin + max(s.draws, s.llc_max_draws)) + LLC_CALIBRATION) * step
        return _llc_runs(s) * max(first, whole if s.llc_time_limit is None else min(whole, s.llc_time_limit))

    before = predicted()
    _lower_llc(ctx, explicit, info["lowered"], lambda: predicted() > limit, runs=True)
    cost = predicted()
    info["predicted"]["llc"] = cost
    if cost != before:
        info["predicted_before"]["llc"] = before


def llc_bytes(ctx) -> int:
    """The memory one process's share of the LLC's chains needs with the report's LLC settings
    (:func:`~tl_degeneracy.llc.estimate.chains_memory`, what the LLC checks before it samples)."""
    from ..distributed import distributed_context
    from ..llc.estimate import chains_memory
    from ..llc.layout import select_coordinates
    from ..llc.targets import make_target

    s = ctx.settings
    target = make_target(ctx.adapter, ctx.llc_batches, None, None)
    share = -(-s.chains // distributed_context().world_size)
    return chains_memory(target, select_coordinates(target, s.llc_params), share)


def fit_llc_memory(ctx, budget, explicit: set[str], sections: list[str]) -> dict:
    """Lower the LLC's scope (the settings of :data:`SCOPED` not in ``explicit``, in the time fit's
    order) until its chains fit ``budget`` (:func:`llc_bytes`), before the time fit times a chain-step
    with them: an LLC over the budget would otherwise fail when it starts (or, timed first, be killed
    by the kernel). Changes ``ctx.settings``; returns what the header's memory sentence states: the
    bytes needed after the fit, whether they fit, and each setting lowered ``[before, after]`` (empty
    for a report without the llc section or without data)."""
    if "llc" not in sections or ctx.data is None:
        return {}
    lowered: dict = {}
    _lower_llc(ctx, explicit, lowered, lambda: llc_bytes(ctx) > budget.bytes, runs=False)
    needed = llc_bytes(ctx)
    return {"needed": needed, "fits": needed <= budget.bytes, "lowered": lowered}


def fit_time(ctx, explicit: set[str], sections: list[str]) -> dict:
    """Lower the settings of :data:`SCOPED` not in ``explicit`` until the interaction and LLC
    sections of ``sections`` are predicted to take at most ``section_time`` seconds each (module
    docstring); changes ``ctx.settings``. Returns what the report header states: the time per
    section, the predicted seconds per section after the fit (``predicted``) and, for a section
    whose settings were lowered, before it (``predicted_before``), and each setting lowered
    ``[before, after]``, with ``fits`` False where a prediction still exceeds it."""
    limit = ctx.settings.section_time
    info = {"section_time": limit, "predicted": {}, "predicted_before": {}, "lowered": {}}
    if limit is None or ctx.data is None:
        return info
    if "interaction" in sections:
        _fit_interaction(ctx, explicit, info)
    if "llc" in sections:
        _fit_llc(ctx, explicit, info)
    info["fits"] = all(t <= limit for t in info["predicted"].values())
    return info
