"""Loss-scale sweeps λ_B(ε), N_eff(ε) = 2λ_B(ε), and restricted LLCs per component (METHODS §1)."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence

import pandas as pd
from tqdm.auto import tqdm

from ..stats.distributed import distributed_context
from ..stats.passes import show_progress
from .estimate import behavioral_llc


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


_SUMMARY = ["llc", "llc_std", "llc_stderr", "n_eff", "n_params", "step_size", "bias_bound", "h_max", "n_failed",
            "converged", "rhat", "ess", "drift", "convergence_reason"]


def llc_sweep(model, data, loss_scales: Sequence[float], **kwargs) -> pd.DataFrame:
    """λ_B(ε) and N_eff(ε) = 2λ_B(ε) at each loss scale ε (nβ = 1/ε); other arguments as in
    :func:`behavioral_llc` (the step size is chosen per scale unless given). With
    ``checkpoint_dir``, each scale checkpoints in its own subdirectory ``loss_scale_<ε>``.

    Returns one row per loss scale: loss_scale, nbeta, llc, llc_std, llc_stderr, n_eff, n_params,
    step_size, bias_bound, h_max, n_failed, and the convergence verdict (METHODS §1): converged,
    rhat, ess, drift, convergence_reason. Plot with :func:`plot_llc_sweep`. ``progress``: a bar
    over the scales above each run's own bars.
    """
    if "nbeta" in kwargs or "loss_scale" in kwargs:
        raise ValueError("llc_sweep sets the loss scale itself; pass loss_scales=[...] only")
    if not len(loss_scales):
        raise ValueError("loss_scales is empty")
    rows = []
    for eps in _outer_bar(loss_scales, "llc_sweep: loss scales", kwargs):
        res = behavioral_llc(model, data, loss_scale=float(eps), **_subdir(kwargs, f"loss_scale_{float(eps)!r}"))
        s = res.summary()
        rows.append({"loss_scale": float(eps), "nbeta": res.nbeta, **{k: s[k] for k in _SUMMARY}})
    return pd.DataFrame(rows)


def plot_llc_sweep(frame: pd.DataFrame):
    """Plotly figure of N_eff(ε) = 2λ_B(ε) against the loss scale (log axis), ±2 standard errors."""
    import plotly.graph_objects as go

    fig = go.Figure(
        go.Scatter(
            x=frame["loss_scale"], y=frame["n_eff"], mode="lines+markers", name="N_eff",
            error_y=dict(type="data", array=4 * frame["llc_stderr"]),
        )
    )
    fig.update_layout(xaxis_type="log", xaxis_title="loss scale ε = 1/nβ", yaxis_title="N_eff(ε) = 2 λ_B(ε)",
                      title="Effective parameter count over loss scales")
    return fig


def llc_by_component(model, data, components: str | Sequence[str] = "heads", **kwargs) -> pd.DataFrame:
    """Restricted (weight-refined) LLC of each component: only its entries are sampled.

    One row per component: component, n_params (its nominal parameter count), llc, llc_std,
    llc_stderr, n_eff = 2λ̂, n_eff_fraction = n_eff/n_params, step_size, bias_bound, n_failed and
    the convergence verdict (converged, rhat, ess, drift, convergence_reason; METHODS §1).
    With ``checkpoint_dir``, each component checkpoints in its own subdirectory (named after it).
    ``progress``: a bar over the components above each run's own bars.
    """
    from ..models.adapt import adapt
    from ..models.selection import component_selections

    if "params" in kwargs:
        raise ValueError("llc_by_component sets params itself; pass components=")
    adapter = adapt(model)
    rows = []
    for comp in _outer_bar(component_selections(adapter, components), "llc_by_component", kwargs):
        res = behavioral_llc(adapter, data, params=comp, **_subdir(kwargs, str(comp)))
        s = res.summary()
        rows.append({"component": comp, **{k: s[k] for k in _SUMMARY}, "n_eff_fraction": res.n_eff / res.n_params})
    return pd.DataFrame(rows)
