"""The built-in report sections, in report order (registry.py explains how to add one).

Each function calls the package's own analysis and arranges its result; none computes anything the
analysis modules do not already provide.
"""

from __future__ import annotations

import math
import time
import warnings

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from ..counts import degeneracy_counts
from ..errors import MissingHookError
from ..interaction import find_modules, interaction_basis
from ..invariants import ov_invariants, qk_invariants
from ..llc import behavioral_llc, llc_by_component, llc_sweep, plot_llc_sweep
from ..plots import plot_spectra
from ..stats import activation_stats
from ..synchronization import head_synchronization, neuron_synchronization
from .context import ReportContext
from .plots import plot_component_llc, plot_counts, plot_gram_spectra
from .registry import SectionOutput, register_section

_DATA = ("n_sequences", "batch_size", "seq_len")
_LLC = ("llc_sequences", "llc_seq_len", "loss_scale", "loss_scales", "chains", "draws", "burnin", "pilot_steps",
        "llc_compile")


@register_section("summary", "Model summary", needs_data=False)
def summary(ctx: ReportContext) -> SectionOutput:
    """Backend, parametrisation and sizes (``adapter.summary()``)."""
    s = ctx.summary
    kv = f" (kv {s['n_kv_heads']})" if s["n_kv_heads"] != s["n_heads"] else ""
    return SectionOutput(
        values=dict(s),
        headline=(f"{s['backend']} {s['model_class']}: {s['n_layers']} layers, {s['n_heads']} heads{kv} of {s['d_head']}, "
                  f"d_model {s['d_model']}, d_mlp {s['d_mlp']}, vocab {s['d_vocab']}; "
                  f"{s['n_live_parameters']:,} live parameters"),
    )


@register_section("parameters", "Live parameters", needs_data=False)
def parameters(ctx: ReportContext) -> SectionOutput:
    """The de-duplicated trainable tensors every count and LLC refers to."""
    frame = ctx.adapter.live_parameters().to_frame()
    n_live, n_module = int(frame["numel"].sum()), ctx.summary["n_module_parameters"]
    return SectionOutput(
        tables={"live": frame},
        values={"n_live_parameters": n_live, "n_live_tensors": len(frame), "n_module_parameters": n_module},
        headline=f"{n_live:,} live parameters in {len(frame)} tensors (module parameters {n_module:,})",
    )


def _circuit_values(frame: pd.DataFrame, d_head: int) -> dict:
    return {
        "heads": len(frame),
        "full_rank_heads": int((frame["rank"] == d_head).sum()),
        "mean_rank": float(frame["rank"].mean()),
        "mean_copying_score": float(np.nanmean(frame["copying_score"])) if frame["copying_score"].notna().any() else None,
        "free_directions": int(frame["free_directions"].sum()),
    }


@register_section("invariants", "OV and QK invariants", needs_data=False, methods="METHODS §2")
def invariants(ctx: ReportContext) -> SectionOutput:
    """Gauge-invariant spectra, ranks and copying scores of every head's OV and QK circuits."""
    d = ctx.adapter.d_head
    ov, qk = ov_invariants(ctx.adapter), qk_invariants(ctx.adapter)
    values = {"ov": _circuit_values(ov, d), "qk": _circuit_values(qk, d), "rtol": float(ov["rtol"].iloc[0])}
    parts = [f"{name.upper()}: {v['full_rank_heads']}/{v['heads']} heads full rank (d_head {d})"
             for name, v in (("ov", values["ov"]), ("qk", values["qk"]))]
    copy = values["ov"]["mean_copying_score"]
    if copy is not None:
        parts.append(f"mean OV copying score {copy:.3f}")
    return SectionOutput(
        tables={"ov": ov, "qk": qk},
        figures={"ov_spectra": plot_spectra(ov), "qk_spectra": plot_spectra(qk)},
        values=values,
        headline="; ".join(parts),
    )


@register_section("synchronization", "Head and neuron synchronization", needs_data=True,
                  settings=(*_DATA, "sync_tol"), methods="METHODS §3")
