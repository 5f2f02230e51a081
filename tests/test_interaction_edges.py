"""Interaction edges (METHODS §5, squared formula): forward-mode (JVP) and reverse-mode (VJP) edges
both equal a brute-force torch.func.jacrev reference (transformer with padding and a skipped BOS;
a HookedRootModule MLP), "auto" picks the cheaper mode per pair, a model without forward-mode
derivatives falls back to reverse mode, ±1 position sources are unbiased and converge like
r^{-1/2}, and one source is exact for a single output position."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from tests.fixtures.toys import make_tiny_toy_transformer
from tests.interaction_models import HookedMLP, mlp_inputs
from tl_degeneracy.data import token_batches
from tl_degeneracy.interaction import interaction_basis
from tl_degeneracy.interaction.edges import edge_pass
from tl_degeneracy.interaction.runner import build_runner
from tl_degeneracy.models.toys.sma import SparseModularAddition

MLP_NODES = ["hook_in", "hook_h0", "hook_h1", "hook_out"]


def rel(a, b) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def tiny_toy():
    model = make_tiny_toy_transformer().double()
    model.tokenizer = types.SimpleNamespace(bos_token_id=1, pad_token_id=0)
    return model


def ragged(model):
    g = torch.Generator().manual_seed(11)
    seqs = [torch.randint(2, 20, (n,), generator=g) for n in (6, 4)]
    return token_batches(seqs, model, batch_size=2, prepend_bos=True)


def recompute(model, data, ib, batch_size=32, **kw):
    """edge_pass on the bases of ``ib`` (same nodes, data and batches), with ``kw`` (mode, sources, seed)."""
    runner = build_runner(model, data, ib.nodes, batch_size, None, None)
    return edge_pass(runner.engine, runner.batches, runner.nodes, ib.basis, ib.inverse, ib.mean, ib.counts,
                     progress=False, **kw)


def reference_edges(ib, a, b, J, fa, mask):
    """E_ij = (1/n_a) Σ_x Σ_t (Σ_s ∂f̂^b_{t,i}/∂f̂^a_{s,j} f̂^a_{s,j})² from the per-sequence
    Jacobian J [x, t, D_b, s, D_a] of node b's activation with respect to node a's."""
    Jhat = torch.einsum("id,xtdse,ej->xtisj", ib.basis[b], J, ib.inverse[a])
    fhat = ib.transform(fa, a) * mask[:, :, None]
    A = torch.einsum("xtisj,xsj->xtij", Jhat, fhat)
    return torch.einsum("xt,xtij->ij", mask.double(), A.square()) / int(mask.sum())


def transformer_reference(model, ib, tokens, mask, a, b):
    """``reference_edges`` with J from torch.func.jacrev through the model's hooks."""
    _, cache = model.run_with_cache(tokens, names_filter=[a, b])
    fa0 = cache[a]

    def node_b(fa):
        store = {}
        model.run_with_hooks(tokens, fwd_hooks=[(a, lambda act, hook: fa), (b, lambda act, hook: store.__setitem__("b", act))])
        return store["b"].flatten(2)

    J = torch.func.jacrev(node_b)(fa0)  # [B, Pb, Db, B, Pa, Da]
    return reference_edges(ib, a, b, torch.einsum("xtdxse->xtdse", J), fa0, mask)  # sequences do not interact


def mlp_reference(model, ib, x, a, b):
    """``reference_edges`` for a position-free MLP: one position per sample, J per sample."""
    _, cache = model.run_with_cache(x, names_filter=[a, b])
    fa0 = cache[a]

    def node_b(fa, xi):
        store = {}
        model.run_with_hooks(xi[None], fwd_hooks=[(a, lambda act, hook: fa[None]), (b, lambda act, hook: store.__setitem__("b", act))])
        return store["b"][0]

    J = torch.vmap(torch.func.jacrev(node_b))(fa0, x)  # [n, Db, Da]
    mask = torch.ones(x.shape[0], 1, dtype=torch.bool)
    return reference_edges(ib, a, b, J[:, None, :, None, :], fa0[:, None], mask)


