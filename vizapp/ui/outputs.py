"""What each handler returns, by name: one NamedTuple per event, whose field order is the gradio output order.

A field's name is also the name of the component it fills (an attribute of the layout's component namespace), so
:func:`components` builds each event's ``outputs=[...]`` from the same declaration the handler fills; nothing else
lists the order. API clients (``gradio_client``) receive every output except ``gr.State`` ones, in the same order;
:func:`from_api` names them again.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

# Outputs held in gr.State (the server keeps them per session) and buttons (whose visibility an event may set): never
# sent to API clients.
STATE_FIELDS = frozenset({"state", "imp_exact_button", "imp_gradient_button"})


class AnalyzeOutputs(NamedTuple):
    """The Analyze button (API ``/analyze``): the new analysis, every view of it, and control updates."""

    state: dict[str, Any]  # {"analysis": Analysis, "query": ..., "tile": ..., "model": ...}
    status: str  # markdown: active model and its token layout
    label: dict[str, float] | None  # top-5 {label: probability}; None without a classifier
    rollout: Any  # go.Figure
    heads: Any  # go.Figure
    query_image: Any  # [H, W, 3] uint8
    distance: Any  # go.Figure: the chosen per-head statistic (mean attention distance unless another is chosen)
    statistic: Any  # gr.update: the choice, kept for the next image
    summary: dict[str, Any]
    layer: Any  # gr.update of the layer slider's range
    start_layer: Any
    focus_head: Any
    class_choice: Any  # the Rollout tab's class dropdown
    start_row: Any  # gr.update: the output's row / CLS row choice, shown when the output reads more than the CLS
    query_mode: Any
    query_row: Any
    query_col: Any
    compare_class: Any  # the Compare tab's class dropdown mirrors the Rollout tab's
    map_cost: str  # markdown: what the slow methods will cost on this model, before they run
    compare_cost: str  # markdown: the same for the Compare tab
    feat_layer: Any  # the Features tab's controls, set to this model's ranges
    feat_row: Any
    feat_col: Any
    norm_layer: Any
    lens_class: Any
    imp_class: Any
    importance_cost: str  # markdown: what head importance will cost on this model, before it runs
    seen: Any  # [H, W, 3] uint8: what the model actually saw (its preprocessed input, upscaled)
    method: Any  # gr.update: only the methods this model offers
    methods_note: str  # markdown: which methods are not offered, and why (once)
    compare_steps: Any  # gr.update: at most one step per patch
    imp_exact_button: Any  # gr.update: shown only where the method runs on this model
    imp_gradient_button: Any
    focus: Any  # the enlarged head, drawn
    # Cleared (vizapp.ui.common.cleared_outputs): what the previous image's slow operations left must not stay up
    # beside the new image's views.
    compare: Any
    deletion: Any
    insertion: Any
    auc_table: Any
    importance: Any
    importance_note: str
    npz_file: Any
    json_file: Any
    features_npz: Any
    pca_gallery: Any
    second_note: str
    figures_zip: Any
    figures_note: str


class HeadsOutputs(NamedTuple):
    """The Heads tab's controls: the query kept in the state, every head, one head enlarged, the clickable image."""

    state: dict[str, Any]
    heads: Any
    focus: Any
    query_image: Any


class MapOutputs(NamedTuple):
    """The Rollout tab's map, and what the chosen method costs (said only for the slow ones)."""

    rollout: Any
    map_cost: str


class CompareCostOutputs(NamedTuple):
    """The Compare tab's cost note, following its steps and slow-method controls."""

    compare_cost: str


class CancelOutputs(NamedTuple):
    """The Cancel button: what it stopped."""

    cancel_note: str


class PatchOutputs(NamedTuple):
    """A click on the query image: that patch becomes the query."""

    query_mode: str
    query_row: int
    query_col: int


class StatisticOutputs(NamedTuple):
    """The Attention distance tab's statistic: one registered per-head statistic, a dot per head per layer."""

    distance: Any  # go.Figure


class OpenHeadOutputs(NamedTuple):
    """A click on a dot of the distance plot: that layer and head, in the Heads tab."""

    tabs: Any
    layer: int
    focus_head: int


class TileOutputs(NamedTuple):
    """A click on the position-embedding mosaic: that tile."""

    tile_row: Any
    tile_col: Any


