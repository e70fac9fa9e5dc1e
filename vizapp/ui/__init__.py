"""The Gradio app: ``build_demo`` lays out the page, thin handlers call :mod:`vizapp.pipeline`,
:mod:`vizapp.views` and :mod:`vizapp.methods`, and each handler returns a named structure of
:mod:`vizapp.ui.outputs`.

Modules: ``layout`` (the page, one function per tab; ``layout_features`` the Features tab; ``wiring`` what they
share), ``handlers`` (the events; ``feature_handlers`` the Features tab's, ``pos_handlers`` the Position tab's,
``window_handlers`` those of a windowed-attention (Swin) analysis, ``common`` what they share), ``outputs``
(what each event returns, in gradio's output order), ``validation`` (checks on every value a client sends),
``startup`` (the model list and the start-up model), ``upload`` (the image input), ``serving`` (launch arguments and
the queue), ``store`` (the sessions' analyses, kept by key within one byte budget), ``deadline`` (time limit and
Cancel for long operations) and ``costs`` (what those will cost, said beforehand).
"""

from __future__ import annotations

from vizapp import models, views
from vizapp.ui.handlers import (
    CLS_QUERY,
    PATCH_QUERY,
    analyze_image,
    analyze_second_image,
    compare_methods,
    export_features,
    export_files,
    open_head,
    open_tile,
    pca_across_examples,
    render_features,
    render_heads,
    render_map,
    render_pos,
    render_statistic,
    run_importance,
    select_feature_patch,
    select_patch,
)
from vizapp.ui.layout import build_demo
from vizapp.ui.outputs import AnalyzeOutputs, CompareOutputs, FeaturesOutputs, HeadsOutputs, PosOutputs
from vizapp.ui.serving import free_port, launch_kwargs, queue
from vizapp.ui.startup import DEFAULT_PRETRAINED, choose_startup_model, model_choices, weights_available_offline
from vizapp.ui.upload import UploadedImage

__all__ = [
    "CLS_QUERY",
    "DEFAULT_PRETRAINED",
    "PATCH_QUERY",
    "AnalyzeOutputs",
    "CompareOutputs",
    "FeaturesOutputs",
    "HeadsOutputs",
    "PosOutputs",
    "UploadedImage",
    "analyze_image",
    "analyze_second_image",
    "build_demo",
    "choose_startup_model",
    "compare_methods",
    "export_features",
    "export_files",
    "free_port",
    "launch_kwargs",
    "model_choices",
    "models",
    "open_head",
    "open_tile",
    "pca_across_examples",
    "queue",
    "render_features",
    "render_heads",
    "render_map",
    "render_pos",
    "render_statistic",
    "run_importance",
    "select_feature_patch",
    "select_patch",
    "views",
    "weights_available_offline",
]
