"""OV/QK invariants (METHODS §2): effective maps however the model was loaded, the float64 rank
rule whatever the storage dtype, agreement with TransformerLens, known answers, GQA, toys, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import tl_degeneracy as tld
from tl_degeneracy.invariants import free_directions, ov_invariants, qk_invariants
from tl_degeneracy.models.adapter import NormWeights
from tl_degeneracy.plots import plot_spectra

from .fixtures.device import test_device
from .fixtures.hf import BACKENDS, has_hooked_transformer, open_model


def _dense(W_left, W_right):
    m = W_left.detach().double() @ W_right.detach().double()
    return torch.linalg.svdvals(m), torch.linalg.eigvals(m)


def _projector(D: int, layernorm: bool) -> torch.Tensor:
    """P = I − 11ᵀ/D for LayerNorm, I otherwise (METHODS §2)."""
    eye = torch.eye(D, dtype=torch.float64)
    return eye - torch.full((D, D), 1.0 / D, dtype=torch.float64) if layernorm else eye


def _dense_effective(w, W_left, W_right, layernorm: bool, reading_right: bool):
    """Dense effective D×D map from METHODS §2's formula: P diag(w) W_left · W_right P for OV, and
    P diag(w) W_left · W_rightᵀ-side (P diag(w))ᵀ for QK (``reading_right``: the right factor reads too)."""
    D = W_left.shape[0]
    P = _projector(D, layernorm)  # the reference is computed on the CPU, wherever the model is
    Dw = torch.diag(w.detach().double().cpu()) if w is not None else torch.eye(D, dtype=torch.float64)
    right = W_right.detach().double().cpu()
    m = P @ Dw @ W_left.detach().double().cpu() @ right
    return m @ (Dw @ P) if reading_right else m @ P


def _match_eigs(a: np.ndarray, b: np.ndarray, tol: float) -> None:
    """Every eigenvalue of ``a`` has a partner in ``b`` within ``tol`` and the counts agree."""
    assert len(a) == len(b)
    for lam in a:
        assert np.min(np.abs(b - lam)) <= tol, (lam, b)


def test_toy_matches_dense_effective_maps(tiny_toy_transformer):
    """The toy's LayerNorm has random gain and bias: OV = P diag(w) W_V W_O P, QK = P diag(w) W_Q W_Kᵀ diag(w) P."""
    ov, qk = ov_invariants(tiny_toy_transformer), qk_invariants(tiny_toy_transformer)
    blk = tiny_toy_transformer.blocks[1]
    a, w = blk.attn, blk.ln1.w
    assert len(ov) == len(qk) == 4
    assert (ov["norm"] == "layernorm").all() and ov["centered"].all()
    row = ov[(ov["layer"] == 1) & (ov["head"] == 1)].iloc[0]
    m = _dense_effective(w, a.W_V[1], a.W_O[1], layernorm=True, reading_right=False)
    s, eig = torch.linalg.svdvals(m), torch.linalg.eigvals(m)
    d = a.W_V.shape[-1]
    assert row["rank"] == d and row["free_directions"] == d * d
    np.testing.assert_allclose(row["singular_values"], s[:d].numpy(), rtol=1e-10)
    big = eig[eig.abs() > 1e-6 * s[0]].numpy()  # the D×D product has D − d zero eigenvalues
    _match_eigs(row["eigenvalues"], big, 1e-8 * float(s[0]))
    np.testing.assert_allclose(row["frobenius"], float(torch.linalg.matrix_norm(m)))
    assert -1 <= row["copying_score"] <= 1 and 0 <= row["positive_eigen_share"] <= 1
    # The raw product W_V W_O has other singular values: the fold is not a no-op here.
    raw, _ = _dense(a.W_V[1], a.W_O[1])
    assert np.abs(row["singular_values"] - raw[:d].numpy()).max() > 1e-2 * float(raw[0])
    row = qk[(qk["layer"] == 1) & (qk["head"] == 0)].iloc[0]
    m = _dense_effective(w, a.W_Q[0], a.W_K[0].T, layernorm=True, reading_right=True)
    np.testing.assert_allclose(row["singular_values"], torch.linalg.svdvals(m)[:d].numpy(), rtol=1e-10)
    assert not row["rotary"]


