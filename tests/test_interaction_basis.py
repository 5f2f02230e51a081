"""interaction_basis (METHODS §5): moments and scaling, invariance under reparametrisation of a node,
deep linear networks (LIB = SVD of the whitened weights = global basis), multi-batch = single batch,
probe convergence, errors, and runs on the bundled toys and the HF test architectures."""

from __future__ import annotations

import copy
import json
import warnings
import types

import numpy as np
import pytest
import torch
from torch import nn
from transformer_lens import HookedRootModule
from transformer_lens.hook_points import HookPoint

from tests.fixtures.device import test_device
from tests.fixtures.distributed import rank_results, run_two_processes
from tests.fixtures.toys import make_tiny_toy_transformer
from tests.interaction_models import HookedMLP, mlp_inputs, node_acts, random_invertible
from tl_degeneracy.data import token_batches
from tl_degeneracy.errors import DataError, MissingHookError, NumericalError
from tl_degeneracy.interaction import InteractionBasis, interaction_basis
from tl_degeneracy.numerics import DataLimitedWarning

MLP_NODES = ["hook_in", "hook_h0", "hook_h1", "hook_out"]


def rel(a, b) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def signed_close(a, b, tol):
    """a ≈ b up to one sign per column (last axis): each basis direction is defined up to sign."""
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    s = torch.sign((a * b).sum(0))
    return rel(a * s, b) < tol


def tiny_toy():
    model = make_tiny_toy_transformer().double()
    model.tokenizer = types.SimpleNamespace(bos_token_id=1, pad_token_id=0)
    return model


def toy_tokens(n=4, p=7, seed=0):
    return torch.randint(2, 20, (n, p), generator=torch.Generator().manual_seed(seed))


def run_mlp(model, x, **kw):
    kw = {"output": "mse", "exact": True, "progress": False, "nodes": MLP_NODES, **kw}
    return interaction_basis(model, x, **kw)


# ---------------------------------------------------------------------------------------------- moments
@pytest.mark.parametrize("kind", ["global", "local"])
def test_importance_scaling_moments_unit_jacobian_gram_and_paper_scaling(kind):
    """E[f̂ f̂ᵀ] = diag(D_M) on the data; the Jacobian Gram of the outputs in f̂ coordinates is I
    (brute force, torch.func.jacrev); the paper scaling differs only by D_M per direction."""
    model, x = HookedMLP([5, 7, 6, 4]), mlp_inputs(96, 5)
    ib = run_mlp(model, x, kind=kind)
    assert isinstance(ib, InteractionBasis) and ib.nodes == MLP_NODES
    acts = node_acts(model, x, MLP_NODES)
    for node in MLP_NODES:
        fhat = ib.transform(acts[node], node)
        lam = ib.eigenvalues[node].kept
        assert fhat.shape == (96, ib.dims.set_index("node").loc[node, "interaction_rank"])
        second = fhat.mT @ fhat / len(x)
        assert rel(second, torch.diag(lam)) < 1e-10, node
        assert fhat.mean(0).abs().max() < 1e-10 * lam.sqrt().max()  # centred
        # round trip on the kept subspace
        assert rel(ib.transform(ib.inverse_transform(fhat, node), node), fhat) < 1e-10
    # Jacobian Gram of the outputs with respect to f̂ at the first hidden node (global basis, or
    # the last node's outputs = the model's for both kinds): I in importance scaling.
    node = "hook_h1" if kind == "global" else "hook_out"
    C_inv, f = ib.inverse[node], acts[node]

    def out_of(delta):  # output as a function of f̂ moved along the kept subspace
        return model.run_with_hooks(x, fwd_hooks=[(node, lambda a, hook: a + delta @ C_inv.mT)])

    J = torch.func.jacrev(out_of)(torch.zeros(len(x), C_inv.shape[1], dtype=torch.float64))  # [n, out, n, k]
    J = torch.einsum("aoak->aok", J)
    gram = torch.einsum("aok,aol->kl", J, J) / len(x)
    assert rel(gram, torch.eye(gram.shape[0], dtype=torch.float64)) < 1e-9
    paper = run_mlp(model, x, kind=kind, scaling="paper")
    for node in MLP_NODES:
        lam = ib.eigenvalues[node].kept
        assert torch.allclose(paper.basis[node] * lam[:, None], ib.basis[node], rtol=1e-9, atol=1e-12 * ib.basis[node].abs().max())
        assert torch.allclose(paper.eigenvalues[node].interaction, ib.eigenvalues[node].interaction)


