"""Streaming float64 moment accumulators (METHODS §0: "all Gram/Jacobian accumulators are float64").

Two accumulators, both over *groups*: a feature vector is viewed as ``[groups, dim]`` and each
group gets its own ``dim × dim`` matrix. ``groups = 1`` is the ordinary case (one D×D Gram); for
the query/key activations of attention, ``groups = n_heads`` keeps only the per-head blocks.

- :class:`MomentAccumulator` — count n, mean μ and centred scatter S = Σ (f − μ)(f − μ)ᵀ of
  activations. Batches are combined with the pairwise update of Chan, Golub & LeVeque (1979)::

      n = n_a + n_b,   δ = μ_b − μ_a,   μ = μ_a + δ n_b / n,   S = S_a + S_b + δ δᵀ n_a n_b / n

  so the covariance S/n never suffers the cancellation of E[f fᵀ] − μ μᵀ (residual streams of
  pretrained LMs have a few directions with means far above their spread); the second moment
  E[f fᵀ] = S/n + μ μᵀ (METHODS §4's G) is exact too.
- :class:`SecondMomentAccumulator` — a weighted sum Σ w g gᵀ and a sample count n, for Jacobian
  Grams K = (1/n) Σ_t E[g_t g_tᵀ] (METHODS §4), where several probe vectors g (each with weight
  1/k) belong to one sample.

Both merge exactly (``merge``) and reduce across ``torch.distributed`` ranks (``all_reduce``), so
any split of the data into batches or processes gives the same result to float64 rounding.
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from ..distributed import all_reduce_sum_

__all__ = ["MomentAccumulator", "SecondMomentAccumulator", "descending_eigvalsh"]


def descending_eigvalsh(m: Float[Tensor, "*groups d d"]) -> Float[Tensor, "*groups d"]:
    """Eigenvalues of symmetric matrices, largest first, in float64 (symmetrised first, so that
    rounding asymmetry in accumulated Grams cannot leak into the spectrum)."""
    m = m.to(torch.float64)
    return torch.linalg.eigvalsh((m + m.mT) / 2).flip(-1)


def _scatter_(s: Tensor, x: Tensor, alpha: float = 1.0) -> None:
    """s[g] += alpha · x[:, g]ᵀ x[:, g] for x [n, groups, dim] (float64), in place, with one (b)mm."""
    if x.shape[1] == 1:
        xg = x[:, 0]
        s[0].addmm_(xg.mT, xg, alpha=alpha)
    else:
        xg = x.transpose(0, 1)  # [groups, n, dim]
        s.baddbmm_(xg.mT, xg, alpha=alpha)


class MomentAccumulator:
    """Count, mean [groups, dim] and centred scatter [groups, dim, dim] of rows, in float64."""

    def __init__(self, groups: int, dim: int, device: torch.device | str | None = None):
        self.groups, self.dim = int(groups), int(dim)
        self.count = 0
        self.mean = torch.zeros(self.groups, self.dim, dtype=torch.float64, device=device)
        self.scatter = torch.zeros(self.groups, self.dim, self.dim, dtype=torch.float64, device=device)

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def update(self, rows: Float[Tensor, "n groups dim"]) -> Bool[Tensor, ""]:
        """Add ``rows`` (any float dtype; converted to float64 on the accumulator's device).

        Returns a 0-d bool tensor, True when every row was finite. It is not read here, so that the
        caller can check all hooks of a batch with one device synchronisation.
        """
        n_b = rows.shape[0]
        if tuple(rows.shape[1:]) != (self.groups, self.dim):
            raise ValueError(f"rows of shape {tuple(rows.shape)}; this accumulator takes [n, {self.groups}, {self.dim}]")
        if n_b == 0:
            return torch.ones((), dtype=torch.bool, device=self.device)
        # Our own float64 copy (copy=True only matters when rows already are float64 on this device:
        # they may be a view of the model's activation), centred in place to save a pass.
        x = rows.detach().to(device=self.device, dtype=torch.float64, copy=True)
        mean_b = x.mean(0)
        finite = torch.isfinite(mean_b).all()  # a NaN or inf in any row reaches the batch mean
        x.sub_(mean_b)
        n_a, n = self.count, self.count + n_b
        _scatter_(self.scatter, x)
        if n_a:
            delta = mean_b - self.mean
            self.scatter.add_(delta[:, :, None] * delta[:, None, :], alpha=n_a * n_b / n)
            self.mean.add_(delta, alpha=n_b / n)
        else:
            self.mean.copy_(mean_b)
        self.count = n
        return finite

    def merge(self, other: MomentAccumulator) -> MomentAccumulator:
        """Add another accumulator's samples to this one (in place; returns self)."""
        if (other.groups, other.dim) != (self.groups, self.dim):
            raise ValueError(f"cannot merge a [{other.groups}, {other.dim}] accumulator into a [{self.groups}, {self.dim}] one")
        if other.count == 0:
            return self
        n_a, n_b = self.count, other.count
        n = n_a + n_b
        mean_b = other.mean.to(self.device)
        delta = mean_b - self.mean
        self.scatter.add_(other.scatter.to(self.device))
        self.scatter.add_(delta[:, :, None] * delta[:, None, :], alpha=n_a * n_b / n)
        self.mean.add_(delta, alpha=n_b / n)
        self.count = n
        return self

    def without(self, part: MomentAccumulator) -> MomentAccumulator:
        """A new accumulator of this one's samples but ``part``'s, which must be among them (the other
        half of a split-half check): the inverse of :meth:`merge`, S_rest = S − S_part −
        n_part·n_rest/n · δδᵀ with δ = μ_part − μ_rest."""
        rest = MomentAccumulator(self.groups, self.dim, device=self.device)
        n, n_p = self.count, part.count
        if not 0 <= n_p <= n:
            raise ValueError(f"cannot take {n_p} samples out of {n}")
        if n_p == n:
            return rest
        mean_p = part.mean.to(self.device)
        rest.count = n - n_p
        rest.mean = (self.mean * n - mean_p * n_p) / rest.count
        delta = mean_p - rest.mean
        rest.scatter = self.scatter - part.scatter.to(self.device) - (n_p * rest.count / n) * (delta[:, :, None] * delta[:, None, :])
        return rest

    def all_reduce(self, group=None) -> MomentAccumulator:
        """Combine the accumulators of all ranks of ``group`` (in place, same result everywhere).

        Two sums, both float64: first n and n·μ give the global mean μ; then each rank shifts its
        scatter to μ, S_r + n_r (μ_r − μ)(μ_r − μ)ᵀ, and those add up to the global scatter
        (the parallel form of the pairwise update, with no cancellation).
        """
        head = torch.cat([torch.tensor([float(self.count)], dtype=torch.float64, device=self.device),
                          (self.mean * self.count).flatten()])
        all_reduce_sum_(head, group)
        n = int(round(float(head[0])))
        if n == 0:
            return self
        mean = (head[1:] / n).view_as(self.mean)
        delta = self.mean - mean
        shifted = self.scatter + self.count * (delta[:, :, None] * delta[:, None, :])
        all_reduce_sum_(shifted, group)
        self.count, self.mean, self.scatter = n, mean, shifted
        return self

    # ------------------------------------------------------------------ read-out
    def covariance(self) -> Float[Tensor, "groups dim dim"]:
        """(1/n) Σ (f − μ)(f − μ)ᵀ per group."""
        return self.scatter / max(self.count, 1)

    def gram(self) -> Float[Tensor, "groups dim dim"]:
        """Second moment E[f fᵀ] = (1/n) Σ f fᵀ per group (METHODS §4's G)."""
        return self.covariance() + self.mean[:, :, None] * self.mean[:, None, :]

    def eigenvalues(self, centered: bool = False) -> Float[Tensor, "groups dim"]:
        return descending_eigvalsh(self.covariance() if centered else self.gram())


class SecondMomentAccumulator:
    """Weighted sum Σ w x xᵀ [groups, dim, dim] in float64 and a separate sample count n."""

    def __init__(self, groups: int, dim: int, device: torch.device | str | None = None):
        self.groups, self.dim = int(groups), int(dim)
        self.count = 0
        self.total = torch.zeros(self.groups, self.dim, self.dim, dtype=torch.float64, device=device)

    @property
    def device(self) -> torch.device:
        return self.total.device

    def update(self, rows: Float[Tensor, "m groups dim"], weight: float = 1.0) -> Bool[Tensor, ""]:
        """Add ``weight · Σ rows rowsᵀ`` (the count is advanced separately with :meth:`add_samples`,
        since several rows — probes — may belong to one sample). Returns the 0-d "all finite" flag."""
        if tuple(rows.shape[1:]) != (self.groups, self.dim):
            raise ValueError(f"rows of shape {tuple(rows.shape)}; this accumulator takes [m, {self.groups}, {self.dim}]")
        if rows.shape[0] == 0:
            return torch.ones((), dtype=torch.bool, device=self.device)
        x = rows.detach().to(device=self.device, dtype=torch.float64)
        finite = torch.isfinite(x.sum(0)).all()
        _scatter_(self.total, x, alpha=weight)
        return finite

    def add_samples(self, n: int) -> None:
        self.count += int(n)

    def merge(self, other: SecondMomentAccumulator) -> SecondMomentAccumulator:
        if (other.groups, other.dim) != (self.groups, self.dim):
            raise ValueError(f"cannot merge a [{other.groups}, {other.dim}] accumulator into a [{self.groups}, {self.dim}] one")
        self.total.add_(other.total.to(self.device))
        self.count += other.count
        return self

    def without(self, part: SecondMomentAccumulator) -> SecondMomentAccumulator:
        """A new accumulator of this one's sum and count but ``part``'s (the inverse of :meth:`merge`)."""
        if not 0 <= part.count <= self.count:
            raise ValueError(f"cannot take {part.count} samples out of {self.count}")
        rest = SecondMomentAccumulator(self.groups, self.dim, device=self.device)
        rest.total = self.total - part.total.to(self.device)
        rest.count = self.count - part.count
        return rest

    def all_reduce(self, group=None) -> SecondMomentAccumulator:
        """Sum totals and counts over the ranks of ``group`` (float64)."""
        count = torch.tensor([float(self.count)], dtype=torch.float64, device=self.device)
        all_reduce_sum_(count, group)
        all_reduce_sum_(self.total, group)
        self.count = int(round(float(count[0])))
        return self

    def gram(self) -> Float[Tensor, "groups dim dim"]:
        """(1/n) Σ w x xᵀ."""
        return self.total / max(self.count, 1)

    def eigenvalues(self) -> Float[Tensor, "groups dim"]:
        return descending_eigvalsh(self.gram())
