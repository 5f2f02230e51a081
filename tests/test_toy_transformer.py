"""ToyTransformer: hooks against activations computed by hand from the weights, the adapter over
it, the leak-free perturbed forward (single and vmapped over chains), checkpoints, bad input."""

from __future__ import annotations

import math

import pytest
import torch

from tests.fixtures.toys import TINY_TOY_KWARGS, make_tiny_toy_transformer
from tl_degeneracy.models.hooks import HOOK_KINDS, LAYER_KINDS, MODEL_KINDS, TL_HOOK_TEMPLATES
from tl_degeneracy.models.toy_adapter import ToyAdapter
from tl_degeneracy.models.toys.transformer import ToyTransformer

ATOL = 1e-5
L, D, H, DH, F, V, CTX = (TINY_TOY_KWARGS[k] for k in ("n_layers", "d_model", "n_heads", "d_head", "d_mlp", "d_vocab", "n_ctx"))


def layer_norm_by_hand(x, w, b, eps=1e-5):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def gelu_by_hand(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def close(a, b, atol=ATOL):
    return torch.allclose(a, b, atol=atol, rtol=0)


# ---------------------------------------------------------------------- activations by hand
def test_hooks_reproduce_activations_computed_from_the_weights(tiny_toy_transformer, tiny_toy_tokens):
    """Every hook, recomputed head by head and position by position with plain matmuls."""
    model, tokens = tiny_toy_transformer, tiny_toy_tokens
    batch, n_pos = tokens.shape
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    logits, cache = model.run_with_cache(tokens)

    embed = sd["embed.W_E"][tokens]
    assert close(cache["hook_embed"], embed)
    assert cache["hook_pos_embed"].shape == (batch, n_pos, D)
    assert close(cache["hook_pos_embed"], sd["pos_embed.W_pos"][:n_pos].expand(batch, -1, -1))
    resid = embed + sd["pos_embed.W_pos"][:n_pos]
    causal = torch.tril(torch.ones(n_pos, n_pos, dtype=torch.bool))

    for layer in range(L):
        p = f"blocks.{layer}."
        assert close(cache[p + "hook_resid_pre"], resid)
        x1 = layer_norm_by_hand(resid, sd[p + "ln1.w"], sd[p + "ln1.b"])
        # hook_normalized is x/σ, before the gain and bias, as in TransformerLens (audit 23a F2)
        assert close(cache[p + "ln1.hook_normalized"] * sd[p + "ln1.w"] + sd[p + "ln1.b"], x1)
        assert close(cache[p + "ln1.hook_scale"], (resid - resid.mean(-1, keepdim=True)).pow(2).mean(-1, keepdim=True).add(1e-5).sqrt())

        attn_out = sd[p + "attn.b_O"].expand(batch, n_pos, D).clone()
        for h in range(H):
            q = x1 @ sd[p + "attn.W_Q"][h] + sd[p + "attn.b_Q"][h]  # [b, p, d_head]
            k = x1 @ sd[p + "attn.W_K"][h] + sd[p + "attn.b_K"][h]
            v = x1 @ sd[p + "attn.W_V"][h] + sd[p + "attn.b_V"][h]
            assert close(cache[p + "attn.hook_q"][:, :, h], q)
            assert close(cache[p + "attn.hook_k"][:, :, h], k)
            assert close(cache[p + "attn.hook_v"][:, :, h], v)
            scores = q @ k.transpose(-1, -2) / math.sqrt(DH)
            got_scores = cache[p + "attn.hook_attn_scores"][:, h]
            assert close(got_scores[:, causal], scores[:, causal])
            assert torch.isneginf(got_scores[:, ~causal]).all(), "future positions must be masked with -inf"
            # softmax over the visible keys only, written out
            e = torch.where(causal, (scores - scores.masked_fill(~causal, -1e30).amax(-1, keepdim=True)).exp(), 0.0)
            pattern = e / e.sum(-1, keepdim=True)
            assert close(cache[p + "attn.hook_pattern"][:, h], pattern)
            z = pattern @ v
            assert close(cache[p + "attn.hook_z"][:, :, h], z)
            attn_out = attn_out + z @ sd[p + "attn.W_O"][h]
        assert close(cache[p + "hook_attn_out"], attn_out)
        resid = resid + attn_out
        assert close(cache[p + "hook_resid_mid"], resid)

        x2 = layer_norm_by_hand(resid, sd[p + "ln2.w"], sd[p + "ln2.b"])
        assert close(cache[p + "ln2.hook_normalized"] * sd[p + "ln2.w"] + sd[p + "ln2.b"], x2)
        pre = x2 @ sd[p + "mlp.W_in"] + sd[p + "mlp.b_in"]
        assert close(cache[p + "mlp.hook_pre"], pre)
        post = gelu_by_hand(pre)
        assert close(cache[p + "mlp.hook_post"], post)
        mlp_out = post @ sd[p + "mlp.W_out"] + sd[p + "mlp.b_out"]
        assert close(cache[p + "hook_mlp_out"], mlp_out)
        resid = resid + mlp_out
        assert close(cache[p + "hook_resid_post"], resid)

    final = layer_norm_by_hand(resid, sd["ln_final.w"], sd["ln_final.b"])
    assert close(cache["ln_final.hook_normalized"], layer_norm_by_hand(resid, 1.0, 0.0))
    assert close(cache["ln_final.hook_normalized"] * sd["ln_final.w"] + sd["ln_final.b"], final)
    assert close(logits, final @ sd["unembed.W_U"] + sd["unembed.b_U"])


def test_hook_shapes_follow_transformerlens(tiny_toy_transformer, tiny_toy_tokens):
    _, cache = tiny_toy_transformer.run_with_cache(tiny_toy_tokens)
    b, p = tiny_toy_tokens.shape
    assert cache["blocks.0.attn.hook_q"].shape == (b, p, H, DH)
    assert cache["blocks.0.attn.hook_z"].shape == (b, p, H, DH)
    assert cache["blocks.1.attn.hook_pattern"].shape == (b, H, p, p)
    assert cache["blocks.1.attn.hook_attn_scores"].shape == (b, H, p, p)
    assert cache["blocks.0.mlp.hook_post"].shape == (b, p, F)
    assert cache["blocks.0.ln1.hook_scale"].shape == (b, p, 1)
    assert cache["ln_final.hook_normalized"].shape == (b, p, D)


def test_relu_variant_and_causality():
    model = make_tiny_toy_transformer(seed=3, act_fn="relu")
    tokens = torch.randint(0, V, (2, 10), generator=torch.Generator().manual_seed(1))
    logits, cache = model.run_with_cache(tokens)
    assert torch.equal(cache["blocks.0.mlp.hook_post"], cache["blocks.0.mlp.hook_pre"].clamp(min=0))
    # Changing the last token changes only the last position's logits.
    changed = tokens.clone()
    changed[:, -1] = (changed[:, -1] + 1) % V
    other = model(changed)
    assert torch.equal(other[:, :-1], logits[:, :-1])
    assert not torch.allclose(other[:, -1], logits[:, -1])


def test_initialisation_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = ToyTransformer(**TINY_TOY_KWARGS, seed=5)
    after = torch.rand(1)
    b = ToyTransformer(**TINY_TOY_KWARGS, seed=5)
    c = ToyTransformer(**TINY_TOY_KWARGS, seed=6)
    assert torch.equal(before, after)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.blocks[0].attn.W_Q, c.blocks[0].attn.W_Q)
    # TL shapes of every named parameter
    shapes = {k: tuple(v.shape) for k, v in a.named_parameters()}
    assert shapes["embed.W_E"] == (V, D) and shapes["pos_embed.W_pos"] == (CTX, D)
    assert shapes["blocks.0.attn.W_Q"] == (H, D, DH) and shapes["blocks.0.attn.W_O"] == (H, DH, D)
    assert shapes["blocks.0.attn.b_K"] == (H, DH) and shapes["blocks.0.attn.b_O"] == (D,)
    assert shapes["blocks.1.mlp.W_in"] == (D, F) and shapes["blocks.1.mlp.W_out"] == (F, D)
    assert shapes["blocks.1.ln2.w"] == (D,) and shapes["ln_final.b"] == (D,)
    assert shapes["unembed.W_U"] == (D, V) and shapes["unembed.b_U"] == (V,)


