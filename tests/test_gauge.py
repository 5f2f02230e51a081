"""Random and canonical per-head gauges (METHODS §2): same function, same invariants, canonical weights."""

from __future__ import annotations


import numpy as np
import pytest
import torch

import tl_degeneracy as tld
from tl_degeneracy.gauge import canonicalize_heads, random_gauge
from tl_degeneracy.invariants import center_writing, fold_reading, ov_invariants, qk_invariants
from tl_degeneracy.models.selection import read_attention

from .fixtures.hf import ARCHS, BACKENDS, assert_state_unchanged, has_hooked_transformer, open_model, state_snapshot

KEYS = ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V")


def _tokens(adapter, n=2, pos=10):
    return torch.randint(3, adapter.d_vocab, (n, pos), generator=torch.Generator().manual_seed(0)).to(adapter.device)


def _assert_invariants_equal(a, b, rtol=1e-5):
    for fn in (ov_invariants, qk_invariants):
        fa, fb = fn(a), fn(b)
        assert (fa["rank"] == fb["rank"]).all()
        for (_, ra), (_, rb) in zip(fa.iterrows(), fb.iterrows()):
            top = ra["singular_values"][0]
            np.testing.assert_allclose(ra["singular_values"], rb["singular_values"], rtol=0, atol=rtol * top)
            np.testing.assert_allclose(ra["frobenius"], rb["frobenius"], rtol=rtol)
            assert len(ra["eigenvalues"]) == len(rb["eigenvalues"])
            for lam in ra["eigenvalues"]:
                assert np.min(np.abs(rb["eigenvalues"] - lam)) <= rtol * top
            np.testing.assert_allclose(ra["copying_score"], rb["copying_score"], atol=rtol)


def _weights(model):
    aw = tld.adapt(model).attention_weights()
    return {k: getattr(aw, k).detach().double() for k in KEYS}


def _check_gauge(model, tokens):
    before = state_snapshot(model)
    gauged = random_gauge(model, seed=3)
    assert_state_unchanged(model, before)  # the input model is not mutated
    w0, w1 = _weights(model), _weights(gauged)
    assert (w0["W_V"] - w1["W_V"]).abs().max() > 0.1 * w0["W_V"].abs().max()  # the gauge is not trivial
    assert (w0["W_Q"] - w1["W_Q"]).abs().max() > 0.01 * w0["W_Q"].abs().max()
    with torch.no_grad():
        base, out = tld.adapt(model).forward(tokens), tld.adapt(gauged).forward(tokens)
    torch.testing.assert_close(out, base, rtol=1e-4, atol=1e-4 * float(base.abs().max()))
    _assert_invariants_equal(model, gauged)

    canon = canonicalize_heads(gauged)
    with torch.no_grad():
        out = tld.adapt(canon).forward(tokens)
    torch.testing.assert_close(out, base, rtol=1e-4, atol=1e-4 * float(base.abs().max()))
    other = canonicalize_heads(random_gauge(model, seed=4))
    again = canonicalize_heads(canon)
    wc, wo, wa = _weights(canon), _weights(other), _weights(again)
    for k in KEYS:
        scale = float(wc[k].abs().max()) or 1.0
        torch.testing.assert_close(wo[k], wc[k], rtol=0, atol=1e-4 * scale, msg=lambda m: f"two gauges, {k}: {m}")
        torch.testing.assert_close(wa[k], wc[k], rtol=0, atol=1e-4 * scale, msg=lambda m: f"idempotence, {k}: {m}")


def test_toy_transformer(tiny_toy_transformer, tiny_toy_tokens):
    _check_gauge(tiny_toy_transformer, tiny_toy_tokens)


def _effective(model, layer: int) -> dict[str, torch.Tensor]:
    """The effective factors of METHODS §2 of one layer, as stored (n_kv heads for K/V), float64."""
    adapter = tld.adapt(model)
    norm = adapter.norm_weights(layer, "ln1")
    w = read_attention(adapter, layer)
    return {"W_Q": fold_reading(w["W_Q"], norm), "W_K": fold_reading(w["W_K"], norm),
            "W_V": fold_reading(w["W_V"], norm), "W_O": center_writing(w["W_O"], norm)}


