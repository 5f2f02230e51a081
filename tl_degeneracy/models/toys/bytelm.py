"""``toy:bytelm``: a 2-layer byte-level causal LM trained on the Python standard library's source.

Why this text: every machine that runs the package has it, offline, with no download and no
licence question. Bytes are the tokens (0..255), so no tokenizer is needed either.

The module lists are fixed and made of long-lived modules (present, as single ``.py`` files, from
Python 3.10 to 3.13 at least), so a retrain reads the same *kind* of text on every machine; the
exact bytes still differ between Python versions, which is why the checkpoint records the Python
version and a digest of the training text. Validation text comes from different modules than the
training text; a 64 KiB slice of it ships with the package (``samples/bytelm_val.txt``) and is what
:func:`tl_degeneracy.models.toys.data.toy_data` ``("bytelm")`` returns, so the recorded validation
loss can be checked anywhere.

Retrain (the command that made the shipped checkpoint is in its metadata)::

    python -m tl_degeneracy.models.toys.bytelm --steps 1200 --seed 0 --threads 1 --out tl_degeneracy/models/toys/weights/bytelm.pt
"""

from __future__ import annotations

import argparse
import hashlib
import math
import platform
import shlex
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from jaxtyping import Int
from torch import Tensor

from .transformer import ToyTransformer

__all__ = [
    "BYTELM_KWARGS",
    "TRAIN_MODULES",
    "VAL_MODULES",
    "ToyTransformer",
    "build_model",
    "bytelm_loss",
    "evaluate",
    "train_bytelm",
    "training_bytes",
    "unigram_entropy",
    "validation_text",
]

#: Architecture of ``toy:bytelm``.
BYTELM_KWARGS = dict(
    n_layers=2, d_model=128, n_heads=4, d_head=32, d_mlp=512, d_vocab=256, n_ctx=128, act_fn="gelu"
)

#: Standard-library modules whose source is the training text (top-level ``<name>.py``).
TRAIN_MODULES: tuple[str, ...] = (
    "argparse", "ast", "base64", "bdb", "bisect", "calendar", "cmd", "code", "codecs", "codeop",
    "colorsys", "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "difflib",
    "dis", "enum", "filecmp", "fileinput", "fnmatch", "ftplib", "functools", "getopt", "gettext",
    "glob", "graphlib", "gzip", "hmac", "imaplib", "inspect", "ipaddress", "keyword", "linecache",
    "locale", "mailbox", "netrc", "numbers", "opcode", "operator", "optparse", "os", "pdb",
    "pickle", "pkgutil", "platform", "plistlib", "poplib", "profile", "pstats", "py_compile",
    "quopri", "random", "reprlib", "rlcompleter", "runpy", "sched", "secrets", "selectors",
    "shutil", "signal", "site", "smtplib", "socket", "ssl", "stat", "statistics", "stringprep",
    "subprocess", "symtable", "sysconfig", "tabnanny", "tarfile", "tempfile", "threading",
    "timeit", "tokenize", "trace", "traceback", "types", "typing", "uuid", "warnings", "wave",
    "weakref", "webbrowser", "zipapp",
)
#: Held-out modules: the validation text (disjoint from TRAIN_MODULES).
VAL_MODULES: tuple[str, ...] = ("textwrap", "pprint", "shlex", "fractions", "queue", "string", "heapq")

#: Files are joined with a blank line so that a window never glues two files mid-line.
FILE_SEPARATOR = b"\n\n"
VAL_SAMPLE_BYTES = 64 * 1024
VAL_SAMPLE_PATH = Path(__file__).parent / "samples" / "bytelm_val.txt"
DEFAULT_OUT = Path(__file__).parent / "weights" / "bytelm.pt"


