"""Models and inputs from the API audit (notes/audit_api.md) that gave silent wrong numbers or unclear
crashes: Gemma-family norm gains, grad modes and frozen weights, left padding, non-causal models,
meta weights, post-norm blocks, HookedTransformer options, config/weight mismatches, bad tolerances.

Tiny random Hugging Face models of the architectures the shared fixtures (tests/fixtures/hf.py) do
not cover are built here, once per session.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import pytest
import torch

import tl_degeneracy as tld
from tests.fixtures.hf import VOCAB, boot_bridge, has_hooked_transformer, tiny_tokenizer
from tl_degeneracy.errors import MissingHookError

pytestmark = pytest.mark.usefixtures("single_thread")

_COMMON = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
_LAYERS = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)
GEMMAS = ("gemma", "gemma2", "gemma3")


def _hf_model(arch: str):
    """A tiny random causal LM of ``arch`` with random norm gains and biases (a wrong reading of
    them would otherwise go unnoticed)."""
    import transformers as tf

    configs = {
        "gemma": lambda: tf.GemmaForCausalLM(tf.GemmaConfig(**_LAYERS, num_key_value_heads=2, head_dim=8, **_COMMON)),
        "gemma2": lambda: tf.Gemma2ForCausalLM(tf.Gemma2Config(**_LAYERS, num_key_value_heads=2, head_dim=8, **_COMMON)),
        "gemma3": lambda: tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**_LAYERS, num_key_value_heads=2, head_dim=8, **_COMMON)),
        "olmo2": lambda: tf.Olmo2ForCausalLM(tf.Olmo2Config(**_LAYERS, num_key_value_heads=4, **_COMMON)),
        # ffn_dim 64 ≠ 4·hidden_size: the bridge's config says d_mlp 128
        "opt": lambda: tf.OPTForCausalLM(tf.OPTConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, ffn_dim=64,
                                                      max_position_embeddings=64, word_embed_proj_dim=32, **_COMMON)),
        # post-LN: the same module names as pre-LN OPT (opt-350m)
        "opt_post_ln": lambda: tf.OPTForCausalLM(tf.OPTConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                                              ffn_dim=64, max_position_embeddings=64, word_embed_proj_dim=32,
                                                              do_layer_norm_before=False, **_COMMON)),
        # parallel attention and MLP reading one shared pre-norm, ln1 (biases on Q, K, V and fc1 alike)
        "phi": lambda: tf.PhiForCausalLM(tf.PhiConfig(**_LAYERS, **_COMMON)),
        # post-LN, bidirectional: ln1 is attention.output.LayerNorm, after the attention's residual add
        "bert": lambda: tf.BertForMaskedLM(tf.BertConfig(**_LAYERS, **_COMMON)),
    }
    torch.manual_seed(0)
    model = configs[arch]()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="session")
def audit_dirs(tmp_path_factory):
    """arch → a local HF directory (model and tokenizer), saved on first use."""
    root = tmp_path_factory.mktemp("audit_hf")
    made: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in made:
            directory = root / arch
            _hf_model(arch).save_pretrained(directory)
            tiny_tokenizer().save_pretrained(directory)
            made[arch] = directory
        return made[arch]

    return get


def quiet_boot(directory: Path, compat: bool = False):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TransformerLens' notes on softcapping and the like
        return boot_bridge(directory, compat=compat)


# ---------------------------------------------------------------------------------------------- Gemma gains
def hand_circuits(directory: Path) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """OV_h = diag(1 + w) W_V^kv W_O^h and QK_h = diag(1 + w) W_Q^h (diag(1 + w) W_K^kv)ᵀ of every head,
    in float64, straight from the HF checkpoint (Gemma's RMSNorm computes x/rms · (1 + w))."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(directory).double()
    c = hf.config
    H, n_kv, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    ov, qk = [], []
    for layer in hf.model.layers:
        gain = (1 + layer.input_layernorm.weight.detach())[:, None]
        a = layer.self_attn
        W_Q = a.q_proj.weight.detach().T.reshape(-1, H, d).transpose(0, 1)  # [H, D, d]
        W_K = a.k_proj.weight.detach().T.reshape(-1, n_kv, d).transpose(0, 1)
        W_V = a.v_proj.weight.detach().T.reshape(-1, n_kv, d).transpose(0, 1)
        W_O = a.o_proj.weight.detach().T.reshape(H, d, -1)  # [H, d, D]
        for h in range(H):
            kv = h // (H // n_kv)
            ov.append(gain * W_V[kv] @ W_O[h])
            qk.append((gain * W_Q[h]) @ (gain * W_K[kv]).T)
    return ov, qk


@pytest.mark.parametrize("arch", GEMMAS)
def test_gemma_gain_offset_is_folded_in_both_modes(arch, audit_dirs):
    """Gemma-family RMSNorm multiplies by 1 + w: the adapter's norm gain is that, and the OV/QK
    invariants equal, in default and compatibility mode alike, those of the checkpoint's weights with
    gain 1 + w (before the fix: 10× too small by default, rank 0 in compatibility mode)."""
    directory = audit_dirs(arch)
    ov, qk = hand_circuits(directory)
    for compat in (False, True):
        model = quiet_boot(directory, compat)
        norm = tld.adapt(model).norm_weights(0, "ln1")
        stored = model.blocks[0].ln1.w.detach()
        torch.testing.assert_close(norm.w, 1 + stored)
        if compat:  # folded: stored 0, an effective gain of 1
            torch.testing.assert_close(norm.w, torch.ones_like(norm.w))
        for frame, expected in ((tld.ov_invariants(model), ov), (tld.qk_invariants(model), qk)):
            assert frame["rank"].tolist() == [8] * len(expected)
            for row, M in zip(frame.itertuples(), expected):
                assert row.frobenius == pytest.approx(float(M.norm()), rel=1e-5)
                s = torch.linalg.svdvals(M)[:8].numpy()
                assert row.singular_values == pytest.approx(s, rel=1e-4)


@pytest.mark.parametrize("arch", GEMMAS)
def test_sandwich_norms_are_said_to_change_what_a_head_writes(arch, audit_dirs):
    """Gemma 2/3 normalize the attention's output before the residual add (ln1_post): OV was printed as
    what a head writes, with no word, though that norm's gain changes copying scores, sign included
    (audit 9 F9). Gemma 1 has no such norm."""
    model = quiet_boot(audit_dirs(arch))
    sandwich = arch != "gemma"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        frame = tld.ov_invariants(model)
    said = [str(w.message) for w in caught if "before the residual add" in str(w.message)]
    assert frame["post_norm"].tolist() == [sandwich] * len(frame) and len(said) == int(sandwich)


@pytest.mark.parametrize("arch", GEMMAS)
def test_sandwich_norms_counts_read_k_at_the_maps_own_output(arch, audit_dirs):
    """Behind Gemma 2/3's post-norms hook_attn_out / hook_mlp_out carry the norm's output, not W_O's /
    W_out's, where METHODS §4 reads K (audit 9 F9): the counts read the bridge's attn.o / mlp.out hooks
    there, and their rank_K is that of the Jacobian Gram at those hooks."""
    from tl_degeneracy.counts import write_output_hook
    from tl_degeneracy.numerics import numerical_rank
    from tl_degeneracy.stats.jacobian import jacobian_stats

    model = quiet_boot(audit_dirs(arch))
    adapter = tld.adapt(model)
    sandwich = arch != "gemma"
    expected = {"attn": "blocks.1.attn.o.hook_out", "mlp": "blocks.1.mlp.out.hook_out"} if sandwich else \
        {"attn": "blocks.1.hook_attn_out", "mlp": "blocks.1.hook_mlp_out"}
    assert {sub: write_output_hook(adapter, 1, sub) for sub in ("attn", "mlp")} == expected
    tokens = torch.randint(3, VOCAB, (3, 8), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        frame = tld.degeneracy_counts(model, tokens, exact=True, progress=False)
        jac = jacobian_stats(model, tokens, hooks=list(expected.values()), exact=True, progress=False)
    for sub, name in (("attn", "W_O"), ("mlp", "W_out")):
        gram = jac[expected[sub]].gram
        rank = int(numerical_rank(torch.linalg.eigvalsh(gram).flip(0), gram.shape[-1], precision=torch.float32, gram=True))
        got = frame.loc[(frame["map"] == name) & (frame["layer"] == 1), "rank_K"]
        assert set(got) == {rank}


def test_gemma_canonical_heads_agree_between_modes(audit_dirs):
    """The canonical gauge is chosen from the effective factors (gain 1 + w): default and compatibility
    mode give the same canonical heads, and the function is kept (with the gain read as 0 in
    compatibility mode the choice divided by zero and wrote NaN into the model)."""
    from tl_degeneracy.invariants import fold_reading

    tokens = torch.tensor([[1, 5, 17, 42, 9, 77, 3]])
    effective = []
    for compat in (False, True):
        model = quiet_boot(audit_dirs("gemma"), compat)
        canonical = tld.canonicalize_heads(model)
        assert all(bool(torch.isfinite(p).all()) for p in canonical.parameters())
        torch.testing.assert_close(canonical(tokens), model(tokens), atol=1e-4, rtol=1e-4)
        adapter = tld.adapt(canonical)
        aw, norm = adapter.attention_weights(), adapter.norm_weights(0, "ln1")
        effective.append([fold_reading(aw.W_V[0], norm), fold_reading(aw.W_Q[0], norm)])
    for default, compat in zip(*effective):
        torch.testing.assert_close(default, compat, atol=1e-6, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- grad modes
def toy_and_tokens():
    from tests.fixtures.toys import make_tiny_toy_transformer

    model = make_tiny_toy_transformer()
    tokens = torch.randint(0, 20, (3, 10), generator=torch.Generator().manual_seed(0)).to(next(model.parameters()).device)
    return model, tokens


def jacobian_traces(model, tokens) -> list[float]:
    return tld.jacobian_stats(model, tokens, hooks=["resid_pre"], exact=True, progress=False).to_frame()["trace"].tolist()


def short_llc(model, tokens) -> float:
    return tld.behavioral_llc(model, tokens, chains=2, draws=6, burnin=4, step_size=1e-4, progress=False).llc


GRADIENT_ANALYSES = {
    "jacobian_stats": lambda m, x: tld.jacobian_stats(m, x, hooks=["resid_pre"], progress=False),
    "degeneracy_counts": lambda m, x: tld.degeneracy_counts(m, x, progress=False),
    "interaction_basis": lambda m, x: tld.interaction_basis(m, x, progress=False),
    "behavioral_llc": short_llc,
}


@pytest.mark.parametrize("name", GRADIENT_ANALYSES)
def test_gradient_analyses_refuse_inference_mode(name):
    """Under inference_mode the Jacobians came back silently zero (n_eff_kfac 0, interaction rank 0)."""
    model, tokens = toy_and_tokens()
    with torch.inference_mode(), pytest.raises(RuntimeError, match=r"takes gradients.*call it outside torch\.inference_mode") as e:
        GRADIENT_ANALYSES[name](model, tokens)
    assert str(e.value).startswith(name)  # refused by the analysis itself, before its first pass


def test_gauges_under_inference_mode_keep_the_function():
    model, tokens = toy_and_tokens()
    with torch.inference_mode():
        before = model(tokens)
        for gauged in (tld.random_gauge(model, seed=0), tld.canonicalize_heads(model)):
            after = gauged(tokens)
            assert float((after - before).abs().max()) <= 1e-5 * float(before.abs().max())


def test_gradient_analyses_under_no_grad_and_on_a_frozen_model_give_the_normal_numbers():
    model, tokens = toy_and_tokens()
    expected = (jacobian_traces(model, tokens), tld.degeneracy_counts(model, tokens, progress=False).attrs["n_eff_kfac"],
                short_llc(model, tokens))
    assert min(expected[0]) > 0
    with torch.no_grad():
        assert (jacobian_traces(model, tokens), tld.degeneracy_counts(model, tokens, progress=False).attrs["n_eff_kfac"],
                short_llc(model, tokens)) == expected
    model.requires_grad_(False)
    assert (jacobian_traces(model, tokens), tld.degeneracy_counts(model, tokens, progress=False).attrs["n_eff_kfac"],
            short_llc(model, tokens)) == expected
    assert not any(p.requires_grad for p in model.parameters()) and all(p.grad is None for p in model.parameters())


def test_weight_and_activation_analyses_run_on_a_frozen_model_and_under_inference_mode(hf_dirs):
    """Weight-space analyses need no gradient from the caller: a frozen bridge failed with 'element 0 of
    tensors does not require grad'."""
    model = boot_bridge(hf_dirs["gpt2"])
    tokens = torch.tensor([[1, 5, 17, 42, 9, 77, 3]])
    expected_ov = tld.ov_invariants(model)["frobenius"].tolist()
    expected_act = tld.activation_stats(model, tokens, hooks=["resid_post"], progress=False).to_frame()["trace"].tolist()
    live = tld.adapt(model).live_parameters().names
    model.requires_grad_(False)
    assert tld.adapt(model).live_parameters().names == live  # frozen is not dead
    torch.testing.assert_close(tld.random_gauge(model)(tokens), model(tokens), atol=1e-4, rtol=1e-4)
    for ctx in (torch.enable_grad, torch.no_grad, torch.inference_mode):
        with ctx():
            assert tld.ov_invariants(model)["frobenius"].tolist() == expected_ov
            acts = tld.activation_stats(model, tokens, hooks=["resid_post"], progress=False).to_frame()["trace"].tolist()
            assert acts == expected_act
            assert tld.adapt(model).live_parameters().names == live
    assert not any(p.requires_grad for p in model.parameters())


def test_inputs_made_under_inference_mode_are_usable_later():
    """A plain module's inputs made under inference_mode and passed outside it: the passes that
    differentiate copy them (autograd cannot save inference tensors for backward)."""
    from tests.interaction_models import HookedMLP

    model = HookedMLP([4, 6, 3])
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.inference_mode():
        frozen_x = x.clone()
    expected = tld.interaction_basis(model, x, edges=False, progress=False).dims["interaction_rank"].tolist()
    assert tld.interaction_basis(model, frozen_x, edges=False, progress=False).dims["interaction_rank"].tolist() == expected
    llc = dict(chains=2, draws=6, burnin=4, step_size=1e-4, progress=False)
    assert tld.behavioral_llc(model, frozen_x, **llc).llc == tld.behavioral_llc(model, x, **llc).llc


def test_weights_made_under_inference_mode_are_refused_by_gradient_analyses():
    from tests.fixtures.toys import make_tiny_toy_transformer

    with torch.inference_mode():
        model = make_tiny_toy_transformer()
    tokens = torch.randint(0, 20, (2, 6), generator=torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError, match=r"weights of this ToyTransformer .* were made under torch\.inference_mode"):
        jacobian_traces(model, tokens)


# ---------------------------------------------------------------------------------------------- non-causal models
@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory):
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                                       max_position_embeddings=64, vocab_size=VOCAB, pad_token_id=0))
    directory = tmp_path_factory.mktemp("bert")
    model.save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory


def bidirectional_models(bert_dir):
    """A BERT bridge (TL 3.9's config calls it causal; its HF attention says otherwise) and, on
    TL 3.x, a HookedTransformer with attention_dir="bidirectional"."""
    models = [quiet_boot(bert_dir)]
    if has_hooked_transformer():
        from transformer_lens import HookedTransformer, HookedTransformerConfig

        models.append(HookedTransformer(HookedTransformerConfig(
            n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=64, d_vocab=VOCAB, n_ctx=32, act_fn="gelu",
            normalization_type="LN", attention_dir="bidirectional", seed=0)).eval())
    return models


def test_non_causal_models_refuse_padded_batches(bert_dir):
    """Ragged data gave batch-size-dependent results on bidirectional models (real tokens attended to
    the right padding); now they need sequences of one length or batch_size=1."""
    g = torch.Generator().manual_seed(1)
    ragged = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (5, 9, 12, 7)]
    even = [s[:5] for s in ragged]
    for model in bidirectional_models(bert_dir):
        assert not tld.adapt(model).causal
        with pytest.raises(tld.DataError, match=r"not causal .* lengths 5\.\.12,.* one length, or pass batch_size=1"):
            tld.activation_stats(model, ragged, hooks=["resid_post"], batch_size=4, progress=False)
        with pytest.raises(tld.DataError, match="not causal"):
            tld.token_batches(tld.TokenBatches(sequences=[torch.tensor(r) for r in ragged], batch_size=4, bos=False,
                                               bos_source=None, bos_token_id=None, skip_bos=False, pad_token_id=0), model)
        one = tld.activation_stats(model, ragged, hooks=["resid_post"], batch_size=1, progress=False)
        assert one.positions.n_samples == 33
        for bs in (1, 4):  # one length: no padding, whatever the batch size
            assert tld.token_batches(even, model, batch_size=bs).n_samples == 20


