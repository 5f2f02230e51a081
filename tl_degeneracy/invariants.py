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
S^½ VᵀU S^½ of that SVD (A B = U S Vᵀ), so nothing D×D is ever formed or decomposed. Everything is computed in
float64 from the stored weights, which are exact float64 numbers whatever their storage dtype, so the
rank follows the package's one rule at float64 precision (:mod:`tl_degeneracy.numerics`), relative to
the product's rounding scale ‖A‖₂‖B‖₂ (:func:`numerics.product_scale`), so that an unbalanced gauge
does not change it.

Free directions (METHODS (2.4), :func:`free_directions`) are counted per key/value group, the unit
on which one gauge acts, and for rotary QK only the gauges that commute with the rotations count.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable

import numpy as np
import pandas as pd
import torch
from jaxtyping import Complex, Float
from torch import Tensor
from transformer_lens import FactoredMatrix

from .models.adapt import adapt
from .models.adapter import ModelAdapter, NormWeights
from .models.selection import circuit_parameters
from .numerics import check_tolerances, numerical_rank, product_scale, rank_rtol

__all__ = [
    "ov_invariants", "qk_invariants", "ov_circuits", "qk_circuits", "free_directions", "default_rtol",
    "fold_reading", "center_writing", "fold_bias",
]


def free_directions(rows: int, cols: int, blocks: Iterable[tuple[int, int, int]]) -> int:
    """Free directions of a circuit's factorisation (METHODS (2.4)): the number of factor entries minus
    the rank of the Jacobian of (L, R) ↦ (L R_t R)_t, with L rows×d, R d×cols and R_t the rotation
    between a query and a key t positions apart (the identity for OV and without rotary).

    ``blocks`` holds (m, rank L E, rank Eᴴ R) for each eigenspace E (d×m, orthonormal columns) of the
    rotation of one position; (d, rank L, rank R) without rotary. R_t = Σ_E λ_E^t E Eᴴ splits the
    Jacobian into one factorisation through m dimensions per eigenspace, so the count is

        Σ_E m·(rows + cols) − rows·rank(Eᴴ R) − cols·rank(L E) + rank(L E)·rank(Eᴴ R).

    At full rank: d² without rotary (GL(d), the gauge (2.1)); Σ_E m² with rotary (the matrices that
    commute with every rotation: 2 per rotary pair of distinct frequency, plus (d − rotary dims)²).
    With both factors of rank r and rows = cols = D it is (2.4)'s 2·D·d − r(2D − r). It is the factors'
    ranks that enter, not the product's: a head whose W_V loses a column (rank d − 1) while W_O keeps
    full rank has d² − d + D free directions, not (d − 1)² + 2D.
    """
    return sum(m * (rows + cols) - rows * rr - cols * rl + rl * rr for m, rl, rr in blocks)


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


