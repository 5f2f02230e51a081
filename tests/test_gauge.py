"""Random and canonical per-head gauges (METHODS §2): same function, same invariants, canonical weights."""

from __future__ import annotations


import numpy as np
import pytest
import torch

import tl_degeneracy as tld
from tl_degeneracy.gauge import canonicalize_heads, random_gauge, write_attention
from tl_degeneracy.invariants import center_writing, fold_reading, ov_invariants, qk_invariants
from tl_degeneracy.models.copying import copy_model
from tl_degeneracy.models.selection import read_attention
from tl_degeneracy.numerics import numerical_rank, product_scale

from .fixtures.hf import (
    ARCHS, BACKENDS, assert_state_unchanged, has_hooked_transformer, native_config, open_model, state_snapshot,
)
from .fixtures.toys import make_tiny_toy_transformer

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


# ---------------------------------------------------------------------------------------------- rank-deficient heads
def _zeroed(model, layer: int, zeros: dict[str, tuple]):
    """``model`` with the given index ranges of layer ``layer``'s attention accessors (TL layout, n_kv
    heads for K/V) set to 0, written through the adapter like any gauge."""
    adapter = tld.adapt(model)
    w = {k: v.detach().clone() for k, v in read_attention(adapter, layer).items()}
    for key, index in zeros.items():
        w[key][index] = 0
    write_attention(adapter, layer, {k: w[k] for k in zeros})
    return model


def _toy(layer, zeros):
    return _zeroed(make_tiny_toy_transformer(), layer, zeros)


def _bridge(kind, layer, zeros, hf_dirs=None):
    """A fresh bridge (the session's models stay untouched): the tiny Llama (GQA, rotary) or a
    TL-native GQA model with learned positions (so that its QK gauge is a GL(d), not a scalar)."""
    if kind == "llama":
        model = open_model(hf_dirs["llama"], "bridge")
    else:
        from transformer_lens.model_bridge import TransformerBridge

        cfg = native_config("llama")
        cfg.positional_embedding_type = "standard"
        model = TransformerBridge.boot_native(cfg).eval()
    return _zeroed(model, layer, zeros)


#: name → (model factory arguments). Toy: 2 heads of 8, no GQA; the bridges: 4 query heads, 2 KV heads.
RANK_DEFICIENT = {
    "toy: zero column of W_V": ("toy", 0, {"W_V": (0, slice(None), 7)}),
    "toy: pruned head": ("toy", 0, {"W_V": (0,), "W_O": (0,)}),
    "toy: W_Q zero": ("toy", 1, {"W_Q": (1,)}),
    "toy: zero row of W_O": ("toy", 0, {"W_O": (0, 7)}),
    "gqa: zero column of a shared W_V": ("llama", 0, {"W_V": (0, slice(None), 3)}),
    "gqa: pruned KV group": ("llama", 1, {"W_V": (1,), "W_O": (slice(2, 4),)}),
    "gqa rotary: W_Q of one query head zero": ("llama", 0, {"W_Q": (1,)}),
    "gqa: W_Q of one query head zero": ("native", 0, {"W_Q": (2,)}),
    "gqa: W_Q of a whole KV group zero": ("native", 0, {"W_Q": (slice(0, 2),)}),
    "gqa: two zero columns of a shared W_K": ("native", 1, {"W_K": (0, slice(None), slice(2, 4))}),
}