def test_a_bos_of_a_non_causal_model_is_no_repeated_sample(bert_dir):
    """Review 44 M2: every sequence's BOS is one and the same sample only where attention is causal;
    under bidirectional attention BOS sees its sequence, yet a full-rank hook (20 of 20) was flagged
    as at the limit of "19 distinct samples"."""
    g = torch.Generator().manual_seed(1)
    even = [[1, *torch.randint(3, VOCAB, (4,), generator=g).tolist()] for _ in range(4)]  # <bos> = 1
    models = [m for m in bidirectional_models(bert_dir) if tld.adapt(m).bos_token_id == 1]  # the BERT bridge
    assert models
    for model in models:
        batches = tld.token_batches(even, model, pad_token_id=0, skip_bos=False)
        assert batches.bos and not batches.skip_bos and not batches.causal and batches.n_samples == 20
        assert batches.n_distinct_samples == batches.distinct(20, "position") == 20
        # Review 45 L4: a TokenBatches built by hand (causal unless told) is read as the model attends.
        by_hand = tld.TokenBatches(sequences=[torch.tensor(r) for r in even], batch_size=4, bos=True, bos_source="data",
                                   bos_token_id=1, skip_bos=False, pad_token_id=0)
        assert by_hand.causal and tld.token_batches(by_hand, model).n_distinct_samples == 20