def test_affine_qk_folds_the_norm_bias(tiny_toy_transformer):
    """The affine QK form is that of the augmented normalised input [n, 1]: x = n·w + β, so the LN bias β
    enters through b_Q + β W_Q and b_K + β W_K (as fold_ln puts it), the reading weights as P diag(w) W."""
    blk = tiny_toy_transformer.blocks[0]
    a, w, beta = blk.attn, blk.ln1.w.detach().double().cpu(), blk.ln1.b.detach().double().cpu()
    D = w.shape[0]
    P = _projector(D, True)
    frame = qk_invariants(tiny_toy_transformer, affine=True)
    for h in range(a.W_Q.shape[0]):
        W_Q, W_K = a.W_Q[h].detach().double().cpu(), a.W_K[h].detach().double().cpu()
        left = torch.cat([P @ torch.diag(w) @ W_Q, (a.b_Q[h].detach().double().cpu() + beta @ W_Q)[None]])
        right = torch.cat([P @ torch.diag(w) @ W_K, (a.b_K[h].detach().double().cpu() + beta @ W_K)[None]])
        s = torch.linalg.svdvals(left @ right.T)
        row = frame[(frame["layer"] == 0) & (frame["head"] == h)].iloc[0]
        np.testing.assert_allclose(row["singular_values"], s[: row["rank"]].numpy(), rtol=1e-10)
        assert row["free_directions"] == free_directions(D + 1, a.W_Q.shape[-1], row["rank"])


def test_rank_deficient_head_free_directions(tiny_toy_transformer):
    a = tiny_toy_transformer.blocks[0].attn
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # W_V of head 0 with rank 3, exactly: a product formed in float32 (W_V[:, :3] @ M)
        # is rank 3 only up to float32 rounding, which the float64 rank rule rightly sees.
        a.W_V[0, :, 3:] = 0.0
        a.W_O[0] = torch.randn(a.W_O.shape[1:], generator=g)
    ov = ov_invariants(tiny_toy_transformer)
    row = ov[(ov["layer"] == 0) & (ov["head"] == 0)].iloc[0]
    D, d = a.W_V.shape[1:]
    assert row["rank"] == 3 and len(row["singular_values"]) == 3 and len(row["eigenvalues"]) <= 3
    assert row["free_directions"] == 2 * D * d - 3 * (2 * D - 3) == free_directions(D, d, 3)
    assert row["singular_values"][-1] > row["tol"]


def test_sma_toy():
    """SMA: W_O = I so OV is W_V; the query is a learned vector, so QK is 0 and its affine form rank 1."""
    sma = tld.load_model("toy:sma")
    ov = ov_invariants(sma)
    s = torch.linalg.svdvals(sma.blocks[0].attn.W_V[0].detach().double())
    assert len(ov) == 1 and ov["rank"][0] == len(s)
    np.testing.assert_allclose(ov["singular_values"][0], s.numpy(), rtol=1e-10)
    assert qk_invariants(sma)["rank"][0] == 0
    affine = qk_invariants(sma, affine=True)
    assert affine["rank"][0] == 1 and bool(affine["affine"][0])
    q = sma.blocks[0].attn.q.detach().double()
    np.testing.assert_allclose(affine["singular_values"][0], [float(q.norm())], rtol=1e-10)


# ---------------------------------------------------------------------------------------------- however loaded
#: Loads of one checkpoint: the unfolded bridge and HookedTransformer (raw weights), the compatibility-
#: mode bridge and a HookedTransformer with fold_ln + center_writing_weights (TransformerLens folds
#: and centres in float32; TL 3.x only).
LOADS = BACKENDS + ("hooked_transformer-folded",)


def _load(tl_models, hf_dirs, arch: str, load: str):
    if load != "hooked_transformer-folded":
        return tl_models(arch, load)
    model = open_model(hf_dirs[arch], "hooked_transformer")  # a fresh copy: folding changes it in place
    model.process_weights_(fold_ln=True, center_writing_weights=True, center_unembed=True)
    return model


