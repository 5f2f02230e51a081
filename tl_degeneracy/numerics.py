"""The package's one rank rule and one compute-dtype rule (METHODS §2, "Precision and ranks").

Rank rule. A spectrum is the singular values σ of a matrix (or the eigenvalues λ = σ² of its Gram).
A value counts as nonzero when

    σ_i > max(dims) · eps(precision) · σ_1                                   (singular values)
    λ_i > max((max(dims) · eps(precision))², max(dims) · eps(float64)) · λ_1  (Gram eigenvalues, ``gram=True``)

the standard backward-error bound of a rank-revealing decomposition (as in ``numpy.linalg.matrix_rank``).
σ_1 there stands for the scale of the matrix's rounding. For a product A·B whose spectrum is computed
from its factors (OV = W_V·W_O, QK; a core of the factors' SVDs), that scale is ‖A‖₂‖B‖₂, not
σ_1(AB) ≤ ‖A‖₂‖B‖₂: the two agree for balanced factors, but a gauge (A M, M⁻¹ B) with M ill
conditioned leaves AB unchanged while its rounding grows with ‖A M‖₂‖M⁻¹ B‖₂, and a σ_1-relative
cut-off would count that rounding as rank (:func:`product_scale`). A covariance of activations
(anything computed in a rounded forward) carries their rounding, each relative to the activation
itself, mean included: errors δ_i with |δ_i| ≤ eps·|f_i| add at most E‖δ‖² ≤ eps²·Σ_i E[f_i²] to
any eigenvalue, E[f_i²] = C_ii + μ_i² (all errors in one direction, as a normalization's rounded
scale puts them; independent ones add about eps²·max E[f_i²]/12). Its eigenvalues are also cut below
that bound (:func:`covariance_floor`, an absolute floor beside the relative rule, whose λ_1 stays the
covariance's for the eigensolver's error; audit 21b F1: a float32 node whose mean was 400 times its
spread read rank 8 for 3, its rounding 10⁻¹¹ against a cut-off of 3·10⁻¹³ relative to λ_1).
A Gram's eigenvalues are σ², hence the square; but its float64 eigendecomposition itself moves every
eigenvalue by about max(dims)·eps(float64)·λ_1, a floor that the square of a float64 cut-off would
fall far below.
``precision`` is the dtype in which the matrix's *inputs* are exact up to rounding, never the
storage dtype of something that was later computed in float64:

- products of stored weights (OV, QK, …) are formed in float64 from numbers that are exact in any
  storage dtype (bf16/fp16 values are float64 values), so their precision is float64;
- Grams of activations or gradients carry the rounding of the forward/backward pass that produced
  them, so their precision is that pass's dtype (:func:`compute_dtype` of the model).

Compute-dtype rule (:func:`compute_dtype`): a computation on tensors of several dtypes runs in
float64 when any of them is float64, else in float32, so that half-precision storage (bf16/fp16)
never sets the precision of sums, losses or samplers.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable

import torch
from jaxtyping import Float
from torch import Tensor

from .distributed import warn_once

__all__ = [
    "CUTOFF_BAND", "DataLimitedWarning", "HalfPrecisionWarning", "activation_precision", "check_tolerances", "compute_dtype", "rank_band",
    "rank_rtol", "numerical_rank", "covariance_floor", "product_scale", "sample_limited", "unit_scales", "warn_data_limited",
]

HALF_DTYPES = (torch.float16, torch.bfloat16)


class HalfPrecisionWarning(UserWarning):
    """Activations or gradients were computed in float16/bfloat16: ranks of their Grams are upper bounds."""


class DataLimitedWarning(UserWarning):
    """A rank was lower on half of the data than on all of it: still growing with the data, so the
    free or degenerate directions counted from it are upper bounds (counts, the interaction basis)."""


def warn_data_limited(caller: str, limited: int, total: str, ranks: str, n_sequences: int, column: str,
                      consequence: str) -> None:
    """One :class:`DataLimitedWarning` for ``limited`` of ``total`` units (e.g. "18 maps") whose
    ``ranks`` were lower on the data's even-numbered sequences than on all of them; nothing when
    none were. ``consequence`` says what that makes of the counts and what to do. With one
    sequence the even-numbered half is all of the data and the check cannot find anything: that
    is said instead (audit 9: one sequence of 14 tokens read rank_G 3 of 16 with no word, the same
    tokens as two sequences flagged 12 maps)."""
    if n_sequences < 2:
        warn_once(f"{caller}: the data hold {n_sequences} sequence, so half of them (the even-numbered ones) is all "
                  f"of them and whether the ranks still grow with the data was not checked ({column}: False, "
                  "unchecked); give two or more sequences, e.g. cut a long text into several",
                  DataLimitedWarning, stacklevel=3)
    elif limited:
        warn_once(f"{caller}: at {limited} of {total} {ranks} lower on half of the {n_sequences} sequences (the "
                  f"even-numbered ones) than on all of them ({column}): still growing with the data, so {consequence}",
                  DataLimitedWarning, stacklevel=3)


def compute_dtype(*dtypes: torch.dtype | Iterable[torch.dtype]) -> torch.dtype:
    """float64 if any of ``dtypes`` (dtypes or iterables of dtypes) is float64, else float32."""
    flat: list[torch.dtype] = []
    for d in dtypes:
        flat.extend([d] if isinstance(d, torch.dtype) else list(d))
    return torch.float64 if torch.float64 in flat else torch.float32


def carried_dtype(produced: torch.dtype, model: torch.dtype) -> torch.dtype:
    """The precision an activation carries: the less precise of the dtype the forward produced it in
    and the model's. A bfloat16 bridge computes its final RMSNorm in float32 from bfloat16 residuals,
    whose rounding (1.9·10⁻³ of the Gram) the float32 tensor still holds (audit 23a F3)."""
    if not (produced.is_floating_point and model.is_floating_point):
        return produced
    return max(produced, model, key=lambda d: torch.finfo(d).eps)


def activation_precision(dtype: torch.dtype) -> torch.dtype:
    """The rank rule's precision for Grams of activations or gradients produced in ``dtype``:
    :func:`compute_dtype` (float32 for half-precision forwards, float64 for float64 models).

    A float16/bfloat16 forward rounds every activation to ~eps(dtype), which at any useful width
    exceeds a cut-off at that dtype's own eps (max(dims)·eps ≥ 1 for D ≥ 128 in bfloat16: every rank 0),
    so the cut-off is float32's and rounding noise may count as directions: a
    :class:`HalfPrecisionWarning` says so, and the ranks are upper bounds (load the model in float32
    for exact ones).
    """
    if dtype in HALF_DTYPES:
        warn_once(
            f"the model computes in {str(dtype).removeprefix('torch.')}: its activations carry rounding of "
            f"~{torch.finfo(dtype).eps:.0e}, which float32's rank cut-off counts as directions, so activation and "
            "gradient ranks are upper bounds, and the counts made from them (free directions, synchronization's extra "
            "freedom) may be too low as well as too high (their bands: the same count at the rounding level; "
            "synchronization's blocks are formed from the half-precision patterns, and a float32 forward may form "
            "others); load the model in float32 (tld.load_model(spec, dtype=torch.float32)) for exact ranks",
            HalfPrecisionWarning,
            stacklevel=None,
        )
    return compute_dtype(dtype)


def rank_rtol(dims: int | Iterable[int], precision: torch.dtype = torch.float64, gram: bool = False) -> float:
    """The relative cut-off of the rank rule (module docstring): max(dims)·eps(precision) on
    singular values; on Gram eigenvalues (``gram=True``) its square, but not below the float64
    eigensolver's own error max(dims)·eps(float64)."""
    dims = [int(dims)] if isinstance(dims, int) else [int(d) for d in dims]
    if not dims or min(dims) < 0:
        raise ValueError(f"dims must be non-negative matrix dimensions; got {dims}")
    size = max(max(dims), 1)
    rtol = size * torch.finfo(precision).eps
    return max(rtol * rtol, size * torch.finfo(torch.float64).eps) if gram else rtol


