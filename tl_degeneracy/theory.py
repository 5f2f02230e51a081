"""Known learning coefficients, the ground truth that the LLC estimator is tested against.

* A regular model with d parameters has λ = d/2.
* A deep linear network f(x) = W_L ⋯ W_1 x with widths (H_0, …, H_L) (H_0 inputs, H_L outputs)
  and a Gaussian-output teacher of rank r has the learning coefficient of Aoyagi (2024),
  :func:`dln_learning_coefficient`. For two layers it reduces to the reduced-rank-regression
  formula of Aoyagi & Watanabe (2005), :func:`rrr_learning_coefficient`. Because
  KL(N(f*, I) ‖ N(f, I)) = ½‖f − f*‖², the *behavioral* LLC of such a network (METHODS §1,
  loss="mse") equals these values (research/llc.md §5b).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction


@dataclass(frozen=True)
class LearningCoefficient:
    """A learning coefficient λ (the RLCT) and its multiplicity m."""

    llc: float
    multiplicity: int

    @property
    def n_eff(self) -> float:
        """Effective parameter count 2λ (METHODS §1)."""
        return 2.0 * self.llc


def regular_learning_coefficient(d: int) -> LearningCoefficient:
    """λ = d/2, multiplicity 1, for a regular (non-singular) model with d parameters."""
    if d < 0:
        raise ValueError(f"d must be ≥ 0; got {d}")
    return LearningCoefficient(d / 2, 1)


def _check_rank(widths: Sequence[int], rank: int) -> None:
    if len(widths) < 2 or any(int(h) != h or h < 1 for h in widths):
        raise ValueError(f"widths must be ≥ 2 positive integers (input, hidden…, output); got {tuple(widths)}")
    if not 0 <= rank <= min(widths):
        raise ValueError(
            f"rank must be in [0, min(widths) = {min(widths)}] (the product of the layers cannot have a larger "
            f"rank); got {rank}"
        )


def dln_learning_coefficient(widths: Sequence[int], rank: int) -> LearningCoefficient:
    """Aoyagi (2024): learning coefficient of a deep linear network at a true map of rank ``rank``.

    With M_i = H_i − r, let S be the set of the k smallest M_i for the smallest k such that
    max_S M < min_{S^c} M, Σ_S M ≥ ℓ·max_S M and Σ_S M < ℓ·min_{S^c} M, with ℓ = k − 1. With
    a = Σ_S M − (⌈Σ_S M/ℓ⌉ − 1)ℓ,

        λ = [−r² + r(H_0 + H_L)]/2 + a(ℓ − a)/(4ℓ) − ℓ(ℓ − 1)/4 · (Σ_S M/ℓ)² + ½ Σ_{i<j∈S} M_i M_j,

    with multiplicity a(ℓ − a) + 1. Computed in exact rational arithmetic.

    Args:
        widths: (H_0, …, H_L): input width, hidden widths, output width.
        rank: rank r of the true (teacher) map W_L ⋯ W_1.
    """
    _check_rank(widths, rank)
    widths = [int(h) for h in widths]
    M = sorted(h - rank for h in widths)
    n = len(M)
    for k in range(2, n + 1):
        S, rest = M[:k], M[k:]
        ell = k - 1
        total = sum(S)
        min_rest = rest[0] if rest else math.inf
        # The three conditions of Aoyagi's theorem; ties between S and S^c are excluded by the first.
        if max(S) < min_rest and total >= ell * max(S) and total < ell * min_rest:
            break
    else:  # Aoyagi proves that some k satisfies the conditions; reaching here would be a bug.
        raise AssertionError(f"no admissible set S for widths {widths}, rank {rank}")
    a = total - (-(-total // ell) - 1) * ell
    pair_sum = sum(S[i] * S[j] for i in range(k) for j in range(i + 1, k))
    lam = (
        Fraction(-rank * rank + rank * (widths[0] + widths[-1]), 2)
        + Fraction(a * (ell - a), 4 * ell)
        - Fraction(ell * (ell - 1), 4) * Fraction(total, ell) ** 2
        + Fraction(pair_sum, 2)
    )
    return LearningCoefficient(float(lam), a * (ell - a) + 1)


def rrr_learning_coefficient(n_in: int, n_hidden: int, n_out: int, rank: int) -> LearningCoefficient:
    """Aoyagi & Watanabe (2005): reduced-rank regression y = B A x, A ∈ R^{H×M}, B ∈ R^{N×H}.

    With M = n_in, H = n_hidden, N = n_out, r = rank:

    * N + r ≤ M + H, M + r ≤ N + H, H + r ≤ M + N:
      λ = [2(H + r)(M + N) − (M − N)² − (H + r)²]/8, m = 1 if M + H + N + r is even;
      λ = [2(H + r)(M + N) − (M − N)² − (H + r)² + 1]/8, m = 2 if odd;
    * M + H < N + r: λ = [HM − Hr + Nr]/2;   N + H < M + r: λ = [HN − Hr + Mr]/2;
    * M + N < H + r: λ = MN/2 (all with m = 1).
    """
    M, H, N, r = n_in, n_hidden, n_out, rank
    _check_rank((M, H, N), r)
    if M + H < N + r:
        return LearningCoefficient((H * M - H * r + N * r) / 2, 1)
    if N + H < M + r:
        return LearningCoefficient((H * N - H * r + M * r) / 2, 1)
    if M + N < H + r:
        return LearningCoefficient(M * N / 2, 1)
    base = 2 * (H + r) * (M + N) - (M - N) ** 2 - (H + r) ** 2
    if (M + H + N + r) % 2 == 0:
        return LearningCoefficient(base / 8, 1)
    return LearningCoefficient((base + 1) / 8, 2)


def two_layer_linear_network(widths: Sequence[int] = (3, 2, 3), rank: int = 1, seed: int = 0):
    """A two-layer linear network x ↦ W2 W1 x (no biases) at a true parameter of rank ``rank``.

    θ* realises a rank-``rank`` product with orthonormal factors and the unused hidden units
    switched off in both layers — the most singular point of the fibre, which training from small
    initialisation finds. With an ``mse`` behavioral loss (½‖Δf‖², the KL of a unit Gaussian
    output) its learning coefficient is :func:`dln_learning_coefficient` (METHODS §1).
    """
    import torch
    from torch import nn

    if len(widths) != 3:
        raise ValueError(f"a two-layer network has widths (input, hidden, output); got {tuple(widths)}")
    n_in, hidden, n_out = widths
    _check_rank(widths, rank)
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(n_in, hidden, bias=False), nn.Linear(hidden, n_out, bias=False))
    q1, _ = torch.linalg.qr(torch.randn(n_in, n_in, generator=g))
    q2, _ = torch.linalg.qr(torch.randn(n_out, n_out, generator=g))
    with torch.no_grad():
        model[0].weight.zero_()
        model[1].weight.zero_()
        model[0].weight[:rank] = q1[:rank]
        model[1].weight[:, :rank] = q2[:, :rank]
    return model
