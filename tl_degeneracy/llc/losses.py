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
    """What is kept of the reference outputs: log-probabilities for ``kl``, the outputs for ``mse``.

    Raises:
        ValueError: ``kl`` on outputs with one number per sample, whose softmax is 1 whatever θ (L_B ≡ 0,
            so λ̂ would read 0 ± 0 with advice that cannot help; audit 14a F7).
    """
    if loss == "kl":
        if outputs.shape[-1] == 1:
            raise ValueError(
                "loss='kl' reads the outputs' last axis as the logits of a softmax, and this model gives one "
                "output per sample: its softmax is 1 for every θ, so the KL is 0 everywhere and λ̂ would be 0. Use "
                "loss='mse' (or have the model output one logit per class, e.g. [-z, z] for a binary one)")
        return torch.log_softmax(_promoted(outputs), dim=-1)
    return _promoted(outputs)


def per_sample_loss(
    loss: str, outputs: Float[Tensor, "chain *batch k"], reference: Float[Tensor, "*batch k"]
) -> Float[Tensor, "chain *batch"]:
    """Per-sample divergence of each chain's outputs from the reference (``reference_form``; a
    constant: no gradient flows into it)."""
    if loss == "kl":
        z = _promoted(outputs)
        dtype = torch.promote_types(z.dtype, reference.dtype)
        return _KLToReference.apply(z.to(dtype), reference.detach().to(dtype))
    if loss == "mse":
        return 0.5 * (_promoted(outputs) - reference).square().sum(-1)
    raise ValueError(f"unknown behavioral loss {loss!r}; choose one of {LOSSES}")


class _KLToReference(torch.autograd.Function):
    """KL(p* ‖ softmax(z_c)) = Σ_k p*_k (log p*_k − log softmax(z_c)_k) for each chain c, from the
    logits z [chain, *batch, k] and the reference log-probabilities log p* [*batch, k]; where p* = 0
    (log p* = −inf: masked logits) a term is 0 by convention (computed naively, 0·(−inf) = NaN). A
    NaN reference or output stays NaN, so broken outputs are still caught.

    The values and gradients are those of autograd through the written-out expression
    (:func:`_written_out_kl`), bit for bit on the CPU (tests/test_losses.py; on a GPU a sum over one
    chain's rows may be split differently than over all chains': equal to float rounding). That
    expression keeps about ten tensors of the chains' full output size (each [chain, batch,
    positions, vocabulary]: 0.75 GiB for 4 chains of 8 × 128 tokens of a 49,152-word vocabulary)
    and makes as many passes over them. Here forward and backward run chain by chain in buffers of
    one chain's size, repeating autograd's operations row for row (row-wise operations give the same
    bits on a chain's rows as on the whole tensor): the forward keeps only z, the backward allocates
    only the gradient (BENCHMARKS.md, "behavioral KL: fused against autograd"). Under double backward
    (``create_graph``: the Hessian-vector products of the step-size checks) the backward is
    autograd's own, through the written-out expression.
    """

    @staticmethod
    def forward(ctx, z: Tensor, log_ref: Tensor) -> Tensor:
        zero_mass = log_ref == -torch.inf
        log_ref = torch.where(zero_mass, torch.zeros_like(log_ref), log_ref)
        ref = log_ref.exp()
        out = torch.empty(z.shape[:-1], dtype=z.dtype, device=z.device)
        buf = torch.empty_like(log_ref)
        for c in range(z.shape[0]):
            torch.log_softmax(z[c], -1, out=buf)
            torch.sub(log_ref, buf, out=buf)
            torch.mul(ref, buf, out=buf).masked_fill_(zero_mass, 0.0)
            torch.sum(buf, -1, out=out[c])
        ctx.save_for_backward(z, log_ref, ref, zero_mass)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        z, log_ref, ref, zero_mass = ctx.saved_tensors
        if torch.is_grad_enabled():  # double backward: autograd's graph of the written-out form
            (dz,) = torch.autograd.grad(_written_out_kl(z, log_ref, zero_mass), z, grad_outputs=grad, create_graph=True)
            return dz, None
        # Chain by chain again, into the gradient's rows: autograd's operations on the written-out
        # form (−p*·g through the selection, then log-softmax's backward), row for row.
        dz = torch.empty_like(z)
        logp, dlogp = torch.empty_like(log_ref), torch.empty_like(log_ref)
        for c in range(z.shape[0]):
            torch.log_softmax(z[c], -1, out=logp)
            torch.mul(grad[c, ..., None], ref, out=dlogp).masked_fill_(zero_mass, 0.0).neg_()
            torch.ops.aten._log_softmax_backward_data.out(dlogp, logp, -1, z.dtype, out=dz[c])
        return dz, None


def _written_out_kl(z: Tensor, log_ref: Tensor, zero_mass: Tensor) -> Tensor:
    """Σ_k p*_k (log p*_k − log softmax(z)_k), terms with p*_k = 0 selected out (``log_ref`` is 0
    there: a finite stand-in, so no NaN/inf reaches the backward pass)."""
    logp = torch.log_softmax(z, dim=-1)
    return torch.where(zero_mass, torch.zeros_like(logp), log_ref.exp() * (log_ref - logp)).sum(-1)


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
