"""Behavioral losses against reference outputs (METHODS §1).

Both losses are means over samples (every counted position of the whole dataset, METHODS §0) of a
per-sample divergence between the perturbed model's output f_θ(x) and the reference output f_θ*(x);
both vanish, with their gradient, at θ = θ*, so the LLC estimator needs no baseline estimate
(L_B(θ*) = 0 exactly).

* ``kl``:  KL(p_θ*(·|x) ‖ p_θ(·|x)) with p = softmax(outputs) over the last axis.
* ``mse``: ½‖f_θ(x) − f_θ*(x)‖² over the last axis. The factor ½ makes it the KL divergence
  between unit-variance Gaussians N(f_θ*(x), I) and N(f_θ(x), I), so the behavioral LLC of a
  Gaussian-output model (e.g. a deep linear network) is the learning coefficient of theory.py.
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float
from torch import Tensor

LOSSES = ("kl", "mse")


def _promoted(x: Tensor) -> Tensor:
    """``x`` in at least float32: half precision is lifted (its rounding would swamp L_B near θ*),
    float64 is kept (a float64 model's tiny perturbations must not be rounded away in float32)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def reference_form(loss: str, outputs: Float[Tensor, "*batch k"]) -> Tensor:
    """What is kept of the reference outputs: log-probabilities for ``kl``, the outputs for ``mse``."""
    if loss == "kl":
        return torch.log_softmax(_promoted(outputs), dim=-1)
    return _promoted(outputs)


def per_sample_loss(
    loss: str, outputs: Float[Tensor, "chain *batch k"], reference: Float[Tensor, "*batch k"]
) -> Float[Tensor, "chain *batch"]:
    """Per-sample divergence of each chain's outputs from the reference (``reference_form``)."""
    if loss == "kl":
        logp = torch.log_softmax(_promoted(outputs), dim=-1)
        # Σ p* (log p* − log p). Where the reference puts zero mass (log p* = −inf, e.g. masked
        # logits) the term is 0 by convention; computed naively it is 0·(−inf) = NaN, so those
        # entries are selected out (with a finite stand-in so no NaN/inf reaches the backward pass).
        # Only −inf is selected out: a NaN reference stays NaN, so broken outputs are still caught.
        zero_mass = reference == -torch.inf
        ref = torch.where(zero_mass, torch.zeros_like(reference), reference)
        terms = torch.where(zero_mass, torch.zeros_like(logp), ref.exp() * (ref - logp))
        return terms.sum(-1)
    if loss == "mse":
        return 0.5 * (_promoted(outputs) - reference).square().sum(-1)
    raise ValueError(f"unknown behavioral loss {loss!r}; choose one of {LOSSES}")


def masked_sum(
    values: Float[Tensor, "chain *batch"], mask: Bool[Tensor, "*batch"] | None
) -> Float[Tensor, " chain"]:
    """Sum over all sample axes (or over the samples where ``mask`` is true), one value per chain.

    A sum, not a mean: the dataset's L_B is a mean over every counted position of all batches
    (METHODS §1), so a batch contributes its sum and the division is by positions counted across
    batches (``Target.loss_on``), never by the batch's own count.
    """
    flat = values.flatten(1)
    if mask is None:
        return flat.sum(1)
    return (flat * mask.flatten().to(flat.dtype)).sum(1)
