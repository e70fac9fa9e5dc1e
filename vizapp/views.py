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
from vizapp.errors import BadParameterError
from vizapp.feature_views import (  # noqa: F401  (the Features tab's views, named here too)
    ARTIFACT_K,
    LensViews,
    MaskViews,
    TokenNormViews,
    artifact_sentence,
    artifact_threshold,
    dino_mask_views,
    feature_arrays,
    feature_layer,
    feature_pca_view,
    feature_similarity_view,
    importance_reuses_blocks,
    importance_support,
    importance_view,
    lens_classes,
    logit_lens_views,
    pca_gallery_view,
    prefix_names,
    token_norm_views,
)
from vizapp.pipeline import Analysis, Query
from vizapp.statistics import STATISTICS, HeadStatistic, head_statistics, undefined_statistics

if TYPE_CHECKING:  # type hints only: vizapp/figures/ is the one package that imports plotly
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
    start_row: str = "output"  # where rollout, relevance and flow start: a key of pipeline.START_ROWS
    colorscale: str = figures.HEAT_SCALE  # of attention and explanation maps: one of figures.COLOR_SCALES


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
    "start_row": lambda v: "from the CLS row" if v == "cls" else "",  # the output's row: said after the title
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
    said = [text for text in (_CONTROL_TEXT[name](kwargs[name]) for name in m.controls) if text]
    if said:
        title += " (" + ", ".join(said) + ")"
    if m.needs_class and class_label:
        title += f" for '{class_label}'"
    if m.from_output and r.readout != "cls" and kwargs.get("start_row", "output") == "output":
        title += f"; the output reads {r.readout_text}"
    return figures.overlay_figure(
        r.image, heat, r.patch_size, c.opacity, title=title, value_name=m.name, colorscale=c.colorscale
    )


def method_unavailable(r: Analysis, name: str) -> str:
    """Why method ``name`` cannot run on this analysis ("" when it can): a map of the CLS token's attention needs a
    CLS token, a class-specific map needs a classifier head."""
    m = methods.get(name)
    if m.name == "attention" and not r.has_class_token:
        return "it reads the CLS token's attention, and this model has no CLS token (it pools its patches)"
    if m.needs_class and r.probs is None:
        return "it explains a class, and this model has no classifier head"
    return methods.unavailable(r, m.name)  # what the method itself says of this model ("" when it runs)


def available_methods(r: Analysis) -> list[str]:
    """The names of the registered methods that run on this analysis, in registry order."""
    return [name for name in methods.METHODS if not method_unavailable(r, name)]


def methods_note(r: Analysis) -> str:
    """One sentence naming the methods this model cannot offer and why ("" when all are offered)."""
    missing = [(methods.METHODS[n].label, method_unavailable(r, n)) for n in methods.METHODS]
    missing = [(label, why) for label, why in missing if why]
    if not missing:
        return ""
    return "Not offered for this model: " + "; ".join(f"**{label}** ({why})" for label, why in missing) + "."


def class_choices(r: Analysis) -> list[str]:
    """Every class of the model, most probable first (empty without a classifier head), so that any class is
    reachable from a searchable dropdown."""
    if r.probs is None:
        return []
    order = np.argsort(-np.asarray(r.probs), kind="stable")
    return [r.labels[i] for i in order]


def rollout_view(r: Analysis, c: Controls) -> go.Figure:
    """Attention rollout with the controls' head fusion, discard ratio and start layer."""
    return map_view(r, c, "rollout")


def heads_view(r: Analysis, c: Controls) -> go.Figure:
    layer = c.layer % r.num_layers
    maps = r.attention(layer, None, c.query)
    patch = None if isinstance(c.query, str) else (int(c.query[0]), int(c.query[1]))
    return figures.heads_figure(maps, layer, query_label(c.query), c.per_head_scale, patch, colorscale=c.colorscale)


def focus_view(r: Analysis, c: Controls) -> go.Figure:
    """The chosen head's map over the image, or (``focus_head`` None) the mean of the layer's heads."""
    layer = c.layer % r.num_layers
    if c.focus_head is None:
        heat = r.attention(layer, None, c.query).mean(0)
        head_text = f"mean of its {r.num_heads} heads"
    else:
        heat = r.attention(layer, c.focus_head, c.query)
        head_text = f"head {c.focus_head}"
    patch = None if isinstance(c.query, str) else (int(c.query[0]), int(c.query[1]))
    return figures.overlay_figure(
        r.image,
        heat,
        r.patch_size,
        c.opacity,
        marker=patch,
        value_name="weight",
        title=f"Layer {layer}, {head_text}: {query_label(c.query)}",
        colorscale=c.colorscale,
    )


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
        r.mean_distance,
        ref,
        title=f"Mean attention distance ({r.grid_size[0]}x{r.grid_size[1]} patches of {r.patch_size[0]} px)",
    )


