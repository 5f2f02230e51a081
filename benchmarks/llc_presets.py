"""The report's LLC presets on toy:bytelm: converged, how close to a run ten times longer, how long.

Issue 15's targets (METHODS §1): the quick preset's λ̂(ε, γ) on toy:bytelm is converged (verdict
true) and within 10 % of a run ten times longer at the same γ and step, within about two minutes
on 2 CPU cores; the thorough preset finishes in under an hour (estimated from a measured fraction).
Also the step-size bias measured as research/llc_convergence.md does: λ̂ at one γ for multiples k
of the cautious step (b_max = η(nβ h_max + γ)/4 = 0.05), each run for the same cumulative step
s = Σ η (k times fewer steps), against the bias the automatic rule predicts (stepsize.py). And the spectrum behind that prediction:
at the end points of chains run at one of those steps, stochastic Lanczos quadrature of the Hessian
gives Σ w_i (the number of directions the chains feel, ≈ 2λ on a quadratic) and the purely quadratic
bias Σ w_i b_i/(1 − b_i) / Σ w_i that (1.8) bounds with 2λ̂ in place of Σ w_i.

    python benchmarks/llc_presets.py quick [--set burnin=300 ...] [--longer-device cuda]
    python benchmarks/llc_presets.py thorough --fraction      # one run, one block; scaled to the preset
    python benchmarks/llc_presets.py bias [--device cuda]
    python benchmarks/llc_presets.py spectrum                 # the Hessian spectrum behind (1.8)
    python benchmarks/llc_presets.py record results.json      # append saved results to BENCHMARKS.md

Each mode prints its numbers and a JSON line (``--json FILE`` saves it); the load average before and
after is recorded, since the machine may be shared.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

SECTION = "## LLC presets on toy:bytelm (issue 15)"


def _machine() -> dict:
    return {"cpu": platform.processor() or platform.machine(), "nproc": os.cpu_count(),
            "affinity": len(os.sched_getaffinity(0)), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "load_before": os.getloadavg()}


def _report_llc(settings, overrides: dict) -> tuple:
    """The report's LLC section on toy:bytelm with ``settings`` (a preset name) and overrides, timed."""
    import tl_degeneracy as tld

    model = tld.load_model("toy:bytelm")
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = tld.degeneracy_report(model, sections=["llc"], preset=settings, overrides=overrides or None,
                                       progress=False)
    wall = time.perf_counter() - t0
    return model, report["llc"], wall


def quick(args) -> dict:
    import tl_degeneracy as tld
    from tl_degeneracy.report.settings import resolve_settings

    overrides = dict(kv.split("=", 1) for kv in args.set)
    s = resolve_settings(args.preset, overrides)
    model, section, wall = _report_llc(args.preset, overrides)
    if section.status != "ok":
        raise SystemExit(f"llc section {section.status}: {section.reason}\n{section.traceback}")
    v = section.values
    out = {"mode": "quick", "preset": args.preset, "overrides": overrides, "section_wall_s": wall,
           "headline": section.headline, "llc": v["llc"], "llc_stderr": v["llc_stderr"], "gamma": v["gamma"],
           "step_size": v["step_size"], "draws": v["draws"], "burnin": v["burnin"], "converged": v["converged"],
           "rhat": v["rhat"], "ess": v["ess"], "drift": v["drift"], "bias_bound": v["bias_bound"],
           "stiff_bound": v["stiff_bound"], "sweep": section.tables["sweep"][["loss_scale", "gamma", "llc", "llc_stderr",
                                                                               "converged", "step_size"]].to_dict("records")}
    print(json.dumps(out, default=float), flush=True)
    # The same data, γ and η, ten times the draws (a fixed count; the step is given, so no pilots).
    data = tld.toy_data("bytelm")[: s.llc_sequences, : s.llc_seq_len]
    device = args.longer_device
    if device != "cpu":
        model = model.to(device)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        longer = tld.behavioral_llc(model, data.to(device) if hasattr(data, "to") else data, loss_scale=s.loss_scale,
                                    step_size=v["step_size"], gamma=v["gamma"], chains=s.chains, burnin=s.burnin,
                                    draws=10 * v["draws"], seed=1, progress=False)
    out.update(longer_llc=longer.llc, longer_stderr=longer.llc_stderr, longer_converged=longer.converged,
               longer_rhat=longer.diagnostics["rhat"], longer_draws=longer.draws, longer_wall_s=time.perf_counter() - t0,
               longer_device=device, rel_diff=v["llc"] / longer.llc - 1,
               longer_n_samples=longer.diagnostics["n_samples"])
    return out


