"""The Features tab's handlers: label-free views redrawn from the analysis, the second image, PCA across the
examples, head importance and the arrays' export."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np

from vizapp import models, views
from vizapp.errors import BadParameterError
from vizapp.imageio import decode_image
from vizapp.pipeline import Analysis, feature_pca
from vizapp.ui import deadline
from vizapp.ui.common import (
    analysis_state,
    analyze_on_gpu,
    kept_state,
    patch_at,
    session_id,
    user_errors,
    write_export,
)
from vizapp.ui.outputs import (
    FeatureExportOutputs,
    FeaturePatchOutputs,
    FeaturesOutputs,
    GalleryOutputs,
    ImportanceOutputs,
    SecondImageOutputs,
)
from vizapp.ui.validation import as_choice, as_float, as_int

# -- the Features tab ------------------------------------------------------------------------------------------------

NO_HEAD_NOTE = "This model has no classifier head, so there is no logit lens (no classes to read)."
NO_CLS_MASK_NOTE = (
    "DINO masks are drawn from the CLS token's attention in the last layer, and this model has no CLS token (it "
    "pools its patches): there are none to show."
)


def _windowed(r: Any) -> bool:
    return bool(getattr(r, "windowed", False))


def _windowed_features(
    st: dict[str, Any],
    layer: int,
    fg: float | None,
    query: tuple[int, int],
    norm_layer: int,
    opacity: float,
    lens_class: Any,
) -> FeaturesOutputs:
    """The Features tab for a windowed (Swin) model: feature PCA, similarity and token norms of the chosen layer on
    its own grid (the query, a token of the first stage's grid, moved onto it), and the logit lens of the last
    stage's layers; DINO masks are not defined for it, and the lens not for the earlier stages, each said in one
    sentence."""
    from vizapp import feature_views_windows as FV
    from vizapp.swin_result import FEATURES, UNDEFINED

    r = st["analysis"]
    norms = FV.token_norm_views(r, norm_layer)
    hidden = gr.update(value=None, visible=False)
    if r.lens_probs is not None:
        lens = FV.logit_lens_views(r, lens_class if isinstance(lens_class, str) and lens_class else None)
        lens_table, lens_plot = gr.update(value=lens.table, visible=True), gr.update(value=lens.depth, visible=True)
        lens_note = FV.lens_note(r)
    else:
        lens_table, lens_plot, lens_note = gr.update(visible=False), hidden, NO_HEAD_NOTE
    return FeaturesOutputs(
        state=kept_state(st),
        feat_pca=FV.feature_pca_view(r, layer, fg),
        feat_sim=FV.feature_similarity_view(r, query, layer, st.get("other"), opacity),
        feat_query_image=views.query_image(r, views.Controls(query=query)),
        norm_grid=norms.grid,
        norm_hist=norms.histogram,
        norm_depth=norms.depth,
        register_plot=hidden,
        norm_sentence=norms.sentence,
        mask_heads=hidden,
        mask_overlay=hidden,
        mask_note=UNDEFINED["dino_masks"],
        lens_table=lens_table,
        lens_plot=lens_plot,
        lens_note=lens_note,
        features_note=f"**Windowed attention (Swin)**: {FEATURES} Click a patch: the token of the chosen layer that "
        "holds it is compared.",
        features_body=gr.update(visible=True),
    )


def _feature_query(r: Analysis, row: Any, col: Any) -> tuple[int, int]:
    return (as_int(row, "patch row", 0, r.grid_size[0] - 1), as_int(col, "patch column", 0, r.grid_size[1] - 1))


def _foreground(value: Any) -> float | None:
    t = as_float(value, "foreground threshold", 0.0, 1.0, hi_inclusive=False)
    return None if t == 0.0 else t


@user_errors
def render_features(
    state: Any,
    layer: Any,
    foreground: Any,
    row: Any,
    col: Any,
    norm_layer: Any,
    dino_threshold: Any,
    lens_class: Any,
    opacity: Any = 0.6,
    request: gr.Request | None = None,
) -> FeaturesOutputs:
    """Features tab: every label-free view from the cached analysis (no forward pass)."""
    st = analysis_state(state, request)
    r: Analysis = st["analysis"]
    lay = as_int(layer, "layer", -r.num_layers, r.num_layers - 1) % r.num_layers
    fg = _foreground(foreground)
    query = _feature_query(r, row, col)
    nlay = as_int(norm_layer, "norm layer", -r.num_layers, r.num_layers - 1) % r.num_layers
    thr = as_float(dino_threshold, "mask threshold", 0.01, 1.0)
    alpha = as_float(opacity, "opacity", 0.0, 1.0)
    st = {**st, "feature_query": query}
    if _windowed(r):
        return _windowed_features(st, lay, fg, query, nlay, alpha, lens_class)
    other = st.get("other")
    norms = views.token_norm_views(r, nlay)
    if r.has_class_token:
        masks = views.dino_mask_views(r, thr, alpha)
        mask_heads, mask_overlay, mask_note = gr.update(value=masks.per_head, visible=True), masks.overlay, ""
    else:
        mask_heads, mask_overlay, mask_note = gr.update(value=None, visible=False), None, NO_CLS_MASK_NOTE
    if r.lens_probs is not None:
        label = lens_class if isinstance(lens_class, str) and lens_class else None
        lens = views.logit_lens_views(r, label)
        lens_table, lens_plot, lens_note = (
            gr.update(value=lens.table, visible=True),
            gr.update(value=lens.depth, visible=True),
            "",
        )
    else:
        lens_table, lens_plot, lens_note = gr.update(visible=False), gr.update(value=None, visible=False), NO_HEAD_NOTE
    _, layer_note = views.feature_layer(r, lay)
    return FeaturesOutputs(
        state=kept_state(st),
        feat_pca=views.feature_pca_view(r, lay, fg),
        feat_sim=views.feature_similarity_view(r, query, lay, other, alpha),
        feat_query_image=views.query_image(r, views.Controls(query=query)),
        norm_grid=norms.grid,
        norm_hist=norms.histogram,
        norm_depth=norms.depth,
        register_plot=gr.update(value=norms.registers, visible=norms.registers is not None),
        norm_sentence=norms.sentence,
        mask_heads=mask_heads,
        mask_overlay=gr.update(value=mask_overlay, visible=mask_overlay is not None),
        mask_note=mask_note,
        lens_table=lens_table,
        lens_plot=lens_plot,
        lens_note=lens_note,
        features_note=layer_note,
        features_body=gr.update(visible=True),
    )


@user_errors
def select_feature_patch(state: Any, evt: gr.SelectData, request: gr.Request | None = None) -> FeaturePatchOutputs:
    """Clicking the Features tab's image makes that patch the feature query (rendering follows)."""
    return FeaturePatchOutputs(*patch_at(state, evt, request))


@user_errors
def analyze_second_image(
    state: Any,
    image: Any,
    row: Any,
    col: Any,
    layer: Any,
    opacity: Any = 0.6,
    progress: gr.Progress = gr.Progress(),
    request: gr.Request | None = None,
) -> SecondImageOutputs:
    """A second image, analysed with the same network, for the feature similarity across images (click in the first,
    map in the second). ``image`` None clears it. Kept in the results store beside the first, counted with it."""
    st = analysis_state(state, request)
    key = st["result"]
    r: Analysis = st["analysis"]
    query = _feature_query(r, row, col)
    lay = as_int(layer, "layer", -r.num_layers, r.num_layers - 1) % r.num_layers
    alpha = as_float(opacity, "opacity", 0.0, 1.0)
    if _windowed(r):  # the query is a token of the first stage's grid, moved onto the layer's
        from vizapp.feature_views_windows import feature_similarity_view
    else:
        feature_similarity_view = views.feature_similarity_view
    if image is None:
        key.store.attach(key, session_id(request), "other", None)
        return SecondImageOutputs(
            kept_state(st),
            feature_similarity_view(r, query, lay, None, alpha),
            "No second image: the similarity is shown on the same image.",
        )
    decoded = decode_image(image)
    progress(0.2, desc="forward pass on the second image")
    other = analyze_on_gpu(r._model(), decoded)  # the very network the first image went through
    key.store.attach(key, session_id(request), "other", other)
    return SecondImageOutputs(
        kept_state(st),
        feature_similarity_view(r, query, lay, other, alpha),
        "Second image analysed with the same model: click a patch in the first image, the map is drawn on the second.",
    )


def example_images() -> list[str]:
    """The example gallery's image files."""
    folder = models.ASSETS_DIR / "examples"
    return sorted(str(p) for p in folder.glob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))


