"""The hook kinds every adapter names, and how they are laid out (METHODS §0); and the hooks a user
left attached to a model, which run inside every forward an analysis makes."""

from __future__ import annotations

from torch import nn
from torch.nn.utils import prune
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from ..distributed import warn_once

#: Hook kinds that exist once per layer.
LAYER_KINDS: tuple[str, ...] = (
    "resid_pre",
    "resid_mid",
    "resid_post",
    "attn_scores",
    "attn_pattern",
    "q",
    "k",
    "v",
    "z",
    "attn_out",
    "mlp_pre",
    "mlp_post",
    "mlp_out",
)
#: Hook kinds that exist once per model.
MODEL_KINDS: tuple[str, ...] = ("embed", "ln_final")
HOOK_KINDS: tuple[str, ...] = LAYER_KINDS + MODEL_KINDS

#: Kinds whose activations carry a head axis: [batch, pos, head, d_head].
PER_HEAD_KINDS: tuple[str, ...] = ("q", "k", "v", "z")
#: Kinds laid out [batch, head, query_pos, key_pos].
PATTERN_KINDS: tuple[str, ...] = ("attn_scores", "attn_pattern")

#: Legacy TransformerLens names; they work on HookedTransformer and, as aliases, on the bridge.
TL_HOOK_TEMPLATES: dict[str, str] = {
    "resid_pre": "blocks.{layer}.hook_resid_pre",
    "resid_mid": "blocks.{layer}.hook_resid_mid",
    "resid_post": "blocks.{layer}.hook_resid_post",
    "attn_scores": "blocks.{layer}.attn.hook_attn_scores",
    "attn_pattern": "blocks.{layer}.attn.hook_pattern",
    "q": "blocks.{layer}.attn.hook_q",
    "k": "blocks.{layer}.attn.hook_k",
    "v": "blocks.{layer}.attn.hook_v",
    "z": "blocks.{layer}.attn.hook_z",
    "attn_out": "blocks.{layer}.hook_attn_out",
    "mlp_pre": "blocks.{layer}.mlp.hook_pre",
    "mlp_post": "blocks.{layer}.mlp.hook_post",
    "mlp_out": "blocks.{layer}.hook_mlp_out",
    "embed": "hook_embed",
    "ln_final": "ln_final.hook_normalized",
}


#: Where torch keeps a module's hooks.
_HOOK_SLOTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
#: Module names where a backend keeps hooks of its own: a TransformerBridge wires its hook points to
#: the Hugging Face modules it wraps (``…._original_component``) on its first forward.
_BACKEND_MODULES = "_original_component"


def _own_reparametrisation(hook) -> bool:
    """Whether a hook is part of the model: torch's weight_norm, spectral_norm and pruning compute the
    weights in forward pre-hooks, which removing would break (review 36)."""
    return isinstance(hook, (WeightNorm, SpectralNorm, prune.BasePruningMethod))


def attached_hooks(model: nn.Module) -> list[str]:
    """Names of ``model``'s modules ("" is the model itself) with hooks attached that are not part of
    the model (:func:`_own_reparametrisation`) nor a backend's own (:data:`_BACKEND_MODULES`): a
    TransformerLens hook point's, or a torch hook on any module (review 36: one on ``blocks[0].mlp``
    zero-ablated it unseen)."""
    return [name for name, module in model.named_modules() if _BACKEND_MODULES not in name
            and any(not _own_reparametrisation(hook) for slot in _HOOK_SLOTS
                    for hook in (getattr(module, slot, None) or {}).values())]


def warn_attached_hooks(model: nn.Module) -> None:
    """A warning when hooks are attached to ``model`` (audits 14a F12, 14b F6: a leftover ablation
    hook ran inside every statistics pass and SGLD step, and nothing said so)."""
    places = attached_hooks(model)
    if places:
        shown = ", ".join(repr(p) if p else "the model itself" for p in places[:3])
        more = f" and {len(places) - 3} more" if len(places) > 3 else ""
        reset = ("call model.reset_hooks(including_permanent=True) for hook points, and remove torch hooks by their "
                 "handles (.remove())" if hasattr(model, "reset_hooks") else "remove them by their handles (.remove())")
        warn_once(f"this {type(model).__name__} has hooks attached at {shown}{more}: they run inside every forward "
                  "pass of tl_degeneracy's analyses, so the numbers describe the hooked model, not its weights alone; "
                  f"{reset} first to analyse the model itself", RuntimeWarning, stacklevel=4)
