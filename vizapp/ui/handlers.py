"""Event handlers: thin glue between gradio's values and :mod:`vizapp.pipeline`, :mod:`vizapp.views` and
:mod:`vizapp.methods`.

Each person's analysis lives in their own ``gr.State``; changing a view control re-renders from it without another
forward pass. Every failure reaches the person as a ``gr.Error`` they can act on, and the server keeps serving.
Handlers return the named structures of :mod:`vizapp.ui.outputs`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

import gradio as gr
import numpy as np

from vizapp import methods, models, views, views_windows
from vizapp.errors import BadImageError, BadParameterError, VizappError
from vizapp.imageio import decode_image
from vizapp.pipeline import START_ROWS, Analysis
from vizapp.ui import deadline, window_handlers
from vizapp.ui.common import (  # noqa: F401  (export_folder, user_errors: re-exported)
    EXPORT_MAX_AGE_S,
    analysis_state,
    analyze_on_gpu,
    cleared_outputs,
    colormap_choice,
    compared,
    export_folder,
    kept_state,
    patch_at,
    session_id,
    user_errors,
    view_controls,
    write_export,
)
from vizapp.ui.costs import DEFAULT_COMPARE_STEPS, compare_cost_note, importance_cost_note, map_cost_note
from vizapp.ui.outputs import (
    AnalyzeOutputs,
    CancelOutputs,
    CompareCostOutputs,
    CompareOutputs,
    ExportOutputs,
    FiguresExportOutputs,
    HeadsOutputs,
    MapOutputs,
    OpenHeadOutputs,
    PatchOutputs,
    StatisticOutputs,
)
from vizapp.ui.store import ResultStore, default_store
from vizapp.ui.validation import as_choice, as_float, as_head_or_mean, as_int, as_model_id

log = logging.getLogger("vizapp")

PATCH_QUERY = "Clicked patch"
CLS_QUERY = "CLS token"
MAX_CLICK_CHARS = 2000

RANDOM_WEIGHTS_NOTE = (
    "**Architecture only, random weights**: the maps show structure, not learned behaviour (the classes, if any, "
    "mean nothing)."
)


def _load(name: str, trusted: str | None = None, random_weights: bool = False) -> models.VizModel:
    """The model, with its pretrained weights unless ``random_weights`` (the architecture only: no download)."""
    allow = trusted is not None and name == trusted
    if random_weights and name != models.BUNDLED:
        try:
            return models.load_model(name, pretrained=False, allow_files=allow)
        except models.ModelLoadError as e:
            if not name.startswith("hf:"):
                raise
            raise models.ModelLoadError(
                f"{e} — a transformers model's architecture is its config.json, which is on the hub too, so random "
                "weights need it as well; the timm and torchvision entries build offline"
            ) from None
    try:
        return models.load_model(name, allow_files=allow)
    except models.ModelLoadError as e:
        if name == models.BUNDLED or models.weights_available_offline(name):
            raise
        raise models.ModelLoadError(
            f"{e} — its weights are not on this machine and could not be fetched; tick **Random weights** to "
            "explore the architecture without them"
        ) from None


PROMPTS_NOTE = (
    "Its classes are the {n} text prompts (Prediction ranks them; Rollout, Compare and the other class views explain "
    "the prompt chosen as a class)."
)


def prompt_list(text: Any) -> tuple[str, ...]:
    """The prompts box's text as prompts, one a line; the default set when it holds none."""
    from vizapp.models.prompts import DEFAULT_PROMPTS, check_prompts

    if text is None or (isinstance(text, str) and not text.strip()):
        return DEFAULT_PROMPTS
    if not isinstance(text, str):
        raise BadParameterError("prompts must be text, one prompt a line")
    return check_prompts(text)


def _model_name(value: Any, trusted: str | None) -> str:
    """The operator's own model as given (it may be a local file); anything else checked as a visitor's id."""
    return value if (trusted and value == trusted) else as_model_id(value)


