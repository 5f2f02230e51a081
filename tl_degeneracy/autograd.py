"""Autograd for the package's own gradient passes, whatever the caller's grad mode.

TransformerLens notebooks commonly run under ``torch.no_grad()`` and freeze their models
(``requires_grad_(False)``). The passes that need gradients (Jacobian Grams, the live-parameter
probe, the LLC's sampler and curvature) differentiate with respect to activations, perturbation
copies or, in the probe, the weights themselves, never through a graph of the caller's, so each
turns autograd on for its own region (:func:`gradients_enabled`).

``torch.inference_mode()`` is another matter: every tensor made under it is an inference tensor,
which autograd can neither save for backward nor update in place, and an analysis makes its
accumulators before its gradient pass starts. So a gradient analysis called under it is refused
(:func:`refuse_inference_mode`) instead of returning the silently zero Jacobians it used to. What
was made under ``inference_mode`` earlier and is passed in later (token or input tensors) is copied
where autograd needs it (:func:`ordinary`); weights made under it are refused with a message.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

__all__ = ["gradients_enabled", "ordinary", "refuse_inference_mode"]


def ordinary(t: Tensor) -> Tensor:
    """``t`` itself, or an ordinary copy of it where it was made under ``torch.inference_mode()``
    (autograd cannot save such a tensor for backward: token ids indexing the embedding, inputs of
    a linear map, a mask)."""
    if not t.is_inference():
        return t
    with torch.inference_mode(False):  # a clone made inside inference_mode would be one again
        return t.clone()


def refuse_inference_mode(what: str) -> None:
    """RuntimeError when called under ``torch.inference_mode()``, saying that ``what`` takes
    gradients and how to call it instead."""
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            f"{what} takes gradients, and it was called under torch.inference_mode(), whose tensors autograd can "
            "neither differentiate nor update; call it outside torch.inference_mode() (torch.no_grad() and frozen "
            "parameters are fine: the analysis turns gradients on for itself)"
        )


def _refuse_inference_weights(model: nn.Module) -> None:
    """RuntimeError for a model whose parameters were made under ``torch.inference_mode()``."""
    name = next((n for n, p in model.named_parameters() if p.is_inference()), None)
    if name is not None:
        raise RuntimeError(
            f"the weights of this {type(model).__name__} (e.g. {name}) were made under torch.inference_mode(), and "
            "autograd cannot use such tensors, so no gradient can be taken through the model; load or build the model "
            "outside torch.inference_mode()"
        )


@contextlib.contextmanager
def gradients_enabled(model: nn.Module | None = None) -> Iterator[None]:
    """Run the block with autograd on, also inside ``torch.no_grad()`` (and outside
    ``inference_mode`` for what the block makes: the live-parameter probe, which makes all its
    inputs itself, runs under the caller's ``inference_mode`` too).

    ``model``: the model gradients will flow through, refused (RuntimeError saying what to do) where
    its weights were made under ``torch.inference_mode()``.
    """
    if model is not None:
        _refuse_inference_weights(model)
    with torch.inference_mode(False), torch.enable_grad():
        yield
