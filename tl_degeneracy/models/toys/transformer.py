"""A small GPT-style decoder with TransformerLens hook points and TL-named weights.

Pre-norm blocks (LayerNorm with learned w/b), learned absolute positions, causal multi-head
attention with biases, a GELU (or ReLU) MLP and an untied unembedding with bias. Options drop the
LayerNorms (``normalization=None``, as TransformerLens' ``normalization_type=None``) and the biases
(``bias=False``), and give the unembedding its own width (``d_vocab_out``): together they make the
Nanda et al. modular-addition model (METHODS §7, :mod:`.modadd`). Module, parameter
and hook names follow the legacy ``HookedTransformer`` ones (``blocks.0.attn.W_Q``,
``blocks.0.attn.hook_q`` …), so :data:`tl_degeneracy.models.hooks.TL_HOOK_TEMPLATES` apply
unchanged and every TransformerLens habit (``run_with_cache``, ``run_with_hooks``) works on it.

The forward pass is written without in-place operations and builds its causal mask per call, so
``torch.func.functional_call`` and ``torch.func.vmap`` over parameter deltas (the adapter's
perturbed forward with a chain axis) run it unchanged.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from ..config import ModelConfig
from ..hooks import TL_HOOK_TEMPLATES
from .base import ToyModel

ACT_FNS = {"gelu": F.gelu, "relu": F.relu}


class LayerNorm(nn.Module):
    """LayerNorm as TransformerLens writes it: ``hook_scale`` is the per-position standard deviation
    [batch, pos, 1]; ``hook_normalized`` is x/σ, before the learned ``w`` and ``b``, as in
    TransformerLens' LayerNorm and the bridge's (audit 23a F2: it fired after them, so the hook kind
    ``ln_final`` named other activations here than there, rank 16 against 15 for the same weights)."""

    def __init__(self, d_model: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.w = nn.Parameter(torch.ones(d_model))
        self.b = nn.Parameter(torch.zeros(d_model))
        self.hook_scale = HookPoint()
        self.hook_normalized = HookPoint()

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        x = x - x.mean(-1, keepdim=True)
        scale = self.hook_scale((x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())
        return self.hook_normalized(x / scale) * self.w + self.b


def _bias(shape: tuple[int, ...], bias: bool) -> nn.Parameter | None:
    """A zero-initialised bias, or None (registered as an absent parameter) when ``bias`` is off."""
    return nn.Parameter(torch.zeros(shape)) if bias else None


def _add_bias(x: Tensor, b: Tensor | None) -> Tensor:
    return x if b is None else x + b


class Attention(nn.Module):
    """Causal multi-head attention in TL layout: q = x W_Q + b_Q per head, output Σ_h z_h W_O^h + b_O
    (the biases are absent, i.e. zero, with ``bias=False``)."""

    def __init__(self, d_model: int, n_heads: int, d_head: int, bias: bool = True):
        super().__init__()
        self.n_heads, self.d_head = n_heads, d_head
        self.W_Q = nn.Parameter(torch.empty(n_heads, d_model, d_head))
        self.W_K = nn.Parameter(torch.empty(n_heads, d_model, d_head))
        self.W_V = nn.Parameter(torch.empty(n_heads, d_model, d_head))
        self.W_O = nn.Parameter(torch.empty(n_heads, d_head, d_model))
        self.b_Q = _bias((n_heads, d_head), bias)
        self.b_K = _bias((n_heads, d_head), bias)
        self.b_V = _bias((n_heads, d_head), bias)
        self.b_O = _bias((d_model,), bias)
        self.hook_q = HookPoint()  # [batch, pos, head, d_head]
        self.hook_k = HookPoint()
        self.hook_v = HookPoint()
        self.hook_attn_scores = HookPoint()  # [batch, head, query_pos, key_pos], masked with -inf
        self.hook_pattern = HookPoint()
        self.hook_z = HookPoint()  # [batch, pos, head, d_head]

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        q = self.hook_q(_add_bias(torch.einsum("bpm,hmd->bphd", x, self.W_Q), self.b_Q))
        k = self.hook_k(_add_bias(torch.einsum("bpm,hmd->bphd", x, self.W_K), self.b_K))
        v = self.hook_v(_add_bias(torch.einsum("bpm,hmd->bphd", x, self.W_V), self.b_V))
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(self.d_head)
        # The mask is built per call (not a buffer) so a change of device or dtype, a
        # functional_call or a vmap never meets a stale or wrongly sized mask. -inf matches what
        # HookedTransformer writes to hook_attn_scores, so the hook means the same on every backend.
        n_pos = x.shape[-2]
        causal = torch.ones(n_pos, n_pos, dtype=torch.bool, device=x.device).tril()
        scores = self.hook_attn_scores(scores.masked_fill(~causal, float("-inf")))
        pattern = self.hook_pattern(scores.softmax(dim=-1))
        z = self.hook_z(torch.einsum("bhqk,bkhd->bqhd", pattern, v))
        return _add_bias(torch.einsum("bqhd,hdm->bqm", z, self.W_O), self.b_O)


class MLP(nn.Module):
    """post = act(x W_in + b_in), out = post W_out + b_out (no biases with ``bias=False``)."""

    def __init__(self, d_model: int, d_mlp: int, act_fn: str, bias: bool = True):
        super().__init__()
        self.act = ACT_FNS[act_fn]
        self.W_in = nn.Parameter(torch.empty(d_model, d_mlp))
        self.b_in = _bias((d_mlp,), bias)
        self.W_out = nn.Parameter(torch.empty(d_mlp, d_model))
        self.b_out = _bias((d_model,), bias)
        self.hook_pre = HookPoint()
        self.hook_post = HookPoint()

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        pre = self.hook_pre(_add_bias(x @ self.W_in, self.b_in))
        post = self.hook_post(self.act(pre))
        return _add_bias(post @ self.W_out, self.b_out)


def _norm(d_model: int, normalization: str | None) -> nn.Module:
    # Without normalization the module is an identity with no hooks, as in TransformerLens.
    return LayerNorm(d_model) if normalization == "LN" else nn.Identity()


class TransformerBlock(nn.Module):
    """Pre-norm block: resid_mid = resid_pre + attn(ln1(resid_pre)); resid_post = resid_mid + mlp(ln2(resid_mid))."""

    def __init__(self, d_model: int, n_heads: int, d_head: int, d_mlp: int, act_fn: str,
                 normalization: str | None = "LN", bias: bool = True):
        super().__init__()
        self.ln1 = _norm(d_model, normalization)
        self.attn = Attention(d_model, n_heads, d_head, bias)
        self.ln2 = _norm(d_model, normalization)
        self.mlp = MLP(d_model, d_mlp, act_fn, bias)
        self.hook_resid_pre = HookPoint()
        self.hook_attn_out = HookPoint()
        self.hook_resid_mid = HookPoint()
        self.hook_mlp_out = HookPoint()
        self.hook_resid_post = HookPoint()

    def forward(self, resid_pre: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        resid_pre = self.hook_resid_pre(resid_pre)
        attn_out = self.hook_attn_out(self.attn(self.ln1(resid_pre)))
        resid_mid = self.hook_resid_mid(resid_pre + attn_out)
        mlp_out = self.hook_mlp_out(self.mlp(self.ln2(resid_mid)))
        return self.hook_resid_post(resid_mid + mlp_out)


class Embed(nn.Module):
    def __init__(self, d_vocab: int, d_model: int):
        super().__init__()
        self.W_E = nn.Parameter(torch.empty(d_vocab, d_model))

    def forward(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_model"]:
        return self.W_E[tokens]


class PosEmbed(nn.Module):
    def __init__(self, n_ctx: int, d_model: int):
        super().__init__()
        self.W_pos = nn.Parameter(torch.empty(n_ctx, d_model))

    def forward(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_model"]:
        batch, n_pos = tokens.shape
        # Broadcast to [batch, pos, d_model] like TransformerLens' hook_pos_embed.
        return self.W_pos[:n_pos].expand(batch, n_pos, self.W_pos.shape[-1])


class Unembed(nn.Module):
    def __init__(self, d_model: int, d_vocab_out: int, bias: bool = True):
        super().__init__()
        self.W_U = nn.Parameter(torch.empty(d_model, d_vocab_out))
        self.b_U = _bias((d_vocab_out,), bias)

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_vocab_out"]:
        return _add_bias(x @ self.W_U, self.b_U)


class ToyTransformer(ToyModel):
    """A GPT-style decoder-only transformer (pre-norm LayerNorm, learned positions, causal
    attention, GELU/ReLU MLP, untied unembedding with bias), laid out like ``HookedTransformer``.

    Args:
        n_layers, d_model, n_heads, d_head, d_mlp, d_vocab, n_ctx: sizes, in TL terms.
        act_fn: ``"gelu"`` (exact, erf form) or ``"relu"``.
        seed: seeds the initialisation (a private generator; the global RNG is left alone).
        normalization: ``"LN"`` (pre-norm LayerNorms and a final one) or None (no norms at all; the
            ``ln_final`` hook kind is then missing).
        bias: False drops every bias (b_Q, b_K, b_V, b_O, b_in, b_out, b_U): they are not parameters.
        d_vocab_out: width of the unembedding (default ``d_vocab``), as TL's ``d_vocab_out``.

    ``forward(tokens)`` takes integer tokens [batch, pos] with pos ≤ n_ctx and returns logits
    [batch, pos, d_vocab_out].
    """

    HOOK_TEMPLATES: ClassVar[dict[str, str]] = dict(TL_HOOK_TEMPLATES)
    MISSING_HOOKS: ClassVar[dict[str, str]] = {}

    def __init__(
        self,
        n_layers: int,
        d_model: int,
        n_heads: int,
        d_head: int,
        d_mlp: int,
        d_vocab: int,
        n_ctx: int,
        act_fn: str = "gelu",
        seed: int = 0,
        normalization: str | None = "LN",
        bias: bool = True,
        d_vocab_out: int | None = None,
    ):
        super().__init__()
        d_vocab_out = d_vocab if d_vocab_out is None else d_vocab_out
        sizes = dict(n_layers=n_layers, d_model=d_model, n_heads=n_heads, d_head=d_head, d_mlp=d_mlp,
                     d_vocab=d_vocab, n_ctx=n_ctx, d_vocab_out=d_vocab_out)
        bad = {k: v for k, v in sizes.items() if not (isinstance(v, int) and v > 0)}
        if bad:
            raise ValueError(f"ToyTransformer sizes must be positive integers; got {bad}")
        if act_fn not in ACT_FNS:
            raise ValueError(f"act_fn must be one of {sorted(ACT_FNS)}; got {act_fn!r}")
        if normalization not in ("LN", None):
            raise ValueError(f"normalization must be 'LN' or None; got {normalization!r}")
        # The options enter the constructor arguments only where they differ from the defaults, so
        # the arguments (and checkpoints) of the default architecture read as they always have.
        options = dict(normalization=normalization, bias=bool(bias), d_vocab_out=d_vocab_out)
        defaults = dict(normalization="LN", bias=True, d_vocab_out=d_vocab)
        self._kwargs = dict(
            {k: v for k, v in sizes.items() if k != "d_vocab_out"}, act_fn=act_fn, seed=int(seed),
            **{k: v for k, v in options.items() if v != defaults[k]},
        )
        if normalization is None:
            # Per instance: the class-level table describes the default (normed) architecture.
            self.MISSING_HOOKS = {"ln_final": "it has no normalization layers (normalization=None); the "
                                  f"unembedding reads blocks.{n_layers - 1}.hook_resid_post directly"}

        self.embed = Embed(d_vocab, d_model)
        self.hook_embed = HookPoint()
        self.pos_embed = PosEmbed(n_ctx, d_model)
        self.hook_pos_embed = HookPoint()
        self.blocks = nn.ModuleList(
            TransformerBlock(d_model, n_heads, d_head, d_mlp, act_fn, normalization, bias) for _ in range(n_layers)
        )
        self.ln_final = _norm(d_model, normalization)
        self.unembed = Unembed(d_model, d_vocab_out, bias)
        self._init_weights(int(seed))
        self.setup()

    def _init_weights(self, seed: int) -> None:
        """GPT-2 style: N(0, 0.02) for every matrix, the two matrices that write into the residual
        stream (W_O, W_out) shrunk by 1/sqrt(2 n_layers) so the residual norm does not grow with
        depth; biases zero, LayerNorm w = 1, b = 0 (set in the modules)."""
        g = torch.Generator().manual_seed(seed)
        residual_scale = 1.0 / math.sqrt(2 * self._kwargs["n_layers"])
        with torch.no_grad():
            for name, p in self.named_parameters():
                leaf = name.rsplit(".", 1)[-1]
                if leaf.startswith("W_"):
                    std = 0.02 * (residual_scale if leaf in ("W_O", "W_out") else 1.0)
                    p.copy_(torch.randn(p.shape, generator=g) * std)

    # ------------------------------------------------------------------ forward
    def _check_tokens(self, tokens: Tensor) -> None:
        if not isinstance(tokens, Tensor):
            raise TypeError(f"tokens must be a torch.Tensor [batch, pos]; got {type(tokens).__name__}")
        if tokens.ndim != 2:
            raise ValueError(
                f"tokens must be 2-D [batch, pos]; got shape {tuple(tokens.shape)}"
                + (" (add a batch axis with tokens[None])" if tokens.ndim == 1 else "")
            )
        if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
            raise TypeError(f"tokens must be an integer (torch.long) tensor; got dtype {tokens.dtype}")
        n_ctx = self._kwargs["n_ctx"]
        if tokens.shape[1] > n_ctx:
            raise ValueError(f"sequence of {tokens.shape[1]} positions is longer than n_ctx={n_ctx}; cut it to ≤ {n_ctx}")
        # The range check reads the tokens' values: a compiled forward (behavioral_llc(compile=True),
        # whose tokens token_batches already validated) skips it rather than break its graph there.
        if tokens.numel() and not torch.compiler.is_compiling() and (bool(tokens.min() < 0) or bool(tokens.max() >= self._kwargs["d_vocab"])):
            raise ValueError(
                f"token ids must lie in [0, {self._kwargs['d_vocab']}); got range "
                f"[{int(tokens.min())}, {int(tokens.max())}]"
            )

    def forward(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_vocab"]:
        """Logits for every position: position p sees tokens[:, :p + 1] only."""
        self._check_tokens(tokens)
        tokens = tokens.long()
        resid = self.hook_embed(self.embed(tokens)) + self.hook_pos_embed(self.pos_embed(tokens))
        for block in self.blocks:
            resid = block(resid)
        return self.unembed(self.ln_final(resid))

    # ------------------------------------------------------------------ description
    @property
    def cfg(self) -> ModelConfig:
        k = self._kwargs
        return ModelConfig(
            n_layers=k["n_layers"],
            n_heads=k["n_heads"],
            n_kv_heads=k["n_heads"],
            d_model=k["d_model"],
            d_head=k["d_head"],
            d_mlp=k["d_mlp"],
            d_vocab=k["d_vocab"],
            n_ctx=k["n_ctx"],
            act_fn=k["act_fn"],
            normalization=k.get("normalization", "LN"),
            parallel_attn_mlp=False,
            gated_mlp=False,
            positional_embedding="standard",
            tied_embeddings=False,
        )

    def init_kwargs(self) -> dict:
        return dict(self._kwargs)

    def layer_attention(self, layer: int) -> dict[str, Tensor | None]:
        a = self.blocks[layer].attn
        return dict(W_Q=a.W_Q, W_K=a.W_K, W_V=a.W_V, W_O=a.W_O, b_Q=a.b_Q, b_K=a.b_K, b_V=a.b_V, b_O=a.b_O)

    def layer_mlp(self, layer: int) -> dict[str, Tensor | None]:
        m = self.blocks[layer].mlp
        return dict(W_in=m.W_in, b_in=m.b_in, W_out=m.W_out, b_out=m.b_out, W_gate=None)

    def embedding(self) -> dict[str, Tensor | None]:
        return dict(W_E=self.embed.W_E, W_pos=self.pos_embed.W_pos, W_U=self.unembed.W_U, b_U=self.unembed.b_U)
