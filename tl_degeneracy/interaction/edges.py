"""Interaction edges between adjacent node layers (METHODS §5, the companion paper's "squared" formula).

For nodes l → l+1 with coordinates f̂^l = C^l (f^l − μ^l) and f̂^{l+1}:

    E_ij = (1/n_l) Σ_x Σ_t a_{t,i,j}²,      a_{t,i,j} = Σ_s ∂f̂^{l+1}_{t,i}/∂f̂^l_{s,j} · f̂^l_{s,j},      E ≥ 0,

a tensor [kept_{l+1}, kept_l] (i: direction of node l+1, j: of node l). x runs over sequences, t
over the counted output positions of node l+1 and s over the counted input positions of node l
(padding and, when skipped, BOS count on neither side), and n_l is node l's sample count, the n of
its Gram. Derivatives with respect to f̂^l are taken along the kept subspace: f^l = μ^l + C^{l+} f̂^l
there, so ∂/∂f̂^l_{s,j} is the derivative along column j of C^{l+} at position s (see ``basis``), and
the cross-position terms s ≠ t through attention are included.

Two exact ways to get every a_{t,i,j}, and one estimate:

- forward mode (default): for one direction j, a_{·,·,j} = C^{l+1} · J v^{(j)}, the Jacobian-vector
  product of the section f^l → f^{l+1} with the tangent v^{(j)}_s = f̂^l_{s,j} C^{l+}[:, j] at every
  position s (zero where s does not count). kept_l JVPs per batch give a for every (t, i), with no
  sum over positions to sample. A chunk of directions goes through one ``torch.func.vmap`` of
  ``torch.func.jvp``: the primal section runs once, only the tangents are batched.
- reverse mode, exact: one VJP per cotangent e_{t,i} on f̂^{l+1} (C^{l+1}[i] at position t) gives the
  row a_{t,i,·}: P_out · kept_{l+1} VJPs per batch (P_out counted output positions, 1 for a
  sequence-level node).
- reverse mode, r random ±1 position sources φ (``sources=r``): cotangent Σ_t φ_t e_{t,i}; since
  E[φ_t φ_t'] = δ_tt', E[(Σ_t φ_t a_t)²] = Σ_t a_t², unbiased, with r · kept_{l+1} VJPs per batch.
  Each source gives its own estimate of E; their mean is the result and, for r ≥ 2, their spread
  over √r its standard error (per entry and for ΣE). A sequence draws its signs from a generator
  keyed by its number in the data, so re-batching moves an estimate only by rounding.

``mode="auto"`` takes, per pair, forward mode unless the reverse pass needs fewer products
(kept_l > P_out·kept_{l+1} exact, or kept_l > r·kept_{l+1} with sources, e.g. a wide node feeding a
narrow one): a JVP and a VJP through one section cost about the same. So with ``sources=r`` a pair
whose exact forward mode is no dearer is exact. A model with an operation that has no forward-mode
derivative (or no functorch support, e.g. an old-style ``autograd.Function``) falls back to reverse
mode for that pair, with a warning; an operation without a vmap rule only runs slower (functorch
loops over the chunk).

Measured on toy:bytelm (16×64 tokens, kept 115/127/92, 2 threads of a shared 2-core machine at
load 2–3.5): exact forward-mode edges 12–14 s, the r = 2 source estimate 45 s (18–29% relative
error), exact reverse mode 64·127 VJPs per pair (> 20 min, not finished). Accumulation is float64;
nothing per direction or cotangent is stored.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from ..data import Batch
from ..errors import DataError, MissingHookError, NumericalError
from ..stats.jacobian import CHUNK_ELEMENTS
from ..stats.passes import HookTarget, run_until
from ..stats.samples import SampleIndex
from ..stats.stream import Step, stream
from ..stats.vjp import Backward, differentiable_capture, probe_generator

__all__ = ["EDGE_MODES", "EdgePass", "edge_pass"]

#: Probe-generator stream of the edge sources (the Jacobian probes use the default stream).
EDGE_STREAM = 1
EDGE_MODES = ("auto", "forward", "reverse")

Pair = tuple[str, str]


@dataclass(frozen=True)
class EdgePass:
    """E per adjacent pair (float64 [kept_{l+1}, kept_l]) and how each was computed:
    ``"forward"`` (exact JVPs), ``"reverse"`` (exact VJPs) or ``"reverse, r sources"``; ``stderr``:
    for a source estimate with r ≥ 2, the standard error of each entry (the spread of the r
    one-source estimates over √r), None for exact pairs. ``halves``: E of the data's even- and of its
    odd-numbered sequences alone, in the same bases (each over its own samples; None where a half has
    none): their difference is the edges' sampling error given the bases (audit 23b F1). ``refit``:
    ΣE of the even-numbered sequences in the bases fitted to them alone, and of the odd-numbered ones
    in theirs (``edge_pass``' ``refit``; None where it was not asked for or a half has no samples):
    their difference is the sampling error of ΣE including the bases' own (review 58 #1)."""

    edges: dict[Pair, Float[Tensor, "k1 k0"]]
    modes: dict[Pair, str]
    stderr: dict[Pair, Float[Tensor, "k1 k0"] | None]
    total_stderr: dict[Pair, float | None]  # of ΣE, from the spread of the sources' totals
    halves: dict[Pair, tuple[Float[Tensor, "k1 k0"], Float[Tensor, "k1 k0"]] | None]
    refit: dict[Pair, tuple[float, float] | None]


def _sample_mask(index: SampleIndex, act: Tensor, name: str) -> Bool[Tensor, "batch pos"]:
    return index.mask if index.unit(tuple(act.shape), name) == "position" else index.seq_mask[:, None]


def _capture(engine, tokens, names: list[str], grad: bool) -> dict[str, Tensor]:
    """Node activations of one forward pass stopped after the last of ``names``; with ``grad`` they
    are differentiable (``differentiable_capture``), else plain values."""
    acts: dict[str, Tensor] = {}
    if grad:
        hooks = [(n, differentiable_capture(acts, n)) for n in names]
    else:
        hooks = [(n, lambda act, hook=None, n=n: acts.__setitem__(n, act)) for n in names]
    with torch.enable_grad() if grad else torch.no_grad():
        run_until(engine, tokens, hooks, stop_after=names[-1], when=lambda: len(acts) == len(names))
    return acts


def _choose_modes(engine, batch, pairs: list[Pair], kept: dict[str, int], sources: int | None, mode: str) -> dict[Pair, str]:
    """Per pair the cheaper of kept_l JVPs and the reverse pass's VJPs (module docstring), from the
    shapes of one forward of ``batch`` (the same batch on every process)."""
    if mode != "auto":
        return {p: mode for p in pairs}
    acts = _capture(engine, batch.tokens, [b for _, b in pairs], grad=False)
    index = SampleIndex.from_batch(batch)
    modes = {}
    for a, b in pairs:
        per_direction = sources if sources is not None else int(_sample_mask(index, acts[b], b).any(0).sum())
        modes[a, b] = "forward" if kept[a] <= per_direction * kept[b] else "reverse"
    return modes


def _section(engine, tokens, a: str, b: str):
    """f^b as a function of f^a: node a's activation replaced by the argument, the forward stopped
    right after node b."""

    def f(fa: Tensor) -> Tensor:
        out: dict[str, Tensor] = {}

        def take(act, hook=None):
            out["b"] = act

        run_until(engine, tokens, [(a, lambda act, hook=None: fa), (b, take)], stop_after=b)
        if "b" not in out:
            raise MissingHookError(f"node {b!r} did not fire after node {a!r}")
        return out["b"]

    return f


def _forward_pair(engine, tokens, f_a: Tensor, fhat: Float[Tensor, "batch pos_a k_a"], C_inv: Float[Tensor, "D_a k_a"],
                  C_b: Float[Tensor, "k_b D_b"], mask_b: Bool[Tensor, "batch pos_b"], even: Bool[Tensor, " batch"],
                  a: str, b: str, max_chunk: int | None) -> Float[Tensor, "2 k_b k_a"]:
    """Σ_x Σ_t a_{t,i,j}² of one batch for every (i, j), over all its sequences and over its ``even``
    ones, chunks of j through one vmapped JVP (at most ``max_chunk`` directions each)."""
    k = fhat.shape[-1]
    total = torch.zeros(2, C_b.shape[0], k, dtype=torch.float64, device=fhat.device)
    even = even.to(total.device)
    # The JVP chunks' budget: on toy:bytelm (2 threads) all 128 directions in one call beat chunks of
    # 32 by ~20%, the primal and the prefix then running once; the memory budget may ask for fewer.
    chunk = max(1, min(CHUNK_ELEMENTS // max(f_a.numel(), mask_b.numel() * C_b.shape[1], 1), max_chunk or k))
    section = _section(engine, tokens, a, b)
    primal = f_a.detach()
    m_b = mask_b.to(total.device, torch.float64)[None, :, :, None]

    def jvp(tangent):
        return torch.func.jvp(section, (primal,), (tangent,))[1]

    for start in range(0, k, chunk):
        js = slice(start, min(k, start + chunk))
        # v^{(j)}_s = f̂_{s,j} C⁺[:, j]: the derivative along basis direction j, scaled by its coordinate.
        tangents = fhat[:, :, js].permute(2, 0, 1)[..., None] * C_inv[:, js].mT[:, None, None, :]
        tangents = tangents.to(device=f_a.device, dtype=f_a.dtype).view(tangents.shape[0], *f_a.shape)
        with torch.no_grad():
            out = torch.func.vmap(jvp)(tangents)  # [J, batch, pos_b, *feature_b]
        coeff = out.flatten(3).to(device=total.device, dtype=torch.float64) @ C_b.mT  # a_{t,i,j}: [J, batch, pos_b, k_b]
        per_sequence = (coeff.square() * m_b).sum(2)  # [J, batch, k_b]
        total[0, :, js] += per_sequence.sum(1).mT
        total[1, :, js] += per_sequence[:, even].sum(1).mT
    return total


def _edge_cotangents(
    coords: Float[Tensor, "k D"],
    mask: Bool[Tensor, "batch pos"],
    sources: int | None,
    seed: int,
    sequences: Int[Tensor, " batch"],
    pair: int,
    chunk: int,
):
    """Chunks of (cotangents [J, batch, pos, D] on f^{l+1}, direction index i [J], source index [J]):
    the cotangent of e_{t,i} (or Σ_t φ_t e_{t,i}) on f̂^{l+1} is C^{l+1}[i] at position t (chain rule).
    Exact cotangents all belong to source 0; each of the r sources gives its own estimate.
    Source s of a sequence draws its signs φ from a generator keyed by (seed, the sequence's number
    in the data, s, pair), as the Jacobian probes do: a sequence gets the same signs in whichever
    batch it falls, so re-batching changes the estimate only by rounding (METHODS §5)."""
    b, P = mask.shape
    k, D = coords.shape
    m = mask.to(torch.float64)
    if sources is None:
        counted = mask.any(0).nonzero().flatten()
        patterns = torch.zeros(len(counted), b, P, dtype=torch.float64, device=mask.device)
        patterns[torch.arange(len(counted), device=mask.device), :, counted] = 1.0  # e_t at every sequence
        source = torch.zeros(len(counted), dtype=torch.long, device=mask.device)
    else:
        # As many signs as the sequence has positions up to its last counted one, whatever the batch's
        # width (a generator's first draws do not depend on how many follow them only for one size).
        ends = [int(row.nonzero().max()) + 1 if bool(row.any()) else 0 for row in mask.cpu()]
        patterns = torch.zeros(sources, b, P, dtype=torch.float64, device=mask.device)
        for s in range(sources):
            for row, (x, end) in enumerate(zip(sequences.tolist(), ends)):
                g = probe_generator(seed, x, s, mask.device, stream=(EDGE_STREAM, pair))
                patterns[s, row, :end] = torch.randint(0, 2, (end,), generator=g, device=mask.device).to(torch.float64) * 2 - 1
        source = torch.arange(sources, device=mask.device)
    patterns = patterns * m
    # Jobs (pattern, direction i), pattern-major: a chunk of them is one broadcast product.
    which = torch.arange(len(patterns), device=mask.device).repeat_interleave(k)
    rows = torch.arange(k, device=coords.device).repeat(len(patterns))
    for start in range(0, len(rows), chunk):
        part = slice(start, start + chunk)
        cot = patterns[which[part], :, :, None] * coords[rows[part]][:, None, None, :]  # [J, batch, pos, D]
        yield cot, rows[part], source[which[part]]


def _reverse_pair(backward: Backward, f_a: Tensor, f_b: Tensor, fhat: Float[Tensor, "batch pos_a k_a"],
                  C_inv: Float[Tensor, "D_a k_a"], C_b: Float[Tensor, "k_b D_b"], mask_b: Bool[Tensor, "batch pos_b"],
                  sources: int | None, seed: int, sequences: Tensor, pair: int, total: Tensor,
                  even: Bool[Tensor, " batch"], max_chunk: int | None) -> None:
    """Add Σ_x Σ_t a_{t,i,j}² for every i to ``total`` [2, 1, k_b, k_a] (over all the batch's
    sequences, and over its ``even`` ones), or each ±1 source's estimate of it to its own slice of
    ``total`` [2, r, k_b, k_a]; at most ``max_chunk`` cotangents per VJP call."""
    if not f_b.requires_grad:  # node l+1 does not depend on node l
        return
    chunk = max(1, min(CHUNK_ELEMENTS // max(1, f_b.numel(), f_a.numel()), max_chunk or CHUNK_ELEMENTS))
    for cot, rows, source in _edge_cotangents(C_b.to(f_b.device), mask_b, sources, seed, sequences, pair, chunk):
        (g,) = backward(f_b, [f_a], cot.to(f_b.dtype).view(len(rows), *f_b.shape))
        if g is None:
            return
        h = g.flatten(3).to(device=total.device, dtype=torch.float64) @ C_inv  # ∂f̂^{l+1}_{t,i}/∂f̂^l_{s,j}
        squares = (h * fhat).sum(2).square()  # [J, batch, k_a]: (Σ_s ∂f̂_{t,i}/∂f̂_{s,j} · f̂_{s,j})²
        at = (source.to(total.device), rows.to(total.device))
        total[0].index_put_(at, squares.sum(1), accumulate=True)
        total[1].index_put_(at, squares[:, even.to(squares.device)].sum(1), accumulate=True)


#: A node's coordinates: C [kept, D], C⁺ [D, kept] and μ [D].
Coords = tuple[Float[Tensor, "k D"], Float[Tensor, "D k"], Float[Tensor, " D"]]


def edge_pass(
    engine,
    batches,
    nodes: list[HookTarget],
    basis: dict[str, Float[Tensor, "k D"]],
    inverse: dict[str, Float[Tensor, "D k"]],
    mean: dict[str, Float[Tensor, " D"]],
    counts: dict[str, int],
    half_counts: dict[str, int] | None = None,
    sources: int | None = None,
    seed: int = 0,
    method: str = "auto",
    mode: str = "auto",
    device: torch.device | None = None,
    progress: bool = True,
    max_chunk: int | None = None,
    refit: tuple[dict[str, Coords], dict[str, Coords]] | None = None,
) -> EdgePass:
    """E for every adjacent pair of ``nodes`` in one pass over ``batches`` (module docstring).

    ``basis``, ``inverse``, ``mean``: C, C⁺ and μ per node (as in :class:`InteractionBasis`);
    ``counts``: n_l per node (the Gram pass's sample counts), ``half_counts`` those of the data's
    even-numbered sequences (None: no halves; ``EdgePass.halves``). ``sources``: None (exact) or r ±1
    position sources for reverse-mode pairs; ``method``: how VJPs are batched (``Backward``);
    ``mode``: ``"auto"``, ``"forward"`` or ``"reverse"`` for every pair; ``max_chunk``: at most this
    many directions per JVP or VJP call (the caller's memory budget, ``tld.memory.direction_chunk``;
    None: only the element count bounds a chunk). ``refit``: (C, C⁺, μ) per node fitted to the
    even-numbered sequences alone and to the odd-numbered ones (needs ``half_counts``): each half's
    sequences are differentiated again in their own bases, in the same pass (``EdgePass.refit``; the
    products of one more pass). Per batch, one forward
    captures the nodes, each forward-mode pair runs its JVP chunks (a forward up to node l+1 each)
    and the reverse-mode pairs share one differentiable forward and take VJPs through one section
    each: the ``on_batch`` of :func:`~tl_degeneracy.stats.stream.stream`, which shards the batches
    under ``torch.distributed`` and reduces the float64 sums at the end.
    """
    if mode not in EDGE_MODES:
        raise ValueError(f"mode must be one of {EDGE_MODES}; got {mode!r}")
    if refit is not None and half_counts is None:
        raise ValueError("edge_pass: refit needs half_counts (the even-numbered sequences' samples per node)")
    acc_device = torch.device(device) if device is not None else engine.device
    backward = Backward(method)
    names = [t.name for t in nodes]
    pairs = [p for p in zip(names[:-1], names[1:]) if basis[p[0]].shape[0] and basis[p[1]].shape[0]]

    def coords(per_node: dict[str, Coords]) -> dict[str, Coords]:
        return {n: tuple(t.to(acc_device, torch.float64) for t in per_node[n]) for n in names}

    whole_coords = coords({n: (basis[n], inverse[n], mean[n]) for n in names})
    half_coords = [coords(h) for h in refit or ()]
    empty = [n for n in names[:-1] if counts[n] <= 0]
    if empty:  # E's normalisation n_l: none would make E a sum (audit 23b F6: n times too large)
        raise DataError(f"edge_pass: no samples counted at node(s) {empty}; E_ij is a mean over node l's samples")

    def zeros(cs: dict[str, Coords]) -> dict[Pair, Tensor]:
        # One slice per ±1 source (each its own estimate; their spread gives the standard error), one for
        # exact pairs; exact contributions (forward mode) go to every slice alike. The leading axis: all
        # sequences, and the even-numbered ones alone.
        return {(a, b): torch.zeros(2, sources or 1, cs[b][0].shape[0], cs[a][0].shape[0], dtype=torch.float64,
                                    device=acc_device) for a, b in zip(names[:-1], names[1:])}

    totals = zeros(whole_coords)
    half_totals = [zeros(cs) for cs in half_coords]
    modes = _choose_modes(engine, batches.batch(0, device=engine.device), pairs, {n: basis[n].shape[0] for n in names},
                          sources, mode) if pairs else {}
    proven: set[Pair] = set()  # forward-mode pairs that ran once: an error there is not a missing rule

    def fhat_of(f_a: Tensor, cs: dict[str, Coords], a: str, index: SampleIndex) -> Tensor:
        C, _, mu = cs[a]
        fhat = (f_a.detach().flatten(2).to(acc_device, torch.float64) - mu) @ C.mT
        return fhat * _sample_mask(index, f_a, a).to(acc_device)[:, :, None]

    def forward_pairs(batch: Batch, index: SampleIndex, cs: dict[str, Coords], into: dict[Pair, Tensor]) -> None:
        """Each forward-mode pair's JVP chunks on one batch (a forward up to node l+1 each)."""
        forward = [p for p in pairs if modes[p] == "forward" and cs[p[0]][0].shape[0] and cs[p[1]][0].shape[0]]
        if not forward:
            return
        acts = _capture(engine, batch.tokens, sorted({n for p in forward for n in p}, key=names.index), grad=False)
        for a, b in forward:
            f_a = acts[a]
            try:
                into[a, b] += _forward_pair(engine, batch.tokens, f_a, fhat_of(f_a, cs, a, index), cs[a][1], cs[b][0],
                                            _sample_mask(index, acts[b], b), index.even, a, b, max_chunk)[:, None]
            except RuntimeError as err:  # NotImplementedError included
                if (a, b) in proven or mode == "forward":
                    raise
                warnings.warn(f"interaction edges {a!r} → {b!r}: forward-mode derivatives failed ({err}); using "
                              "reverse mode for this pair", RuntimeWarning, stacklevel=5)
                modes[a, b] = "reverse"  # this batch's reverse pass below picks it up
                continue
            proven.add((a, b))

    def reverse_pairs(batch: Batch, index: SampleIndex, cs: dict[str, Coords], into: dict[Pair, Tensor]) -> None:
        """The reverse-mode pairs on one batch: one differentiable forward, VJPs through one section each."""
        reverse = [p for p in pairs if modes[p] == "reverse" and cs[p[0]][0].shape[0] and cs[p[1]][0].shape[0]]
        if not reverse:
            return
        acts = _capture(engine, batch.tokens, sorted({n for p in reverse for n in p}, key=names.index), grad=True)
        for a, b in reverse:
            f_a, f_b = acts[a], acts[b]
            _reverse_pair(backward, f_a, f_b, fhat_of(f_a, cs, a, index), cs[a][1], cs[b][0],
                          _sample_mask(index, f_b, b), sources, seed, batch.index, names.index(a), into[a, b],
                          index.even, max_chunk)

    def on_batch(step: Step) -> None:
        if not step.count:  # the accumulators exist already: a rank without batches only joins the reduction
            return
        forward_pairs(step.batch, step.index, whole_coords, totals)
        reverse_pairs(step.batch, step.index, whole_coords, totals)
        for keep, cs, into in zip((step.index.even, ~step.index.even), half_coords, half_totals):
            half = step.batch.select(keep)
            if half is not None:
                index = SampleIndex.from_batch(half)
                forward_pairs(half, index, cs, into)
                reverse_pairs(half, index, cs, into)

    # grad: the reverse pairs' VJPs need autograd; the forward pairs run under their own no_grad.
    stream(engine.device, batches, on_batch,
           reduce=lambda: [*totals.values(), *(t for h in half_totals for t in h.values())],
           desc="interaction edges", progress=progress, grad=True, what="edge")
    edges, stderr, total_stderr, halves, refitted = {}, {}, {}, {}, {}
    for a, b in totals:
        whole, even = totals[a, b]
        per_source = whole / counts[a]
        if not bool(torch.isfinite(per_source).all()):
            raise NumericalError(f"non-finite interaction edges between {a!r} and {b!r}")
        edges[a, b] = per_source.mean(0)
        estimated = modes.get((a, b)) == "reverse" and (sources or 1) > 1
        stderr[a, b] = per_source.std(0) / sources ** 0.5 if estimated else None
        total_stderr[a, b] = float(per_source.sum((1, 2)).std() / sources ** 0.5) if estimated else None
        n_even = None if half_counts is None else half_counts[a]
        split = n_even is not None and 0 < n_even < counts[a]
        halves[a, b] = ((even / n_even).mean(0), ((whole - even) / (counts[a] - n_even)).mean(0)) if split else None
        refitted[a, b] = (tuple(float(t[a, b][0].sum((1, 2)).mean()) / n for t, n in
                                zip(half_totals, (n_even, counts[a] - n_even))) if split and half_totals else None)
        if refitted[a, b] is not None and not all(map(math.isfinite, refitted[a, b])):
            raise NumericalError(f"non-finite interaction edges between {a!r} and {b!r} in a half's own bases")
    labels = {p: m if m == "forward" or sources is None else f"reverse, {sources} sources" for p, m in modes.items()}
    return EdgePass(edges=edges, modes=labels, stderr=stderr, total_stderr=total_stderr, halves=halves, refit=refitted)