# Folding rounds every weight entry once or twice in float32 (w·W, then the mean over d_model removed),
# so the folded factors differ from the float64 ones by ‖E‖ ≲ 4·eps32·‖W‖ per factor; a singular value
# of the product moves by at most ‖E_L‖‖R‖ + ‖L‖‖E_R‖ ≲ 8·eps32·√d·σ_1 ≈ 2.7e-6·σ_1 at d = 8
# (‖·‖_F ≤ √d‖·‖_2 for rank-d factors). Copying scores are ratios of eigenvalue sums of d eigenvalues
# of condition κ ≲ 10 here: 10× that.
_EPS32 = torch.finfo(torch.float32).eps
_SV_RTOL = 8 * _EPS32 * math.sqrt(8)
_SCORE_ATOL = 10 * _SV_RTOL


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_same_invariants_however_loaded(tl_models, hf_dirs, arch):
    """Issue 14 item 3: one checkpoint with non-trivial LayerNorm/RMSNorm gains and biases gives the
    same spectra, ranks and copying scores unfolded (bridge, HookedTransformer), in compatibility mode
    and folded by HookedTransformer (TL 3.x): the effective maps are the same maps."""
    loads = [ld for ld in LOADS if has_hooked_transformer() or not ld.startswith("hooked_transformer")]
    norm = {"gpt2": "layernorm", "llama": "rmsnorm"}[arch]
    for affine in (False, True):
        for circuit in ("OV", "QK"):
            if affine and circuit == "OV":
                continue
            frames = {}
            for ld in loads:
                model = _load(tl_models, hf_dirs, arch, ld)
                frames[ld] = ov_invariants(model) if circuit == "OV" else qk_invariants(model, affine=affine)
                assert (frames[ld]["norm"] == norm).all() and (frames[ld]["centered"] == (norm == "layernorm")).all()
            ref = frames["bridge"]
            assert (ref["rank"] == 8).all()  # d_head: the inner dimension bounds the affine form too
            for ld, frame in frames.items():
                assert frame["rank"].tolist() == ref["rank"].tolist(), (ld, circuit)
                for (_, r0), (_, r1) in zip(ref.iterrows(), frame.iterrows()):
                    top = r0["singular_values"][0]
                    np.testing.assert_allclose(r1["singular_values"], r0["singular_values"], rtol=0,
                                               atol=_SV_RTOL * top, err_msg=f"{ld} {circuit} {affine}")
                    if circuit == "OV":
                        np.testing.assert_allclose(r1["copying_score"], r0["copying_score"], atol=_SCORE_ATOL)
                        np.testing.assert_allclose(r1["positive_eigen_share"], r0["positive_eigen_share"],
                                                   atol=_SCORE_ATOL)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("load", ["bridge-compat", "hooked_transformer-folded"])
def test_agrees_with_transformerlens_on_folded_models(tl_models, hf_dirs, arch, load):
    """On a folded model TransformerLens' own model.OV / model.QK are the effective maps: same
    singular values and eigenvalues."""
    if load.startswith("hooked_transformer") and not has_hooked_transformer():
        pytest.skip("HookedTransformer needs TransformerLens 3.x")
    model = _load(tl_models, hf_dirs, arch, load)
    for fn, name in ((ov_invariants, "OV"), (qk_invariants, "QK")):
        try:
            theirs = getattr(model, name)
        except Exception as e:  # noqa: BLE001 - report which backend lacks it
            pytest.skip(f"{type(model).__name__}.{name} unavailable here: {e}")
        frame = fn(model)
        S = theirs.S.detach().double().cpu()
        eig = theirs.eigenvalues.detach().to(torch.complex128).cpu()
        assert S.shape[:2] == (model.cfg.n_layers, model.cfg.n_heads)  # GQA expanded by TL too
        for _, row in frame.iterrows():
            s_tl = S[row["layer"], row["head"]]
            r = row["rank"]
            # TL's FactoredMatrix works in the model's float32: its SVD is good to ~d·eps32 relative.
            np.testing.assert_allclose(row["singular_values"], s_tl[:r].numpy(), rtol=0, atol=_SV_RTOL * float(s_tl[0]))
            e_tl = eig[row["layer"], row["head"]].numpy()
            e_tl = e_tl[np.abs(e_tl) > 1e-4 * float(s_tl[0])]
            _match_eigs(row["eigenvalues"], e_tl, 1e-5 * float(s_tl[0]))


