"""The engine: the few model operations every analysis drives, for any model.

Which models are which is decided once, by :func:`~tl_degeneracy.models.adapt.model_kind`:

- ``"transformer"`` (TransformerLens models, bundled toys, adapters): the engine is the model's
  :class:`~tl_degeneracy.models.adapter.ModelAdapter` (token inputs, logits out);
- ``"module"`` (any other ``nn.Module``: a theory model, a hooked MLP): the engine is a
  :class:`ModuleEngine` (tensor inputs, tensor outputs).

Both satisfy the :class:`Engine` protocol, so the LLC's targets and the interaction passes run the
same code on either: a forward, a forward with temporary hooks, the parameters that are sampled or
differentiated (``live_parameters``), a functional forward at θ* + Δ over a chain axis
(``perturbed_forward``) and the eval-mode scope every forward runs in (:func:`forward_scope`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .adapt import adapt, model_kind
from .adapter import HookFn, ModelAdapter, forward_scope
from .chains import ChainMap
from .hooks import warn_attached_hooks
from .parameters import LiveParameter, ParameterSet

__all__ = ["Engine", "ModuleEngine", "engine_for", "has_position_axis"]


@runtime_checkable
class Engine(Protocol):
    """What analyses call on a model (module docstring); :class:`ModelAdapter` and
    :class:`ModuleEngine` implement it."""

    model: nn.Module
    #: Why ``torch.compile`` cannot trace ``perturbed_forward`` as one graph ("" where it can).
    compile_obstacle: str

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...

    def eval_mode(self) -> contextlib.AbstractContextManager[None]: ...

    def forward(self, inputs: Tensor) -> Tensor: ...

    def run_with_hooks(self, inputs: Tensor, fwd_hooks: Sequence[tuple[str, HookFn]] = ()) -> Tensor: ...

    def live_parameters(self) -> ParameterSet: ...

    def perturbed_forward(self, deltas: Mapping[str, Tensor], inputs: Tensor, *, chains: bool = False,
                          under: Mapping[str, Tensor] | None = None) -> Tensor: ...


def has_position_axis(inputs: Tensor) -> bool:
    """Whether a plain module's inputs carry a position axis: floating [n, pos, d_in] or integer
    [n, pos] do (every (row, position) is a sample); floating [n, d_in] does not (one sample a row)."""
    return inputs.ndim >= 3 or not inputs.is_floating_point()


class ModuleEngine:
    """The engine of a plain ``nn.Module`` (any model :func:`model_kind` calls ``"module"``).

    ``live_parameters`` are the trainable parameters under their ``named_parameters`` names (a
    shared tensor once); ``perturbed_forward`` evaluates ``torch.func.functional_call`` at
    θ* + Δ, vmapped over the chain axis where the model allows it (:class:`ChainMap`). Hooked
    forwards need a TransformerLens ``HookedRootModule``: inputs without a position axis
    (:func:`has_position_axis`) are *lifted*, so hook functions see each activation [batch, …] as
    [batch, 1, …] (and may return a replacement in that layout) and the output comes back as
    [batch, 1, …], the layout of token models that the statistics passes read.
    """

    compile_obstacle = ""

    def __init__(self, model: nn.Module, device: torch.device | None = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"ModuleEngine needs a torch.nn.Module; got {type(model).__name__}")
        warn_attached_hooks(model)
        self.model = model
        self._device = device
        self._live: ParameterSet | None = None
        self._chain_map = ChainMap()

    def __repr__(self) -> str:
        return f"ModuleEngine({type(self.model).__name__})"

    @property
    def device(self) -> torch.device:
        """Where the parameters live (the device given at construction for a module without any)."""
        p = next(self.model.parameters(), None)
        if p is not None:
            return p.device
        return torch.device("cpu") if self._device is None else torch.device(self._device)

    @property
    def dtype(self) -> torch.dtype:
        p = next(self.model.parameters(), None)
        return p.dtype if p is not None else torch.get_default_dtype()

    def eval_mode(self) -> contextlib.AbstractContextManager[None]:
        """Eval mode, and the model given back as found (:func:`forward_scope`)."""
        return forward_scope(self.model)

    def forward(self, inputs: Tensor) -> Tensor:
        """The unperturbed output, in eval mode."""
        with self.eval_mode():
            return self.model(inputs)

    def run_with_hooks(self, inputs: Tensor, fwd_hooks: Sequence[tuple[str, HookFn]] = ()) -> Tensor:
        """Forward with temporary hooks (a ``HookedRootModule``'s ``run_with_hooks``), in eval mode,
        lifting inputs without a position axis (class docstring)."""
        if not hasattr(self.model, "run_with_hooks"):
            raise TypeError(
                f"{type(self.model).__name__} has no hook points; hooked forwards need a transformer_lens HookedRootModule"
            )
        lift = not has_position_axis(inputs)
        hooks = [(name, _lifted(fn)) for name, fn in fwd_hooks] if lift else list(fwd_hooks)
        with self.eval_mode():
            out = self.model.run_with_hooks(inputs, fwd_hooks=hooks)
        if not isinstance(out, Tensor):
            raise TypeError(f"{type(self.model).__name__}.forward returned a {type(out).__name__}; a tensor output is needed")
        return out.unsqueeze(1) if lift else out

    def live_parameters(self) -> ParameterSet:
        """The trainable parameters, each tensor once, under their ``named_parameters`` names (cached)."""
        if self._live is None:
            self._live = ParameterSet(
                [LiveParameter(n, p, (n,)) for n, p in self.model.named_parameters() if p.requires_grad]
            )
        return self._live

    def perturbed_forward(self, deltas: Mapping[str, Tensor], inputs: Tensor, *, chains: bool = False,
                          under: Mapping[str, Tensor] | None = None) -> Tensor:
        """The output at θ* + Δ, differentiable in Δ (parameters not in ``deltas`` stay at θ*); the
        model itself is never changed. With ``chains=True`` every delta has a leading chain axis C
        and the result is [C, *output], one vmapped call where the model allows it. In eval mode.
        ``under``: tensors read instead of the model's at those paths where no delta applies."""
        live = self.live_parameters()

        def single(ds: Mapping[str, Tensor]) -> Tensor:
            values = {**(under or {}), **{n: live[n].param.detach() + d for n, d in ds.items()}}
            return functional_call(self.model, values, (inputs,), strict=False)

        with self.eval_mode():
            return self._chain_map(single, deltas) if chains else single(deltas)


def _lifted(fn: HookFn) -> HookFn:
    """A hook that shows ``fn`` activations [batch, …] as [batch, 1, …] (and takes replacements back)."""

    def hook(act: Tensor, hook=None):
        out = fn(act.unsqueeze(1), hook)
        return None if out is None else out.squeeze(1)

    return hook


def engine_for(model: nn.Module | ModelAdapter, device: torch.device | None = None) -> Engine:
    """The model's engine: its adapter for a ``"transformer"``, a :class:`ModuleEngine` for a
    ``"module"`` (:func:`model_kind`; ``device`` only places a module without parameters)."""
    if model_kind(model) == "transformer":
        return adapt(model)
    return ModuleEngine(model, device=device)