@pytest.mark.parametrize("kind", ["local", "global"])
def test_forward_and_reverse_edges_equal_jacrev_reference_with_padding(kind):
    model = tiny_toy()
    tb = ragged(model)
    batch = tb.batch(0)
    assert not batch.mask.all()  # padding and a skipped BOS are both present
    ib = interaction_basis(model, tb, kind=kind, exact=True, progress=False)
    assert set(ib.settings["edge_modes"].values()) == {"forward"}  # kept_l ≤ P·kept_{l+1}: JVPs are cheaper
    reverse = recompute(model, tb, ib, batch_size=2, mode="reverse")
    assert set(reverse.modes.values()) == {"reverse"}
    for a, b in ib.edges:
        ref = transformer_reference(model, ib, batch.tokens, batch.mask, a, b)
        assert (ib.edges[a, b] >= 0).all() and rel(ib.edges[a, b], ref) < 1e-10, (a, b)
        assert rel(reverse.edges[a, b], ref) < 1e-10, (a, b)


def test_mlp_edges_equal_jacrev_reference_in_both_modes_and_auto_picks_the_cheaper():
    """HookedRootModule MLP 6 → 9 → 2 → 3 in PCA coordinates (kept 6, 9, 2, 2): for h0 → h1 (one
    position) reverse mode needs 2 VJPs per batch against 9 JVPs, so "auto" takes it there and
    forward mode elsewhere. (LIB and global bases keep no more directions at node l than at l+1
    for one position, so there "auto" is always forward.)"""
    model, x = HookedMLP([6, 9, 2, 3]), mlp_inputs(40, 6)
    ib = interaction_basis(model, x, kind="pca", nodes=MLP_NODES, batch_size=16, progress=False)
    assert ib.dims.interaction_rank.tolist() == [6, 9, 2, 2]
    assert list(ib.settings["edge_modes"].values()) == ["forward", "reverse", "forward"]
    forced = {m: recompute(model, x, ib, batch_size=16, mode=m) for m in ("forward", "reverse")}
    for a, b in ib.edges:
        ref = mlp_reference(model, ib, x, a, b)
        for e in (ib.edges[a, b], forced["forward"].edges[a, b], forced["reverse"].edges[a, b]):
            assert rel(e, ref) < 1e-10, (a, b)