# ---------------------------------------------------------------------- adapter
def test_adapter_hooks_weights_and_parameters(tiny_toy_transformer):
    adapter = ToyAdapter(tiny_toy_transformer)
    cfg = adapter.cfg
    assert (cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.d_model, cfg.d_head, cfg.d_mlp, cfg.d_vocab, cfg.n_ctx) == (L, H, H, D, DH, F, V, CTX)
    assert cfg.normalization == "LN" and cfg.positional_embedding == "standard" and not cfg.tied_embeddings

    hook_dict = tiny_toy_transformer.hook_dict
    for kind in LAYER_KINDS:
        for layer in range(L):
            name = adapter.hook_name(kind, layer)
            assert name == TL_HOOK_TEMPLATES[kind].format(layer=layer)
            assert name in hook_dict
            assert adapter.hook_kind(name) == (kind, layer)
    for kind in MODEL_KINDS:
        assert adapter.hook_name(kind) in hook_dict
    assert len(adapter.hook_names(list(HOOK_KINDS))) == len(LAYER_KINDS) * L + len(MODEL_KINDS)

    att = adapter.attention_weights()
    assert att.W_Q.shape == att.W_K.shape == att.W_V.shape == (L, H, D, DH)
    assert att.W_O.shape == (L, H, DH, D) and att.b_Q.shape == (L, H, DH) and att.b_O.shape == (L, D)
    assert torch.equal(att.W_V[1], tiny_toy_transformer.blocks[1].attn.W_V)
    assert torch.equal(att.b_K[0], tiny_toy_transformer.blocks[0].attn.b_K)
    mlp = adapter.mlp_weights()
    assert mlp.W_in.shape == (L, D, F) and mlp.W_out.shape == (L, F, D) and mlp.b_in.shape == (L, F)
    assert mlp.W_gate is None
    assert torch.equal(mlp.b_out[1], tiny_toy_transformer.blocks[1].mlp.b_out)
    emb = adapter.embedding_weights()
    assert emb.W_E.shape == (V, D) and emb.W_pos.shape == (CTX, D) and emb.W_U.shape == (D, V) and emb.b_U.shape == (V,)

    # The readers hand out the live parameters themselves (TL layout needs no copy here).
    assert tiny_toy_transformer.layer_attention(0)["W_Q"] is tiny_toy_transformer.blocks[0].attn.W_Q
    assert tiny_toy_transformer.embedding()["W_U"] is tiny_toy_transformer.unembed.W_U

    live = adapter.live_parameters()
    assert live.numel == sum(p.numel() for p in tiny_toy_transformer.parameters())
    assert len(live) == len(list(tiny_toy_transformer.parameters()))
    assert set(live.names) == {n for n, _ in tiny_toy_transformer.named_parameters()}


