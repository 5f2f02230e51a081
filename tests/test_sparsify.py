"""Constructive sparsification (METHODS §8): exactness, counts, the copy, edges, refusals."""

from __future__ import annotations

import warnings

import pytest
import torch

import tl_degeneracy as tld
from tl_degeneracy.counts import SampleLimitedWarning
from tl_degeneracy.numerics import DataLimitedWarning
from tl_degeneracy.interaction.edges import edge_pass
from tl_degeneracy.interaction.runner import build_runner
from tl_degeneracy.models.toys.transformer import ToyTransformer
from tests.fixtures.hf import assert_state_unchanged, state_snapshot

EPS64 = torch.finfo(torch.float64).eps
# ReLU exactness: every step is a float64 linear solve or product over D + F = 640 terms, so the
# construction's own rounding is (D + F)·eps64 ≈ 1.4e-13 relative, times the condition of the
# eliminations (|A| ≈ 1 and block sub-matrices measured ≲ 1e3 here): ≲ 1.4e-10. A float32 step or a
# wrong relation would show ≥ 1e-7. Step 1 also inherits the rank rule's cut-off: directions with
# Gram eigenvalue below D·eps64·λ_max are eliminated although they carry up to √(that) of the signal
# (``eliminated_scale``), which bounds the extra error up to the |A|·|W| factors (10 allowed).
ROUNDING = 1e3 * 640 * EPS64


@pytest.fixture(scope="module")
def modadd():
    return tld.load_model("toy:modadd", dtype=torch.float64)


def _subsets():
    full = tld.toy_data("modadd")
    return {"first4": full[:4], "rand20": tld.toy_data("modadd", n=20, seed=1),
            "rand60": tld.toy_data("modadd", n=60, seed=2)}


@pytest.fixture(scope="module")
def results(modadd):
    return {name: (data, tld.sparsify(modadd, data)) for name, data in _subsets().items()}


def test_relu_exact_on_several_subsets(modadd, results):
    ranks = []
    for name, (data, res) in results.items():
        row = res.to_frame().iloc[0]
        ranks.append(int(row.input_rank))
        assert not res.approximate and res.tol == 0.0
        assert row.output_drift <= ROUNDING + 10 * row.eliminated_scale, name
        assert abs(row.kl) <= ROUNDING, name
        assert row.zeros_added >= row.free_directions > 0, name
        assert row.zeros_in_model >= row.activation_free, name  # step 1's zeros are stored
        # Rows (a, b, =) sharing a share position 0: first4's 12 positions are 9 distinct samples, which
        # rank 9 reaches, so that rank is the data's limit (audit 21b F2: as 12 samples, the model's).
        distinct = tld.token_batches(data, modadd).n_distinct_samples
        assert distinct == {"first4": 9}.get(name, distinct) and row.input_rank <= distinct, name
        assert bool(row.sample_limited) == (row.input_rank == distinct) == (name != "rand60"), name
    assert min(ranks) < 128  # a subset where the MLP input is low rank
    first4 = results["first4"][1].to_frame().iloc[0]
    assert first4.blocks > 0 and first4.sync_free > 0 and first4.eliminated_scale < 1e-6


def test_free_directions_are_the_package_counts(modadd, results):
    data, res = results["first4"]
    row = res.to_frame().iloc[0]
    # degeneracy_counts needs a norm before the MLP; modadd has none: the rank of the same Gram by
    # the same rule from activation_stats (the LayerNorm toy below checks against degeneracy_counts).
    stats = tld.activation_stats(modadd, data, hooks="blocks.0.hook_resid_mid", per_head=False, progress=False)
    rank = stats["blocks.0.hook_resid_mid"].rank(centered=False)
    assert row.input_rank == rank and row.activation_free == (128 - rank) * 512
    sync = tld.neuron_synchronization(modadd, data, tol=0.0).to_frame()
    assert row.blocks == len(sync)
    assert row.sync_free == int(sync["extra_freedom"].sum())


