"""Per-head gauges: random GL(d_head) gauges and the canonical gauge (METHODS §2).

The gauge of a head, (W_V, W_O, b_V) → (W_V A, A⁻¹ W_O, b_V A) and (W_Q, W_K, b_Q, b_K) →
(W_Q B, W_K B⁻ᵀ, b_Q B, b_K B⁻ᵀ), leaves the model's function unchanged. Under grouped-query
attention a key/value head is shared by a group of query heads, so its gauge acts on the shared
W_K/W_V (and b_K/b_V) and on the W_Q/W_O slices of *every* head of the group at once.

Rotary position embeddings put a position-dependent rotation between q and k, so a generic B would
change the scores; only gauges that commute with every rotation are symmetries. Here the QK gauge of
rotary models is restricted to scalars B = s·I (s ≠ 0), which commute with anything. (Block scalings
that act as complex numbers on each rotary pair are symmetries too; they are not used.) The same
holds where queries and keys are normalized before the scores (``cfg.qk_norm``: Qwen3, OLMo2,
Gemma3): a norm divides out a scaling of q and k, but no other B — up to its ε, which does not
scale (on a tiny Qwen3, logits move by 2·10⁻⁵ of their scale at s = 0.74 and 3·10⁻³ at s = 0.1;
trained models' q·q ≫ ε).

Weights are written back through the adapter (:func:`write_attention`): the TransformerLens-layout
accessors of every backend are pure re-layouts of live parameters (HookedTransformer and the toys:
the parameters themselves; TransformerBridge: views of the HF weights), and
``models.selection.measure_parameter`` measures which parameter entry feeds which accessor entry.
Each write is read back and checked.
"""

from __future__ import annotations

import warnings

import torch
from jaxtyping import Float
from torch import Tensor

from .data import as_seed
from .invariants import center_writing, fold_reading
from .models.adapt import adapt
from .models.adapter import ModelAdapter
from .models.copying import copy_model
from .models.selection import attention_layouts, circuit_parameters, read_attention, writable
from .numerics import numerical_rank, product_scale, warn_half_storage

__all__ = ["random_gauge", "canonicalize_heads", "write_attention", "column_signs"]

_KEYS = ("W_Q", "b_Q", "W_K", "b_K", "W_V", "b_V", "W_O")


# ---------------------------------------------------------------------------------------------- writing
def write_attention(adapter: ModelAdapter, layer: int, values: dict[str, Tensor], layouts=None) -> None:
    """Set layer ``layer``'s attention accessors (TL layout, n_kv heads for K/V) to ``values``, in place.

    Every entry of an accessor must come from a live parameter (otherwise ValueError: e.g. the SMA
    toy's fixed W_O = I). The result is read back and compared with ``values``.
    """
    layouts = attention_layouts(adapter, layer) if layouts is None else layouts
    current = read_attention(adapter, layer)
    for key, value in values.items():
        if key not in current:
            raise ValueError(f"layer {layer} has no {key} (a bias the checkpoint lacks?); cannot write it")
        if not writable(layouts, key, current[key].shape):
            raise ValueError(f"{key} of layer {layer} is not (entirely) a parameter of this model; cannot write it")
    with torch.no_grad():
        for p, layout in layouts:
            for key, (touched, idx) in layout.items():
                if key in values:
                    # Multi-dimensional indices: bridge parameters can be non-contiguous views
                    # (GPT-2's split q/k/v share storage with the joint c_attn), so no flat view.
                    p[torch.unravel_index(idx, p.shape)] = values[key].to(device=p.device, dtype=p.dtype)[touched]
    back = read_attention(adapter, layer)
    for key, value in values.items():
        target = value.to(back[key].dtype)
        scale = float(target.abs().max()) or 1.0
        if not torch.allclose(back[key], target, rtol=0, atol=4 * torch.finfo(target.dtype).eps * scale):
            raise RuntimeError(f"writing {key} of layer {layer} did not take effect (read back differs)")


# ---------------------------------------------------------------------------------------------- gauges
def _random_invertible(d: int, g: torch.Generator) -> Float[Tensor, "d d"]:
    """A well-conditioned random matrix: Q1 diag(±e^{N(0, 0.3²)}) Q2 (condition number ~e^{±1})."""
    q1, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    signs = torch.where(torch.rand(d, generator=g) < 0.5, -1.0, 1.0).to(torch.float64)
    scales = torch.exp(0.3 * torch.randn(d, generator=g, dtype=torch.float64))
    return q1 @ torch.diag(signs * scales) @ q2


