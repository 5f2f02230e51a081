"""activation_stats and the float64 accumulators against naive run_with_cache computations."""

from __future__ import annotations

import pytest
import torch

from tests.fixtures.toys import make_tiny_toy_transformer
from tl_degeneracy.data import token_batches
from tl_degeneracy.errors import MissingHookError, NumericalError
from tl_degeneracy.models.toys.sma import SparseModularAddition
from tl_degeneracy.numerics import rank_rtol
from tl_degeneracy.stats import (
    ActivationStats, HookStats, MomentAccumulator, SampleIndex, activation_stats, numerical_rank,
)

# float64 models: statistics computed in one batch layout or another agree to float64 rounding,
# so 1e-10 (relative to the largest entry) checks the accumulation itself, not float32 noise.
TOL = 1e-10


def close(a, b, tol=TOL):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    scale = max(float(b.abs().max()), 1e-300)
    return float((a - b).abs().max()) <= tol * scale


def bos_model():
    """Tiny toy (float64) with the word-level test tokenizer: BOS = 1, pad = 0."""
    from tests.fixtures.hf import tiny_tokenizer

    model = make_tiny_toy_transformer(d_vocab=100).double()
    model.tokenizer = tiny_tokenizer()
    return model


def ragged_texts(n=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 12, (n,), generator=g).tolist()
    return [" ".join(f"w{int(i)}" for i in torch.randint(3, 100, (k,), generator=g)) for k in lengths]


def naive_rows(model, tokens_list, hooks, skip_first):
    """Sample rows per hook from running every sequence ALONE (no padding at all), via run_with_cache."""
    rows = {h: [] for h in hooks}
    for toks in tokens_list:
        _, cache = model.run_with_cache(toks[None], names_filter=list(hooks))
        for h in hooks:
            act = cache[h][0]  # [pos, *feature]
            rows[h].append(act[1:] if skip_first else act)
    return {h: torch.cat(r).flatten(1).double() for h, r in rows.items()}


def naive_moments(x):
    """count, mean, E[f fᵀ] and covariance from explicit float64 outer products."""
    n = x.shape[0]
    gram = sum(torch.outer(r, r) for r in x) / n
    mean = x.mean(0)
    cov = sum(torch.outer(r - mean, r - mean) for r in x) / n
    return n, mean, gram, cov


HOOKS = ["resid_pre", "blocks.1.hook_resid_mid", "v", "q", "mlp_post", "ln_final"]


def test_matches_naive_over_counted_positions_only():
    """Padding and BOS excluded exactly: same numbers as running each sequence alone, BOS dropped."""
    model = bos_model()
    tb = token_batches(ragged_texts(), model, batch_size=3, prepend_bos=True)
    assert tb.positions.skip_bos and len(tb) == 3
    st = activation_stats(model, tb, hooks=HOOKS, progress=False)
    seqs = tb.sequences
    assert st.positions == tb.positions
    naive = naive_rows(model, seqs, list(st), skip_first=True)
    for name, s in st.items():
        n, mean, gram, cov = naive_moments(naive[name])
        assert s.count == n == tb.n_samples and s.unit == "position"
        assert close(s.mean, mean), name
        if s.kind == "q":  # per-head blocks only
            H = s.n_heads
            d = s.feature_shape[1]
            blocks = torch.stack([gram[h * d : (h + 1) * d, h * d : (h + 1) * d] for h in range(H)])
            assert close(s.head_gram, blocks)
            with pytest.raises(ValueError, match="per-head"):
                s.gram
        else:
            assert close(s.gram, gram), name
            assert close(s.covariance(), cov), name
    # keeping BOS counts one more position per sequence, again exactly as the naive computation
    st_bos = activation_stats(model, token_batches(ragged_texts(), model, batch_size=3, prepend_bos=True, skip_bos=False),
                              hooks="resid_pre", progress=False)
    n, mean, gram, _ = naive_moments(naive_rows(model, seqs, ["blocks.0.hook_resid_pre"], skip_first=False)["blocks.0.hook_resid_pre"])
    assert st_bos["resid_pre", 0].count == n == tb.n_samples + tb.n_sequences
    assert close(st_bos["resid_pre", 0].gram, gram)


