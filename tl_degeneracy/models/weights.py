"""Per-head attention, MLP and embedding weights in TransformerLens layout (METHODS §0).

Every backend hands the adapter the tensors of one layer as it stores them (K/V with n_kv heads
under grouped-query attention, biases missing where the checkpoint has none). The dataclasses here
put them into one layout: stacked over layers, K/V expanded to one slice per query head, missing
biases as zeros, with the real n_kv tensors kept beside the expanded ones.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from jaxtyping import Float
from torch import Tensor


def expand_kv(t: Tensor, n_heads: int) -> Tensor:
    """Repeat a [n_kv, ...] tensor so that query head h reads KV head h // (n_heads / n_kv)."""
    n_kv = t.shape[0]
    if n_kv == n_heads:
        return t
    if n_heads % n_kv:
        raise ValueError(f"n_heads={n_heads} is not a multiple of n_kv_heads={n_kv}")
    return t.repeat_interleave(n_heads // n_kv, dim=0)


@dataclass(frozen=True)
class AttentionWeights:
    """Attention weights of every layer; row-vector convention q = x W_Q + b_Q, output z W_O + b_O.

    ``W_K``/``W_V``/``b_K``/``b_V`` have one slice per *query* head (GQA expanded);
    ``W_K_kv``/``W_V_kv``/``b_K_kv``/``b_V_kv`` are the tensors as stored, with n_kv heads. Use
    the expanded ones for per-head invariants and the ``_kv`` ones to count parameters.
    """

    W_Q: Float[Tensor, "layer head d_model d_head"]
    W_K: Float[Tensor, "layer head d_model d_head"]
    W_V: Float[Tensor, "layer head d_model d_head"]
    W_O: Float[Tensor, "layer head d_head d_model"]
    b_Q: Float[Tensor, "layer head d_head"]
    b_K: Float[Tensor, "layer head d_head"]
    b_V: Float[Tensor, "layer head d_head"]
    b_O: Float[Tensor, "layer d_model"]
    W_K_kv: Float[Tensor, "layer kv_head d_model d_head"]
    W_V_kv: Float[Tensor, "layer kv_head d_model d_head"]
    b_K_kv: Float[Tensor, "layer kv_head d_head"]
    b_V_kv: Float[Tensor, "layer kv_head d_head"]

    @classmethod
    def from_layers(cls, layers: list[dict[str, Tensor | None]], n_heads: int) -> "AttentionWeights":
        """Stack per-layer dicts (keys W_Q, W_K, W_V, W_O, b_Q, b_K, b_V, b_O; biases may be None)."""
        out: dict[str, list[Tensor]] = {f.name: [] for f in fields(cls)}
        for lw in layers:
            W_Q, W_K, W_V, W_O = lw["W_Q"], lw["W_K"], lw["W_V"], lw["W_O"]
            zeros_q = W_Q.new_zeros(W_Q.shape[0], W_Q.shape[-1])
            zeros_kv = W_K.new_zeros(W_K.shape[0], W_K.shape[-1])
            b_Q = lw.get("b_Q") if lw.get("b_Q") is not None else zeros_q
            b_K = lw.get("b_K") if lw.get("b_K") is not None else zeros_kv
            b_V = lw.get("b_V") if lw.get("b_V") is not None else zeros_kv.clone()
            b_O = lw.get("b_O") if lw.get("b_O") is not None else W_O.new_zeros(W_O.shape[-1])
            values = dict(
                W_Q=W_Q, W_K=expand_kv(W_K, n_heads), W_V=expand_kv(W_V, n_heads), W_O=W_O,
                b_Q=b_Q, b_K=expand_kv(b_K, n_heads), b_V=expand_kv(b_V, n_heads), b_O=b_O,
                W_K_kv=W_K, W_V_kv=W_V, b_K_kv=b_K, b_V_kv=b_V,
            )
            for k, v in values.items():
                out[k].append(v)
        return cls(**{k: torch.stack(v) for k, v in out.items()})


@dataclass(frozen=True)
class MLPWeights:
    """MLP weights of every layer: post = act(x W_in + b_in), out = post W_out + b_out.
    Gated MLPs (TransformerLens convention, HookedTransformer and bridge alike): post =
    act(x W_gate) ⊙ (x W_in) + b_in, with mlp.hook_pre = x W_gate. ``W_gate`` is None for ungated MLPs;
    ``b_gate``: the gate projection's own bias where a checkpoint stores one (a Hugging Face gated MLP
    with biases: post = act(x W_gate + b_gate) ⊙ (x W_in + b_in)), else None."""

    W_in: Float[Tensor, "layer d_model d_mlp"]
    b_in: Float[Tensor, "layer d_mlp"]
    W_out: Float[Tensor, "layer d_mlp d_model"]
    b_out: Float[Tensor, "layer d_model"]
    W_gate: Float[Tensor, "layer d_model d_mlp"] | None = None
    b_gate: Float[Tensor, "layer d_mlp"] | None = None

    @classmethod
    def from_layers(cls, layers: list[dict[str, Tensor | None]]) -> "MLPWeights":
        W_in = torch.stack([lw["W_in"] for lw in layers])
        W_out = torch.stack([lw["W_out"] for lw in layers])
        b_in = torch.stack([
            lw["b_in"] if lw.get("b_in") is not None else lw["W_in"].new_zeros(lw["W_in"].shape[-1])
            for lw in layers
        ])
        b_out = torch.stack([
            lw["b_out"] if lw.get("b_out") is not None else lw["W_out"].new_zeros(lw["W_out"].shape[-1])
            for lw in layers
        ])
        gates = [lw.get("W_gate") for lw in layers]
        W_gate = torch.stack(gates) if all(g is not None for g in gates) else None
        gate_biases = [lw.get("b_gate") for lw in layers]
        b_gate = torch.stack(gate_biases) if W_gate is not None and all(b is not None for b in gate_biases) else None
        return cls(W_in=W_in, b_in=b_in, W_out=W_out, b_out=b_out, W_gate=W_gate, b_gate=b_gate)


@dataclass(frozen=True)
class EmbeddingWeights:
    """Token embedding, learned positions (None for rotary or no positions), unembedding."""

    W_E: Float[Tensor, "d_vocab d_model"]
    W_U: Float[Tensor, "d_model d_vocab_out"]
    b_U: Float[Tensor, "d_vocab_out"]
    W_pos: Float[Tensor, "n_ctx d_model"] | None = None
