"""Cost of a full local interaction basis (LIB basis + edges, METHODS §5) against rib's public figures.

rib's GPT-2-small basis (``research/interaction_basis.md`` §3.3): 500 sequences × 1024 tokens in
about 10 h with 66–68 GB on one GPU, float64, one position source, i.e. about 70 ms per token for
the basis alone (its edges are a separate run). We time ``tld.interaction_basis(model, tokens,
kind="local")`` (default nodes: resid_pre of every layer and the final norm's output; ``kl`` output,
``--probes`` Jacobian probes per batch, ``--edge-sources`` ±1 position sources for the edges) on

- ``bytelm``: the bundled ``toy:bytelm`` (2 layers, d_model 128) on held-out source bytes;
- ``gpt2``: a random ToyTransformer of GPT-2 small's shape (12 layers, d_model 768, 12 heads,
  d_mlp 3072, vocabulary 50257) on random tokens: a few sequences, as a CPU can afford;
- ``modadd``: the bundled ``toy:modadd`` (p = 31) on its 480 training pairs, every position, beside
  rib's recorded modadd times (basis 0.56–0.68 s, edges 0.33–0.39 s for 3,830 pairs, p = 113, device
  not recorded). The LIB-vs-PCA comparison on this model (issue 5) is tutorial 04.

Time per token = seconds / counted positions (wall time; the process's CPU time is reported too,
since other processes may share the cores), separately for the basis (Gram + Jacobian passes,
what rib's 10 h covers) and the edges; the ratio to rib's 70 ms/token is printed with its caveats:
ours is a CPU, theirs a GPU; ours estimates M with k probes per batch (cost ∝ k), rib's with one VJP
per next-node direction (cost ∝ kept directions, ~770 for GPT-2); and with few tokens a node keeps at
most (tokens − 1) directions, which bounds our edge cost. Memory is the increase of the process's
peak resident set size (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) over the run, measured in a
fresh child process per model after the model and data are loaded: it covers torch's C++ allocations,
which ``tracemalloc`` does not see. With ``--device cuda`` the model runs on the GPU and the peak
CUDA column is ``torch.cuda.max_memory_allocated`` over the run.

The default sizes take about a minute on 2 idle cores (edge cost grows about with tokens² here,
since the kept directions grow with the tokens). Prints a table and appends it, with the machine and the load, to BENCHMARKS.md under
"## interaction basis cost".

    .venv/bin/python benchmarks/interaction_basis.py [--models bytelm,gpt2] [--bytelm-tokens 8x128]
        [--gpt2-tokens 2x48] [--modadd-tokens 480x3] [--probes 8] [--edge-sources 1] [--device cuda] [--no-write]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

import tl_degeneracy as tld  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import append_to_section  # noqa: E402
from stats_throughput import GPT2_SMALL, load_bytelm, machine  # noqa: E402

SECTION = "## interaction basis cost"
#: rib, GPT-2 small basis: ~10 h for 500 × 1024 tokens on one GPU (research/interaction_basis.md §3.3).
RIB_BASIS_S_PER_TOKEN = 10 * 3600 / (500 * 1024)
RIB_MEMORY_GB = "66–68"


def parse_tokens(text: str) -> tuple[int, int]:
    """``"16x128"`` → (16 sequences, 128 tokens each)."""
    n, _, length = text.lower().partition("x")
    return int(n), int(length)


def model_and_tokens(name: str, n_seq: int, seq_len: int):
    if name == "bytelm":
        model, tokens, _, origin = load_bytelm()
        if tokens.shape[0] < n_seq or tokens.shape[1] < seq_len:
            raise SystemExit(f"toy:bytelm's held-out data has {tuple(tokens.shape)} tokens; asked for {n_seq}x{seq_len}")
        return model, tokens[:n_seq, :seq_len], origin
    if name == "gpt2":
        from tl_degeneracy.models.toys.transformer import ToyTransformer

        model = ToyTransformer(**GPT2_SMALL, seed=0).eval()
        tokens = torch.randint(0, GPT2_SMALL["d_vocab"], (n_seq, seq_len), generator=torch.Generator().manual_seed(0))
        return model, tokens, "random ToyTransformer, GPT-2-small shape"
    if name == "modadd":
        tokens = tld.toy_data("modadd", split="train")
        if n_seq > len(tokens) or seq_len != tokens.shape[1]:
            raise SystemExit(f"toy:modadd's training split is {tuple(tokens.shape)}; asked for {n_seq}x{seq_len}")
        return tld.load_model("toy:modadd"), tokens[:n_seq], "toy:modadd (bundled weights), training pairs"
    raise SystemExit(f"unknown model {name!r}; choose bytelm, gpt2 or modadd")


def run_one(name: str, n_seq: int, seq_len: int, probes: int, edge_sources: int, threads: int, queue,
            device: str = "cpu") -> None:
    """One model in a fresh process: load, then time ``interaction_basis`` and its peak-RSS increase
    (and on a GPU torch's peak CUDA allocation during the run)."""
    torch.set_num_threads(threads)
    model, tokens, origin = model_and_tokens(name, n_seq, seq_len)
    model = model.to(device)
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    t0, cpu0 = time.perf_counter(), time.process_time()
    ib = tld.interaction_basis(model, tokens, kind="local", output="kl", n_probes=probes, edge_sources=edge_sources,
                               batch_size=n_seq, progress=False)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cfg = model.cfg
    queue.put({
        "model": name, "origin": origin, "shape": f"L={cfg.n_layers} D={cfg.d_model} V={cfg.d_vocab}",
        "tokens": int(ib.positions["n_samples"]), "layout": f"{n_seq}×{seq_len}", "nodes": len(ib.nodes),
        "kept": "/".join(str(int(k)) for k in ib.dims["interaction_rank"]),
        "basis_s": ib.settings["gram_s"] + ib.settings["jacobian_s"], "edges_s": ib.settings["edges_s"], "wall_s": wall,
        "cpu_s": cpu,
        "peak_rss_increase_mb": (rss_after - rss_before) / 1024,
        "peak_cuda_mb": torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None,
    })


def measure(name: str, tokens: tuple[int, int], probes: int, edge_sources: int, threads: int, device: str = "cpu") -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=run_one, args=(name, *tokens, probes, edge_sources, threads, queue, device))
    proc.start()
    row = queue.get()
    proc.join()
    row["basis_ms_tok"] = 1e3 * row["basis_s"] / row["tokens"]
    row["edges_ms_tok"] = 1e3 * row["edges_s"] / row["tokens"]
    row["basis_vs_rib"] = row["basis_s"] / row["tokens"] / RIB_BASIS_S_PER_TOKEN
    return row