def test_multi_batch_equals_single_batch():
    model = make_tiny_toy_transformer().double()
    toks = torch.randint(0, 20, (9, 12), generator=torch.Generator().manual_seed(3))
    results = [activation_stats(model, toks, hooks=["resid_post", "z", "k"], batch_size=bs, progress=False) for bs in (9, 4, 1)]
    for other in results[1:]:
        for name, s in results[0].items():
            o = other[name]
            assert s.count == o.count == 9 * 12
            assert close(o.mean, s.mean)
            assert close(o.head_gram if s.kind == "k" else o.gram, s.head_gram if s.kind == "k" else s.gram)
            if s.kind != "k":
                assert close(o.covariance(), s.covariance())


def test_per_head_grams_are_blocks_of_the_cross_head_gram():
    model = make_tiny_toy_transformer().double()
    toks = torch.randint(0, 20, (5, 10), generator=torch.Generator().manual_seed(4))
    per = activation_stats(model, toks, hooks=["q", "v"], per_head=True, batch_size=2, progress=False)
    full = activation_stats(model, toks, hooks=["q", "v"], per_head=False, batch_size=2, progress=False)
    for name in per:
        f, p = full[name], per[name]
        H, d = f.feature_shape
        assert f.gram.shape == (H * d, H * d) and p.head_gram.shape == (H, d, d)
        blocks = torch.stack([f.gram[h * d : (h + 1) * d, h * d : (h + 1) * d] for h in range(H)])
        assert close(p.head_gram, blocks) and close(f.head_gram, blocks)
        assert close(p.head_covariance(), torch.stack([f.covariance()[h * d : (h + 1) * d, h * d : (h + 1) * d] for h in range(H)]))
        assert torch.equal(p.head_ranks(), f.head_ranks())
    # v keeps the cross-head Gram even with per_head=True (block ranks, METHODS §3)
    assert per["v", 0].has_full and not per["q", 0].has_full


def test_sequence_level_hooks_count_one_sample_per_sequence():
    """SMA toy: resid_pre has a position per token, attn_out/mlp_post/z one per sequence."""
    model = SparseModularAddition(p_max=4, d=4, d_mlp=8, seq_len=6, seed=1).double()
    toks = torch.randint(0, 4, (10, 6), generator=torch.Generator().manual_seed(5))
    st = activation_stats(model, toks, hooks=["resid_pre", "attn_out", "mlp_post", "z"], batch_size=4, progress=False)
    _, cache = model.run_with_cache(toks)
    for name, s in st.items():
        act = cache[name]
        rows = (act.flatten(0, 1) if s.unit == "position" else act[:, 0]).flatten(1).double()
        n, mean, gram, cov = naive_moments(rows)
        assert s.count == n and close(s.gram, gram) and close(s.mean, mean)
    assert st["resid_pre", 0].unit == "position" and st["resid_pre", 0].count == 60
    assert st["attn_out", 0].unit == "sequence" and st["attn_out", 0].count == 10


def test_sample_index_rules():
    tb = token_batches([[1, 2, 3], [4]], make_tiny_toy_transformer())
    index = SampleIndex.from_batch(tb.batch(0))
    act = torch.arange(2 * 3 * 2, dtype=torch.float64).reshape(2, 3, 2)
    assert index.unit(act.shape, "h") == "position"
    assert index.rows(act, "position").tolist() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert index.unit((2, 1, 2), "h") == "sequence" and index.count("sequence") == 2
    with pytest.raises(ValueError, match="position axis of length 2"):
        index.unit((2, 2, 5), "h")
    with pytest.raises(ValueError, match="batch=2"):
        index.unit((3, 3, 5), "h")


def test_non_finite_activations_name_hook_and_batch():
    model = make_tiny_toy_transformer()
    toks = torch.randint(0, 19, (8, 6), generator=torch.Generator().manual_seed(6))
    toks[5, 2] = 19
    with torch.no_grad():
        model.embed.W_E[19] = float("nan")  # only sequence 5 (batch 2 of size 2) meets it
    with pytest.raises(NumericalError, match=r"hook 'blocks\.0\.hook_resid_pre' in batch 2 \(sequences \[4, 5\]\)"):
        activation_stats(model, toks, hooks=["resid_pre", "mlp_out"], batch_size=2, progress=False)
    model = make_tiny_toy_transformer()
    with torch.no_grad():
        model.blocks[1].attn.W_V[0, 0, 0] = float("inf")
    with pytest.raises(NumericalError, match=r"blocks\.1\.attn\.hook_v.*batch 0"):
        activation_stats(model, toks[:4], hooks=["resid_pre", "v"], progress=False)


