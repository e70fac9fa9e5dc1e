"""Figures of attention and explanations over the image: the top-k bars, map overlays, the per-head mosaic, mean
attention distance, the position views (cosine grid, RoPE mosaic, relative-bias maps) and the Compare tab's maps and
deletion / insertion curves."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
from PIL import Image

from vizapp.figures._base import (
    _MARGIN,
    _PIXEL_EDGES,
    HEAT_SCALE,
    MAX_HOVER_CELLS,
    SIM_SCALE,
    _colormap_lut,
    _image_axes,
    _mosaic,
    _mosaic_axes,
    _mosaic_layout,
    _png_data_uri,
    _rescale,
    _tile_label,
    _wrap,
    readable,
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
    return _dots_per_head(
        mean_distance,
        None if reference_px is None else (reference_px, f"uniform attention ({reference_px:.1f} px)"),
        title=title or "Mean attention distance per head",
        y_title="mean attention distance (pixels)",
        hover="%{customdata[2]:.1f} px",
    )


@readable
def head_statistic_figure(
    values: np.ndarray, reference: tuple[float, str] | None, title: str, y_title: str, hover: str
) -> go.Figure:
    """One number per head per layer, [L, H] (NaN: a head the layer does not have, or a statistic not defined for the
    model), one dot each, the heads of a layer side by side around its tick; ``reference``: (value, its label), a
    dashed line. ``hover``: how a dot's value reads (``%{customdata[2]}`` is the value). Each dot's customdata is
    (layer, head, value): a click opens that head (the app's distance plot)."""
    return _dots_per_head(values, reference, title, y_title, hover)


def _dots_per_head(
    values: np.ndarray, reference: tuple[float, str] | None, title: str, y_title: str, hover: str
) -> go.Figure:
    """:func:`head_statistic_figure`'s plot, before :func:`readable` (which each public figure applies once)."""
    num_layers, num_heads = values.shape
    layers, heads = np.mgrid[0:num_layers, 0:num_heads]
    # each layer's heads centred on its tick: a layer with fewer heads than the widest (a Swin stage; NaN after its
    # last head) sits centred too, its dots as far apart as every layer's
    present = ~np.isnan(values)
    own = np.where(present.any(axis=1), num_heads - np.argmax(present[:, ::-1], axis=1), num_heads)[:, None]
    jitter = (heads - (own - 1) / 2) * (0.5 / max(num_heads, 1))
    fig = go.Figure(
        go.Scatter(
            x=(layers + jitter).ravel(),
            y=values.ravel(),
            mode="markers",
            customdata=np.stack([layers.ravel(), heads.ravel(), values.ravel()], -1),
            marker=dict(
                color=heads.ravel(),
                colorscale="Turbo",
                size=9,
                line=dict(width=0.5, color="#333"),
                colorbar=dict(title="head", thickness=12, dtick=1),
            ),
            hovertemplate="layer %{customdata[0]:.0f}, head %{customdata[1]:.0f}<br>" + hover + "<extra></extra>",
            name="heads",
        )
    )
    if reference is not None:
        fig.add_hline(
            y=reference[0],
            line_dash="dash",
            line_color="#888",
            annotation_text=reference[1],
            annotation_position="top left",
        )
    fig.update_layout(
        title=title,
        xaxis_title="layer (network depth)",
        yaxis_title=y_title,
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


def _pos_embed_image(z: np.ndarray, title: str, grid: tuple[int, int]) -> go.Figure:
    """The cosine mosaic as one palette PNG (1 byte per cell before compression) for grids too big to ship as
    numbers with hover data (37x37 patches: 1.97 M cells, 11 MB as a heatmap); a colour bar from an empty trace.
    Cosines are quantised to 255 levels (steps of 0.008); the gaps between tiles are white."""
    lut = _colormap_lut(SIM_SCALE, 255)
    idx = np.where(np.isnan(z), 255, np.clip(np.round((np.nan_to_num(z) + 1.0) * 127.0), 0, 254)).astype(np.uint8)
    img = Image.fromarray(idx)  # "L"; putpalette makes it "P" (fromarray's mode= is deprecated in Pillow 11.3)
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
    """Several maps [gh, gw] side by side over the same image, each min-max rescaled, titled with its scores (lines
    split by <br>)."""
    from plotly.subplots import make_subplots

    names = list(maps)
    scores = scores or {}
    ncols = min(3, len(names))
    nrows = math.ceil(len(names) / ncols)
    # lines for a column of 240 px (the app's smallest, see its CSS): a name wrapped at 26 characters, a score a line
    titles = {
        n: _wrap(n, 26) + "".join(f"<br><sub>{line}</sub>" for line in scores.get(n, "").split("<br>")) for n in names
    }
    # rows of 300 px, and between two rows room for the lower row's titles: the gap is a share of the plot's height
    lines = max(t.count("<br>") + 1 for t in titles.values())
    row_px, gap_px = 300, 18 * lines + 20
    plot_px = nrows * row_px + (nrows - 1) * gap_px
    fig = make_subplots(
        rows=nrows,
        cols=ncols,
        subplot_titles=[titles[n] for n in names],
        horizontal_spacing=0.02,
        vertical_spacing=gap_px / plot_px if nrows > 1 else 0.0,
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
    # room above the first row for its subplot titles (a wrapped name and its score lines) and the figure's title
    top = 80 + 18 * lines
    fig.update_layout(
        margin=dict(l=10, r=10, t=top, b=10),
        height=plot_px + top + 10,
        title=dict(text="Explanations compared", y=1.0, yanchor="top", pad=dict(t=34)),  # below the label chip
    )
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
