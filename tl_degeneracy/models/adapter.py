"""The adapter: one interface over every supported model.

Analyses never reach into a backend; they ask an adapter for config numbers, hook names, weights in
TransformerLens layout, the live parameter set, the tokenizer's ids and a perturbed forward. Backends subclass
:class:`ModelAdapter` and implement the few ``_``-prefixed methods; everything that must be done
once for all backends (GQA expansion, zero biases, de-duplicated parameters, leak-free perturbed
forwards over a chain axis, eval mode) lives here.
"""

from __future__ import annotations

import abc
import contextlib
import difflib
import operator
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from torch.func import functional_call

from ..errors import DataError, MissingHookError, NumericalError
from .chains import ChainMap
from .config import ModelConfig
from .hooks import HOOK_KINDS, LAYER_KINDS, MODEL_KINDS, TL_HOOK_TEMPLATES, warn_attached_hooks
from .parameters import ParameterSet, find_live_parameters
from .weights import AttentionWeights, EmbeddingWeights, MLPWeights

HookFn = Callable[[Tensor, object], Tensor | None]


def _changed_tensor_attributes(now: dict, before: dict) -> list[str]:
    """Keys of a module's ``__dict__`` that hold, or held, a tensor and are no longer the same object.

    Parameters, buffers and submodules live in nn.Module's own dicts (``_parameters`` ...), so what
    is found here are plain tensor attributes: caches a forward writes, never the model's state.
    """
    # Fast path, in C: most modules' attributes are the same objects under the same keys.
    if now.keys() == before.keys() and all(map(operator.is_, now.values(), before.values())):
        return []
    return [
        k for k in now.keys() | before.keys()
        if now.get(k) is not before.get(k) and (isinstance(now.get(k), Tensor) or isinstance(before.get(k), Tensor))
    ]


#: id() of the models inside a :func:`forward_scope` now (a nested scope on the same model is free).
_IN_SCOPE: set[int] = set()


@contextlib.contextmanager
def forward_scope(model: nn.Module) -> Iterator[None]:
    """Run forwards of ``model`` in eval mode (no dropout) and give the model back as it found it.

    Every forward an analysis runs goes through this (``ModelAdapter.eval_mode``, the LLC's plain
    modules), so no analysis leaves state behind: each module's training flag is restored, and so is
    every tensor attribute that is neither a parameter nor a buffer — a forward-time cache such as
    the Hugging Face attention's ``_pattern`` under a TransformerLens 4.x bridge, which after a
    perturbed forward holds the chains' autograd graph (keeping it in memory) and after a vmapped
    one a batched tensor that escaped ``vmap`` (``copy.deepcopy(model)`` then fails). An attribute
    the forward added is deleted; one it replaced, rebound or deleted is put back as the same object.
    Outputs a forward returns, and the graphs behind them, are the caller's and are not touched.
    Tensors changed in place (not rebound) are not tracked: no supported backend does that.

    A tokenizer that pads on the left pads on the right inside the scope (see the comment below).

    Re-entrant: inside a scope on the same model a nested one does nothing, the outer one restoring
    everything at its end, so a loop of forwards (an SGLD run) can hold one scope around all of them
    instead of paying for one per forward.
    """
    if id(model) in _IN_SCOPE:
        yield
        return
    modules = list(model.modules())
    modes = [m.training for m in modules]
    # A shallow copy of each __dict__: references only, no tensor data is copied.
    before = [dict(vars(m)) for m in modules]
    # A HookedTransformer whose tokenizer pads on the left masks every leading pad id of a batch and
    # shifts its positions (audit 17a F5: a real first token equal to the pad id, pad ≠ BOS, changed
    # every statistic of its sequence, silently). The package pads on the right, after every real
    # position of a causal model, and needs no mask: the tokenizer pads on the right meanwhile.
    tokenizer = getattr(model, "tokenizer", None)
    left = getattr(tokenizer, "padding_side", None) == "left"
    if left:
        tokenizer.padding_side = "right"
    model.eval()
    _IN_SCOPE.add(id(model))
    try:
        yield
    finally:
        _IN_SCOPE.discard(id(model))
        if left:
            tokenizer.padding_side = "left"
        for m, training, saved in zip(modules, modes, before):
            m.training = training
            attributes = vars(m)
            # Written through __dict__, past nn.Module's and the bridge components' __setattr__ /
            # __delattr__, which would route names to parameters or to the wrapped HF module.
            for key in _changed_tensor_attributes(attributes, saved):
                if key in saved:
                    attributes[key] = saved[key]
                else:
                    del attributes[key]