# ---------------------------------------------------------------------- data
def _stdlib_files(modules: tuple[str, ...]) -> tuple[list[Path], list[str]]:
    """The existing source files of ``modules`` in the running Python, and the modules missing."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found, missing = [], []
    for name in modules:
        path = root / f"{name}.py"
        (found if path.is_file() else missing).append(path if path.is_file() else name)
    return found, missing


def _read_modules(modules: tuple[str, ...]) -> tuple[bytes, list[str]]:
    files, missing = _stdlib_files(modules)
    if not files:
        raise FileNotFoundError(
            f"none of the standard-library modules {modules[:3]}… was found under "
            f"{sysconfig.get_paths()['stdlib']}; bytelm needs the Python sources installed"
        )
    text = FILE_SEPARATOR.join(p.read_bytes() for p in files)
    return text, [p.name for p in files] + [f"(missing: {m})" for m in missing]


def training_bytes() -> tuple[Int[Tensor, " n_bytes"], list[str]]:
    """The training text as a uint8 tensor, and the names of the files it was read from."""
    text, names = _read_modules(TRAIN_MODULES)
    return torch.frombuffer(bytearray(text), dtype=torch.uint8), names


def validation_text(n_bytes: int = VAL_SAMPLE_BYTES) -> bytes:
    """The held-out text, cut to at most ``n_bytes`` at a line end (what ``bytelm_val.txt`` holds)."""
    text, _ = _read_modules(VAL_MODULES)
    text = text[:n_bytes]
    return text[: text.rfind(b"\n") + 1]


def unigram_entropy(tokens: Tensor, reference: Tensor | None = None) -> float:
    """Cross-entropy in nats/byte of ``tokens`` under the byte frequencies of ``reference``
    (add-one smoothed); with no reference, the entropy of ``tokens``' own byte distribution.
    The baseline a byte LM must beat: it ignores all context."""
    counts = torch.bincount(tokens.flatten().long(), minlength=256).double()
    if reference is None:
        p = counts / counts.sum()
        return float(-(p[p > 0] * p[p > 0].log()).sum())
    ref = torch.bincount(reference.flatten().long(), minlength=256).double() + 1.0
    return float(-(counts * (ref / ref.sum()).log()).sum() / counts.sum())


def _windows(data: Tensor, starts: Tensor, seq_len: int) -> Int[Tensor, "batch seq_len"]:
    return data[starts[:, None] + torch.arange(seq_len)].long()


# ---------------------------------------------------------------------- model and loss
def build_model(seed: int = 0) -> ToyTransformer:
    """A freshly initialised ``toy:bytelm`` architecture."""
    return ToyTransformer(**BYTELM_KWARGS, seed=seed)


def bytelm_loss(model: ToyTransformer, tokens: Int[Tensor, "batch pos"]) -> Tensor:
    """Mean next-byte cross-entropy in nats: logits at position p predict token p + 1."""
    logits = model(tokens)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())


@torch.no_grad()
def evaluate(model: ToyTransformer, tokens: Int[Tensor, "n_seq pos"], batch_size: int = 64) -> float:
    """Mean next-byte loss (nats/byte) over all sequences, each prediction weighted equally."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(tokens), batch_size):
        batch = tokens[i : i + batch_size].to(device)
        n = batch[:, 1:].numel()
        total += float(bytelm_loss(model, batch)) * n
        count += n
    model.train(was_training)
    return total / count