def _status(vm: models.VizModel, r: Analysis, startup_note: str, seen: str = "") -> str:
    lines = [startup_note] if startup_note and r.model_name in startup_note else [f"Active model: `{r.model_name}`."]
    if vm.source == "random" and vm.name != models.BUNDLED:
        lines.append(RANDOM_WEIGHTS_NOTE)
    elif vm.note:
        lines.append(vm.note)
    if seen:
        lines.append(seen)
    gh, gw = r.grid_size
    lines.append(
        f"{r.num_layers} layers x {r.num_heads} heads; {r.num_tokens} tokens = {r.num_prefix_tokens} prefix "
        f"(CLS/distillation/registers) + {gh}x{gw} patches of {r.patch_size[0]}x{r.patch_size[1]} px; the output "
        f"reads {r.readout_text}, where rollout, relevance and flow start."
    )
    if r.probs is None:
        lines.append(
            "This model has **no classifier head**: there are no classes, so the class-specific maps (gradient "
            "rollout, GAE relevance), Compare and the logit lens are not available; attention, rollout and the "
            "Features tab's label-free views are."
        )
    lines += [f"Note: {n}" for n in r.notes]
    return "\n\n".join(lines)


def _lens_choices(r: Analysis, classes: list[str]) -> list[str]:
    """The logit lens's classes: those worth following first (the top-5, each layer's top-1), then every other."""
    first = views.lens_classes(r)
    return first + [c for c in classes if c not in set(first)]


def _query_slider(r: Analysis, query: Any, axis: int) -> Any:
    return gr.update(maximum=r.grid_size[axis] - 1, value=0 if isinstance(query, str) else query[axis])


@user_errors
def check_inputs(image: Any, model_name: Any, random_weights: Any = False, *, trusted_model: str | None = None) -> None:
    """What Analyze checks before it runs: the image decodes and the model loads (then cached for the analysis). Wired
    as its own event with no outputs, so a bad upload or an unknown model is said once, in one message, and every
    figure keeps what it showed."""
    if image is None:
        raise BadImageError("no image: upload one, paste one, use the webcam, or pick an example")
    decode_image(image)
    _load(_model_name(model_name, trusted_model), trusted_model, bool(random_weights))


