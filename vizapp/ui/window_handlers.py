"""The app's events for a windowed-attention (Swin) analysis, a :class:`vizapp.swin_result.WindowAnalysis`.

:mod:`vizapp.ui.handlers` hands an event here when the kept analysis is windowed; each function returns the same
named outputs as the plain ViT's handler, drawn with :mod:`vizapp.views_windows`: per-layer maps at each stage's
token spacing with the query's window outlined (a click on the image picks a token of the first stage's grid, which
:func:`vizapp.views_windows.layer_query` moves onto the chosen layer's grid), rollout and the class maps over the
first stage's grid, the distances with a dot only for the heads a layer has, head importance with an empty cell for
each head a layer lacks (:mod:`vizapp.ui.feature_handlers` runs it, and draws the feature views per layer on its own
grid, and the logit lens of the last stage). Attention flow runs under the request deadline with its progress, as for
a plain ViT. What Swin does not define (CLS-row views, Transformer Attribution, DINO masks, the lens of the earlier
stages) is said in one sentence (:data:`vizapp.swin_result.UNDEFINED`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import gradio as gr
import numpy as np

from vizapp import methods, models, views
from vizapp import views_windows as V
from vizapp.errors import BadParameterError
from vizapp.swin_result import FEATURES, WindowAnalysis
from vizapp.ui import deadline
from vizapp.ui.common import cleared_outputs, compared, kept_state, session_id, write_export
from vizapp.ui.costs import DEFAULT_COMPARE_STEPS, importance_cost_note, limit_note, map_cost_note
from vizapp.ui.outputs import (
    AnalyzeOutputs,
    CompareCostOutputs,
    CompareOutputs,
    ExportOutputs,
    FiguresExportOutputs,
    HeadsOutputs,
    MapOutputs,
    OpenHeadOutputs,
)
from vizapp.ui.validation import as_choice, as_float, as_head_or_mean, as_int

PATCH_QUERY = "Clicked patch"  # the Heads tab's only query for a model without a class token (handlers' own)
GRADIENT_NOTE = "one forward and one backward pass of the model (the analysis keeps no graph)"
OWN_PASS_NOTE = "its own forward and backward pass of the model, with its rules"


def is_windowed(r: Any) -> bool:
    """Whether ``r`` is a windowed-attention analysis (these handlers draw it)."""
    return bool(getattr(r, "windowed", False))


def first_grid_query(r: WindowAnalysis, row: Any, col: Any) -> tuple[int, int]:
    """The query as the page holds it: a token of the first stage's grid (the patches of the image)."""
    gh, gw = r.grid_size
    return as_int(row, "row", 0, gh - 1), as_int(col, "column", 0, gw - 1)


def _layer(r: WindowAnalysis, value: Any, name: str = "layer") -> int:
    return as_int(value, name, -r.num_layers, r.num_layers - 1) % r.num_layers


def _focus(r: WindowAnalysis, layer: int, head: int | None, query: tuple[int, int], opacity: float, cs: str) -> Any:
    """The focus map; a head the chosen layer does not have (its stage has fewer) draws the layer's mean, and the
    title says so."""
    if head is not None and head >= r.heads_per_layer[layer]:
        fig = V.focus_view(r, layer, None, query, opacity, cs)
        fig.update_layout(
            title=f"Layer {layer} has heads 0..{r.heads_per_layer[layer] - 1} only: " + fig.layout.title.text
        )
        return fig
    return V.focus_view(r, layer, head, query, opacity, cs)


