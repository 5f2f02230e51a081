"""Gauge invariants of attention heads: the OV and QK circuits (METHODS §2).

Every head computes its output through two products of weight matrices: the OV circuit
OV_h = W_V^h W_O^h (what a head writes, given what it attends to) and the QK circuit
QK_h = W_Q^h (W_K^h)ᵀ (where it attends). The factors are only defined up to the gauge
(W_V, W_O) → (W_V A, A⁻¹ W_O), (W_Q, W_K) → (W_Q B, W_K B⁻ᵀ) with A, B ∈ GL(d_head); the products
and everything computed from them are invariant. This module reports those invariants per head.

The products are the *effective* maps (METHODS §2), which do not depend on how the model was
loaded: the gain w of the norm in front of the attention (``ln1``) is folded into the reading
weights, and for LayerNorm both sides are projected onto the mean-zero subspace P = I − 11ᵀ/D (the
normalised input has mean zero; every later LayerNorm removes the mean of what a head writes):

    OV = P diag(w) W_V · W_O P,      QK = P diag(w) W_Q · (P diag(w) W_K)ᵀ,

without P for RMSNorm, and the plain products for models without norms. That is exactly what
TransformerLens' ``fold_ln`` + ``center_writing_weights`` store, so an unfolded TransformerBridge, a
compatibility-mode bridge and a folded HookedTransformer of one checkpoint give the same invariants
(P and diag(w) are then applied to weights that already carry them: P is idempotent and their w is 1).

The products are kept as TransformerLens ``FactoredMatrix`` objects (D×d times d×D): their
singular values come from a d-dimensional core and their nonzero eigenvalues from the d×d matrix
W_O P · P diag(w) W_V, so nothing D×D is ever formed or decomposed. Everything is computed in
float64 from the stored weights, which are exact float64 numbers whatever their storage dtype, so the
rank follows the package's one rule at float64 precision (:mod:`tl_degeneracy.numerics`).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
from jaxtyping import Complex, Float
from torch import Tensor
from transformer_lens import FactoredMatrix

from .models.adapt import adapt
from .models.adapter import ModelAdapter, NormWeights
from .numerics import numerical_rank, rank_rtol

__all__ = [
    "ov_invariants", "qk_invariants", "ov_circuits", "qk_circuits", "free_directions", "default_rtol",
    "fold_reading", "center_writing", "fold_bias",
]


def free_directions(d_model: int, d_head: int, rank: int) -> int:
    """Free directions of a factorisation of a rank-r D×D product through d dims (METHODS §2):
    2·D·d − r(2D − r); equal to d² at full rank r = d (the dimension of GL(d))."""
    return 2 * d_model * d_head - rank * (2 * d_model - rank)


def default_rtol(adapter: ModelAdapter, affine: bool = False) -> float:
    """The rank rule's relative singular-value cut-off for OV/QK (METHODS §2, :func:`numerics.rank_rtol`):
    max(D, d)·eps(float64), D + 1 for the affine QK form. The products are formed in float64 from
    stored weights that are exact in float64, so the storage dtype does not enter."""
    return rank_rtol((adapter.d_model + int(affine), adapter.d_head), torch.float64)


# ---------------------------------------------------------------------------------------------- effective maps
def fold_reading(W: Float[Tensor, "*heads D d"], norm: NormWeights) -> Float[Tensor, "*heads D d"]:
    """P diag(w) W for a weight that reads the normalised stream (W_Q, W_K, W_V; METHODS §2):
    the norm's gain folded in (where stored), then the mean over d_model removed for LayerNorm."""
    W = W.to(torch.float64)
    if norm.w is not None:
        W = W * norm.w.to(W)[:, None]
    return W - W.mean(-2, keepdim=True) if norm.kind == "layernorm" else W


def center_writing(W_O: Float[Tensor, "*heads d D"], norm: NormWeights) -> Float[Tensor, "*heads d D"]:
    """W_O P for a weight that writes to the residual stream: its mean over d_model removed under
    LayerNorm (the next LayerNorm removes it anyway), unchanged otherwise."""
    W_O = W_O.to(torch.float64)
    return W_O - W_O.mean(-1, keepdim=True) if norm.kind == "layernorm" else W_O


