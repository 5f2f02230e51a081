"""find_modules (METHODS §6) on hand-made interaction graphs with known modules."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import networkx as nx
import numpy as np
import pytest
import torch

from tl_degeneracy.errors import DataError, NumericalError
from tl_degeneracy.interaction.modules import find_modules, log_edge_weights, mass_cutoff

NODES = ["a", "b", "c"]
# Two interleaved blocks of directions, so the answer is not simply "the first half".
BLOCKS = [(0, 2, 4), (1, 3, 5)]


@dataclass
class FakeBasis:
    """The two attributes find_modules reads from an interaction-basis result."""

    nodes: list[str]
    edges: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict)


def block_chain(cross: float = 0.0, seed: int = 0) -> FakeBasis:
    """Three node layers of 6 directions: strong edges (50–100) inside each block, ``cross`` across."""
    rng = np.random.default_rng(seed)
    edges = {}
    for pair in zip(NODES[:-1], NODES[1:]):
        E = np.full((6, 6), cross)
        for block in BLOCKS:
            E[np.ix_(block, block)] = rng.uniform(50.0, 100.0, (3, 3))
        edges[pair] = torch.tensor(E, dtype=torch.float64)
    return FakeBasis(NODES, edges)


def block_members() -> list[set]:
    return [{(node, d) for node in NODES for d in block} for block in BLOCKS]


def as_sets(modules) -> list[set]:
    return sorted((set(m) for m in modules.members), key=min)


def test_disconnected_blocks_are_the_modules():
    for cutoff in (1.0, None):
        mods = find_modules(block_chain(), cutoff=cutoff)
        assert as_sets(mods) == sorted(block_members(), key=min)
        assert mods.isolated == []
        assert mods.inside_share == 1.0 and mods.edges_inside_share == 1.0
        frame = mods.to_frame()
        assert list(frame["span"]) == [3, 3]
        assert list(frame["first_layer"]) == ["a", "a"] and list(frame["last_layer"]) == ["c", "c"]
        assert list(frame["size"]) == [9, 9]
        assert (frame["weight_boundary"] == 0).all()
        assert frame["share_of_weight"].sum() == pytest.approx(1.0, rel=1e-12)
        # Nothing between the modules: Q = Σ_c [w_c/W − (2w_c/2W)²] = 1 − Σ_c (w_c/W)².
        share = frame["share_of_weight"].to_numpy()
        assert mods.modularity == pytest.approx(1.0 - (share**2).sum(), rel=1e-12)


def test_cross_edges_below_cutoff_change_nothing():
    clean = find_modules(block_chain(), cutoff=1.0)
    noisy = find_modules(block_chain(cross=0.9), cutoff=1.0)
    assert noisy.members == clean.members
    assert noisy.modularity == clean.modularity and noisy.inside_share == 1.0
    assert noisy.graph.number_of_edges() == clean.graph.number_of_edges() == 2 * 2 * 9


def test_weak_cross_edges_above_cutoff_keep_the_partition():
    ib = block_chain(cross=2.0)
    mods = find_modules(ib, cutoff=1.0, resolution=1.0)
    assert as_sets(mods) == sorted(block_members(), key=min)
    # Every cross edge (2·9 per pair, 2 pairs) has weight log 2 and is cut; everything else is inside.
    inside = sum(float(np.log(ib.edges[p].numpy()[np.ix_(b, b)]).sum()) for p in ib.edges for b in BLOCKS)
    cut = 2 * 18 * math.log(2.0)
    assert mods.inside_share == pytest.approx(inside / (inside + cut), rel=1e-12)
    assert mods.edges_inside_share == pytest.approx(36 / 72, rel=1e-12)
    assert mods.to_frame()["weight_boundary"].sum() == pytest.approx(2 * cut, rel=1e-12)


def test_log_weight_formula_by_hand():
    E = np.array([[math.e**3, 0.0], [0.5, math.e]])
    np.testing.assert_allclose(log_edge_weights(E, 1.0), [[3.0, 0.0], [0.0, 1.0]], rtol=1e-15)
    np.testing.assert_allclose(log_edge_weights(E, math.e), [[2.0, 0.0], [0.0, 0.0]], rtol=1e-15)

    ib = FakeBasis(["x", "y"], {("x", "y"): torch.tensor(E)})
    mods = find_modules(ib, cutoff=1.0)
    # E[i, j] links direction j of x to direction i of y.
    assert mods.graph.edges[("x", 0), ("y", 0)]["weight"] == pytest.approx(3.0, rel=1e-15)
    assert mods.graph.edges[("x", 1), ("y", 1)]["weight"] == pytest.approx(1.0, rel=1e-15)
    assert mods.graph.number_of_edges() == 2  # 0.5 ≤ c and 0 do not count
    assert list(mods.to_frame()["weight_inside"]) == pytest.approx([3.0, 1.0], rel=1e-15)

    higher = find_modules(ib, cutoff=math.e)
    assert higher.members == [[("x", 0), ("y", 0)]]
    assert higher.isolated == [("x", 1), ("y", 1)]
    members = higher.members_frame()
    assert members["module"].isna().sum() == 2 and list(members["module"].dropna()) == [0, 0]


def test_mass_cutoff_by_hand():
    values = np.array([10.0, 5.0, 3.0, 1.0, 1.0])  # mass 20
    # Budget 2 = the two edges of 1 (dropped together, as ties), and nothing more.
    assert mass_cutoff(values, 0.9) == 1.0
    # Budget 1 < the tied pair's mass 2: nothing can be dropped; c = floor b/N = 1/5.
    assert mass_cutoff(values, 0.95) == pytest.approx(0.2, rel=1e-12)
    # Budget 5: the 1s and the 3 (mass 5); the floor 1 is lower.
    assert mass_cutoff(values, 0.75) == 3.0
    assert mass_cutoff(np.zeros(4)) is None
    with pytest.raises(ValueError, match="keep_share"):
        mass_cutoff(values, 1.0)


def test_default_cutoff_per_layer_and_pooled():
    ib = block_chain(cross=0.01)
    ib.edges[("b", "c")] = ib.edges[("b", "c")] * 1e-3  # a much weaker layer pair
    per_layer = find_modules(ib)
    for pair, E in ib.edges.items():
        c = per_layer.cutoff[pair]
        assert c == mass_cutoff(E.numpy())
        assert E[E > c].sum() >= 0.99 * E.sum()
    assert as_sets(per_layer) == sorted(block_members(), key=min)
    assert per_layer.keep_share == 0.99 and per_layer.per_layer_cutoff is True

    pooled = find_modules(ib, per_layer_cutoff=False)
    assert len(set(pooled.cutoff.values())) == 1
    # One scale for both pairs: the weak pair's edges all fall below it, so layer c is isolated.
    assert {node for node, _ in pooled.isolated} == {"c"}
    assert all(node != "c" for m in pooled.members for node, _ in m)

    given = find_modules(ib, cutoff={("a", "b"): 1.0, ("b", "c"): 1e-3})
    assert given.cutoff == {("a", "b"): 1.0, ("b", "c"): 1e-3}
    assert given.keep_share is None and given.per_layer_cutoff is None


def test_same_seed_same_result():
    # Heavy-tailed random edges: no clear modules, so Louvain's random node order matters.
    rng = np.random.default_rng(0)
    nodes = ["a", "b", "c", "d"]
    ib = FakeBasis(nodes, {p: torch.tensor(rng.lognormal(0.0, 2.0, (8, 8))) for p in zip(nodes[:-1], nodes[1:])})
    runs = {seed: find_modules(ib, seed=seed) for seed in range(4)}
    again = find_modules(ib, seed=2)
    assert again.members == runs[2].members and again.modularity == runs[2].modularity
    assert again.to_dict() == runs[2].to_dict()
    # ... and the seed is really used: other seeds find other partitions of this graph.
    assert len({tuple(map(tuple, run.members)) for run in runs.values()}) > 1


def test_restarts_keep_the_partition_of_highest_modularity():
    """Audit 8b: one Louvain run's partition depends on its seed (3 or 4 modules on a random tanh MLP,
    the seed-0 one of lower Q) and the report showed it without saying so. With restarts the
    partition is the best of the single runs with seeds seed … seed + restarts − 1, and the range over
    them is recorded."""
    rng = np.random.default_rng(0)
    nodes = ["a", "b", "c", "d"]
    ib = FakeBasis(nodes, {p: torch.tensor(rng.lognormal(0.0, 2.0, (8, 8))) for p in zip(nodes[:-1], nodes[1:])})
    single = [find_modules(ib, seed=3 + k, restarts=1) for k in range(5)]
    best = find_modules(ib, seed=3, restarts=5)
    assert best.modularity == max(run.modularity for run in single) and best.restarts == 5
    assert best.members == max(single, key=lambda run: run.modularity).members
    assert best.restart_modules == (min(r.n_modules for r in single), max(r.n_modules for r in single))
    # the same partitions' Q summed in another module order: equal up to rounding
    assert best.restart_modularity == pytest.approx((min(r.modularity for r in single), max(r.modularity for r in single)),
                                                    rel=1e-12)
    assert len({r.modularity for r in single}) > 1  # the seeds matter on this graph, so the restarts do
    assert best.to_dict()["settings"]["restart_modules"] == list(best.restart_modules)
    with pytest.raises(ValueError, match="restarts"):
        find_modules(ib, restarts=0)
    # Audit 13b F7: restarts that disagree on the count say so, in a warning and in the repr
    low, high = best.restart_modules
    assert low != high  # on this graph (3 and 5)
    with pytest.warns(RuntimeWarning, match=rf"the 5 restarts of louvain found {low} to {high} modules"):
        find_modules(ib, seed=3, restarts=5)
    assert f"{best.n_modules} modules ({low}–{high} over 5 restarts)" in repr(best)


_PARTITION_SCRIPT = """
import json, numpy as np, torch
from tl_degeneracy.interaction.modules import find_modules
rng = np.random.default_rng(0)
nodes = ["resid_pre.0", "resid_pre.1", "resid_post.1"]
# Edges among the first 40 of 128 directions only: most vertices are isolated, as on real models.
edges = {}
for p in zip(nodes[:-1], nodes[1:]):
    E = np.zeros((128, 128))
    E[:40, :40] = rng.lognormal(0.0, 2.0, (40, 40))
    edges[p] = torch.tensor(E)
