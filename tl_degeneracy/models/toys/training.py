"""What the toys' trainers and their command lines share: a thread-count scope, the output
options and the writing of a trained model with its record."""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import pandas as pd
import torch

from .base import ToyModel


@contextlib.contextmanager
def num_threads(n: int | None) -> Iterator[None]:
    """Set torch's intra-op thread count for a block only (None: leave it alone)."""
    if n is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every toy trainer's command line has: threads, outputs, checkpoints, verbosity."""
    parser.add_argument("--threads", type=int, default=1, help="torch threads (results depend on it)")
    parser.add_argument("--out", type=Path, default=None, help="checkpoint file to write (ToyModel.save)")
    parser.add_argument("--history", type=Path, default=None, help="CSV file for the training history")
    parser.add_argument("--checkpoint-dir", type=Path, default=None)
    parser.add_argument("--checkpoint-every", type=int, default=None)
    parser.add_argument("--verbose", action="store_true")


def command_line(module: str, argv: Sequence[str] | None) -> str:
    """The shell command that reruns ``python -m module`` with these arguments (recorded in checkpoints)."""
    return " ".join(["python -m", module, *(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))])


def write_outputs(model: ToyModel, metadata: dict, history: pd.DataFrame, args: argparse.Namespace) -> None:
    """Save the model with ``metadata`` to ``args.out`` and the history to ``args.history`` (each
    if given), then print the metadata less its history as one JSON line."""
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        model.save(args.out, metadata=metadata)
    if args.history is not None:
        history.to_csv(args.history, index=False)
    print(json.dumps({key: value for key, value in metadata.items() if key != "history"}))
