"""Plotly figures: numpy arrays in, ``go.Figure`` out. Never calls a model.

Big grids are drawn as one heatmap mosaic (tiles separated by a row/column of NaN), not as hundreds of subplots,
so a figure stays a few hundred kB of JSON and renders quickly.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Mapping, Sequence
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


@readable
def topk_figure(top_k: Sequence[tuple[str, float]], title: str = "Top-5 prediction") -> go.Figure:
    """Horizontal bars of (label, probability), best on top."""
    labels = [lbl for lbl, _ in top_k][::-1]
    probs = [float(p) for _, p in top_k][::-1]
    fig = go.Figure(
        go.Bar(
            x=probs,
            y=labels,
            orientation="h",
            text=[f"{100 * p:.1f}%" for p in probs],
            textposition="auto",
            hovertemplate="%{y}: %{x:.4f}<extra></extra>",
            marker_color="#4c78a8",
        )
    )
    fig.update_layout(
        title=title, xaxis_title="probability", xaxis_range=[0, 1], margin=dict(l=10, r=10, t=40, b=40), height=300
    )
    return fig


@readable
def overlay_figure(
    image: np.ndarray,
    heat: np.ndarray,
    patch_size: Sequence[int],
    opacity: float = 0.6,
    title: str = "",
    value_name: str = "value",
    colorscale: str = HEAT_SCALE,
    marker: tuple[int, int] | None = None,
    rescale: bool = True,
) -> go.Figure:
    """A patch-level map [gh, gw] over the model's view of the image [H, W, 3].

    Colours are min-max rescaled per map (the colour bar says so) unless ``rescale`` is False (a count, say: the
    colour bar then reads the values, titled ``value_name``); hover shows the patch and the raw value.
    """
    gh, gw = heat.shape
    ph, pw = int(patch_size[0]), int(patch_size[1])
    rows, cols = np.mgrid[0:gh, 0:gw]
    custom = np.stack([rows, cols, heat], axis=-1).astype(np.float32)
    fig = go.Figure()
    fig.add_trace(go.Image(source=_png_data_uri(image), **_PIXEL_EDGES, hoverinfo="skip"))
    fig.add_trace(
        go.Heatmap(
            z=_rescale(heat) if rescale else heat.astype(np.float32),
            x0=pw / 2,
            dx=pw,
            y0=ph / 2,
            dy=ph,
            colorscale=colorscale,
            opacity=float(opacity),
            zmin=0 if rescale else None,
            zmax=1 if rescale else None,
            customdata=custom,
            colorbar=dict(title="rescaled" if rescale else value_name, thickness=12),
            hovertemplate="patch (%{customdata[0]:.0f}, %{customdata[1]:.0f})<br>"
            + value_name
            + " %{customdata[2]:.4g}<extra></extra>",
        )
    )
    if marker is not None:
        r, c = marker
        fig.add_shape(
            type="rect", x0=c * pw, x1=(c + 1) * pw, y0=r * ph, y1=(r + 1) * ph, line=dict(color="#00e5ff", width=2)
        )
    h, w = image.shape[:2]
    _image_axes(fig, h, w)
    fig.update_layout(title=title, margin=_MARGIN, height=420)
    return fig


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


@readable
def heads_figure(
    maps: np.ndarray,
    layer: int,
    query_label: str,
    per_head_scale: bool = True,
    query_patch: tuple[int, int] | None = None,
    cols: int | None = None,
    colorscale: str = HEAT_SCALE,
) -> go.Figure:
    """Every head's map [H, gh, gw] as one mosaic heatmap; hover gives layer, head, patch and the raw weight."""
    num_heads, gh, gw = maps.shape
    nrows, ncols = _mosaic_layout(num_heads, cols)
    height, width = nrows * (gh + 1) - 1, ncols * (gw + 1) - 1
    z = np.full((height, width), np.nan, dtype=np.float32)
    custom = np.full((height, width, 4), np.nan, dtype=np.float32)
    if per_head_scale:  # each head min-max rescaled: near-uniform heads still show their structure
        lo = maps.reshape(num_heads, -1).min(-1)[:, None, None]
        hi = maps.reshape(num_heads, -1).max(-1)[:, None, None]
        shown = (maps - lo) / np.maximum(hi - lo, 1e-12)
    else:
        shown = maps
    rows, cols_ = np.mgrid[0:gh, 0:gw]
    annotations, mx, my = [], [], []
    for h in range(num_heads):
        r0, c0 = (h // ncols) * (gh + 1), (h % ncols) * (gw + 1)
        z[r0 : r0 + gh, c0 : c0 + gw] = shown[h]
        custom[r0 : r0 + gh, c0 : c0 + gw] = np.stack([np.full_like(rows, h), rows, cols_, maps[h]], -1)
        annotations.append(_tile_label(c0, r0, f"head {h}"))
        if query_patch is not None:
            my.append(r0 + query_patch[0])
            mx.append(c0 + query_patch[1])
    fig = go.Figure(
        go.Heatmap(
            z=z,
            customdata=custom,
            colorscale=colorscale,
            zmin=0,
            zmax=1 if per_head_scale else None,
            colorbar=dict(title="per-head min-max" if per_head_scale else "weight", thickness=12),
            hovertemplate=f"layer {layer}, head %{{customdata[0]:.0f}}<br>key patch (%{{customdata[1]:.0f}}, "
            "%{customdata[2]:.0f})<br>weight %{customdata[3]:.4g}<extra></extra>",
            hoverongaps=False,
        )
    )
    if mx:
        fig.add_trace(
            go.Scatter(
                x=mx,
                y=my,
                mode="markers",
                marker=dict(symbol="x", color="#00e5ff", size=7),
                hoverinfo="skip",
                showlegend=False,
                name="query",
            )
        )
    fig.update_xaxes(showticklabels=False, showgrid=False, zeroline=False, range=[-0.5, width - 0.5])
    fig.update_yaxes(showticklabels=False, showgrid=False, zeroline=False, autorange="reversed", scaleanchor="x")
    fig.update_layout(
        title=f"Layer {layer}: attention of {query_label} to every patch, per head",
        annotations=annotations,
        margin=dict(l=10, r=10, t=50, b=10),
        height=max(320, 130 * nrows + 60),
        plot_bgcolor="white",
    )
    return fig


@readable
def distance_figure(mean_distance: np.ndarray, reference_px: float | None, title: str = "") -> go.Figure:
    """Mean attention distance: one dot per head per layer (ViT paper Fig. 7 right), uniform reference line."""
    num_layers, num_heads = mean_distance.shape
    layers, heads = np.mgrid[0:num_layers, 0:num_heads]
    jitter = (heads - (num_heads - 1) / 2) * (0.5 / max(num_heads, 1))
    fig = go.Figure(
        go.Scatter(
            x=(layers + jitter).ravel(),
            y=mean_distance.ravel(),
            mode="markers",
            customdata=np.stack([layers.ravel(), heads.ravel(), mean_distance.ravel()], -1),
            marker=dict(
                color=heads.ravel(),
                colorscale="Turbo",
                size=9,
                line=dict(width=0.5, color="#333"),
                colorbar=dict(title="head", thickness=12, dtick=1),
            ),
            hovertemplate="layer %{customdata[0]:.0f}, head %{customdata[1]:.0f}<br>%{customdata[2]:.1f} px"
            "<extra></extra>",
            name="heads",
        )
    )
    if reference_px is not None:
        fig.add_hline(
            y=reference_px,
            line_dash="dash",
            line_color="#888",
            annotation_text=f"uniform attention ({reference_px:.1f} px)",
            annotation_position="top left",
        )
    fig.update_layout(
        title=title or "Mean attention distance per head",
        xaxis_title="layer (network depth)",
        yaxis_title="mean attention distance (pixels)",
        margin=dict(l=10, r=10, t=50, b=40),
        height=420,
    )
    fig.update_xaxes(tickmode="linear", dtick=1)
    return fig


@readable
def pos_embed_figure(sim: np.ndarray, title: str = "") -> go.Figure:
    """The paper's tiled cosine grid: tile (i, j) holds cos(e_ij, e_kl) at cell (k, l); one colour scale."""
    gh, gw = sim.shape[:2]
    height, width = gh * (gh + 1) - 1, gw * (gw + 1) - 1
    z = np.full((height, width), np.nan, dtype=np.float32)
    for i in range(gh):
        for j in range(gw):
            z[i * (gh + 1) : i * (gh + 1) + gh, j * (gw + 1) : j * (gw + 1) + gw] = sim[i, j]
    if height * width > MAX_HOVER_CELLS:
        return _pos_embed_image(z, title, (gh, gw))
    # uint8 (tile row, tile col, cell row, cell col) per mosaic cell: plotly ships it as a compact typed array.
    custom = np.full((height, width, 4), 255, dtype=np.uint8)
    k, l_ = np.mgrid[0:gh, 0:gw]
    for i in range(gh):
        for j in range(gw):
            tile = custom[i * (gh + 1) : i * (gh + 1) + gh, j * (gw + 1) : j * (gw + 1) + gw]
            tile[..., 0], tile[..., 1], tile[..., 2], tile[..., 3] = i, j, k, l_
    fig = go.Figure(
        go.Heatmap(
            z=z,
            colorscale=SIM_SCALE,
            zmin=-1,
            zmax=1,
            hoverongaps=False,
            colorbar=dict(title="cosine", thickness=12),
            customdata=custom,
            hovertemplate="tile (%{customdata[0]}, %{customdata[1]}) · cell (%{customdata[2]}, %{customdata[3]})"
            "<br>cosine %{z:.3f}<extra></extra>",
        )
    )
    return _pos_mosaic_layout(fig, width, title, autorange="reversed")


def _pos_mosaic_layout(fig: go.Figure, width: int, title: str, meta: dict | None = None, **y_range: Any) -> go.Figure:
    """Axes and layout of the position mosaic (heatmap or image): no ticks, square cells, tile row 0 at the top;
    ``y_range`` flips the y axis (``autorange="reversed"`` or an explicit ``range``)."""
    fig.update_xaxes(
        showticklabels=False, showgrid=False, zeroline=False, range=[-0.5, width - 0.5], title="input patch column"
    )
    fig.update_yaxes(
        showticklabels=False, showgrid=False, zeroline=False, scaleanchor="x", title="input patch row", **y_range
    )
    layout: dict[str, Any] = dict(
        title=title or "Position embedding similarity",
        margin=dict(l=30, r=10, t=50, b=30),
        height=560,
        plot_bgcolor="white",
    )
    if meta is not None:
        layout["meta"] = meta
    fig.update_layout(**layout)
    return fig


def _colormap_lut(scale: str, n: int = 256) -> np.ndarray:
    """[n, 3] uint8 colours of a plotly sequential scale, linearly interpolated between its stops."""
    import plotly.colors as pc

    stops = [pc.hex_to_rgb(c) if c.startswith("#") else pc.unlabel_rgb(c) for c in getattr(pc.sequential, scale)]
    stops = np.asarray(stops, dtype=np.float64)
    pos = np.linspace(0.0, 1.0, len(stops))
    t = np.linspace(0.0, 1.0, n)
    return np.stack([np.interp(t, pos, stops[:, i]) for i in range(3)], axis=1).round().astype(np.uint8)


def _pos_embed_image(z: np.ndarray, title: str, grid: tuple[int, int]) -> go.Figure:
    """The cosine mosaic as one palette PNG (1 byte per cell before compression) for grids too big to ship as
    numbers with hover data (37x37 patches: 1.97 M cells, 11 MB as a heatmap); a colour bar from an empty trace.
    Cosines are quantised to 255 levels (steps of 0.008); the gaps between tiles are white."""
    lut = _colormap_lut(SIM_SCALE, 255)
    idx = np.where(np.isnan(z), 255, np.clip(np.round((np.nan_to_num(z) + 1.0) * 127.0), 0, 254)).astype(np.uint8)
    img = Image.fromarray(idx, mode="P")
    img.putpalette(np.concatenate([lut, [[255, 255, 255]]]).astype(np.uint8).reshape(-1).tolist())
    uri = _png_data_uri(img, compress_level=6)
    height, width = z.shape
    # hoverinfo "none" (not "skip") keeps click events; the page maps a clicked pixel to its tile with layout.meta.
    fig = go.Figure(go.Image(source=uri, hoverinfo="none"))
    fig.add_trace(
        go.Scatter(
            x=[None],
            y=[None],
            mode="markers",
            hoverinfo="skip",
            showlegend=False,
            marker=dict(
                colorscale=SIM_SCALE,
                cmin=-1,
                cmax=1,
                color=[0],
                showscale=True,
                colorbar=dict(title="cosine", thickness=12),
            ),
        )
    )
    return _pos_mosaic_layout(
        fig, width, title, meta={"tile_grid": [int(grid[0]), int(grid[1])]}, range=[height - 0.5, -0.5]
    )


@readable
def pos_tile_figure(sim: np.ndarray, row: int, col: int) -> go.Figure:
    """One tile of the cosine grid, enlarged: similarity of position (row, col) to every position."""
    tile = sim[row, col]
    gh, gw = tile.shape
    fig = go.Figure(
        go.Heatmap(
            z=tile,
            colorscale=SIM_SCALE,
            zmin=-1,
            zmax=1,
            colorbar=dict(title="cosine", thickness=12),
            hovertemplate=f"({row}, {col}) vs (%{{y}}, %{{x}})<br>cosine %{{z:.3f}}<extra></extra>",
        )
    )
    fig.add_trace(
        go.Scatter(
            x=[col],
            y=[row],
            mode="markers",
            marker=dict(symbol="x", color="red", size=10),
            hoverinfo="skip",
            showlegend=False,
        )
    )
    fig.update_yaxes(autorange="reversed", scaleanchor="x", title="row", range=[gh - 0.5, -0.5])
    fig.update_xaxes(title="column", range=[-0.5, gw - 0.5])
    fig.update_layout(title=f"Tile ({row}, {col}) enlarged", margin=dict(l=10, r=10, t=50, b=40), height=420)
    return fig


def annotate_query(image: np.ndarray, patch_size: Sequence[int], patch: tuple[int, int] | None) -> np.ndarray:
    """The model's view with a faint patch grid and the query patch outlined (for the clickable image)."""
    out = image.copy()
    ph, pw = int(patch_size[0]), int(patch_size[1])
    h, w = out.shape[:2]
    grid = np.zeros((h, w), dtype=bool)
    grid[::ph, :] = True
    grid[:, ::pw] = True
    out[grid] = (0.7 * out[grid] + 0.3 * 255).astype(np.uint8)
    if patch is not None:
        r, c = patch
        y0, x0 = r * ph, c * pw
        y1, x1 = min(y0 + ph, h) - 1, min(x0 + pw, w) - 1
        colour = np.array([0, 229, 255], dtype=np.uint8)
        out[y0, x0 : x1 + 1] = colour
        out[y1, x0 : x1 + 1] = colour
        out[y0 : y1 + 1, x0] = colour
        out[y0 : y1 + 1, x1] = colour
    return out


@readable
def compare_figure(
    image: np.ndarray,
    maps: Mapping[str, np.ndarray],
    patch_size: Sequence[int],
    scores: Mapping[str, str] | None = None,
) -> go.Figure:
    """Several maps [gh, gw] side by side over the same image, each min-max rescaled, titled with its scores."""
    from plotly.subplots import make_subplots

    names = list(maps)
    scores = scores or {}
    ncols = min(3, len(names))
    nrows = math.ceil(len(names) / ncols)
    fig = make_subplots(
        rows=nrows,
        cols=ncols,
        subplot_titles=[f"{_wrap(n, 30)}<br><sub>{scores.get(n, '')}</sub>" for n in names],
        horizontal_spacing=0.02,
        vertical_spacing=0.1,
    )
    src = _png_data_uri(image)
    ph, pw = int(patch_size[0]), int(patch_size[1])
    h, w = image.shape[:2]
    for idx, name in enumerate(names):
        r, c = idx // ncols + 1, idx % ncols + 1
        fig.add_trace(go.Image(source=src, **_PIXEL_EDGES, hoverinfo="skip"), row=r, col=c)
        heat = maps[name]
        fig.add_trace(
            go.Heatmap(
                z=_rescale(heat),
                x0=pw / 2,
                dx=pw,
                y0=ph / 2,
                dy=ph,
                colorscale=HEAT_SCALE,
                opacity=0.6,
                zmin=0,
                zmax=1,
                showscale=idx == 0,
                colorbar=dict(title="rescaled", thickness=10),
                customdata=heat,
                hovertemplate=name + ": %{customdata:.4g}<extra></extra>",
            ),
            row=r,
            col=c,
        )
        _image_axes(fig, h, w, row=r, col=c)
    fig.update_layout(margin=dict(l=10, r=10, t=110, b=10), height=350 * nrows + 80, title="Explanations compared")
    return fig


@readable
def curves_figure(curves: Mapping[str, tuple[np.ndarray, np.ndarray, float]], mode: str) -> go.Figure:
    """Deletion or insertion curves (fraction of patches changed vs class probability), AUC in the legend."""
    fig = go.Figure()
    for name, (fractions, probs, auc) in curves.items():
        fig.add_trace(
            go.Scatter(
                x=fractions,
                y=probs,
                mode="lines",
                name=f"{name} (AUC {auc:.3f})",
                hovertemplate=name + ": %{x:.2f} → %{y:.3f}<extra></extra>",
            )
        )
    better = "lower is more faithful" if mode == "deletion" else "higher is more faithful"
    fig.update_layout(
        title=f"{mode.capitalize()} curves ({better})",
        xaxis_title=f"fraction of patches {'deleted' if mode == 'deletion' else 'inserted'}",
        yaxis_title="probability of the explained class",
        margin=dict(l=10, r=10, t=50, b=40),
        height=480,
        yaxis_range=[0, 1.02],
        legend=dict(orientation="h", yanchor="top", y=-0.2, xanchor="left", x=0),  # below: the plot keeps its width
    )
    return fig


# -- label-free views (Features tab) -------------------------------------------------------------------------------


def _upscale_rgb(rgb: np.ndarray, patch_size: Sequence[int]) -> np.ndarray:
    """[gh, gw, 3] in [0, 1] -> uint8 [gh·ph, gw·pw, 3], each patch a flat block."""
    ph, pw = int(patch_size[0]), int(patch_size[1])
    img = (np.clip(rgb, 0.0, 1.0) * 255).round().astype(np.uint8)
    return np.repeat(np.repeat(img, ph, axis=0), pw, axis=1)


@readable
def pca_rgb_figure(
    image: np.ndarray, rgb: np.ndarray, patch_size: Sequence[int], opacity: float = 0.8, title: str = ""
) -> go.Figure:
    """The first 3 principal components of the patch features as RGB [gh, gw, 3] over the model's view [H, W, 3]."""
    h, w = image.shape[:2]
    gh, gw = rgb.shape[:2]
    big = np.zeros((h, w, 3), dtype=np.uint8)
    up = _upscale_rgb(rgb, patch_size)[:h, :w]
    big[: up.shape[0], : up.shape[1]] = up
    fig = go.Figure()
    fig.add_trace(go.Image(source=_png_data_uri(image), **_PIXEL_EDGES, hoverinfo="skip", name="image"))
    fig.add_trace(
        go.Image(source=_png_data_uri(big), **_PIXEL_EDGES, opacity=float(opacity), hoverinfo="skip", name="pca")
    )
    _image_axes(fig, h, w)
    fig.update_layout(
        title=title or f"Feature PCA ({gh}x{gw} patches; RGB = components 1-3)", margin=_MARGIN, height=420
    )
    return fig


@readable
def pca_gallery_figure(rgbs: np.ndarray, patch_size: Sequence[int], names: Sequence[str], title: str = "") -> go.Figure:
    """One PCA shared by several images: [B, gh, gw, 3] side by side, so parts correspond by colour."""
    from plotly.subplots import make_subplots

    n = len(rgbs)
    ncols = min(5, n)
    nrows = math.ceil(n / ncols)
    fig = make_subplots(
        rows=nrows, cols=ncols, subplot_titles=list(names), horizontal_spacing=0.01, vertical_spacing=0.06
    )
    for i, rgb in enumerate(rgbs):
        r, c = i // ncols + 1, i % ncols + 1
        up = _upscale_rgb(rgb, patch_size)
        fig.add_trace(
            go.Image(source=_png_data_uri(up), **_PIXEL_EDGES, hoverinfo="skip", name=str(names[i])), row=r, col=c
        )
        _image_axes(fig, up.shape[0], up.shape[1], row=r, col=c)
    fig.update_annotations(font_size=10)  # the images' names: five to a row
    fig.update_layout(
        title=title or f"PCA shared by {n} images", margin=dict(l=10, r=10, t=60, b=10), height=200 * nrows + 60
    )
    return fig


@readable
def norm_grid_figure(norms: np.ndarray, flagged: np.ndarray, layer: int, title: str = "") -> go.Figure:
    """Patch-token norms [gh, gw] after one block, artifact tokens (``flagged`` [gh, gw] bool) marked with a cross."""
    gh, gw = norms.shape
    fig = go.Figure(
        go.Heatmap(
            z=norms,
            colorscale=HEAT_SCALE,
            colorbar=dict(title="norm", thickness=12),
            hovertemplate=f"layer {layer}<br>patch (%{{y}}, %{{x}})<br>norm %{{z:.4g}}<extra></extra>",
        )
    )
    ys, xs = np.nonzero(flagged)
    fig.add_trace(
        go.Scatter(
            x=xs,
            y=ys,
            mode="markers",
            name="artifact (high norm)",
            marker=dict(symbol="x", color="#00e5ff", size=9),
            hoverinfo="skip",
        )
    )
    fig.update_yaxes(autorange="reversed", scaleanchor="x", title="patch row", range=[gh - 0.5, -0.5])
    fig.update_xaxes(title="patch column", range=[-0.5, gw - 0.5])
    fig.update_layout(
        title=title or f"Token norms after block {layer}",
        margin=dict(l=10, r=10, t=50, b=40),
        height=420,
        showlegend=True,
        legend=dict(orientation="h", y=-0.15),
    )
    return fig


@readable
def norm_histogram_figure(
    patch_norms: np.ndarray, prefix_norms: np.ndarray, threshold: float, layer: int, title: str = ""
) -> go.Figure:
    """Histogram of one layer's token norms (patches and prefix tokens as two traces) with the artifact threshold."""
    fig = go.Figure()
    fig.add_trace(
        go.Histogram(
            x=patch_norms,
            name="patch tokens",
            nbinsx=40,
            marker_color="#4c78a8",
            hovertemplate="norm %{x}<br>%{y} patches<extra></extra>",
        )
    )
    if len(prefix_norms):
        fig.add_trace(
            go.Histogram(
                x=prefix_norms,
                name="CLS / registers",
                nbinsx=40,
                marker_color="#f58518",
                hovertemplate="norm %{x}<br>%{y} prefix tokens<extra></extra>",
            )
        )
    fig.add_vline(
        x=float(threshold),
        line=dict(color="red", dash="dash"),
        annotation_text=f"artifact threshold {threshold:.3g}",
        annotation_position="top right",
    )
    fig.update_layout(
        title=title or f"Token norms after block {layer}",
        barmode="overlay",
        xaxis_title="L2 norm of the token",
        yaxis_title="tokens",
        margin=dict(l=10, r=10, t=50, b=40),
        height=360,
    )
    fig.update_traces(opacity=0.75)
    return fig


@readable
def norms_by_depth_figure(lines: Mapping[str, np.ndarray], title: str = "Token norms across depth") -> go.Figure:
    """Norm against layer for named tokens or statistics, ``{name: [L]}`` (CLS, registers, patch median and max)."""
    fig = go.Figure()
    for name, values in lines.items():
        dash = "dot" if name.startswith("patch") else None
        fig.add_trace(
            go.Scatter(
                x=np.arange(len(values)),
                y=values,
                mode="lines+markers",
                name=name,
                line=dict(dash=dash),
                hovertemplate=name + ": layer %{x}, norm %{y:.4g}<extra></extra>",
            )
        )
    fig.update_layout(
        title=title, xaxis_title="layer", yaxis_title="L2 norm", margin=dict(l=10, r=10, t=50, b=40), height=360
    )
    return fig


@readable
def register_attention_figure(
    from_cls: np.ndarray | None, from_patches: np.ndarray, title: str = "Attention to each register (mean over heads)"
) -> go.Figure:
    """[L, R] attention to each register from CLS (left, when there is one) and from the patches (right)."""
    from plotly.subplots import make_subplots

    panels = [("from CLS", from_cls)] if from_cls is not None else []
    panels.append(("from the patches (mean)", from_patches))
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=[p[0] for p in panels], horizontal_spacing=0.2)
    for i, (name, z) in enumerate(panels):
        num_layers, num_regs = z.shape
        fig.add_trace(
            go.Heatmap(
                z=z,
                x=[f"reg {j}" for j in range(num_regs)],
                y=list(range(num_layers)),
                colorscale=HEAT_SCALE,
                zmin=0,
                coloraxis="coloraxis",
                name=name,
                hovertemplate=name + "<br>layer %{y}, %{x}<br>attention %{z:.4f}<extra></extra>",
            ),
            row=1,
            col=i + 1,
        )
        fig.update_yaxes(title="layer", autorange="reversed", row=1, col=i + 1)
    fig.update_layout(
        title=title,
        coloraxis=dict(colorscale=HEAT_SCALE, colorbar=dict(title="attention")),
        margin=dict(l=10, r=10, t=70, b=40),
        height=380,
    )
    return fig


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