@user_errors
def pca_across_examples(
    state: Any, layer: Any, progress: gr.Progress = gr.Progress(), request: gr.Request | None = None
) -> GalleryOutputs:
    """One PCA shared by the analysed image and the example images (one batched forward pass), so parts correspond
    by colour across images."""
    st = analysis_state(state, request)
    r: Analysis = st["analysis"]
    lay = as_int(layer, "layer", -r.num_layers, r.num_layers - 1) % r.num_layers
    paths = example_images()
    images = [r.image] + [decode_image(p) for p in paths]
    names = ["your image"] + [Path(p).stem[:14] for p in paths]
    with deadline.running(session_id(request)) as d:
        d.check("PCA across examples")
        progress(0.1, desc=f"forward pass on {len(images)} images")
        vm = r._model()  # the very network the analysis came from (StaleResultError if rebuilt or edited)
        if _windowed(r):  # one layer's tokens on its own grid, drawn at its stage's token spacing
            from vizapp.feature_views_windows import pca_gallery_view
            from vizapp.swin_features import feature_pca_images

            rgbs, stride = feature_pca_images(vm, images, layer=lay)
            return GalleryOutputs(pca_gallery_view(rgbs, stride, names, lay))
        rgbs = feature_pca(vm, images, layer=lay)
    fig = views.pca_gallery_view(rgbs, vm.patch_size, names, lay)
    return GalleryOutputs(fig)