class IB: pass
ib = IB(); ib.nodes = nodes; ib.edges = edges
print(json.dumps([[list(v) for v in m] for m in find_modules(ib, seed=0).members]))
# audit 23b F5: three tied blocks, whose order came from inside weights summed in set order
tied = np.kron(np.eye(3), np.ones((3, 3))) + 0.2
ib.edges = {p: torch.tensor(tied) for p in zip(nodes[:-1], nodes[1:])}
print(json.dumps([[list(v) for v in m] for m in find_modules(ib, seed=0, cutoff=0.1).members]))
"""


@pytest.mark.tl_agnostic  # Louvain on a fixed graph (no TransformerLens): once, in the TransformerLens 4.x run
def test_same_seed_same_result_in_every_process():
    # Vertex sets hash differently per process (PYTHONHASHSEED); the partition must not depend on it.
    import subprocess
    import sys

    results = set()
    for hash_seed in ("0", "1", "2", "3", "4", "5"):
        env = {**__import__("os").environ, "PYTHONHASHSEED": hash_seed}
        out = subprocess.run([sys.executable, "-c", _PARTITION_SCRIPT], env=env, capture_output=True,
                             text=True, check=True)
        results.add(out.stdout.strip())
    assert len(results) == 1


def test_modules_are_connected_and_span_their_layers():
    rng = np.random.default_rng(1)
    nodes = ["a", "b", "c", "d", "e"]
    ib = FakeBasis(nodes, {p: torch.tensor(rng.lognormal(0.0, 2.0, (10, 10))) for p in zip(nodes[:-1], nodes[1:])})
    for resolution in (0.2, 1.0, 3.0):
        mods = find_modules(ib, resolution=resolution)
        frame = mods.to_frame()
        for members, span in zip(mods.members, frame["span"]):
            assert nx.is_connected(mods.graph.subgraph(members))
            assert span == len({node for node, _ in members})
        in_modules = sum(len(m) for m in mods.members)
        assert in_modules + len(mods.isolated) == 50


def test_leiden_runs_or_names_the_missing_backend():
    try:
        nx.community.leiden_communities(nx.path_graph(3))
    except NotImplementedError:
        with pytest.raises(ValueError, match="backend"):
            find_modules(block_chain(), method="leiden")
    else:
        assert as_sets(find_modules(block_chain(), method="leiden")) == sorted(block_members(), key=min)


def path_chain(n_layers: int = 12) -> FakeBasis:
    """One direction per layer, all edges equal: a path, whose best partition shrinks as γ grows."""
    nodes = [f"n{i}" for i in range(n_layers)]
    return FakeBasis(nodes, {p: torch.full((1, 1), 10.0, dtype=torch.float64) for p in zip(nodes[:-1], nodes[1:])})


def test_resolution_direction():
    counts = [find_modules(path_chain(), cutoff=1.0, resolution=g).n_modules for g in (0.05, 1.0, 4.0)]
    assert counts[0] < counts[1] < counts[2]
    assert counts[0] == 1  # γ → 0 rewards merging everything connected


def test_to_dict_is_json():
    mods = find_modules(block_chain(cross=2.0), cutoff=1.0)
    data = json.loads(json.dumps(mods.to_dict()))
    assert [len(m["members"]) for m in data["modules"]] == [9, 9]
    assert data["settings"]["cutoff"][0] == {"source": "a", "target": "b", "cutoff": 1.0}
    empty = find_modules(block_chain(), cutoff=1e6)  # nothing survives: scores are undefined
    assert empty.n_modules == 0 and len(empty.isolated) == 18 and math.isnan(empty.modularity)
    assert json.loads(json.dumps(empty.to_dict()))["modularity"] is None


def test_plot_traces_and_points():
    ib = block_chain()
    ib.edges[("b", "c")][:, 5] = 0.0  # direction 5 of layer b now links only to layer a
    ib.edges[("a", "b")][5, :] = 0.0  # ... and to nothing: isolated
    mods = find_modules(ib, cutoff=1.0)
    assert mods.isolated == [("b", 5)]
    fig = mods.plot()
    names = [t.name for t in fig.data]
    assert names == ["edges", "module 0", "module 1", "isolated"]
    assert sum(len(t.x) for t in fig.data[1:]) == 18
    n_edges = mods.graph.number_of_edges()
    assert len(fig.data[0].x) == 3 * n_edges == 3 * (36 - 6)
    assert len(mods.plot(max_edges=5).data[0].x) == 15


def test_bad_input():
    good = block_chain()
    with pytest.raises(DataError, match="not adjacent"):
        find_modules(FakeBasis(NODES, {**good.edges, ("a", "c"): good.edges[("a", "b")]}))
    with pytest.raises(DataError, match="not adjacent"):
        find_modules(FakeBasis(NODES, {("a", "b"): good.edges[("a", "b")], ("c", "b"): good.edges[("b", "c")]}))
    with pytest.raises(DataError, match="lacks"):
        find_modules(FakeBasis(NODES, {("a", "b"): good.edges[("a", "b")]}))
    with pytest.raises(DataError, match="node layer 'b' has 6 directions"):
        find_modules(FakeBasis(NODES, {("a", "b"): good.edges[("a", "b")], ("b", "c"): torch.ones(6, 4)}))
    negative = block_chain()
    negative.edges[("a", "b")][0, 1] = -1e-3
    with pytest.raises(DataError, match="negative"):
        find_modules(negative)
    nan = block_chain()
    nan.edges[("b", "c")][2, 2] = float("nan")
    with pytest.raises(NumericalError, match="non-finite"):
        find_modules(nan)
    for cutoff in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="positive"):
            find_modules(good, cutoff=cutoff)
    with pytest.raises(ValueError, match="positive"):
        find_modules(good, cutoff={("a", "b"): 1.0, ("b", "c"): 0.0})
    with pytest.raises(DataError, match="missing"):
        find_modules(good, cutoff={("a", "b"): 1.0})
    with pytest.raises(ValueError, match="resolution"):
        find_modules(good, resolution=0.0)
    with pytest.raises(ValueError, match="method"):
        find_modules(good, method="spectral")
    with pytest.raises(TypeError, match="nodes and .edges"):
        find_modules(good.edges)
    with pytest.raises(DataError, match="at least two"):
        find_modules(FakeBasis(["a"], {}))


def test_a_basis_without_edges_is_refused_with_the_rerun_that_gives_them():
    from tests.interaction_models import HookedMLP, mlp_inputs
    from tl_degeneracy.interaction import interaction_basis

    ib = interaction_basis(HookedMLP([5, 7, 6, 4]), mlp_inputs(32, 5), kind="pca",
                           nodes=["hook_in", "hook_h0", "hook_h1"], edges=False, progress=False)
    assert ib.edges == {}
    with pytest.raises(DataError, match=r"edges=False.*rerun interaction_basis with edges=True"):
        find_modules(ib)


def test_paper_scaled_edges_are_flagged():
    """Audit 11a F5: paper-scaled edges are the importance-scaled ones over D_M,i² of the later node,
    so their modules differ; find_modules says so, and the two scalings' edges relate exactly so."""
    from tests.interaction_models import HookedMLP, mlp_inputs
    from tl_degeneracy.interaction import interaction_basis

    model, x = HookedMLP([5, 6, 4]), mlp_inputs(200, 5)
    runs = {s: interaction_basis(model, x, kind="global", output="mse", exact=True, scaling=s, progress=False)
            for s in ("importance", "paper")}
    for (a, b), E in runs["importance"].edges.items():
        d_m = runs["importance"].eigenvalues[b].interaction[: E.shape[0]]
        torch.testing.assert_close(runs["paper"].edges[a, b], E / d_m[:, None] ** 2)
    with pytest.warns(RuntimeWarning, match="scaling='paper'"):
        find_modules(runs["paper"])


