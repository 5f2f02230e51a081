"""The defaults of ``interaction_basis`` (METHODS §5, issue 14): M exact where that costs at most
``EXACT_FACTOR`` times the probes, so that cutting the same data into other batches changes nothing
beyond rounding; LIB's last node is its PCA (``last="pca"``), ``last="outputs"`` the global basis
there; where probes are used, ``dims["probe_stability"]`` tells probe noise from signal."""

from __future__ import annotations

import types

import pytest
import torch

import tl_degeneracy as tld
from tests.fixtures.device import test_device
from tests.fixtures.toys import make_tiny_toy_transformer
from tests.interaction_models import HookedMLP, mlp_inputs
from tl_degeneracy.interaction import interaction_basis
from tl_degeneracy.stats.jacobian import EXACT_FACTOR

MLP_NODES = ["hook_in", "hook_h0", "hook_h1", "hook_out"]
#: Two float64 runs that differ only in the order of their float64 sums: the Grams differ by
#: ~1e-16 relative, the eigenvectors by that over the relative eigenvalue gaps (≥ ~1e-4 on these
#: spectra), the edges likewise: far below 1e-10 (measured: ≤ 5e-13). Probes drawn per batch differ
#: by O(k^{-1/2}) ≈ 0.3 with 8 probes, the failure this guards against.
ROUNDING = 1e-10


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def tiny_toy():
    model = make_tiny_toy_transformer().double()
    model.tokenizer = types.SimpleNamespace(bos_token_id=1, pad_token_id=0)
    return model


def assert_same_run(a, b, tol=ROUNDING):
    assert a.nodes == b.nodes
    for node in a.nodes:
        assert a.basis[node].shape == b.basis[node].shape, node
        assert rel(a.basis[node], b.basis[node]) < tol, node  # rows are sign-fixed: no sign freedom left
        assert rel(a.eigenvalues[node].kept, b.eigenvalues[node].kept) < tol, node
    assert a.edges.keys() == b.edges.keys()
    for pair in a.edges:
        assert rel(a.edges[pair], b.edges[pair]) < tol, pair


def test_a_batch_split_changes_nothing_beyond_rounding_on_small_vocabulary_models():
    """64 sequences in batches of 32 or of 16, default settings: exact M at every node (the cost
    rule holds), so the bases and edges agree to float64 rounding."""
    model = tiny_toy()  # d_model 16, vocabulary 20
    toks = torch.randint(2, 20, (64, 7), generator=torch.Generator().manual_seed(0))
    a, b = (interaction_basis(model, toks, batch_size=bs, progress=False) for bs in (32, 16))
    assert_same_run(a, b)
    # LIB: 7 positions × ≤ 16 next-node directions ≤ 16 × 8 probes: exact; the last node is its PCA
    assert list(a.dims["M_method"]) == ["exact", "exact", "none"] and a.settings["exact"] == "auto"
    assert a.dims["probe_stability"].isna().all()

    # toy:modadd (vocabulary 32, 3 positions), the global basis: 3·32 = 96 ≤ 16·8 exact cotangents
    modadd = tld.load_model("toy:modadd", device=test_device()).double()  # float64: rounding at float64's level
    pairs = tld.toy_data("modadd")[:64]
    a, b = (interaction_basis(modadd, pairs, kind="global", batch_size=bs, progress=False) for bs in (32, 16))
    assert_same_run(a, b)
    assert list(a.dims["M_method"]) == ["exact", "exact"]

    # toy:modadd with every default: the first node's M is too costly to take exactly (probes), but
    # each sequence draws its own probes whichever batch it is in, so the split still changes only
    # rounding (the case: edges 32 % apart when probes were drawn per batch).
    a, b = (interaction_basis(modadd, pairs, batch_size=bs, progress=False) for bs in (32, 16))
    assert "probes" in set(a.dims["M_method"])
    # resid_post keeps Gram directions down to ~3e-13 of the largest (the float64 rank rule), whose
    # eigenvectors float64 rounding fixes only to eps·κ (κ = λ_max/λ_min of the kept Gram spectrum),
    # and LIB carries that into every earlier node's M: basis rows are compared at eps·(largest κ
    # from the node on), and so are their spectra; edges well below the old 32 % split difference.
    kappas = []
    for node in a.nodes:
        g = a.eigenvalues[node].gram[: a.eigenvalues[node].rank_G]
        kappas.append(float(g[0] / g[-1]))
    for i, node in enumerate(a.nodes):
        tol = max(ROUNDING, 1e-15 * max(kappas[i:]))
        assert rel(a.basis[node], b.basis[node]) < tol, node
        assert rel(a.eigenvalues[node].kept, b.eigenvalues[node].kept) < tol, node
    for pair in a.edges:
        assert rel(a.edges[pair], b.edges[pair]) < 1e-8, pair  # measured 3e-10 (per-batch probes: 0.32)