def statistic_choices() -> list[tuple[str, str]]:
    """The Attention distance tab's choices: every registered per-head statistic (:mod:`vizapp.statistics`, a user's
    too), as (its label and unit, its name), in registration order (mean attention distance first)."""
    return [(f"{s.label} ({s.unit})" if s.unit else s.label or s.name, s.name) for s in head_statistics()]


def statistic_view(
    r: Any, name: str, reference: tuple[float, str] | None = None, where: str = "", windowed: bool = False
) -> go.Figure:
    """Per-head statistic ``name`` of an analysis (plain, or ``windowed``: ``r.statistics[name]`` [L, H], NaN for a
    head a layer lacks), one dot per head per layer, with ``reference`` (value, label) as a dashed line; ``where`` ends
    the title. The mean attention distance of a plain ViT is :func:`distance_view`, a windowed one's
    :func:`vizapp.views_windows.distance_view`; entropy's reference, log N nats for rows over N tokens, is drawn for a
    plain ViT (:func:`head_statistic_view`)."""
    stat = STATISTICS.get(name)
    values = r.statistics.get(name)
    if not isinstance(stat, HeadStatistic) or values is None or np.ndim(values) != 2:
        offered = [n for _, n in statistic_choices() if n in r.statistics]
        raise BadParameterError(f"no per-head statistic {name!r} in this analysis; it has {offered}")
    label = stat.label or name
    title = f"{label[:1].upper()}{label[1:]} per head{where}"
    why = undefined_statistics(r.num_prefix_tokens, windowed).get(name, "")
    if why:
        title += f". {why}"
    unit = f" {stat.unit}" if stat.unit else ""
    return figures.head_statistic_figure(
        np.asarray(values, dtype=np.float64),
        reference,
        title=title,
        y_title=label + (f" ({stat.unit})" if stat.unit else ""),
        hover="%{customdata[2]:.4g}" + unit,
    )


def head_statistic_view(r: Analysis, name: str) -> go.Figure:
    """The Attention distance tab's plot of one registered per-head statistic of a plain ViT's analysis: the mean
    distance as :func:`distance_view` draws it; the entropy with its value for uniform attention, log N nats (each
    query's row spans all N tokens, unless a -inf in the model's attention bias masks some: no line then); any other
    without a reference line."""
    if name == "distance":
        return distance_view(r)
    n = r.num_tokens
    if any(b is not None and bool(b.isneginf().any()) for b in r.biases):  # a mask: some rows skip some keys
        return statistic_view(r, name, None, f" ({n} tokens; the model's mask hides some keys from some queries)")
    ref = None
    if name == "entropy":
        ref = (float(np.log(n)), f"uniform attention over all {n} tokens (log {n} = {np.log(n):.2f} nats)")
    return statistic_view(r, name, ref, f" ({n} tokens, each query's row over all of them)")


def other_statistic_figures(r: Any, view: Callable[[Any, str], Any]) -> dict[str, Any]:
    """The download's page of every per-head statistic of ``r`` but the mean distance (the entropy, a user's), drawn
    by ``view`` (:func:`head_statistic_view`, or a windowed analysis's), named "distance-<name>"."""
    return {
        f"distance-{name.replace('_', '-')}": view(r, name)
        for _, name in statistic_choices()
        if name != "distance" and name in r.statistics
    }


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
    """The Position tab: the main figure, one tile enlarged, a note (figures None when there is nothing to show), and
    how many layers / heads the layer and head selectors offer (0: the scheme has no per-layer / per-head view)."""

    figure: go.Figure | None
    tile: go.Figure | None
    note: str
    layers: int = 0
    heads: int = 0
    #: the views offered when the model has two (:data:`POS_SHOWS`), else empty
    shows: tuple[str, ...] = ()
    #: what the figure shows: "learned" (cosine grid), "rope" (mosaic), "relative" (bias maps) or "" (nothing)
    kind: str = ""
    #: the grid of the mosaic's tiles (learned table, possibly resampled, or RoPE), else None
    grid: tuple[int, int] | None = None
    #: a title for the figure's box
    title: str = ""