# ---------------------------------------------------------------------------------------------- invariance
@pytest.mark.parametrize("kind", ["global", "local"])
def test_invariance_under_invertible_map_at_an_mlp_node(kind):
    """f → R f at hidden node 1 with the next weights → W R⁻¹: the same f̂ values at every node
    (so the basis of that node is C R⁻¹), and the same edges."""
    x = mlp_inputs(80, 5)
    a = HookedMLP([5, 7, 6, 4], seed=3)
    b = HookedMLP([5, 7, 6, 4], seed=3)
    R = random_invertible(6, seed=4)
    b.insert_mix(1, R)
    assert rel(b(x), a(x)) < 1e-12
    ia, ib_ = run_mlp(a, x, kind=kind), run_mlp(b, x, kind=kind)
    acts_a, acts_b = node_acts(a, x, MLP_NODES), node_acts(b, x, MLP_NODES)
    for node in MLP_NODES:
        assert signed_close(ib_.transform(acts_b[node], node), ia.transform(acts_a[node], node), 1e-8), node
    assert signed_close((ib_.basis["hook_h1"] @ R).mT, ia.basis["hook_h1"].mT, 1e-8)  # C' = C R⁻¹
    for pair in ia.edges:
        assert rel(ib_.edges[pair], ia.edges[pair]) < 1e-8, pair


@pytest.mark.parametrize("kind", ["global", "local"])
def test_invariance_under_head_gauge_in_a_transformer(kind):
    """A random GL(d_head) gauge per head (W_V → W_V A, W_O → A⁻¹ W_O) maps hook_z by A: the z
    node's f̂ values, every other node's basis, and all edges are unchanged."""
    from tl_degeneracy.gauge import random_gauge

    model = tiny_toy()
    gauged = random_gauge(model, seed=5)
    toks = toy_tokens()
    nodes = ["blocks.0.attn.hook_z", "blocks.1.hook_resid_pre", "ln_final.hook_normalized"]
    kw = dict(kind=kind, nodes=nodes, output="kl", exact=True, progress=False)
    ia, ig = interaction_basis(model, toks, **kw), interaction_basis(gauged, toks, **kw)
    _, ca = model.run_with_cache(toks)
    _, cg = gauged.run_with_cache(toks)
    assert rel(cg[nodes[0]], ca[nodes[0]]) > 1e-2  # the gauge really moved z
    for node in nodes:
        assert signed_close(ig.transform(cg[node], node), ia.transform(ca[node], node), 1e-7), node
    for pair in ia.edges:
        assert rel(ig.edges[pair], ia.edges[pair]) < 1e-7, pair


# ---------------------------------------------------------------------------------------------- deep linear
def test_deep_linear_network_lib_is_an_svd_and_equals_global():
    """Linear layers: LIB transition matrices C^{l+1} W_l C^{l+} are signed identities, Λ is the same
    at every node (the output's PCA variances), edges are diagonal, and LIB = the global basis."""
    widths = [4, 6, 5, 3]
    model, x = HookedMLP(widths, act=lambda h: h, seed=7), mlp_inputs(64, 4)
    lib = run_mlp(model, x, kind="local")
    glob = run_mlp(model, x, kind="global")
    out_cov = torch.cov(model(x).mT, correction=0)
    pca = torch.linalg.eigvalsh(out_cov).flip(0)
    for node in MLP_NODES:
        assert lib.eigenvalues[node].interaction_rank == 3, node
        assert torch.allclose(lib.eigenvalues[node].kept, pca, rtol=1e-9), node
        assert rel(lib.basis[node], glob.basis[node]) < 1e-9, node
    for l, W in enumerate(model.weights):
        a, b = MLP_NODES[l], MLP_NODES[l + 1]
        T = lib.basis[b] @ W.detach() @ lib.inverse[a]
        assert torch.allclose(T.abs(), torch.eye(3, dtype=torch.float64), atol=1e-9), (a, b, T)
        E = lib.edges[a, b]
        off = E - torch.diag(E.diagonal())
        assert off.abs().max() < 1e-12 * E.max(), (a, b)
        assert torch.allclose(E.diagonal(), pca, rtol=1e-9)  # E_ii = E[f̂_i²] = Λ_i for a signed identity


