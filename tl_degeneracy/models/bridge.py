"""Adapter for TransformerLens ``TransformerBridge`` (TL 3.9 and 4.x; backend ``"bridge"`` or
``"bridge-compat"``).

The bridge wraps a Hugging Face model. What the adapter has to know about it
(research/transformerlens.md §1):

- **Numerics.** By default the bridge computes with the raw HF weights. After
  ``enable_compatibility_mode()`` it has folded the norms, centred the writing weights and W_U, folded
  b_V into b_O and, on tied models, untied W_U. Those are different parameters (GPT-2 gains
  d_model·d_vocab of them), so the backend string says which: ``"bridge"`` or ``"bridge-compat"``.
  Switching modes after adapting is refused; adapt again.
- **Hooks.** The legacy TransformerLens names are aliases of the bridge's ``hook_in``/``hook_out``
  names in both modes and are what the adapter hands out (:class:`LegacyHookNames`). Gated MLPs:
  ``mlp.hook_pre`` aliases ``mlp.gate.hook_out`` = x·W_gate, the activation function's argument,
  as on HookedTransformer; x·W_in is ``mlp.hook_pre_linear``.
- **Weights.** Per-block accessors (``blocks[l].attn.W_Q`` ...) are views of the live HF-layout
  parameters (the model-level ``model.W_Q`` stacks are copies). Under GQA ``W_K``/``W_V`` have n_kv
  heads. A bias the checkpoint lacks raises ``AttributeError``; it is reported as None.
  TL 3.9 has no model-level ``W_pos``; the components' accessors exist in both versions.
  Gemma-family norms store their gain as an offset from 1 and compute x/σ · (1 + w); the adapter
  hands out the effective gain 1 + w (``norm_weights``), in both modes.
- **Parameters.** ``model.parameters()`` holds dead joint-QKV copies (GPT-2, NeoX) and every tensor
  sits under several module paths. The live set comes from one backward pass (base class); each
  parameter is named by its path through the bridge's own components with the
  ``_original_component`` segments removed: ``blocks.0.attn.q.weight``, ``blocks.0.ln1.weight``,
  ``blocks.0.mlp.in.weight``, ``embed.weight``, ``unembed.weight`` (the keys of the bridge's own
  ``state_dict()``). GPT-2's tied embedding is one tensor named ``embed.weight`` whose slots include
  the unembedding. TL 3.9 adds a zero, trainable ``unembed.bias`` (d_vocab more live parameters
  than the HF model); TL 4.x keeps ``b_U`` as a buffer.
"""

from __future__ import annotations

import inspect
import re
import sys
import warnings

import torch
from torch import Tensor, nn

from ..distributed import warn_once
from ..errors import TLDegeneracyError

from .adapter import ModelAdapter
from .config import ModelConfig
from .hooked_transformer import NORMALIZATION, LegacyHookNames, buffer_rotary_angles, table_rotary_angles

_ORIGINAL = re.compile(r"(^|\.)_?original_component(?=\.|$)")


def _attribute(obj: object, name: str) -> Tensor | None:
    """``obj.name``, or None where the bridge raises AttributeError (a bias the checkpoint lacks,
    ``W_pos`` on rotary models)."""
    try:
        return getattr(obj, name)
    except AttributeError:
        return None


def rotation_pairings(module) -> dict[str, bool]:
    """Name → whether each rotation function ``rotate*`` of ``module`` (an HF modeling module) pairs
    coordinates (2j, 2j + 1) (True) or (j, j + d/2) (False), read off where it sends the first unit
    vector of a 4-dimensional head: the names differ where the pairing does not (``rotate_every_two``,
    ``rotate_half_llm``, ``rotate_pairwise``: adjacent; ``rotate_half``: halves)."""
    probe = torch.eye(4, device="cpu").reshape(1, 1, 4, 4)  # meets only the functions, no model tensor
    found: dict[str, bool] = {}
    for name, fn in sorted(vars(module).items()) if module is not None else ():
        if not (name.startswith("rotate") and inspect.isfunction(fn)):
            continue
        try:
            image = fn(probe)
        except (TypeError, ValueError, IndexError, RuntimeError):  # another signature: not a pair rotation
            continue
        if not isinstance(image, Tensor) or image.shape != probe.shape:
            continue
        nonzero = image.reshape(4, 4)[0].nonzero().flatten().tolist()
        if nonzero in ([1], [2]):
            found[name] = nonzero == [1]
    return found


