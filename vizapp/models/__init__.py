"""Model loading: one adapter per library, one cache, one entry point (:func:`load_model`).

Which adapter: "bundled" or a path with a model card -> :mod:`.bundled`; "hf:owner/repo" or a folder written by
transformers' ``save_pretrained`` -> :mod:`.hf` (which hands a Swin / Swinv2 config on to :mod:`.swin`); "torchvision:vit_b_16" -> :mod:`.torchvision`; "open_clip:ViT-B-32[/tag]" -> :mod:`.openclip`; anything else (a timm
name or tag, "timm:NAME", "hf-hub:owner/repo", a .safetensors file with ``arch=``) -> :mod:`.timm`. Each returns a
small frozen :class:`VizModel`; loaded models are kept in a bounded LRU cache, and a model that fails to load is
never cached.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from vizapp.budget import BudgetedModelCache, check_allowed, check_analysis_budget
from vizapp.errors import ModelLoadError
from vizapp.models.base import (
    ASSETS_DIR,
    BUNDLED,
    BUNDLED_CARD,
    POSITION_SCHEMES,
    READOUTS,
    VizModel,
    cached_hub_file,
    default_device,
    hub_reachable,
    validate_model_id,
)

__all__ = [
    "ASSETS_DIR",
    "BUNDLED",
    "BUNDLED_CARD",
    "MODEL_CACHE",
    "POSITION_SCHEMES",
    "READOUTS",
    "VizModel",
    "available_libraries",
    "cached_hub_file",
    "default_device",
    "hub_reachable",
    "load_model",
    "reload",
    "validate_model_id",
    "weights_available_offline",
]

MODEL_CACHE = BudgetedModelCache(int(os.environ.get("VIZAPP_MODEL_CACHE_SIZE", "3")))  # by count and bytes


def available_libraries() -> list[str]:
    """The model libraries vizapp can load from here: timm always; transformers when installed; torchvision."""
    import importlib.util

    return ["timm"] + [
        lib for lib in ("transformers", "torchvision", "open_clip") if importlib.util.find_spec(lib) is not None
    ]


TIMM_WEIGHT_FILES = ("model.safetensors", "open_clip_model.safetensors")
HF_FILES = ("config.json", "model.safetensors")


def weights_available_offline(name: str) -> bool:
    """Whether ``name``'s pretrained weights load without a network: bundled, or already in the local cache.

    timm names look in the Hugging Face hub cache for the repo of their pretrained config; ``hf:owner/repo`` needs
    both ``config.json`` and ``model.safetensors`` cached; ``torchvision:ARCH`` needs its file under
    ``torch.hub.get_dir()/checkpoints``. A library that is not installed, or an unknown name, gives False.
    """
    if name == BUNDLED:
        return BUNDLED_CARD.is_file()
    try:
        kind = _adapter(name)
    except ModelLoadError:
        return False
    if kind == "hf":
        if not name.startswith("hf:"):
            return os.path.isdir(name)  # the operator's folder
        return all(cached_hub_file(name[3:], (f,)) for f in HF_FILES)  # a hub id, whatever the disk holds
    if kind == "torchvision":
        if "torchvision" not in available_libraries():
            return False
        import torchvision

        try:
            weights = torchvision.models.get_model_weights(name.split(":", 1)[1]).DEFAULT
        except (ValueError, KeyError, AttributeError):
            return False
        return os.path.isfile(os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url)))
    if kind == "bundled":
        return Path(name).is_file()
    if kind == "open_clip":
        from vizapp.models import openclip

        return openclip.weights_cached(name)
    if name.startswith("hf-hub:"):
        return bool(cached_hub_file(name[len("hf-hub:") :], TIMM_WEIGHT_FILES))
    import timm

    try:
        cfg = timm.models.get_pretrained_cfg(name.split(":", 1)[1] if name.startswith("timm:") else name)
    except (RuntimeError, ValueError):
        return False
    repo = cfg.hf_hub_id if cfg is not None else None
    return bool(repo and cached_hub_file(repo, TIMM_WEIGHT_FILES))


def _adapter(name: str, allow_files: bool = True) -> str:
    """Which adapter loads ``name``; the disk is looked at only where files are allowed (a visitor's id is
    answered the same whatever this machine holds)."""
    if name == BUNDLED or name.endswith(".json"):
        return "bundled"
    if name.endswith(".safetensors"):
        return "bundled" if Path(name).with_suffix(".json").is_file() else "timm"
    if name.startswith("hf:"):
        return "hf"
    if name.startswith("torchvision:"):
        return "torchvision"
    if name.startswith("open_clip:"):
        return "open_clip"
    if allow_files and os.path.isdir(name):
        if (Path(name) / "config.json").is_file():
            return "hf"
        raise ModelLoadError(f"{name} is a folder without config.json; expected one written by save_pretrained")
    return "timm"


def _is_local(name: str, allow_files: bool) -> bool:
    """Whether ``name`` is the operator's own model rather than an id: "bundled", or, where files are allowed, a
    local checkpoint or folder (those are not on ``VIZAPP_MODELS``)."""
    if name == BUNDLED:
        return True
    if not allow_files:
        return False
    return name.endswith((".safetensors", ".json")) or os.path.isdir(name[3:] if name.startswith("hf:") else name)


def _load_uncached(
    name: str,
    pretrained: bool,
    arch: str | None,
    device: torch.device,
    dtype: torch.dtype,
    kwargs: dict[str, Any],
    allow_files: bool = True,
) -> VizModel:
    kind = _adapter(name, allow_files)
    if kind == "bundled":
        from vizapp.models import bundled

        return bundled.load(name, device, dtype)
    if kind == "hf":
        from vizapp.models import hf

        # a folder or a hub id, whatever its model type (a Swin's config sends it on to vizapp.models.swin)
        return hf.load(name, pretrained, device, dtype, kwargs, hub_only=not allow_files)
    if kind == "torchvision":
        from vizapp.models import torchvision as tv

        return tv.load(name, pretrained, device, dtype, kwargs)
    if kind == "open_clip":
        from vizapp.models import openclip

        return openclip.load(name, pretrained, device, dtype, kwargs, allow_files)
    from vizapp.models import timm as timm_adapter

    return timm_adapter.load(name, pretrained, arch, device, dtype, kwargs)


def model_width(model: torch.nn.Module) -> int | None:
    """The width D of a ViT's tokens: timm's ``embed_dim``, torchvision's ``hidden_dim``, transformers'
    ``config.hidden_size``; None when it names none."""
    for owner in (model, getattr(model, "config", None)):
        for attr in ("embed_dim", "hidden_dim", "hidden_size"):
            value = getattr(owner, attr, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def _check_analysis(vm: VizModel) -> None:
    """Refuse a model whose analysis at its configured input size would hold more than VIZAPP_MAX_ANALYSIS_BYTES."""
    if vm.windowed:  # Swin: per-layer windows, never N x N matrices (vizapp.models.swin.analysis_memory)
        from vizapp.models import swin

        swin.check_analysis_budget(vm)
        return
    gh, gw = vm.grid_size
    patches = int(gh) * int(gw)
    check_analysis_budget(
        vm.name,
        layers=vm.num_layers,
        tokens=vm.num_prefix_tokens + patches,
        heads=vm.num_heads,
        width=model_width(vm.model) or 64 * vm.num_heads,  # 64 per head, as most ViTs have, when it says nothing
        patches=patches,
        size=(int(vm.input_size[1]), int(vm.input_size[2])),
        device=vm.device,
    )


def load_model(
    name: str = BUNDLED,
    *,
    pretrained: bool = True,
    arch: str | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    allow_files: bool = True,
    **kwargs: Any,
) -> VizModel:
    """Load (or fetch from the cache) a ViT and its token bookkeeping.

    Args:
        name: a timm name or name.tag ("vit_base_patch16_224.augreg2_in21k_ft_in1k", optionally "timm:..."), an
            "hf-hub:owner/repo" timm id, an "hf:owner/repo" transformers id, a folder written by transformers'
            ``save_pretrained``, "torchvision:vit_b_16", "open_clip:ViT-B-32/laion2b_s34b_b79k" (OpenCLIP, its tag
            naming the weights; ``checkpoint=FILE`` loads a local weights file instead), a path to a .safetensors
            file (with ``arch=...``, or a model card .json beside it), or "bundled".
        pretrained: False builds the architecture with random weights (tests, timing).
        arch: timm architecture of a .safetensors checkpoint.
        device: default CUDA when available, else CPU.
        dtype: torch.float16/bfloat16 for a half-precision forward (attention maths stay fp32).
        allow_files: False refuses local paths (the hosted app).
        **kwargs: passed to the library's constructor (timm.create_model, e.g. img_size=(224, 320); torchvision's
            builder, e.g. image_size=224; for transformers, config overrides when ``pretrained=False``).

    Raises:
        BadParameterError: the id is malformed or unknown.
        ModelLoadError: weights unreachable (offline and not cached) or unreadable.
        UnsupportedModelError: the model's attention cannot be captured exactly (e.g. Swin).
    """
    name = validate_model_id(name, allow_files=allow_files)
    dev = torch.device(device) if device is not None else default_device()
    local = _is_local(name, allow_files)
    # ``local`` in the key: a visitor's hf:A/B (a hub id) is never the operator's folder A/B loaded before
    key = (
        name,
        local,
        bool(pretrained),
        arch,
        str(dev),
        str(dtype),
        tuple(sorted((k, repr(v)) for k, v in kwargs.items())),
    )
    load_args = (
        ("name", name),
        ("pretrained", bool(pretrained)),
        ("arch", arch),
        ("device", str(dev)),
        ("dtype", dtype),
        ("allow_files", bool(allow_files)),
    )
    load_args += tuple(sorted(kwargs.items()))

    if not local:
        check_allowed(name)  # VIZAPP_MODELS, before anything is read

    def loader() -> VizModel:
        vm = replace(_load_uncached(name, pretrained, arch, dev, dtype, kwargs, allow_files), load_args=load_args)
        _check_analysis(vm)  # before the model is cached or runs
        return vm

    return MODEL_CACHE.get_or_load(key, loader)


def reload(load_args: tuple[tuple[str, Any], ...]) -> VizModel:
    """The model an analysis was made with, from its ``load_args`` (a cache hit unless it was evicted)."""
    args = dict(load_args)
    prompts = args.pop("prompts", None)
    vm = load_model(args.pop("name"), **args)
    if prompts:
        from vizapp.models.prompts import with_prompts

        vm = with_prompts(vm, prompts)
    return vm


def pinned(model_ref: Any, load_args: tuple[tuple[str, Any], ...], model_name: str, fingerprint: Any) -> VizModel:
    """The network a result came from, for a method that runs it again: the same object while it is alive, else the
    cache's copy when its weights are the same; otherwise :class:`~vizapp.errors.StaleResultError` (a random-weight
    model rebuilt, weights edited, converted or moved). ``fingerprint`` is :meth:`VizModel.fingerprint` as the result
    recorded it (falsy: not pinned)."""
    vm, check = pinned_later(model_ref, load_args, model_name, fingerprint)
    check()
    return vm


def pinned_later(
    model_ref: Any, load_args: tuple[tuple[str, Any], ...], model_name: str, fingerprint: Any
) -> tuple[VizModel, Callable[[], None]]:
    """:func:`pinned` in two steps: the network (alive, or reloaded), and the check of its weights against
    ``fingerprint``, which raises what :func:`pinned` raises. A caller that runs the network on a GPU calls the check
    once that work is queued and before it takes any result, so that the check's walk of the weights runs while the
    device computes (see :func:`vizapp.gradient_pass.attention_gradients`)."""
    from vizapp.errors import StaleResultError

    vm = model_ref() if model_ref is not None else None
    where = "changed since"
    if vm is None:
        if model_ref is not None and not dict(load_args).get("pretrained", True):
            raise StaleResultError(
                f"{model_name} (random weights) is no longer in memory, and a rebuilt copy would have other "
                "weights; analyze the image again"
            )
        vm = reload(load_args)
        where = "reloaded, and its weights differ from those of"

    def check() -> None:
        if not fingerprint:
            return
        now = vm.fingerprint()
        if now.layout != fingerprint.layout:
            raise StaleResultError(
                f"the weights of {model_name} have been converted, moved or renamed (dtype, device or names "
                f"differ) since this result was made; analyze the image again to explain it"
            )
        if now.values != fingerprint.values:
            raise StaleResultError(
                f"the weights of {model_name} have {where} this result; analyze the image again to explain it"
            )

    return vm, check