def test_deep_linear_network_default_lib_transitions_are_signed_identities():
    """Default settings on a linear network: exact M and the last node's PCA, so every transition
    C^{l+1} W_l C^{l+} is a signed identity (LIB = SVD of each whitened map) to rounding, and every
    node's spectrum is the output's PCA variances."""
    widths = [4, 6, 5, 3]
    model, x = HookedMLP(widths, act=lambda h: h, seed=7), mlp_inputs(64, 4)
    lib = interaction_basis(model, x, nodes=MLP_NODES, progress=False)
    for l, W in enumerate(model.weights):
        T = lib.basis[MLP_NODES[l + 1]] @ W.detach() @ lib.inverse[MLP_NODES[l]]
        assert T.shape == (3, 3) and (T.abs() - torch.eye(3, dtype=torch.float64)).abs().max() < 1e-10, (l, T)
    pca = torch.linalg.eigvalsh(torch.cov(model(x).detach().mT, correction=0)).flip(0)
    for node in MLP_NODES:
        assert torch.allclose(lib.eigenvalues[node].kept, pca, rtol=1e-10), node
    assert lib.last == "pca" and list(lib.dims["M"]) == ["next node"] * 3 + ["identity"]
    assert list(lib.dims["M_method"]) == ["exact"] * 3 + ["none"]


def test_last_node_is_its_pca_by_default_and_outputs_gives_the_global_basis_there():
    model, x = HookedMLP([5, 7, 6, 4], seed=2), mlp_inputs(96, 5)
    kw = dict(nodes=MLP_NODES, output="kl", progress=False)
    lib = interaction_basis(model, x, **kw)
    pca = interaction_basis(model, x, kind="pca", **kw)
    glob = interaction_basis(model, x, kind="global", **kw)
    old = interaction_basis(model, x, last="outputs", **kw)
    last = MLP_NODES[-1]
    # default: M = I at the last node, i.e. exactly the PCA basis there
    assert rel(lib.basis[last], pca.basis[last]) < 1e-12
    assert rel(lib.eigenvalues[last].interaction, pca.eigenvalues[last].interaction) < 1e-12
    # last="outputs": the Jacobian Gram of the model's outputs there, the global basis (the old LIB)
    assert old.last == "outputs" and old.settings["last"] == "outputs" and "last='outputs'" in repr(old)
    assert list(old.dims["M"]) == ["next node"] * 3 + ["outputs"]
    assert rel(old.basis[last], glob.basis[last]) < 1e-10
    # the rules differ: the softmax ignores a shift of all 4 outputs, so kl keeps 3 directions there, PCA 4
    assert old.basis[last].shape[0] == 3 and lib.basis[last].shape[0] == 4
    assert old.settings["passes"] == lib.settings["passes"] + 1  # one Jacobian pass more
    # other kinds: ``last`` does not apply, nothing changes
    for kind, ref in (("global", glob), ("pca", pca)):
        other = interaction_basis(model, x, kind=kind, last="outputs", **kw)
        assert other.last is None and list(other.dims["M"]) == list(ref.dims["M"])
        for node in MLP_NODES:
            assert torch.equal(other.basis[node], ref.basis[node]), (kind, node)
    with pytest.raises(ValueError, match="last"):
        interaction_basis(model, x, last="logits", **kw)
    with pytest.raises(ValueError, match="exact"):
        interaction_basis(model, x, exact="yes", **kw)


def test_probe_stability_is_near_one_for_many_probes_and_lower_for_few():
    """Forced probes: the agreement of the two half-probe bases; 1 − agreement falls like the
    probe noise variance, 1/k (ratio 32 from 2 to 64 probes; asked of the mean over 5 probe seeds: > 8,
    since one draw's ratio ranged 5.5–92 over seeds)."""
    model = tiny_toy()
    toks = torch.randint(2, 20, (32, 7), generator=torch.Generator().manual_seed(1))
    kw = dict(exact=False, edges=False, batch_size=16, progress=False)
    few = [interaction_basis(model, toks, n_probes=2, seed=seed, **kw).dims for seed in range(5)]
    many = [interaction_basis(model, toks, n_probes=64, seed=seed, **kw).dims for seed in range(5)]
    assert list(many[0]["M_method"]) == ["probes", "probes", "none"]
    s_few = sum(d["probe_stability"][:2] for d in few) / 5
    s_many = sum(d["probe_stability"][:2] for d in many) / 5
    assert (s_many > 0.99).all() and all((d["probe_stability"][:2] <= 1 + 1e-12).all() for d in many), s_many
    assert ((1 - s_few) > 8 * (1 - s_many)).all(), (s_few, s_many)
    assert many[0]["probe_stability"][2:].isna().all()  # the last node's PCA has no M to estimate
    one = interaction_basis(model, toks, n_probes=1, **kw).dims
    assert one["probe_stability"].isna().all()  # one probe cannot be halved

    # auto with more exact cotangents than EXACT_FACTOR × probes: probes, and the figure says so
    long = torch.randint(2, 20, (4, 12), generator=torch.Generator().manual_seed(2))
    ib = interaction_basis(model, long, n_probes=4, edges=False, progress=False)
    assert 12 * 15 > EXACT_FACTOR * 4 and ib.dims["M_method"][0] == "probes"
    assert 0 < ib.dims["probe_stability"][0] <= 1