def test_pre_norm_gains_of_every_block_input_are_read(tl_models):
    """Llama's pre-MLP norm is called post_attention_layernorm: it is ln2, in front of the MLP."""
    adapter = tld.adapt(tl_models("llama", "bridge"))
    torch.testing.assert_close(adapter.norm_weights(1, "ln2").w, adapter.model.blocks[1].ln2.w.detach())


def test_causal_models_say_so(tl_models):
    for arch in ("gpt2", "llama"):
        assert tld.adapt(tl_models(arch, "bridge")).causal


# ---------------------------------------------------------------------------------------------- models that cannot be read
def test_meta_weights_are_refused_at_adapt_time(hf_dirs):
    """Every analysis of a meta-device model crashed in torch ('Tensor.item() cannot be called on meta tensors')."""
    model = boot_bridge(hf_dirs["gpt2"]).to("meta")
    for analysis in (tld.adapt, tld.ov_invariants, lambda m: tld.activation_stats(m, torch.tensor([[1, 5, 6]]), progress=False)):
        with pytest.raises(ValueError, match=r"weights of this TransformerBridge are on the meta device .* load them first"):
            analysis(model)


def test_post_norm_blocks_say_that_they_have_no_pre_norm(audit_dirs):
    """OLMo2 normalizes the attention's output (ln1_post); ov_invariants raised an AttributeError."""
    model = quiet_boot(audit_dirs("olmo2"))
    # TL 4.x names OLMo2's norms ln1_post/ln2_post; TL 3.9 calls post_attention_layernorm "ln1"
    with pytest.raises(MissingHookError, match=r"no norm in front of its attention \((its norms: ln1_post, ln2_post|"
                                               r"its ln1 wraps post_attention_layernorm, applied after it)\)"):
        tld.ov_invariants(model)


