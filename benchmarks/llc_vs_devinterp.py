"""Behavioral LLC: tl_degeneracy's vectorised sampler against devinterp 2.0.1 (optional), and theory.

Models with known learning coefficients (METHODS §1), behavioral mse loss (= KL of unit Gaussians):
linear regression (d = 10, λ = 5) and deep linear networks (3, 2, 3) with true ranks 0, 1, 2
(Aoyagi: 2.5, 3.5, 4.0). n = 1000 inputs, full batch.

* ``tld``: ``behavioral_llc`` at default settings (8 chains × (500 + 2000), nβ = 1000, γ = 1,
  automatic step size).
* ``devinterp``: ``devinterp.slt.llc.llc`` with the same η (the one tld chose), nβ, γ, chains and
  steps, the behavioral loss against the frozen reference as ``loss_fn``; its baseline is exact here
  (``num_init_loss_batches=1``, full batch, L_B(θ*) = 0). Its λ̂ is recomputed over post-burn-in
  steps (devinterp averages burn-in too). Skipped when devinterp is not importable.

Wall time is reported per chain-step (total sampling seconds / (chains × steps)), tld including its
automatic step-size calibration. Prints a Markdown table and, unless ``--no-write``, appends it to
BENCHMARKS.md under "## behavioral LLC vs devinterp".

    .venv/bin/python benchmarks/llc_vs_devinterp.py [--models reg,dln0,dln1,dln2] [--no-write]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from record import append_to_section  # noqa: E402
from tl_degeneracy.llc import behavioral_llc  # noqa: E402
from tl_degeneracy.theory import (  # noqa: E402
    dln_learning_coefficient,
    regular_learning_coefficient,
    two_layer_linear_network,
)


def regression():
    x = torch.randn(1000, 10, generator=torch.Generator().manual_seed(1))
    model = nn.Linear(10, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, 10, generator=torch.Generator().manual_seed(2)))
    return model, x, regular_learning_coefficient(10).llc


def dln(rank: int):
    model = two_layer_linear_network((3, 2, 3), rank)
    x = torch.randn(1000, 3, generator=torch.Generator().manual_seed(1))
    return model, x, dln_learning_coefficient((3, 2, 3), rank).llc


MODELS = {"reg": regression, "dln0": lambda: dln(0), "dln1": lambda: dln(1), "dln2": lambda: dln(2)}


def run_devinterp(model, x, res):
    try:
        from datasets import Dataset
        from devinterp.slt.llc import llc
    except ImportError:
        return None
    ref = model(x).detach()
    if ref.ndim == 1:
        ref = ref[:, None]
    ds = Dataset.from_dict({"input_ids": [[i, 0] for i in range(len(x))]}).with_format("torch")

    def loss_fn(m, ids):
        idx = ids[:, 0].long()
        out = m(x[idx])
        out = out[:, None] if out.ndim == 1 else out
        return 0.5 * (out - ref[idx]).square().sum(-1, keepdim=True)

    steps = res.burnin + res.draws
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        out = llc(model, ds, {}, lr=res.step_size, n_beta=res.nbeta, loss_fn=loss_fn, num_chains=res.chains,
                  num_draws=res.draws, num_burnin_steps=res.burnin, batch_size=len(x), num_init_loss_batches=1,
                  localization=res.gamma, device="cpu", output_path=os.path.join(tmp, "run"))
        trace = np.asarray(out["loss_trace"].values)  # [chain, step]
        wall = time.perf_counter() - t0
    per_chain = res.nbeta * (trace[:, res.burnin:] - float(np.asarray(out["init_loss"].values).mean())).mean(1)
    return {"llc": per_chain.mean(), "stderr": per_chain.std(ddof=1) / np.sqrt(len(per_chain)),
            "s_per_chain_step": wall / (res.chains * steps), "llc_devinterp_mean": float(out["llc_mean"])}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="reg,dln0,dln1,dln2")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for name in args.models.split(","):
        model, x, theory = MODELS[name]()
        t0 = time.perf_counter()
        res = behavioral_llc(model, x)
        wall = time.perf_counter() - t0
        steps = res.burnin + res.draws
        di = run_devinterp(model, x, res)
        rows.append((name, theory, res, wall / (res.chains * steps), res.diagnostics["s_per_chain_step"], di))
        print(name, "done", flush=True)
    lines = [
        "| model | theory λ | tld λ̂ ± se | tld s/chain-step (total / sampling only) | devinterp λ̂ ± se (same η) | devinterp s/chain-step | ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, theory, res, total, sampling, di in rows:
        d_llc = f"{di['llc']:.3f} ± {di['stderr']:.3f}" if di else "n/a"
        d_t = f"{di['s_per_chain_step'] * 1e3:.3f} ms" if di else "n/a"
        ratio = f"{di['s_per_chain_step'] / total:.1f}×" if di else "n/a"
        lines.append(f"| {name} | {theory} | {res.llc:.3f} ± {res.llc_stderr:.3f} (η {res.step_size:.2g}) | "
                     f"{total * 1e3:.3f} ms / {sampling * 1e3:.3f} ms | {d_llc} | {d_t} | {ratio} |")
    table = "\n".join(lines)
    print(table)
    if args.no_write:
        return
    from importlib.metadata import PackageNotFoundError, version

    try:
        dv = f"devinterp {version('devinterp')}"
    except PackageNotFoundError:
        dv = "devinterp not installed"
    head = (f"### {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC — {platform.processor() or platform.machine()}, "
            f"nproc {os.cpu_count()}, torch {torch.__version__} (1 thread), {dv}\n\n"
            "Defaults: 8 chains × (500 + 2000) steps, nβ = 1000, γ = 1, automatic η; n = 1000, full batch; "
            "devinterp with tld's η. Ratio = devinterp / tld time per chain-step (tld incl. step-size calibration).\n\n")
    append_to_section("## behavioral LLC vs devinterp", "llc_vs_devinterp.py", head + table)


if __name__ == "__main__":
    main()