@readable
def masks_figure(masks: np.ndarray, threshold: float, layer: int) -> go.Figure:
    """DINO masks [H, gh, gw] (bool) of every head as one mosaic."""
    z, custom, notes = _mosaic(masks.astype(np.float32))
    fig = go.Figure(
        go.Heatmap(
            z=z,
            customdata=custom,
            colorscale=[[0, "#202020"], [1, "#fdd835"]],
            zmin=0,
            zmax=1,
            showscale=False,
            hoverongaps=False,
            hovertemplate="head %{customdata[0]:.0f}, patch (%{customdata[1]:.0f}, "
            "%{customdata[2]:.0f})<br>in mask: %{customdata[3]:.0f}<extra></extra>",
        )
    )
    _mosaic_axes(fig, z.shape)
    fig.update_layout(
        title=f"Layer {layer}: per head, the patches holding {threshold:.0%} of the CLS attention",
        annotations=notes,
        margin=dict(l=10, r=10, t=60, b=10),
        height=480,
        plot_bgcolor="white",
    )
    return fig


@readable
def relative_bias_figure(maps: np.ndarray, layer: int, title: str = "") -> go.Figure:
    """Relative-position bias [H, 2gh-1, 2gw-1] of one layer over the offset (Δrow, Δcol), one tile per head."""
    num, a, b = maps.shape
    gh, gw = (a + 1) // 2, (b + 1) // 2
    z, custom, notes = _mosaic(maps)
    custom[..., 1] -= gh - 1  # cell (i, j) of a tile is the offset (i - gh + 1, j - gw + 1)
    custom[..., 2] -= gw - 1
    fig = go.Figure(
        go.Heatmap(
            z=z,
            customdata=custom,
            colorscale="RdBu",
            zmid=0,
            hoverongaps=False,
            colorbar=dict(title="bias", thickness=12),
            hovertemplate=f"layer {layer}, head %{{customdata[0]:.0f}}<br>Δrow %{{customdata[1]:.0f}}"
            ", Δcol %{customdata[2]:.0f}<br>bias %{customdata[3]:.4g}<extra></extra>",
        )
    )
    _mosaic_axes(fig, z.shape)
    fig.update_layout(
        title=title or f"Layer {layer}: relative-position bias per head over (Δrow, Δcol); centre = 0",
        annotations=notes,
        margin=dict(l=10, r=10, t=60, b=10),
        height=520,
        plot_bgcolor="white",
    )
    return fig


