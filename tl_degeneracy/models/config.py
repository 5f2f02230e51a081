"""Architecture numbers read off a model, the same for every backend."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a transformer, in TransformerLens terms (METHODS §0).

    ``n_kv_heads`` equals ``n_heads`` unless the model uses grouped-query attention.
    ``normalization`` is ``"LN"``, ``"RMS"`` or ``None``; ``positional_embedding`` is
    ``"standard"`` (learned W_pos), ``"rotary"`` or ``None``.
    """

    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    d_head: int
    d_mlp: int | None
    d_vocab: int
    n_ctx: int
    act_fn: str | None
    normalization: str | None
    parallel_attn_mlp: bool
    gated_mlp: bool
    positional_embedding: str | None
    tied_embeddings: bool = False
    qk_norm: bool = False  # a norm between x W_Q / x W_K and the scores (Qwen3, OLMo2, Gemma3, use_qk_norm)
    default_prepend_bos: bool = False
    bos_token_id: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)