def _lr_factor(step: int, steps: int, warmup: int, final_fraction: float) -> float:
    """Linear warmup to 1, then cosine decay to ``final_fraction``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress))


def train_bytelm(
    steps: int = 1000,
    seed: int = 0,
    batch_size: int = 32,
    lr: float = 3e-3,
    weight_decay: float = 0.01,
    warmup: int | None = None,
    final_lr_fraction: float = 0.1,
    grad_clip: float = 1.0,
    eval_sequences: int = 256,
    val_sequences: int | None = None,
    device: str | torch.device = "cpu",
    log_every: int = 0,
) -> ToyTransformer:
    """Train ``toy:bytelm`` from scratch; returns the model in eval mode with ``.metadata``.

    AdamW (betas 0.9/0.95), linear warmup (default 5% of the steps) then cosine decay to
    ``final_lr_fraction`` of ``lr``, gradient clipping at ``grad_clip``. Batches are windows of
    ``n_ctx`` bytes at uniformly random offsets of the training text, drawn from a generator seeded
    with ``seed``; the initialisation is seeded with ``seed`` too, so a run is reproducible bit for
    bit on the same machine and torch version with one CPU thread (``torch.set_num_threads(1)``;
    the shipped checkpoint was trained so). With several threads, CPU reductions may be ordered
    differently from run to run and the weights then agree only to float32 rounding. ``.metadata`` holds the final train loss (on ``eval_sequences``
    fixed training windows), the validation loss on the bundled sample, the unigram baselines, the
    per-step training losses, the data files and the software versions. ``val_sequences`` limits
    the validation loss to the first so many bundled sequences (for quick runs; default all).
    """
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be ≥ 1; got steps={steps}, batch_size={batch_size}")
    from .data import toy_data

    t0 = time.perf_counter()
    device = torch.device(device)
    data, files = training_bytes()
    seq_len = BYTELM_KWARGS["n_ctx"]
    val = toy_data("bytelm")[:val_sequences]
    gen = torch.Generator().manual_seed(seed)
    # A separate stream for the fixed train-evaluation windows, so changing ``steps`` or
    # ``batch_size`` does not change which windows the train loss is measured on.
    eval_starts = torch.randint(0, len(data) - seq_len, (eval_sequences,), generator=torch.Generator().manual_seed(10_000 + seed))
    train_eval = _windows(data, eval_starts, seq_len)

    model = build_model(seed).to(device).train()
    decay = [p for n, p in model.named_parameters() if n.rsplit(".", 1)[-1].startswith("W_")]
    no_decay = [p for n, p in model.named_parameters() if not n.rsplit(".", 1)[-1].startswith("W_")]
    # Weight decay only on the matrices: decaying LayerNorm gains and biases towards 0 is not a
    # prior anyone wants.
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.95),
    )
    warmup = max(1, steps // 20) if warmup is None else max(1, warmup)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, steps, warmup, final_lr_fraction))

    initial_val = evaluate(model, val)
    history: list[float] = []
    for step in range(steps):
        starts = torch.randint(0, len(data) - seq_len, (batch_size,), generator=gen)
        loss = bytelm_loss(model, _windows(data, starts, seq_len).to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        sched.step()
        history.append(loss.item())
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"step {step:5d}  loss {history[-1]:.4f}  lr {sched.get_last_lr()[0]:.2e}  "
                  f"{time.perf_counter() - t0:.0f}s", flush=True)

    model.eval()
    train_loss = evaluate(model, train_eval)
    val_loss = evaluate(model, val)
    model.metadata = {
        "spec": "toy:bytelm",
        "seed": seed,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "weight_decay": weight_decay,
        "warmup": warmup,
        "final_lr_fraction": final_lr_fraction,
        "grad_clip": grad_clip,
        "optimizer": "AdamW(betas=(0.9, 0.95)), linear warmup then cosine decay",
        "train_loss": train_loss,
        "train_loss_sequences": eval_sequences,
        "val_loss": val_loss,
        "initial_val_loss": initial_val,
        "val_sequences": len(val),
        "loss_unit": "nats/byte (mean next-byte cross-entropy, positions 1..n_ctx-1)",
        "unigram_entropy_val": unigram_entropy(val),
        "unigram_cross_entropy_val": unigram_entropy(val, reference=data),
        "train_loss_history": [round(x, 5) for x in history],
        "train_files": files,
        "val_files": [p.name for p in _stdlib_files(VAL_MODULES)[0]],
        "val_sample": "tl_degeneracy/models/toys/samples/bytelm_val.txt",
        "train_bytes": len(data),
        "train_sha256": hashlib.sha256(data.numpy().tobytes()).hexdigest(),
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "wall_time_s": time.perf_counter() - t0,
    }
    return model


# ---------------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tl_degeneracy.models.toys.bytelm",
        description="Train toy:bytelm on Python standard-library source and save the checkpoint.",
    )
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--val-sequences", type=int, default=None,
                        help="validate on the first N bundled sequences only (quick runs; default all)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument(
        "--write-val-sample", action="store_true",
        help=f"(re)write the bundled validation sample {VAL_SAMPLE_PATH.name} from VAL_MODULES first",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.write_val_sample:
        VAL_SAMPLE_PATH.parent.mkdir(parents=True, exist_ok=True)
        VAL_SAMPLE_PATH.write_bytes(validation_text())
        print(f"wrote {VAL_SAMPLE_PATH} ({VAL_SAMPLE_PATH.stat().st_size} bytes)")
    model = train_bytelm(steps=args.steps, seed=args.seed, batch_size=args.batch_size, lr=args.lr,
                         val_sequences=args.val_sequences, device=args.device, log_every=50)
    argv_used = sys.argv[1:] if argv is None else argv
    model.metadata["command"] = shlex.join(["python", "-m", "tl_degeneracy.models.toys.bytelm", *argv_used])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    model.cpu().save(args.out, metadata=model.metadata)
    m = model.metadata
    print(f"saved {args.out} ({args.out.stat().st_size / 1e6:.2f} MB): train {m['train_loss']:.4f}, "
          f"val {m['val_loss']:.4f} nats/byte; unigram entropy (val) {m['unigram_entropy_val']:.4f}, "
          f"unigram cross-entropy (train freqs → val) {m['unigram_cross_entropy_val']:.4f}; "
          f"{m['wall_time_s']:.0f} s")


if __name__ == "__main__":
    main()
