"""The Features tab's views for a windowed (Swin) analysis, a :class:`vizapp.swin_result.WindowAnalysis`: feature PCA,
the similarity to a token and the token norms of one layer, each on that layer's own grid and drawn over the image at
its stage's token spacing (:mod:`vizapp.swin_features`). Nothing here runs a forward pass: where a large model kept
only the last layer's block output, the views draw the nearest kept layer and say so."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from vizapp import figures
from vizapp.feature_views import (
    ARTIFACT_K,
    LensViews,
    TokenNormViews,
    artifact_threshold,
    nearest_kept,
    pca_or_unthresholded,
)
from vizapp.swin_result import UNDEFINED, WindowAnalysis
from vizapp.views_windows import layer_query

if TYPE_CHECKING:
    import plotly.graph_objects as go


def _where(r: WindowAnalysis, layer: int) -> str:
    g, stride = r.layer_grids[layer], r.strides[layer]
    return f"layer {layer} (stage {r.geometry[layer].stage}, {g[0]}x{g[1]} tokens {stride[0]} px apart)"


def feature_layer(r: WindowAnalysis, layer: int) -> tuple[int, str]:
    """The layer whose features a view draws for a requested ``layer`` (-1 = last), and a note when it differs: a
    large Swin keeps only the last layer's block output (see ``WindowAnalysis.block_outputs``), and a view, redrawn on
    every control change, runs no forward; the Python API forms any layer again."""
    want = r._layer(layer)
    if r.feature_kept(want):
        return want, ""
    got = nearest_kept(r.block_outputs, want)
    return got, (
        f"Layer {want}'s tokens were not kept for this model (all layers' would pass the feature budget); showing "
        f"layer {got}. The Python API forms any layer again (r.feature_pca({want}))."
    )


def feature_pca_view(r: WindowAnalysis, layer: int = -1, foreground_threshold: float | None = None) -> go.Figure:
    """Feature PCA of one layer's tokens as RGB over the image at the layer's token spacing (Oquab et al. 2023)."""
    layer, note = feature_layer(r, layer)
    rgb, foreground_threshold, note = pca_or_unthresholded(r, layer, foreground_threshold, note, "tokens on this layer")
    fg = "" if foreground_threshold is None else f", foreground: 1st component > {foreground_threshold:.2f}"
    title = f"Feature PCA after {_where(r, layer)} (RGB = components 1-3{fg})"
    return figures.pca_rgb_figure(
        r.image, rgb, r.strides[layer], title=title + ("<br><sub>" + note + "</sub>" if note else "")
    )


def feature_similarity_view(
    r: WindowAnalysis,
    query: tuple[int, int],
    layer: int = -1,
    other: WindowAnalysis | None = None,
    opacity: float = 0.6,
) -> go.Figure:
    """Cosine similarity of one token of ``layer`` to every token of that layer, of this image or of ``other``.
    ``query`` is a token of the first stage's grid (what a click on the image gives), moved onto the layer's grid
    (:func:`vizapp.views_windows.layer_query`)."""
    layer, note = feature_layer(r, layer)
    if other is not None and not other.feature_kept(layer):
        raise ValueError(f"the second image kept no features at layer {layer}")
    lq = layer_query(r, layer, query)
    sim = r.feature_similarity(lq, layer, other=other)
    target = other if other is not None else r
    where = "the second image" if other is not None else "this image"
    title = f"Cosine similarity of token {lq}'s feature after {_where(r, layer)} to {where}"
    if note:
        title += "<br><sub>" + note + "</sub>"
    return figures.overlay_figure(
        target.image,
        sim,
        r.strides[layer],
        opacity,
        title=title,
        value_name="cosine",
        colorscale=figures.SIM_SCALE,
        marker=None if other is not None else lq,
    )


def artifact_sentence(r: WindowAnalysis, k: float = ARTIFACT_K) -> str:
    """What the measured norms say about high-norm tokens (Darcet et al. 2024) on this image: which layers have tokens
    above their layer's median + k·MAD; a Swin has no prefix tokens, so every token is a patch of its stage's grid."""
    norms, flags = r.token_norms(), r.artifact_tokens(k)
    per_layer = [int(f.sum()) for f in flags]
    layers = [i for i, c in enumerate(per_layer) if c]
    rule = f"norm above its layer's median + {k:g}·MAD"
    head = UNDEFINED["registers"]
    if not layers:
        return (
            f"{head} On this image no token has a {rule} in any of the {r.num_layers} layers: no high-norm tokens "
            "are measured here (one image; others may differ)."
        )
    ratio = {i: float(norms[i].max() / max(np.median(norms[i]), 1e-12)) for i in layers}
    worst = max(layers, key=ratio.__getitem__)
    counts = ", ".join(f"layer {i}: {per_layer[i]}" for i in layers[:8]) + (" ..." if len(layers) > 8 else "")
    return f"{head} Tokens with a {rule}: {counts}; up to {ratio[worst]:.1f}x the median norm (layer {worst})."


def token_norm_views(r: WindowAnalysis, layer: int = -1, k: float = ARTIFACT_K) -> TokenNormViews:
    """One layer's token norms on its grid and as a histogram, the median and largest norm of each layer across depth,
    and the measured sentence (no registers panel: Swin has none)."""
    layer = r._layer(layer)
    norms, flags = r.token_norms(), r.artifact_tokens(k)
    row, grid = norms[layer], r.layer_grids[layer]
    thr = artifact_threshold(row, k)
    n_flag = int(flags[layer].sum())
    grid_fig = figures.norm_grid_figure(
        row.reshape(grid),
        flags[layer].reshape(grid),
        layer,
        title=f"Token norms after {_where(r, layer)} (x: {n_flag} artifact tokens, norm > {thr:.3g})",
    )
    hist = figures.norm_histogram_figure(
        row,
        np.zeros(0, dtype=row.dtype),
        thr,
        layer,
        title=f"Token norms after layer {layer}: {n_flag} of {row.size} tokens above median + {k:g}·MAD",
    )
    lines = {
        "patch median": np.array([np.median(n) for n in norms]),
        "patch max": np.array([n.max() for n in norms]),
    }
    depth = figures.norms_by_depth_figure(lines, title="Median and largest token norm of each layer (no prefix tokens)")
    return TokenNormViews(grid_fig, hist, depth, None, artifact_sentence(r, k))


def lens_note(r: WindowAnalysis) -> str:
    """Which layers the lens view covers for this analysis (the last stage's), and why not the earlier ones, in one
    sentence each; "" without a classifier head (the caller says there is no lens)."""
    layers = r.lens_layers
    if not layers:
        return ""
    g = r.layer_grids[layers[0]]
    here = f"layers {layers[0]}-{layers[-1]}" if len(layers) > 1 else f"layer {layers[0]}"
    here = f"Shown for {here}: stage {r.geometry[layers[0]].stage}, {g[0]}x{g[1]} tokens."
    return here if layers[0] == 0 else f"{UNDEFINED['logit_lens']} {here}"


def logit_lens_views(r: WindowAnalysis, label: str | None = None, k: int = 5) -> LensViews:
    """The logit lens (nostalgebraist 2020) of the last stage's layers: top-``k`` per layer and one class's
    probability at each of those layers (the earlier layers have none, :data:`vizapp.swin_result.UNDEFINED`). Raises
    BadParameterError for a model without a classifier head or for an unknown class."""
    from vizapp.errors import BadParameterError

    lens, layers = r.logit_lens(k), r.lens_layers
    table = [[i] + [f"{lbl} ({p:.3f})" for lbl, p in lens[i]] for i in layers]
    label = label or (r.top_k[0][0] if r.top_k else r.labels[0])
    if label not in r.labels:
        raise BadParameterError(f"unknown class {str(label)[:60]!r}; pick one from the list")
    probs = r.lens_probs[list(layers), r.labels.index(label)]
    title = f"Logit lens: probability of '{label}' after each block of the last stage"
    return LensViews(table, figures.class_depth_figure(probs, label, layers, title))


def pca_gallery_view(rgbs: np.ndarray, stride: tuple[int, int], names: list[str], layer: int) -> go.Figure:
    """One PCA shared by several images at one layer ([B, gh_l, gw_l, 3] from
    :func:`vizapp.swin_features.feature_pca_images`), side by side, each token ``stride`` pixels wide."""
    return figures.pca_gallery_figure(
        rgbs, stride, names, title=f"One PCA over {len(rgbs)} images' tokens after layer {layer}"
    )


def feature_arrays(
    r: WindowAnalysis,
    layer: int = -1,
    foreground_threshold: float | None = None,
    query: tuple[int, int] | None = None,
    importance: dict[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """The Features tab's arrays of a windowed analysis for an .npz export: the chosen layer's PCA and similarity on
    its grid, every layer's token norms and flags ``token_norms_layer{i}`` [gh_l, gw_l], the grids and strides, the
    logit lens [L, K] (NaN rows before the last stage) and the head importance [L, max H] that was run."""
    layer, _ = feature_layer(r, layer)
    out: dict[str, Any] = {
        "feature_layer": np.array(layer),
        "feature_pca_rgb": r.feature_pca(layer, foreground_threshold=foreground_threshold),  # [gh_l, gw_l, 3]
        "layer_grids": np.array(r.layer_grids, dtype=np.int64),
        "layer_strides_px": np.array(r.strides, dtype=np.int64),
        "num_prefix_tokens": np.array(0),
    }
    for i, (n, f) in enumerate(zip(r.token_norms(), r.artifact_tokens(ARTIFACT_K), strict=True)):
        out[f"token_norms_layer{i}"] = n.reshape(r.layer_grids[i])
        out[f"artifact_tokens_layer{i}"] = f.reshape(r.layer_grids[i])
    if query is not None:
        lq = layer_query(r, layer, query)
        out["feature_similarity"] = r.feature_similarity(lq, layer)  # [gh_l, gw_l]
        out["feature_similarity_query"] = np.array(lq)  # on the layer's grid
    if r.lens_probs is not None:
        out["logit_lens_probs"] = r.lens_probs  # [L, K], NaN rows before the last stage
        out["logit_lens_layers"] = np.array(r.lens_layers, dtype=np.int64)
    for name, arr in (importance or {}).items():
        out[f"head_importance_{name}"] = np.asarray(arr)  # [L, max H], NaN for absent heads
    return out
