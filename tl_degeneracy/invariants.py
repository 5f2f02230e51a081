"""Gauge invariants of attention heads: the OV and QK circuits (METHODS §2).

Every head computes its output through two products of weight matrices: the OV circuit
OV_h = W_V^h W_O^h (what a head writes, given what it attends to) and the QK circuit
QK_h = W_Q^h (W_K^h)ᵀ (where it attends). The factors are only defined up to the gauge
(W_V, W_O) → (W_V A, A⁻¹ W_O), (W_Q, W_K) → (W_Q B, W_K B⁻ᵀ) with A, B ∈ GL(d_head); the products
and everything computed from them are invariant. This module reports those invariants per head.

The products are kept as TransformerLens ``FactoredMatrix`` objects (D×d times d×D): their
singular values come from a d-dimensional core and their nonzero eigenvalues from the d×d matrix
W_O W_V, so nothing D×D is ever formed or decomposed. Everything is computed in float64.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
from jaxtyping import Complex
from torch import Tensor
from transformer_lens import FactoredMatrix

from .models.adapt import adapt
from .models.adapter import ModelAdapter

__all__ = ["ov_invariants", "qk_invariants", "ov_circuits", "qk_circuits", "free_directions", "default_rtol"]


def free_directions(d_model: int, d_head: int, rank: int) -> int:
    """Free directions of a factorisation of a rank-r D×D product through d dims (METHODS §2):
    2·D·d − r(2D − r); equal to d² at full rank r = d (the dimension of GL(d))."""
    return 2 * d_model * d_head - rank * (2 * d_model - rank)


def default_rtol(adapter: ModelAdapter) -> float:
    """Relative singular-value cut-off from the precision of the stored weights.

    The factors are stored in the model's dtype, so each entry carries a relative rounding error of
    eps(dtype); the product's singular values are then known to about max(D, d)·eps·σ_1 (the
    standard backward-error bound of a matrix product). Anything below that is numerically zero.
    """
    eps = torch.finfo(adapter.dtype).eps
    return max(adapter.d_model, adapter.d_head) * eps


def ov_circuits(model) -> FactoredMatrix:
    """OV_h = W_V^h W_O^h for every (layer, head) as one float64 ``FactoredMatrix`` [L, H, D, D]
    (GQA: the shared value head of each query head's group is used for every head of the group)."""
    aw = adapt(model).attention_weights()
    return FactoredMatrix(aw.W_V.to(torch.float64), aw.W_O.to(torch.float64))


def qk_circuits(model, affine: bool = False) -> FactoredMatrix:
    """QK_h = W_Q^h (W_K^h)ᵀ for every (layer, head), float64 ``FactoredMatrix`` [L, H, D, D].

    ``affine=True`` appends the biases: the (D+1)×(D+1) bilinear form of the augmented input
    [x, 1], [W_Q; b_Q] [W_K; b_K]ᵀ, which carries the whole score (x W_Q + b_Q)(x' W_K + b_K)ᵀ.
    It is gauge-invariant too (b_Q → b_Q B, b_K → b_K B⁻ᵀ).
    """
    aw = adapt(model).attention_weights()
    W_Q, W_K = aw.W_Q.to(torch.float64), aw.W_K.to(torch.float64)
    if affine:
        W_Q = torch.cat([W_Q, aw.b_Q.to(torch.float64)[:, :, None]], dim=-2)
        W_K = torch.cat([W_K, aw.b_K.to(torch.float64)[:, :, None]], dim=-2)
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
    eig = fm.eigenvalues  # eigenvalues of B A (d×d): the nonzero ones of A B, plus zeros
    norms = fm.norm()
    group = adapter.n_heads // adapter.n_kv_heads
    D = fm.ldim
    d = fm.mdim
    rows = []
    for layer in range(adapter.n_layers):
        for head in range(adapter.n_heads):
            s = S[layer, head]
            top = float(s[0]) if s.numel() else 0.0
            tol = rtol * top
            keep = s > tol if top > 0 else torch.zeros_like(s, dtype=torch.bool)
            r = int(keep.sum())
            lam = eig[layer, head]
            # An eigenvalue counts as nonzero when its modulus exceeds the singular values' cut-off,
            # and there are at most r of them (rank r). The cap matters: a repeated zero eigenvalue
            # of a non-normal matrix moves by ~eps^(1/m) under rounding, far above tol.
            lam = lam[torch.argsort(-lam.abs(), stable=True)]
            lam = lam[lam.abs() > tol][:r] if top > 0 else lam[:0]
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
                "singular_values": s[keep].numpy().copy(),
                "eigenvalues": lam.numpy().astype(np.complex128),
                "copying_score": copy,
                "positive_eigen_share": positive,
                "free_directions": free_directions(D, d, r),
                **extra,
            })
    return pd.DataFrame(rows)


