"""The behavioral LLC's memory estimate (``tld.memory.sgld_bytes``) against what whole runs allocate.

Each case runs ``behavioral_llc`` (given step size, 10 burn-in + 20 draws and the end-of-run
curvature checks) in a fresh process, after a tiny warm-up run; the peak resident set is reset just
before it (Linux's /proc/self/clear_refs) and the case reports how far it rose, against the estimate
that ``behavioral_llc`` checks before sampling (``llc/estimate.py: check_memory``). The cases cover
toy:bytelm at several chain counts and batch shapes, three ToyTransformers in which the attention,
the logits or the parameters dominate, and restricted LLCs (one layer's attention sampled). On a
GPU (``--device cuda``) the peak is ``torch.cuda.max_memory_allocated`` beyond the loaded model.

    python benchmarks/llc_memory.py [--device cpu] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import append_to_section, machine_line  # noqa: E402

from tl_degeneracy.memory import ALLOCATOR_SLACK  # noqa: E402

SECTION = "## behavioral LLC memory: estimate against measured peaks"

SHAPES = {
    "logits": dict(n_layers=1, d_model=64, n_heads=4, d_head=16, d_mlp=256, d_vocab=8192),
    "parameters": dict(n_layers=4, d_model=256, n_heads=8, d_head=32, d_mlp=1024, d_vocab=64),
    "attention": dict(n_layers=2, d_model=32, n_heads=8, d_head=4, d_mlp=64, d_vocab=64),
}
#: (model, chains, sequences, positions, sampled parameters or None for all)
CASES = [
    ("bytelm", 2, 8, 32, None), ("bytelm", 8, 8, 32, None), ("bytelm", 8, 16, 64, None),
    ("bytelm", 8, 16, 64, "blocks.1.attn"),
    ("logits", 4, 8, 64, None), ("parameters", 4, 4, 32, None), ("parameters", 4, 4, 32, "blocks.3.attn"),
    ("attention", 4, 8, 256, None),
]

_CASE = """
import json, os, sys, warnings
os.environ["TQDM_DISABLE"] = "1"
import torch
torch.set_num_threads(1)
warnings.simplefilter("ignore")
import tl_degeneracy as tld
from tl_degeneracy.llc import estimate as llc_estimate
from tl_degeneracy.models.toys.transformer import ToyTransformer

name, chains, b, t, params, shape, device = json.loads(sys.argv[1])
if shape is None:
    model = tld.load_model("toy:bytelm", device=device)
    tokens = tld.toy_data("bytelm")[:b, :t]
else:
    model = ToyTransformer(n_ctx=max(t, 8), seed=0, **shape).to(device).eval()
    tokens = torch.randint(0, shape["d_vocab"], (b, t), generator=torch.Generator().manual_seed(0))
run = dict(draws=20, burnin=10, step_size=1e-4, progress=False, params=params)
tld.behavioral_llc(model, tokens[:1, :4], chains=1, **run)  # lazy loads and first allocations
checked = []
real = llc_estimate.check_memory


def spy(target, selection, n):  # what the run itself checks
    checked.append((target, selection))
    return real(target, selection, n)


llc_estimate.check_memory = spy


def kb(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024


if device == "cuda":
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
else:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = kb("VmRSS")
r = tld.behavioral_llc(model, tokens, chains=chains, **run)
peak = torch.cuda.max_memory_allocated() if device == "cuda" else kb("VmHWM")
target, selection = checked[-1]
estimate = llc_estimate.chains_memory(target, selection, chains)
print(json.dumps({"measured": peak - before, "estimate": estimate, "n_params": r.n_params}))
"""


def run_case(case, device: str) -> dict:
    name, chains, b, t, params = case
    arg = json.dumps([name, chains, b, t, params, SHAPES.get(name), device])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", _CASE, arg], capture_output=True, text=True, timeout=1200, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"case {case} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    if args.device == "cpu" and not os.access("/proc/self/clear_refs", os.W_OK):
        sys.exit("needs Linux's /proc/self/clear_refs to reset the peak resident set")
    head = ("| model | chains | tokens | sampled | parameters sampled | measured peak rise | estimate (before the "
            f"{ALLOCATOR_SLACK} slack) | measured / estimate before the slack |\n" + "|---" * 8 + "|")
    print(head, flush=True)
    rows, ratios = [], []
    for case in CASES:
        got = run_case(case, args.device)
        bare = got["estimate"] / ALLOCATOR_SLACK
        ratio = got["measured"] / bare
        ratios.append(got["measured"] / got["estimate"])
        name, chains, b, t, params = case
        row = (f"| {'toy:bytelm' if name == 'bytelm' else f'ToyTransformer ({name})'} | {chains} | {b}×{t} | "
               f"{params or 'all'} | {got['n_params']:,} | {got['measured'] / 2**20:.1f} MiB | {bare / 2**20:.1f} MiB | "
               f"{ratio:.2f} |")
        rows.append(row)
        print(row, flush=True)
    summary = (f"measured / estimate (with the slack): {min(ratios):.2f}–{max(ratios):.2f}; "
               f"{'every run within the estimate' if max(ratios) <= 1 else 'SOME RUN ABOVE THE ESTIMATE'}")
    print(summary)
    if not args.no_write:
        block = (f"### {machine_line()}\n\n`benchmarks/llc_memory.py --device {args.device}`: each case in a fresh "
                 "process, given step size, 10 + 20 steps and the end-of-run curvature checks, 1 thread; on a CPU the "
                 "rise of the peak resident set over the run.\n\n" + head + "\n" + "\n".join(rows) + f"\n\n{summary}.\n")
        append_to_section(SECTION, "llc_memory.py", block)


if __name__ == "__main__":
    main()
