"""Which modules of a model are its attention layers: the families vizapp supports (timm, transformers, torchvision)
and the one check of a model's layout, :func:`encoder_layers`. :mod:`vizapp.capture` hooks what this finds."""

from __future__ import annotations

import contextlib

import torch

from vizapp.errors import UnsupportedModelError

SUPPORTED_FAMILIES = (
    "timm ViT/DeiT/DINOv2/CLIP/NaFlexViT (Attention), timm EVA-02/DINOv3/RoPE ViTs (EvaAttention, AttentionRope), "
    "timm BEiT and relpos ViTs, "
    "Hugging Face ViT/ViT-MSN/ViT-MAE/DeiT/BEiT/Data2Vec-vision/I-JEPA/DINOv2/DINOv3 and the vision encoders of "
    "CLIP/SigLIP/Chinese-CLIP/AltCLIP/MetaCLIP 2/OWL-ViT/OWLv2/AIMv2, "
    "torchvision vit_*, "
    "OpenCLIP ViTs (nn.MultiheadAttention, or its own Attention without scaled-cosine attention)"
)


def _timm_attention_classes() -> tuple[type, ...]:
    from timm.layers import Attention, AttentionRope

    classes: list[type] = [Attention, AttentionRope]
    for module, name in (
        ("timm.models.eva", "EvaAttention"),
        ("timm.models.beit", "Attention"),
        ("timm.models.vision_transformer_relpos", "RelPosAttention"),
    ):
        with contextlib.suppress(ImportError, AttributeError):  # an older timm without that family
            classes.append(getattr(__import__(module, fromlist=[name]), name))
    return tuple(classes)


def _hf_attention(layer: torch.nn.Module) -> torch.nn.Module | None:
    """The module of a transformers encoder layer that makes its self-attention call."""
    for _, mod in layer.named_modules():
        names = set(dict(mod.named_children()))
        if {"query", "key", "value"} <= names or {"q_proj", "k_proj", "v_proj"} <= names:
            return mod
    return None


def _open_clip_attention(i: int, block: torch.nn.Module) -> torch.nn.Module:
    """An OpenCLIP block's attention: torch's ``nn.MultiheadAttention`` (its ResidualAttentionBlock) or OpenCLIP's own
    ``Attention`` (its CustomResidualAttentionBlock), which calls SDPA unless it uses scaled-cosine attention."""
    attn = getattr(block, "attn", None)
    if isinstance(attn, torch.nn.MultiheadAttention):
        return attn
    if type(attn).__name__ == "Attention" and type(attn).__module__.startswith("open_clip"):
        if getattr(attn, "logit_scale", None) is None and getattr(attn, "use_fsdpa", False):
            return attn
        why = "scaled-cosine attention" if getattr(attn, "logit_scale", None) is not None else "no SDPA call"
        raise UnsupportedModelError(
            f"block {i}: OpenCLIP Attention with {why}, which vizapp cannot capture exactly; supported: "
            f"{SUPPORTED_FAMILIES}"
        )
    raise UnsupportedModelError(
        f"block {i} uses {type(attn).__name__}, whose attention vizapp cannot capture exactly; "
        f"supported: {SUPPORTED_FAMILIES}"
    )


#: the attribute of a transformers model with a head (or of a CLIP/SigLIP tower) that holds its encoder model; "model"
#: is DINOv3's, which holds the layers themselves
HF_BASE_ATTRIBUTES = (
    "vision_model",
    "vit",
    "deit",
    "beit",
    "data2vec_vision",
    "ijepa",
    "dinov2",
    "dinov2_with_registers",
    "model",
)


def encoder_layers(model: torch.nn.Module) -> tuple[list[torch.nn.Module], list[torch.nn.Module]]:
    """(the encoder blocks, the self-attention module of each), in order: the one support check in vizapp.

    A block's output is the residual stream after it; its attention module makes the layer's one attention call.

    Raises:
        UnsupportedModelError: naming the supported families, for anything else (Swin's windows, an unknown tree).
    """
    blocks = getattr(model, "blocks", None)
    if blocks is not None:  # timm
        supported = _timm_attention_classes()
        for i, blk in enumerate(blocks):
            attn = getattr(blk, "attn", None)
            if attn is None:  # e.g. timm's parallel blocks (several attentions, or one fused with the MLP)
                raise UnsupportedModelError(
                    f"block {i} ({type(blk).__name__}) has no single attention module (.attn) whose attention vizapp "
                    f"can capture exactly; supported: {SUPPORTED_FAMILIES}"
                )
            if not isinstance(attn, supported):
                raise UnsupportedModelError(
                    f"block {i} uses {type(attn).__name__}, whose attention vizapp cannot capture exactly; "
                    f"supported: {SUPPORTED_FAMILIES}"
                )
        return list(blocks), [blk.attn for blk in blocks]
    encoder = getattr(model, "encoder", None)
    tv_layers = getattr(encoder, "layers", None)
    if tv_layers is not None and all(
        isinstance(getattr(b, "self_attention", None), torch.nn.MultiheadAttention) for b in tv_layers
    ):  # torchvision
        return list(tv_layers), [b.self_attention for b in tv_layers]
    resblocks = getattr(getattr(model, "transformer", None), "resblocks", None)
    if isinstance(resblocks, torch.nn.ModuleList) and len(resblocks):  # OpenCLIP's VisionTransformer
        return list(resblocks), [_open_clip_attention(i, b) for i, b in enumerate(resblocks)]
    for root in (model, *(getattr(model, n, None) for n in HF_BASE_ATTRIBUTES)):
        if not isinstance(root, torch.nn.Module):
            continue
        enc = getattr(root, "encoder", None)
        for holder, attr in ((enc, "layer"), (enc, "layers"), (root, "layers"), (root, "layer")):
            layers = getattr(holder, attr, None) if isinstance(holder, torch.nn.Module) else None
            if isinstance(layers, torch.nn.ModuleList) and len(layers):  # transformers
                mods = [_hf_attention(layer) for layer in layers]
                if all(m is not None for m in mods):
                    return list(layers), mods
    raise UnsupportedModelError(
        f"{type(model).__name__} has no encoder layers whose attention vizapp can capture exactly; "
        f"supported: {SUPPORTED_FAMILIES}"
    )


def attention_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The self-attention module of every encoder layer, in order (see :func:`encoder_layers`)."""
    return encoder_layers(model)[1]