@readable
def class_depth_figure(probs: np.ndarray, label: str) -> go.Figure:
    """The logit lens' probability of one class [L] after each block."""
    fig = go.Figure(
        go.Scatter(
            x=np.arange(len(probs)),
            y=probs,
            mode="lines+markers",
            name=label,
            hovertemplate="layer %{x}: %{y:.4f}<extra></extra>",
        )
    )
    fig.update_layout(
        title=f"Logit lens: probability of '{label}' after each block",
        xaxis_title="layer",
        yaxis_title="probability",
        yaxis_range=[0, 1.02],
        margin=dict(l=10, r=10, t=50, b=40),
        height=340,
    )
    return fig


@readable
def importance_figure(panels: Mapping[str, np.ndarray], title: str = "") -> go.Figure:
    """Head importance [L, H] heatmaps side by side (e.g. exact ablation and gradient estimate); the custom data of
    each cell is (layer, head, value), so a click can open that head."""
    from plotly.subplots import make_subplots

    names = list(panels)
    fig = make_subplots(rows=1, cols=max(1, len(names)), subplot_titles=names, horizontal_spacing=0.1)
    for i, name in enumerate(names):
        z = np.asarray(panels[name], dtype=np.float32)
        num_layers, num_heads = z.shape
        layers, heads = np.mgrid[0:num_layers, 0:num_heads]
        custom = np.stack([layers, heads, z], -1)
        lim = float(np.nanmax(np.abs(z))) if np.isfinite(z).any() else 1.0
        fig.add_trace(
            go.Heatmap(
                z=z,
                customdata=custom,
                colorscale="RdBu",
                zmid=0,
                zmin=-lim,
                zmax=lim,
                colorbar=dict(  # under its own panel, clear of the next panel's axis title
                    title=dict(text="drop", side="right"),
                    thickness=10,
                    orientation="h",
                    x=(i + 0.5) / len(names),
                    xanchor="center",
                    y=-0.38,
                    len=0.8 / len(names),
                ),
                hovertemplate=name + "<br>layer %{customdata[0]:.0f}, head %{customdata[1]:.0f}"
                "<br>drop %{customdata[2]:.4g}<extra></extra>",
                name=name,
            ),
            row=1,
            col=i + 1,
        )
        fig.update_xaxes(title="head", dtick=1, row=1, col=i + 1)
        fig.update_yaxes(title="layer", dtick=1, autorange="reversed", row=1, col=i + 1)
    fig.update_layout(title=title or "Head importance", margin=dict(l=10, r=10, t=70, b=120), height=520)
    return fig


