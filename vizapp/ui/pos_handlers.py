"""The Position tab's handlers: the view that fits the model's position scheme (learned table, RoPE, relative bias,
a windowed model's per-layer bias), and a click on its mosaic."""

from __future__ import annotations

from typing import Any

import gradio as gr

from vizapp import models, views
from vizapp.ui.common import user_errors
from vizapp.ui.outputs import PosOutputs, TileOutputs
from vizapp.ui.validation import as_choice, as_int


@user_errors
def open_tile(state: Any, payload: Any) -> TileOutputs:
    """A click on the position-embedding mosaic: enlarge that tile."""
    from vizapp.ui.handlers import _parse_click

    ti, tj = _parse_click(payload, 2)
    if ti == 255 or tj == 255:  # a gap between tiles
        return TileOutputs(gr.update(), gr.update())
    return TileOutputs(ti, tj)


def _selector(count: int) -> Any:
    """A layer / head slider shown with ``count`` choices (hidden when there is at most one to choose from)."""
    return gr.update(visible=True, maximum=count - 1) if count > 1 else gr.update(visible=False)


@user_errors
def render_pos(
    model_name: Any,
    resolution: Any,
    tile_row: Any,
    tile_col: Any,
    pos_layer: Any = 0,
    pos_head: Any = 0,
    pos_show: Any = None,
    random_weights: Any = False,
    request: gr.Request | None = None,
    *,
    trusted_model: str | None = None,
) -> PosOutputs:
    """Position tab: the view that fits the model's scheme. Learned embeddings: the cosine grid at the model's grid or
    at ``resolution`` (0 = its own); RoPE: its similarity mosaic (mixed RoPE per layer and head); relative bias:
    per-head maps of ``pos_layer``; none: a sentence. A model with a learned table beside RoPE or a bias offers both
    (``pos_show``, one of :data:`vizapp.views.POS_SHOWS`). ``request``: the session, by which the tab's redraws are
    shown in the order they started (:func:`vizapp.ui.wiring.on_input`); the view itself does not depend on it."""
    from vizapp.ui import handlers  # looked up at call time: tests and the app may replace handlers._load

    vm = handlers._load(handlers._model_name(model_name, trusted_model), trusted_model, bool(random_weights))
    tile = (as_int(tile_row, "tile row", 0, 255), as_int(tile_col, "tile column", 0, 255))
    layer, head = as_int(pos_layer, "layer", 0, 255), as_int(pos_head, "head", 0, 255)
    if vm.windowed:  # Swin: each attention layer's relative bias, read from the weights
        return _windowed_pos(vm, layer)
    show = as_choice(pos_show or views.POS_SHOWS[0], "position view", views.POS_SHOWS)
    grid = None
    if resolution not in (None, "", 0, "0") and not vm.pos_embed_status:
        side = as_int(resolution, "preview grid", 2, 32)
        gh, gw = vm.grid_size
        grid = (side, side) if gh == gw else (side, max(2, round(side * gw / gh)))
    v = views.pos_embed_views(vm, grid, tile, layer, head, show)
    # The tile sliders span the grid the mosaic shows; the preview grid applies to a learned table's view only.
    shown = tuple(v.grid) if v.grid else tuple(vm.grid_size)
    table_view = v.figure is not None and v.kind == "learned"
    return PosOutputs(
        pos=v.figure,
        # a scheme without tiles (a relative bias: per-head maps already) hides the enlarged-tile plot, not an empty box
        tile=gr.update(value=v.tile, visible=v.tile is not None),
        pos_note=v.note,
        pos_layer=_selector(v.layers),
        pos_head=_selector(v.heads),
        pos_show=gr.update(visible=True) if v.shows else gr.update(visible=False, value=views.POS_SHOWS[0]),
        tile_row=gr.update(maximum=max(1, shown[0] - 1), value=min(tile[0], shown[0] - 1), visible=v.tile is not None),
        tile_col=gr.update(maximum=max(1, shown[1] - 1), value=min(tile[1], shown[1] - 1), visible=v.tile is not None),
        resolution=gr.update(visible=table_view),
        prompts=gr.update(visible=vm.text_tower is not None),
    )


def render_pos_quietly(*args: Any, **kwargs: Any) -> PosOutputs:
    """:func:`render_pos` for picking a model: a model that cannot be loaded is said once, in the tab's note (the
    Analyze button says it again only when pressed), and nothing is drawn."""
    try:
        return render_pos(*args, **kwargs)
    except gr.Error as e:
        hidden = gr.update(visible=False)
        return PosOutputs(
            pos=None,
            tile=gr.update(value=None, visible=False),
            pos_note=f"The position view of this model could not be shown: {e.message}",
            pos_layer=hidden,
            pos_head=hidden,
            pos_show=gr.update(visible=False, value=views.POS_SHOWS[0]),
            tile_row=gr.update(),
            tile_col=gr.update(),
            resolution=gr.update(),
            prompts=gr.update(),
        )


def _windowed_pos(vm: models.VizModel, layer: int) -> PosOutputs:
    """A windowed (Swin) model's Position tab: one layer's relative bias per head, a layer selector over its
    attention layers; no tiles, no preview grid (it has no absolute table)."""
    from vizapp.views_windows import model_bias_views

    v = model_bias_views(vm, layer)
    hidden = gr.update(visible=False)
    return PosOutputs(
        pos=v.figure,
        tile=gr.update(value=None, visible=False),
        pos_note=v.note,
        pos_layer=_selector(v.layers),
        pos_head=hidden,
        pos_show=gr.update(visible=False, value=views.POS_SHOWS[0]),
        tile_row=hidden,
        tile_col=hidden,
        resolution=hidden,
        prompts=hidden,
    )
