"""The bundled model through the public API: offline loading, the card-driven transform, token bookkeeping."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import vizapp
from vizapp import models
from vizapp.imageio import decode_image

EXAMPLES = models.ASSETS_DIR / "examples"


@pytest.fixture(scope="module")
def bundled():
    return vizapp.load_model("bundled", device="cpu")


def test_bundled_loads_offline_with_its_card(bundled):
    assert bundled.source == "bundled" and bundled.labels[7] == "Sneaker"
    assert (bundled.num_prefix_tokens, bundled.grid_size, bundled.patch_size) == (1, (7, 7), (4, 4))
    assert bundled.input_size == (1, 28, 28)
    assert "Fashion-MNIST" in bundled.note and "%" in bundled.note
    assert bundled.pos_similarity().shape == (7, 7, 7, 7)


def test_transform_reproduces_training_preprocessing_on_dataset_images(bundled):
    path = EXAMPLES / "fmnist_7_sneaker.png"
    raw = np.asarray(Image.open(path).convert("L"), dtype=np.float32) / 255.0
    expected = (torch.from_numpy(raw)[None] - bundled.mean[0]) / bundled.std[0]
    got = bundled.transform(decode_image(str(path)).image)  # as the app sees it: decoded to RGB
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_transform_matches_polarity_of_a_photo_on_white(bundled):
    # A dark object on a white, non-square background: inverted to a light object on dark, padded square.
    img = np.full((60, 100, 3), 255, dtype=np.uint8)
    img[20:40, 40:60] = 20
    x = bundled.transform(Image.fromarray(img))
    background = (0.0 - bundled.mean[0]) / bundled.std[0]
    assert x.shape == (1, 28, 28)
    assert float(x[0, 0, 0]) == pytest.approx(background, abs=1e-4)  # corner: background, now dark
    assert float(x[0, 14, 14]) > 1.5  # centre: the object, now light


def test_examples_are_classified(bundled):
    paths = sorted(EXAMPLES.glob("fmnist_*.png"))
    assert len(paths) == 10
    correct = sum(
        vizapp.analyze(bundled, str(p)).top_k[0][0] == bundled.labels[int(p.name.split("_")[1])] for p in paths
    )
    assert correct >= 8, f"{correct}/10 bundled examples classified correctly"