def table(rows: list[dict]) -> str:
    cells = [{
        "model": r["model"], "shape": r["shape"], "tokens": f"{r['tokens']} ({r['layout']})",
        "nodes (kept per node)": f"{r['nodes']} ({r['kept']})",
        "basis s (ms/token)": f"{r['basis_s']:.1f} ({r['basis_ms_tok']:.2f})",
        "edges s (ms/token)": f"{r['edges_s']:.1f} ({r['edges_ms_tok']:.2f})", "total s (CPU s)": f"{r['wall_s']:.1f} ({r['cpu_s']:.1f})",
        "peak RSS increase": f"{r['peak_rss_increase_mb']:,.0f} MB",
        "peak CUDA": "—" if r.get("peak_cuda_mb") is None else f"{r['peak_cuda_mb']:,.0f} MB",
        "basis ms/token ÷ rib's 70": f"{r['basis_vs_rib']:.3f}×",
    } for r in rows]
    head = list(cells[0])
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                     + ["| " + " | ".join(c.values()) + " |" for c in cells])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="bytelm,gpt2,modadd")
    parser.add_argument("--bytelm-tokens", default="8x128", help="sequences x tokens for toy:bytelm")
    parser.add_argument("--gpt2-tokens", default="2x48", help="sequences x tokens for the GPT-2-shaped model")
    parser.add_argument("--modadd-tokens", default="480x3", help="training pairs x 3 for toy:modadd")
    parser.add_argument("--probes", type=int, default=8, help="Jacobian probes per batch (interaction_basis n_probes)")
    parser.add_argument("--edge-sources", type=int, default=1, help="random ±1 position sources for the edges")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, … (default cpu)")
    parser.add_argument("--no-write", action="store_true", help="print only; do not append to BENCHMARKS.md")
    args = parser.parse_args(argv)
    sizes = {"bytelm": parse_tokens(args.bytelm_tokens), "gpt2": parse_tokens(args.gpt2_tokens),
             "modadd": parse_tokens(args.modadd_tokens)}

    info = machine()
    edges_file = Path(tld.__file__).parent / "interaction" / "edges.py"
    edges_mtime = time.strftime("%Y-%m-%d %H:%M", time.gmtime(edges_file.stat().st_mtime))
    load_before = os.getloadavg()
    rows = []
    for name in args.models.split(","):
        rows.append(measure(name, sizes[name], args.probes, args.edge_sources, args.threads, args.device))
        print(table(rows[-1:]), flush=True)
    load_after = os.getloadavg()
    if time.strftime("%Y-%m-%d %H:%M", time.gmtime(edges_file.stat().st_mtime)) != edges_mtime:
        edges_mtime += " (changed during the run)"
    block = "\n".join([
        f"### {info['date']} UTC — {info['cpu']}, nproc {info['nproc']}, torch {info['torch']} ({args.threads} threads), "
        f"{'CPU' if args.device == 'cpu' else args.device}",
        "",
        f"`interaction_basis(kind=\"local\", output=\"kl\", n_probes={args.probes}, edge_sources={args.edge_sources})`, "
        f"one batch per model, float32 models, float64 accumulators; edges.py as of {edges_mtime} UTC. Load average "
        f"{load_before[0]:.1f} before, {load_after[0]:.1f} after (other processes share the 2 cores).",
        "",
        table(rows),
        "",
        f"rib, GPT-2 small basis on one GPU: about 10 h for 500 × 1024 tokens = {1e3 * RIB_BASIS_S_PER_TOKEN:.0f} ms/token, "
        f"{RIB_MEMORY_GB} GB. The last column divides our basis time per token by that. Not like for like: CPU against "
        "GPU; k probes per batch (cost ∝ k) against one VJP per next-node direction (∝ ~770 kept directions); "
        "and with few tokens a node keeps at most tokens − 1 directions, which caps our edge cost; our memory is "
        "the peak-RSS increase of the process (ru_maxrss), theirs GPU memory. rib's modadd (p = 113, 3,830 pairs, "
        "device not recorded): basis 0.56–0.68 s, edges 0.33–0.39 s. LIB against PCA on toy:modadd (issue 5's "
        "reproduction): `tutorials/04_interaction_bases.ipynb`, section 8.",
    ])
    print()
    print(block)
    if not args.no_write:
        append_to_section(SECTION, "interaction_basis.py", block)


if __name__ == "__main__":
    main()
