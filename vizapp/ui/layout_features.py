"""The Features tab: its components and its events (label-free views, the second image, PCA across the examples,
head importance, the export)."""

from __future__ import annotations

from typing import Any

import gradio as gr

from vizapp.ui import handlers
from vizapp.ui.deadline import stops_when_cancelled
from vizapp.ui.outputs import (
    FeatureExportOutputs,
    FeaturePatchOutputs,
    FeaturesOutputs,
    GalleryOutputs,
    ImportanceOutputs,
    OpenHeadOutputs,
    SecondImageOutputs,
    components,
)
from vizapp.ui.wiring import MODEL_WORK, PAIR, RERENDER, Components, event, on_input, patch_picker, redraw


def features_tab(ui: Components) -> None:
    gr.Markdown(
        "Views that need no class labels (DINOv2/v3, CLIP backbones and any model), all from the analysis you already "
        "ran: change a control and they redraw without another forward pass."
    )
    ui.features_note = gr.Markdown("")
    # shown for every family (a Swin's views are per layer on that layer's grid; the note above says so)
    with gr.Column(elem_id="vizapp-features-body") as ui.features_body:
        with gr.Row():
            with gr.Column(scale=1, min_width=240):
                ui.feat_query_image = patch_picker(
                    "Click a patch: its feature is compared with every patch", "vizapp-feature-image", 300
                )
                ui.feat_layer = gr.Slider(-1, 11, value=-1, step=1, label="Feature layer (-1 = last)")
                ui.feat_foreground = gr.Slider(
                    0, 0.95, value=0.0, step=0.05, label="PCA foreground threshold (0 = off; refit on patches above it)"
                )
                with gr.Row():
                    ui.feat_row = gr.Slider(0, 13, value=0, step=1, label="Patch row")
                    ui.feat_col = gr.Slider(0, 13, value=0, step=1, label="Patch column")
                ui.second_image = gr.Image(
                    label="Second image (optional): the similarity map is drawn on it",
                    type="filepath",
                    sources=["upload", "clipboard"],
                    height=160,
                )
                ui.second_button = gr.Button("Compare with the second image")
                ui.second_note = gr.Markdown("")
            with gr.Column(scale=2):
                with gr.Row():  # 285 px each on a wide page, in the column beside the controls: a smaller PAIR
                    ui.feat_pca = gr.Plot(label="Feature PCA", elem_id="vizapp-pca-plot", min_width=260)
                    ui.feat_sim = gr.Plot(label="Feature similarity", elem_id="vizapp-similarity-plot", min_width=260)
                with gr.Row():
                    ui.pca_examples_button = gr.Button("PCA across examples (one forward pass over the gallery)")
                ui.pca_gallery = gr.Plot(
                    label="One PCA over your image and the examples", elem_id="vizapp-gallery-plot"
                )
        gr.Markdown("### Token norms and registers")
        ui.norm_sentence = gr.Markdown("", elem_id="vizapp-norm-sentence")
        ui.norm_layer = gr.Slider(-1, 11, value=-1, step=1, label="Norm layer (-1 = last)")
        with gr.Row():
            ui.norm_grid = gr.Plot(label="Patch-token norms", elem_id="vizapp-norm-grid-plot", **PAIR)
            ui.norm_hist = gr.Plot(label="Norm histogram", elem_id="vizapp-norm-hist-plot", **PAIR)
        with gr.Row():
            ui.norm_depth = gr.Plot(label="CLS and registers across depth", elem_id="vizapp-norm-depth-plot", **PAIR)
            ui.register_plot = gr.Plot(
                label="Attention to registers", elem_id="vizapp-register-plot", visible=False, **PAIR
            )
        gr.Markdown("### DINO masks (last layer, per head)")
        ui.mask_note = gr.Markdown("", elem_id="vizapp-mask-note")
        ui.dino_threshold = gr.Slider(0.05, 1.0, value=0.6, step=0.05, label="Attention mass kept per head")
        with gr.Row():
            ui.mask_heads = gr.Plot(label="Per head", elem_id="vizapp-mask-plot", **PAIR)
            ui.mask_overlay = gr.Plot(label="Overlaid", elem_id="vizapp-mask-overlay-plot", **PAIR)
        gr.Markdown("### Logit lens")
        ui.lens_note = gr.Markdown("", elem_id="vizapp-lens-note")
        ui.lens_class = gr.Dropdown([], label="Class to follow across depth (type to search)", filterable=True)
        ui.lens_table = gr.Dataframe(
            headers=["layer", "1", "2", "3", "4", "5"],
            label="Top-5 per layer",
            wrap=True,
            column_widths=["64px"],  # the others as wide as their classes; "layer" on one line (it broke in three)
            elem_id="vizapp-lens-table",
        )
        ui.lens_plot = gr.Plot(label="Probability across depth", elem_id="vizapp-lens-plot")
        with gr.Row():
            ui.features_export_button = gr.Button("Export these arrays (.npz)")
            ui.features_npz = gr.File(label="feature arrays (.npz)", elem_id="vizapp-features-npz", height=90)
    # outside the body: head importance is defined for every family, Swin included
    gr.Markdown("### Head importance by ablation")
    ui.importance_cost = gr.Markdown("", elem_id="vizapp-importance-cost")
    with gr.Row():
        ui.imp_mode = gr.Radio(["zero", "mean"], value="zero", label="Ablate a head's output to")
        ui.imp_class = gr.Dropdown(
            [], label="Class scored (none: the top-1, or 1 - cos without a classifier)", filterable=True
        )
        ui.imp_exact_button = gr.Button("Exact ablation", variant="primary")
        ui.imp_gradient_button = gr.Button("Gradient estimate")
    ui.importance = gr.Plot(label="Head importance", elem_id="vizapp-importance-plot")
    ui.importance_note = gr.Markdown("", elem_id="vizapp-importance-note")
    ui.importance_click = gr.Textbox(visible="hidden", elem_id="vizapp-importance-click")


