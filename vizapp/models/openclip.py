"""The OpenCLIP adapter: ``open_clip:ARCH`` (random weights) and ``open_clip:ARCH/TAG`` (pretrained weights).

The model is OpenCLIP's own: ``open_clip.create_model_and_transforms(ARCH, pretrained=TAG)``, its weights from its
own cache and hub downloads, its validation transform as the preprocessing, and its tokenizer for prompts. vizapp
analyses the vision tower (``model.visual``, OpenCLIP's ``VisionTransformer``): one CLS token (``class_embedding``),
a learned ``positional_embedding`` with the CLS row first, and in every block of ``transformer.resblocks`` either
torch's ``nn.MultiheadAttention`` (captured through ``F.multi_head_attention_forward``) or OpenCLIP's own
``Attention`` (captured at its SDPA call). The tower's output is the projected image embedding; with prompts
(:mod:`vizapp.models.prompts`) it becomes OpenCLIP's own logits over the prompts.

CoCa (``open_clip:coca_ViT-B-32``, ...) is read the same way: its tower pools through an attentional pooler, whose
first query's output is the contrastive image embedding (the tower also returns the captioning tokens, set aside
here); its logit lens and LeGrad go through that pooler (:func:`vizapp.models.pooling.openclip_coca_readout`).

OpenCLIP models whose vision tower is a timm model or a ResNet are refused (load the timm model itself instead).
``open_clip_torch`` is optional: it is imported only when an ``open_clip:`` id is loaded.
"""

from __future__ import annotations

import os
import pickle
import re
from typing import Any

import torch

from vizapp.errors import BadParameterError, ModelLoadError, UnsupportedModelError
from vizapp.models.base import VizModel, cached_hub_file, host_reachable, hub_reachable, offline_message, pair
from vizapp.models.prompts import TextTower

PREFIX = "open_clip:"
_PART_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$")
#: the weight files OpenCLIP looks for in a tag's hub repository, safetensors first (see ``download_pretrained``)
HUB_WEIGHT_FILES = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
)
#: local checkpoints vizapp hands to OpenCLIP: safetensors, or a torch file read with ``weights_only=True``
CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def require_open_clip() -> Any:
    try:
        import open_clip
    except ImportError as e:
        raise ModelLoadError("loading an open_clip: model needs OpenCLIP: pip install open_clip_torch") from e
    return open_clip


def parse_name(name: str) -> tuple[str, str | None]:
    """``open_clip:ARCH[/TAG]`` -> (ARCH, TAG or None); BadParameterError for a malformed id."""
    rest = name[len(PREFIX) :] if name.startswith(PREFIX) else name
    arch, _, tag = rest.partition("/")
    if not _PART_RE.match(arch) or (tag and not _PART_RE.match(tag)):
        raise BadParameterError(
            f"'{name[:80]}' is not an OpenCLIP id; expected open_clip:<model>[/<pretrained tag>], e.g. "
            "open_clip:ViT-B-32/laion2b_s34b_b79k"
        )
    return arch, tag or None


