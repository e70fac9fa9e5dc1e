"""The Hugging Face transformers adapter: ``hf:owner/repo`` ids and folders written by ``save_pretrained``.

Supported model types: ViT, ViT-MSN, ViT-MAE (its encoder), DeiT (with the distillation token), BEiT, Data2Vec-vision,
I-JEPA, DINOv2, DINOv2 with registers, DINOv3, with or without a classification head, and the vision towers of CLIP,
SigLIP, Chinese-CLIP, AltCLIP, MetaCLIP 2, OWL-ViT, OWLv2 and AIMv2 (:data:`VISION_TOWERS`).
The model is always built with ``attn_implementation="sdpa"``, so every layer's attention goes through
``F.scaled_dot_product_attention`` where :mod:`vizapp.capture` reads it exactly. Token bookkeeping comes from the
model: the embeddings' ``cls_token`` / ``distillation_token`` / ``register_tokens`` (or
``config.num_register_tokens``), ``config.patch_size`` and ``config.image_size``. Preprocessing is the library's
own image processor (``preprocessor_config.json`` when present, else the model type's default processor at the
model's input size); class names come from ``config.id2label``.

``transformers`` is an optional extra (``pip install vizapp[hf]``); the timm path never imports it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from vizapp.capture import HF_BASE_ATTRIBUTES
from vizapp.errors import BadParameterError, ModelLoadError, UnsupportedModelError, VizappError
from vizapp.models import hf_text, swin
from vizapp.models.base import (
    HUB_TIMEOUT_S,
    VizModel,
    cached_hub_file,
    check_geometry,
    first_line,
    hub_reachable,
    offline_message,
    pair,
    read_json_object,
    without_paths,
)
from vizapp.models.hf_processor import image_processor

#: model_type -> (how many rows of the learned position table precede the patch rows, has a CLS token)
MODEL_TYPES = {
    "vit": (1, True),
    "vit_msn": (1, True),
    "deit": (2, True),
    "dinov2": (1, True),
    "dinov2_with_registers": (1, True),
    "clip_vision_model": (1, True),
    "siglip_vision_model": (0, False),
    "chinese_clip_vision_model": (1, True),
    "altclip_vision_model": (1, True),
    "metaclip_2_vision_model": (1, True),
    "owlvit_vision_model": (1, True),
    "owlv2_vision_model": (1, True),
    "aimv2_vision_model": (0, False),  # patch tokens only, an attention-pooling head
    "dinov3_vit": (0, True),  # rotary positions: no table
    "beit": (1, True),  # a table only with use_absolute_position_embeddings; else a relative bias
    "data2vec-vision": (1, True),  # BEiT's architecture
    "ijepa": (0, False),  # patch tokens only
    "vit_mae": (1, True),  # the encoder alone, every patch kept in order (see UNMASKED_TYPES)
}
#: model types whose positions are rotary (RoPE) rather than a learned table
ROPE_TYPES = {"dinov3_vit"}
#: BEiT-like model types: a learned table only when configured, else a relative-position bias; a mean-pooling head
BEIT_TYPES = {"beit", "data2vec-vision"}
#: model types that shuffle and mask their patch tokens (MAE pre-training): vizapp loads the encoder alone, with
#: ``mask_ratio`` 0 and the order the model's own ``noise`` argument fixes, so every patch is kept where it was
UNMASKED_TYPES = {"vit_mae"}
#: vision towers of image-text and detection models, loaded on their own: the tower's model_type -> (the model_type
#: of the multimodal config it is nested in, the transformers class of the tower alone). Their CLS token, where they
#: have one, is the embeddings' ``class_embedding`` and their table ``position_embedding`` (an ``nn.Embedding``).
VISION_TOWERS = {
    "clip_vision_model": ("clip", "CLIPVisionModel"),
    "siglip_vision_model": ("siglip", "SiglipVisionModel"),
    "chinese_clip_vision_model": ("chinese_clip", "ChineseCLIPVisionModel"),
    "altclip_vision_model": ("altclip", "AltCLIPVisionModel"),
    "metaclip_2_vision_model": ("metaclip_2", "MetaClip2VisionModel"),
    "owlvit_vision_model": ("owlvit", "OwlViTVisionModel"),
    "owlv2_vision_model": ("owlv2", "Owlv2VisionModel"),
    "aimv2_vision_model": ("aimv2", "Aimv2VisionModel"),
}
#: multimodal model_type -> its vision tower's model_type
VISION_CONFIGS = {outer: tower for tower, (outer, _) in VISION_TOWERS.items()}


def _require_transformers() -> Any:
    try:
        import transformers
    except ImportError as e:
        raise ModelLoadError(
            "loading a Hugging Face transformers model needs the optional extra: pip install 'vizapp[hf]'"
        ) from e
    return transformers


#: what a pretrained hub model needs from its repository (the weights whole or in shards, never a pickle)
HUB_FILES = (
    "config.json",
    "preprocessor_config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "model-*-of-*.safetensors",
    *hf_text.TOKENIZER_FILES,  # a CLIP/SigLIP model's tokenizer, for prompts
)
HOW = "Connect once to cache it, copy a cache (HF_HOME), or pass a folder written by save_pretrained."


def _source(name: str, hub_only: bool = False) -> tuple[str, bool]:
    """(folder or repo id, is a local folder). With ``hub_only`` (a visitor's id) ``hf:A/B`` is a hub id, whatever
    this machine holds at A/B: the disk is not even asked, so no answer depends on it."""
    src = name[3:] if name.startswith("hf:") else name
    return src, (not hub_only and os.path.isdir(src))


def _hub_folder(repo: str) -> str:
    """The hub cache's snapshot folder of ``repo`` holding its config.json (downloaded when not cached).

    transformers is given this folder and never the id itself: its ``from_pretrained`` reads a folder of the id's
    relative name on this machine first.
    """
    path = cached_hub_file(repo, ("config.json",))
    if path is None:
        if not hub_reachable():
            raise ModelLoadError(offline_message(f"hf:{repo}", "transformers model", HOW))
        from huggingface_hub import hf_hub_download

        try:
            path = hf_hub_download(repo, "config.json", etag_timeout=HUB_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - missing, private, gated or unreachable: the same answer
            raise ModelLoadError(
                f"hf:{repo}: no config.json could be read from the Hugging Face hub; check the id (private and gated "
                "repositories cannot be read)"
            ) from e
    return os.path.dirname(path)


def _hub_weights(repo: str, folder: str) -> str:
    """A snapshot folder of ``repo`` with its safetensors weights: ``folder`` when they are cached in it, else the
    same revision downloaded (:data:`HUB_FILES` only)."""
    if any(os.path.isfile(os.path.join(folder, f)) for f in ("model.safetensors", "model.safetensors.index.json")):
        return folder
    if not hub_reachable():
        raise ModelLoadError(offline_message(f"hf:{repo}", "transformers model", HOW))
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(
            repo, revision=os.path.basename(folder), allow_patterns=list(HUB_FILES), etag_timeout=HUB_TIMEOUT_S
        )
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"hf:{repo}: its weights could not be downloaded from the Hugging Face hub") from e


#: the files of a model folder that may name Python code shipped beside it (``auto_map``)
CODE_FILES = ("config.json", "preprocessor_config.json")


def _refuse_custom_code(folder: str, name: str) -> None:
    """Refuse a folder whose config or image processor config names Python code shipped with the model
    (``auto_map``), before transformers reads either: transformers would ask on the terminal whether to run that
    code (and run it on "y"), or fail naming the folder's absolute path. vizapp never runs a model's own code."""
    for fn in CODE_FILES:
        if (Path(folder) / fn).is_file():
            cfg = read_json_object(Path(folder) / fn, f"{name}: its {fn}", "write the model again with save_pretrained")
            if cfg.get("auto_map"):
                raise ModelLoadError(
                    f"{name}: its {fn} asks to run Python code shipped with the model (auto_map); vizapp never runs a "
                    "model's own code. Pick a model whose type transformers itself provides, e.g. "
                    f"{', '.join(sorted(MODEL_TYPES)[:6])}, ..."
                )


def _config(folder: str, name: str, local: bool) -> Any:
    """The config in ``folder`` (a local folder, or a hub snapshot whose path a message must not show), after
    :func:`_refuse_custom_code`."""
    transformers = _require_transformers()
    _refuse_custom_code(folder, name)
    try:
        return transformers.AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, TypeError, KeyError) as e:
        detail = f" ({first_line(without_paths(str(e), folder))})" if local else ""
        raise ModelLoadError(
            f"{name}: not a transformers model config{detail}; write it again with save_pretrained"
        ) from e


def _vision_config(config: Any) -> Any:
    if config.model_type in VISION_CONFIGS:
        return config.vision_config
    return config


def _model_class(config: Any) -> Any:
    transformers = _require_transformers()
    if config.model_type in VISION_CONFIGS:
        return getattr(transformers, VISION_TOWERS[VISION_CONFIGS[config.model_type]][1])
    if config.model_type in UNMASKED_TYPES:  # ViTMAEForPreTraining's decoder sees only masked sequences: left out
        return transformers.ViTMAEModel
    for arch in config.architectures or ():
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    return transformers.AutoModel


def _base(model: torch.nn.Module) -> torch.nn.Module:
    """The module holding the embeddings and the encoder: ``model.vit`` of ViTForImageClassification,
    ``vision_model`` of CLIP, the model itself for DINOv3 (whose ``model`` is the layers alone), ..."""
    for attr in HF_BASE_ATTRIBUTES:
        sub = getattr(model, attr, None)
        if isinstance(sub, torch.nn.Module) and hasattr(sub, "embeddings"):
            return sub
    return model


def _relative_bias_modules(
    model: torch.nn.Module, base: torch.nn.Module
) -> tuple[list[torch.nn.Module | None], torch.nn.Module | None]:
    """A BEiT-like model's relative-position bias: each encoder layer's own module (on the layer in BEiT, on its
    self-attention in Data2VecVision; None where it has none) and the shared one; ([], None) for other models."""
    from vizapp.capture import encoder_layers

    def first(*found: Any) -> Any:
        return next((m for m in found if isinstance(m, torch.nn.Module)), None)

    encoder = getattr(base, "encoder", None)
    shared = first(getattr(base, "shared_position_bias", None), getattr(encoder, "relative_position_bias", None))
    layers = [
        first(getattr(layer, "relative_position_bias", None), getattr(attn, "relative_position_bias", None))
        for layer, attn in zip(*encoder_layers(model), strict=True)
    ]
    if shared is None and all(m is None for m in layers):
        return [], None
    return layers, shared


def _rope_angles(base: torch.nn.Module, size: tuple[int, int], head_dim: int) -> torch.Tensor:
    """DINOv3's rotation angle of every frequency pair at every patch of an input of ``size``, [P, F] (F =
    head_dim / 2), from its own rotary module: it returns cos and sin of the angles [P, head_dim], the F pair angles
    repeated twice (rotate-half layout)."""
    x = torch.zeros(1, 3, *size, device=base.embeddings.cls_token.device)
    with torch.no_grad():
        cos, sin = base.rope_embeddings(x)
    f = head_dim // 2
    return torch.atan2(sin[:, :f].double(), cos[:, :f].double()).cpu()


def _num_prefix_tokens(model_type: str, embeddings: torch.nn.Module, config: Any) -> int:
    cls = getattr(embeddings, "cls_token", getattr(embeddings, "class_embedding", None))  # CLIP-like: class_embedding
    p = 1 if cls is not None else 0
    if getattr(embeddings, "distillation_token", None) is not None:
        p += 1
    registers = getattr(embeddings, "register_tokens", None)
    if registers is not None:
        p += int(registers.shape[1])
    elif int(getattr(config, "num_register_tokens", 0) or 0):
        p += int(config.num_register_tokens)
    return p


def _pos_table(model_type: str, embeddings: torch.nn.Module) -> torch.Tensor:
    """The learned position table [rows, D] (prefix rows first, as the model stores it)."""
    if model_type in VISION_TOWERS:
        return embeddings.position_embedding.weight
    return embeddings.position_embeddings[0]


def _output(out: Any, cls_token: bool) -> torch.Tensor:
    """What a forward gives back: the logits, else the pooled output, else the CLS token's output, or without a CLS
    token the mean of the tokens (all patches), as I-JEPA's own classifier pools them."""
    for name in ("logits", "pooler_output"):
        value = getattr(out, name, None)
        if value is not None:
            return value
    h = out.last_hidden_state
    return h[:, 0] if cls_token else h.mean(dim=1)