def _strip_original(path: str) -> str:
    """Drop the ``_original_component`` / ``original_component`` segments of a module path."""
    return _ORIGINAL.sub("", path).lstrip(".")


class BridgeAdapter(LegacyHookNames, ModelAdapter):
    """Adapter over a ``TransformerBridge`` in default or compatibility mode (module docstring)."""

    # Measured on TransformerLens 4.3: dynamo stops at every bridge component's attribute lookup,
    # so a "compiled" step is the uncompiled one in pieces, slower, after a long compilation.
    compile_obstacle = (
        "TorchDynamo cannot trace TransformerBridge's component attribute lookups "
        "(GeneralizedComponent.__getattr__), so its forward would break into many small graphs and run no faster"
    )

    def run_with_hooks(self, tokens, fwd_hooks=(), bwd_hooks=()):
        """:meth:`ModelAdapter.run_with_hooks`, without TransformerLens 4's warning that a hook edited a
        norm's hook_scale/hook_normalized and the output "may differ at float-rounding scale": the
        package's passes edit there on purpose (a copy to take gradients at, a held value, a probe),
        and the warning reached report sections as if something were wrong (audit 13a F8)."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="A forward hook edited hook_scale/hook_normalized",
                                    category=UserWarning)
            return super().run_with_hooks(tokens, fwd_hooks, bwd_hooks)

    def __init__(self, model: nn.Module):
        self._compat = bool(getattr(model, "compatibility_mode", False))
        self._module_names: dict[int, str] | None = None
        self._feeds: dict[tuple[int, str], bool] | None = None
        self._hooked: dict[tuple[int, str], list[str]] = {}
        super().__init__(model)

    @property
    def backend(self) -> str:  # type: ignore[override]
        return "bridge-compat" if self._compat else "bridge"

    # ------------------------------------------------------------------ config
    def _read_config(self) -> ModelConfig:
        c = self.model.cfg
        n_heads = c.n_heads
        norm = getattr(c, "normalization_type", None)
        tokenizer = getattr(self.model, "tokenizer", None)
        return ModelConfig(
            n_layers=c.n_layers,
            n_heads=n_heads,
            n_kv_heads=getattr(c, "n_key_value_heads", None) or n_heads,
            d_model=c.d_model,
            d_head=c.d_head,
            d_mlp=None if getattr(c, "attn_only", False) else self._mlp_width(getattr(c, "d_mlp", None)),
            d_vocab=c.d_vocab,
            n_ctx=c.n_ctx,
            act_fn=getattr(c, "act_fn", None),
            normalization=NORMALIZATION.get(norm, norm),
            parallel_attn_mlp=bool(getattr(c, "parallel_attn_mlp", False)),
            gated_mlp=bool(getattr(c, "gated_mlp", False)),
            positional_embedding=getattr(c, "positional_embedding_type", None),
            tied_embeddings=self._embeddings_tied(),
            qk_norm=self._qk_norm(c),
            default_prepend_bos=bool(getattr(c, "default_prepend_bos", False)),
            bos_token_id=getattr(tokenizer, "bos_token_id", None),
        )

    @property
    def causal(self) -> bool:
        """The config's ``attention_dir`` (base class), and the wrapped HF attention's own
        ``is_causal`` flags: TL 3.9's BERT bridge reports ``attention_dir="causal"``."""
        attention = _attribute(self.model.blocks[0], "attn")
        modules = [] if attention is None else nn.Module.modules(attention)
        return super().causal and all(getattr(m, "is_causal", True) is not False for m in modules)

    def _qk_norm(self, c) -> bool:
        """Whether queries and keys are normalized before the scores: TransformerLens' ``use_qk_norm``,
        or a ``q_norm`` / ``k_norm`` module in the wrapped attention (Hugging Face's Qwen3, OLMo2, Gemma3)."""
        attention = _attribute(self.model.blocks[0], "attn")
        modules = [] if attention is None else nn.Module.named_modules(attention)
        return bool(getattr(c, "use_qk_norm", False)) or any(
            name.rsplit(".", 1)[-1] in ("q_norm", "k_norm", "q_layernorm", "k_layernorm") for name, _ in modules)

    def _mlp_width(self, configured: int | None) -> int | None:
        """F of layer 0's W_in [D, F] where the bridge exposes it, else ``configured``: the forward
        runs the HF module, so its weights set the width, not TransformerLens' config (whose OPT
        d_mlp is 4·d_model whatever the checkpoint's ffn_dim)."""
        mlp = _attribute(self.model.blocks[0], "mlp")
        W_in = None if mlp is None else _attribute(mlp, "W_in")
        return configured if W_in is None else int(W_in.shape[-1])

    def _embeddings_tied(self) -> bool:
        # The config flag stays True after compatibility mode unties GPT-2's W_U, so look at storage.
        W_E, W_U = _attribute(self.model.embed, "W_E"), _attribute(self.model.unembed, "W_U")
        if W_E is None or W_U is None:
            return False
        return W_E.untyped_storage().data_ptr() == W_U.untyped_storage().data_ptr()

    # ------------------------------------------------------------------ hooks
    def available_hooks(self) -> set[str]:
        """Every hook name the bridge accepts: canonical ``hook_in``/``hook_out`` names and the
        legacy aliases (``hook_dict`` holds both; ``hook_aliases`` adds the model-level ones)."""
        names = set(self.model.hook_dict)
        aliases = getattr(self.model, "hook_aliases", None)
        if isinstance(aliases, dict):
            names |= set(aliases)
        return names

    # ------------------------------------------------------------------ weights
    def rotary_angles(self, layer: int) -> tuple[Tensor, bool]:
        """The base class's (ω_j, adjacent), read where the forward keeps them: TransformerLens'
        rotary buffers on the attention; a TL-native model's rotary tables (pairs (2j, 2j + 1), the
        one layout of its code; the tables hold any ``rope_scaling``); else the wrapped HF model's
        ``inv_freq`` (the first one: layers are assumed to share it), else TransformerLens' formula,
        with the pairs of :meth:`_adjacent_pairs`. Checked against each architecture's attention
        pattern (tests/test_invariants.py): the config's ``rotary_adjacent_pairs`` alone said
        (j, j + pairs) for TL-native models and GPT-J, which pair adjacent coordinates."""
        attn = self.model.blocks[layer].attn
        found = buffer_rotary_angles(attn, self.model.cfg)
        if found is not None:
            return found
        native = getattr(getattr(attn, "original_component", None), "rotary", None)
        if native is not None and hasattr(native, "cos_cached"):
            return table_rotary_angles(native.cos_cached, native.sin_cached, True), True
        adjacent = self._adjacent_pairs(attn)
        hf = getattr(self.model, "original_model", None)
        freqs = [b for name, b in hf.named_buffers() if name.endswith(".inv_freq")] if hf is not None else []
        if freqs:
            return freqs[0].double().cpu(), adjacent
        return super().rotary_angles(layer)[0], adjacent

    def _adjacent_pairs(self, attn: nn.Module) -> bool:
        """Whether the attention rotates coordinate pairs (2j, 2j + 1) rather than (j, j + pairs):
        where TransformerLens rotates, its config says so (``rotary_adjacent_pairs``: GLM, ERNIE;
        ``rotary_interleaved_cos_sin``: Cohere); where the wrapped HF attention rotates by its own
        code, the rotation functions of its module do (:func:`rotation_pairings`: GPT-J's and
        CodeGen's ``rotate_every_two`` pair adjacent coordinates, the others' ``rotate_half`` halves).
        A module whose functions disagree (GLM-4V: ``rotate_half`` for vision, ``rotate_half_llm``
        for text) cannot tell which its attention uses: halves are taken, with a warning."""
        c = self.model.cfg
        if getattr(c, "rotary_adjacent_pairs", False) or getattr(c, "rotary_interleaved_cos_sin", False):
            return True
        hf = getattr(attn, "original_component", None)
        pairings = {} if hf is None else rotation_pairings(sys.modules.get(type(hf).__module__))
        if len(set(pairings.values())) > 1:
            named = ", ".join(f"{name} ({'adjacent pairs' if adjacent else 'halves'})" for name, adjacent in pairings.items())
            warn_once(f"the module of {type(hf).__name__} rotates with {named}: which its attention uses cannot be read, "
                      "so rotary pairs are taken as halves (j, j + pairs); QK free directions of factors "
                      "rank-deficient on a rotary pair may be counted in the wrong pairs (at full rank the count "
                      "does not depend on the pairing)", RuntimeWarning, stacklevel=3)
            return False
        return set(pairings.values()) == {True}

    def _layer_attention(self, layer: int) -> dict[str, Tensor | None]:
        attn = self.model.blocks[layer].attn
        return {name: _attribute(attn, name) for name in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O")}

    def _layer_mlp(self, layer: int) -> dict[str, Tensor | None]:
        mlp = self.model.blocks[layer].mlp
        weights = {name: _attribute(mlp, name) for name in ("W_in", "W_gate", "W_out", "b_in", "b_gate", "b_out")}
        if weights["W_in"] is None or weights["W_out"] is None:
            raise TypeError(
                f"the MLP of layer {layer} ({type(mlp).__name__}) has no W_in/W_out accessors "
                f"(mixture-of-experts or another non-standard MLP); tl_degeneracy cannot read its weights"
            )
        return weights

    def _embedding(self) -> dict[str, Tensor | None]:
        m = self.model
        pos = _attribute(m, "pos_embed") if self.cfg.positional_embedding == "standard" else None
        return {
            "W_E": m.embed.W_E,
            "W_pos": None if pos is None else _attribute(pos, "W_pos"),
            "W_U": m.unembed.W_U,
            "b_U": _attribute(m.unembed, "b_U"),
        }

    def _post_norm(self, layer: int, norm: nn.Module, ln: str) -> str | None:
        """TL 3.9 maps OLMo2's ``post_attention_layernorm``/``post_feedforward_layernorm`` to ``ln1``/
        ``ln2`` (TL 4.x to ``ln1_post``/``ln2_post``), so the wrapped HF module's name decides: a
        post-norm where it names the sublayer the norm should precede. (Llama's pre-MLP ``ln2`` is
        ``post_attention_layernorm``: after the attention, before the MLP.) Names do not tell every
        post-norm: BERT's ``ln1`` is ``attention.output.LayerNorm``, after the attention and its
        residual add, and post-LN OPT's has the pre-LN name. So the structure decides as well: a norm
        whose output is not what its sublayer reads in one forward pass (:meth:`_norm_feeds`)."""
        name = str(getattr(norm, "name", "") or "")
        after = {"ln1": ("post_attention",), "ln2": ("post_feedforward", "post_mlp")}[ln]
        if name.startswith(after):
            return f"its {ln} wraps {name}, applied after it"
        if self._norm_feeds().get((layer, ln), True):
            return None
        sublayer = "attention" if ln == "ln1" else "MLP"
        reason = f"its {ln} ({name or type(norm).__name__}) does not output what its {sublayer} reads"
        hooked = self._hooked.get((layer, ln))
        if hooked:
            reason += (f" in a forward pass with your hooks on {', '.join(hooked)}, which may be what changed it: "
                       "remove them (model.reset_hooks()) and retry")
        return reason

    def _norm_feeds(self) -> dict[tuple[int, str], bool]:
        """(layer, ln) → whether block ``layer``'s ``ln`` output is what the sublayer after it reads
        (``ln1.hook_out`` against ``attn.hook_in``, ``ln2.hook_out`` — a parallel block's shared
        ``ln1.hook_out`` — against ``mlp.hook_in``), found in one forward pass over a few tokens, once
        per adapter; pairs without both hooks are left out. Equal, bit for bit, on every pre-norm architecture the
        tests boot (GPT-2, OPT, Llama with GQA, NeoX, GPT-J, Phi, Gemma 1–3), in both TransformerLens
        versions and modes. A forward pass that fails is an error: post-LN OPT's fails inside the
        bridge, and no analysis can read a model whose forward does not run."""
        if self._feeds is not None:
            return self._feeds
        hooks = self.model.hook_dict
        pairs = {(layer, ln): (f"blocks.{layer}.{self.block_norm(layer, ln)}.hook_out", f"blocks.{layer}.{sub}.hook_in")
                 for layer in range(self.n_layers) for ln, sub in (("ln1", "attn"), ("ln2", "mlp"))}
        pairs = {key: names for key, names in pairs.items() if all(n in hooks for n in names)}
        if not pairs:
            self._feeds = {}
            return self._feeds
        # A hook the caller left on these points (an ablation, a patch) runs in the check too.
        self._hooked = {key: [n for n in names if hooks[n].fwd_hooks] for key, names in pairs.items()}
        seen: dict[str, Tensor] = {}

        def keep(name: str):
            def store(activation: Tensor, hook) -> None:
                seen[name] = activation.detach()
            return store

        tokens = torch.arange(min(8, self.d_vocab, self.cfg.n_ctx or 8), device=self.device)[None]
        try:
            with torch.no_grad():
                self.run_with_hooks(tokens, fwd_hooks=[(n, keep(n)) for names in pairs.values() for n in names])
        except Exception as err:
            raise TLDegeneracyError(
                f"a forward pass of this {type(self.model).__name__} on {tokens.shape[1]} tokens failed ({type(err).__name__}: "
                f"{err}); tl_degeneracy checks with one that each block's norms feed its attention and MLP (pre-norm "
                "blocks; post-norm ones, as in BERT and post-LN OPT, are not supported), and every analysis of "
                "activations needs it"
            ) from err
        # NaN == NaN here: a non-finite activation (an overflowing float16 forward, an ablation) says
        # nothing about where the norm sits, and the analyses that read activations say so themselves.
        self._feeds = {key: torch.equal(seen[a].nan_to_num(), seen[b].nan_to_num()) for key, (a, b) in pairs.items()
                       if a in seen and b in seen and seen[a].shape == seen[b].shape}
        return self._feeds

    def _gain_is_offset(self, norm: nn.Module) -> bool:
        """TL 4.x says so per norm (``NormalizationBridge.uses_weight_offset``: Gemma-family RMSNorm,
        LayerNorm1P); TL 3.9's norm applies 1 + w wherever the config sets ``rmsnorm_uses_offset``.
        Compatibility mode folds the gain into the next weights and stores w = 0: an effective 1."""
        flag = getattr(norm, "uses_weight_offset", None)
        return bool(flag) if flag is not None else bool(getattr(self.model.cfg, "rmsnorm_uses_offset", False))

    # ------------------------------------------------------------------ parameters
    def _bridge_module_names(self) -> dict[int, str]:
        """id(module) → its path through the bridge's components, ``_original_component`` removed.

        A wrapped HF module is reachable both through the HF tree (``blocks.0._original_component.
        ln_1._original_component``) and through the bridge component that owns it
        (``blocks.0.ln1._original_component``); the second spelling is the stable one. It is the
        path in which ``_original_component`` occurs only as the last segment.
        """
        if self._module_names is None:
            names: dict[int, str] = {}
            fallback: dict[int, str] = {}
            for path, module in nn.Module.named_modules(self.model, remove_duplicate=False):
                parts = path.split(".")
                inner = [p for p in parts[:-1] if p in ("_original_component", "original_component")]
                if not inner:
                    names.setdefault(id(module), _strip_original(path))
                fallback.setdefault(id(module), _strip_original(path))
            self._module_names = {**fallback, **names}
        return self._module_names

    def _canonical_name(self, slot: str) -> str:
        module_path, _, attr = slot.rpartition(".")
        module = self.model.get_submodule(module_path) if module_path else self.model
        prefix = self._bridge_module_names().get(id(module), _strip_original(module_path))
        return f"{prefix}.{attr}" if prefix else attr

    def _detached_weights(self) -> list[str]:
        """Weights the forward reads from detached tensors instead of the parameters.

        TransformerLens 3.9's bridge in compatibility mode runs gated MLPs through
        ``_processed_W_gate/_W_in/_W_out``: plain tensors sharing storage with the parameters but
        cut from autograd, which ``functional_call`` cannot replace either (TL 4.x does not do this).
        """
        found = []
        for path, module in self.model.named_modules():
            if not getattr(module, "_use_processed_weights", False):
                continue
            for key, value in vars(module).items():
                if key.startswith("_processed_") and isinstance(value, Tensor) and not isinstance(value, nn.Parameter):
                    found.append(f"{_strip_original(path)}.{key}")
        return found

    def live_parameters(self):
        """The live parameters (base class), after two checks: the compatibility mode is the one
        the adapter was built for, and no weight is computed from a detached copy."""
        if bool(getattr(self.model, "compatibility_mode", False)) != self._compat:
            raise RuntimeError(
                "the bridge's compatibility mode changed after it was adapted; its parameters changed "
                "with it (folded norms, untied W_U). Call tl_degeneracy.adapt(model) again."
            )
        detached = self._detached_weights()
        if detached:
            raise RuntimeError(
                f"this TransformerBridge computes {len(detached)} weight tensors from detached copies of its "
                f"parameters (e.g. {', '.join(detached[:3])}; TransformerLens 3.x compatibility mode does this for "
                "gated MLPs), so gradients and perturbations cannot reach them and the live parameter set would be "
                "incomplete. Use the bridge in its default mode (raw weights, what LLC estimates should use anyway), "
                "TransformerLens 4.x, or a HookedTransformer. Hooks and weights are unaffected."
            )
        return super().live_parameters()
