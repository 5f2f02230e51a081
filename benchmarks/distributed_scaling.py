"""Scaling of the ``torch.distributed`` path on 1 and N processes: a statistics pass (each rank
streams its shard of the batches, the float64 accumulators are all-reduced) and SGLD chains (the
chains are sharded over the ranks), on toy:bytelm.

The script launches itself under ``python -m torch.distributed.run --standalone --nproc_per_node=P``
for P = 1 and P = N; each run times, on every rank after a barrier, ``activation_stats`` over
``--tokens`` and ``behavioral_llc`` with ``--chains`` chains of ``--steps`` draws at a given step size
(no calibration). Backend gloo on the CPU (each process ``--threads`` threads), nccl on GPUs (rank r
on GPU r). Speedup = time(1 process) / time(N processes); ideal N.

    python benchmarks/distributed_scaling.py [--nproc 2] [--device cpu] [--threads 1] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
SECTION = "## torchrun scaling"


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    import tl_degeneracy as tld

    torch.set_num_threads(args.threads)
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    try:
        device = torch.device(args.device)
        model = tld.load_model("toy:bytelm", device=device)
        n_seq, n_pos = (int(x) for x in args.tokens.split("x"))
        tokens = tld.toy_data("bytelm")[:n_seq, :n_pos]
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        times = {}
        for name, run in (
            ("statistics", lambda: tld.activation_stats(model, tokens, hooks=["resid_pre", "resid_post"], batch_size=16,
                                                        progress=False)),
            ("chains", lambda: tld.behavioral_llc(model, tokens[:8, :32], chains=args.chains, draws=args.steps, burnin=0,
                                                  step_size=1e-6, seed=0, progress=False)),
        ):
            run()  # warm-up: lazy loads, allocator, kernels
            dist.barrier()
            sync()
            t0 = time.perf_counter()
            run()
            sync()
            dist.barrier()
            times[name] = time.perf_counter() - t0
        if dist.get_rank() == 0:
            Path(args.result).write_text(json.dumps(times))
    finally:
        dist.destroy_process_group()


def launch(nproc: int, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "times.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", __file__,
               "--worker", "--result", str(result), "--device", args.device, "--threads", str(args.threads),
               "--tokens", args.tokens, "--chains", str(args.chains), "--steps", str(args.steps)]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads),
               "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
        if done.returncode != 0:
            raise RuntimeError(f"torchrun with {nproc} processes failed:\n{done.stderr[-3000:]}")
        return json.loads(result.read_text())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--tokens", default="64x128", help="sequences x positions of the statistics pass")
    ap.add_argument("--chains", type=int, default=8)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)
    from record import append_to_section, machine_line

    one, many = launch(1, args), launch(args.nproc, args)
    head = f"| what | 1 process | {args.nproc} processes | speedup (ideal {args.nproc}×) |\n|---|---|---|---|"
    rows = [f"| {k} | {one[k]:.2f} s | {many[k]:.2f} s | {one[k] / many[k]:.2f}× |" for k in one]
    table = head + "\n" + "\n".join(rows)
    print(table)
    if not args.no_write:
        what = (f"`benchmarks/distributed_scaling.py --nproc {args.nproc} --device {args.device} --threads {args.threads}`: "
                f"toy:bytelm; statistics = `activation_stats` of resid_pre/resid_post on {args.tokens} tokens in batches "
                f"of 16 (shards of batches, float64 all-reduce); chains = `behavioral_llc`, {args.chains} chains × "
                f"{args.steps} draws on 8×32 tokens at a given step size (chains sharded); "
                f"{'gloo' if args.device == 'cpu' else 'nccl'}, {args.threads} thread(s) per process, after one warm-up run.")
        append_to_section(SECTION, "distributed_scaling.py", f"### {machine_line()}\n\n{what}\n\n{table}\n")


if __name__ == "__main__":
    main()
