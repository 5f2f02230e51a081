"""Behavioral LLC: tl_degeneracy's vectorised sampler against devinterp 2.0.1 (optional), and theory.

Models (METHODS §1):

* ``reg``: linear regression (d = 10, λ = 5); ``dln0``/``dln1``/``dln2``: deep linear networks
  (3, 2, 3) with true ranks 0, 1, 2 (Aoyagi: 2.5, 3.5, 4.0). Behavioral mse loss (= KL of unit
  Gaussians), n = 1000 inputs, full batch, 8 chains × (500 + 2000) steps (``--steps``).
* ``tf``: a 2-layer ToyTransformer (d_model 64, 4 heads of 16, d_mlp 256, vocab 32; ≈ 105k
  parameters) with well-spread random weights, KL behavioral loss on its logits over 16 random
  token sequences of 16 tokens, full batch, 4 chains × (100 + 300) steps (``--tf-*`` options).
  No theory value: the estimates, their spread, and the bias of devinterp's estimated baseline.
* ``bytelm``: the shipped ``toy:bytelm`` (2 layers, d_model 128, vocabulary 256; 479k parameters)
  on 32 sequences of 32 bytes of its bundled held-out text, minibatches of 16, KL behavioral loss,
  4 chains × (25 + 75) steps (``--bytelm-*`` options); both libraries get the same batch size.

Both libraries sample the same model and data with the same loss, chains, steps, η (the one tld
chose automatically), nβ = 1000 and γ = 1. devinterp gets the behavioral loss against frozen
reference outputs as ``loss_fn`` (the reference is tld's own ``reference_form``, the per-token
loss tld's ``per_sample_loss``) and its default ``num_init_loss_batches`` (32, its real default in
``devinterp.slt.config.SamplerConfig``). From each devinterp run two estimates are read:

* *default baseline*: devinterp's ``llc_mean`` as it reports it: nβ (mean loss over every step,
  burn-in included, − its init loss, the mean over 32 batches at θ*);
* *exact baseline*: nβ · mean over post-burn-in steps (as tld), baseline L_B(θ*) = 0 exactly.

Wall time: per chain-step = the whole call's seconds / (chains × steps). tld's includes its
automatic step-size calibration (pilots, burn-in curvature checks) in its default run; the
like-for-like comparison gives tld the same η as devinterp (``step_size=η``: no calibration, the
curvature at θ* and at the end is still measured); "sampling only" is tld's chain loop alone.
devinterp's includes its init-loss pass and Zarr writes. Per model: one automatic tld run (the
estimate), then ``--reps`` pairs (tld given η, devinterp) alternating, so both see the same
machine load; the ratio is the median of the per-pair ratios. The 1/5/15-minute load average before and after is recorded.

Chain-step against a bare forward+backward (``--bare``, default for ``bytelm``): how close one SGLD
chain-step comes to the model work it cannot avoid, one forward pass of the model on the step's
batch, its behavioral loss against the cached reference outputs and one backward pass to the
parameters (plain autograd, no chains). tld's chain loop (``run_chains`` on the same target, η, nβ,
γ: the chain-batched loss and gradient, the noise draw, the update and its norms) and the bare
passes alternate in blocks of ``--bare-steps`` steps (chains × steps bare passes), each timed by
wall clock and by the process's CPU time (which other processes' load inflates less); the ratio
is the median over ``--bare-blocks`` blocks of (chain loop / chains × steps) / (bare block /
chains × steps). The whole call's ratio (tld given η, calibration of the bias bound included) is
reported beside it.

``--compile`` adds tld with ``compile=True``: one automatic run first (it pays the compilation,
reported apart, and gives the compiled estimate), then a compiled run given η in every repetition
(between tld's uncompiled run and devinterp's), which reuses the compiled step: the steady state of a
long run or of later calls in one session.

    PYTHONPATH=/tmp/di-deps .venv/bin/python benchmarks/llc_vs_devinterp.py [--models reg,dln0,dln1,dln2,tf,bytelm]
        [--reps 2] [--steps 500,2000] [--chains 8] [--tf-size 64] [--tf-steps 100,300] [--tf-chains 4]
        [--bytelm-steps 25,75] [--bytelm-chains 4] [--device cpu] [--bare] [--bare-blocks 6] [--bare-steps 10] [--threads 1]
        [--compile] [--no-devinterp] [--no-write]

``--no-devinterp`` times tld alone (where devinterp is not importable: its columns read "—").

``--threads`` sets torch's intra-op threads for both libraries alike (CI and the development machine
have 2 cores: run 1 and 2 and report both).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from record import append_to_section  # noqa: E402
from stats_throughput import machine  # noqa: E402  (shared machine description)
from tl_degeneracy.llc import behavioral_llc  # noqa: E402
from tl_degeneracy.llc.losses import per_sample_loss, reference_form  # noqa: E402
from tl_degeneracy.theory import (  # noqa: E402
    dln_learning_coefficient,
    regular_learning_coefficient,
    two_layer_linear_network,
)


@dataclass
class Case:
    """One benchmark model: what both libraries sample, and how devinterp is fed the same loss."""

    name: str
    model: nn.Module
    data: torch.Tensor
    theory: float | None
    loss: str
    chains: int
    burnin: int
    draws: int
    #: Sequences (rows) per minibatch, the same for both libraries; None: full batch.
    batch_size: int | None = None

    def devinterp_inputs(self):
        """Rows of devinterp's ``input_ids`` and its ``loss_fn`` (per-token loss [batch, seq − 1]).

        The last column of a row is the sample's index (devinterp shuffles the rows), so the loss
        finds its reference output; the columns before it are the model's input (tokens for the
        transformer, a placeholder for a plain module, whose input is looked up by index).
        """
        model, data = self.model, self.data
        with torch.no_grad():
            ref = reference_form(self.loss, model(data))
        if ref.ndim == 1:
            ref = ref[:, None]
        idx = torch.arange(len(data), device=data.device)[:, None]
        if self.loss == "kl":  # token model: [tokens…, index] → KL at every position
            rows = torch.cat([data, idx], 1)

            def loss_fn(m, ids):
                logits = m(ids[:, :-1])
                return per_sample_loss("kl", logits[None], ref[ids[:, -1]])[0]
        else:  # plain module: [0, index] → one loss per sample
            rows = torch.cat([torch.zeros_like(idx), idx], 1)

            def loss_fn(m, ids):
                out = m(data[ids[:, -1]])
                out = out[:, None] if out.ndim == 1 else out
                return per_sample_loss("mse", out[None], ref[ids[:, -1]])[0][:, None]

        return rows.tolist(), loss_fn


def regression(args) -> Case:
    x = torch.randn(1000, 10, generator=torch.Generator().manual_seed(1))
    model = nn.Linear(10, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, 10, generator=torch.Generator().manual_seed(2)))
    return Case("reg", model, x, regular_learning_coefficient(10).llc, "mse", args.chains, *args.steps)


def dln(rank: int):
    def make(args) -> Case:
        model = two_layer_linear_network((3, 2, 3), rank)
        x = torch.randn(1000, 3, generator=torch.Generator().manual_seed(1))
        return Case(f"dln{rank}", model, x, dln_learning_coefficient((3, 2, 3), rank).llc, "mse", args.chains, *args.steps)

    return make


def transformer(args) -> Case:
    from tests.fixtures.toys import make_tiny_toy_transformer

    d = args.tf_size
    model = make_tiny_toy_transformer(0, n_layers=2, d_model=d, n_heads=4, d_head=d // 4, d_mlp=4 * d, d_vocab=32, n_ctx=16)
    tokens = torch.randint(0, 32, (args.tf_seqs, 16), generator=torch.Generator().manual_seed(0))
    return Case("tf", model, tokens, None, "kl", args.tf_chains, *args.tf_steps)


def bytelm(args) -> Case:
    from tl_degeneracy import load_model
    from tl_degeneracy.models.toys.data import toy_data

    tokens = toy_data("bytelm", n=args.bytelm_seqs, seq_len=32)
    return Case("bytelm", load_model("toy:bytelm"), tokens, None, "kl", args.bytelm_chains, *args.bytelm_steps,
                batch_size=args.bytelm_batch)


MODELS = {"reg": regression, "dln0": dln(0), "dln1": dln(1), "dln2": dln(2), "tf": transformer, "bytelm": bytelm}


def mean_se(values: np.ndarray) -> tuple[float, float]:
    values = np.asarray(values, dtype=float)
    return float(values.mean()), float(values.std(ddof=1) / np.sqrt(len(values)))


def run_tld(case: Case, step_size: float | None = None, compile: bool = False) -> dict:
    t0 = time.perf_counter()
    c0 = time.process_time()
    res = behavioral_llc(case.model, case.data, loss=case.loss, chains=case.chains, draws=case.draws, burnin=case.burnin,
                         batch_size=case.batch_size, step_size=step_size, compile=compile)
    wall = time.perf_counter() - t0
    cpu = time.process_time() - c0
    n = case.chains * (case.burnin + case.draws)
    if compile and not res.diagnostics["compiled"]:
        sys.exit(f"--compile: tld could not compile the loss: {res.diagnostics['compile_error']}")
    return {"res": res, "s": wall / n, "cpu": cpu / n, "s_sampling": res.diagnostics["s_per_chain_step"],
            "compile_s": res.diagnostics["compile_s"]}


def _clock() -> tuple[float, float]:
    """Wall and process CPU seconds, after the accelerator's queue has drained (if there is one)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter(), time.process_time()


