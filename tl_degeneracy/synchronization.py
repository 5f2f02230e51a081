"""Synchronization degeneracy of attention heads and MLP neurons (METHODS §3).

Heads: heads of one layer whose attention patterns agree on the data act as one head with the
summed OV circuit, A·X·Σ_h W_V^h W_O^h, so only the sum of their value/output maps is pinned down.
The freedom this adds is the drop in the rank of the Jacobian from the value and output weights to
the function when the heads' separate outputs are replaced by their sum (METHODS §3, corrected;
:func:`component_freedom`, also for blocks coupled through a shared GQA value head). Neurons: ReLU
neurons whose firing patterns r = f/p agree compute, where they fire, r·Σ_k p_k w_k, the same
bilinear form, so only the sum of their input/output products is pinned down and the same count
applies (:meth:`NeuronSyncResult.freedom`); "agree" is judged where it matters for the outputs, by
paper eq. 20's output-weighted distance.

Both analyses are one streaming pass each (``stats.stream``) with memory independent of the amount
of data: head pattern distances accumulate into [L, H, H] sums, value Grams into [L, n_kv·d, n_kv·d],
the heads' and MLPs' input moments into [L, D, D], neuron firing-pattern and post-activation Grams
and the sums of the output-weighted distance into [L, F, F] (E[(r_i − r_j)²] = E[r_i²] + E[r_j²] −
2 E[r_i r_j] comes from one Gram of r, eq. 20's numerator from two products of r and p per batch).

Ranks follow the package's one rank rule (``tl_degeneracy.numerics``): activation Grams at the
precision of the forward pass that produced them, products of stored weights at float64.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from .counts import block_input_hook, counted_batches, input_moment, input_rank_bound
from .data import TokenBatches
from .distributed import all_reduce_max_, failing_together, warn_once
from .errors import MissingHookError
from .invariants import center_writing
from .memory import check_batches
from .models.adapt import adapt
from .models.adapter import ModelAdapter
from .models.selection import circuit_parameters
from .models.weights import MLPWeights
from .numerics import (DataLimitedWarning, HalfPrecisionWarning, activation_precision, check_tolerances, covariance_floor,
                       numerical_rank, rounding_rtol, sample_limited, unit_scales, warn_data_limited, warn_sample_limited)
from .numerics import rank_rtol as rule_rtol
from .pattern_inputs import PatternInputs, pattern_inputs
from .stats.accumulators import MomentAccumulator, descending_eigvalsh
from .stats.stream import Step, stream

__all__ = [
    "HeadSyncResult",
    "NeuronSyncResult",
    "SyncCountWarning",
    "BalancedValues",
    "SyncJacobian",
    "balanced_values",
    "component_freedom",
    "head_synchronization",
    "neuron_synchronization",
    "pattern_tv_sums",
    "synchronized_blocks",
]

#: Activation functions for which r = f/p is exactly piecewise constant in the input (METHODS §3).
EXACT_ACTIVATIONS = ("relu",)


def _units_text(units: Sequence[int], shown: int = 8) -> str:
    """A block's neurons for a message: all of a small one, the first few and the count of a large one."""
    units = list(units)
    if len(units) <= shown:
        return f"neurons {units}"
    return f"{len(units)} neurons {', '.join(map(str, units[:shown]))}, …"


def _formed_on_half(half_blocks: list[list[list[int]]] | None, layer: int, units: Sequence[int]) -> bool | None:
    """Whether the data's even-numbered sequences alone form exactly this block (None where they were
    not compared): a block that half of the data forms otherwise still changes with the data."""
    if half_blocks is None:
        return None
    return frozenset(units) in {frozenset(b) for b in half_blocks[layer]}


def _check_tol(tol: float) -> float:
    tol = float(tol)
    if not (0.0 <= tol <= 1.0) or math.isnan(tol):
        raise ValueError(f"tol must lie in [0, 1] (a distance between patterns); got {tol}")
    return tol


def synchronized_blocks(distance: Float[np.ndarray, "n n"], tol: float) -> list[list[int]]:
    """Partition 0..n−1 into blocks in which every pair is within ``tol`` (distance ≤ tol).

    Deterministic greedy clique cover: units are taken in index order and each joins the first
    existing block all of whose members are within tol of it, else starts a new block. When
    "within tol" is transitive on the data (the usual case: synchronized groups far apart from the
    rest) this is exactly the set of connected groups.
    """
    n = distance.shape[0]
    blocks: list[list[int]] = []
    for i in range(n):
        for block in blocks:
            if all(distance[i, j] <= tol for j in block):
                block.append(i)
                break
        else:
            blocks.append([i])
    return blocks


PATTERN_ROUNDING = 128


def pattern_rounding(precision: torch.dtype) -> float:
    """The total-variation distance up to which two heads' attention distributions at every sample are
    the same pattern computed twice: PATTERN_ROUNDING·eps(``precision``), the forward's rounding. Heads
    with identical query/key weights need not give bit-identical patterns: a batched product rounds
    each head in its own order (audit 22a F2: exact copies a mean 2.3·10⁻⁸ apart in float32, 2.4·10⁻¹⁷
    in float64, which ``tol=0`` split apart and ``tol`` > 0 called approximate), the more the larger
    the scores (review 53 #3: up to 75·eps at one sample of scores 100 times a toy's). Every sample's,
    not the mean (review 53 #2: heads apart by 0.05 at one of 32,000 samples had a mean of 1.6·10⁻⁶)."""
    return PATTERN_ROUNDING * torch.finfo(precision).eps


class _Largest:
    """An elementwise maximum over batches and ranks (``stream``'s reduce: ``all_reduce`` takes the maximum)."""

    def __init__(self, value: Tensor):
        self.value = value

    def all_reduce(self, group=None) -> _Largest:
        all_reduce_max_(self.value, group)
        return self


def _gram_rtol(size: int, precision: torch.dtype, rtol: float | None, width: int | None) -> float:
    """The rank rule's relative cut-off for a ``size`` × ``size`` block of an activation Gram that is
    ``width`` wide (``rtol`` overrides it): the rule at the forward's ``precision`` for the block, but
    not below the float64 floor of the whole Gram it is read from, whose accumulation and
    eigendecomposition leave every eigenvalue uncertain by about width·eps(float64) of the largest
    (audit 5: in a float64 model a neuron duplicated as 1.3× another left its 2 × 2 block an eigenvalue
    ratio of 1.3e-15, above the block's own floor 2·eps and counted as a second direction)."""
    if rtol is not None:
        return rtol
    return max(rule_rtol(size, precision, gram=True), rule_rtol(max(size, width or 0), torch.float64, gram=True))


def _gram_rank(gram: Float[Tensor, "k k"], precision: torch.dtype, rtol: float | None, width: int | None = None,
               atol: float = 0.0) -> int:
    """Rank of an activation Gram, or of a block of one ``width`` wide, by the package's rule at the
    forward's ``precision`` (:func:`_gram_rtol`; ``rtol`` overrides the relative eigenvalue cut-off),
    above ``atol``."""
    if gram.numel() == 0:
        return 0
    return int(numerical_rank(descending_eigvalsh(gram), gram=True, rtol=_gram_rtol(gram.shape[0], precision, rtol, width),
                              atol=atol))


def _rounding_floor(precision: torch.dtype, rtol: float | None, moments: Float[Tensor, " k"] | None) -> float:
    """The rounding floor of a covariance of activations whose uncentred second moments are ``moments``
    (``numerics.covariance_floor``), beside the rule's own cut-off; 0 for a Gram (None) or a given ``rtol``."""
    return 0.0 if moments is None or rtol is not None else covariance_floor(precision, moments)


def changing_blocks(blocks: pd.DataFrame) -> int:
    """How many of the rows of a blocks frame (``to_frame``) the data's even-numbered sequences alone
    form otherwise (``on_half`` False; None, not compared, does not count)."""
    return int((blocks["on_half"] == False).sum())  # noqa: E712 (None: not compared)


def _unsettled_blocks(result) -> tuple[int, int]:
    """(blocks of ≥ 2 units that the data's even-numbered sequences form otherwise, blocks of ≥ 2
    units) of a synchronization result, from its blocks alone (the frame's counts cost decompositions)."""
    on_half = [_formed_on_half(result.half_blocks, layer, b) for layer, blocks in enumerate(result.blocks)
               for b in blocks if len(b) > 1]
    return sum(x is False for x in on_half), len(on_half)


#: What an approximate block's count is (METHODS §3, corrected; audit 16a F3: four random heads at
#: tol 0.05 read 767 extra free directions per layer where the data's Jacobian drops no rank at all).
UPPER_ESTIMATE = ("the count is what exact synchronization would free, an upper estimate of what the data show "
                  "(their Jacobian's rank can drop less, down to 0)")


def _sync_repr(name: str, unit: str, result) -> str:
    """A short repr of a synchronization result from its cheap fields (the counts take decompositions:
    ``to_frame``), without the [L, n, n] distance arrays that filled a notebook cell (audit 13b)."""
    sizes = [len(b) for blocks in result.blocks for b in blocks if len(b) > 1]
    changing = result.changing_blocks
    limited = np.flatnonzero(result.data_limited).tolist()
    verdicts = ([result.approximation] if result.approximation else []) + (
        [f"{changing} formed otherwise on half of the data"] if changing else []) + (
        [f"D_in still growing with the data at layer(s) {limited}"] if limited else []) + (
        ["half-precision forward: each count lies in a band (extra_freedom_band)"] if result.half_precision else []) + (
        [f"D_in at the sample count at layer(s) {_limited_layers(result.sample_limited)}"]
        if _limited_layers(result.sample_limited) else [])
    return (f"{name}({len(sizes)} synchronized {unit} block(s) of {sum(sizes)} {unit}s over {len(result.blocks)} "
            f"layers at tol {result.tol:g}, {result.n_samples:,} samples" + "".join(f"; {v}" for v in verdicts)
            + "; counts: to_frame())")


class _HalfDataChecks:
    """What a synchronization result (``blocks``, ``half_blocks``, ``input_rank``,
    ``input_rank_half``) says about the data's even-numbered sequences alone."""

    @property
    def data_limited(self) -> Bool[np.ndarray, " layer"]:
        """Per layer, whether D_in (``input_rank``) is lower on the data's even-numbered sequences
        alone than on all of them: still growing with the data (to_frame's data_limited; False
        where not compared)."""
        if self.input_rank_half is None:
            return np.zeros(len(self.input_rank), bool)
        return np.asarray(self.input_rank_half) < self.input_rank

    @property
    def changing_blocks(self) -> int:
        """Blocks of ≥ 2 units that half of the data does not form alike (0 when not compared)."""
        return _unsettled_blocks(self)[0]


def _rounding_cut(dtype: torch.dtype, rtol: float | None) -> float | None:
    """The relative cut-off of a half-precision model's rounding band: the forward's rounding level on
    Gram eigenvalues (``numerics.rounding_rtol``), or a larger ``rtol`` the caller gave; None for a
    float32/float64 model."""
    noise = rounding_rtol(dtype, gram=True)
    return None if noise is None else max(noise, rtol or 0.0)


def _input_ranks(adapter: ModelAdapter, accs: list[MomentAccumulator], ln: str, centered: bool,
                 precision: torch.dtype, rtol: float | None) -> Int[np.ndarray, " layer"]:
    """D_in of every layer: the rank of the covariance (``centered``) or Gram of the block input
    (``counts.input_moment``) by the rank rule at ``precision`` (``rtol`` overrides its cut-off; the
    rule's own also leaves out a covariance's rounding, ``numerics.covariance_floor``), at most
    ``counts.input_rank_bound``."""
    most = input_rank_bound(adapter, centered)
    return np.array([_input_rank(input_moment(adapter, layer, ln, acc, centered=centered).cpu(),
                                 input_moment(adapter, layer, ln, acc, False, bias=False).diagonal(), centered, most,
                                 precision, rtol)
                     for layer, acc in enumerate(accs)], dtype=np.int64)


def _input_rank(moment: Float[Tensor, "D D"], scale: Float[Tensor, " D"], centered: bool, most: int,
                precision: torch.dtype, rtol: float | None) -> int:
    """The rank of a block input's ``moment`` (covariance where ``centered``) by the rank rule at
    ``precision``, at most ``most``; a covariance's eigenvalues also above its rounding, set by the
    uncentred second moments ``scale`` (``numerics.covariance_floor``; audit 21b F1: a large mean sets
    it above the rule's cut-off), unless ``rtol`` is given."""
    return min(_gram_rank(moment, precision, rtol, atol=_rounding_floor(precision, rtol, scale if centered else None)), most)


def _at_sample_count(adapter: ModelAdapter, ranks: Int[np.ndarray, " layer"], n_samples: int,
                     centered: bool) -> Bool[np.ndarray, " layer"]:
    """Per layer, whether D_in (``ranks``, of the input alone) reached what ``n_samples`` distinct samples
    can span below what the input itself can (``counts.input_rank_bound``): the data's limit, perhaps
    (``numerics.sample_limited``)."""
    most = input_rank_bound(adapter, centered)
    return np.array([sample_limited(int(r), n_samples, most, centered=centered) for r in ranks], dtype=bool)


#: ``_RoundingBand.band_cause``: what the other end of a synchronization count's band changes.
HALF_PRECISION_BAND = "the half-precision rounding level"
WEIGHTS_BAND = "float32's rank rule for the output weights"