def test_refuses_patterns_and_unknown_hooks(tiny_toy_transformer, tiny_toy_tokens):
    with pytest.raises(ValueError, match="head_synchronization"):
        activation_stats(tiny_toy_transformer, tiny_toy_tokens, hooks=["attn_pattern"], progress=False)
    with pytest.raises(MissingHookError, match="neither a hook kind"):
        activation_stats(tiny_toy_transformer, tiny_toy_tokens, hooks=["blocks.0.hook_nothing"], progress=False)


def test_result_summaries(tiny_toy_transformer, tiny_toy_tokens):
    st = activation_stats(tiny_toy_transformer, tiny_toy_tokens, hooks=["resid_pre", "q", "ln_final"], center=True, progress=False)
    frame = st.to_frame()
    assert list(frame.columns) == ["hook", "kind", "layer", "unit", "dim", "count", "distinct", "rank", "rtol",
                                   "half_precision", "sample_limited", "trace"]
    # sequences 0 and 2 both begin with token 4: under causal attention one sample at position 0
    assert frame["count"].tolist() == [36] * 5 and frame["distinct"].tolist() == [35] * 5
    assert frame["dim"].tolist() == [16, 16, 16, 16, 16]
    assert frame["rank"].isna().tolist() == [False, False, True, True, False]  # q: per-head only
    s = st["resid_pre", 1]
    ev = s.eigenvalues()  # centred (center=True)
    assert torch.all(ev[:-1] >= ev[1:])
    assert close(ev, torch.linalg.eigvalsh(s.covariance()).flip(0), 1e-12)
    assert close(s.trace(), s.covariance().trace(), 1e-12) and close(s.trace(centered=False), s.gram.trace(), 1e-12)
    heads = st.to_frame(per_head=True)
    assert heads[heads.kind == "q"]["head"].tolist() == [0, 1, 0, 1]
    assert st.to_dict()["positions"]["n_samples"] == 36
    assert st["ln_final"] is st["ln_final.hook_normalized"]


# ---------------------------------------------------------------------------------------------- accumulators