def _bare_pass(case: Case):
    """One bare forward+backward: the model on the first batch, its behavioral loss against the
    reference outputs (``Target.loss_on``'s per-position divergence, summed and divided by the
    positions), the gradient of every parameter by plain autograd. Returns the closure."""
    x = case.data if case.batch_size is None else case.data[: case.batch_size]
    model = case.model.eval()
    with torch.no_grad():
        out = model(x)
        ref = reference_form(case.loss, out[:, None] if out.ndim == 1 else out)
    params = [p for p in model.parameters() if p.requires_grad]
    positions = ref[..., 0].numel()

    def step():
        out = model(x)
        out = out[:, None] if out.ndim == 1 else out
        loss = per_sample_loss(case.loss, out[None], ref)[0].sum() / positions
        torch.autograd.grad(loss, params)

    return step


def chain_step_vs_bare(case: Case, res, step_size: float, blocks: int, steps: int) -> dict:
    """tld's chain loop against bare forward+backward passes, alternating in blocks (module
    docstring): per block the seconds (wall, CPU) of one chain-step and of one bare pass."""
    from tl_degeneracy.llc.layout import select_coordinates
    from tl_degeneracy.llc.loss_grad import LossGrad
    from tl_degeneracy.llc.sampler import Dynamics, chain_seed, initial_state, run_chains
    from tl_degeneracy.llc.targets import make_target

    target = make_target(case.model, case.data, case.loss, case.batch_size)
    bare = _bare_pass(case)
    n = case.chains * steps
    rows = []
    with target.engine.eval_mode():
        selection = select_coordinates(target, None)
        loss_grad = LossGrad(target, selection.layout)
        dynamics = Dynamics(nbeta=res.nbeta, step_size=step_size, gamma=res.gamma, steps=steps * (blocks + 1))
        state = initial_state(target, selection.layout, [chain_seed(0, c) for c in range(case.chains)], dynamics)
        state = run_chains(target, selection.layout, selection.mask, dynamics, state, stop_after=steps, loss_grad=loss_grad)
        bare()  # warm-up of both, so no block pays a first call
        for _ in range(blocks):
            t0, c0 = _clock()
            for _ in range(n):
                bare()
            t1, c1 = _clock()
            state = run_chains(target, selection.layout, selection.mask, dynamics, state, stop_after=state.step + steps,
                               loss_grad=loss_grad)
            t2, c2 = _clock()
            rows.append(((t2 - t1) / n, (c2 - c1) / n, (t1 - t0) / n, (c1 - c0) / n))
    chain_wall, chain_cpu, bare_wall, bare_cpu = np.array(rows).T
    return {"chain_wall": chain_wall, "chain_cpu": chain_cpu, "bare_wall": bare_wall, "bare_cpu": bare_cpu,
            "ratio_wall": chain_wall / bare_wall, "ratio_cpu": chain_cpu / bare_cpu}