def thorough(args) -> dict:
    """One LLC run of the thorough preset, its first block only, timed per chain-step; the preset's
    LLC section is estimated as (runs) × (pilots + burn-in + max draws) at that speed — an upper
    bound, since converged runs stop early."""
    from tl_degeneracy.report.settings import resolve_settings

    s = resolve_settings("thorough")
    overrides = {"loss_scales": str(s.loss_scale), "gammas": "", "llc_max_draws": str(s.draws)}
    _, section, wall = _report_llc("thorough", overrides)
    v = section.values
    d = v["diagnostics"]
    per_step = d["s_per_chain_step"] * s.chains
    sampled = v["burnin"] + v["draws"]
    calib = wall - per_step * sampled
    runs = len(s.loss_scales) + len(s.gammas)
    worst = runs * (calib + per_step * (s.burnin + s.llc_max_draws))
    out = {"mode": "thorough", "one_run_wall_s": wall, "s_per_step_all_chains": per_step, "calibration_s": calib,
           "runs": runs, "estimate_worst_s": worst, "llc": v["llc"], "gamma": v["gamma"], "converged": v["converged"],
           "draws": v["draws"], "step_size": v["step_size"]}
    return out


def bias(args) -> dict:
    """λ̂ at γ for step multiples k of the cautious η (b_max = 0.05), matched cumulative step."""
    import tl_degeneracy as tld
    from tl_degeneracy.llc.layout import select_coordinates
    from tl_degeneracy.llc.stepsize import bias_bound_of, step_size_for, top_hessian_eigenvalue
    from tl_degeneracy.llc.targets import make_target

    model = tld.load_model("toy:bytelm").to(args.device)
    data = tld.toy_data("bytelm")[:4, :32]
    target = make_target(model, data, "kl", None, 2**30)
    with target.engine.eval_mode():
        sel = select_coordinates(target, None)
        origin = torch.zeros(1, sel.layout.numel, device=target.device, dtype=target.dtype)
        h = float(top_hessian_eigenvalue(target, sel.layout, sel.mask, origin)[0])
    rows = []
    for gamma in args.gammas:
        eta1 = step_size_for(h, 1000.0, gamma, 0.05 / 1.05)  # b_max = 0.05
        s_total = args.relax / gamma  # cumulative step of each run: s·γ = relax
        for k in args.multiples:
            steps = int(round(s_total / (k * eta1)))
            burnin = steps // 2
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                res = tld.behavioral_llc(model, data, step_size=k * eta1, gamma=gamma, chains=4, burnin=burnin,
                                         draws=steps - burnin, seed=0, progress=False)
            rows.append({"gamma": gamma, "k": k, "step_size": k * eta1, "steps": steps, "llc": res.llc,
                         "stderr": res.llc_stderr, "converged": res.converged, "rhat": res.diagnostics["rhat"],
                         # (1.8) where the chains ended, with the run's λ̂ (a given η has no pilots, so
                         # diagnostics["bias_bound"] is only the stiffest direction's b/(1 − b) there).
                         "predicted_bias": res.diagnostics["bias_bound_end"], "b_max": bias_bound_of(k * eta1, h, 1000.0, gamma),
                         "old_warning_bound": res.diagnostics["stiff_bound_end"] / (1 - min(res.diagnostics["stiff_bound_end"], 0.99)),
                         "failed": len(res.failed)})
            print(json.dumps(rows[-1]), flush=True)
        base = next(r for r in rows if r["gamma"] == gamma and r["k"] == min(args.multiples))
        for r in rows:
            if r["gamma"] == gamma:
                r["measured_bias"] = r["llc"] / base["llc"] - 1
                r["measured_bias_se"] = 0.0 if r is base else (r["llc"] / base["llc"]) * (
                    (r["stderr"] / r["llc"]) ** 2 + (base["stderr"] / base["llc"]) ** 2) ** 0.5
                r["predicted_increment"] = (1 + r["predicted_bias"]) / (1 + base["predicted_bias"]) - 1
    return {"mode": "bias", "h_max": h, "relax": args.relax, "device": args.device, "rows": rows}