@readable
def perturbation_curves_figure(
    curves: dict[str, dict[str, tuple[list[float], float]]],
    panels: tuple[tuple[str, str], ...],
    x: list[float],
    dotted: set[str],
    title: str,
    x_title: str = "patches removed (%)",
) -> go.Figure:
    """Chefer et al.'s perturbation curves: one panel per (class kind, direction), one line per method.

    Args:
        curves: method label -> panel key -> (accuracy per step in [0, 1], AUC).
        panels: (panel key, panel title), four of them, drawn in a 2 x 2 grid.
        x: percent of the image removed at each step.
        dotted: method labels drawn dotted (the random baseline).
        title: figure title.
        x_title: what x counts: "pixels removed (%)" under the authors' protocol, patches under vizapp's variant.
    """
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=2, cols=2, subplot_titles=[t for _, t in panels])
    colours = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]
    for i, (label, per_panel) in enumerate(curves.items()):
        for j, (key, _) in enumerate(panels):
            if key not in per_panel:
                continue
            ys, auc = per_panel[key]
            fig.add_trace(
                go.Scatter(
                    x=x,
                    y=[100 * v for v in ys],
                    mode="lines+markers",
                    name=label,
                    legendgroup=label,
                    showlegend=j == 0,
                    line={"color": colours[i % len(colours)], "dash": "dot" if label in dotted else "solid"},
                    hovertemplate=f"{html.escape(label)}<br>%{{x:.1f}} % removed: %{{y:.1f}} % accuracy<br>"
                    f"AUC {auc:.2f}<extra></extra>",
                ),
                row=j // 2 + 1,
                col=j % 2 + 1,
            )
    fig.update_xaxes(title_text=x_title)
    fig.update_yaxes(title_text="top-1 accuracy (%)")
    fig.update_layout(title=title, height=800, template="plotly_white")
    return fig


def figures_zip(figs: Mapping[str, go.Figure], path: str) -> list[str]:
    """Every figure as an interactive HTML page in one .zip at ``path``, beside one copy of plotly.js (the pages load
    it from the same folder, so they open offline once unzipped). ``figs`` maps a file stem to its figure; returns
    the names written."""
    import re
    import zipfile

    from plotly.offline import get_plotlyjs

    names = []
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("plotly.min.js", get_plotlyjs())
        for stem, fig in figs.items():
            name = re.sub(r"[^A-Za-z0-9_.-]+", "-", stem).strip("-") + ".html"
            z.writestr(name, fig.to_html(include_plotlyjs="plotly.min.js", full_html=True))
            names.append(name)
    return names
