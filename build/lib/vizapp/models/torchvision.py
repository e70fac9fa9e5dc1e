"""The torchvision adapter: ``torchvision:vit_b_16`` and the other ``vit_*`` builders.

torchvision's ``VisionTransformer`` has one CLS token, a learned absolute ``encoder.pos_embedding`` that includes the
CLS row, a square input of ``image_size`` and ``nn.MultiheadAttention`` in every encoder block (captured through
``F.multi_head_attention_forward``, see :mod:`vizapp.capture`). Weights come from torch's hub cache
(``torch.hub.get_dir()/checkpoints``); the preprocessing and class names from the weights' own ``transforms()`` and
``meta``.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from vizapp.errors import BadParameterError, ModelLoadError
from vizapp.models.base import VizModel, host_reachable, offline_message

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def check_name(arch: str) -> str:
    """A torchvision ViT builder name, or BadParameterError listing them."""
    import torchvision

    names = [n for n in torchvision.models.list_models(module=torchvision.models) if n.startswith("vit_")]
    if arch not in names:
        raise BadParameterError(f"'{arch[:60]}' is not a torchvision ViT; one of {names}")
    return arch


def _weights(arch: str, pretrained: bool) -> Any:
    import torchvision

    if not pretrained:
        return None
    weights = torchvision.models.get_model_weights(arch).DEFAULT
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
    if not os.path.isfile(cached) and not host_reachable(weights.url):
        raise ModelLoadError(
            offline_message(
                f"torchvision:{arch}",
                f"weights {os.path.basename(weights.url)}",
                f"Connect once to cache them, or copy the file into {os.path.dirname(cached)}.",
            )
        )
    return weights


def _forward(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x)


def load(name: str, pretrained: bool, device: torch.device, dtype: torch.dtype, kwargs: dict[str, Any]) -> VizModel:
    """``torchvision:ARCH``; ``kwargs`` go to the builder (e.g. ``image_size=224``, ``num_classes=10``)."""
    import torchvision
    from torchvision.transforms._presets import ImageClassification

    from vizapp.budget import check_budget, meta_parameter_count
    from vizapp.capture import attention_layers

    arch = check_name(name.split(":", 1)[1])
    check_budget(name, counter=lambda: meta_parameter_count(lambda: torchvision.models.get_model(arch, **kwargs)))
    weights = _weights(arch, pretrained)
    model = torchvision.models.get_model(arch, weights=weights, **kwargs)
    attention_layers(model)  # the support check
    model.eval().to(device=device, dtype=dtype)
    size = int(model.image_size)
    ps = int(model.patch_size)
    if weights is not None:
        transform = weights.transforms()
        labels = tuple(weights.meta["categories"])
        note = ""
    else:
        transform = ImageClassification(crop_size=size, resize_size=size)
        labels = tuple(f"class {i}" for i in range(int(model.heads[-1].out_features)))
        note = "Random weights (pretrained=False): predictions and maps are not meaningful."
    mean, std = tuple(transform.mean), tuple(transform.std)

    def pos_embed() -> torch.Tensor:
        return model.encoder.pos_embedding[0, 1:]  # [P, D]: the CLS row dropped

    return VizModel(
        name=name,
        model=model,
        device=device,
        transform=transform,
        labels=labels,
        num_prefix_tokens=1,
        grid_size=(size // ps, size // ps),
        patch_size=(ps, ps),
        no_embed_class=False,
        input_size=(3, size, size),
        mean=mean,
        std=std,
        source="pretrained" if weights is not None else "random",
        note=note,
        dtype=dtype,
        num_layers=len(model.encoder.layers),
        num_heads=int(model.encoder.layers[0].self_attention.num_heads),
        forward_fn=_forward,
        grid_fn=lambda h, w: (h // ps, w // ps),
        has_class_token=True,
        family="torchvision",
        position="learned",
        pos_embed_fn=pos_embed,
        lens_fn=lambda x: model.heads(model.encoder.ln(x)[:, 0]),
    )
