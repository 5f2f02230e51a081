"""Result objects of the statistics passes: per-hook Gram statistics and their collections.

Every matrix is float64. For hooks with a head axis (q, k, v, z: ``[batch, pos, head, d_head]``)
the feature vector is the flattened ``[head · d_head]`` activation, so the full Gram is the
cross-head Gram and the per-head Grams ``[head, d_head, d_head]`` are its diagonal blocks
(METHODS §3 uses both: per-head value ranks s_h and block ranks s_S).

Rank convention (METHODS §2 "Precision and ranks", §4 "zero means below rtol·max, or below
loss_scale"): the number of eigenvalues λ with λ > max(rtol · λ_max, atol), where rtol defaults to
the package's one rank rule (:mod:`tl_degeneracy.numerics`) for a Gram of vectors computed at the
precision of the pass that produced them: ``activation_precision(dtype)`` of the activations' (or
gradients') dtype, recorded per hook as ``dtype``.
"""

from __future__ import annotations

import abc

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from ..data import Positions
from ..numerics import (HALF_DTYPES, activation_precision, covariance_floor, numerical_rank,  # numerical_rank re-exported: tl_degeneracy.stats
                        rank_rtol, sample_limited)
from .accumulators import descending_eigvalsh

__all__ = ["ActivationStats", "HookStats", "JacobianHookStats", "JacobianStats", "numerical_rank"]


def _blocks(m: Float[Tensor, "D D"], heads: int) -> Float[Tensor, "heads d d"]:
    d = m.shape[-1] // heads
    return torch.stack([m[h * d : (h + 1) * d, h * d : (h + 1) * d] for h in range(heads)])