def status(vm: models.VizModel, r: WindowAnalysis, startup_note: str, random_note: str, seen: str) -> str:
    """The status line: the model, its stages, grids, windows and heads, and what the tabs draw for it."""
    lines = [startup_note] if startup_note and r.model_name in startup_note else [f"Active model: `{r.model_name}`."]
    if vm.source == "random":
        lines.append(random_note)
    elif vm.note:
        lines.append(vm.note)
    if seen:
        lines.append(seen)
    stages: dict[int, list[int]] = {}
    for i, g in enumerate(r.geometry):
        stages.setdefault(g.stage, []).append(i)
    parts = []
    for s, layers in stages.items():
        g = r.geometry[layers[0]]
        parts.append(
            f"stage {s}: layers {layers[0]}-{layers[-1]}, {g.grid[0]}x{g.grid[1]} tokens {r.strides[layers[0]][0]} px "
            f"apart, {r.heads_per_layer[layers[0]]} heads, windows {g.window[0]}x{g.window[1]}"
        )
    lines.append(
        f"**Windowed attention (Swin)**: {r.num_layers} layers in {len(stages)} stages ({'; '.join(parts)}); every "
        "other layer shifts its windows. No class token: the output averages the last stage's tokens, where rollout "
        "and relevance start. The Heads tab draws each layer at its stage's resolution with the query's window "
        "outlined."
    )
    if r.probs is None:
        lines.append("This model has **no classifier head**: the class maps and Compare are not available.")
    padded = V.padded_tokens_note(r)
    if padded:
        lines.append(padded)
    lines.append(
        "Features tab: "
        + FEATURES
        + " Head importance by ablation is there: one row per layer, as many heads as its stage has."
    )
    lines += [f"Note: {n}" for n in r.notes]
    return "\n\n".join(lines)


def compare_chosen(r: WindowAnalysis, include_slow: Any) -> list[str]:
    """The maps Compare draws: those over the first stage's grid this model offers, the slow ones when asked."""
    return [
        m for m in V.COMPARE_METHODS if m in V.offered_methods(r) and (bool(include_slow) or m not in V.SLOW_METHODS)
    ]


def compare_cost_text(r: WindowAnalysis, steps: int, include_slow: Any = False) -> str:
    """The Compare tab's note: the maps it draws, how many images their curves run, and the slow maps' cost."""
    if r.probs is None:
        return "**Compare** needs class probabilities, and this model has no classifier head: it is not available."
    chosen = compare_chosen(r, include_slow)
    images = 2 * (len(chosen) + 1) * (steps + 1)
    own = [V.LABELS[m] for m in chosen if m in V.MODEL_METHODS]
    text = (
        f"**Compare** runs {images} images through the model at {steps} curve steps (deletion and insertion, "
        f"{steps + 1} images each, for {len(chosen)} maps over the first stage's grid and a random order); gradient "
        f"rollout and relevance take {GRADIENT_NOTE}"
        + (f", and {' and '.join(own)} each take {OWN_PASS_NOTE}" if own else "")
        + "."
    )
    slow = [m for m in chosen if m in V.SLOW_METHODS]
    left_out = [V.LABELS[m] for m in V.SLOW_METHODS if m in V.offered_methods(r) and m not in chosen]
    lines = [text, *(map_cost_note(r, m) for m in slow)]
    if left_out:
        lines.append(f"Left out unless included: {', '.join(left_out)}.")
    if not slow:
        lines.append(limit_note())
    return "\n\n".join(lines)