def test_moment_accumulator_is_exact_under_any_split_and_large_offsets():
    """Chan's pairwise update: the covariance of data with a mean 1e6 times its spread matches a
    two-pass reference to 1e-9 whatever the split (the inputs themselves are only resolved to
    ulp(1e6) ≈ 1e-10; the one-pass E[ffᵀ] − μμᵀ loses ~1e-3 here)."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(500, 6, generator=g, dtype=torch.float64) + 1e6
    ref_mean = x.mean(0)
    ref_cov = (x - ref_mean).T @ (x - ref_mean) / len(x)
    for sizes in ([500], [1, 2, 3, 494], [250, 250], [7] * 71 + [3]):
        acc = MomentAccumulator(1, 6)
        for chunk in x.split(sizes):
            acc.update(chunk[:, None, :])
        assert acc.count == 500
        assert close(acc.covariance()[0], ref_cov, 1e-9) and close(acc.mean[0], ref_mean, 1e-15)
    a, b = MomentAccumulator(1, 6), MomentAccumulator(1, 6)
    a.update(x[:123, None]), b.update(x[123:, None])
    assert close(a.merge(b).covariance()[0], ref_cov, 1e-9) and a.count == 500
    naive = x.T @ x / len(x) - torch.outer(ref_mean, ref_mean)
    assert not close(naive, ref_cov, 1e-6)  # why the accumulator keeps a centred scatter
    # without: the samples but a part's (the odd half of a split-half check), merge's inverse
    whole, part = MomentAccumulator(1, 6), MomentAccumulator(1, 6)
    whole.update(x[:, None]), part.update(x[:123, None])
    rest, ref = whole.without(part), x[123:]
    ref_rest = (ref - ref.mean(0)).T @ (ref - ref.mean(0)) / len(ref)
    assert rest.count == 377 and close(rest.mean[0], ref.mean(0), 1e-12) and close(rest.covariance()[0], ref_rest, 1e-9)
    assert whole.without(whole).count == 0
    with pytest.raises(ValueError, match="cannot take"):
        part.without(whole)


def test_rank_of_low_rank_rows():
    g = torch.Generator().manual_seed(8)
    basis = torch.randn(3, 10, generator=g, dtype=torch.float64)
    rows = torch.randn(200, 3, generator=g, dtype=torch.float64) @ basis
    acc = MomentAccumulator(1, 10)
    acc.update(rows[:, None])
    ev = acc.eigenvalues()[0]
    assert int(numerical_rank(ev, rtol=1e-10)) == 3
    assert float(ev[3:].abs().max()) < 1e-12 * float(ev[0])


def _stats_with_eigenvalues(ev: list[float], dtype: torch.dtype):
    """A HookStats whose (uncentred) Gram has eigenvalues ``ev`` in a random orthonormal basis."""
    g = torch.Generator().manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(len(ev), len(ev), generator=g, dtype=torch.float64))
    cov = q @ torch.diag(torch.tensor(ev, dtype=torch.float64)) @ q.T
    return HookStats(name="blocks.0.hook_resid_pre", kind="resid_pre", layer=0, count=100, unit="position",
                     feature_shape=(len(ev),), dtype=dtype, mean=torch.zeros(len(ev), dtype=torch.float64), cov=cov)


def test_default_rank_follows_the_rank_rule_at_the_activations_precision():
    """Issue 14 item 4: the default cut-off is the package's rule (numerics.rank_rtol, Gram form) at
    compute_dtype of the dtype the activations had, not a fixed 1e-10: a 1e-13 eigenvalue is real in
    float64 activations and rounding in float32 (or bf16, computed at float32) ones."""
    ev = [1.0, 0.5, 1e-13, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert _stats_with_eigenvalues(ev, torch.float64).rank() == 3
    for dtype in (torch.float32, torch.bfloat16):
        st = _stats_with_eigenvalues(ev, dtype)
        assert st.precision == torch.float32 and st.rank() == 2
    st = _stats_with_eigenvalues(ev, torch.float64)
    assert st.rank(rtol=1e-10) == 2  # an explicit rtol still wins
    assert rank_rtol(10, torch.float64, gram=True) < 1e-13 < rank_rtol(10, torch.float32, gram=True)
    # Summaries use each hook's rule too (positions are not read by to_frame).
    frame = ActivationStats(stats={st.name: st}, positions=None, n_layers=1).to_frame()
    assert int(frame["rank"].iloc[0]) == 3


def test_hooks_of_the_wrong_type_say_what_hooks_are(tiny_toy_transformer, tiny_toy_tokens):
    """Audit 13b F9: hooks=3 raised "'int' object is not iterable"."""
    for hooks in (3, None, ["resid_pre", 2]):
        with pytest.raises(TypeError, match=r"hooks must be a hook kind \(resid_pre, .*a hook name, or a list of them"):
            activation_stats(tiny_toy_transformer, tiny_toy_tokens, hooks=hooks, progress=False)


def test_a_hook_of_a_layer_the_model_lacks_says_so(tiny_toy_transformer, tiny_toy_tokens):
    """Audit 13b F10: blocks.7.hook_resid_pre on a 2-layer model gave the first three hook names alphabetically."""
    with pytest.raises(MissingHookError, match=r"layer 7 out of range for a model with 2 layers.*'blocks\.\d\.hook_resid_pre'"):
        activation_stats(tiny_toy_transformer, tiny_toy_tokens, hooks=["blocks.7.hook_resid_pre"], progress=False)


def test_a_float32_hook_of_a_half_precision_model_carries_the_model_s_precision(hf_dirs):
    """Audit 23a F3: a bfloat16 Llama bridge computes its final RMSNorm in float32, so ln_final's
    activations arrived as float32 and were recorded as such (half_precision False, no warning), though
    they carry the bfloat16 residuals' rounding (1.9·10⁻³ of the Gram). The model's dtype bounds them."""
    from tests.fixtures.hf import open_model

    from tl_degeneracy.numerics import HalfPrecisionWarning, carried_dtype

    model = open_model(hf_dirs["llama"], "bridge").to(torch.bfloat16)
    name = "ln_final.hook_normalized"
    produced = {}
    model.run_with_hooks(torch.tensor([[1, 5, 6, 7]]), fwd_hooks=[(name, lambda a, hook: produced.update(dtype=a.dtype))])
    assert produced["dtype"] == torch.float32  # what made the flag silent
    with pytest.warns(HalfPrecisionWarning):
        st = activation_stats(model, [[1, 5, 6, 7, 8], [1, 9, 10]], hooks=["ln_final"], progress=False).stats[name]
    assert st.dtype == torch.bfloat16 and st.summary()["half_precision"]
    assert carried_dtype(torch.float32, torch.float64) == torch.float32
    assert carried_dtype(torch.float16, torch.bfloat16) == torch.bfloat16
