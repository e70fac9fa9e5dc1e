"""A transformers model's own image processor, as vizapp applies it: the transform, its mean and std, and the
largest input it can make of an upload (what the analysis budget is checked against)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image


def image_processor(
    folder: str, model_type: str, size: tuple[int, int]
) -> tuple[Callable, tuple, tuple, tuple[int, int]]:
    """The library's own image processor: from preprocessor_config.json when present, else the model type's
    default processor resized to the model's input size. -> (transform, mean, std, the size it makes of a square
    image, see :func:`processed_size`)."""
    import transformers

    proc = None
    if (Path(folder) / "preprocessor_config.json").is_file():
        try:
            proc = transformers.AutoImageProcessor.from_pretrained(
                folder, local_files_only=True, trust_remote_code=False
            )
        except (OSError, ValueError):
            proc = None
    if proc is None:
        from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING_NAMES

        names = IMAGE_PROCESSOR_MAPPING_NAMES.get(model_type.replace("_vision_model", ""))
        names = names if names is not None else IMAGE_PROCESSOR_MAPPING_NAMES.get("vit")
        if isinstance(names, dict):
            names = tuple(names.values())
        cls_name = next(n for n in ((names,) if isinstance(names, str) else names) if n)
        proc = getattr(transformers, cls_name)()
        h, w = size
        proc.size = {"height": h, "width": w}
        if getattr(proc, "crop_size", None) is not None:
            proc.crop_size = {"height": h, "width": w}

    def transform(img: Image.Image) -> torch.Tensor:
        return proc(images=img.convert("RGB"), return_tensors="pt")["pixel_values"][0]

    mean, std = tuple(float(v) for v in proc.image_mean), tuple(float(v) for v in proc.image_std)
    return transform, mean, std, processed_size(proc, size)


def processed_size(proc: Any, size: tuple[int, int]) -> tuple[int, int]:
    """The largest (height, width) an image processor makes of an upload: its crop when it crops, else its resize
    target; a shortest edge without a crop scales the other side with the image's aspect ratio (a 100:1 upload at
    shortest edge 224 is 22,400 px long), so that side is its longest edge, or without one as many pixels as vizapp
    decodes (the budget then refuses it); without resizing, the largest image vizapp decodes. ``size`` when it names
    none of these."""

    def get(d: Any, key: str) -> int | None:
        v = d.get(key) if isinstance(d, dict) else getattr(d, key, None)
        return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 else None

    crop = getattr(proc, "crop_size", None)
    if getattr(proc, "do_center_crop", False) and get(crop, "height") and get(crop, "width"):
        return get(crop, "height"), get(crop, "width")  # type: ignore[return-value]
    if getattr(proc, "do_resize", True) is False:
        from vizapp.imageio import DEFAULT_MAX_PIXELS

        side = int(DEFAULT_MAX_PIXELS**0.5)
        return side, side
    target = getattr(proc, "size", None)
    if get(target, "height") and get(target, "width"):
        return get(target, "height"), get(target, "width")  # type: ignore[return-value]
    edge = get(target, "shortest_edge")
    if edge:  # a long side follows the image's aspect ratio: bounded by longest_edge, or by nothing vizapp controls
        from vizapp.imageio import DEFAULT_MAX_PIXELS

        return edge, max(edge, get(target, "longest_edge") or DEFAULT_MAX_PIXELS)
    return size