def _feature_inputs(ui: Components) -> list[Any]:
    return [
        ui.state,
        ui.feat_layer,
        ui.feat_foreground,
        ui.feat_row,
        ui.feat_col,
        ui.norm_layer,
        ui.dino_threshold,
        ui.lens_class,
        ui.opacity,
    ]


def _importance_fn(method: str) -> Any:
    def run(
        state: Any,
        mode: Any,
        class_label: Any,
        progress: gr.Progress = gr.Progress(),
        request: gr.Request | None = None,
    ) -> Any:
        return handlers.run_importance(state, method, mode, class_label, progress, request)

    run.__name__ = f"head_importance_{method}"
    return run


def wire_features(ui: Components, analyze: list[Any]) -> tuple[list[Any], Any]:
    """The Features tab: re-render on every control change (no forward pass). Returned: its slow buttons' events (for
    Cancel and a new image), and its export's (for a new image)."""
    inputs, outputs = _feature_inputs(ui), components(FeaturesOutputs, ui)
    for done in analyze:
        done.success(handlers.render_features, inputs=inputs, outputs=outputs, api_visibility="private")
    controls = inputs[1:-1]  # every input but the state and the opacity (the Rollout tab's, which redraws there)
    render = redraw(handlers.render_features, FeaturesOutputs)
    on_input(controls, render, inputs=inputs, outputs=outputs, **RERENDER).after(
        ui.feat_query_image.select(
            handlers.select_feature_patch,
            inputs=[ui.state],
            outputs=components(FeaturePatchOutputs, ui),
            api_visibility="private",
        )
    )
    second = ui.second_button.click(
        handlers.analyze_second_image,
        inputs=[ui.state, ui.second_image, ui.feat_row, ui.feat_col, ui.feat_layer, ui.opacity],
        outputs=components(SecondImageOutputs, ui),
        api_visibility="private",
        **MODEL_WORK,
    )
    gallery = ui.pca_examples_button.click(
        stops_when_cancelled(event(handlers.pca_across_examples)),
        inputs=[ui.state, ui.feat_layer],
        outputs=components(GalleryOutputs, ui),
        api_visibility="private",
        **MODEL_WORK,
    )
    importance = [
        button.click(
            stops_when_cancelled(_importance_fn(method)),
            inputs=[ui.state, ui.imp_mode, ui.imp_class],
            outputs=components(ImportanceOutputs, ui),
            api_name=f"head_importance_{method}",
            **MODEL_WORK,
        )
        for button, method in ((ui.imp_exact_button, "exact"), (ui.imp_gradient_button, "gradient"))
    ]
    ui.heads_redraw.after(  # the Heads tab's redraw (layout._wire_heads), for the head it opens
        ui.importance_click.change(
            handlers.open_head,
            inputs=[ui.state, ui.importance_click],
            outputs=components(OpenHeadOutputs, ui),
            api_visibility="private",
        )
    )
    export = ui.features_export_button.click(
        event(handlers.export_features),
        inputs=[ui.state, ui.feat_layer, ui.feat_foreground, ui.feat_row, ui.feat_col, ui.dino_threshold],
        outputs=components(FeatureExportOutputs, ui),
        api_visibility="undocumented",
    )
    return [second, gallery, *importance], export
