"""Figures that only the report draws (the analyses' own figures come from their ``.plot()``s)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..llc.sweep import point_failed, point_texts, row_caveats
from ..plots import integer_ticks

__all__ = ["plot_counts", "plot_gram_spectra", "plot_component_llc"]


def plot_counts(totals: pd.DataFrame):
    """Stacked bars per kind of linear map: Kronecker-constrained directions rank(G)·rank(K) and the
    free rest d_in·d_out − rank(G)·rank(K) (METHODS §4), summed over layers and heads."""
    import plotly.graph_objects as go

    fig = go.Figure([
        go.Bar(x=totals["map"], y=totals["kfac"], name="rank(G)·rank(K)"),
        go.Bar(x=totals["map"], y=totals["free"], name="free ≈ d_in·d_out − rank(G)·rank(K)"),
    ])
    fig.update_layout(barmode="stack", title="Degeneracy counts per kind of linear map", yaxis_title="parameters",
                      xaxis_title="map")
    return fig


def plot_gram_spectra(stats):
    """Eigenvalues of each hook's uncentred activation Gram (float64), divided by the largest, on a
    log axis: the numerical rank is where the curve falls to rounding level (METHODS §4)."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for hook in stats.hooks:
        ev = stats[hook].eigenvalues().cpu().numpy()
        ev = np.sort(ev)[::-1]
        top = ev[0] if len(ev) and ev[0] > 0 else 1.0
        fig.add_trace(go.Scatter(x=np.arange(1, len(ev) + 1), y=np.clip(ev / top, 1e-300, None), mode="lines", name=hook))
    fig.update_layout(title="Activation Gram spectra (λ_i / λ_1)", xaxis_title="index i", yaxis_title="λ_i / λ_1",
                      yaxis_type="log")
    fig.update_xaxes(**integer_ticks(max((len(trace.x) for trace in fig.data), default=1), first=1))
    return fig


def plot_component_llc(frame: pd.DataFrame):
    """N_eff of each component's restricted LLC as a fraction of its parameter count (METHODS §1),
    ±2 standard errors (``llc_stderr``). Each bar's label names
    the γ it was sampled at (values at different γ are different quantities); bars whose chains did
    not converge are hatched "/", bars the step size may bias (``step_size_caveats``) dotted, "x" both
    (the legend's title says so), and every bar's hover text gives its N_eff ±, verdict and those
    caveats (:func:`~tl_degeneracy.llc.sweep.point_texts`)."""
    import plotly.graph_objects as go

    biased = [bool(row_caveats(row)) for _, row in frame.iterrows()]
    hatch = [("x" if flagged else "/") if not converged else ("." if flagged else "")
             for converged, flagged in zip(frame["converged"], biased)]
    fig = go.Figure(go.Bar(x=frame["component"], y=frame["n_eff_fraction"], name="N_eff / n_params",
                           marker=dict(pattern=dict(shape=hatch)), hovertext=point_texts(frame),
                           error_y=dict(type="data", array=4 * frame["llc_stderr"] / frame["n_params"])))
    fig.update_xaxes(tickvals=list(frame["component"]),
                     ticktext=[f"{row['component']}<br>" + ("no estimate" if point_failed(row) else f"γ = {row['gamma']:.3g}")
                               for _, row in frame.iterrows()])
    fig.update_layout(title="Restricted LLC per component: N_eff / n_params", yaxis_title="N_eff / n_params",
                      xaxis_title="component (the γ it was sampled at)")
    lost = [row["component"] for _, row in frame.iterrows() if point_failed(row)]
    estimated = frame[[not point_failed(row) for _, row in frame.iterrows()]]
    keys = [*([] if estimated["converged"].all() else ["hatched: not converged"]),
            *(["dotted (x where also not converged): the step size may bias N_eff"] if any(biased) else []),
            *([f"no estimate (every chain diverged): {', '.join(lost)}"] if lost else [])]
    if keys:  # a legend even for one trace: its title is the key to the hatching
        fig.update_layout(showlegend=True, legend_title_text="; ".join(keys))
    return fig
