"""Activation/Jacobian degeneracy counts (METHODS §4): an exact low-rank residual stream, all backends."""

from __future__ import annotations

import warnings

import pytest
import torch

from tl_degeneracy.counts import DataLimitedWarning, ProbeLimitedWarning, SampleLimitedWarning, degeneracy_counts
from tl_degeneracy.numerics import sample_limited

from .fixtures.distributed import rank_results, run_two_processes
from .fixtures.hf import ARCHS, LOADS, has_hooked_transformer, load_as
from .fixtures.toys import make_tiny_toy_transformer


def _tokens(n=16, pos=10, vocab=20, seed=0):
    return torch.randint(0, vocab, (n, pos), generator=torch.Generator().manual_seed(seed))


def _low_rank_model(k: int):
    """One layer; the residual stream entering it is confined to a k-dim subspace: W_E of rank k,
    no positions, and ln1.b = 0 (LayerNorm centres and rescales, so the subspace stays k-dim)."""
    model = make_tiny_toy_transformer(n_layers=1)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        V, D = model.embed.W_E.shape
        model.embed.W_E.copy_(torch.randn(V, k, generator=g) @ torch.randn(k, D, generator=g))
        model.pos_embed.W_pos.zero_()
        model.blocks[0].ln1.b.zero_()
    return model


def test_low_rank_residual_stream_exact():
    k = 5
    model = _low_rank_model(k)
    D, d, H = 16, 8, 2
    frame = degeneracy_counts(model, _tokens(), output="kl", n_probes=4)
    reading = frame[frame["map"].isin(["W_Q", "W_K", "W_V"])]
    assert len(reading) == 3 * H
    assert (reading["rank_G"] == k).all()
    # K is exact here too: the score gradient with respect to a query is a softmax-weighted sum of
    # *differences* of keys (rank k: the key bias cancels), with respect to a key it is along the
    # queries x W_Q + b_Q (rank k + 1); every value direction reaches the logits (rank d).
    expected_K = {"W_Q": k, "W_K": k + 1, "W_V": d}
    for _, row in reading.iterrows():
        assert row["rank_K"] == expected_K[row["map"]], row.to_dict()
        assert row["free"] == D * d - k * expected_K[row["map"]]
    # The stream after attention (and so the MLP input) has more directions than k.
    assert int(frame[frame["map"] == "W_in"]["rank_G"].iloc[0]) > k
    assert frame.attrs["n_eff_kfac"] == int(frame["kfac"].sum())
    assert frame.attrs["n_params"] == int(frame["n_params"].sum())
    assert (frame["free"] == frame["n_params"] - frame["rank_G"] * frame["rank_K"]).all()


def test_ranks_follow_the_package_rule_in_float64():
    """Issue 14 item 4: the default ranks are the package's rule (numerics) at the forward's precision.
    In float64 the exact answers appear: rank_G = k for the reading maps, and the gradient with respect to
    what attention and the MLP write has rank D − 1, because every later LayerNorm removes its mean
    (METHODS §2's P). The old cut-off ((10·√D·eps)², 8e-29 relative in float64) counted rounding as
    directions (rank_G 14)."""
    k, D, d = 5, 16, 8
    model = _low_rank_model(k).double()
    frame = degeneracy_counts(model, _tokens(), output="kl", n_probes=4)
    assert frame.attrs["precision"] == "float64" and frame.attrs["rtol"] is None
    reading = frame[frame["map"].isin(["W_Q", "W_K", "W_V"])]
    assert (reading["rank_G"] == k).all()
    expected_K = {"W_Q": k, "W_K": k + 1, "W_V": d}
    for _, row in reading.iterrows():
        assert row["rank_K"] == expected_K[row["map"]], row.to_dict()
    writing = frame[frame["map"].isin(["W_O", "W_out"])]
    assert (writing["rank_K"] == D - 1).all()


def test_half_precision_ranks_use_the_float32_rule():
    """A bfloat16 model's Grams are ranked at compute_dtype(bfloat16) = float32 (numerics), not at
    bfloat16's eps, whose (D·eps)² = 0.016 cut-off dropped most directions."""
    model = make_tiny_toy_transformer(n_layers=1).to(torch.bfloat16)
    frame = degeneracy_counts(model, _tokens(), n_probes=4)
    assert frame.attrs["precision"] == "float32"
    assert (frame["rank_K"][frame["map"] == "W_V"] == 8).all()


def test_half_precision_counts_say_they_may_read_high():
    """toy:modadd in bfloat16 (the same weights rounded): the float32 rule counts the forward's rounding,
    so n_eff_kfac read 142,080 against 77,335 in float32, printed "N_eff ≥ …, a lower bound" (its maps are
    data-limited) and gave a cut-off band that left the float32 value out (audit 9 F7). The band now
    reaches up to bfloat16's rounding level, and the attrs and the report's verdict say the count may
    be too high as well as too low."""
    import tl_degeneracy as tld
    from tl_degeneracy.report.sections import VERDICTS

    data = tld.toy_data("modadd", 128, seed=0)
    counts = {}
    for dtype in (torch.float32, torch.bfloat16):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            counts[dtype] = degeneracy_counts(tld.load_model("toy:modadd", dtype=dtype), data, exact=True, batch_size=64,
                                              progress=False).attrs
    full, half = counts[torch.float32], counts[torch.bfloat16]
    assert full["half_precision"] is None and half["half_precision"] == "bfloat16"
    assert half["n_eff_kfac"] > 1.5 * full["n_eff_kfac"]  # the case discriminates
    low, high = half["n_eff_kfac_band"]
    assert low <= full["n_eff_kfac"] <= high
    assert full["data_limited_maps"] and half["data_limited_maps"]
    verdict = VERDICTS["counts"]({**half, "sample_limited_maps": 0, "n_samples": 384})
    assert "N_eff ≈" in verdict and "lower bound" not in verdict and "too high as well as too low" in verdict
    assert "N_eff ≥" in VERDICTS["counts"]({**full, "sample_limited_maps": 0, "n_samples": 384})


