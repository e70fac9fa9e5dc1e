"""The page: one small function per tab builds its components, and one per tab wires its events.

Components are kept as attributes of a :class:`Components` namespace, named like the fields of the output
structures in :mod:`vizapp.ui.outputs`, so every event's outputs come from :func:`vizapp.ui.outputs.components`.
"""

from __future__ import annotations

import functools
from typing import Any

import gradio as gr

from vizapp import budget, methods, models, views
from vizapp.models.prompts import DEFAULT_PROMPTS
from vizapp.ui import handlers
from vizapp.ui.costs import DEFAULT_COMPARE_STEPS
from vizapp.ui.deadline import stops_when_cancelled
from vizapp.ui.handlers import CLS_QUERY, PATCH_QUERY
from vizapp.ui.layout_features import features_tab, wire_features
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
    PosOutputs,
    StatisticOutputs,
    TileOutputs,
    components,
)
from vizapp.ui.startup import choose_startup_model, model_choices, trusted_startup_model
from vizapp.ui.store import ResultStore
from vizapp.ui.upload import UploadedImage
from vizapp.ui.wiring import (
    MODEL_WORK,
    PAIR,
    RERENDER,
    Components,
    bind,
    event,
    on_input,
    patch_picker,
    redraw,
    supersedes_redraws,
)

EXAMPLES_DIR = models.ASSETS_DIR / "examples"
TITLE = "vizapp: inside a Vision Transformer"
INTRO = (
    "# vizapp — see inside a Vision Transformer\n"
    "Upload an image and press **Analyze**: per-head attention of every layer (for CLS or any patch you "
    "click), attention rollout, mean attention distance, the position scheme (learned embeddings, RoPE or relative "
    "bias), class-specific explanations with a faithfulness score for each map, and label-free feature views."
)

CSS = """
.vizapp-hidden { display: none !important; }
#vizapp-query-image img { image-rendering: pixelated; cursor: crosshair; }
/* the upload fills its box: a 28x28 image would show at 28 px; pixelated applies to upscaling only */
#vizapp-image img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }
/* the compared maps, three to a row, at least 240 px each: in a narrower column (a half-screen window) they scroll
   sideways rather than shrink until their titles run into each other */
#vizapp-compare-plot { overflow-x: auto; }
#vizapp-compare-plot .js-plotly-plot { min-width: 760px; }
/* gradio lets a checkbox in a row shrink to nothing (its min_width is not applied): in a half-screen window this one's
   label was cut to "Inclu / atten / flow"; at 160 px, like its neighbours, the row wraps it onto a line of its own
   (over the inline style gradio sets) */
#vizapp-compare-slow { min-width: min(160px, 100%) !important; }
"""

# Plotly click -> hidden textbox bridge: gr.Plot has no click event, so the page forwards plotly_click on the
# distance, position-embedding and head-importance plots into hidden textboxes whose `input` events reach Python.
JS = """
() => {
  window.__vizappBridge = true;
  const bind = () => {
    for (const [plotId, boxId] of [["vizapp-distance-plot", "vizapp-distance-click"],
                                   ["vizapp-pos-plot", "vizapp-pos-click"],
                                   ["vizapp-importance-plot", "vizapp-importance-click"]]) {
      const root = document.getElementById(plotId);
      const gd = root && root.querySelector(".js-plotly-plot");
      if (!gd || !gd.on || gd.__vizappBound) continue;
      gd.__vizappBound = true;
      gd.on("plotly_click", (ev) => {
        const p = ev.points && ev.points[0];
        const box = document.querySelector(`#${boxId} textarea, #${boxId} input`);
        if (!p || !box) return;
        let data = p.customdata;
        const grid = gd.layout && gd.layout.meta && gd.layout.meta.tile_grid;
        if (data === undefined && grid && p.x !== undefined && p.y !== undefined) {
          // the big-grid mosaic is an image: pixel (x, y) lies in tile (y / (gh + 1), x / (gw + 1)); 255 = a gap
          const [gh, gw] = grid, x = Math.round(Number(p.x)), y = Math.round(Number(p.y));
          const gap = (y % (gh + 1)) === gh || (x % (gw + 1)) === gw;
          data = gap ? [255, 255] : [Math.floor(y / (gh + 1)), Math.floor(x / (gw + 1))];
        }
        if (data === undefined) return;
        box.value = JSON.stringify({customdata: Array.from(data, Number), t: Date.now()});
        box.dispatchEvent(new Event("input", {bubbles: true}));
      });
    }
  };
  setInterval(bind, 700);
}
"""