def _random_scalar(d: int, g: torch.Generator) -> Float[Tensor, "d d"]:
    sign = -1.0 if float(torch.rand(1, generator=g)) < 0.5 else 1.0
    return sign * float(torch.exp(0.3 * torch.randn(1, generator=g, dtype=torch.float64))) * torch.eye(d, dtype=torch.float64)


def column_signs(cols: Float[Tensor, "n r"]) -> Float[Tensor, " r"]:
    """±1 per column so that each column's entry of largest modulus is positive (first on ties): the
    sign convention of the canonical gauge (METHODS §2), also used for interaction-basis directions."""
    idx = cols.abs().argmax(0)
    s = torch.sign(cols[idx, torch.arange(cols.shape[1], device=cols.device)])
    return torch.where(s == 0, torch.ones_like(s), s)


def _canonical_gl(left: Float[Tensor, "m d"], right: Float[Tensor, "d n"]) -> Float[Tensor, "d d"]:
    """A = [A_r, F] with left·A_r = U_r√S_r and B_r·right = √S_r V_rᵀ for the first r rows B_r of
    A⁻¹, from the thin SVD left·right = U S Vᵀ of numerical rank r (METHODS §2, canonical gauge).

    Done through the d×d core: left = Q1 R1, rightᵀ = Q2 R2, R1 R2ᵀ = u s vᵀ, so U = Q1 u, V = Q2 v,
    A_r = right·V_r S_r^(−1/2) = R2ᵀ v_r s_r^(−1/2) and B_r = S_r^(−1/2) U_rᵀ left = s_r^(−1/2) u_rᵀ R1
    (B_r A_r = I_r). Neither needs left or right to be invertible, so a rank-deficient head (a zero
    column of W_V, a pruned head) is canonical on its rank-r part too. Signs: each column of U gets
    its entry of largest modulus positive (gauge invariant, since U is); v follows u.

    The other d − r columns F span the kernel of B_r (so that B_r·F = 0 and B_r is indeed A⁻¹'s top);
    they carry the head's residual freedom, which no choice of them makes canonical: a gauge G of
    the head moves them by a GL(d − r) (:func:`_free_columns` keeps them as stored where it can).
    r is the package's rank rule for a product computed from its factors (numerics.product_scale).
    """
    q1, r1 = torch.linalg.qr(left)
    q2, r2 = torch.linalg.qr(right.mT)
    u, s, vh = torch.linalg.svd(r1 @ r2.mT)
    signs = column_signs(q1 @ u)
    u, v = u * signs, vh.mT * signs
    rank = int(numerical_rank(s, dims=(left.shape[0], right.shape[1]), scale=product_scale(left, right)))
    root = s[:rank].sqrt()
    canonical = r2.mT @ v[:, :rank] / root
    reading = u[:, :rank].mT @ r1 / root[:, None]
    return torch.cat([canonical, _free_columns(reading)], dim=1)


def _free_columns(reading: Float[Tensor, "r d"]) -> Float[Tensor, "d k"]:
    """k = d − r columns spanning the kernel of ``reading`` (rank r): the orthogonal projections onto
    the kernel of k coordinate axes, picked greedily by the length of what is new in them (pivoted
    Gram–Schmidt), in axis order. Axes that lie in the kernel are kept exactly, so on a head whose
    rank-r part is already canonical (columns r+1… of the stored factors free) the gauge is I there:
    canonicalizing twice changes nothing."""
    r, d = reading.shape
    basis = torch.linalg.svd(reading, full_matrices=True).Vh[r:]  # the kernel (all of R^d for r = 0)
    projection = basis.mT @ basis
    residual, chosen = projection.clone(), []
    for _ in range(d - r):
        j = int(residual.norm(dim=0).argmax())
        chosen.append(j)
        q = residual[:, j] / residual[:, j].norm()
        residual = residual - torch.outer(q, q @ residual)
    return projection[:, sorted(chosen)]


def _canonical_scalar(left: Float[Tensor, "m d"], right: Float[Tensor, "d n"]) -> Float[Tensor, "d d"]:
    """B = c·I balancing ‖left·B‖ = ‖B⁻¹·right‖, with the sign making left's largest entry positive."""
    nl, nr = left.norm(), right.norm()
    if nl == 0 or nr == 0:
        return torch.eye(left.shape[1], dtype=torch.float64, device=left.device)
    flat = left.reshape(-1)
    sign = torch.sign(flat[flat.abs().argmax()])
    return sign * (nr / nl).sqrt() * torch.eye(left.shape[1], dtype=torch.float64, device=left.device)