def test_post_norm_blocks_whose_names_do_not_say_so_are_refused(audit_dirs):
    """BERT and post-LN OPT were analysed as pre-norm models (audit 9 F8): the OV/QK invariants folded
    the post-attention LayerNorm's gain (σ₁ off by up to 39 %) and the counts read the MLP's input as
    the attention's. One forward pass now finds that BERT's ln1 does not output what its attention
    reads; post-LN OPT's forward fails inside the bridge, which is said as it is."""
    bert = quiet_boot(audit_dirs("bert"))
    tokens = torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    for analysis in (tld.ov_invariants, tld.qk_invariants, lambda m: tld.degeneracy_counts(m, tokens, progress=False)):
        with pytest.raises(MissingHookError, match=r"no norm in front of its attention \(its ln1 \(attention.output.LayerNorm\) "
                                                   r"does not output what its attention reads\)"):
            analysis(bert)
    with pytest.raises(tld.TLDegeneracyError, match=r"forward pass of this TransformerBridge on 8 tokens failed .*"
                                                      r"post-norm ones, as in BERT and post-LN OPT, are not supported"):
        tld.ov_invariants(quiet_boot(audit_dirs("opt_post_ln")))
    # Its pre-LN twin passes the same check.
    opt = quiet_boot(audit_dirs("opt"))
    assert len(tld.ov_invariants(opt)) == 8
    # A hook of the caller's that patches what the attention reads runs in the check too (review 31
    # F7): the refusal names it, and the same model passes once it is removed.
    opt.blocks[1].attn.hook_in.add_hook(lambda x, hook: x + 1.0)
    with pytest.raises(MissingHookError, match=r"does not output what its attention reads in a forward pass with your "
                                               r"hooks on blocks\.1\.attn\.hook_in, .*model\.reset_hooks\(\)"):
        tld.ov_invariants(opt)
    opt.reset_hooks()
    assert len(tld.ov_invariants(opt)) == 8