def _example_images() -> list[str]:
    return sorted(str(p) for p in EXAMPLES_DIR.glob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))


def _input_column(ui: Components, startup: str, trusted: str | None) -> None:
    ui.image = UploadedImage(
        label="Image",
        type="filepath",
        image_mode=None,
        sources=["upload", "clipboard", "webcam"],
        height=300,
        elem_id="vizapp-image",
    )
    ui.model = gr.Dropdown(
        model_choices(trusted),
        value=startup,
        label="Model",
        allow_custom_value=True,
        info="[cached]/[offline] work without a network; any timm ViT name, hf:owner/repo, torchvision:vit_b_16 or "
        "open_clip:ViT-B-32/laion2b_s34b_b79k works",
    )
    ui.prompts = gr.Textbox(
        "\n".join(DEFAULT_PROMPTS),
        lines=4,
        max_lines=12,
        label="Text prompts, one a line (the classes of a CLIP-like model)",
        info="A model with a text tower (OpenCLIP, CLIP, SigLIP) ranks these prompts and explains the one you choose",
        visible=False,
        elem_id="vizapp-prompts",
    )
    ui.random_weights = gr.Checkbox(
        value=False,
        label="Random weights (architecture only: no download; the maps show structure, not learned behaviour)",
    )
    ui.analyze_button = gr.Button("Analyze", variant="primary")
    ui.cancel_button = gr.Button("Cancel", variant="stop", elem_id="vizapp-cancel")
    ui.cancel_note = gr.Markdown("", elem_id="vizapp-cancel-note")
    ui.colormap = gr.Dropdown(
        list(views.COLOR_SCALES), value=views.COLOR_SCALES[0], label="Colour map (attention and explanation maps)"
    )
    ui.figures_button = gr.Button("Download every figure (.zip of HTML pages)")
    ui.figures_zip = gr.File(label="figures (.zip)", elem_id="vizapp-figures-zip", height=90)
    ui.figures_note = gr.Markdown("", elem_id="vizapp-figures-note")
    examples = _example_images()
    ui.examples = None
    if examples:
        ui.examples = gr.Examples(
            examples=[[p] for p in examples],
            inputs=[ui.image],
            label="Examples (click one to analyse it)",
            examples_per_page=12,
        )


def _prediction_tab(ui: Components) -> None:
    with gr.Row():
        ui.label = gr.Label(label="Top-5 (or every text prompt, best first)")
        ui.seen = gr.Image(
            label="What the model saw (its preprocessed input)",
            interactive=False,
            height=260,
            format="png",
            elem_id="vizapp-seen-image",
        )
    ui.summary = gr.JSON(label="Summary", open=False)
    with gr.Row():
        ui.export_button = gr.Button("Export .npz + .json")
        ui.npz_file = gr.File(label="attention tensors (.npz)", height=90)
        ui.json_file = gr.File(label="summary (.json)", height=90)


