"""Capture for windowed attention (Swin): each block's attention inside its (shifted) windows, exactly, and the
geometry the forward used (token grid, window, shift, padding).

A Swin block attends within windows of w_h x w_w tokens: the block's token grid is cyclically shifted (every
other block), padded to a multiple of the window, cut into windows, and each window attends to itself, with the
learned relative-position bias and, in shifted blocks, a mask (-100) between tokens that the roll brought from
different parts of the image. The library hands all of it to the attention call:

- timm ``WindowAttention`` with ``fused_attn`` on, and transformers ``SwinAttention`` with SDPA, call
  ``F.scaled_dot_product_attention(q, k, v, attn_mask=bias + mask)``: caught by :class:`vizapp.capture.AttentionCapture`
  (its q, k and additive mask), so the probabilities are softmax(q kᵀ · scale + bias + mask), formed once, in fp32.
- timm ``WindowAttention`` with ``fused_attn`` off (timm's default for Swin: its fused path is marked experimental),
  and timm's Swin V2 (cosine attention, never fused), compute the probabilities with their ``softmax`` module: its
  output is what the block multiplies with v, and is recorded as is (in the autograd graph with ``with_grad``).

The geometry is read from each block as it runs (the grid from its input, the window and shift from its attributes
after the library has clamped them to the grid), never assumed. Hooks live for one ``with`` block and see only the
thread that opened it; nothing is kept on the model.

With ``ablate``, chosen heads' outputs are replaced where the layer hands them to its output projection (timm's
``attn.proj``, transformers' ``o_proj`` / ``output.dense``), whose input is [B·nW, w², H·d] with head h in columns
h·d:(h+1)·d:

- ``ablate_mode="zero"``: by 0;
- ``ablate_mode="mean"``: by the head's mean over the image's real tokens of that layer: every window of the image,
  the padding slots left out (a padded slot is cropped after the block, so it is neither averaged nor kept). A
  window's own mean would differ from window to window and would keep the head's local content, which is not an
  ablation of the head; the image-wide mean is the windowed counterpart of the plain ViT's mean over the N tokens
  (:mod:`vizapp.ablation`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from vizapp.analysis.windows import window_index
from vizapp.capture import AttentionCapture
from vizapp.errors import BadParameterError, UnsupportedModelError

#: the windowed families vizapp captures
WINDOWED_FAMILIES = "timm swin_* and swinv2_* (not swinv2_cr_*); transformers Swin and Swinv2 folders"


@dataclass(frozen=True)
class WindowSite:
    """One attention layer of a windowed model: its block, its attention module and how the block lays out windows.

    Attributes:
        block: the module whose forward partitions the grid (its input carries the grid, its attributes the window
            and shift).
        attn: the module that makes the attention call.
        stage: the stage (resolution level) the layer belongs to; a patch merging sits between stages.
        heads: attention heads of the layer.
        pad_first: True when the block pads the grid to whole windows before the cyclic shift (transformers), False
            when it shifts first and pads after (timm).
        probs: the module whose output is the probabilities (timm's ``softmax`` without fused attention), or None
            when the layer calls scaled_dot_product_attention.
        library: "timm" or "hf".
    """

    block: torch.nn.Module
    attn: torch.nn.Module
    stage: int
    heads: int
    pad_first: bool
    probs: torch.nn.Module | None
    library: str


@dataclass(frozen=True)
class WindowGeometry:
    """How one layer's forward laid out its windows.

    Attributes:
        grid: (gh, gw) token grid of the layer (before padding).
        window: (wh, ww) window size the block used (clamped to the grid by the library where the grid is smaller).
        shift: (sh, sw) cyclic shift, (0, 0) in unshifted blocks.
        pad_first: see :class:`WindowSite`.
        stage: see :class:`WindowSite`.
    """

    grid: tuple[int, int]
    window: tuple[int, int]
    shift: tuple[int, int]
    pad_first: bool
    stage: int

    @property
    def padded(self) -> tuple[int, int]:
        """(Hp, Wp): the grid padded to whole windows."""
        (gh, gw), (wh, ww) = self.grid, self.window
        return (-(-gh // wh) * wh, -(-gw // ww) * ww)

    @property
    def num_windows(self) -> int:
        hp, wp = self.padded
        return (hp // self.window[0]) * (wp // self.window[1])


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        return int(v[0]), int(v[1])
    return int(v), int(v)


def window_sites(model: torch.nn.Module) -> list[WindowSite]:
    """The attention layers of a timm Swin / Swin V2 or a transformers Swin / Swinv2 model, in forward order.

    Raises:
        UnsupportedModelError: for anything else (e.g. timm's swinv2_cr, whose blocks differ).
    """
    sites: list[WindowSite] = []
    stages = getattr(model, "layers", None)
    if isinstance(stages, torch.nn.Sequential) and type(model).__name__ in ("SwinTransformer", "SwinTransformerV2"):
        for s, stage in enumerate(stages):
            for blk in stage.blocks:
                attn = blk.attn
                fused = bool(getattr(attn, "fused_attn", False)) and type(model).__name__ == "SwinTransformer"
                probs = None if fused else getattr(attn, "softmax", None)
                if not fused and not isinstance(probs, torch.nn.Softmax):
                    raise UnsupportedModelError(f"{type(attn).__name__} has no softmax module vizapp can read")
                sites.append(WindowSite(blk, attn, s, int(attn.num_heads), False, probs, "timm"))
        return sites
    base = next(
        (getattr(model, a) for a in ("swin", "swinv2") if isinstance(getattr(model, a, None), torch.nn.Module)), model
    )
    encoder = getattr(base, "encoder", None)
    stages = getattr(encoder, "layers", None)
    if isinstance(stages, torch.nn.ModuleList) and type(base).__name__ in ("SwinModel", "Swinv2Model"):
        for s, stage in enumerate(stages):
            for blk in stage.blocks:
                attn = blk.attention
                probs = None  # Swin: the attention interface (SDPA)
                if type(base).__name__ == "Swinv2Model":  # cosine attention: softmax, then this dropout
                    attn = attn.self
                    probs = attn.dropout
                heads = int(getattr(attn, "num_attention_heads", 0) or getattr(attn, "num_heads", 0))
                sites.append(WindowSite(blk, attn, s, heads, True, probs, "hf"))
        return sites
    raise UnsupportedModelError(
        f"{type(model).__name__} is not a windowed-attention model vizapp can capture; supported: {WINDOWED_FAMILIES}"
    )


def output_projection(site: WindowSite) -> torch.nn.Linear:
    """The linear layer fed with the site's concatenated heads, [B·nW, w², H·d] (head h in columns h·d:(h+1)·d)."""
    if site.library == "timm":
        proj = getattr(site.attn, "proj", None)
    else:  # transformers Swin: the attention's o_proj; Swinv2: the attention's output.dense
        proj = getattr(site.attn, "o_proj", None) or getattr(
            getattr(site.block.attention, "output", None), "dense", None
        )
    if not isinstance(proj, torch.nn.Linear) or proj.in_features % site.heads:
        raise UnsupportedModelError(f"{type(site.attn).__name__} has no per-head output projection vizapp can ablate")
    return proj


def _geometry(site: WindowSite, grid: tuple[int, int]) -> WindowGeometry:
    return WindowGeometry(
        grid=grid,
        window=_pair(site.block.window_size),
        shift=_pair(site.block.shift_size),
        pad_first=site.pad_first,
        stage=site.stage,
    )


class WindowCapture:
    """Context manager recording every layer's window attention and geometry during one forward.

    Example::

        with WindowCapture(model) as cap:
            logits = model(x)
        a = cap.attention(0)  # [B, nW, H, wh*ww, wh*ww] float32
        cap.geometry[0]  # WindowGeometry

    Args:
        model: a windowed model (see :func:`window_sites`).
        with_grad: keep each layer's probabilities in the autograd graph (:meth:`attention_grads`).
        on_layer: called as ``on_layer(layer, attention, geometry)`` when each block is done, with its window attention
            [B, nW, H, w², w²] float32 (detached) and :class:`WindowGeometry`, during the forward.
        on_block: called as ``on_block(layer, output)`` with each block's output tokens [B, N, C] (detached).
        keep: keep every layer's attention after the forward (False: each is dropped once handed to ``on_layer``, so
            that a forward holds one layer's attention at a time).
        ablate: layer -> bool mask [B, H_l] (or [H_l] for every image): head h of image b is ablated in that layer
            (see the module docstring).
        ablate_mode: "zero" or "mean".
        record_head_outputs: keep each layer's concatenated heads [B, nW·w², H·d] (after ``ablate``, windows in the
            library's order, in the autograd graph) in ``head_outputs``.
        maps: record the attention (False: only the geometry, and ``ablate`` / ``record_head_outputs``; what head
            ablation needs, without forming any attention map).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        with_grad: bool = False,
        on_layer: Callable[[int, torch.Tensor, WindowGeometry], None] | None = None,
        on_block: Callable[[int, torch.Tensor], None] | None = None,
        keep: bool = True,
        ablate: Mapping[int, torch.Tensor] | None = None,
        ablate_mode: str = "zero",
        record_head_outputs: bool = False,
        maps: bool = True,
    ) -> None:
        self.sites = window_sites(model)
        if ablate_mode not in ("zero", "mean"):
            raise BadParameterError(f"ablation mode must be one of ('zero', 'mean'), got {ablate_mode!r}")
        self.ablate, self.ablate_mode = dict(ablate or {}), ablate_mode
        for layer in self.ablate:
            if not 0 <= layer < len(self.sites):
                raise BadParameterError(f"ablated layer must be in [0, {len(self.sites) - 1}], got {layer}")
        self.record_head_outputs = record_head_outputs
        self.head_outputs: list[torch.Tensor | None] = [None] * len(self.sites)
        self.model = model
        self.with_grad = with_grad
        self.on_layer, self.on_block, self.keep = on_layer, on_block, keep
        if not keep and on_layer is None:
            raise ValueError("keep=False drops each layer's attention once on_layer has it; pass on_layer")
        n = len(self.sites)
        self.geometry: list[WindowGeometry | None] = [None] * n
        self.maps: list[torch.Tensor | None] = [None] * n  # [B*nW, H, w², w²] as the layer used it
        self._grids: list[tuple[int, int] | None] = [None] * n
        self.record_maps = maps
        fused = [i for i, s in enumerate(self.sites) if s.probs is None and maps]
        self._fused = fused  # the inner capture's layer j is this capture's layer fused[j]
        # With gradients the inner capture keeps each layer's attention in the graph. Without, each layer's attention
        # is formed from its q and k when the attention module is done (_attn_done_hook, which runs before the inner
        # capture's own hook), and the inner capture then drops them: no layer's q and k outlive it.
        self._inner = (
            AttentionCapture(model, with_grad=with_grad, layers=[self.sites[i].attn for i in fused], keep_qk=with_grad)
            if fused
            else None
        )
        self._handles: list[Any] = []
        self._owner: int | None = None

    def __len__(self) -> int:
        return len(self.sites)

    def _mine(self) -> bool:
        return threading.get_ident() == self._owner

    def _block_hook(self, layer: int):
        site = self.sites[layer]

        def hook(_mod: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            if not self._mine():
                return
            if site.library == "timm":
                x = args[0] if args else kwargs["x"]  # [B, H, W, C]
                self._grids[layer] = (int(x.shape[1]), int(x.shape[2]))
            else:
                dims = args[1] if len(args) > 1 else kwargs["input_dimensions"]
                self._grids[layer] = (int(dims[0]), int(dims[1]))
            self.maps[layer] = None
            self.geometry[layer] = None

        return hook

    def _attn_pre_hook(self, layer: int):
        site = self.sites[layer]

        def hook(_mod: torch.nn.Module, _args: tuple) -> None:
            if self._mine() and self._grids[layer] is not None:
                # the block has clamped its window and shift to the grid by now (transformers does it in its forward)
                self.geometry[layer] = _geometry(site, self._grids[layer])

        return hook

    def _attn_done_hook(self, layer: int):
        j = self._fused.index(layer)

        def hook(_mod: torch.nn.Module, _args: tuple, _out: Any) -> None:
            if self._mine() and self.geometry[layer] is not None:
                self.maps[layer] = self._inner.attention(j)  # [B*nW, H, w², w²], from the call's own q, k and mask

        return hook

    def _block_done_hook(self, layer: int):
        def hook(_mod: torch.nn.Module, _args: tuple, out: Any) -> None:
            if not self._mine():
                return
            if self.on_layer is not None:
                self.on_layer(layer, self.attention(layer), self._check(layer))
            if self.on_block is not None:
                tokens = (out[0] if isinstance(out, (tuple, list)) else out).detach()
                self.on_block(layer, tokens.reshape(tokens.shape[0], -1, tokens.shape[-1]))  # [B, N, C]
            if not self.keep:
                self.maps[layer] = None

        return hook

    def _proj_hook(self, layer: int):
        site = self.sites[layer]
        mask = self.ablate.get(layer)

        def hook(_mod: torch.nn.Module, args: tuple) -> Any:
            if not self._mine():
                return None
            x = args[0]  # [B*nW, w², H*d]
            g = self._check(layer)
            b = x.shape[0] // g.num_windows
            xh = x.reshape(b, -1, site.heads, x.shape[-1] // site.heads)  # [B, nW*w², H, d]
            if mask is not None:
                m = mask.to(device=x.device, dtype=torch.bool)
                if m.shape[-1] != site.heads or m.dim() > 2 or (m.dim() == 2 and m.shape[0] != b):
                    raise BadParameterError(
                        f"layer {layer}: head mask {tuple(m.shape)} does not fit [B={b}, H={site.heads}]"
                    )
                if self.ablate_mode == "zero":
                    new = torch.zeros_like(xh)
                else:  # the mean over the image's real (unpadded) tokens of this layer
                    real = (window_index(g.grid, g.window, g.shift, g.pad_first) >= 0).reshape(-1).to(x.device)
                    new = xh[:, real].mean(dim=1, keepdim=True).expand_as(xh)
                xh = torch.where(m.reshape(-1, 1, site.heads, 1), new, xh)
            if mask is None and not self.record_head_outputs:
                return None
            out = xh.flatten(-2)  # [B, nW*w², H*d]: what the projection is given, so that gradients reach it
            if self.record_head_outputs:
                self.head_outputs[layer] = out
            return (out.reshape(x.shape),) + tuple(args[1:])

        return hook

    def _probs_hook(self, layer: int):
        def hook(_mod: torch.nn.Module, _args: tuple, out: torch.Tensor) -> None:
            if self._mine():
                self.maps[layer] = out if self.with_grad and torch.is_grad_enabled() else out.detach()

        return hook

    def __enter__(self) -> WindowCapture:
        self._owner = threading.get_ident()
        try:
            for i, site in enumerate(self.sites):
                self._handles.append(site.block.register_forward_pre_hook(self._block_hook(i), with_kwargs=True))
                self._handles.append(site.attn.register_forward_pre_hook(self._attn_pre_hook(i)))
                if (
                    site.probs is None and not self.with_grad and self.record_maps
                ):  # registered before the inner capture's hooks
                    self._handles.append(site.attn.register_forward_hook(self._attn_done_hook(i)))
                if self.on_layer is not None or self.on_block is not None:
                    self._handles.append(site.block.register_forward_hook(self._block_done_hook(i)))
                if site.probs is not None and self.record_maps:
                    self._handles.append(site.probs.register_forward_hook(self._probs_hook(i)))
                if i in self.ablate or self.record_head_outputs:
                    self._handles.append(output_projection(site).register_forward_pre_hook(self._proj_hook(i)))
            if self._inner is not None:
                self._inner.__enter__()
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._inner is not None:
            self._inner.remove()

    # -- results -------------------------------------------------------------------------------------------------
    def _layer_maps(self, layer: int) -> torch.Tensor:
        """[B*nW, H, w², w²]: the probabilities of ``layer`` (in the graph when recorded with gradients)."""
        m = self.maps[layer]
        if m is not None:
            return m
        if layer in self._fused and self.with_grad:
            j = self._fused.index(layer)
            inner = self._inner
            if inner.maps[j] is not None:
                return inner.maps[j]
            return inner.attention(j)  # the forward ran without gradients: from its q and k
        raise RuntimeError(f"layer {layer} recorded nothing; run the model's forward inside the `with` block")

    def _check(self, layer: int) -> WindowGeometry:
        g = self.geometry[layer]
        if g is None:
            raise RuntimeError(f"layer {layer} recorded no geometry; run the model's forward inside the `with` block")
        return g

    def attention(self, layer: int) -> torch.Tensor:
        """Window attention of ``layer``, [B, nW, H, wh·ww, wh·ww] float32 (detached), windows in the library's
        order over the shifted, padded grid (see :func:`vizapp.analysis.windows.window_index`)."""
        g = self._check(layer)
        a = self._layer_maps(layer).detach().float()
        return a.reshape(-1, g.num_windows, *a.shape[1:])

    def graph_maps(self) -> list[torch.Tensor]:
        """Every layer's probabilities as the forward used them (in the autograd graph with ``with_grad``), [B*nW, H,
        w², w²] each: what :func:`torch.autograd.grad` differentiates against."""
        if not self.with_grad:
            raise RuntimeError("WindowCapture(model, with_grad=True) is needed for gradients")
        maps = [self._layer_maps(i) for i in range(len(self))]
        if any(not m.requires_grad for m in maps):
            raise RuntimeError("no attention recorded with its graph; run the forward with gradients enabled")
        return maps


def read_relative_bias(site: Any) -> torch.Tensor | None:
    """[H, 2wh − 1, 2ww − 1] a layer's learned bias over (Δrow, Δcol) = query − key, read from its weights now: Swin's
    table, or Swin V2's continuous bias 16·sigmoid(MLP(log-spaced offsets)) evaluated from its MLP."""
    attn = site.attn
    holder = getattr(attn, "relative_position_bias", None)  # transformers Swin keeps its table in a submodule
    table = getattr(attn, "relative_position_bias_table", None)
    if table is None:
        table = getattr(holder, "relative_position_bias_table", None)
    mlp = getattr(attn, "cpb_mlp", None) or getattr(attn, "continuous_position_bias_mlp", None)
    window = getattr(attn, "window_size", None) or getattr(holder, "window_size", None)
    if window is None:
        return None
    wh, ww = (int(v) for v in (window if isinstance(window, (tuple, list)) else (window, window)))
    if isinstance(table, torch.Tensor) and table.shape[0] == (2 * wh - 1) * (2 * ww - 1):
        return table.detach().float().cpu().view(2 * wh - 1, 2 * ww - 1, -1).permute(2, 0, 1).contiguous()
    coords = getattr(attn, "relative_coords_table", None)
    if mlp is not None and isinstance(coords, torch.Tensor) and coords.shape[1:3] == (2 * wh - 1, 2 * ww - 1):
        with torch.no_grad():
            out = 16 * torch.sigmoid(mlp(coords).float())  # [1, 2wh − 1, 2ww − 1, H]
        return out[0].cpu().permute(2, 0, 1).contiguous()
    return None
