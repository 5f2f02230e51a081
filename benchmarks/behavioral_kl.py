"""The behavioral KL's forward+backward (``llc/losses.per_sample_loss``) against the same divergence
written out for autograd, on logits of a large vocabulary, in one run.

Both compute KL(p* ‖ softmax(z_c)) per position for C chains and its gradient in the logits z
[C, positions, vocabulary] (what every SGLD step of the behavioral LLC does after the model's
forward): ``per_sample_loss`` (chain by chain in one buffer, closed-form backward) and the naive
``Σ p* (log p* − log_softmax(z))`` through autograd, with the same zero-mass handling. The two are
timed interleaved (``--reps`` each, medians and per-rep ratios), each in its own process for its
peak memory: on the CPU the process's peak resident set (``ru_maxrss``) over what was resident with
the inputs in place (Linux), on a GPU torch's peak allocation over the inputs. The values of both are compared (they must agree to
float rounding) and printed.

Default shape: 4 chains × 8 × 128 tokens × SmolLM2's 49,152-word vocabulary (issue 19's CPU
configuration); ``--chains 8 --positions 4096`` is the GPU one (8 chains on 32 × 128 tokens).

    python benchmarks/behavioral_kl.py [--device cuda] [--chains 4] [--positions 1024] [--vocab 49152] [--reps 5] [--no-write]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))
from record import append_to_section, machine_line  # noqa: E402

from tl_degeneracy.llc.losses import per_sample_loss, reference_form  # noqa: E402

SECTION = "## behavioral KL: fused against autograd"


def naive_kl(z: torch.Tensor, log_ref: torch.Tensor) -> torch.Tensor:
    """Σ p* (log p* − log softmax(z)) over the last axis, through autograd (zero mass counts 0)."""
    logp = torch.log_softmax(z, dim=-1)
    zero_mass = log_ref == -torch.inf
    ref = torch.where(zero_mass, torch.zeros_like(log_ref), log_ref)
    return torch.where(zero_mass, torch.zeros_like(logp), ref.exp() * (ref - logp)).sum(-1)


VARIANTS = {"tld": lambda z, r: per_sample_loss("kl", z, r), "naive": naive_kl}


def inputs(args) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device=args.device).manual_seed(0)
    star = 3.0 * torch.randn(args.positions, args.vocab, generator=g, device=args.device)
    # Chain by chain, so that no temporary of the full size raises the peak before the step.
    z = torch.empty(args.chains, args.positions, args.vocab, device=args.device)
    for c in range(args.chains):
        torch.randn(args.positions, args.vocab, generator=g, device=args.device, out=z[c]).mul_(0.01).add_(star)
    return z, reference_form("kl", star)


def step(fn, z: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    leaf = z.detach().requires_grad_(True)
    loss = fn(leaf, ref).sum(-1)
    (grad,) = torch.autograd.grad(loss.sum(), leaf)
    return loss.detach(), grad


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def peak_memory(name: str, args, queue) -> None:
    """In a fresh process: the peak memory of one step of ``name`` beyond its inputs (bytes)."""
    z, ref = inputs(args)
    _sync(args.device)
    if torch.device(args.device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(VARIANTS[name], z, ref)
        _sync(args.device)
        queue.put(torch.cuda.max_memory_allocated() - base)
    else:
        # Resident now (inputs in place) against the high-water mark after the step.
        base = int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()
        step(VARIANTS[name], z, ref)
        queue.put(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--chains", type=int, default=4)
    ap.add_argument("--positions", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)

    # First, while this process is small: a child's peak resident set starts from its parent's.
    ctx = mp.get_context("spawn")
    peaks = {}
    for name in VARIANTS:
        queue = ctx.Queue()
        proc = ctx.Process(target=peak_memory, args=(name, args, queue))
        proc.start()
        peaks[name] = queue.get()
        proc.join()
    z, ref = inputs(args)
    values = {name: step(fn, z, ref) for name, fn in VARIANTS.items()}  # also the warm-up
    loss_diff = float((values["tld"][0] - values["naive"][0]).abs().max() / values["naive"][0].abs().max())
    grad_diff = float((values["tld"][1] - values["naive"][1]).abs().max() / values["naive"][1].abs().max())
    del values
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(args.reps):
        for name, fn in VARIANTS.items():
            _sync(args.device)
            t0 = time.perf_counter()
            step(fn, z, ref)
            _sync(args.device)
            times[name].append(time.perf_counter() - t0)
    del z, ref

    full = args.chains * args.positions * args.vocab * 4
    ratios = [n / t for n, t in zip(times["naive"], times["tld"])]
    head = ("| device | chains × positions × vocabulary | one full-size tensor | naive ms (median) | tld ms (median) | "
            "naive / tld: median (per rep) | peak memory beyond the inputs: naive | tld | max relative difference: loss, gradient |\n"
            + "|---" * 9 + "|")
    line = (f"| {args.device} | {args.chains} × {args.positions} × {args.vocab} | {full / 2**30:.2f} GiB | "
            f"{statistics.median(times['naive']) * 1e3:.0f} | {statistics.median(times['tld']) * 1e3:.0f} | "
            f"**{statistics.median(ratios):.2f}×** ({', '.join(f'{r:.2f}' for r in ratios)}) | "
            f"{peaks['naive'] / 2**30:.2f} GiB | {peaks['tld'] / 2**30:.2f} GiB | {loss_diff:.1e}, {grad_diff:.1e} |")
    print(head)
    print(line)
    if not args.no_write:
        block = (
            f"### {machine_line()}\n\n"
            f"`benchmarks/behavioral_kl.py --device {args.device} --chains {args.chains} --positions {args.positions} "
            f"--vocab {args.vocab} --reps {args.reps}`: forward+backward of the per-position KL to the reference for "
            "every chain, tld's `per_sample_loss` against the divergence written out for autograd; interleaved "
            "repetitions; peak memory of one step in a fresh process.\n\n" + head + "\n" + line + "\n"
        )
        append_to_section(SECTION, "behavioral_kl.py", block)


if __name__ == "__main__":
    main()
