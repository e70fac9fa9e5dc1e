"""Which models the benchmark measures, written ``name@key=value,...`` (timm ``create_model`` keyword arguments)."""

from __future__ import annotations

import argparse
import ast
from dataclasses import dataclass
from typing import Any

import torch

DEFAULT_MODELS = (
    "vit_tiny_patch16_224",
    "vit_small_patch16_224",
    "vit_base_patch16_224",
    "vit_large_patch16_384",
    "vit_large_patch14_reg4_dinov2@img_size=518",
)
QUICK_MODELS = ("vit_tiny_patch16_224@img_size=64",)
# One row per model family at small and base size (issue 13): timm RoPE (DINOv3, EVA-02), relative position (BEiT),
# torchvision, transformers models built from a default config (``hf-random:TYPE``, random weights), and OpenCLIP.
FAMILY_MODELS = (
    "vit_small_patch16_dinov3",
    "vit_base_patch16_dinov3",
    "eva02_small_patch14_224",
    "eva02_base_patch14_224",
    "beit_base_patch16_224",
    "torchvision:vit_b_16",
    "hf-random:vit@hidden_size=384,num_attention_heads=6,intermediate_size=1536",
    "hf-random:vit",
    "hf-random:dinov2@image_size=224",
    "hf-random:clip_vision_model",
    "open_clip:ViT-B-32",  # OpenCLIP's own VisionTransformer (nn.MultiheadAttention), random weights
)
# transformers model types the benchmark builds from a default config: (config class, model class)
HF_RANDOM = {
    "vit": ("ViTConfig", "ViTForImageClassification"),
    "dinov2": ("Dinov2Config", "Dinov2Model"),
    "clip_vision_model": ("CLIPVisionConfig", "CLIPVisionModel"),
}
DATASET_MODEL = "vit_base_patch16_224"
QUICK_DATASET_MODEL = "vit_tiny_patch16_224@img_size=64"
# Models whose predicted forward exceeds this many multiply-accumulates get ``--large-repeats`` repeats.
LARGE_MACS = 50e9
# Models whose forward is below this many get ``--small-repeats``: a ViT-Ti/16 pair of forwards takes ~50 ms on 2
# cores, where a neighbour's load swings single runs by 10-30 %, so a median of 5 moved its b/a by 0.1 between runs.
SMALL_MACS = 5e9


@dataclass(frozen=True)
class ModelSpec:
    """A timm model name plus ``create_model`` keyword arguments, written ``name@key=value,key=value``."""

    name: str
    kwargs: tuple[tuple[str, Any], ...] = ()

    @property
    def label(self) -> str:
        if not self.kwargs:
            return self.name
        return self.name + "@" + ",".join(f"{k}={v}" for k, v in self.kwargs)

    def load(self, device: str, dtype: str = "float32") -> Any:
        """The model via :func:`vizapp.load_model` (random weights, seeded). ``hf-random:TYPE`` builds a
        transformers model of that type from its default config (the kwargs override fields), saved to a temporary
        folder with ``save_pretrained`` and loaded from there as a user's folder would be (the folder is removed
        once loaded). ``dtype``: a torch dtype's name, the forward's precision (vizapp's attention maths stay fp32)."""
        from vizapp.models import load_model

        torch.manual_seed(0)
        dt = getattr(torch, dtype)
        if self.name.startswith("hf-random:"):
            import tempfile

            import transformers

            config_cls, model_cls = HF_RANDOM[self.name.split(":", 1)[1]]
            config = getattr(transformers, config_cls)(**dict(self.kwargs))
            # The folder is needed only while load_model reads it (each load wrote ~330 MB for a base model and
            # left it behind: 29 GB of /tmp after a few bench runs).
            with tempfile.TemporaryDirectory(prefix="vizapp-bench-hf-") as folder:
                getattr(transformers, model_cls)(config).save_pretrained(folder)
                return load_model(folder, device=device, dtype=dt)
        return load_model(self.name, pretrained=False, device=device, dtype=dt, **dict(self.kwargs))


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_spec(text: str) -> ModelSpec:
    """``"vit_large_patch14_reg4_dinov2@img_size=518"`` -> ModelSpec(name, (("img_size", 518),))."""
    name, _, rest = text.strip().partition("@")
    kwargs = []
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"bad model option {item!r} in {text!r}; expected key=value")
        kwargs.append((key.strip(), _literal(value.strip())))
    if not name:
        raise argparse.ArgumentTypeError(f"empty model name in {text!r}")
    return ModelSpec(name, tuple(kwargs))