def analyze_outputs(
    vm: models.VizModel,
    r: WindowAnalysis,
    state: dict[str, Any],
    *,
    fusion: str,
    start: int,
    layer: int,
    opacity: float,
    colorscale: str,
    status_text: str,
    statistic: str = "distance",
) -> AnalyzeOutputs:
    """Every view of a new windowed analysis, and the controls set to this model's layers, grids and methods."""
    query = state["query"]
    lq = V.layer_query(r, layer, query)
    classes = views.class_choices(r)

    def class_update() -> dict[str, Any]:
        return gr.update(choices=classes, value=classes[0] if classes else None)

    offered = V.offered_methods(r)
    gh, gw = r.grid_size
    steps_max = min(64, gh * gw)
    summary = views.rounded(r.summary())
    summary["active_model_note"] = vm.note
    support = views.importance_support(vm)
    return AnalyzeOutputs(
        state=state,
        status=status_text,
        label={lbl: float(p) for lbl, p in r.top_k} if r.top_k else None,
        rollout=V.map_view(r, "rollout", opacity=opacity, colorscale=colorscale, head_fusion=fusion, start_layer=start),
        heads=V.heads_view(r, layer, lq, colorscale=colorscale),
        query_image=views.query_image(r, views.Controls(query=query)),
        distance=V.head_statistic_view(r, statistic),
        statistic=gr.update(value=statistic),
        summary=summary,
        layer=gr.update(maximum=r.num_layers - 1, value=layer),
        start_layer=gr.update(maximum=r.num_layers - 1, value=start),
        focus_head=gr.update(
            choices=[("mean of the layer's heads", -1)] + [(f"head {h}", h) for h in range(r.num_heads)], value=-1
        ),
        class_choice=class_update(),
        start_row=gr.update(visible=False, value="output"),
        query_mode=gr.update(value=PATCH_QUERY, interactive=False),  # no class token; choices fixed (see handlers)
        query_row=gr.update(maximum=gh - 1, value=query[0]),
        query_col=gr.update(maximum=gw - 1, value=query[1]),
        compare_class=class_update(),
        map_cost="",
        compare_cost=compare_cost_text(r, min(DEFAULT_COMPARE_STEPS, gh * gw)),
        feat_layer=gr.update(maximum=r.num_layers - 1, value=layer),
        feat_row=gr.update(maximum=gh - 1, value=gh // 2),
        feat_col=gr.update(maximum=gw - 1, value=gw // 2),
        norm_layer=gr.update(maximum=r.num_layers - 1, value=-1),
        lens_class=lens_class_update(r, classes),
        imp_class=class_update(),
        importance_cost=importance_cost_note(r, state["forward_s"], support, reuse=False),
        seen=views.seen_image(r),
        method=gr.update(choices=[(V.LABELS[m], m) for m in offered], value="rollout"),
        methods_note=V.methods_note(r),
        compare_steps=gr.update(maximum=steps_max, value=min(DEFAULT_COMPARE_STEPS, steps_max)),
        imp_exact_button=gr.update(visible=not support.get("exact")),
        imp_gradient_button=gr.update(visible=not support.get("gradient")),
        focus=_focus(r, layer, None, lq, opacity, colorscale),
        **cleared_outputs(),
    )


def lens_class_update(r: WindowAnalysis, classes: list[str]) -> dict[str, Any]:
    """The logit lens's classes (those worth following first, then every other), or none without a lens."""
    if r.lens_probs is None:
        return gr.update(choices=[], value=None)
    first = views.lens_classes(r)
    return gr.update(choices=first + [c for c in classes if c not in set(first)], value=classes[0] if classes else None)


def render_map(
    r: WindowAnalysis,
    method: Any,
    class_label: Any,
    head_fusion: Any,
    start_layer: Any,
    opacity: Any,
    colorscale: str,
    progress: Any = None,
    request: gr.Request | None = None,
) -> MapOutputs:
    """The Rollout tab's map; a method Swin does not define is refused with its reason. Attention flow runs under
    the request deadline (which Cancel also trips), checked after every max-flow, and reports its progress."""
    if method in V.NOT_OFFERED:
        label, why = V.NOT_OFFERED[method]
        raise BadParameterError(f"{label} is not available for this model: {why}")
    name = as_choice(method, "method", V.offered_methods(r))
    kwargs: dict[str, Any] = {}
    if name in ("rollout", "grad_rollout", "relevance"):
        kwargs["start_layer"] = as_int(start_layer, "start layer", 0, r.num_layers - 1)
    if name == "rollout":  # flow takes the paper's mean over heads, as for a plain ViT (its registry controls)
        kwargs["head_fusion"] = as_choice(head_fusion, "head fusion", views.HEAD_FUSIONS)
    cls = class_label if isinstance(class_label, str) and class_label else None
    alpha = as_float(opacity, "opacity", 0.0, 1.0)
    cost = f"**{V.LABELS[name]}**: {GRADIENT_NOTE}." if name in ("grad_rollout", "relevance") else ""
    if name in (*V.SLOW_METHODS, *V.MODEL_METHODS):  # estimated by the registry; what it means on Swin
        cost = f"{map_cost_note(r, name)}\n\n{methods.get(name).windowed}"
    if name not in V.SLOW_METHODS:
        return MapOutputs(V.map_view(r, name, cls, alpha, colorscale, **kwargs), cost)
    figure = deadline.reporting(
        session_id(request),
        methods.get(name).label,
        lambda report: V.map_view(r, name, cls, alpha, colorscale, progress=report, **kwargs),
        progress,
    )
    return MapOutputs(figure, cost)


def render_heads(
    st: dict[str, Any], row: Any, col: Any, layer: Any, per_head_scale: Any, focus_head: Any, opacity: Any, cs: str
) -> HeadsOutputs:
    """The Heads tab: every head of the layer for the clicked token moved onto the layer's grid, and the focus map
    (one head, or the mean of the layer's heads) at the layer's stage resolution with the query's window outlined."""
    r: WindowAnalysis = st["analysis"]
    query = first_grid_query(r, row, col)
    lay = _layer(r, layer)
    lq = V.layer_query(r, lay, query)
    alpha = as_float(opacity, "opacity", 0.0, 1.0)
    st = {**st, "query": query}
    return HeadsOutputs(
        state=kept_state(st),
        heads=V.heads_view(r, lay, lq, bool(per_head_scale), cs),
        focus=_focus(r, lay, as_head_or_mean(focus_head, r.num_heads), lq, alpha, cs),
        query_image=views.query_image(r, views.Controls(query=query)),
    )


def open_head(r: WindowAnalysis, layer: Any, head: Any) -> OpenHeadOutputs:
    """A click on a dot of the distance plot: that layer, and that head of it (a stage's own head count)."""
    lay = as_int(layer, "layer", 0, r.num_layers - 1)
    hd = as_int(head, "head", 0, r.heads_per_layer[lay] - 1)
    return OpenHeadOutputs(tabs=gr.Tabs(selected="heads"), layer=lay, focus_head=hd)


def compare_methods(
    r: WindowAnalysis, class_label: Any, steps: Any, include_slow: Any, progress: Any, request: gr.Request | None
) -> CompareOutputs:
    """The Compare tab: the maps over the first stage's grid (attention flow when asked), with their deletion /
    insertion curves (:meth:`WindowAnalysis.faithfulness`), under the request deadline and Cancel (checked after each
    max-flow too)."""
    if r.probs is None:
        raise BadParameterError("this model has no classifier head; faithfulness needs a class probability")
    gh, gw = r.grid_size
    n_steps = as_int(steps, "curve steps", 2, gh * gw)
    cls = class_label if isinstance(class_label, str) and class_label else None
    chosen = compare_chosen(r, include_slow)

    def compute(m: str) -> Callable[[deadline.Deadline], np.ndarray]:
        return lambda d: r.explain(m, cls, **({"progress": d.progress(V.LABELS[m])} if m in V.SLOW_METHODS else {}))

    return compared(r, [(V.LABELS[m], compute(m)) for m in chosen], cls, n_steps, progress, request)


def compare_cost(r: WindowAnalysis, steps: Any, include_slow: Any = False) -> CompareCostOutputs:
    n_steps = as_int(steps, "curve steps", 2, 256)
    return CompareCostOutputs(compare_cost_text(r, min(n_steps, r.grid_size[0] * r.grid_size[1]), include_slow))


def export_files(r: WindowAnalysis) -> ExportOutputs:
    """The record as .npz (every layer's window attention and its index, see :meth:`WindowAnalysis.arrays`) and the
    summary as .json."""
    arrays, summary = r.arrays(), json.dumps(r.summary(), indent=1)
    npz = write_export("vizapp_attention.npz", lambda path: np.savez_compressed(path, **arrays))
    js = write_export("vizapp_summary.json", lambda path: path.write_text(summary), npz.parent)
    return ExportOutputs(str(npz), str(js))


def export_figures(st: dict[str, Any], layer: Any, opacity: Any, cs: str, focus_head: Any) -> FiguresExportOutputs:
    """Every figure of the tabs that draw Swin, as HTML pages in one .zip, plus head importance when it was run."""
    r: WindowAnalysis = st["analysis"]
    lay = _layer(r, layer)
    head = as_head_or_mean(focus_head, r.num_heads)
    head = head if head is None or head < r.heads_per_layer[lay] else None
    query = st["query"] if isinstance(st.get("query"), (tuple, list)) else V.default_query(r, 0)
    kept = st.get("importance") if isinstance(st.get("importance"), dict) else {}
    extra = {}
    if kept.get("exact") is not None or kept.get("gradient") is not None:  # [L, max H], NaN: heads a layer lacks
        extra["features-head-importance"] = views.importance_view(
            kept.get("exact"), kept.get("gradient"), kept["score"]
        )[0]
    alpha = as_float(opacity, "opacity", 0.0, 1.0)
    figs = V.tab_figures(r, lay, query, head, alpha, cs, r._model(), extra)
    names: list[str] = []
    out = write_export("vizapp_figures.zip", lambda path: names.extend(views.figures_zip(figs, str(path))))
    return FiguresExportOutputs(
        str(out), f"{len(names)} figures, one HTML page each (open them offline once unzipped)."
    )
