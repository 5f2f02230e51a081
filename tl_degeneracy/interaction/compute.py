"""``interaction_basis``: the global interaction basis (paper §6) and the local interaction basis
(LIB, companion paper), with edges, for any TransformerLens-style model (METHODS §5)."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..autograd import refuse_inference_mode
from ..errors import DataError
from ..data import as_seed
from ..numerics import (DataLimitedWarning, activation_precision, check_tolerances, covariance_floor, rank_rtol,
                        rounding_rtol, warn_data_limited, warn_sample_limited)
from ..stats.activations import moment_pass
from ..distributed import distributed_context, failing_together, warn_once
from ..stats.cuts import find_bypasses, refuse_off_stream
from ..memory import check_batch_bytes, direction_bytes, direction_chunk, estimate
from ..stats.jacobian import EXACT_FACTOR, METHODS_, OBJECTIVES, check_exact, check_memory, jacobian_pass
from .basis import SCALINGS, NodeBasis, interaction_directions, probe_agreement, whiten
from .edges import edge_pass
from .basis_result import InteractionBasis, NodeSpectrum
from .runner import Runner, build_runner

__all__ = ["interaction_basis"]

KINDS = ("local", "global", "pca")
LAST = ("pca", "outputs")


def _pass_seed(seed: int, node: int) -> int:
    """An independent probe seed per Jacobian pass (LIB runs one per node)."""
    return int(np.random.SeedSequence([int(seed), 7, int(node)]).generate_state(1)[0])


@dataclass(frozen=True)
class _M:
    """How one node's M was obtained: whose Jacobian, exactly or by probes, the half-probe agreement."""

    source: str
    method: str
    stability: float = float("nan")


def _check_memory(runner: Runner, targets: list, output_hook: str | None, out_width: int | None, probe_kw: dict,
                  held: int, what: str) -> None:
    """MemoryBudgetError before a Jacobian pass of a transformer's interaction basis when one batch
    would not fit the budget in force (``stats.jacobian.check_memory``, with the half-probe and
    half-data Grams the pass keeps and ``held`` bytes of the Gram pass's results). A plain module's
    passes have no estimate: their chunks are bounded by element counts only."""
    if runner.kind == "transformer":
        check_memory(runner.engine, runner.batches, targets, output_hook=output_hook, n_probes=probe_kw["n_probes"],
                     exact=probe_kw["exact"], what=what, held=held, halves=True, half=True, out_width=out_width)


def _edge_chunk(runner: Runner, widths: list[int], held: int) -> int | None:
    """Directions per edge JVP/VJP call that one batch of a transformer carries within the memory
    budget (``tld.memory.direction_chunk``, for the widest node) beside what the edge pass holds
    anyway: ``held`` bytes of results and one batch's forward (``estimate("forward")``; a
    reverse-mode pair's graph reaches no further than it). MemoryBudgetError where not even one
    direction fits (a PCA basis's edges have no Jacobian pass that would have checked). None for a
    plain module."""
    if runner.kind != "transformer":
        return None
    engine, width = runner.engine, max(widths)

    def base(b: int, t: int) -> int:
        return held + estimate(engine, "forward", b, t)

    b, t = check_batch_bytes(engine, runner.batches, "interaction_basis' edge pass",
                             lambda b, t: base(b, t) + direction_bytes(engine, b, t, width, width))
    return direction_chunk(engine, b, t, width, width, held=base(b, t))


@dataclass
class _Fits:
    """What :func:`_jacobian_grams` fitted: every node's basis and how its M was found; the bases of the
    data's even- and odd-numbered sequences with node l+1's whole-data basis (``half_bases``, for
    ``data_limited`` and ``unresolved``) and refitted down the whole recursion (``refit_bases``, for the
    edges' split-half error; the same as ``half_bases`` but for LIB); and the Jacobian passes run."""

    bases: dict[str, NodeBasis]
    how: dict[str, _M]
    half_bases: dict[str, tuple[NodeBasis, NodeBasis]]
    refit_bases: dict[str, tuple[NodeBasis, NodeBasis]]
    passes: int


