"""The live parameter set of a model: each tensor that reaches the output, once.

``model.parameters()`` is the wrong set for sampling and counting on TransformerBridge models: it
holds dead joint-QKV copies that never receive a gradient (on GPT-2 they even share storage with
the live split q/k/v), and tied tensors appear under several module slots
(research/transformerlens.md §1.6). A parameter is *live* when one backward pass from the logits
gives it a gradient; it is listed once, with every (module, attribute) slot it occupies so that a
functional call can replace all of them together.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import pandas as pd
import torch
from torch import nn

from ..autograd import gradients_enabled


@dataclass(frozen=True)
class LiveParameter:
    """One live tensor. ``name`` is stable across runs and addresses selections;
    ``slots`` are the dotted module paths under which the model stores it."""

    name: str
    param: nn.Parameter = field(repr=False, compare=False)
    slots: tuple[str, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.param.shape)

    @property
    def numel(self) -> int:
        return self.param.numel()


class ParameterSet(Sequence[LiveParameter]):
    """Ordered, de-duplicated live parameters, addressable by name."""

    def __init__(self, params: list[LiveParameter]):
        names = [p.name for p in params]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate parameter names: {sorted(n for n in names if names.count(n) > 1)}")
        self._params = params
        self._by_name = {p.name: p for p in params}

    def __len__(self) -> int:
        return len(self._params)

    def __getitem__(self, key):  # type: ignore[override]
        if isinstance(key, str):
            try:
                return self._by_name[key]
            except KeyError:
                raise KeyError(f"no live parameter named {key!r}; names look like {self.names[:4]}") from None
        return self._params[key]

    def __iter__(self) -> Iterator[LiveParameter]:
        return iter(self._params)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    @property
    def names(self) -> list[str]:
        return [p.name for p in self._params]

    @property
    def numel(self) -> int:
        """The parameter count d of the live set."""
        return sum(p.numel for p in self._params)

    def tensors(self) -> dict[str, nn.Parameter]:
        return {p.name: p.param for p in self._params}

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "name": p.name,
                "shape": p.shape,
                "numel": p.numel,
                "dtype": str(p.param.dtype).removeprefix("torch."),
                "slots": ", ".join(p.slots),
            }
            for p in self._params
        )


def find_live_parameters(
    model: nn.Module,
    loss_fn,
    canonical_name=lambda slot: slot,
) -> ParameterSet:
    """Group the parameters that receive a gradient from ``loss_fn()`` by tensor identity.

    ``loss_fn`` runs a forward pass and returns a scalar that depends on every output.
    ``canonical_name`` maps a slot path to the stable name; the first slot of a tied tensor names it.

    Whether a tensor is live does not depend on ``requires_grad``: frozen parameters
    (``model.requires_grad_(False)``, common before interpretability work) are probed as well, and
    the probe runs under the caller's ``torch.no_grad()`` or ``torch.inference_mode()`` too
    (:func:`~tl_degeneracy.autograd.gradients_enabled`). Each parameter's ``grad`` and
    ``requires_grad`` are given back as they were.
    """
    with gradients_enabled(model):
        saved = {id(p): (p.grad, p.requires_grad) for p in model.parameters()}
        try:
            for p in model.parameters():
                p.grad = None
                p.requires_grad_(p.is_floating_point())  # integer (quantized) tensors cannot have gradients
            loss_fn().backward()
            groups: dict[int, tuple[nn.Parameter, dict[tuple[int, str], str]]] = {}
            for slot, p in nn.Module.named_parameters(model, remove_duplicate=False):
                if p.grad is None:
                    continue
                mod_path, _, attr = slot.rpartition(".")
                key = (id(model.get_submodule(mod_path)), attr)
                groups.setdefault(id(p), (p, {}))[1].setdefault(key, slot)
        finally:
            for p in model.parameters():
                p.grad, requires_grad = saved[id(p)]
                p.requires_grad_(requires_grad)
    params = [
        LiveParameter(name=canonical_name(next(iter(slots.values()))), param=p, slots=tuple(slots.values()))
        for p, slots in groups.values()
    ]
    return ParameterSet(params)


def widened_state(model: nn.Module, live: ParameterSet, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every slot of the live weights, and every floating buffer, narrower than ``dtype``, detached
    and cast to it, keyed by module path as ``functional_call`` takes them ({} when none is).

    A perturbed forward whose perturbations are wider than the weights (a bfloat16 model's SGLD
    chains keep δ in float32, since θ* + δ in bfloat16 would round δ away) reads these instead, so
    that the whole forward runs in that dtype (a bias the backend keeps as a buffer, rotary
    frequencies included)."""
    tensors = [(p.slots, p.param) for p in live] + [((name,), b) for name, b in model.named_buffers() if b is not None]
    cast = {}
    for slots, t in tensors:
        if t.is_floating_point() and t.dtype.itemsize < dtype.itemsize:
            cast.update(dict.fromkeys(slots, t.detach().to(dtype)))
    return cast