def _group_factors(model, layer: int, kv: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The effective factors of KV group ``kv`` as one product each (METHODS §2): OV = W_V·[W_O^h …],
    QK = [W_Q^h; …]·W_Kᵀ, the factorisation that the canonical gauge puts into SVD form."""
    adapter = tld.adapt(model)
    eff = _effective(model, layer)
    group = adapter.n_heads // adapter.n_kv_heads
    heads = slice(kv * group, (kv + 1) * group)
    return {"OV": (eff["W_V"][kv], torch.cat(list(eff["W_O"][heads]), dim=-1)),
            "QK": (torch.cat(list(eff["W_Q"][heads]), dim=0), eff["W_K"][kv].mT)}


def _spans_agree(a: torch.Tensor, b: torch.Tensor, atol: float) -> bool:
    """Whether the columns of ``a`` and ``b`` span the same space, singular values ≤ ``atol`` being 0."""
    rank = lambda m: int((torch.linalg.svdvals(m) > atol).sum())  # noqa: E731
    return rank(a) == rank(b) == rank(torch.cat([a, b], dim=1))


@pytest.mark.parametrize("case", list(RANK_DEFICIENT))
def test_rank_deficient_heads(case, hf_dirs):
    """Audit finding 4: heads with a singular factor used to crash (NaN from a triangular solve). Now
    the function is unchanged, the canonical form of a randomly gauged copy equals the original's on
    every group's rank-r part (all of it for full-rank groups and for the rotary QK's scalar gauge),
    the remaining d − r directions agree up to a GL(d − r) (same spans), and canonicalizing twice
    changes nothing.

    Logit tolerance, from float rounding: the canonical weights are the float64 gauge of the stored
    float32 weights, rounded to float32 (half an ulp per entry), and both models' float32 forwards
    round as the original's does, which differs from its float64 forward by e = max|Δ|. Each of the
    three contributes about e, so the canonical logits lie within 3e of the original's; 4e is asserted.

    The weights are compared on a float64 copy: stored in float32, a gauged copy's zero column is
    float32 rounding, which the float64 rank rule rightly counts as rank. In float64 the canonical
    weights carry the gauges' rounding, eps64 times their condition (≲ e² for random_gauge) over the
    relative gap between singular values (≳ 1e-2 in these random heads): ≲ 1e-12 of the largest
    entry; 1e-10 is asserted, and singular values below it count as zero in the span comparison."""
    kind, layer, zeros = RANK_DEFICIENT[case]
    model = _toy(layer, zeros) if kind == "toy" else _bridge(kind, layer, zeros, hf_dirs)
    adapter = tld.adapt(model)
    tokens = _tokens(adapter)
    exact = copy_model(model).to(torch.float64)
    with torch.no_grad():
        base, reference = adapter.forward(tokens).double(), tld.adapt(exact).forward(tokens)
        out = tld.adapt(canonicalize_heads(model)).forward(tokens).double()
    assert float((out - base).abs().max()) <= 4 * float((base - reference).abs().max())

    canon = canonicalize_heads(exact)
    other, again = canonicalize_heads(random_gauge(exact, seed=4)), canonicalize_heads(canon)
    rotary = adapter.cfg.positional_embedding == "rotary"
    for lay in range(adapter.n_layers):
        for kv in range(adapter.n_kv_heads):
            c, o, a = (_group_factors(m, lay, kv) for m in (canon, other, again))
            for circuit, (left, right) in c.items():
                atol = 1e-10 * max(float(left.abs().max()), float(right.abs().max()), 1.0)
                for name, theirs in (("idempotence", a), ("two gauges", o)):
                    msg = f"{name}, layer {lay} group {kv} {circuit}"
                    if name == "idempotence" or (rotary and circuit == "QK"):
                        r = left.shape[1]
                    else:
                        r = int(numerical_rank(torch.linalg.svdvals(left @ right), (left.shape[0], right.shape[1]),
                                               scale=product_scale(left, right)))
                        assert _spans_agree(left[:, r:], theirs[circuit][0][:, r:], atol), msg
                        assert _spans_agree(right[r:].mT, theirs[circuit][1][r:].mT, atol), msg
                    torch.testing.assert_close(theirs[circuit][0][:, :r], left[:, :r], rtol=0, atol=atol, msg=msg)
                    torch.testing.assert_close(theirs[circuit][1][:r], right[:r], rtol=0, atol=atol, msg=msg)


def test_a_half_precision_gauge_says_its_rounding_moves_the_outputs():
    """Audit 14b F3: on a bfloat16 model the gauged weights are rounded to bfloat16, which moved the
    logits by 2e-3 and canonicalizing twice the weights by 3.5e-3, with no word."""
    import warnings

    from .fixtures.toys import make_tiny_toy_transformer

    model = make_tiny_toy_transformer().to(torch.bfloat16)
    for gauge in (tld.canonicalize_heads, tld.random_gauge):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            gauge(model)
        assert any("stores its weights in bfloat16" in str(w.message) and "model.float()" in str(w.message)
                   for w in caught), gauge.__name__
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tld.canonicalize_heads(make_tiny_toy_transformer())
    assert not [w for w in caught if "stores its weights" in str(w.message)]
