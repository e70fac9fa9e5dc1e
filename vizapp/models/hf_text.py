"""The text side of transformers CLIP and SigLIP models, for prompts as classes (:mod:`vizapp.models.prompts`).

A folder or hub repository of the whole model (``CLIPModel``, ``SiglipModel``) is loaded whole; vizapp analyses its
vision tower as before (the whole model's own ``vision_model``, a ``CLIPVisionModel`` / ``SiglipVisionModel``), and
keeps the text tower, the projections, ``logit_scale`` and (SigLIP) ``logit_bias`` for prompts.
Prompts go through the folder's own tokenizer as transformers' zero-shot image classification pipeline tokenizes
them (CLIP: padded to the longest; SigLIP: padded to 64 tokens), and the logits are the model's own:
exp(logit_scale) · cos(image, text) (+ logit_bias, then a sigmoid, for SigLIP).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from vizapp.errors import BadParameterError, UnsupportedModelError
from vizapp.models.prompts import TextTower

#: multimodal model_type -> the transformers class of the whole model
WHOLE_MODELS = {"clip": "CLIPModel", "siglip": "SiglipModel"}
#: tokenizer files fetched with a hub model's weights (none is a pickle)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "spiece.model",
)


def whole_class(config: Any) -> Any:
    """The class of the whole image-text model for a CLIP or SigLIP config, else None."""
    name = WHOLE_MODELS.get(getattr(config, "model_type", ""))
    if name is None:
        return None
    import transformers

    return getattr(transformers, name)


def vision_tower(cls: Any, whole: torch.nn.Module) -> torch.nn.Module:
    """The whole model's vision tower, an instance of the tower class ``cls`` (e.g. ``CLIPVisionModel``): it shares
    every weight with the whole model."""
    tower = getattr(whole, "vision_model", None)
    if not isinstance(tower, cls):
        raise UnsupportedModelError(
            f"{type(whole).__name__}.vision_model is {type(tower).__name__}, not {cls.__name__}; this transformers "
            "version lays the model out differently from the one vizapp was written for"
        )
    return tower.eval()


def text_tower(whole: torch.nn.Module, folder: str, name: str) -> TextTower:
    """The prompt side of a whole CLIP or SigLIP model; its tokenizer is read from ``folder`` at the first prompts."""
    siglip = whole.config.model_type == "siglip"
    found: dict[str, Any] = {}

    def tokenizer() -> Any:
        if "tok" not in found:
            import transformers

            try:
                if not any(os.path.isfile(os.path.join(folder, f)) for f in TOKENIZER_FILES):
                    # transformers would make a default tokenizer of a few tokens, silently: refused
                    raise OSError("no tokenizer files")
                found["tok"] = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
            except (OSError, ValueError, TypeError) as e:
                raise BadParameterError(
                    f"{name} has no tokenizer beside its weights, so prompts cannot be encoded; save the model's "
                    "tokenizer with it (tokenizer.save_pretrained)"
                ) from e
        return found["tok"]

    def encode(prompts: list[str]) -> torch.Tensor:
        kwargs = dict(padding="max_length", max_length=64, truncation=True) if siglip else dict(padding=True)
        tokens = tokenizer()(prompts, return_tensors="pt", **kwargs)
        device = whole.logit_scale.device
        out = whole.get_text_features(**{k: v.to(device) for k, v in tokens.items() if k != "token_type_ids"})
        return out.pooler_output if hasattr(out, "pooler_output") else out

    vision = whole.vision_model
    projection = getattr(whole, "visual_projection", None)

    def project(pooled: torch.Tensor) -> torch.Tensor:
        return projection(pooled) if projection is not None else pooled

    def image_embed(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        return project(model(pixel_values=x).pooler_output)

    def embed_from_tokens(tokens: torch.Tensor) -> torch.Tensor:  # CLIP's pooling: the CLS token, post-LN
        return project(vision.post_layernorm(tokens[:, 0]))

    if siglip:  # SigLIP's pooling: post-LN on every token, then its attention-pooling head (no projection)
        from vizapp.models.pooling import siglip_readout

        readout = siglip_readout(vision) if projection is None else None
    return TextTower(
        encode_text=encode,
        image_embed=image_embed,
        embed_from_tokens=readout if siglip else embed_from_tokens,
        logit_scale=lambda: whole.logit_scale.exp().reshape(()),
        logit_bias=(lambda: whole.logit_bias.reshape(())) if siglip else None,
        modules=(whole,),
        projection=(lambda: projection.weight) if projection is not None and not siglip else None,
    )