@dataclass(eq=False)
class _GramStats(abc.ABC):
    """Shared read-out of one hook's Gram statistics (full and per head)."""

    name: str
    kind: str | None
    layer: int | None
    count: int
    unit: str  # "position": one sample per counted token position; "sequence": one per sequence
    feature_shape: tuple[int, ...]
    #: dtype of the activations (gradients) as the forward (backward) pass produced them; the rank
    #: rule's precision is ``activation_precision(dtype)`` (METHODS §2, numerics module docstring).
    dtype: torch.dtype = torch.float32
    #: Of ``count``, the samples that can differ (``TokenBatches.distinct``: every sequence's counted
    #: BOS is one sample); None: all ``count`` are taken as distinct (Jacobian Grams, whose rank the
    #: samples do not bound, and the half-data statistics, whose sample limit nothing reads).
    distinct: int | None = None

    @property
    def n_distinct(self) -> int:
        return self.count if self.distinct is None else self.distinct

    @property
    def dim(self) -> int:
        return math.prod(self.feature_shape)

    @property
    def n_heads(self) -> int | None:
        return self.feature_shape[0] if len(self.feature_shape) == 2 else None

    @property
    def precision(self) -> torch.dtype:
        """The precision of the rank rule for these Grams: ``activation_precision(dtype)``."""
        return activation_precision(self.dtype)

    @property
    @abc.abstractmethod
    def has_full(self) -> bool:
        """Whether the full [D, D] matrix was accumulated (not only per-head blocks)."""

    @abc.abstractmethod
    def _matrix(self, centered: bool | None) -> Tensor:
        """The full [D, D] matrix."""

    @abc.abstractmethod
    def _head_matrix(self, centered: bool | None) -> Tensor:
        """The per-head [H, d, d] blocks."""

    def _need_heads(self) -> int:
        if self.n_heads is None:
            raise ValueError(f"hook {self.name!r} has no head axis (features {self.feature_shape}); per-head statistics exist for q, k, v, z")
        return self.n_heads

    def eigenvalues(self, centered: bool | None = None) -> Float[Tensor, " D"]:
        """Eigenvalues of the full Gram, largest first."""
        return descending_eigvalsh(self._matrix(centered))

    def head_eigenvalues(self, centered: bool | None = None) -> Float[Tensor, "head d_head"]:
        """Eigenvalues of each head's Gram, largest first."""
        return descending_eigvalsh(self._head_matrix(centered))

    def rank(self, rtol: float | None = None, atol: float = 0.0, centered: bool | None = None) -> int:
        """Numerical rank of the full Gram: eigenvalues above max(rtol·λ_max, atol); ``rtol``
        defaults to the rank rule for a [dim, dim] Gram at :attr:`precision`, which also leaves out
        a covariance's rounding (``numerics.covariance_floor``)."""
        floor = self._rounding_floor(centered, heads=False) if rtol is None else 0.0
        return int(numerical_rank(self.eigenvalues(centered), self.dim, precision=self.precision, gram=True,
                                  rtol=rtol, atol=max(atol, floor)))

    def head_ranks(self, rtol: float | None = None, atol: float = 0.0, centered: bool | None = None) -> Tensor:
        """Numerical rank of each head's [d_head, d_head] Gram (rule as in :meth:`rank`)."""
        ev = self.head_eigenvalues(centered)
        floors = self._rounding_floor(centered, heads=True) if rtol is None else [0.0] * len(ev)
        return torch.stack([numerical_rank(e, len(e), precision=self.precision, gram=True, rtol=rtol,
                                           atol=max(atol, f)) for e, f in zip(ev, floors)])

    def _rounding_floor(self, centered: bool | None, heads: bool) -> float | list[float]:
        """The rounding of a covariance of these activations (per head where ``heads``); 0 for an
        uncentred Gram, whose rule sits above it already."""
        return [0.0] * (self.n_heads or 1) if heads else 0.0

    def trace(self, centered: bool | None = None) -> float:
        if self.has_full:
            return float(self._matrix(centered).diagonal().sum())
        return float(self._head_matrix(centered).diagonal(dim1=-2, dim2=-1).sum())

    def rtol_of(self, dim: int, rtol: float | None = None) -> float:
        """The relative cut-off a ``dim``-wide Gram's rank uses: ``rtol``, or the rule's at :attr:`precision`."""
        return rank_rtol(dim, self.precision, gram=True) if rtol is None else float(rtol)

    def limited_by_samples(self, rank: int, dim: int) -> bool | None:
        """Whether ``rank`` (of a ``dim``-wide Gram) may be the data's limit (``numerics.sample_limited``);
        None where the sample count does not bound it (Jacobian Grams)."""
        return None

    def summary(self, rtol: float | None = None) -> dict:
        """The hook's rank with what it rests on (audit 14b F5: 6 of 32 on 6 samples, with no word):
        the cut-off ``rtol`` used, ``half_precision`` (a bfloat16/float16 forward: an upper bound,
        numerics) and ``sample_limited`` (:meth:`limited_by_samples`)."""
        rank = self.rank(rtol) if self.has_full else None
        return {
            "hook": self.name,
            "kind": self.kind,
            "layer": self.layer,
            "unit": self.unit,
            "dim": self.dim,
            "count": self.count,
            "distinct": self.n_distinct,
            "rank": rank,
            "rtol": self.rtol_of(self.dim, rtol),
            "half_precision": self.dtype in HALF_DTYPES,
            "sample_limited": None if rank is None else self.limited_by_samples(rank, self.dim),
            "trace": self.trace(),
        }