class _RoundingBand:
    """A synchronization result counted at both ends of its rounding, ``extra_freedom_min`` / ``_max``
    the smaller and larger count of each block; a count that differs between them is known only to
    lie between.

    - A half-precision model (``noise_rtol``: the forward's rounding level on Gram eigenvalues or a
      larger ``rank_rtol`` the caller gave, :func:`_rounding_cut`; None otherwise): its activation
      ranks at the rank rule's (or the caller's) cut-off, and at that level (``input_rank_noise``:
      D_in there). The rule's float32 cut-off counts rounding as directions (audit 14b: two heads
      whose values overlap in 4 dimensions read s 16 where it is 12, extra freedom 128 where it is 188).
    - A float32 model (``precision``, its activations' rule, is not ``weight_precision``, the output
      weights'): the ranks of its output maps by float64's rule, which takes the stored values as they
      are, and by float32's, which takes their rounding for noise. Neither is right for every
      model: float64's counts a float32 copy's rounding as directions (audit 23a F1: two heads of one
      pattern, one W_O of rank 2, read 128 where the Jacobian has 80; a W_out row that is the sum of
      two others, 6 where it has 19; audit 22a F3: rescaled copies), float32's drops a real
      contribution below its cut-off (review 55 #1: a neuron at 2·10⁻⁶ of its twin's scale read 0
      for 11). ``extra_freedom`` takes float64's. (A half-precision model's weights are rounded far
      above float32's cut-off, where neither rule tells rounding from structure: its band is the
      activations' alone, and its warning says to load the model in float32.)"""

    @property
    def half_precision(self) -> bool:
        """Whether the model computed in float16/bfloat16, so that the counts carry a rounding band."""
        return self.noise_rtol is not None

    @property
    def weights_banded(self) -> bool:
        """Whether the output weights' ranks are also taken at float32's rule (a float32 model)."""
        return self.weight_precision != self.precision and not self.half_precision

    @property
    def band_cause(self) -> str | None:
        """What the band's other end changes, for labels (None where there is no band)."""
        if self.half_precision:
            return HALF_PRECISION_BAND
        return WEIGHTS_BAND if self.weights_banded else None

    def _at_rounding(self):
        """This result with its activation ranks cut at the rounding level (None when not half precision)."""
        if self.noise_rtol is None:
            return None
        return replace(self, rank_rtol=self.noise_rtol, input_rank=self.input_rank_noise, noise_rtol=None,
                       input_rank_noise=None)

    def _other_end(self):
        """This result counted at its band's other end (a result without a band of its own): with the
        output weights at float32's rule, or at the rounding level; None without a band."""
        return replace(self, weight_precision=self.precision) if self.weights_banded else self._at_rounding()

    @staticmethod
    def _banded(frame: pd.DataFrame, other: pd.DataFrame | None) -> pd.DataFrame:
        """``frame`` with extra_freedom_min / extra_freedom_max: the smaller and larger of its count and
        ``other``'s (the same blocks counted at the band's other end; equal to the count without one)."""
        counts = frame["extra_freedom"]
        there = counts if other is None else other["extra_freedom"].set_axis(frame.index)
        both = pd.concat([counts, there], axis=1)
        frame["extra_freedom_min"] = both.min(axis=1, skipna=False).astype("Int64")
        frame["extra_freedom_max"] = both.max(axis=1, skipna=False).astype("Int64")
        return frame

    def _warn_band(self, caller: str, frame: pd.DataFrame) -> None:
        """A :class:`HalfPrecisionWarning` where a half-precision model's counts move between the cut-offs,
        a :class:`SyncCountWarning` where a float32 model's move with its output weights' rule."""
        moved = frame[frame["extra_freedom_min"] != frame["extra_freedom_max"]].dropna(subset=["extra_freedom"])
        if not len(moved):
            return
        lo, hi = int(frame["extra_freedom_min"].sum()), int(frame["extra_freedom_max"].sum())
        if self.half_precision:
            warn_once(f"{caller}: the model computes in half precision, and the extra freedom of {len(moved)} "
                      f"block(s) differs between the rank cut-off (float32's rule, or rank_rtol) and the forward's rounding level "
                      f"(total {lo:,}–{hi:,}; columns extra_freedom_min/max): for these blocks the count is known "
                      "only to lie between; the blocks themselves are formed from the half-precision patterns, and a float32 "
                      "forward may form others where a pair's distance lies near tol, whose count can lie outside "
                      "(audit 18b); load the model in float32 for one count", HalfPrecisionWarning, stacklevel=4)
        else:
            warn_once(f"{caller}: the extra freedom of {len(moved)} block(s) differs between float64's rank rule for "
                      f"the float32 output weights and float32's (total {lo:,}–{hi:,}; columns extra_freedom_min/max; "
                      "extra_freedom is float64's): float64's counts a float32 copy's rounding as directions, float32's "
                      "drops real contributions below its cut-off, so for these blocks the count is known only to lie "
                      "between (audit 23a); load the model in float64 for one count", SyncCountWarning, stacklevel=4)

    @property
    def extra_freedom_band(self) -> tuple[int, int] | None:
        """(smallest, largest) total extra freedom at the band's ends (:class:`_RoundingBand`; equal
        without one; None where a count is not exact at either end: review 62, a total without it would
        not hold extra_freedom), in the blocks the half-precision patterns formed: where a
        pair's distance lies within the patterns' rounding of ``tol``, a float32 forward may form other
        blocks, whose count the band does not cover (audit 18b F1: toy:modadd in bfloat16 read
        1,700–8,698; its bfloat16 weights in a float32 forward 1,658, in 100 blocks for 96)."""
        frame = self.to_frame()
        if self.extra_freedom is None or frame[["extra_freedom_min", "extra_freedom_max"]].isna().any(axis=None):
            return None
        return int(frame["extra_freedom_min"].sum()), int(frame["extra_freedom_max"].sum())


def _limited_layers(flags: Bool[np.ndarray, " layer"] | None) -> list[int]:
    return [] if flags is None else np.flatnonzero(flags).tolist()


def warn_unsettled(caller: str, result, batches: TokenBatches, counts: str) -> None:
    """The :class:`DataLimitedWarning` s of a synchronization result whose blocks or input ranks
    still change with the data (audit 13b: both were returned as exact, without a word): blocks that
    the data's even-numbered sequences form otherwise (``on_half`` False), and layers whose D_in is
    lower on them (``data_limited``), and those at the most that the data's distinct samples span
    (``sample_limited``); ``counts`` names what such a D_in moves."""
    changing, total = _unsettled_blocks(result)
    n_sequences = batches.n_sequences
    if changing:
        warn_once(f"{caller}: {changing} of {total} synchronized blocks are formed otherwise by "
                  f"the even-numbered half of the {n_sequences} sequences (to_frame's on_half False): the blocks still "
                  "change with the data, so they and their extra_freedom are not yet the model's; give more data",
                  DataLimitedWarning, stacklevel=3)
    limited = result.data_limited
    warn_data_limited(caller, int(limited.sum()), f"{len(limited)} layers", "the input's rank (input_rank) is",
                      n_sequences, "to_frame's data_limited", f"{counts} use a D_in that more data would raise; "
                      "give more data")
    # audit 14b F2: one sequence of 10 tokens read D_in 9 (n − 1) and the count 256 for 432, "not data-limited".
    warn_sample_limited(caller, len(_limited_layers(result.sample_limited)), len(limited),
                        "layers' input covariances (D_in, whose counts use it)", batches.n_distinct_samples)


@dataclass(frozen=True)
class BalancedValues:
    """Value vectors of G groups of d columns (KV heads; neurons, d = 1) rescaled, group by group, so
    that the largest eigenvalue of each group's own Gram is 1 (METHODS §3): ``gram`` = Dᵀ G D with
    D = diag(c_g⁻¹ I), c_g = √λ_1(G_gg) (``scale``; groups that are 0 on every sample keep c_g = 1),
    and each reader's output weights take the scale back (W_O → c_g W_O), so the function is the same.
    A head's scalar gauge W_V → c W_V, W_O → W_O / c (a ReLU neuron's rescaling for d = 1) then moves
    no rank: relative to the largest eigenvalue of a block of groups, a group at 10⁻⁷ of another's
    scale fell under the cut-off and lost its directions. A gauge A that is not a scalar changes a
    group's own spectrum by up to cond(A)², and moves a rank only where that carries an eigenvalue
    across the cut-off, as it moves the group's own rank s_g (whitening each group inside would count
    its weakest kept directions, known only to about the cut-off, as exact). For d = 1 ``gram`` is the
    neurons' uncentred correlations G_ij / √(G_ii G_jj)."""

    gram: Float[Tensor, "kv_dim kv_dim"]
    scale: Float[Tensor, " groups"]

    def moments(self, raw: Float[Tensor, " kv_dim"] | None) -> Float[Tensor, " kv_dim"] | None:
        """Per-coordinate second moments E[f_i²] (``raw``) at the balanced scale, as ``gram`` is."""
        if raw is None:
            return None
        d = self.gram.shape[0] // max(len(self.scale), 1)
        return raw.to(torch.float64).cpu() / self.scale.cpu().repeat_interleave(d).square()

    def output_weights(self, W_O: Float[Tensor, "heads d d_model"], group_of: Sequence[int]) -> Float[Tensor, "heads d d_model"]:
        """Each reader's output weights c_g W_O^h, with g = ``group_of[h]`` (float64)."""
        index = torch.as_tensor(list(group_of), dtype=torch.long, device=self.scale.device)
        return self.scale[index].to(W_O.device)[:, None, None] * W_O.to(torch.float64)


def balanced_values(gram: Float[Tensor, "kv_dim kv_dim"], d: int) -> BalancedValues:
    """``gram`` with each group of ``d`` columns rescaled to a largest own eigenvalue of 1 (:class:`BalancedValues`)."""
    gram = gram.to(torch.float64)
    G = gram.shape[0] // d if d else 0
    own = gram.reshape(G, d, G, d).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
    top = descending_eigvalsh(own)[:, 0].clamp_min(0) if G else gram.new_zeros(0)
    scale = unit_scales(top)
    inverse = (1 / scale).repeat_interleave(d)
    return BalancedValues(gram * inverse[:, None] * inverse[None, :], scale)


def _weight_rank(matrix: Float[Tensor, "m n"], precision: torch.dtype = torch.float64) -> int:
    """Rank of a matrix formed from stored weights: float64 SVD, the rank rule at ``precision``
    (METHODS §2; float64's, or the model's for the other end of :class:`_RoundingBand`)."""
    matrix = matrix.to(torch.float64)
    return int(numerical_rank(torch.linalg.svdvals(matrix), tuple(matrix.shape), precision=precision))


# ---------------------------------------------------------------------------------------------- heads
@dataclass(frozen=True)
class SyncJacobian:
    """Jacobian ranks of a set of heads (METHODS §3): ``j_apart`` with every head's output separate,
    ``j_sync`` with the outputs of each synchronized block summed under its pattern;
    ``extra_freedom`` = j_apart − j_sync. ``j_sync`` is None when it could not be computed exactly
    (:func:`component_freedom`), and then so is ``extra_freedom``."""

    j_apart: int
    j_sync: int | None

    @property
    def exact(self) -> bool:
        return self.j_sync is not None

    @property
    def extra_freedom(self) -> int | None:
        return None if self.j_sync is None else self.j_apart - self.j_sync


#: Largest s·G·d (the unknowns of Y in METHODS (3.5b)) for which Y is found as a dense rank when its
#: closed form does not apply; above it the component's count is reported as not exact.
DENSE_Y_LIMIT = 4096


class SyncCountWarning(UserWarning):
    """A synchronized component whose Jacobian rank was not computed exactly (METHODS §3): its
    j_sync and extra freedom are left empty rather than guessed; or a float32 model's count that
    moves with the rank rule of its output weights, known only within its band (:class:`_RoundingBand`)."""


@dataclass(frozen=True)
class _Subspace:
    """Orthonormal bases of a subspace found by a rank decision (``basis``) and of its orthogonal
    complement (``complement``), and the angle to which they are known: Wedin's bound, the size of
    what the decision cut off over the smallest singular value it kept."""

    basis: Float[Tensor, "n r"]
    complement: Float[Tensor, "n k"]
    angle: float


def _top_subspace(U: Float[Tensor, "n k"], sv: Float[Tensor, " k"], r: int, noise: float) -> _Subspace:
    """The span of the first r left singular vectors U (singular values ``sv``) of a matrix, with
    ``noise`` the singular value below which its rank decision counted directions as zero."""
    basis = U[:, :r]
    angle = min(1.0, noise / float(sv[r - 1])) if r else 0.0
    return _Subspace(basis, torch.linalg.qr(basis, mode="complete").Q[:, r:], angle)


def _rank_within(parts: Sequence[Float[Tensor, "rows cols"]], angle: float) -> int:
    """Rank of the blocks ``parts`` stacked, each built from orthonormal bases known to ``angle``:
    each block can move by about ``angle`` in norm, so singular values below √(blocks)·angle are
    rounding (and never below the float64 rule)."""
    m = torch.cat(list(parts))
    return int(numerical_rank(torch.linalg.svdvals(m), tuple(m.shape), atol=math.sqrt(len(parts)) * angle))


@dataclass(frozen=True)
class _ValueSpan:
    """The value vectors of G KV heads (d columns each) on the data, in coordinates of their
    s-dimensional span (METHODS §3): column j of ``coords`` (s × G·d) is value direction j, so that
    coordsᵀ coords is the rank-s part of ``gram``. Every rank of a set S of KV heads is
    :meth:`HeadSyncResult.block_rank`'s rule on S's own Gram, capped at s, and S's span W_S is the
    top-s_S left singular subspace of its columns: subspaces and ranks come from the same decisions.
    ``cut``: the eigenvalue below which the component's rank rule counts a direction as zero.
    ``moments``: where ``gram`` is a covariance, its values' uncentred second moments E[f_i²], whose
    rounding every rank also leaves out (``numerics.covariance_floor``, over the set's own coordinates;
    not with a given ``rtol``)."""

    gram: Float[Tensor, "kv_dim kv_dim"]
    coords: Float[Tensor, "s kv_dim"]
    d: int
    precision: torch.dtype
    rtol: float | None
    cut: float
    width: int | None = None
    moments: Float[Tensor, " kv_dim"] | None = None

    @classmethod
    def of(cls, gram: Float[Tensor, "kv_dim kv_dim"], d: int, precision: torch.dtype, rtol: float | None,
           width: int | None = None, moments: Float[Tensor, " kv_dim"] | None = None) -> _ValueSpan:
        gram = gram.to(torch.float64)
        floor = _rounding_floor(precision, rtol, moments)
        s = _gram_rank(gram, precision, rtol, width, atol=floor)
        eig, vec = torch.linalg.eigh((gram + gram.mT) / 2)
        eig, vec = eig.flip(0).clamp_min(0), vec.flip(1)
        cut = max(_gram_rtol(gram.shape[0], precision, rtol, width) * float(eig[0]), floor)
        return cls(gram, eig[:s].sqrt()[:, None] * vec[:, :s].mT, d, precision, rtol, cut, width, moments)

    @property
    def s(self) -> int:
        return self.coords.shape[0]

    @property
    def n_groups(self) -> int:
        return self.coords.shape[1] // self.d

    def _index(self, groups: Sequence[int]) -> Tensor:
        return torch.cat([torch.arange(g * self.d, (g + 1) * self.d, device=self.gram.device) for g in groups])

    def rank(self, groups: Sequence[int]) -> int:
        """s_S = dim W_S."""
        idx = self._index(groups)
        floor = _rounding_floor(self.precision, self.rtol, None if self.moments is None else self.moments[idx])
        return min(_gram_rank(self.gram[idx][:, idx], self.precision, self.rtol, self.width, atol=floor), self.s)

    def subspace(self, groups: Sequence[int]) -> _Subspace:
        """W_S within the span; its complement is the range of Π_S^⊥ in (3.5b). The value vectors are
        known to about √cut (the singular value the rank rule cuts at)."""
        U, sv, _ = torch.linalg.svd(self.coords[:, self._index(groups)], full_matrices=False)
        return _top_subspace(U, sv, self.rank(groups), math.sqrt(self.cut))

    def intersection_dim(self, sets: Sequence[Sequence[int]]) -> int:
        """dim ∩_S W_S (s for no sets): s minus the rank of the complements side by side."""
        if len(sets) < 2:
            return self.rank(sets[0]) if sets else self.s
        spaces = [self.subspace(S) for S in sets]
        return self.s - _rank_within([w.complement.mT for w in spaces], max(w.angle for w in spaces))


