"""``InteractionBasis``: the bases, spectra and edges of one interaction-basis run (METHODS §5)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from ..numerics import sample_limited

__all__ = ["InteractionBasis", "NodeSpectrum"]

#: :attr:`NodeSpectrum.unresolved`: neighbours on each side whose relative spreads are pooled, and how
#: many spreads a gap must exceed (on a linear network's exactly tied pair, 40 draws of 64 and of 1,024
#: samples: 97 and 100 % flagged; pairs 4 times apart: 12 and 0 %; 1.56 times apart: 72 and 0 %).
UNRESOLVED_WINDOW = 2
UNRESOLVED_Z = 2.0
#: ``edge_summary``'s split-half columns (:meth:`InteractionBasis._sampling`).
SAMPLING = ("total_even", "total_odd", "stderr_given_bases", "refit_even", "refit_odd", "sampling_stderr")


def json_number(x) -> float | int | bool | str | None:
    """A table cell or summary value as JSON takes it: NaN (a quantity the run has none of, e.g. the
    split-half error of one-sequence data) as None; other values unchanged, numbers as Python's."""
    if isinstance(x, float) and math.isnan(x):
        return None
    return x.item() if hasattr(x, "item") else x


@dataclass(frozen=True)
class NodeSpectrum:
    """Both spectra of one node, float64, descending.

    ``gram``: D_G, all D eigenvalues of the node's Gram (centred or not, as the run). ``interaction``:
    D_M, all eigenvalues of the whitened Jacobian Gram M̃ (one per kept Gram direction, rank_G of
    them). ``rank_G`` / ``interaction_rank``: how many lie above the run's cut-offs; the basis keeps
    the first ``interaction_rank`` directions, and ``kept`` are their D_M (= E[f̂ f̂ᵀ]'s diagonal with
    importance scaling).

    How M was obtained (METHODS §5 step 2): ``M`` says whose Jacobian it is — ``"next node"`` (LIB:
    node l+1's coordinates), ``"outputs"`` (the model's outputs: the global basis, or LIB's last node
    with ``last="outputs"``) or ``"identity"`` (M = I: PCA, or LIB's last node with ``last="pca"``);
    ``M_method`` is ``"exact"``, ``"probes"`` or ``"none"`` (M = I); ``probe_stability`` is
    :func:`~tl_degeneracy.interaction.basis.probe_agreement` of the two half-probe estimates where
    probes were used (NaN otherwise, or with a single probe). ``estimated``: the basis carries probe
    noise — its own M came from probes, or (LIB) a later node's did, whose basis this node's M
    differentiates (audit 11a: such a node read M_method "exact" while its basis moved 5–10 % with
    the probe seed).

    ``rank_G_band`` / ``interaction_band``: (fewest, most) directions kept with the run's cut-off
    moved ``numerics.CUTOFF_BAND``-fold up and down (``numerics.rank_band``; the interaction band
    holds the whitening at rank_G): equal to the rank where the spectrum has a gap around the
    cut-off, spread where the rank is the cut-off's choice (METHODS §5).

    ``half_ranks``: (rank_G, interaction rank) from the data's even-numbered sequences alone; lower
    than on all of the data means the ranks are still growing with the data (``data_limited``).
    ``half_interaction``: their D_M, and ``rounding`` the relative level at which two D_M are equal up
    to rounding (the rank rule's, ``numerics.rank_rtol``), for :attr:`unresolved`.
    """

    gram: Float[Tensor, " D"]
    interaction: Float[Tensor, " rank_G"]
    rank_G: int
    interaction_rank: int
    M: str = "outputs"
    M_method: str = "exact"
    probe_stability: float = float("nan")
    estimated: bool = False
    rank_G_band: tuple[int, int] | None = None
    interaction_band: tuple[int, int] | None = None
    half_ranks: tuple[int, int] | None = None
    half_interaction: Float[Tensor, " rank_G_half"] | None = None
    rounding: float = 0.0

    @property
    def data_limited(self) -> bool:
        """rank_G or the interaction rank was lower on half of the data than on all of it."""
        return self.half_ranks is not None and (self.half_ranks[0] < self.rank_G
                                                or self.half_ranks[1] < self.interaction_rank)

    @property
    def limited_within_band(self) -> bool:
        """Data-limited, but with each half-data rank inside its rank's cut-off band: the difference
        may be the cut-off's (an eigenvalue of rounding just above it on all of the data: review 46
        on a float64 deep linear network, interaction rank 4 for 3, 3 on half the data) as much as
        the data's."""
        bands = (self.rank_G_band, self.interaction_band)
        return self.data_limited and None not in bands and all(
            half >= band[0] for half, band in zip(self.half_ranks, bands))

    @property
    def kept(self) -> Float[Tensor, " kept"]:
        return self.interaction[: self.interaction_rank]

    @property
    def unresolved(self) -> int:
        """Adjacent kept directions (i, i + 1) whose D_M are not told apart by the data: their gap is at
        most ``UNRESOLVED_Z`` times the two values' sampling spreads summed, plus their rounding. A value's
        spread is |D_M − D_M(half)| (the even-numbered sequences' D_M at the same place: for a mean over n
        samples and its first half, Var(half − all) = Var(all)) relative to D_M, pooled as a root mean
        square over its ``UNRESOLVED_WINDOW`` neighbours on each side, times D_M: one draw per value
        caught an exactly tied pair in only half of 40 data draws (review 58 #3). Eigenvectors rotate by
        about spread/gap, so below twice the spread they are not fixed. Inside such a group eigh returns
        any rotation of the directions, and the edges through them rotate with it (audit 23b F2: an
        orthogonal linear network with its input rotated, 5 modules against 3)."""
        k = self.interaction_rank
        if k < 2 or self.half_interaction is None:
            return 0
        kept = self.kept
        half = torch.zeros_like(kept)
        m = min(k, self.half_interaction.numel())
        half[:m] = self.half_interaction[:m].to(kept)
        relative = ((half - kept) / kept).square()
        w = UNRESOLVED_WINDOW
        pooled = torch.stack([relative[max(0, i - w): i + w + 1].mean() for i in range(k)]).sqrt()
        spread = UNRESOLVED_Z * pooled * kept + self.rounding * float(kept[0])
        gaps = kept[:-1] - kept[1:]
        return int((gaps <= spread[:-1] + spread[1:]).sum())


