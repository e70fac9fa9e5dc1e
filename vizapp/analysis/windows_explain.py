"""AttnLRP (Achtibat et al., ICML 2024) and LeGrad (Bousselham et al., 2024) for windowed-attention models (Swin,
Liu et al. 2021): timm ``swin_*`` / ``swinv2_*`` and transformers Swin / Swinv2, maps over the first stage's grid.

AttnLRP. The rule set of :mod:`vizapp.analysis.attnlrp` (lxt's for a ViT), applied to every module of a Swin: the
identity rule through every LayerNorm (the blocks', the patch embedding's, each patch merging's and the final one:
the standard deviation detached) and every element-wise activation (GELU: the detached ratio f(x) / (x + 1e-10));
CP-LRP inside each window's attention: q and k detached, so no relevance flows through the softmax, whose other
inputs (the relative-position bias, Swin V2's logit scale and continuous bias, the shift mask) do not depend on the
image at all; the plain gradient through every linear map (qkv, the projections, the MLP's layers, the patch
merging's reduction, the head), the cyclic shift, the window partition, the padding, the concatenation of a patch
merging's 2x2 tokens and the average pooling, all of which are linear. The relevance of each input pixel is
x · ∂̃y_c/∂x at the normalised input (one forward, one backward); the map sums it over the channels and over each
first-stage patch's pixels (pixels the library pads to whole patches are zeros, so they carry none), signed.

LeGrad. Its class score is read from a block's output through the model's own final norm, average pooling and
linear head, and that head takes only the LAST stage's channel width (each patch merging doubles the width and halves
the grid). So vizapp defines LeGrad for Swin over the blocks of the last stage, the only ones whose output the head
can read. For each such block l: s_l = head(pool(norm(z_l)))[c]; the gradient of s_l with respect to the block's
window attention after the softmax, [nW, H, w², w²] as the library forms it (the shift mask's pairs included: their
weight is ~0, their gradient the score's sensitivity to them); ReLU; the mean over the heads and over each window's
query rows (its real ones: padded slots are no token, and their gradient is 0 since the library crops their outputs);
each key column placed on its token of the stage's grid (the window partition and the cyclic shift undone, padded
slots dropped). The blocks' maps are summed, carried to the first stage's grid by nearest neighbour (a last-stage
token, k patch mergings down, covers its 2^k x 2^k first-stage tokens, fewer at an odd edge the library padded), and
min-max scaled. As for the ViT, one forward and one backward give every block's ∂s_l/∂A_l: each block starts from
its input detached, so s_l reaches only block l's attention.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from vizapp.analysis.attnlrp import (  # noqa: F401  (patch_sums: named here too, where the tests find it)
    explained_input,
    input_times_gradient,
    is_activation,
    patch_sums,
    relevance_rules,
)
from vizapp.analysis.legrad import explained_classes, isolated_blocks, min_max
from vizapp.transfer import tensor_on, to_device

SUPPORTED = (
    "the windowed rules cover timm swin_* / swinv2_* and transformers Swin / Swinv2 models built of linear layers, "
    "LayerNorm, an element-wise activation module, window softmax attention and an average-pooling head"
)
"""The windowed models the rules cover, as the refusals say it."""

# Every module a covered Swin may hold: linear in its input, apart from LayerNorm and the activation modules (both
# given their rule) and the window softmax (whose gradient is stopped).
_ALLOWED = {
    "torch.nn.modules.container": ("ModuleList", "Sequential", "ModuleDict"),
    "torch.nn.modules.linear": ("Linear", "Identity"),
    "torch.nn.modules.conv": ("Conv2d",),
    "torch.nn.modules.dropout": ("Dropout",),
    "torch.nn.modules.normalization": ("LayerNorm",),
    "torch.nn.modules.activation": ("Softmax",),
    "torch.nn.modules.pooling": ("AdaptiveAvgPool1d",),
    "torch.nn.modules.flatten": ("Flatten",),
    "timm.layers.adaptive_avgmax_pool": ("FastAdaptiveAvgPool", "SelectAdaptivePool2d"),
    "timm.layers.classifier": ("ClassifierHead",),
    "timm.layers.drop": ("DropPath",),
    "timm.layers.mlp": ("Mlp",),
    "timm.layers.patch_embed": ("PatchEmbed",),
    "timm.models.swin_transformer": (
        "SwinTransformer",
        "SwinTransformerStage",
        "SwinTransformerBlock",
        "WindowAttention",
        "PatchMerging",
    ),
    "timm.models.swin_transformer_v2": (
        "SwinTransformerV2",
        "SwinTransformerV2Stage",
        "SwinTransformerV2Block",
        "WindowAttention",
        "PatchMerging",
    ),
}
# transformers Swin / Swinv2: every module of these two families is one of the plain kinds above or a container of
# them (embeddings, layers, attention, MLP, patch merging, drop path), its activation a module
_HF_FAMILIES = ("transformers.models.swin.", "transformers.models.swinv2.")


def _kind(m: torch.nn.Module) -> tuple[str, str]:
    return type(m).__module__, type(m).__name__


def unsupported(model: torch.nn.Module) -> str:
    """Why AttnLRP's rules are not defined for the windowed ``model`` ("" when they are)."""
    for name, m in model.named_modules():
        module, cls = _kind(m)
        pool = getattr(m, "pool_type", "avg")
        if cls == "SelectAdaptivePool2d" and pool not in ("avg", "fast_avg"):
            return f"its head pools by {pool!r}, not the average pooling the rules are written for"
        if isinstance(m, torch.nn.LayerNorm) and len(m.normalized_shape) != 1:
            return f"{name} normalises over {len(m.normalized_shape)} dimensions"
        if is_activation(m) or cls in _ALLOWED.get(module, ()) or module.startswith(_HF_FAMILIES):
            continue
        return f"{name or 'the model'} is {cls}, for which vizapp's windowed AttnLRP has no rule"
    return ""


