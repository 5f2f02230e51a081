"""The hook kinds every adapter names, and how they are laid out (METHODS §0)."""

from __future__ import annotations

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