# ---------------------------------------------------------------------------------------------- accumulation
def test_multi_batch_equals_single_batch():
    model = tiny_toy()
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(2, 20, (n,), generator=g) for n in (7, 4, 6, 5)]
    runs = [interaction_basis(model, token_batches(seqs, model, batch_size=bs, prepend_bos=True), kind="local",
                              output="kl", exact=True, progress=False) for bs in (4, 1, 3)]
    one = runs[0]
    assert one.counts["blocks.0.hook_resid_pre"] == 22  # BOS skipped, padding never counted
    for other in runs[1:]:
        for node in one.nodes:
            assert rel(other.basis[node], one.basis[node]) < 1e-10, node
        for pair in one.edges:
            assert rel(other.edges[pair], one.edges[pair]) < 1e-10, pair


def test_probe_estimates_converge_to_exact_like_inverse_sqrt():
    """D_M from k probes per batch → exact D_M (small vocabulary), rms error ∝ k^{-1/2}."""
    model, toks = tiny_toy(), toy_tokens(n=3, p=6)
    nodes = ["blocks.1.hook_resid_pre"]
    exact = interaction_basis(model, toks, kind="global", nodes=nodes, exact=True, edges=False, progress=False)
    ref = exact.eigenvalues[nodes[0]].interaction
    probes, rms = [4, 16, 64], []
    for k in probes:
        errs = [rel(interaction_basis(model, toks, kind="global", nodes=nodes, n_probes=k, exact=False, seed=s,
                                      edges=False, progress=False).eigenvalues[nodes[0]].interaction, ref)
                for s in range(6)]
        rms.append(float(np.sqrt(np.mean(np.square(errs)))))
    slope = np.polyfit(np.log(probes), np.log(rms), 1)[0]
    assert -0.8 <= slope <= -0.3, (slope, rms)


# ---------------------------------------------------------------------------------------------- errors
def test_bad_input_gives_clear_errors():
    model, toks = tiny_toy(), toy_tokens()
    with pytest.raises(MissingHookError, match="blocks.9"):
        interaction_basis(model, toks, nodes=["blocks.9.hook_resid_pre"], progress=False)
    with pytest.raises(ValueError, match="forward order"):
        interaction_basis(model, toks, nodes=["blocks.1.hook_resid_pre", "blocks.0.hook_resid_pre"], progress=False)
    with pytest.raises(ValueError, match="distinct"):
        interaction_basis(model, toks, nodes=["resid_pre", "blocks.0.hook_resid_pre"], progress=False)
    with pytest.raises(DataError):
        interaction_basis(model, torch.zeros(0, 5, dtype=torch.long), progress=False)
    for bad in (dict(kind="both"), dict(output="ce"), dict(scaling="unit"), dict(n_probes=0), dict(edge_sources=0)):
        with pytest.raises(ValueError):
            interaction_basis(model, toks, progress=False, **bad)
    mlp = HookedMLP([3, 4, 2])
    with pytest.raises(MissingHookError, match="hook_nope"):
        interaction_basis(mlp, mlp_inputs(8, 3), nodes=["hook_in", "hook_nope"], progress=False)
    with pytest.raises(DataError):
        interaction_basis(mlp, torch.zeros(0, 3, dtype=torch.float64), progress=False)
    for size in (0, -1, 2.5, True):  # audit 15a: a raw torch error, or 2.5 run as 2
        with pytest.raises(DataError, match="batch_size must be an integer"):
            interaction_basis(mlp, mlp_inputs(8, 3), batch_size=size, progress=False)
    with pytest.raises(TypeError, match="HookedRootModule"):
        interaction_basis(torch.nn.Linear(3, 2), mlp_inputs(8, 3), progress=False)
    with torch.no_grad():
        model.blocks[0].attn.W_V[0, 0, 0] = float("nan")
    with pytest.raises(NumericalError, match="hook_resid_pre"):
        interaction_basis(model, toks, progress=False)