def attnlrp(
    model: torch.nn.Module,
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    classes: Sequence[int | None],
    patch_size: tuple[int, int],
) -> tuple[torch.Tensor, list[int]]:
    """AttnLRP maps of a batch of a windowed model from one forward and one backward, [B, gh, gw] float32, signed,
    over the first stage's grid (read from the forward).

    Args:
        model: a Swin :func:`unsupported` accepts, in eval mode.
        logits_fn: x -> logits [B, K] (the model's own forward).
        x: the input [B, C, H, W], normalised as the model expects, on the model's device.
        classes: one per image: the class explained, or None for the image's top-1 class (from this forward).
        patch_size: the patch size in pixels.

    Returns:
        (the maps, the classes explained).

    Raises:
        ValueError: the model is not one the rules cover (the message says which are), or bad arguments.
    """
    from vizapp.windows import WindowCapture

    x = explained_input(unsupported(model), SUPPORTED, classes, x)
    with torch.enable_grad(), relevance_rules(model), WindowCapture(model, with_grad=True) as cap:
        logits = logits_fn(x)
    # no relevance through the window softmax either
    return input_times_gradient(logits, cap.graph_maps(), x, classes, cap.geometry[0].grid, patch_size)


def window_columns(grads: torch.Tensor, index: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """One layer's LeGrad map on its grid: ∂s/∂A [B, nW, H, w², w²] -> [B, N] float32: ReLU, the mean over the heads
    and over each window's real query rows, each key column added at its token (``index`` [nW, w²], a layer's
    :func:`vizapp.analysis.windows.window_index`, -1 for padding: those columns are dropped)."""
    host = index.cpu()  # the real slots are picked on the host: a mask on the device would make the host wait
    real_h = host >= 0  # [nW, w²]
    real = to_device(real_h, grads.device)
    slots = to_device(real_h.reshape(-1).nonzero().squeeze(1), grads.device)  # the real slots, row-major
    tokens = to_device(host[real_h], grads.device)  # their grid tokens, in that order
    e = grads.float().clamp(min=0).mean(dim=2) * real[None, :, :, None]  # [B, nW, w² queries, w² keys]
    rows = real.sum(dim=1).clamp(min=1).float()  # real queries per window
    cols = e.sum(dim=2) / rows[None, :, None]  # [B, nW, w²]
    out = torch.zeros(grads.shape[0], num_tokens, dtype=torch.float32, device=grads.device)
    return out.index_add_(1, tokens, cols.reshape(grads.shape[0], -1)[:, slots])


def to_first_grid(maps: torch.Tensor, first_grid: tuple[int, int], merges: int) -> torch.Tensor:
    """A map [B, gh, gw] of a stage ``merges`` patch mergings down, on the first stage's grid [B, gh0, gw0] by nearest
    neighbour: first-stage token (r, c) takes the value of (r // 2^k, c // 2^k), the token it was merged into (each
    merging takes 2x2 tokens, the library padding an odd grid by one row or column)."""
    (gh0, gw0), s = first_grid, 2**merges
    if maps.shape[-2:] != (-(-gh0 // s), -(-gw0 // s)):
        raise ValueError(f"a {tuple(maps.shape[-2:])} grid is not {gh0}x{gw0} merged {merges} times")
    rows = torch.arange(gh0, device=maps.device) // s
    cols = torch.arange(gw0, device=maps.device) // s
    return maps[:, rows][:, :, cols]


def legrad(
    model: torch.nn.Module,
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    lens_fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    classes: Sequence[int | None],
    start_layer: int = 0,
) -> tuple[torch.Tensor, list[int]]:
    """LeGrad maps of a batch of a windowed model over the blocks of its last stage (see the module docstring), from
    one forward and one backward: [B, gh0, gw0] float32 in [0, 1] on the first stage's grid.

    Args:
        model: a Swin vizapp captures (:func:`vizapp.windows.window_sites`), in eval mode.
        logits_fn: x -> logits [B, K] (the model's own forward).
        lens_fn: a last-stage block's output -> logits [B, K] through the model's final norm, pooling and head.
        x: the input [B, C, H, W], normalised as the model expects, on the model's device.
        classes: one per image: the class explained, or None for the image's top-1 class (from this forward).
        start_layer: the first attention layer (counted over all stages) summed: 0 or any layer up to the last
            stage's first gives all of the last stage's blocks; a later one, the last stage's blocks from it on.

    Returns:
        (the maps, the classes explained).
    """
    from vizapp.analysis.windows import window_index
    from vizapp.windows import WindowCapture

    cap = WindowCapture(model, with_grad=True)
    depth = len(cap.sites)
    if isinstance(start_layer, bool) or not isinstance(start_layer, int) or not 0 <= start_layer < depth:
        raise ValueError(f"start_layer must be an integer in [0, {depth - 1}], got {start_layer!r}")
    if len(classes) != x.shape[0]:
        raise ValueError(f"give one class per image ({x.shape[0]}), got {len(classes)}")
    last = max(s.stage for s in cap.sites)
    layers = [i for i, s in enumerate(cap.sites) if s.stage == last and i >= start_layer]
    outputs: list[Any] = [None] * depth
    # every block isolated (its input a fresh leaf), so every layer's attention is in a graph, and s_l reaches only
    # block l's attention
    with torch.enable_grad(), isolated_blocks([s.block for s in cap.sites], outputs), cap:
        logits = logits_fn(x.detach())
        if any(outputs[i] is None for i in layers):
            raise ValueError("some last-stage block never ran")
        cls = explained_classes(logits, classes)
        idx = tensor_on(cls, logits.device)[:, None]
        score = sum(lens_fn(outputs[i]).gather(1, idx).sum() for i in layers)
    maps = cap.graph_maps()
    grads = torch.autograd.grad(score, [maps[i] for i in layers])  # ∂s_l/∂A_l, [B*nW, H, w², w²] each
    b = x.shape[0]
    total = None
    for i, g in zip(layers, grads, strict=True):
        geo = cap.geometry[i]
        index = window_index(geo.grid, geo.window, geo.shift, geo.pad_first)
        per = window_columns(g.detach().reshape(b, geo.num_windows, *g.shape[1:]), index, geo.grid[0] * geo.grid[1])
        total = per if total is None else total + per
    grid = cap.geometry[layers[0]].grid
    first = to_first_grid(total.reshape(b, *grid), cap.geometry[0].grid, last)
    return min_max(first), cls