def _rollout_tab(ui: Components) -> None:
    with gr.Row():
        first = next(iter(methods.METHODS))
        ui.method = gr.Dropdown([(m.label, m.name) for m in methods.METHODS.values()], value=first, label="Method")
        ui.class_choice = gr.Dropdown(
            [], label="Class to explain (gradient methods; type to search)", allow_custom_value=False, filterable=True
        )
        ui.opacity = gr.Slider(0, 1, value=0.6, step=0.05, label="Opacity")
    with gr.Row():
        ui.head_fusion = gr.Radio(list(views.HEAD_FUSIONS), value="mean", label="Head fusion")
        ui.discard_ratio = gr.Slider(0, 0.95, value=0.0, step=0.05, label="Discard ratio")
        ui.start_layer = gr.Slider(0, 11, value=0, step=1, label="Start layer")
        ui.start_row = gr.Radio(
            [("the tokens the output reads", "output"), ("the CLS token", "cls")],
            value="output",
            label="Start from (rollout, relevance, flow)",
            visible=False,
        )
    ui.methods_note = gr.Markdown("", elem_id="vizapp-methods-note")
    ui.rollout = gr.Plot(label="Map over the image", elem_id="vizapp-rollout-plot")
    ui.map_cost = gr.Markdown("", elem_id="vizapp-map-cost")


def _heads_tab(ui: Components) -> None:
    with gr.Row():
        with gr.Column(scale=1, min_width=240):
            ui.query_image = patch_picker("Click a patch to make it the query", "vizapp-query-image", 340)
            ui.query_mode = gr.Radio([CLS_QUERY, PATCH_QUERY], value=CLS_QUERY, label="Query")
            with gr.Row():
                ui.query_row = gr.Slider(0, 13, value=0, step=1, label="Patch row")
                ui.query_col = gr.Slider(0, 13, value=0, step=1, label="Patch column")
            ui.layer = gr.Slider(-1, 11, value=-1, step=1, label="Layer (-1 = last)")
            ui.focus_head = gr.Dropdown(
                [("mean of the layer's heads", -1)], value=-1, label="Overlay on the image (below the mosaic)"
            )
            ui.per_head = gr.Checkbox(
                value=True, label="Rescale each head to its own min-max (hover shows raw weights)"
            )
        with gr.Column(scale=2):
            ui.heads = gr.Plot(label="Heads", elem_id="vizapp-heads-plot")
            ui.focus = gr.Plot(label="Enlarged head", elem_id="vizapp-focus-plot")


def _distance_tab(ui: Components) -> None:
    ui.statistic = gr.Dropdown(
        views.statistic_choices(),
        value="distance",
        label="Per-head statistic",
        info="each one registered in vizapp.statistics; every analysis computes them all",
        elem_id="vizapp-statistic",
    )
    ui.distance = gr.Plot(label="Per-head statistic", elem_id="vizapp-distance-plot")
    gr.Markdown(
        "Each dot is one head of one layer; the dashed line, where there is one, is the value of uniform attention "
        "(over the grid for the distance, over every token for the entropy). "
        "Click a dot to open that head in the Heads tab."
    )
    ui.distance_click = gr.Textbox(visible="hidden", elem_id="vizapp-distance-click")


def _pos_tab(ui: Components) -> None:
    ui.pos_note = gr.Markdown("", elem_id="vizapp-pos-note")
    with gr.Row():
        ui.resolution = gr.Dropdown(
            [("the model's own", 0)] + [(f"{n} x {n} (interpolated)", n) for n in range(2, 33)],
            value=0,
            label="Preview grid (learned table)",
            elem_id="vizapp-pos-resolution",
        )
        ui.tile_row = gr.Slider(0, 13, value=0, step=1, label="Tile row")
        ui.tile_col = gr.Slider(0, 13, value=0, step=1, label="Tile column")
    with gr.Row():
        ui.pos_show = gr.Radio(
            list(views.POS_SHOWS), value=views.POS_SHOWS[0], label="View (the model has both)", visible=False
        )
        ui.pos_layer = gr.Slider(0, 63, value=0, step=1, label="Position layer", visible=False)
        ui.pos_head = gr.Slider(0, 63, value=0, step=1, label="Position head (mixed RoPE)", visible=False)
    with gr.Row():
        ui.pos = gr.Plot(label="Position structure (the title says which view)", elem_id="vizapp-pos-plot", **PAIR)
        ui.tile = gr.Plot(label="Enlarged tile", elem_id="vizapp-tile-plot", **PAIR)
    ui.pos_click = gr.Textbox(visible="hidden", elem_id="vizapp-pos-click")