@dataclass(eq=False)
class HookStats(_GramStats):
    """Activation statistics of one hook point (METHODS §4: G = (1/n) Σ f fᵀ).

    ``mean`` [D], ``gram`` = E[f fᵀ] [D, D], ``covariance()`` = E[(f − μ)(f − μ)ᵀ], ``count`` = n.
    ``centered`` is the default of :meth:`eigenvalues` / :meth:`rank` (set by
    ``activation_stats(center=...)``). Per-head views: ``head_mean`` [H, d], ``head_gram`` and
    ``head_covariance()`` [H, d, d]. For q and k with ``per_head=True`` only the per-head blocks
    were accumulated, so ``gram`` is unavailable (``has_full`` is False).
    """

    mean: Tensor = field(repr=False, default=None)
    centered: bool = False
    cov: Tensor | None = field(repr=False, default=None)  # [D, D]
    head_cov: Tensor | None = field(repr=False, default=None)  # [H, d, d], per-head-only accumulation
    half: HookStats | None = field(repr=False, default=None)  # the data's even-numbered sequences alone

    def limited_by_samples(self, rank: int, dim: int) -> bool:
        return sample_limited(rank, self.n_distinct, dim, centered=self.centered)

    @property
    def has_full(self) -> bool:
        return self.cov is not None

    @property
    def gram(self) -> Float[Tensor, "D D"]:
        """Uncentred second moment E[f fᵀ], float64."""
        return self.covariance() + torch.outer(self.mean, self.mean)

    def covariance(self) -> Float[Tensor, "D D"]:
        if self.cov is None:
            raise ValueError(
                f"only per-head Grams were accumulated for {self.name!r} (per_head=True for {self.kind} "
                "activations); use .head_gram / .head_covariance(), or activation_stats(..., per_head=False)"
            )
        return self.cov

    @property
    def head_mean(self) -> Float[Tensor, "head d_head"]:
        return self.mean.view(self._need_heads(), -1)

    def head_covariance(self) -> Float[Tensor, "head d_head d_head"]:
        heads = self._need_heads()
        return self.head_cov if self.head_cov is not None else _blocks(self.cov, heads)

    @property
    def head_gram(self) -> Float[Tensor, "head d_head d_head"]:
        mu = self.head_mean
        return self.head_covariance() + mu[:, :, None] * mu[:, None, :]

    def _matrix(self, centered):
        centered = self.centered if centered is None else centered
        return self.covariance() if centered else self.gram

    def _head_matrix(self, centered):
        centered = self.centered if centered is None else centered
        return self.head_covariance() if centered else self.head_gram

    def _rounding_floor(self, centered, heads):
        """Each activation is rounded relative to itself, mean included (audit 21b F1)."""
        if not (self.centered if centered is None else centered):
            return super()._rounding_floor(centered, heads)
        if heads:
            return [covariance_floor(self.precision, g.diagonal()) for g in self.head_gram]
        return covariance_floor(self.precision, self.gram.diagonal())


@dataclass(eq=False)
class JacobianHookStats(_GramStats):
    """Jacobian Gram of one hook point (METHODS §4): K = (1/n) Σ_t E[g_t g_tᵀ], float64.

    ``gram`` [D, D] (unavailable for q/k with ``per_head=True``), ``head_gram`` [H, d, d].
    """

    full: Tensor | None = field(repr=False, default=None)
    head_full: Tensor | None = field(repr=False, default=None)
    halves: tuple[Tensor, ...] | None = field(repr=False, default=None)
    half: JacobianHookStats | None = field(repr=False, default=None)  # the data's even-numbered sequences alone

    @property
    def has_full(self) -> bool:
        return self.full is not None

    def half_grams(self, head: bool = False) -> tuple[Tensor, ...] | None:
        """The Grams of the two halves of each batch's probes (``jacobian_stats(..., halves=True)``;
        the first half's alone with ``halves="first"``),
        laid out as :attr:`gram` (or :attr:`head_gram` with ``head``); None where they were not
        accumulated (exact Grams, fewer than two probes). Every probe gradient g = Jᵀu lies in the
        range of K, so a probe Gram's rank is a lower bound of K's: halves whose ranks fall short of
        the whole estimate's say that more probes would still find directions."""
        if self.halves is None:
            return None
        if not head:
            return self.halves if self.head_full is None else None
        heads = self._need_heads()
        return self.halves if self.head_full is not None else tuple(_blocks(h, heads) for h in self.halves)

    @property
    def gram(self) -> Float[Tensor, "D D"]:
        if self.full is None:
            raise ValueError(
                f"only per-head Jacobian Grams were accumulated for {self.name!r} (per_head=True for {self.kind}); "
                "use .head_gram, or jacobian_stats(..., per_head=False)"
            )
        return self.full

    @property
    def head_gram(self) -> Float[Tensor, "head d_head d_head"]:
        heads = self._need_heads()
        return self.head_full if self.head_full is not None else _blocks(self.full, heads)

    def _matrix(self, centered):
        return self.gram

    def _head_matrix(self, centered):
        return self.head_gram