def test_free_directions_carry_the_cut_off_band_and_the_data_check(results):
    """Audit 8b: sparsify printed its free directions as one number where the MLP input's spectrum
    decays through the cut-off without a gap (toy:modadd in float32: 32,800 free directions, 17,440 in
    float64 with the same weights), and without the split-half check degeneracy_counts makes. The band
    is the rank rule's at the cut-off moved CUTOFF_BAND-fold, recomputed here from the same Gram;
    data_limited says whether the even-numbered sequences alone give a lower rank."""
    from tl_degeneracy.numerics import DataLimitedWarning, rank_band
    from tl_degeneracy.stats.accumulators import descending_eigvalsh

    model = tld.load_model("toy:modadd")  # float32: the cut-off falls where the spectrum has no gap
    data = tld.toy_data("modadd")[:64]
    with pytest.warns(DataLimitedWarning, match="still growing with the data"):
        row = tld.sparsify(model, data).to_frame().iloc[0]
    stats = tld.activation_stats(model, data, hooks="blocks.0.hook_resid_mid", per_head=False, progress=False)
    spectrum = descending_eigvalsh(stats["blocks.0.hook_resid_mid"].gram).clamp_min(0)
    low, rank, high = rank_band(spectrum, 128, precision=torch.float32, gram=True)
    assert (row.input_rank_min, row.input_rank, row.input_rank_max) == (low, rank, high) and low < rank < high
    assert row.free_min == (128 - high) * 512 + row.sync_free < row.free_directions
    assert row.free_max == (128 - low) * 512 + row.sync_free > row.free_directions
    half = tld.activation_stats(model, data[0::2], hooks="blocks.0.hook_resid_mid", per_head=False, progress=False)
    assert row.data_limited == (half["blocks.0.hook_resid_mid"].rank(centered=False) < rank) and row.data_limited
    assert row.sync_exact and row.kl >= 0
    # a float64 model on data that span the MLP input's used directions in both halves: nothing flagged
    for name, (_, res) in results.items():
        frame = res.to_frame()
        assert (frame["input_rank_min"] <= frame["input_rank"]).all() and (frame["input_rank"] <= frame["input_rank_max"]).all()
        assert (frame["kl"] >= 0).all(), name


def test_original_untouched_and_copy_hooks(modadd):
    data = _subsets()["first4"]
    before = state_snapshot(modadd)
    res = tld.sparsify(modadd, data)
    assert_state_unchanged(modadd, before)
    copy = res.model
    assert type(copy) is type(modadd) and copy is not modadd
    basis = res.bases[0]
    assert len(basis.eliminated) == 128 - res.to_frame().iloc[0].input_rank
    assert torch.equal(copy.blocks[0].mlp.W_in[basis.eliminated], torch.zeros_like(copy.blocks[0].mlp.W_in[basis.eliminated]))
    posts = {}

    def keep(tag):
        def hook(act, hook):
            posts[tag] = act.detach()
        return hook

    modadd.run_with_hooks(data, fwd_hooks=[("blocks.0.mlp.hook_post", keep("orig"))])
    copy.run_with_hooks(data, fwd_hooks=[("blocks.0.mlp.hook_post", keep("new"))])
    mapped = basis.map_hidden(posts["orig"])
    scale = float(posts["orig"].abs().max())
    assert float((mapped - posts["new"]).abs().max()) <= ROUNDING * scale
    # The input relation holds on the data: x_J = x_K A + offset (offset 0: modadd has no b_in).
    x = {}
    modadd.run_with_hooks(data, fwd_hooks=[("blocks.0.hook_resid_mid", lambda a, hook: x.setdefault("x", a.detach()))])
    xs = x["x"].reshape(-1, 128)
    assert not basis.offset.any()
    err = (xs[:, basis.eliminated] - xs[:, basis.kept] @ basis.relation - basis.offset).abs().max()
    assert float(err) <= ROUNDING * float(xs.abs().max())