def test_a_parallel_block_with_one_norm_feeds_its_mlp_from_it(audit_dirs):
    """Phi (and GPT-J) read one shared pre-norm, ln1, in both sublayers; degeneracy_counts refused them as
    "not a pre-norm block (OLMo2 ...)" (audit 9 F10). The MLP's input is ln1's output, so W_in's input
    Gram is the attention maps' one (all four with a bias): equal ranks in every layer."""
    model = quiet_boot(audit_dirs("phi"))
    adapter = tld.adapt(model)
    assert adapter.cfg.parallel_attn_mlp and getattr(model.blocks[0], "ln2", None) is None
    torch.testing.assert_close(adapter.norm_weights(1, "ln2").w, adapter.norm_weights(1, "ln1").w)
    tokens = torch.randint(3, VOCAB, (4, 8), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        frame = tld.degeneracy_counts(model, tokens, exact=True, progress=False)
    for layer in range(2):
        rows = frame[frame["layer"] == layer]
        assert set(rows.loc[rows["map"].isin(["W_Q", "W_K", "W_V", "W_in"]), "rank_G"]) == {
            int(rows.loc[rows["map"] == "W_in", "rank_G"].iloc[0])}


def test_config_is_checked_against_the_weights(audit_dirs):
    """OPT with ffn_dim 64 ≠ 4·d_model: the bridge's config says d_mlp 128. The adapter takes the
    width of the weights the forward runs, so counts and synchronization see 64 (n_params was 4096
    for W_in [32, 64]; neuron_synchronization crashed on the shapes); a config that still does not
    fit its weights is refused, naming the mismatch."""
    model = quiet_boot(audit_dirs("opt"))
    adapter = tld.adapt(model)
    assert adapter.d_mlp == 64 == adapter.mlp_weights().W_in.shape[-1]
    tokens = torch.randint(3, VOCAB, (3, 8), generator=torch.Generator().manual_seed(0))
    counts = tld.degeneracy_counts(model, tokens, progress=False)
    assert set(counts.loc[counts["map"].isin(["W_in", "W_out"]), "n_params"]) == {32 * 64}
    assert tld.neuron_synchronization(model, tokens).value_gram.shape == (2, 64, 64)
    from tl_degeneracy.models.toys.transformer import ToyTransformer

    class WrongConfig(ToyTransformer):
        @property
        def cfg(self):
            return dataclasses.replace(super().cfg, d_mlp=48)

    with pytest.raises(ValueError, match=r"does not fit its weights: W_in of layer 0 is \[16, 32\], not \[16, 48\]; W_out"):
        tld.adapt(WrongConfig(n_layers=1, d_model=16, n_heads=2, d_head=8, d_mlp=32, d_vocab=20, n_ctx=16))


@pytest.mark.skipif(not has_hooked_transformer(), reason="HookedTransformer needs TransformerLens 3.x")
@pytest.mark.parametrize("option", ["use_split_qkv_input", "use_attn_in", "ungroup_grouped_query_attention"])
def test_hooked_transformer_options_that_reshape_hooks_are_refused(option):
    """split-QKV/attn_in inputs crashed on accumulator shapes; ungrouped GQA was read as n_heads KV heads
    (jacobian_stats at k off by 1.3%, counts' W_K row kv = 1 a copy of KV head 0), silently."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    gqa = option == "ungroup_grouped_query_attention"
    model = HookedTransformer(HookedTransformerConfig(
        n_layers=1, d_model=32, n_heads=4, d_head=8, d_mlp=64, d_vocab=50, n_ctx=32, act_fn="gelu",
        normalization_type="LN", n_key_value_heads=2 if gqa else None, seed=0)).eval()
    getattr(model, f"set_{option}")(True)
    tokens = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))
    for analysis in (tld.head_synchronization, lambda m, x: tld.jacobian_stats(m, x, hooks=["k"], progress=False)):
        with pytest.raises(ValueError, match=rf"runs with {option}=True: .* Call model\.set_{option}\(False\) first"):
            analysis(model, tokens)
    getattr(model, f"set_{option}")(False)
    assert tld.head_synchronization(model, tokens).n_kv_heads == (2 if gqa else 4)


# ---------------------------------------------------------------------------------------------- tolerances, batch sizes
@pytest.mark.parametrize("rtol", [float("nan"), -1.0, 1.0, float("inf")])
def test_rank_tolerances_are_checked(rtol, tiny_toy_transformer):
    """rtol=nan gave rank 0 everywhere, rtol=-1 full rank, silently."""
    from tl_degeneracy.numerics import numerical_rank

    with pytest.raises(ValueError, match="a rank tolerance rtol must be a finite number in"):
        numerical_rank(torch.tensor([3.0, 2.0, 1e-20]), rtol=rtol)
    with pytest.raises(ValueError, match="a rank tolerance rtol"):
        tld.ov_invariants(tiny_toy_transformer, rtol=rtol)
    with pytest.raises(ValueError, match="a rank tolerance atol must be a finite number ≥ 0"):
        numerical_rank(torch.tensor([3.0, 2.0]), atol=-1.0 if rtol == 1.0 else rtol)  # NaN, -1, ∞
    for not_a_number in ("1e-3", True, None):
        with pytest.raises(ValueError, match="a rank tolerance atol must be"):
            numerical_rank(torch.tensor([3.0, 2.0]), atol=not_a_number)


def test_valid_tolerances_still_decide_the_rank():
    from tl_degeneracy.numerics import numerical_rank

    spectrum = torch.tensor([3.0, 2.0, 1e-3, 1e-20])
    assert [int(numerical_rank(spectrum, rtol=r)) for r in (0.0, 1e-6, 0.5, 0.9)] == [4, 3, 2, 1]
    assert int(numerical_rank(spectrum, rtol=0.0, atol=1.0)) == 2


@pytest.mark.parametrize("batch_size", [2.5, 0, -1, True, "4", None])
def test_batch_sizes_must_be_positive_integers(batch_size, tiny_toy_transformer):
    """batch_size=2.5 was truncated to 2, silently."""
    with pytest.raises(tld.DataError, match=r"batch_size must be an integer ≥ 1 .*; got"):
        tld.token_batches(torch.randint(0, 20, (4, 6)), tiny_toy_transformer, batch_size=batch_size)


@pytest.mark.parametrize("seq_len", [True, 2.5, 0, "4"])
def test_seq_lens_must_be_integers(seq_len, tiny_toy_transformer):
    """seq_len=True was read as 1: every sequence cut into 1-token chunks, silently."""
    with pytest.raises(tld.DataError, match=r"seq_len must be an integer ≥ 1 .*; got"):
        tld.token_batches(torch.randint(0, 20, (4, 6)), tiny_toy_transformer, seq_len=seq_len)


def test_numpy_integer_batch_sizes_and_seq_lens_are_fine(tiny_toy_transformer):
    import numpy as np

    tb = tld.token_batches(torch.randint(0, 20, (4, 6)), tiny_toy_transformer, batch_size=np.int64(3), seq_len=np.int64(4))
    assert tb.batch_size == 3 and tb.max_len == 4  # seq_len=np.int64(4) was refused


def test_activation_stats_checks_the_memory_budget_first(tiny_toy_transformer):
    """activation_stats ran to the end under a budget that the other passes refuse before starting."""
    with tld.memory_limit("1K"), pytest.raises(tld.MemoryBudgetError, match="activation_stats"):
        tld.activation_stats(tiny_toy_transformer, torch.randint(0, 20, (4, 6)), progress=False)


@pytest.mark.skipif(not has_hooked_transformer(), reason="HookedTransformer needs TransformerLens 3.x")
def test_qk_norm_models_get_scalar_qk_gauges_and_no_qk_free_directions():
    """With q/k norms (use_qk_norm; Qwen3, OLMo2, Gemma3) a GL(d) QK gauge changed the logits by 0.30
    of a logit scale of 2.9; only scalings, which the norm divides out, are symmetries."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    model = HookedTransformer(HookedTransformerConfig(
        n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=64, d_vocab=50, n_ctx=32, act_fn="gelu",
        normalization_type="RMS", use_qk_norm=True, seed=0)).eval()
    assert tld.adapt(model).cfg.qk_norm
    tokens = torch.randint(0, 50, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(tokens)
        scale = float(before.abs().max())
        # the norms' eps (1e-5 against q·q of order 1) is the only term a scaling changes
        for gauged in (tld.random_gauge(model, seed=0), tld.canonicalize_heads(model)):
            assert float((gauged(tokens) - before).abs().max()) < 1e-4 * scale
    with pytest.warns(RuntimeWarning, match="normalizes queries and keys"):
        qk = tld.qk_invariants(model)
    assert qk["qk_norm"].all() and qk["free_directions"].isna().all()
    assert tld.ov_invariants(model)["free_directions"].notna().all()
    # the report's verdict names the gauge that is there, not a GL(d_head) one for QK
    from tl_degeneracy.report.sections import VERDICTS, _circuit_values

    with pytest.warns(RuntimeWarning):
        values = {"ov": _circuit_values(tld.ov_invariants(model), 8), "qk": _circuit_values(tld.qk_invariants(model), 8)}
    assert values["qk"]["qk_norm"] and not values["ov"]["qk_norm"]
    words = VERDICTS["invariants"](values)
    assert "scalings the q/k norms divide out" in words and "OV circuits' GL(d_head)" in words


@pytest.mark.parametrize("seed", ["a", -1, 2**64, 1.5, True])
@pytest.mark.parametrize("call", ["random_gauge", "degeneracy_counts", "interaction_basis", "jacobian_stats",
                                  "behavioral_llc", "token_batches", "find_modules", "degeneracy_report"])
def test_a_bad_seed_is_refused_by_name_before_any_work(call, seed):
    """Audit 19a: random_gauge(seed="a") raised int()'s bare message; a seed of 2**64 failed inside
    torch ("Overflow when unpacking long long"). Every seeded entry point refuses it the same way."""
    from tests.fixtures.toys import make_tiny_toy_transformer

    model, tokens = make_tiny_toy_transformer(), torch.randint(0, 20, (2, 6), generator=torch.Generator().manual_seed(0))
    calls = {
        "random_gauge": lambda: tld.random_gauge(model, seed=seed),
        "degeneracy_counts": lambda: tld.degeneracy_counts(model, tokens, seed=seed, progress=False),
        "interaction_basis": lambda: tld.interaction_basis(model, tokens, seed=seed, progress=False),
        "jacobian_stats": lambda: tld.jacobian_stats(model, tokens, seed=seed, progress=False),
        "behavioral_llc": lambda: tld.behavioral_llc(model, tokens, seed=seed, chains=2, draws=4, burnin=2,
                                                     progress=False),
        "token_batches": lambda: tld.token_batches(tokens, model, seed=seed),
        "find_modules": lambda: tld.find_modules(object(), seed=seed),
        "degeneracy_report": lambda: tld.degeneracy_report(model, tokens, seed=seed, sections=["summary"],
                                                           progress=False),
    }
    with pytest.raises(ValueError, match=r"^seed must be an integer in \[0, 2\*\*63\); got "):
        calls[call]()