def test_adapter_run_with_hooks_ablation(tiny_toy_transformer, tiny_toy_tokens):
    """Zeroing every head's z in layer 1 must equal replacing that layer's attn_out by b_O."""
    model, adapter = tiny_toy_transformer, ToyAdapter(tiny_toy_transformer)
    clean = adapter.forward(tiny_toy_tokens)
    zero_z = adapter.run_with_hooks(
        tiny_toy_tokens, fwd_hooks=[(adapter.hook_name("z", 1), lambda z, hook: torch.zeros_like(z))]
    )
    b_O = model.blocks[1].attn.b_O.detach()
    only_bias = adapter.run_with_hooks(
        tiny_toy_tokens, fwd_hooks=[(adapter.hook_name("attn_out", 1), lambda a, hook: b_O.expand_as(a))]
    )
    assert close(zero_z, only_bias)
    assert not torch.allclose(clean, zero_z)
    assert torch.equal(adapter.forward(tiny_toy_tokens), clean), "the ablation hook must not stay attached"


# ---------------------------------------------------------------------- perturbed forward
def _random_deltas(adapter, chains=None, scale=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    lead = () if chains is None else (chains,)
    return {n: scale * torch.randn(*lead, *p.shape, generator=g) for n, p in adapter.live_parameters().tensors().items()}


def _inplace_forward(model, deltas, tokens):
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, d in deltas.items():
            params[n].add_(d)
        out = model(tokens)
        for n, d in deltas.items():
            params[n].sub_(d)
    return out


def test_perturbed_forward_matches_inplace_and_never_leaks(tiny_toy_transformer, tiny_toy_tokens):
    model = tiny_toy_transformer
    adapter = ToyAdapter(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    deltas = _random_deltas(adapter)
    got = adapter.perturbed_forward(deltas, tiny_toy_tokens)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    want = _inplace_forward(model, deltas, tiny_toy_tokens)
    assert close(got, want)
    assert not torch.allclose(got, adapter.forward(tiny_toy_tokens)), "the perturbation must act"

    chains = 3
    cdeltas = _random_deltas(adapter, chains=chains, seed=1)
    got_c = adapter.perturbed_forward(cdeltas, tiny_toy_tokens, chains=True)
    assert adapter._chain_map.vmap_works is True, "ToyTransformer must run under torch.func.vmap, not the chain-by-chain fallback"
    assert got_c.shape == (chains, *tiny_toy_tokens.shape, V)
    for c in range(chains):
        want_c = _inplace_forward(model, {n: d[c] for n, d in cdeltas.items()}, tiny_toy_tokens)
        assert close(got_c[c], want_c)
    # The in-place reference adds and subtracts, which can round; restore and check the
    # perturbed forward itself left nothing behind.
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(before[n])
    adapter.perturbed_forward(cdeltas, tiny_toy_tokens, chains=True)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert all(p.grad is None for p in model.parameters())


def test_perturbed_forward_gradient_reaches_every_delta(tiny_toy_transformer, tiny_toy_tokens):
    adapter = ToyAdapter(tiny_toy_transformer)
    for chains in (None, 2):
        deltas = {n: d.requires_grad_() for n, d in _random_deltas(adapter, chains=chains, scale=0.01).items()}
        out = adapter.perturbed_forward(deltas, tiny_toy_tokens, chains=chains is not None)
        out.square().mean().backward()
        for n, d in deltas.items():
            assert d.grad is not None and torch.isfinite(d.grad).all(), n
            assert d.grad.abs().sum() > 0, f"no gradient reached the delta of {n}"
    assert all(p.grad is None for p in tiny_toy_transformer.parameters()), "θ* itself must get no gradient"


def test_perturbed_forward_subset_of_parameters(tiny_toy_transformer, tiny_toy_tokens):
    adapter = ToyAdapter(tiny_toy_transformer)
    d = {"blocks.1.mlp.W_out": torch.zeros(2, F, D)}
    out = adapter.perturbed_forward(d, tiny_toy_tokens, chains=True)
    clean = adapter.forward(tiny_toy_tokens)
    assert close(out[0], clean) and close(out[1], clean)


# ---------------------------------------------------------------------- checkpoints, errors
def test_save_load_round_trip(tiny_toy_transformer, tiny_toy_tokens, tmp_path):
    path = tmp_path / "tiny.pt"
    tiny_toy_transformer.save(path, metadata={"note": "round trip", "val_loss": 1.25})
    loaded = ToyTransformer.load(path)
    assert not loaded.training
    assert loaded.init_kwargs() == tiny_toy_transformer.init_kwargs()
    assert loaded.metadata == {"note": "round trip", "val_loss": 1.25}
    for (n1, p1), (n2, p2) in zip(tiny_toy_transformer.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    assert torch.equal(loaded(tiny_toy_tokens), tiny_toy_transformer(tiny_toy_tokens))
    as64 = ToyTransformer.load(path, dtype=torch.float64)
    assert as64.blocks[0].attn.W_Q.dtype == torch.float64
    assert close(as64(tiny_toy_tokens).float(), tiny_toy_transformer(tiny_toy_tokens))


def test_bad_tokens_raise_clear_errors(tiny_toy_transformer):
    model = tiny_toy_transformer
    with pytest.raises(ValueError, match=r"2-D \[batch, pos\].*\(2, 3, 4\)"):
        model(torch.zeros(2, 3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"tokens\[None\]"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match=rf"17 positions is longer than n_ctx={CTX}"):
        model(torch.zeros(1, CTX + 1, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match=rf"\[0, {V}\)"):
        model(torch.full((1, 4), V, dtype=torch.long))
    with pytest.raises(ValueError, match="act_fn"):
        ToyTransformer(**{**TINY_TOY_KWARGS, "act_fn": "swish"})
    with pytest.raises(ValueError, match="positive integers"):
        ToyTransformer(**{**TINY_TOY_KWARGS, "n_heads": 0})
    # full context is fine
    assert model(torch.zeros(1, CTX, dtype=torch.long)).shape == (1, CTX, V)