def test_canonical_form_is_the_svd(tiny_toy_transformer):
    """P diag(w) W_V = U√S, W_O P = √S Vᵀ: the canonical *effective* factors have equal, diagonal Grams
    (the toy's LayerNorm has a random gain, so this is not true of the stored W_V, W_O)."""
    canon = canonicalize_heads(tiny_toy_transformer)
    eff = _effective(canon, 1)
    for h in range(eff["W_V"].shape[0]):
        gv = eff["W_V"][h].T @ eff["W_V"][h]
        go = eff["W_O"][h] @ eff["W_O"][h].T
        torch.testing.assert_close(gv, torch.diag(gv.diagonal()), atol=1e-5, rtol=0)
        torch.testing.assert_close(gv, go, atol=1e-5, rtol=0)
        assert (gv.diagonal()[:-1] >= gv.diagonal()[1:]).all()  # σ descending
        raw = canon.blocks[1].attn.W_V[h].detach().double()
        assert (raw.T @ raw - torch.diag((raw.T @ raw).diagonal())).abs().max() > 1e-2  # stored ≠ effective


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_canonical_gauge_does_not_depend_on_how_the_model_was_loaded(tl_models, hf_dirs, arch):
    """Canonicalising the unfolded bridge, the compatibility-mode bridge (and on TL 3.x a HookedTransformer
    with fold_ln + center_writing_weights) of one checkpoint gives the same effective factors; in the folded
    models they are the stored weights themselves. Tolerance: the canonical weights are written back in
    float32 and TransformerLens folded in float32, a few eps32 per entry (1e-5 of the largest entry)."""
    loads = ["bridge", "bridge-compat"] + (["hooked_transformer-folded"] if has_hooked_transformer() else [])
    canon = {}
    for ld in loads:
        if ld == "hooked_transformer-folded":
            model = open_model(hf_dirs[arch], "hooked_transformer")
            model.process_weights_(fold_ln=True, center_writing_weights=True, center_unembed=True)
        else:
            model = tl_models(arch, ld)
        canon[ld] = canonicalize_heads(model)
    for layer in range(2):
        ref = _effective(canon["bridge"], layer)
        for ld in loads[1:]:
            eff = _effective(canon[ld], layer)
            stored = {k: v.double() for k, v in read_attention(tld.adapt(canon[ld]), layer).items()}
            for k in ("W_Q", "W_K", "W_V", "W_O"):
                scale = float(ref[k].abs().max())
                torch.testing.assert_close(eff[k], ref[k], rtol=0, atol=1e-5 * scale, msg=lambda m: f"{ld} {k}: {m}")
                torch.testing.assert_close(stored[k], eff[k], rtol=0, atol=1e-5 * scale, msg=lambda m: f"{ld} {k}: {m}")


def test_inplace(tiny_toy_transformer):
    W_V = tiny_toy_transformer.blocks[0].attn.W_V.detach().clone()
    out = random_gauge(tiny_toy_transformer, seed=0, inplace=True)
    assert out is tiny_toy_transformer
    assert not torch.equal(tiny_toy_transformer.blocks[0].attn.W_V.detach(), W_V)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_backends(tl_models, arch, backend):
    """GPT-2 (tied, Conv1D, biases), NeoX (rotary, parallel) and Llama (GQA, no biases) shapes."""
    model = tl_models(arch, backend)
    _check_gauge(model, _tokens(tld.adapt(model)))


def test_gqa_gauge_acts_on_the_group(tl_models):
    """One A per KV head: W_V changes, and W_O of both heads of the group changes consistently."""
    model = tl_models("llama", "bridge")
    gauged = random_gauge(model, seed=5)
    a0, a1 = model.blocks[0].attn, gauged.blocks[0].attn
    assert a1.W_V.shape[0] == 2  # stored with n_kv heads
    for h in range(4):
        kv = h // 2
        torch.testing.assert_close(a1.W_V[kv].detach().double() @ a1.W_O[h].detach().double(),
                                   a0.W_V[kv].detach().double() @ a0.W_O[h].detach().double(), atol=1e-5, rtol=1e-4)


def test_sma_has_no_attention_gauge(sma_model):
    sma = sma_model
    with pytest.warns(RuntimeWarning, match="no gauge to apply"):
        gauged = random_gauge(sma)
    torch.testing.assert_close(gauged.blocks[0].attn.W_V, sma.blocks[0].attn.W_V)