def _compare_tab(ui: Components) -> None:
    slow = ", ".join(m.label.lower() for m in methods.METHODS.values() if m.slow)
    with gr.Row():
        ui.compare_class = gr.Dropdown([], label="Class to explain (type to search)", filterable=True)
        ui.compare_steps = gr.Slider(
            2, 64, value=DEFAULT_COMPARE_STEPS, step=1, label="Curve steps (at most one patch a step)"
        )
        ui.compare_slow = gr.Checkbox(
            value=False, label=f"Include {slow} (slow on big models)", elem_id="vizapp-compare-slow"
        )
        ui.compare_button = gr.Button("Compare methods", variant="primary")
    gr.Markdown(
        "The curves here are vizapp's own deletion / insertion on this one image: whole patches are removed (or "
        "inserted) in the map's order and the class probability is followed; the AUC is over the fraction of "
        "patches. They are not the published perturbation test (Chefer et al. 2021: pixels removed, top-1 accuracy "
        "over a data set), which `python -m vizapp.evaluate --protocol chefer2021` runs; do not compare these AUCs "
        "with its numbers."
    )
    ui.compare_cost = gr.Markdown("", elem_id="vizapp-compare-cost")
    ui.compare = gr.Plot(label="Maps", elem_id="vizapp-compare-plot")
    with gr.Row():
        ui.deletion = gr.Plot(label="Deletion", elem_id="vizapp-deletion-plot", **PAIR)
        ui.insertion = gr.Plot(label="Insertion", elem_id="vizapp-insertion-plot", **PAIR)
    ui.auc_table = gr.Dataframe(
        headers=["method", "deletion AUC (lower better)", "insertion AUC (higher better)"],
        label="Faithfulness",
        elem_id="vizapp-auc-table",
    )


def _page(ui: Components, startup: str, startup_note: str, trusted: str | None, store: ResultStore) -> None:
    gr.Markdown(INTRO)
    # The state holds a key into the results store, never an analysis; an expired state (gradio keeps a closed
    # session's for an hour) releases its result, if the unload had not already.
    ui.state = gr.State(None, delete_callback=lambda value: store.release((value or {}).get("result")))
    with gr.Row():
        with gr.Column(scale=1, min_width=300):
            _input_column(ui, startup, trusted)
        with gr.Column(scale=3):
            ui.status = gr.Markdown(startup_note, elem_id="vizapp-status")
            with gr.Tabs() as ui.tabs:
                for tab_id, name, build in [
                    ("prediction", "Prediction", _prediction_tab),
                    ("rollout", "Rollout", _rollout_tab),
                    ("heads", "Heads", _heads_tab),
                    ("distance", "Attention distance", _distance_tab),
                    ("pos", "Position embeddings", _pos_tab),
                    ("compare", "Compare", _compare_tab),
                    ("features", "Features", features_tab),
                ]:
                    with gr.Tab(name, id=tab_id):
                        build(ui)


def _wire_analyze(ui: Components, startup_note: str, trusted: str | None, store: ResultStore) -> list[Any]:
    """The Analyze button and a click on an example: a quick check of the image and the model (an event with no
    outputs, so a failure there is said once and every figure keeps what it showed), then the analysis."""

    # The operator's start-up note and own model (which may be a local file) are bound; the rest come from the page.
    check = functools.partial(handlers.check_inputs, trusted_model=trusted)
    analyze = supersedes_redraws(
        bind(handlers.analyze_image, startup_note=startup_note, trusted_model=trusted, store=store)
    )

    inputs = [
        ui.image,
        ui.model,
        ui.head_fusion,
        ui.discard_ratio,
        ui.start_layer,
        ui.layer,
        ui.opacity,
        ui.per_head,
        ui.random_weights,
        ui.colormap,
        ui.prompts,
        ui.statistic,
    ]
    outputs = components(AnalyzeOutputs, ui)
    checked = [
        ui.analyze_button.click(
            check, inputs=[ui.image, ui.model, ui.random_weights], api_visibility="private", **MODEL_WORK
        )
    ]
    if ui.examples is not None:  # a click on an example puts it in the image box, then analyses it
        checked.append(
            ui.examples.load_input_event.success(
                check, inputs=[ui.image, ui.model, ui.random_weights], api_visibility="private", **MODEL_WORK
            )
        )
    events = [checked[0].success(analyze, inputs=inputs, outputs=outputs, api_name="analyze", **MODEL_WORK)]
    events += [
        c.success(analyze, inputs=inputs, outputs=outputs, api_visibility="private", **MODEL_WORK) for c in checked[1:]
    ]
    return events