def fold_bias(
    b: Float[Tensor, "*heads d"], W: Float[Tensor, "*heads D d"], norm: NormWeights
) -> Float[Tensor, "*heads d"]:
    """b + β W: the norm's bias β (where stored) passed through the raw reading weight W, as
    ``fold_ln`` does (x = n·w + β with n the normalised input, so x W + b = n diag(w) W + (β W + b))."""
    b = b.to(torch.float64)
    if norm.b is None:
        return b
    return b + torch.einsum("D,...Dd->...d", norm.b.to(b), W.to(torch.float64))


def _per_layer(adapter: ModelAdapter, fn, *tensors: Tensor) -> Tensor:
    """``fn(*layer_slices, ln1 norm of that layer)`` stacked over layers."""
    return torch.stack([fn(*(t[layer] for t in tensors), adapter.norm_weights(layer, "ln1"))
                        for layer in range(adapter.n_layers)])


def ov_circuits(model) -> FactoredMatrix:
    """The effective OV_h = P diag(w) W_V^h · W_O^h P (module docstring) for every (layer, head), as
    one float64 ``FactoredMatrix`` [L, H, D, D] (GQA: the shared value head of each query head's
    group is used for every head of the group)."""
    adapter = adapt(model)
    adapter.check_finite()
    aw = adapter.attention_weights()
    return FactoredMatrix(_per_layer(adapter, fold_reading, aw.W_V), _per_layer(adapter, center_writing, aw.W_O))


def qk_circuits(model, affine: bool = False) -> FactoredMatrix:
    """The effective QK_h = P diag(w) W_Q^h · (P diag(w) W_K^h)ᵀ (module docstring) for every
    (layer, head), float64 ``FactoredMatrix`` [L, H, D, D].

    ``affine=True`` appends the biases: the (D+1)×(D+1) bilinear form of the augmented normalised
    input [n, 1], [P diag(w) W_Q; b_Q + β W_Q] [P diag(w) W_K; b_K + β W_K]ᵀ, which carries the
    whole score (x W_Q + b_Q)(x' W_K + b_K)ᵀ of x = n diag(w) + β. The norm's bias β enters only
    through the query and key biases, exactly as ``fold_ln`` folds it (:func:`fold_bias`). It is
    gauge-invariant too (b_Q → b_Q B, b_K → b_K B⁻ᵀ).
    """
    adapter = adapt(model)
    adapter.check_finite()
    aw = adapter.attention_weights()
    W_Q, W_K = _per_layer(adapter, fold_reading, aw.W_Q), _per_layer(adapter, fold_reading, aw.W_K)
    if affine:
        b_Q, b_K = _per_layer(adapter, fold_bias, aw.b_Q, aw.W_Q), _per_layer(adapter, fold_bias, aw.b_K, aw.W_K)
        W_Q = torch.cat([W_Q, b_Q[:, :, None]], dim=-2)
        W_K = torch.cat([W_K, b_K[:, :, None]], dim=-2)
    return FactoredMatrix(W_Q, W_K.transpose(-1, -2))


def _copying_scores(eig: Complex[Tensor, " r"]) -> tuple[float, float]:
    """(Σ Re λ / Σ |λ|, share of |λ| mass with Re λ > 0); NaN for a zero circuit.

    The first is the copying score of Elhage et al. (2021) in [−1, 1] (1: the circuit maps every
    direction onto a positive multiple of itself); the second is METHODS §2's summary.
    """
    mass = eig.abs()
    total = float(mass.sum())
    if total == 0.0:
        return math.nan, math.nan
    return float(eig.real.sum()) / total, float(mass[eig.real > 0].sum()) / total


def _invariant_rows(
    fm: FactoredMatrix, adapter: ModelAdapter, rtol: float, circuit: str, extra: dict
) -> pd.DataFrame:
    U, S, Vh = fm.svd()  # S: [L, H, d] (float64), sorted descending
    S = S.cpu()
    eig = fm.eigenvalues.cpu()  # eigenvalues of B A (d×d): the nonzero ones of A B, plus zeros
    norms = fm.norm().cpu()
    ranks = numerical_rank(S, rtol=rtol)  # the package's rule, here with the caller's or float64's rtol
    group = adapter.n_heads // adapter.n_kv_heads
    D = fm.ldim
    d = fm.mdim
    norm = adapter.norm_weights(0, "ln1").kind
    rows = []
    for layer in range(adapter.n_layers):
        for head in range(adapter.n_heads):
            s = S[layer, head]
            r = int(ranks[layer, head])
            tol = rtol * max(float(s[0]), 0.0) if s.numel() else 0.0
            lam = eig[layer, head]
            # An eigenvalue counts as nonzero when its modulus exceeds the singular values' cut-off,
            # and there are at most r of them (rank r). The cap matters: a repeated zero eigenvalue
            # of a non-normal matrix moves by ~eps^(1/m) under rounding, far above tol.
            lam = lam[torch.argsort(-lam.abs(), stable=True)]
            lam = lam[lam.abs() > tol][:r]
            copy, positive = _copying_scores(lam)
            rows.append({
                "layer": layer,
                "head": head,
                "kv_head": head // group,
                "circuit": circuit,
                "rank": r,
                "rtol": rtol,
                "tol": tol,
                "frobenius": float(norms[layer, head]),
                "singular_values": s[:r].numpy().copy(),
                "eigenvalues": lam.numpy().astype(np.complex128),
                "copying_score": copy,
                "positive_eigen_share": positive,
                "free_directions": free_directions(D, d, r),
                "norm": norm,
                "centered": norm == "layernorm",
                **extra,
            })
    return pd.DataFrame(rows)


