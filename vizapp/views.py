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
    return ""


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


def focus_view(r: Analysis, c: Controls) -> go.Figure | None:
    if c.focus_head is None:
        return None
    layer = c.layer % r.num_layers
    heat = r.attention(layer, c.focus_head, c.query)
    patch = None if isinstance(c.query, str) else (int(c.query[0]), int(c.query[1]))
    return figures.overlay_figure(
        r.image,
        heat,
        r.patch_size,
        c.opacity,
        marker=patch,
        value_name="weight",
        title=f"Layer {layer}, head {c.focus_head}: {query_label(c.query)}",
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
        sim = rope_angle_similarity(vm.rope_angles_fn(), grid).float().numpy()
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
        n: f"deletion AUC {c['deletion'].auc:.3f} · insertion AUC {c['insertion'].auc:.3f}" for n, c in curves.items()
    }
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
    ``extra`` holds them), every head of the chosen layer and the enlarged head, the distances, the Position view
    (when ``vm`` is given), and the Features tab's views. ``extra``: figures already drawn (e.g. Compare's)."""
    out: dict[str, Any] = {}
    for name in available_methods(r):
        m = methods.METHODS[name]
        if not m.slow and not m.needs_class:
            out[f"rollout-{name}"] = map_view(r, c, name)
    out["heads-all-heads"] = heads_view(r, c)
    if c.focus_head is not None:
        out["heads-enlarged-head"] = focus_view(r, c)
    out["distance-mean-attention-distance"] = distance_view(r)
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


# -- label-free views (the Features tab) ---------------------------------------------------------------------------

ARTIFACT_K = 10.0  # the default of Analysis.artifact_tokens: median + 10 MAD


def feature_layer(r: Analysis, layer: int) -> tuple[int, str]:
    """The layer whose features are shown for a requested ``layer`` (-1 = last), and a note when it differs: large
    models keep only some blocks' outputs (see ``Analysis.block_outputs``)."""
    want = int(layer) % r.num_layers
    kept = sorted(r.block_outputs)
    if not kept:
        raise ValueError("this analysis kept no block outputs")
    if want in kept:
        return want, ""
    got = min(kept, key=lambda k: (abs(k - want), -k))
    return got, f"Layer {want}'s features were not kept for this model (too large); showing layer {got}."


def feature_pca_view(r: Analysis, layer: int = -1, foreground_threshold: float | None = None) -> go.Figure:
    """Feature PCA as RGB over the image (Oquab et al. 2023, DINOv2 Fig. 1)."""
    lay, note = feature_layer(r, layer)
    try:
        rgb = r.feature_pca(lay, foreground_threshold=foreground_threshold)
    except ValueError as e:  # too few patches above the threshold: every threshold the control allows draws a map
        if foreground_threshold is None or "foreground patch" not in str(e):
            raise
        note = (note + " " if note else "") + (
            f"Threshold {foreground_threshold:.2f} leaves fewer than 2 foreground patches on this image, too few to "
            "fit a PCA: shown without the threshold (lower it to mask the background)."
        )
        foreground_threshold = None
        rgb = r.feature_pca(lay)
    fg = "" if foreground_threshold is None else f", foreground: 1st component > {foreground_threshold:.2f}"
    title = f"Feature PCA after block {lay} (RGB = components 1-3{fg})"
    return figures.pca_rgb_figure(
        r.image, rgb, r.patch_size, title=title + ("<br><sub>" + note + "</sub>" if note else "")
    )


def pca_gallery_view(rgbs: np.ndarray, patch_size: tuple[int, int], names: list[str], layer: int) -> go.Figure:
    """One PCA shared by several images ([B, gh, gw, 3] from :func:`vizapp.pipeline.feature_pca`), side by side."""
    return figures.pca_gallery_figure(
        rgbs, patch_size, names, title=f"One PCA over {len(rgbs)} images' patch features after block {layer}"
    )


