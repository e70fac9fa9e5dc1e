"""One captured forward -> every registered statistic of every layer and image, for every family: what dataset mode
(``python -m vizapp.stats``) and the evaluation (``python -m vizapp.evaluate``) run per batch, and how a windowed
model's layers (Swin) reach the one :class:`~vizapp.statistics.StatisticsReducer` that every path uses.

Windowed layers. A Swin layer's query token attends to the w_h·w_w slots of its (shifted) window, some of them padding
where the grid is not a multiple of the window. The reducer is handed, for every real token t of the layer (row-major
on the layer's grid), t's row over the slots of its window, with the padded slots zeroed and the row renormalised
over the real keys (padded slots take part in the library's attention but have no place in the image), and a
:class:`~vizapp.statistics.Geometry` whose distances [N_l, w²] run from t to each slot, in input pixels at the
layer's stage spacing (patch size x 2 per patch merging); a layer without padding may instead be reduced in the
library's own layout of its rows (:meth:`~vizapp.statistics.HeadStatistic.window_rows`), each row giving the same
value, with no copy of its attention. So a head statistic is its plain-ViT definition applied to
each token's row over its window: the mean attention distance is that of
:func:`vizapp.analysis.windows.mean_distance`, the entropy is that of the row over the window's real keys. Block
statistics read each block's output tokens [B, N_l, C]. A statistic that does not declare itself defined for windowed
layers (``Statistic.windowed``) is NaN, with the sentence :func:`vizapp.statistics.undefined_statistics` gives.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from vizapp.analysis import windows as W
from vizapp.models import VizModel
from vizapp.statistics import (
    STATISTICS,
    BlockStatistic,
    Geometry,
    HeadStatistic,
    Statistic,
    StatisticsReducer,
    undefined_statistics,
)
from vizapp.transfer import to_device
from vizapp.windows import WindowCapture, WindowGeometry, window_sites


def layer_heads(vm: VizModel) -> list[int]:
    """The heads of each attention layer of ``vm`` (a windowed model's differ by stage)."""
    if vm.windowed:
        return [s.heads for s in window_sites(vm.model)]
    return [vm.num_heads] * vm.num_layers


def computed_statistics(vm: VizModel) -> list[Statistic]:
    """The registered statistics computed for ``vm``: all of them, or for a windowed model those defined for
    windowed layers (``Statistic.windowed``)."""
    return [s for s in STATISTICS.values() if s.windowed or not vm.windowed]


@functools.lru_cache(maxsize=256)
def _window_layout(
    g: WindowGeometry, stride: tuple[int, int], device: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(window index [nW, w²], token slots [N], distances [N, w²] float32 on ``device``) of a windowed layer: pure
    geometry, the same for every forward of a model at one size, so made once (read-only tensors)."""
    index = W.window_index(g.grid, g.window, g.shift, g.pad_first)
    slots = W.token_slots(index, g.grid[0] * g.grid[1])
    dist = to_device(W.token_key_distances(index, g.grid, stride), device, torch.float32)
    return index, slots, dist


@functools.lru_cache(maxsize=256)
def _row_gather(g: WindowGeometry, heads: int, device: str) -> torch.Tensor:
    """:func:`~vizapp.analysis.windows.token_row_gather` of a windowed layer with ``heads`` heads, on ``device``: where
    each (head, token) row sits among the layer's window rows (pure geometry, made once, read-only)."""
    slots = W.token_slots(W.window_index(g.grid, g.window, g.shift, g.pad_first), g.grid[0] * g.grid[1])
    return to_device(W.token_row_gather(slots, heads, g.window[0] * g.window[1]), device)


@functools.lru_cache(maxsize=256)
def _window_distances(g: WindowGeometry, stride: tuple[int, int], device: str) -> torch.Tensor:
    """[nW, w², w²] float32 on ``device``: the distances of :func:`_window_layout` (the very values) from each window's
    query slots to its key slots, for a layer without padding (every slot holds a token)."""
    index, _, dist = _window_layout(g, stride, device)
    # slot s of window w is token index[w, s], whose row of distances it takes
    return dist[to_device(index, dist.device)]


def window_layer_geometry(g: WindowGeometry, stride: tuple[int, int], device: torch.device) -> Geometry:
    """The reducer's :class:`~vizapp.statistics.Geometry` of a windowed layer: its N real tokens as queries, each
    over the w² slots of its window, ``stride`` pixels between the layer's tokens (see the module docstring)."""
    dist = _window_layout(g, tuple(stride), str(device))[2]  # [N, w²]
    return Geometry(g.grid[0] * g.grid[1], 0, dist)


def feed_window_layer(
    reducer: StatisticsReducer,
    layer: int,
    attn: torch.Tensor,
    g: WindowGeometry,
    stride: tuple[int, int],
    scratch: list[torch.Tensor] | None = None,
) -> None:
    """Reduce one windowed layer: ``attn`` [B, nW, H, w², w²] (its window attention as the forward used it) goes to
    ``reducer`` as each real token's row over its window (see the module docstring), and the layer is done.
    ``scratch``: a list holding (or left to hold) float32 buffers for the statistics' working values and the gathered
    rows, kept by the caller from layer to layer so that a forward allocates them once (the first stage's layers are
    the largest). A layer without padding is reduced where the library left its rows when every statistic can be
    (:func:`_in_window_layout`), with the very values the gathered rows would give."""
    index, slots, dist = _window_layout(g, tuple(stride), str(attn.device))
    reducer.set_geometry(layer, Geometry(g.grid[0] * g.grid[1], 0, dist))
    gather = _row_gather(g, int(attn.shape[2]), str(attn.device))
    work = None if scratch is None else _scratch(scratch, 0, attn)
    if g.padded == g.grid and _in_window_layout(reducer, layer, attn.float(), g, stride, gather, work):
        reducer.layer_done(layer)
        return
    out = None if scratch is None else _scratch(scratch, 1, attn)
    rows = W.token_rows(attn.float(), index, g.grid[0] * g.grid[1], slots, gather, out)  # [B, H, N, w²]
    for b in range(rows.shape[0]):
        one = rows[b]  # [H, N, w²]
        reducer.chunk(layer, b, 0, one, 0, scratch=None if work is None else work[: one.numel()].view(one.shape))
    reducer.layer_done(layer)


def _scratch(scratch: list[torch.Tensor], i: int, attn: torch.Tensor) -> torch.Tensor:
    """Buffer ``i`` of a forward's ``scratch`` list, float32 with room for ``attn.numel()`` elements on its device
    (the token rows, B·H·N·w² floats, are at most B·nW·H·w⁴, the attention's own size): made when missing or small."""
    scratch.extend([torch.empty(0)] * (i + 1 - len(scratch)))
    buf = scratch[i]
    if buf.numel() < attn.numel() or buf.device != attn.device:
        buf = scratch[i] = torch.empty(attn.numel(), dtype=torch.float32, device=attn.device)
    return buf


def _in_window_layout(
    reducer: StatisticsReducer,
    layer: int,
    attn: torch.Tensor,
    g: WindowGeometry,
    stride: tuple[int, int],
    gather: torch.Tensor,
    work: torch.Tensor | None,
) -> bool:
    """Reduce an unpadded windowed layer's rows where the library left them, [B, nW, H, w², w²], when every head
    statistic has that form (:meth:`~vizapp.statistics.HeadStatistic.window_rows`): each row's value is the one it
    would have among the token rows, so only the values, [H, N], are put in token order (no copy of the attention).
    False, with nothing reduced, when some statistic has no such form."""
    if any(type(s).window_rows is HeadStatistic.window_rows for s in reducer.head_stats):
        return False  # known before any work: some statistic reads only the gathered token rows
    b, nw, h, m, _ = attn.shape
    dist = _window_distances(g, tuple(stride), str(attn.device))  # [nW, w², w²]
    if work is None or work.numel() < attn[0].numel():
        work = torch.empty(attn[0].numel(), dtype=attn.dtype, device=attn.device)
    work = work[: attn[0].numel()].view(attn.shape[1:])
    for i in range(b):
        values = {}
        for s in reducer.head_stats:
            out = torch.empty((nw, h, m), dtype=torch.float32, device=attn.device)
            if not s.window_rows(attn[i], dist, out, work):
                return False
            values[s.name] = out.reshape(-1)[gather].view(h, -1)  # [H, N]: head h's value for each grid token
        reducer.put_rows(layer, i, values)
    return True


def window_reducer(
    vm: VizModel, batch: int
) -> tuple[StatisticsReducer, Callable[[int, torch.Tensor, WindowGeometry], None]]:
    """A reducer for one forward of ``batch`` images through the windowed ``vm``, and the ``on_layer`` callback of
    :class:`~vizapp.windows.WindowCapture` that feeds it (its ``on_block`` is the reducer's ``block``)."""
    from vizapp.models.swin import stage_strides

    sites = window_sites(vm.model)
    strides = stage_strides(vm, max(s.stage for s in sites) + 1)
    reducer = StatisticsReducer([s.heads for s in sites], batch, None, computed_statistics(vm), device=vm.device)
    scratch: list[torch.Tensor] = []  # the token rows' and the statistics' buffers, shared by the forward's layers

    def on_layer(layer: int, attn: torch.Tensor, g: WindowGeometry) -> None:
        feed_window_layer(reducer, layer, attn, g, strides[g.stage], scratch)

    return reducer, on_layer


def every_statistic(values: dict[str, torch.Tensor], heads: Sequence[int], batch: int) -> dict[str, torch.Tensor]:
    """``values`` (a reducer's) with a NaN entry for each registered statistic it lacks (one not computed for the
    model), in registration order: name -> [L, B, max H] or [L, B] float64."""
    shape_h, shape_b = (len(heads), batch, max(heads, default=0)), (len(heads), batch)
    device = next(iter(values.values())).device if values else torch.device("cpu")
    out = {}
    for name, s in STATISTICS.items():
        if name in values:
            out[name] = values[name]
        else:
            shape = shape_b if isinstance(s, BlockStatistic) else shape_h
            out[name] = torch.full(shape, float("nan"), dtype=torch.float64, device=device)
    return out


@dataclass
class StatisticsPass:
    """What :func:`forward_statistics` gives for a batch.

    Attributes:
        logits: [B, K] the model's output.
        values: every registered statistic, name -> [L, B, max H] (per head; NaN for a head a layer does not have) or
            [L, B] (per block), float64 on the model's device; NaN for a statistic not defined for the model.
        heads: the heads of each layer.
        undefined: name -> the sentence saying why that statistic is NaN for this model.
    """

    logits: torch.Tensor
    values: dict[str, torch.Tensor]
    heads: list[int]
    undefined: dict[str, str]

    def per_image(self) -> list[dict[str, np.ndarray]]:
        """Each image's statistics on the host: name -> [L, max H] or [L]."""
        host = {k: v.transpose(0, 1).cpu().numpy() for k, v in self.values.items()}  # [B, L, H] or [B, L]
        return [{k: v[b] for k, v in host.items()} for b in range(self.logits.shape[0])]


def forward_statistics(vm: VizModel, x: torch.Tensor) -> StatisticsPass:
    """One captured forward of ``x`` [B, C, H, W] (the model's preprocessed inputs) through ``vm``: its logits and
    every registered statistic of every layer and image, reduced while each layer's attention is at hand (nothing of a
    layer outlives it). A plain ViT's attention goes to the reducer from :class:`~vizapp.capture.AttentionCapture`,
    chunk by chunk; a windowed model's from :class:`~vizapp.windows.WindowCapture`, layer by layer."""
    from vizapp.capture import AttentionCapture

    b = x.shape[0]
    x = to_device(x, vm.device, vm.dtype)
    heads = layer_heads(vm)
    if vm.windowed:
        reducer, on_layer = window_reducer(vm, b)
        with torch.no_grad(), WindowCapture(vm.model, on_layer=on_layer, on_block=reducer.block, keep=False):
            logits = vm.logits(x)
    else:
        grid = vm.grid_for(x.shape[-2], x.shape[-1])
        p = vm.num_prefix_tokens
        geometry = Geometry(p + grid[0] * grid[1], p, vm.patch_distances(grid))
        reducer = StatisticsReducer(heads, b, geometry)
        with torch.no_grad(), AttentionCapture(vm.model, on_attention=reducer, on_block=reducer.block, keep_qk=False):
            logits = vm.logits(x)
    if not reducer.complete():
        raise RuntimeError("the attention of some layer never reached vizapp's statistics")
    return StatisticsPass(
        logits=logits,
        values=every_statistic(reducer.values, heads, b),
        heads=heads,
        undefined=undefined_statistics(vm.num_prefix_tokens, vm.windowed),
    )