def _gauge(adapter: ModelAdapter, choose_ov, choose_qk, inplace: bool, what: str):
    """Apply per-KV-head gauges ``choose_ov(left, right)`` / ``choose_qk(left, right, rotary)`` to a
    copy of the model. ``left``/``right`` are the head group's *effective* factors (METHODS §2:
    P diag(w) W_V and W_O P, P diag(w) W_Q and (P diag(w) W_K)ᵀ; a shortformer's plain W_Q and W_Kᵀ,
    ``ModelAdapter.query_key_norm``); the chosen matrix multiplies the
    stored factors, which is the same gauge on the effective ones (P diag(w) (W_V A) = (P diag(w) W_V) A)."""
    adapter.check_finite()
    model = adapter.model if inplace else copy_model(adapter.model)
    target = adapt(model) if not inplace else adapter
    H, n_kv = target.n_heads, target.n_kv_heads
    group = H // n_kv
    # Scalars are the QK gauges that commute with every rotation and that a q/k norm divides out.
    rotary = target.cfg.positional_embedding == "rotary" or target.cfg.qk_norm
    skipped = []
    for layer in range(target.n_layers):
        layouts = attention_layouts(target, layer)
        norm = target.norm_weights(layer, "ln1")
        w = {k: v.to(torch.float64) for k, v in read_attention(target, layer).items()}
        shapes = {k: v.shape for k, v in w.items()}
        factors = circuit_parameters(target, layer)
        new = {}
        if factors.ov:
            W_V, W_O = w["W_V"].clone(), w["W_O"].clone()
            b_V = w["b_V"].clone() if "b_V" in w else None
            for kv in range(n_kv):
                heads = slice(kv * group, (kv + 1) * group)
                right = torch.cat(list(center_writing(W_O[heads], norm)), dim=-1)  # [d, group·D]: every O slice
                A = choose_ov(fold_reading(W_V[kv], norm), right)
                W_V[kv] = W_V[kv] @ A
                W_O[heads] = torch.linalg.solve(A, W_O[heads])
                if b_V is not None:
                    b_V[kv] = b_V[kv] @ A
            new.update(W_V=W_V, W_O=W_O)
            if b_V is not None and writable(layouts, "b_V", shapes["b_V"]):
                new["b_V"] = b_V
        else:
            skipped.append(f"OV of layer {layer}")
        if factors.qk:
            W_Q, W_K = w["W_Q"].clone(), w["W_K"].clone()
            b_Q = w["b_Q"].clone() if "b_Q" in w else None
            b_K = w["b_K"].clone() if "b_K" in w else None
            qk_read = target.query_key_norm(layer)
            for kv in range(n_kv):
                heads = slice(kv * group, (kv + 1) * group)
                left = torch.cat(list(fold_reading(W_Q[heads], qk_read)), dim=0)  # [group·D, d]: every Q slice
                B = choose_qk(left, fold_reading(W_K[kv], qk_read).mT, rotary)
                B_inv_T = torch.linalg.inv(B).mT
                W_Q[heads] = W_Q[heads] @ B
                W_K[kv] = W_K[kv] @ B_inv_T
                if b_Q is not None:
                    b_Q[heads] = b_Q[heads] @ B
                if b_K is not None:
                    b_K[kv] = b_K[kv] @ B_inv_T
            new.update(W_Q=W_Q, W_K=W_K)
            for name, value in (("b_Q", b_Q), ("b_K", b_K)):
                if value is not None and writable(layouts, name, shapes[name]):
                    new[name] = value
        else:
            skipped.append(f"QK of layer {layer}")
        if new:
            dtype = read_attention(target, layer)["W_V"].dtype
            write_attention(target, layer, {k: v.to(dtype) for k, v in new.items()}, layouts)
    # audit 14b F3: in bfloat16 the gauge moved the logits by 2e-3 and canonicalizing twice the weights by 3.5e-3.
    warn_half_storage(what, read_attention(target, 0)["W_V"].dtype,
                      "the outputs and the invariants move by about that much (not exactly equal, and canonicalizing "
                      "again moves them again)", "gauge a float32 copy (model.float()) for equality to float32 rounding",
                      stacklevel=3)
    if skipped:
        warnings.warn(
            f"{what}: left {', '.join(skipped)} unchanged: their factors are not both parameters of this "
            f"{type(model).__name__} (e.g. the SMA toy has no W_O and no W_K), so there is no gauge to apply",
            RuntimeWarning,
            stacklevel=3,
        )
    return model


