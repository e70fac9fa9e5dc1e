"""Model loading: timm names/tags, ``hf-hub:`` ids, local ``.safetensors`` checkpoints and the bundled model.

Everything the analyses need about a model's tokens (prefix tokens, grid, patch size, ``no_embed_class``) is read
from the model object here, once, into a small frozen :class:`VizModel`. Loaded models are kept in a bounded LRU
cache; a model that fails to load is never cached.
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch
from PIL import Image

from vizapp.errors import BadParameterError, ModelLoadError, UnsupportedModelError

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
BUNDLED_CARD = ASSETS_DIR / "models" / "fmnist_vit.json"
BUNDLED = "bundled"
HUB_TIMEOUT_S = 3.0
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,199}$")
_HUB_ID_RE = re.compile(r"^hf-hub:[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}$")


@dataclass(frozen=True, eq=False)
class VizModel:
    """A loaded ViT and the token bookkeeping read from it.

    Attributes:
        name: the id it was loaded by.
        model: the nn.Module, in eval mode, on ``device``.
        transform: PIL.Image -> input tensor [C, H, W], from the model's own data config (or the bundled card).
        labels: class names, one per output (empty when the model has no classifier head).
        num_prefix_tokens: tokens before the patches (CLS, distillation token, registers).
        grid_size: patch grid (gh, gw) at the configured input size.
        patch_size: patch size in pixels (ph, pw).
        no_embed_class: True when ``pos_embed`` has patch rows only.
        input_size: (C, H, W) the transform produces.
        mean, std: the input normalisation (to show the model's view of the image).
        source: "pretrained", "random", "file" or "bundled".
        note: a sentence for the UI about what this model is (e.g. random weights).
    """

    name: str
    model: torch.nn.Module
    device: torch.device
    transform: Callable[[Image.Image], torch.Tensor]
    labels: tuple[str, ...]
    num_prefix_tokens: int
    grid_size: tuple[int, int]
    patch_size: tuple[int, int]
    no_embed_class: bool
    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str
    note: str = ""
    dtype: torch.dtype = torch.float32
    card: dict[str, Any] = field(default_factory=dict)
    load_args: tuple[tuple[str, Any], ...] = ()
    has_class_token: bool = True

    @property
    def num_layers(self) -> int:
        return len(self.model.blocks)

    @property
    def num_heads(self) -> int:
        return int(self.model.blocks[0].attn.num_heads)

    @property
    def pos_embed_status(self) -> str:
        """Empty when the model has a learned absolute position embedding, else the reason it has none."""
        pe = getattr(self.model, "pos_embed", None)
        if pe is None:
            return (
                f"{self.name} has no learned absolute position embedding (it uses another position scheme, e.g. RoPE);"
                " pick a ViT/DeiT model to see this view"
            )
        if not isinstance(pe, torch.nn.Parameter):
            return f"{self.name}'s position embedding is fixed (not learned), so there is nothing learned to show"
        return ""

    def patch_pos_embed(self) -> torch.Tensor | None:
        """The learned patch position embeddings [P, D] (prefix rows removed when present), or None."""
        from vizapp.analysis import patch_pos_embed

        if self.pos_embed_status:
            return None
        return patch_pos_embed(self.model.pos_embed.float().cpu(), self.num_prefix_tokens, self.no_embed_class)

    def pos_similarity(self, grid_size: tuple[int, int] | None = None) -> np.ndarray | None:
        """Cosine similarity grid of the learned position embeddings, numpy [gh, gw, gh, gw], or None.

        Args:
            grid_size: show the embeddings resampled to this grid (timm's bicubic resampler); default the model's.
        """
        from vizapp.analysis import pos_embed_similarity, resample_patch_pos_embed

        pe = self.patch_pos_embed()
        if pe is None:
            return None
        grid = self.grid_size
        if grid_size is not None and tuple(grid_size) != tuple(grid):
            pe = resample_patch_pos_embed(pe, grid, grid_size)
            grid = tuple(grid_size)
        return pos_embed_similarity(pe, grid).numpy()


# ----------------------------------------------------------------------------------------------------------------
# Validation of ids


def validate_model_id(name: Any, allow_files: bool = True) -> str:
    """Check a model id before anything is loaded; return it stripped, or raise BadParameterError."""
    if not isinstance(name, str):
        raise BadParameterError(f"model must be a string id, got {type(name).__name__}")
    name = name.strip()
    if not name:
        raise BadParameterError("model id is empty; pick a model from the list, e.g. 'bundled'")
    if len(name) > 300:
        raise BadParameterError(f"model id is {len(name)} characters long; timm and hub ids are at most 200")
    if name == BUNDLED:
        return name
    if name.startswith("hf-hub:"):
        if not _HUB_ID_RE.match(name):
            raise BadParameterError(f"'{name[:80]}' is not a valid hub id; expected hf-hub:<owner>/<repo>")
        return name
    if name.endswith(".safetensors"):
        if not allow_files:
            raise BadParameterError("loading local files is disabled here; pick a model from the list")
        return name
    if not _ID_RE.match(name):
        raise BadParameterError(f"'{name[:80]}' is not a timm model name; e.g. vit_base_patch16_224.augreg2_in21k_ft_in1k")
    import timm

    arch = name.split(".", 1)[0]
    if not timm.is_model(arch):
        import difflib

        close = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.75)
        hint = f"; did you mean {' or '.join(close)}?" if close else "; see timm.list_models('vit_*') for names"
        raise BadParameterError(f"unknown model '{name[:80]}'{hint}")
    return name


# ----------------------------------------------------------------------------------------------------------------
# Metadata and transforms


def _pair(x: Any) -> tuple[int, int]:
    if isinstance(x, (int, np.integer)):
        return (int(x), int(x))
    return (int(x[0]), int(x[1]))


def check_supported(model: torch.nn.Module, name: str = "model") -> None:
    """Raise UnsupportedModelError unless ``model`` is a timm VisionTransformer whose blocks use timm's Attention."""
    from timm.layers import Attention

    blocks = getattr(model, "blocks", None)
    if blocks is None or getattr(model, "patch_embed", None) is None or not hasattr(model, "num_prefix_tokens"):
        raise UnsupportedModelError(
            f"{name} ({type(model).__name__}) is not a plain ViT; vizapp supports timm's VisionTransformer family "
            "(vit_*, deit_*, deit3_*, *_reg4_*, *_dinov2, *_clip_*), not Swin, ConvNeXt, BEiT, EVA or hybrid models"
        )
    for i, blk in enumerate(blocks):
        attn = getattr(blk, "attn", None)
        if not isinstance(attn, Attention):
            what = type(attn).__name__ if attn is not None else f"{type(blk).__name__} (no separate attention module)"
            raise UnsupportedModelError(
                f"{name}: block {i} uses {what}, not timm's standard Attention, so its attention "
                "cannot be captured exactly; pick a ViT/DeiT/DINO/CLIP/register model"
            )


def _model_metadata(model: torch.nn.Module) -> dict[str, Any]:
    pe = model.patch_embed
    return {
        "num_prefix_tokens": int(model.num_prefix_tokens),
        "grid_size": _pair(pe.grid_size),
        "patch_size": _pair(pe.patch_size),
        "no_embed_class": bool(getattr(model, "no_embed_class", False)),
        "has_class_token": getattr(model, "cls_token", None) is not None,
    }


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


def _timm_transform(model: torch.nn.Module) -> tuple[Callable, dict[str, Any]]:
    from timm.data import create_transform, resolve_data_config

    cfg = resolve_data_config(model=model)
    # The configured input size wins over the pretrained cfg's (e.g. img_size=(224, 320) for a non-square input).
    cfg["input_size"] = (int(cfg["input_size"][0]), *_pair(model.patch_embed.img_size))
    tf = create_transform(**cfg, is_training=False)
    return tf, cfg


def bundled_transform(card: dict[str, Any]) -> Callable[[Image.Image], torch.Tensor]:
    """PIL.Image (any mode/size) -> tensor [C, H, W] as the bundled model was trained, driven by its card.

    The image is made grayscale, its polarity matched to the card (Fashion-MNIST: light object on a dark
    background; a photo on a white background is inverted), padded to a square with its own background colour
    (so the object keeps its aspect ratio), resized, and normalised with the card's mean/std.
    """
    c, h, w = (int(v) for v in card["input_size"])
    mean = torch.tensor(card["mean"], dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(card["std"], dtype=torch.float32).view(-1, 1, 1)
    polarity = card.get("polarity", "light_on_dark")
    resample = Image.Resampling.BILINEAR if card.get("interpolation", "bilinear") == "bilinear" else Image.Resampling.BICUBIC

    def transform(img: Image.Image) -> torch.Tensor:
        g = img.convert("L")
        a = np.asarray(g, dtype=np.float32) / 255.0  # [H, W]
        border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
        bg = float(np.median(border))
        if (polarity == "light_on_dark" and bg > 0.5) or (polarity == "dark_on_light" and bg < 0.5):
            a, bg = 1.0 - a, 1.0 - bg
        ih, iw = a.shape
        side = max(ih, iw)
        if ih != iw:
            sq = np.full((side, side), bg, dtype=np.float32)
            top, left = (side - ih) // 2, (side - iw) // 2
            sq[top : top + ih, left : left + iw] = a
            a = sq
        if a.shape != (h, w):
            a = np.asarray(Image.fromarray(a, mode="F").resize((w, h), resample=resample, reducing_gap=None))
        x = torch.from_numpy(np.array(a, dtype=np.float32)).float().clamp(0, 1)[None].expand(c, h, w)
        return (x - mean) / std

    return transform


# ----------------------------------------------------------------------------------------------------------------
# Loading


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def hub_reachable(timeout: float = HUB_TIMEOUT_S) -> bool:
    """True when the Hugging Face hub answers a TCP connect within ``timeout`` s (DNS included); never blocks longer."""
    try:
        from huggingface_hub import constants

        if constants.is_offline_mode():
            return False
        endpoint = constants.ENDPOINT
    except Exception:  # noqa: BLE001
        endpoint = "https://huggingface.co"
    host = urlparse(endpoint).hostname or "huggingface.co"
    port = urlparse(endpoint).port or 443
    ok = threading.Event()

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                ok.set()
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return ok.is_set()


def _cached_hub_file(repo_id: str, filenames: tuple[str, ...]) -> str | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for fn in filenames:
        path = try_to_load_from_cache(repo_id, fn)
        if isinstance(path, str) and os.path.isfile(path):
            return path
    return None


cached_hub_file = _cached_hub_file  # public: the first of ``filenames`` in the local hub cache, or None


def _offline_message(name: str, repo: str | None) -> str:
    where = f" (hub repo {repo})" if repo else ""
    return (
        f"cannot load '{name}'{where}: the Hugging Face hub is unreachable and its weights are not in the local cache. "
        "Connect once to cache them, copy a cache (HF_HOME) from another machine, or pass a local .safetensors file "
        "with arch=...; the 'bundled' model works offline."
    )


def _create_timm(name: str, pretrained: bool, **kwargs: Any) -> tuple[torch.nn.Module, str]:
    import timm

    if not pretrained:
        arch = name.split(".", 1)[0] if not name.startswith("hf-hub:") else name
        return timm.create_model(arch, pretrained=False, **kwargs), "random"
    if name.startswith("hf-hub:"):
        repo = name[len("hf-hub:") :]
        cfg_path = _cached_hub_file(repo, ("config.json",))
        weights = _cached_hub_file(repo, ("model.safetensors", "open_clip_model.safetensors"))
        if cfg_path and weights:
            with open(cfg_path, encoding="utf-8") as f:
                hub_cfg = json.load(f)
            arch = hub_cfg.get("architecture")
            if not isinstance(arch, str) or not timm.is_model(arch):
                raise ModelLoadError(f"{name}: its config.json names no timm architecture I know ({arch!r})")
            pcfg = {k: v for k, v in (hub_cfg.get("pretrained_cfg") or {}).items() if k not in ("hf_hub_id", "source")}
            pcfg["file"] = weights
            model_args = dict(hub_cfg.get("model_args") or {})
            if "num_classes" in hub_cfg:
                model_args.setdefault("num_classes", hub_cfg["num_classes"])
                # timm drops a checkpoint's head when the cfg's class count differs from the model's.
                pcfg["num_classes"] = model_args["num_classes"]
            model_args.update(kwargs)
            return timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=pcfg, **model_args), "pretrained"
        if not hub_reachable():
            raise ModelLoadError(_offline_message(name, repo))
        return timm.create_model(name, pretrained=True, **kwargs), "pretrained"
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        tags = timm.list_pretrained(name.split(".", 1)[0] + ".*")[:8]
        raise BadParameterError(f"'{name}' has no pretrained weights in timm; tags with weights: {tags}")
    repo = cfg.hf_hub_id
    if repo:
        weights = _cached_hub_file(repo, (cfg.hf_hub_filename or "model.safetensors", "open_clip_model.safetensors"))
        if weights:
            return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": weights}, **kwargs), "pretrained"
    if not hub_reachable():
        raise ModelLoadError(_offline_message(name, repo))
    return timm.create_model(name, pretrained=True, **kwargs), "pretrained"


def _load_safetensors_into(model: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import load_file

    try:
        state = load_file(str(path), device="cpu")
    except Exception as e:  # noqa: BLE001 - any parse failure is the file's fault
        raise ModelLoadError(f"{path.name} is not a readable .safetensors file: {e}") from e
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        first = str(e).split("\n\t")[1:2]
        raise ModelLoadError(f"{path.name} does not match the architecture: {first[0] if first else e}") from e
    if missing or unexpected:
        raise ModelLoadError(
            f"{path.name} does not match the architecture: missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]}"
        )


def load_card(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            card = json.load(f)
    except FileNotFoundError as e:
        raise ModelLoadError(f"model card {path} is missing; run `python -m vizapp.train` to create it") from e
    for key in ("model_args", "input_size", "mean", "std", "class_names"):
        if key not in card:
            raise ModelLoadError(f"model card {path} lacks '{key}'")
    return card


def _build_from_card(card_path: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    from timm.models.vision_transformer import VisionTransformer

    card = load_card(card_path)
    weights = card_path.with_suffix(".safetensors")
    if not weights.is_file():
        raise ModelLoadError(f"weights {weights} are missing; run `python -m vizapp.train` to create them")
    model = VisionTransformer(**card["model_args"])
    _load_safetensors_into(model, weights)
    return model, card


def _load_uncached(
    name: str, pretrained: bool, arch: str | None, device: torch.device, dtype: torch.dtype, kwargs: dict[str, Any]
) -> VizModel:
    card: dict[str, Any] = {}
    note = ""
    if name == BUNDLED or name.endswith(".json"):
        model, card = _build_from_card(BUNDLED_CARD if name == BUNDLED else Path(name))
        source = "bundled"
        note = (
            f"Bundled offline model: a small ViT trained here on Fashion-MNIST "
            f"({100 * float(card.get('test_accuracy', float('nan'))):.1f}% test accuracy); it sees 28x28 grayscale."
        )
    elif name.endswith(".safetensors"):
        path = Path(name)
        sidecar = path.with_suffix(".json")
        if sidecar.is_file():
            model, card = _build_from_card(sidecar)
            source = "file"
        else:
            if not arch:
                raise BadParameterError(f"loading {path.name} needs arch=... (the timm architecture it was saved from)")
            if not path.is_file():
                raise ModelLoadError(f"no such file: {path}")
            import timm
            from safetensors import safe_open

            try:
                with safe_open(str(path), framework="pt") as f:
                    keys = set(f.keys())
                    nc = f.get_slice("head.weight").get_shape()[0] if "head.weight" in keys else 0
            except Exception as e:  # noqa: BLE001 - any parse failure is the file's fault
                raise ModelLoadError(f"{path.name} is not a readable .safetensors file: {e}") from e
            model = timm.create_model(validate_model_id(arch).split(".", 1)[0], pretrained=False, num_classes=nc, **kwargs)
            _load_safetensors_into(model, path)
            source = "file"
        note = f"Weights from {path.name}."
    else:
        model, source = _create_timm(name, pretrained, **kwargs)
        if source == "random":
            note = "Random weights (pretrained=False): predictions and maps are not meaningful."
    check_supported(model, name)
    model.eval().to(device=device, dtype=dtype)
    meta = _model_metadata(model)
    if card:
        transform = bundled_transform(card)
        labels = tuple(card["class_names"])
        input_size = tuple(int(v) for v in card["input_size"])
        mean, std = tuple(card["mean"]), tuple(card["std"])
    else:
        transform, cfg = _timm_transform(model)
        labels = _imagenet_labels(model)
        input_size = tuple(cfg["input_size"])
        mean, std = tuple(cfg["mean"]), tuple(cfg["std"])
    return VizModel(
        name=name,
        model=model,
        device=device,
        transform=transform,
        labels=labels,
        input_size=input_size,  # type: ignore[arg-type]
        mean=tuple(float(v) for v in mean),
        std=tuple(float(v) for v in std),
        source=source,
        note=note,
        dtype=dtype,
        card=card,
        **meta,
    )


class _ModelCache:
    """Bounded LRU of loaded models; one lock per key so concurrent first loads of a model load it once."""

    def __init__(self, max_models: int) -> None:
        self.max_models = max_models
        self._items: OrderedDict[tuple, VizModel] = OrderedDict()
        self._lock = threading.Lock()
        self._key_locks: dict[tuple, threading.Lock] = {}

    def get_or_load(self, key: tuple, loader: Callable[[], VizModel]) -> VizModel:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                if key in self._items:
                    self._items.move_to_end(key)
                    return self._items[key]
            vm = loader()  # raises -> nothing cached
            with self._lock:
                self._items[key] = vm
                self._items.move_to_end(key)
                while len(self._items) > self.max_models:
                    self._items.popitem(last=False)
                self._key_locks.pop(key, None)
            return vm

    def keys(self) -> list[tuple]:
        with self._lock:
            return list(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


MODEL_CACHE = _ModelCache(int(os.environ.get("VIZAPP_MODEL_CACHE_SIZE", "3")))


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
        name: a timm name or name.tag ("vit_base_patch16_224.augreg2_in21k_ft_in1k"), an "hf-hub:owner/repo" id,
            a path to a .safetensors file (with ``arch=...``, or a model card .json beside it), or "bundled".
        pretrained: False builds the architecture with random weights (tests, timing).
        arch: timm architecture of a .safetensors checkpoint.
        device: default CUDA when available, else CPU.
        dtype: torch.float16/bfloat16 for a half-precision forward (attention maths stay fp32).
        allow_files: False refuses local paths (the hosted app).
        **kwargs: passed to timm.create_model (e.g. img_size=(224, 320), dynamic_img_size=True).

    Raises:
        BadParameterError: the id is malformed or unknown.
        ModelLoadError: weights unreachable (offline and not cached) or unreadable.
        UnsupportedModelError: the model's attention cannot be captured exactly (e.g. Swin).
    """
    name = validate_model_id(name, allow_files=allow_files)
    dev = torch.device(device) if device is not None else default_device()
    key = (name, bool(pretrained), arch, str(dev), str(dtype), tuple(sorted((k, repr(v)) for k, v in kwargs.items())))
    load_args = (("name", name), ("pretrained", bool(pretrained)), ("arch", arch), ("device", str(dev)), ("dtype", dtype))
    load_args += tuple(sorted(kwargs.items()))

    def loader() -> VizModel:
        return replace(_load_uncached(name, pretrained, arch, dev, dtype, kwargs), load_args=load_args)

    return MODEL_CACHE.get_or_load(key, loader)


def reload(load_args: tuple[tuple[str, Any], ...]) -> VizModel:
    """The model an analysis was made with, from its ``load_args`` (a cache hit unless it was evicted)."""
    args = dict(load_args)
    return load_model(args.pop("name"), **args)
