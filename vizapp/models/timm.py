"""The timm adapter: timm names and tags, ``hf-hub:`` ids of timm models, and local ``.safetensors`` checkpoints.

Everything vizapp needs about the network is read from timm's own attributes: ``num_prefix_tokens`` (CLS,
distillation token, registers), ``cls_token``, ``no_embed_class``, ``patch_embed`` (grid, patch size, dynamic sizes),
``pos_embed`` or the rotary / relative-position modules, ``pretrained_cfg`` (preprocessing, class names).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from vizapp.errors import BadParameterError, ModelLoadError, UnsupportedModelError
from vizapp.models.base import (
    VizModel,
    cached_hub_file,
    check_geometry,
    first_line,
    hub_reachable,
    offline_message,
    pair,
)

HOW = "Connect once to cache them, copy a cache (HF_HOME) from another machine, or pass a local .safetensors file with arch=...."


def check_supported(model: torch.nn.Module, name: str = "model") -> None:
    """Raise UnsupportedModelError unless vizapp can capture ``model``'s attention exactly and read its patch grid."""
    from vizapp.capture import SUPPORTED_FAMILIES, attention_layers

    if (getattr(model, "patch_embed", None) is None and getattr(model, "embeds", None) is None) or not hasattr(
        model, "num_prefix_tokens"
    ):
        raise UnsupportedModelError(
            f"{name} ({type(model).__name__}) is not a ViT with a patch embedding and prefix tokens vizapp can read; "
            f"supported: {SUPPORTED_FAMILIES}"
        )
    attention_layers(model)


def position_scheme(model: torch.nn.Module) -> str:
    """ "learned", "rope", "relative" or "none", read from the model's modules."""
    if getattr(model, "rope", None) is not None or any(getattr(b.attn, "rope", None) is not None for b in model.blocks):
        return "rope"
    from vizapp.posinfo import relative_bias_modules

    own, shared = relative_bias_modules(model)
    if shared is not None or any(m is not None for m in own):
        return "relative"
    pe = getattr(model, "pos_embed", None)
    return "learned" if isinstance(pe, torch.nn.Parameter) else "none"


def _grid_fn(model: torch.nn.Module) -> Callable[[int, int], tuple[int, int]]:
    pe = model.patch_embed

    def grid(height: int, width: int) -> tuple[int, int]:
        if getattr(model, "dynamic_img_size", False) or getattr(pe, "dynamic_img_pad", False):
            gh, gw = pe.dynamic_feat_size((height, width))
            return int(gh), int(gw)
        return pair(pe.grid_size)

    return grid


def _forward(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x)


def _num_registers(model: torch.nn.Module) -> int:
    """Register tokens: ``num_reg_tokens`` (VisionTransformer), else the ``reg_token`` parameter's length (Eva)."""
    n = getattr(model, "num_reg_tokens", None)
    if n is not None:
        return int(n)
    reg = getattr(model, "reg_token", None)
    return int(reg.shape[1]) if isinstance(reg, torch.Tensor) else 0