def test_a_half_precision_covariance_band_reaches_its_mean_s_rounding():
    """Audit 17a F1: a layer whose MLP is linear on the data (b_in = 32, every neuron on) with W_in of
    rank 3 has W_out's centred input Gram of rank 3 exactly. In bfloat16 the rounding of activations
    ≈ 32 is eps·32 each, far above eps²·λ₁ of their covariance (spread ≈ 1), so the float32 rule read
    rank 24 and the band (24, 24, 24) said so with certainty. The band's upper cut-off is now the
    rounding of the activations' second moment, mean included: it reaches the truth."""
    from tl_degeneracy.models.toys.transformer import ToyTransformer

    model = ToyTransformer(n_layers=2, d_model=16, n_heads=2, d_head=4, d_mlp=24, d_vocab=20, n_ctx=16,
                           act_fn="relu", seed=0, bias=True).double()
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        mlp = model.blocks[1].mlp
        mlp.W_in.copy_(torch.randn(mlp.W_in.shape, generator=g, dtype=torch.float64) * 0.3)
        mlp.W_in[3:, :] = 0.0  # rank 3, exactly in every dtype
        mlp.b_in.fill_(32.0)
    tokens = torch.randint(0, 20, (24, 16), generator=torch.Generator().manual_seed(1))
    rows = {}
    for dtype in (torch.float64, torch.bfloat16):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            frame = degeneracy_counts(model.to(dtype), tokens, n_probes=8, progress=False)
        rows[dtype] = frame[(frame["map"] == "W_out") & (frame["layer"] == 1)].iloc[0]
    exact, half = rows[torch.float64], rows[torch.bfloat16]
    assert exact["centered"] and exact["rank_G"] == 3
    assert half["rank_G"] > 3  # the rule counts the rounding (an upper bound, as documented)
    assert half["kfac_min"] <= exact["kfac"] <= half["kfac_max"]

def test_a_float32_input_with_a_large_mean_counts_no_rounding():
    """Audit 21b F1: a residual stream 300·c + a low-rank spread (a rank-3 embedding at 10⁻² and a
    constant position embedding) leaves ln1's output with a mean far above its spread; the float32
    covariances' rounding (eps·|f| per activation) lay above the rule's cut-off relative to λ₁ and was
    counted: rank_G 15 where the float64 forward reads 4. Each rank now stays at most the float64
    one, which keeps its second-order directions (2·10⁻¹⁸ of a second moment of 5, far above float64's
    rounding, below float32's)."""
    frames = {}
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 20, (12, 12), generator=g)
    embedding = torch.randn(20, 3, generator=g) @ torch.randn(3, 16, generator=g) * 0.01
    shift = 300 * torch.randn(16, generator=torch.Generator().manual_seed(5))
    for dtype in (torch.float64, torch.float32):
        model = make_tiny_toy_transformer(seed=1)
        with torch.no_grad():
            model.embed.W_E.copy_(embedding)
            model.pos_embed.W_pos.copy_(shift.expand_as(model.pos_embed.W_pos))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            frames[dtype] = degeneracy_counts(model.to(dtype), tokens, n_probes=2, progress=False)
    exact, single = frames[torch.float64], frames[torch.float32]
    assert exact["centered"].all() and (exact["map"] == single["map"]).all()
    assert exact.loc[exact["map"].isin(["W_Q", "W_K", "W_V"]) & (exact["layer"] == 0), "rank_G"].eq(4).all()
    assert (single["rank_G"] <= exact["rank_G"]).all()
    attention = single["map"].isin(["W_Q", "W_K", "W_V", "W_O"])
    assert (single.loc[attention, "rank_G"] == 3).all()  # the embedding's 3; float64's 4th is second order



@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_relu_neuron_s_rescaling_moves_no_count(dtype):
    """Audit 19b F1: W_in[:, k] → c·W_in[:, k], b_in[k] → c·b_in[k], W_out[k] → W_out[k]/c leaves a
    ReLU MLP's function as it is, and its exact ranks. Ranked against the whole Gram's largest
    eigenvalue, c = 10⁻⁶ took neuron k under hook_post's cut-off (float32: W_out's rank_G 15 of 16)
    and took the 15 others under hook_pre's, where neuron k's Jacobian is 10¹² larger (W_in's rank_K
    1), n_eff_kfac 448 → 336 with a band (336–406) that left 448 out, and no warning. Each neuron is
    now ranked at its own scale."""
    from tl_degeneracy.models.toys.transformer import ToyTransformer

    def build(c: float):
        model = ToyTransformer(n_layers=1, d_model=8, n_heads=2, d_head=4, d_mlp=16, d_vocab=7, n_ctx=8,
                               act_fn="relu", seed=1).double()
        with torch.no_grad():
            mlp = model.blocks[0].mlp
            mlp.W_in[:, 6] *= c
            mlp.b_in[6] *= c
            mlp.W_out[6] /= c
        return model.to(dtype).eval()

    tokens = torch.randint(0, 7, (12, 6), generator=torch.Generator().manual_seed(0))
    frames = {}
    for c in (1.0, 1e-6):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            frames[c] = degeneracy_counts(build(c), tokens, exact=True, progress=False, batch_size=12)
    columns = ["map", "rank_G", "rank_K", "kfac_min", "kfac_max"]
    plain, rescaled = (frames[c][frames[c]["map"].isin(["W_in", "W_out"])][columns].reset_index(drop=True)
                       for c in (1.0, 1e-6))
    assert (plain["rank_K"][plain["map"] == "W_in"] == 16).all() and (plain["rank_G"][plain["map"] == "W_out"] == 16).all()
    assert rescaled.equals(plain)
    assert frames[1e-6].attrs["n_eff_kfac"] == frames[1.0].attrs["n_eff_kfac"]