@pytest.mark.parametrize("load", LOADS)
def test_adapter_norm_weights(tl_models, hf_dirs, load):
    """adapter.norm_weights: the kind, and the stored gain/bias (None where folded away or absent)."""
    from transformers import AutoModelForCausalLM

    if load.startswith("hooked_transformer") and not has_hooked_transformer():
        pytest.skip("HookedTransformer needs TransformerLens 3.x")
    for arch, kind in (("gpt2", "layernorm"), ("llama", "rmsnorm")):
        adapter = tld.adapt(_load(tl_models, hf_dirs, arch, load))
        hf = {"gpt2": "transformer.h.1.ln_2", "llama": "model.layers.1.post_attention_layernorm"}[arch]
        raw = dict(AutoModelForCausalLM.from_pretrained(hf_dirs[arch]).named_parameters())
        norm = adapter.norm_weights(1, "ln2")
        assert norm.kind == kind
        if load == "hooked_transformer-folded":
            assert norm.w is None and norm.b is None
        elif load == "bridge-compat":  # folded: kept as w = 1, b = 0
            assert torch.equal(norm.w, torch.ones_like(norm.w))
        else:
            torch.testing.assert_close(norm.w.cpu(), raw[f"{hf}.weight"].detach(), rtol=0, atol=0)
            if arch == "gpt2":
                torch.testing.assert_close(norm.b.cpu(), raw[f"{hf}.bias"].detach(), rtol=0, atol=0)
        if arch == "llama":
            assert norm.b is None
    with pytest.raises(ValueError, match="ln1"):
        adapter.norm_weights(0, "ln_final")
    with pytest.raises(IndexError):
        adapter.norm_weights(2, "ln1")


def test_toy_norm_weights(tiny_toy_transformer):
    sma, modadd = (tld.adapt(tld.load_model(f"toy:{name}", device=test_device())) for name in ("sma", "modadd"))
    assert sma.norm_weights(0, "ln1") == NormWeights("rmsnorm", None, None)  # weightless RMSNorm
    assert modadd.norm_weights(0, "ln1") == NormWeights(None, None, None)
    norm = tld.adapt(tiny_toy_transformer).norm_weights(0, "ln1")
    assert norm.kind == "layernorm" and torch.equal(norm.w, tiny_toy_transformer.blocks[0].ln1.w.detach())
    assert not ov_invariants(modadd)["centered"].any() and (ov_invariants(modadd)["norm"].isna()).all()


def test_rmsnorm_is_not_centred(tl_models):
    """Llama (RMSNorm): OV = diag(w) W_V W_O, no projection; the dense formula with P would differ."""
    model = tl_models("llama", "bridge")
    a, w = model.blocks[1].attn, model.blocks[1].ln1.w
    ov = ov_invariants(model)
    assert not ov["centered"].any()
    row = ov[(ov["layer"] == 1) & (ov["head"] == 2)].iloc[0]
    kept = _dense_effective(w, a.W_V[1], a.W_O[2], layernorm=False, reading_right=False)
    centred = _dense_effective(w, a.W_V[1], a.W_O[2], layernorm=True, reading_right=False)
    s = torch.linalg.svdvals(kept)[:8].numpy()
    np.testing.assert_allclose(row["singular_values"], s, rtol=1e-10)
    assert np.abs(torch.linalg.svdvals(centred)[:8].numpy() - s).max() > 1e-3 * s[0]