def test_zero_edges_at_least_free_directions(results):
    """The §5 edge formula between the MLP input and hidden layer of the sparsified model, evaluated
    in the sparsified model's coordinates (the input as stored, the hidden layer in the paper's basis
    ``bases[0].paper_hidden``): at least one exactly-zero edge per free direction counted. (The §5
    interaction *basis* itself is invariant under any invertible re-parametrisation of a node layer,
    so it is the same for the original and the sparsified model and cannot show the new zeros.)"""
    for name in ("first4", "rand20"):
        data, res = results[name]
        model, basis = res.model, res.bases[0]
        nodes = ["blocks.0.hook_resid_mid", "blocks.0.mlp.hook_post"]
        runner = build_runner(model, data, nodes, batch_size=64, seq_len=None, skip_bos=None)
        D, F = 128, 512
        B = basis.hidden_basis
        C = {nodes[0]: torch.eye(D, dtype=torch.float64), nodes[1]: B.T}
        C_inv = {nodes[0]: torch.eye(D, dtype=torch.float64), nodes[1]: torch.linalg.inv(B).T}
        mean = {n: torch.zeros(C[n].shape[1], dtype=torch.float64) for n in nodes}
        # counts only divide E; which entries are exactly zero does not depend on them
        ep = edge_pass(runner.engine, runner.batches, runner.nodes, C, C_inv, mean, {n: 1 for n in nodes},
                       progress=False)
        edges = ep.edges[nodes[0], nodes[1]]
        assert edges.shape == (F, D)
        row = res.to_frame().iloc[0]
        # zeros of the stored [W_in; b_in] give exactly zero input–hidden edges ...
        assert int((edges == 0).sum()) >= row.zeros_in_model - row.zeros_out >= row.activation_free, name
        # ... those of the paper's basis are zero in exact arithmetic and computed as Σ_k W_jk r_k B_ki
        # x_j in float64: relative error ROUNDING at most, so E (a square) at most ROUNDING² of the
        # largest edge, 1e-20, far below any edge that is not zero. A removed neuron (f ≡ 0, W_out row
        # 0) adds D zero hidden–output pairs (zeros_out): with them, one zero per free direction.
        removed = basis.hidden_map.abs().sum(0) == 0
        assert row.zeros_out == D * int(removed.sum()) == D * row.removed_neurons, name
        assert (model.blocks[0].mlp.W_out[removed.to(model.blocks[0].mlp.W_out.device)] == 0).all(), name
        zero_edges = int((edges <= ROUNDING**2 * edges.max()).sum())
        assert zero_edges + row.zeros_out >= row.free_directions, name


def test_gelu_reports_drift_and_kl():
    model = tld.load_model("toy:bytelm")
    data = tld.toy_data("bytelm")[:4]
    res = tld.sparsify(model, data, tol=0.05, seq_len=32)
    frame = res.to_frame()
    assert res.approximate and frame.attrs["approximate"]
    assert list(frame["layer"]) == [0, 1]
    # its GELU blocks are no copies: their counts are upper estimates, which sync_exact says (it read True)
    assert frame["blocks"].sum() > 0 and (frame["sync_exact"] == (frame["blocks"] == 0)).all()
    assert frame["output_drift"].notna().all() and frame["kl"].notna().all()
    # float32 model: step 1 is exact up to the float32 rank rule's cut-off (eliminated_scale ≈ 1e-5)
    assert 0 <= res.output_drift < 1e-3 and 0 <= res.kl + 1e-7 < 1e-4
    assert (frame["zeros_added"] >= frame["free_directions"]).all()


def test_relu_layernorm_with_biases_exact():
    """LayerNorm (gain and bias before W_in) and MLP biases (the bias row may take the identity)."""
    model = ToyTransformer(n_layers=2, d_model=16, n_heads=2, d_head=8, d_mlp=32, d_vocab=11, n_ctx=8,
                           act_fn="relu", seed=3).double().eval()
    with torch.no_grad():  # non-trivial norm gains and biases
        for block in model.blocks:
            block.ln2.w.mul_(1.5).add_(0.1)
            block.ln2.b.add_(0.2)
            block.mlp.b_in.normal_(0, 0.3)
    data = torch.randint(0, 11, (3, 4), generator=torch.Generator().manual_seed(0))
    with pytest.warns(SampleLimitedWarning, match="2 of 2 MLP inputs"):
        res = tld.sparsify(model, data)
    frame = res.to_frame()
    # 12 samples < D = 16 span an affine space of dimension 11 (W_in has a bias, so the covariance counts,
    # METHODS §8): the eliminated inputs are the data's limit, and flagged
    assert (frame["input_rank"] == 11).all() and frame["sample_limited"].all()
    assert (frame["output_drift"] <= ROUNDING + 10 * frame["eliminated_scale"]).all()
    assert (frame["zeros_added"] >= frame["free_directions"]).all()
    # The affine relation x_J = x_K A + offset holds on the data (the copy's b_in absorbed offset @ W_J:
    # without it the drift above would be of the order of the offsets).
    _, cache = model.run_with_cache(data)
    for layer, basis in enumerate(res.bases):
        ln = model.blocks[layer].ln2  # hook_normalized is x/σ, before the gain and bias
        xs = (cache[f"blocks.{layer}.ln2.hook_normalized"] * ln.w + ln.b).reshape(-1, 16)
        assert float(basis.offset.abs().max()) > 0.1  # the norm's bias: x is far from a linear subspace
        err = (xs[:, basis.eliminated] - xs[:, basis.kept] @ basis.relation - basis.offset).abs().max()
        assert float(err) <= ROUNDING * float(xs.abs().max())
    with pytest.warns(SampleLimitedWarning):
        counts = tld.degeneracy_counts(model, data, n_probes=1, progress=False)
    w_in = counts[counts["map"] == "W_in"]
    assert list(frame["input_rank"]) == list(w_in["rank_G"])
    assert list(frame["activation_free"]) == list((w_in["d_in"] - w_in["rank_G"]) * w_in["d_out"])


