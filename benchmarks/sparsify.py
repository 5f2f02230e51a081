"""Time of ``tld.sparsify`` (METHODS §8) on ``toy:bytelm`` and on a GPT-2-small shaped random model.

One run per model (sparsify is L + 3 passes over the data: neuron synchronization, the MLP-input
Grams, the firing check, and one drift pass per layer with two forwards each), beside the time of a
plain forward over the same batches for scale. Reports the per-layer counts summed over layers and
the final drift/KL. Appends to the ``## sparsify`` section of BENCHMARKS.md (``record.py``)::

    .venv/bin/python benchmarks/sparsify.py [--models bytelm,gpt2] [--threads 2] [--no-write]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

import tl_degeneracy as tld  # noqa: E402
from tl_degeneracy.data import token_batches  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import append_to_section, machine_line  # noqa: E402
from stats_throughput import load_bytelm, load_gpt2_shaped  # noqa: E402  (the same models and tokens)

SECTION = "## sparsify"


def forward_seconds(model, tokens, batch_size: int) -> float:
    adapter = tld.adapt(model)
    batches = token_batches(tokens, adapter, batch_size=batch_size)
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(len(batches)):
            adapter.forward(batches.batch(i, device=adapter.device).tokens)
    return time.perf_counter() - t0


def measure(name: str, loader) -> dict:
    model, tokens, batch_size, origin = loader()
    cfg = tld.adapt(model).cfg
    fwd = forward_seconds(model, tokens, batch_size)
    t0 = time.perf_counter()
    res = tld.sparsify(model, tokens, batch_size=batch_size)
    seconds = time.perf_counter() - t0
    frame = res.to_frame()
    return {"model": name, "origin": origin, "act_fn": cfg.act_fn, "tol": res.tol,
            "shape": f"L{cfg.n_layers} D{cfg.d_model} F{cfg.d_mlp} V{cfg.d_vocab}",
            "tokens": int(tokens.numel()), "forward_s": fwd, "sparsify_s": seconds,
            "input_ranks": "/".join(str(int(r)) for r in frame["input_rank"]),
            "blocks": int(frame["blocks"].sum()), "free": int(frame["free_directions"].sum()),
            "zeros": int(frame["zeros_added"].sum()), "in_model": int(frame["zeros_in_model"].sum()),
            "drift": res.output_drift, "kl": res.kl}


def table(rows) -> str:
    head = ("| model | shape | act (tol) | tokens | forward s | sparsify s | input ranks | blocks | free directions "
            "| zeros added (in model) | drift | KL |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        lines.append(f"| {r['model']} | {r['shape']} | {r['act_fn']} ({r['tol']}) | {r['tokens']:,} | {r['forward_s']:.2f} "
                     f"| {r['sparsify_s']:.1f} | {r['input_ranks']} | {r['blocks']:,} | {r['free']:,} "
                     f"| {r['zeros']:,} ({r['in_model']:,}) | {r['drift']:.2g} | {r['kl']:.2g} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="bytelm,gpt2")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    loaders = {"bytelm": load_bytelm, "gpt2": load_gpt2_shaped}
    where = machine_line()
    rows = [measure(name, loaders[name]) for name in args.models.split(",")]
    out = table(rows)
    print(where)
    print(out)
    for r in rows:
        print(f"{r['model']}: {r['origin']}")
    if not args.no_write:
        block = (f"### {where}\n\nOne run each; `forward s`: a plain forward over the same batches. Data as in "
                 "`stats_throughput.py` (toy:bytelm: 64 × 128 validation bytes, batch 16; GPT-2 shape: 4 × 128 random "
                 "tokens, batch 4).\n\n" + out + "\n\n" + "\n".join(f"- {r['model']}: {r['origin']}" for r in rows))
        append_to_section(SECTION, "sparsify.py", block)


if __name__ == "__main__":
    main()