def _wire_rollout(ui: Components) -> list[Any]:
    inputs = [
        ui.state,
        ui.method,
        ui.class_choice,
        ui.head_fusion,
        ui.discard_ratio,
        ui.start_layer,
        ui.opacity,
        ui.start_row,
        ui.colormap,
    ]
    controls = inputs[1:]  # every input but the state redraws the map
    outputs = components(MapOutputs, ui)
    # a map may run a backward or max-flows: model work, stopped when the event is cancelled
    render = redraw(stops_when_cancelled(handlers.render_map), MapOutputs)
    return [on_input(controls, render, inputs=inputs, outputs=outputs, **RERENDER, **MODEL_WORK).event]


def _wire_heads(ui: Components) -> None:
    inputs = [
        ui.state,
        ui.layer,
        ui.query_mode,
        ui.query_row,
        ui.query_col,
        ui.per_head,
        ui.focus_head,
        ui.opacity,
        ui.colormap,
    ]
    # kept on the page's namespace: a click on the Features tab's head importance opens a head too
    ui.heads_redraw = on_input(
        [ui.layer, ui.query_mode, ui.query_row, ui.query_col, ui.per_head, ui.focus_head, ui.colormap],
        redraw(handlers.render_heads, HeadsOutputs),
        inputs=inputs,
        outputs=components(HeadsOutputs, ui),
        **RERENDER,
    )
    ui.heads_redraw.after(
        ui.query_image.select(
            handlers.select_patch, inputs=[ui.state], outputs=components(PatchOutputs, ui), api_visibility="private"
        )
    )
    on_input(
        [ui.statistic],
        redraw(event(handlers.render_statistic), StatisticOutputs),
        inputs=[ui.state, ui.statistic],
        outputs=components(StatisticOutputs, ui),
        **RERENDER,
    )
    ui.heads_redraw.after(
        ui.distance_click.change(
            handlers.open_head,
            inputs=[ui.state, ui.distance_click],
            outputs=components(OpenHeadOutputs, ui),
            api_visibility="private",
        )
    )


def _wire_pos(ui: Components, demo: gr.Blocks, trusted: str | None) -> None:
    # The operator's own model is trusted (it may be a local file): both events pass that on to the handler.
    render_pos = bind(handlers.render_pos, trusted_model=trusted)  # bind, not partial: gradio then sees the request
    pick_model = functools.partial(handlers.render_pos_quietly, trusted_model=trusted)

    inputs = [
        ui.model,
        ui.resolution,
        ui.tile_row,
        ui.tile_col,
        ui.pos_layer,
        ui.pos_head,
        ui.pos_show,
        ui.random_weights,
    ]
    outputs = components(PosOutputs, ui)
    controls = [ui.resolution, ui.tile_row, ui.tile_col, ui.pos_layer, ui.pos_head, ui.pos_show]
    redraw_pos = on_input(controls, render_pos, inputs=inputs, outputs=outputs, **RERENDER)
    ui.model.change(pick_model, inputs=inputs, outputs=outputs, api_name="position_embeddings")
    ui.random_weights.change(pick_model, inputs=inputs, outputs=outputs, **RERENDER)
    demo.load(pick_model, inputs=inputs, outputs=outputs, api_visibility="private")
    redraw_pos.after(
        ui.pos_click.change(
            handlers.open_tile,
            inputs=[ui.state, ui.pos_click],
            outputs=components(TileOutputs, ui),
            api_visibility="private",
        )
    )