@dataclass(eq=False)
class InteractionBasis:
    """The interaction basis of every node layer, and the edges between adjacent ones (METHODS §5).

    - ``nodes``: hook names in forward order; ``kind`` (``"global"``/``"local"``/``"pca"``),
      ``output`` (``"kl"``/``"mse"``; None where no output enters the basis: PCA, and LIB with
      ``last="pca"``), ``scaling`` (``"importance"``/``"paper"``), ``centered``;
      ``last``: LIB's last node, ``"pca"`` (M = I) or ``"outputs"`` (the model's outputs), None for
      the other kinds.
    - ``basis[node]``: C, float64 [kept, D], f̂ = C (f − μ); rows ordered by decreasing D_M.
    - ``inverse[node]``: C⁺, float64 [D, kept], a right inverse (C C⁺ = I) onto the kept subspace.
    - ``mean[node]``: μ [D] (zeros when uncentred).
    - ``eigenvalues[node]``: a :class:`NodeSpectrum` with ``.gram`` (D_G) and ``.interaction`` (D_M).
    - ``edges[(node_l, node_l1)]``: E, float64 [kept_{l+1}, kept_l] ≥ 0 (i: direction of node l+1,
      j: of node l); empty when the run had ``edges=False``.
    - ``edge_stderr[(node_l, node_l1)]``: (standard error of each entry of E, of ΣE) for the pairs
      estimated with r ≥ 2 ±1 sources (``edge_sources``); exact pairs and one-source estimates have none
      (:meth:`edge_summary` tells them apart).
    - ``edge_halves[(node_l, node_l1)]``: E of the data's even- and of its odd-numbered sequences alone,
      in the same bases (absent where a half has no samples): how much E moves with the data
      (:meth:`edge_summary`'s ``stderr_given_bases``, :func:`~.modules.find_modules`' half-data modules);
      ``half_counts[node]``: the even-numbered sequences' samples.
    - ``edge_refit[(node_l, node_l1)]``: ΣE of the even-numbered sequences in the bases fitted to them
      alone (``interaction_basis`` run on them) and of the odd-numbered ones in theirs: how much ΣE
      moves with the data, the bases' own sampling included (:meth:`edge_summary`'s ``sampling_stderr``).
    - ``counts[node]``: samples n per node (the normalisation of its Gram, M and outgoing edges), and
      ``distinct[node]`` those that can differ (``TokenBatches.distinct``: a counted BOS is one sample);
      ``feature_shapes[node]``: the activation's shape per sample; ``positions``: which positions
      counted; ``settings``: cut-offs, probes, sources, seed, passes over the data, timings.
    """

    nodes: list[str]
    kind: str
    output: str | None
    scaling: str
    centered: bool
    basis: dict[str, Tensor]
    inverse: dict[str, Tensor]
    mean: dict[str, Tensor]
    eigenvalues: dict[str, NodeSpectrum]
    edges: dict[tuple[str, str], Tensor]
    edge_stderr: dict[tuple[str, str], tuple[Tensor, float]]
    counts: dict[str, int]
    distinct: dict[str, int]
    feature_shapes: dict[str, tuple[int, ...]]
    positions: dict | None = None
    settings: dict = field(default_factory=dict)
    last: str | None = None
    edge_halves: dict[tuple[str, str], tuple[Tensor, Tensor]] = field(default_factory=dict)
    half_counts: dict[str, int] = field(default_factory=dict)
    edge_refit: dict[tuple[str, str], tuple[float, float]] = field(default_factory=dict)

    # ------------------------------------------------------------------ coordinates
    def _flat(self, x: Tensor, node: str, what: str) -> Tensor:
        if node not in self.basis:
            raise KeyError(f"{node!r} is not a node of this interaction basis; nodes: {self.nodes}")
        shape = self.feature_shapes[node]
        if len(shape) > 1 and tuple(x.shape[-len(shape):]) == tuple(shape):
            x = x.flatten(-len(shape))
        D = self.basis[node].shape[1]
        if x.shape[-1] != D:
            raise ValueError(f"{what} for node {node!r} must end in {D} features (or the shape {shape}); got {tuple(x.shape)}")
        return x.to(torch.float64)

    def transform(self, acts: Float[Tensor, "... D"], node: str) -> Float[Tensor, "... kept"]:
        """f̂ = C (f − μ) for activations [..., D] (or [..., *feature_shape]) of ``node``, float64."""
        x = self._flat(acts, node, "activations")
        return (x - self.mean[node].to(x.device)) @ self.basis[node].to(x.device).mT

    def inverse_transform(self, fhat: Float[Tensor, "... kept"], node: str) -> Float[Tensor, "... D"]:
        """μ + C⁺ f̂: activations on the kept subspace with coordinates f̂ (transform ∘ this = id)."""
        if node not in self.basis:
            raise KeyError(f"{node!r} is not a node of this interaction basis; nodes: {self.nodes}")
        k = self.basis[node].shape[0]
        if fhat.shape[-1] != k:
            raise ValueError(f"coordinates for node {node!r} must end in its {k} kept directions; got {tuple(fhat.shape)}")
        x = fhat.to(torch.float64)
        return x @ self.inverse[node].to(x.device).mT + self.mean[node].to(x.device)

    # ------------------------------------------------------------------ summaries
    @property
    def dims(self) -> pd.DataFrame:
        """One row per node: D, rank_G (Gram directions kept), interaction_rank (basis size),
        degenerate = D − interaction_rank (where M is "identity" only the directions without
        variance: a PCA node does not ask what reads it), n (samples), and how M was obtained: M (whose Jacobian:
        "next node", "outputs" or "identity"), M_method ("exact", "probes" or "none"),
        probe_stability (the half-probe agreement, NaN unless probes) and estimated (the basis
        carries probe noise, its own or a later LIB node's; see :class:`NodeSpectrum`);
        sample_limited: rank_G reached distinct − 1 (distinct when uncentred) < D, the most that
        those samples can span, so the node's degenerate directions may be the data's, not the model's (read more);
        rank_G_half / interaction_rank_half: the ranks from the data's even-numbered sequences
        alone, and data_limited: one of them is lower than on all of the data, so the ranks are still
        growing with the data and the node's degenerate count is an upper bound (METHODS §5), and
        limited_within_band: data_limited with each half-data rank inside its cut-off band, where the
        difference may be the cut-off's instead (:attr:`NodeSpectrum.limited_within_band`); unresolved:
        adjacent kept directions whose D_M the data do not tell apart, so that the directions, and the
        edges through them, are fixed only up to a rotation (:attr:`NodeSpectrum.unresolved`);
        rank_G_min / rank_G_max and interaction_rank_min / interaction_rank_max: the ranks with the
        cut-off moved ``numerics.CUTOFF_BAND``-fold up / down (:class:`NodeSpectrum`'s bands)."""
        rows = []
        for node in self.nodes:
            spec = self.eigenvalues[node]
            D, n, distinct = int(spec.gram.numel()), int(self.counts[node]), int(self.distinct[node])
            g_band = spec.rank_G_band or (spec.rank_G, spec.rank_G)
            i_band = spec.interaction_band or (spec.interaction_rank, spec.interaction_rank)
            rows.append({"node": node, "D": D, "rank_G": spec.rank_G, "interaction_rank": spec.interaction_rank,
                         "degenerate": D - spec.interaction_rank, "n": n, "distinct": distinct, "M": spec.M,
                         "M_method": spec.M_method, "probe_stability": spec.probe_stability,
                         "estimated": spec.estimated,
                         "sample_limited": sample_limited(spec.rank_G, distinct, D, self.centered),
                         "rank_G_half": spec.half_ranks[0] if spec.half_ranks else pd.NA,
                         "interaction_rank_half": spec.half_ranks[1] if spec.half_ranks else pd.NA,
                         "data_limited": spec.data_limited, "limited_within_band": spec.limited_within_band,
                         "unresolved": spec.unresolved,
                         "rank_G_min": g_band[0], "rank_G_max": g_band[1],
                         "interaction_rank_min": i_band[0], "interaction_rank_max": i_band[1]})
        frame = pd.DataFrame(rows, columns=["node", "D", "rank_G", "interaction_rank", "degenerate", "n", "distinct", "M",
                                            "M_method", "probe_stability", "estimated", "sample_limited", "rank_G_half",
                                            "interaction_rank_half", "data_limited", "limited_within_band", "unresolved", "rank_G_min", "rank_G_max",
                                            "interaction_rank_min", "interaction_rank_max"])
        return frame.astype({"rank_G_half": "Int64", "interaction_rank_half": "Int64"})

    def to_frame(self) -> pd.DataFrame:
        """The same table as :attr:`dims`."""
        return self.dims

    def edge_summary(self) -> pd.DataFrame:
        """One row per adjacent pair: shape, total ΣE, ``estimated`` (from ±1 sources rather than
        exactly, METHODS (5.5)), ``basis_estimated`` (either node's basis carries probe noise,
        :class:`NodeSpectrum`'s ``estimated``: ΣE moves with the probes, audit 11a: 7.9–11.8 over
        six probe seeds for an exact 8.9), the standard error of ΣE (``total_stderr``: the sources'
        spread over √r; NaN for a one-source estimate, which has no spread, and for edges in a probe
        basis, whose noise the sources do not see; 0 only for exact edges in exact bases), largest E
        and the share of ΣE on the diagonal.

        That error is the computation's. The data's (audit 23b F1: ΣE 11.53 and 10.64 on two halves of
        toy:modadd's pairs, with total_stderr 0): ``total_even`` / ``total_odd``, ΣE of the data's even-
        and odd-numbered sequences in the whole data's bases, and ``stderr_given_bases`` = |ΣE_even −
        ΣE_odd|·√(n_even·n_odd)/n, the standard error of ΣE their difference implies with the bases held
        fixed; ``refit_even`` / ``refit_odd``, ΣE of each half in the bases fitted to that half alone, and
        ``sampling_stderr``, the same formula on them: the bases' own sampling error included, which on
        toy:modadd is most of it (review 58 #1: ΣE over 8 disjoint subsets spread 8–10 times more than the
        fixed-basis error). Within LIB a half's basis at node l differentiates that half's own basis of
        node l+1 (two Jacobian passes more per node), so the whole recursion is refitted (with exact
        Jacobians; probes are keyed by a sequence's number in the data, so with probes the refit equals
        a half-alone run in distribution only). One degree of freedom each:
        a rough scale, not a tight interval; NaN where a half is empty or the run had no halves."""
        modes = self.settings.get("edge_modes", {})
        rows = []
        for (a, b), e in self.edges.items():
            total = float(e.sum())
            k = min(e.shape)
            estimated = "sources" in modes.get(f"{a} -> {b}", "")  # edges.py labels them "reverse, r sources"
            probed = self.eigenvalues[a].estimated or self.eigenvalues[b].estimated
            stderr = (float("nan") if probed else self.edge_stderr[a, b][1] if (a, b) in self.edge_stderr
                      else float("nan") if estimated else 0.0)
            rows.append({"source": a, "target": b, "kept_source": e.shape[1], "kept_target": e.shape[0], "total": total,
                         "estimated": estimated, "basis_estimated": probed, "total_stderr": stderr,
                         "max": float(e.max()) if e.numel() else 0.0,
                         "diagonal_share": float(e[:k, :k].diagonal().sum()) / total if total > 0 else float("nan"),
                         **self._sampling(a, b)})
        return pd.DataFrame(rows, columns=["source", "target", "kept_source", "kept_target", "total", "estimated",
                                           "basis_estimated", "total_stderr", "max", "diagonal_share", *SAMPLING])

    def _sampling(self, a: str, b: str) -> dict[str, float]:
        """ΣE of each half of the data, in the whole data's bases and in each half's own, and the
        standard errors of ΣE their differences imply (:meth:`edge_summary`): for a mean over
        n = n_e + n_o samples, Var(E_e − E_o) = σ²(1/n_e + 1/n_o) and Var(E) = σ²/n."""
        row = dict.fromkeys(SAMPLING, float("nan"))
        n, n_even = self.counts[a], self.half_counts.get(a, 0)
        scale = math.sqrt(n_even * (n - n_even)) / n
        halves = self.edge_halves.get((a, b))
        if halves is not None:
            even, odd = (float(h.sum()) for h in halves)
            row.update(total_even=even, total_odd=odd, stderr_given_bases=abs(even - odd) * scale)
        refit = self.edge_refit.get((a, b))
        if refit is not None:
            row.update(refit_even=refit[0], refit_odd=refit[1], sampling_stderr=abs(refit[0] - refit[1]) * scale)
        return row

    def to_dict(self) -> dict:
        """Everything but the basis matrices as JSON-serialisable numbers (spectra and edges as lists).
        Each edge carries :meth:`edge_summary`'s verdicts (``estimated``, ``basis_estimated``) and its
        ``total_stderr``; per-entry ``stderr`` only where the sources' spread is the whole error
        (not in a probe-estimated basis, audit 15a: ΣE 29.6 ± 2.0 in the JSON where the summary
        said the error is unknown)."""
        summary = self.edge_summary().set_index(["source", "target"])
        edges = []
        for (a, b), e in self.edges.items():
            row = summary.loc[(a, b)]
            edge = {"source": a, "target": b, "values": e.tolist(), "estimated": bool(row["estimated"]),
                    "basis_estimated": bool(row["basis_estimated"]), "total_stderr": json_number(float(row["total_stderr"])),
                    **{k: json_number(float(row[k])) for k in SAMPLING}}
            if (a, b) in self.edge_stderr and not row["basis_estimated"]:
                edge["stderr"] = self.edge_stderr[a, b][0].tolist()
            edges.append(edge)
        return {
            "kind": self.kind,
            "output": self.output,
            "scaling": self.scaling,
            "centered": self.centered,
            "last": self.last,
            "nodes": list(self.nodes),
            "dims": [{k: json_number(v) for k, v in row.items()} for row in self.dims.to_dict(orient="records")],
            "eigenvalues": {n: {"gram": s.gram.tolist(), "interaction": s.interaction.tolist()} for n, s in self.eigenvalues.items()},
            "edges": edges,
            "counts": dict(self.counts),
            "distinct": dict(self.distinct),
            "positions": self.positions,
            "settings": dict(self.settings),
        }

    def plot_spectra(self, log: bool = True):
        """D_G and D_M of every node (plotly figure); see :func:`.plots.plot_interaction_spectra`."""
        from .plots import plot_interaction_spectra

        return plot_interaction_spectra(self, log=log)

    def plot_edges(self, log: bool = True):
        """One heatmap of E per adjacent pair (plotly figure); see :func:`.plots.plot_edges`."""
        from .plots import plot_edges

        return plot_edges(self, log=log)

    def __repr__(self) -> str:
        sizes = ", ".join(f"{n}: {self.eigenvalues[n].interaction_rank}/{self.eigenvalues[n].gram.numel()}" for n in self.nodes)
        last = f", last={self.last!r}" if self.last is not None else ""
        dims = self.dims
        # the verdicts of the ranks shown (audit 13b: the repr a notebook shows gave them as exact and final)
        verdicts = [f"{int((dims[c] > 0).sum())} of {len(dims)} nodes {what}" for c, what in  # unresolved counts pairs
                    (("estimated", "estimated from probes"), ("data_limited", "still growing with the data"),
                     ("unresolved", "with directions the data do not tell apart")) if dims[c].any()]
        verdict = f"; {', '.join(verdicts)}" if verdicts else ""
        return (f"InteractionBasis(kind={self.kind!r}{last}, output={self.output!r}, scaling={self.scaling!r}, "
                f"kept/D = {{{sizes}}}{verdict})")
