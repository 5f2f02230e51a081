"""Modular addition (a + b) mod p: the Nanda et al. grokking toy of METHODS §7, at a reduced p.

Task (:func:`modadd_data`): every pair (a, b) ∈ {0..p-1}², written as the three tokens
``a b =`` with ``=`` the token id p (input vocabulary p + 1); the label is (a + b) mod p, read
at the last position. A fixed random fraction ``frac_train`` of the p² pairs is the training set,
the rest the test set.

Model (:func:`modadd_model`): the configuration of TransformerLens' ``Grokking_Demo`` and of
Nanda et al., *Progress measures for grokking via mechanistic interpretability* (ICLR 2023),
as a :class:`ToyTransformer`: 1 layer, d_model 128, 4 heads of 32, d_mlp 512, ReLU, no
LayerNorm, no biases (the demo freezes them at zero), learned positions, untied unembedding onto
the p residues (d_vocab_out = p), initialised as TransformerLens initialises it (every weight
N(0, (0.8/√d_model)²)). The initial scale matters: from the toy transformer's smaller GPT-2 init
(std 0.02) our runs (p = 31 and 53, half the pairs, weight decay 1 and 3) did not memorise first;
they fitted train and test together, slowly, and had not fitted the training set after 450-1300
epochs.

Trainer (:func:`train_modadd`): full-batch AdamW (lr 1e-3, betas (0.9, 0.98)) on the float64
cross-entropy at the last position, one step per epoch, as in the demo. At p = 113 the demo
uses 30 % of the pairs and weight decay 1; at reduced p that groks too slowly (research/
toy_tasks.md §2.4), so the defaults here use p = 31, half the pairs and weight decay 3. The
shipped run (seed 0) fits the training set by epoch 100 (test accuracy 0.22, test loss peaking at
12.4), then groks: test accuracy reaches 0.5 at epoch 1010 and 0.99 at 1370 (2,000 epochs, about
2-4 min on one CPU thread). The shipped ``toy:modadd`` checkpoint records the command that made it, its seeds and its training
curves (``model.metadata``)::

    python -m tl_degeneracy.models.toys.modadd --out tl_degeneracy/models/toys/weights/modadd.pt
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from ...errors import DataError
from . import training
from .data import register_toy_data
from .transformer import ToyTransformer

#: Architecture of the Nanda et al. model, less the sizes that depend on p (see :func:`modadd_model`).
MODADD_KWARGS = dict(
    n_layers=1, d_model=128, n_heads=4, d_head=32, d_mlp=512, n_ctx=3, act_fn="relu",
    normalization=None, bias=False,
)

# The recipe of the shipped checkpoint; train_modadd's defaults and the command line use it.
P = 31
FRAC_TRAIN = 0.5
WEIGHT_DECAY = 3.0
EPOCHS = 2000
SEED = 0
DATA_SEED = 598  # the TransformerLens demo's DATA_SEED
LR = 1e-3
BETAS = (0.9, 0.98)


# ============================================================================ data
@dataclass(frozen=True)
class ModAddSplit:
    """All p² pairs of the task, split into a training and a test set.

    Tokens are rows ``[a, b, p]`` (``p`` is the ``=`` token), labels ``(a + b) mod p``; both sets
    are sorted by the pair index ``a·p + b``. ``train_index``/``test_index`` are those pair indices.
    """

    p: int
    frac_train: float
    seed: int
    train_tokens: Int[Tensor, "n_train 3"]
    train_labels: Int[Tensor, "n_train"]
    test_tokens: Int[Tensor, "n_test 3"]
    test_labels: Int[Tensor, "n_test"]
    train_index: Int[Tensor, "n_train"]
    test_index: Int[Tensor, "n_test"]


def _all_pairs(p: int) -> tuple[Int[Tensor, "p_sq 3"], Int[Tensor, "p_sq"]]:
    """Every input ``a b =`` of the task in the order a·p + b, with its label (a + b) mod p."""
    if p < 2:
        raise ValueError(f"p={p}: the task needs at least 2 residues")
    a, b = torch.cartesian_prod(torch.arange(p), torch.arange(p)).unbind(1)
    tokens = torch.stack([a, b, torch.full_like(a, p)], dim=1)
    return tokens, (a + b) % p


def modadd_data(p: int = P, frac_train: float = FRAC_TRAIN, seed: int = DATA_SEED) -> ModAddSplit:
    """Split the p² pairs: the first ``int(frac_train · p²)`` of a random permutation train, the rest test.

    The permutation comes from NumPy's PCG64 generator seeded with ``seed`` (stable across
    platforms and versions), so the split is a function of (p, frac_train, seed) alone.
    """
    if not 0.0 < frac_train < 1.0:
        raise ValueError(f"frac_train={frac_train} must lie strictly between 0 and 1")
    tokens, labels = _all_pairs(p)
    n_train = int(frac_train * p * p)
    if not 0 < n_train < p * p:
        raise ValueError(f"frac_train={frac_train} of {p * p} pairs leaves an empty training or test set")
    order = torch.from_numpy(np.random.default_rng(seed).permutation(p * p))
    train, test = order[:n_train].sort().values, order[n_train:].sort().values
    return ModAddSplit(
        p=p, frac_train=float(frac_train), seed=int(seed),
        train_tokens=tokens[train], train_labels=labels[train],
        test_tokens=tokens[test], test_labels=labels[test],
        train_index=train, test_index=test,
    )


# ============================================================================ model and loss
def modadd_model(p: int = P, seed: int = SEED) -> ToyTransformer:
    """The Nanda et al. architecture (:data:`MODADD_KWARGS`) for modulus ``p``: input vocabulary
    p + 1 (the residues and ``=``), output vocabulary p, three positions; every weight drawn from
    N(0, (0.8/√d_model)²) (TransformerLens' default ``initializer_range``, which the demo uses),
    in parameter order, from a private generator seeded with ``seed``."""
    model = ToyTransformer(**MODADD_KWARGS, d_vocab=p + 1, d_vocab_out=p, seed=seed)
    g = torch.Generator().manual_seed(int(seed))
    std = 0.8 / math.sqrt(MODADD_KWARGS["d_model"])
    with torch.no_grad():
        for param in model.parameters():  # weights only: the model has no biases or norms
            param.copy_(torch.randn(param.shape, generator=g) * std)
    return model


@dataclass(frozen=True)
class ModAddMetrics:
    """Mean cross-entropy and accuracy of the prediction at the last position."""

    loss: float
    acc: float


def modadd_loss(logits: Float[Tensor, "batch pos p"], labels: Int[Tensor, "batch"]) -> Tensor:
    """Cross-entropy of the last position's logits, in float64 as in the demo: the training loss
    falls to ~1e-7, below float32's resolution around 1, where a float32 softmax would round the
    loss and the correct class's gradient to zero."""
    return F.cross_entropy(logits[:, -1].double(), labels)


@torch.no_grad()
def evaluate_modadd(model: ToyTransformer, tokens: Int[Tensor, "n 3"], labels: Int[Tensor, "n"]) -> ModAddMetrics:
    """:class:`ModAddMetrics` of ``model`` on a labelled set, in eval mode (the mode is restored)."""
    was_training = model.training
    model.eval()
    try:
        logits = model(tokens)
    finally:
        model.train(was_training)
    acc = (logits[:, -1].argmax(-1) == labels).double().mean()
    return ModAddMetrics(loss=float(modadd_loss(logits, labels)), acc=float(acc))


# ============================================================================ training
@dataclass
class ModAddRun:
    """What :func:`train_modadd` returns: the trained model (eval mode), its history, its data."""

    model: ToyTransformer
    history: pd.DataFrame
    data: ModAddSplit


def crossing_epoch(history: pd.DataFrame, threshold: float, column: str = "test_acc") -> int | None:
    """The first recorded epoch at which ``history[column]`` reaches ``threshold`` (None if never).

    Resolution is the ``eval_every`` of the run: the crossing happened after the previous row.
    """
    hit = history.loc[history[column] >= threshold, "epoch"]
    return int(hit.iloc[0]) if len(hit) else None


def train_modadd(
    p: int = P,
    frac_train: float = FRAC_TRAIN,
    weight_decay: float = WEIGHT_DECAY,
    epochs: int = EPOCHS,
    seed: int = SEED,
    data_seed: int = DATA_SEED,
    eval_every: int = 10,
    checkpoint_every: int | None = None,
    checkpoint_dir: str | Path | None = None,
    *,
    lr: float = LR,
    betas: tuple[float, float] = BETAS,
    num_threads: int | None = None,
    verbose: bool = False,
) -> ModAddRun:
    """Train :func:`modadd_model` ``(p, seed)`` on :func:`modadd_data` ``(p, frac_train, data_seed)``.

    Full-batch ``torch.optim.AdamW(lr, betas, weight_decay)`` on :func:`modadd_loss`, one step
    per epoch, for ``epochs`` epochs. ``history`` has a row at epoch 0, every ``eval_every``
    epochs and at the end: ``epoch`` (updates so far), ``train_loss``, ``train_acc``,
    ``test_loss``, ``test_acc`` (:func:`evaluate_modadd`), ``wall_s``. With ``checkpoint_dir``
    and ``checkpoint_every`` the model is saved as ``epoch_{epoch:06d}.pt`` (:meth:`ToyModel.save`,
    the row and the recipe as metadata) at epoch 0, every ``checkpoint_every`` epochs and at the
    end, for following quantities through training. Deterministic for a given seed, thread count
    and torch build; ``num_threads`` sets torch's intra-op threads for the run only (the command
    line uses 1, the thread count the shipped run's bit-for-bit record holds for).
    """
    if epochs < 0 or eval_every < 1:
        raise ValueError(f"need epochs >= 0 and eval_every >= 1; got epochs={epochs}, eval_every={eval_every}")
    if (checkpoint_dir is None) != (checkpoint_every is None):
        raise ValueError("give checkpoint_dir and checkpoint_every together (or neither)")
    if checkpoint_every is not None and checkpoint_every < 1:
        raise ValueError(f"checkpoint_every={checkpoint_every} must be >= 1")
    if lr <= 0 or weight_decay < 0:
        raise ValueError(f"need lr > 0 and weight_decay >= 0; got lr={lr}, weight_decay={weight_decay}")
    data = modadd_data(p, frac_train, data_seed)
    model = modadd_model(p, seed)
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if ckpt_dir is not None:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    recipe = dict(p=p, frac_train=float(frac_train), weight_decay=float(weight_decay), lr=float(lr),
                  betas=[float(b) for b in betas], seed=int(seed), data_seed=int(data_seed))

    rows: list[dict] = []
    start = time.perf_counter()

    def record(epoch: int) -> dict:
        tr = evaluate_modadd(model, data.train_tokens, data.train_labels)
        te = evaluate_modadd(model, data.test_tokens, data.test_labels)
        row = dict(epoch=epoch, train_loss=tr.loss, train_acc=tr.acc, test_loss=te.loss, test_acc=te.acc,
                   wall_s=time.perf_counter() - start)
        rows.append(row)
        if verbose:
            print(f"epoch {epoch:6d} train {tr.loss:.3e}/{tr.acc:.3f} test {te.loss:.3e}/{te.acc:.3f} "
                  f"({row['wall_s']:.0f} s)", file=sys.stderr, flush=True)
        return row

    def save(row: dict) -> None:
        model.save(ckpt_dir / f"epoch_{row['epoch']:06d}.pt", metadata={**row, **recipe})

    with training.num_threads(num_threads):
        opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=tuple(betas), weight_decay=weight_decay)
        row = record(0)
        if ckpt_dir is not None:
            save(row)
        model.train()
        for epoch in range(1, epochs + 1):
            opt.zero_grad(set_to_none=True)
            modadd_loss(model(data.train_tokens), data.train_labels).backward()
            opt.step()
            due_ckpt = ckpt_dir is not None and epoch % checkpoint_every == 0
            if epoch % eval_every == 0 or epoch == epochs or due_ckpt:
                row = record(epoch)
                if due_ckpt or (ckpt_dir is not None and epoch == epochs):
                    save(row)
        model.eval()
    return ModAddRun(model=model, history=pd.DataFrame(rows), data=data)