def feature_similarity_view(
    r: Analysis, query: tuple[int, int], layer: int = -1, other: Analysis | None = None, opacity: float = 0.6
) -> go.Figure:
    """Cosine similarity of the query patch's feature to every patch of this image, or of ``other``."""
    lay, note = feature_layer(r, layer)
    if other is not None:
        lay2, note2 = feature_layer(other, lay)
        if lay2 != lay:
            raise ValueError(f"the second image kept no features at layer {lay}")
    sim = r.feature_similarity(tuple(query), lay, other=other)
    target = other if other is not None else r
    where = "the second image" if other is not None else "this image"
    title = f"Cosine similarity of patch {tuple(int(v) for v in query)}'s feature (block {lay}) to {where}"
    marker = None if other is not None else (int(query[0]), int(query[1]))
    if note:
        title += "<br><sub>" + note + "</sub>"
    return figures.overlay_figure(
        target.image,
        sim,
        target.patch_size,
        opacity,
        title=title,
        value_name="cosine",
        colorscale=figures.SIM_SCALE,
        marker=marker,
    )


def artifact_threshold(norms: np.ndarray, k: float = ARTIFACT_K) -> float:
    """The norm above which :meth:`Analysis.artifact_tokens` flags a token of one layer: median + k·MAD over the
    layer's tokens [N] (torch's lower median; MAD floored at 1e-6·|median|), for drawing the rule."""
    import torch

    n = torch.as_tensor(np.asarray(norms), dtype=torch.float64)
    med = n.median()
    mad = torch.maximum((n - med).abs().median(), 1e-6 * med.abs())
    return float(med + k * mad)


def artifact_sentence(r: Analysis, k: float = ARTIFACT_K) -> str:
    """What the measured norms say about high-norm tokens (Darcet et al. 2024) in this model on this image: which
    layers have patch tokens above their layer's median + k·MAD, and whether any are in the middle-to-late layers
    (from layer L/3 on). Nothing beyond this image's numbers."""
    norms, flags = r.token_norms(), r.artifact_tokens(k)
    p, num_layers = r.num_prefix_tokens, r.num_layers
    patch_flags = flags[:, p:]
    per_layer = patch_flags.sum(1)
    layers = [int(i) for i in np.nonzero(per_layer)[0]]
    mid = num_layers // 3
    rule = f"norm above its layer's median + {k:g}·MAD"
    if not layers:
        return (
            f"On this image no patch token has a {rule} in any of the {num_layers} layers: no high-norm "
            "artifact tokens are measured here (one image; others may differ)."
        )
    worst = max(layers, key=lambda i: norms[i, p:].max() / max(np.median(norms[i, p:]), 1e-12))
    ratio = norms[worst, p:].max() / max(np.median(norms[worst, p:]), 1e-12)
    late = [i for i in layers if i >= mid]
    counts = ", ".join(f"layer {i}: {int(per_layer[i])}" for i in layers[:8]) + (" ..." if len(layers) > 8 else "")
    head = f"Patch tokens with a {rule} ({counts}; up to {ratio:.1f}x the median norm, layer {worst})."
    if late:
        return (
            head + f" So on this image high-norm tokens do appear in the middle-to-late layers (layer {mid} on), "
            f"in {len(late)} of the {num_layers - mid} layers there."
        )
    return head + f" They appear only in the early layers (before layer {mid}), not in the middle-to-late ones."


class TokenNormViews(NamedTuple):
    """The token-norm views of one layer: the patch grid, the histogram with the threshold, prefix tokens across depth,
    attention to registers (None without registers) and the measured sentence."""

    grid: go.Figure
    histogram: go.Figure
    depth: go.Figure
    registers: go.Figure | None
    sentence: str


def prefix_names(r: Analysis) -> list[str]:
    """Names of the prefix tokens in the model's order: CLS, other prefix tokens (e.g. a distillation token), then the
    registers the model declares."""
    p, regs = r.num_prefix_tokens, r.num_registers
    names = ["CLS"] if r.has_class_token else []
    names += [f"prefix token {i}" for i in range(len(names), p - regs)]
    return (names + [f"register {j}" for j in range(regs)])[:p]