def _refuse_meta_weights(model: nn.Module) -> None:
    """ValueError for a model whose weights are on the meta device (shapes without values)."""
    name = next((n for n, p in model.named_parameters() if p.is_meta), None)
    if name is not None:
        raise ValueError(
            f"the weights of this {type(model).__name__} are on the meta device (e.g. {name}): they have shapes but "
            "no values, so nothing can be measured; load them first (e.g. from_pretrained without device_map='meta', "
            "or model.to_empty(device=...) followed by load_state_dict)"
        )


_BLOCK_COMPONENT = re.compile(r"^blocks\.(\d+)\.(attn|mlp|ln\w*)\.")
_MODEL_COMPONENT = re.compile(r"^(embed|pos_embed|unembed|ln_final)\.")

#: ModelConfig.normalization → the name :class:`NormWeights` gives the operation.
_NORM_KINDS = {"LN": "layernorm", "RMS": "rmsnorm", None: None}


@dataclass(frozen=True)
class NormWeights:
    """The normalization in front of a block's attention (``ln1``) or MLP (``ln2``) (METHODS §2).

    ``kind``: ``"layernorm"`` (x ↦ (x − mean x)/σ · w + b), ``"rmsnorm"`` (x ↦ x/rms · w) or None
    (no normalization). ``w``/``b`` [d_model]: the *effective* gain and bias, the numbers that
    multiply and shift the normalized input. That is the stored tensor except where a norm stores
    its gain as an offset from 1 (Gemma-family RMSNorm computes x/rms · (1 + w)): there ``w`` is
    1 + the stored tensor. None where the model has none: absent from the architecture, or folded
    into the next linear maps (HookedTransformer's ``fold_ln``; a compatibility-mode bridge keeps
    an effective w = 1, b = 0). ``eps``: the ε the norm adds to the mean square under its square root
    (the module's ``eps``), None where the module holds none.
    """

    kind: str | None
    w: Float[Tensor, " d_model"] | None
    b: Float[Tensor, " d_model"] | None
    eps: float | None = None


