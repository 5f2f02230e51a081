"""Which coordinates the sampler moves: the flat parameter layout and the selection mask (METHODS §1).

All chains live in one flat tensor δ ∈ R^{C×D} (δ = θ − θ*, D = entries of the sampled parameter
tensors); :class:`ParameterLayout` maps it to and from named, parameter-shaped tensors. A selection
(restricted, weight-refined LLC) is a boolean mask m over the D coordinates: unselected coordinates
never move, and only the selected ones are counted in ``n_params``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from ..models.selection import ParameterSelection, select_parameters


@dataclass(frozen=True)
class ParameterLayout:
    """Where each sampled parameter lives in the flat coordinate vector."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, tensors: Mapping[str, Tensor]) -> ParameterLayout:
        """The layout of ``tensors`` (name → parameter-shaped tensor), in their order."""
        return cls(tuple(tensors), tuple(tuple(t.shape) for t in tensors.values()))

    @property
    def sizes(self) -> list[int]:
        return [math.prod(s) for s in self.shapes]

    @property
    def numel(self) -> int:
        return sum(self.sizes)

    def unflatten(self, flat: Float[Tensor, "chain D"]) -> dict[str, Tensor]:
        parts = torch.split(flat, self.sizes, dim=1)
        return {n: p.reshape(flat.shape[0], *s) for n, p, s in zip(self.names, parts, self.shapes)}

    def flatten(self, tensors: Mapping[str, Tensor]) -> Tensor:
        return torch.cat([tensors[n].reshape(-1) for n in self.names])


@dataclass(frozen=True)
class Selection:
    """The sampled coordinates: the selection as given (``spec``; None for all parameters), the
    layout of the parameter tensors it touches and the mask m over their flat coordinates."""

    spec: tuple[str, ...] | None
    layout: ParameterLayout
    mask: Bool[Tensor, " D"]

    @property
    def n_params(self) -> int:
        """Selected coordinates: the d of the bound λ ≤ d/2."""
        return int(self.mask.sum())


def selection_masks(target, params) -> tuple[tuple[str, ...] | None, dict[str, Tensor]]:
    """Masks (bool, parameter-shaped) of the sampled entries of ``target.star``; all parameters for
    ``params=None``.

    Transformers take every ``select_parameters`` spelling; plain modules take parameter names (or a
    list of them), or a mapping name → bool mask. A ``ParameterSelection`` is accepted for both.
    """
    star = target.star
    if params is None:
        return None, {n: torch.ones_like(t, dtype=torch.bool) for n, t in star.items()}
    if isinstance(params, ParameterSelection):
        return params.spec, {n: m.to(target.device) for n, m in params.masks.items()}
    if target.kind == "transformer":
        sel = select_parameters(target.engine, params)
        return sel.spec, {n: m.to(target.device) for n, m in sel.masks.items()}
    if isinstance(params, Mapping):
        masks = {}
        for n, m in params.items():
            if n not in star:
                raise ValueError(f"no trainable parameter named {n!r}; parameters: {list(star)}")
            m = torch.as_tensor(m, dtype=torch.bool, device=target.device)
            if m.shape != star[n].shape:
                raise ValueError(f"mask for {n!r} has shape {tuple(m.shape)}; the parameter has {tuple(star[n].shape)}")
            masks[n] = m
        return tuple(params), masks
    names = (params,) if isinstance(params, str) else tuple(params)
    unknown = [n for n in names if n not in star]
    if unknown:
        raise ValueError(f"unknown parameter name(s) {unknown}; a plain module's selections are parameter names: {list(star)}")
    return names, {n: torch.ones_like(star[n], dtype=torch.bool) for n in names}


def select_coordinates(target, params) -> Selection:
    """The :class:`Selection` of ``params`` (see :func:`selection_masks`); an empty one is refused."""
    spec, masks = selection_masks(target, params)
    layout = ParameterLayout.of(masks)
    selection = Selection(spec, layout, layout.flatten(masks))
    if selection.n_params == 0:
        raise ValueError("the parameter selection is empty")
    return selection