def _jacobian_grams(runner: Runner, whitenings, half_whitenings, kind: str, last_rule: str, output: str,
                    interaction_rtol, interaction_atol, probe_kw: dict, held: int, refit: bool) -> _Fits:
    """Steps 2–3 for every node: one pass for the global basis, one pass per node for LIB (none for
    its last node with ``last="pca"``), none for PCA. Also the bases of the data's even- and of its
    odd-numbered sequences alone (their Grams ``half_whitenings[node]`` and Jacobian Grams; the odd
    half's as the whole minus the even one). A LIB node's half bases differentiate the whole data's
    basis of the next node (one pass serves all three); the even half's ranks give ``data_limited``
    and ``unresolved``. With ``refit`` (edges wanted) each half's LIB node differentiates that half's
    own basis of the next node as well, two passes more per node, so that the edges' split-half error
    holds the whole recursion's sampling: each half's bases are then those of ``interaction_basis``
    run on that half alone. Each pass first checks that one batch fits the memory budget
    (:func:`_check_memory`)."""
    names = runner.names
    bases: dict[str, NodeBasis] = {}
    how: dict[str, _M] = {}
    half_bases: dict[str, tuple[NodeBasis, NodeBasis]] = {}
    refit_bases: dict[str, tuple[NodeBasis, NodeBasis]] = {}
    seed = probe_kw.pop("seed")
    passes = 0

    def directions(w, gram: torch.Tensor) -> NodeBasis:
        rtol = rank_rtol(w.rank, precision=activation_precision(runner.dtype), gram=True) if interaction_rtol is None else interaction_rtol
        return interaction_directions(w, gram, rtol, interaction_atol, rounding_rtol(runner.dtype, gram=True),
                                      floor=interaction_rtol is None)

    def halves_of(res, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        whole, even = res.accs[name], res.half[name]
        return even.gram()[0], whole.without(even).gram()[0]

    def finish(name: str, gram: torch.Tensor, half_grams: tuple[torch.Tensor, torch.Tensor]) -> None:
        bases[name] = directions(whitenings[name], gram)
        half_bases[name] = refit_bases[name] = tuple(directions(w, g) for w, g in zip(half_whitenings[name], half_grams))

    def identity(name: str, source: str) -> None:
        # M = I, the Jacobian Gram of the identity map: M̃ = diag(D_G), so V = I, D_M = D_G and
        # C = D_G^{s-½} Pᵀ; with s = +½ that is Pᵀ, the principal components (rib's "svd" baseline).
        mean = whitenings[name].mean
        eye = torch.eye(mean.numel(), dtype=torch.float64, device=mean.device)
        finish(name, eye, (eye, eye))
        how[name] = _M(source, "none")

    def from_pass(res, name: str, source: str) -> None:
        finish(name, res.accs[name].gram()[0], halves_of(res, name))
        stability = float("nan")
        if name in res.halves:
            a, b = (acc.gram()[0] for acc in res.halves[name])
            stability = probe_agreement(whitenings[name], a, b, bases[name].size)
        how[name] = _M(source, "exact" if res.exact else "probes", stability)

    def lib_pass(l: int, nxt: NodeBasis, desc: str, **kw):
        """Node l's Jacobian Gram pass through node l+1's basis ``nxt``."""
        nonlocal passes
        # The recursion differentiates node l+1's importance-scaled coordinates whatever the output
        # scaling (METHODS §5 step 3: only s = +½ composes); the shift by μ does not change a Jacobian.
        # In the node's own dtype, which may differ from the weights' (a bfloat16 Llama normalises in float32).
        C = nxt.matrix("importance").to(device=runner.device)
        _check_memory(runner, [runner.nodes[l]], names[l + 1], nxt.size, probe_kw, held, f"LIB's pass at {names[l]}")
        passes += 1
        return jacobian_pass(runner.engine, runner.batches, [runner.nodes[l]], objective="mse", output_hook=names[l + 1],
                             output_transform=lambda o, C=C: o.flatten(2) @ C.mT.to(o.dtype), seed=_pass_seed(seed, l),
                             desc=desc, **{**probe_kw, **kw})

    def zero(name: str) -> torch.Tensor:
        mean = whitenings[name].mean
        return torch.zeros(mean.numel(), mean.numel(), dtype=torch.float64, device=mean.device)

    def refit_half(l: int, h: int) -> NodeBasis:
        # Half h's node l through half h's own basis of node l+1, differentiating that half's sequences only.
        name, nxt, which = names[l], refit_bases[names[l + 1]][h], ("even", "odd")[h]
        if nxt.size == 0:
            return directions(half_whitenings[name][h], zero(name))
        res = lib_pass(l, nxt, f"LIB {name} ({which} half's bases)", halves=False, half=False, sequences=which)
        return directions(half_whitenings[name][h], res.accs[name].gram()[0])

    if kind == "pca":
        for name in names:
            identity(name, "identity")
        return _Fits(bases, how, half_bases, refit_bases, passes)
    if kind == "global":
        _check_memory(runner, runner.nodes, None, None, probe_kw, held, "interaction_basis' Jacobian pass")
        res = jacobian_pass(runner.engine, runner.batches, runner.nodes, objective=output, seed=_pass_seed(seed, 0),
                            desc="interaction basis: Jacobians", **probe_kw)
        for name in names:
            from_pass(res, name, "outputs")
        return _Fits(bases, how, half_bases, refit_bases, 1)
    final = len(names) - 1
    if last_rule == "pca":  # the companion paper's last node: its PCA (METHODS §5)
        identity(names[final], "identity")
    else:
        _check_memory(runner, [runner.nodes[final]], None, None, probe_kw, held, f"LIB's pass at {names[final]}")
        passes += 1
        res = jacobian_pass(runner.engine, runner.batches, [runner.nodes[final]], objective=output,
                            seed=_pass_seed(seed, final), desc=f"LIB {names[final]}", **probe_kw)
        from_pass(res, names[final], "outputs")
    for l in range(final - 1, -1, -1):
        name = names[l]
        if bases[names[l + 1]].size == 0:  # node l+1 keeps nothing: nothing downstream depends on node l either
            finish(name, zero(name), (zero(name), zero(name)))
            how[name] = _M("next node", "exact")
        else:
            from_pass(lib_pass(l, bases[names[l + 1]], f"LIB {name}"), name, "next node")
        if refit:
            refit_bases[name] = (refit_half(l, 0), refit_half(l, 1))
    return _Fits(bases, how, half_bases, refit_bases, passes)


def _check_cuts(runner: Runner, kind: str, last: str, edges: bool) -> None:
    """Refuse gradients at a residual-stream node that is not the stream's (every kind but PCA
    without edges takes them: :func:`~tl_degeneracy.stats.cuts.refuse_off_stream`); refuse LIB, and warn about edges, where a
    node is not a cut between the one before it and what the basis is for (LIB with
    ``last="pca"``: the last node; else the outputs): both would miss what goes around it
    (:mod:`~tl_degeneracy.stats.cuts`)."""
    gradients = kind != "pca" or (edges and len(runner.nodes) > 1)  # edges differentiate the nodes too (review 35)
    if not gradients:
        return
    sample = runner.cut_sample()  # read once: a module's spreads over its batches
    refuse_off_stream(runner.engine, sample[0], runner.nodes, f"interaction_basis(kind={kind!r})")
    if len(runner.nodes) < 2 or not (kind == "local" or edges):
        return
    target = runner.names[-1] if kind == "local" and last == "pca" else None
    found = find_bypasses(runner.engine, sample, runner.names, target)
    if not found:
        return
    what = "the last node reads" if target is not None else "the outputs read"
    pairs = "; ".join(f"{b.node!r} around {b.skipped!r} ({b.share:.2g} of its gradient)" for b in found)
    if kind == "local":
        raise ValueError(
            f"interaction_basis(kind='local'): {what} {pairs}, so those nodes are not cuts of the model's graph: "
            "LIB gives each node only the Jacobian of the next one and would count the directions read around it "
            "as degenerate (METHODS §5). The path around is a skip connection, or a backend that passes an edit at "
            "the next node's hook to only part of what reads it (TransformerBridge: hook_resid_mid). Choose nodes "
            "each of which the next one alone passes on (e.g. the residual stream before each block; nodes=[...]), "
            "or use kind='global'")
    warn_once(f"interaction_basis: {what} {pairs}; edges join adjacent nodes only, so the edge graph and the "
              "modules found from it lack those paths (METHODS §5): choose nodes that are cuts of the model's graph",
              RuntimeWarning, stacklevel=3)


def interaction_basis(
    model,
    data,
    kind: str = "local",
    output: str = "kl",
    scaling: str = "importance",
    nodes: str | Sequence[str] | None = None,
    centered: bool = True,
    gram_rtol: float | None = None,
    gram_atol: float = 0.0,
    interaction_rtol: float | None = None,
    interaction_atol: float = 0.0,
    n_probes: int = 8,
    exact: bool | str = "auto",
    last: str = "pca",
    edges: bool = True,
    edge_sources: int | None = None,
    batch_size: int = 32,
    seq_len: int | None = None,
    skip_bos: bool | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: bool = True,
    method: str = "auto",
) -> InteractionBasis:
    """The interaction basis of every node layer and the edges between adjacent ones (METHODS §5).

    Per node (activations f, D features, samples as in ``activation_stats``):

    1. G = (1/n) Σ (f − μ)(f − μ)ᵀ (``centered=True``; else the second moment and μ = 0), float64,
       eigendecomposed; directions with D_G ≤ max(gram_rtol·max, gram_atol) are dropped; the rest
       are whitened, f̃ = D_G^{-1/2} Pᵀ (f − μ).
    2. M = (1/n) Σ_t E[g_t g_tᵀ], the Jacobian Gram of the outputs with respect to f (float64
       accumulation of VJPs: one per output entry, exact, or Jacobian probes, METHODS §4), in
       whitened coordinates M̃ = V D_M Vᵀ; directions with D_M ≤ max(interaction_rtol·max,
       interaction_atol) are dropped.
    3. f̂ = C (f − μ), C = D_M^{s} Vᵀ D_G^{-1/2} Pᵀ; s = +½ (``scaling="importance"``: E[f̂ f̂ᵀ] =
       diag(D_M), Jacobian Gram in f̂ coordinates = I) or s = −½ (``"paper"``, the paper's formula).

    Outputs of step 2:

    - ``kind="global"`` (paper §6): the model's outputs for every node, ``output="kl"`` (Fisher-
      weighted, sampled labels) or ``"mse"`` (Gaussian probes) — one backward per probe serves all
      nodes.
    - ``kind="local"`` (LIB, companion paper), from the last node backwards: node l's outputs are
      node l+1's finished coordinates f̂^{l+1} with ``mse`` weighting (every output position,
      cross-position terms included). The last node's basis is its PCA (``last="pca"``, the
      default: M = I, as in the companion paper; ``output`` is then unused), or, with
      ``last="outputs"``, the global basis of the model's outputs with the chosen kl/mse weighting
      (the behaviour before issue 14; with ``mse`` and the logits as the last node, rib's un-rotated
      output node). ``ib.last`` and the ``M`` column of ``ib.dims`` say which. The recursion always
      uses the importance-scaled f̂^{l+1} (only s = +½ composes, METHODS §5); ``scaling``
      rescales the returned coordinates, so the two scalings differ by a per-direction factor
      D_M^{±1} for every kind — and so do the edges, computed in those coordinates (paper-scaled
      E_ij is the importance-scaled one over D_M,i of node l+1 squared), and the modules found from
      them (audit 11a: 6 modules for importance, 2 for paper on one model); only importance-scaled
      edges pool across node layers on one scale (METHODS §6). ``last`` does not apply to the other kinds.
    - ``kind="pca"`` (the baseline the companion paper compares LIB with): M = I, the Jacobian
      replaced by the identity, so D_M = D_G and f̂ = Pᵀ (f − μ) with importance scaling, the
      principal components with E[f̂ f̂ᵀ] = diag(D_G); no Jacobian pass. Edges use the same formula
      in these coordinates.

    Edges (``edges=True``): E_ij = (1/n_l) Σ_x Σ_t (Σ_s ∂f̂^{l+1}_{t,i}/∂f̂^l_{s,j} f̂^l_{s,j})² in
    the returned coordinates, n_l = node l's sample count. Exact by default: per pair, kept_l
    forward-mode JVPs per batch (one per direction j of node l), or P·kept_{l+1} reverse-mode VJPs
    where that is fewer (P: counted positions of node l+1). ``edge_sources=r`` allows the unbiased
    estimate with r random ±1 position sources (r·kept_{l+1} VJPs) on pairs where it is cheaper
    than the exact JVPs (kept_l > r·kept_{l+1}); other pairs stay exact. ``settings["edge_modes"]``
    says which way each pair went. See :mod:`tl_degeneracy.interaction.edges`.

    Args:
        model: a model ``tld.adapt`` accepts (data: anything ``token_batches`` accepts), or any other
            transformer_lens ``HookedRootModule`` (data: a tensor [n, d_in] or [n, pos, d_in], or a
            list of such batches; output: the module's forward output).
        nodes: hook kinds (every layer) and/or exact hook names, in forward order (where hook kinds
            are among them, every node is put in the order it fires). Default for
            transformers: resid_pre of every layer, then ``ln_final.hook_normalized`` (or the last
            resid_post where there is no final norm); for other modules every hook point, in the
            order the forward pass reaches them.
        gram_rtol, interaction_rtol: relative cut-offs (default: the package's rank rule for Gram
            eigenvalues, ``tld.numerics.rank_rtol(dim, precision=<the model's dtype>, gram=True)``,
            dim = D for G and rank_G for M̃, there at least twice M̃'s most negative eigenvalue, its
            rounding, METHODS §5); gram_atol, interaction_atol: absolute ones.
        exact: ``"auto"`` (default): per Jacobian pass, M exactly (one backward per counted output
            entry: P·V for the outputs, P·kept_{l+1} for a LIB node, P = the longest sequence's
            counted positions) where that is at most ``EXACT_FACTOR`` = 16 times ``n_probes``
            backward passes per batch, else ``n_probes`` probes. Decided from the data, once per
            pass, so another batch split never changes the method. True / False force it.
            ``ib.dims["M_method"]`` says what each node got.
        n_probes, method: Jacobian probes per batch; VJPs batched or looped (see ``jacobian_stats``).
            Where probes are used, ``ib.dims["probe_stability"]`` is the agreement of the bases
            from the two halves of each batch's probes, accumulated in the same pass
            (:func:`~tl_degeneracy.interaction.basis.probe_agreement`: 1 = the same directions,
            lower = probe noise; it needs n_probes ≥ 2).
        last: LIB's last node, ``"pca"`` or ``"outputs"`` (above).
        edge_sources: None (exact) or r: random ±1 position sources where they are cheaper (above).
        seed: probes and sources are seeded per (seed, pass, sequence number in the data, probe): results do not depend
            on chunking or on the number of processes.
        device: where the float64 accumulators live (default: the model's device).

    Cost (B batches): one Gram pass (a forward per batch); global: one Jacobian pass (a forward and
    n_probes VJPs per batch, or P·V exact ones); LIB: one Jacobian pass per node but the last with
    ``last="pca"`` (node l's forward stops at node l+1, its VJPs go back through one section only,
    n_probes or P·kept_{l+1} per batch), and with edges two more per node below the last, for the
    halves' own bases (the edges' split-half error); PCA: no Jacobian pass; edges: one pass (per batch and pair, min(kept_l JVPs,
    P·kept_{l+1} or r·kept_{l+1} VJPs) through one section each, in chunks). Memory: the D×D
    float64 accumulators and one chunk of tangents or VJPs; no per-direction gradient is stored. On a
    transformer every Jacobian pass first checks that one batch fits the memory budget in force
    (``tld.memory``: ``memory_limit``, else the memory available), and the edges carry as many
    directions per chunk as fit it (``tld.memory.direction_chunk``). Under ``torch.distributed`` each
    process checks its own budget: give every rank the same one (``tld.memory_limit``), as the
    report does, so that no rank stops while the others wait for it.

    Under ``torch.distributed`` every pass shards the batches and reduces its float64 sums.

    Raises:
        MissingHookError: unknown node names, or nodes that never fire. ValueError: nodes out of
            forward order or repeated, bad options; for LIB, nodes that are not cuts of the model's
            graph (a node that the target reads around the next one: :mod:`~.cuts`; the other kinds
            warn that their edges lack those paths). DataError: empty data. NumericalError: NaN/inf
            activations, gradients or results. MemoryBudgetError: a Jacobian pass's batch would not fit
            the memory budget (before that pass; the message says what to lower).
    """
    with failing_together("interaction_basis"):
        refuse_inference_mode("interaction_basis")  # before the activation pass, not after it
        gram_rtol, gram_atol = check_tolerances(gram_rtol, gram_atol)
        interaction_rtol, interaction_atol = check_tolerances(interaction_rtol, interaction_atol)
        seed = as_seed(seed)
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}; got {kind!r}")
        if output not in OBJECTIVES:
            raise ValueError(f"output must be one of {OBJECTIVES}; got {output!r}")
        if scaling not in SCALINGS:
            raise ValueError(f"scaling must be one of {tuple(SCALINGS)}; got {scaling!r}")
        if method not in METHODS_:
            raise ValueError(f"method must be one of {METHODS_}; got {method!r}")
        if last not in LAST:
            raise ValueError(f"last must be one of {LAST}; got {last!r}")
        check_exact(exact, n_probes)
        if edge_sources is not None and (not isinstance(edge_sources, int) or edge_sources < 1):
            raise ValueError(f"edge_sources must be None (exact) or a positive integer; got {edge_sources!r}")
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        runner = build_runner(model, data, nodes, batch_size, seq_len, skip_bos)
        _check_cuts(runner, kind, last, edges)
        acc_device = torch.device(device) if device is not None else runner.device

        collector = moment_pass(runner.engine, runner.batches, runner.nodes, per_head=False, device=acc_device,
                                progress=progress, desc="interaction basis: Grams", half=True)
        whitenings, half_whitenings, counts, distinct, shapes = {}, {}, {}, {}, {}

        def whitening(acc, rtol: float):
            gram = acc.covariance()[0] if centered else acc.gram()[0]
            mean = acc.mean[0] if centered else torch.zeros_like(acc.mean[0])
            # The rule's own cut-off (rtol not given) also leaves out the activations' rounding, which
            # a large mean sets above it (numerics.covariance_floor; audit 21b F1).
            floor = 0.0 if gram_rtol is not None else covariance_floor(
                activation_precision(runner.dtype), gram.diagonal() + mean**2)
            return whiten(gram, mean, rtol, gram_atol, rounding_rtol(runner.dtype, gram=True), floor)

        for name in runner.names:
            acc = collector.accs[name]
            if acc.count == 0:
                raise DataError(f"no samples counted at node {name!r}: the data have no position that counts")
            rtol = rank_rtol(acc.dim, precision=activation_precision(runner.dtype), gram=True) if gram_rtol is None else gram_rtol
            even = collector.half_accs[name]
            whitenings[name] = whitening(acc, rtol)
            half_whitenings[name] = (whitening(even, rtol), whitening(acc.without(even), rtol))
            counts[name], shapes[name] = acc.count, collector.layouts[name].feature_shape
            distinct[name] = runner.batches.distinct(acc.count, collector.units[name])
        timings["gram_s"] = time.perf_counter() - t0

        t1 = time.perf_counter()
        probe_kw = dict(n_probes=n_probes, exact=exact, halves=True, half=True, seed=seed, per_head=False,
                        device=acc_device, progress=progress, method=method)
        # The Gram pass's results stay alive during the Jacobian passes: each node's Gram, whole and of each half.
        held = sum(3 * 8 * math.prod(shape) ** 2 for shape in shapes.values())
        with_edges = bool(edges) and len(runner.nodes) > 1
        # Both halves hold samples at every node, or there is no split-half error to refit for.
        split = all(0 < collector.half_accs[n].count < counts[n] for n in runner.names)
        fits = _jacobian_grams(runner, whitenings, half_whitenings, kind, last, output, interaction_rtol,
                               interaction_atol, probe_kw, held, refit=with_edges and split)
        bases, how, half_bases = fits.bases, fits.how, fits.half_bases
        timings["jacobian_s"] = time.perf_counter() - t1

        t2 = time.perf_counter()
        basis = {n: bases[n].matrix(scaling) for n in runner.names}
        half_counts = {n: collector.half_accs[n].count for n in runner.names}  # the even-numbered sequences' samples
        inverse = {n: bases[n].right_inverse(scaling) for n in runner.names}
        mean = {n: whitenings[n].mean for n in runner.names}
        edge_values, edge_modes, edge_stderr, edge_halves, edge_refit = {}, {}, {}, {}, {}
        if with_edges:
            refit = tuple({n: (fits.refit_bases[n][h].matrix(scaling), fits.refit_bases[n][h].right_inverse(scaling),
                               half_whitenings[n][h].mean) for n in runner.names} for h in (0, 1))
            ep = edge_pass(runner.engine, runner.batches, runner.nodes, basis, inverse, mean, counts, half_counts,
                           edge_sources, seed,
                           method=method, device=acc_device, progress=progress,
                           max_chunk=_edge_chunk(runner, [math.prod(shape) for shape in shapes.values()], held),
                           refit=refit)
            edge_values, edge_modes = ep.edges, {f"{a} -> {b}": m for (a, b), m in ep.modes.items()}
            edge_stderr = {p: (e, ep.total_stderr[p]) for p, e in ep.stderr.items() if e is not None}
            edge_halves = {p: h for p, h in ep.halves.items() if h is not None}
            edge_refit = {p: h for p, h in ep.refit.items() if h is not None}
        timings["edges_s"] = time.perf_counter() - t2

        # A LIB node differentiates the next node's finished basis: where any later node's M came from
        # probes, this node's basis carries their noise too, although its own M is exact (audit 11a F2).
        from_probes, later = {}, False
        for name in reversed(runner.names):
            later = (later and kind == "local") or how[name].method == "probes"
            from_probes[name] = later
        probed = any(h.method == "probes" for h in how.values())
        settings = {
            "gram_rtol": gram_rtol, "gram_atol": gram_atol, "interaction_rtol": interaction_rtol,
            "interaction_atol": interaction_atol, "n_probes": n_probes if probed else None, "exact": exact,
            "exact_factor": EXACT_FACTOR, "last": last if kind == "local" else None,
            "edges": bool(edges), "edge_sources": edge_sources, "edge_modes": edge_modes, "seed": int(seed), "method": method,
            "batch_size": batch_size, "n_batches": len(runner.batches), "world_size": distributed_context().world_size,
            "passes": 1 + fits.passes + int(bool(edge_values)), "dtype": str(runner.dtype).removeprefix("torch."),
            # A half-precision forward's rounding can count as directions: the ranks may be too high
            # (the bands reach up to that rounding's level).
            "half_precision": str(runner.dtype).removeprefix("torch.") if rounding_rtol(runner.dtype) is not None else None,
            **timings,
        }
        result = InteractionBasis(
            nodes=runner.names,
            kind=kind,
            output=None if kind == "pca" or (kind == "local" and last == "pca") else output,  # no output enters those
            scaling=scaling,
            centered=bool(centered),
            last=last if kind == "local" else None,
            basis=basis,
            inverse=inverse,
            mean=mean,
            eigenvalues={n: NodeSpectrum(gram=whitenings[n].eigenvalues, interaction=bases[n].eigenvalues,
                                         rank_G=whitenings[n].rank, interaction_rank=bases[n].size, M=how[n].source,
                                         M_method=how[n].method, probe_stability=how[n].stability,
                                         estimated=from_probes[n],
                                         rank_G_band=whitenings[n].band, interaction_band=bases[n].band,
                                         half_ranks=(half_whitenings[n][0].rank, half_bases[n][0].size),
                                         half_interaction=half_bases[n][0].eigenvalues,
                                         rounding=rank_rtol(whitenings[n].rank, precision=activation_precision(runner.dtype)))
                         for n in runner.names},
            edges=edge_values,
            edge_stderr=edge_stderr,
            edge_halves=edge_halves,
            edge_refit=edge_refit,
            half_counts=half_counts,
            counts=counts,
            distinct=distinct,
            feature_shapes=shapes,
            positions=runner.positions,
            settings=settings,
        )
        limited = [n for n in runner.names if result.eigenvalues[n].data_limited]
        in_band = [n for n in limited if result.eigenvalues[n].limited_within_band]
        warn_data_limited("interaction_basis", len(limited), f"{len(runner.names)} nodes ({', '.join(limited)})",
                          "rank_G or the interaction rank is", runner.batches.n_sequences, "dims' data_limited",
                          "those nodes' degenerate directions are upper bounds; give more data" + (
                              f" (at {', '.join(in_band)} the half-data ranks lie inside the ranks' cut-off bands: "
                              "there the difference may instead be the cut-off's, an eigenvalue of rounding just above "
                              "it, and then the degenerate directions read too few; column limited_within_band)"
                              if in_band else ""))
        dims = result.dims
        unresolved = dims[dims["unresolved"] > 0]
        if len(unresolved):
            warn_once(f"interaction_basis: at {len(unresolved)} of {len(dims)} nodes ({', '.join(unresolved['node'])}) "
                      f"{int(unresolved['unresolved'].sum())} pair(s) of adjacent kept directions have D_M closer than "
                      "twice their sampling spread (from the even-numbered sequences' D_M) or their rounding: the data fix those "
                      "directions only up to a rotation among them, and the edges and modules through them may move "
                      "with it (dims' unresolved; METHODS §5); more data separates them where they differ",
                      DataLimitedWarning, stacklevel=2)
        at_samples = dims[dims["sample_limited"]]
        # The column alone said it (audit 21b F2): every other sample-limited rank is also warned of.
        warn_sample_limited("interaction_basis", len(at_samples), len(dims), "nodes' Grams (rank_G)",
                            int(at_samples["distinct"].min()) if len(at_samples) else 0)
        return result