def test_gated_mlp_refused(tl_models):
    from tests.fixtures.hf import tl_major_version

    backend = "hooked_transformer" if tl_major_version() < 4 else "bridge"
    model = tl_models("llama", backend)
    with pytest.raises(ValueError, match="gated"):
        tld.sparsify(model, torch.randint(0, 50, (2, 6)))


def test_bad_input(modadd):
    data = _subsets()["first4"]
    with pytest.raises(ValueError, match="tol"):
        tld.sparsify(modadd, data, tol=2.0)
    with pytest.raises(tld.DataError):
        tld.sparsify(modadd, torch.zeros(0, 3, dtype=torch.long))
    with pytest.raises(TypeError):
        tld.sparsify(torch.nn.Linear(3, 3), data)


def test_report_section(modadd):
    from tl_degeneracy.report.sections import glossary, verdict

    data = _subsets()["first4"]
    quick = tld.degeneracy_report(modadd, data, sections=["sparsity"], progress=False)
    assert quick["sparsity"].status == "ok" and "sparsity=true" in quick["sparsity"].headline
    assert verdict(quick["sparsity"]).startswith("not run in this preset")
    from tl_degeneracy.report.html import render_html, section_status

    # audit 15b F14: a section its preset does not run showed a green "ok"
    assert section_status(quick["sparsity"]) == "off" and '<span class="badge off">off</span>' in render_html(quick)
    report = tld.degeneracy_report(modadd, data, sections=["sparsity"], progress=False, overrides={"sparsity": True})
    section = report["sparsity"]
    assert section.status == "ok" and section_status(section) == "ok", section.reason
    frame = section.tables["layers"]
    assert list(frame["layer"]) == [0] and section.values["zeros_added"] >= section.values["free_directions"] > 0
    assert "sparsity" in section.figures
    assert verdict(section).startswith("at least one non-interacting pair per free direction")
    # Audit 8b: the headline printed only zeros_added, which counts zeros of the paper's hidden basis too
    assert f"({section.values['zeros_in_model']:,} in the copy's stored weights)" in section.headline
    assert section.values["data_limited_layers"] == int(frame["data_limited"].sum()) == 1
    assert "still growing with the data" in verdict(section)
    # the verdict says "exact" only with what bounds the drift: the input directions and neuron
    # combinations the rank rule dropped (audit 10a: the latter were left out)
    scale = max(float(frame["eliminated_scale"].max()), float(frame["removed_residual"].max()))
    assert section.values["eliminated_scale"] == float(frame["eliminated_scale"].max())
    assert (f"≤ {scale:.2g} of their signal" in verdict(section)) == (scale > 0)
    assert "on these data the copy is exact up to rounding" in verdict(section)
    assert [t for t, *_ in glossary(section)] == ["free (counts)", "synchronized block", "zeros added", "output drift"]