class ModelAdapter(abc.ABC):
    """Uniform access to a model's architecture, hooks, weights and parameters.

    Subclasses set ``backend`` and implement ``_read_config``, ``_hook_template``,
    ``_layer_attention``, ``_layer_mlp``, ``_embedding``; they may override ``_canonical_name``
    (stable parameter names) and ``_logits`` (forward output → [batch, pos, vocab]).
    """

    backend: ClassVar[str] = "abstract"
    #: Why ``torch.compile`` cannot trace the perturbed forward as one graph ("" where it can); the
    #: compiled behavioral LLC (``behavioral_llc(compile=True)``) then runs uncompiled and says why.
    compile_obstacle: ClassVar[str] = ""

    def __init__(self, model: nn.Module):
        _refuse_meta_weights(model)
        warn_attached_hooks(model)
        self.model = model
        self.cfg: ModelConfig = self._read_config()
        self._check_config()
        self._live: ParameterSet | None = None
        self._chain_map = ChainMap()

    # ------------------------------------------------------------------ config
    @abc.abstractmethod
    def _read_config(self) -> ModelConfig:
        """Architecture numbers of the wrapped model."""

    def _layer_0_weights(self) -> dict[str, Tensor | None]:
        """W_E and layer 0's attention and MLP weights, as far as the backend exposes them (a block
        without standard attention or MLP, a hybrid or mixture of experts, is refused where those are
        read, not here)."""
        found = {"W_E": self._embedding()["W_E"]}
        for read in (self._layer_attention, self._layer_mlp) if self.cfg.d_mlp is not None else (self._layer_attention,):
            try:
                found.update(read(0))
            except (AttributeError, TypeError):
                pass
        return found

    def _config_mismatches(self) -> list[str]:
        """Where layer 0's weights and the embedding disagree with the sizes of :attr:`cfg`."""
        c = self.cfg
        D, d = c.d_model, c.d_head
        expected = {"W_Q": (c.n_heads, D, d), "W_K": (c.n_kv_heads, D, d), "W_V": (c.n_kv_heads, D, d),
                    "W_O": (c.n_heads, d, D), "W_E": (c.d_vocab, D)}
        if c.d_mlp is not None:
            expected.update(W_in=(D, c.d_mlp), W_out=(c.d_mlp, D))
        with torch.no_grad():
            found = self._layer_0_weights()
        return [
            f"{name} of layer 0 is {list(found[name].shape)}, not {list(shape)}"
            for name, shape in expected.items() if found.get(name) is not None and tuple(found[name].shape) != shape
        ]

    def _check_config(self) -> None:
        """ValueError where the config's sizes do not fit the weights: every analysis sizes its
        maps and counts from :attr:`cfg`, so a wrong size gives wrong numbers or shape errors."""
        wrong = self._config_mismatches()
        if wrong:
            c = self.cfg
            raise ValueError(
                f"the config of this {type(self.model).__name__} does not fit its weights: {'; '.join(wrong)} (config: "
                f"n_heads={c.n_heads}, n_kv_heads={c.n_kv_heads}, d_model={c.d_model}, d_head={c.d_head}, "
                f"d_mlp={c.d_mlp}, d_vocab={c.d_vocab}). tl_degeneracy sizes every map from the config; correct "
                "model.cfg to match the weights (TransformerLens' conversion of this architecture may have set it "
                "wrong)"
            )

    def __repr__(self) -> str:
        c = self.cfg
        return (
            f"{type(self).__name__}(backend={self.backend!r}, n_layers={c.n_layers}, n_heads={c.n_heads}, "
            f"n_kv_heads={c.n_kv_heads}, d_model={c.d_model}, d_head={c.d_head}, d_mlp={c.d_mlp}, "
            f"d_vocab={c.d_vocab}, n_ctx={c.n_ctx})"
        )

    n_layers = property(lambda self: self.cfg.n_layers)
    n_heads = property(lambda self: self.cfg.n_heads)
    n_kv_heads = property(lambda self: self.cfg.n_kv_heads)
    d_model = property(lambda self: self.cfg.d_model)
    d_head = property(lambda self: self.cfg.d_head)
    d_mlp = property(lambda self: self.cfg.d_mlp)
    d_vocab = property(lambda self: self.cfg.d_vocab)
    n_ctx = property(lambda self: self.cfg.n_ctx)

    @property
    def causal(self) -> bool:
        """Whether every position attends only to itself and earlier ones: the backend config's
        ``attention_dir`` is not ``"bidirectional"`` (BERT, a HookedTransformer built so). What
        lets :func:`~tl_degeneracy.data.token_batches` pad ragged data without an attention mask."""
        return getattr(getattr(self.model, "cfg", None), "attention_dir", "causal") != "bidirectional"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def summary(self) -> dict:
        """Backend, parametrisation and sizes, for results and reports."""
        live = self.live_parameters()
        return {
            "backend": self.backend,
            "model_class": type(self.model).__name__,
            **self.cfg.to_dict(),
            "n_live_parameters": live.numel,
            "n_live_tensors": len(live),
            "n_module_parameters": sum(p.numel() for p in self.model.parameters()),
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": str(self.device),
        }

    # ------------------------------------------------------------------ tokens
    def _tokenizer(self):
        return getattr(self.model, "tokenizer", None)

    @property
    def bos_token_id(self) -> int | None:
        """The id of the BOS token sequences may begin with: the config's, else the tokenizer's, else None."""
        if self.cfg.bos_token_id is not None:
            return self.cfg.bos_token_id
        return getattr(self._tokenizer(), "bos_token_id", None)

    @property
    def pad_token_id(self) -> int | None:
        """The tokenizer's pad id (what ``model.to_tokens`` pads with); None without a tokenizer."""
        return getattr(self._tokenizer(), "pad_token_id", None)

    def text_encoder(self) -> tuple[Callable[[str], list[int]], str]:
        """(encode, how): ``encode`` turns one string into token ids, without special tokens (BOS is
        the caller's to add); ``how`` says with what: ``"tokenizer"``, ``"to_tokens"`` or
        ``"utf-8 bytes"`` (byte-level models, d_vocab 256, whose tokens are the UTF-8 bytes).

        Raises:
            DataError: the model was loaded without its tokenizer (``load_model`` says so on the
                model), or it has none and is not byte-level.
        """
        model = self.model
        missing = getattr(model, "tld_tokenizer_missing", None)  # set by load_model
        if missing:
            raise DataError(
                f"{missing}, and the data are strings, which must be tokenized: its tokens would be meaningless. Save "
                "the model's tokenizer into that directory (tokenizer.save_pretrained(dir)), or give token ids (a "
                "LongTensor [batch, pos]; for the report, a .pt file holding one)"
            )
        tok = self._tokenizer()
        if tok is not None:
            def encode(s: str) -> list[int]:
                try:
                    return list(tok(s, add_special_tokens=False, verbose=False)["input_ids"])
                except TypeError:  # tokenizers without the HF call signature
                    return list(tok.encode(s))

            return encode, "tokenizer"
        to_tokens = getattr(model, "to_tokens", None)
        if callable(to_tokens):
            return (lambda s: to_tokens(s, prepend_bos=False, truncate=False)[0].tolist()), "to_tokens"
        if self.d_vocab == 256:
            return (lambda s: list(s.encode("utf-8"))), "utf-8 bytes"
        raise DataError(
            f"cannot tokenize strings for this {type(model).__name__}: it has no .tokenizer or .to_tokens and is not "
            f"byte-level (d_vocab={self.d_vocab}, not 256); pass token ids (a LongTensor [batch, pos]) instead"
        )

    # ------------------------------------------------------------------ hooks
    @abc.abstractmethod
    def _hook_template(self, kind: str) -> str:
        """Return the hook name template for ``kind`` (``{layer}`` placeholder), or raise
        :class:`MissingHookError` saying why the architecture lacks it."""

    def hook_name(self, kind: str, layer: int | None = None) -> str:
        """The hook point name of ``kind`` at ``layer`` (no layer for ``embed`` and ``ln_final``)."""
        if kind not in HOOK_KINDS:
            raise MissingHookError(f"unknown hook kind {kind!r}; kinds are {', '.join(HOOK_KINDS)}")
        template = self._hook_template(kind)
        if kind in MODEL_KINDS:
            if layer is not None:
                raise ValueError(f"hook kind {kind!r} exists once per model; do not pass a layer")
            return template
        if layer is None:
            raise ValueError(f"hook kind {kind!r} exists in every layer; pass layer=0..{self.n_layers - 1}")
        if not -self.n_layers <= layer < self.n_layers:
            raise IndexError(f"layer {layer} out of range for a model with {self.n_layers} layers")
        return template.format(layer=layer % self.n_layers)

    def hook_names(self, spec: str | Sequence[str]) -> list[str]:
        """Resolve hook kinds (every layer) and exact hook names to a list of hook names, in order."""
        try:
            items = [spec] if isinstance(spec, str) else list(spec)
        except TypeError:  # not iterable: hooks=3, hooks=None
            items = None
        if items is None or not all(isinstance(item, str) for item in items):
            raise TypeError(f"hooks must be a hook kind ({', '.join(HOOK_KINDS)}), a hook name, or a list of them; "
                            f"got {spec!r}")
        if not items:
            raise ValueError("no hooks requested")
        available = self.available_hooks()
        names: list[str] = []
        for item in items:
            if item in LAYER_KINDS:
                new = [self.hook_name(item, layer) for layer in range(self.n_layers)]
            elif item in MODEL_KINDS:
                new = [self.hook_name(item)]
            elif item in available:
                new = [item]
            else:
                self._refuse_missing_kind(item)
                layer = re.match(r"blocks\.(\d+)\.", item)
                where = (f" (layer {layer.group(1)} out of range for a model with {self.n_layers} layers)"
                         if layer and int(layer.group(1)) >= self.n_layers else "")
                near = difflib.get_close_matches(item, sorted(available), n=3) or sorted(available)[:3]
                raise MissingHookError(
                    f"{item!r} is neither a hook kind ({', '.join(HOOK_KINDS)}) nor a hook point of this "
                    f"{type(self.model).__name__}{where}; e.g. {near}"
                )
            names.extend(n for n in new if n not in names)
        return names

    def _refuse_missing_kind(self, name: str) -> None:
        """Where ``name`` is the TransformerLens name of a hook kind this architecture lacks, the
        MissingHookError that says why (e.g. resid_mid of parallel blocks), not a generic one."""
        for kind in LAYER_KINDS:
            pattern = "^" + re.escape(TL_HOOK_TEMPLATES[kind]).replace(re.escape("{layer}"), r"\d+") + "$"
            if re.match(pattern, name):
                self._hook_template(kind)  # raises, saying why, where the architecture lacks the kind
                return

    def available_hooks(self) -> set[str]:
        """Every hook point name the model accepts (aliases included)."""
        return set(getattr(self.model, "hook_dict", {}))

    def hook_kind(self, name: str) -> tuple[str, int | None] | None:
        """Inverse of :meth:`hook_name`: (kind, layer) for a hook name, or None if it is no kind."""
        for kind in HOOK_KINDS:
            try:
                template = self._hook_template(kind)
            except MissingHookError:
                continue
            pattern = "^" + re.escape(template).replace(re.escape("{layer}"), r"(\d+)") + "$"
            m = re.match(pattern, name)
            if m:
                return kind, (int(m.group(1)) if m.groups() else None)
        return None

    # ------------------------------------------------------------------ forward
    def eval_mode(self) -> contextlib.AbstractContextManager[None]:
        """Run in eval mode (no dropout) and give the model back as it was found: its modes and its
        modules' tensor attributes (forward-time caches); see :func:`forward_scope`. Every forward
        of the adapter runs inside it."""
        return forward_scope(self.model)

    def _logits(self, out) -> Float[Tensor, "batch pos vocab"]:
        """Turn the model's forward output into logits of shape [batch, pos, vocab]."""
        return out

    def forward(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos vocab"]:
        """Logits of the unperturbed model, in eval mode."""
        with self.eval_mode():
            return self._logits(self.model(tokens))

    def run_with_hooks(
        self,
        tokens: Int[Tensor, "batch pos"],
        fwd_hooks: Sequence[tuple[str, HookFn]] = (),
        bwd_hooks: Sequence[tuple[str, HookFn]] = (),
    ) -> Float[Tensor, "batch pos vocab"]:
        """Forward with temporary hooks (removed afterwards, also on error), in eval mode.

        Hook functions receive ``(activation, hook)``; do not rely on ``hook.name``, which is the
        canonical spelling on the bridge rather than the name you asked for.
        """
        with self.eval_mode():
            out = self.model.run_with_hooks(tokens, fwd_hooks=list(fwd_hooks), bwd_hooks=list(bwd_hooks))
        return self._logits(out)

    # ------------------------------------------------------------------ weights
    @abc.abstractmethod
    def _layer_attention(self, layer: int) -> dict[str, Tensor | None]:
        """TL-layout attention tensors of one layer: W_Q [H,D,d], W_K/W_V [n_kv,D,d], W_O [H,d,D],
        b_Q [H,d], b_K/b_V [n_kv,d], b_O [D]; a missing bias is None."""

    @abc.abstractmethod
    def _layer_mlp(self, layer: int) -> dict[str, Tensor | None]:
        """TL-layout MLP tensors of one layer: W_in [D,F], W_gate [D,F] or None, W_out [F,D], b_in, b_out."""

    @abc.abstractmethod
    def _embedding(self) -> dict[str, Tensor | None]:
        """W_E [V,D], W_pos [n_ctx,D] or None, W_U [D,V], b_U [V] or None."""

    def attention_weights(self) -> AttentionWeights:
        """Per-head attention weights of every layer, GQA expanded, zero where a bias is absent."""
        with torch.no_grad():
            return AttentionWeights.from_layers(
                [self._layer_attention(layer) for layer in range(self.n_layers)], self.n_heads
            )

    def _post_norm(self, layer: int, norm: nn.Module, ln: str) -> str | None:
        """Where block ``layer``'s ``ln`` module (``ln1``/``ln2``) normalizes the sublayer's output
        instead of its input: what it normalizes, in words; None (the default) for a pre-norm."""
        return None

    def block_norm(self, layer: int, ln: str) -> str:
        """The name of the norm in front of block ``layer``'s attention (``ln="ln1"``) or MLP (``"ln2"``):
        ``ln`` itself, except ``"ln1"`` for the MLP of a parallel block with one shared pre-norm (GPT-J,
        Phi: attention and MLP read the same ln1 output; audit 9 F10)."""
        shared = ln == "ln2" and self.cfg.parallel_attn_mlp and getattr(self.model.blocks[layer], "ln2", None) is None
        return "ln1" if shared else ln

    def _norm_module(self, layer: int, ln: str) -> nn.Module:
        """The module ``blocks[layer].<ln>`` (a parallel block's shared ``ln1`` for its MLP: GPT-J,
        Phi), or :class:`MissingHookError` where the block has no norm in front of that linear map:
        post-norm blocks (OLMo2) normalize the attention's and MLP's outputs instead (TL 4.x calls
        those norms ``ln1_post``/``ln2_post``)."""
        block = self.model.blocks[layer]
        ln = self.block_norm(layer, ln)
        module = getattr(block, ln, None)
        where = None if module is None else self._post_norm(layer, module, ln)
        if module is not None and where is None:
            return module
        if where is None:
            # nn.Module.named_children: a bridge component's own __getattr__ would route names elsewhere.
            norms = [name for name, _ in nn.Module.named_children(block) if name.startswith("ln")]
            where = f"its norms: {', '.join(norms)}" if norms else "it has none"
        raise MissingHookError(
            f"layer {layer} of this {type(self.model).__name__} has no norm in front of its "
            f"{'attention' if ln == 'ln1' else 'MLP'} ({where}): it is not a pre-norm block (OLMo2 normalizes the "
            "sublayers' outputs instead, BERT the residual stream after them). tl_degeneracy's effective maps (METHODS §2) read the normalized block input, so they "
            "are not defined here; use a pre-norm model (GPT-2, Llama, Gemma, Pythia ...)"
        )

    def post_norm(self, sublayer: str) -> bool:
        """Whether the blocks normalize the attention's (``"attn"``) or the MLP's (``"mlp"``) output before
        the residual add (a ``ln1_post`` / ``ln2_post`` module: Gemma 2/3's sandwich norms, in both
        backends); ``hook_attn_out`` / ``hook_mlp_out`` then carry the norm's output, not W_O's / W_out's."""
        name = {"attn": "ln1_post", "mlp": "ln2_post"}[sublayer]
        return any(child == name for child, _ in nn.Module.named_children(self.model.blocks[0]))

    def _gain_is_offset(self, norm: nn.Module) -> bool:
        """Whether ``norm`` computes x/σ · (1 + w) from its stored gain w (Gemma-family RMSNorm).
        Default: no; a backend whose norms may do so says which."""
        return False

    def _layer_norm(self, layer: int, ln: str) -> tuple[Tensor | None, Tensor | None]:
        """The effective (w, b) of the norm ``ln`` of ``layer``, None where absent: the TransformerLens
        module ``blocks[layer].<ln>`` with attributes ``w`` and ``b`` (HookedTransformer, the bridge's
        NormalizationBridge and the toys all have this shape), w read as 1 + w where the module
        stores its gain as an offset (:meth:`_gain_is_offset`)."""
        module = self._norm_module(layer, ln)
        w, b = getattr(module, "w", None), getattr(module, "b", None)
        if w is not None and self._gain_is_offset(module):
            w = 1 + w
        return w, b

    def norm_weights(self, layer: int, ln: str) -> NormWeights:
        """The normalization ``ln`` (``"ln1"``: before the attention, ``"ln2"``: before the MLP) of
        ``layer``: its kind and effective gain/bias (:class:`NormWeights`), detached. Every
        analysis that folds a norm (invariants, gauges, counts, synchronization) reads it here."""
        if ln not in ("ln1", "ln2"):
            raise ValueError(f"ln must be 'ln1' (attention input) or 'ln2' (MLP input); got {ln!r}")
        if not -self.n_layers <= layer < self.n_layers:
            raise IndexError(f"layer {layer} out of range for a model with {self.n_layers} layers")
        if self.cfg.normalization not in _NORM_KINDS:
            raise ValueError(
                f"normalization {self.cfg.normalization!r} of this {type(self.model).__name__} is neither LayerNorm nor "
                "RMSNorm; tl_degeneracy does not know how it enters the attention and MLP inputs"
            )
        kind = _NORM_KINDS[self.cfg.normalization]
        if kind is None:
            return NormWeights(None, None, None)
        w, b = self._layer_norm(layer % self.n_layers, ln)
        eps = getattr(self._norm_module(layer % self.n_layers, ln), "eps", None)
        return NormWeights(kind, None if w is None else w.detach(), None if b is None else b.detach(),
                           float(eps) if isinstance(eps, (int, float)) else None)

    def query_key_norm(self, layer: int) -> NormWeights:
        """The normalization as ``layer``'s queries and keys read it: ``norm_weights(layer, "ln1")``,
        except in a shortformer model (``positional_embedding_type="shortformer"``), whose queries
        and keys read ln1(x) + W_pos[p]. That input is neither mean-free nor w-scaled and spans
        all of R^D, and TransformerLens cannot fold ln1 into W_Q/W_K there (``fold_ln`` is refused),
        so the QK analyses read it whole: no norm to fold (NormWeights(None, None, None)), the
        plain W_Q and W_K and their biases (audit 13a F2: P diag(w) W_Q missed the direction W_Q
        reads through W_pos)."""
        if self.cfg.positional_embedding == "shortformer":
            self.norm_weights(layer, "ln1")  # the same checks of the layer and the norm's kind
            return NormWeights(None, None, None)
        return self.norm_weights(layer, "ln1")

    def mlp_weights(self) -> MLPWeights:
        """MLP weights of every layer (W_gate set for gated MLPs)."""
        if self.d_mlp is None:
            raise MissingHookError(f"this {type(self.model).__name__} has no MLP layers")
        with torch.no_grad():
            return MLPWeights.from_layers([self._layer_mlp(layer) for layer in range(self.n_layers)])

    def embedding_weights(self) -> EmbeddingWeights:
        with torch.no_grad():
            e = self._embedding()
            b_U = e.get("b_U")
            if b_U is None:
                b_U = e["W_U"].new_zeros(e["W_U"].shape[-1])
            return EmbeddingWeights(W_E=e["W_E"], W_U=e["W_U"], b_U=b_U, W_pos=e.get("W_pos"))

    def rotary_angles(self, layer: int) -> tuple[Float[Tensor, " pairs"], bool]:
        """(ω_j, adjacent) of ``layer``'s rotary position embedding (METHODS §2): the angle by which
        it turns coordinate pair j of a head between positions one apart, float64 on the CPU, and
        whether the pairs are (2j, 2j + 1) (TransformerLens' ``rotary_adjacent_pairs``; else (j, j +
        pairs)). Here TransformerLens' formula rotary_base^(−2j/rotary_dim); backends that hold the
        angles the forward uses read those instead. The count at full rank depends only on how many
        frequencies coincide; the layout matters only for factors rank-deficient on a rotary pair."""
        c = self.model.cfg
        rotary_dim = getattr(c, "rotary_dim", None) or self.d_head
        angles = c.rotary_base ** (-torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
        return angles, bool(getattr(c, "rotary_adjacent_pairs", False))

    #: Whether the gated MLP adds ``b_in`` after the product act(x W_gate) ⊙ x W_in (TransformerLens'
    #: GatedMLP), so that it is the bias of neither map; Hugging Face's up/gate projections carry their own.
    gated_bias_after_product: ClassVar[bool] = False

    def map_biases(self, layer: int) -> dict[str, bool]:
        """Which linear maps of ``layer`` (W_Q, W_K, W_V, W_O and, with an MLP, W_in, W_gate, W_out) add
        a bias of their own to their output, p = W f + b. Where one does, moving W along a direction c
        on which the input is constant on the data (cᵀ(f − μ) = 0) and b by −(cᵀμ)·(that change's
        row) leaves the function unchanged, so the count of W's free directions reads the centred
        covariance of f (METHODS §4). A stored LayerNorm bias adds such a constant; folded into b_Q …
        it does not, and the count must not depend on which (:func:`tl_degeneracy.degeneracy_counts`)."""
        attention = self._layer_attention(layer)
        biases = {f"W_{x}": attention.get(f"b_{x}") is not None for x in "QKVO"}
        if self.d_mlp is not None:
            mlp = self._layer_mlp(layer)
            own_b_in = not (self.cfg.gated_mlp and self.gated_bias_after_product)
            biases.update(W_in=own_b_in and mlp.get("b_in") is not None, W_gate=mlp.get("b_gate") is not None,
                          W_out=mlp.get("b_out") is not None)
        return biases

    def layer_attention(self, layer: int) -> dict[str, Tensor | None]:
        """Layer ``layer``'s attention tensors as the backend exposes them, in TransformerLens layout:
        W_Q [H,D,d], W_K/W_V [n_kv,D,d] (not GQA-expanded), W_O [H,d,D], b_Q [H,d], b_K/b_V [n_kv,d],
        b_O [D]; None for a missing bias. Neither copied nor detached: on every backend they are
        re-layouts of the live parameters, which is what measuring and writing head weights relies on
        (``models.selection.measure_parameter``, ``gauge.write_attention``)."""
        return self._layer_attention(layer)

    # ------------------------------------------------------------------ parameters
    def _canonical_name(self, slot: str) -> str:
        return slot

    def _component_of(self, name: str) -> str | None:
        """The component a canonical parameter name belongs to: ``"blocks.L.attn"``,
        ``"blocks.L.mlp"``, ``"blocks.L.ln1"``, ``"embed"``, ``"pos_embed"``, ``"unembed"``,
        ``"ln_final"``, or None. The default reads TransformerLens-style names, backends with other
        names override it."""
        m = _BLOCK_COMPONENT.match(name)
        if m:
            return f"blocks.{m[1]}.{m[2]}"
        m = _MODEL_COMPONENT.match(name)
        return m[1] if m else None

    def parameter_components(self, lp) -> set[str]:
        """The components (as :meth:`_component_of` names them) a live parameter ``lp`` belongs to,
        over all its slots: a tied embedding is both ``embed`` and ``unembed``. Parameter selections
        (``models.selection``) and the gauges (which parameters hold a layer's attention) read this."""
        names = {lp.name} | {self._canonical_name(slot) for slot in lp.slots}
        return {c for c in map(self._component_of, names) if c is not None}

    def example_tokens(self, batch: int = 1, pos: int = 8) -> Int[Tensor, "batch pos"]:
        """Valid tokens for probing the model (e.g. to find live parameters)."""
        g = torch.Generator().manual_seed(0)
        pos = min(pos, self.n_ctx)
        return torch.randint(0, self.d_vocab, (batch, pos), generator=g).to(self.device)

    def check_finite(self) -> None:
        """Refuse weights that hold NaN or ±∞, naming the first such parameter.

        Every analysis reads the weights (the spectra of METHODS §2 directly, the others through the
        forward pass), and non-finite weights would fail each in its own way, deep inside. Every
        parameter tensor of the module is read (dead copies too): telling live from dead takes a
        backward pass, which a weight-space analysis should not need.

        Raises:
            NumericalError: the first non-finite tensor, its NaN and ±∞ counts, and how many others.
        """
        bad = [(self._canonical_name(slot), p.detach()) for slot, p in self.model.named_parameters()
               if not bool(torch.isfinite(p.detach()).all())]
        if not bad:
            return
        name, t = bad[0]
        n_nan, n_inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
        others = ""
        if len(bad) > 1:
            names = ", ".join(n for n, _ in bad[1:4]) + (" …" if len(bad) > 4 else "")
            others = f" (and {len(bad) - 1} other tensor(s): {names})"
        raise NumericalError(
            f"the model's weights are not finite: parameter {name} {list(t.shape)} holds {n_nan} NaN and "
            f"{n_inf} ±inf entries of {t.numel():,}{others}. Every analysis reads the weights, so none can run; load "
            "weights that are finite (non-finite weights usually come from a diverged training run or a damaged file)"
        )

    def live_parameters(self) -> ParameterSet:
        """Parameters that reach the output, each tensor once, with stable names (cached).

        Found with one backward pass of the logits; dead duplicates (the bridge's joint-QKV copies)
        get no gradient and are left out; tied tensors appear once with all their slots.
        """
        if self._live is None:
            self._live = self._find_live_parameters()
        return self._live

    def unchecked_live_parameters(self) -> ParameterSet:
        """What :meth:`live_parameters` finds, without the checks a backend adds to it, and not cached
        when found here. A backend refuses its live set where it would be incomplete (the
        TransformerLens 3.x bridge in compatibility mode computes gated-MLP weights from detached
        copies); a caller that writes only some parameters (the gauges: attention weights) can still
        use the ones the backward pass reaches, without any other analysis seeing that partial set."""
        return self._live if self._live is not None else self._find_live_parameters()

    def _find_live_parameters(self) -> ParameterSet:
        def loss():
            # Tokens made here, inside the probe's autograd region: ones made under the caller's
            # inference_mode could not be saved for the embedding's backward.
            with self.eval_mode():
                return self._logits(self.model(self.example_tokens())).float().square().mean()

        return find_live_parameters(self.model, loss, self._canonical_name)

    # ------------------------------------------------------------------ perturbed forward
    def _call_with(self, values: Mapping[str, Tensor], tokens: Tensor, under: Mapping[str, Tensor] | None = None) -> Tensor:
        """Forward with the live tensors named in ``values`` replaced by the given values (and the
        module paths in ``under`` by theirs, where ``values`` does not replace them).

        Every slot of a tied tensor is replaced, ``tie_weights=False`` and one name per slot keep
        the bridge from leaking the replacement into the model (research/transformerlens.md §1.7).
        """
        live = self.live_parameters()
        swap = {**(under or {}), **{slot: v for name, v in values.items() for slot in live[name].slots}}
        return self._logits(functional_call(self.model, swap, (tokens,), tie_weights=False, strict=False))

    def perturbed_forward(
        self,
        deltas: Mapping[str, Tensor],
        tokens: Int[Tensor, "batch pos"],
        *,
        chains: bool = False,
        under: Mapping[str, Tensor] | None = None,
    ) -> Tensor:
        """Logits at θ* + Δ, differentiable in Δ; the model itself is never changed.

        ``deltas`` maps live-parameter names to perturbations of the parameter's shape (omitted
        parameters stay at θ*). With ``chains=True`` every delta carries a leading chain axis C and
        the result is [C, batch, pos, vocab], computed in one batched call with ``torch.func.vmap``
        where the backend allows it, else chain by chain. Always in eval mode. ``under``: tensors
        read instead of the model's at those module paths (where no delta applies), e.g. the
        widened weights and buffers of :func:`~tl_degeneracy.models.parameters.widened_state`.
        """
        live = self.live_parameters()
        for name, d in deltas.items():
            shape = live[name].shape
            expected = d.shape[1:] if chains else d.shape
            if tuple(expected) != shape:
                axis = "[chains, *shape]" if chains else "the parameter's shape"
                raise ValueError(f"delta for {name!r} has shape {tuple(d.shape)}; expected {axis} with shape {shape}")

        def single(ds: Mapping[str, Tensor]) -> Tensor:
            return self._call_with({n: live[n].param.detach() + d for n, d in ds.items()}, tokens, under=under)

        with self.eval_mode():
            if not chains:
                return single(deltas)
            return self._chain_map(single, deltas)
