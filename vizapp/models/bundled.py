"""The bundled offline model (and any timm ViT saved the same way): a .safetensors file with a model card .json.

The card holds the constructor arguments, the preprocessing (size, mean/std, polarity) and the class names, so the
model loads with no network and without unpickling anything.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from vizapp.errors import ModelLoadError
from vizapp.models.base import BUNDLED, BUNDLED_CARD, VizModel, check_geometry, first_line, read_json_object
from vizapp.models.timm import load_safetensors_into, wrap


def bundled_transform(card: dict[str, Any]) -> Callable[[Image.Image], torch.Tensor]:
    """PIL.Image (any mode/size) -> tensor [C, H, W] as the bundled model was trained, driven by its card.

    The image is made grayscale, its polarity matched to the card (Fashion-MNIST: light object on a dark
    background; a photo on a white background is inverted), padded to a square with its own background colour
    (so the object keeps its aspect ratio), resized, and normalised with the card's mean/std.
    """
    c, h, w = (int(v) for v in card["input_size"])
    mean = torch.tensor(card["mean"], dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(card["std"], dtype=torch.float32).view(-1, 1, 1)
    polarity = card.get("polarity", "light_on_dark")
    resample = (
        Image.Resampling.BILINEAR if card.get("interpolation", "bilinear") == "bilinear" else Image.Resampling.BICUBIC
    )

    def transform(img: Image.Image) -> torch.Tensor:
        g = img.convert("L")
        a = np.asarray(g, dtype=np.float32) / 255.0  # [H, W]
        border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
        bg = float(np.median(border))
        if (polarity == "light_on_dark" and bg > 0.5) or (polarity == "dark_on_light" and bg < 0.5):
            a, bg = 1.0 - a, 1.0 - bg
        ih, iw = a.shape
        side = max(ih, iw)
        if ih != iw:
            sq = np.full((side, side), bg, dtype=np.float32)
            top, left = (side - ih) // 2, (side - iw) // 2
            sq[top : top + ih, left : left + iw] = a
            a = sq
        if a.shape != (h, w):
            a = np.asarray(Image.fromarray(a).resize((w, h), resample=resample, reducing_gap=None))
        x = torch.from_numpy(np.array(a, dtype=np.float32)).float().clamp(0, 1)[None].expand(c, h, w)
        return (x - mean) / std

    return transform


def load_card(path: Path) -> dict[str, Any]:
    """The model card at ``path``, checked: a JSON object with the constructor arguments (a mapping), the input size
    (C, H, W, whole numbers above zero), the normalisation (one mean and std per channel, std non-zero) and the
    class names. Messages name the file, never its folder."""
    fix = f"fix model card {path.name} (or write it again with `python -m vizapp.bundled.train`)"
    if not path.is_file():
        raise ModelLoadError(f"model card {path.name} is missing; run `python -m vizapp.bundled.train` to create it")
    card = read_json_object(path, f"model card {path.name}", fix)
    for key in ("model_args", "input_size", "mean", "std", "class_names"):
        if key not in card:
            raise ModelLoadError(f"model card {path.name} lacks '{key}'; {fix}")
    if not isinstance(card["model_args"], dict):
        raise ModelLoadError(f"model card {path.name}: model_args must be an object of constructor arguments; {fix}")
    check_geometry(f"model card {path.name}", card["model_args"], fix)
    size = card["input_size"]
    if not (isinstance(size, list) and len(size) == 3):
        raise ModelLoadError(f"model card {path.name}: input_size must be [channels, height, width]; {fix}")
    check_geometry(f"model card {path.name}", {"image_size": size}, fix)
    for key in ("mean", "std"):
        v = card[key]
        if not (
            isinstance(v, list)
            and len(v) == size[0]
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v)
        ):
            raise ModelLoadError(
                f"model card {path.name}: {key} must be {size[0]} finite numbers, one a channel; {fix}"
            )
    if not all(x != 0 for x in card["std"]):
        raise ModelLoadError(f"model card {path.name}: std must not be 0; {fix}")
    if not (isinstance(card["class_names"], list) and all(isinstance(c, str) for c in card["class_names"])):
        raise ModelLoadError(f"model card {path.name}: class_names must be a list of names; {fix}")
    return card


def _build_from_card(card_path: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    from timm.models.vision_transformer import VisionTransformer

    card = load_card(card_path)
    weights = card_path.with_suffix(".safetensors")
    if not weights.is_file():
        raise ModelLoadError(f"weights {weights.name} are missing; run `python -m vizapp.bundled.train` to create them")
    try:
        model = VisionTransformer(**card["model_args"])
    except Exception as e:  # noqa: BLE001 - an unknown argument or values timm cannot build: the card's fault
        raise ModelLoadError(
            f"model card {card_path.name}: its model_args cannot build a ViT ({type(e).__name__}: {first_line(e)}); "
            f"fix model_args in the card"
        ) from e
    load_safetensors_into(model, weights)
    return model, card


def load(name: str, device: torch.device, dtype: torch.dtype) -> VizModel:
    """ "bundled", a model card .json, or a .safetensors file with a card beside it."""
    card_path = BUNDLED_CARD if name == BUNDLED else Path(name).with_suffix(".json")
    model, card = _build_from_card(card_path)
    if name == BUNDLED or name.endswith(".json"):
        source = "bundled"
        note = (
            f"Bundled offline model: a small ViT trained here on Fashion-MNIST "
            f"({100 * float(card.get('test_accuracy', float('nan'))):.1f}% test accuracy); it sees 28x28 grayscale."
        )
    else:
        source, note = "file", f"Weights from {Path(name).name}."
    return wrap(
        model,
        name,
        source,
        note,
        device,
        dtype,
        transform=bundled_transform(card),
        labels=tuple(card["class_names"]),
        input_size=tuple(int(v) for v in card["input_size"]),
        mean=card["mean"],
        std=card["std"],
        card=card,
    )


#: Thresholds of :func:`input_distribution_note`; measured on the Fashion-MNIST test set and scikit-image's photos
#: (tests/test_ui_events.py checks both sides: none of 1,000 test images is flagged, the example photos are).
MAX_SATURATION = 0.15
MIN_PLAIN_BORDER = 0.5


def input_distribution_note(card: dict[str, Any], img: Image.Image) -> str:
    """A sentence when ``img`` is far from what a card model was trained on ("" when it looks alike).

    The bundled model saw greyscale product photos on a plain background (Fashion-MNIST). Two measures of the
    uploaded image say how far it is from that: its mean colour saturation ((max - min) / max over RGB, 0 for grey),
    and the share of its border pixels within 0.1 of the border's median brightness (1 for a plain background).
    """
    rgb = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0  # [H, W, 3]
    hi, lo = rgb.max(-1), rgb.min(-1)
    saturation = float(np.mean(np.where(hi > 0.05, (hi - lo) / np.maximum(hi, 1e-6), 0.0)))
    g = rgb.mean(-1)
    border = np.concatenate([g[0], g[-1], g[:, 0], g[:, -1]])
    plain = float(np.mean(np.abs(border - np.median(border)) <= 0.1))
    why = []
    if saturation > MAX_SATURATION:
        why.append(f"it is in colour (mean saturation {saturation:.2f}; the training images are grey)")
    if plain < MIN_PLAIN_BORDER:
        why.append(f"its background is not plain (only {100 * plain:.0f}% of the border is one shade)")
    if not why:
        return ""
    c, h, w = (int(v) for v in card["input_size"])
    return (
        f"**This image is far from what the model was trained on**: {' and '.join(why)}. The model saw {h}x{w} "
        "greyscale product photos on a plain background (Fashion-MNIST), so its prediction here means little."
    )
