"""Shared fixtures: small random-weight timm ViTs of every token layout (no downloads)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
torch.manual_seed(0)

# (id, timm name, create_model kwargs): CLS only, CLS + distillation token, CLS + 4 registers with
# no_embed_class, a non-square grid, no class token at all, and dynamic image size.
FAMILIES = [
    ("vit", "vit_tiny_patch16_224", dict(img_size=64, depth=2)),
    ("deit_distilled", "deit_tiny_distilled_patch16_224", dict(img_size=64, depth=2)),
    ("reg4", "vit_small_patch14_reg4_dinov2", dict(img_size=56, depth=2)),
    ("nonsquare", "vit_tiny_patch16_224", dict(img_size=(48, 80), depth=2)),
    ("dynamic", "vit_tiny_patch16_224", dict(img_size=64, depth=2, dynamic_img_size=True)),
]


def small_model(name: str, **kwargs):
    import vizapp

    torch.manual_seed(0)
    return vizapp.load_model(name, pretrained=False, device="cpu", **kwargs)


@pytest.fixture(params=FAMILIES, ids=[f[0] for f in FAMILIES])
def family(request):
    fid, name, kwargs = request.param
    return fid, small_model(name, **kwargs)


def random_image(seed: int = 0, size: tuple[int, int] = (96, 128)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))


@pytest.fixture
def image():
    return random_image(0)
