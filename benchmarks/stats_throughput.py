"""Throughput of ``activation_stats`` on every residual hook, against two baselines, in one run.

For each model, on the same batches:

- ``forward``: the plain forward pass (``adapter.forward`` under ``torch.no_grad``, no hooks);
- ``activation_stats``: resid_pre of every layer + resid_post of the last, float64 Gram/mean/count;
- ``naive``: ``run_with_cache`` of the same hooks, then per batch a float64 einsum
  ``Σ_n f_n f_nᵀ`` over the cached, masked activations (the usual hand-written approach; a
  per-sample outer-product loop would be far slower still and is not timed).

Each measurement is repeated ``--reps`` times, interleaved (forward, stats, naive, forward, …) so
that load from other processes hits all three alike; the median and the best (least disturbed)
repetition are reported. Models:
``toy:bytelm`` (bundled weights; a same-sized random ToyTransformer if absent) and a GPT-2-small
shaped random ToyTransformer (12 layers, d_model 768, 12 heads, d_mlp 3072, d_vocab 50257).

Each model runs in a fresh process; its peak resident set (``ru_maxrss``: model, data and all
three passes) and, on a GPU, torch's peak CUDA allocation are reported beside the throughput.

Prints a table and appends it, with the machine (nproc, CPU model, torch version, date, load
averages before/after), to BENCHMARKS.md under "## activation_stats throughput".

    .venv/bin/python benchmarks/stats_throughput.py [--models bytelm,gpt2] [--reps 5] [--device cuda] [--no-write]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import multiprocessing as mp
import os
import platform
import resource
import statistics
import time
import sys
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

import tl_degeneracy as tld  # noqa: E402
from tl_degeneracy.data import token_batches  # noqa: E402
from tl_degeneracy.stats import activation_stats  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import append_to_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## activation_stats throughput"
GPT2_SMALL = dict(n_layers=12, d_model=768, n_heads=12, d_head=64, d_mlp=3072, d_vocab=50257, n_ctx=1024, act_fn="gelu")


def load_bytelm():
    try:
        model = tld.load_model("toy:bytelm")
        origin = "toy:bytelm (bundled weights)"
    except Exception as e:  # weights not bundled yet: same architecture, random weights
        from tl_degeneracy.models.toys.bytelm import BYTELM_KWARGS
        from tl_degeneracy.models.toys.transformer import ToyTransformer

        model, origin = ToyTransformer(**BYTELM_KWARGS, seed=0).eval(), f"random ToyTransformer like toy:bytelm ({type(e).__name__})"
    try:
        from tl_degeneracy.models.toys.data import toy_data

        tokens = toy_data("bytelm")[:64]
    except Exception:
        tokens = torch.randint(0, 256, (64, 128), generator=torch.Generator().manual_seed(0))
    return model, tokens, 16, origin


def load_gpt2_shaped():
    from tl_degeneracy.models.toys.transformer import ToyTransformer

    model = ToyTransformer(**GPT2_SMALL, seed=0).eval()
    tokens = torch.randint(0, GPT2_SMALL["d_vocab"], (4, 128), generator=torch.Generator().manual_seed(0))
    return model, tokens, 4, "random ToyTransformer, GPT-2-small shape"


def residual_hooks(adapter) -> list[str]:
    return [adapter.hook_name("resid_pre", layer) for layer in range(adapter.n_layers)] + [
        adapter.hook_name("resid_post", adapter.n_layers - 1)
    ]


def on_device(adapter, batches):
    """The batches with tokens and mask on the model's device."""
    return (batches.batch(i, device=adapter.device) for i in range(len(batches)))


def time_forward(adapter, batches) -> None:
    with torch.no_grad():
        for batch in on_device(adapter, batches):
            adapter.forward(batch.tokens)


def time_stats(adapter, batches, hooks) -> None:
    activation_stats(adapter, batches, hooks=hooks, progress=False)


def time_naive(adapter, batches, hooks) -> None:
    sums = {}
    with torch.no_grad():
        for batch in on_device(adapter, batches):
            _, cache = adapter.model.run_with_cache(batch.tokens, names_filter=hooks)
            for h in hooks:
                x = cache[h][batch.mask].double()
                sums[h] = sums.get(h, 0) + torch.einsum("ni,nj->ij", x, x)


