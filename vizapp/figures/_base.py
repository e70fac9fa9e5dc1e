"""What every figure shares: the colour scales, the title wrapping and number format (:func:`readable`), images as
PNG data and the image axes, and the tile mosaics. Plotly is imported by the modules of this package only."""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
from PIL import Image

HEAT_SCALE = "Inferno"
#: The colour maps a person may pick for attention and explanation maps (perceptually uniform ones first).
COLOR_SCALES = ("Inferno", "Viridis", "Cividis", "Magma", "Plasma", "Greys", "Turbo")
SIM_SCALE = "Viridis"
_MARGIN = dict(l=10, r=10, t=40, b=10)
# Hover data per cell is dropped above this many mosaic cells to keep the JSON small (e.g. ViT-L/16 at 384 px).
MAX_HOVER_CELLS = 60_000
# go.Image puts pixel i's centre at x0 + i: with x0 = 0.5 the image spans [0, W], as the patch heatmaps drawn over it
# (first patch centre at pw / 2) do; with x0 = 0 it was half a pixel off, leaving a strip at the right and bottom.
_PIXEL_EDGES = dict(x0=0.5, y0=0.5, dx=1, dy=1)
# Titles are wrapped to this many characters a line: a figure is often a quarter of the page wide (about 260 px at
# 1440 px, the Features tab's two plots side by side).
TITLE_CHARS = 40


def _wrap(text: str, width: int = TITLE_CHARS) -> str:
    """``text`` with line breaks (<br>) at spaces so that no line is longer than ``width`` characters; a part that
    holds markup (<sub>...) is left whole."""
    import textwrap

    lines = []
    for part in str(text).split("<br>"):
        lines += [part] if "<" in part or len(part) <= width else textwrap.wrap(part, width)
    return "<br>".join(lines)


def readable(fn: Any) -> Any:
    """Makes every figure ``fn`` returns readable at the page's widths: the title wrapped (and the top margin made
    room for it), subplot titles smaller, and numbers on axes and colour bars never in SI suffixes ("100n")."""
    import functools

    @functools.wraps(fn)
    def make(*args: Any, **kwargs: Any) -> Any:
        fig = fn(*args, **kwargs)
        if not isinstance(fig, go.Figure):
            return fig
        text = fig.layout.title.text
        if text:
            wrapped = _wrap(text)
            lines = wrapped.count("<br>") + 1
            fig.update_layout(title=dict(text=wrapped, font=dict(size=14)))
            top = fig.layout.margin.t if fig.layout.margin.t is not None else 40
            fig.update_layout(margin=dict(t=max(top, 28 + 19 * lines)))
        for note in fig.layout.annotations or ():
            if note.font.size is None:
                note.font.size = 12
        fig.update_xaxes(exponentformat="e")
        fig.update_yaxes(exponentformat="e")
        for trace in fig.data:
            if "colorbar" in trace:
                trace.colorbar.exponentformat = "e"
        if fig.layout.coloraxis.colorbar is not None:
            fig.layout.coloraxis.colorbar.exponentformat = "e"
        return fig

    return make


def _png_data_uri(image: np.ndarray | Image.Image, compress_level: int = 1) -> str:
    img = image if isinstance(image, Image.Image) else Image.fromarray(np.ascontiguousarray(image))
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=compress_level)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _rescale(x: np.ndarray) -> np.ndarray:
    lo, hi = float(np.nanmin(x)), float(np.nanmax(x))
    return np.zeros_like(x, dtype=np.float32) if hi <= lo else ((x - lo) / (hi - lo)).astype(np.float32)


def _image_axes(fig: go.Figure, height_px: int, width_px: int, row: int | None = None, col: int | None = None) -> None:
    kw = dict(row=row, col=col) if row is not None else {}
    fig.update_xaxes(range=[0, width_px], showticklabels=False, showgrid=False, zeroline=False, **kw)
    fig.update_yaxes(
        range=[height_px, 0],
        showticklabels=False,
        showgrid=False,
        zeroline=False,
        scaleanchor="x" if not kw else None,
        **kw,
    )


def _tile_label(c0: int, r0: int, text: str) -> dict[str, Any]:
    """A tile's label in its own top-left corner (above the tile it would run into the tile above)."""
    return dict(
        x=c0 - 0.5,
        y=r0 - 0.5,
        text=text,
        showarrow=False,
        xanchor="left",
        yanchor="top",
        font=dict(size=9, color="white"),
        bgcolor="rgba(0, 0, 0, 0.55)",
        borderpad=1,
    )


def _mosaic_layout(n: int, cols: int | None = None) -> tuple[int, int]:
    cols = cols or max(1, math.ceil(math.sqrt(n)))
    return math.ceil(n / cols), cols


def _colormap_lut(scale: str, n: int = 256) -> np.ndarray:
    """[n, 3] uint8 colours of a plotly sequential scale, linearly interpolated between its stops."""
    import plotly.colors as pc

    stops = [pc.hex_to_rgb(c) if c.startswith("#") else pc.unlabel_rgb(c) for c in getattr(pc.sequential, scale)]
    stops = np.asarray(stops, dtype=np.float64)
    pos = np.linspace(0.0, 1.0, len(stops))
    t = np.linspace(0.0, 1.0, n)
    return np.stack([np.interp(t, pos, stops[:, i]) for i in range(3)], axis=1).round().astype(np.uint8)


def _upscale_rgb(rgb: np.ndarray, patch_size: Sequence[int]) -> np.ndarray:
    """[gh, gw, 3] in [0, 1] -> uint8 [gh·ph, gw·pw, 3], each patch a flat block."""
    ph, pw = int(patch_size[0]), int(patch_size[1])
    img = (np.clip(rgb, 0.0, 1.0) * 255).round().astype(np.uint8)
    return np.repeat(np.repeat(img, ph, axis=0), pw, axis=1)


def _mosaic(maps: np.ndarray, cols: int | None = None) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """[H, a, b] maps -> one [rows·(a+1)-1, cols·(b+1)-1] image with NaN gaps, the per-cell (head, i, j, value)
    custom data and a "head h" annotation per tile."""
    num, a, b = maps.shape
    nrows, ncols = _mosaic_layout(num, cols)
    z = np.full((nrows * (a + 1) - 1, ncols * (b + 1) - 1), np.nan, dtype=np.float32)
    custom = np.full((*z.shape, 4), np.nan, dtype=np.float32)
    ii, jj = np.mgrid[0:a, 0:b]
    notes = []
    for h in range(num):
        r0, c0 = (h // ncols) * (a + 1), (h % ncols) * (b + 1)
        z[r0 : r0 + a, c0 : c0 + b] = maps[h]
        custom[r0 : r0 + a, c0 : c0 + b] = np.stack([np.full_like(ii, h), ii, jj, maps[h]], -1)
        notes.append(_tile_label(c0, r0, f"head {h}"))
    return z, custom, notes


def _mosaic_axes(fig: go.Figure, shape: tuple[int, int]) -> None:
    fig.update_xaxes(showticklabels=False, showgrid=False, zeroline=False, range=[-0.5, shape[1] - 0.5])
    fig.update_yaxes(
        showticklabels=False, showgrid=False, zeroline=False, range=[shape[0] - 0.5, -0.5], scaleanchor="x"
    )