class _Collection(Mapping):
    """Hook name → per-hook statistics; also indexable by ``(kind, layer)`` or a model-level kind."""

    stats: dict

    def __getitem__(self, key):
        if isinstance(key, tuple):
            kind, layer = key
            for s in self.stats.values():
                if s.kind == kind and s.layer is not None and s.layer % self.n_layers == layer % self.n_layers:
                    return s
            raise KeyError(f"no statistics for kind {kind!r} at layer {layer}; hooks: {list(self.stats)}")
        if key in self.stats:
            return self.stats[key]
        matches = [s for s in self.stats.values() if s.kind == key]
        if len(matches) == 1:
            return matches[0]
        raise KeyError(f"no statistics for {key!r}; hooks: {list(self.stats)}")

    def __iter__(self) -> Iterator[str]:
        return iter(self.stats)

    def __len__(self) -> int:
        return len(self.stats)

    @property
    def hooks(self) -> list[str]:
        return list(self.stats)

    def to_frame(self, rtol: float | None = None, per_head: bool = False) -> pd.DataFrame:
        """One row per hook (hook, kind, layer, unit, dim, count, distinct (the samples that can differ),
        rank at ``rtol``, the rtol used,
        half_precision, sample_limited, trace: ``summary``); with ``per_head=True`` one row per
        (hook, head) for hooks with a head axis. ``rtol=None``: each hook's rank rule (:meth:`HookStats.rank`)."""
        rows = []
        for s in self.stats.values():
            if per_head and s.n_heads is not None:
                ranks = s.head_ranks(rtol)
                traces = s._head_matrix(None).diagonal(dim1=-2, dim2=-1).sum(-1)
                d = s.feature_shape[1]
                for h in range(s.n_heads):
                    rows.append({**s.summary(rtol), "head": h, "dim": d, "rank": int(ranks[h]),
                                 "rtol": s.rtol_of(d, rtol),
                                 "sample_limited": s.limited_by_samples(int(ranks[h]), d), "trace": float(traces[h])})
            else:
                rows.append(s.summary(rtol))
        frame = pd.DataFrame(rows)
        for col in ("layer", "rank", "head"):  # integers with gaps (model-level hooks, q/k ranks)
            if col in frame:
                frame[col] = frame[col].astype("Int64")
        return frame


@dataclass(eq=False)
class ActivationStats(_Collection):
    """Streaming activation statistics (``activation_stats``): hook name → :class:`HookStats`.

    ``positions`` records which positions counted (METHODS §0); ``n_batches`` the batches seen
    (over all ranks); ``world_size`` the number of processes that shared them.
    """

    stats: dict[str, HookStats]
    positions: Positions
    n_layers: int
    centered: bool = False
    per_head: bool = True
    n_batches: int = 0
    world_size: int = 1

    def to_dict(self, rtol: float | None = None) -> dict:
        return {
            "kind": "activation_stats",
            "centered": self.centered,
            "per_head": self.per_head,
            "n_batches": self.n_batches,
            "world_size": self.world_size,
            "positions": self.positions.to_dict(),
            "hooks": self.to_frame(rtol).to_dict(orient="records"),
        }


@dataclass(eq=False)
class JacobianStats(_Collection):
    """Jacobian-probe Grams (``jacobian_stats``): hook name → :class:`JacobianHookStats`.

    ``output``: ``"kl"`` (Fisher-weighted, logits) or ``"mse"``; ``output_hook``: the hook whose
    activation was the output for ``mse`` (None: logits). ``n_probes`` per batch, or ``exact``.
    """

    stats: dict[str, JacobianHookStats]
    positions: Positions
    n_layers: int
    output: str
    output_hook: str | None
    n_probes: int | None
    exact: bool
    seed: int
    n_batches: int = 0
    world_size: int = 1
    output_unit: str = "position"

    def to_dict(self, rtol: float | None = None) -> dict:
        return {
            "kind": "jacobian_stats",
            "output": self.output,
            "output_hook": self.output_hook,
            "output_unit": self.output_unit,
            "n_probes": self.n_probes,
            "exact": self.exact,
            "seed": self.seed,
            "n_batches": self.n_batches,
            "world_size": self.world_size,
            "positions": self.positions.to_dict(),
            "hooks": self.to_frame(rtol).to_dict(orient="records"),
        }

    def to_frame(self, rtol: float | None = None, per_head: bool = False) -> pd.DataFrame:
        """As for activation statistics (one row per hook: hook, kind, layer, unit, dim, count, rank,
        trace), and ``estimated``: True where K came from random probes (``n_probes`` per sample)
        rather than one backward pass per output entry. A probed K̂ spans part of K's range (each
        probe's gradient lies in it), so its rank is a lower bound on K's, and its trace an unbiased
        estimate of K's (audit 13b: rank 82 from 8 probes where K's is 118); ``exact=True`` gives K."""
        frame = super().to_frame(rtol, per_head)
        return frame.assign(estimated=not self.exact, n_probes=pd.array([self.n_probes] * len(frame), dtype="Int64"))
