"""Modules of interaction-basis directions (METHODS §6, paper §5.2.3).

Interaction strengths between adjacent node layers (METHODS §5, the companion paper's squared edge
formula E_ij ≥ 0) add logarithmically along paths, so the graph has one vertex per (node layer,
direction) and an undirected edge between adjacent layers with weight

    w_ij = max(0, log(E_ij / c))                                               (METHODS §6)

where c is the edge cut-off: edges at or below c do not count. A module is a group of directions
with much weight inside and little across its boundary; we find them by modularity maximisation
with networkx's community detection (resolution γ, seed), as ApolloResearch/rib does with Leiden
on its ``ByLayerLogEdgeNorm`` weights (research/interaction_basis.md §6). The log base is
immaterial: modularity is invariant under a common scale of all weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import networkx as nx
import numpy as np
import pandas as pd
from jaxtyping import Float

from ..data import as_seed
from ..distributed import warn_once
from ..errors import DataError, NumericalError
from ..numerics import DataLimitedWarning
from .basis_result import json_number

__all__ = ["DEFAULT_KEEP_SHARE", "Modules", "find_modules", "log_edge_weights", "mass_cutoff"]

#: Default share of each layer pair's edge mass ΣE_ij that the kept edges (E > c) must hold.
DEFAULT_KEEP_SHARE = 0.99

Pair = tuple[str, str]
Member = tuple[str, int]


def mass_cutoff(edges: Float[np.ndarray, "..."], keep_share: float = DEFAULT_KEEP_SHARE) -> float | None:
    """Data-driven edge cut-off c: the edges above c hold at least ``keep_share`` of the edge mass.

    E_ij is a mean squared contribution of direction j to direction i (METHODS §5), so the edge
    mass ΣE_ij is the natural budget, and dropping the weakest edges while keeping a fixed share
    of it plays the role of rib's bisect edge ablation (which keeps edges until the loss is within
    a tolerance). With budget b = (1 − keep_share)·ΣE and N nonzero edges, c is the largest edge
    value u with Σ_{E ≤ u} E ≤ b, but at least b/N: edges at or below b/N cannot exceed the budget
    even all together, and without this floor c would be zero (or set by one arbitrary tiny edge)
    whenever the weakest edges alone exceed the budget. Either way everything dropped (E ≤ c)
    holds at most b. Returns None when all edges are zero (there is nothing to cut).
    """
    if not 0.0 < keep_share < 1.0:
        raise ValueError(f"keep_share must lie in (0, 1); got {keep_share}")
    values = np.asarray(edges, dtype=np.float64).ravel()
    total = float(values.sum())
    if total <= 0.0:
        return None
    budget = (1.0 - keep_share) * total
    floor = budget / np.count_nonzero(values)
    distinct, counts = np.unique(values, return_counts=True)
    # Ties are dropped or kept together: the mass at or below a value includes all its copies.
    below = np.cumsum(distinct * counts)
    slack = np.finfo(np.float64).eps * len(values) * total  # rounding of the cumulative sum
    fits = np.nonzero(below <= budget + slack)[0]
    return float(max(distinct[fits[-1]], floor)) if len(fits) else float(floor)


def log_edge_weights(edges: Float[np.ndarray, "out inp"], cutoff: float) -> Float[np.ndarray, "out inp"]:
    """Graph weights w_ij = max(0, log(E_ij / c)) of METHODS §6 (natural log; zero at or below c)."""
    edges = np.asarray(edges, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return np.maximum(0.0, np.log(edges / cutoff))


@dataclass(eq=False)
class Modules:
    """Modules of interaction-basis directions (METHODS §6).

    ``members``: per module (ordered by decreasing inside weight), its (node layer, direction)
    pairs; every module is connected in the graph, so it covers every node layer from its first to
    its last. ``isolated``: directions with no edge above the cut-off — they interact with nothing
    at this cut-off and are reported apart instead of as one-member modules. ``inside_share``: the
    share of the total log-normalised weight on edges inside modules; ``edges_inside_share``: the
    share of kept edges (E > c) inside modules (rib's ``num_edges_kept``); ``modularity``: Q at the
    resolution used. Both shares and Q are NaN when no edge survives the cut-off. ``cutoff``: c per
    adjacent layer pair (None for a pair whose edges are all zero). ``keep_share`` is None when the
    cut-off was given, and so is ``per_layer_cutoff``. ``restarts``: runs of the community
    detection (seeds ``seed``, ``seed`` + 1, …), of which the partition of highest modularity is
    kept; ``restart_modules`` / ``restart_modularity``: (fewest, most) modules and (lowest, highest)
    Q over them (None without edges). ``mass_inside_share``: the share of the edge mass ΣE_ij (cut
    edges included) between directions of one module — ``inside_share`` is that of the log weights
    w, which the cut-off shapes (audit 23b F3: 75 % of w, 97 % of ΣE).

    How much the partition rests on the data sample (audit 23b F1): ``half_modules``, the modules
    found by the same procedure from the edges of the data's even- and of its odd-numbered sequences
    alone (``ib.edge_halves``, in the whole data's bases), and ``half_agreement``, the adjusted Rand
    index of each with ``members`` (isolated directions as modules of their own; 1 = the same
    partition). None where ``ib`` has no half-data edges. The bases are the whole data's, so the
    halves see the edges' sampling error, not the bases' (``ib.dims``' unresolved).
    """

    nodes: list[str]
    members: list[list[Member]]
    isolated: list[Member]
    modularity: float
    inside_share: float
    edges_inside_share: float
    cutoff: dict[Pair, float | None]
    resolution: float
    seed: int | None
    method: str
    keep_share: float | None
    per_layer_cutoff: bool | None
    graph: nx.Graph = field(repr=False)
    restarts: int = 1
    restart_modules: tuple[int, int] | None = None  # fewest and most modules over the restarts
    restart_modularity: tuple[float, float] | None = None  # lowest and highest Q over the restarts
    mass_inside_share: float = math.nan
    half_modules: tuple[int, int] | None = None  # modules of the even- and odd-numbered sequences' edges
    half_agreement: tuple[float, float] | None = None  # their adjusted Rand index with ``members``

    @property
    def n_modules(self) -> int:
        return len(self.members)

    def __repr__(self) -> str:
        spread = ("" if self.restart_modules is None or self.restart_modules[0] == self.restart_modules[1] else
                  f" ({self.restart_modules[0]}–{self.restart_modules[1]} over {self.restarts} restarts)")
        halves = ("" if self.half_modules is None else
                  f"; {self.half_modules[0]} and {self.half_modules[1]} on the data's halves")
        return (f"Modules({self.n_modules} modules{spread} over {len(self.nodes)} nodes, {len(self.isolated)} isolated "
                f"directions; Q {self.modularity:.3g}, inside share {self.inside_share:.3g} of the log weight, "
                f"{self.mass_inside_share:.3g} of ΣE{halves}; {self.method}, resolution {self.resolution:g})")

    def _layer(self, node: str) -> int:
        return self.nodes.index(node)

    def to_frame(self) -> pd.DataFrame:
        """One row per module: size, first/last node layer, span (number of node layers covered),
        weight_inside (Σw on edges inside), weight_boundary (Σw on edges leaving it), share_of_weight
        (weight_inside over the total weight of the graph)."""
        total = self.graph.size(weight="weight")
        rows = []
        for k, members in enumerate(self.members):
            layers = sorted(self._layer(node) for node, _ in members)
            inside = _inside_weight(self.graph, members)
            boundary = nx.cut_size(self.graph, members, weight="weight")
            rows.append({
                "module": k,
                "size": len(members),
                "first_layer": self.nodes[layers[0]],
                "last_layer": self.nodes[layers[-1]],
                "span": layers[-1] - layers[0] + 1,
                "weight_inside": inside,
                "weight_boundary": boundary,
                "share_of_weight": inside / total if total > 0 else math.nan,
            })
        columns = ["module", "size", "first_layer", "last_layer", "span", "weight_inside", "weight_boundary",
                   "share_of_weight"]
        return pd.DataFrame(rows, columns=columns)

    def members_frame(self) -> pd.DataFrame:
        """One row per direction of every node layer: node, layer (its index), direction, module
        (nullable integer; <NA> for isolated directions, so ``groupby("module")`` skips them)."""
        module_of = {m: k for k, members in enumerate(self.members) for m in members}
        rows = [{"node": node, "layer": self._layer(node), "direction": d, "module": module_of.get((node, d))}
                for node, d in self.graph.nodes]
        frame = pd.DataFrame(rows, columns=["node", "layer", "direction", "module"])
        frame["module"] = frame["module"].astype("Int64")
        return frame

    def to_dict(self) -> dict:
        """JSON-serialisable summary: settings, scores (NaN as None), modules with members, isolated."""
        modules = self.to_frame().to_dict(orient="records")
        for row, members in zip(modules, self.members):
            row["share_of_weight"] = json_number(row["share_of_weight"])
            row["members"] = [[node, int(d)] for node, d in members]
        return {
            "kind": "interaction_modules",
            "nodes": list(self.nodes),
            "modularity": json_number(self.modularity),
            "inside_share": json_number(self.inside_share),
            "edges_inside_share": json_number(self.edges_inside_share),
            "mass_inside_share": json_number(self.mass_inside_share),
            "half_modules": None if self.half_modules is None else list(self.half_modules),
            "half_agreement": None if self.half_agreement is None else [json_number(a) for a in self.half_agreement],
            "settings": {
                "cutoff": [{"source": a, "target": b, "cutoff": c} for (a, b), c in self.cutoff.items()],
                "resolution": self.resolution,
                "seed": self.seed,
                "method": self.method,
                "keep_share": self.keep_share,
                "per_layer_cutoff": self.per_layer_cutoff,
                "restarts": self.restarts,
                "restart_modules": None if self.restart_modules is None else list(self.restart_modules),
                "restart_modularity": None if self.restart_modularity is None else
                [json_number(q) for q in self.restart_modularity],
            },
            "modules": modules,
            "isolated": [[node, int(d)] for node, d in self.isolated],
        }

    def plot(self, max_edges: int = 2000):
        """Layered ("piano") plot: x = node layer, y = direction index (0, the strongest, on top),
        colour = module; isolated directions in grey; the ``max_edges`` heaviest kept edges drawn
        faintly behind (drawing every edge of a large basis would swamp the figure).

        Traces: one for the edges (when any are kept), one per module, one for isolated directions
        (when there are any)."""
        import plotly.graph_objects as go

        fig = go.Figure()
        edges = sorted(self.graph.edges(data="weight"), key=lambda e: -e[2])[:max_edges]
        if edges:
            xs: list[float | None] = []
            ys: list[float | None] = []
            for (node_a, d_a), (node_b, d_b), _ in edges:
                xs += [self._layer(node_a), self._layer(node_b), None]
                ys += [d_a, d_b, None]
            fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", name="edges", hoverinfo="skip",
                                     line={"color": "rgba(120,120,120,0.25)", "width": 1}))
        groups = [(f"module {k}", members, None) for k, members in enumerate(self.members)]
        if self.isolated:
            groups.append(("isolated", self.isolated, "lightgrey"))
        for name, members, color in groups:
            fig.add_trace(go.Scatter(
                x=[self._layer(node) for node, _ in members], y=[d for _, d in members], mode="markers",
                name=name, marker={"size": 8, "color": color},
                text=[f"{node} dir {d}" for node, d in members], hovertemplate=f"%{{text}}<extra>{name}</extra>",
            ))
        fig.update_layout(
            title=f"interaction modules ({self.method}, resolution {self.resolution}): "
                  f"{self.n_modules} modules, Q = {self.modularity:.3f}",
            xaxis={"title": "node layer", "tickmode": "array", "tickvals": list(range(len(self.nodes))),
                   "ticktext": self.nodes},
            yaxis={"title": "direction", "autorange": "reversed"},
        )
        return fig


def _edge_arrays(ib) -> tuple[list[str], dict[Pair, Float[np.ndarray, "out inp"]]]:
    """The validated float64 edge matrices of ``ib``, one per adjacent node-layer pair."""
    if not hasattr(ib, "nodes") or not hasattr(ib, "edges"):
        raise TypeError(f"find_modules needs an interaction-basis result with .nodes and .edges; got {type(ib).__name__}")
    nodes = [str(node) for node in ib.nodes]
    if len(nodes) < 2 or len(set(nodes)) != len(nodes):
        raise DataError(f"ib.nodes must list at least two distinct node layers; got {nodes}")
    pairs = list(zip(nodes[:-1], nodes[1:]))
    keys = set(ib.edges)
    if not keys:
        # What interaction_basis(..., edges=False) returns: the bases without the edges modules are made of.
        raise DataError("ib has no edges (an interaction basis computed with edges=False), and modules are "
                        "communities of its edge graph: rerun interaction_basis with edges=True")
    unknown = [key for key in keys if key not in set(pairs)]
    if unknown:
        raise DataError(f"ib.edges has keys that are not adjacent node-layer pairs (nodes[l], nodes[l+1]): "
                        f"{unknown}; expected {pairs}")
    missing = [pair for pair in pairs if pair not in keys]
    if missing:
        raise DataError(f"ib.edges lacks the adjacent pair(s) {missing}")
    arrays = {}
    for pair in pairs:
        value = ib.edges[pair]
        if hasattr(value, "detach"):
            value = value.detach().cpu().double().numpy()
        array = np.asarray(value, dtype=np.float64)
        if array.ndim != 2:
            raise DataError(f"ib.edges[{pair}] must be a matrix [kept_(l+1), kept_l]; got shape {array.shape}")
        if not np.isfinite(array).all():
            raise NumericalError(f"ib.edges[{pair}] has non-finite values (NaN or inf)")
        if (array < 0).any():
            raise DataError(f"ib.edges[{pair}] has negative values (min {array.min():.3g}); interaction "
                            "strengths E_ij are mean squares and must be ≥ 0")
        arrays[pair] = array
    for before, after in zip(pairs[:-1], pairs[1:]):
        if arrays[before].shape[0] != arrays[after].shape[1]:
            raise DataError(f"node layer {before[1]!r} has {arrays[before].shape[0]} directions in ib.edges[{before}] "
                            f"(rows) but {arrays[after].shape[1]} in ib.edges[{after}] (columns)")
    return nodes, arrays


def _check_cutoff(value, where: str) -> float:
    try:
        c = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where} must be a positive number; got {value!r}") from None
    if not c > 0.0 or math.isinf(c):
        raise ValueError(f"{where} must be a positive finite number (w = log(E/c)); got {value!r}")
    return c


def _cutoffs(arrays: dict[Pair, np.ndarray], cutoff, keep_share: float, per_layer_cutoff: bool) -> dict[Pair, float | None]:
    """c per adjacent layer pair: given (one number or one per pair) or from :func:`mass_cutoff`."""
    if cutoff is None:
        if per_layer_cutoff:
            return {pair: mass_cutoff(array, keep_share) for pair, array in arrays.items()}
        pooled = mass_cutoff(np.concatenate([array.ravel() for array in arrays.values()]), keep_share)
        return {pair: pooled for pair in arrays}
    if isinstance(cutoff, dict):
        extra = [key for key in cutoff if key not in arrays]
        missing = [pair for pair in arrays if pair not in cutoff]
        if extra or missing:
            raise DataError(f"a cutoff dict needs exactly the adjacent pairs {list(arrays)}; "
                            f"unknown {extra}, missing {missing}")
        return {pair: _check_cutoff(cutoff[pair], f"cutoff[{pair}]") for pair in arrays}
    c = _check_cutoff(cutoff, "cutoff")
    return {pair: c for pair in arrays}


def _graph(nodes: list[str], arrays: dict[Pair, np.ndarray], cutoffs: dict[Pair, float | None]) -> nx.Graph:
    """One vertex per (node layer, direction), in forward order; weighted edges with E > c."""
    graph = nx.Graph()
    sizes = [arrays[(nodes[0], nodes[1])].shape[1]] + [array.shape[0] for array in arrays.values()]
    graph.add_nodes_from((node, d) for node, size in zip(nodes, sizes) for d in range(size))
    for (source, target), array in arrays.items():
        c = cutoffs[(source, target)]
        if c is None:
            continue
        weights = log_edge_weights(array, c)
        rows, cols = np.nonzero(weights > 0.0)
        graph.add_weighted_edges_from(((source, int(j)), (target, int(i)), float(weights[i, j])) for i, j in zip(rows, cols))
    return graph


def _communities(graph: nx.Graph, method: str, resolution: float, seed: int | None) -> list[set]:
    if method == "louvain":
        return nx.community.louvain_communities(graph, weight="weight", resolution=resolution, seed=seed)
    try:
        return nx.community.leiden_communities(graph, weight="weight", resolution=resolution, seed=seed)
    except NotImplementedError as e:
        raise ValueError(f"method='leiden' needs a networkx backend that implements it (e.g. nx-cugraph); "
                         f"none is installed ({e}). Use method='louvain'.") from None


def find_modules(
    ib,
    cutoff: float | dict[Pair, float] | None = None,
    resolution: float = 1.0,
    seed: int | None = 0,
    method: Literal["louvain", "leiden"] = "louvain",
    keep_share: float = DEFAULT_KEEP_SHARE,
    per_layer_cutoff: bool = True,
    restarts: int = 5,
) -> Modules:
    """Modules of interaction-basis directions by modularity maximisation (METHODS §6).

    ``ib``: any object with ``nodes`` (node layers in forward order) and ``edges`` {(nodes[l],
    nodes[l+1]): E [kept_(l+1), kept_l], E ≥ 0} (METHODS §5). The graph has weights
    w = max(0, log(E/c)); ``cutoff`` c is one number, a dict with one per adjacent pair, or None:
    then c comes from :func:`mass_cutoff` so that the kept edges hold ``keep_share`` of the edge
    mass, per layer pair (``per_layer_cutoff=True``, like rib's ByLayerLogEdgeNorm) or pooled
    over all pairs (``False``; edges of different pairs are on one scale with the importance
    scaling). ``keep_share`` and ``per_layer_cutoff`` are used only when ``cutoff`` is None.

    ``method``: "louvain" (networkx, the default) or "leiden" (networkx defines only the API;
    it needs a backend such as nx-cugraph). Louvain can return a disconnected community; we split
    every community into its connected components, which never lowers modularity (the inside
    weight is unchanged and the degree penalty shrinks) and makes each module connected, as
    Leiden guarantees. ``resolution`` γ > 0: larger γ favours smaller modules. ``seed`` makes the
    result reproducible (the vertex order is fixed, so one seed gives one partition).

    Louvain and Leiden are randomised heuristics, and on graphs without clear modules different
    seeds find different partitions (a random tanh MLP: 3 or 4 modules over seeds 0–4, the seed-0
    one of lower Q). So the method runs ``restarts`` times with seeds ``seed``, ``seed`` + 1, …
    and keeps the partition of highest modularity; ``restart_modules`` and
    ``restart_modularity`` give the range over the runs, (low, high) — equal when the runs agree.
    """
    if method not in ("louvain", "leiden"):
        raise ValueError(f"method must be 'louvain' or 'leiden'; got {method!r}")
    seed = None if seed is None else as_seed(seed)
    if not isinstance(restarts, int) or restarts < 1:
        raise ValueError(f"restarts must be a positive integer; got {restarts!r}")
    if not resolution > 0.0 or math.isinf(resolution):
        raise ValueError(f"resolution must be a positive finite number; got {resolution!r}")
    if getattr(ib, "scaling", None) == "paper":
        warn_once("find_modules: the interaction basis has scaling='paper', whose edges are the importance-scaled "
                  "ones over D_M,i² of the later node: other weights, other cut-offs and other modules (audit 11a: 2 "
                  "modules for 6 on one model); METHODS §6 reads edges on the importance scale "
                  "(interaction_basis(..., scaling='importance'))", RuntimeWarning, stacklevel=2)
    nodes, arrays = _edge_arrays(ib)
    cutoffs = _cutoffs(arrays, cutoff, keep_share, per_layer_cutoff)
    graph = _graph(nodes, arrays, cutoffs)
    found = _partition(graph, method, resolution, seed, restarts)
    members, isolated, spread_n, spread_q = found.members, found.isolated, found.spread_n, found.spread_q

    total = graph.size(weight="weight")
    if total > 0:
        modularity = nx.community.modularity(found.connected, members, weight="weight", resolution=resolution)
        module_of = {v: k for k, m in enumerate(members) for v in m}
        cut = [w for u, v, w in graph.edges(data="weight") if module_of[u] != module_of[v]]
        # From the cut edges, so that a partition that cuts nothing reports exactly 1.
        inside_share = 1.0 - sum(cut) / total
        edges_inside_share = 1.0 - len(cut) / graph.number_of_edges()
    else:
        modularity = inside_share = edges_inside_share = math.nan
    if spread_n is not None and spread_n[0] != spread_n[1]:
        # audit 13b: restarts that disagreed (3 vs 4 modules) were only an attribute
        warn_once(f"find_modules: the {restarts} restarts of {method} found {spread_n[0]} to {spread_n[1]} modules (Q "
                  f"{spread_q[0]:.3g}–{spread_q[1]:.3g}); the partition of highest Q is kept, so the module count "
                  "itself is uncertain (restart_modules)", RuntimeWarning, stacklevel=2)
    half_modules = half_agreement = None
    halves = _half_arrays(ib, nodes, arrays)
    if halves is not None and members:
        # The same procedure on each half's edges (audit 23b F1: 2 modules on one half of toy:modadd's
        # pairs, 3 on the other, and nothing said so)
        parts = [_partition(_graph(nodes, half, _cutoffs(half, cutoff, keep_share, per_layer_cutoff)), method,
                            resolution, seed, restarts) for half in halves]
        half_modules = tuple(len(p.members) for p in parts)
        labels = _labels(graph, members)
        half_agreement = tuple(_adjusted_rand(labels, _labels(graph, p.members)) for p in parts)
        if min(half_agreement) < 1.0:
            warn_once(f"find_modules: the edges of the data's even- and odd-numbered sequences alone give "
                      f"{half_modules[0]} and {half_modules[1]} modules (adjusted Rand agreement with the "
                      f"{len(members)} of all the data {half_agreement[0]:.2f} and {half_agreement[1]:.2f}): the "
                      "partition moves with the data sample (half_modules, half_agreement); more data steadies it",
                      DataLimitedWarning, stacklevel=2)
    return Modules(
        nodes=nodes, members=members, isolated=isolated, modularity=float(modularity),
        inside_share=float(inside_share), edges_inside_share=float(edges_inside_share), cutoff=cutoffs,
        resolution=float(resolution), seed=seed, method=method,
        keep_share=keep_share if cutoff is None else None,
        per_layer_cutoff=per_layer_cutoff if cutoff is None else None, graph=graph,
        restarts=restarts, restart_modules=spread_n, restart_modularity=spread_q,
        mass_inside_share=_mass_inside_share(nodes, arrays, members), half_modules=half_modules,
        half_agreement=half_agreement,
    )


@dataclass(frozen=True)
class _Found:
    """One graph's partition: ``members`` ordered by decreasing inside weight, ``isolated`` vertices,
    the graph of the connected vertices, and the spread of module counts and Q over the restarts."""

    members: list[list[Member]]
    isolated: list[Member]
    connected: nx.Graph
    spread_n: tuple[int, int] | None
    spread_q: tuple[float, float] | None


def _partition(graph: nx.Graph, method: str, resolution: float, seed: int | None, restarts: int) -> _Found:
    """Communities of ``graph``'s connected vertices, split into connected parts, the best of
    ``restarts`` runs (:func:`find_modules`)."""
    isolated = [v for v in graph.nodes if graph.degree(v) == 0]
    # A graph of its own, not a subgraph view: a view over a small share of the vertices iterates
    # them in set order, which changes with PYTHONHASHSEED and would change Louvain's partition.
    connected = nx.Graph()
    connected.add_nodes_from(v for v in graph.nodes if graph.degree(v) > 0)
    connected.add_weighted_edges_from(graph.edges(data="weight"))
    order = {v: i for i, v in enumerate(graph.nodes)}
    members: list[list[Member]] = []
    spread_n = spread_q = None
    if connected.number_of_edges():
        runs = []
        for k in range(restarts):
            run: list[list[Member]] = []
            for community in _communities(connected, method, resolution, None if seed is None else seed + k):
                run += [list(part) for part in nx.connected_components(connected.subgraph(community))]
            runs.append((nx.community.modularity(connected, run, weight="weight", resolution=resolution), run))
        # the highest Q; among equal ones the earliest seed, so that restarts=1 is the single run
        best = max(range(restarts), key=lambda k: (runs[k][0], -k))
        members = runs[best][1]
        spread_n = (min(len(r) for _, r in runs), max(len(r) for _, r in runs))
        spread_q = (float(min(q for q, _ in runs)), float(max(q for q, _ in runs)))
    members = [sorted(m, key=order.__getitem__) for m in members]
    inside = [_inside_weight(connected, m) for m in members]
    ranked = sorted(range(len(members)), key=lambda k: (-inside[k], order[members[k][0]]))
    return _Found([members[k] for k in ranked], isolated, connected, spread_n, spread_q)


def _inside_weight(graph: nx.Graph, members: list[Member]) -> float:
    """Σw of the edges inside ``members``, summed in one order whatever the process (audit 23b F5: the
    subgraph's set order moved the last bit, and with it the order of tied modules, with PYTHONHASHSEED)."""
    return math.fsum(w for _, _, w in graph.subgraph(members).edges(data="weight"))


def _half_arrays(ib, nodes: list[str], arrays: dict[Pair, np.ndarray]) -> list[dict[Pair, np.ndarray]] | None:
    """The edge matrices of the data's even- and odd-numbered sequences (``ib.edge_halves``), where
    every pair has them in the shapes of ``arrays``; else None."""
    halves = getattr(ib, "edge_halves", None) or {}
    if any(halves.get(pair) is None for pair in arrays):
        return None
    out = []
    for side in range(2):
        half = {pair: np.asarray(halves[pair][side].detach().cpu().double().numpy(), dtype=np.float64) for pair in arrays}
        if any(half[pair].shape != arrays[pair].shape or not np.isfinite(half[pair]).all() for pair in arrays):
            return None
        out.append(half)
    return out


def _labels(graph: nx.Graph, members: list[list[Member]]) -> np.ndarray:
    """Each vertex's module in ``graph``'s vertex order; an isolated vertex is a module of its own."""
    module_of = {v: k for k, m in enumerate(members) for v in m}
    fresh = iter(range(len(members), len(members) + graph.number_of_nodes()))
    return np.array([module_of[v] if v in module_of else next(fresh) for v in graph.nodes])


def _adjusted_rand(a: np.ndarray, b: np.ndarray) -> float:
    """Hubert and Arabie's adjusted Rand index of two labellings of the same items: 1 for the same
    partition, about 0 for independent ones (1 also where both put every item alone, or there are
    fewer than two items: no pair to disagree on)."""
    def pairs(counts: np.ndarray) -> float:
        return float((counts * (counts - 1) / 2).sum())

    if len(a) < 2:
        return 1.0
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    table = np.zeros((ai.max() + 1, bi.max() + 1))
    np.add.at(table, (ai.ravel(), bi.ravel()), 1.0)
    both, rows, cols = pairs(table), pairs(table.sum(1)), pairs(table.sum(0))
    expected = rows * cols / pairs(np.array([float(len(a))]))
    top = (rows + cols) / 2
    return 1.0 if top == expected else (both - expected) / (top - expected)


def _mass_inside_share(nodes: list[str], arrays: dict[Pair, np.ndarray], members: list[list[Member]]) -> float:
    """The share of the edge mass ΣE_ij (all edges, cut ones included) between two directions of one
    module: what the log weights' ``inside_share`` stands for (audit 23b F3: 75 % of the log weight
    where the modules held 97 % of ΣE). NaN where ΣE = 0."""
    module_of = {v: k for k, m in enumerate(members) for v in m}
    total = inside = 0.0
    for (source, target), array in arrays.items():
        total += float(array.sum())
        rows = np.array([module_of.get((target, i), -1) for i in range(array.shape[0])])
        cols = np.array([module_of.get((source, j), -2) for j in range(array.shape[1])])
        inside += float(array[rows[:, None] == cols[None, :]].sum())
    return inside / total if total > 0 else math.nan
