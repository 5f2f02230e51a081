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
from ..distributed import distributed_context
from ..errors import MissingHookError
from ..interaction import find_modules, interaction_basis
from ..invariants import ov_invariants, qk_invariants
from ..llc import behavioral_llc, llc_by_component, llc_sweep, plot_llc_sweep
from ..llc.sweep import point_failed, point_name
from ..llc.llc_result import (estimate_line, estimate_text, is_lower_bound, is_upper_bound, relation, step_size_caveats,
                              unconverged_text, value_with_error)
from ..numerics import CUTOFF_BAND
from ..plots import plot_spectra
from ..stats import activation_stats
from ..stats.passes import show_progress
from ..synchronization import HALF_PRECISION_BAND, WEIGHTS_BAND, head_synchronization, neuron_synchronization
from .context import ACTIVATION_HOOKS, ReportContext, sequences_digest, subset_positions
from .plots import plot_component_llc, plot_counts, plot_gram_spectra
from .registry import SectionOutput, register_section

_DATA = ("n_sequences", "batch_size", "seq_len")
_LLC = ("llc_sequences", "llc_seq_len", "loss_scale", "loss_scales", "chains", "draws", "burnin", "pilot_steps",
        "llc_compile", "llc_max_draws", "llc_time_limit", "step_size", "llc_params", "gamma", "min_gamma", "gammas")


@register_section("summary", "Model summary", needs_data=False, seeded=False)
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


@register_section("parameters", "Live parameters", needs_data=False, seeded=False)
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
    # A circuit whose factors are not all parameters is fixed by the architecture: no gauge, and
    # a low rank there is not weight-space degeneracy (ov_invariants, column parameters)
    fixed = ~frame["parameters"].astype(bool)
    return {
        "heads": len(frame),
        "full_rank_heads": int((frame["rank"] == d_head).sum()),
        "fixed_heads": int(fixed.sum()),
        "low_rank_parameter_heads": int(((frame["rank"] < d_head) & ~fixed).sum()),
        "mean_rank": float(frame["rank"].mean()),
        "mean_copying_score": float(np.nanmean(frame["copying_score"])) if frame["copying_score"].notna().any() else None,
        # None where some head's free directions are not counted (q/k norms: qk_invariants)
        "free_directions": (None if frame.loc[~fixed, "free_directions"].isna().any()
                            else int(frame["free_directions"].sum())),
        "qk_norm": bool("qk_norm" in frame and frame["qk_norm"].any()),
    }


@register_section("invariants", "OV and QK invariants", needs_data=False, seeded=False, methods="METHODS §2")
def invariants(ctx: ReportContext) -> SectionOutput:
    """Gauge-invariant spectra, ranks and copying scores of every head's OV and QK circuits."""
    d = ctx.adapter.d_head
    ov, qk = ov_invariants(ctx.adapter), qk_invariants(ctx.adapter)
    values = {"ov": _circuit_values(ov, d), "qk": _circuit_values(qk, d), "rtol": float(ov["rtol"].iloc[0])}
    values["qk"]["rotary"] = ctx.adapter.cfg.positional_embedding == "rotary"
    parts = [f"{name.upper()}: {v['full_rank_heads']}/{v['heads']} heads full rank (d_head {d})"
             + (f", {v['fixed_heads']} fixed by the architecture (factors not parameters)" if v["fixed_heads"] else "")
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


@register_section("synchronization", "Head and neuron synchronization", needs_data=True, seeded=False,
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
                "head_extra_freedom": hs.extra_freedom, "head_extra_freedom_band": hs.extra_freedom_band,
                "head_band_cause": hs.band_cause,
                "head_sync_approximation": hs.approximation,
                "head_changing_blocks": hs.changing_blocks, "head_data_limited_layers": int(hs.data_limited.sum()),
                "head_sample_limited_layers": int(hs.sample_limited.sum()),
                "n_samples": hs.n_samples, "rank_rtol": hs.rank_rtol},
    )
    headline = (f"{len(synced)} synchronized head block(s) ({_extra_freedom_text(hs.extra_freedom, 'head', hs.approximation)}"
                f"{_rounding_band_text(hs.extra_freedom_band, hs.extra_freedom, hs.approximation, hs.band_cause)})"
                f"{_approximate_label(hs.approximation)}"
                f"{_changing_text(hs.changing_blocks, len(synced), int(hs.data_limited.sum()), int(hs.sample_limited.sum()))}")
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
                           "neuron_extra_freedom": ns.extra_freedom, "neuron_extra_freedom_band": ns.extra_freedom_band,
                           "neuron_band_cause": ns.band_cause,
                           "act_fn": ns.act_fn, "neuron_sync_approximate": ns.approximate,
                           "neuron_sync_approximation": ns.approximation, "neuron_changing_blocks": ns.changing_blocks,
                           "neuron_data_limited_layers": int(ns.data_limited.sum()),
                           "neuron_sample_limited_layers": int(ns.sample_limited.sum())})
        total = ctx.adapter.n_layers * ctx.adapter.d_mlp
        if len(neurons):
            headline += (f"; {len(neurons)} synchronized neuron block(s) covering {int(neurons['size'].sum()):,} of "
                         f"{total:,} neurons ({_extra_freedom_text(ns.extra_freedom, 'neuron', ns.approximation)}"
                         f"{_rounding_band_text(ns.extra_freedom_band, ns.extra_freedom, ns.approximation, ns.band_cause)})"
                         f"{_approximate_label(ns.approximation)}"
                         f"{_changing_text(ns.changing_blocks, len(neurons), int(ns.data_limited.sum()), int(ns.sample_limited.sum()))}")
        else:
            headline += (f"; no synchronized neurons among {total:,} at tol {ns.tol:g} (METHODS §3: no two fire alike "
                         f"and would change their outputs by at most {math.sqrt(ns.tol):.0%} RMS on swapping patterns)")
    out.headline = headline
    return out


def _changing_text(changing: int, blocks: int, limited: int = 0, sampled: int = 0) -> str:
    """That some blocks are formed otherwise on half of the data, that the input's rank D_in of
    ``limited`` layers is lower there, and that ``sampled`` layers' D_in reached the sample count
    ("" when none is)."""
    text = (f"; {changing} of the {blocks} formed otherwise on half of the data (still changing with the data)"
            if changing else "")
    if limited and blocks:  # without blocks no count uses D_in
        text += f"; D_in is still growing with the data at {limited} layer(s), and so are the counts that use it"
    if sampled and blocks:
        text += (f"; D_in reached the number of distinct samples at {sampled} layer(s): it may be the data's limit, "
                 "not the model's")
    return text


def _cutoff_band_text(band, count: int, factor: float, sep: str = "; ") -> str:
    """A count's range as the rank cut-off moves ``factor``-fold either way, after ``sep`` ("" when it
    does not move)."""
    if band is None or list(band) == [count, count]:
        return ""
    return f"{sep}{band[0]:,}–{band[1]:,} with the rank cut-off {factor:g}× higher or lower (no spectral gap there)"


def _rounding_band_text(band, count: int | None, approximation: str = "", cause: str | None = None) -> str:
    """After a synchronization count, its band's other end (``_RoundingBand``): the count at a
    half-precision model's rounding level, or with a float32 model's output weights ranked at its own
    precision's rule, as ``cause`` (``band_cause``) says ("" where they agree or a report predates
    the band; reports saved before the weights' band, 0.4.17, name no cause: theirs is half precision's)."""
    if band is None or count is None or list(band) == [count, count]:
        return ""
    half = cause != WEIGHTS_BAND
    cause = cause or HALF_PRECISION_BAND
    # The band's ends sum each block's smaller and larger count: where some blocks count more at the
    # rounding level and others fewer, the total lies strictly inside, and neither end is the other
    # cut-off's total (review 46 L4).
    other = (f"{_up_to(approximation)}{band[1] if band[0] == count else band[0]:,} at {cause}" if count in band else
             f"block by block between {band[0]:,} and {band[1]:,} at either cut-off")
    if not half:  # a float32 model: float64's rule counts its weights' rounding, float32's drops what lies below it
        return f" with float64's rank rule for the output weights, {other}: known only to lie between"
    # The band moves the cut-off only: which neurons or heads form a block can itself change under
    # the rounding (audit 15b: bfloat16 toy:modadd 2,177–8,797, its float32 weights 2,123 in fewer blocks;
    # audit 18b F1: 1,700–8,698, its bfloat16 weights in float32 1,658).
    return (f" at float32's rank cut-off, {other}, in the blocks the half-precision patterns form — a float32 "
            "forward may form other blocks, whose count can lie outside both")


