"""Sparse modular addition (SMA): the toy task, model and trainer of METHODS §7.

Task (``sma_data``): tokens x_1..x_T drawn i.i.d. uniformly from {0..p-1}; the label is
(x_1 + … + x_k) mod p, with T = 12 and k = 5 by default. Only the first k positions matter.

Model (:class:`SparseModularAddition`): the one-layer "cross-attention" network of Odonnat, Bouaziz
& Cabannes, *Easing Optimization Paths: a Circuit Perspective* (ICASSP 2025;
``../seeds/002_*.txt``), re-written from the description in ``research/toy_tasks.md`` §1.3 as a
TransformerLens ``HookedRootModule`` with TL-named weights and hook points:

    h      = RMSNorm(E[x] + P)                      weightless RMSNorm, x / (rms(x) + 1e-5)
    a      = softmax_t(q · h_t / √d)                one learned query vector q, keys = h (no W_K)
    z      = Σ_t a_t (h_t W_V)                      no W_O, no residual: z replaces the stream
    z      = z + GELU(RMSNorm(z) W_in + b_in) W_out + b_out
    logits = z Eᵀ                                   unembedding tied to the token embedding

There is **one prediction per sequence**: every activation after the attention keeps a position
axis of length 1, and ``forward(tokens [b, T])`` returns logits [b, 1, V] with V = ``nb_emb`` (the
number of embedding rows, which may exceed the task's p so that a curriculum p = 2 → 4 needs no
resize). The adapter and the statistics read "position axis of length 1" as "one sample per
sequence" (METHODS §0).

Trainer (:func:`train_sma`): full-batch Adam with a fresh optimiser at every phase of a
``p_schedule``. From scratch at p = 4 the d = 32, width-128 model memorises; after a p = 2 phase it
generalises (METHODS §7). Which happens depends on the seed; the bundled checkpoints record theirs.
Run ``python -m tl_degeneracy.models.toys.sma --help`` for the command line.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from ...errors import DataError
from ..config import ModelConfig
from .transformer import MLP
from ..hooks import TL_HOOK_TEMPLATES
from . import training
from .base import ToyModel

#: The RMSNorm epsilon of the original model: added to the RMS, not inside the square root.
RMS_EPS = 1e-5


# ============================================================================ data
def sma_data(
    n: int, p: int, T: int = 12, k: int = 5, seed: int = 0
) -> tuple[Int[Tensor, "n T"], Int[Tensor, "n"]]:
    """``n`` SMA sequences: tokens uniform in {0..p-1} and labels (x_1 + … + x_k) mod p.

    Deterministic in ``seed`` (NumPy's PCG64 generator, stable across platforms and versions).
    Returns ``(tokens [n, T], labels [n])``, both ``torch.long``. Note that at p = 2 only 2^T
    distinct sequences exist, so large draws repeat sequences and two draws overlap.
    """
    if p < 2:
        raise ValueError(f"p={p}: the task needs at least 2 residues")
    if not 1 <= k <= T:
        raise ValueError(f"k={k} must lie in 1..T={T} (the label sums the first k of T tokens)")
    if n < 0:
        raise ValueError(f"n={n} must be non-negative")
    rng = np.random.default_rng(seed)
    tokens = torch.from_numpy(rng.integers(0, p, size=(n, T), dtype=np.int64))
    return tokens, sma_labels(tokens, p, k)


def sma_labels(tokens: Int[Tensor, "n T"], p: int, k: int = 5) -> Int[Tensor, "n"]:
    """The SMA label of each sequence: the sum of its first ``k`` tokens, mod ``p``."""
    return tokens[:, :k].sum(dim=1) % p


# ============================================================================ model
def rms_normalize(x: Float[Tensor, "... d"]) -> Float[Tensor, "... d"]:
    """Weightless RMSNorm of the original model: x / (sqrt(mean(x²)) + 1e-5).

    It has no learned scale, so it commutes with every orthogonal map of the last axis; that is
    the O(d) symmetry of the whole model (research/toy_tasks.md §1.6).
    """
    # rms = ||x|| / √d; one norm and one reciprocal on the [..., 1] scale keep the backward cheap.
    rms = torch.linalg.vector_norm(x, dim=-1, keepdim=True) / math.sqrt(x.shape[-1])
    return x * (rms + RMS_EPS).reciprocal()


class RMSNormPre(nn.Module):
    """Weightless RMSNorm with TransformerLens's ``hook_normalized`` (its output)."""

    def __init__(self):
        super().__init__()
        self.hook_normalized = HookPoint()

    def forward(self, x: Float[Tensor, "batch pos d"]) -> Float[Tensor, "batch pos d"]:
        return self.hook_normalized(rms_normalize(x))


class Embed(nn.Module):
    """Token embedding E [nb_emb, d]; also the (tied) unembedding."""

    def __init__(self, nb_emb: int, d: int):
        super().__init__()
        self.W_E = nn.Parameter(torch.empty(nb_emb, d))

    def forward(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d"]:
        # A one-hot matmul rather than indexing: its backward is a matmul, not a scatter-add (much
        # faster in full-batch training), and vmap over a batched W_E works unchanged.
        return F.one_hot(tokens, self.W_E.shape[0]).to(self.W_E.dtype) @ self.W_E


class PosEmbed(nn.Module):
    """Learned positions P [T, d], added on every dimension."""

    def __init__(self, T: int, d: int):
        super().__init__()
        self.W_pos = nn.Parameter(torch.empty(T, d))

    def forward(self, n_pos: int) -> Float[Tensor, "pos d"]:
        return self.W_pos[:n_pos]


class QueryVectorAttention(nn.Module):
    """One head attending from a learned, input-independent query vector to every position.

    scores_t = q · h_t / √d (keys are the normalised inputs themselves), a = softmax_t(scores),
    z = Σ_t a_t (h_t W_V). Nothing is masked: the single query sees all positions. ``q`` has shape
    [1 head, d] and ``W_V`` [1 head, d, d] so that per-head selections slice the leading axis.
    """

    def __init__(self, d: int):
        super().__init__()
        self.d = d
        self.q = nn.Parameter(torch.empty(1, d))
        self.W_V = nn.Parameter(torch.empty(1, d, d))
        self.hook_v = HookPoint()  # [batch, pos, head, d_head]
        self.hook_attn_scores = HookPoint()  # [batch, head, query_pos = 1, key_pos]
        self.hook_pattern = HookPoint()  # [batch, head, query_pos = 1, key_pos]
        self.hook_z = HookPoint()  # [batch, query_pos = 1, head, d_head]

    def forward(self, h: Float[Tensor, "batch pos d"]) -> Float[Tensor, "batch 1 head d"]:
        # Written as plain matmuls and a broadcast sum rather than einsums: einsum lowers the
        # weighted sum over positions to thousands of tiny batched matmuls, several times slower on
        # CPU for the full-batch training this toy is made for.
        b, t, _ = h.shape
        n_heads, _, d_head = self.W_V.shape
        W_V = self.W_V.permute(1, 0, 2).reshape(self.d, n_heads * d_head)  # [d, head·d_head]
        v = self.hook_v((h @ W_V).view(b, t, n_heads, d_head))
        scores = (h @ self.q.T).transpose(1, 2)[:, :, None, :] / math.sqrt(self.d)  # [b, head, 1, t]
        scores = self.hook_attn_scores(scores)
        pattern = self.hook_pattern(scores.softmax(dim=-1))
        weights = pattern[:, :, 0, :].transpose(1, 2)[..., None]  # [b, t, head, 1]
        return self.hook_z((weights * v).sum(dim=1, keepdim=True))


class SMABlock(nn.Module):
    """The single block: attention without residual or W_O, then a residual pre-norm MLP."""

    def __init__(self, d: int, d_mlp: int):
        super().__init__()
        self.hook_resid_pre = HookPoint()  # [batch, T, d]: E[x] + P, before the norm
        self.ln1 = RMSNormPre()  # [batch, T, d]: the keys of the attention
        self.attn = QueryVectorAttention(d)
        self.hook_attn_out = HookPoint()  # [batch, 1, d]: z (W_O = I)
        self.ln2 = RMSNormPre()  # [batch, 1, d]
        self.mlp = MLP(d, d_mlp, act_fn="gelu")  # exact (erf) GELU, as in the seed paper
        self.hook_mlp_out = HookPoint()  # [batch, 1, d]
        self.hook_resid_post = HookPoint()  # [batch, 1, d]

    def forward(self, resid_pre: Float[Tensor, "batch pos d"]) -> Float[Tensor, "batch 1 d"]:
        h = self.ln1(self.hook_resid_pre(resid_pre))
        z = self.attn(h)
        # W_O is the identity and there is one head, so the attention output is z itself; it
        # *replaces* the stream (no residual around the attention).
        attn_out = self.hook_attn_out(z.flatten(start_dim=-2))
        mlp_out = self.hook_mlp_out(self.mlp(self.ln2(attn_out)))
        return self.hook_resid_post(attn_out + mlp_out)


class SparseModularAddition(ToyModel):
    """The sparse-modular-addition model of METHODS §7 as a TransformerLens ``HookedRootModule``.

    Args:
        p_max: ``nb_emb``, the number of embedding rows (= the output vocabulary V). Tokens must lie
            in {0..p_max-1}. Default 4, so that a model trained at p = 2 continues at p = 4 unresized.
        d: model width (d_model = d_head). Default 32.
        d_mlp: MLP width F. Default 128.
        seq_len: T, the number of positions (n_ctx). Default 12.
        seed: seed of the initialisation (a private ``torch.Generator``; global RNG untouched).

    Parameters (TL names): ``embed.W_E`` [V, d], ``pos_embed.W_pos`` [T, d],
    ``blocks.0.attn.q`` [1, d] (the query vector, one head), ``blocks.0.attn.W_V`` [1, d, d],
    ``blocks.0.mlp.W_in`` [d, F], ``b_in`` [F], ``W_out`` [F, d], ``b_out`` [d]. Count:
    V·d + T·d + d + d² + 2·d·F + F + d, i.e. 9,920 at (V, T, d, F) = (4, 12, 32, 128) and 200 at
    (4, 12, 2, 32). W_O = I and W_U = W_Eᵀ are not parameters; the weight readers expose them.

    Initialisation follows the original PyTorch defaults: E, P ~ N(0, 1) (``nn.Embedding``);
    q, W_V, W_in, b_in ~ U(±1/√d) and W_out, b_out ~ U(±1/√F) (``nn.Linear``).

    ``forward(tokens [b, t])`` with 1 ≤ t ≤ T returns logits [b, 1, V]; positions beyond t are
    simply absent (the trained checkpoints only ever saw t = T). Hook shapes: ``hook_embed``,
    ``hook_pos_embed``, ``blocks.0.hook_resid_pre``, ``blocks.0.ln1.hook_normalized`` [b, t, d];
    ``blocks.0.attn.hook_v`` [b, t, 1, d]; ``hook_attn_scores``/``hook_pattern`` [b, 1, 1, t]
    (scaled by 1/√d, unmasked); ``hook_z`` [b, 1, 1, d]; ``blocks.0.hook_attn_out``,
    ``blocks.0.ln2.hook_normalized``, ``hook_mlp_out``, ``hook_resid_post`` [b, 1, d];
    ``blocks.0.mlp.hook_pre``/``hook_post`` [b, 1, F].
    """

    HOOK_TEMPLATES: ClassVar[dict[str, str]] = {
        kind: TL_HOOK_TEMPLATES[kind]
        for kind in (
            "embed", "resid_pre", "resid_post", "attn_scores", "attn_pattern", "v", "z",
            "attn_out", "mlp_pre", "mlp_post", "mlp_out",
        )
    }
    MISSING_HOOKS: ClassVar[dict[str, str]] = {
        "resid_mid": "there is no residual connection around the attention (its output z replaces "
        "the stream); the MLP input before its norm is blocks.0.hook_attn_out",
        "q": "there is no query projection: the query is one learned, input-independent vector "
        "(parameter blocks.0.attn.q, b_Q in the weight readers)",
        "k": "there is no key projection: the keys are the RMS-normalised inputs themselves "
        "(hook blocks.0.ln1.hook_normalized; W_K = I in the weight readers)",
        "ln_final": "there is no final norm: the logits are blocks.0.hook_resid_post @ W_E^T",
    }

    def __init__(self, p_max: int = 4, d: int = 32, d_mlp: int = 128, seq_len: int = 12, seed: int = 0):
        super().__init__()
        for name, value in (("p_max", p_max), ("d", d), ("d_mlp", d_mlp), ("seq_len", seq_len)):
            if int(value) < 1:
                raise ValueError(f"{name}={value} must be a positive integer")
        self.p_max, self.d, self.d_mlp, self.seq_len, self.seed = int(p_max), int(d), int(d_mlp), int(seq_len), int(seed)
        self.embed = Embed(self.p_max, self.d)
        self.hook_embed = HookPoint()  # [batch, pos, d]
        self.pos_embed = PosEmbed(self.seq_len, self.d)
        self.hook_pos_embed = HookPoint()  # [batch, pos, d]
        self.blocks = nn.ModuleList([SMABlock(self.d, self.d_mlp)])
        self.reset_parameters(self.seed)
        self.setup()

    @torch.no_grad()
    def reset_parameters(self, seed: int) -> None:
        """Draw all weights from a private generator, in a fixed order (see the class docstring)."""
        g = torch.Generator().manual_seed(int(seed))
        attn, mlp = self.blocks[0].attn, self.blocks[0].mlp

        def uniform(t: Tensor, fan_in: int) -> None:
            bound = 1.0 / math.sqrt(fan_in)
            t.copy_(torch.rand(t.shape, generator=g) * (2 * bound) - bound)

        self.embed.W_E.copy_(torch.randn(self.embed.W_E.shape, generator=g))
        self.pos_embed.W_pos.copy_(torch.randn(self.pos_embed.W_pos.shape, generator=g))
        uniform(attn.q, self.d)
        uniform(attn.W_V, self.d)
        uniform(mlp.W_in, self.d)
        uniform(mlp.b_in, self.d)
        uniform(mlp.W_out, self.d_mlp)
        uniform(mlp.b_out, self.d_mlp)

    # ------------------------------------------------------------------ description
    @property
    def cfg(self) -> ModelConfig:
        return ModelConfig(
            n_layers=1, n_heads=1, n_kv_heads=1, d_model=self.d, d_head=self.d, d_mlp=self.d_mlp,
            d_vocab=self.p_max, n_ctx=self.seq_len, act_fn="gelu", normalization="RMS",
            parallel_attn_mlp=False, gated_mlp=False, positional_embedding="standard",
            tied_embeddings=True,
        )

    def init_kwargs(self) -> dict:
        return {"p_max": self.p_max, "d": self.d, "d_mlp": self.d_mlp, "seq_len": self.seq_len, "seed": self.seed}

    # ------------------------------------------------------------------ forward
    def _check_tokens(self, tokens: Tensor) -> None:
        if not isinstance(tokens, Tensor) or tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
            raise DataError(f"tokens must be an integer tensor [batch, pos]; got {type(tokens).__name__} "
                            f"{getattr(tokens, 'dtype', '')}")
        if tokens.ndim != 2:
            raise DataError(f"tokens must have shape [batch, pos]; got shape {tuple(tokens.shape)}")
        if not 1 <= tokens.shape[1] <= self.seq_len:
            raise DataError(f"sequences have {tokens.shape[1]} positions; this model has n_ctx={self.seq_len} "
                            f"(it was built for T={self.seq_len}; pass at most that many, at least 1)")
        # Value checks read the tokens: a compiled forward (already validated tokens) skips them.
        if tokens.numel() and not torch.compiler.is_compiling() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.p_max):
            raise DataError(f"token ids must lie in 0..{self.p_max - 1} (nb_emb={self.p_max}); got "
                            f"min {int(tokens.min())}, max {int(tokens.max())}")

    def forward(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch 1 vocab"]:
        """Logits [batch, 1, V]: one prediction per sequence, V = ``p_max`` (all embedding rows)."""
        self._check_tokens(tokens)
        embed = self.hook_embed(self.embed(tokens))
        pos = self.hook_pos_embed(self.pos_embed(tokens.shape[1]).expand_as(embed))
        resid = self.blocks[0](embed + pos)
        # Tied unembedding: logits are the dot products with the token embeddings (no bias, no norm).
        return resid @ self.embed.W_E.T

    # ------------------------------------------------------------------ weight readers
    def _check_layer(self, layer: int) -> None:
        if layer not in (0, -1):
            raise IndexError(f"layer {layer} out of range for a model with 1 layer")

    def layer_attention(self, layer: int) -> dict[str, Tensor | None]:
        """Attention weights in TL layout (METHODS §0), exact for this architecture.

        The scores are q · k_t / √d with k_t = h_t the normalised input. In TL's form
        (x W_Q + b_Q) · (x W_K + b_K) / √d_head this is W_Q = 0 and b_Q = q (the query does not
        depend on the input), W_K = I, b_K = 0; so QK = W_Q W_Kᵀ is zero and the whole QK circuit
        is the rank-1 bilinear form carried by b_Q. W_O = I (no output projection) and there is no
        value or output bias. Returned tensors are detached copies.
        """
        self._check_layer(layer)
        attn = self.blocks[0].attn
        W_V = attn.W_V.detach().clone()
        eye = torch.eye(self.d, dtype=W_V.dtype, device=W_V.device)[None]
        return {
            "W_Q": torch.zeros_like(W_V),
            "b_Q": attn.q.detach().clone(),
            "W_K": eye.clone(),
            "b_K": torch.zeros(1, self.d, dtype=W_V.dtype, device=W_V.device),
            "W_V": W_V,
            "b_V": None,
            "W_O": eye.clone(),
            "b_O": None,
        }

    def layer_mlp(self, layer: int) -> dict[str, Tensor | None]:
        """MLP weights in TL layout: W_in [d, F], b_in [F], W_out [F, d], b_out [d] (copies)."""
        self._check_layer(layer)
        mlp = self.blocks[0].mlp
        return {
            "W_in": mlp.W_in.detach().clone(), "b_in": mlp.b_in.detach().clone(),
            "W_out": mlp.W_out.detach().clone(), "b_out": mlp.b_out.detach().clone(), "W_gate": None,
        }

    def embedding(self) -> dict[str, Tensor | None]:
        """W_E [V, d], W_pos [T, d], W_U = W_Eᵀ [d, V] (tied), b_U None (copies)."""
        W_E = self.embed.W_E.detach().clone()
        return {"W_E": W_E, "W_pos": self.pos_embed.W_pos.detach().clone(), "W_U": W_E.T.clone(), "b_U": None}


# ============================================================================ training
def sma_loss(
    logits: Float[Tensor, "batch 1 vocab"], labels: Int[Tensor, "batch"], p: int
) -> tuple[Tensor, Tensor]:
    """Training loss and accuracy at modulus ``p``.

    The loss is the mean cross-entropy of the softmax over the **first p logits only**
    (``logits[:, 0, :p]``), i.e. over the residues of the current task; embedding rows ≥ p are then
    neither inputs nor outputs, get exactly zero gradient, and (with Adam) stay where they were
    until a later phase uses them. The accuracy is the fraction whose argmax over the same p logits
    is the label. Returns ``(loss, accuracy)`` as 0-d tensors.
    """
    restricted = logits[:, 0, :p]
    loss = F.cross_entropy(restricted, labels)
    acc = (restricted.argmax(dim=-1) == labels).float().mean()
    return loss, acc


@torch.no_grad()
def evaluate_sma(model: SparseModularAddition, tokens: Tensor, labels: Tensor, p: int) -> tuple[float, float]:
    """(loss, accuracy) of ``model`` on a labelled set at modulus ``p`` (see :func:`sma_loss`)."""
    training = model.training
    model.eval()
    try:
        loss, acc = sma_loss(model(tokens), labels, p)
    finally:
        model.train(training)
    return float(loss), float(acc)


RECIPES: dict[str, list[tuple[int, int, float]]] = {
    # METHODS §7: p = 2 at lr 1e-3 for 3k steps, then a fresh Adam at lr 1e-2 on p = 4.
    "curriculum": [(2, 3000, 1e-3), (4, 3000, 1e-2)],
    "scratch": [(4, 6000, 1e-2)],
}


def train_sma(
    p_schedule: Sequence[tuple[int, int, float]],
    d: int = 32,
    d_mlp: int = 128,
    seed: int = 0,
    data_seed: int = 0,
    n_train: int = 2048,
    n_test: int = 2048,
    *,
    test_seed: int | None = None,
    T: int = 12,
    k: int = 5,
    p_max: int | None = None,
    eval_every: int = 100,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int | None = None,
    model: SparseModularAddition | None = None,
    num_threads: int | None = None,
    verbose: bool = False,
) -> tuple[SparseModularAddition, pd.DataFrame]:
    """Train a :class:`SparseModularAddition` by full-batch Adam through a schedule of phases.

    ``p_schedule`` is a list of ``(p, steps, lr)``; each phase draws its own training set
    ``sma_data(n_train, p, T, k, seed=data_seed)`` and test set ``sma_data(n_test, p, T, k,
    seed=test_seed)`` (default ``test_seed = data_seed + 100_000``), and runs ``steps`` full-batch
    steps of a **fresh** ``torch.optim.Adam(lr=lr)`` (default betas, no weight decay) on the loss of
    :func:`sma_loss`: cross-entropy over the first p logits. The METHODS §7 recipes are
    ``[(2, 3000, 1e-3), (4, 3000, 1e-2)]`` (curriculum) and ``[(4, N, 1e-2)]`` (scratch).

    The model is ``SparseModularAddition(p_max, d, d_mlp, T, seed)`` with ``p_max`` defaulting to the
    largest p of the schedule (at least 4), unless ``model`` is given to continue training.
    ``history`` has one row at the start and end of every phase and every ``eval_every`` steps:
    ``step`` (global, after that many updates), ``phase``, ``p``, ``lr``, ``train_loss``,
    ``train_acc``, ``test_loss``, ``test_acc``, ``wall_s``. With ``checkpoint_dir`` and
    ``checkpoint_every`` the model is saved as ``step_{step:06d}.pt`` (:meth:`ToyModel.save`, with
    the step, phase and metrics as metadata) at step 0, every ``checkpoint_every`` steps and at the
    end. Deterministic for a given seed, thread count and torch build. ``num_threads`` sets torch's
    intra-op thread count for the run only (restored afterwards); the command line uses 1, which
    is also the fastest for this small model on a shared CPU.
    """
    schedule = [(int(p), int(steps), float(lr)) for p, steps, lr in p_schedule]
    if not schedule:
        raise ValueError("p_schedule is empty; give at least one (p, steps, lr)")
    for p, steps, lr in schedule:
        if p < 2 or steps < 0 or lr <= 0:
            raise ValueError(f"bad phase (p={p}, steps={steps}, lr={lr}): need p >= 2, steps >= 0, lr > 0")
    if eval_every < 1:
        raise ValueError(f"eval_every={eval_every} must be >= 1")
    if (checkpoint_dir is None) != (checkpoint_every is None):
        raise ValueError("give checkpoint_dir and checkpoint_every together (or neither)")
    if checkpoint_every is not None and checkpoint_every < 1:
        raise ValueError(f"checkpoint_every={checkpoint_every} must be >= 1")
    test_seed = data_seed + 100_000 if test_seed is None else test_seed
    if model is None:
        p_max = max(4, max(p for p, _, _ in schedule)) if p_max is None else p_max
        model = SparseModularAddition(p_max=p_max, d=d, d_mlp=d_mlp, seq_len=T, seed=seed)
    too_big = [p for p, _, _ in schedule if p > model.p_max]
    if too_big:
        raise ValueError(f"schedule uses p={too_big} but the model has only p_max={model.p_max} embedding rows")
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if ckpt_dir is not None:
        ckpt_dir.mkdir(parents=True, exist_ok=True)

    rows: list[dict] = []
    start = time.perf_counter()
    with training.num_threads(num_threads):
        model.train()
        _run_phases(model, schedule, n_train, n_test, data_seed, test_seed, T, k, eval_every,
                    ckpt_dir, checkpoint_every, verbose, rows, start)
        model.eval()
    return model, pd.DataFrame(rows)


def _run_phases(model, schedule, n_train, n_test, data_seed, test_seed, T, k, eval_every,
                ckpt_dir, checkpoint_every, verbose, rows, start) -> None:
    """The training loop of :func:`train_sma`; appends the history rows to ``rows``."""
    step = 0

    def record(phase: int, p: int, lr: float, train, test) -> dict:
        tr_loss, tr_acc = evaluate_sma(model, *train, p)
        te_loss, te_acc = evaluate_sma(model, *test, p)
        row = dict(step=step, phase=phase, p=p, lr=lr, train_loss=tr_loss, train_acc=tr_acc,
                   test_loss=te_loss, test_acc=te_acc, wall_s=time.perf_counter() - start)
        rows.append(row)
        if verbose:
            print(f"step {step:6d} p={p} train {tr_loss:.3e}/{tr_acc:.3f} test {te_loss:.3e}/{te_acc:.3f}",
                  file=sys.stderr, flush=True)
        return row

    def save(row: dict) -> None:
        model.save(ckpt_dir / f"step_{step:06d}.pt", metadata={
            **row, "p_schedule": schedule, "seed": model.seed, "data_seed": data_seed, "test_seed": test_seed})

    for phase, (p, steps, lr) in enumerate(schedule):
        train = sma_data(n_train, p, T, k, seed=data_seed)
        test = sma_data(n_test, p, T, k, seed=test_seed)
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        # A row at the start of every phase: after a switch it shows the new task's starting point.
        row = record(phase, p, lr, train, test)
        if ckpt_dir is not None and phase == 0:
            save(row)
        for i in range(1, steps + 1):
            opt.zero_grad(set_to_none=True)
            loss, _ = sma_loss(model(train[0]), train[1], p)
            loss.backward()
            opt.step()
            step += 1
            due_ckpt = ckpt_dir is not None and step % checkpoint_every == 0
            if i % eval_every == 0 or i == steps or due_ckpt:
                row = record(phase, p, lr, train, test)
                if due_ckpt:
                    save(row)
    if ckpt_dir is not None and step % checkpoint_every:
        save(rows[-1])


# ============================================================================ registration
def sma_toy_data(
    n: int | None = None, seed: int = 0, p: int = 4, T: int = 12, k: int = 5, labels: bool = False
) -> Int[Tensor, "n T"] | tuple[Int[Tensor, "n T"], Int[Tensor, "n"]]:
    """``tld.toy_data("sma", n, seed, ...)``: fresh SMA sequences for the bundled SMA models.

    ``n`` sequences (default 2048, the size of the training sets) at modulus ``p`` (default 4, the
    task of ``toy:sma`` and ``toy:sma-scratch``), drawn by :func:`sma_data` with ``seed``. Returns
    the tokens [n, T] (what ``token_batches`` and the statistics take), or ``(tokens, labels)``
    with ``labels=True``. The bundled models' own training and test sets are in their
    ``metadata`` (``data_seed``, ``test_seed``, ``n_train``, ``n_test``): pass those to regenerate them.
    """
    tokens, y = sma_data(2048 if n is None else n, p, T=T, k=k, seed=seed)
    return (tokens, y) if labels else tokens


#: The shipped checkpoints, as (spec, module, class, file in weights/, description) entries of
#: ``tl_degeneracy.models.toys.BUNDLED_TOYS``.
SMA_BUNDLED: list[tuple[str, str, str, str, str]] = [
    ("toy:sma", "sma", "SparseModularAddition", "sma.pt",
     "sparse modular addition (p=4, T=12, k=5), d=32, curriculum p=2→4: generalising solution"),
    ("toy:sma-scratch", "sma", "SparseModularAddition", "sma-scratch.pt",
     "sparse modular addition (p=4, T=12, k=5), d=32, trained from scratch: memorising solution"),
]


def register_bundled() -> None:
    """Register the two shipped checkpoints (``toy:sma``, ``toy:sma-scratch``) and the data
    loader (``toy_data("sma")``). Idempotent: registering again replaces the same entries."""
    from . import registry
    from .data import register_toy_data

    for entry in SMA_BUNDLED:
        registry.register(*entry)
    register_toy_data("sma", sma_toy_data)


# Importing this module makes ``toy_data("sma")`` work (data.py imports the bundled toys' modules
# on demand for exactly this); the model specs are registered by the package's BUNDLED_TOYS list.
register_bundled()


# ============================================================================ command line
def _parse_schedule(text: str) -> list[tuple[int, int, float]]:
    try:
        return [(int(p), int(s), float(lr)) for p, s, lr in (item.split(":") for item in text.split(","))]
    except ValueError:
        raise argparse.ArgumentTypeError(f"schedule {text!r}: expected p:steps:lr[,p:steps:lr...]") from None


def main(argv: Sequence[str] | None = None) -> dict:
    """Train one SMA model and save it with its training record; prints the final numbers as JSON."""
    parser = argparse.ArgumentParser(prog="python -m tl_degeneracy.models.toys.sma", description=main.__doc__)
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="curriculum",
                        help="curriculum: %s; scratch: %s" % (RECIPES["curriculum"], RECIPES["scratch"]))
    parser.add_argument("--schedule", type=_parse_schedule, default=None,
                        help="explicit phases p:steps:lr,... (overrides --recipe and --steps)")
    parser.add_argument("--steps", type=int, default=None,
                        help="steps of the last phase (curriculum: the p=4 phase; scratch: the only one)")
    parser.add_argument("--seed", type=int, default=0, help="initialisation seed")
    parser.add_argument("--data-seed", type=int, default=0, help="training-data seed")
    parser.add_argument("--test-seed", type=int, default=None, help="test-data seed (default data seed + 100000)")
    parser.add_argument("--d", type=int, default=32)
    parser.add_argument("--d-mlp", type=int, default=128)
    parser.add_argument("--n-train", type=int, default=2048)
    parser.add_argument("--n-test", type=int, default=2048)
    parser.add_argument("--eval-every", type=int, default=100)
    training.add_output_arguments(parser)
    args = parser.parse_args(argv)

    schedule = args.schedule or [list(ph) for ph in RECIPES[args.recipe]]
    if args.steps is not None and args.schedule is None:
        schedule[-1][1] = args.steps
    schedule = [tuple(ph) for ph in schedule]
    test_seed = args.data_seed + 100_000 if args.test_seed is None else args.test_seed
    start = time.perf_counter()
    model, history = train_sma(
        schedule, d=args.d, d_mlp=args.d_mlp, seed=args.seed, data_seed=args.data_seed,
        n_train=args.n_train, n_test=args.n_test, test_seed=test_seed, eval_every=args.eval_every,
        checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every,
        num_threads=args.threads, verbose=args.verbose,
    )
    wall = time.perf_counter() - start
    final = history.iloc[-1]
    metadata = {
        "command": training.command_line("tl_degeneracy.models.toys.sma", argv),
        "recipe": "custom" if args.schedule else args.recipe,
        "p_schedule": [list(ph) for ph in schedule],
        "seed": args.seed, "data_seed": args.data_seed, "test_seed": test_seed,
        "n_train": args.n_train, "n_test": args.n_test, "T": 12, "k": 5,
        "loss": "cross-entropy over the first p logits, full batch, fresh Adam per phase",
        "steps": int(final["step"]),
        "final": {key: float(final[key]) for key in ("train_loss", "train_acc", "test_loss", "test_acc")},
        "final_p": int(final["p"]),
        "wall_s": round(wall, 1),
        "threads": args.threads,
        "torch_version": torch.__version__,
        # The whole training curve travels with the checkpoint (a few KiB), for plots and tutorials.
        "history": history.to_dict("records"),
    }
    training.write_outputs(model, metadata, history, args)
    return metadata


if __name__ == "__main__":
    main()