def _lanczos_quadrature(target, layout, mask, points, *, probes: int, steps: int, seed: int) -> tuple:
    """Stochastic Lanczos quadrature (Ubaru, Chen & Saad 2017) of ∇²L_B at θ* + points[p]: per
    Rademacher probe z, ``steps`` Lanczos iterations from z/‖z‖ (fully reorthogonalised) give Ritz
    values θ_j and weights D·s_j² (s the first components of T's eigenvectors), so that
    zᵀ f(H) z ≈ Σ_j D s_j² f(θ_j) and tr f(H) is its mean over probes and points. Returns nodes and
    weights, each [points · probes, steps], float64."""
    from tl_degeneracy.llc.stepsize import hessian_vector_products

    m = mask.to(points.dtype)
    n_sel = float(mask.sum())
    g = torch.Generator(device=points.device).manual_seed(seed)
    nodes, weights = [], []
    for _ in range(probes):
        z = (torch.randint(0, 2, points.shape, generator=g, device=points.device).to(points.dtype) * 2 - 1) * m
        basis = [z / z.norm(dim=1, keepdim=True)]
        alphas, betas = [], []
        for j in range(steps):
            w = hessian_vector_products(target, layout, points, basis[-1], 1) * m
            alphas.append((w * basis[-1]).sum(1).double())
            for v in basis:  # full reorthogonalisation: ghost Ritz values would distort the weights
                w = w - (w * v).sum(1, keepdim=True) * v
            betas.append(w.norm(dim=1).double())
            basis.append(w / betas[-1][:, None].to(w.dtype))
        T = torch.diag_embed(torch.stack(alphas, 1))
        off = torch.stack(betas[:-1], 1)
        T = T + torch.diag_embed(off, 1) + torch.diag_embed(off, -1)
        evals, evecs = torch.linalg.eigh(T)
        nodes.append(evals)
        weights.append(n_sel * evecs[:, 0, :] ** 2)
    return torch.cat(nodes).cpu(), torch.cat(weights).cpu()