def _extra_freedom_text(extra: int | None, unit: str = "head", approximation: str = "") -> str:
    """The heads' or neurons' extra freedom ("up to" where blocks are approximate: an upper estimate,
    METHODS §3), or that some block's count is not exact."""
    if extra is None:
        return f"extra freedom not exact: see count_exact in the {unit} blocks"
    return f"extra freedom {_up_to(approximation)}{extra:,}"


def _up_to(approximation: str | None) -> str:
    """"up to " before an approximate count (an upper estimate: METHODS §3), else ""."""
    return "up to " if approximation else ""


def _approximate_label(approximation: str) -> str:
    """' (approximate: why)' when synchronization holds only approximately, else ''."""
    return f" (approximate: {approximation})" if approximation else ""


@register_section("counts", "Activation and Jacobian degeneracy counts", needs_data=True,
                  settings=(*_DATA, "n_probes"), methods="METHODS §4")
def counts(ctx: ReportContext) -> SectionOutput:
    """rank(G)·rank(K) per linear map and its sum n_eff_kfac, the Kronecker estimate of N_eff, on every
    non-padding position of the data, BOS included (``degeneracy_counts``), and how many maps' rank(G)
    is all that the samples allow (``sample_limited``)."""
    s = ctx.settings
    frame = degeneracy_counts(ctx.adapter, ctx.batches, n_probes=s.n_probes, seed=ctx.seed, progress=ctx.progress)
    # the band and the verdicts travel with the sums: the CSV is read on its own (audit 13b)
    groups = frame.groupby("map", sort=False)
    totals = groups[["n_params", "kfac", "free", "kfac_min", "kfac_max"]].sum().join(
        groups[["data_limited", "probe_limited", "sample_limited"]].sum().add_suffix("_maps")).reset_index()
    a = frame.attrs
    limited, n = int(frame["sample_limited"].sum()), a["n_distinct_samples"]
    values = {**{k: a[k] for k in ("n_eff_kfac", "n_params", "free", "rtol", "loss_scale", "output", "n_probes",
                                   "probe_limited_maps", "data_limited_maps", "n_eff_kfac_band", "cutoff_band",
                                   "half_precision", "data_checked", "probes_checked")},
              "sample_limited_maps": limited, "n_samples": n}
    half, bound = a.get("half_precision"), _counts_lower_bound(values)
    probes, growing = a["probe_limited_maps"], a["data_limited_maps"]
    return SectionOutput(
        tables={"maps": frame, "totals": totals},
        figures={"by_map": plot_counts(totals)},
        values=values,
        # BOS counts here even where the report's data leave it out; the seed drew the probes
        settings={"counts_data": a["positions"], "seed": ctx.seed},
        headline=(f"Σ n_eff_kfac {'≥' if bound else '≈' if half else '='} {a['n_eff_kfac']:,} of {a['n_params']:,} linear-map "
                  f"parameters ({'≤ ' if bound else ''}{a['free']:,} free, {_share(a['free'], a['n_params'])})"
                  + (f"; the model computes in {half}, whose rounding the ranks may count (load it in float32)"
                     if half else "")
                  + _cutoff_band_text(a["n_eff_kfac_band"], a["n_eff_kfac"], a["cutoff_band"])
                  + (f"; {limited} map(s) at the rank their {n:,} distinct samples allow" if limited else "")
                  + (f"; {growing} map(s) whose ranks still grew with the data (half of it gave less)" if growing else "")
                  + (f"; {probes} map(s) whose rank_K still grew with the probes (a lower bound)" if probes else "")),
    )


@register_section("activations", "Residual-stream activation statistics", needs_data=True, settings=_DATA,
                  seeded=False, methods="METHODS §0, §4")
def activations(ctx: ReportContext) -> SectionOutput:
    """Streaming float64 Grams of resid_pre and resid_post: counts, ranks, traces and spectra."""
    stats = activation_stats(ctx.adapter, ctx.batches, hooks=list(ACTIVATION_HOOKS),
                             batch_size=ctx.settings.batch_size, progress=ctx.progress)
    frame = stats.to_frame()
    # Each hook's rank read with its own flags (audit 15b: a resid_post read once per sequence sat at
    # its 8 samples and was called "unused directions"; half-precision rounding filled a deficient one)
    ranks = ", ".join(f"{r.hook.removeprefix('blocks.')} {r.rank}/{r.dim}"
                      + (f" (= its {r.distinct:,} distinct samples)" if r.sample_limited else "") for r in frame.itertuples())
    limited = frame["sample_limited"].fillna(False).astype(bool)
    model = frame[~limited & (frame["rank"] < frame["dim"])]
    half = str(ctx.adapter.dtype).removeprefix("torch.") if frame["half_precision"].any() else None
    return SectionOutput(
        tables={"hooks": frame},
        figures={"spectra": plot_gram_spectra(stats)},
        values={"n_samples": int(frame["count"].iloc[0]), "min_rank": int(frame["rank"].min()), "dim": int(frame["dim"].max()),
                "layernorm": ctx.adapter.cfg.normalization == "LN", "deficient_hooks": len(model),
                "min_model_rank": int(model["rank"].min()) if len(model) else None,
                "sample_limited_hooks": int(limited.sum()), "n_hooks": len(frame),
                "min_samples": int(frame["count"].min()), "min_distinct_samples": int(frame["distinct"].min()),
                "half_precision": half},
        headline=f"ranks: {ranks}" + (f" ({half}: upper bounds)" if half else ""),
    )


_IB = ("ib_tokens", "ib_seq_len", "ib_probes", "ib_edge_sources", "ib_keep_share", "ib_resolution", "batch_size")


@register_section("interaction", "Interaction bases, edges and modules", needs_data=True, settings=_IB,
                  reads="ib_batches", methods="METHODS §5–§6")