def _forward(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return _output(model(pixel_values=x), cls_token=True)


def _forward_patch_mean(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """For a model without a CLS token (I-JEPA's backbone has neither head nor pooler): see :func:`_output`."""
    return _output(model(pixel_values=x), cls_token=False)


def _forward_unmasked(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """ViT-MAE's encoder on every patch in order: ascending ``noise`` makes its shuffle the identity, and with
    ``mask_ratio`` 0 it keeps all patches. -> the CLS token's output [B, D] (the encoder has no pooler)."""
    ps = pair(model.config.patch_size)
    n = (x.shape[-2] // ps[0]) * (x.shape[-1] // ps[1])
    noise = torch.arange(n, device=x.device, dtype=torch.float32).expand(x.shape[0], n)
    return _output(model(pixel_values=x, noise=noise), cls_token=True)


def _check_budget(name: str, cls: Any, built: Any, vision: Any, local: bool = False, layers: int | None = None) -> None:
    """The layer and parameter limits (:func:`vizapp.budget.check_budget`) from the config, building at most two
    layers on the meta device, however many layers it asks for; not the allow-list for the operator's ``local`` folder.
    ``layers``: the attention layers when the caller counts them (a staged model, Swin, whose layers are not alike:
    it is then built whole, on the meta device)."""
    import copy
    from dataclasses import replace

    from vizapp import budget

    whole = layers is not None
    if not whole:
        layers = getattr(vision, "num_hidden_layers", None)
        layers = layers if isinstance(layers, int) and not isinstance(layers, bool) else None

    def build(k: int | None) -> torch.nn.Module:
        config = built
        if k is not None:
            config = copy.deepcopy(built)
            config.num_hidden_layers = k
        return cls._from_config(config)

    def count() -> int:
        try:
            if whole:
                return budget.meta_parameter_count(lambda: build(None))
            return budget.layered_parameter_count(build, layers)
        except Exception as e:  # noqa: BLE001 - a config transformers cannot build: said in a line
            raise ModelLoadError(
                f"{name}: transformers cannot build its config ({type(e).__name__}: {first_line(e)}); fix config.json "
                "or pick another model"
            ) from e

    limits = replace(budget.BUDGET, allowed=None) if local else None
    budget.check_budget(name, limits, layers=layers, counter=count)


def _check_complete(name: str, model: torch.nn.Module, info: dict[str, Any]) -> bool:
    """Refuse weights that leave tensors of the model at their random initialisation (transformers would fill them
    in silently and the model would pass for pretrained). A pooler alone may be missing (DINO's ``ViTModel``
    checkpoints ship none; transformers adds one by default): -> True when it is.

    Raises:
        ModelLoadError: naming how many of the model's tensors the weights lack, and a few of them.
    """
    missing = sorted(info.get("missing_keys") or ())
    pooler = [k for k in missing if ".pooler." in f".{k}"]
    missing = [k for k in missing if k not in pooler]
    mismatched = [k[0] if isinstance(k, tuple) else k for k in info.get("mismatched_keys") or ()]  # (key, shapes)
    if missing or mismatched:
        total = len(model.state_dict())
        shown = ", ".join(str(k) for k in (missing or mismatched)[:3])
        what = [f"lack {len(missing)} of the model's {total} tensors"] if missing else []
        what += [f"have {len(mismatched)} of its {total} tensors in another shape than config.json says"] * bool(
            mismatched
        )
        raise ModelLoadError(
            f"{name}: its weights {' and '.join(what)} (e.g. {shown}); they would be random, so it is refused. Use a "
            "complete model.safetensors saved with this config.json"
        )
    return bool(pooler)


def load(
    name: str,
    pretrained: bool,
    device: torch.device,
    dtype: torch.dtype,
    kwargs: dict[str, Any],
    hub_only: bool = False,
) -> VizModel:
    """An ``hf:owner/repo`` id or a ``save_pretrained`` folder. With ``pretrained=False`` the architecture of the
    config is built with random weights. ``kwargs`` override config fields, for pretrained weights too.
    ``hub_only``: ``hf:A/B`` is a hub id even where this machine has a folder A/B (a visitor's id)."""
    from vizapp.capture import attention_layers

    src, local = _source(name, hub_only)
    folder = src if local else _hub_folder(src)
    shown = os.path.basename(os.path.normpath(src)) if local else name  # messages name a folder, not its path
    config = _config(folder, shown, local)
    for k, v in kwargs.items():
        if not hasattr(config, k):
            raise BadParameterError(f"{type(config).__name__} has no field {k!r}")
        setattr(config, k, v)
    if config.model_type in swin.HF_TYPES:  # windowed attention: the Swin adapter, from this folder or hub snapshot
        cls = swin.hf_model_class(config)
        _check_budget(shown, cls, config, config, local, layers=sum(int(d) for d in config.depths))
        if pretrained and not local:
            folder = _hub_weights(src, folder)
        return swin.load_hf(name, folder, pretrained, device, dtype, config=config, local=local)
    vision = _vision_config(config)
    check_geometry(shown, vision.to_dict(), "fix its config.json")
    model_type = vision.model_type
    if model_type not in MODEL_TYPES:
        raise UnsupportedModelError(
            f"{name}: transformers model type {model_type!r} is not one vizapp captures exactly; supported: "
            f"{sorted(MODEL_TYPES)}"
        )
    unmasked = model_type in UNMASKED_TYPES
    if unmasked:
        config.mask_ratio = 0.0
    cls = _model_class(config)
    built = vision if config.model_type in VISION_CONFIGS else config
    _check_budget(shown, cls, built, vision, local)  # before the weights
    whole_cls = hf_text.whole_class(config)  # CLIP/SigLIP: loaded whole, for its text side (prompts)
    try:
        if pretrained:
            folder = folder if local else _hub_weights(src, folder)
            model, info = (whole_cls or cls).from_pretrained(
                folder,
                config=config if whole_cls else built,
                attn_implementation="sdpa",
                local_files_only=True,
                use_safetensors=True,  # never a pickled .bin
                output_loading_info=True,
                trust_remote_code=False,
                ignore_mismatched_sizes=True,  # reported in ``info`` and refused by _check_complete, with a message
            )
        else:
            model, info = (
                (whole_cls or cls)._from_config(config if whole_cls else built, attn_implementation="sdpa"),
                {},
            )
    except (VizappError, MemoryError, torch.OutOfMemoryError):  # out of memory keeps its own message
        raise
    except Exception as e:  # noqa: BLE001 - a bad header, a truncated file, tensors transformers cannot place
        detail = f" ({first_line(without_paths(str(e), folder))})" if local else ""  # a hub snapshot's path: never
        raise ModelLoadError(
            f"{shown}: weights could not be read{detail}; "
            + ("write model.safetensors again with save_pretrained" if local else "pick another model")
        ) from e
    untrained_pooler = _check_complete(shown, model, info)  # outside the try: its ModelLoadError is the message
    whole = None
    if whole_cls is not None:
        whole = model.eval().to(device=device, dtype=dtype)
        model = hf_text.vision_tower(cls, whole)
    attention_layers(model)  # the support check
    model.eval().to(device=device, dtype=dtype)
    base = _base(model)
    embeddings = base.embeddings
    p = _num_prefix_tokens(model_type, embeddings, vision)
    ps = pair(vision.patch_size)
    size = pair(vision.image_size)
    grid = (size[0] // ps[0], size[1] // ps[1])
    pos_prefix, has_cls = MODEL_TYPES[model_type]
    transform, mean, std, processed = image_processor(folder, model_type, size)
    if processed != size:  # the grid at the configured size is checked by load_model; the processor's here
        from vizapp.budget import check_analysis_budget

        cells = (processed[0] // ps[0]) * (processed[1] // ps[1])
        heads, layers = int(vision.num_attention_heads), len(attention_layers(model))
        check_analysis_budget(
            name,
            layers=layers,
            tokens=p + cells,
            heads=heads,
            width=int(vision.hidden_size),
            patches=cells,
            size=processed,
            device=device,
        )
    id2label = getattr(config, "id2label", None) or {}
    heads = [getattr(model, n, None) for n in ("classifier", "cls_classifier")]
    has_head = any(h is not None and not isinstance(h, torch.nn.Identity) for h in heads)
    labels = tuple(str(id2label.get(i, f"class {i}")) for i in range(len(id2label))) if has_head else ()

    # Each head's own pooling: DINOv2's classifiers read the CLS token beside the mean of the patch tokens (registers
    # left out); the others the CLS token.
    cls_and_patch_mean = model_type in ("dinov2", "dinov2_with_registers")

    def lens(x: torch.Tensor) -> torch.Tensor:
        h = base.layernorm(x)
        if getattr(model, "cls_classifier", None) is not None:  # DeiT with teacher: the mean of its two heads
            return (model.cls_classifier(h[:, 0]) + model.distillation_classifier(h[:, 1])) / 2
        if cls_and_patch_mean:
            return model.classifier(torch.cat([h[:, 0], h[:, p:].mean(dim=1)], dim=-1))
        if model_type in BEIT_TYPES:  # its pooler: the patch tokens' mean through a layer norm, or the CLS token
            return model.classifier(base.pooler(h))
        if model_type == "ijepa":  # no CLS token: the mean of the patch tokens
            return model.classifier(h.mean(dim=1))
        return model.classifier(h[:, 0])

    # The tokens the output reads (the head's, or without one the pooled feature's): for the output row of rollout,
    # relevance and flow.
    if getattr(model, "cls_classifier", None) is not None:
        readout = "cls+dist"
    elif cls_and_patch_mean and has_head:
        readout = "cls+patches"
    elif not has_cls or (
        model_type in BEIT_TYPES and getattr(base, "pooler", None) is not None and vision.use_mean_pooling
    ):
        readout = "patches"
    else:
        readout = "cls"

    rope = model_type in ROPE_TYPES
    head_dim = int(vision.hidden_size) // int(vision.num_attention_heads)
    bias_layers, shared_bias = _relative_bias_modules(model, base)
    relative = bool(bias_layers) and (shared_bias is not None or any(m is not None for m in bias_layers))
    learned = (
        not rope
        and not unmasked
        and (  # MAE's table is a fixed sin-cos one
            model_type not in BEIT_TYPES or getattr(embeddings, "position_embeddings", None) is not None
        )
    )
    # the scheme the view shows first, as for timm: rotary, else a relative bias, else the learned table (a BEiT may
    # add a learned table beside its bias: both are shown)
    position = "rope" if rope else "relative" if relative else "learned" if learned else "none"

    def relative_bias() -> torch.Tensor:
        from vizapp.posinfo import layer_bias_maps

        return layer_bias_maps(bias_layers, shared_bias, grid, name)

    def pos_embed() -> torch.Tensor:
        table = _pos_table(model_type, embeddings)[pos_prefix:]
        if table.shape[0] != grid[0] * grid[1]:
            raise UnsupportedModelError(f"{name}: {table.shape[0]} position rows for a {grid[0]}x{grid[1]} grid")
        return table

    return VizModel(
        name=name,
        model=model,
        device=device,
        transform=transform,
        labels=labels,
        num_prefix_tokens=p,
        grid_size=grid,
        patch_size=ps,
        no_embed_class=pos_prefix == 0 and learned,
        input_size=(3, *size),
        mean=mean,
        std=std,
        source="pretrained" if pretrained else "random",
        note=" ".join(
            filter(
                None,
                (
                    "" if pretrained else "Random weights (pretrained=False): predictions and maps are not meaningful.",
                    "ViT-MAE: the encoder alone, on every patch in order (no masking)." if unmasked else "",
                    "Its checkpoint has no pooler weights: the pooled output (not the attention) is untrained."
                    if untrained_pooler
                    else "",
                ),
            )
        ),
        dtype=dtype,
        num_layers=len(attention_layers(model)),
        num_heads=int(vision.num_attention_heads),
        forward_fn=_forward_unmasked if unmasked else _forward if has_cls else _forward_patch_mean,
        grid_fn=lambda h, w: (h // ps[0], w // ps[1]),
        has_class_token=has_cls,
        readout=readout,
        family="hf",
        position=position,
        pos_embed_fn=pos_embed if learned else None,
        rope_angles_fn=(lambda: _rope_angles(base, size, head_dim)) if rope else None,
        relative_bias_fn=relative_bias if position == "relative" else None,
        lens_fn=lens if has_head and getattr(base, "layernorm", None) is not None else None,
        num_registers=int(getattr(vision, "num_register_tokens", 0) or 0),
        text_tower=hf_text.text_tower(whole, folder, name) if whole is not None else None,
    )