#: The Position tab's two views of a model that adds a learned table beside RoPE or a relative bias (EVA-02, PE).
POS_SHOWS = ("position scheme", "learned table")


def _mosaic_note(fig: go.Figure | None, grid: tuple[int, int]) -> str:
    if fig is not None and fig.data and fig.data[0].type == "image":
        return (
            f". {grid[0] * grid[1]} tiles are drawn as one image, with cosines in steps of 1/127: click a tile to "
            "enlarge it, and hover the enlarged tile for values."
        )
    return ". Hover a cell for tile, cell and cosine; click a tile to enlarge it."


def pos_embed_views(
    vm: VizModel,
    grid: tuple[int, int] | None = None,
    tile: tuple[int, int] = (0, 0),
    layer: int = 0,
    head: int = 0,
    show: str = POS_SHOWS[0],
) -> PosEmbedViews:
    """The view that fits the model's position scheme (issue 13).

    - learned absolute embeddings: their cosine grid, at the model's grid or resampled to ``grid``;
    - RoPE: the similarity the rotation alone induces between positions (:func:`vizapp.posinfo.
      rope_position_similarity`), as the same tile mosaic; mixed RoPE per ``layer`` and ``head``;
    - relative-position bias: per-head maps over the offset (Δrow, Δcol) of ``layer``;
    - none: a sentence saying so.

    A model that adds a learned table beside RoPE or a relative bias (EVA-02, PE, a BEiT configured so) offers both
    (``shows``): ``show`` picks the scheme's view or the table's cosine grid.
    """
    if show not in POS_SHOWS:
        raise BadParameterError(f"show must be one of {list(POS_SHOWS)}, got {str(show)[:40]!r}")
    scheme = vm.position in ("rope", "relative")
    both = scheme and not vm.pos_embed_status
    if scheme and not (both and show == POS_SHOWS[1]):
        v = _scheme_views(vm, tile, layer, head)
        note = v.note + " It also adds a learned absolute table: the “learned table” view."
        return v._replace(note=note, shows=POS_SHOWS) if both else v
    if vm.pos_embed_status:
        return PosEmbedViews(None, None, vm.pos_embed_status)
    grid = tuple(grid or vm.grid_size)
    sim = vm.pos_similarity(grid)
    note = f"Learned position embeddings of `{vm.name}`: {vm.grid_size[0]}x{vm.grid_size[1]} grid"
    note += "" if grid == tuple(vm.grid_size) else f", shown resampled to {grid[0]}x{grid[1]} (bicubic, timm)"
    if both:
        beside = {"rope": "rotary embedding (RoPE)", "relative": "relative-position bias"}[vm.position]
        note += f", added beside its {beside} (the “position scheme” view)"
    fig = pos_view(sim)
    return PosEmbedViews(
        fig,
        pos_tile_view(sim, tile),
        note + _mosaic_note(fig, grid),
        shows=POS_SHOWS if both else (),
        kind="learned",
        grid=grid,
        title="Cosine similarity of the learned position embeddings",
    )