def interaction(ctx: ReportContext) -> SectionOutput:
    """The local interaction basis (LIB, METHODS §5, importance scaling) at the default nodes, its
    last node from the model's outputs (``last="outputs"``, output "kl"): per node D, rank(G), the
    interaction rank and the D − interaction-rank degenerate directions; the squared-formula edges
    E_ij between adjacent nodes; and modules of the log-normalised edge graph
    w_ij = max(0, log(E_ij / c)) (METHODS §6), with c keeping ``ib_keep_share`` of each pair's edge
    mass. The last node is read by the outputs, not by its own PCA (the API's default), because a
    PCA node's degenerate directions are only those without variance: directions the unembedding
    never reads would count as used (METHODS §5, corrected)."""
    s, data = ctx.settings, ctx.ib_batches
    with warnings.catch_warnings():
        # torch loads its forward-mode AD decompositions with torch.jit.script on the first JVP of
        # a process and warns that jit.script is deprecated: torch's own business, not the user's.
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=DeprecationWarning)
        ib = interaction_basis(ctx.adapter, data, kind="local", output="kl", last="outputs", n_probes=s.ib_probes,
                               edge_sources=s.ib_edge_sources, batch_size=s.batch_size, seed=ctx.seed,
                               progress=ctx.progress)
    t0 = time.perf_counter()
    modules = find_modules(ib, resolution=s.ib_resolution, keep_share=s.ib_keep_share, seed=ctx.seed)
    modules_s = time.perf_counter() - t0
    # the modules' own CSV says what its edges rest on (audit 13b): probe-estimated or still-growing bases
    dims, edges = ib.dims, ib.edge_summary()
    table = modules.to_frame().assign(basis_estimated_nodes=int(dims["estimated"].sum()),
                                      data_limited_nodes=int(dims["data_limited"].sum()))
    timings = {k: ib.settings[k] for k in ("gram_s", "jacobian_s", "edges_s")} | {"modules_s": modules_s}
    ranks = ", ".join(f"{r.interaction_rank}/{r.D}" for r in dims.itertuples())
    degenerate = int(dims["degenerate"].sum())
    adjacent = int((dims["interaction_rank"] - 1).clip(lower=0).sum())  # the unresolved count's denominator
    # the count with the rank cut-off moved CUTOFF_BAND-fold up and down: its spread is the choice of cut-off's
    degenerate_band = [int((dims["D"] - dims["interaction_rank_max"]).sum()), int((dims["D"] - dims["interaction_rank_min"]).sum())]
    # Where M comes from Jacobian probes the ranks are estimates: say so beside them, with how well
    # the two halves of the probes agree on the kept directions (probe_agreement; 1 = the same)
    probed = dims[dims["M_method"] == "probes"]
    # nodes whose basis carries probe noise although their own M is exact: a later LIB node's came from probes
    downstream = int((dims["estimated"] & (dims["M_method"] != "probes")).sum())
    stability = float(probed["probe_stability"].min()) if len(probed) else None
    estimated = (f"; estimated from {s.ib_probes} Jacobian probes per batch at {len(probed)} of {len(dims)} node(s), "
                 f"half-probe agreement ≥ {stability:.2f}" if len(probed) and stability is not None
                 and not math.isnan(stability) else
                 f"; estimated from {s.ib_probes} Jacobian probe(s) per batch at {len(probed)} of {len(dims)} node(s)"
                 if len(probed) else "")
    if downstream:
        estimated += f", and {downstream} node(s) before them differentiate those estimated bases"
    return SectionOutput(
        tables={"dims": dims, "edges": edges, "modules": table, "members": modules.members_frame()},
        figures={"spectra": ib.plot_spectra(), "edges": ib.plot_edges(), "modules": modules.plot()},
        values={"degenerate_directions": degenerate, "degenerate_band": degenerate_band, "cutoff_band": CUTOFF_BAND,
                "n_modules": modules.n_modules,
                "sample_limited_nodes": int(dims["sample_limited"].sum()), "min_samples": int(dims["n"].min()),
                "min_distinct_samples": int(dims["distinct"].min()),
                "data_limited_nodes": int(dims["data_limited"].sum()),
                "limited_within_band_nodes": int(dims["limited_within_band"].sum()),
                "estimated_edge_pairs": int(edges["estimated"].sum()), "edge_pairs": len(edges),
                "probe_basis_edge_pairs": int(edges["basis_estimated"].sum()),
                "edge_sources": s.ib_edge_sources,
                "isolated_directions": len(modules.isolated), "modularity": modules.modularity,
                "inside_share": modules.inside_share, "edges_inside_share": modules.edges_inside_share,
                "mass_inside_share": modules.mass_inside_share,
                "half_modules": None if modules.half_modules is None else list(modules.half_modules),
                "half_agreement": None if modules.half_agreement is None else list(modules.half_agreement),
                "unresolved_nodes": int((dims["unresolved"] > 0).sum()), "unresolved_pairs": int(dims["unresolved"].sum()),
                "adjacent_pairs": adjacent,
                "edge_sampling": _edge_sampling(edges), "edge_sampling_refit": "whole recursion",
                "probe_nodes": len(probed), "probe_downstream_nodes": downstream, "n_probes": s.ib_probes,
                "min_probe_stability": None if stability is None or math.isnan(stability) else stability,
                "half_precision": ib.settings.get("half_precision"), "timings": timings},
        # The basis's own settings apart from the report's: its n_probes (None: exact M) is not the
        # counts' budget of that name (audit 15b: a fresh report flagged itself "other settings").
        settings={"kind": ib.kind, "output": ib.output, "scaling": ib.scaling, "nodes": list(ib.nodes),
                  "ib_data": subset_positions(ib.positions), "basis": {k: v for k, v in ib.settings.items() if k not in timings},
                  "modules": modules.to_dict()["settings"], "seed": ctx.seed},
        headline=f"interaction rank per node {ranks} ({degenerate} degenerate directions"
                 + _cutoff_band_text(degenerate_band, degenerate, CUTOFF_BAND, sep=", ")
                 + (f", {int(dims['sample_limited'].sum())} node(s) at the rank their {int(dims['distinct'].min())} distinct samples allow"
                    if dims["sample_limited"].any() else "")
                 + (f", {int(dims['data_limited'].sum())} node(s) with ranks still growing with the data"
                    if dims["data_limited"].any() else "")
                 + (f", {int(dims['unresolved'].sum())} of {adjacent} pairs of adjacent directions the data do not tell apart"
                    if dims["unresolved"].any() else "") + estimated + "); " + (
            "no edge above the cut-off, so no modules" if math.isnan(modules.inside_share) else
            f"{modules.n_modules} modules hold {modules.inside_share:.0%} of the log edge weight and "
            f"{modules.mass_inside_share:.0%} of ΣE (modularity {modules.modularity:.3f}{_restarts_text(modules)}"
            f"{_halves_text(modules.half_modules, modules.half_agreement)})"),
    )


def _edge_sampling(edges) -> float | None:
    """The largest sampling standard error of a pair's ΣE relative to it (``edge_summary``'s
    ``sampling_stderr`` / ``total``), None where no pair has one."""
    relative = (edges["sampling_stderr"] / edges["total"]).dropna()
    return float(relative.max()) if len(relative) else None


def _halves_text(half_modules, half_agreement) -> str:
    """The modules of each half of the data, beside those of all of it (``Modules.half_modules``)."""
    if half_modules is None:
        return ""
    return (f"; {half_modules[0]} and {half_modules[1]} modules on the data's two halves, agreeing "
            f"{min(half_agreement):.2f}–{max(half_agreement):.2f} (adjusted Rand) with these")


def _restarts_text(modules) -> str:
    """How much the partition depends on the community detection's seed, where it does."""
    low, high = modules.restart_modules or (modules.n_modules, modules.n_modules)
    q_low, _ = modules.restart_modularity or (modules.modularity, modules.modularity)
    if modules.restarts < 2 or (low == high and q_low == modules.modularity):
        return ""
    found = f"{low} modules each" if low == high else f"{low}–{high} modules"
    return f"; the best of {modules.restarts} {modules.method.title()} runs, which found {found}, Q down to {q_low:.3f}"


_DIAGNOSTICS = ("step_size_source", "h_max", "h_max_pilot", "h_max_at_reference", "h_max_end", "bias_bound",
                "bias_bound_end", "predicted_bias_factor", "calibration", "adaptations", "s_per_chain_step",
                "wall_s", "n_samples", "n_batches", "steps_done", "compiled", "compile_s", "compile_error", "pilot_steps",
                "rhat", "ess", "drift", "relaxation", "n_diverged", "diverged_chains", "convergence", "budget",
                "resumed_at_step")


@register_section("llc", "Behavioral LLC and N_eff(ε)", needs_data=True, settings=_LLC, reads="llc_batches",
                  methods="METHODS §1")