# ---------------------------------------------------------------------------------------------- audit 10a
def _hand_block(c: float = 1.0) -> ToyTransformer:
    """A float64 ReLU toy without norms whose neurons 0, 1, 2 read one input coordinate a that is
    positive everywhere: p0 = x_a + 1, p1 = 2x_a + 3, p2 = p0 + p1, so they fire on every sample and
    form one block of rank s = 2 (one removable neuron). Neurons 0 and 2 are then rescaled by c
    (W_in column and b_in × c, W_out row ÷ c): for ReLU the same function."""
    D, F, V, T, a = 16, 24, 13, 10, 3
    model = ToyTransformer(n_layers=1, d_model=D, n_heads=2, d_head=8, d_mlp=F, d_vocab=V, n_ctx=T, act_fn="relu",
                           normalization=None, seed=5).double().eval()
    with torch.no_grad():
        model.embed.W_E[:, a] = 5 + 0.5 * torch.randn(V, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        model.pos_embed.W_pos[:, a] = 0
        model.blocks[0].attn.W_O[:, :, a] = 0
        model.blocks[0].attn.b_O[a] = 0
        mlp = model.blocks[0].mlp
        mlp.W_in[a, :] = 0
        mlp.b_in.zero_()
        mlp.W_in[:, :3] = 0
        mlp.W_in[a, :2] = torch.tensor([1.0, 2.0], dtype=torch.float64)
        mlp.b_in[:2] = torch.tensor([1.0, 3.0], dtype=torch.float64)
        mlp.W_in[:, 2], mlp.b_in[2] = mlp.W_in[:, 0] + mlp.W_in[:, 1], mlp.b_in[0] + mlp.b_in[1]
        mlp.W_out[:3] *= 10  # the block matters for the logits
        for j in (0, 2):
            mlp.W_in[:, j] *= c
            mlp.b_in[j] *= c
            mlp.W_out[j] /= c
    return model


def test_rescaled_relu_neurons_change_no_count_and_no_removal():
    """Audit 10a F4: s and I were decided relative to the block's largest eigenvalue, so rescaling two
    neurons of an exact s = 2 block by 10⁻⁶ (the same function) read s = 1, 32 free directions for 19
    and removed a neuron more, drift 2.9·10⁻³ labelled exact. On the neurons' correlations nothing moves."""
    data = torch.randint(0, 13, (40, 10), generator=torch.Generator().manual_seed(1))
    seen = []
    for c in (1.0, 1e-6, 1e-8):
        model = _hand_block(c)
        sync = tld.neuron_synchronization(model, data, tol=0.0).to_frame()
        row = tld.sparsify(model, data).to_frame().iloc[0]
        seen.append((list(sync["s_block"]), list(sync["extra_freedom"]), row.removed_neurons, row.free_directions))
        # an exact combination: the residual below the Gram's resolution reads that resolution, a
        # bound (audit 15a: reading 0 there called a real residual of 2.9·10⁻⁷ rounding)
        assert row.output_drift <= ROUNDING and row.removed_residual == pytest.approx((24 * 2.0 ** -52) ** 0.5), c
    assert seen[0] == ([2], [19], 1, 19) and seen.count(seen[0]) == 3


def test_gelu_neurons_with_parallel_inputs_get_no_change_of_basis():
    """Audit 10a F1: GELU(p) and GELU(2p) are independent post-activations of parallel input weights:
    the block's s = 2 exceeds the rank of its [W̃; b] columns, C was the inverse of a singular matrix
    (entries 4.5·10¹⁵) and two zeros were counted that cannot exist (float32: a bare LinAlgError). The
    block now keeps its basis, adds no zeros and says so."""
    from tl_degeneracy.synchronization import SyncCountWarning

    D, F, V, T = 16, 32, 13, 10
    data = torch.randint(0, V, (40, T), generator=torch.Generator().manual_seed(1))
    for dtype in (torch.float64, torch.float32):
        model = ToyTransformer(n_layers=1, d_model=D, n_heads=2, d_head=8, d_mlp=F, d_vocab=V, n_ctx=T, act_fn="gelu",
                               seed=3).to(dtype).eval()
        with torch.no_grad():
            mlp = model.blocks[0].mlp
            mlp.W_in.mul_(50)  # pre-activations of order 1: GELU is not linear there
            mlp.b_in.copy_(0.5 * torch.randn(F, generator=torch.Generator().manual_seed(2)))
            mlp.W_in[:, 1], mlp.b_in[1] = 2 * mlp.W_in[:, 0], 2 * mlp.b_in[0]
        sync = tld.neuron_synchronization(model, data, tol=0.05)
        assert [0, 1] in sync.blocks[0] and sync.block_rank(0, [0, 1]) == 2
        with pytest.warns(SyncCountWarning, match="span fewer directions than their post-activations"):
            res = tld.sparsify(model, data)
        row = res.to_frame().iloc[0]
        assert row.blocks_without_basis == 1 and row.blocks_in_basis == row.blocks_in_model == 0
        assert row.zeros_added == row.zeros_in_model  # no zero that lives nowhere
        assert torch.equal(res.bases[0].hidden_basis, torch.eye(F, dtype=torch.float64))


def test_gelu_bridge_of_the_test_checkpoint_runs(hf_dirs):
    """Audit 10a F2: the tests' own tiny GPT-2 (GELU) failed in sparsify with 'linalg.inv: A must be
    batches of square matrices, but they are 32 by 74' (a block of 74 neurons with 32 rows to take an
    identity), in both bridge modes; the report's sparsity section failed with it."""
    from tests.fixtures.hf import boot_bridge
    from tl_degeneracy.synchronization import SyncCountWarning

    tokens = torch.randint(3, 100, (16, 12), generator=torch.Generator().manual_seed(0))
    with pytest.warns(SyncCountWarning):
        frame = tld.sparsify(boot_bridge(hf_dirs["gpt2"]), tokens).to_frame()
    assert (frame["blocks_without_basis"] > 0).any() and (frame["output_drift"] < 1e-5).all()


def test_blocks_formed_otherwise_on_half_of_the_data_are_flagged():
    """Audit 10a F3: 205 neurons were removed from 4 blocks that half of the 8 sequences form otherwise,
    unflagged, the verdict "exact up to rounding"; off the data the copy drifted by 0.75."""
    from tl_degeneracy.numerics import DataLimitedWarning
    from tl_degeneracy.report.sections import verdict

    D, F, V, T = 8, 256, 40, 12
    model = ToyTransformer(n_layers=1, d_model=D, n_heads=2, d_head=4, d_mlp=F, d_vocab=V, n_ctx=T, act_fn="relu",
                           seed=3).double().eval()
    with torch.no_grad():
        mlp = model.blocks[0].mlp
        mlp.W_in.mul_(50)
        mlp.b_in.fill_(-7.0)  # each neuron fires on ~1 % of positions
    data = torch.randint(0, V, (8, T), generator=torch.Generator().manual_seed(1))
    changing = tld.neuron_synchronization(model, data, tol=0.0).changing_blocks
    with pytest.warns(DataLimitedWarning, match=r"synchronized blocks are formed otherwise .*\(column blocks_changing\)"):
        row = tld.sparsify(model, data).to_frame().iloc[0]
    assert row.blocks_changing == changing > 0 and row.removed_neurons > 0
    report = tld.degeneracy_report(model, data, sections=["sparsity"], progress=False, overrides={"sparsity": True})
    assert "formed otherwise on half of the data" in verdict(report["sparsity"])
    one = tld.degeneracy_report(model, data[:1], sections=["sparsity"], progress=False, overrides={"sparsity": True})
    assert "one sequence: whether the ranks and blocks still change with the data was not checked" in verdict(one["sparsity"])


def test_the_firing_check_reads_every_kept_neuron_of_the_block():
    """Audit 10a F5: with tol > 0 a block's own neurons may fire apart; the check compared the new
    neurons with the block's first neuron only and wrote such a block into the copy (drift 6.8·10⁻²).
    Here p1 = 2x_a − c is off on the tokens with the smallest x_a, p0 = x_a + 1 never, and the new
    neurons (x_a and 1) are on everywhere."""
    model = _hand_block()
    data = torch.randint(0, 13, (40, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        mlp = model.blocks[0].mlp
        mlp.W_in[:, 2], mlp.b_in[2] = 0.0, 0.0  # the third neuron out of the way (it never fires)
        mlp.b_in[1] = -2 * float(model.embed.W_E[:, 3].sort().values[1]) + 1e-3
    post = []
    model.run_with_hooks(data, fwd_hooks=[("blocks.0.mlp.hook_pre", lambda x, hook: post.append(x))])
    fires = (post[0][..., :2] > 0).double().mean((0, 1))
    assert fires[0] == 1.0 and 0.5 < fires[1] < 1.0
    assert any({0, 1} <= set(block) for block in tld.neuron_synchronization(model, data, tol=0.1).blocks[0])
    row = tld.sparsify(model, data, tol=0.1).to_frame().iloc[0]
    assert row.blocks_in_model == 0 and row.blocks_in_basis == 1 and row.output_drift <= ROUNDING


def test_a_removed_neuron_residual_bounds_its_drift():
    """Audit 15a: in float64 a neuron removed as 2 × another to 2.9·10⁻⁷ of its signal read
    removed_residual 0 (the rank rule's floor zeroed it), and its drift of 2.8·10⁻⁷ was called
    rounding. The residual below the Gram's resolution now reads that resolution, a bound on the true
    residual (relative RMS of f₁ − β f₀ on the data)."""
    D, F, V, T = 16, 512, 13, 10
    model = ToyTransformer(n_layers=1, d_model=D, n_heads=2, d_head=8, d_mlp=F, d_vocab=V, n_ctx=T, act_fn="relu",
                           normalization=None, seed=5).double().eval()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        mlp = model.blocks[0].mlp
        mlp.b_in.normal_(0, 0.01, generator=g)
        mlp.W_in[:, 1] = 2 * mlp.W_in[:, 0] + 2e-7 * mlp.W_in[:, 0].norm() * torch.randn(D, dtype=torch.float64, generator=g)
        mlp.b_in[1] = 2 * mlp.b_in[0]
        mlp.W_out[:2] *= 300.0
    data = torch.randint(0, V, (40, T), generator=g)
    _, cache = model.run_with_cache(data)
    f = cache["blocks.0.mlp.hook_post"].reshape(-1, F)
    beta = (f[:, 0] @ f[:, 1]) / (f[:, 0] @ f[:, 0])
    true = float((f[:, 1] - beta * f[:, 0]).norm() / f[:, 1].norm())
    result = tld.sparsify(model, data, progress=False)
    row = result.to_frame().iloc[0]
    assert float(result.bases[0].hidden_map[:, 1].abs().sum()) == 0  # neuron 1 removed
    assert row.output_drift > ROUNDING and true > 1e-7  # not rounding: the residual's
    assert row.removed_residual == pytest.approx((F * 2.0 ** -52) ** 0.5) and row.removed_residual >= true


def test_one_dead_neuron_is_removed_as_several_are():
    """Audit 15a: a neuron that never fires formed a block of one, which was skipped, while two dead
    neurons formed a block of rank 0 and were both removed."""
    data = torch.randint(0, 13, (24, 10), generator=torch.Generator().manual_seed(0))
    removed = {}
    for dead in ([2], [2, 5]):
        model = ToyTransformer(n_layers=1, d_model=16, n_heads=2, d_head=8, d_mlp=64, d_vocab=13, n_ctx=16,
                               act_fn="relu", normalization="LN", seed=3).double().eval()
        with torch.no_grad():
            model.blocks[0].mlp.b_in[dead] = -100.0
        # audit 19a F3: no half-data check sees a neuron silent on all of the data; the removal says so
        with pytest.warns(DataLimitedWarning, match=f"{len(dead)} of the removed neurons never fire on these data"):
            result = tld.sparsify(model, data, progress=False)
        row = result.to_frame().iloc[0]
        removed[len(dead)] = row.removed_neurons
        assert row.removed_silent == len(dead)
        assert all(float(result.bases[0].hidden_map[:, j].abs().sum()) == 0 for j in dead)
        assert row.zeros_out == 16 * len(dead) and row.removed_residual == 0.0 and row.output_drift <= ROUNDING
    assert removed == {1: 1, 2: 2}


def test_a_half_precision_copy_says_that_its_rewritten_weights_are_rounded():
    """Audit 19a F4: a bfloat16 model's copy drifted 9·10⁻³ from rounding its rewritten weights where
    the construction itself changed nothing measurable (float32: 3·10⁻⁷), with no word of it."""
    model = ToyTransformer(n_layers=1, d_model=16, n_heads=2, d_head=8, d_mlp=32, d_vocab=13, n_ctx=16,
                           act_fn="relu", normalization="LN", seed=3).to(torch.bfloat16).eval()
    data = torch.randint(0, 13, (24, 10), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tld.sparsify(model, data, progress=False)
    assert any(issubclass(w.category, RuntimeWarning) and "stores its weights in bfloat16" in str(w.message)
               and "model.float()" in str(w.message) for w in caught)
    # Review 47 F6: the dtype's HalfPrecisionWarning came from two lines inside the package, so it was
    # shown twice; it names the caller's line now, where Python shows it once.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        tld.sparsify(model, data, progress=False)
    half = [w for w in caught if issubclass(w.category, tld.HalfPrecisionWarning) and "computes in bfloat16" in str(w.message)]
    assert len(half) == 1 and half[0].filename == __file__