def spectrum(args) -> dict:
    """Σ w_i and the quadratic step bias at the end points of chains at k × the cautious η."""
    import numpy as np

    import tl_degeneracy as tld
    from tl_degeneracy.llc.layout import select_coordinates
    from tl_degeneracy.llc.sampler import Dynamics, chain_seed, initial_state, run_chains
    from tl_degeneracy.llc.stepsize import (hessian_trace, predicted_bias, step_size_for, top_hessian_eigenvalue,
                                            trace_samples, window_llc)
    from tl_degeneracy.llc.targets import make_target

    nbeta = 1000.0
    model = tld.load_model("toy:bytelm").to(args.device)
    data = tld.toy_data("bytelm")[:4, :32]
    target = make_target(model, data, "kl", None, 2**30)
    rows = []
    with target.engine.eval_mode():
        sel = select_coordinates(target, None)
        origin = torch.zeros(1, sel.layout.numel, device=target.device, dtype=target.dtype)
        h_ref = float(top_hessian_eigenvalue(target, sel.layout, sel.mask, origin)[0])
        for gamma in args.gammas:
            eta1 = step_size_for(h_ref, nbeta, gamma, 0.05 / 1.05)  # b_max = 0.05, as in bias()
            eta = args.run_multiple * eta1
            steps = int(round(args.relax / gamma / eta))
            dynamics = Dynamics(nbeta=nbeta, step_size=eta, gamma=gamma, steps=steps)
            seeds = [chain_seed(0, c) for c in range(4)]
            state = run_chains(target, sel.layout, sel.mask, dynamics, initial_state(target, sel.layout, seeds, dynamics))
            llc = window_llc(state.trace, state.alive.cpu().numpy(), nbeta, steps // 2)
            ends = state.delta[state.alive]
            h_end = float(top_hessian_eigenvalue(target, sel.layout, sel.mask, ends).max())
            trace, trace_se = hessian_trace(trace_samples(target, sel.layout, sel.mask, ends, seeds, probes=4))
            nodes, weights = _lanczos_quadrature(target, sel.layout, sel.mask, ends, probes=args.probes,
                                                 steps=args.lanczos_steps, seed=1)
            curv = nbeta * nodes.clamp_min(0)  # negative curvature holds nothing: w = 0 there
            w = curv / (curv + gamma)

            def quadrature(values):
                per_probe = (weights * values).sum(1).numpy()
                return float(per_probe.mean()), float(per_probe.std(ddof=1) / np.sqrt(len(per_probe)))

            sum_w, sum_w_se = quadrature(w)
            row = {"gamma": gamma, "run_k": args.run_multiple, "step_size": eta, "steps": steps, "llc": llc,
                   "h_max_end": h_end, "trace": trace, "trace_se": trace_se, "trace_slq": quadrature(nodes)[0],
                   "sum_w": sum_w, "sum_w_se": sum_w_se, "ks": []}
            for k in args.multiples:
                b = k * eta1 * (curv + gamma) / 4
                quad = quadrature(torch.where(b < 1, w * b / (1 - b), torch.full_like(b, float("inf"))))[0] / sum_w
                row["ks"].append({"k": k, "quadratic": quad,
                                  "bound_18": predicted_bias(k * eta1, h_end, trace, llc, nbeta, gamma)})
            base = row["ks"][0]
            for x in row["ks"]:
                x["quadratic_increment"] = (1 + x["quadratic"]) / (1 + base["quadratic"]) - 1
                x["bound_18_increment"] = (1 + x["bound_18"]) / (1 + base["bound_18"]) - 1
            rows.append(row)
            print(json.dumps(row, default=float), flush=True)
    return {"mode": "spectrum", "h_max": h_ref, "relax": args.relax, "device": args.device, "probes": args.probes,
            "lanczos_steps": args.lanczos_steps, "rows": rows}


def markdown(results: list[dict], machine: dict) -> str:
    lines = [f"### {time.strftime('%Y-%m-%d %H:%M')} — {machine['cpu']}, nproc {machine['nproc']} "
             f"(affinity {machine['affinity']}), torch {machine['torch']} ({machine['threads']} threads)", "",
             f"Load average (1/5/15 min) before {'/'.join(f'{x:.2f}' for x in machine['load_before'])}, after "
             f"{'/'.join(f'{x:.2f}' for x in machine.get('load_after', (float('nan'),) * 3))}.", ""]
    for r in results:
        if r["mode"] == "quick":
            lines += [f"Quick preset ({r['overrides'] or 'as shipped'}): LLC section {r['section_wall_s']:.0f} s. "
                      f"Headline: {r['headline']}", "",
                      "| | λ̂ ± se | γ | η | draws | converged | R̂ | ESS | predicted step bias |", "|---|---|---|---|---|---|---|---|---|",
                      f"| quick | {r['llc']:.4g} ± {r['llc_stderr']:.2g} | {r['gamma']:.3g} | {r['step_size']:.3g} | {r['draws']} | "
                      f"{r['converged']} | {r['rhat']:.3f} | {r['ess']:.0f} | {r['bias_bound']:.2%} |",
                      f"| 10× longer ({r['longer_device']}, seed 1) | {r['longer_llc']:.4g} ± {r['longer_stderr']:.2g} | "
                      f"{r['gamma']:.3g} | {r['step_size']:.3g} | {r['longer_draws']} | {r['longer_converged']} | "
                      f"{r['longer_rhat']:.3f} | | |", "",
                      f"Quick / longer − 1 = {r['rel_diff']:+.1%}. Sweep: " + "; ".join(
                          f"ε {x['loss_scale']:g}: {x['llc']:.3g} ± {x['llc_stderr']:.2g} at γ {x['gamma']:.3g} "
                          f"({'converged' if x['converged'] else 'not converged'})" for x in r["sweep"]), ""]
        elif r["mode"] == "thorough":
            lines += [f"Thorough preset, measured fraction: one LLC run of {r['draws']} draws took {r['one_run_wall_s']:.0f} s "
                      f"({r['s_per_step_all_chains']:.3f} s per step of all chains, calibration {r['calibration_s']:.0f} s); "
                      f"λ̂ = {r['llc']:.4g} at γ {r['gamma']:.3g}, converged {r['converged']}. LLC section estimate "
                      f"(all {r['runs']} runs to the full draw budget, an upper bound): {r['estimate_worst_s'] / 60:.0f} min.", ""]
        elif r["mode"] == "bias":
            lines += [f"Step-size bias at matched cumulative step (s·γ = {r['relax']:g}; k × the cautious η of b_max = 0.05; "
                      f"h_max(θ*) = {r['h_max']:.4g}; {r['device']}):", "",
                      "| γ | k | η | steps | λ̂ ± se | measured bias vs k = 1 | (1.8) at the end points | (1.8) vs k = 1 | "
                      "stiffest direction's b/(1 − b) | diverged |",
                      "|---|---|---|---|---|---|---|---|---|---|"]
            lines += [f"| {x['gamma']:.0e} | {x['k']} | {x['step_size']:.3g} | {x['steps']} | {x['llc']:.4g} ± {x['stderr']:.2g} | "
                      f"{x['measured_bias']:+.1%} ± {x['measured_bias_se']:.1%} | {x['predicted_bias']:.1%} | {x['predicted_increment']:+.1%} | "
                      f"{x['old_warning_bound']:.0%} | {x['failed']} |" for x in r["rows"]]
            lines.append("")
        elif r["mode"] == "spectrum":
            lines += [f"Hessian spectrum at the chains' end points (4 chains at k × the cautious η, s·γ = {r['relax']:g}; "
                      f"stochastic Lanczos quadrature, {r['probes']} probes × 4 points × {r['lanczos_steps']} steps; "
                      f"{r['device']}). Σ w_i = Σ nβh_i/(nβh_i + γ) counts the directions the chains feel (= 2λ on a "
                      "quadratic); \"quadratic\" is Σ w_i b_i/(1 − b_i) / Σ w_i, the bias if every direction were "
                      "quadratic; (1.8) divides the same numerator by 2λ̂ instead of Σ w_i. Increments are relative "
                      "to k = 1, as the measured column of the bias table.", "",
                      "| γ | run at k | λ̂ | 2λ̂ | Σ w_i ± se | tr H (Hutchinson; SLQ) | h_max end | k | quadratic | "
                      "increment | (1.8) | increment |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
            for x in r["rows"]:
                for i, q in enumerate(x["ks"]):
                    head = (f"| {x['gamma']:.0e} | {x['run_k']:g} | {x['llc']:.4g} | {2 * x['llc']:.4g} | "
                            f"{x['sum_w']:.0f} ± {x['sum_w_se']:.0f} | {x['trace']:.0f} ± {x['trace_se']:.0f}; "
                            f"{x['trace_slq']:.0f} | {x['h_max_end']:.4g} ") if i == 0 else "| | | | | | | "
                    lines.append(head + f"| {q['k']:g} | {q['quadratic']:.2%} | {q['quadratic_increment']:+.1%} | "
                                        f"{q['bound_18']:.1%} | {q['bound_18_increment']:+.1%} |")
            lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["quick", "thorough", "bias", "spectrum", "record"])
    parser.add_argument("json_in", nargs="?", help="record: a file of saved results (one JSON object per line)")
    parser.add_argument("--preset", default="quick")
    parser.add_argument("--set", action="append", default=[], help="report setting override key=value")
    parser.add_argument("--longer-device", default="cpu")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--gammas", type=float, nargs="+", default=[1e4, 1e5])
    parser.add_argument("--multiples", type=float, nargs="+", default=[1, 5, 10])
    parser.add_argument("--relax", type=float, default=20.0)
    parser.add_argument("--run-multiple", type=float, default=5.0, help="spectrum: the chains run at this k")
    parser.add_argument("--probes", type=int, default=4, help="spectrum: Rademacher probes per end point")
    parser.add_argument("--lanczos-steps", type=int, default=30, help="spectrum: Lanczos steps per probe")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None, help="append the result as one JSON line to this file")
    parser.add_argument("--no-write", action="store_true", help="do not append to BENCHMARKS.md")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.mode == "record":
        saved = [json.loads(line) for line in Path(args.json_in).read_text().splitlines() if line.strip()]
        machine = saved[0]["machine"]
        block = markdown([r["result"] for r in saved], machine)
    else:
        machine = _machine()
        result = {"quick": quick, "thorough": thorough, "bias": bias, "spectrum": spectrum}[args.mode](args)
        machine["load_after"] = os.getloadavg()
        print(json.dumps(result, default=float))
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps({"machine": machine, "result": result}, default=float) + "\n")
        block = markdown([result], machine)
    print(block)
    if not args.no_write:
        from record import append_to_section

        append_to_section(SECTION, "llc_presets.py", block)


if __name__ == "__main__":
    main()