def measure(name, loader, reps, device="cpu") -> dict:
    model, tokens, batch_size, origin = loader()
    adapter = tld.adapt(model.to(device))
    if adapter.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(adapter.device)
    batches = token_batches(tokens, adapter, batch_size=batch_size)
    hooks = residual_hooks(adapter)
    runs = {"forward": lambda: time_forward(adapter, batches),
            "activation_stats": lambda: time_stats(adapter, batches, hooks),
            "naive": lambda: time_naive(adapter, batches, hooks)}
    for fn in runs.values():  # warm-up (allocator, lazy imports)
        fn()
    times = {k: [] for k in runs}
    for _ in range(reps):
        for k, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    n_tok = batches.n_samples
    return {
        "model": name,
        "origin": origin,
        "shape": f"L={adapter.n_layers} D={adapter.d_model} V={adapter.d_vocab}",
        "tokens": n_tok,
        "batches": f"{len(batches)}×{batch_size}×{tokens.shape[1]}",
        "hooks": len(hooks),
        **{f"{k}_tok_s": n_tok / v for k, v in med.items()},
        "stats_over_forward": med["activation_stats"] / med["forward"],
        "naive_over_forward": med["naive"] / med["forward"],
        "naive_over_stats": med["naive"] / med["activation_stats"],
        # On a shared machine the fastest repetition is the least disturbed one: report its ratios too.
        "best_stats_over_forward": best["activation_stats"] / best["forward"],
        "best_naive_over_forward": best["naive"] / best["forward"],
        "spread": {k: (min(v), max(v)) for k, v in times.items()},
        # Peak memory of all three passes: the process's peak resident set (ru_maxrss, KiB on Linux;
        # each model runs in its own process, so it is this model's) and torch's peak CUDA allocation.
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_cuda_mb": (torch.cuda.max_memory_allocated(adapter.device) / 2**20
                         if adapter.device.type == "cuda" else None),
    }


def measure_fresh(name, reps, device, threads) -> dict:
    """:func:`measure` in a fresh process, so that its peak RSS is this model's alone."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_run_child, args=(name, reps, device, threads, queue))
    proc.start()
    row = queue.get()
    proc.join()
    return row


def _run_child(name, reps, device, threads, queue) -> None:
    if threads:
        torch.set_num_threads(threads)
    queue.put(measure(name, LOADERS[name], reps, device))


LOADERS = {"bytelm": load_bytelm, "gpt2": load_gpt2_shaped}


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "nproc": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu": cpu or platform.processor(),
        "torch": torch.__version__,
    }


def table(rows) -> str:
    head = ("| model | shape | tokens (batches) | hooks | forward tok/s | activation_stats tok/s | naive tok/s "
            "| stats / forward (median; best) | naive / forward (median; best) | peak RSS | peak CUDA |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        cuda = "—" if r.get("peak_cuda_mb") is None else f"{r['peak_cuda_mb']:,.0f} MB"
        lines.append(
            f"| {r['model']} | {r['shape']} | {r['tokens']} ({r['batches']}) | {r['hooks']} | {r['forward_tok_s']:,.0f} "
            f"| {r['activation_stats_tok_s']:,.0f} | {r['naive_tok_s']:,.0f} "
            f"| {r['stats_over_forward']:.2f}×; {r['best_stats_over_forward']:.2f}× "
            f"| {r['naive_over_forward']:.2f}×; {r['best_naive_over_forward']:.2f}× "
            f"| {r['peak_rss_mb']:,.0f} MB | {cuda} |"
        )
    return "\n".join(lines)


def write_section(block: str) -> None:
    append_to_section(SECTION, "stats_throughput.py", block)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="bytelm,gpt2")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, … (default cpu)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    rows = [measure_fresh(name, args.reps, args.device, args.threads) for name in args.models.split(",")]
    load_after = os.getloadavg()
    m = machine()
    out = table(rows)
    print(out)
    for r in rows:
        print(f"{r['model']}: {r['origin']}; min/max seconds per pass: "
              + ", ".join(f"{k} {a:.3f}/{b:.3f}" for k, (a, b) in r["spread"].items()))
    print(f"load average (1/5/15 min) before {load_before}, after {load_after}")
    if not args.no_write:
        fmt = lambda la: "/".join(f"{x:.2f}" for x in la)
        block = (
            f"### {m['date']} — {m['cpu']}, nproc {m['nproc']}, torch {m['torch']} ({m['torch_threads']} threads)\n\n"
            f"Load average (1/5/15 min) before {fmt(load_before)}, after {fmt(load_after)}; "
            f"median (and best) of {args.reps} interleaved repetitions; tok/s from the medians. Hooks: resid_pre of every layer + resid_post of "
            "the last. naive = run_with_cache + per-batch float64 einsum on the cached activations. Device "
            f"{args.device}; peak RSS: the process's peak resident set (one process per model, model and data "
            "included); peak CUDA: torch.cuda.max_memory_allocated over the three passes.\n\n"
            + out + "\n\n" + "\n".join(f"- {r['model']}: {r['origin']}" for r in rows) + "\n"
        )
        write_section(block)
        print(f"appended to {ROOT / 'BENCHMARKS.md'}")


if __name__ == "__main__":
    main()