def synchronization(ctx: ReportContext) -> SectionOutput:
    """Synchronized attention heads (pattern-distance heatmaps, blocks, extra freedom) and a summary
    of synchronized MLP neurons (skipped with a note on models without MLPs)."""
    s = ctx.settings
    hs = head_synchronization(ctx.adapter, ctx.batches, tol=s.sync_tol, batch_size=s.batch_size, progress=ctx.progress)
    heads = hs.to_frame()
    synced = heads[heads["size"] > 1]
    out = SectionOutput(
        tables={"head_blocks": heads},
        figures={"head_distance": hs.plot()},
        values={"head_distance": hs.distance, "head_synchronized_blocks": len(synced),
                "head_extra_freedom": int(heads["extra_freedom"].sum()), "n_samples": hs.n_samples,
                "rank_rtol": hs.rank_rtol},
    )
    headline = f"{len(synced)} synchronized head block(s) (extra freedom {int(heads['extra_freedom'].sum()):,})"
    try:
        ns = neuron_synchronization(ctx.adapter, ctx.batches, tol=s.sync_tol, batch_size=s.batch_size,
                                    progress=ctx.progress)
    except MissingHookError as e:
        out.notes.append(f"neuron synchronization does not apply: {e}")
    else:
        neurons = ns.to_frame()
        out.tables["neuron_blocks"] = neurons
        out.values.update({"neuron_synchronized_blocks": len(neurons),
                           "neurons_in_blocks": int(neurons["size"].sum()),
                           "neuron_extra_freedom": int(neurons["extra_freedom"].sum()),
                           "act_fn": ns.act_fn, "neuron_sync_approximate": ns.approximate})
        label = " (approximate: smooth activation)" if ns.approximate else ""
        headline += f"; {len(neurons)} synchronized neuron block(s) covering {int(neurons['size'].sum())} neurons{label}"
    out.headline = headline
    return out


@register_section("counts", "Activation and Jacobian degeneracy counts", needs_data=True,
                  settings=(*_DATA, "n_probes"), methods="METHODS §4")
def counts(ctx: ReportContext) -> SectionOutput:
    """rank(G)·rank(K) per linear map and its sum n_eff_kfac, the Kronecker estimate of N_eff."""
    s = ctx.settings
    frame = degeneracy_counts(ctx.adapter, ctx.batches, n_probes=s.n_probes, seed=ctx.seed, progress=ctx.progress)
    totals = frame.groupby("map", sort=False)[["n_params", "kfac", "free"]].sum().reset_index()
    a = frame.attrs
    return SectionOutput(
        tables={"maps": frame, "totals": totals},
        figures={"by_map": plot_counts(totals)},
        values={k: a[k] for k in ("n_eff_kfac", "n_params", "free", "rtol", "loss_scale", "output", "n_probes")},
        headline=(f"Σ n_eff_kfac = {a['n_eff_kfac']:,} of {a['n_params']:,} linear-map parameters "
                  f"({a['free']:,} free, {a['free'] / a['n_params']:.1%})"),
    )


@register_section("activations", "Residual-stream activation statistics", needs_data=True, settings=_DATA,
                  methods="METHODS §0, §4")
def activations(ctx: ReportContext) -> SectionOutput:
    """Streaming float64 Grams of resid_pre and resid_post: counts, ranks, traces and spectra."""
    stats = activation_stats(ctx.adapter, ctx.batches, hooks=["resid_pre", "resid_post"],
                             batch_size=ctx.settings.batch_size, progress=ctx.progress)
    frame = stats.to_frame()
    ranks = ", ".join(f"{r.hook.removeprefix('blocks.')} {r.rank}/{r.dim}" for r in frame.itertuples())
    return SectionOutput(
        tables={"hooks": frame},
        figures={"spectra": plot_gram_spectra(stats)},
        values={"n_samples": int(frame["count"].iloc[0]), "min_rank": int(frame["rank"].min()), "dim": int(frame["dim"].max())},
        headline=f"ranks: {ranks}",
    )


_IB = ("ib_tokens", "ib_seq_len", "ib_probes", "ib_edge_sources", "ib_keep_share", "ib_resolution", "batch_size")


@register_section("interaction", "Interaction bases, edges and modules", needs_data=True, settings=_IB,
                  methods="METHODS §5–§6")
def interaction(ctx: ReportContext) -> SectionOutput:
    """The local interaction basis (LIB, METHODS §5, output "kl", importance scaling) at the default
    nodes: per node D, rank(G), the interaction rank and the D − interaction-rank degenerate
    directions; the squared-formula edges E_ij between adjacent nodes; and modules of the
    log-normalised edge graph w_ij = max(0, log(E_ij / c)) (METHODS §6), with c keeping
    ``ib_keep_share`` of each pair's edge mass."""
    s, data = ctx.settings, ctx.ib_batches
    with warnings.catch_warnings():
        # torch loads its forward-mode AD decompositions with torch.jit.script on the first JVP of
        # a process and warns that jit.script is deprecated: torch's own business, not the user's.
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=DeprecationWarning)
        ib = interaction_basis(ctx.adapter, data, kind="local", output="kl", n_probes=s.ib_probes,
                               edge_sources=s.ib_edge_sources, batch_size=s.batch_size, seed=ctx.seed,
                               progress=ctx.progress)
    t0 = time.perf_counter()
    modules = find_modules(ib, resolution=s.ib_resolution, keep_share=s.ib_keep_share, seed=ctx.seed)
    modules_s = time.perf_counter() - t0
    dims, edges, table = ib.dims, ib.edge_summary(), modules.to_frame()
    timings = {k: ib.settings[k] for k in ("gram_s", "jacobian_s", "edges_s")} | {"modules_s": modules_s}
    ranks = ", ".join(f"{r.interaction_rank}/{r.D}" for r in dims.itertuples())
    return SectionOutput(
        tables={"dims": dims, "edges": edges, "modules": table, "members": modules.members_frame()},
        figures={"spectra": ib.plot_spectra(), "edges": ib.plot_edges(), "modules": modules.plot()},
        values={"degenerate_directions": int(dims["degenerate"].sum()), "n_modules": modules.n_modules,
                "isolated_directions": len(modules.isolated), "modularity": modules.modularity,
                "inside_share": modules.inside_share, "edges_inside_share": modules.edges_inside_share,
                "timings": timings},
        settings={"kind": ib.kind, "output": ib.output, "scaling": ib.scaling, "nodes": list(ib.nodes),
                  "ib_data": ib.positions, **{k: v for k, v in ib.settings.items() if k not in timings},
                  "modules": modules.to_dict()["settings"]},
        headline=f"interaction rank per node {ranks} ({int(dims['degenerate'].sum())} degenerate directions); " + (
            "no edge above the cut-off, so no modules" if math.isnan(modules.inside_share) else
            f"{modules.n_modules} modules hold {modules.inside_share:.0%} of the edge weight (modularity "
            f"{modules.modularity:.3f})"),
    )


