"""Views: an :class:`~vizapp.pipeline.Analysis` plus the UI's control values -> plotly figures.

Every figure the app shows is built here, from an analysis (or a model's position embeddings) and the control
values; the UI passes values in and figures out, and the benchmark measures the same functions. Nothing here runs a
forward pass: re-rendering after a control change uses the cached analysis only (class-specific maps run one
backward pass).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from vizapp import figures, methods
from vizapp.analysis.distance import uniform_reference_distance
from vizapp.analysis.rollout import HEAD_FUSIONS as HEAD_FUSIONS  # re-exported: the app offers these
from vizapp.pipeline import Analysis, Query

if TYPE_CHECKING:  # type hints only: figures.py is the one module that imports plotly
    import plotly.graph_objects as go

    from vizapp.models import VizModel


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


# How a map's title states the control values its method used (keys are fields of Controls).
_CONTROL_TEXT: dict[str, Callable[[Any], str]] = {
    "head_fusion": lambda v: f"fusion {v}",
    "discard_ratio": lambda v: f"discard {v:.2f}",
    "start_layer": lambda v: f"from layer {v}",
}


def map_view(
    r: Analysis,
    c: Controls,
    method: str,
    class_label: Any = None,
    progress: Callable[[int, int], None] | None = None,
) -> go.Figure:
    """The map of any registered explanation method over the image.

    Args:
        r: the analysis.
        c: view controls; the method reads the ones it lists in ``Method.controls``, and the opacity.
        method: a key of :data:`vizapp.methods.METHODS`.
        class_label: the class to explain, for methods that need one (None: the top-1 class).
        progress: ``callback(done, total)`` for methods that report progress; it may raise to stop the method.
    """
    m = methods.get(method)
    kwargs: dict[str, Any] = {name: getattr(c, name) for name in m.controls}
    if progress is not None and m.reports_progress:
        kwargs["progress"] = progress
    heat = methods.explain(r, m.name, class_label, **kwargs)
    title = m.label
    if m.controls:
        title += " (" + ", ".join(_CONTROL_TEXT[name](kwargs[name]) for name in m.controls) + ")"
    if m.needs_class and class_label:
        title += f" for '{class_label}'"
    if m.controls and not r.has_class_token:
        title += "; no CLS token: mean over patch outputs"
    return figures.overlay_figure(r.image, heat, r.patch_size, c.opacity, title=title, value_name=m.name)


def rollout_view(r: Analysis, c: Controls) -> go.Figure:
    """Attention rollout with the controls' head fusion, discard ratio and start layer."""
    return map_view(r, c, "rollout")


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


class PosEmbedViews(NamedTuple):
    """The Position embeddings tab: the cosine grid, one tile enlarged, and a note (figures None without one)."""

    figure: go.Figure | None
    tile: go.Figure | None
    note: str


def pos_embed_views(vm: VizModel, grid: tuple[int, int] | None = None, tile: tuple[int, int] = (0, 0)) -> PosEmbedViews:
    """A model's learned position embeddings as a cosine grid, at its own grid or resampled to ``grid``."""
    if vm.pos_embed_status:
        return PosEmbedViews(None, None, vm.pos_embed_status)
    grid = tuple(grid or vm.grid_size)
    sim = vm.pos_similarity(grid)
    note = f"Learned position embeddings of `{vm.name}`: {vm.grid_size[0]}x{vm.grid_size[1]} grid"
    note += "" if grid == tuple(vm.grid_size) else f", shown resampled to {grid[0]}x{grid[1]} (bicubic, timm)"
    fig = pos_view(sim)
    if fig is not None and fig.data and fig.data[0].type == "image":
        note += (f". {grid[0] * grid[1]} tiles are drawn as one image, with cosines in steps of 1/127: click a tile to "
                 "enlarge it, and hover the enlarged tile for values.")
    else:
        note += ". Hover a cell for tile, cell and cosine; click a tile to enlarge it."
    return PosEmbedViews(fig, pos_tile_view(sim, tile), note)


class FaithfulnessViews(NamedTuple):
    """The Compare tab: the maps side by side, deletion and insertion curves, and an AUC table."""

    maps: go.Figure
    deletion: go.Figure
    insertion: go.Figure
    table: list[list[Any]]  # [[method, deletion AUC, insertion AUC], ...]


def faithfulness_views(r: Analysis, maps: Mapping[str, np.ndarray], curves: Mapping[str, Any]) -> FaithfulnessViews:
    """Figures for maps ``{label: [gh, gw]}`` and their curves ``{label: {"deletion": Curve, "insertion": Curve}}``
    (from :meth:`~vizapp.pipeline.Analysis.faithfulness`; curves may have more entries, e.g. "random")."""
    scores = {n: f"deletion AUC {c['deletion'].auc:.3f} · insertion AUC {c['insertion'].auc:.3f}"
              for n, c in curves.items()}
    table = [[n, round(c["deletion"].auc, 4), round(c["insertion"].auc, 4)] for n, c in curves.items()]
    deletion, insertion = (
        figures.curves_figure({n: (c[mode].fractions, c[mode].probs, c[mode].auc) for n, c in curves.items()}, mode)
        for mode in ("deletion", "insertion")
    )
    return FaithfulnessViews(figures.compare_figure(r.image, maps, r.patch_size, scores), deletion, insertion, table)


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