@dataclass
class HalvedBasis(FakeBasis):
    """A basis with the edges of each half of its data (``InteractionBasis.edge_halves``)."""

    edge_halves: dict = field(default_factory=dict)


def test_modules_of_each_half_of_the_data_say_how_much_the_partition_rests_on_the_sample():
    """Audit 23b F1: the report printed one module count where the two halves of toy:modadd's pairs gave
    2 and 3. Halves with the full data's blocks agree (adjusted Rand 1, no warning); a half whose blocks
    are the directions (0, 1, 2) and (3, 4, 5) instead of the interleaved ones meets each full block in
    6 and 3 vertices: adjusted Rand (36 − 72²/153) / (72 − 72²/153) by hand, and a warning."""
    import warnings

    from tl_degeneracy.numerics import DataLimitedWarning

    full = block_chain(cross=0.0)
    same = HalvedBasis(full.nodes, full.edges, {p: (e, e.clone()) for p, e in full.edges.items()})
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataLimitedWarning)
        modules = find_modules(same, seed=0)
    assert modules.half_modules == (2, 2) and modules.half_agreement == (1.0, 1.0)
    other = {p: e[[0, 2, 4, 1, 3, 5]][:, [0, 2, 4, 1, 3, 5]] for p, e in full.edges.items()}  # blocks 0–2, 3–5
    moved = {p: (e, other[p]) for p, e in full.edges.items()}
    with pytest.warns(DataLimitedWarning, match="give 2 and 2 modules"):
        modules = find_modules(HalvedBasis(full.nodes, full.edges, moved), seed=0)
    assert as_sets(modules) == block_members() and modules.half_modules == (2, 2)
    expected = 72**2 / 153
    assert modules.half_agreement[0] == 1.0
    assert modules.half_agreement[1] == pytest.approx((36 - expected) / (72 - expected), rel=1e-12)
    assert find_modules(full, seed=0).half_modules is None  # no halves: nothing said