_DIAGNOSTICS = ("step_size_source", "h_max", "h_max_pilot", "h_max_at_reference", "h_max_end", "bias_bound",
                "bias_bound_end", "predicted_bias_factor", "calibration", "adaptations", "s_per_chain_step",
                "wall_s", "n_samples", "n_batches", "steps_done", "compiled", "compile_s", "compile_error")


@register_section("llc", "Behavioral LLC and N_eff(ε)", needs_data=True, settings=_LLC, methods="METHODS §1")
def llc(ctx: ReportContext) -> SectionOutput:
    """λ̂_B at the default loss scale (chains, traces, diagnostics), the sweep N_eff(ε) = 2λ̂_B(ε)
    over ``loss_scales``, and restricted LLCs per component when ``llc_components`` is given.
    With a checkpoint directory every run resumes from its checkpoint."""
    s, data = ctx.settings, ctx.llc_batches
    kwargs = dict(chains=s.chains, draws=s.draws, burnin=s.burnin, pilot_steps=s.pilot_steps, seed=ctx.seed,
                  compile=s.llc_compile)
    others = [eps for eps in s.loss_scales if not math.isclose(eps, s.loss_scale)]
    runs = 1 + len(others) + (ctx.llc_components is not None)
    with tqdm(total=runs, desc="llc runs", disable=not ctx.progress, leave=False) as bar:
        res = behavioral_llc(ctx.adapter, data, loss_scale=s.loss_scale, checkpoint_dir=ctx.checkpoint("default"), **kwargs)
        bar.update()
        summary = {"loss_scale": res.loss_scale, "nbeta": res.nbeta, **res.summary()}
        rows = []
        for eps in others:  # one call per scale, so that the bar moves as each finishes
            rows.append(llc_sweep(ctx.adapter, data, [eps], checkpoint_dir=ctx.checkpoint("sweep"), **kwargs))
            bar.update()
        columns = list(rows[0].columns) if rows else list(summary)
        sweep = pd.concat([*rows, pd.DataFrame([{c: summary[c] for c in columns}])], ignore_index=True)
        sweep = sweep.sort_values("loss_scale", ascending=False, ignore_index=True)
        out = SectionOutput(
            tables={"sweep": sweep, "chains": res.to_frame()},
            figures={"n_eff_sweep": plot_llc_sweep(sweep), "trace": res.plot()},
            values={**summary, "diagnostics": {k: res.diagnostics.get(k) for k in _DIAGNOSTICS}},
            settings={"llc_data": data.positions.to_dict(), "llc_components": ctx.llc_components},
            notes=[f"{s.chains} chains × ({s.burnin} burn-in + {s.draws} draws) SGLD steps on {data.n_samples:,} positions. "
                   "Directions of small curvature equilibrate slowly at these step sizes, so short chains see "
                   "fewer of them and under-estimate λ_B; longer chains (the thorough preset) give estimates to quote."],
        )
        if ctx.llc_components is not None:
            comps = llc_by_component(ctx.adapter, data, components=ctx.llc_components,
                                     checkpoint_dir=ctx.checkpoint("components"), **kwargs)
            bar.update()
            out.tables["components"] = comps
            out.figures["components"] = plot_component_llc(comps)
    curve = ", ".join(f"{r.n_eff:.3g} at {r.loss_scale:g}" for r in sweep.itertuples())
    out.headline = (f"λ̂_B = {res.llc:.4g} ± {res.llc_stderr:.2g} (N_eff = {res.n_eff:.4g} of {res.n_params:,} "
                    f"parameters) at ε = {res.loss_scale:g}; N_eff(ε): {curve}")
    return out