def random_gauge(model, seed: int = 0, inplace: bool = False):
    """A model with a random GL(d_head) gauge on every head; its outputs equal the original's.

    V/O: A = Q1 diag(±e^{N(0, 0.09)}) Q2 per KV head (well conditioned, so the float rounding of the
    gauged weights stays at a few eps); Q/K: the same for B, or B = ±e^{N(0, 0.09)}·I on rotary models
    (module docstring). GQA: one A and one B per KV head, acting on its whole group. Circuits whose
    factors are not both parameters (the SMA toy) are left unchanged, with a RuntimeWarning.

    The gauged weights are rounded to the model's storage dtype: a zero direction of a rank-deficient
    head becomes that rounding, which the float64 rank rule counts (rank 7 → 8 on a float32 toy; audit
    9), so compare rank-deficient heads on float64 copies.

    Returns a deep copy of ``model`` (the input is untouched) unless ``inplace=True``.
    """
    adapter = adapt(model)
    g = torch.Generator().manual_seed(as_seed(seed))

    # The generator stays on the CPU, so a seed gives the same gauge on every device; the matrix is
    # moved to the device of the weights it multiplies.
    def choose_ov(left, right):
        return _random_invertible(left.shape[1], g).to(left.device)

    def choose_qk(left, right, rotary):
        return (_random_scalar if rotary else _random_invertible)(left.shape[1], g).to(left.device)

    return _gauge(adapter, choose_ov, choose_qk, inplace, "random_gauge")


def canonicalize_heads(model, inplace: bool = False):
    """A model with every head in the canonical gauge of METHODS §2; its outputs equal the original's.

    Canonical is defined on the *effective* factors (METHODS §2; ``tld.ov_invariants``), so that it
    does not depend on how the model was loaded: the gauge A is chosen so that P diag(w) W_V A = U√S
    and A⁻¹ W_O P = √S Vᵀ, with U S Vᵀ the thin SVD of the effective OV = P diag(w) W_V W_O P (w the
    gain of ``ln1``, P = I − 11ᵀ/D for LayerNorm, no P for RMSNorm), and applied to the *stored*
    weights (W_V A, A⁻¹ W_O), so the model's function is unchanged. For a model whose norms are folded
    (compatibility-mode bridge, HookedTransformer with fold_ln + center_writing_weights) the stored
    factors are the effective ones, so they become U√S and √S Vᵀ themselves; an unfolded model of
    the same checkpoint gets stored weights whose effective factors are those same matrices.

    Under GQA the SVD is of the group's product P diag(w) W_V [W_O^{h1} P … W_O^{hG} P], so the shared
    value head gets one gauge. QK likewise from [P diag(w) W_Q^{h1}; …] (P diag(w) W_K)ᵀ; on rotary
    models only the scalar gauge is available, and the canonical choice balances the effective
    ‖P diag(w) W_Q‖ = ‖P diag(w) W_K‖ with the largest entry of the effective W_Q positive. Signs are
    fixed deterministically (each left singular vector's largest entry positive), so the result is
    idempotent and two gauges of one model give the same weights (for heads whose nonzero singular
    values are distinct). Rotary QK is the exception: the scalar is all it fixes, and two copies
    related by a rotary symmetry it does not use (a complex scalar per rotary pair, a GL of the
    coordinates rotary leaves alone) keep W_Q/W_K that differ by O(1) (audit 9), so a rotary model's
    QK is canonical only up to those; a warning says so.

    A rank-deficient head or group (numerical rank r < d: a zero column of W_V, W_Q = 0, a pruned head)
    is canonical on its rank-r part: the first r columns of P diag(w) W_V A are U_r√S_r and the first
    r rows of A⁻¹ W_O P are √S_r V_rᵀ. Its other d − r directions carry a residual freedom that no
    gauge removes; they are left as stored where they already are free, so canonicalizing twice
    changes nothing, and two gauges of one model give weights that differ there by a GL(d − r) only.
    That holds for gauges computed exactly; a dense gauge stored in float32 or bfloat16 (as
    :func:`random_gauge` writes a float32 model) fills a zero direction with the storage's rounding,
    which the float64 rank rule counts: a head of rank 7 of 8 reads rank 8 (free directions 72 → 64)
    in such a copy, and its canonical form differs in rank from the original's (audit 9; compare in
    float64).

    Returns a deep copy unless ``inplace=True``.
    """
    adapter = adapt(model)
    if adapter.cfg.positional_embedding == "rotary":
        warnings.warn("canonicalize_heads: on this rotary model the QK gauge fixes one scalar per head; the complex "
                      "scalings of each rotary pair (and a GL of the coordinates rotary leaves alone) are symmetries it "
                      "does not fix, so two copies related by them keep different W_Q/W_K (METHODS §2)",
                      RuntimeWarning, stacklevel=2)

    def choose_qk(left, right, rotary):
        return (_canonical_scalar if rotary else _canonical_gl)(left, right)

    return _gauge(adapter, _canonical_gl, choose_qk, inplace, "canonicalize_heads")