def _scheme_views(vm: VizModel, tile: tuple[int, int], layer: int, head: int) -> PosEmbedViews:
    """RoPE and relative-bias views; read from the timm model by :mod:`vizapp.posinfo`, or, for another library's
    model, from what its adapter reads off the model's own rotary or bias modules (``rope_angles_fn``,
    ``relative_bias_fn``)."""
    from vizapp import posinfo

    sim = maps = None
    grid = tuple(vm.grid_size)
    if vm.family == "timm":
        info = posinfo.position_info(vm.model)
    elif vm.position == "rope" and vm.rope_angles_fn is not None:
        from vizapp.analysis import rope_angle_similarity

        info = posinfo.PositionInfo("rope-axial", grid, None, False, posinfo.AXIAL_ROPE_SENTENCE)
        sim = rope_angle_similarity(vm.rope_angles_fn(), grid).float().cpu().numpy()
    elif vm.position == "relative" and vm.relative_bias_fn is not None:
        info = posinfo.PositionInfo("relative-bias", grid, None, False, posinfo.RELATIVE_BIAS_SENTENCE)
        maps = vm.relative_bias_fn().detach().float().cpu().numpy()
    else:
        return PosEmbedViews(
            None,
            None,
            vm.pos_embed_status + f". Its view is read from timm models only; `{vm.name}` is a {vm.family} model.",
        )
    head_line = f"**Position scheme of `{vm.name}`**: {info.sentence}"
    if vm.position == "relative":
        if maps is None:
            maps = posinfo.relative_bias_maps(vm.model).detach().float().cpu().numpy()  # [L, H, 2gh-1, 2gw-1]
        lay = int(np.clip(layer, 0, maps.shape[0] - 1))
        fig = figures.relative_bias_figure(maps[lay], lay)
        note = head_line + (
            f" Layer {lay} of {maps.shape[0]} (layer selector); each tile is one head's bias over the "
            "offset between query and key, the centre being the same patch."
        )
        return PosEmbedViews(
            fig, None, note, layers=maps.shape[0], kind="relative", title="Relative-position bias per head"
        )
    if sim is None:
        sim = posinfo.rope_position_similarity(vm.model).detach().float().cpu().numpy()  # the model may be on a GPU
    gh, gw = info.grid_size
    layers = heads = 0
    where = ""
    if sim.ndim == 6:  # mixed RoPE: [L, H, gh, gw, gh, gw]
        layers, heads = sim.shape[:2]
        lay, hd = int(np.clip(layer, 0, layers - 1)), int(np.clip(head, 0, heads - 1))
        sim = sim[lay, hd]
        where = f" Layer {lay}, head {hd} (selectors: each head of each layer has its own frequencies)."
    title = f"RoPE similarity between positions ({gh}x{gw})" + (where and f", layer {lay}, head {hd}")
    fig = pos_view(sim, note=title)
    note = (
        head_line + where + " Each tile: for a query at that position, the similarity the rotation alone gives to "
        "a key at every position (mean over frequencies of cos(ω·Δp))" + _mosaic_note(fig, (gh, gw))
    )
    return PosEmbedViews(
        fig,
        pos_tile_view(sim, tile),
        note,
        layers=layers,
        heads=heads,
        kind="rope",
        grid=(gh, gw),
        title="Similarity the rotary embedding induces between positions",
    )


class FaithfulnessViews(NamedTuple):
    """The Compare tab: the maps side by side, deletion and insertion curves, and an AUC table."""

    maps: go.Figure
    deletion: go.Figure
    insertion: go.Figure
    table: list[list[Any]]  # [[method, deletion AUC, insertion AUC], ...]


def faithfulness_views(r: Analysis, maps: Mapping[str, np.ndarray], curves: Mapping[str, Any]) -> FaithfulnessViews:
    """Figures for maps ``{label: [gh, gw]}`` and their curves ``{label: {"deletion": Curve, "insertion": Curve}}``
    (from :meth:`~vizapp.pipeline.Analysis.faithfulness`; curves may have more entries, e.g. "random")."""
    scores = {
        n: f"deletion AUC {c['deletion'].auc:.3f}<br>insertion AUC {c['insertion'].auc:.3f}" for n, c in curves.items()
    }
    table = [[n, round(c["deletion"].auc, 4), round(c["insertion"].auc, 4)] for n, c in curves.items()]
    deletion, insertion = (
        figures.curves_figure({n: (c[mode].fractions, c[mode].probs, c[mode].auc) for n, c in curves.items()}, mode)
        for mode in ("deletion", "insertion")
    )
    return FaithfulnessViews(figures.compare_figure(r.image, maps, r.patch_size, scores), deletion, insertion, table)


def render_all(
    r: Analysis, pos_sim: np.ndarray | None, c: Controls | None = None, statistic: str = "distance"
) -> dict[str, Any]:
    """Every figure the UI shows for one analysis; "distance" is the Attention distance tab's per-head ``statistic``
    (a registered name: the mean distance by default)."""
    c = c or Controls(query=default_query(r))
    return {
        "topk": figures.topk_figure(r.top_k) if r.top_k else None,
        "rollout": rollout_view(r, c),
        "heads": heads_view(r, c),
        "focus": focus_view(r, c),
        "query_image": query_image(r, c),
        "distance": distance_view(r) if statistic == "distance" else head_statistic_view(r, statistic),
        "pos": pos_view(pos_sim),
        "pos_tile": pos_tile_view(pos_sim, c.tile),
    }