def llc(ctx: ReportContext) -> SectionOutput:
    """λ̂_B(ε, γ) at the default loss scale and localization (chains, traces, diagnostics), the sweep
    N_eff(ε, γ) = 2λ̂_B(ε, γ) over ``loss_scales``, the γ-curve over ``gammas`` at that loss scale
    (when given), and restricted LLCs per component when ``llc_components`` is given. γ is part of
    the quantity (METHODS §1), so every value, table and the headline state it. Every run continues
    its chains by blocks of ``draws`` until they converge or the budget (``llc_max_draws``,
    ``llc_time_limit``) is spent (``behavioral_llc(draws="auto")``). With ``llc_params`` the runs
    (not the per-component ones) are restricted LLCs of that selection, which the notes and the
    headline name. With a checkpoint directory every run resumes from its checkpoint."""
    s, data = ctx.settings, ctx.llc_batches
    # The first block of draws always runs, so llc_max_draws below draws means one block.
    fixed = dict(chains=s.chains, draws="auto", draws_block=s.draws, max_draws=max(s.llc_max_draws, s.draws),
                 time_limit=s.llc_time_limit, step_size=s.step_size, burnin=s.burnin, pilot_steps=s.pilot_steps,
                 seed=ctx.seed, compile=s.llc_compile, progress=ctx.progress)
    kwargs = dict(fixed, gamma=s.gamma, **({"min_gamma": s.min_gamma} if s.gamma == "auto" else {}))
    others = [eps for eps in s.loss_scales if not math.isclose(eps, s.loss_scale)]
    runs = 1 + len(others) + len(s.gammas) + (ctx.llc_components is not None)
    with tqdm(total=runs, desc="llc runs", disable=not show_progress(ctx.progress, distributed_context().rank),
              leave=False) as bar:
        res = behavioral_llc(ctx.adapter, data, loss_scale=s.loss_scale, params=s.llc_params,
                             checkpoint_dir=ctx.checkpoint("default"), **kwargs)
        bar.update()
        summary = {"loss_scale": res.loss_scale, "nbeta": res.nbeta, **res.summary(), "error": None}
        rows = []
        for eps in others:  # one call per scale, so that the bar moves as each finishes
            rows.append(llc_sweep(ctx.adapter, data, [eps], params=s.llc_params, checkpoint_dir=ctx.checkpoint("sweep"),
                                  **kwargs))
            bar.update()
        columns = list(rows[0].columns) if rows else list(summary)
        sweep = pd.concat([*rows, pd.DataFrame([{c: summary[c] for c in columns}])], ignore_index=True)
        sweep = sweep.sort_values("loss_scale", ascending=False, ignore_index=True)
        out = SectionOutput(
            tables={"sweep": sweep, "chains": res.to_frame()},
            figures={"n_eff_sweep": plot_llc_sweep(sweep), "trace": res.plot()},
            values={**summary, "diagnostics": {k: res.diagnostics.get(k) for k in _DIAGNOSTICS}},
            # the digest of the very tokens sampled: two reports of one data set can sample others
            # (a memory fit cuts the statistics batches the LLC's sequences are taken from; review 34)
            settings={"llc_data": {**subset_positions(data.positions.to_dict()), "digest": sequences_digest(data)},
                      "llc_components": ctx.llc_components, "seed": ctx.seed},
            notes=[f"{s.chains} chains × ({s.burnin} burn-in + {res.draws} draws, in blocks of {s.draws} until converged or "
                   f"the budget of {fixed['max_draws']:,} draws"
                   f"{'' if s.llc_time_limit is None else f' or {s.llc_time_limit:g} s per run'} was spent) SGLD steps "
                   f"on {data.n_samples:,} positions, at localization γ = {res.gamma:.3g} "
                   f"({res.diagnostics.get('gamma_source', 'given')}). "
                   "γ is part of the quantity: directions whose curvature nβh is far below γ count for ≈ nβh/(2γ) "
                   "instead of ½, so a larger γ gives a smaller, more local value, and values compare only at equal "
                   "ε and γ. Chains that had not relaxed from θ* or were still rising under-estimate λ_B(ε, γ) (a "
                   "lower bound); chains that failed only R̂ or ESS leave it uncertain in both directions.",
                   *([] if s.llc_params is None else [
                       f"Restricted LLC (METHODS §1): only the {res.n_params:,} parameters of {s.llc_params} move; the "
                       f"other {ctx.summary.get('n_live_parameters', 0) - res.n_params:,} stay at θ*. It measures the "
                       "degeneracy of that selection given the rest of the model, not the whole model's."])],
        )
        resumed = res.diagnostics.get("resumed_at_step")
        if resumed is not None and resumed >= res.diagnostics.get("steps_done", 0):  # audit 16b F11, review 40
            out.notes.append(f"The main run was read back from its checkpoint, finished ({resumed:,} steps) before the "
                             "report was interrupted; no step was sampled again.")
        elif resumed is not None:
            out.notes.append(
                f"The main run resumed an interrupted run's chains from their checkpoint at step {resumed:,}: they go on "
                "exactly as they would have, but the time budget (llc_time_limit) counts both runs' time at each's "
                "speed, so where it decides when to stop drawing the run may end at another block than an "
                "uninterrupted one.")
        if s.gammas:
            curve = llc_sweep(ctx.adapter, data, [s.loss_scale], gammas=list(s.gammas), params=s.llc_params,
                              checkpoint_dir=ctx.checkpoint("gammas"), **fixed)
            bar.update(len(s.gammas))
            curve = pd.concat([curve, pd.DataFrame([{c: summary[c] for c in curve.columns}])], ignore_index=True)
            curve = curve.sort_values("gamma", ignore_index=True)
            out.tables["gamma_curve"] = curve
            out.figures["n_eff_gamma"] = plot_llc_sweep(curve)
        if ctx.llc_components is not None:
            # The main run's ε and γ for all of them: values compare only at equal ε and γ (METHODS §1;
            # review 41: they ran at the default ε whatever loss_scale said), and each component's own
            # automatic γ was 30–60× smaller than the whole model's (audit 8a).
            comps = llc_by_component(ctx.adapter, data, components=ctx.llc_components,
                                     checkpoint_dir=ctx.checkpoint("components"),
                                     **dict(fixed, gamma=res.gamma, loss_scale=s.loss_scale))
            out.notes.append(f"The per-component LLCs are sampled at the main run's ε = {s.loss_scale:g} and "
                             f"γ = {res.gamma:.3g}, so that they compare with each other and with it.")
            bar.update()
            out.tables["components"] = comps
            out.figures["components"] = plot_component_llc(comps)
    state = ("converged" if res.converged else
             f"not converged — {unconverged_text(res.lower_bound, res.upper_bound)}: {res.convergence_reason}")
    scope = "" if s.llc_params is None else f" of {s.llc_params}"
    value = estimate_line(res.llc, res.llc_stderr, summary["stderr_caveat"], res.chains - len(res.failed), ".4g")
    out.headline = (f"{res.label.replace('λ̂', 'λ̂_B')}{scope} = {value} ({state}; N_eff "
                    f"{relation(res.converged, res.lower_bound, res.upper_bound)} {res.n_eff:.4g} of {res.n_params:,} parameters); "
                    "N_eff(ε, γ): " + ", ".join(_sweep_point(r) for r in sweep.itertuples()))
    # every estimate the section made, with its verdict, in the verdict the terminal wraps (audit 15b:
    # the γ-curve and the components appeared only in tables and clipped warnings; review 37: the
    # headline is clipped to one line there)
    if "gamma_curve" in out.tables:
        out.values["gamma_curve_points"] = [_sweep_point(r) for r in out.tables["gamma_curve"].itertuples()]
    if "components" in out.tables:
        out.values["component_points"] = [f"{r.component} {_sweep_point(r)}" for r in out.tables["components"].itertuples()]
    # what to change for each run without an estimate (audit 17b F1: one such run lost the whole section)
    out.notes += [f"No estimate{'' if getattr(r, 'component', None) is None else f' for {r.component}'}: {r.error}"
                  for name in ("sweep", "gamma_curve", "components") if name in out.tables
                  for r in out.tables[name].itertuples() if point_failed(r)]
    return out


def _sweep_point(r) -> str:
    """One N_eff(ε, γ) of a sweep row: ± its standard error (2·se(λ̂)), flagged where that ± may
    under-state the uncertainty (``estimate_line``) and where the step size may bias it
    (``step_size_caveats``), "≥ … (not converged)" where its chains did not
    converge in a way that biases λ̂ low and "≈ … (not converged: uncertain)" where they failed only
    R̂ or ESS (METHODS §1)."""
    if point_failed(r):
        return f"no estimate at ({point_name(r)}): every chain diverged (the table's error column says what to change)"
    value = estimate_line(r.n_eff, 2 * r.llc_stderr, r.stderr_caveat, r.chains - r.n_failed, ".3g")
    flags = "".join(f"; {c}" for c in step_size_caveats(getattr(r, "bias_bound", None), r.n_eff, getattr(r, "n_params", None),
                                                          getattr(r, "n_eff_stderr", None)))
    where = f"(ε = {r.loss_scale:g}, γ = {r.gamma:.3g}{flags})"
    if r.converged:
        return f"{value} at {where}"
    low = getattr(r, "lower_bound", None)  # rows saved before it was recorded: the old reading
    if is_upper_bound(getattr(r, "upper_bound", None)):
        return f"≤ {value} (not converged: too high, the step size) at {where}"
    return (f"≥ {value} (not converged) at {where}" if is_lower_bound(low)
            else f"≈ {value} (not converged: uncertain) at {where}")


