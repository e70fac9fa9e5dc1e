"""Which model the app offers and opens with; never blocks on an unreachable hub."""

from __future__ import annotations

import os

from vizapp import models

DEFAULT_PRETRAINED = "vit_base_patch16_224.augreg2_in21k_ft_in1k"
# The curated list: (timm id, what a person sees).
CURATED: list[tuple[str, str]] = [
    (models.BUNDLED, "Bundled: ViT trained on Fashion-MNIST"),
    ("vit_tiny_patch16_224.augreg_in21k_ft_in1k", "ViT-Ti/16 AugReg (ImageNet)"),
    ("vit_small_patch16_224.augreg_in21k_ft_in1k", "ViT-S/16 AugReg (ImageNet)"),
    (DEFAULT_PRETRAINED, "ViT-B/16 AugReg2 (ImageNet)"),
    ("vit_large_patch16_224.augreg_in21k_ft_in1k", "ViT-L/16 AugReg (ImageNet)"),
    ("deit_small_patch16_224.fb_in1k", "DeiT-S/16"),
    ("deit_base_patch16_224.fb_in1k", "DeiT-B/16"),
    ("deit_base_distilled_patch16_224.fb_in1k", "DeiT-B/16 distilled (CLS + distillation token)"),
    ("deit3_base_patch16_224.fb_in22k_ft_in1k", "DeiT-III B/16"),
    ("vit_small_patch16_224.dino", "DINO ViT-S/16 (no classifier)"),
    ("vit_base_patch16_224.dino", "DINO ViT-B/16 (no classifier)"),
    ("vit_small_patch14_reg4_dinov2.lvd142m", "DINOv2 ViT-S/14 + 4 registers (no classifier)"),
    ("vit_base_patch16_clip_224.openai_ft_in1k", "CLIP ViT-B/16 fine-tuned on ImageNet"),
    ("swin_tiny_patch4_window7_224.ms_in1k", "Swin-T window 7 (ImageNet; windowed attention, no CLS token)"),
]
# Entries for the other libraries, offered when that library is installed (models.available_libraries()).
CURATED_BY_LIBRARY: dict[str, list[tuple[str, str]]] = {
    "timm": [("vit_small_patch16_dinov3.lvd1689m", "DINOv3 ViT-S/16 + 4 registers, RoPE (no classifier)")],
    "transformers": [
        ("hf:google/vit-base-patch16-224", "transformers: ViT-B/16 (ImageNet)"),
        ("hf:facebook/dinov2-small", "transformers: DINOv2 ViT-S/14 (no classifier)"),
        ("hf:openai/clip-vit-base-patch32", "transformers: CLIP ViT-B/32 (text prompts as classes)"),
    ],
    "torchvision": [("torchvision:vit_b_16", "torchvision: ViT-B/16 (ImageNet)")],
    "open_clip": [
        ("open_clip:ViT-B-32/laion2b_s34b_b79k", "OpenCLIP: ViT-B/32 LAION-2B (text prompts as classes)"),
        ("open_clip:coca_ViT-B-32/laion2b_s13b_b90k", "OpenCLIP: CoCa ViT-B/32 LAION-2B (text prompts as classes)"),
    ],
}


def curated_models() -> list[tuple[str, str]]:
    """The curated (id, label) list: the timm entries, then those of every other installed library."""
    out = list(CURATED)
    for lib in models.available_libraries():
        out += CURATED_BY_LIBRARY.get(lib, [])
    return out


def weights_available_offline(name: str) -> bool:
    """Whether ``name``'s pretrained weights load without a network (see :func:`vizapp.models.weights_available_offline`)."""
    return models.weights_available_offline(name)


def model_choices(extra: str | None = None) -> list[tuple[str, str]]:
    """The model dropdown's (label, id) pairs, each tagged offline / cached / download; ``extra`` is --model's."""
    out = []
    curated = curated_models()
    for name, label in curated:
        tag = "offline" if name == models.BUNDLED else ("cached" if weights_available_offline(name) else "download")
        out.append((f"{label} [{tag}]", name))
    if extra and extra not in dict(curated):
        out.append((f"{extra} [from --model]", extra))
    return out


def choose_startup_model(requested: str | None = None) -> tuple[str, str]:
    """The model the app opens with, and a sentence saying why (never blocks on an unreachable hub)."""
    requested = requested or os.environ.get("VIZAPP_MODEL") or None
    if requested:
        return requested, f"Active model: `{requested}` (chosen with --model / VIZAPP_MODEL)."
    if weights_available_offline(DEFAULT_PRETRAINED):
        return (
            DEFAULT_PRETRAINED,
            f"Active model: `{DEFAULT_PRETRAINED}` (pretrained ImageNet ViT, found in the cache).",
        )
    if models.hub_reachable():
        return DEFAULT_PRETRAINED, f"Active model: `{DEFAULT_PRETRAINED}` (pretrained ImageNet ViT from the hub)."
    return models.BUNDLED, (
        "Active model: **bundled Fashion-MNIST ViT** — the Hugging Face hub is unreachable and no pretrained ImageNet "
        "ViT is cached, so the app uses the offline model trained here. It sees 28x28 grayscale product photos."
    )


def trusted_startup_model(startup: str, requested: str | None = None) -> str | None:
    """The operator's own model (``--model`` / VIZAPP_MODEL), the only one that may be a local file; else None."""
    return startup if (requested or os.environ.get("VIZAPP_MODEL")) else None
