"""The bundled Fashion-MNIST ViT reproduces the accuracy its model card claims, on all 10,000 test images."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch

from vizapp.bundled.data import FASHION_MNIST_DIR, load_fashion_mnist

MODELS = Path(__file__).resolve().parent.parent / "vizapp" / "bundled" / "weights"
CARD = MODELS / "fmnist_vit.json"
WEIGHTS = MODELS / "fmnist_vit.safetensors"

pytestmark = pytest.mark.skipif(
    not (Path(FASHION_MNIST_DIR) / "t10k-images-idx3-ubyte.gz").is_file(),
    reason=f"Fashion-MNIST not installed in {FASHION_MNIST_DIR} (apt-get install dataset-fashion-mnist)",
)


def _card() -> dict:
    return json.loads(CARD.read_text())


@functools.lru_cache(maxsize=1)
def _measured_accuracy() -> float:
    from safetensors.torch import load_file
    from timm.models.vision_transformer import VisionTransformer

    card = _card()
    assert card["architecture"] == "VisionTransformer"
    assert WEIGHTS.stat().st_size < 10 * 1024 * 1024, "the bundled weights must stay small"
    model = VisionTransformer(**card["model_args"])
    model.load_state_dict(load_file(str(WEIGHTS)), strict=True)
    model.eval()

    images, labels = load_fashion_mnist("test")
    assert len(images) == 10_000
    mean = torch.tensor(card["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(card["std"]).view(1, -1, 1, 1)
    x_all = torch.from_numpy(images).unsqueeze(1)
    y_all = torch.from_numpy(labels)
    correct = 0
    with torch.inference_mode():
        for i in range(0, len(x_all), 1000):
            x = (x_all[i : i + 1000].float() / 255.0 - mean) / std
            correct += int((model(x).argmax(-1) == y_all[i : i + 1000]).sum())
    return correct / len(x_all)


def test_bundled_model_accuracy_matches_card() -> None:
    card = _card()
    acc = _measured_accuracy()
    assert abs(acc - card["test_accuracy"]) <= 0.002, f"measured {acc:.4f}, card says {card['test_accuracy']:.4f}"


def test_bundled_model_reaches_90_percent() -> None:
    assert _measured_accuracy() >= 0.90