def check_name(name: str) -> str:
    """Validate ``open_clip:ARCH[/TAG]`` against OpenCLIP's own lists (nothing is downloaded)."""
    open_clip = require_open_clip()
    arch, tag = parse_name(name)
    if arch not in open_clip.list_models():
        import difflib

        close = difflib.get_close_matches(arch, open_clip.list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {' or '.join(close)}?" if close else "; see open_clip.list_models()"
        raise BadParameterError(f"unknown OpenCLIP model '{arch}'{hint}")
    if tag is not None and not open_clip.get_pretrained_cfg(arch, tag):
        tags = open_clip.list_pretrained_tags_by_model(arch)
        raise BadParameterError(f"'{tag}' is not a pretrained tag of OpenCLIP {arch}; its tags: {tags}")
    return name


def weights_cached(name: str) -> bool:
    """Whether the weights of ``open_clip:ARCH/TAG`` are in the hub cache already (no network)."""
    try:
        open_clip = require_open_clip()
        arch, tag = parse_name(name)
    except (ModelLoadError, BadParameterError):
        return False
    cfg = open_clip.get_pretrained_cfg(arch, tag) if tag else None
    repo = (cfg or {}).get("hf_hub", "").rstrip("/")
    return bool(repo and cached_hub_file(repo, HUB_WEIGHT_FILES))


def _check_reachable(name: str, arch: str, tag: str) -> None:
    """Refuse an uncached tag while the network is down, before OpenCLIP waits on it."""
    open_clip = require_open_clip()
    cfg = open_clip.get_pretrained_cfg(arch, tag) or {}
    repo = cfg.get("hf_hub", "").rstrip("/")
    if repo and (cached_hub_file(repo, HUB_WEIGHT_FILES) or hub_reachable()):
        return
    if not repo and cfg.get("url") and host_reachable(cfg["url"]):
        return
    raise ModelLoadError(
        offline_message(name, "OpenCLIP weights", "Connect once to cache them (OpenCLIP's own cache), or copy a cache.")
    )


def _checkpoint(path: Any, allow_files: bool) -> str:
    if not allow_files:
        raise BadParameterError("loading local files is disabled here; pick a model from the list")
    path = os.fspath(path)
    if not path.endswith(CHECKPOINT_SUFFIXES) or not os.path.isfile(path):
        raise BadParameterError(
            f"checkpoint must be an existing {'/'.join(CHECKPOINT_SUFFIXES)} file (torch files are read with "
            "weights_only=True, never unpickled)"
        )
    return path


def image_embedding(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The vision tower's image embedding [B, E]: its forward's output, or the first of the pair a CoCa tower returns
    (the embedding and the captioning tokens, ``output_tokens``); OpenCLIP's "parallel" pooler gives [B, 1, E]."""
    out = model(x)
    out = out[0] if isinstance(out, tuple) else out
    return out[:, 0] if out.dim() == 3 else out


def _text_tower(clip: torch.nn.Module, arch: str) -> TextTower:
    """OpenCLIP's text side: its tokenizer (the BPE vocabulary it ships, at the text tower's context length) and
    ``encode_text``, and the image side's pooling and projection from a block's tokens (for the logit lens; with an
    attentional pooler, CoCa's, a :class:`~vizapp.models.pooling.PooledReadout` that keeps the pooler's attention)."""
    open_clip = require_open_clip()
    from vizapp.models.pooling import openclip_coca_readout

    visual = clip.visual
    # CoCa's text tower appends its CLS token to the tokens: its own context_length is what the tokenizer gives
    context = getattr(getattr(clip, "text", None), "context_length", None) or getattr(clip, "context_length", None)
    tokenizer = open_clip.get_tokenizer(arch, context_length=context) if context else open_clip.get_tokenizer(arch)

    def encode(prompts: list[str]) -> torch.Tensor:
        tokens = tokenizer(prompts).to(clip.logit_scale.device)
        return clip.encode_text(tokens)  # [K, D], normalised by the prompts module

    def embed_from_tokens(tokens: torch.Tensor) -> torch.Tensor:  # [B, N, D] -> [B, E], as visual.forward ends
        pooled, _ = visual._pool(tokens)
        return pooled @ visual.proj if visual.proj is not None else pooled

    pooled_readout = openclip_coca_readout(visual) if visual.attn_pool is not None else None
    bias = getattr(clip, "logit_bias", None)
    return TextTower(
        encode_text=encode,
        image_embed=image_embedding,
        embed_from_tokens=pooled_readout or embed_from_tokens,
        logit_scale=lambda: clip.logit_scale.exp().reshape(()),
        logit_bias=(lambda: bias.reshape(())) if bias is not None else None,
        modules=(clip,),
        projection=lambda: visual.proj.T if getattr(visual, "proj", None) is not None else None,
    )


def _check_before_building(name: str, arch: str, kwargs: dict[str, Any]) -> None:
    """Refuse, before anything is built or downloaded, a model whose vision tower is not OpenCLIP's own ViT (a timm
    model or a ResNet), and one over the parameter limits (counted on the meta device)."""
    open_clip = require_open_clip()
    from vizapp.budget import check_budget, meta_parameter_count

    cfg = {**(open_clip.get_model_config(arch) or {}), **kwargs}
    vision = cfg.get("vision_cfg") or {}
    if "timm_model_name" in vision or isinstance(vision.get("layers"), (list, tuple)):
        kind = "a timm model" if "timm_model_name" in vision else "a ResNet"
        raise UnsupportedModelError(
            f"{name}: its vision tower is {kind}, not OpenCLIP's VisionTransformer; vizapp analyses OpenCLIP's own "
            "ViT towers (load a timm tower by its timm id)"
        )
    if "hf_model_name" in (cfg.get("text_cfg") or {}):
        return  # a transformers text tower: built from the hub's config, not counted here

    def build() -> torch.nn.Module:
        import inspect

        from open_clip.coca_model import CoCa
        from open_clip.model import CLIP, CustomTextCLIP

        # the class create_model picks: CoCa (its text decoder counted too), CustomTextCLIP, or CLIP
        custom = cfg.get("custom_text")
        cls = (CoCa if "multimodal_cfg" in cfg else CustomTextCLIP) if custom else CLIP
        takes = inspect.signature(cls).parameters  # create_model's own options (force_*, ...) are not the model's
        return cls(**{k: v for k, v in cfg.items() if k in takes})

    check_budget(name, counter=lambda: meta_parameter_count(build), layers=int(vision.get("layers") or 0) or None)


def _check_pooler(name: str, visual: torch.nn.Module) -> None:
    """Refuse an attentional pooler (CoCa's) whose image embedding vizapp cannot read from a block's tokens."""
    from vizapp.models.pooling import openclip_coca_readout

    if visual.attn_pool is None:
        return
    kind = getattr(visual, "attn_pool_type", "")
    if kind == "cascade":
        raise UnsupportedModelError(
            f"{name}: OpenCLIP's 'cascade' attentional pooling makes the image embedding from the captioning pooler's "
            "outputs, not from the tokens, so vizapp cannot read it from a block (the original CoCa pooling, "
            "attentional_pool=True, and 'parallel' are supported)"
        )
    if kind == "parallel" and visual.transformer.width != visual.output_dim:
        raise UnsupportedModelError(
            f"{name}: OpenCLIP's 'parallel' attentional pooling needs the tower's width equal to its embedding width "
            f"(its ln_post is built for the one and applied to the other), here {visual.transformer.width} and "
            f"{visual.output_dim}"
        )
    if openclip_coca_readout(visual) is None:
        raise UnsupportedModelError(
            f"{name}: its attentional pooler is not laid out as OpenCLIP's AttentionalPooler (learned queries, one "
            "batch-first nn.MultiheadAttention without extra key/value bias), so vizapp cannot write it out"
        )


def load(
    name: str,
    pretrained: bool,
    device: torch.device,
    dtype: torch.dtype,
    kwargs: dict[str, Any],
    allow_files: bool = True,
) -> VizModel:
    """``open_clip:ARCH`` (random weights with ``pretrained=False``) or ``open_clip:ARCH/TAG``; ``kwargs`` go to
    ``create_model_and_transforms`` (model config overrides, e.g. ``vision_cfg={...}``), except ``checkpoint``: a
    local weights file for ARCH, loaded through OpenCLIP's ``pretrained=<file>`` path (where files are allowed)."""
    open_clip = require_open_clip()
    check_name(name)
    arch, tag = parse_name(name)
    kwargs = dict(kwargs)
    checkpoint = kwargs.pop("checkpoint", None)
    _check_before_building(name, arch, kwargs)
    if checkpoint is not None:
        source: str | None = _checkpoint(checkpoint, allow_files)
    elif pretrained:
        if tag is None:
            tags = open_clip.list_pretrained_tags_by_model(arch)
            raise BadParameterError(
                f"{name} names no pretrained weights; add a tag (open_clip:{arch}/<tag>, one of {tags}), or ask "
                "for random weights (pretrained=False in Python, the Random weights box in the app)"
            )
        _check_reachable(name, arch, tag)
        source = tag
    else:
        source = None
    try:
        clip, _, preprocess = open_clip.create_model_and_transforms(
            arch,
            pretrained=source,
            weights_only=True,  # a torch file is never unpickled
            pretrained_text=False,  # nothing beyond the named weights is downloaded
            **kwargs,
        )
    except TypeError as e:
        raise BadParameterError(f"{name}: {str(e).splitlines()[0][:200]}") from e
    except (RuntimeError, OSError, ValueError, KeyError, pickle.UnpicklingError) as e:
        raise ModelLoadError(f"{name}: OpenCLIP could not build or load it ({str(e).splitlines()[0][:200]})") from e
    visual = clip.visual
    from open_clip.transformer import VisionTransformer

    if not isinstance(visual, VisionTransformer):
        raise UnsupportedModelError(
            f"{name}: its vision tower is {type(visual).__name__}, not OpenCLIP's VisionTransformer; vizapp analyses "
            "OpenCLIP's own ViT towers (load a timm tower by its timm id)"
        )
    if not getattr(visual.transformer, "batch_first", True):
        raise UnsupportedModelError(f"{name}: a sequence-first OpenCLIP transformer is not supported")
    from vizapp.capture import attention_layers

    layers = attention_layers(visual)  # the support check
    _check_pooler(name, visual)
    clip.eval().to(device=device, dtype=dtype)
    size, ps = pair(visual.image_size), pair(visual.patch_size)
    grid = (size[0] // ps[0], size[1] // ps[1])
    cfg = visual.preprocess_cfg
    readout = "tokens" if visual.attn_pool is not None else "patches" if visual.pool_type == "avg" else "cls"
    first = layers[0]
    heads = int(first.num_heads)

    def pos_embed() -> torch.Tensor:
        return visual.positional_embedding[1:]  # [P, D]: the CLS row dropped

    return VizModel(
        name=name,
        model=visual,
        device=device,
        transform=preprocess,
        labels=(),
        num_prefix_tokens=1,
        grid_size=grid,
        patch_size=ps,
        no_embed_class=False,
        input_size=(3, *size),
        mean=tuple(float(v) for v in cfg["mean"]),
        std=tuple(float(v) for v in cfg["std"]),
        source="file" if checkpoint is not None else "pretrained" if source else "random",
        note="" if source else "Random weights (pretrained=False): predictions and maps are not meaningful.",
        dtype=dtype,
        num_layers=len(layers),
        num_heads=heads,
        forward_fn=image_embedding,
        grid_fn=lambda h, w: (h // ps[0], w // ps[1]),
        has_class_token=True,
        readout=readout,
        family="open_clip",
        position="learned",
        pos_embed_fn=pos_embed,
        text_tower=_text_tower(clip, arch),
    )