def unit_scales(squares: Float[Tensor, " n"]) -> Float[Tensor, " n"]:
    """√ of each unit's squared scale (1 where it is 0), float64. Ranked as D⁻¹MD⁻¹ with D =
    diag(scales), a Gram M of units that a symmetry rescales one by one (ReLU neurons: W_in → cW_in,
    W_out → W_out/c) has the same rank whatever their scales, where against the largest eigenvalue of
    M itself a unit at 10⁻⁶ of the others fell under the cut-off, or took the others under it (audit
    19b F1): here a group's own largest eigenvalue (``synchronization.balanced_values``; the counts
    rank neurons at their own RMS likewise, ``counts._neuron_units``)."""
    squares = squares.to(torch.float64).clamp_min(0)
    return torch.where(squares > 0, squares.sqrt(), torch.ones_like(squares))


def covariance_floor(precision: torch.dtype, second_moments: Float[Tensor, " k"]) -> float:
    """The largest eigenvalue the rounding of activations computed at ``precision`` can add to their
    covariance, whose second moments E[f_i²] = C_ii + μ_i² are ``second_moments``: eps²·Σ_i E[f_i²]
    (module docstring) — an ``atol`` beside the rank rule, above its relative cut-off only where the
    mean is large against the spread: tr E[ffᵀ] > max(dims)²·λ_1 for the float32 rule."""
    if not second_moments.numel():
        return 0.0
    eps = torch.finfo(precision).eps
    return eps * eps * float(second_moments.to(torch.float64).clamp_min(0).sum())