@register_section("sparsity", "Constructive sparsification of the MLPs", needs_data=True, seeded=False,
                  settings=(*_DATA, "sparsity"), methods="METHODS §8")
def sparsity(ctx: ReportContext) -> SectionOutput:
    """Per MLP layer, the free directions of METHODS §3–§4 against the exact zeros that
    ``tld.sparsify`` creates from them, and the output drift of the sparsified copy (METHODS §8).
    Off unless the ``sparsity`` setting is on (the thorough preset): it runs L + 3 passes over the data."""
    from ..sparsify import sparsify

    s = ctx.settings
    if not s.sparsity:  # a choice of the preset, not a failure: the section is "ok" and says so
        return SectionOutput(values={"off": True}, headline="not run in this preset: set sparsity=true (on in the "
                             "thorough preset)", notes=["off in this preset: it takes several passes over the data"])
    res = sparsify(ctx.adapter, ctx.batches, batch_size=s.batch_size, progress=ctx.progress)
    frame = res.to_frame()
    values = {"free_directions": int(frame["free_directions"].sum()), "zeros_added": int(frame["zeros_added"].sum()),
              "zeros_in_model": int(frame["zeros_in_model"].sum()), "output_drift": res.output_drift, "kl": res.kl,
              "approximate": res.approximate, "act_fn": res.act_fn, "tol": res.tol,
              "blocks_in_basis": int(frame["blocks_in_basis"].sum()),
              "sample_limited_layers": int(frame["sample_limited"].sum()), "n_samples": res.positions["n_samples"],
              "data_limited_layers": int(frame["data_limited"].sum()), "sync_exact": bool(frame["sync_exact"].all()),
              "free_band": [int(frame["free_min"].sum()), int(frame["free_max"].sum())], "cutoff_band": CUTOFF_BAND,
              "eliminated_scale": float(frame["eliminated_scale"].max()),
              "removed_residual": float(frame["removed_residual"].max()),
              "blocks_changing": int(frame["blocks_changing"].sum()),
              "blocks_without_basis": int(frame["blocks_without_basis"].sum()),
              "removed_silent": int(frame["removed_silent"].sum()),
              "n_sequences": res.positions["n_sequences"]}
    free = f"{values['free_directions']:,}" if values["sync_exact"] else f"≤ {values['free_directions']:,}"
    return SectionOutput(
        tables={"layers": frame}, figures={"sparsity": res.plot()}, values=values,
        settings={"sparsity_data": res.positions},  # BOS counts here even where the report's data leave it out
        headline=(f"{values['zeros_added']:,} zeros added ({values['zeros_in_model']:,} in the copy's stored weights) "
                  f"for {free} free directions"
                  + _cutoff_band_text(values["free_band"], values["free_directions"], CUTOFF_BAND, sep=", ")
                  + f"; output drift {res.output_drift:.2g}, KL {res.kl:.2g}"),
    )


# ------------------------------------------------------------------------------ verdicts and glossary
# What each section means in words, for readers who do not know the methods yet. Computed from a
# section's stored values (so a report loaded from report.json gets them too), never from the model.

#: The methods page that the glossary links to (relative to the repository root).
METHODS_DOC = "docs/methods.md"

#: term → (definition, section of docs/methods.md that defines it).
TERMS: dict[str, tuple[str, int]] = {
    "live parameters": ("the trainable tensors' entries, each shared tensor counted once; every count and "
                        "N_eff refers to them", 0),
    "sample": ("one (sequence, token position) of the data; padding never counts, a leading BOS by default "
               "neither", 0),
    "OV / QK circuit": ("the D×D products W_V W_O (what a head writes, before a post-attention norm where the "
                        "model has one: Gemma 2/3) and W_Q W_Kᵀ (where it attends); invariant under the head's gauge", 2),
    "GL(d_head) gauge": ("W_V → W_V A, W_O → A⁻¹ W_O (and likewise for Q, K): d_head² re-parametrisations per "
                         "circuit that never change the model; for rotary QK only those that commute with the "
                         "rotations, 2 per rotary pair plus (d_head − rotary dims)²", 2),
    "numerical rank": ("the number of singular values above max(dims)·eps·‖A‖·‖B‖ for a product A·B computed "
                       "from its factors (one rule for the whole package; ‖A‖·‖B‖ ≥ σ₁ is the scale of its "
                       "rounding); full rank = d_head", 0),
    "free directions": ("directions of a circuit's factors that leave the circuit unchanged: the gauge's "
                        "dimension at full rank (d², or the rotary count above), more where a factor is "
                        "rank-deficient (2·D·d − r(2D − r) when both factors have rank r); empty where a factor "
                        "is not a parameter", 2),
    "copying score": ("Σ Re λ / Σ |λ| over the circuit's nonzero eigenvalues, in [−1, 1]; 1: the head copies "
                      "what it reads", 2),
    "pattern distance": ("heads: mean total-variation distance between two attention patterns, in [0, 1]; "
                         "neurons: the larger of the mean squared difference of their firing patterns and the "
                         "energy by which their outputs would change on swapping patterns, relative to their "
                         "output energy (METHODS (3.6a), paper eq. 20; can exceed 1)", 3),
    "synchronized block": ("heads (or neurons) of one layer whose patterns agree within sync_tol on the data, "
                           "so only the sum of their output maps matters", 3),
    "extra freedom": ("parameter directions a synchronized block frees beyond those of its units apart "
                      "(the drop in the Jacobian's rank; blocks that share a GQA value head are counted "
                      "together, on one row)", 3),
    "G and K": ("a linear map's input Gram E[f fᵀ] and output-Jacobian Gram E[JᵀJ]; their zero directions "
                "free parameters", 4),
    "n_eff_kfac": ("Σ rank(G)·rank(K) over the linear maps: the Kronecker estimate of N_eff", 4),
    "free (counts)": ("d_in·d_out − rank(G)·rank(K): a map's parameters that the data cannot see", 4),
    "Gram rank": ("numerical rank of a hook's float64 activation Gram: dimensions the activations "
                  "actually use (under LayerNorm including the mean direction, which no layer reads)", 4),
    "interaction rank": ("basis directions kept at a node: those through which its activations vary and "
                         "something downstream depends on them", 5),
    "degenerate directions": ("D − interaction rank: directions nothing downstream depends on, on the data (the "
                              "last node's: directions the model's outputs do not depend on)", 5),
    "edge E_ij": ("mean squared contribution of direction j of one node to direction i of the next", 5),
    "module": ("a group of basis directions with strong edges inside and weak edges to the rest "
               "(modularity Q: how clean the split is), found on the log edge weights log(E_ij/c) of the edges "
               "above a cut-off c; it may split one pathway, and its share of ΣE is given beside", 6),
    "λ̂_B": ("the behavioral local learning coefficient: nβ times the mean behavioral loss over the "
            "localized posterior", 1),
    "loss scale ε": ("the resolution at which behaviour counts as changed, ε = 1/nβ (not the SGLD "
                     "step size)", 1),
    "N_eff": ("effective parameter count 2λ̂_B(ε): the number of parameters a regular model with the same "
              "volume scaling would have", 1),
    "γ (localization)": ("strength of the prior that keeps samples near θ*; λ̂ depends on it, so it is "
                         "stated with λ̂", 1),
    "converged": ("split-R̂ ≤ 1.05, effective sample size ≥ 100, no drift between the halves of the "
                  "draws, at most a quarter of the chains diverged, and the chains relaxed from θ* (relaxation "
                  "≥ 95 %); otherwise λ̂ is a lower bound where the chains had not relaxed or were still rising, "
                  "and uncertain in both directions where only R̂ or ESS failed", 1),
}

