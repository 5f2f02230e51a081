"""``adapt(model)``: pick the adapter for a model's backend."""

from __future__ import annotations

from torch import nn

from .adapter import ModelAdapter

SUPPORTED = (
    "transformer_lens.HookedTransformer (TransformerLens 3.x), "
    "transformer_lens.model_bridge.TransformerBridge (TransformerLens 3.x and 4.x, default or "
    "compatibility mode), and the bundled tl_degeneracy toys (tl_degeneracy.models.toys)"
)


def _hooked_transformer_class():
    try:
        from transformer_lens import HookedTransformer  # absent on TL 4.x: ImportError, not AttributeError
    except ImportError:
        return None
    return HookedTransformer


#: Classes (by name, anywhere in the MRO) that ``adapt`` wraps: decided without importing
#: transformer_lens.model_bridge, which pulls in transformers' model zoo (~5 s) just to reject a small MLP.
_ADAPTED_CLASSES = ("TransformerBridge", "HookedTransformer", "ToyModel")


def model_kind(model) -> str:
    """The one answer to "what kind of model is this?" that every analysis asks:

    - ``"transformer"``: a :class:`ModelAdapter`, a bundled toy, a TransformerLens ``HookedTransformer``
      or ``TransformerBridge`` — everything :func:`adapt` wraps (token data, logits);
    - ``"module"``: any other ``torch.nn.Module`` (a theory model, a hooked MLP) — tensor inputs
      and outputs, driven through :class:`~tl_degeneracy.models.engine.ModuleEngine`.

    Raises ``TypeError`` for anything that is not a module.
    """
    if isinstance(model, ModelAdapter):
        return "transformer"
    if isinstance(model, nn.Module):
        names = {c.__name__ for c in type(model).__mro__}
        return "transformer" if names & set(_ADAPTED_CLASSES) else "module"
    raise TypeError(f"expected a torch.nn.Module or a tl_degeneracy adapter; got {type(model).__module__}.{type(model).__name__}")


def adapt(model: nn.Module | ModelAdapter) -> ModelAdapter:
    """Wrap ``model`` in the adapter of its backend; an adapter is returned unchanged.

    Raises ``TypeError`` naming the supported model types for anything else.
    """
    if isinstance(model, ModelAdapter):
        return model
    from .toys.base import ToyModel

    if isinstance(model, ToyModel):
        from .toy_adapter import ToyAdapter

        return ToyAdapter(model)
    # Imported only now: transformer_lens.model_bridge pulls in transformers' model zoo (~5 s).
    from transformer_lens.model_bridge import TransformerBridge

    if isinstance(model, TransformerBridge):
        from .bridge import BridgeAdapter

        return BridgeAdapter(model)
    HookedTransformer = _hooked_transformer_class()
    if HookedTransformer is not None and isinstance(model, HookedTransformer):
        from .hooked_transformer import HookedTransformerAdapter

        return HookedTransformerAdapter(model)
    raise TypeError(f"tl_degeneracy cannot adapt a {type(model).__module__}.{type(model).__name__}; supported: {SUPPORTED}")