def test_adjusted_rand_by_hand():
    """ARI of [0, 0, 1, 1] and [0, 0, 1, 2]: pairs together in both 1, in each 2 and 1 of 6, so
    (1 − 2·1/6) / ((2 + 1)/2 − 2·1/6) = 4/7; relabelling changes nothing."""
    from tl_degeneracy.interaction.modules import _adjusted_rand

    assert _adjusted_rand(np.array([0, 0, 1, 1]), np.array([0, 0, 1, 2])) == pytest.approx(4 / 7, rel=1e-12)
    assert _adjusted_rand(np.array([0, 0, 1, 1]), np.array([5, 5, 3, 3])) == 1.0
    assert _adjusted_rand(np.array([0, 1, 2]), np.array([0, 1, 2])) == 1.0
    assert _adjusted_rand(np.array([3]), np.array([7])) == 1.0  # one item: no pair (review 58 #4: ZeroDivisionError)


def test_the_share_of_the_edge_mass_inside_modules_is_given_beside_that_of_the_log_weights():
    """Audit 23b F3: "2 modules hold 75 % of the edge weight" read the log weights log(E/c), where the
    modules held 97 % of ΣE. Blocks with E in [50, 100] and 2 across every pair: ΣE inside / ΣE by hand."""
    chain = block_chain(cross=2.0)
    modules = find_modules(chain, seed=0, cutoff=1.0)
    assert as_sets(modules) == block_members()
    inside = sum(float(e[np.ix_(b, b)].sum()) for e in chain.edges.values() for b in BLOCKS)
    total = sum(float(e.sum()) for e in chain.edges.values())
    assert modules.mass_inside_share == pytest.approx(inside / total, rel=1e-12)
    assert modules.mass_inside_share > modules.inside_share  # log weights shrink the strong edges' share
