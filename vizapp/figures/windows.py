"""Figures for windowed-attention models (Swin): the outline of a query's (shifted) window over the image."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go


def add_cell_outline(
    fig: go.Figure, mask: np.ndarray, cell: Sequence[float], color: str = "#00e5ff", name: str = "window"
) -> go.Figure:
    """Outline the cells of ``mask`` [gh, gw] (cells ``cell`` = (height, width) pixels) with one line trace: every
    side of a marked cell whose neighbour is unmarked or off the grid. A shifted window that wraps around the grid's
    edges gives several outlined pieces."""
    ch, cw = float(cell[0]), float(cell[1])
    m = np.pad(np.asarray(mask, dtype=bool), 1)
    xs: list[float | None] = []
    ys: list[float | None] = []
    for r, c in zip(*np.nonzero(m[1:-1, 1:-1]), strict=True):
        y0, y1, x0, x1 = r * ch, (r + 1) * ch, c * cw, (c + 1) * cw
        if not m[r, c + 1]:  # above
            xs += [x0, x1, None]
            ys += [y0, y0, None]
        if not m[r + 2, c + 1]:  # below
            xs += [x0, x1, None]
            ys += [y1, y1, None]
        if not m[r + 1, c]:  # left
            xs += [x0, x0, None]
            ys += [y0, y1, None]
        if not m[r + 1, c + 2]:  # right
            xs += [x1, x1, None]
            ys += [y0, y1, None]
    fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", line=dict(color=color, width=2), hoverinfo="skip", name=name))
    return fig