#: Section name → the terms its glossary explains, in reading order.
GLOSSARY: dict[str, tuple[str, ...]] = {
    "summary": ("live parameters",),
    "parameters": ("live parameters",),
    "invariants": ("OV / QK circuit", "GL(d_head) gauge", "numerical rank", "free directions", "copying score"),
    "synchronization": ("pattern distance", "synchronized block", "extra freedom"),
    "counts": ("G and K", "free (counts)", "n_eff_kfac", "N_eff"),
    "activations": ("sample", "Gram rank"),
    "interaction": ("interaction rank", "degenerate directions", "edge E_ij", "module"),
    "llc": ("λ̂_B", "loss scale ε", "N_eff", "γ (localization)", "converged"),
}


def _summary_verdict(v: dict) -> str:
    return (f"{v.get('n_layers')} layers × {v.get('n_heads')} heads: {v.get('n_live_parameters', 0):,} live "
            "parameters for the other sections to account for")


def _parameters_verdict(v: dict) -> str:
    live, module = v.get("n_live_parameters", 0), v.get("n_module_parameters", 0)
    if live == module:
        return f"every trainable parameter is counted once: {live:,} live parameters"
    return f"{live:,} live parameters; shared or derived tensors make the module total {module:,}"


def _invariants_verdict(v: dict) -> str:
    ov, qk = v.get("ov", {}), v.get("qk", {})
    # reports saved before circuits fixed by the architecture were told apart count every low-rank head
    low = {name: c.get("low_rank_parameter_heads", c.get("heads", 0) - c.get("full_rank_heads", 0))
           for name, c in (("OV", ov), ("QK", qk))}
    fixed = [f"{c['fixed_heads']} {name}" for name, c in (("OV", ov), ("QK", qk)) if c.get("fixed_heads")]
    note = (f"; {' and '.join(fixed)} circuit(s) fixed by the architecture (their factors are not parameters: "
            "no gauge, and their rank is not weight-space degeneracy)" if fixed else "")
    # q/k norms leave QK no GL(d_head) gauge, only the scalings they divide out (qk_invariants, METHODS §2)
    # rotary QK: only the gauges that commute with the rotations (audit 16a F4: "GL(d_head)" was printed)
    gauge = ("the OV circuits' GL(d_head) gauge and the scalings the q/k norms divide out" if qk.get("qk_norm")
             else "the OV circuits' GL(d_head) gauge and the QK circuits' gauges that commute with the rotations "
                  "(2 per rotary pair plus (d_head − rotary dims)²)" if qk.get("rotary")
             else "the GL(d_head) gauge")
    if not any(low.values()):
        head = "every head full rank" if not fixed else "every circuit with parameter factors full rank"
        return f"{head}: no weight-space degeneracy beyond {gauge}{note}"
    parts = [f"{n} of {c.get('heads', 0)} {name} circuits" for (name, n), c in zip(low.items(), (ov, qk)) if n]
    return f"{' and '.join(parts)} rank-deficient: weight-space degeneracy beyond {gauge}{note}"


def _synchronization_verdict(v: dict) -> str:
    blocks = v.get("head_synchronized_blocks", 0)
    extra = v.get("head_extra_freedom", 0)
    text = ("no synchronized heads" if not blocks else
            f"{blocks} synchronized head block(s), "
            + (f"{_up_to(v.get('head_sync_approximation'))}{extra:,} extra free directions" if extra is not None
               else _extra_freedom_text(None))
            + _rounding_band_text(v.get("head_extra_freedom_band"), extra, v.get("head_sync_approximation") or "",
                                  v.get("head_band_cause"))
            + _approximate_label(v.get("head_sync_approximation", "")))
    # absent from older reports: 0
    text += _changing_text(v.get("head_changing_blocks", 0), blocks, v.get("head_data_limited_layers", 0),
                           v.get("head_sample_limited_layers", 0))
    if "neuron_synchronized_blocks" in v:
        n = v["neuron_synchronized_blocks"]
        # reports saved before the per-block label have only the flag, which meant a smooth activation
        why = v.get("neuron_sync_approximation", "smooth activation" if v.get("neuron_sync_approximate") else "")
        extra = v.get("neuron_extra_freedom", 0)
        text += ("; no synchronized neurons" if not n else f"; {n} synchronized neuron block(s), "
                 + (f"{_up_to(why)}{extra:,} extra free directions" if extra is not None
                    else _extra_freedom_text(None, "neuron"))
                 + _rounding_band_text(v.get("neuron_extra_freedom_band"), extra, why, v.get("neuron_band_cause"))
                 + _approximate_label(why)
                 + _changing_text(v.get("neuron_changing_blocks", 0), n, v.get("neuron_data_limited_layers", 0),
                                  v.get("neuron_sample_limited_layers", 0)))
    return text


def _share(part: int, whole: int) -> str:
    """``part / whole`` as a percentage with one decimal, and with two significant digits where one
    decimal would round a part that is neither none nor all of the whole to 0.0% or 100.0%."""
    x = part / max(whole, 1)
    if 0 < part < whole and not 0.0005 <= x < 0.9995:
        smaller = min(part, whole - part) / whole * 100  # the share that one decimal would hide
        digits = max(2, 1 - math.floor(math.log10(smaller) + 1e-9))
        return f"{100 * x:.{digits}f}%"
    return f"{x:.1%}"


def _counts_lower_bound(v: dict) -> bool:
    """Whether the counts' N_eff is a lower bound (free an upper one): some rank may still grow — with
    the data (split halves), with the probes, or at the most its samples allow — or could not be
    checked (one sequence; one probe: audit 17a F3/F4, whose headline read "=" there); unless a
    half-precision forward's rounding may have raised the ranks too: then uncertain both ways. Keys
    absent from reports saved before they were recorded count as checked."""
    unchecked = v.get("data_checked") is False or v.get("probes_checked") is False
    growing = v.get("data_limited_maps", 0) or v.get("probe_limited_maps", 0) or v.get("sample_limited_maps", 0)
    return bool(growing or unchecked) and not v.get("half_precision")


def _counts_verdict(v: dict) -> str:
    free, n = v.get("free", 0), v.get("n_params", 0)
    if not free:
        return "no activation or Jacobian degeneracy: the data constrain every linear-map parameter"
    half = v.get("half_precision")  # absent from reports saved before it was recorded
    bound = _counts_lower_bound(v)
    text = (f"{'at most ' if bound else ''}{_share(free, n)} of the linear-map parameters are free "
            f"(activation/Jacobian degeneracy): N_eff {'≥' if bound else '≈'} {v.get('n_eff_kfac', 0):,} by the "
            "Kronecker estimate")
    if half:
        text += (f" — the model computes in {half}: its activations' rounding can count as directions, which raises "
                 "the ranks and N_eff, so N_eff may be too high as well as too low, and the cut-off band below reaches "
                 "up to that rounding's level; load the model in float32 for this count")
    limited = v.get("sample_limited_maps", 0)
    if limited:  # rank(G) = n < d_in: too few samples to tell the model's degeneracy from the data's
        text += (f" — at {limited} map(s) rank(G) is all that the {v.get('n_samples')} samples allow, so those "
                 "counts are the data's limit, not the model's (raise n_sequences)")
    band = v.get("n_eff_kfac_band")  # absent from reports saved before it was recorded
    if band is not None and list(band) != [v.get("n_eff_kfac"), v.get("n_eff_kfac")]:
        text += (f" — the ranks depend on the cut-off: N_eff {band[0]:,}–{band[1]:,} with it "
                 f"{v.get('cutoff_band', 100):g}× higher or lower, where the spectra decay without a gap")
    growing = v.get("data_limited_maps", 0)  # absent from reports saved before it was checked
    if v.get("data_checked") is False:  # one sequence: the split-half check could not run
        text += (" — the data are one sequence, so whether the ranks still grow with the data could not be checked "
                 "(give two or more sequences)")
    low = "" if half else ", so their free counts are upper bounds and N_eff a lower bound"
    if growing:  # half of the data gave lower ranks than all of it
        text += (f" — at {growing} map(s) the ranks were still growing with the data (half of the sequences gave "
                 f"lower ones){low} (raise n_sequences)")
    if v.get("probes_checked") is False:  # n_probes = 1: no half of the probes to compare
        text += (" — one Jacobian probe per batch, so whether rank(K) still grows with the probes could not be checked"
                 f"{low} (use n_probes ≥ 2)")
    probes = v.get("probe_limited_maps", 0)  # absent from reports saved before it was checked
    if probes:  # half the probes found fewer directions of K than all of them
        text += (f" — at {probes} map(s) rank(K) was still growing with the number of Jacobian probes{low} "
                 "(raise n_probes)")
    return text