def _per_layer(adapter: ModelAdapter, fn, *tensors: Tensor, query_key: bool = False) -> Tensor:
    """``fn(*layer_slices, norm of that layer)`` stacked over layers: ln1, or as the queries and keys
    read it (``query_key``: ``ModelAdapter.query_key_norm``)."""
    norm = adapter.query_key_norm if query_key else lambda layer: adapter.norm_weights(layer, "ln1")
    return torch.stack([fn(*(t[layer] for t in tensors), norm(layer)) for layer in range(adapter.n_layers)])


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

    A shortformer model's queries and keys read x̃ = ln1(x) + W_pos[p], which spans R^D and carries
    no fold: there QK_h = W_Q^h (W_K^h)ᵀ, the form on x̃ itself, and the affine form appends the
    plain b_Q, b_K (``ModelAdapter.query_key_norm``; METHODS §2).
    """
    adapter = adapt(model)
    adapter.check_finite()
    aw = adapter.attention_weights()
    W_Q = _per_layer(adapter, fold_reading, aw.W_Q, query_key=True)
    W_K = _per_layer(adapter, fold_reading, aw.W_K, query_key=True)
    if affine:
        b_Q = _per_layer(adapter, fold_bias, aw.b_Q, aw.W_Q, query_key=True)
        b_K = _per_layer(adapter, fold_bias, aw.b_K, aw.W_K, query_key=True)
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


# ---------------------------------------------------------------------------------------------- free directions
def _rotation_eigenspaces(d: int, angles: Float[Tensor, " pairs"], adjacent: bool) -> list[Complex[Tensor, "d m"]]:
    """Orthonormal bases of the eigenspaces of the rotation of one position (METHODS §2), which
    :func:`free_directions` counts block by block.

    Pair (a, b) turned by ω has the eigenvectors (e_a ± i·e_b)/√2 with eigenvalues e^{±iω}; the
    coordinates beyond the rotary ones keep eigenvalue 1. Eigenvalues that agree to the rank rule's
    d·eps(float64) share one eigenspace (repeated frequencies; an angle of 0 joins the non-rotary part).
    """
    n = angles.numel()
    first = torch.arange(0, 2 * n, 2) if adjacent else torch.arange(n)
    second = first + 1 if adjacent else first + n
    eye = torch.eye(d, dtype=torch.complex128)
    eigen = [(complex(1.0), eye[c]) for c in range(2 * n, d)]  # (eigenvalue, eigenvector)
    for a, b, w in zip(first.tolist(), second.tolist(), angles.tolist()):
        u = (eye[a] + 1j * eye[b]) / math.sqrt(2)
        eigen += [(complex(math.cos(w), math.sin(w)), u), (complex(math.cos(w), -math.sin(w)), u.conj())]
    groups: list[tuple[complex, list[Tensor]]] = []
    for lam, v in eigen:
        match = next((g for g in groups if abs(g[0] - lam) <= rank_rtol(d)), None)
        if match is None:
            groups.append((lam, [v]))
        else:
            match[1].append(v)
    return [torch.stack(vs, dim=1) for _, vs in groups]


def _ranks(blocks: tuple[Tensor, ...], length: int, scale: Tensor) -> list[int]:
    """The rank rule (float64, dims (length, block width), cut-off relative to ``scale``) of each
    d×m block, batched over the blocks of one width (RoPE gives d blocks of one column each)."""
    ranks = [0] * len(blocks)
    by_width: dict[int, list[int]] = {}
    for i, block in enumerate(blocks):
        by_width.setdefault(block.shape[-1], []).append(i)
    for m, idx in by_width.items():
        spectra = torch.linalg.svdvals(torch.stack([blocks[i] for i in idx]))
        for i, r in zip(idx, numerical_rank(spectra, (length, m), scale=scale).tolist()):
            ranks[i] = r
    return ranks


def _block_ranks(
    left: Float[Tensor, "rows d"], right: Float[Tensor, "d cols"], spaces: list[Tensor]
) -> list[tuple[int, int, int]]:
    """(m, rank L E, rank Eᴴ R) for each eigenspace E of ``spaces``, by the rank rule at float64
    (the factors are float64 functions of stored weights; the scale is ‖L‖₂, resp. ‖R‖₂).

    L = Q T with Q orthonormal has the ranks and norms of T (d×d), so only d×d matrices are decomposed."""
    V = torch.cat(spaces, dim=1).to(left.device)  # unitary: the eigenspaces side by side
    T_l = torch.linalg.qr(left, mode="r").R.to(V.dtype)
    T_r = torch.linalg.qr(right.mT, mode="r").R.to(V.dtype)
    sizes = [E.shape[1] for E in spaces]
    rank_l = _ranks((T_l @ V).split(sizes, dim=1), left.shape[0], product_scale(T_l, V))
    rank_r = _ranks((T_r @ V.conj()).split(sizes, dim=1), right.shape[1], product_scale(T_r, V))
    return list(zip(sizes, rank_l, rank_r))


def _group_free_directions(
    fm: FactoredMatrix, adapter: ModelAdapter, shared_left: bool, rotary: bool, parameters: list[bool],
    affine: bool = False,
) -> list[list[int | None]]:
    """:func:`free_directions` of every (layer, KV group): the group's factors are the shared one
    (OV: P diag(w) W_V, ``shared_left``; QK: (P diag(w) W_K)ᵀ) and the query heads' own ones side by
    side (OV: [W_O^{h1} P … W_O^{hm} P]; QK: [P diag(w) W_Q^{h1}; …]), so the shared weights count once.
    None for the groups of a layer whose factors are not all parameters (``parameters[layer]`` False):
    a factor the architecture fixes has no gauge to count. ``affine`` (QK): the factors' bias row
    (b_Q + β W_Q) and column (b_K + β W_K) count only where the layer stores that bias; elsewhere they
    are functions of W_Q and W_K, not entries of their own (audit 9: 264 counted for 256 on a
    bias-free Llama)."""
    group = adapter.n_heads // adapter.n_kv_heads
    d = fm.mdim
    out = []
    for layer in range(adapter.n_layers):
        if not parameters[layer]:
            out.append([None] * adapter.n_kv_heads)
            continue
        spaces = (_rotation_eigenspaces(d, *adapter.rotary_angles(layer)) if rotary
                  else [torch.eye(d, dtype=torch.float64)])
        counts = []
        biases = adapter.map_biases(layer) if affine else {}
        rows = fm.A.shape[-2] - int(affine and not biases["W_Q"])
        cols = fm.B.shape[-1] - int(affine and not biases["W_K"])
        for kv in range(adapter.n_kv_heads):
            heads = slice(kv * group, (kv + 1) * group)
            if shared_left:
                left, right = fm.A[layer, kv * group], torch.cat(list(fm.B[layer, heads]), dim=-1)
            else:
                left = torch.cat([a[:rows] for a in fm.A[layer, heads]], dim=0)
                right = fm.B[layer, kv * group][:, :cols]
            counts.append(free_directions(left.shape[0], right.shape[1], _block_ranks(left, right, spaces)))
        out.append(counts)
    return out


# ---------------------------------------------------------------------------------------------- rows
def _invariant_rows(
    fm: FactoredMatrix, adapter: ModelAdapter, rtol: float, circuit: str, extra: dict,
    free: list[list[int | None]] | None, parameters: list[bool],
) -> pd.DataFrame:
    """One row per head (the columns of :func:`ov_invariants`); ``free`` None: free directions not
    counted (<NA>: queries and keys normalized before the scores, :func:`qk_invariants`), as for a
    group whose entry is None; ``parameters``: per layer, whether the circuit's factors are all live
    parameters (``models.selection.circuit_parameters``)."""
    U, S, V = fm.svd()  # A B = U diag(S) Vᵀ; S: [L, H, d] (float64), sorted descending
    # The nonzero eigenvalues of U S Vᵀ are those of the d×d core S^½ (VᵀU) S^½, which is gauge-invariant:
    # B A = G⁻¹(W_O W_V)G in a stored gauge G carries rounding that grows as cond(G)² (audit 19a F1:
    # 7·10⁻⁶ relative at cond 10⁶, where the singular values agreed to 4·10⁻¹¹).
    root = S.sqrt()
    eig = torch.linalg.eigvals(root[..., :, None] * (V.mT @ U) * root[..., None, :]).cpu()
    S = S.cpu()
    norms = fm.norm().cpu()
    # The rank rule for a product computed from its factors: the cut-off scales with ‖A‖₂‖B‖₂, the
    # size of the rounding of the SVD's core, which a gauge can make much larger than σ_1.
    scales = product_scale(fm.A, fm.B).cpu()
    ranks = numerical_rank(S, rtol=rtol, scale=scales)
    group = adapter.n_heads // adapter.n_kv_heads
    norm = (adapter.query_key_norm(0) if circuit == "QK" else adapter.norm_weights(0, "ln1")).kind
    rows = []
    for layer in range(adapter.n_layers):
        for head in range(adapter.n_heads):
            s = S[layer, head]
            r = int(ranks[layer, head])
            tol = rtol * float(scales[layer, head])
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
                # The group's count on its first head: the column sums to the model's total.
                "free_directions": (pd.NA if free is None or free[layer][head // group] is None
                                    else free[layer][head // group] if head % group == 0 else 0),
                "parameters": parameters[layer],
                "norm": norm,
                "centered": norm == "layernorm",
                **extra,
            })
    frame = pd.DataFrame(rows)
    frame["free_directions"] = frame["free_directions"].astype("Int64")
    return frame


def ov_invariants(model, rtol: float | None = None) -> pd.DataFrame:
    """Invariants of the effective OV circuit P diag(w) W_V W_O P per (layer, head) (METHODS §2;
    module docstring: the same whether the model's norms are folded or not).

    One row per head with: ``rank`` (numerical rank: singular values σ_i > rtol·‖A‖₂‖B‖₂ for the
    factors A = P diag(w) W_V, B = W_O P, :func:`numerics.product_scale`: the scale of the product's
    rounding, so that a gauge with ill-conditioned A leaves the rank as it is), ``rtol`` and the
    absolute cut-off ``tol`` used, ``frobenius`` (‖OV‖_F), ``singular_values`` (the nonzero ones,
    descending), ``eigenvalues`` (the nonzero eigenvalues of OV, complex, by decreasing modulus;
    computed as those of the d×d matrix S^½ VᵀU S^½ from the product's SVD U S Vᵀ, which no gauge
    moves: those of W_O P · P diag(w) W_V in the stored gauge carry its rounding, cond(gauge)²·eps), ``copying_score`` (Σ Re λ / Σ |λ|),
    ``positive_eigen_share`` (share of eigenvalue modulus with Re λ > 0), ``free_directions``,
    ``norm`` (the norm folded in: ``"layernorm"``, ``"rmsnorm"`` or None) and ``centered`` (whether P
    was applied: LayerNorm).

    ``free_directions`` are those of the factorisation of the head's KV *group* (:func:`free_directions`,
    METHODS (2.4)): d² at full rank (the gauge A of (2.1)), more where a factor is rank deficient.
    Under grouped-query attention the value head is shared by the m query heads of a group, every
    head h gets OV_h = W_V^{kv(h)} W_O^h (column ``kv_head``), and one gauge A acts on the whole group,
    so the group, factorised as W_V·[W_O^{h1} … W_O^{hm}], is what has free directions. Its count
    stands on the row of its first query head and the group's other rows hold 0, so the column sums
    to the model's total; without GQA every head is its own group.

    ``parameters``: whether the circuit's factors are all live parameters
    (``models.selection.circuit_parameters``). Where one is fixed by the architecture there is no gauge
    and the product is not degenerate in the weights: ``free_directions`` is <NA> there.

    Works on every adapter backend and on the toys (on the SMA toy W_O is the identity, not a
    parameter, and its RMSNorm has no gain, so OV is W_V: ``parameters`` False).

    Column ``post_norm``: where the attention's summed output is normalized before the residual add
    (Gemma 2/3's ``ln1_post``, "sandwich" norms), a head writes diag(g_post)·z W_O / rms(Σ_h z_h W_O^h):
    its per-token 1/rms is shared by the heads and input-dependent, and the fixed gain g_post changes
    spectra and copying scores (sign included, audit 9). The invariants describe P diag(w) W_V W_O, not
    the written map, and a warning says so. Ranks and free directions are unaffected where g_post has
    no zeros.

    Args:
        model: anything ``tld.adapt`` accepts.
        rtol: relative cut-off for the rank; default :func:`default_rtol`, the package's rank rule at
            float64 precision (max(D, d)·eps(float64)), whatever dtype the weights are stored in.
    """
    adapter = adapt(model)
    rtol = default_rtol(adapter) if rtol is None else check_tolerances(rtol)[0]
    fm = ov_circuits(adapter)
    parameters = [circuit_parameters(adapter, layer).ov for layer in range(adapter.n_layers)]
    free = _group_free_directions(fm, adapter, shared_left=True, rotary=False, parameters=parameters)
    post_norm = adapter.post_norm("attn")
    if post_norm:
        warnings.warn("ov_invariants: this model normalizes the attention's output before the residual add (ln1_post, "
                      "as Gemma 2/3), so OV = P diag(w) W_V W_O describes the weights, not the map a head writes, which "
                      "that norm's gain and per-token scale change: spectra and copying scores are of W_V W_O (ranks and "
                      "free directions hold where the gain has no zeros)", RuntimeWarning, stacklevel=2)
    return _invariant_rows(fm, adapter, rtol, "OV", {"post_norm": post_norm}, free, parameters)


def qk_invariants(model, rtol: float | None = None, affine: bool = False) -> pd.DataFrame:
    """Invariants of the effective QK circuit P diag(w) W_Q (P diag(w) W_K)ᵀ per (layer, head)
    (METHODS §2; a shortformer's W_Q W_Kᵀ, :func:`qk_circuits`, its column ``norm`` None); the
    columns of :func:`ov_invariants`.

    QK_h = W_Q^h (W_K^{kv(h)})ᵀ: under grouped-query attention the key head is shared by a group of
    query heads (column ``kv_head``), each with its own W_Q slice, and ``free_directions`` are the
    group's, [W_Q^{h1}; …; W_Q^{hm}]·W_Kᵀ, on its first head's row. ``affine=True`` analyses the
    (D+1)×(D+1) form with the biases appended, the norm's bias folded into them (:func:`qk_circuits`);
    on the SMA toy, whose query is one learned vector (W_Q = 0, b_Q = q, W_K = I), QK is zero and the
    affine form has rank 1.

    Column ``rotary``: under rotary position embeddings the score is q R_{t−t'} kᵀ with a rotation
    between the factors. The invariants of the effective W_Q W_Kᵀ are still those TransformerLens
    reports as ``model.QK`` for a folded model, but only gauges that commute with every rotation leave
    the model unchanged, so ``free_directions`` count the factorisations of all the q R_t kᵀ together:
    at full rank 2 per rotary pair (distinct frequencies, as RoPE's are) plus (d − rotary dims)² for
    the coordinates rotary leaves alone, not d² (:func:`free_directions`). This takes the rotations of
    every offset 0 … n_ctx − 1 to span the algebra of the one-position rotation (n_ctx at least its
    number of distinct eigenvalues, ≤ d + 1; n_ctx ≥ 2 at full rank).

    Column ``qk_norm``: where queries and keys are normalized before the scores (Qwen3, OLMo2, Gemma3,
    ``use_qk_norm``), the scores are not the bilinear form W_Q W_Kᵀ but one of the normalized q and
    k: the invariants describe the weights' product only, a warning says so, and ``free_directions``
    are <NA> (the norm leaves no GL(d) gauge, only the scalings it divides out; (2.4) does not apply).
    """
    adapter = adapt(model)
    rtol = default_rtol(adapter, affine) if rtol is None else check_tolerances(rtol)[0]
    rotary, qk_norm = adapter.cfg.positional_embedding == "rotary", adapter.cfg.qk_norm
    fm = qk_circuits(adapter, affine=affine)
    if qk_norm:
        warnings.warn("qk_invariants: this model normalizes queries and keys before the scores, so QK = W_Q W_Kᵀ "
                      "describes the weights, not the score map, and its free directions are not counted (<NA>)",
                      RuntimeWarning, stacklevel=2)
    parameters = [circuit_parameters(adapter, layer).qk for layer in range(adapter.n_layers)]
    free = None if qk_norm else _group_free_directions(fm, adapter, shared_left=False, rotary=rotary,
                                                       parameters=parameters, affine=affine)
    return _invariant_rows(fm, adapter, rtol, "QK", {"affine": bool(affine), "rotary": rotary, "qk_norm": qk_norm},
                           free, parameters)