class _Plain(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)


def run_devinterp(case: Case, res, step_size: float, device: str = "cpu") -> dict:
    from datasets import Dataset
    from devinterp.slt.llc import llc

    rows, loss_fn = case.devinterp_inputs()
    ds = Dataset.from_dict({"input_ids": rows}).with_format("torch")
    # devinterp takes anything with ``cfg.n_heads`` for a HookedTransformer and calls its TL-only
    # ``.to(device, print_details=…)``; the toy has a cfg but a plain ``.to``, so it goes in a wrapper.
    model = _Plain(case.model) if hasattr(case.model, "cfg") else case.model
    with tempfile.TemporaryDirectory() as tmp:
        t0, c0 = time.perf_counter(), time.process_time()
        # num_init_loss_batches is left at devinterp's default (32).
        out = llc(model, ds, {}, lr=step_size, n_beta=res.nbeta, loss_fn=loss_fn, num_chains=case.chains,
                  num_draws=case.draws, num_burnin_steps=case.burnin, batch_size=case.batch_size or len(rows),
                  localization=res.gamma, device=device, output_path=os.path.join(tmp, "run"))
        trace = np.asarray(out["loss_trace"].values, dtype=float)  # [chain, step]
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    case.model.eval()  # devinterp leaves the caller's model in train mode
    init = float(np.asarray(out["init_loss"].values).mean())
    return {
        "exact": res.nbeta * trace[:, case.burnin:].mean(1),
        "default": np.asarray(out["llc_per_chain"].values, dtype=float),
        "baseline_bias": res.nbeta * init,
        "s": wall / (case.chains * (case.burnin + case.draws)),
        "cpu": cpu / (case.chains * (case.burnin + case.draws)),
    }