def metadata(model: torch.nn.Module, input_size: tuple[int, int, int]) -> dict[str, Any]:
    """The token bookkeeping and callables of a timm ViT, for :class:`VizModel`; ``input_size`` is what the
    transform produces (the grid of a NaFlexViT follows its input)."""
    p = int(model.num_prefix_tokens)
    no_embed_class = bool(getattr(model, "no_embed_class", False))
    position = position_scheme(model)
    pe = getattr(model, "patch_embed", None)
    if pe is not None:
        patch, grid, grid_fn = pair(pe.patch_size), pair(pe.grid_size), _grid_fn(model)
    else:  # NaFlexViT: patches of any grid, a learned [1, gh, gw, D] table resampled to it
        embeds = model.embeds
        patch = pair(embeds.patch_size)
        grid = (input_size[1] // patch[0], input_size[2] // patch[1])
        no_embed_class = True

        def grid_fn(height: int, width: int) -> tuple[int, int]:
            return height // patch[0], width // patch[1]

    def pos_embed() -> torch.Tensor | None:
        from vizapp.analysis import patch_pos_embed, resample_patch_pos_embed

        if pe is not None:
            return patch_pos_embed(model.pos_embed.detach().float().cpu(), p, no_embed_class)
        table = model.embeds.pos_embed.detach().float().cpu()[0]  # [gh, gw, D]
        flat = table.reshape(-1, table.shape[-1])
        stored = (int(table.shape[0]), int(table.shape[1]))
        return flat if stored == grid else resample_patch_pos_embed(flat, stored, grid)

    # Pooled by the class token through a per-token final norm, the head reads the prefix tokens alone (the class
    # token; DeiT's distillation token too): the lens normalises those of each block instead of all N (ViT-Ti/16:
    # 12 x 197 tokens were a third of its layer norms' time).
    token_pooled = (
        getattr(model, "global_pool", None) == "token"
        and getattr(model, "attn_pool", None) is None
        and isinstance(getattr(model, "norm", None), (torch.nn.LayerNorm, torch.nn.Identity))
    )

    def lens(x: torch.Tensor) -> torch.Tensor:
        return model.forward_head(model.norm(x[:, : max(p, 1)] if token_pooled else x))

    # Pooled by an attention-pooling head (MAP, as SigLIP): the same readout with the head's attention written out,
    # for LeGrad's gradient on it (vizapp.models.pooling)
    from vizapp.models.pooling import timm_readout

    pooled = timm_readout(model)

    has_cls = getattr(model, "cls_token", None) is not None or bool(getattr(model, "has_class_token", False))
    has_head = int(getattr(model, "num_classes", 0) or 0) > 0
    # a learned table: the scheme itself, or added beside RoPE / a relative bias (EVA-02, PE)
    has_pos = (
        isinstance(getattr(model, "pos_embed", None), torch.nn.Parameter)
        if pe is not None
        else (getattr(model.embeds, "pos_embed_type", "") == "learned")
    )
    return {
        "num_prefix_tokens": p,
        "grid_size": grid,
        "patch_size": patch,
        "no_embed_class": no_embed_class,
        "has_class_token": has_cls,
        "readout": _readout(model, has_cls),
        "num_layers": len(model.blocks),
        "num_heads": int(model.blocks[0].attn.num_heads),
        "forward_fn": _forward,
        "grid_fn": grid_fn,
        "position": "learned" if has_pos and position == "none" else position,
        "pos_embed_fn": pos_embed if has_pos else None,
        "lens_fn": (pooled or lens) if has_head else None,
        "num_registers": _num_registers(model),
        "family": "timm",
    }


def _readout(model: torch.nn.Module, has_cls: bool) -> str:
    """Which tokens timm's head reads, from its pooling: ``global_pool="token"`` reads the class token (and a
    distilled model's second head the distillation token, the two heads' outputs averaged in eval); any other pooling
    (avg, max, an attention-pooling head) reads the patch tokens, or every token with ``pool_include_prefix``."""
    pool = getattr(model, "global_pool", "token")
    if getattr(model, "attn_pool", None) is None and (pool == "token" or not pool) and has_cls:
        dist = getattr(model, "dist_token", None) is not None and getattr(model, "head_dist", None) is not None
        return "cls+dist" if dist else "cls"
    return "tokens" if getattr(model, "pool_include_prefix", False) else "patches"


def _imagenet_labels(model: torch.nn.Module) -> tuple[str, ...]:
    num_classes = int(getattr(model, "num_classes", 0) or 0)
    if num_classes == 0:
        return ()
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = cfg.get("label_names")
    if names and len(names) == num_classes:
        return tuple(str(n) for n in names)
    try:
        from timm.data import ImageNetInfo, infer_imagenet_subset

        subset = infer_imagenet_subset(model)
        if subset:
            info = ImageNetInfo(subset)
            return tuple(info.index_to_description(i).split(",")[0] for i in range(num_classes))
    except Exception:  # noqa: BLE001 - labels are cosmetic; fall back to indices
        pass
    return tuple(f"class {i}" for i in range(num_classes))


imagenet_labels = _imagenet_labels  # the Swin adapter's too


def _timm_transform(model: torch.nn.Module) -> tuple[Callable, dict[str, Any], Callable | None]:
    """(the transform for one image, the data config, a fixed-size transform for batches or None when the first one
    already gives every image the same size)."""
    from timm.data import create_transform, resolve_data_config

    cfg = resolve_data_config(model=model)
    # The configured input size wins over the pretrained cfg's (e.g. img_size=(224, 320) for a non-square input).
    pe = getattr(model, "patch_embed", None)
    if pe is not None:
        cfg["input_size"] = (int(cfg["input_size"][0]), *pair(pe.img_size))
        return create_transform(**cfg, is_training=False), cfg, None
    # NaFlexViT takes any grid: one image keeps its aspect ratio, within the patch budget of the configured input
    # size (timm's own NaFlex resize: 384x384 at patch 16 -> at most 576 patches, e.g. 18x32 for a 16:9 photo).
    # Batches need one size, so they get the configured square.
    patch = pair(model.embeds.patch_size)
    budget = (int(cfg["input_size"][1]) // patch[0]) * (int(cfg["input_size"][2]) // patch[1])
    one = create_transform(**cfg, is_training=False, naflex=True, patch_size=patch, max_seq_len=budget)
    return one, cfg, create_transform(**cfg, is_training=False)


def _from_file(weights: str) -> dict[str, Any]:
    """The pretrained-config overlay that loads a hub file found in the local cache. A state dict (safetensors, or a
    torch file, which timm reads with ``weights_only``) goes through timm's generic loader; only a JAX ``.npz`` file
    goes through the model's own reader (``custom_load``). The AugReg tags say ``custom_load=True`` (their weights
    were first published as ``.npz``); timm 1.0.31 drops that for an overlay that names a file, but timm 1.0.30 and
    earlier keep it and send the hub's ``model.safetensors`` to the ``.npz`` reader (which timm 1.0.29 refuses)."""
    return {"file": weights, "custom_load": str(weights).endswith(".npz")}


def _create_timm(name: str, pretrained: bool, **kwargs: Any) -> tuple[torch.nn.Module, str]:
    import timm

    from vizapp.budget import check_budget

    check_budget(name, hub_reachable=hub_reachable, **kwargs)  # allow-list and size, before any download

    if not pretrained:
        arch = name.split(".", 1)[0] if not name.startswith("hf-hub:") else name
        return timm.create_model(arch, pretrained=False, **kwargs), "random"
    if name.startswith("hf-hub:"):
        repo = name[len("hf-hub:") :]
        cfg_path = cached_hub_file(repo, ("config.json",))
        weights = cached_hub_file(repo, ("model.safetensors", "open_clip_model.safetensors"))
        if cfg_path and weights:
            with open(cfg_path, encoding="utf-8") as f:
                hub_cfg = json.load(f)
            arch = hub_cfg.get("architecture")
            if not isinstance(arch, str) or not timm.is_model(arch):
                raise ModelLoadError(f"{name}: its config.json names no timm architecture I know ({arch!r})")
            pcfg = {k: v for k, v in (hub_cfg.get("pretrained_cfg") or {}).items() if k not in ("hf_hub_id", "source")}
            pcfg.update(_from_file(weights))
            model_args = dict(hub_cfg.get("model_args") or {})
            if "num_classes" in hub_cfg:
                model_args.setdefault("num_classes", hub_cfg["num_classes"])
                # timm drops a checkpoint's head when the cfg's class count differs from the model's.
                pcfg["num_classes"] = model_args["num_classes"]
            model_args.update(kwargs)
            return timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=pcfg, **model_args), "pretrained"
        if not hub_reachable():
            raise ModelLoadError(offline_message(name, repo and f"hub repo {repo}", HOW))
        return timm.create_model(name, pretrained=True, **kwargs), "pretrained"
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        tags = timm.list_pretrained(name.split(".", 1)[0] + ".*")[:8]
        raise BadParameterError(f"'{name}' has no pretrained weights in timm; tags with weights: {tags}")
    repo = cfg.hf_hub_id
    if repo:
        weights = cached_hub_file(repo, (cfg.hf_hub_filename or "model.safetensors", "open_clip_model.safetensors"))
        if weights:
            return timm.create_model(
                name, pretrained=True, pretrained_cfg_overlay=_from_file(weights), **kwargs
            ), "pretrained"
    if not hub_reachable():
        raise ModelLoadError(offline_message(name, repo and f"hub repo {repo}", HOW))
    return timm.create_model(name, pretrained=True, **kwargs), "pretrained"


def load_safetensors_into(model: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import load_file

    try:
        state = load_file(str(path), device="cpu")
    except Exception as e:  # noqa: BLE001 - any parse failure is the file's fault
        raise ModelLoadError(
            f"{path.name} is not a readable .safetensors file ({first_line(e)}); save the weights again with "
            "safetensors.torch.save_file"
        ) from e
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        first = str(e).split("\n\t")[1:2]
        raise ModelLoadError(
            f"{path.name} does not match the architecture: {(first[0] if first else first_line(e)).rstrip('.')}; pass the "
            "architecture (and settings) it was saved from"
        ) from e
    if missing or unexpected:
        raise ModelLoadError(
            f"{path.name} does not match the architecture: missing {list(missing)[:5]}, unexpected "
            f"{list(unexpected)[:5]}; pass the architecture (and settings) it was saved from"
        )


def create_or_refuse(name: str, create: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """``create()``, with anything but a vizapp error (settings timm cannot build: an unknown argument, a width not
    divisible by the heads, ...; weights that do not fit) turned into a :class:`ModelLoadError` that names the model
    and what to change, and no server path."""
    try:
        return create()
    except (BadParameterError, ModelLoadError, UnsupportedModelError, MemoryError, torch.OutOfMemoryError):
        raise
    except Exception as e:  # noqa: BLE001 - the settings' fault, said in a line
        raise ModelLoadError(
            f"{name} could not be built with its weights ({type(e).__name__}: {first_line(e)}); check its settings "
            "and weights, or pick another model"
        ) from e


def load_safetensors_file(path: Path, arch: str | None, kwargs: dict[str, Any]) -> torch.nn.Module:
    """A timm architecture with the weights of a local .safetensors file (never unpickled)."""
    from vizapp.models.base import validate_model_id

    if not arch:
        raise BadParameterError(f"loading {path.name} needs arch=... (the timm architecture it was saved from)")
    if not path.is_file():
        raise ModelLoadError(f"no such file: {path.name}; check the path")
    import timm
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            nc = f.get_slice("head.weight").get_shape()[0] if "head.weight" in keys else 0
    except Exception as e:  # noqa: BLE001 - any parse failure is the file's fault
        raise ModelLoadError(
            f"{path.name} is not a readable .safetensors file ({first_line(e)}); save the weights again with "
            "safetensors.torch.save_file"
        ) from e
    arch = validate_model_id(arch).split(".", 1)[0]
    model = create_or_refuse(path.name, lambda: timm.create_model(arch, pretrained=False, num_classes=nc, **kwargs))
    load_safetensors_into(model, path)
    return model


def wrap(
    model: torch.nn.Module,
    name: str,
    source: str,
    note: str,
    device: torch.device,
    dtype: torch.dtype,
    transform: Callable | None = None,
    labels: tuple[str, ...] | None = None,
    input_size: tuple[int, int, int] | None = None,
    mean: Any = None,
    std: Any = None,
    card: dict[str, Any] | None = None,
) -> VizModel:
    """A :class:`VizModel` for a built timm ViT (preprocessing and labels from timm unless given)."""
    from vizapp.models import swin

    if swin.is_windowed(model) and transform is None:
        return swin.wrap_timm(model, name, source, note, device, dtype)
    check_supported(model, name)
    model.eval().to(device=device, dtype=dtype)
    fixed = None
    if transform is None:
        transform, cfg, fixed = _timm_transform(model)
        input_size, mean, std = tuple(int(v) for v in cfg["input_size"]), cfg["mean"], cfg["std"]
    return VizModel(
        name=name,
        model=model,
        device=device,
        transform=transform,
        fixed_transform=fixed,
        labels=_imagenet_labels(model) if labels is None else labels,
        input_size=input_size,  # type: ignore[arg-type]
        mean=tuple(float(v) for v in mean),
        std=tuple(float(v) for v in std),
        source=source,
        note=note,
        dtype=dtype,
        card=card or {},
        **metadata(model, input_size),
    )


def load(
    name: str, pretrained: bool, arch: str | None, device: torch.device, dtype: torch.dtype, kwargs: dict[str, Any]
) -> VizModel:
    """A timm name/tag ("timm:" optional), an ``hf-hub:`` timm id, or a .safetensors path with ``arch``."""
    check_geometry(Path(name).name if name.endswith(".safetensors") else name, kwargs, "change that setting")
    if name.endswith(".safetensors"):
        path = Path(name)
        model = load_safetensors_file(path, arch, kwargs)
        return wrap(model, name, "file", f"Weights from {path.name}.", device, dtype)
    bare = name.split(":", 1)[1] if name.startswith("timm:") else name
    model, source = create_or_refuse(name, lambda: _create_timm(bare, pretrained, **kwargs))
    note = "Random weights (pretrained=False): predictions and maps are not meaningful." if source == "random" else ""
    return wrap(model, name, source, note, device, dtype)
