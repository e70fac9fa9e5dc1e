"""The Swin adapter: timm ``swin_*`` / ``swinv2_*`` (``SwinTransformer``, ``SwinTransformerV2``) and transformers
Swin / Swinv2 folders. Windowed attention: per-stage token grids, head counts and windows (see :mod:`vizapp.windows`).

What the analyses need is read from the model: the first stage's grid and patch size from its patch embedding; the
layers, their stages and heads from :func:`vizapp.windows.window_sites`; each layer's window, shift and grid from
the forward itself. Swin has no class token: its head averages the last stage's tokens (readout "patches"), and its
position information is the learned relative-position bias inside each window ("relative").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from vizapp.errors import UnsupportedModelError
from vizapp.models.base import VizModel, pair

TIMM_CLASSES = ("SwinTransformer", "SwinTransformerV2")


def is_windowed(model: torch.nn.Module) -> bool:
    """Whether ``model`` is a windowed-attention model this adapter takes."""
    if type(model).__name__ in TIMM_CLASSES:
        return True
    base = next(
        (getattr(model, a) for a in ("swin", "swinv2") if isinstance(getattr(model, a, None), torch.nn.Module)), model
    )
    return type(base).__name__ in ("SwinModel", "Swinv2Model")


def stage_strides(vm: VizModel, stages: int) -> list[tuple[int, int]]:
    """Token spacing in input pixels of each stage: the patch size times 2 per patch merging before it."""
    ph, pw = vm.patch_size
    return [(ph * 2**s, pw * 2**s) for s in range(stages)]


def _timm_meta(model: torch.nn.Module) -> dict[str, Any]:
    pe = model.patch_embed
    grid = pair(pe.grid_size)

    def grid_fn(height: int, width: int) -> tuple[int, int]:
        return grid

    return {"grid_size": grid, "patch_size": pair(pe.patch_size), "grid_fn": grid_fn}


def _forward(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return out.logits if hasattr(out, "logits") else out


def _hf_forward(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(pixel_values=x)
    logits = getattr(out, "logits", None)
    return logits if logits is not None else out.pooler_output


def wrap(
    model: torch.nn.Module,
    name: str,
    source: str,
    note: str,
    device: torch.device,
    dtype: torch.dtype,
    transform: Callable,
    labels: tuple[str, ...],
    input_size: tuple[int, int, int],
    mean: Any,
    std: Any,
    library: str,
) -> VizModel:
    """A :class:`VizModel` for a built Swin (timm or transformers)."""
    from vizapp.windows import window_sites

    sites = window_sites(model)  # raises for anything it cannot capture
    model.eval().to(device=device, dtype=dtype)
    if library == "timm":
        meta = _timm_meta(model)
        forward = _forward
    else:
        cfg = model.config
        patch = pair(cfg.patch_size)
        grid = (-(-input_size[1] // patch[0]), -(-input_size[2] // patch[1]))  # transformers pads the last patch

        def grid_fn(height: int, width: int) -> tuple[int, int]:
            return (-(-height // patch[0]), -(-width // patch[1]))

        meta = {"grid_size": grid, "patch_size": patch, "grid_fn": grid_fn}
        forward = _hf_forward
    return VizModel(
        name=name,
        model=model,
        device=device,
        transform=transform,
        labels=labels,
        num_prefix_tokens=0,
        no_embed_class=True,
        input_size=input_size,
        mean=tuple(float(v) for v in mean),
        std=tuple(float(v) for v in std),
        source=source,
        note=note,
        dtype=dtype,
        num_layers=len(sites),
        num_heads=max(s.heads for s in sites),
        forward_fn=forward,
        has_class_token=False,
        readout="patches",
        family=library,
        position="relative",
        windowed=True,
        **meta,
    )


def wrap_timm(model: torch.nn.Module, name: str, source: str, note: str, device: torch.device, dtype: torch.dtype):
    """A timm Swin with timm's preprocessing and labels."""
    from timm.data import create_transform, resolve_data_config

    from vizapp.models.timm import imagenet_labels

    if type(model).__name__ not in TIMM_CLASSES:
        raise UnsupportedModelError(f"{name} ({type(model).__name__}) is not a timm Swin")
    cfg = resolve_data_config(model=model)
    cfg["input_size"] = (int(cfg["input_size"][0]), *pair(model.patch_embed.img_size))
    transform = create_transform(**cfg, is_training=False)
    return wrap(
        model,
        name,
        source,
        note,
        device,
        dtype,
        transform,
        imagenet_labels(model),
        tuple(int(v) for v in cfg["input_size"]),
        cfg["mean"],
        cfg["std"],
        "timm",
    )