def ov_invariants(model, rtol: float | None = None) -> pd.DataFrame:
    """Invariants of the effective OV circuit P diag(w) W_V W_O P per (layer, head) (METHODS §2;
    module docstring: the same whether the model's norms are folded or not).

    One row per head with: ``rank`` (numerical rank: singular values σ_i > rtol·σ_1), ``rtol`` and the
    absolute cut-off ``tol`` used, ``frobenius`` (‖OV‖_F), ``singular_values`` (the nonzero ones,
    descending), ``eigenvalues`` (the nonzero eigenvalues of OV, complex, by decreasing modulus;
    computed as those of the d×d matrix W_O P · P diag(w) W_V), ``copying_score`` (Σ Re λ / Σ |λ|),
    ``positive_eigen_share`` (share of eigenvalue modulus with Re λ > 0), ``free_directions`` =
    2·D·d − r(2D − r) of the factorisation (d² at full rank), ``norm`` (the norm folded in:
    ``"layernorm"``, ``"rmsnorm"`` or None) and ``centered`` (whether P was applied: LayerNorm).

    Grouped-query attention: the value head is shared by the query heads of a group, so every head h
    gets OV_h = W_V^{kv(h)} W_O^h with its own output slice and the group's shared W_V (column
    ``kv_head``). The free directions are per head as if the head were alone; the gauge of a shared
    value head acts on the whole group at once (``random_gauge``), so the group as a whole has d²
    gauge directions per KV head, not per query head.

    Works on every adapter backend and on the toys (on the SMA toy W_O is the identity and its RMSNorm
    has no gain, so OV is W_V).

    Args:
        model: anything ``tld.adapt`` accepts.
        rtol: relative cut-off for the rank; default :func:`default_rtol`, the package's rank rule at
            float64 precision (max(D, d)·eps(float64)), whatever dtype the weights are stored in.
    """
    adapter = adapt(model)
    rtol = default_rtol(adapter) if rtol is None else float(rtol)
    return _invariant_rows(ov_circuits(adapter), adapter, rtol, "OV", {})


def qk_invariants(model, rtol: float | None = None, affine: bool = False) -> pd.DataFrame:
    """Invariants of the effective QK circuit P diag(w) W_Q (P diag(w) W_K)ᵀ per (layer, head)
    (METHODS §2); the columns of :func:`ov_invariants`.

    QK_h = W_Q^h (W_K^{kv(h)})ᵀ: under grouped-query attention the key head is shared by a group of
    query heads (column ``kv_head``), each with its own W_Q slice. ``affine=True`` analyses the
    (D+1)×(D+1) form with the biases appended, the norm's bias folded into them (:func:`qk_circuits`);
    on the SMA toy, whose query is one learned vector (W_Q = 0, b_Q = q, W_K = I), QK is zero and the
    affine form has rank 1.

    Column ``rotary``: under rotary position embeddings the score is q R_{t−t'} kᵀ with a rotation
    between the factors, so only gauges that commute with the rotations leave the model unchanged
    (``random_gauge`` uses scalars there); the invariants of the effective W_Q W_Kᵀ are still those
    TransformerLens reports as ``model.QK`` for a folded model, and ``free_directions`` counts the
    generic factorisation freedom.
    """
    adapter = adapt(model)
    rtol = default_rtol(adapter, affine) if rtol is None else float(rtol)
    extra = {"affine": bool(affine), "rotary": adapter.cfg.positional_embedding == "rotary"}
    return _invariant_rows(qk_circuits(adapter, affine=affine), adapter, rtol, "QK", extra)