@user_errors
def run_importance(
    state: Any,
    method: Any,
    mode: Any,
    class_label: Any,
    progress: gr.Progress = gr.Progress(),
    request: gr.Request | None = None,
) -> ImportanceOutputs:
    """Head importance by ablation ("exact") or its first-order estimate ("gradient"), under the request deadline
    (VIZAPP_REQUEST_SECONDS) and Cancel, checked before every layer of the exact method. The two results of the same
    class and ablation mode are shown side by side with their Spearman rank correlation."""
    from vizapp.ablation import IMPORTANCE_METHODS, head_importance

    st = analysis_state(state, request)
    r: Analysis = st["analysis"]
    how = as_choice(method, "importance method", IMPORTANCE_METHODS)
    ablation = as_choice(mode, "ablation mode", ("zero", "mean"))
    cls = class_label if isinstance(class_label, str) and class_label and r.probs is not None else None
    if cls is not None and cls not in r.labels:
        raise BadParameterError(f"unknown class {cls[:60]!r}; pick one from the list")
    vm = r._model()  # the very network the analysis came from, or StaleResultError (rebuilt, edited, evicted)
    why = views.importance_support(vm).get(how)
    if why:
        raise BadParameterError(f"{how} head importance is not available for this model: {why}")
    key = (cls, ablation)
    kept = st.get("importance") if isinstance(st.get("importance"), dict) else {}
    kept = dict(kept) if kept.get("key") == key else {"key": key}
    with deadline.running(session_id(request)) as d:
        doing = "exact head ablation" if how == "exact" else "gradient head importance"
        d.check(doing)
        progress(0.0, desc=doing)
        report = d.progress(doing, lambda fraction, desc: progress(fraction, desc=desc))

        def should_stop() -> bool:
            d.check(doing)  # raises at the deadline or on Cancel
            return False

        res = head_importance(
            vm, r.input, class_idx=cls, mode=ablation, method=how, progress=report, should_stop=should_stop
        )
    kept[how] = res.drop.numpy()
    kept["score"] = res.score + ("" if res.class_idx is None else f" of '{r.labels[res.class_idx]}'")
    st = kept_state({**st, "importance": kept})
    fig, rho = views.importance_view(kept.get("exact"), kept.get("gradient"), kept["score"])
    other = "gradient" if how == "exact" else "exact"
    note = rho
    if not note and not views.importance_support(vm).get(other):
        note = f"Run the {other} method too (same class and mode) to see their rank correlation."
    if _windowed(r):
        note += " Empty cells: heads a layer does not have (each stage has its own head count)."
    note += " Click a cell to open that head in the Heads tab."
    return ImportanceOutputs(st, fig, note)


@user_errors
def export_features(
    state: Any,
    layer: Any,
    foreground: Any,
    row: Any,
    col: Any,
    dino_threshold: Any,
    request: gr.Request | None = None,
) -> FeatureExportOutputs:
    """The Features tab's arrays as .npz, in a fresh private temp folder."""
    st = analysis_state(state, request)
    r: Analysis = st["analysis"]
    lay = as_int(layer, "layer", -r.num_layers, r.num_layers - 1) % r.num_layers
    imp = {k: v for k, v in (st.get("importance") or {}).items() if k in ("exact", "gradient")}
    if _windowed(r):
        from vizapp.feature_views_windows import feature_arrays

        arrays = feature_arrays(r, lay, _foreground(foreground), _feature_query(r, row, col), imp)
        out = write_export("vizapp_features.npz", lambda path: np.savez_compressed(path, **arrays))
        return FeatureExportOutputs(str(out))
    arrays = views.feature_arrays(
        r,
        lay,
        _foreground(foreground),
        _feature_query(r, row, col),
        as_float(dino_threshold, "mask threshold", 0.01, 1.0),
        imp,
    )
    out = write_export("vizapp_features.npz", lambda path: np.savez_compressed(path, **arrays))
    return FeatureExportOutputs(str(out))
