"""Figures of the label-free views (the Features tab) and the evaluation: feature PCA and the gallery, token norms
and registers, DINO masks, the logit lens, head importance, the perturbation curves, and a .zip of figures."""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go

from vizapp.figures._base import (
    _MARGIN,
    _PIXEL_EDGES,
    HEAT_SCALE,
    _image_axes,
    _mosaic,
    _mosaic_axes,
    _png_data_uri,
    _upscale_rgb,
    readable,
)


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
def class_depth_figure(
    probs: np.ndarray, label: str, layers: Sequence[int] | None = None, title: str | None = None
) -> go.Figure:
    """The logit lens' probability of one class after each block: ``probs`` [L], at ``layers`` (default 0..L-1; a
    windowed model's lens covers its last stage's layers only)."""
    fig = go.Figure(
        go.Scatter(
            x=np.arange(len(probs)) if layers is None else np.asarray(layers),
            y=probs,
            mode="lines+markers",
            name=label,
            hovertemplate="layer %{x}: %{y:.4f}<extra></extra>",
        )
    )
    fig.update_layout(
        title=title or f"Logit lens: probability of '{label}' after each block",
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
        # no grid lines: they would show through the empty cells of heads a layer does not have (Swin)
        fig.update_xaxes(title="head", dtick=1, showgrid=False, zeroline=False, row=1, col=i + 1)
        fig.update_yaxes(title="layer", dtick=1, autorange="reversed", showgrid=False, zeroline=False, row=1, col=i + 1)
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
