"""Sweeps of λ_B(ε, γ) over loss scales ε and localizations γ, N_eff(ε, γ) = 2λ_B(ε, γ), and
restricted LLCs per component (METHODS §1)."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from ..distributed import distributed_context, failing_together, warn_once
from ..errors import EstimateFailedError
from ..stats.passes import show_progress
from .estimate import behavioral_llc, resolve_nbeta
from .llc_result import estimate_line, relation, step_size_caveats, unconverged_text


def _subdir(kwargs: dict, name: str) -> dict:
    """``kwargs`` with ``checkpoint_dir`` replaced by its subdirectory for one call of a sweep.

    Each call samples something else (another loss scale or component), so sharing one directory
    would make every call after the first find the first one's checkpoint and refuse it. The name is
    sanitised to a safe file name; where that changed it, a short hash of the original keeps two
    names that sanitise alike apart.
    """
    if kwargs.get("checkpoint_dir") is None:
        return kwargs
    safe = re.sub(r"[^A-Za-z0-9._+-]", "_", name).strip(".") or "_"
    if safe != name:
        safe = f"{safe}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"
    return {**kwargs, "checkpoint_dir": os.path.join(os.fspath(kwargs["checkpoint_dir"]), safe)}


def _outer_bar(items: Sequence, desc: str, kwargs: dict):
    """``items`` under a progress bar (``kwargs["progress"]``, default on, as for behavioral_llc)."""
    items = list(items)
    return tqdm(items, desc=desc, total=len(items), unit="run",
                disable=not show_progress(kwargs.get("progress", True), distributed_context().rank))


# stderr_caveat travels with llc_stderr: a row quoted or plotted without it would show a ± from two
# chains as if it were known (METHODS §1); llc_mcse lets compare read reports saved before 0.4.4.
# loss and selection name the quantity with ε, γ and n_params: without them two rows of different
# restricted LLCs (two heads of one size) would pass for one quantity (report.compare).
_SUMMARY = ["gamma", "gamma_source", "loss", "selection", "llc", "llc_std", "llc_stderr", "llc_mcse", "stderr_caveat",
            "n_eff", "n_eff_stderr", "n_params", "step_size", "bias_bound", "stiff_bound", "h_max", "chains", "n_failed",
            "cumulative_step", "converged", "lower_bound", "upper_bound", "rhat", "ess", "drift", "convergence_reason"]


def _row(res) -> dict:
    """The sweep columns of one result (``_SUMMARY``), and ``error`` None."""
    summary = res.summary()
    return {**{k: summary[k] for k in _SUMMARY}, "error": None}


def _failed_row(error: EstimateFailedError, caller: str) -> dict:
    """The columns of a point whose every chain diverged: no estimate (NaN), not converged, and in
    ``error`` why and what to change; warned of. One unstable point used to abort the whole sweep,
    and the report's LLC section with it (audit 17b F1: a given step size that is stable at the
    largest ε diverges at the smallest)."""
    warn_once(f"{caller}: {error}; the other points are kept, this one's row has no estimate (column error)",
              RuntimeWarning, stacklevel=3)
    row = {**dict.fromkeys(_SUMMARY, np.nan), "stderr_caveat": None, **error.quantity}
    row.update(n_failed=row["chains"], converged=False, lower_bound=False, upper_bound=False,
               convergence_reason="failed: every chain diverged", error=str(error))
    return row


def point_name(row) -> str:
    """"ε = …, γ = …" of a sweep row (a γ-curve's points share their ε; γ left out where not recorded)."""
    gamma = getattr(row, "gamma", None)
    return f"ε = {row.loss_scale:g}" + (f", γ = {gamma:.3g}" if gamma is not None and gamma == gamma else "")


def point_failed(row) -> bool:
    """Whether a sweep or component row is a point without an estimate (every chain diverged; tables
    saved before 0.4.8 have no such rows)."""
    return isinstance(row.get("error") if hasattr(row, "get") else getattr(row, "error", None), str)


def llc_sweep(model, data, loss_scales: Sequence[float] | None = None, gammas: Sequence[float | str] | None = None,
              **kwargs) -> pd.DataFrame:
    """λ_B(ε, γ) and N_eff(ε, γ) = 2λ_B(ε, γ) at each loss scale ε (nβ = 1/ε) and each localization γ
    of ``gammas`` (a number or ``"auto"``; default: the single γ of ``gamma=``, else behavioral_llc's
    default); other arguments as in :func:`behavioral_llc` (the step size is chosen per run unless
    given). ``loss_scales`` defaults to behavioral_llc's ε = 10⁻³. The γ-curve at fixed ε shows how
    local the value is (METHODS §1: it falls as γ rises; values at different γ are different
    quantities). With ``checkpoint_dir``, each run checkpoints in its own subdirectory
    ``loss_scale_<ε>`` (``loss_scale_<ε>_gamma_<γ>`` when sweeping γ).

    Returns one row per (ε, γ), ε outer: loss_scale, nbeta, gamma (the γ sampled at; with "auto"
    the one chosen), gamma_source, loss, selection (the sampled parameters, None for all), llc,
    llc_std, llc_stderr (the larger of the chain means' spread over √C and llc_mcse, the ESS-based
    standard error of all draws), llc_mcse, stderr_caveat (why llc_stderr may under-state the
    uncertainty: too few healthy chains; else None; METHODS §1, "Standard error"), n_eff, n_eff_stderr (2·llc_stderr),
    n_params, step_size, bias_bound (predicted step-size bias), stiff_bound, h_max, chains, n_failed,
    cumulative_step (s = Σ η), and the convergence verdict (METHODS §1): converged, lower_bound,
    rhat, ess, drift, convergence_reason; and error: None, or for a point whose every chain diverged
    (a given step size too large at that ε) why and what to change — that row has no estimate
    (NaN) and the other points are kept (warned of). Plot with :func:`plot_llc_sweep`.
    ``progress``: a bar over the runs above each run's own bars.

    Every run uses the same ``seed``, so the points share their random numbers: their errors are
    correlated (on a quadratic model, the same draws rescaled: each point as many standard errors
    off), and a trend along ε is not tested by comparing the points' error bars. With ``gamma="auto"``
    every ε gets its own γ, and the points are different quantities (METHODS §1, corrected).
    """
    with failing_together("llc_sweep"):
        if "nbeta" in kwargs or "loss_scale" in kwargs:
            raise ValueError("llc_sweep sets the loss scale itself; pass loss_scales=[...] only")
        if gammas is not None and "gamma" in kwargs:
            raise ValueError("pass gammas=[...] or gamma=, not both")
        from .estimate import DEFAULT_NBETA

        scales = [1.0 / DEFAULT_NBETA] if loss_scales is None else list(loss_scales)
        if not len(scales):
            raise ValueError("loss_scales is empty")
        if gammas is not None and not len(gammas):
            raise ValueError("gammas is empty")
        gammas_used = [kwargs.pop("gamma", None)] if gammas is None else list(gammas)
        grid = [(float(eps), g) for eps in scales for g in gammas_used]
        rows = []
        for eps, g in _outer_bar(grid, "llc_sweep: loss scales" if gammas is None else "llc_sweep: (ε, γ)", kwargs):
            name = f"loss_scale_{eps!r}" if gammas is None else f"loss_scale_{eps!r}_gamma_{g if isinstance(g, str) else float(g)!r}"
            try:
                res = behavioral_llc(model, data, loss_scale=eps, gamma=g, **_subdir(kwargs, name))
            except EstimateFailedError as error:
                rows.append({"loss_scale": eps, "nbeta": 1.0 / eps, **_failed_row(error, "llc_sweep")})
                continue
            rows.append({"loss_scale": eps, "nbeta": res.nbeta, **_row(res)})
        return pd.DataFrame(rows)


def _gamma_line(row) -> str:
    """The line of :func:`plot_llc_sweep` a sweep row belongs to."""
    if "gamma" not in row:
        return "N_eff"
    return "γ auto (per point)" if str(row.get("gamma_source", "")).startswith("auto") else f"γ = {row['gamma']:.3g}"


def point_texts(frame: pd.DataFrame) -> list[str]:
    """The hover text of each row of a sweep or component table in a figure: its γ (where the
    table has one), N_eff ± its standard error (twice λ̂'s ``llc_stderr``; the bars are twice
    that, and the text says so), "(± uncertain)" where few chains make the ± itself uncertain, and
    its verdict as the report's text gives it: "=" converged, "≥" a lower bound, "≈" uncertain in
    both directions, with the failed criteria (audit 15b: the hover wrote "N_eff =" for all and
    called the bars ±1 standard error)."""
    texts = []
    for _, row in frame.iterrows():
        if point_failed(row):
            texts.append(f"no estimate: {row['error']}")
            continue
        n_eff = estimate_line(row["n_eff"], 2 * row["llc_stderr"], row.get("stderr_caveat"), row["chains"] - row["n_failed"],
                              ".3g")
        reason = row["convergence_reason"]
        reason = f": {reason}" if isinstance(reason, str) and reason else ""
        low = row.get("lower_bound")  # tables saved before it was recorded: None, the old reading
        high = row.get("upper_bound")  # absent from tables saved before 0.4.8
        state = "converged" if row["converged"] else f"not converged — {unconverged_text(low, high)}{reason}"
        caveats = "".join(f"<br>{c}" for c in row_caveats(row))
        texts.append(("" if "gamma" not in row else f"γ = {row['gamma']:.3g}<br>")
                     + f"N_eff {relation(row['converged'], low, high)} {n_eff}<br>bars: ±2 standard errors<br>{state}{caveats}")
    return texts


def row_caveats(row) -> list[str]:
    """:func:`~tl_degeneracy.llc.llc_result.step_size_caveats` of a table row."""
    return step_size_caveats(row.get("bias_bound"), row["n_eff"], row.get("n_params"), row.get("n_eff_stderr"))


def plot_llc_sweep(frame: pd.DataFrame):
    """Plotly figure of N_eff(ε, γ) = 2λ_B(ε, γ), ±2 standard errors (``llc_stderr``):
    against the loss scale (log axis), one line per γ, when the frame has several ε; against γ (the
    γ-curve) at its single ε otherwise. Every line is labelled with the γ (or ε) it holds fixed.
    Points whose chains did not converge are open markers, points the step size may bias
    (:func:`~tl_degeneracy.llc.llc_result.step_size_caveats`) diamonds (the legend's title says so),
    and every point's hover text gives its N_eff ±, verdict and those caveats (:func:`point_texts`);
    points without an estimate (every chain diverged) are left out and named in the legend's title."""
    import plotly.graph_objects as go

    def points(part: pd.DataFrame, x: pd.Series, name: str, joined: bool = True):
        symbols = [("diamond" if row_caveats(row) else "circle") + ("" if row["converged"] else "-open")
                   for _, row in part.iterrows()]
        return go.Scatter(x=x, y=part["n_eff"], mode="lines+markers" if joined else "markers", name=name,
                          marker=dict(symbol=symbols, size=9),
                          error_y=dict(type="data", array=4 * part["llc_stderr"]), text=point_texts(part))

    fig = go.Figure()
    over_scales = frame["loss_scale"].nunique() > 1 or "gamma" not in frame  # decided on every point
    lost = [row for _, row in frame.iterrows() if point_failed(row)]
    frame = frame[[not point_failed(row) for _, row in frame.iterrows()]]
    if not len(frame):
        fig.update_layout(title="Effective parameter count: no point has an estimate (every chain diverged)")
    elif over_scales:
        # γ = "auto" chooses a γ per run: those points form one line, each point's γ in its hover text.
        keys = np.array([_gamma_line(row) for _, row in frame.iterrows()])
        for name in dict.fromkeys(keys):
            part = frame[keys == name]
            # Points at γ chosen per run are different quantities (METHODS §1): markers, not a curve.
            fig.add_trace(points(part, part["loss_scale"], name, joined=not name.startswith("γ auto")))
        fig.update_layout(xaxis_type="log", xaxis_title="loss scale ε = 1/nβ", yaxis_title="N_eff(ε, γ) = 2 λ_B(ε, γ)",
                          title="Effective parameter count over loss scales (a line per fixed γ; γ auto: one per point)")
    else:
        eps = float(frame["loss_scale"].iloc[0])
        part = frame.sort_values("gamma")
        fig.add_trace(points(part, part["gamma"], f"ε = {eps:.3g}"))
        fig.update_layout(xaxis_type="log", xaxis_title="localization γ", yaxis_title="N_eff(ε, γ) = 2 λ_B(ε, γ)",
                          title=f"Effective parameter count over localizations at ε = {eps:.3g}")
    keys = [*([] if frame["converged"].all() else ["open markers: not converged"]),
            *(["diamonds: the step size may bias N_eff"] if any(row_caveats(row) for _, row in frame.iterrows()) else []),
            *([f"no estimate (every chain diverged) at {', '.join(point_name(row) for row in lost)}"] if lost else [])]
    if keys:  # a legend even for one line: its title is the key to the markers
        fig.update_layout(showlegend=True, legend_title_text="; ".join(keys))
    return fig


def llc_by_component(model, data, components: str | Sequence[str] = "heads", **kwargs) -> pd.DataFrame:
    """Restricted (weight-refined) LLC of each component: only its entries are sampled.

    One row per component: component, loss_scale, nbeta, gamma, gamma_source, loss, selection (the
    component as sampled), n_params (its nominal parameter count), llc, llc_std,
    llc_stderr, llc_mcse and stderr_caveat (as in :func:`llc_sweep`), n_eff = 2λ̂, n_eff_stderr, n_eff_fraction =
    n_eff/n_params, step_size, bias_bound, n_failed and the convergence verdict (converged, rhat,
    ess, drift, convergence_reason; METHODS §1); error as in :func:`llc_sweep` (a component whose
    every chain diverged has no estimate; the others are kept).
    With ``checkpoint_dir``, each component checkpoints in its own subdirectory (named after it).
    ``progress``: a bar over the components above each run's own bars.
    """
    with failing_together("llc_by_component"):
        from ..models.adapt import adapt
        from ..models.selection import component_selections

        if "params" in kwargs:
            raise ValueError("llc_by_component sets params itself; pass components=")
        adapter = adapt(model)
        rows = []
        for comp in _outer_bar(component_selections(adapter, components), "llc_by_component", kwargs):
            try:
                res = behavioral_llc(adapter, data, params=comp, **_subdir(kwargs, str(comp)))
            except EstimateFailedError as error:
                nbeta = resolve_nbeta(kwargs.get("nbeta"), kwargs.get("loss_scale"))
                rows.append({"component": comp, "loss_scale": 1.0 / nbeta, "nbeta": nbeta,
                             **_failed_row(error, "llc_by_component"), "n_eff_fraction": np.nan})
                continue
            rows.append({"component": comp, "loss_scale": res.loss_scale, "nbeta": res.nbeta, **_row(res),
                         "n_eff_fraction": res.n_eff / res.n_params})
        return pd.DataFrame(rows)