def fmt(values: np.ndarray, theory: float | None) -> str:
    m, se = mean_se(values)
    err = "" if theory is None else f" ({m - theory:+.3f})"
    return f"{m:.3f} ± {se:.3f}{err}"


def timing(runs: list[dict], devinterp_runs: list[dict]) -> tuple[str, str, str]:
    """Table cells of tld runs paired with devinterp runs: median ms per chain-step (sampling only),
    median of the pairs' ratios devinterp/tld, the pairs' ratios ("—" without devinterp runs)."""
    ms = f"{np.median([t['s'] for t in runs]) * 1e3:.3f} ({np.median([t['s_sampling'] for t in runs]) * 1e3:.3f})"
    if not devinterp_runs:
        return ms, "—", "—"
    ratios = [d["s"] / t["s"] for t, d in zip(runs, devinterp_runs)]
    return ms, f"{np.median(ratios):.1f}×", ", ".join(f"{r:.1f}" for r in ratios)


def bare_row(case: Case, bare: dict, reps: list) -> str:
    """The chain-step vs bare forward+backward table row (module docstring)."""
    bw, bc = np.median(bare["bare_wall"]), np.median(bare["bare_cpu"])
    tld = [t for t, _, _ in reps]
    whole_wall = np.median([t["s"] for t in tld]) / bw
    whole_cpu = np.median([t["cpu"] for t in tld]) / bc
    di = [d for *_, d in reps if d is not None]
    di_cell = f"{np.median([d['s'] for d in di]) / bw:.2f}× ({np.median([d['cpu'] for d in di]) / bc:.2f}×)" if di else "—"
    return (f"| {case.name} | {case.chains} × {len(bare['ratio_wall'])} blocks of {bare['steps']} steps | "
            f"{bw * 1e3:.2f} ({bc * 1e3:.2f}) | {np.median(bare['chain_wall']) * 1e3:.2f} ({np.median(bare['chain_cpu']) * 1e3:.2f}) | "
            f"**{np.median(bare['ratio_wall']):.3f}×** ({', '.join(f'{r:.2f}' for r in bare['ratio_wall'])}) | "
            f"**{np.median(bare['ratio_cpu']):.3f}×** ({', '.join(f'{r:.2f}' for r in bare['ratio_cpu'])}) | "
            f"{whole_wall:.2f}× ({whole_cpu:.2f}×) | {di_cell} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="reg,dln0,dln1,dln2,tf")
    ap.add_argument("--reps", type=int, default=2, help="repetitions per model, tld and devinterp alternating")
    ap.add_argument("--chains", type=int, default=8)
    ap.add_argument("--steps", default="500,2000", help="burn-in,draws of the regression/DLN models")
    ap.add_argument("--tf-size", type=int, default=64, help="d_model of the transformer (4 heads, d_mlp 4·d_model)")
    ap.add_argument("--tf-seqs", type=int, default=16, help="token sequences (16 tokens each)")
    ap.add_argument("--tf-chains", type=int, default=4)
    ap.add_argument("--tf-steps", default="100,300", help="burn-in,draws of the transformer")
    ap.add_argument("--bytelm-seqs", type=int, default=32, help="toy:bytelm sequences (32 bytes each)")
    ap.add_argument("--bytelm-batch", type=int, default=16, help="toy:bytelm sequences per minibatch")
    ap.add_argument("--bytelm-chains", type=int, default=4)
    ap.add_argument("--bytelm-steps", default="25,75", help="burn-in,draws of toy:bytelm")
    ap.add_argument("--bare", action="store_true",
                    help="time tld's chain-step against bare forward+backward passes for every model (always for bytelm)")
    ap.add_argument("--bare-blocks", type=int, default=6, help="alternating blocks of the chain-step vs bare timing")
    ap.add_argument("--bare-steps", type=int, default=10, help="steps per block of the chain-step vs bare timing")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads, the same for both libraries")
    ap.add_argument("--device", default="cpu", help="where both libraries run (e.g. cuda)")
    ap.add_argument("--compile", action="store_true",
                    help="also time tld with compile=True (its first call compiles; the repetitions reuse it)")
    ap.add_argument("--no-devinterp", action="store_true", help="time tld alone (devinterp's columns read —)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    args.steps = tuple(int(s) for s in args.steps.split(","))
    args.tf_steps = tuple(int(s) for s in args.tf_steps.split(","))
    args.bytelm_steps = tuple(int(s) for s in args.bytelm_steps.split(","))
    torch.set_num_threads(args.threads)
    if not args.no_devinterp:
        try:
            import devinterp  # noqa: F401
        except ImportError:
            sys.exit("devinterp is not importable: install devinterp==2.0.1 (e.g. pip install --target DIR) and put DIR on "
                     "PYTHONPATH, or pass --no-devinterp")
    load_before = os.getloadavg()
    results = []
    for name in args.models.split(","):
        case = MODELS[name](args)
        case.model, case.data = case.model.to(args.device), case.data.to(args.device)
        auto = run_tld(case)  # the default use: automatic η (calibration included in its time)
        eta = auto["res"].step_size
        # The first compiled call pays the compilation; the repetitions reuse its compiled step.
        first_compiled = run_tld(case, compile=True) if args.compile else None
        reps = []
        for _ in range(args.reps):
            # Like for like: both get the same η, tld's whole call against devinterp's whole call.
            tld = run_tld(case, eta)
            compiled = run_tld(case, eta, compile=True) if args.compile else None
            di = None if args.no_devinterp else run_devinterp(case, auto["res"], eta, args.device)
            reps.append((tld, compiled, di))
            also = "" if compiled is None else f", tld compiled {compiled['s'] * 1e3:.3f} ms"
            also += "" if di is None else f", devinterp {di['s'] * 1e3:.3f} ms"
            print(f"{name}: tld {tld['s'] * 1e3:.3f} ms{also} per chain-step", flush=True)
        bare = None
        if args.bare or name == "bytelm":
            bare = chain_step_vs_bare(case, auto["res"], eta, args.bare_blocks, args.bare_steps)
            bare["steps"] = args.bare_steps
            print(f"{name}: chain-step / bare forward+backward {np.median(bare['ratio_wall']):.3f}× wall, "
                  f"{np.median(bare['ratio_cpu']):.3f}× CPU", flush=True)
        results.append((case, auto, first_compiled, reps, bare))
    load_after = os.getloadavg()

    acc = [
        "| model | params | chains × (burn-in + draws) | theory λ | tld λ̂ ± se (− theory) | devinterp λ̂ ± se, exact baseline | "
        "devinterp λ̂ ± se, default baseline (its llc_mean) | nβ · default baseline | η (tld's, both) |"
        + (" tld compile=True λ̂ ± se (− theory) |" if args.compile else ""),
        "|---|---|---|---|---|---|---|---|---|" + ("---|" if args.compile else ""),
    ]
    speed = [
        "| model | tld ms/chain-step, given η: whole call (sampling only) | devinterp ms/chain-step | ratio devinterp/tld | "
        "per-rep ratios | tld ms/chain-step, automatic η (incl. calibration) | ratio devinterp/tld automatic |"
        + (" tld compile=True ms/chain-step, given η: whole call (sampling only) | ratio devinterp/tld compiled | "
           "per-rep ratios | compilation s (first call) | tld compile=True first call ms/chain-step, automatic η "
           "(incl. calibration and compilation) |" if args.compile else ""),
        "|---|---|---|---|---|---|---|" + ("---|---|---|---|---|" if args.compile else ""),
    ]
    bare_table = [
        "| model | chains × alternating blocks | bare forward+backward ms, wall (CPU) | tld chain-step ms, wall (CPU) | "
        "chain-step / bare, wall: median (per block) | chain-step / bare, CPU: median (per block) | "
        "tld whole call given η / bare, wall (CPU) | devinterp whole call / bare, wall (CPU) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for case, auto, first_compiled, reps, bare in results:
        res = auto["res"]
        di = reps[0][2]  # devinterp repetitions sample the same chains (same seeds)
        theory = "—" if case.theory is None else f"{case.theory}"
        di_cells = "— | — | —" if di is None else (
            f"{fmt(di['exact'], case.theory)} | {fmt(di['default'], case.theory)} | {di['baseline_bias']:.2g}")
        acc.append(
            f"| {case.name} | {res.n_params} | {case.chains} × ({case.burnin} + {case.draws}) | {theory} | "
            f"{fmt(res.llc_per_chain, case.theory)} | {di_cells} | {res.step_size:.3g} |"
            + (f" {fmt(first_compiled['res'].llc_per_chain, case.theory)} |" if args.compile else "")
        )
        devinterp_runs = [d for *_, d in reps if d is not None]
        ms, ratio, per_rep = timing([t for t, _, _ in reps], devinterp_runs)
        if devinterp_runs:
            d_s = np.median([d["s"] for d in devinterp_runs])
            d_cells = f"{d_s * 1e3:.3f} | {ratio} | {per_rep} | {auto['s'] * 1e3:.3f} | {d_s / auto['s']:.1f}×"
        else:
            d_cells = f"— | — | — | {auto['s'] * 1e3:.3f} | —"
        row = f"| {case.name} | {ms} | {d_cells} |"
        if args.compile:
            row += (f" {' | '.join(timing([c for _, c, _ in reps], devinterp_runs))} | "
                    f"{first_compiled['compile_s']:.1f} | {first_compiled['s'] * 1e3:.3f} |")
        speed.append(row)
        if bare is not None:
            bare_table.append(bare_row(case, bare, reps))
    load = f"Load average (1/5/15 min) before {tuple(round(v, 2) for v in load_before)}, after {tuple(round(v, 2) for v in load_after)}."
    table = "\n".join(acc) + "\n\n" + "\n".join(speed) + "\n\n"
    if len(bare_table) > 2:
        table += "\n".join(bare_table) + "\n\n"
    table += load
    print(table)
    if args.no_write:
        return
    from importlib.metadata import PackageNotFoundError, version

    try:
        dv = "devinterp not run" if args.no_devinterp else f"devinterp {version('devinterp')}"
    except PackageNotFoundError:
        dv = "devinterp (version unknown)"
    head = (
        f"### {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC — {machine()['cpu']}, "
        f"nproc {os.cpu_count()}, torch {torch.__version__} ({args.threads} thread{'s' if args.threads > 1 else ''}), {dv}, {args.device}\n\n"
        f"`{' '.join(['llc_vs_devinterp.py', *sys.argv[1:]])}`. Same model, data, behavioral loss, chains, steps, "
        f"batch size, η (tld's automatic one), nβ = 1000, γ = 1 for both; full batch unless the model says otherwise "
        f"(bytelm: 16 of 32 sequences). Estimates ± standard error over chains "
        f"(ddof 1), deviation from theory in brackets; tld's estimate is its default run (automatic η). devinterp "
        f"*exact baseline*: post-burn-in mean, L_B(θ*) = 0; *default baseline*: its reported llc_mean (all steps "
        f"incl. burn-in, minus its init loss from num_init_loss_batches = 32 at θ*). Times per chain-step (whole "
        f"call / (chains × steps)) are medians over {args.reps} interleaved repetitions of tld with the same given η "
        f"and devinterp; the automatic-η column is tld's default run once, calibration included. Chain-step / bare: "
        f"tld's chain loop against bare forward+backward passes of the model on the same batch with the same loss "
        f"(chains × steps passes per block), alternating blocks, wall clock and process CPU time.\n\n"
    )
    append_to_section("## behavioral LLC vs devinterp", "llc_vs_devinterp.py", head + table)


if __name__ == "__main__":
    main()