def token_norm_views(r: Analysis, layer: int = -1, k: float = ARTIFACT_K) -> TokenNormViews:
    norms, flags = r.token_norms(), r.artifact_tokens(k)
    lay = int(layer) % r.num_layers
    p = r.num_prefix_tokens
    row = norms[lay]
    thr = artifact_threshold(row, k)
    n_flag = int(flags[lay].sum())
    grid = figures.norm_grid_figure(
        row[p:].reshape(r.grid_size),
        flags[lay, p:].reshape(r.grid_size),
        lay,
        title=f"Patch-token norms after block {lay} (x: {int(flags[lay, p:].sum())} artifact tokens, norm > {thr:.3g})",
    )
    hist = figures.norm_histogram_figure(
        row[p:],
        row[:p],
        thr,
        lay,
        title=f"Token norms after block {lay}: {n_flag} of {r.num_tokens} tokens above median + {k:g}·MAD",
    )
    lines = {name: norms[:, i] for i, name in enumerate(prefix_names(r))}
    lines["patch median"] = np.median(norms[:, p:], axis=1)
    lines["patch max"] = norms[:, p:].max(axis=1)
    depth = figures.norms_by_depth_figure(lines, title="Prefix tokens' norms across depth, against the patches'")
    registers = None
    if r.num_registers:
        ra = r.register_attention()
        registers = figures.register_attention_figure(
            None if ra["from_cls"] is None else ra["from_cls"].mean(1), ra["from_patches"].mean(1)
        )
    return TokenNormViews(grid, hist, depth, registers, artifact_sentence(r, k))


class MaskViews(NamedTuple):
    per_head: go.Figure
    overlay: go.Figure


def dino_mask_views(r: Analysis, threshold: float = 0.6, opacity: float = 0.6) -> MaskViews:
    """Per head of the last layer, the patches holding ``threshold`` of the CLS attention (Caron et al. 2021), as a
    mosaic and as the number of heads covering each patch over the image."""
    masks = r.dino_masks(threshold)
    lay = r.num_layers - 1
    count = masks.sum(0).astype(np.float32)
    overlay = figures.overlay_figure(
        r.image,
        count,
        r.patch_size,
        opacity,
        value_name="heads",
        title=f"How many of the {r.num_heads} heads' masks cover each patch (threshold {threshold:.2f})",
        rescale=False,  # a count of heads: the colour bar reads it
    )
    return MaskViews(figures.masks_figure(masks, threshold, lay), overlay)


def lens_classes(r: Analysis) -> list[str]:
    """Classes worth following across depth: the final top-5, then each layer's top-1 (no duplicates)."""
    out = [lbl for lbl, _ in r.top_k]
    for row in r.logit_lens(k=1):
        if row and row[0][0] not in out:
            out.append(row[0][0])
    return out


class LensViews(NamedTuple):
    table: list[list[Any]]  # [[layer, "label (p)", ...], ...]
    depth: go.Figure


def logit_lens_views(r: Analysis, label: str | None = None, k: int = 5) -> LensViews:
    """The logit lens (nostalgebraist 2020): top-``k`` per layer and one class's probability across depth. Raises
    BadParameterError for a model without a classifier head."""
    lens = r.logit_lens(k)
    table = [[i] + [f"{lbl} ({p:.3f})" for lbl, p in row] for i, row in enumerate(lens)]
    label = label or (r.top_k[0][0] if r.top_k else r.labels[0])
    if label not in r.labels:
        from vizapp.errors import BadParameterError

        raise BadParameterError(f"unknown class {str(label)[:60]!r}; pick one from the list")
    return LensViews(table, figures.class_depth_figure(r.lens_probs[:, r.labels.index(label)], label))


