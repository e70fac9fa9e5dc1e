"""Figures for windowed-attention models (Swin): a layer's heads for one query, the outline of a query's (shifted)
window over the image."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go

from vizapp.figures._base import HEAT_SCALE, readable
from vizapp.figures.maps import heads_figure


@readable
def window_heads_figure(
    maps: np.ndarray,
    layer: int,
    query_label: str,
    note: str = "",
    per_head_scale: bool = True,
    query_patch: tuple[int, int] | None = None,
    colorscale: str = HEAT_SCALE,
) -> go.Figure:
    """Every head of a windowed layer, the query's attention over the layer's grid [H, gh, gw] (zero outside its
    window), as :func:`vizapp.figures.heads_figure`'s mosaic; the title says what the tiles hold and carries ``note``
    (e.g. the layer's padding), wrapped with the rest to fit the plot."""
    fig = heads_figure(maps, layer, query_label, per_head_scale, query_patch, colorscale=colorscale)
    fig.update_layout(title=f"Layer {layer}: attention of {query_label} over its window, per head{note}")
    return fig


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
