"""Views: an :class:`~vizapp.pipeline.Analysis` plus the UI's control values -> plotly figures.

The glue between analyses and figures that the UI and the benchmark share. Nothing here runs a forward pass:
re-rendering after a control change uses the cached analysis only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import plotly.graph_objects as go

from vizapp import figures
from vizapp.analysis.distance import uniform_reference_distance
from vizapp.pipeline import Analysis, Query


@dataclass(frozen=True)
class Controls:
    """The view controls, with the defaults the app starts with."""

    head_fusion: str = "mean"
    discard_ratio: float = 0.0
    start_layer: int = 0
    opacity: float = 0.6
    layer: int = -1
    query: Query = "cls"
    per_head_scale: bool = True
    focus_head: int | None = None
    tile: tuple[int, int] = (0, 0)


def query_label(query: Query) -> str:
    return "CLS" if isinstance(query, str) else f"patch {tuple(int(v) for v in query)}"


def default_query(r: Analysis) -> Query:
    """CLS when the model has one; else the centre patch."""
    return "cls" if r.has_class_token else (r.grid_size[0] // 2, r.grid_size[1] // 2)


def rollout_view(r: Analysis, c: Controls) -> go.Figure:
    heat = r.rollout(c.head_fusion, c.discard_ratio, c.start_layer)
    return figures.overlay_figure(
        r.image, heat, r.patch_size, c.opacity,
        title=f"Attention rollout (fusion {c.head_fusion}, discard {c.discard_ratio:.2f}, from layer {c.start_layer})"
        + ("" if r.has_class_token else "; no CLS token: mean over patch outputs"),
        value_name="rollout",
    )


def heads_view(r: Analysis, c: Controls) -> go.Figure:
    layer = c.layer % r.num_layers
    maps = r.attention(layer, None, c.query)
    patch = None if isinstance(c.query, str) else (int(c.query[0]), int(c.query[1]))
    return figures.heads_figure(maps, layer, query_label(c.query), c.per_head_scale, patch)


def focus_view(r: Analysis, c: Controls) -> go.Figure | None:
    if c.focus_head is None:
        return None
    layer = c.layer % r.num_layers
    heat = r.attention(layer, c.focus_head, c.query)
    patch = None if isinstance(c.query, str) else (int(c.query[0]), int(c.query[1]))
    return figures.overlay_figure(r.image, heat, r.patch_size, c.opacity, marker=patch, value_name="weight",
                                  title=f"Layer {layer}, head {c.focus_head}: {query_label(c.query)}")


QUERY_IMAGE_MIN_SIDE = 320


def query_image_scale(r: Analysis) -> int:
    """Integer upscaling of the model's view for the clickable image (a 28-px input is too small to click)."""
    return max(1, -(-QUERY_IMAGE_MIN_SIDE // max(r.image.shape[:2])))


def query_image(r: Analysis, c: Controls) -> np.ndarray:
    """The model's view, upscaled by :func:`query_image_scale`, with the patch grid and the query outlined."""
    patch = None if isinstance(c.query, str) else (int(c.query[0]), int(c.query[1]))
    s = query_image_scale(r)
    big = np.repeat(np.repeat(r.image, s, axis=0), s, axis=1) if s > 1 else r.image
    return figures.annotate_query(big, (r.patch_size[0] * s, r.patch_size[1] * s), patch)


def distance_view(r: Analysis) -> go.Figure:
    ref = uniform_reference_distance(r.grid_size, r.patch_size)
    return figures.distance_figure(
        r.mean_distance, ref,
        title=f"Mean attention distance ({r.grid_size[0]}x{r.grid_size[1]} patches of {r.patch_size[0]} px)",
    )


def pos_view(sim: np.ndarray | None, note: str = "") -> go.Figure | None:
    if sim is None:
        return None
    gh, gw = sim.shape[:2]
    return figures.pos_embed_figure(sim, title=note or f"Position embedding similarity ({gh}x{gw})")


def pos_tile_view(sim: np.ndarray | None, tile: tuple[int, int]) -> go.Figure | None:
    if sim is None:
        return None
    row = int(np.clip(tile[0], 0, sim.shape[0] - 1))
    col = int(np.clip(tile[1], 0, sim.shape[1] - 1))
    return figures.pos_tile_figure(sim, row, col)


def render_all(r: Analysis, pos_sim: np.ndarray | None, c: Controls | None = None) -> dict[str, Any]:
    """Every figure the UI shows for one analysis."""
    c = c or Controls(query=default_query(r))
    return {
        "topk": figures.topk_figure(r.top_k) if r.top_k else None,
        "rollout": rollout_view(r, c),
        "heads": heads_view(r, c),
        "focus": focus_view(r, c),
        "query_image": query_image(r, c),
        "distance": distance_view(r),
        "pos": pos_view(pos_sim),
        "pos_tile": pos_tile_view(pos_sim, c.tile),
    }