def _column_space(m: Float[Tensor, "rows cols"], precision: torch.dtype = torch.float64) -> _Subspace:
    """Column space of a matrix of weights by the rank rule at ``precision`` (:func:`_weight_rank`),
    which cuts at max(dims)·eps·σ₁. Thin SVD: a map of output weights can be 128 × 32,768, whose full
    right factor would not fit."""
    U, sv, _ = torch.linalg.svd(m, full_matrices=False)
    r = int(numerical_rank(sv, tuple(m.shape), precision=precision))
    return _top_subspace(U, sv, r, rule_rtol(tuple(m.shape), precision) * float(sv[0]) if r else 0.0)


def _block_maps(W_O: Float[Tensor, "heads d_head d_model"], kv_of_head: Sequence[int], blocks: Sequence[Sequence[int]],
                n_groups: int) -> list[Float[Tensor, "kv_dim d_model"]]:
    """B_b of METHODS (3.5a), one per block: Σ_{h∈b reading g} W_O^h in the d rows of KV head g, zero
    in the rows of KV heads that no head of b reads."""
    d, D = W_O.shape[1:]
    maps = []
    for block in blocks:
        B = W_O.new_zeros(n_groups, d, D)
        for h in block:
            B[kv_of_head[h]] += W_O[h]
        maps.append(B.reshape(n_groups * d, D))
    return maps


def _block_groups(block: Sequence[int], kv_of_head: Sequence[int]) -> tuple[int, ...]:
    return tuple(sorted({kv_of_head[h] for h in block}))


def _constraint_sets(blocks: Sequence[Sequence[int]], maps: Sequence[Tensor], kv_of_head: Sequence[int],
                     precision: torch.dtype = torch.float64) -> dict[tuple[int, ...], _Subspace]:
    """C_S of METHODS (3.5b): for each set S of KV heads read by some block, the sum of col(B_b) over
    the blocks that read exactly S (they share Π_S^⊥, so their constraints on Y combine), ranked by
    the rule at ``precision``."""
    columns: dict[tuple[int, ...], list[Tensor]] = {}
    for block, B in zip(blocks, maps):
        columns.setdefault(_block_groups(block, kv_of_head), []).append(B)
    return {S: _column_space(torch.cat(Bs, 1), precision) for S, Bs in columns.items()}


def _group_y(span: _ValueSpan, g: int, active: dict[tuple[int, ...], _Subspace]) -> int:
    """KV head g's share of Y in METHODS (3.5c): its d coordinates map C_g (rank r_g, from blocks
    reading g alone) into W_g and everything into w_g = dim ∩ W_S over the multi-group sets S that
    hold g, whose full-rank C_S leaves no other constraint. (The min only guards the nesting
    W_g ⊂ W_S that exact data guarantee.)"""
    r = active[(g,)].basis.shape[1] if (g,) in active else 0
    w = span.intersection_dim([S for S in active if len(S) > 1 and g in S])
    return min(span.rank((g,)), w) * r + w * (span.d - r)


def _dense_y(span: _ValueSpan, active: dict[tuple[int, ...], _Subspace]) -> int:
    """Y of METHODS (3.5b) as s·G·d minus the rank of its constraints nᵀ Y c = 0 (n ⟂ W_S within the
    span, c ∈ C_S), each the row vec(n cᵀ)."""
    unknowns = span.s * span.coords.shape[1]
    if not active:
        return unknowns
    values = {S: span.subspace(S) for S in active}
    rows = [torch.kron(C.basis.mT, values[S].complement.mT) for S, C in active.items()]
    angle = max(w.angle for w in values.values()) + max(C.angle for C in active.values())
    return unknowns - _rank_within(rows, angle)


def _y_dimension(span: _ValueSpan, sets: dict[tuple[int, ...], _Subspace]) -> int | None:
    """Y(partition) of METHODS (3.5b), or None when neither the closed form (3.5c) applies nor
    s·G·d ≤ :data:`DENSE_Y_LIMIT`."""
    # A set whose span is all of the component's (W_S = V: Π_S^⊥ = 0) or whose blocks write nothing
    # constrains nothing; dropping it keeps whole-group blocks on the closed form at any size.
    active = {S: C for S, C in sets.items() if C.basis.shape[1] and span.rank(S) < span.s}
    if all(C.basis.shape[1] == len(S) * span.d for S, C in active.items() if len(S) > 1):
        return sum(_group_y(span, g, active) for g in range(span.n_groups))
    if span.s * span.coords.shape[1] <= DENSE_Y_LIMIT:
        return _dense_y(span, active)
    return None


def _kernel_dimension(span: _ValueSpan, kv_of_head: Sequence[int], W_O: Float[Tensor, "heads d_head d_model"],
                      blocks: Sequence[Sequence[int]], input_rank: int, d_out: int,
                      weight_precision: torch.dtype = torch.float64) -> int | None:
    """dim ker of the Jacobian of (W_V^g on the data, W_O^h) ↦ (Σ_{h∈b} A_{g(h)} W_O^h)_b for one
    partition of the heads into blocks, METHODS (3.5a): the part of W_V outside the value span, Y,
    and the output weights (their maps ranked by the rule at ``weight_precision``); None when Y is
    not exact."""
    maps = _block_maps(W_O, kv_of_head, blocks, span.n_groups)
    y = _y_dimension(span, _constraint_sets(blocks, maps, kv_of_head, weight_precision))
    if y is None:
        return None
    # Ranks decided on different Grams (the input's, the values') may disagree by rounding-level
    # directions; the value span cannot take more of the input than there is.
    outside = max(input_rank - span.s, 0) * (span.coords.shape[1] - _weight_rank(torch.cat(maps, 1), weight_precision))
    outputs = d_out * (len(kv_of_head) * span.d - sum(span.rank(_block_groups(b, kv_of_head)) for b in blocks))
    return outside + y + outputs


def component_freedom(
    value_gram: Float[Tensor, "kv_dim kv_dim"],
    kv_of_head: Sequence[int],
    W_O: Float[Tensor, "heads d_head d_model"],
    blocks: Sequence[Sequence[int]],
    input_rank: int,
    d_out: int | None = None,
    precision: torch.dtype = torch.float64,
    rank_rtol: float | None = None,
    gram_width: int | None = None,
    value_moments: Float[Tensor, " kv_dim"] | None = None,
    weight_precision: torch.dtype = torch.float64,
) -> SyncJacobian:
    """J_apart and J_sync of heads that read G KV heads, with ``blocks`` synchronized (METHODS §3,
    (3.5a)–(3.5c)); exact also when a block takes only part of a KV head's query heads.

    A KV head's W_V is shared by all its query heads, in a block or not, so blocks that read one KV
    head are coupled: the freedom is the drop of the Jacobian rank of all these heads together, not a
    sum over blocks. With J = G·D_in·d + H·d·D_out − ker (parameters W_V^g on the data and W_O^h,
    minus the kernel dimension (3.5a)), ``j_apart`` is J with every head its own block (this is
    (3.3)) and ``j_sync`` J with ``blocks`` ((3.4) when one block reads whole KV heads).

    Args:
        value_gram: [G·d, G·d] Gram (or covariance) of the value vectors of the G KV heads on the
            data; its ranks follow the package's rule at ``precision`` (``rank_rtol`` overrides the
            relative eigenvalue cut-off), as :meth:`HeadSyncResult.block_rank`, with each KV head
            at unit scale (:func:`balanced_values`; ``W_O`` takes the scale back).
        kv_of_head: for each head 0..H−1, the KV head (0..G−1) whose values it reads.
        W_O: [H, d, D] output weights (any float dtype; the ranks of their sums take the rank rule at
            ``weight_precision``: float64's by default, the rule for the stored values; a float32
            model's rounding passes it, :class:`_RoundingBand`).
        blocks: a partition of 0..H−1 into synchronized blocks.
        input_rank: D_in, the rank of the heads' input on the data.
        d_out: D_out, the dimension of the space the heads write into that the function reads
            (default D; D − 1 under LayerNorm, which never reads the mean direction). The rows of
            ``W_O`` must lie in that space.
        gram_width: the width of the activation Gram that ``value_gram`` is a block of (every KV
            head's values, a layer's neurons), whose float64 floor its ranks keep (:func:`_gram_rtol`).
        value_moments: where ``value_gram`` is a covariance, the values' uncentred second moments
            E[f_i²] [G·d]: its ranks also leave out their rounding (``numerics.covariance_floor``),
            which a mean large against the spread sets above the rule's cut-off.

    Returns:
        ``j_sync`` None (and a not exact result) when a set of ≥ 2 KV heads read by blocks has a
        rank-deficient summed output map and s·G·d > :data:`DENSE_Y_LIMIT`.

    Raises:
        ValueError: shapes that do not fit together, KV indices out of range, or blocks that are
        not a partition of the heads.
    """
    H, d, D = W_O.shape
    G = value_gram.shape[0] // d if d else 0
    if value_gram.shape != (G * d, G * d) or G == 0 or len(kv_of_head) != H or not all(0 <= g < G for g in kv_of_head):
        raise ValueError(f"need a [G·d, G·d] value Gram ({tuple(value_gram.shape)} with d = {d}) and one KV head "
                         f"in 0..G−1 per head of W_O ({len(kv_of_head)} for {H} heads)")
    if sorted(h for b in blocks for h in b) != list(range(H)):
        raise ValueError(f"blocks {blocks} are not a partition of the heads 0..{H - 1}")
    d_out = D if d_out is None else int(d_out)
    if not 0 < d_out <= D:
        raise ValueError(f"d_out must lie in 1..{D} (W_O's output dimension); got {d_out}")
    # Counted where each KV head's values have unit scale (its readers' W_O carry the scale): the same
    # function, and rank decisions that do not depend on how a scalar gauge splits W_V W_O.
    balanced = balanced_values(value_gram, d)
    span = _ValueSpan.of(balanced.gram, d, precision, rank_rtol, gram_width, balanced.moments(value_moments))
    W_O = balanced.output_weights(W_O, kv_of_head)
    params = G * int(input_rank) * d + H * d * d_out
    apart = _kernel_dimension(span, kv_of_head, W_O, [[h] for h in range(H)], int(input_rank), d_out, weight_precision)
    if all(len(b) == 1 for b in blocks):
        return SyncJacobian(j_apart=params - apart, j_sync=params - apart)
    sync = _kernel_dimension(span, kv_of_head, W_O, blocks, int(input_rank), d_out, weight_precision)
    return SyncJacobian(j_apart=params - apart, j_sync=None if sync is None else params - sync)


def _components(blocks: Sequence[Sequence[int]], kv_of_head: Sequence[int]) -> list[list[int]]:
    """The blocks (by index) joined into connected components: two blocks are joined when they hold
    query heads of one KV head (METHODS §3: their Jacobians are coupled through its W_V). Components
    come in the order of their first block."""
    component = list(range(len(blocks)))

    def root(i: int) -> int:
        while component[i] != i:
            i = component[i]
        return i

    reader: dict[int, int] = {}
    for i, block in enumerate(blocks):
        for h in block:
            first = reader.setdefault(kv_of_head[h], i)
            component[root(i)] = root(first)
    joined: dict[int, list[int]] = {}
    for i in range(len(blocks)):
        joined.setdefault(root(i), []).append(i)
    return sorted(joined.values())


#: HeadSyncResult.to_frame's per-component count columns.
_COUNT_COLUMNS = ("n_params", "j_apart", "j_sync", "free_block", "free_separate", "extra_freedom")