def ov_invariants(model, rtol: float | None = None) -> pd.DataFrame:
    """OV-circuit invariants per (layer, head) (METHODS §2).

    One row per head with: ``rank`` (numerical rank: singular values σ_i > rtol·σ_1), ``rtol`` and the
    absolute cut-off ``tol`` used, ``frobenius`` (‖W_V W_O‖_F), ``singular_values`` (the nonzero ones,
    descending), ``eigenvalues`` (the nonzero eigenvalues of OV, complex, by decreasing modulus;
    computed as those of the d×d matrix W_O W_V), ``copying_score`` (Σ Re λ / Σ |λ|),
    ``positive_eigen_share`` (share of eigenvalue modulus with Re λ > 0), and ``free_directions`` =
    2·D·d − r(2D − r) of the factorisation (d² at full rank).

    Grouped-query attention: the value head is shared by the query heads of a group, so every head h
    gets OV_h = W_V^{kv(h)} W_O^h with its own output slice and the group's shared W_V (column
    ``kv_head``). The free directions are per head as if the head were alone; the gauge of a shared
    value head acts on the whole group at once (``random_gauge``), so the group as a whole has d²
    gauge directions per KV head, not per query head.

    Works on every adapter backend and on the toys (on the SMA toy W_O is the identity, so OV is W_V).

    Args:
        model: anything ``tld.adapt`` accepts.
        rtol: relative cut-off for the rank; default :func:`default_rtol` (max(D, d)·eps of the
            model's dtype, the rounding error of the stored factors).
    """
    adapter = adapt(model)
    rtol = default_rtol(adapter) if rtol is None else float(rtol)
    return _invariant_rows(ov_circuits(adapter), adapter, rtol, "OV", {})


def qk_invariants(model, rtol: float | None = None, affine: bool = False) -> pd.DataFrame:
    """QK-circuit invariants per (layer, head) (METHODS §2); the columns of :func:`ov_invariants`.

    QK_h = W_Q^h (W_K^{kv(h)})ᵀ: under grouped-query attention the key head is shared by a group of
    query heads (column ``kv_head``), each with its own W_Q slice. ``affine=True`` analyses the
    (D+1)×(D+1) form with the biases appended (:func:`qk_circuits`); on the SMA toy, whose query is
    one learned vector (W_Q = 0, b_Q = q, W_K = I), QK is zero and the affine form has rank 1.

    Column ``rotary``: under rotary position embeddings the score is q R_{t−t'} kᵀ with a rotation
    between the factors, so only gauges that commute with the rotations leave the model unchanged
    (``random_gauge`` uses scalars there); the invariants of W_Q W_Kᵀ are still those TransformerLens
    reports as ``model.QK``, and ``free_directions`` counts the generic factorisation freedom.
    """
    adapter = adapt(model)
    rtol = default_rtol(adapter) if rtol is None else float(rtol)
    extra = {"affine": bool(affine), "rotary": adapter.cfg.positional_embedding == "rotary"}
    return _invariant_rows(qk_circuits(adapter, affine=affine), adapter, rtol, "QK", extra)