def importance_view(exact: np.ndarray | None, gradient: np.ndarray | None, score: str = "") -> tuple[go.Figure, str]:
    """Exact and gradient head importance [L, H] side by side, and their Spearman rank correlation as a sentence."""
    from vizapp.ablation import rank_correlation

    panels = {}
    if exact is not None:
        panels["exact ablation"] = exact
    if gradient is not None:
        panels["gradient estimate"] = gradient
    text = ""
    if exact is not None and gradient is not None:
        import torch

        both = np.isfinite(exact) & np.isfinite(gradient)
        rho = (
            rank_correlation(torch.as_tensor(exact[both]), torch.as_tensor(gradient[both]))
            if both.sum() > 1
            else float("nan")
        )
        text = f"Spearman rank correlation between the two: **{rho:.3f}** over {int(both.sum())} heads."
    title = "Head importance: drop of the " + (score or "score") + " when each head alone is ablated"
    return figures.importance_figure(panels, title=title), text


def feature_arrays(
    r: Analysis,
    layer: int = -1,
    foreground_threshold: float | None = None,
    query: tuple[int, int] | None = None,
    dino_threshold: float = 0.6,
    importance: Mapping[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """The Features tab's arrays for an .npz export (names say the shapes' meaning)."""
    lay, _ = feature_layer(r, layer)
    out: dict[str, np.ndarray] = {
        "feature_layer": np.array(lay),
        "feature_pca_rgb": r.feature_pca(lay, foreground_threshold=foreground_threshold),  # [gh, gw, 3]
        "token_norms": r.token_norms(),  # [L, N], prefix tokens first
        "artifact_tokens": r.artifact_tokens(ARTIFACT_K),  # [L, N] bool
        "num_prefix_tokens": np.array(r.num_prefix_tokens),
        "num_registers": np.array(r.num_registers),
        "grid_size": np.array(r.grid_size),
    }
    if r.has_class_token:  # the masks are drawn from the CLS token's attention
        out["dino_masks"] = r.dino_masks(dino_threshold)  # [H, gh, gw] bool, last layer
        out["dino_threshold"] = np.array(dino_threshold)
    if query is not None:
        out["feature_similarity"] = r.feature_similarity(tuple(query), lay)  # [gh, gw]
        out["feature_similarity_query"] = np.array(query)
    if r.num_registers:
        ra = r.register_attention()
        out["register_attention_from_patches"] = ra["from_patches"]  # [L, H, R]
        if ra["from_cls"] is not None:
            out["register_attention_from_cls"] = ra["from_cls"]
    if r.lens_probs is not None:
        out["logit_lens_probs"] = r.lens_probs  # [L, K]
    for name, arr in (importance or {}).items():
        out[f"head_importance_{name}"] = np.asarray(arr)  # [L, H]
    return out


def importance_support(vm: VizModel) -> dict[str, str]:
    """For each head-importance method ("exact", "gradient"): "" when it runs on this model, else why it does not
    (both run on every family the capture supports; the gradient estimate needs a classifier head)."""
    from vizapp.ablation import head_projections, reuses_blocks
    from vizapp.capture import encoder_layers

    why = {"exact": "", "gradient": ""}
    try:
        if reuses_blocks(vm.model):
            head_projections(vm.model)  # the reuse path hooks attn.proj
        else:
            encoder_layers(vm.model)  # the capture path: any family the capture supports
    except Exception as e:  # noqa: BLE001  (any unsupported layout: say why, for both)
        return {"exact": str(e), "gradient": str(e)}
    if not vm.labels:
        why["gradient"] = (
            "the gradient estimate needs a classifier head (without one the score, 1 - cos to the clean "
            "feature, has zero gradient); this model has none"
        )
    return why


def importance_reuses_blocks(vm: VizModel) -> bool:
    """Whether exact head importance re-runs the upper blocks only (timm ViT: H·(L+1)/2 image-forwards) or runs the
    whole model per layer (every other family: L·H image-forwards)."""
    from vizapp.ablation import reuses_blocks

    return reuses_blocks(vm.model)