@dataclass(eq=False)
class HeadSyncResult(_HalfDataChecks, _RoundingBand):
    """Head synchronization (METHODS §3). ``distance`` [L, H, H]: mean total-variation distance between
    the attention patterns of two heads over counted (sequence, query position) samples; ``blocks``:
    per layer, the synchronized blocks (lists of heads); ``value_gram`` [L, n_kv·d, n_kv·d]: uncentred
    Gram of the value activations (hook_v, stored KV heads) and ``value_cov`` their covariance (the
    Gram where the layer has no b_O to absorb the mean, :func:`head_synchronization`), from which
    the value ranks s come; ``head_rank`` [L, H]: s of each head's value head; ``input_rank`` [L]:
    D_in, the rank of the covariance (Gram without b_O) of the heads' input; ``W_O`` [L, H, d, D]: the effective
    output weights (float64; W_O P under LayerNorm) and ``d_out`` the dimension D_out they write into
    (D − 1 under LayerNorm, else D). ``rank_rtol`` is the caller's relative eigenvalue cut-off for
    activation ranks, or None for the package's rule at ``precision`` (activation_precision of the model).
    ``half_blocks``: the blocks that the data's even-numbered sequences alone form (``to_frame``'s
    on_half; ``changing_blocks``). ``noise_rtol``, ``input_rank_noise``: a half-precision model's
    rounding band; ``weight_precision``: the rank rule of the output weights' ranks, float64's (a
    float32 model's band takes float32's too; :class:`_RoundingBand`)."""

    distance: Float[np.ndarray, "layer head head"]
    tol: float
    blocks: list[list[list[int]]]
    value_gram: Tensor = field(repr=False)
    head_rank: Int[np.ndarray, "layer head"]
    n_samples: int
    n_kv_heads: int
    d_head: int
    rank_rtol: float | None
    value_cov: Float[Tensor, "layer kv_dim kv_dim"] = field(repr=False)
    input_rank: Int[np.ndarray, " layer"]
    W_O: Float[Tensor, "layer head d_head d_model"] = field(repr=False)
    d_out: int
    precision: torch.dtype = torch.float32
    positions: object = field(repr=False, default=None)
    ov_parameters: list[bool] | None = None
    half_blocks: list[list[list[int]]] | None = None
    input_rank_half: Int[np.ndarray, " layer"] | None = None
    noise_rtol: float | None = None
    input_rank_noise: Int[np.ndarray, " layer"] | None = None
    sample_limited: Bool[np.ndarray, " layer"] | None = None
    pattern_inputs: dict[tuple[int, tuple[int, ...]], PatternInputs] | None = field(repr=False, default=None)
    centered: bool = True
    same_pattern: Bool[np.ndarray, "layer head head"] | None = field(repr=False, default=None)
    weight_precision: torch.dtype = torch.float64

    @property
    def kv_of_head(self) -> list[int]:
        """The KV head whose values each query head reads (GQA: consecutive runs of H / n_kv heads)."""
        H = self.head_rank.shape[1]
        return [h // (H // self.n_kv_heads) for h in range(H)]

    def _kv_index(self, kvs: Sequence[int]) -> Tensor:
        """Rows of ``value_cov`` that hold the given KV heads, in that order."""
        return torch.cat([torch.arange(kv * self.d_head, (kv + 1) * self.d_head, device=self.value_cov.device)
                          for kv in kvs])

    def _pattern(self, layer: int, heads: Sequence[int]) -> PatternInputs | None:
        """What the block's common pattern passes on (:mod:`tl_degeneracy.pattern_inputs`; None for one head)."""
        return None if self.pattern_inputs is None else self.pattern_inputs.get((layer, tuple(heads)))

    def _pattern_input_rank(self, inputs: PatternInputs, half: bool = False) -> int:
        """D_in of a block: the rank of its pattern-weighted input (of the even-numbered sequences' alone)."""
        moment, scale = (inputs.input_moment_half, inputs.input_scale_half) if half else (inputs.input_moment,
                                                                                          inputs.input_scale)
        return _input_rank(moment, scale, inputs.centered, inputs.bound, self.precision, self.rank_rtol)

    def _values(self, layer: int, heads: Sequence[int], plain: bool = False) -> tuple[Tensor, Tensor | None]:
        """The moment [G·d, G·d] of the values of the block's distinct KV heads side by side — those its
        common pattern passes on where it has two or more heads (unless ``plain``), else the value
        activations' — and, where it is a covariance, their uncentred second moments [G·d] (its rounding)."""
        inputs = None if plain else self._pattern(layer, heads)
        if inputs is not None:
            return inputs.value_moment, inputs.value_scale if inputs.centered else None
        idx = self._kv_index(_block_groups(heads, self.kv_of_head))
        return self.value_cov[layer][idx][:, idx], self.value_gram[layer].diagonal()[idx] if self.centered else None

    def _value_rank(self, gram: Float[Tensor, "k k"], moments: Tensor | None) -> int:
        """A rank of values' moment ``gram`` by the rule at the forward's precision, above the rounding
        that the uncentred second ``moments`` of a covariance set (:func:`_rounding_floor`)."""
        return _gram_rank(gram, self.precision, self.rank_rtol, self.value_cov.shape[-1],
                          atol=_rounding_floor(self.precision, self.rank_rtol, moments))

    def block_rank(self, layer: int, heads: list[int], plain: bool = False) -> int:
        """s_S: rank of the (centred) values of the block's distinct KV heads side by side (those its
        common pattern passes on, :meth:`_values`), each KV head at unit scale (:func:`balanced_values`),
        so that a head's scalar gauge does not move it."""
        gram, moments = self._values(layer, heads, plain)
        balanced = balanced_values(gram, self.d_head)
        return self._value_rank(balanced.gram, balanced.moments(moments))

    def _head_ranks(self, layer: int, heads: Sequence[int]) -> tuple[int, ...]:
        """s of each head's values, as the block passes them on (:meth:`_values`)."""
        if self._pattern(layer, heads) is None:
            return tuple(int(self.head_rank[layer, h]) for h in heads)
        gram, moments = self._values(layer, heads)
        kvs = _block_groups(heads, self.kv_of_head)
        at, d = {kv: i for i, kv in enumerate(kvs)}, self.d_head
        own = (lambda g: slice(at[g] * d, (at[g] + 1) * d))
        return tuple(self._value_rank(gram[own(g), own(g)], None if moments is None else moments[own(g)])
                     for g in (self.kv_of_head[h] for h in heads))

    def _block_input_rank(self, layer: int, heads: Sequence[int]) -> tuple[int, bool]:
        """D_in of a block (its pattern's input where it has two or more heads, else the layer's), and
        whether it is lower on the data's even-numbered sequences alone."""
        inputs = self._pattern(layer, heads)
        if inputs is None:
            return int(self.input_rank[layer]), bool(_HalfDataChecks.data_limited.fget(self)[layer])
        rank = self._pattern_input_rank(inputs)
        return rank, self._pattern_input_rank(inputs, half=True) < rank

    @property
    def data_limited(self) -> Bool[np.ndarray, " layer"]:
        """Per layer, whether D_in — the layer's input's, or a block's pattern-weighted input's — is lower
        on the data's even-numbered sequences alone than on all of them (still growing with the data)."""
        flags = _HalfDataChecks.data_limited.fget(self).copy()
        for layer, heads in self.pattern_inputs or {}:
            flags[layer] |= self._block_input_rank(layer, heads)[1]
        return flags

    def _passes_on_less(self, layer: int, heads: Sequence[int]) -> bool:
        """Whether the block's common pattern passes on fewer input or value directions than the layer's
        input and values hold (a pattern that sits on fixed positions; audit 22a F1)."""
        inputs = self._pattern(layer, heads)
        if inputs is None:
            return False
        return (self._pattern_input_rank(inputs) < int(self.input_rank[layer])
                or self.block_rank(layer, heads) < self.block_rank(layer, heads, plain=True))

    def freedom(self, layer: int, blocks: Sequence[Sequence[int]]) -> SyncJacobian:
        """J_apart and J_sync of the heads of ``blocks`` together with every other query head of their
        KV heads (those apart), with ``blocks`` synchronized (:func:`component_freedom`, METHODS
        (3.5a)–(3.5c)). When J_sync is not exact a :class:`SyncCountWarning` names the layer and heads."""
        kv = self.kv_of_head
        kvs = sorted({kv[h] for block in blocks for h in block})
        heads = [h for h in range(len(kv)) if kv[h] in kvs]
        local = {h: i for i, h in enumerate(heads)}
        listed = {h for block in blocks for h in block}
        partition = [[local[h] for h in block] for block in blocks] + [[local[h]] for h in heads if h not in listed]
        whole = len(blocks) == 1 and len(heads) == len(blocks[0])
        # one block of whole KV heads: its input and values are what its common pattern passes on
        (values, moments), input_rank = ((self._values(layer, blocks[0]), self._block_input_rank(layer, blocks[0])[0])
                                         if whole else (self._values(layer, heads, plain=True), int(self.input_rank[layer])))
        jac = component_freedom(values, [kvs.index(kv[h]) for h in heads], self.W_O[layer, heads], partition,
                                input_rank, self.d_out, self.precision, self.rank_rtol, self.value_cov.shape[-1], moments,
                                self.weight_precision)
        lost = [] if whole else [list(b) for b in blocks if self._passes_on_less(layer, b)]
        if lost:
            warn_once(
                f"layer {layer}, heads {heads}: the synchronized block(s) {lost} split KV heads, and their common "
                "pattern passes on fewer input or value directions than the layer's input and values hold (attention "
                "on fixed positions); the count for blocks that split KV heads reads the layer's, so j_sync and "
                "extra_freedom are left empty (count_exact False)", SyncCountWarning, stacklevel=2)
            return SyncJacobian(j_apart=jac.j_apart, j_sync=None)
        if not jac.exact:
            warn_once(
                f"layer {layer}, heads {heads}: the synchronized blocks {[list(b) for b in blocks]} split KV "
                "heads, and a set of KV heads that blocks read together has a rank-deficient summed output map, "
                f"so J_sync has no closed form and s·G·d exceeds DENSE_Y_LIMIT = {DENSE_Y_LIMIT}: j_sync and "
                "extra_freedom are left empty (count_exact False)", SyncCountWarning, stacklevel=2)
        return jac

    def block_freedom(self, layer: int, heads: list[int]) -> SyncJacobian:
        """J_apart and J_sync when only this block is synchronized and the other query heads of its KV
        heads stay apart (:meth:`freedom`); for a block of whole KV heads, METHODS (3.3)–(3.4)."""
        return self.freedom(layer, [heads])

    def _block_distance(self, layer: int, heads: Sequence[int]) -> float:
        """Largest pattern distance between two heads of the block (0 for one head)."""
        return float(self.distance[layer][np.ix_(heads, heads)].max())

    def _component_totals(self, layer: int, blocks: Sequence[Sequence[int]]) -> dict:
        """The count columns of one component (every head of its KV heads, so nothing left apart).
        In a layer whose W_V/W_O are not all parameters (``ov_parameters``) the counts, which take
        every entry of both as one, are left empty; one head alone still has no extra freedom."""
        if self.ov_parameters is not None and not self.ov_parameters[layer]:
            alone = sum(len(b) for b in blocks) == 1
            return {**dict.fromkeys(_COUNT_COLUMNS, pd.NA), "extra_freedom": 0 if alone else pd.NA,
                    "count_exact": alone}
        jac = self.freedom(layer, blocks)
        n_heads = sum(len(b) for b in blocks)
        n_kv = len({self.kv_of_head[h] for b in blocks for h in b})
        n_params = (n_kv + n_heads) * self.d_head * self.W_O.shape[-1]  # each stored value head once
        unknown = not jac.exact
        return {"n_params": n_params, "j_apart": jac.j_apart, "j_sync": pd.NA if unknown else jac.j_sync,
                "free_block": pd.NA if unknown else n_params - jac.j_sync, "free_separate": n_params - jac.j_apart,
                "extra_freedom": pd.NA if unknown else jac.extra_freedom, "count_exact": jac.exact}

    def to_frame(self) -> pd.DataFrame:
        """One row per block (singletons included): layer, heads, size, max pairwise distance,
        approximate (max distance > 0: the freedom holds only where the patterns agree), on_half (the
        data's even-numbered sequences alone form exactly this block: False where the blocks still
        change with the data, so the block and its count are not yet the model's), s_block
        (s_S), s_heads (s of each head's values), input_rank (D_in), data_limited (D_in is lower on
        the even-numbered sequences alone: it and the counts that use it still grow with the data),
        sample_limited (D_in reached the samples' bound n − 1 below its own: the data's limit), component (the heads of the
        block's component: blocks joined through query heads of one KV head, METHODS §3), count_exact,
        and the component's counts (METHODS (3.5a)–(3.5c)): n_params (its W_V and W_O entries, each
        stored value head once), j_apart, j_sync, free_block = n_params − j_sync, free_separate =
        n_params − j_apart, extra_freedom = j_apart − j_sync, and extra_freedom_min / extra_freedom_max:
        the smaller and larger of the count at the band's two ends (:class:`_RoundingBand`: a
        half-precision model's rank cut-off and rounding level, a float32 model's output weights at
        float64's and float32's rule), else both the count.

        The counts belong to a component, not a block (blocks that share a KV head are coupled), so
        they stand on one row of the component, its first block of ≥ 2 heads (else its first block),
        and are 0 on its other rows: each column sums over the frame to the model's total. A block of
        whole KV heads, or a model without GQA, is its own component. Where a component's count is
        not exact (count_exact False, with a :class:`SyncCountWarning`), j_sync, free_block and
        extra_freedom are <NA>. In a layer whose W_V or W_O is not a parameter (the SMA toy's W_O is a
        fixed identity: ``ov_parameters``) every count column is <NA>, except that a head alone has
        extra_freedom 0."""
        return self._frame.copy()

    @cached_property
    def _frame(self) -> pd.DataFrame:
        """:meth:`to_frame`, computed once: every component's count takes decompositions of its value
        covariance and output weights, and the totals, labels and ``to_dict`` all read the frame."""
        rows = []
        for layer, blocks in enumerate(self.blocks):
            component_of, totals = {}, {}
            for component in _components(blocks, self.kv_of_head):
                members = [blocks[i] for i in component]
                lead = next((i for i in component if len(blocks[i]) > 1), component[0])
                totals[lead] = self._component_totals(layer, members)
                component_of |= {i: (tuple(sorted(h for b in members for h in b)), lead) for i in component}
            for i, heads in enumerate(blocks):
                heads_of_component, lead = component_of[i]
                counts = totals[i] if i == lead else {**dict.fromkeys(_COUNT_COLUMNS, 0),
                                                      "count_exact": totals[lead]["count_exact"]}
                distance = self._block_distance(layer, heads)
                input_rank, data_limited = self._block_input_rank(layer, heads)
                rows.append({"layer": layer, "heads": tuple(heads), "size": len(heads), "max_distance": distance,
                             "approximate": self._block_approximate(layer, heads),
                             "on_half": _formed_on_half(self.half_blocks, layer, heads),
                             "s_block": self.block_rank(layer, heads),
                             "s_heads": self._head_ranks(layer, heads),
                             "input_rank": input_rank,
                             "data_limited": data_limited,
                             "sample_limited": self.sample_limited is not None and bool(self.sample_limited[layer]),
                             "component": heads_of_component, **counts})
        columns = ["layer", "heads", "size", "max_distance", "approximate", "on_half", "s_block", "s_heads",
                   "input_rank", "data_limited", "sample_limited", "component", "count_exact", *_COUNT_COLUMNS]
        frame = pd.DataFrame(rows, columns=columns).astype({c: "Int64" for c in _COUNT_COLUMNS})
        end = self._other_end()
        frame = self._banded(frame, None if end is None else end._frame)
        self._warn_band("head_synchronization", frame)
        return frame

    @property
    def extra_freedom(self) -> int | None:
        """Total extra free directions from synchronization over all layers, the sum over components;
        None when some component's count is not exact (``count_exact``)."""
        frame = self._frame
        return int(frame["extra_freedom"].sum()) if frame["count_exact"].all() else None


    @property
    def count_exact(self) -> bool:
        """Whether every component's Jacobian rank was computed exactly (:func:`component_freedom`)."""
        return bool(self._frame["count_exact"].all())

    @property
    def max_block_distance(self) -> float:
        """Largest pattern distance inside any block (0 when every block's heads agree on every sample)."""
        return max(self._block_distance(layer, b) for layer, blocks in enumerate(self.blocks) for b in blocks)

    @property
    def approximate(self) -> bool:
        """True when some block's heads have patterns that differ by more than the forward's rounding at
        some sample (:func:`pattern_rounding`): its freedom holds only on the samples where they agree."""
        return any(self._block_approximate(layer, b) for layer, blocks in enumerate(self.blocks) for b in blocks)

    def _block_approximate(self, layer: int, heads: Sequence[int]) -> bool:
        """Whether two heads of the block differ by more than their patterns' rounding at some sample
        (without ``same_pattern``: whether their mean distance is above 0)."""
        if self.same_pattern is None:
            return self._block_distance(layer, heads) > 0
        return not bool(self.same_pattern[layer][np.ix_(heads, heads)].all())

    @property
    def approximation(self) -> str:
        """Why the freedom is approximate, for labels ("" when it is not)."""
        if not self.approximate:
            return ""
        return (f"attention patterns in blocks differ, mean TV distance up to {self.max_block_distance:.2g}; "
                f"{UPPER_ESTIMATE}")

    def __repr__(self) -> str:
        return _sync_repr("HeadSyncResult", "head", self)

    def to_dict(self) -> dict:
        frame = self._frame
        return {"kind": "head_synchronization", "tol": self.tol, "n_samples": self.n_samples,
                "rank_rtol": self.rank_rtol, "precision": str(self.precision).removeprefix("torch."),
                "half_precision": self.half_precision, "extra_freedom_band": self.extra_freedom_band,
                "approximate": self.approximate, "count_exact": bool(frame["count_exact"].all()),
                "changing_blocks": self.changing_blocks, "data_limited_layers": np.flatnonzero(self.data_limited).tolist(),
                "sample_limited_layers": _limited_layers(self.sample_limited),
                "distance": self.distance.tolist(), "blocks": frame.to_dict(orient="records")}

    def plot(self):
        """Heatmap of the pairwise pattern distances, one panel per layer."""
        from .plots import plot_distance_heatmaps

        return plot_distance_heatmaps(self.distance, "head", f"attention-pattern TV distance (tol {self.tol})")


#: Bytes of one chunk of attention-pattern rows in :func:`pattern_tv_sums` (float64 copy included).
PATTERN_CHUNK_BYTES = 1 << 26


def pattern_tv_sums(
    pattern: Float[Tensor, "batch head query key"],
    mask: Bool[Tensor, "batch query"],
    chunk_bytes: int | None = None,
    largest: Float[Tensor, "head head"] | None = None,
) -> Float[Tensor, "head head"]:
    """Σ over the counted (sequence, query) rows of the total-variation distance
    ½ Σ_k |p_h(k) − p_h'(k)| between the attention distributions of every two heads (METHODS §3);
    ``largest`` (float64, in place): the elementwise maximum of itself and each row's distances.

    The rows are gathered and widened to float64 a chunk at a time, at most ``chunk_bytes`` (default
    :data:`PATTERN_CHUNK_BYTES`) of them, at least one row: memory is O(H²) plus one chunk whatever
    the number of positions, where a float64 copy of all rows [n, H, K] would be 2·n·H·K·8 bytes
    (68 GB at 32 heads and 4k positions of one sequence). Chunking changes only the order of the
    float64 sum.
    """
    _, H, _, K = pattern.shape
    per_row = H * K * (pattern.element_size() + 8) + H * H * 8  # the gathered row, its float64 copy, its [H, H]
    rows_per_chunk = max(1, int(chunk_bytes or PATTERN_CHUNK_BYTES) // per_row)
    seq, query = mask.nonzero(as_tuple=True)  # counted rows, in the order of pattern[mask]
    total = torch.zeros(H, H, dtype=torch.float64, device=pattern.device)
    for start in range(0, len(seq), rows_per_chunk):
        part = slice(start, start + rows_per_chunk)
        rows = pattern[seq[part], :, query[part], :].to(torch.float64)  # [c, head, key]
        distances = torch.cdist(rows, rows, p=1)  # Σ_k |p_h(k) − p_h'(k)| for every head pair
        total += distances.sum(0)
        if largest is not None and len(rows):
            torch.maximum(largest, 0.5 * distances.amax(0), out=largest)
    return 0.5 * total


def head_synchronization(
    model,
    data,
    tol: float = 0.05,
    batch_size: int = 16,
    rank_rtol: float | None = None,
    progress: bool = True,
    seq_len: int | None = None,
    skip_bos: bool | None = None,
) -> HeadSyncResult:
    """Synchronized attention heads and the freedom they add (METHODS §3, corrected).

    Streams over ``data``: for every layer the [H, H] sums (and largest) of the total-variation
    distance ½ Σ_k |p_h(k) − p_h'(k)| between the attention distributions of two heads at each counted
    (sequence, query position), and the float64 mean and covariance of the value activations
    (``hook_v``) and of the heads' input (the normalized residual stream; ``hook_resid_pre`` without
    a norm); then, where blocks of two or more heads formed, a second pass for what each block's
    common pattern passes on (:func:`~tl_degeneracy.pattern_inputs.pattern_inputs`: the moments of
    A·x and A·v). Memory is O(L·H² + L·(n_kv·d)² + L·D² + blocks·D²), independent of the amount of
    data, plus one chunk of pattern rows (:func:`pattern_tv_sums`): the attention patterns are never
    copied whole.

    Heads whose patterns are all pairwise within ``tol`` form a block S (:func:`synchronized_blocks`);
    heads whose patterns agree within their rounding at every sample (:func:`pattern_rounding`) are
    one pattern at any ``tol``.
    The extra freedom is J_apart − J_sync per component (blocks joined through query heads of one KV
    head, whose shared W_V couples them; :func:`component_freedom`, METHODS (3.5a)–(3.5c)) from
    D_in = rank of the covariance of the heads' input, the covariance of the value activations of
    the component's KV heads (s and the spans W_S of sets of them), and the effective output weights;
    a block of whole KV heads is its own component and gets (3.3)–(3.5). Covariances, not Grams,
    where the layer has b_O: attention rows sum to one, so the mean value vector v̄ reaches the
    output as the constant v̄·W_O, which every head adds alike, synchronized or not, and b_O absorbs
    (TransformerLens' ``fold_value_biases`` moves b_V into b_O for this reason); the mean of the
    input reaches only that constant. Without b_O (Llama-style o_proj) nothing absorbs it, and the
    uncentred Grams are read (METHODS §3, corrected). Under LayerNorm the residual stream's mean direction is never read, so W_O is
    taken as W_O P and D_out = D − 1 (METHODS §2's effective maps); the count is then the same for
    an unfolded bridge, a compatibility-mode bridge and a HookedTransformer of one checkpoint that
    has b_O. Of one without (Llama), a HookedTransformer adds a zero b_O parameter, which absorbs the
    constant in its parameter space, and its count is the centred one: it may exceed the bridge's by
    d·(rank of the input Gram − rank of its covariance) per copied head (review 39: 264 against 272).

    A block of whole KV heads takes D_in and s from what its common pattern passes on, A·x and A·v
    (METHODS §3, corrected, audit 22a F1: two heads on a BOS sink read 57 extra free directions where
    the Jacobian reads 0); heads alone read x.

    Args:
        tol: distance threshold in [0, 1] (TV distance lies in [0, 1]); patterns within the forward's
            rounding (:func:`pattern_rounding`) form a block at any ``tol``, so ``tol=0``: the same
            pattern.
        rank_rtol: relative eigenvalue cut-off for the activation ranks (D_in, s); default: the
            package's rank rule at activation_precision of the model (``tl_degeneracy.numerics``). Weight ranks
            always use the float64 rule.
        progress: a tqdm bar over the batches (rank 0 only; the TQDM_DISABLE environment variable turns it off).
        skip_bos: ``None`` or ``False``: every non-padding position counts, BOS included
            (``counts.counted_batches``), since every later query reads the BOS position's values;
            ``True`` is refused.

    Raises:
        ValueError: tol outside [0, 1], ``skip_bos=True``. DataError: data without tokens. MissingHookError: a model
        without attention patterns, values or a findable attention input. TypeError: a model
        ``tld.adapt`` does not take. MemoryBudgetError: batches too large for the memory budget
        (``tld.memory``), before anything runs.
    """
    with failing_together("head_synchronization"):
        tol = _check_tol(tol)
        rank_rtol, _ = check_tolerances(rank_rtol)  # before the pass, not at its end
        adapter = adapt(model)
        if not adapter.n_heads:
            raise MissingHookError("head_synchronization needs a model with attention heads; this one has none")
        adapter.check_finite()  # the counts read W_O, which no activation carries (audit 22a F5)
        L, H, d, n_kv, D = adapter.n_layers, adapter.n_heads, adapter.d_head, adapter.n_kv_heads, adapter.d_model
        try:
            pattern_names = [adapter.hook_name("attn_pattern", layer) for layer in range(L)]
            value_names = [adapter.hook_name("v", layer) for layer in range(L)]
            # the normalized residual stream, or the residual stream itself without normalization; its
            # gain is applied afterwards (input_moment), its bias only shifts the mean, which the covariance drops
            input_names = [block_input_hook(adapter, layer, "ln1") for layer in range(L)]
        except MissingHookError as e:
            raise MissingHookError(f"head_synchronization needs attention patterns, values and inputs: {e}") from None
        batches = counted_batches(data, adapter, batch_size, seq_len, skip_bos, "head_synchronization")
        check_batches(adapter, "head_sync", batches, "head_synchronization")  # fail before the first forward
        dev = adapter.device
        # [L, 2, H, H]: the data's even- and odd-numbered sequences apart (their sum is the whole), so
        # that blocks can also be formed from half of the data (HeadSyncResult.half_blocks)
        tv_sum = torch.zeros(L, 2, H, H, dtype=torch.float64, device=dev)
        largest = _Largest(torch.zeros(L, H, H, dtype=torch.float64, device=dev))  # of one sample's distance
        count = torch.zeros(L, 2, dtype=torch.float64, device=dev)
        values = [MomentAccumulator(1, n_kv * d, device=dev) for _ in range(L)]
        inputs = [MomentAccumulator(1, D, device=dev) for _ in range(L)]
        inputs_half = [MomentAccumulator(1, D, device=dev) for _ in range(L)]  # the even-numbered sequences' D_in

        def on_batch(step: Step) -> None:
            if not step.count:
                return  # the accumulators exist already, with their shapes
            index, flags = step.index, step.flags
            seen: set[int] = set()

            def on_pattern(layer: int):
                def hook(pattern: Tensor, hook=None) -> None:
                    b, _, q, k = pattern.shape
                    unit = index.unit((b, q, H, k), pattern_names[layer])  # sample rows: [batch, query] positions
                    mask = index.mask if unit == "position" else index.seq_mask[:, None]
                    for part, half in enumerate((mask & index.even[:, None], mask & ~index.even[:, None])):
                        tv_sum[layer, part] += pattern_tv_sums(pattern.detach(), half, largest=largest.value[layer])
                        count[layer, part] += half.sum()
                    flags[pattern_names[layer]] = torch.isfinite(tv_sum[layer]).all()

                return hook

            def rows_into(acc: MomentAccumulator, name: str, half: MomentAccumulator | None = None):
                def hook(act: Tensor, hook=None) -> None:
                    unit = index.unit(tuple(act.shape), name)
                    rows = index.rows(act.detach(), unit)
                    rows = rows.reshape(rows.shape[0], 1, -1)
                    flags[name] = acc.update(rows)
                    if half is not None:
                        half.update(rows[index.half(unit)])

                return hook

            def on_input(layer: int):
                record = rows_into(inputs[layer], input_names[layer], inputs_half[layer])

                def hook(x: Tensor, hook=None) -> None:
                    # HookedTransformer applies ln1 separately to the query, key and value inputs: the
                    # hook fires up to three times per forward with identical values; count it once.
                    if layer not in seen:
                        seen.add(layer)
                        record(x)

                return hook

            hooks = [(pattern_names[l], on_pattern(l)) for l in range(L)]
            hooks += [(value_names[l], rows_into(values[l], value_names[l])) for l in range(L)]
            hooks += [(input_names[l], on_input(l)) for l in range(L)]
            adapter.run_with_hooks(step.batch.tokens, fwd_hooks=hooks)

        stream(dev, batches, on_batch, reduce=lambda: [tv_sum, count, largest, *values, *inputs, *inputs_half],
               desc="head_synchronization", progress=progress, what="attention pattern, value or input")
        if float(count.sum(1).min()) == 0 or min(acc.count for acc in values + inputs) == 0:
            raise MissingHookError("the attention pattern, value or input hooks did not fire (or no position "
                                   "counted); nothing to compare")
        distance = (tv_sum.sum(1) / count.sum(1)[:, None, None]).cpu().numpy()
        distance = (distance + distance.transpose(0, 2, 1)) / 2  # symmetric up to rounding already
        precision = activation_precision(adapter.dtype)  # activation Grams: the forward's precision (numerics)
        # the same pattern up to its rounding at every sample: one block at any tol
        same = (torch.maximum(largest.value, largest.value.mT) <= pattern_rounding(precision)).cpu().numpy()
        half = (tv_sum[:, 0] / count[:, 0].clamp_min(1)[:, None, None]).cpu().numpy()
        half_blocks = [synchronized_blocks(np.where(same[layer], 0.0, (half[layer] + half[layer].T) / 2), tol)
                       for layer in range(L)]
        grams = torch.stack([acc.gram()[0] for acc in values]).cpu()
        # Centred only where b_O can absorb the constant the mean value and input reach the output as
        # (audit 16a F1: a bias-free Llama's copied head read 264 free directions for 272).
        centered = bool(adapter.map_biases(0)["W_O"])
        covs = torch.stack([acc.covariance()[0] for acc in values]).cpu() if centered else grams
        rtol = None if rank_rtol is None else float(rank_rtol)
        noise = _rounding_cut(adapter.dtype, rtol)

        def d_in(accs: list[MomentAccumulator], cut: float | None) -> Int[np.ndarray, " layer"]:
            return _input_ranks(adapter, accs, "ln1", centered, precision, cut)

        input_rank, input_rank_half = d_in(inputs, rtol), d_in(inputs_half, rtol)
        own = [slice(kv * d, (kv + 1) * d) for kv in range(n_kv)]
        kv_rank = np.array([
            [_gram_rank(covs[layer, own[kv], own[kv]], precision, rtol, covs.shape[-1],
                        atol=_rounding_floor(precision, rtol, grams[layer].diagonal()[own[kv]] if centered else None))
             for kv in range(n_kv)]
            for layer in range(L)
        ], dtype=np.int64).reshape(L, n_kv)
        head_rank = kv_rank[:, np.arange(H) // (H // n_kv)]
        W_O = adapter.attention_weights().W_O
        norms = [adapter.norm_weights(layer, "ln1") for layer in range(L)]
        W_O = torch.stack([center_writing(W_O[layer], norms[layer]) for layer in range(L)]).cpu()
        blocks = [synchronized_blocks(np.where(same[layer], 0.0, distance[layer]), tol) for layer in range(L)]
        kv_of_head = [h // (H // n_kv) for h in range(H)]
        multi = [(layer, tuple(b)) for layer in range(L) for b in blocks[layer] if len(b) > 1]
        patterned = pattern_inputs(adapter, batches, multi, kv_of_head, centered, progress) if multi else {}
        result = HeadSyncResult(
            distance=distance, tol=tol, blocks=blocks, value_gram=grams, head_rank=head_rank,
            n_samples=int(count[0].sum()), n_kv_heads=n_kv, d_head=d, rank_rtol=rtol, value_cov=covs,
            input_rank=input_rank, W_O=W_O, d_out=D - int(norms[0].kind == "layernorm"), precision=precision,
            positions=batches.positions, ov_parameters=[circuit_parameters(adapter, layer).ov for layer in range(L)],
            half_blocks=half_blocks, input_rank_half=input_rank_half, noise_rtol=noise,
            input_rank_noise=None if noise is None else d_in(inputs, noise),
            sample_limited=_at_sample_count(adapter, input_rank, batches.n_distinct_samples, centered=centered),
            pattern_inputs=patterned, centered=centered, same_pattern=same,
        )
        warn_unsettled("head_synchronization", result, batches, "j_apart, j_sync, free_block and free_separate")
        if batches.max_len < 2:  # audit 22a F6
            warn_once("head_synchronization: every sequence holds one position, so every attention pattern is [1] and "
                      "every head has the same pattern as every other: the blocks say nothing about what the heads "
                      "attend to (their counts hold on these data alone); give sequences of two or more tokens",
                      DataLimitedWarning, stacklevel=2)
        if result.half_precision:
            result.to_frame()  # its band's warning now, with the call's others (review 36)
        return result


# ---------------------------------------------------------------------------------------------- neurons
#: r = act(p)/p for the activation functions of gated MLPs (whose hook_post is act(gate)·linear).
def _tanh_gelu_ratio(p: Tensor) -> Tensor:
    """gelu_new(p)/p for the tanh approximation of GELU (gelu_new, gelu_fast, gelu_pytorch_tanh)."""
    return 0.5 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (p + 0.044715 * p**3)))


_RATIOS = {
    "relu": lambda p: (p > 0).to(p.dtype),
    "gelu": lambda p: torch.special.ndtr(p),  # gelu(p)/p = Φ(p)
    "gelu_new": _tanh_gelu_ratio,
    "gelu_fast": _tanh_gelu_ratio,
    "gelu_pytorch_tanh": _tanh_gelu_ratio,
    "silu": torch.sigmoid,  # silu(p)/p = σ(p)
    "swish": torch.sigmoid,
}


@dataclass(eq=False)
class NeuronSyncResult(_HalfDataChecks, _RoundingBand):
    """Neuron synchronization (METHODS §3). ``output_distance`` [L, F, F]: the output-weighted distance
    (3.6a), our reading of paper eq. 20 (:class:`_FiringMismatch`): (E[g_i² (r_i − r_j)²] + E[g_j²
    (r_i − r_j)²]) / (E[f_i²] + E[f_j²]) over counted samples, r = f/p the firing pattern and g = f/r
    (p, or p·l when gated): the energy by which the pair's outputs would change if the two swapped
    firing patterns, relative to the pair's output energy (it can exceed 1); ``firing_distance``
    [L, F, F]: E[(r_i − r_j)²], for ReLU the share of samples on which the two disagree about firing;
    ``distance``: the larger of the two, from which the blocks are formed; ``blocks``: per layer, the
    synchronized blocks (lists of
    neurons, singletons left out of ``to_frame`` unless asked); ``value_gram`` [L, F, F]: uncentred
    Gram of the post-activations f = r·p, the values W_out reads, from which the block ranks s come
    (``rank_rtol``: the caller's eigenvalue cut-off, or None for the package's rule at ``precision``,
    activation_precision of the model); ``fire_rate`` [L, F]: E[r], for ReLU the share of samples on
    which a neuron fires; ``input_rank`` [L]: D_in, the rank of the MLP input x on the data together
    with the constant 1 where W_in has a bias (``in_bias``); ``W_out`` [L, F, D]: the effective output
    weights (float64; W_out P under LayerNorm) and ``d_out`` the dimension they write into (D − 1
    under LayerNorm). ``exact_activation``: r is piecewise constant (ReLU), so a block is exact where
    its neurons fire alike on every sample; for smooth activations (GELU, SiLU) r varies continuously
    and a block is approximate (``approximate``, ``approximation``) unless its neurons are copies.
    ``input_copy`` [L, F]: a label per neuron, equal for neurons whose input weights (W̃_in column, and
    the gate's) are equal bit for bit, which share p and so r on every input whatever the activation
    (None: unknown, no neuron a copy); ``fire_var`` [L, F]: Var(r) over the samples, and ``n_distinct``
    the distinct samples, which say where a smooth activation's copies are counted exactly
    (:meth:`_exact_copies`). ``gated``: a gated MLP, whose
    block computes r·Σ_k w_k g_k l_k, quadratic in the input, where the bilinear count of
    :meth:`freedom` does not hold: its counts are left empty (``count_exact`` False)."""

    output_distance: Float[np.ndarray, "layer neuron neuron"]
    firing_distance: Float[np.ndarray, "layer neuron neuron"]
    tol: float
    blocks: list[list[list[int]]]
    value_gram: Float[Tensor, "layer neuron neuron"] = field(repr=False)
    n_samples: int
    act_fn: str | None
    exact_activation: bool
    rank_rtol: float | None
    fire_rate: Float[Tensor, "layer neuron"] = field(repr=False)
    input_rank: Int[np.ndarray, " layer"]
    W_out: Float[Tensor, "layer neuron d_model"] = field(repr=False)
    d_out: int
    in_bias: bool
    gated: bool = False
    precision: torch.dtype = torch.float32
    positions: object = field(repr=False, default=None)
    half_blocks: list[list[list[int]]] | None = None
    input_rank_half: Int[np.ndarray, " layer"] | None = None
    noise_rtol: float | None = None
    input_rank_noise: Int[np.ndarray, " layer"] | None = None
    sample_limited: Bool[np.ndarray, " layer"] | None = None
    input_copy: Int[np.ndarray, "layer neuron"] | None = None
    fire_var: Float[Tensor, "layer neuron"] | None = field(repr=False, default=None)
    n_distinct: int | None = None
    weight_precision: torch.dtype = torch.float64
    _frames: dict = field(repr=False, init=False, default_factory=dict)

    def _disagreements(self, firing_distance: float) -> int:
        """For ReLU, the number of samples on which two neurons at ``firing_distance`` disagree about
        firing. With r ∈ {0, 1} it is exactly k/n; its float64 value E[r_i²] + E[r_j²] − 2E[r_i r_j]
        (means of 0/1 products, merged batch by batch) is off by a few eps64 per merge, far below
        1/(2n) for any n·batches < 10¹⁴, so rounding n·distance recovers k (and 0 means every sample)."""
        return round(firing_distance * self.n_samples)

    def _copies(self, layer: int, neurons: Sequence[int]) -> bool:
        """Whether the neurons read the same input weights bit for bit (``input_copy``): the same
        pre-activation p on every input, so the same r = act(p)/p whatever the activation."""
        return self.input_copy is not None and len({int(self.input_copy[layer][k]) for k in neurons}) == 1

    def _exact_copies(self, layer: int, neurons: Sequence[int]) -> bool:
        """Copies (:meth:`_copies`) whose count :meth:`freedom` gives exactly: any of an exact activation;
        of a smooth one where act(p) lies off the span of act′(p)·x̃ over the samples, as the count's
        correction takes, so where p varies (Var(r) above rounding; a constant p puts act(p) ∝ 1 in that
        span), f is not 0 on every sample (p ≡ 0: act′(0) ≠ 0 still moves W_in, which the count leaves
        out) and the distinct samples outnumber D_in (else x̃ spans them all). Review 56 #2/#3: the
        correction read 31 for the Jacobian's 30 on 16 samples = D_in and on a constant neuron."""
        if not self._copies(layer, neurons):
            return False
        if self.exact_activation:
            return True
        if self.fire_var is None or self.n_distinct is None or int(self.input_rank[layer]) >= self.n_distinct:
            return False
        idx = list(neurons)
        fire_rate = self.fire_rate[layer, idx].to(torch.float64)
        spread = self.fire_var[layer, idx].to(torch.float64)
        floor = 16 * torch.finfo(self.precision).eps ** 2 * (spread + fire_rate**2)
        return bool((self.value_gram[layer][idx, idx] > 0).all() and (spread > floor).all())

    def _block_approximate(self, layer: int, neurons: Sequence[int]) -> bool:
        """A block's freedom is exact for copies counted exactly (:meth:`_exact_copies`; a smooth
        activation's r is shared only there, audit 22a F4) and for an exact activation whose neurons
        agree about firing on every sample."""
        if len(neurons) < 2 or self._exact_copies(layer, neurons):  # a neuron alone has no freedom to approximate
            return False
        return not self.exact_activation or self._disagreements(float(self.firing_distance[layer][np.ix_(neurons, neurons)].max())) > 0

    def _approximate_blocks(self) -> list[tuple[int, list[int]]]:
        return [(layer, b) for layer, blocks in enumerate(self.blocks) for b in blocks
                if len(b) > 1 and self._block_approximate(layer, b)]

    @cached_property
    def distance(self) -> Float[np.ndarray, "layer neuron neuron"]:
        """The distance the blocks are formed from: the larger of ``output_distance`` (3.6a) and
        ``firing_distance``, so that two neurons in one block differ little in what they output and
        (for ReLU) disagree about firing on at most a ``tol`` share of the samples (METHODS §3)."""
        return _neuron_distance(self.output_distance, self.firing_distance)

    def _block_max(self, distance: np.ndarray, blocks: list[tuple[int, list[int]]] | None = None) -> float:
        """Largest entry of ``distance`` between two neurons of one of ``blocks`` (default: every block;
        0 when no block has two)."""
        if blocks is None:
            blocks = [(layer, b) for layer, layer_blocks in enumerate(self.blocks) for b in layer_blocks if len(b) > 1]
        return max((float(distance[layer][np.ix_(b, b)].max()) for layer, b in blocks), default=0.0)

    @property
    def max_block_distance(self) -> float:
        """Largest distance (``distance``) between two neurons of one block (0 when no block has two neurons)."""
        return float(_neuron_distance(self._block_max(self.output_distance), self._block_max(self.firing_distance)))

    @property
    def _has_blocks(self) -> bool:
        return any(len(b) > 1 for blocks in self.blocks for b in blocks)

    @property
    def approximate(self) -> bool:
        """True when some block's freedom is approximate: a block of a smooth activation, or ReLU
        neurons in one block that disagree about firing on some samples (tol > 0); copies
        (``input_copy``) are exact for any activation. False without blocks."""
        return bool(self._approximate_blocks())

    @property
    def approximation(self) -> str:
        """Why the freedom is approximate, for labels ("" when it is exact or there are no blocks): how
        far two neurons' outputs move when they swap firing patterns, √(largest (3.6a)) as a relative RMS."""
        blocks = self._approximate_blocks()
        if not blocks:
            return ""
        change = self._block_max(self.output_distance, blocks)
        moved = (f"two neurons of a block that swapped firing patterns would change their outputs by up to "
                 f"{math.sqrt(change):.2g} RMS (relative)")
        if not self.exact_activation:  # r = act(p)/p is a smooth function of p: no two neurons share it exactly
            return "smooth activation" + (f": {moved}" if change > 0 else "") + f"; {UPPER_ESTIMATE}"
        share = self._disagreements(self._block_max(self.firing_distance, blocks)) / self.n_samples
        return f"firing patterns in blocks differ on up to {share:.2%} of samples; {moved}; {UPPER_ESTIMATE}"

    def block_rank(self, layer: int, neurons: list[int]) -> int:
        """s: rank of the block's post-activations f = r·p on the data (the values W_out reads), by
        the rank rule on their correlations (:func:`balanced_values`, d = 1): scaling a ReLU neuron's
        W_in column by c > 0 and its W_out row by 1/c is the same function, and must not change s
        (audit 10a: relative to the block's largest eigenvalue, c = 10⁻⁶ turned s = 2 into 1)."""
        gram = self.value_gram[layer]
        idx = torch.as_tensor(neurons, device=gram.device)
        return _gram_rank(balanced_values(gram[idx][:, idx], 1).gram, self.precision, self.rank_rtol, gram.shape[-1])

    def freedom(self, layer: int, neurons: list[int]) -> SyncJacobian | None:
        """J_apart and J_sync of the block's W_in columns (with b_in) and W_out rows (METHODS §3,
        corrected). Where the block fires it computes r·Σ_k p_k w_k with p_k = x̃ w̃_k: a bilinear map
        of (W̃_in on the data, W_out), as a block of heads computes A·X·Σ W_V W_O, so
        :func:`component_freedom` with one value group of width 1 per neuron counts it: m
        independent neurons give m² − m (the paper's s_a² − Σ 1), a neuron duplicated as a multiple of
        another gives d_out (only the sum of their output rows matters), neurons that never fire 0.

        W_in meets the input only where the block fires, but D_in is the input's rank over all
        samples (a rank per block would take a D×D Gram per block): j_apart and j_sync are the
        ranks with that D_in, and only their difference is the block's, exactly so when the block's
        W_out rows are independent or it fires on every sample (:meth:`to_frame`'s count_exact).
        None for a gated MLP."""
        if self.gated:
            return None
        idx = torch.as_tensor(neurons, device=self.value_gram.device)
        m = len(neurons)
        gram = self.value_gram[layer][idx][:, idx]
        W_out = self._live_rows(layer, neurons)
        jac = component_freedom(gram, list(range(m)), W_out[:, None, :], [list(range(m))],
                                int(self.input_rank[layer]), self.d_out, self.precision, self.rank_rtol,
                                self.value_gram.shape[-1], weight_precision=self.weight_precision)
        if self.exact_activation or not self._exact_copies(layer, neurons):
            return jac
        # Copies of a smooth activation share p, but act(p) ≠ act'(p)·p: no neuron's rescaling (W̃_in·c,
        # w/c) leaves its output fixed, so J_apart gains one direction per live neuron with a nonzero row,
        # and J_sync one per dimension of those rows' span (act(p)⊗u leaves the W̃_in directions' span):
        # the bilinear count read 30 for the Jacobian's 31 where W_out[5] = 2·W_out[3] (tests).
        nonzero = W_out[W_out.abs().amax(-1) > 0]
        return SyncJacobian(jac.j_apart + len(nonzero),
                            None if jac.j_sync is None else jac.j_sync + (_weight_rank(nonzero, self.weight_precision)
                                                                          if len(nonzero) else 0))

    def _live_rows(self, layer: int, neurons: Sequence[int]) -> Float[Tensor, "neuron d_model"]:
        """The block's effective W_out rows, 0 for a neuron that is 0 on every sample: neither its W_in
        (r = 0) nor its W_out row (f = 0) moves the function, so its row leaves the count (a head whose
        values are 0 keeps W_O: its W_V still moves the output; review 33)."""
        idx = torch.as_tensor(neurons, device=self.value_gram.device)
        fires = (self.value_gram[layer][idx, idx] > 0).to(self.W_out.device)
        return self.W_out[layer][idx.to(self.W_out.device)] * fires[:, None]

    def _input_known(self, layer: int, neurons: list[int]) -> bool:
        """Whether J_apart − J_sync holds for the block's own input rank: it depends on D_in only
        through D_in·(rank of the nonzero W_out rows − rank of their sum map), which vanishes when the
        rows are independent; else the neurons with such rows must fire on every sample (smooth
        activations never vanish). A neuron that never fires has no row (:meth:`_live_rows`), so that
        rescaling it moves nothing (review 55 #2: at c = 10⁻⁷ its raw row outweighed the others').
        The stored rows by float64's rule (at the forward's rule, raw rows lost a duplicate rescaled by
        10⁶, review 54 #2; rows at the neurons' RMS a neuron at 10⁻⁶ of its twin's, review 55 #1)."""
        rows = self._live_rows(layer, neurons)
        keep = rows.abs().amax(-1) > 0
        live = [k for k, on in zip(neurons, keep.tolist()) if on]
        if not self.exact_activation or not live or _weight_rank(rows[keep], self.weight_precision) == len(live):
            return True
        return all(round((1 - float(self.fire_rate[layer, k])) * self.n_samples) == 0 for k in live)

    def to_frame(self, singletons: bool = False) -> pd.DataFrame:
        """One row per block of ≥ 2 neurons (all blocks with ``singletons=True``): layer, neurons,
        size, max pairwise distance, approximate (a smooth activation's neurons that are not copies
        counted exactly, :meth:`_exact_copies`, or neurons that disagree about firing on some samples; a
        neuron alone never is), on_half (the data's even-numbered sequences alone form exactly this
        block; False where blocks still change with the data: fewer samples can only merge ReLU
        blocks at tol 0, so a block's count is then an upper bound), data_limited (the layer's D_in is
        lower on the even-numbered sequences alone: still growing with the data), sample_limited (D_in
        reached the samples' bound below its own: the data's limit), s_block (s, the rank of the
        block's post-activations), count_exact and extra_freedom = J_apart − J_sync (:meth:`freedom`), ≥ 0.

        count_exact is False and extra_freedom <NA> for a gated MLP (:meth:`freedom`) and where J_sync
        has no closed form and the block exceeds DENSE_Y_LIMIT; count_exact is False with the count
        an upper bound where the block's W_out rows are dependent and it fires on only part of the
        samples (the count then takes the input's rank over all samples). extra_freedom_min /
        extra_freedom_max: the smaller and larger of the count at the band's two ends
        (:class:`_RoundingBand`: a half-precision model's rank cut-off and rounding level, a float32
        model's output weights at float64's and float32's rule), else both the count."""
        return self._frame(singletons).copy()

    def _frame(self, singletons: bool) -> pd.DataFrame:
        """:meth:`to_frame`, computed once per ``singletons``: each block's count decomposes its values
        and output weights, and the totals, labels and ``to_dict`` all read the frame."""
        if singletons in self._frames:
            return self._frames[singletons]
        rows = []
        for layer, blocks in enumerate(self.blocks):
            for neurons in blocks:
                if len(neurons) < 2 and not singletons:
                    continue
                sub = np.ix_(neurons, neurons)
                distance = float(_neuron_distance(self.output_distance[layer][sub], self.firing_distance[layer][sub]).max())
                jac = self.freedom(layer, neurons) if len(neurons) > 1 else SyncJacobian(0, 0)
                exact = jac is not None and jac.exact and self._input_known(layer, neurons)
                extra = pd.NA if jac is None or not jac.exact else jac.extra_freedom
                rows.append({"layer": layer, "neurons": tuple(neurons), "size": len(neurons),
                             "max_distance": distance, "approximate": self._block_approximate(layer, neurons),
                             "on_half": _formed_on_half(self.half_blocks, layer, neurons),
                             "data_limited": bool(self.data_limited[layer]),
                             "sample_limited": self.sample_limited is not None and bool(self.sample_limited[layer]),
                             "s_block": self.block_rank(layer, neurons), "count_exact": exact, "extra_freedom": extra})
        columns = ["layer", "neurons", "size", "max_distance", "approximate", "on_half", "data_limited", "sample_limited",
                   "s_block", "count_exact", "extra_freedom"]
        frame = pd.DataFrame(rows, columns=columns).astype({"extra_freedom": "Int64"})
        end = self._other_end()
        frame = self._banded(frame, None if end is None else end._frame(singletons))
        if not self._frames:  # once per result
            self._warn_band("neuron_synchronization", frame)
        inexact = frame[~frame["count_exact"].astype(bool)]
        if len(inexact) and not self._frames:  # once per result
            why = ("a gated MLP's block computes r·Σ_k w_k g_k l_k, quadratic in the input, which the bilinear "
                   "count does not cover: extra_freedom left empty" if self.gated else
                   "J_sync has no closed form beyond DENSE_Y_LIMIT (extra_freedom empty), or the block's W_out rows "
                   "are dependent and it fires on only part of the samples (extra_freedom an upper bound)")
            warn_once(f"neuron_synchronization: {len(inexact)} block(s) without an exact count "
                          f"(first: layer {inexact.iloc[0]['layer']}, {_units_text(inexact.iloc[0]['neurons'])}): {why}",
                          SyncCountWarning, stacklevel=3)
        self._frames[singletons] = frame
        return frame


    @property
    def count_exact(self) -> bool:
        """Whether every block's count is exact (:meth:`to_frame`)."""
        return bool(self._frame(False)["count_exact"].all())

    @property
    def extra_freedom(self) -> int | None:
        """Total extra free directions from synchronized neurons over all layers; None when some
        block's count is not exact."""
        frame = self._frame(False)
        return int(frame["extra_freedom"].sum()) if frame["count_exact"].all() else None

    def __repr__(self) -> str:
        return _sync_repr("NeuronSyncResult", "neuron", self)

    def to_dict(self) -> dict:
        frame = self._frame(False)
        return {"kind": "neuron_synchronization", "tol": self.tol, "n_samples": self.n_samples,
                "act_fn": self.act_fn, "approximate": self.approximate, "approximation": self.approximation,
                "half_precision": self.half_precision, "extra_freedom_band": self.extra_freedom_band,
                "count_exact": bool(frame["count_exact"].all()), "changing_blocks": self.changing_blocks,
                "data_limited_layers": np.flatnonzero(self.data_limited).tolist(),
                "sample_limited_layers": _limited_layers(self.sample_limited), "blocks": frame.to_dict(orient="records")}

    def plot(self):
        """Heatmap of ``distance``, one panel per layer, its colours capped at 1 (pairs far apart reach
        hundreds; those near ``tol`` are what the blocks are made of)."""
        from .plots import plot_distance_heatmaps

        return plot_distance_heatmaps(self.distance, "neuron", f"neuron distance (tol {self.tol})", zmax=1.0)


def neuron_synchronization(
    model,
    data,
    tol: float = 0.05,
    batch_size: int = 16,
    rank_rtol: float | None = None,
    progress: bool = True,
    seq_len: int | None = None,
    skip_bos: bool | None = None,
) -> NeuronSyncResult:
    """Synchronized MLP neurons and the freedom they add (METHODS §3, corrected): neurons whose firing
    patterns r_i = f_i/p_i agree where it matters for their outputs (paper eq. 20).

    Two neurons are compared by what they output (METHODS (3.6a), our reading of eq. 20): the energy
    by which their outputs would change if they swapped firing patterns, relative to their output
    energy, d_ij = (E[p_i² (r_i − r_j)²] + E[p_j² (r_i − r_j)²]) / (E[f_i²] + E[f_j²])
    (``NeuronSyncResult.output_distance``), and by their firing patterns, E[(r_i − r_j)²]
    (``firing_distance``; for ReLU the share of samples on which they disagree about firing). A block
    is a set of neurons within ``tol`` of each other in both. Corrected: the firing distance alone
    let GELU neurons that are mostly off join a block whatever they do where they fire (toy:bytelm's
    154 report blocks at tol 0.05: the most distant pair of each would change its outputs by 122 %
    RMS on swapping patterns, median over blocks), and (3.6a) alone admits ReLU neurons that disagree
    on most samples where their outputs are small. For ReLU a block is exact only when its neurons
    agree about firing on every sample (tol > 0 admits disagreements: labelled ``approximate``, with
    the share of samples); for GELU r = Φ(p), for SiLU r = σ(p), both in (0, 1), and every block is
    ``approximate`` but for copies (bit-identical input weights: one p, so one r, on every input).

    One streaming pass accumulates, per layer, the uncentred float64 Grams E[r rᵀ] and E[f fᵀ], the
    F×F sums of d's numerator and the moments of the MLP input (D×D), so memory is O(L·(F² + D²))
    whatever the amount of data. The Gram of r and the sums are kept apart for the data's even- and
    odd-numbered sequences: the even half's blocks say whether the blocks still change with the
    data (``to_frame``'s on_half), and the halves add up to all of it.

    The extra freedom of a block is J_apart − J_sync (:meth:`NeuronSyncResult.freedom`): from the
    rank s of its post-activations f (E[f fᵀ]), D_in (the rank of the MLP input with the constant
    that b_in multiplies) and its effective W_out rows. The paper's s_a² − Σ 1 is its special case of
    independent neurons; for a neuron duplicated as a multiple of another it would be negative.

    f is ``hook_post`` and p ``hook_pre`` (r = 1 where p = 0). Gated MLPs (post = act(gate)·linear):
    r = act(p)/p of the gate pre-activation p = ``hook_pre`` (from the model's ``act_fn``), and the
    output per unit of firing is p·l with l = ``hook_pre_linear``; their blocks get distances and
    ranks but no count (``NeuronSyncResult.gated``).

    Args:
        tol: distance threshold in [0, 1], for both distances: (3.6a) ≤ 0.05 lets a pair's outputs
            change by up to about 22 % RMS on swapping firing patterns, and for ReLU the two may
            disagree about firing on up to 5 % of the samples.
        rank_rtol: relative eigenvalue cut-off for the activation ranks (s, D_in); default: the
            package's rank rule at activation_precision of the model (``tl_degeneracy.numerics``).
            Weight ranks always use the float64 rule.
        progress: a tqdm bar over the batches (rank 0 only; the TQDM_DISABLE environment variable turns it off).
        skip_bos: ``None`` or ``False``: every non-padding position counts, BOS included, since later
            positions read the BOS position's MLP output (``counts.counted_batches``); ``True`` is refused.

    Raises:
        ValueError: tol outside [0, 1], ``skip_bos=True``, or a gated MLP with an unknown activation function.
        MissingHookError: a model without MLP layers or a findable MLP input. DataError: data without
        tokens. MemoryBudgetError: batches too large for the memory budget (``tld.memory``), before anything runs.
    """
    with failing_together("neuron_synchronization"):
        tol = _check_tol(tol)
        rank_rtol, _ = check_tolerances(rank_rtol)  # before the pass, not at its end
        adapter = adapt(model)
        if adapter.d_mlp is None:
            raise MissingHookError(f"neuron_synchronization needs MLP layers; this {type(adapter.model).__name__} has none")
        adapter.check_finite()  # the counts read W_out, whose row of a neuron that fires on no sample nothing carries
        act_fn = adapter.cfg.act_fn
        gated = adapter.cfg.gated_mlp
        ratio = None
        if gated:
            key = (act_fn or "").lower()
            key = "gelu" if key.startswith("gelu") and key not in _RATIOS else key
            if key not in _RATIOS:
                raise ValueError(f"gated MLP with activation {act_fn!r}: no firing-pattern formula (known: {sorted(_RATIOS)})")
            ratio = _RATIOS[key]
        exact_activation = (act_fn or "").lower() in EXACT_ACTIVATIONS
        L, F, D = adapter.n_layers, adapter.d_mlp, adapter.d_model
        try:
            input_names = [block_input_hook(adapter, layer, "ln2") for layer in range(L)]
        except MissingHookError as e:
            raise MissingHookError(f"neuron_synchronization needs the MLP inputs: {e}") from None
        batches = counted_batches(data, adapter, batch_size, seq_len, skip_bos, "neuron_synchronization")
        check_batches(adapter, "neuron_sync", batches, "neuron_synchronization")  # fail before the first forward
        dev = adapter.device
        pre_names = [adapter.hook_name("mlp_pre", layer) for layer in range(L)]
        linear_names = [f"blocks.{layer}.mlp.hook_pre_linear" for layer in range(L)] if gated else []
        post_names = [adapter.hook_name("mlp_post", layer) for layer in range(L)]
        # The Gram of r and eq. 20's sums, kept apart for the data's even- and odd-numbered sequences: the
        # even half's blocks say whether blocks still change with the data, and the halves add up to all.
        r_acc, r_odd = ([MomentAccumulator(1, F, device=dev) for _ in range(L)] for _ in range(2))
        f_acc = [MomentAccumulator(1, F, device=dev) for _ in range(L)]
        x_acc, x_half = ([MomentAccumulator(1, D, device=dev) for _ in range(L)] for _ in range(2))
        mismatch, mismatch_odd = ([_FiringMismatch.zeros(F, dev) for _ in range(L)] for _ in range(2))

        def on_batch(step: Step) -> None:
            if not step.count:
                return  # the accumulators exist already, with their shapes
            index, flags, pre, linear = step.index, step.flags, {}, {}

            def rows_of(act: Tensor, name: str) -> tuple[Tensor, Tensor]:
                """The sample rows (float64) and which of them the data's even-numbered sequences hold."""
                unit = index.unit(tuple(act.shape), name)
                return index.rows(act.detach(), unit).to(torch.float64), index.half(unit)

            def keep_rows(name: str, into: dict, layer: int):
                def hook(act: Tensor, hook=None) -> None:
                    rows, _ = rows_of(act, name)
                    flags[name] = torch.isfinite(rows).all()
                    into[layer] = rows

                return hook

            def on_post(layer: int):
                def hook(f: Tensor, hook=None) -> None:
                    f, half = rows_of(f, post_names[layer])
                    flags[post_names[layer]] = f_acc[layer].update(f[:, None])
                    p = pre.pop(layer)
                    if ratio is None:
                        # r = f/p, and 1 where p = 0 (METHODS §3); the output per unit of firing is g = p
                        one = torch.ones_like(p)
                        r, g = torch.where(p == 0, one, f / torch.where(p == 0, one, p)), p
                    else:  # gated: f = act(p)·l = r·g with g = p·l
                        r, g = ratio(p), p * linear.pop(layer)
                    odd = ~half
                    r_acc[layer].update(r[half][:, None])
                    r_odd[layer].update(r[odd][:, None])
                    mismatch[layer].update(r[half], g[half])
                    mismatch_odd[layer].update(r[odd], g[odd])

                return hook

            def on_input(layer: int):
                def hook(x: Tensor, hook=None) -> None:
                    rows, half = rows_of(x, input_names[layer])
                    flags[input_names[layer]] = x_acc[layer].update(rows[:, None])
                    x_half[layer].update(rows[half][:, None])

                return hook

            hooks = [(pre_names[l], keep_rows(pre_names[l], pre, l)) for l in range(L)]
            hooks += [(linear_names[l], keep_rows(linear_names[l], linear, l)) for l in range(len(linear_names))]
            hooks += [(post_names[l], on_post(l)) for l in range(L)] + [(input_names[l], on_input(l)) for l in range(L)]
            adapter.run_with_hooks(step.batch.tokens, fwd_hooks=hooks)

        stream(dev, batches, on_batch, desc="neuron_synchronization", progress=progress, what="MLP activation or input",
               reduce=lambda: [*r_acc, *r_odd, *f_acc, *x_acc, *x_half, *(t for m in (*mismatch, *mismatch_odd) for t in m.tensors())])
        if r_acc[0].count + r_odd[0].count == 0 or min(acc.count for acc in x_acc) == 0:
            raise MissingHookError("the MLP hooks did not fire (or no position counted); nothing to compare")
        # Layer by layer, each accumulator let go once read, so that the results replace them in memory.
        output_np, firing_np = (np.empty((L, F, F)) for _ in range(2))
        # The results live on the CPU whatever the model's device (the result's ranks and frames read them there).
        value_gram = torch.empty(L, F, F, dtype=torch.float64, device="cpu")
        fire_rate, fire_var = (torch.empty(L, F, dtype=torch.float64, device="cpu") for _ in range(2))
        half_blocks, blocks = [], []
        for layer in range(L):
            firing_half = _firing_distance(r_acc[layer], exact_activation)
            half_blocks.append(_fast_blocks(_neuron_distance(mismatch[layer].distance(firing_half), firing_half), tol))
            r_acc[layer].merge(r_odd[layer])  # the even half takes in the odd half: all of the data
            mismatch[layer].add_(mismatch_odd[layer])
            firing_np[layer] = _firing_distance(r_acc[layer], exact_activation)
            output_np[layer] = mismatch[layer].distance(firing_np[layer])
            blocks.append(_fast_blocks(_neuron_distance(output_np[layer], firing_np[layer]), tol))
            value_gram[layer], fire_rate[layer] = f_acc[layer].gram()[0].cpu(), r_acc[layer].mean[0].cpu()
            fire_var[layer] = r_acc[layer].covariance()[0].diagonal().cpu()
            n_samples = r_acc[layer].count
            r_acc[layer] = r_odd[layer] = mismatch[layer] = mismatch_odd[layer] = f_acc[layer] = None
        precision = activation_precision(adapter.dtype)
        rtol = None if rank_rtol is None else float(rank_rtol)
        # D_in: W̃ = [W_in; b_in] reads [x, 1], whose uncentred Gram has rank rank(Cov x) + 1; without b_in, x alone
        in_bias = bool(adapter.map_biases(0)["W_in"])
        noise = _rounding_cut(adapter.dtype, rtol)

        def d_in(accs: list[MomentAccumulator], cut: float | None) -> Int[np.ndarray, " layer"]:
            return _input_ranks(adapter, accs, "ln2", in_bias, precision, cut) + int(in_bias)

        input_rank, input_rank_half = d_in(x_acc, rtol), d_in(x_half, rtol)
        norms = [adapter.norm_weights(layer, "ln1") for layer in range(L)]
        weights = adapter.mlp_weights()
        W_out = weights.W_out
        W_out = torch.stack([center_writing(W_out[layer], norms[layer]) for layer in range(L)]).cpu()
        result = NeuronSyncResult(
            output_distance=output_np, firing_distance=firing_np, tol=tol, blocks=blocks, value_gram=value_gram,
            n_samples=n_samples, act_fn=act_fn, exact_activation=exact_activation, rank_rtol=rtol,
            fire_rate=fire_rate, input_rank=input_rank, W_out=W_out,
            d_out=D - int(norms[0].kind == "layernorm"), in_bias=in_bias, gated=bool(gated), precision=precision,
            positions=batches.positions, half_blocks=half_blocks, input_rank_half=input_rank_half, noise_rtol=noise,
            input_rank_noise=None if noise is None else d_in(x_acc, noise),
            sample_limited=_at_sample_count(adapter, input_rank - int(in_bias), batches.n_distinct_samples, centered=in_bias),
            input_copy=_input_copies(weights), fire_var=fire_var, n_distinct=batches.n_distinct_samples,
        )
        if result.half_precision:
            result.to_frame()  # its band's warning now, with the call's others (review 36)
        warn_unsettled("neuron_synchronization", result, batches, "j_apart and j_sync")
        return result


def _input_copies(weights: MLPWeights) -> Int[np.ndarray, "layer neuron"]:
    """Per layer, a label per neuron for its input weights (W_in column and b_in, with W_gate's column
    and b_gate in a gated MLP), equal where they are equal bit for bit: such neurons compute one
    pre-activation on every input (audit 22a F4)."""
    parts = [weights.W_in, weights.b_in[:, None]]
    parts += [t if t.dim() == 3 else t[:, None] for t in (weights.W_gate, weights.b_gate) if t is not None]
    columns = torch.cat(parts, dim=1).transpose(1, 2)  # [layer, neuron, inputs]
    return np.stack([torch.unique(layer, dim=0, return_inverse=True)[1].cpu().numpy() for layer in columns])


def _neuron_distance(output, firing):
    """The distance neuron blocks are formed from (METHODS §3): the larger of (3.6a), how far two
    neurons' outputs would move on swapping firing patterns, and their firing distance E[(r_i − r_j)²]."""
    return np.maximum(output, firing)


def _firing_distance(acc: MomentAccumulator, counts: bool) -> Float[np.ndarray, "neuron neuron"]:
    """E[(r_i − r_j)²] = E[r_i²] + E[r_j²] − 2 E[r_i r_j] of every pair, from the uncentred Gram of r.
    ``counts`` (ReLU: r ∈ {0, 1}): the distance is k/n for the k samples on which the pair disagrees,
    and is returned as exactly that (:meth:`NeuronSyncResult._disagreements`' rounding). The Gram is
    merged batch by batch and rank by rank, which leaves a few eps64 that depend on the batching: two
    neurons firing on the same samples read 2.2·10⁻¹⁶ apart and missed each other at tol = 0 (audit 10b:
    toy:modadd's blocks 89 → 88 with 3 processes or another batch_size)."""
    G = acc.gram()[0]
    diag = G.diagonal()
    dist = (diag[:, None] + diag[None, :] - 2 * G).clamp_min(0)  # rounding can dip below 0
    if counts:
        dist = torch.round(dist * acc.count) / acc.count
    dist.fill_diagonal_(0)
    return dist.cpu().numpy()


@dataclass
class _FiringMismatch:
    """Sums for the output-weighted firing-pattern distance (paper eq. 20, METHODS §3, corrected).

    With g the output per unit of firing (f = r·g: g = p, or p·l in a gated MLP), a neuron j that
    fired with neuron i's pattern would output r_i·g_j, off by g_j (r_i − r_j). ``cross``[i, j] holds
    Σ r_i² g_j² − 2 r_i r_j g_j² and ``energy``[j] Σ f_j² = Σ r_j² g_j², so that
    Σ g_j² (r_i − r_j)² = cross[i, j] + energy[j] comes from two F×F products per batch, whatever the
    amount of data. Plain sums (no count), so the ranks' tensors add up under torchrun."""

    cross: Float[Tensor, "neuron neuron"]
    energy: Float[Tensor, " neuron"]

    @classmethod
    def zeros(cls, width: int, device) -> _FiringMismatch:
        return cls(torch.zeros(width, width, dtype=torch.float64, device=device),
                   torch.zeros(width, dtype=torch.float64, device=device))

    def tensors(self) -> tuple[Tensor, Tensor]:
        return self.cross, self.energy

    def add_(self, other: _FiringMismatch) -> _FiringMismatch:
        self.cross.add_(other.cross)
        self.energy.add_(other.energy)
        return self

    def update(self, r: Float[Tensor, "n neuron"], g: Float[Tensor, "n neuron"]) -> None:
        g2 = g * g
        self.cross.addmm_((r * r).mT, g2).addmm_(r.mT, r * g2, alpha=-2.0)
        self.energy.add_((r * r * g2).sum(0))

    def distance(self, firing: Float[np.ndarray, "neuron neuron"]) -> Float[np.ndarray, "neuron neuron"]:
        """(3.6a): d_ij = (E[g_i² (r_i − r_j)²] + E[g_j² (r_i − r_j)²]) / (E[f_i²] + E[f_j²]), the energy
        by which the pair's outputs would change if the two swapped firing patterns, relative to the
        pair's output energy (it can exceed 1: g is nonzero where a neuron is off). Pairs with
        identical firing patterns (``firing`` = E[(r_i − r_j)²] exactly 0) are at 0 whatever the
        rounding of the two products, and so are two neurons that never output anything (E[f²] = 0
        for both; the blocks take the larger of this and ``firing``, which tells such neurons apart)."""
        num = self.cross + self.energy[None, :]
        num = (num + num.mT).clamp_min(0)  # rounding can dip below 0
        den = self.energy[:, None] + self.energy[None, :]
        dist = torch.where(den > 0, num / torch.where(den > 0, den, 1.0), torch.zeros_like(num)).cpu().numpy()
        dist[firing == 0] = 0.0
        np.fill_diagonal(dist, 0.0)
        return dist


def _fast_blocks(distance: np.ndarray, tol: float) -> list[list[int]]:
    """:func:`synchronized_blocks` for many units: candidates are found with one vectorised
    comparison, and only units with a partner within tol go through the greedy clique cover."""
    close = distance <= tol
    np.fill_diagonal(close, False)
    partnered = np.flatnonzero(close.any(1))
    blocks = [[i] for i in range(distance.shape[0]) if i not in set(partnered.tolist())]
    if len(partnered):
        sub = synchronized_blocks(distance[np.ix_(partnered, partnered)], tol)
        blocks += [[int(partnered[i]) for i in b] for b in sub]
    return sorted(blocks, key=lambda b: b[0])