def _activations_verdict(v: dict) -> str:
    rank, dim, n = v.get("min_rank"), v.get("dim"), v.get("n_samples")
    # Under LayerNorm the stream's mean direction is in the Gram but no layer reads it (audit 9): the
    # same checkpoint loaded with its writing weights centred shows one dimension fewer.
    mean = (" (under LayerNorm these ranks include the stream's mean direction, which every LayerNorm removes and "
            "no layer reads: a load that centres the writing weights shows one fewer)") if v.get("layernorm") else ""
    if "deficient_hooks" not in v:  # a report saved before each hook's flags were read: the old reading
        if rank == dim:
            return "residual stream full rank at every hook: no activation degeneracy there" + mean
        if n is not None and rank is not None and n <= dim and rank >= n - 1:
            # n samples span at most n directions: the rank says how much data there was, not the model
            return (f"residual stream rank {rank} of {dim} at the lowest hook — as many as its {n:,} samples allow, so "
                    "the data's limit, not the model's: give more data (n_sequences × seq_len) to tell" + mean)
        return f"residual stream rank-deficient (lowest rank {rank} of {dim}): unused directions at some hooks" + mean
    deficient, limited, half = v["deficient_hooks"], v.get("sample_limited_hooks", 0), v.get("half_precision")
    if deficient:
        # rounding can only add directions: a half-precision deficiency is real, and may be larger
        text = (f"residual stream rank-deficient at {deficient} hook(s) (lowest rank {v.get('min_model_rank')} of "
                f"{dim}): {'at least ' if half else ''}{dim - v.get('min_model_rank', dim)} unused directions there")
    elif limited and limited == v.get("n_hooks"):
        text = "residual stream: no hook has more samples than dimensions, so no rank tells of the model"
    elif limited:
        text = "residual stream full rank at every hook with more samples than dimensions"
    else:
        text = "residual stream full rank at every hook: no activation degeneracy there"
    if half:
        text += (f" — in {half} these ranks are upper bounds: the forward's rounding can fill unused directions "
                 "(run the model in float32 to tell)")
    if limited:
        # n samples span at most n directions: the rank says how much data there was, not the model
        text += (f"; {limited} hook(s) at the rank their {_samples_allow(v, n)}, the "
                 "data's limit, not the model's: give more data (n_sequences × seq_len) to tell")
    return text + mean


def _samples_allow(v: dict, n: int | None = None) -> str:
    """"(distinct) samples allow (as few as N)": reports saved before 0.4.9 recorded all samples only."""
    if "min_distinct_samples" in v:
        return f"distinct samples allow (as few as {v['min_distinct_samples']:,})"
    return f"samples allow (as few as {v.get('min_samples', n):,})"


def _interaction_verdict(v: dict) -> str:
    deg, limited = v.get("degenerate_directions", 0), v.get("sample_limited_nodes", 0)
    text = "every node at full interaction rank" if not deg else f"{deg} degenerate directions across the nodes"
    band = v.get("degenerate_band")  # absent from reports saved before it was recorded
    if band is not None and list(band) != [deg, deg]:
        text += (f" — the ranks depend on the cut-off: {band[0]:,}–{band[1]:,} degenerate directions with it "
                 f"{v.get('cutoff_band', 100):g}× higher or lower, where the spectra decay without a gap")
    if limited:  # rank_G at n − 1 < D: too few samples to tell the model's degeneracy from the data's
        text += (f" — at {limited} node(s) only as many as their {_samples_allow(v)}, so those "
                 "counts are the data's limit, not the model's (raise ib_tokens, or give more data: n_sequences × "
                 "seq_len)")
    grows = v.get("data_limited_nodes", 0)  # absent from reports saved before it was recorded
    if grows:  # lower on the even-numbered sequences alone: more data would find more directions
        text += (f" — at {grows} node(s) rank(G) or the interaction rank is lower on half of the data than on all "
                 "of it, so those ranks are still growing with the data and their degenerate counts are upper "
                 "bounds (raise ib_tokens)")
        within = v.get("limited_within_band_nodes", 0)  # absent from reports saved before it was recorded
        if within:  # review 46 M2 / 47 F4: an eigenvalue of rounding just above the cut-off reads the same
            text += (f"; at {within} of them the half-data ranks lie inside the ranks' cut-off bands, where the "
                     "difference may instead be the cut-off's (rounding just above it: then the degenerate count "
                     "reads too low)")
    half = v.get("half_precision")  # absent from reports saved before it was recorded
    if half:
        text += (f" — the model computes in {half}: its rounding can count as directions, so interaction ranks may "
                 "be too high and the degenerate count too low"
                 + (" (the band above reaches up to that rounding's level)" if band is not None and list(band) != [deg, deg]
                    else "") + "; load the model in float32 for this count")
    probed = v.get("probe_nodes", 0)  # absent from reports saved before it was recorded
    if probed:
        agreement = v.get("min_probe_stability")
        downstream = v.get("probe_downstream_nodes", 0)  # absent from reports saved before it was recorded
        text += (f" (estimated: M from {v.get('n_probes')} Jacobian probes per batch at {probed} node(s)"
                 + (f", the two halves of the probes agreeing ≥ {agreement:.2f} on the kept directions" if agreement
                    is not None else "")
                 + (f"; {downstream} node(s) before them differentiate those estimated bases, so their bases are "
                    "estimates too" if downstream else "") + ")")
    share = v.get("inside_share")
    if share is None or (isinstance(share, float) and math.isnan(share)):
        return text + "; no modules (no edge above the cut-off)"
    estimated = v.get("estimated_edge_pairs", 0)  # absent from reports saved before it was recorded
    in_probes = v.get("probe_basis_edge_pairs", 0)  # absent from reports saved before it was recorded
    mass = v.get("mass_inside_share")  # absent from reports saved before it was recorded
    halves = v.get("half_modules")  # absent from reports saved before it was recorded
    sampling = v.get("edge_sampling")  # absent from reports saved before it was recorded
    unresolved = v.get("unresolved_nodes", 0)  # absent from reports saved before it was recorded
    return text + f"; {v.get('n_modules')} modules hold {share:.0%} of the log edge weight" + (
        f" and {mass:.0%} of the edge mass ΣE" if mass is not None and not math.isnan(mass) else "") + (
        f" — the edges of each half of the data (in these bases) give {halves[0]} and {halves[1]} modules"
        + (" (the partition moves with the data: read the modules as one sample's)"
           if min(v.get("half_agreement") or [1.0]) < 1.0 else "") if halves else "") + (
        f" — ΣE of a node pair moves by up to {sampling:.0%} (split-half standard error, "
        + ("each half's bases fitted to it alone" if v.get("edge_sampling_refit")  # absent before 0.4.16
           else "each half's bases refitted, a LIB node's through the whole data's next basis")
        + "; one degree of freedom, a scale and not a bound: in about 4 runs of 10 ΣE's real spread is more than "
        "twice it)" if sampling else "") + (
        f" — at {unresolved} node(s) {v.get('unresolved_pairs')}"
        + (f" of {v['adjacent_pairs']}" if v.get("adjacent_pairs") else "")  # absent from reports saved before it
        + " pairs of adjacent directions have interaction "
        "eigenvalues the data do not tell apart: the edges through them are fixed only up to a rotation"
        if unresolved else "") + (
        f" (modules of edges estimated from {v.get('edge_sources')} ±1 source(s) at {estimated} of "
        f"{v.get('edge_pairs')} node pairs, exact elsewhere: another draw of the sources may move them)"
        if estimated else "") + (
        f" (edges at {in_probes} of {v.get('edge_pairs')} node pairs join bases estimated from Jacobian probes: "
        "another draw of the probes moves them, by more than any standard error shown)" if in_probes else "")


def _g(x, spec: str = "g") -> str:
    """A stored number as text ("?" where a loaded report has null)."""
    return "?" if x is None else format(x, spec)