def test_gqa_rows_share_the_kv_head(tl_models):
    model = tl_models("llama", "bridge")
    adapter = tld.adapt(model)
    ov = ov_invariants(model)
    assert adapter.n_kv_heads == 2 and adapter.n_heads == 4
    assert ov["kv_head"].tolist() == [0, 0, 1, 1] * adapter.n_layers
    attn, w = model.blocks[1].attn, model.blocks[1].ln1.w.detach().double().cpu()
    W_V, W_O = attn.W_V.detach().double().cpu(), attn.W_O.detach().cpu()  # [n_kv, D, d], [H, d, D]
    for h in range(4):
        s, _ = _dense(w[:, None] * W_V[h // 2], W_O[h])
        row = ov[(ov["layer"] == 1) & (ov["head"] == h)].iloc[0]
        np.testing.assert_allclose(row["singular_values"], s[: row["rank"]].numpy(), rtol=1e-9)
    assert qk_invariants(model)["rotary"].all()


# ---------------------------------------------------------------------------------------------- rank rule
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_ranks_do_not_depend_on_the_storage_dtype(hf_dirs, arch):
    """Issue 14 item 4: float32, float16 and bfloat16 loads of one checkpoint give the same ranks
    (d_head everywhere): the products are formed in float64 from numbers exact in float64, so the
    cut-off is float64's, not the storage dtype's (bfloat16's gave ranks 8–11 of 12 at d_model 48)."""
    ranks = {}
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        model = tld.load_model(hf_dirs[arch], device=test_device(), dtype=dtype)
        assert tld.adapt(model).dtype == dtype
        ov, qk = ov_invariants(model), qk_invariants(model)
        ranks[dtype] = (ov["rank"].tolist(), qk["rank"].tolist(), ov["rtol"].iloc[0])
    assert ranks[torch.float16] == ranks[torch.bfloat16] == ranks[torch.float32]
    assert set(ranks[torch.float32][0]) == set(ranks[torch.float32][1]) == {8}
    assert ranks[torch.float32][2] == 32 * torch.finfo(torch.float64).eps  # max(D, d)·eps(float64)


def test_gpt2_small_width_bfloat16_is_full_rank():
    """Issue 14 item 4: a random model at GPT-2-small width (D = 768, d = 64) stored in bfloat16 has
    every head at rank 64 (the bfloat16 cut-off 768·eps(bf16) > 1 gave rank 0)."""
    from tl_degeneracy.models.toys.transformer import ToyTransformer

    model = ToyTransformer(n_layers=1, d_model=768, n_heads=12, d_head=64, d_mlp=64, d_vocab=16, n_ctx=8, seed=0)
    model = model.to(torch.bfloat16).eval()
    for frame in (ov_invariants(model), qk_invariants(model)):
        assert len(frame) == 12 and (frame["rank"] == 64).all()
        assert (frame["free_directions"] == 64 * 64).all()


def test_plot_spectra(tiny_toy_transformer):
    fig = plot_spectra(ov_invariants(tiny_toy_transformer))
    assert len(fig.data) == 2 * 2  # one trace per (layer, head)
    assert "OV" in fig.layout.title.text
    with pytest.raises(ValueError, match="singular_values"):
        plot_spectra(ov_invariants(tiny_toy_transformer).drop(columns="singular_values"))


def test_not_a_transformer():
    with pytest.raises(TypeError, match="cannot adapt"):
        ov_invariants(nn.Linear(3, 3))


def test_non_finite_weights_are_refused_naming_the_tensor():
    # NaN weights used to surface as a raw LinAlgError from the SVD (and a misleading message from the
    # gauge tools); every weight-space analysis now names the tensor first.
    import tl_degeneracy as tld
    from tests.fixtures.toys import make_tiny_toy_transformer

    model = make_tiny_toy_transformer()
    with torch.no_grad():
        model.blocks[1].attn.W_V[0, 2, 3] = float("nan")
    for analysis in (tld.ov_invariants, tld.qk_invariants, tld.random_gauge, tld.canonicalize_heads):
        with pytest.raises(tld.NumericalError, match=r"not finite: live parameter blocks\.1\.attn\.W_V .* 1 NaN"):
            analysis(model)