def test_probes_do_not_depend_on_the_models_dtype():
    """Audit 11a F6: mse probes were drawn in the model's compute dtype, so a float32 and a float64
    copy of one model got other probes (LIB bases 0.28–0.87 apart). Drawn in float64 they are the same
    draws, and the bases agree to float32 rounding amplified by the spectra's gaps (measured ≤ 1.4e-6)."""
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(2, 20, (int(n),), generator=g) for n in torch.randint(5, 12, (12,), generator=g)]
    runs = [interaction_basis(tiny_toy().to(dtype), seqs, kind="local", output="mse", last="outputs", exact=False,
                              n_probes=4, progress=False, edges=False) for dtype in (torch.float64, torch.float32)]
    for node in runs[0].nodes:
        a, b = runs[0].basis[node], runs[1].basis[node].double()
        assert runs[0].eigenvalues[node].M_method == "probes"
        assert rel(b * torch.sign((a * b).sum(1, keepdim=True)), a) < 1e-4


def test_half_precision_bands_reach_the_rounding():
    """Audit 11a F4: the same tiny toy in bfloat16 read interaction rank 16 of 16 with the band 16–16
    (LayerNorm's mean direction, 0 in float32, counted from rounding) and nothing in the result said
    so. The bands now reach down to what stands above bfloat16's rounding (the float32 rank), and
    settings["half_precision"] names the dtype, as the counts do (METHODS §0)."""
    tokens = torch.randint(2, 20, (24, 12), generator=torch.Generator().manual_seed(0))
    runs = {dtype: interaction_basis(tiny_toy().to(dtype), tokens, kind="local", last="outputs", output="kl",
                                     exact=True, progress=False, edges=False)
            for dtype in (torch.float32, torch.bfloat16)}
    single, half = runs[torch.float32], runs[torch.bfloat16]
    assert single.settings["half_precision"] is None and half.settings["half_precision"] == "bfloat16"
    for node in single.nodes:
        exact = single.eigenvalues[node].interaction_rank
        assert single.eigenvalues[node].interaction_band == (exact, exact)
        low, high = half.eigenvalues[node].interaction_band
        assert low <= exact <= high
    from tl_degeneracy.report.sections import VERDICTS

    assert "computes in bfloat16" in VERDICTS["interaction"]({"degenerate_directions": 0, "half_precision": "bfloat16"})
    assert "computes in" not in VERDICTS["interaction"]({"degenerate_directions": 0, "half_precision": None})


def test_bases_downstream_of_probes_are_estimated():
    """Audit 11a F2: LIB's node before a probe-estimated last node had an exact M of a noisy basis,
    and read M_method "exact", not estimated; its edges read total_stderr 0 (the value for exact
    edges) while ΣE moved with the probe seed. Now dims["estimated"] marks both nodes and the pair's
    edges are basis_estimated, total_stderr NaN."""
    model = tiny_toy()
    tokens = torch.randint(2, 20, (24, 12), generator=torch.Generator().manual_seed(0))
    kw = dict(kind="local", last="outputs", output="kl", progress=False,
              nodes=["blocks.1.hook_resid_pre", "ln_final.hook_normalized"])
    exact = interaction_basis(model, tokens, exact=True, **kw)
    assert not exact.dims["estimated"].any() and (exact.edge_summary()["total_stderr"] == 0).all()
    # the last node needs P·V = 240 > 16·12 VJPs (probes), the node before P·kept = 180 ≤ 192 (exact)
    probed = interaction_basis(model, tokens, n_probes=12, **kw)
    assert probed.dims["M_method"].tolist() == ["exact", "probes"]
    assert probed.dims["estimated"].tolist() == [True, True]
    summary = probed.edge_summary()
    assert summary["basis_estimated"].all() and summary["total_stderr"].isna().all() and not summary["estimated"].any()
    moved = rel(probed.basis[probed.nodes[0]] * torch.sign((probed.basis[probed.nodes[0]] * exact.basis[exact.nodes[0]])
                                                           .sum(1, keepdim=True)), exact.basis[exact.nodes[0]])
    assert moved > 1e-3  # the noise the label is about: far above rounding
    pca = interaction_basis(model, tokens, kind="pca", progress=False, edges=False)
    assert not pca.dims["estimated"].any()
