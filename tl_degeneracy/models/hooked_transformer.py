"""Adapter for TransformerLens 3.x ``HookedTransformer`` (backend ``"hooked_transformer"``).

HookedTransformer's parameters *are* the TransformerLens-layout tensors (``blocks.0.attn.W_Q`` is an
``nn.Parameter`` of shape [n_heads, d_model, d_head]), so weights need no re-layout and the
parameter names are HookedTransformer's own (``embed.W_E``, ``blocks.0.ln1.w``,
``blocks.0.attn.W_Q``, ``blocks.0.attn._W_K`` under GQA, ``unembed.W_U``, ``unembed.b_U``).

Two differences from the Hugging Face checkpoint the model was converted from change the live
parameter count d (research/transformerlens.md §1.6), and results record the backend for that
reason:

- **Zero biases.** HookedTransformer gives every layer ``b_Q``, ``b_K``, ``b_V``, ``b_O``, ``b_in``,
  ``b_out`` and the unembedding ``b_U``, also where the checkpoint has none (Llama: all of them;
  GPT-2 and NeoX: only ``b_U``). They are trainable parameters initialised to zero, they receive
  gradients, and so they count as live.
- **Untied unembedding.** HookedTransformer never ties ``W_U`` to ``W_E``; a tied checkpoint
  (GPT-2) gets an independent copy, adding d_model·d_vocab parameters.

Under grouped-query attention the stored key/value tensors are ``attn._W_K``/``_W_V``/``_b_K``/``_b_V``
with n_kv heads; the ``W_K``/``W_V`` properties are expanded copies. The adapter hands out the
stored n_kv tensors (the base class expands them where a per-head view is wanted).

:class:`LegacyHookNames` is shared with the bridge adapter: both backends accept the legacy
TransformerLens hook names.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from ..errors import MissingHookError
from .adapter import ModelAdapter
from .config import ModelConfig
from .hooks import MODEL_KINDS, TL_HOOK_TEMPLATES

#: TransformerLens normalization types → the normalization operation (the "Pre" variants are the
#: same operation with the affine part folded into the next linear map).
NORMALIZATION = {"LN": "LN", "LNPre": "LN", "RMS": "RMS", "RMSPre": "RMS", None: None}

_MLP_KINDS = ("mlp_pre", "mlp_post", "mlp_out")


class LegacyHookNames:
    """Hook kinds → the legacy TransformerLens names (``blocks.{layer}.hook_resid_pre`` ...).

    HookedTransformer registers them directly; TransformerBridge registers them as aliases of its
    ``hook_in``/``hook_out`` names in default and compatibility mode alike. A kind is available
    when its layer-0 (or model-level) name is in the model's ``hook_dict``; otherwise
    :class:`MissingHookError` says why, e.g. parallel attention/MLP blocks have no ``resid_mid``.

    For gated MLPs ``mlp_pre`` is ``mlp.hook_pre`` = x·W_gate, the argument of the activation
    function, on both backends (the bridge aliases it to ``mlp.gate.hook_out``); the linear branch
    x·W_in is ``mlp.hook_pre_linear``, reachable by its exact name.
    """

    model: object
    cfg: ModelConfig

    def _hook_names_now(self) -> set[str]:
        return set(getattr(self.model, "hook_dict", {}))

    def _hook_template(self, kind: str) -> str:
        template = TL_HOOK_TEMPLATES[kind]
        probe = template if kind in MODEL_KINDS else template.format(layer=0)
        if probe in self._hook_names_now():
            return template
        raise MissingHookError(self._missing_hook_reason(kind, probe))

    def _missing_hook_reason(self, kind: str, name: str) -> str:
        model = type(self.model).__name__
        if kind == "resid_mid" and self.cfg.parallel_attn_mlp:
            return (
                f"this {model} has parallel attention and MLP blocks (parallel_attn_mlp=True, as in "
                f"GPT-NeoX/Pythia/GPT-J): both read resid_pre and add to resid_post, so there is no "
                f"residual stream between them and no {name!r} hook; use resid_pre or resid_post"
            )
        if kind in _MLP_KINDS and self.cfg.d_mlp is None:
            return f"this {model} is attention-only: it has no MLP, so no {kind!r} hook ({name!r})"
        if kind == "ln_final" and self.cfg.normalization is None:
            return f"this {model} has no final normalization layer, so no {name!r} hook"
        return f"this {model} has no {name!r} hook point (hook kind {kind!r})"


#: HookedTransformer settings that change the shapes of its hooks, not what it computes → the call
#: that turns each off (TransformerLens reads them at every forward).
_RESHAPING_OPTIONS = {
    "use_split_qkv_input": ("ln1's hooks carry one copy of the attention input per head [batch, pos, head, d_model]",
                            "model.set_use_split_qkv_input(False)"),
    "use_attn_in": ("ln1's hooks carry one copy of the attention input per head [batch, pos, head, d_model]",
                    "model.set_use_attn_in(False)"),
    "ungroup_grouped_query_attention": ("hook_k and hook_v carry n_heads expanded copies of the n_key_value_heads "
                                       "key/value heads", "model.set_ungroup_grouped_query_attention(False)"),
}


def _refuse_reshaped_hooks(cfg) -> None:
    """ValueError for a HookedTransformer run with a setting of :data:`_RESHAPING_OPTIONS`: the
    analyses read those hooks as the block input and the n_kv key/value heads, and would crash on the
    shapes or, worse, count expanded copies as heads."""
    for option, (what, fix) in _RESHAPING_OPTIONS.items():
        if getattr(cfg, option, False):
            raise ValueError(
                f"this HookedTransformer runs with {option}=True: {what}, which tl_degeneracy's analyses do not read. "
                f"Call {fix} first; it changes only the hooks, not what the model computes"
            )


class HookedTransformerAdapter(LegacyHookNames, ModelAdapter):
    """Adapter over a TransformerLens 3.x ``HookedTransformer`` (see the module docstring for the
    parameter set: HookedTransformer's names, its zero biases and its untied ``W_U``)."""

    backend = "hooked_transformer"
    gated_bias_after_product = True  # GatedMLP: act(x W_gate) ⊙ (x W_in) + b_in

    def _read_config(self) -> ModelConfig:
        c = self.model.cfg
        _refuse_reshaped_hooks(c)
        tokenizer = getattr(self.model, "tokenizer", None)
        return ModelConfig(
            n_layers=c.n_layers,
            n_heads=c.n_heads,
            n_kv_heads=c.n_key_value_heads or c.n_heads,
            d_model=c.d_model,
            d_head=c.d_head,
            d_mlp=None if c.attn_only or c.d_mlp is None else c.d_mlp,
            d_vocab=c.d_vocab,
            n_ctx=c.n_ctx,
            act_fn=c.act_fn,
            normalization=NORMALIZATION.get(c.normalization_type, c.normalization_type),
            parallel_attn_mlp=bool(c.parallel_attn_mlp),
            gated_mlp=bool(c.gated_mlp),
            positional_embedding=c.positional_embedding_type,
            # HookedTransformer keeps W_U as its own parameter even for tied checkpoints.
            tied_embeddings=False,
            qk_norm=bool(getattr(c, "use_qk_norm", False)),
            default_prepend_bos=bool(c.default_prepend_bos),
            bos_token_id=getattr(tokenizer, "bos_token_id", None),
        )

    def rotary_angles(self, layer: int) -> tuple[Tensor, bool]:
        """The base class's (ω_j, adjacent), read from the attention's ``rotary_cos``/``rotary_sin``
        buffers at position 1 where it has them (one angle per rotated coordinate, each pair's twice)."""
        return buffer_rotary_angles(self.model.blocks[layer].attn, self.model.cfg) or super().rotary_angles(layer)

    def _layer_attention(self, layer: int) -> dict[str, Tensor | None]:
        attn = self.model.blocks[layer].attn

        def stored(name: str) -> Tensor | None:
            # GroupedQueryAttention stores n_kv heads in _W_K/_W_V/_b_K/_b_V; W_K & co. are expanded copies.
            value = getattr(attn, f"_{name}", None)
            return value if value is not None else getattr(attn, name, None)

        return {
            "W_Q": attn.W_Q, "W_K": stored("W_K"), "W_V": stored("W_V"), "W_O": attn.W_O,
            "b_Q": getattr(attn, "b_Q", None), "b_K": stored("b_K"), "b_V": stored("b_V"),
            "b_O": getattr(attn, "b_O", None),
        }

    def _layer_mlp(self, layer: int) -> dict[str, Tensor | None]:
        mlp = self.model.blocks[layer].mlp
        return {
            "W_in": mlp.W_in, "W_gate": getattr(mlp, "W_gate", None), "W_out": mlp.W_out,
            "b_in": getattr(mlp, "b_in", None), "b_out": getattr(mlp, "b_out", None),
        }

    def _embedding(self) -> dict[str, Tensor | None]:
        m = self.model
        learned = self.cfg.positional_embedding in ("standard", "shortformer")
        pos = getattr(m, "pos_embed", None) if learned else None
        return {
            "W_E": m.embed.W_E,
            "W_pos": getattr(pos, "W_pos", None),
            "W_U": m.unembed.W_U,
            "b_U": getattr(m.unembed, "b_U", None),
        }


def buffer_rotary_angles(attention, cfg) -> tuple[Tensor, bool] | None:
    """(ω_j, adjacent) from TransformerLens' ``rotary_cos``/``rotary_sin`` buffers of ``attention``
    (:func:`table_rotary_angles`), or None where it has none."""
    if not hasattr(attention, "rotary_cos"):
        return None
    adjacent = bool(getattr(cfg, "rotary_adjacent_pairs", False))
    return table_rotary_angles(attention.rotary_cos, attention.rotary_sin, adjacent), adjacent


def table_rotary_angles(cos: Float[Tensor, "pos rotary_dim"], sin: Float[Tensor, "pos rotary_dim"],
                        adjacent: bool) -> Float[Tensor, " pairs"]:
    """ω_j from a rotary cos/sin table at position 1, which holds one angle per rotated coordinate,
    each pair's twice: at (2j, 2j + 1) for ``adjacent`` pairs, else at (j, j + pairs)."""
    theta = torch.atan2(sin[1].double(), cos[1].double()).cpu()
    return theta[::2] if adjacent else theta[: theta.numel() // 2]
