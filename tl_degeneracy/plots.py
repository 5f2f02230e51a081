"""Plotly figures for the weight-space and synchronization analyses (METHODS §2, §3)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd

__all__ = ["plot_spectra", "plot_distance_heatmaps", "plot_sparsity", "integer_ticks", "subplot_grid"]


def subplot_grid(n: int) -> tuple[int, int]:
    """(rows, columns) of a grid of ``n`` panels, at most 4 to a row."""
    cols = min(n, 4)
    return math.ceil(n / cols), cols


def integer_ticks(n: int, first: int = 0, most: int = 12) -> dict:
    """Axis settings with ticks only at integers for an axis of ``n`` indices from ``first`` (heads,
    neurons, directions, eigenvalue indices): a step of 1, 2 or 5 × 10^k, at most ``most`` ticks.
    Plotly's automatic ticks would put 0.5 between two heads."""
    steps = (m * 10**k for k in itertools.count() for m in (1, 2, 5))
    step = next(s for s in steps if math.ceil(n / s) <= most)
    return {"tickmode": "linear", "tick0": first, "dtick": step}


def plot_spectra(frame: pd.DataFrame, log: bool = True):
    """Singular-value spectra per layer from :func:`ov_invariants` / :func:`qk_invariants` output.

    One panel per layer, one line per head (σ_i against i, log scale by default), so rank
    deficiency and the spread of spectra across heads are visible at a glance.
    """
    from plotly.subplots import make_subplots
    import plotly.graph_objects as go

    need = {"layer", "head", "singular_values"}
    if not need <= set(frame.columns):
        raise ValueError(f"plot_spectra needs the columns {sorted(need)} (ov_invariants / qk_invariants output); got {list(frame.columns)}")
    layers = sorted(frame["layer"].unique())
    rows, cols = subplot_grid(len(layers))
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[f"layer {layer}" for layer in layers])
    for i, layer in enumerate(layers):
        for _, row in frame[frame["layer"] == layer].iterrows():
            s = np.asarray(row["singular_values"], dtype=float)
            # Every trace in the legend, grouped by layer: the legend names each line of each panel.
            fig.add_trace(
                go.Scatter(x=np.arange(1, len(s) + 1), y=s, mode="lines+markers", name=f"L{layer}H{row['head']}",
                           legendgroup=f"layer {layer}", legendgrouptitle_text=f"layer {layer}"),
                row=i // cols + 1, col=i % cols + 1,
            )
    width = max((len(v) for v in frame["singular_values"]), default=1)
    fig.update_xaxes(**integer_ticks(width, first=1))
    if log:
        fig.update_yaxes(type="log")
    circuit = frame["circuit"].iloc[0] if "circuit" in frame and len(frame) else ""
    fig.update_layout(title=f"{circuit} singular values per head", xaxis_title="index i", yaxis_title="σ_i")
    return fig


def plot_distance_heatmaps(distance: np.ndarray, labels: str = "head", title: str = "pattern distance",
                           zmax: float | None = None):
    """One heatmap per layer of a [layer, n, n] distance array (head or neuron synchronization), its
    colour scale from 0 to ``zmax`` (default: the largest distance; larger ones take the top colour)."""
    from plotly.subplots import make_subplots
    import plotly.graph_objects as go

    distance = np.asarray(distance)
    if distance.ndim != 3 or distance.shape[1] != distance.shape[2]:
        raise ValueError(f"distance must be [layer, n, n]; got shape {distance.shape}")
    n_layers = distance.shape[0]
    rows, cols = subplot_grid(n_layers)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[f"layer {layer}" for layer in range(n_layers)])
    top = zmax if zmax is not None else float(np.nanmax(distance)) if distance.size else 1.0
    for layer in range(n_layers):
        fig.add_trace(
            go.Heatmap(z=distance[layer], zmin=0, zmax=top or 1.0, coloraxis="coloraxis",
                       hovertemplate=f"{labels} %{{y}} vs %{{x}}: %{{z:.4f}}<extra>layer {layer}</extra>"),
            row=layer // cols + 1, col=layer % cols + 1,
        )
    fig.update_layout(title=title, coloraxis={"colorscale": "Viridis"})
    ticks = integer_ticks(distance.shape[1])
    fig.update_xaxes(title_text=labels, **ticks)
    fig.update_yaxes(autorange="reversed", title_text=labels, **ticks)
    return fig


def plot_sparsity(frame: pd.DataFrame):
    """Per MLP layer, the free directions counted (METHODS §3–§4) beside the zeros the
    sparsification added (METHODS §8; those stored in the model hatched inside), with the output
    drift on a second, logarithmic axis (``SparsifyResult.to_frame`` output)."""
    import plotly.graph_objects as go

    layers = [f"layer {int(layer)}" for layer in frame["layer"]]
    fig = go.Figure()
    fig.add_trace(go.Bar(x=layers, y=frame["free_directions"], name="free directions (§3–§4)"))
    fig.add_trace(go.Bar(x=layers, y=frame["zeros_added"], name="zeros added (new basis)"))
    fig.add_trace(go.Bar(x=layers, y=frame["zeros_in_model"], name="zeros stored in the model",
                         marker_pattern_shape="/"))
    # a drift of exactly 0 has no place on a log axis: drawn at the axis floor
    drift = frame["output_drift"].clip(lower=1e-18)
    fig.add_trace(go.Scatter(x=layers, y=drift, name="output drift (cumulative)", mode="lines+markers",
                             yaxis="y2"))
    fig.update_layout(
        title="Constructive sparsification: free directions vs zeros added", barmode="group",
        yaxis={"title": "count"}, yaxis2={"title": "max |Δ logits| / max |logits|", "type": "log",
                                          "overlaying": "y", "side": "right"},
        legend={"orientation": "h", "y": -0.2},
    )
    return fig