def _more_estimates(v: dict) -> str:
    """The γ-curve's and the components' N_eff with their verdicts, as the sweep's points read."""
    return "".join(f"; {what}: {', '.join(v[key])}" for key, what in (("gamma_curve_points", "γ-curve"),
                                                                     ("component_points", "components")) if v.get(key))


def _llc_verdict(v: dict) -> str:
    # γ is part of the quantity (METHODS §1): the verdict names λ̂(ε, γ), not λ̂ alone; a restricted
    # LLC names its selection, so that no comparison can take it for the whole model's.
    where = f"at ε = {_g(v.get('loss_scale'))}, γ = {_g(v.get('gamma'), '.3g')}"
    if v.get("selection"):
        where += f", restricted to {v['selection']} ({v.get('n_params', 0):,} parameters; the rest held at θ*)"
    n_eff, converged = _g(v.get("n_eff"), ".3g"), v.get("converged")
    se = v.get("llc_stderr")
    if isinstance(se, (int, float)) and math.isfinite(se) and v.get("n_eff") is not None:
        n_eff = value_with_error(v["n_eff"], 2 * se, ".3g")
    if v.get("stderr_caveat"):  # it is about λ̂'s ±, half N_eff's
        healthy = (v.get("chains") or 0) - (v.get("n_failed") or 0)
        known = isinstance(se, (int, float)) and isinstance(v.get("llc"), (int, float))
        on = f"λ̂ = {estimate_text(v['llc'], se, healthy, '.4g')}" if known else "λ̂"
        where += f" (on {on}: {v['stderr_caveat']})"
    where += "".join(f"; {c}" for c in step_size_caveats(v.get("bias_bound"), v.get("n_eff"), v.get("n_params"),
                                                         v.get("n_eff_stderr")))
    if converged is True:
        return f"λ̂ converged: N_eff = {n_eff} of {v.get('n_params', 0):,} parameters {where}" + _more_estimates(v)
    if converged is False:
        reason = v.get("convergence_reason")  # absent from reports saved before it was recorded
        low = v.get("lower_bound")  # absent from reports saved before it was recorded: the old reading
        high = v.get("upper_bound")  # absent before 0.4.8
        return (f"λ̂ not converged — {unconverged_text(low, high)}{': ' + reason if reason else ''}; "
                f"N_eff {relation(False, low, high)} {n_eff} {where}" + _more_estimates(v))
    # No convergence check recorded (R̂, effective sample size, drift: docs/methods.md §1); short
    # chains under-estimate λ_B, so an unchecked number reads as a lower bound.
    return f"λ̂ not checked for convergence: read N_eff = {n_eff} {where} as a lower bound" + _more_estimates(v)


#: Section name → verdict(values) → one line in words. A section registered elsewhere may add its own.
VERDICTS: dict = {
    "summary": _summary_verdict, "parameters": _parameters_verdict, "invariants": _invariants_verdict,
    "synchronization": _synchronization_verdict, "counts": _counts_verdict, "activations": _activations_verdict,
    "interaction": _interaction_verdict, "llc": _llc_verdict,
}


def verdict(section, with_reason: bool = False) -> str:
    """One line in words for a :class:`SectionResult`: what its numbers mean ("" for a section that
    has no verdict of its own). A section that did not run says so, pointing to the reason printed
    below it, or (``with_reason``, for a line with nothing below it: a comparison's) giving it."""
    if section.status in ("skipped", "failed"):
        # a failure without a traceback is one its settings, the memory budget or the model's non-finite
        # numbers made (build._run_section)
        unexpected = section.status == "failed" and getattr(section, "traceback", None)
        words = ("does not apply to this model or data" if section.status == "skipped" else
                 "failed with an unexpected error: no result" if unexpected else
                 "failed: no result, its settings, the memory budget or non-finite numbers stopped it")
        if with_reason:
            return f"{words} ({section.reason})" if section.reason else words
        return f"{words} ({'traceback' if unexpected else 'reason'} below)"
    make = VERDICTS.get(section.name)
    return make(section.values) if make is not None else ""


def glossary(section) -> list[tuple[str, str, int]]:
    """(term, definition, docs/methods.md section) for the terms a section's reader meets."""
    return [(term, *TERMS[term]) for term in GLOSSARY.get(section.name, ())]


# ------------------------------------------------------------------------------ sparsity (METHODS §8)
TERMS["zeros added"] = ("exact zeros that the re-parametrisation creates, each a pair of nodes that do not "
                        "interact: input–hidden weights (and biases) and the output rows of removed neurons; "
                        "those of blocks whose new neurons would not keep the block's firing exist only in the "
                        "paper's hidden basis (kept beside the copy), the rest in the copy's stored weights", 8)
TERMS["output drift"] = ("max |Δ logits| / max |logits| of the sparsified copy against the original on the "
                         "data: float rounding for ReLU, the approximation for GELU/SiLU", 8)
GLOSSARY["sparsity"] = ("free (counts)", "synchronized block", "zeros added", "output drift")


def _sparsity_verdict(v: dict) -> str:
    if v.get("off"):
        return "not run in this preset (set sparsity=true, or use the thorough preset)"
    free, zeros = v.get("free_directions", 0), v.get("zeros_added", 0)
    met = "at least one" if zeros >= free else "fewer than one"
    if v.get("approximate"):
        kind = "approximate (smooth activation, or blocks whose firing differs on some samples)"
    else:  # steps 1 and 2 drop the input directions and neuron combinations the rank rule calls zero (METHODS §8)
        scale = max(v.get("eliminated_scale") or 0.0, v.get("removed_residual") or 0.0)
        kind = ("exact up to rounding" if not scale else
                "exact up to rounding and the input directions and neuron combinations the rank rule calls zero "
                f"(≤ {scale:.2g} of their signal)")
    stored = v.get("zeros_in_model", zeros)
    text = (f"{met} non-interacting pair per free direction ({zeros:,} zeros for {free:,}"
            + ("" if stored == zeros else f"; {stored:,} of the zeros in the copy's stored weights, the rest in the "
               "hidden basis kept beside it" + (", fewer than the free directions" if stored < free else ""))
            + f"); on these data the copy is {kind}: drift {_g(v.get('output_drift'), '.2g')}, "
            f"KL {_g(v.get('kl'), '.2g')}")
    band = v.get("free_band")  # absent from reports saved before it was recorded
    if band is not None and band[0] != band[1]:
        text += (f" — the free directions depend on the cut-off: {band[0]:,}–{band[1]:,} with it "
                 f"{v.get('cutoff_band', 100):g}× higher or lower, where the MLP inputs' spectra decay without a gap")
    if v.get("sync_exact") is False:
        text += " — some synchronized blocks' freedom is an upper estimate or not counted, so the free directions are too"
    grows = v.get("data_limited_layers", 0)
    if grows:
        text += (f" — at {grows} layer(s) the input rank is lower on half of the data than on all of it: still growing "
                 "with the data, so more data would use some eliminated directions (raise n_sequences)")
    limited = v.get("sample_limited_layers", 0)
    if limited:  # input rank = n < D: the eliminated inputs are the data's limit, not the model's
        text += (f" — at {limited} layer(s) the input rank is all that the {v.get('n_samples')} samples allow "
                 "(raise n_sequences)")
    changing = v.get("blocks_changing", 0)  # absent from reports saved before it was recorded
    if changing:
        text += (f" — {changing} synchronized block(s) are formed otherwise on half of the data: the neurons removed "
                 "from them and their changes of basis hold on these data only (raise n_sequences)")
    silent = v.get("removed_silent", 0)  # absent from reports saved before it was recorded
    if silent:  # review 47 F5: no half-data check sees a neuron silent on all of the data
        text += (f" — {silent} removed neuron(s) never fire on these data, so whether they fire on other inputs (and "
                 "the copy drifts there) is not known (raise n_sequences, or give data that cover those inputs)")
    if v.get("n_sequences") == 1:
        text += " — one sequence: whether the ranks and blocks still change with the data was not checked"
    without = v.get("blocks_without_basis", 0)
    if without:
        text += (f" — {without} block(s) have no change of basis (their neurons' input weights span fewer directions "
                 "than their outputs, as a smooth activation allows), so they add no zeros")
    return text


VERDICTS["sparsity"] = _sparsity_verdict