@pytest.mark.parametrize("act_fn", ["relu", "gelu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_neuron_that_is_only_rounding_is_no_direction(act_fn, dtype):
    """Review 47 F1: W_in[:, k] = 1/w and b_in[k] = −Σ b/w of the LayerNorm before it make neuron k's
    pre-activation Σ n_i = 0 exactly, so its activation is rounding alone (|f_k| ≤ 5·10⁻⁷ in float32,
    10⁻¹⁵ in float64) and W_out's rank_G is 15 of 16. At the neuron's own second moment that rounding
    was a direction (16, its band 16–16); against the weights it is computed through it is rounding."""
    from tl_degeneracy.models.toys.transformer import ToyTransformer

    model = ToyTransformer(n_layers=1, d_model=8, n_heads=2, d_head=4, d_mlp=16, d_vocab=7, n_ctx=8,
                           act_fn=act_fn, seed=1).double()
    with torch.no_grad():
        mlp, ln = model.blocks[0].mlp, model.blocks[0].ln2
        mlp.W_in[:, 6] = 1.0 / ln.w
        mlp.b_in[6] = -(ln.b / ln.w).sum()
    tokens = torch.randint(0, 7, (12, 6), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        frame = degeneracy_counts(model.to(dtype).eval(), tokens, exact=True, progress=False, batch_size=12)
    row = frame[frame["map"] == "W_out"].iloc[0]
    assert row["rank_G"] == 15 and row["kfac_min"] == row["kfac_max"] == 15 * row["rank_K"]


@pytest.mark.parametrize(("dtype", "margin"), [(torch.float64, 1e-7), (torch.float64, 0.05), (torch.bfloat16, 0.05)])
def test_a_real_neuron_that_fires_on_few_samples_counts(dtype, margin):
    """A ReLU neuron that fires on 2 or 3 of 72 samples by ``margin`` of its terms' size is a direction.
    Review 48 F2: scaled by the weights it is computed through, in float64 at 10⁻⁷ (nine orders above
    its rounding) it fell under the cut-off (15 of 16, its band 15–15). Review 49 F1: in bfloat16 the
    rounding floor (4·eps ≈ 3 % of the terms) read it as 0 at 5 %, its values within 6 % of float64's
    (15, the band 13–15 without float32's 16); half-precision forwards have no floor, their band reaches
    the rounding level instead."""
    from tl_degeneracy.models.toys.transformer import ToyTransformer

    model = ToyTransformer(n_layers=1, d_model=8, n_heads=2, d_head=4, d_mlp=16, d_vocab=7, n_ctx=8,
                           act_fn="relu", seed=1).double().eval()
    tokens = torch.randint(0, 7, (12, 6), generator=torch.Generator().manual_seed(0))
    mlp = model.blocks[0].mlp
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
        ln = model.blocks[0].ln2  # hook_normalized is x/σ, before the gain and bias
        x = (cache["blocks.0.ln2.hook_normalized"] * ln.w + ln.b).reshape(-1, 8)
        size = mlp.W_in[:, 6].norm() * x.norm(dim=1).pow(2).mean().sqrt()
        mlp.b_in[6] = -(x @ mlp.W_in[:, 6]).max() + margin * size
        _, cache = model.run_with_cache(tokens)
    assert 0 < int((cache["blocks.0.mlp.hook_post"][..., 6] > 0).sum()) <= 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        frame = degeneracy_counts(model.to(dtype), tokens, exact=True, progress=False, batch_size=12)
    row = frame[frame["map"] == "W_out"].iloc[0]
    assert row["rank_G"] == 16 and row["kfac_min"] <= 16 * row["rank_K"] <= row["kfac_max"]
    if dtype == torch.float64:
        assert row["kfac_min"] == 16 * row["rank_K"]


def test_a_gated_neuron_driven_by_its_gate_bias_counts(tmp_path):
    """Review 48 F1: a Hugging Face gated MLP with biases (act(x W_gate + b_gate) ⊙ (x W_in + b_in)) read
    as TransformerLens's convention (no gate bias): a neuron whose gate is its bias (W_gate row 10⁻⁶,
    b_gate 2), of ordinary activation, got a scale 10⁻⁶ too small and took the other 63 under the
    cut-off (W_out's rank_G 1 of 64, W_in's rank_K 1)."""
    import transformers as tf

    from tests.fixtures.hf import boot_bridge, tiny_tokenizer

    torch.manual_seed(0)
    config = tf.LlamaConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                            intermediate_size=64, max_position_embeddings=64, hidden_act="silu", attention_bias=False,
                            mlp_bias=True, tie_word_embeddings=False, vocab_size=100, bos_token_id=1, eos_token_id=2,
                            pad_token_id=0)
    hf = tf.LlamaForCausalLM(config)
    with torch.no_grad():
        for p in hf.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
        mlp = hf.model.layers[0].mlp
        mlp.gate_proj.weight[5] *= 1e-6
        mlp.gate_proj.bias[5] = 2.0
        mlp.up_proj.bias[5] = 0.0
    hf.save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    tokens = torch.randint(3, 100, (16, 12), generator=torch.Generator().manual_seed(0))
    tokens[:, 0] = 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        frame = degeneracy_counts(boot_bridge(tmp_path), tokens, progress=False, batch_size=16)
    rows = frame[frame["map"].isin(["W_gate", "W_in", "W_out"])].set_index("map")
    assert rows.loc["W_out", "rank_G"] == 64 and rows.loc["W_gate", "rank_K"] == rows.loc["W_in", "rank_K"] == 64


def test_one_sequence_says_the_data_check_could_not_run():
    """One sequence: its even-numbered half is all of it, so data_limited could never fire, and the
    counts read as final (audit 9 F5: rank_G 3 of 16 on one sequence, 12 maps flagged when the same
    tokens came as two sequences)."""
    from tl_degeneracy.report.sections import VERDICTS

    model = make_tiny_toy_transformer(n_layers=1)
    tokens = _tokens()[:1]
    with pytest.warns(DataLimitedWarning, match=r"1 sequence, so half of them .* was not checked"):
        one = degeneracy_counts(model, tokens, n_probes=4)
    assert one.attrs["data_checked"] is False and not one["data_limited"].any()
    assert "could not be checked" in VERDICTS["counts"]({**one.attrs, "sample_limited_maps": 0, "n_samples": 8})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert degeneracy_counts(model, _tokens(), n_probes=4).attrs["data_checked"] is True


def test_loss_scale_cuts_small_directions():
    model = make_tiny_toy_transformer(n_layers=1)
    full = degeneracy_counts(model, _tokens(), n_probes=4)
    cut = degeneracy_counts(model, _tokens(), n_probes=4, loss_scale=1e9)
    assert (cut["kfac"] == 0).all() and (full["kfac"] > 0).all()


def test_embeddings_row():
    model = make_tiny_toy_transformer(n_layers=1)
    tokens = _tokens() % 7  # only 7 distinct tokens appear
    frame = degeneracy_counts(model, tokens, n_probes=4, embeddings=True)
    row = frame[frame["map"] == "W_E"].iloc[0]
    assert row["rank_G"] == 7 and row["n_params"] == 20 * 16


def test_embeddings_row_loss_scale():
    """W_E's G = diag(token frequencies): a frequency at or below loss_scale is zero like any other
    eigenvalue (METHODS §4), so rank_G is the number of tokens more frequent than it (it was the
    number of distinct tokens whatever the loss_scale: 19 where 8 tokens are above 0.05)."""
    model = make_tiny_toy_transformer(n_layers=1)
    tokens = _tokens()
    freq = torch.bincount(tokens.flatten().cpu(), minlength=20).double() / tokens.numel()
    levels = freq[freq > 0].unique()  # ascending
    loss_scale = float(levels[len(levels) // 2 - 1] + levels[len(levels) // 2]) / 2  # between two frequencies
    above = int((freq > loss_scale).sum())
    assert 0 < above < int((freq > 0).sum())
    frame = degeneracy_counts(model, tokens, n_probes=2, embeddings=True, loss_scale=loss_scale, progress=False)
    assert frame[frame["map"] == "W_E"].iloc[0]["rank_G"] == above


def test_sample_limited_rule():
    """The interaction basis's rule: the rank reached n (n − 1 centred), and n is below the dimension."""
    assert sample_limited(10, 10, 16) and not sample_limited(9, 10, 16) and not sample_limited(16, 20, 16)
    assert sample_limited(9, 10, 16, centered=True) and not sample_limited(8, 10, 16, centered=True)
    assert not sample_limited(16, 16, 16)  # full rank: nothing is left for more data to show


def test_sample_limited_rows():
    """10 samples < D = 16: the reading maps' rank_G is 9, all that 10 samples allow once centred (the
    maps have biases, METHODS §4), so those rows are flagged and a warning says so; W_O (d_in = d_head
    = 8 < 9) is not. With 160 samples nothing is."""
    model = make_tiny_toy_transformer(n_layers=1)
    distinct = torch.arange(2, 12).reshape(2, 5)  # no (token, position) twice: 10 different inputs
    with pytest.warns(SampleLimitedWarning, match="reached n = 10"):
        few = degeneracy_counts(model, distinct, n_probes=2, progress=False)
    reading = few[few["map"].isin(["W_Q", "W_K", "W_V", "W_in"])]
    assert reading["centered"].all() and (reading["rank_G"] == 9).all() and reading["sample_limited"].all()
    assert not few[few["map"] == "W_O"]["sample_limited"].any()
    assert (few["sample_limited"] == (few["rank_G"] >= 9) & (few["d_in"] > 9)).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error", SampleLimitedWarning)
        many = degeneracy_counts(model, _tokens(), n_probes=2, progress=False)
    assert not many["sample_limited"].any()


def test_a_jacobian_rank_at_its_sample_bound_is_flagged():
    """Audit 23b F1: with a 2-token vocabulary each output position adds one direction to the exact kl
    Fisher's K, so the last layer's W_O, whose output reaches its own position only, has rank_K ≤ the 12
    distinct samples of three sequences given twice; it read 12 (15 on 64 sequences), unflagged, the
    split-half check blind where the even half holds every distinct sample. rank_K is now checked
    against its own bound; probes' bound is one direction per probe and position."""
    from tl_degeneracy.counts import _k_sample_bound

    model = make_tiny_toy_transformer(seed=1, act_fn="relu", d_vocab=2).double()
    twice = torch.randint(0, 2, (3, 5), generator=torch.Generator().manual_seed(5)).repeat_interleave(2, dim=0)
    with pytest.warns(SampleLimitedWarning, match="rank_K"):
        few = degeneracy_counts(model, twice, exact=True, progress=False)
    last = few[(few["layer"] == 1) & (few["map"] == "W_O")]
    assert few.attrs["n_distinct_samples"] == 12 and (last["rank_K"] == 12).all() and last["sample_limited"].all()
    assert not last["data_limited"].any()  # the half-data check cannot see it here
    many = degeneracy_counts(model, torch.randint(0, 2, (64, 5), generator=torch.Generator().manual_seed(6)),
                             exact=True, progress=False)
    last = many[(many["layer"] == 1) & (many["map"] == "W_O")]
    assert (last["rank_K"] == 15).all() and not last["sample_limited"].any()
    # review 62: the bound is the logits' width (d_vocab_out), and a rank at K's ceiling (D − 1 under
    # LayerNorm for a writing map) cannot be the data's limit
    wide = make_tiny_toy_transformer(seed=1, act_fn="relu", d_vocab=2, d_vocab_out=16).double()
    wide_out = degeneracy_counts(wide, twice, exact=True, progress=False)
    last = wide_out[(wide_out["layer"] == 1) & (wide_out["map"] == "W_O")]
    assert (last["rank_K"] == 15).all() and not last["sample_limited"].any()
    # exact: the last layer's own-position maps only (V − 1 per distinct sample under kl, V under mse)
    assert _k_sample_bound("W_O", 1, 2, True, "kl", 8, 2, 12, 30) == 12
    assert _k_sample_bound("W_in", 1, 2, True, "mse", 8, 2, 12, 30) == 24
    assert _k_sample_bound("W_V", 1, 2, True, "kl", 8, 2, 12, 30) is None  # values reach later positions
    assert _k_sample_bound("W_O", 0, 2, True, "kl", 8, 2, 12, 30) is None  # later attention mixes positions
    assert _k_sample_bound("W_K", 0, 2, False, "kl", 8, 2, 12, 30) == 240  # each probe, each position


def test_every_sequence_s_bos_is_one_sample(tl_models):
    """Audit 17a F2: every sequence's BOS position is the same sample (one token at position 0, nothing
    before it), so 3 sequences of 4 positions hold 10 distinct samples, not 12, and a centred Gram
    reaches at most rank 9: the maps there were not flagged as at their samples' limit (bound 11)."""
    model = tl_models("gpt2", "bridge")
    bos = model.tokenizer.bos_token_id
    sequences = [torch.tensor([bos, 5, 6, 7]), torch.tensor([bos, 8, 9, 10]), torch.tensor([bos, 11, 12, 13])]
    with pytest.warns(SampleLimitedWarning, match="reached n = 10"):
        frame = degeneracy_counts(model, sequences, n_probes=2, progress=False)
    positions = frame.attrs["positions"]
    assert positions["bos"] and not positions["skip_bos"] and positions["n_samples"] == 12
    assert frame.attrs["n_distinct_samples"] == 10
    wide = frame[frame["centered"] & (frame["d_in"] > 10)]
    assert len(wide) and (wide["rank_G"] == 9).all() and wide["sample_limited"].all()


def test_probe_limited_rows():
    """Audit 4: W_in of a 256-neuron MLP on 24 positions has rank_K 256 exactly, but 2 probes per batch
    find far fewer directions (every probe gradient lies in K's range, so a probe rank is a lower
    bound). The rows where the first half of the probes found fewer directions than all of them are flagged,
    with a warning and the report's headline; every flagged rank is below the exact one, and the
    exact Grams flag nothing."""
    from tl_degeneracy import degeneracy_report
    from tl_degeneracy.report.sections import verdict

    model = make_tiny_toy_transformer(n_layers=1, d_mlp=256).double()
    tokens = torch.randint(0, 20, (2, 12), generator=torch.Generator().manual_seed(0))
    exact = degeneracy_counts(model, tokens, exact=True, progress=False)
    assert not exact["probe_limited"].any() and exact.attrs["probe_limited_maps"] == 0
    with pytest.warns(ProbeLimitedWarning, match="n_eff_kfac is a lower bound"):
        probed = degeneracy_counts(model, tokens, n_probes=2, progress=False)
    assert (probed["rank_K"] <= exact["rank_K"]).all()
    w_in = probed[probed["map"] == "W_in"].iloc[0]
    assert exact[exact["map"] == "W_in"]["rank_K"].item() == 256 and w_in["rank_K"] < 256 and w_in["probe_limited"]
    short = probed["rank_K"] < exact["rank_K"]
    assert probed["probe_limited"].sum() == probed.attrs["probe_limited_maps"] > 0
    assert (probed["probe_limited"] <= short).all()  # a flag only where the rank is short indeed
    with pytest.warns(ProbeLimitedWarning):
        section = degeneracy_report(model, tokens, sections=["counts"], progress=False,
                                    overrides={"n_probes": 2})["counts"]
    assert section.status == "ok", section.reason
    assert "still grew with the probes" in section.headline and "Σ n_eff_kfac ≥ " in section.headline
    assert "free counts are upper bounds" in verdict(section) and "N_eff ≥" in verdict(section)
    growing = section.values["data_limited_maps"]  # 24 positions of 2 sequences: half of them shows less
    assert growing == int(section.tables["maps"]["data_limited"].sum()) > 0
    assert f"{growing} map(s) whose ranks still grew with the data" in section.headline


def test_data_limited_rows_are_the_ranks_half_the_data_lacks():
    """Audit 4 (toy:modadd's report: 87.9 % 'free' on 64 sequences, 55.9 % on all 961, never flagged):
    a rank below n can still grow with the data. Ground truth with exact Grams: the counts of the
    even-numbered sequences alone; a map is data_limited exactly where its rank_G or rank_K there is
    lower. Enough data (toy:bytelm's 64 × 128 tokens) flags nothing."""
    model = make_tiny_toy_transformer(n_layers=1)
    tokens = torch.randint(0, 20, (6, 4), generator=torch.Generator().manual_seed(1))
    with pytest.warns(DataLimitedWarning, match="still growing with the data"):
        whole = degeneracy_counts(model, tokens, exact=True, progress=False, batch_size=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        half = degeneracy_counts(model, tokens[::2], exact=True, progress=False)
    lower = (half["rank_G"] < whole["rank_G"]) | (half["rank_K"] < whole["rank_K"])
    assert whole["data_limited"].tolist() == lower.tolist() and lower.any()
    assert whole.attrs["data_limited_maps"] == int(lower.sum())
    import tl_degeneracy as tld

    with warnings.catch_warnings():
        warnings.simplefilter("error", DataLimitedWarning)
        enough = degeneracy_counts(tld.load_model("toy:bytelm"), tld.toy_data("bytelm")[:64], progress=False)
    assert not enough["data_limited"].any() and enough.attrs["n_eff_kfac"] == 390_144
    # and its spectra have gaps around the rank cut-off: the same count 100× either way (rank_band)
    assert enough.attrs["n_eff_kfac_band"] == [390_144, 390_144]
    assert (whole["kfac_min"] <= whole["kfac"]).all() and (whole["kfac"] <= whole["kfac_max"]).all()
    assert whole.attrs["n_eff_kfac_band"] == [int(whole["kfac_min"].sum()), int(whole["kfac_max"].sum())]


def test_report_counts_line_says_sample_limited():
    """The report's counts headline and verdict say when counts are the data's limit."""
    from tl_degeneracy import degeneracy_report
    from tl_degeneracy.report.sections import verdict

    model = make_tiny_toy_transformer(n_layers=1)
    with pytest.warns(SampleLimitedWarning):
        report = degeneracy_report(model, torch.arange(2, 12).reshape(2, 5), sections=["counts"], progress=False)
    section = report["counts"]
    assert section.status == "ok", section.reason
    limited = int(section.tables["maps"]["sample_limited"].sum())
    assert limited > 0 and section.values["sample_limited_maps"] == limited and section.values["n_samples"] == 10
    assert f"{limited} map(s) at the rank their 10 distinct samples allow" in section.headline
    assert "the data's limit, not the model's" in verdict(section)
    assert section.settings["counts_data"]["n_samples"] == 10


@pytest.mark.parametrize("arch", ARCHS)
def test_backends(tl_models, arch):
    """GQA: W_K/W_V counted on the stored KV heads; gated MLP: W_gate and W_in rows."""
    model = tl_models(arch, "bridge")
    frame = degeneracy_counts(model, _tokens(n=4, pos=8, vocab=100), n_probes=2, output="mse")
    n_kv = 2 if arch == "llama" else 4
    assert (frame["map"] == "W_K").sum() == 2 * n_kv and (frame["map"] == "W_Q").sum() == 2 * 4
    assert ("W_gate" in set(frame["map"])) == (arch == "llama")
    assert (frame["rank_G"] <= frame["d_in"]).all() and (frame["rank_K"] <= frame["d_out"]).all()
    assert (frame["rank_G"] > 0).all() and (frame["rank_K"] > 0).all()


def test_hooked_transformer_input_gram(tl_models):
    """HookedTransformer's hook_normalized precedes ln gain/bias; the counts must match the bridge's."""
    from .fixtures.hf import has_hooked_transformer

    if not has_hooked_transformer():
        pytest.skip("HookedTransformer needs TransformerLens 3.x")
    tokens = _tokens(n=4, pos=8, vocab=100)
    a = degeneracy_counts(tl_models("gpt2", "hooked_transformer"), tokens, n_probes=2, output="mse")
    b = degeneracy_counts(tl_models("gpt2", "bridge"), tokens, n_probes=2, output="mse")
    assert a["rank_G"].tolist() == b["rank_G"].tolist()


@pytest.mark.parametrize("arch", ["gpt2", "neox"])
def test_same_counts_however_norm_biases_are_stored(tl_models, hf_dirs, arch):
    """A LayerNorm bias stored in the norm (raw bridge, HookedTransformer) adds a constant to every input
    of the next maps; folded (compatibility mode, fold_ln) it lives in b_Q, b_K, b_V, b_in instead. Each
    of those maps has a bias, so the direction the constant adds is free up to a change of that bias, and
    the count reads the inputs' covariance (METHODS §4): one count for every load. Uncentred, the raw
    loads counted that direction (tiny GPT-2: rank_G 32 against 31, n_eff_kfac 21,280 against 20,832)."""
    tokens = _tokens(n=8, pos=10, vocab=100)
    loads = [ld for ld in LOADS if has_hooked_transformer() or not ld.startswith("hooked_transformer")]
    frames = {ld: degeneracy_counts(load_as(tl_models, hf_dirs, arch, ld), tokens, n_probes=4, output="mse",
                                    progress=False) for ld in loads}
    key = ["map", "layer", "head", "rank_G", "rank_K", "centered"]
    first = frames[loads[0]]
    assert first["centered"].all()  # every map of these checkpoints has a bias
    reading = first[first["map"].isin(["W_Q", "W_K", "W_V", "W_in"])]
    assert (reading["rank_G"] == reading["d_in"] - 1).all()  # LayerNorm's output spans D − 1 directions
    for ld in loads[1:]:
        assert frames[ld][key].equals(first[key]), ld
        assert frames[ld].attrs["n_eff_kfac"] == first.attrs["n_eff_kfac"]


@pytest.mark.parametrize("bias", [True, False])
def test_a_constant_input_direction_is_free_only_with_a_bias(bias):
    """The toy's LayerNorm output x̂·w + b has a direction c on which it is constant (x̂ ⊥ 1, so c ∝ 1/w)
    but not zero (cᵀb ≠ 0). With b_Q, moving W_Q along c ⊗ v and b_Q by −(cᵀμ)v leaves the logits
    unchanged, so W_Q's count reads the covariance: rank_G = D − 1. Without map biases the same move
    changes the logits, and the uncentred Gram counts c: rank_G = D."""
    model = make_tiny_toy_transformer(n_layers=1, bias=bias).double()
    tokens = _tokens()
    frame = degeneracy_counts(model, tokens, n_probes=2, progress=False)
    w_q = frame[(frame["map"] == "W_Q") & (frame["head"] == 0)].iloc[0]
    D = int(w_q["d_in"])
    assert bool(w_q["centered"]) == bias and w_q["rank_G"] == (D - 1 if bias else D)

    _, cache = model.run_with_cache(tokens)
    ln = model.blocks[0].ln1  # hook_normalized is x/σ: the norm's output with its gain and bias applied
    x = (cache["blocks.0.ln1.hook_normalized"] * ln.w + ln.b).reshape(-1, D)
    attn = model.blocks[0].attn
    c = 1 / model.blocks[0].ln1.w.detach()
    c = c / c.norm()
    mu = float((x @ c).mean())
    assert float((x @ c - mu).abs().max()) < 1e-12 and abs(mu) > 1e-2  # constant on the data, not zero
    v = torch.randn(attn.W_Q.shape[-1], generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with torch.no_grad():
        before = model(tokens)
        attn.W_Q[0] += torch.outer(c, v)
        if bias:
            attn.b_Q[0] -= mu * v
        after = model(tokens)
    change = float((after - before).abs().max()) / float(before.abs().max())
    assert change < 1e-12 if bias else change > 1e-4


def test_bad_input(tiny_toy_transformer):
    with pytest.raises(ValueError, match="output"):
        degeneracy_counts(tiny_toy_transformer, _tokens(), output="nll")
    with pytest.raises(ValueError, match="loss_scale"):
        degeneracy_counts(tiny_toy_transformer, _tokens(), loss_scale=-1.0)
    from tl_degeneracy.errors import DataError

    with pytest.raises(DataError):
        degeneracy_counts(tiny_toy_transformer, torch.zeros(0, 4, dtype=torch.long))


def test_two_processes_one_batch(tmp_path):
    """Under torch.distributed a rank without a batch still joins the input-moment reduction (it raised
    KeyError), and both ranks get the single-process counts; the warning about them is given once, on
    rank 0 (it was given by every rank)."""
    from tests.counts_distributed_worker import compute

    run_two_processes("counts_distributed_worker.py", tmp_path)
    single = compute()
    given = single.pop("warnings")
    assert int(given) == 1
    for rank, multi in enumerate(rank_results(tmp_path)):
        assert int(multi.pop("warnings")) == (int(given) if rank == 0 else 0), rank
        for key, value in single.items():
            assert torch.equal(multi[key], value), (rank, key)


def test_an_error_on_one_rank_between_passes_raises_on_both(tmp_path):
    """Review 41 #3: rank 1 raises between two of degeneracy_counts' passes, after the activation
    pass's collectives; rank 0 went on to the Jacobian pass and waited there for good. Now both
    raise, rank 0 naming rank 1."""
    import json

    run_two_processes("counts_distributed_worker.py", tmp_path, "--fail-between-passes-on-rank-1")
    got = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert got[1] == {"error": "RuntimeError", "message": "out of memory after the activation pass (simulated)"}
    assert got[0]["error"] == "RuntimeError" and got[0]["message"].endswith(
        "failed on rank 1 of 2: RuntimeError: out of memory after the activation pass (simulated)")


def test_a_model_without_normalization_reads_the_residual_stream():
    """toy:modadd has no norm: the attention's and the MLP's linear maps read resid_pre and
    resid_mid as they are, so rank(G) of W_Q / W_in is the rank of those activations' Gram."""
    import tl_degeneracy as tld

    model = tld.load_model("toy:modadd")
    x = tld.toy_data("modadd")[:64]
    frame = degeneracy_counts(model, x, progress=False)
    stats = tld.activation_stats(model, x, hooks=["blocks.0.hook_resid_pre", "blocks.0.hook_resid_mid"], progress=False)
    row = lambda m: frame[frame["map"] == m].iloc[0]
    assert row("W_Q")["rank_G"] == stats["blocks.0.hook_resid_pre"].rank()
    assert row("W_in")["rank_G"] == stats["blocks.0.hook_resid_mid"].rank()
    assert set(frame["map"]) == {"W_Q", "W_K", "W_V", "W_O", "W_in", "W_out"}


def test_counts_verdict_gives_the_cutoff_band():
    """Where the ranks depend on the cut-off (no spectral gap), the report says by how much."""
    from tl_degeneracy.report.sections import VERDICTS, _cutoff_band_text

    v = {"free": 10, "n_params": 100, "n_eff_kfac": 90, "n_eff_kfac_band": [80, 95], "cutoff_band": 100.0}
    assert "N_eff 80–95 with it 100× higher or lower" in VERDICTS["counts"](v)
    assert _cutoff_band_text([90, 90], 90, 100.0) == "" and "80–95" in _cutoff_band_text([80, 95], 90, 100.0)


def test_counts_verdict_never_rounds_a_few_free_parameters_to_none():
    """SmolLM2-135M's report read 'at most 0.0% of the linear-map parameters are free' for 32,064 of
    106,168,320 (0.030%): a share that is neither none nor all keeps two significant digits."""
    from tl_degeneracy.report.sections import VERDICTS

    v = {"free": 32_064, "n_params": 106_168_320, "n_eff_kfac": 106_136_256, "data_limited_maps": 1}
    assert VERDICTS["counts"](v).startswith("at most 0.030% of the linear-map parameters are free")
    v = {"free": 3_072, "n_params": 393_216, "n_eff_kfac": 390_144}
    assert VERDICTS["counts"](v).startswith("0.8% of the linear-map parameters are free")
    v = {"free": 393_200, "n_params": 393_216, "n_eff_kfac": 16}
    assert VERDICTS["counts"](v).startswith("99.9959% of the linear-map parameters are free")


def test_probe_limited_never_flags_a_rank_at_full_width():
    """Audit 5: on the report's toy:modadd data (64 sequences, 4 probes) the four W_V maps, rank_K 32
    of 32 (exact 32), were flagged probe-limited: the half-probe spectrum decays through the cut-off.
    A rank at K's full width cannot grow with more probes."""
    import tl_degeneracy as tld

    frame = degeneracy_counts(tld.load_model("toy:modadd"), tld.toy_data("modadd")[:64], n_probes=4, batch_size=16,
                              progress=False)
    full = frame[frame["rank_K"] == frame["d_out"]]
    assert len(full) and not full["probe_limited"].any()


def test_one_probe_says_that_it_cannot_be_checked():
    """With n_probes=1 no half of the probes exists to compare with (audit 5: 12 of 20 maps below their
    exact rank_K, none flagged, no word): a ProbeLimitedWarning says the check did not run."""
    model = make_tiny_toy_transformer(n_layers=1)
    with pytest.warns(ProbeLimitedWarning, match="n_probes=1"):
        frame = degeneracy_counts(model, _tokens(), n_probes=1, output="kl")
    assert not frame["probe_limited"].any()


def test_a_rank_at_layernorms_own_bound_is_not_the_datas_limit():
    """Review 36: on one 16-token sequence of a D = 16 LayerNorm model, W_Q/W_K/W_V/W_in read rank_G 15
    and were flagged sample_limited, though D − 1 = 15 is all a LayerNorm output's covariance can span
    (head synchronization, which caps D_in there, said False)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        frame = degeneracy_counts(make_tiny_toy_transformer(), torch.randint(0, 20, (1, 16)), progress=False)
    inputs = frame[frame["map"].isin(["W_Q", "W_K", "W_V", "W_in"])]
    assert (inputs["rank_G"] == 15).all() and not inputs["sample_limited"].any()


def test_counts_that_could_not_be_checked_read_as_lower_bounds():
    """Audit 17a F3/F4: one probe per batch (no half of the probes to compare), one sequence (no half of
    the data) or ranks at their samples' limit leave rank_K or rank_G possibly low, so N_eff is a lower
    bound; the report's headline read "Σ n_eff_kfac = …" there and its verdict said nothing of the probes."""
    from tl_degeneracy.report.sections import VERDICTS

    checked = {"free": 100, "n_params": 400, "n_eff_kfac": 300, "data_checked": True, "probes_checked": True,
               "data_limited_maps": 0, "probe_limited_maps": 0, "sample_limited_maps": 0, "n_samples": 50}
    assert "N_eff ≈ 300" in VERDICTS["counts"](checked)
    for change in ({"probes_checked": False}, {"data_checked": False}, {"sample_limited_maps": 2}):
        assert "N_eff ≥ 300" in VERDICTS["counts"]({**checked, **change}), change
    assert "one Jacobian probe per batch" in VERDICTS["counts"]({**checked, "probes_checked": False})
    assert "N_eff ≈ 300" in VERDICTS["counts"]({**checked, "probes_checked": False, "half_precision": "bfloat16"})
    model = make_tiny_toy_transformer(n_layers=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert degeneracy_counts(model, _tokens(), n_probes=1, progress=False).attrs["probes_checked"] is False
        assert degeneracy_counts(model, _tokens(), n_probes=1, exact=True, progress=False).attrs["probes_checked"]



@pytest.mark.parametrize("signal", [0.0, 3e-4])
def test_a_float32_relu_neuron_whose_terms_cancel_is_counted_within_the_band(signal):
    """Audit 22b F1: a ReLU neuron whose input weights read the direction LayerNorm removes (x·(c/w) =
    c·Σ_i b_i/w_i whatever the input) sits at 0.5 on every sample, so W_out's centred G loses it. In
    float32 its pre-activation is a dot product of terms ≈ c, whose rounding (relative to the terms,
    not to the value 0.5) varies from sample to sample: at c = 300 it read one direction more than the
    float64 forward (rank_G 16 for 15) with a band that left 15 out. Review 53 #1: the dot product's
    rounding level lies above what such a neuron shows, so a neuron with a small real signal on top
    (0.5 + 3·10⁻⁴·u·x, resolved in float32) must keep its direction. Neither is told from the other by
    the level: the band's fewest directions leave the neuron out, the rank keeps it."""
    from tl_degeneracy.models.toys.transformer import ToyTransformer

    model = ToyTransformer(n_layers=1, d_model=8, n_heads=2, d_head=4, d_mlp=16, d_vocab=7, n_ctx=8,
                           act_fn="relu", seed=1).double()
    with torch.no_grad():
        ln2, mlp = model.blocks[0].ln2, model.blocks[0].mlp
        u = torch.randn(8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        u = (u - u.mean()) / (u - u.mean()).norm() / ln2.w  # read through the norm: a direction it keeps
        column = 300 / ln2.w + signal * u
        mlp.W_in[:, 6] = column
        mlp.b_in[6] = 0.5 - (ln2.b * column).sum()
    tokens = torch.randint(0, 7, (16, 6), generator=torch.Generator().manual_seed(0))
    rows = {}
    for dtype in (torch.float64, torch.float32):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            frame = degeneracy_counts(model.to(dtype).eval(), tokens, exact=True, progress=False)
        rows[dtype] = frame[frame["map"] == "W_out"].iloc[0]
    exact, single = rows[torch.float64], rows[torch.float32]
    assert exact["centered"] and exact["rank_G"] == (15 if signal == 0 else 16)
    assert single["kfac_min"] <= exact["kfac"] <= single["kfac_max"]
    assert single["kfac_min"] == 15 * single["rank_K"] < single["kfac_max"]  # the neuron's uncertainty is said
    if signal:
        assert single["rank_G"] == 16  # the real direction is counted


def _fire_after_affine(model) -> None:
    """Make every LayerNorm of a toy fire hook_normalized after its gain and bias (a third-party norm's mistake)."""
    from tl_degeneracy.models.toys.transformer import LayerNorm

    def after_affine(self, x):
        x = x - x.mean(-1, keepdim=True)
        scale = self.hook_scale((x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())
        return self.hook_normalized(x / scale * self.w + self.b)

    for block in model.blocks:
        for ln in (block.ln1, block.ln2):
            ln.forward = after_affine.__get__(ln, LayerNorm)


@pytest.mark.parametrize("gain", ["spread", "constant", "near one"])
def test_hook_normalized_after_the_affine_is_refused(gain, tiny_toy_tokens):
    """A third-party norm whose hook_normalized fires after its gain and bias would have them applied
    twice (review 58 #6): the analyses refuse it before their passes, naming the hook; the same weights
    with the hook on x/σ pass. ``constant``: a gain of 0.5 everywhere keeps the mean square below 1;
    ``near one``: gains in [0.75, 1] and no bias (review 60 F5: a window on the mean square let it
    pass) — each row's mean square is compared with σ²/(σ² + ε) from the norm's hook_scale."""
    from tl_degeneracy.errors import UnsupportedArchitectureError
    from tl_degeneracy.synchronization import head_synchronization

    model = make_tiny_toy_transformer(seed=3)
    with torch.no_grad():
        for block in model.blocks:
            for ln in (block.ln1, block.ln2):
                if gain == "constant":
                    ln.w.fill_(0.5)
                elif gain == "near one":
                    ln.w.copy_(torch.linspace(0.75, 1.0, ln.w.numel()))
                    ln.b.zero_()
    degeneracy_counts(model, tiny_toy_tokens, exact=True, progress=False)  # x/σ: accepted
    _fire_after_affine(model)
    calls = []
    model.run_with_hooks = lambda *a, _run=model.run_with_hooks, **k: calls.append(1) or _run(*a, **k)
    with pytest.raises(UnsupportedArchitectureError, match=r"blocks\.0\.ln1\.hook_normalized .*count twice"):
        degeneracy_counts(model, tiny_toy_tokens, exact=True, progress=False)
    assert len(calls) == 1  # the check's own forward: refused before any pass (review 60 F6)
    with pytest.raises(UnsupportedArchitectureError, match="hook_normalized"):
        head_synchronization(model, tiny_toy_tokens, progress=False)


@pytest.mark.parametrize("case", ["bfloat16 with a large mean", "residual below the norm's eps"])
def test_hook_normalized_on_x_over_sigma_is_accepted(case, tiny_toy_tokens):
    """Review 60 F3/F4: x/σ read as another model's. A half-precision LayerNorm that subtracts a
    rounded mean leaves √D·eps·|mean|/σ of the row sum (refused at |mean| = 8.5σ in bfloat16, D = 16);
    a residual stream whose variance is below ε has x/σ rows of mean square well under 1/2."""
    from tl_degeneracy.counts import check_normalized_hooks
    from tl_degeneracy.models.adapt import adapt

    model = make_tiny_toy_transformer(seed=3)
    with torch.no_grad():
        if case == "bfloat16 with a large mean":
            model.embed.W_E.add_(3.0)
            model.to(torch.bfloat16)
        else:
            for name, p in model.named_parameters():
                if not name.endswith((".w", ".b")):
                    p.mul_(1e-3)
    check_normalized_hooks(adapt(model))