def _wire_compare(ui: Components, analyze: list[Any]) -> Any:
    cost = on_input(
        [ui.compare_steps, ui.compare_slow],
        redraw(event(handlers.compare_cost), CompareCostOutputs),
        inputs=[ui.state, ui.compare_steps, ui.compare_slow],
        outputs=components(CompareCostOutputs, ui),
        **RERENDER,
    )
    for done in analyze:  # an analysis resets the steps, not the slow methods' box: the note says both
        cost.after(done)
    return ui.compare_button.click(
        stops_when_cancelled(handlers.compare_methods),
        inputs=[ui.state, ui.compare_class, ui.compare_steps, ui.compare_slow],
        outputs=components(CompareOutputs, ui),
        api_name="compare",
        **MODEL_WORK,
    )


def _wire_export(ui: Components) -> list[Any]:
    """The two downloads of the analysis; their events are returned, for a new image to stop."""
    files = ui.export_button.click(
        handlers.export_files, inputs=[ui.state], outputs=components(ExportOutputs, ui), api_visibility="undocumented"
    )
    figures = ui.figures_button.click(
        handlers.export_figures,
        inputs=[ui.state, ui.layer, ui.opacity, ui.colormap, ui.focus_head],
        outputs=components(FiguresExportOutputs, ui),
        api_visibility="undocumented",
        **MODEL_WORK,
    )
    return [files, figures]


def _wire_new_image(ui: Components, old_work: list[Any]) -> None:
    """Analyze (the button, or a click on an example) stops the long operations still running on the last image
    (Compare, PCA across examples, head importance, a slow map, an export): gradio stops waiting for them, and their
    deadlines stop the work at its next check. The new analysis replaces the result they read, and clears what they
    would draw; left running, they answered later with the last image's curves or files, or an error that the result
    was replaced."""
    ui.analyze_button.click(None, cancels=old_work, queue=False)
    if ui.examples is not None:
        ui.examples.load_input_event.then(None, cancels=old_work, queue=False)


def _wire_cancel(ui: Components, long_events: list[Any]) -> None:
    """Cancel: gradio stops waiting for the events, and the handlers' deadlines stop the work at their next check.
    Not the downloads: gradio 6.31 then showed "Error" on a cancelled download's file and note in 2 of 8 runs."""
    ui.cancel_button.click(
        event(handlers.cancel_running),
        inputs=None,
        outputs=components(CancelOutputs, ui),
        cancels=long_events,
        queue=False,
        api_visibility="private",
    )


def build_demo(model: str | None = None, results: ResultStore | None = None) -> gr.Blocks:
    """The whole app. ``model`` (or VIZAPP_MODEL) picks the start-up model, which may be a local file. ``results``:
    where the sessions' analyses are kept (default: a store of its own within VIZAPP_MAX_RESULTS_BYTES)."""
    startup, startup_note = choose_startup_model(model)
    trusted = trusted_startup_model(startup, model)
    store = results if results is not None else ResultStore(budget.BUDGET.max_results_bytes)
    ui = Components()
    # Gradio's own cache (uploads, exported files): every hour, files older than a day go.
    with gr.Blocks(title=TITLE, delete_cache=(3600, 86400)) as demo:
        _page(ui, startup, startup_note, trusted, store)
        analyze = _wire_analyze(ui, startup_note, trusted, store)
        map_events = _wire_rollout(ui)
        _wire_heads(ui)
        _wire_pos(ui, demo, trusted)
        compare = _wire_compare(ui, analyze)
        feature_events, feature_export = wire_features(ui, analyze)
        downloads = [*_wire_export(ui), feature_export]
        _wire_new_image(ui, [*map_events, compare, *feature_events, *downloads])
        _wire_cancel(ui, [*analyze, *map_events, compare, *feature_events])
        demo.unload(bind(handlers.end_session, store=store))  # the page closed: its results go
    demo.results = store  # type: ignore[attr-defined]  (for the load test and tests)
    return demo