# ---------------------------------------------------------------------------------------------- models
def check_result(ib: InteractionBasis) -> None:
    assert len(ib.edges) == len(ib.nodes) - 1
    for node in ib.nodes:
        k, D = ib.basis[node].shape
        assert ib.basis[node].dtype == torch.float64 and torch.isfinite(ib.basis[node]).all()
        assert ib.inverse[node].shape == (D, k) and ib.mean[node].shape == (D,)
        assert 0 < k <= ib.eigenvalues[node].rank_G <= D
    for (a, b), e in ib.edges.items():
        assert e.shape == (ib.basis[b].shape[0], ib.basis[a].shape[0]) and e.dtype == torch.float64
        assert torch.isfinite(e).all() and (e >= 0).all() and e.sum() > 0
    assert list(ib.dims.columns[:5]) == ["node", "D", "rank_G", "interaction_rank", "degenerate"]
    json.dumps(ib.to_dict())
    assert ib.plot_spectra().data and ib.plot_edges().data


def test_sma_default_nodes_and_sequence_level_output(sma_model):
    import tl_degeneracy as tld

    toks = tld.toy_data("sma", 24, seed=0)
    ib = interaction_basis(sma_model, toks, kind="local", n_probes=4, progress=False)
    assert ib.nodes == ["blocks.0.hook_resid_pre", "blocks.0.hook_resid_post"]  # no final norm
    assert ib.counts == {"blocks.0.hook_resid_pre": 24 * 12, "blocks.0.hook_resid_post": 24}
    check_result(ib)


def test_bytelm_small_data():
    import tl_degeneracy as tld

    model = tld.load_model("toy:bytelm", device=test_device())
    toks = tld.toy_data("bytelm", 2, seed=0, seq_len=12)
    ib = interaction_basis(model, toks, kind="local", n_probes=2, edge_sources=1, progress=False)
    assert ib.nodes == ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre", "ln_final.hook_normalized"]
    # Gram pass, a Jacobian pass for each node but the last (its PCA, last="pca") and two more for the
    # halves' own bases there (the edges' split-half error), edge pass
    assert ib.settings["passes"] == 1 + 2 + 2 * 2 + 1 and ib.counts[ib.nodes[0]] == 24
    assert list(ib.dims["M"]) == ["next node", "next node", "identity"]
    check_result(ib)