@user_errors
def analyze_image(
    image: Any,
    model_name: Any,
    head_fusion: Any = "mean",
    discard_ratio: Any = 0.0,
    start_layer: Any = 0,
    layer: Any = -1,
    opacity: Any = 0.6,
    per_head_scale: Any = True,
    random_weights: Any = False,
    colormap: Any = None,
    prompts: Any = None,
    statistic: Any = "distance",
    progress: gr.Progress = gr.Progress(),
    request: gr.Request | None = None,
    *,
    startup_note: str = "",
    trusted_model: str | None = None,
    store: ResultStore | None = None,
) -> AnalyzeOutputs:
    """The Analyze button (API name ``/analyze``): one forward pass, every view. ``random_weights``: the
    architecture with random weights (no download), said in the status line. ``prompts``: for a model with a text
    tower (CLIP-like), its classes, one a line (the default set when empty); ignored for other models. ``statistic``:
    the per-head statistic the Attention distance tab shows (a registered one's name; None: the mean distance). The
    analysis is kept in ``store`` (the demo's; :func:`~vizapp.ui.store.default_store` otherwise) for the session,
    and the state holds its key."""
    if image is None:
        raise BadImageError("no image: upload one, paste one, use the webcam, or pick an example")
    name = _model_name(model_name, trusted_model)
    fusion = as_choice(head_fusion, "head fusion", views.HEAD_FUSIONS)
    discard = as_float(discard_ratio, "discard ratio", 0.0, 1.0, hi_inclusive=False)
    alpha = as_float(opacity, "opacity", 0.0, 1.0)
    chosen = as_statistic(statistic)
    decoded = decode_image(image)  # a bad file is refused before any model work
    progress(0.05, desc=f"loading {name}")
    vm = _load(name, trusted_model, bool(random_weights))
    progress(0.3, desc="forward pass and attention")
    started = time.perf_counter()
    prompted = prompt_list(prompts) if vm.text_tower is not None else None
    r = analyze_on_gpu(vm, decoded, prompts=prompted)
    forward_s = time.perf_counter() - started  # the basis of the head-importance estimate
    # The layer sliders still have the previous model's range when a new model is analysed: clamp into this one.
    start = min(as_int(start_layer, "start layer", 0, 63), r.num_layers - 1)
    lay = min(as_int(layer, "layer", -r.num_layers, 63), r.num_layers - 1) % r.num_layers
    state = {
        "result": (default_store() if store is None else store).put(session_id(request), r),
        "query": views.default_query(r),
        "tile": (0, 0),
        "model": name,
        "forward_s": forward_s,
        "feature_query": (r.grid_size[0] // 2, r.grid_size[1] // 2),
    }
    progress(0.8, desc="drawing")
    if window_handlers.is_windowed(r):  # Swin: per-layer grids and windows, its own views
        seen = views.input_sentence(vm, decoded.image, r)
        text = window_handlers.status(vm, r, startup_note, RANDOM_WEIGHTS_NOTE, seen)
        kw = dict(fusion=fusion, start=start, layer=lay, opacity=alpha, colorscale=colormap_choice(colormap))
        return window_handlers.analyze_outputs(vm, r, state, status_text=text, statistic=chosen, **kw)
    c = view_controls(
        state,
        head_fusion=fusion,
        discard_ratio=discard,
        start_layer=start,
        opacity=alpha,
        layer=lay,
        per_head_scale=bool(per_head_scale),
        colorscale=colormap_choice(colormap),
    )
    figs = views.render_all(r, None, c, statistic=chosen)
    summary = views.rounded(r.summary())
    summary["active_model_note"] = vm.note
    classes = views.class_choices(r)

    def class_update() -> dict[str, Any]:  # one dict per dropdown: gradio takes "value" out of the dict it is given
        return gr.update(choices=classes, value=classes[0] if classes else None)

    offered = views.available_methods(r)
    compare_cost = compare_cost_note(r, min(DEFAULT_COMPARE_STEPS, r.grid_size[0] * r.grid_size[1]))
    used = r.model_ref() or vm  # the model with the prompts as its classes, when it has them
    support = views.importance_support(used)
    seen = views.input_sentence(vm, decoded.image, r)
    if prompted is not None:
        seen = " ".join(filter(None, (seen, PROMPTS_NOTE.format(n=len(r.labels)))))
    steps_max = min(64, r.grid_size[0] * r.grid_size[1])
    return AnalyzeOutputs(
        state=state,
        status=_status(vm, r, startup_note, seen),
        label={lbl: float(p) for lbl, p in r.top_k} if r.top_k else None,
        rollout=figs["rollout"],
        heads=figs["heads"],
        query_image=figs["query_image"],
        distance=figs["distance"],
        statistic=gr.update(value=chosen),
        summary=summary,
        layer=gr.update(maximum=r.num_layers - 1, value=lay),
        start_layer=gr.update(maximum=r.num_layers - 1, value=start),
        focus_head=gr.update(
            choices=[("mean of the layer's heads", -1)] + [(f"head {h}", h) for h in range(r.num_heads)], value=-1
        ),
        class_choice=class_update(),
        start_row=gr.update(visible=r.readout != "cls" and r.has_class_token, value="output"),
        # the choices never change: a choice removed while an event in flight still carries it fails gradio's
        # check of the value in the browser; without a class token the radio is fixed on the clicked patch
        query_mode=gr.update(
            value=CLS_QUERY if r.has_class_token else PATCH_QUERY, interactive=bool(r.has_class_token)
        ),
        query_row=_query_slider(r, state["query"], 0),
        query_col=_query_slider(r, state["query"], 1),
        compare_class=class_update(),
        map_cost=map_cost_note(r, "rollout"),
        compare_cost=compare_cost,
        feat_layer=gr.update(maximum=r.num_layers - 1, value=min(lay, r.num_layers - 1)),
        feat_row=gr.update(maximum=r.grid_size[0] - 1, value=state["feature_query"][0]),
        feat_col=gr.update(maximum=r.grid_size[1] - 1, value=state["feature_query"][1]),
        norm_layer=gr.update(maximum=r.num_layers - 1, value=-1),
        lens_class=gr.update(
            choices=_lens_choices(r, classes) if r.lens_probs is not None else [],
            value=classes[0] if classes and r.lens_probs is not None else None,
        ),
        imp_class=class_update(),
        importance_cost=importance_cost_note(r, forward_s, support, reuse=views.importance_reuses_blocks(used)),
        seen=views.seen_image(r),
        method=gr.update(
            choices=[(methods.METHODS[n].label, n) for n in offered], value="rollout" if "rollout" in offered else None
        ),
        methods_note=views.methods_note(r),
        compare_steps=gr.update(maximum=steps_max, value=min(DEFAULT_COMPARE_STEPS, steps_max)),
        imp_exact_button=gr.update(visible=not support.get("exact")),
        imp_gradient_button=gr.update(visible=not support.get("gradient")),
        focus=figs["focus"],
        **cleared_outputs(),
    )


@user_errors
def render_map(
    state: Any,
    method: Any,
    class_label: Any,
    head_fusion: Any,
    discard_ratio: Any,
    start_layer: Any,
    opacity: Any,
    start_row: Any = "output",
    colormap: Any = None,
    progress: gr.Progress = gr.Progress(),
    request: gr.Request | None = None,
) -> MapOutputs:
    """Rollout tab: re-render from the cached analysis (class-specific methods run one backward pass). ``start_row``:
    start the maps carried down from the output at the tokens it reads ("output") or at the CLS token ("cls").

    Slow methods run under a deadline (VIZAPP_REQUEST_SECONDS) that Cancel can also trip, checked at every step.
    Returns the map and the method's cost note.
    """
    st = analysis_state(state, request)
    r: Analysis = st["analysis"]
    if window_handlers.is_windowed(r):  # its own maps; the discard ratio and the CLS row do not apply
        cs = colormap_choice(colormap)
        return window_handlers.render_map(
            r, method, class_label, head_fusion, start_layer, opacity, cs, progress, request
        )
    m = methods.get(method)
    why = views.method_unavailable(r, m.name)
    if why:
        raise BadParameterError(f"{m.label} is not available for this model: {why}")
    c = view_controls(
        st,
        head_fusion=as_choice(head_fusion, "head fusion", views.HEAD_FUSIONS),
        discard_ratio=as_float(discard_ratio, "discard ratio", 0.0, 1.0, hi_inclusive=False),
        start_layer=as_int(start_layer, "start layer", 0, r.num_layers - 1),
        opacity=as_float(opacity, "opacity", 0.0, 1.0),
        start_row=as_choice(start_row or "output", "start row", START_ROWS),
        colorscale=colormap_choice(colormap),
    )
    cost = map_cost_note(r, m.name)
    if not m.slow:
        return MapOutputs(views.map_view(r, c, m.name, class_label), cost)
    figure = deadline.reporting(
        session_id(request),
        m.label,
        lambda report: views.map_view(r, c, m.name, class_label, progress=report),
        progress,
    )
    return MapOutputs(figure, cost)


@user_errors
def render_heads(
    state: Any,
    layer: Any,
    query_mode: Any,
    row: Any,
    col: Any,
    per_head_scale: Any,
    focus_head: Any,
    opacity: Any,
    colormap: Any = None,
    request: gr.Request | None = None,
) -> HeadsOutputs:
    """Heads tab: every head of a layer for the chosen query; no forward pass."""
    st = analysis_state(state, request)
    r: Analysis = st["analysis"]
    mode = as_choice(query_mode, "query", (CLS_QUERY, PATCH_QUERY))
    if window_handlers.is_windowed(r):  # no class token: always the clicked token
        cs = colormap_choice(colormap)
        return window_handlers.render_heads(st, row, col, layer, per_head_scale, focus_head, opacity, cs)
    if mode == CLS_QUERY and r.has_class_token:
        st = {**st, "query": "cls"}
    else:
        st = {**st, "query": (as_int(row, "row", 0, r.grid_size[0] - 1), as_int(col, "column", 0, r.grid_size[1] - 1))}
    focus = as_head_or_mean(focus_head, r.num_heads)
    lay = as_int(layer, "layer", -r.num_layers, r.num_layers - 1) % r.num_layers
    c = view_controls(
        st,
        layer=lay,
        per_head_scale=bool(per_head_scale),
        focus_head=focus,
        opacity=as_float(opacity, "opacity", 0.0, 1.0),
        colorscale=colormap_choice(colormap),
    )
    return HeadsOutputs(
        state=kept_state(st),
        heads=views.heads_view(r, c),
        focus=views.focus_view(r, c),
        query_image=views.query_image(r, c),
    )


@user_errors
def select_patch(state: Any, evt: gr.SelectData, request: gr.Request | None = None) -> PatchOutputs:
    """Clicking the image makes that patch the query (returns the radio/row/col values; rendering follows)."""
    return PatchOutputs(PATCH_QUERY, *patch_at(state, evt, request))


def _parse_click(payload: Any, n: int) -> list[int]:
    try:
        data = json.loads(payload) if isinstance(payload, str) and len(payload) < MAX_CLICK_CHARS else None
        vals = [int(v) for v in data["customdata"][:n]]
    except (ValueError, TypeError, KeyError, json.JSONDecodeError):
        raise BadParameterError("could not read that click; use the selectors instead") from None
    if len(vals) < n:
        raise BadParameterError("could not read that click; use the selectors instead")
    return vals


def as_statistic(value: Any) -> str:
    """The name of a registered per-head statistic (the Attention distance tab's choice); None or "" is the mean
    distance."""
    if value is None or value == "":
        return "distance"
    return as_choice(value, "per-head statistic", [name for _, name in views.statistic_choices()])


@user_errors
def render_statistic(state: Any, statistic: Any, request: gr.Request | None = None) -> StatisticOutputs:
    """The Attention distance tab's choice of per-head statistic (mean distance, entropy, any registered one)."""
    name = as_statistic(statistic)
    r = analysis_state(state, request)["analysis"]
    if window_handlers.is_windowed(r):
        return StatisticOutputs(views_windows.head_statistic_view(r, name))
    return StatisticOutputs(views.head_statistic_view(r, name))


@user_errors
def open_head(state: Any, payload: Any, request: gr.Request | None = None) -> OpenHeadOutputs:
    """A click on a dot of the distance plot: show that layer and head in the Heads tab."""
    st = analysis_state(state, request)
    r: Analysis = st["analysis"]
    layer, head = _parse_click(payload, 2)
    if window_handlers.is_windowed(r):  # each stage has its own head count
        return window_handlers.open_head(r, layer, head)
    return OpenHeadOutputs(
        tabs=gr.Tabs(selected="heads"),
        layer=as_int(layer, "layer", 0, r.num_layers - 1),
        focus_head=as_int(head, "head", 0, r.num_heads - 1),
    )


@user_errors
def compare_methods(
    state: Any,
    class_label: Any,
    steps: Any,
    include_slow: Any,
    progress: gr.Progress = gr.Progress(),
    request: gr.Request | None = None,
) -> CompareOutputs:
    """Compare tab: every map for one class, with deletion/insertion AUCs (lower deletion, higher insertion = better).

    Runs under a deadline (VIZAPP_REQUEST_SECONDS) that Cancel can also trip, checked between methods, between each
    map's curves, and at every step of a method that reports progress.
    """
    st = analysis_state(state, request)
    r: Analysis = st["analysis"]
    if window_handlers.is_windowed(r):
        return window_handlers.compare_methods(r, class_label, steps, include_slow, progress, request)
    if r.probs is None:
        raise BadParameterError("this model has no classifier head; faithfulness needs a class probability")
    n_steps = as_int(steps, "curve steps", 2, r.grid_size[0] * r.grid_size[1])  # at most one patch a step
    cls = class_label if class_label else None
    offered = [methods.METHODS[n] for n in views.available_methods(r)]
    chosen = [m for m in offered if not m.slow or bool(include_slow)]

    def compute(m: methods.Method) -> Callable[[deadline.Deadline], np.ndarray]:
        return lambda d: methods.explain(
            r, m.name, cls, **({"progress": d.progress(m.label)} if m.reports_progress else {})
        )

    return compared(r, [(m.label, compute(m)) for m in chosen], cls, n_steps, progress, request)


@user_errors
def export_files(state: Any, request: gr.Request | None = None) -> ExportOutputs:
    """The analysis as .npz (attention tensors) and .json (summary), in a fresh private temp folder."""
    st = analysis_state(state, request)
    r: Analysis = st["analysis"]
    if window_handlers.is_windowed(r):
        return window_handlers.export_files(r)
    arrays, summary = r.arrays(), json.dumps(r.summary(), indent=1)
    npz = write_export("vizapp_attention.npz", lambda path: np.savez_compressed(path, **arrays))
    js = write_export("vizapp_summary.json", lambda path: path.write_text(summary), npz.parent)
    return ExportOutputs(str(npz), str(js))


@user_errors
def compare_cost(state: Any, steps: Any, include_slow: Any, request: gr.Request | None = None) -> CompareCostOutputs:
    """The Compare tab's cost note, redrawn when its controls change (nothing runs; none without an analysis)."""
    try:
        r: Analysis = analysis_state(state, request)["analysis"]
    except VizappError:
        return CompareCostOutputs("")
    if window_handlers.is_windowed(r):
        return window_handlers.compare_cost(r, steps, include_slow)
    n_steps = as_int(steps, "curve steps", 2, 256)
    return CompareCostOutputs(compare_cost_note(r, min(n_steps, r.grid_size[0] * r.grid_size[1]), bool(include_slow)))


@user_errors
def export_figures(
    state: Any, layer: Any, opacity: Any, colormap: Any, focus_head: Any = -1, request: gr.Request | None = None
) -> FiguresExportOutputs:
    """Every figure of every tab for this analysis, as interactive HTML pages in one .zip (names start with the
    tab's: rollout-, heads-, distance-, position-, features-), plus head importance when it was run."""
    st = analysis_state(state, request)
    r: Analysis = st["analysis"]
    if window_handlers.is_windowed(r):
        return window_handlers.export_figures(st, layer, opacity, colormap_choice(colormap), focus_head)
    focus = as_head_or_mean(focus_head, r.num_heads)
    c = view_controls(
        st,
        layer=as_int(layer, "layer", -r.num_layers, r.num_layers - 1) % r.num_layers,
        opacity=as_float(opacity, "opacity", 0.0, 1.0),
        colorscale=colormap_choice(colormap),
        focus_head=focus,
    )
    extra = {}
    kept = st.get("importance") if isinstance(st.get("importance"), dict) else {}
    if kept.get("exact") is not None or kept.get("gradient") is not None:
        extra["features-head-importance"] = views.importance_view(
            kept.get("exact"), kept.get("gradient"), kept["score"]
        )[0]
    vm = r._model()  # the network the analysis came from (its position figures), or StaleResultError
    figs = views.tab_figures(r, c, vm, extra)
    names: list[str] = []
    out = write_export("vizapp_figures.zip", lambda path: names.extend(views.figures_zip(figs, str(path))))
    return FiguresExportOutputs(
        str(out), f"{len(names)} figures, one HTML page each (open them offline once unzipped)."
    )


def cancel_running(request: gr.Request | None = None) -> CancelOutputs:
    """The Cancel button: every long operation of this person's session stops at its next check, and the page says
    so."""
    n = deadline.cancel(session_id(request))
    log.info("cancel: %d running operation(s) flagged", n)
    when = time.strftime("%H:%M:%S")
    if n:
        return CancelOutputs(f"{when}: cancelled {n} running operation(s); they stop at their next step.")
    return CancelOutputs(f"{when}: nothing was running to cancel.")


def end_session(request: gr.Request | None = None, *, store: ResultStore | None = None) -> None:
    """gradio's unload (the page's connection closed): the session's kept results go."""
    n = (default_store() if store is None else store).drop_session(session_id(request))
    log.info("session ended: %d kept result(s) freed", n)


# The Features tab's handlers live in their own module; named here too, where the layout and the API find them.
from vizapp.ui.feature_handlers import (  # noqa: E402, F401
    NO_CLS_MASK_NOTE,
    NO_HEAD_NOTE,
    analyze_second_image,
    example_images,
    export_features,
    pca_across_examples,
    render_features,
    run_importance,
    select_feature_patch,
)

# The Position tab's handlers likewise (they load the model through this module's _load).
from vizapp.ui.pos_handlers import open_tile, render_pos, render_pos_quietly  # noqa: E402, F401