def product_scale(
    left: Float[Tensor, "*groups m k"], right: Float[Tensor, "*groups k n"]
) -> Float[Tensor, " *groups"]:
    """‖A‖₂‖B‖₂ for A = ``left``, B = ``right``: the scale of the rounding of the product A·B computed
    from its factors, the ``scale`` of the rank rule for such products (module docstring)."""
    return torch.linalg.matrix_norm(left, ord=2) * torch.linalg.matrix_norm(right, ord=2)


def check_tolerances(rtol: float | None = None, atol: float = 0.0) -> tuple[float | None, float]:
    """(rtol, atol) of a rank cut-off as floats, or ValueError saying what is allowed: rtol (None:
    the rule's default) a finite number in [0, 1), since a cut-off at or above the largest value
    counts nothing; atol a finite number ≥ 0. NaN would silently give rank 0, a negative rtol full
    rank. :func:`numerical_rank` checks its own; an analysis may call this first, before its passes."""
    if rtol is not None:
        rtol = _tolerance(rtol, "rtol", 1.0, "a finite number in [0, 1) (a fraction of the largest value)")
    return rtol, _tolerance(atol, "atol", math.inf, "a finite number ≥ 0")


def _tolerance(value, name: str, below: float, allowed: str) -> float:
    """``value`` as a float in [0, ``below``), else ValueError naming ``allowed``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"a rank tolerance {name} must be {allowed}; got {value!r}")
    if not 0.0 <= float(value) < below:
        raise ValueError(f"a rank tolerance {name} must be {allowed}; got {float(value)!r}")
    return float(value)


def numerical_rank(
    spectrum: Float[Tensor, "*groups k"],
    dims: int | Iterable[int] | None = None,
    *,
    precision: torch.dtype = torch.float64,
    gram: bool = False,
    rtol: float | None = None,
    atol: float = 0.0,
    scale: Tensor | None = None,
) -> Tensor:
    """Number of values of ``spectrum`` (per group along the last axis) above the rank rule's
    cut-off max(rtol·scale, atol); 0 for an all-zero spectrum.

    ``rtol`` defaults to :func:`rank_rtol` ``(dims, precision, gram)`` and, like ``atol``, is checked
    (:func:`check_tolerances`: ValueError for NaN, ±inf, negative values, rtol ≥ 1); ``dims`` (the matrix's
    dimensions) defaults to the spectrum's length. ``atol`` is an absolute floor (METHODS §4: a
    variance below ``loss_scale`` counts as zero). ``scale`` (per group) is the scale of the matrix's
    rounding: by default the spectrum's largest value, :func:`product_scale` for a product computed
    from its factors (module docstring).
    """
    rtol, atol = check_tolerances(rtol, atol)
    if rtol is None:
        rtol = rank_rtol(spectrum.shape[-1] if dims is None else dims, precision, gram)
    if spectrum.shape[-1] == 0:
        return torch.zeros(spectrum.shape[:-1], dtype=torch.long, device=spectrum.device)
    top = spectrum.max(-1, keepdim=True).values.clamp_min(0) if scale is None else scale.to(spectrum)[..., None]
    cut = torch.maximum(top * rtol, torch.full_like(top, atol))
    return ((spectrum > cut) & (spectrum > 0)).sum(-1)


#: How far :func:`rank_band` moves the rank rule's cut-off either way to see whether a rank sits in a
#: gap of its spectrum: where a rank changes within the band, it is the choice of cut-off's.
CUTOFF_BAND = 100.0


def rank_band(
    spectrum: Float[Tensor, " k"],
    dims: int | Iterable[int] | None = None,
    *,
    precision: torch.dtype = torch.float64,
    gram: bool = False,
    rtol: float | None = None,
    atol: float = 0.0,
    noise_rtol: float | None = None,
    noise_scale: float | None = None,
    rounding: float = 0.0,
) -> tuple[int, int, int]:
    """(rank at the cut-off × :data:`CUTOFF_BAND`, the rank, rank at the cut-off / CUTOFF_BAND) of one
    spectrum by :func:`numerical_rank`'s rule (``atol`` held fixed): the three agree where the
    spectrum has a gap around the cut-off, and their spread is the rank's uncertainty where it has
    none (a spectrum that decays smoothly through the cut-off, as float32 activations of a model
    with many weak directions; audit 4). The lower cut-off stays at or above the float64 rule's
    (the eigensolver's own error): below it even exact zeros count (audit 5: a float64 model's band
    counted LayerNorm's mean direction, which no map reads). ``noise_rtol``: a relative level the
    inputs' own rounding reaches (:func:`rounding_rtol` of a half-precision forward), which the
    upper cut-off reaches at least, so that the band's low rank leaves that rounding out.
    ``noise_scale``: what ``noise_rtol`` is relative to where that is above the spectrum's largest
    value — for a covariance, the largest second moment E[f_i²] of its activations, mean included:
    each activation is rounded relative to itself, so where the mean is large against the spread the
    rounding sits far above λ₁(covariance)·eps² (audit 17a F1: a bfloat16 covariance of rank 3 read
    24, its band (24, 24, 24)). ``rounding``: an absolute part of the rule's cut-off, a covariance's
    :func:`covariance_floor`, which the band moves with the relative part (``atol`` stays)."""
    dims = spectrum.shape[-1] if dims is None else dims
    rtol = rank_rtol(dims, precision, gram) if rtol is None else rtol
    floor = min(rank_rtol(dims, torch.float64, gram), rtol)
    if noise_rtol is not None and noise_scale is not None and spectrum.numel():
        noise_rtol = noise_rtol * max(1.0, noise_scale / max(float(spectrum.max()), torch.finfo(torch.float64).tiny))
    high = max(rtol * CUTOFF_BAND, noise_rtol or 0.0)
    return tuple(int(numerical_rank(spectrum, dims, precision=precision, gram=gram, atol=max(atol, rounding * k),
                                    rtol=min(max(cut, floor), 1 - 1e-9)))
                 for cut, k in ((high, CUTOFF_BAND), (rtol, 1.0), (rtol / CUTOFF_BAND, 1 / CUTOFF_BAND)))


def rounding_rtol(dtype: torch.dtype, gram: bool = False) -> float | None:
    """The relative level of a half-precision forward's rounding: eps(dtype) on singular values
    (each activation carries a relative error up to eps/2, independent across entries), its square
    on Gram eigenvalues; None for float32/float64 forwards, whose rank rule already sits above their
    rounding. Not a rank rule (below it a spectrum's direction may still be signal); the upper end of
    a half-precision forward's cut-off band (:func:`rank_band`), so that the band spans both readings."""
    if dtype not in HALF_DTYPES:
        return None
    eps = torch.finfo(dtype).eps
    return eps * eps if gram else eps


class SampleLimitedWarning(UserWarning):
    """A rank reached the number of samples below the dimension: the count may be the data's limit."""


def warn_half_storage(caller: str, dtype: torch.dtype, moved: str, remedy: str, stacklevel: int = 3) -> None:
    """One RuntimeWarning where ``caller`` wrote re-parametrised weights into a model that stores them
    in float16/bfloat16: each is rounded to ~eps(dtype) of its size, so ``moved`` (what moves by about
    that much) does; ``remedy``: the float32 alternative (audit 14b F3: a gauge moved bfloat16 logits by
    2·10⁻³; audit 19a F4: sparsify's rounded weights drifted 9·10⁻³ where its construction changed nothing).
    ``stacklevel`` as ``warnings.warn``'s, counted from the function that calls this one."""
    if dtype in HALF_DTYPES:
        warn_once(f"{caller}: this model stores its weights in {str(dtype).removeprefix('torch.')}, so the rewritten "
                  f"weights are rounded to ~{torch.finfo(dtype).eps:.0e} of their size: {moved}; {remedy}",
                  RuntimeWarning, stacklevel=stacklevel + 1)


def warn_sample_limited(caller: str, limited: int, total: int, grams: str, n_samples: int) -> None:
    """A :class:`SampleLimitedWarning` when the ranks of ``limited`` of ``total`` Grams (``grams``
    names them) are :func:`sample_limited`; nothing when none is."""
    if limited:
        warn_once(
            f"{caller}: the rank of {limited} of {total} {grams} reached n = {n_samples}, the most directions "
            f"{n_samples} samples can span (n − 1 for a covariance; below the input width): their ranks, and the free "
            "directions counted from them, may be the data's limit, not the model's (column sample_limited); count on "
            "more positions",
            SampleLimitedWarning,
            stacklevel=3,
        )


def sample_limited(rank: int, n_samples: int, dim: int, centered: bool = False) -> bool:
    """Whether a Gram's rank may be the data's limit rather than the model's: n samples span at most n
    directions (n − 1 once centred), so a rank that reached that bound below the dimension ``dim``
    cannot tell how many directions more data would show (counts, sparsify, the interaction basis)."""
    bound = n_samples - int(centered)
    return bound < dim and rank >= bound