# ============================================================================ bundled data
def modadd_toy_data(
    n: int | None = None,
    seed: int = 0,
    split: str = "all",
    labels: bool = False,
    p: int = P,
    frac_train: float = FRAC_TRAIN,
    data_seed: int = DATA_SEED,
) -> Int[Tensor, "n 3"] | tuple[Int[Tensor, "n 3"], Int[Tensor, "n"]]:
    """``tld.toy_data("modadd", n, seed, ...)``: inputs ``a b =`` for ``toy:modadd``.

    ``split``: ``"all"`` (the p² pairs, in the order a·p + b), ``"train"`` or ``"test"`` (the
    shipped model's split, :func:`modadd_data` with its recorded ``frac_train`` and ``data_seed``).
    ``n=None`` returns the whole split; ``n`` given returns ``n`` distinct rows of it drawn with
    ``seed``. Returns the tokens [n, 3] (what ``token_batches`` and the statistics take), or
    ``(tokens, labels)`` with ``labels=True``; the label is read at the last position.
    """
    if split == "all":
        tokens, y = _all_pairs(p)
    elif split in ("train", "test"):
        d = modadd_data(p, frac_train, data_seed)
        tokens, y = (d.train_tokens, d.train_labels) if split == "train" else (d.test_tokens, d.test_labels)
    else:
        raise DataError(f"split must be 'all', 'train' or 'test'; got {split!r}")
    if n is not None:
        if not 1 <= n <= len(tokens):
            raise DataError(f"n={n}: the {split!r} split has {len(tokens)} distinct rows; ask for 1..{len(tokens)}")
        pick = torch.from_numpy(np.random.default_rng(seed).choice(len(tokens), size=n, replace=False))
        tokens, y = tokens[pick], y[pick]
    return (tokens, y) if labels else tokens


