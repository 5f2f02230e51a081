"""OV/QK invariants (METHODS §2): agreement with TransformerLens, known answers, GQA, toys, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import tl_degeneracy as tld
from tl_degeneracy.invariants import free_directions, ov_invariants, qk_invariants
from tl_degeneracy.plots import plot_spectra

from .fixtures.hf import BACKENDS


def _dense(W_left, W_right):
    m = W_left.detach().double() @ W_right.detach().double()
    return torch.linalg.svdvals(m), torch.linalg.eigvals(m)


def _match_eigs(a: np.ndarray, b: np.ndarray, tol: float) -> None:
    """Every eigenvalue of ``a`` has a partner in ``b`` within ``tol`` and the counts agree."""
    assert len(a) == len(b)
    for lam in a:
        assert np.min(np.abs(b - lam)) <= tol, (lam, b)


def test_toy_matches_dense_decompositions(tiny_toy_transformer):
    ov, qk = ov_invariants(tiny_toy_transformer), qk_invariants(tiny_toy_transformer)
    a = tiny_toy_transformer.blocks[1].attn
    assert len(ov) == len(qk) == 4
    row = ov[(ov["layer"] == 1) & (ov["head"] == 1)].iloc[0]
    s, eig = _dense(a.W_V[1], a.W_O[1])
    d = a.W_V.shape[-1]
    assert row["rank"] == d and row["free_directions"] == d * d
    np.testing.assert_allclose(row["singular_values"], s[:d].numpy(), rtol=1e-10)
    big = eig[eig.abs() > 1e-6 * s[0]].numpy()  # the D×D product has D − d zero eigenvalues
    _match_eigs(row["eigenvalues"], big, 1e-8 * float(s[0]))
    np.testing.assert_allclose(row["frobenius"], float(torch.linalg.matrix_norm(a.W_V[1].detach().double() @ a.W_O[1].detach().double())))
    assert -1 <= row["copying_score"] <= 1 and 0 <= row["positive_eigen_share"] <= 1
    row = qk[(qk["layer"] == 1) & (qk["head"] == 0)].iloc[0]
    s, _ = _dense(a.W_Q[0], a.W_K[0].T)
    np.testing.assert_allclose(row["singular_values"], s[:d].numpy(), rtol=1e-10)
    assert not row["rotary"]


def test_rank_deficient_head_free_directions(tiny_toy_transformer):
    a = tiny_toy_transformer.blocks[0].attn
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # W_V of head 0 with rank 3
        a.W_V[0] = a.W_V[0, :, :3] @ torch.randn(3, a.W_V.shape[-1], generator=g)
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


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_agrees_with_transformerlens(tl_models, arch, backend):
    """Singular values and eigenvalues equal those of TransformerLens' own model.OV / model.QK."""
    model = tl_models(arch, backend)
    for fn, name in ((ov_invariants, "OV"), (qk_invariants, "QK")):
        try:
            theirs = getattr(model, name)
        except Exception as e:  # noqa: BLE001 - report which backend lacks it
            pytest.skip(f"{type(model).__name__}.{name} unavailable here: {e}")
        frame = fn(model)
        S = theirs.S.detach().double()
        eig = theirs.eigenvalues.detach().to(torch.complex128)
        assert S.shape[:2] == (model.cfg.n_layers, model.cfg.n_heads)  # GQA expanded by TL too
        for _, row in frame.iterrows():
            s_tl = S[row["layer"], row["head"]]
            r = row["rank"]
            np.testing.assert_allclose(row["singular_values"], s_tl[:r].numpy(), rtol=1e-5, atol=1e-6 * float(s_tl[0]))
            e_tl = eig[row["layer"], row["head"]].numpy()
            e_tl = e_tl[np.abs(e_tl) > row["tol"]]
            _match_eigs(row["eigenvalues"], e_tl, 1e-5 * float(s_tl[0]))


def test_gqa_rows_share_the_kv_head(tl_models):
    model = tl_models("llama", "bridge")
    adapter = tld.adapt(model)
    ov = ov_invariants(model)
    assert adapter.n_kv_heads == 2 and adapter.n_heads == 4
    assert ov["kv_head"].tolist() == [0, 0, 1, 1] * adapter.n_layers
    attn = model.blocks[1].attn
    W_V, W_O = attn.W_V.detach(), attn.W_O.detach()  # [n_kv, D, d], [H, d, D]
    for h in range(4):
        s, _ = _dense(W_V[h // 2], W_O[h])
        row = ov[(ov["layer"] == 1) & (ov["head"] == h)].iloc[0]
        np.testing.assert_allclose(row["singular_values"], s[: row["rank"]].numpy(), rtol=1e-9)
    assert qk_invariants(model)["rotary"].all()


def test_plot_spectra(tiny_toy_transformer):
    fig = plot_spectra(ov_invariants(tiny_toy_transformer))
    assert len(fig.data) == 2 * 2  # one trace per (layer, head)
    assert "OV" in fig.layout.title.text
    with pytest.raises(ValueError, match="singular_values"):
        plot_spectra(ov_invariants(tiny_toy_transformer).drop(columns="singular_values"))


def test_not_a_transformer():
    with pytest.raises(TypeError, match="cannot adapt"):
        ov_invariants(nn.Linear(3, 3))