def seen_image(r: Analysis) -> np.ndarray:
    """What the model actually saw: its preprocessed input, de-normalised and upscaled to at least
    :data:`QUERY_IMAGE_MIN_SIDE` pixels by whole pixels (so a 28-px input stays sharp)."""
    s = query_image_scale(r)
    return np.repeat(np.repeat(r.image, s, axis=0), s, axis=1) if s > 1 else r.image


def input_sentence(vm: VizModel, original: Any, r: Analysis) -> str:
    """What the preprocessing did to the uploaded image, and whether the image is far from the model's training
    data (a card model such as the bundled Fashion-MNIST ViT says so); markdown."""
    w0, h0 = original.size
    h1, w1 = r.image.shape[:2]
    grey = vm.input_size[0] == 1
    how = "upscaled" if max(w0, h0) < max(w1, h1) else "downscaled" if max(w0, h0) > max(w1, h1) else "kept at size"
    line = (
        f"The model saw your {w0}x{h0} image as {w1}x{h1} pixels{' in greyscale' if grey else ''} ({how} by its own "
        "preprocessing"
    )
    if abs(w0 / h0 - w1 / h1) > 0.02:
        line += f"; the aspect ratio went from {w0 / h0:.2f} to {w1 / h1:.2f}, so part was cropped or padded"
    line += "): see **What the model saw** in the Prediction tab."
    if vm.card and "polarity" in vm.card and "input_size" in vm.card:
        from vizapp.models.bundled import input_distribution_note

        far = input_distribution_note(vm.card, original)
        if far:
            line += " " + far
    return line


def rounded(value: Any, digits: int = 5) -> Any:
    """``value`` with every float rounded to ``digits`` significant digits, through dicts and lists (the Summary)."""
    if isinstance(value, float):
        return float(f"{value:.{digits}g}")
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(v, digits) for v in value]
    return value


#: The colour maps the app offers for attention and explanation maps.
COLOR_SCALES = figures.COLOR_SCALES


def figures_zip(figs: Mapping[str, Any], path: str) -> list[str]:
    """The figures as HTML pages in one .zip (see :func:`vizapp.figures.figures_zip`)."""
    return figures.figures_zip(figs, path)


def tab_figures(r: Analysis, c: Controls, vm: VizModel | None = None, extra: Mapping[str, Any] | None = None) -> dict:
    """Every figure the tabs show for this analysis and these controls, named "tab-what" (for one download): the
    Rollout tab's map for each method that needs no extra run (flow and the class maps do: they are added when
    ``extra`` holds them), every head of the chosen layer and the enlarged head, every per-head statistic (the
    distances, the entropy), the Position view (when ``vm`` is given), and the Features tab's views. ``extra``:
    figures already drawn (e.g. Compare's)."""
    out: dict[str, Any] = {}
    for name in available_methods(r):
        m = methods.METHODS[name]
        if not m.slow and not m.needs_class:
            out[f"rollout-{name}"] = map_view(r, c, name)
    out["heads-all-heads"] = heads_view(r, c)
    out["heads-enlarged-head"] = focus_view(r, c)
    out["distance-mean-attention-distance"] = distance_view(r)
    out.update(other_statistic_figures(r, head_statistic_view))
    if vm is not None:
        pos = pos_embed_views(vm, tile=c.tile)
        if pos.figure is not None:
            out["position-" + (pos.kind or "view")] = pos.figure
        if pos.tile is not None:
            out["position-tile"] = pos.tile
    lay = c.layer % r.num_layers
    out["features-pca"] = feature_pca_view(r, lay)
    centre = (r.grid_size[0] // 2, r.grid_size[1] // 2)
    out["features-similarity"] = feature_similarity_view(r, centre, lay, None, c.opacity)
    norms = token_norm_views(r, lay)
    out.update({"features-norm-grid": norms.grid, "features-norm-histogram": norms.histogram})
    out["features-norms-by-depth"] = norms.depth
    if norms.registers is not None:
        out["features-register-attention"] = norms.registers
    if r.has_class_token:
        masks = dino_mask_views(r, 0.6, c.opacity)
        out.update({"features-dino-masks": masks.per_head, "features-dino-mask-overlay": masks.overlay})
    if r.lens_probs is not None and r.top_k:
        out["features-logit-lens"] = logit_lens_views(r).depth
    out.update({k: v for k, v in (extra or {}).items() if v is not None})
    return out
