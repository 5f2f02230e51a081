"""Plotly figures of an interaction basis: spectra per node and edge heatmaps (METHODS §5)."""

from __future__ import annotations

import numpy as np

from ..plots import integer_ticks, subplot_grid

__all__ = ["plot_edges", "plot_interaction_spectra"]


def plot_interaction_spectra(ib, log: bool = True):
    """Two panels: the Gram spectrum D_G and the interaction spectrum D_M, one line per node
    (eigenvalue i against i); the kept directions are those above each run's cut-off."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=["Gram D_G", "interaction D_M"])
    for node in ib.nodes:
        spec = ib.eigenvalues[node]
        for col, values in ((1, spec.gram), (2, spec.interaction)):
            v = values.clamp_min(0).cpu().numpy()
            fig.add_trace(go.Scatter(x=np.arange(1, len(v) + 1), y=v, mode="lines+markers", name=node, legendgroup=node,
                                     showlegend=col == 1), row=1, col=col)
    if log:
        fig.update_yaxes(type="log")
    width = max((spec.gram.numel() for spec in ib.eigenvalues.values()), default=1)
    fig.update_xaxes(title_text="index i", **integer_ticks(width, first=1))
    fig.update_layout(title=f"{ib.kind} interaction basis ({ib.output + ', ' if ib.output else ''}{ib.scaling} scaling): spectra per node")
    return fig


def plot_edges(ib, log: bool = True):
    """One heatmap of E[i, j] per adjacent node pair (rows: directions of node l+1, columns: node l),
    log10 colour scale by default."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    pairs = list(ib.edges)
    if not pairs:
        raise ValueError("this interaction basis has no edges (it was computed with edges=False)")
    rows, cols = subplot_grid(len(pairs))
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[f"{a} → {b}" for a, b in pairs])
    for n, pair in enumerate(pairs):
        e = ib.edges[pair].cpu().numpy()
        z = np.log10(np.where(e > 0, e, np.nan)) if log else e
        fig.add_trace(go.Heatmap(z=z, coloraxis="coloraxis",
                                 hovertemplate="i=%{y}, j=%{x}: " + ("log10 E = " if log else "E = ") + "%{z:.3g}<extra>"
                                 + f"{pair[0]} → {pair[1]}</extra>"),
                      row=n // cols + 1, col=n % cols + 1)
        # Direction indices are integers; each pair has its own numbers of directions.
        fig.update_xaxes(integer_ticks(e.shape[1]), title_text=f"direction j of {pair[0]}", row=n // cols + 1,
                         col=n % cols + 1)
        fig.update_yaxes(integer_ticks(e.shape[0]), title_text=f"direction i of {pair[1]}", row=n // cols + 1,
                         col=n % cols + 1)
    fig.update_layout(title="interaction edges E_ij" + (" (log10)" if log else ""), coloraxis={"colorscale": "Viridis"})
    fig.update_yaxes(autorange="reversed")
    return fig