class PosOutputs(NamedTuple):
    """The Position tab (API ``/position_embeddings``): the view that fits the model's position scheme."""

    pos: Any
    tile: Any  # gr.update: the enlarged tile, hidden for a scheme without tiles (a relative bias, Swin's)
    pos_note: str
    pos_layer: Any  # gr.update: shown with this model's layer range for per-layer schemes, else hidden
    pos_head: Any
    pos_show: Any  # gr.update: the scheme / learned-table choice, shown only for a model that has both
    tile_row: Any  # gr.update: the tile sliders span the grid shown
    tile_col: Any
    resolution: Any  # gr.update: the preview-grid choice, shown only for a learned absolute table
    prompts: Any = None  # gr.update: the text prompts box, shown only for a model with a text tower (CLIP-like)


class FeaturesOutputs(NamedTuple):
    """The Features tab: label-free views, re-rendered from the cached analysis (no forward pass)."""

    state: dict[str, Any]  # the feature query is kept in the state
    feat_pca: Any  # go.Figure: feature PCA as RGB over the image
    feat_sim: Any  # go.Figure: cosine similarity of the query patch's feature
    feat_query_image: Any  # [H, W, 3] uint8, the clickable image
    norm_grid: Any
    norm_hist: Any
    norm_depth: Any
    register_plot: Any  # gr.update: hidden for a model without registers
    norm_sentence: str
    mask_heads: Any
    mask_overlay: Any
    mask_note: str  # markdown: why there are no masks (no CLS token)
    lens_table: Any  # gr.update: hidden without a classifier head
    lens_plot: Any
    lens_note: str
    features_note: str
    features_body: Any = None  # gr.update: the tab's views and controls, hidden where they are not defined (Swin)


class FeaturePatchOutputs(NamedTuple):
    """A click on the Features tab's image: that patch becomes the feature query."""

    feat_row: int
    feat_col: int


class SecondImageOutputs(NamedTuple):
    """The second image for the feature similarity: analysed with the same model, kept in the state."""

    state: dict[str, Any]
    feat_sim: Any
    second_note: str


class GalleryOutputs(NamedTuple):
    """PCA across the examples: one PCA shared by the uploaded image and the example images."""

    pca_gallery: Any


class ImportanceOutputs(NamedTuple):
    """Head importance by ablation: the heatmaps (exact and gradient side by side) and their rank correlation."""

    state: dict[str, Any]
    importance: Any
    importance_note: str


class FeatureExportOutputs(NamedTuple):
    """The Features tab's export: path of the .npz."""

    features_npz: str


class CompareOutputs(NamedTuple):
    """The Compare tab (API ``/compare``)."""

    compare: Any
    deletion: Any
    insertion: Any
    auc_table: list[list[Any]]


class FiguresExportOutputs(NamedTuple):
    """Download every figure: the .zip of HTML pages, and what is in it."""

    figures_zip: str
    figures_note: str


class ExportOutputs(NamedTuple):
    """The export button: paths of the .npz and .json files."""

    npz_file: str
    json_file: str


def for_gradio(result: Any) -> Any:
    """What gradio expects back from a handler: the only value of a one-field structure (gradio does not unpack a
    result for a single output, it would try to show the tuple itself), else the structure (a tuple, unpacked)."""
    if isinstance(result, tuple) and hasattr(result, "_fields") and len(result) == 1:
        return result[0]
    return result


def components(outputs: type[tuple], ui: Any) -> list[Any]:
    """The gradio components an event with these ``outputs`` fills, in field order (attributes of ``ui``)."""
    return [getattr(ui, name) for name in outputs._fields]  # type: ignore[attr-defined]


def api_fields(outputs: type[tuple]) -> list[str]:
    """The field names an API client receives, in order (gr.State outputs are not sent)."""
    return [name for name in outputs._fields if name not in STATE_FIELDS]  # type: ignore[attr-defined]


def from_api(outputs: type[tuple], result: Sequence[Any]) -> dict[str, Any]:
    """Name the values a ``gradio_client`` call returned for an event with these ``outputs``."""
    names = api_fields(outputs)
    values = list(result) if isinstance(result, (list, tuple)) else [result]
    if len(values) != len(names):
        raise ValueError(f"expected {len(names)} API outputs ({', '.join(names)}), got {len(values)}")
    return dict(zip(names, values, strict=True))