# Importing this module makes ``toy_data("modadd")`` work (data.py imports the bundled toys' modules
# on demand for exactly this); the model spec is registered by the package's BUNDLED_TOYS list.
register_toy_data("modadd", modadd_toy_data)


# ============================================================================ command line
def main(argv: Sequence[str] | None = None) -> dict:
    """Train one modular-addition model and save it with its training record; prints the summary as JSON."""
    parser = argparse.ArgumentParser(prog="python -m tl_degeneracy.models.toys.modadd", description=main.__doc__)
    parser.add_argument("--p", type=int, default=P, help="the modulus (a prime)")
    parser.add_argument("--frac-train", type=float, default=FRAC_TRAIN)
    parser.add_argument("--weight-decay", type=float, default=WEIGHT_DECAY)
    parser.add_argument("--lr", type=float, default=LR)
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--seed", type=int, default=SEED, help="initialisation seed")
    parser.add_argument("--data-seed", type=int, default=DATA_SEED, help="seed of the train/test split")
    parser.add_argument("--eval-every", type=int, default=10)
    training.add_output_arguments(parser)
    args = parser.parse_args(argv)

    start = time.perf_counter()
    run = train_modadd(
        p=args.p, frac_train=args.frac_train, weight_decay=args.weight_decay, epochs=args.epochs,
        seed=args.seed, data_seed=args.data_seed, eval_every=args.eval_every,
        checkpoint_every=args.checkpoint_every, checkpoint_dir=args.checkpoint_dir,
        lr=args.lr, num_threads=args.threads, verbose=args.verbose,
    )
    wall = time.perf_counter() - start
    history, final = run.history, run.history.iloc[-1]
    metadata = {
        "command": training.command_line("tl_degeneracy.models.toys.modadd", argv),
        "p": args.p, "frac_train": args.frac_train, "weight_decay": args.weight_decay, "lr": args.lr,
        "betas": list(BETAS), "epochs": args.epochs, "seed": args.seed, "data_seed": args.data_seed,
        "n_train": len(run.data.train_labels), "n_test": len(run.data.test_labels),
        "loss": "float64 cross-entropy at the last position, full batch AdamW, one step per epoch",
        "n_parameters": sum(t.numel() for t in run.model.parameters()),
        "final": {key: float(final[key]) for key in ("train_loss", "train_acc", "test_loss", "test_acc")},
        # Epochs at which the test accuracy first reached 0.5 and 0.99 (to eval_every): when it grokked.
        "grok_epoch_test_acc_0.5": crossing_epoch(history, 0.5),
        "grok_epoch_test_acc_0.99": crossing_epoch(history, 0.99),
        "wall_s": round(wall, 1),
        "threads": args.threads,
        "torch_version": torch.__version__,
        # The whole training curve travels with the checkpoint, for plots and tutorials.
        "history": history.to_dict("records"),
    }
    training.write_outputs(run.model, metadata, history, args)
    return metadata


if __name__ == "__main__":
    main()