@pytest.mark.parametrize("arch", ["neox", "llama"])
def test_hf_architectures(arch, tl_models, single_thread):
    model = tl_models(arch, "bridge")
    toks = torch.randint(3, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    for kind in ("global", "local"):
        ib = interaction_basis(model, toks, kind=kind, n_probes=2, edge_sources=1, progress=False)
        assert ib.nodes[-1] == "ln_final.hook_normalized" and len(ib.nodes) == 3
        check_result(ib)


# ---------------------------------------------------------------------------------------------- torchrun
@pytest.mark.slow  # ~25 s: two fresh interpreters import torch and TransformerLens
def test_two_processes_equal_one(tmp_path):
    """Under torchrun (2 gloo ranks, batches split 2 + 1) every rank gets the single-process LIB:
    probes are seeded per sequence and sources per batch, the float64 sums are reduced across ranks."""
    from tests.interaction_distributed_worker import compute

    run_two_processes("interaction_distributed_worker.py", tmp_path)
    single = compute()
    assert int(single["world_size"]) == 1
    assert any(key.startswith("refit/") for key in single)
    for rank, multi in enumerate(rank_results(tmp_path)):
        assert int(multi["world_size"]) == 2 and sorted(multi) == sorted(single)
        for key in single:
            if key != "world_size":
                assert rel(multi[key], single[key]) < 1e-10, (rank, key)


def test_nodes_whose_rank_the_samples_bound_are_flagged():
    """n samples span at most n − 1 centred directions: with fewer than D + 1 of them a node's
    degenerate directions are the data's limit, and dims and a warning say so; with enough data
    neither does."""
    from tl_degeneracy import SampleLimitedWarning
    model = make_tiny_toy_transformer()  # D = 16
    few = torch.randint(0, 20, (1, 8), generator=torch.Generator().manual_seed(0))
    with pytest.warns(SampleLimitedWarning, match="interaction_basis: the rank of 3 of 3 nodes' Grams"):
        dims = interaction_basis(model, few, n_probes=2, progress=False).dims
    assert (dims["n"] < dims["D"]).all()
    assert (dims["rank_G"] <= dims["n"] - 1).all() and dims["sample_limited"].all()
    many = torch.randint(0, 20, (16, 16), generator=torch.Generator().manual_seed(0))
    dims = interaction_basis(model, many, n_probes=2, progress=False).dims
    assert not dims["sample_limited"].any() and (dims["n"] > dims["D"]).all()


def test_repeated_inputs_are_counted_once():
    """Audit 21b F2: inputs given more than once were counted as distinct samples, so ranks the data
    bound (3 of 4 inputs given 3 times each; 7 of 8 positions of 2 sequences given 3 times) read as
    the model's, and the even/odd split, which holds every input in both halves, could not tell."""
    from tl_degeneracy import SampleLimitedWarning

    model = HookedMLP([8, 8, 8])
    x = mlp_inputs(4, 8)[[0, 1, 2, 3, 1, 0, 3, 2, 2, 3, 0, 1]]
    with pytest.warns(SampleLimitedWarning, match="reached n = 4"):
        dims = interaction_basis(model, x, kind="global", progress=False).dims
    assert (dims["n"] == 12).all() and (dims["distinct"] == 4).all()
    assert (dims["rank_G"] == 3).all() and dims["sample_limited"].all() and not dims["data_limited"].any()
    toy = make_tiny_toy_transformer()  # causal, no BOS: a position's sample is its prefix
    g = torch.Generator().manual_seed(3)
    a, b = torch.randint(2, 20, (4,), generator=g), torch.randint(2, 20, (4,), generator=g)
    with pytest.warns(SampleLimitedWarning):
        dims = interaction_basis(toy, torch.stack([a, b, b, a, a, b]), n_probes=2, progress=False).dims
    assert (dims["n"] == 24).all() and (dims["distinct"] == 8 - int(a[0] == b[0])).all()
    assert dims["sample_limited"].all()
    # Batches of other position lengths (review 51 #2: the row comparison failed on them)
    from tl_degeneracy.interaction.runner import tensor_batches

    short, long = mlp_inputs(2, 4)[:, None, :].expand(2, 3, 4), mlp_inputs(2, 4)[:, None, :].expand(2, 5, 4)
    batches = tensor_batches([short, short[:1].expand(2, 3, 4), long, long], 2)
    assert batches.n_samples == 32 and batches.distinct(32, "position") == 32 - 2 * 3 - 2 * 5
    assert batches.distinct(8, "sequence") == 4
    # bfloat16 inputs, and −0.0 as 0.0 (review 52: numpy holds no bfloat16; bytes told the zeros apart)
    assert tensor_batches(x.to(torch.bfloat16), 5).distinct(12, "position") == 4
    zeros = torch.zeros(2, 3)
    zeros[1, 0] = -0.0
    assert tensor_batches(zeros, 2).distinct(2, "position") == 1


def test_a_float32_node_with_a_large_mean_counts_no_rounding():
    """Audit 21b F1 (review 52 #5: through the analyses, not only numerics): a linear network whose
    hidden node has rank 3 and a bias 400 times its spread read rank_G 8 in float32, where float64
    reads 3; the interaction basis now reads 3 in both (activation_stats: test_numerics, HookStats)."""
    model = HookedMLP([6, 8, 8, 5], act=lambda h: h, seed=2)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        model.weights[0].copy_(torch.randn(8, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 6, generator=g,
                                                                                                  dtype=torch.float64) / 10)
        model.biases[0].copy_(100 * torch.randn(8, generator=g, dtype=torch.float64))
    x = mlp_inputs(400, 6)
    for dtype in (torch.float64, torch.float32):
        typed = copy.deepcopy(model).to(dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dims = interaction_basis(typed, x.to(dtype), kind="global", output="mse", exact=True,
                                     progress=False).dims.set_index("node")
        # (the band's cut-off 100× lower reaches float32's rounding: 3–5 and 3–8 there, 3–3 in float64)
        assert dims.loc["hook_h0", "rank_G"] == dims.loc["hook_h1", "rank_G"] == 3, dtype


def test_ranks_that_grow_with_the_data_are_flagged_by_the_even_numbered_sequences():
    """Audit 8b: a rank below n − 1 that more data would raise was not flagged (toy:modadd's last node,
    LIB: 115 on 64 sequences, 128 on all 961). dims carries the ranks on the even-numbered rows alone
    and flags a node where either is lower; inputs whose odd rows add a direction the even ones lack
    are flagged at every node that sees it, with a DataLimitedWarning, and inputs that span the same
    directions in both halves are not."""
    from tl_degeneracy import DataLimitedWarning

    model = HookedMLP([4, 6, 3])
    x = mlp_inputs(200, 4)
    x[0::2, 3] = 0.0  # the even-numbered rows never use input direction 3
    with pytest.warns(DataLimitedWarning, match="still growing with the data"):
        ib = interaction_basis(model, x, kind="local", last="outputs", batch_size=32, progress=False)
    dims = ib.dims.set_index("node")
    assert dims.loc["hook_in", "rank_G"] == 4 and dims.loc["hook_in", "rank_G_half"] == 3
    assert bool(dims.loc["hook_in", "data_limited"])
    assert not dims["sample_limited"].any()  # far more samples than dimensions: only the split tells
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataLimitedWarning)
        full = interaction_basis(model, mlp_inputs(200, 4), kind="local", last="outputs", batch_size=32,
                                 progress=False).dims
    assert not full["data_limited"].any() and (full["rank_G_half"] == full["rank_G"]).all()
    assert (full["interaction_rank_half"] == full["interaction_rank"]).all()


def test_output_is_recorded_only_where_one_enters_the_basis():
    """Audit 8b: LIB with last="pca" recorded output="kl" though no output enters it."""
    model, x = HookedMLP([4, 5, 3]), mlp_inputs(64, 4)
    assert interaction_basis(model, x, kind="local", last="pca", progress=False).output is None
    assert interaction_basis(model, x, kind="pca", progress=False).output is None
    assert interaction_basis(model, x, kind="local", last="outputs", output="mse", progress=False).output == "mse"
    assert interaction_basis(model, x, kind="global", output="kl", progress=False).output == "kl"


def test_interaction_rank_band_is_the_ranks_at_the_moved_cut_off():
    """Audit 6: interaction ranks that sit on the rank rule's cut-off with no spectral gap (toy:modadd's
    resid_post) were given as plain numbers. dims carries the ranks with the cut-off moved
    CUTOFF_BAND-fold up and down, recomputed here from the stored spectra by the rank rule itself."""
    import warnings

    import tl_degeneracy as tld
    from tl_degeneracy.numerics import CUTOFF_BAND, activation_precision, numerical_rank, rank_rtol

    model = tld.load_model("toy:modadd")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ib = tld.interaction_basis(model, tld.toy_data("modadd")[:64], progress=False)
    precision = activation_precision(next(model.parameters()).dtype)
    spread = False
    for row in ib.dims.itertuples():
        spec = ib.eigenvalues[row.node]
        g_rtol = rank_rtol(spec.gram.numel(), precision=precision, gram=True)
        m_rtol = rank_rtol(spec.rank_G, precision=precision, gram=True)
        floor = lambda n, rtol: min(rank_rtol(n, torch.float64, gram=True), rtol)  # noqa: E731 (numerics.rank_band)
        for values, rtol, low, high in ((spec.gram, g_rtol, row.rank_G_min, row.rank_G_max),
                                        (spec.interaction, m_rtol, row.interaction_rank_min, row.interaction_rank_max)):
            n = values.numel()
            assert low == int(numerical_rank(values, rtol=rtol * CUTOFF_BAND))
            assert high == int(numerical_rank(values, rtol=max(rtol / CUTOFF_BAND, floor(n, rtol))))
        assert row.rank_G_min <= row.rank_G <= row.rank_G_max
        assert row.interaction_rank_min <= row.interaction_rank <= row.interaction_rank_max
        spread |= row.interaction_rank_min < row.interaction_rank_max
    assert spread  # resid_post's D_M decays through the cut-off (115: 84–115 on these data)


def test_interaction_verdict_gives_the_cutoff_band():
    from tl_degeneracy.report.sections import VERDICTS

    v = {"degenerate_directions": 109, "degenerate_band": [109, 140], "cutoff_band": 100.0, "inside_share": 0.34,
         "n_modules": 4}
    assert "109–140 degenerate directions with it 100× higher or lower" in VERDICTS["interaction"](v)
    v["degenerate_band"] = [109, 109]
    assert "cut-off" not in VERDICTS["interaction"](v)


def test_the_repr_carries_the_ranks_verdicts(tiny_toy_transformer, tiny_toy_tokens):
    """Audit 13b F7: the repr a notebook shows gave kept/D as if exact and final."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the same verdicts, as warnings
        ib = interaction_basis(tiny_toy_transformer, tiny_toy_tokens, n_probes=2, exact=False, progress=False)
    dims = ib.dims
    assert dims["estimated"].any()
    assert f"{int(dims['estimated'].sum())} of {len(dims)} nodes estimated from probes" in repr(ib)
    assert ("still growing with the data" in repr(ib)) == bool(dims["data_limited"].any())


def test_several_hook_kinds_are_put_in_forward_order(tiny_toy_transformer, tiny_toy_tokens):
    """Audit 13a F6: kinds expand layer by layer one kind after another, so nodes=["resid_pre", "attn_out"]
    on two layers was always refused as out of order; exact names out of order still are."""
    from tl_degeneracy.interaction.runner import build_runner

    runner = build_runner(tiny_toy_transformer, tiny_toy_tokens, ["resid_pre", "attn_out"], batch_size=4, seq_len=None,
                          skip_bos=None)
    assert runner.names == ["blocks.0.hook_resid_pre", "blocks.0.hook_attn_out", "blocks.1.hook_resid_pre",
                            "blocks.1.hook_attn_out"]
    with pytest.raises(ValueError, match="forward order"):
        build_runner(tiny_toy_transformer, tiny_toy_tokens, ["blocks.1.hook_resid_pre", "blocks.0.hook_resid_pre"],
                     batch_size=4, seq_len=None, skip_bos=None)


class _CentredMLP(HookedRootModule):
    """x (20) → ReLU (32 units) → the units less their mean → 10 outputs, float64: at most 10
    directions of either hidden node are read by the outputs."""

    def __init__(self, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W1 = nn.Parameter(torch.randn(32, 20, generator=g, dtype=torch.float64) / 20**0.5)
        self.b1 = nn.Parameter(0.3 * torch.randn(32, generator=g, dtype=torch.float64))
        self.W2 = nn.Parameter(torch.randn(10, 32, generator=g, dtype=torch.float64) / 32**0.5)
        self.hook_in, self.hook_post, self.hook_centred, self.hook_out = HookPoint(), HookPoint(), HookPoint(), HookPoint()
        self.setup()

    def forward(self, x):
        h = self.hook_post(torch.relu(self.hook_in(x) @ self.W1.T + self.b1))
        return self.hook_out(self.hook_centred(h - h.mean(-1, keepdim=True)) @ self.W2.T)


def test_the_rounding_floor_keeps_a_real_direction_of_small_variance_and_large_sensitivity():
    """Review 46 L3 (review 45 H1's case as a unit test): activations of variance 10⁻¹² along two
    directions that the outputs read 10¹² times harder give M̃ = diag(1, 1, 10⁻¹⁰, 1, 1, 1), all six
    real; a floor from M's magnitudes through the whitening kept 5. M̃ has no negative eigenvalue
    here, so the floor is 0 and the rule keeps every one."""
    from tl_degeneracy.interaction import basis
    from tl_degeneracy.numerics import rank_rtol

    variance = torch.tensor([1, 1, 1, 1e-12, 1e-12, 1], dtype=torch.float64)
    sensitivity = torch.tensor([1, 1, 1e-10, 1e12, 1e12, 1], dtype=torch.float64)
    whitening = basis.whiten(torch.diag(variance), torch.zeros(6, dtype=torch.float64),
                             rank_rtol(6, torch.float64, gram=True), 0.0)
    assert whitening.rank == 6
    kept = basis.interaction_directions(whitening, torch.diag(sensitivity), rank_rtol(6, torch.float64, gram=True), 0.0)
    assert kept.size == 6 and kept.band == (6, 6)


def test_a_deep_linear_network_s_rounding_above_the_cut_off_is_inside_the_band_and_said():
    """Review 46 M2: a float64 deep linear network of interaction rank 3 whose M̃ shows no negative
    eigenvalue below its rounding (8945, 404, 3.98, then 1.3·10⁻¹¹ just above the cut-off 1.2·10⁻¹¹)
    reads 4, and 3 on half of the data, so the node is flagged as still growing with the data. The
    band holds 3, and the warning says the difference may be the cut-off's."""
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    model = HookedMLP([6, 8, 5, 4], act=lambda h: h)
    with torch.no_grad():
        for W, new in zip(model.weights, (r(8, 6), r(5, 3) @ r(3, 8), r(4, 5))):
            W.copy_(new)
        for b, new in zip(model.biases, (0.3 * r(8), 0.3 * r(5), 0.3 * r(4))):
            b.copy_(new)
    x = r(300, 6) * torch.linspace(0.5, 2.0, 6, dtype=torch.float64)
    with pytest.warns(DataLimitedWarning, match="hook_h0 the half-data ranks lie inside the ranks' cut-off bands"):
        ib = interaction_basis(model, x, kind="global", output="mse", exact=True, progress=False,
                               nodes=["hook_in", "hook_h0", "hook_h1"], edges=False)
    row = ib.dims.set_index("node").loc["hook_h0"]
    assert row["interaction_rank_min"] == 3 <= row["interaction_rank"] <= row["interaction_rank_max"]
    assert ib.eigenvalues["hook_h0"].limited_within_band and row["limited_within_band"] and row["data_limited"]


def test_rounding_below_zero_marks_what_no_direction_exceeds():
    """Audit 18a F2: float64 rounding in M̃ counted as interaction directions — tutorial 07's centred
    two-tower models read 16 and 13 directions at hidden nodes whose 10 logits can read 10, and this
    centred MLP 11–12 at all 8 hidden nodes of seeds 1 and 3–5. M̃ sums outer products with positive
    weights, so its most negative eigenvalue is rounding, and the floor is twice it: 10 at each. A
    cut-off the caller gives is kept as given (review 44 M1: interaction_rtol=0 keeps the rounding)."""
    for seed in (1, 3, 4, 5):
        model = _CentredMLP(seed)
        x = torch.randn(625, 20, generator=torch.Generator().manual_seed(100 + seed), dtype=torch.float64)
        ranks = interaction_basis(model, x, kind="local", progress=False).dims.set_index("node")["interaction_rank"]
        assert ranks["hook_post"] == ranks["hook_centred"] == 10, (seed, ranks.tolist())
        if seed == 1:
            every = interaction_basis(model, x, kind="local", interaction_rtol=0.0, progress=False).dims
            assert (every.set_index("node")["interaction_rank"][["hook_post", "hook_centred"]] > 10).all()


def _linear_network(s: list[float], n: int, seed: int) -> InteractionBasis:
    """x → U diag(s) Vᵀ x on isotropic x: D_M at the input ∝ s², the singular values squared."""
    model = HookedMLP([6, 6, 6], act=lambda t: t, bias=False)
    U, _ = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(7), dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(8), dtype=torch.float64))
    with torch.no_grad():
        model.weights[0].copy_(U @ torch.diag(torch.tensor(s, dtype=torch.float64)) @ V.mT)
        model.weights[1].copy_(torch.eye(6, dtype=torch.float64))
    x = torch.randn(n, 6, generator=torch.Generator().manual_seed(100 + seed), dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataLimitedWarning)
        return interaction_basis(model, x, kind="local", last="outputs", output="mse", exact=True,
                                 nodes=["hook_in", "hook_h0", "hook_out"], batch_size=n, progress=False)


def test_tied_interaction_eigenvalues_are_flagged_and_separated_ones_are_not():
    """Review 58 #3: each D_M's own split-half draw caught an exactly tied pair in about half of 40
    draws. With the relative spreads pooled over neighbours and gaps up to twice the spreads, a
    singular value repeated (2, 2) is unresolved at every one of 10 draws of 1,024 samples, and
    singular values twice apart (D_M four times apart) at none."""
    tied = [_linear_network([8, 4, 2, 2, 0.5, 0.25], 1024, seed) for seed in range(10)]
    apart = [_linear_network([8, 4, 2, 1, 0.5, 0.25], 1024, seed) for seed in range(10)]
    assert all(ib.eigenvalues["hook_in"].unresolved >= 1 for ib in tied)
    assert all(ib.dims["unresolved"].sum() == 0 for ib in apart)
    ib = tied[0]
    unresolved = int((ib.dims["unresolved"] > 0).sum())
    assert f"{unresolved} of 3 nodes with directions the data do not tell apart" in repr(ib)  # nodes, not pairs