class _TanhNoForwardAD(torch.autograd.Function):
    """tanh with a backward formula only: no forward-mode derivative, no functorch support."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y * y)


def test_model_without_forward_mode_derivatives_falls_back_to_reverse_mode():
    model, x = HookedMLP([4, 5, 5, 6], act=_TanhNoForwardAD.apply), mlp_inputs(24, 4)
    kw = dict(kind="local", output="mse", exact=True, nodes=MLP_NODES, batch_size=8, progress=False)
    with pytest.warns(RuntimeWarning, match="forward-mode derivatives failed"):
        ib = interaction_basis(model, x, **kw)
    assert set(ib.settings["edge_modes"].values()) == {"reverse"}
    plain = interaction_basis(HookedMLP([4, 5, 5, 6]), x, **kw)  # the same function with torch.tanh
    assert set(plain.settings["edge_modes"].values()) == {"forward"}
    for pair in ib.edges:
        assert rel(ib.edges[pair], plain.edges[pair]) < 1e-12, pair
    with pytest.raises(RuntimeError):
        recompute(model, x, ib, batch_size=8, mode="forward")


def test_one_source_is_exact_for_a_single_output_position():
    """SMA: resid_pre (12 positions) → resid_post (one per sequence): Σ_t has one term, so one ±1
    source gives the exact edges."""
    model = SparseModularAddition(p_max=4, d=4, d_mlp=8, seq_len=6, seed=2).double()
    toks = torch.randint(0, 4, (5, 6), generator=torch.Generator().manual_seed(13))
    exact = interaction_basis(model, toks, kind="local", exact=True, progress=False)
    one = recompute(model, toks, exact, mode="reverse", sources=1, seed=3)
    pair = ("blocks.0.hook_resid_pre", "blocks.0.hook_resid_post")
    assert one.modes[pair] == "reverse, 1 sources"
    assert rel(one.edges[pair], exact.edges[pair]) < 1e-12


def test_sources_are_unbiased_and_converge_like_inverse_sqrt():
    model = tiny_toy()
    toks = torch.randint(2, 20, (3, 8), generator=torch.Generator().manual_seed(5))
    exact = interaction_basis(model, toks, kind="local", exact=True, progress=False)
    pair = next(iter(exact.edges))
    ref = exact.edges[pair]
    sources, seeds, rms = [1, 4, 16], range(6), []
    for r in sources:
        runs = torch.stack([recompute(model, toks, exact, mode="reverse", sources=r, seed=s).edges[pair] for s in seeds])
        rms.append(float(np.sqrt(np.mean([rel(e, ref) ** 2 for e in runs]))))
        if r == 1:  # unbiased: the mean of R runs has 1/R of the single-run squared error (3× margin)
            single = float(((runs - ref) ** 2).sum((1, 2)).mean())
            assert float(((runs.mean(0) - ref) ** 2).sum()) < 3 * single / len(seeds)
    slope = np.polyfit(np.log(sources), np.log(rms), 1)[0]
    assert -0.8 <= slope <= -0.3, (slope, rms)


def test_source_estimates_do_not_depend_on_the_batches():
    """Each sequence draws its own signs (seeded by its number in the data), so cutting the data into
    batches differently moves the estimate only by rounding (METHODS §5); seeded by batch, batches of
    8 and 4 sequences differed by 24 %."""
    model = tiny_toy()
    seqs = [q[: 6 + i % 4] for i, q in enumerate(torch.randint(2, 20, (8, 10), generator=torch.Generator().manual_seed(3)))]
    ib = interaction_basis(model, seqs, kind="pca", edges=True, progress=False, batch_size=8)
    pair = next(iter(ib.edges))
    est = {bs: recompute(model, seqs, ib, batch_size=bs, mode="reverse", sources=2, seed=0).edges[pair] for bs in (8, 4, 3)}
    assert rel(est[4], est[8]) < 1e-10 and rel(est[3], est[8]) < 1e-10
    assert rel(est[8], ib.edges[pair]) > 1e-3  # an estimate, not the exact edges


def test_source_estimates_carry_their_standard_error():
    """r ≥ 2 sources: the standard error is the spread of the r one-source estimates over √r; the
    estimates of 6 seeds lie around the exact edges as that error says (|z| of ΣE within 3.5 for all),
    and exact pairs carry none."""
    model = tiny_toy()
    toks = torch.randint(2, 20, (3, 8), generator=torch.Generator().manual_seed(5))
    exact = interaction_basis(model, toks, kind="local", exact=True, progress=False)
    pair = next(iter(exact.edges))
    assert exact.edge_stderr == {} and (exact.edge_summary()["total_stderr"] == 0).all()
    z = []
    for seed in range(6):
        est = recompute(model, toks, exact, mode="reverse", sources=8, seed=seed)
        se, se_total = est.stderr[pair], est.total_stderr[pair]
        assert se.shape == est.edges[pair].shape and bool((se >= 0).all()) and se_total > 0
        z.append((float(est.edges[pair].sum()) - float(exact.edges[pair].sum())) / se_total)
    assert max(abs(v) for v in z) < 3.5, z
    one = recompute(model, toks, exact, mode="reverse", sources=1, seed=0)
    assert one.stderr[pair] is None and one.total_stderr[pair] is None  # one source: no spread to measure
    ib = interaction_basis(model, toks, kind="local", exact=True, edge_sources=2, progress=False)
    estimated = [p for p, m in ib.settings["edge_modes"].items() if m.startswith("reverse")]
    assert len(ib.edge_stderr) == len(estimated)
    summary = ib.edge_summary()
    assert summary["estimated"].sum() == len(estimated) and (summary.loc[summary["estimated"], "total_stderr"] > 0).all()
    # Audit 8b: a one-source estimate printed total_stderr 0.0, the value that means "exact"; a
    # narrowing pair (resid_mid → ln2's scale, one number per position) is where sources are cheaper
    nodes = ["blocks.0.hook_resid_pre", "blocks.0.hook_resid_mid", "blocks.0.ln2.hook_scale", "blocks.1.hook_resid_pre"]
    ib = interaction_basis(model, toks, kind="global", nodes=nodes, edge_sources=1, exact=True, progress=False)
    summary = ib.edge_summary()
    assert summary["estimated"].any() and summary.loc[summary["estimated"], "total_stderr"].isna().all()
    assert not summary["basis_estimated"].any() and (summary.loc[~summary["estimated"], "total_stderr"] == 0).all()
    # in bases estimated from probes no edge is exact: the sources' spread does not see the probes' noise
    probed = interaction_basis(model, toks, kind="global", nodes=nodes, edge_sources=1, exact=False, progress=False)
    summary = probed.edge_summary()
    assert summary["basis_estimated"].all() and summary["total_stderr"].isna().all()
    # and the JSON says what the summary says (audit 15a: to_dict kept the sources' finite spread there)
    for probes, exact_M in ((2, False), (8, True)):
        res = interaction_basis(model, toks, kind="global", nodes=nodes, edge_sources=2, exact=exact_M, n_probes=probes,
                                progress=False)
        rows = res.edge_summary().to_dict("records")
        for edge, row in zip(res.to_dict()["edges"], rows, strict=True):
            assert (edge["estimated"], edge["basis_estimated"]) == (row["estimated"], row["basis_estimated"])
            assert edge["total_stderr"] is None if np.isnan(row["total_stderr"]) else edge["total_stderr"] == row["total_stderr"]
            assert ("stderr" in edge) == (row["estimated"] and not row["basis_estimated"])
        assert any(edge["estimated"] for edge in res.to_dict()["edges"])


def test_auto_with_sources_is_exact_where_forward_mode_is_no_dearer():
    """kept_l ≤ r·kept_{l+1}: the source estimate would cost more VJPs than the exact JVPs."""
    model = tiny_toy()
    toks = torch.randint(2, 20, (3, 8), generator=torch.Generator().manual_seed(5))
    exact = interaction_basis(model, toks, kind="local", exact=True, progress=False)
    ib = interaction_basis(model, toks, kind="local", exact=True, edge_sources=1, progress=False)
    assert set(ib.settings["edge_modes"].values()) == {"forward"}
    for pair in exact.edges:
        assert rel(ib.edges[pair], exact.edges[pair]) < 1e-12


def test_bad_mode_is_refused():
    model = tiny_toy()
    toks = torch.randint(2, 20, (2, 5), generator=torch.Generator().manual_seed(5))
    ib = interaction_basis(model, toks, kind="pca", progress=False, edges=False)
    with pytest.raises(ValueError, match="mode must be one of"):
        recompute(model, toks, ib, mode="sideways")


def test_the_edges_of_each_half_of_the_data_are_those_of_its_sequences_alone():
    """Audit 23b F1: exact edges carried total_stderr 0 and nothing of the data's sampling error. The
    edges of the even- and odd-numbered sequences, in the whole data's bases, equal the jacrev reference
    on those sequences alone (each over its own samples), and sampling_stderr is what their totals imply."""
    model, x = HookedMLP([6, 9, 5, 3]), mlp_inputs(40, 6)
    ib = interaction_basis(model, x, kind="local", last="outputs", output="mse", exact=True, nodes=MLP_NODES,
                           batch_size=16, progress=False)
    halves = {"even": x[0::2], "odd": x[1::2]}  # one sample per sequence: the sequence numbers are the rows
    for a, b in ib.edges:
        even, odd = ib.edge_halves[a, b]
        for got, part in ((even, halves["even"]), (odd, halves["odd"])):
            assert rel(got, mlp_reference(model, ib, part, a, b)) < 1e-10, (a, b)
        n, n_even = ib.counts[a], ib.half_counts[a]
        assert (n_even, n) == (20, 40)
        assert rel(n_even * even + (n - n_even) * odd, n * ib.edges[a, b]) < 1e-12
    summary = ib.edge_summary().set_index(["source", "target"])
    for (a, b), (even, odd) in ib.edge_halves.items():
        row = summary.loc[(a, b)]
        assert row["total_stderr"] == 0.0  # the computation's error: none for exact edges
        assert row["total_even"] == pytest.approx(float(even.sum()), rel=1e-12)
        assert row["stderr_given_bases"] == pytest.approx(abs(float(even.sum() - odd.sum())) / 2, rel=1e-12)
        assert row["stderr_given_bases"] > 0
    # source estimates split their halves too: the halves' weighted mean is the estimate
    est = recompute(model, x, ib, batch_size=16, mode="reverse", sources=3, half_counts=ib.half_counts)
    for (a, b), (even, odd) in est.halves.items():
        assert rel((20 * even + 20 * odd) / 40, est.edges[a, b]) < 1e-12


@pytest.mark.parametrize("kind", ["pca", "global", "local"])
@pytest.mark.parametrize("which", ["mlp", "transformer"])
def test_each_half_of_the_data_in_its_own_bases_is_that_half_fitted_alone(kind, which):
    """Review 58 #1: the split-half error in the whole data's bases left out the bases' own sampling
    error, 8–10 times smaller than ΣE's spread over disjoint subsets of toy:modadd. ΣE of each half in
    the bases fitted to it (``edge_refit``) equals ΣE of ``interaction_basis`` run on that half alone
    (every node's basis is that half's Grams and Jacobian Grams; the odd half's come from the whole
    minus the even one; LIB's node l differentiates that half's own basis of node l+1, review 59:
    with the whole data's, ΣE spread up to 2.3 times the reported error), and ``sampling_stderr`` is
    what the two imply. The transformer's batches of 4 mix even and odd sequences."""
    if which == "mlp":
        model, x, nodes, kw = HookedMLP([6, 9, 5, 3]), mlp_inputs(40, 6), MLP_NODES, {"output": "mse"}
    else:
        model, nodes, kw = tiny_toy(), None, {"output": "kl", "skip_bos": False}
        x = torch.randint(2, 20, (24, 5), generator=torch.Generator().manual_seed(3))
    run = dict(kind=kind, exact=True, nodes=nodes, batch_size=4, progress=False, **kw)
    ib = interaction_basis(model, x, **run)
    summary = ib.edge_summary().set_index(["source", "target"])
    for h, part in enumerate((x[0::2], x[1::2])):
        alone = interaction_basis(model, part, **run)
        for (a, b), refit in ib.edge_refit.items():
            assert refit[h] == pytest.approx(float(alone.edges[a, b].sum()), rel=1e-9), (h, a, b)
    for (a, b), (even, odd) in ib.edge_refit.items():
        row = summary.loc[(a, b)]
        assert (row["refit_even"], row["refit_odd"]) == (even, odd)
        assert row["sampling_stderr"] == pytest.approx(abs(even - odd) / 2, rel=1e-12)


def test_edges_need_samples_to_average_over():
    """Audit 23b F6: counts of 0 were taken as 1, and E came out as a sum, n times too large."""
    model, x = HookedMLP([6, 9, 5, 3]), mlp_inputs(12, 6)
    ib = interaction_basis(model, x, kind="pca", nodes=MLP_NODES, batch_size=16, progress=False)
    runner = build_runner(model, x, ib.nodes, 16, None, None)
    with pytest.raises(Exception, match=r"no samples counted at node\(s\) \['hook_in'\]"):
        edge_pass(runner.engine, runner.batches, runner.nodes, ib.basis, ib.inverse, ib.mean,
                  {**ib.counts, "hook_in": 0}, progress=False)


def test_to_dict_is_strict_json_where_a_half_is_empty():
    """Review 58 #5: one sequence leaves the odd half empty, and to_dict carried NaN for the split-half
    columns (and probe_stability), which strict JSON refuses; they are None now, as in the modules'."""
    import json

    model = HookedMLP([6, 9, 5, 3])
    ib = interaction_basis(model, mlp_inputs(1, 6), kind="local", exact=True, nodes=MLP_NODES, output="mse", progress=False)
    d = json.loads(json.dumps(ib.to_dict(), allow_nan=False))
    assert all(edge["sampling_stderr"] is None and edge["total_odd"] is None for edge in d["edges"])
    assert all(row["probe_stability"] is None for row in d["dims"])  # exact M: no probe halves to compare
    assert ib.edge_summary()["sampling_stderr"].isna().all()  # the table keeps NaN
