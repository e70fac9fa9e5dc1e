"""Size limits checked before a model is downloaded or built, and a model cache bounded by bytes as well as count.

On a public Space anyone can type a timm or ``hf-hub:`` id. Without a limit, ``vit_giant_patch14_dinov2`` (1.1 B
parameters, 4.5 GB in float32), ``vit_gigantic_patch14_clip_224`` (1.8 B) or ``vit_7b_patch16_dinov3`` (6.7 B) would
be downloaded and instantiated for them, and a few of those in the cache take a 16 GB Space down. The size of a timm
architecture is known without allocating anything: built under ``torch.device("meta")`` its parameters have shapes
but no storage, so summing their ``numel`` costs a fraction of a second and no memory.

Operator settings (read once at import; an invalid value stops the app at start-up rather than silently changing a
limit):

========================  ===============  =======================================================================
Variable                  Default          Meaning
========================  ===============  =======================================================================
``VIZAPP_MAX_PARAMS``     ``400000000``    Largest model (parameters + buffers) a timm/hub id may build; ``none``
                                           turns the check off (a trusted local machine).
``VIZAPP_MODELS``         unset            Comma-separated allow-list of timm/hub ids; when set, only those exact
                                           ids load (``bundled`` and the operator's own files are not ids).
``VIZAPP_CACHE_BYTES``    ``6442450944``   Total bytes (6 GiB) of parameters + buffers the model cache keeps.
========================  ===============  =======================================================================

Why 400 M parameters: the ViT-L family (ViT-L/16 304 M, CLIP ViT-L/14 304 M, DINOv2-L 304 M, EVA02-L 304 M) fits with
room for a larger image size or head, while ViT-H/14 (631 M), every giant (1.0-1.1 B), gigantic (1.8 B) and the 7 B
DINOv3 are refused. A pretrained load briefly holds the state dict and the model (2x the float32 size: 2.4 GB for a
ViT-L), and a free CPU Space has 16 GB and 2 vCPUs, on which a ViT-H forward pass with attention capture already takes
many seconds. Why 6 GiB of cache: three ViT-L models in float32 (3.7 GB) or many smaller ones, leaving about 10 GB
for the process itself (~1.5 GB), one load in flight (<= 3.2 GB at the parameter limit) and concurrent analyses
(a ViT-L at 384 px captures 24x16x577x577 float32 attention = 0.5 GB per image).
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch

from vizapp.errors import ModelLoadError, ModelTooLargeError

__all__ = [
    "Budget",
    "BudgetedModelCache",
    "BUDGET",
    "DEFAULT_CACHE_BYTES",
    "DEFAULT_MAX_PARAMS",
    "check_budget",
    "count_parameters",
    "hub_config",
    "meta_parameter_count",
    "module_nbytes",
]

DEFAULT_MAX_PARAMS = 400_000_000
DEFAULT_CACHE_BYTES = 6 * 1024**3
HUB_CONFIG_TIMEOUT_S = 5.0

V = TypeVar("V")


def _human_params(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def _human_bytes(n: int) -> str:
    return f"{n / 1024**3:.2f} GiB" if n >= 1024**3 else f"{n / 1024**2:.0f} MiB"


@dataclass(frozen=True)
class Budget:
    """The operator's limits.

    Attributes:
        max_params: largest parameter + buffer count a timm/hub id may build; None means no limit.
        allowed: when not None, the only timm/hub ids that may load (exact strings, tags included).
        cache_bytes: total bytes the model cache may hold.
    """

    max_params: int | None = DEFAULT_MAX_PARAMS
    allowed: frozenset[str] | None = None
    cache_bytes: int = DEFAULT_CACHE_BYTES

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Budget:
        """Read ``VIZAPP_MAX_PARAMS``, ``VIZAPP_MODELS`` and ``VIZAPP_CACHE_BYTES``; ValueError on a bad value."""
        env = os.environ if environ is None else environ
        raw = env.get("VIZAPP_MAX_PARAMS", "").strip()
        max_params: int | None = DEFAULT_MAX_PARAMS
        if raw.lower() in ("none", "off", "unlimited"):
            max_params = None
        elif raw:
            max_params = _positive_int("VIZAPP_MAX_PARAMS", raw)
        raw_models = env.get("VIZAPP_MODELS", "")
        allowed = None
        if raw_models.strip():
            allowed = frozenset(m.strip() for m in raw_models.split(",") if m.strip())
        raw_cache = env.get("VIZAPP_CACHE_BYTES", "").strip()
        cache_bytes = _positive_int("VIZAPP_CACHE_BYTES", raw_cache) if raw_cache else DEFAULT_CACHE_BYTES
        return cls(max_params=max_params, allowed=allowed, cache_bytes=cache_bytes)


def _positive_int(var: str, raw: str) -> int:
    try:
        value = int(float(raw)) if "e" in raw.lower() else int(raw.replace("_", ""))
    except ValueError:
        raise ValueError(f"{var}={raw!r} is not a whole number") from None
    if value <= 0:
        raise ValueError(f"{var}={raw!r} must be positive")
    return value


BUDGET = Budget.from_env()


# ----------------------------------------------------------------------------------------------------------------
# Size without allocation


def meta_parameter_count(build: Callable[[], torch.nn.Module]) -> int:
    """Parameters + buffers of the module ``build()`` makes, built on the meta device (nothing allocated)."""
    with torch.device("meta"):
        module = build()
    return sum(t.numel() for t in (*module.parameters(), *module.buffers()))


def module_nbytes(module: torch.nn.Module) -> int:
    """Bytes held by a module's parameters and buffers, each at its own dtype (0 for meta tensors' storage)."""
    tensors: Iterable[torch.Tensor] = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def hub_config(repo_id: str, hub_reachable: Callable[[], bool] | None = None) -> dict[str, Any]:
    """The ``config.json`` of a timm hub repo (from the local cache, else downloaded: a few KB, never weights).

    Args:
        repo_id: "owner/repo".
        hub_reachable: a quick probe asked before a download (huggingface_hub retries an unreachable host for ~30 s).
    """
    import json

    try:
        from huggingface_hub import hf_hub_download, try_to_load_from_cache
    except ImportError as e:  # pragma: no cover - timm depends on huggingface_hub
        raise ModelLoadError("hf-hub ids need the huggingface_hub package") from e
    path = try_to_load_from_cache(repo_id, "config.json")
    if not (isinstance(path, str) and os.path.isfile(path)):
        if hub_reachable is not None and not hub_reachable():
            raise ModelLoadError(
                f"cannot check the size of hf-hub:{repo_id}: the Hugging Face hub is unreachable and its config.json is "
                "not in the local cache; the 'bundled' model works offline"
            )
        try:
            path = hf_hub_download(repo_id, "config.json", etag_timeout=HUB_CONFIG_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - offline, missing repo, missing file: the size is unknown
            raise ModelLoadError(
                f"cannot read hf-hub:{repo_id}/config.json to check the model's size before downloading it; "
                "check the id, or ask the operator to cache it"
            ) from e
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"hf-hub:{repo_id} has an unreadable config.json") from e
    if not isinstance(cfg, dict):
        raise ModelLoadError(f"hf-hub:{repo_id} has an unreadable config.json")
    return cfg


def _architecture(
    name: str, kwargs: dict[str, Any], hub_reachable: Callable[[], bool] | None = None
) -> tuple[str, dict[str, Any]]:
    """timm architecture name and create_model kwargs for a timm name[.tag] or an ``hf-hub:`` id."""
    import timm

    if not name.startswith("hf-hub:"):
        return name.split(".", 1)[0], dict(kwargs)
    cfg = hub_config(name[len("hf-hub:") :], hub_reachable)
    arch = cfg.get("architecture")
    if not isinstance(arch, str) or not timm.is_model(arch):
        raise ModelLoadError(f"{name}: its config.json names no timm architecture I know ({str(arch)[:80]!r})")
    model_args = dict(cfg.get("model_args") or {})
    if "num_classes" in cfg:
        model_args.setdefault("num_classes", cfg["num_classes"])
    model_args.update(kwargs)
    return arch, model_args


def count_parameters(name: str, *, hub_reachable: Callable[[], bool] | None = None, **kwargs: Any) -> int:
    """Parameters + buffers of a timm model, counted on the meta device: nothing is downloaded or allocated.

    Args:
        name: a timm name or name.tag, or an ``hf-hub:owner/repo`` id (its config.json is read, not its weights).
        hub_reachable: probe asked before downloading a hub config (see :func:`hub_config`).
        **kwargs: as for ``timm.create_model`` (img_size, num_classes, ...), which can change the count.

    Returns:
        the element count; multiply by the dtype's size (4 for float32) for bytes.

    Raises:
        ModelLoadError: the architecture cannot be built (unknown name, bad kwargs, unreadable hub config).
    """
    import timm

    arch, model_args = _architecture(name, kwargs, hub_reachable)
    try:
        # fork_rng: building must not move the global RNG, so a seeded load gets the same weights with or without it
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            model = timm.create_model(arch, pretrained=False, **model_args)
    except Exception as e:  # noqa: BLE001 - whatever the constructor raises, the size is unknown: refuse
        raise ModelLoadError(f"cannot build '{name[:80]}' to check its size: {type(e).__name__}") from e
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() for t in tensors)


def check_budget(
    name: str,
    budget: Budget | None = None,
    *,
    hub_reachable: Callable[[], bool] | None = None,
    counter: Callable[[], int] | None = None,
    **kwargs: Any,
) -> int | None:
    """Refuse a timm or ``hf-hub:`` id that is not allow-listed or is over the parameter limit, before any download.

    Call this at the start of every path that turns an id into a download or a ``timm.create_model`` call.

    Args:
        name: the id as validated (``validate_model_id``).
        budget: the limits; default :data:`BUDGET` (from the environment at import).
        hub_reachable: a quick probe (``models.hub_reachable``) asked before an uncached hub config is downloaded,
            so an offline server refuses within seconds.
        counter: counts the parameters of a model that is not a timm id (a transformers or torchvision adapter
            builds it on the meta device); default :func:`count_parameters` of ``name``.
        **kwargs: the create_model kwargs the model will be built with.

    Returns:
        the parameter count (None when there is no limit and so nothing was counted).

    Raises:
        ModelTooLargeError: not on ``VIZAPP_MODELS``, or more parameters than ``VIZAPP_MAX_PARAMS``.
        ModelLoadError: the size could not be determined (fails closed).
    """
    b = BUDGET if budget is None else budget
    if b.allowed is not None and name not in b.allowed:
        shown = ", ".join(sorted(b.allowed)[:10]) + (", ..." if len(b.allowed) > 10 else "")
        raise ModelTooLargeError(f"'{name[:80]}' is not one of the models this server offers; pick one of: {shown}")
    if b.max_params is None:
        return None
    n = counter() if counter is not None else count_parameters(name, hub_reachable=hub_reachable, **kwargs)
    if n > b.max_params:
        raise ModelTooLargeError(
            f"'{name[:80]}' has {_human_params(n)} parameters ({_human_bytes(4 * n)} in float32), over this server's "
            f"limit of {_human_params(b.max_params)} (VIZAPP_MAX_PARAMS); pick a smaller model (ViT-L size or below)"
        )
    return n


# ----------------------------------------------------------------------------------------------------------------
# A cache bounded by count and bytes


class BudgetedModelCache(Generic[V]):
    """LRU of loaded models bounded by count and by total bytes; one lock per key so a model loads once.

    A drop-in for ``models._ModelCache``: ``get_or_load(key, loader)``, ``keys()``, ``clear()``. After a load, least
    recently used entries are evicted until the new one fits both bounds; a model larger than the whole byte budget is
    refused (ModelTooLargeError) and not cached. An evicted model stays alive while a request still holds it.

    Args:
        max_models: most entries kept (0: nothing is kept, every call loads).
        max_bytes: most bytes kept (sum of ``size_of`` over entries); default :data:`BUDGET`'s ``cache_bytes``.
        size_of: value -> bytes; default the parameter + buffer bytes of ``value.model``.
    """

    def __init__(
        self, max_models: int, max_bytes: int | None = None, size_of: Callable[[V], int] | None = None
    ) -> None:
        if max_models < 0:
            raise ValueError(f"max_models must be >= 0 (0 keeps nothing), got {max_models}")
        self.max_models = max_models
        self.max_bytes = BUDGET.cache_bytes if max_bytes is None else int(max_bytes)
        self._size_of = size_of or (lambda vm: module_nbytes(vm.model))  # type: ignore[attr-defined]
        self._items: OrderedDict[tuple, tuple[V, int]] = OrderedDict()
        self._lock = threading.Lock()
        self._key_locks: dict[tuple, threading.Lock] = {}

    def _hit(self, key: tuple) -> V | None:
        item = self._items.get(key)
        if item is None:
            return None
        self._items.move_to_end(key)
        return item[0]

    def get_or_load(self, key: tuple, loader: Callable[[], V]) -> V:
        """The cached value for ``key``, else ``loader()`` (cached only if it loaded and fits)."""
        with self._lock:
            hit = self._hit(key)
            if hit is not None:
                return hit
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                hit = self._hit(key)
                if hit is not None:
                    return hit
            try:
                value = loader()  # raises -> nothing cached
                nbytes = int(self._size_of(value))
                if nbytes > self.max_bytes:
                    raise ModelTooLargeError(
                        f"this model needs {_human_bytes(nbytes)}, more than the whole model cache "
                        f"({_human_bytes(self.max_bytes)}, VIZAPP_CACHE_BYTES); pick a smaller model"
                    )
                with self._lock:
                    self._items[key] = (value, nbytes)
                    self._items.move_to_end(key)
                    while len(self._items) > self.max_models or self._total() > self.max_bytes:
                        self._items.popitem(last=False)
            finally:
                with self._lock:
                    self._key_locks.pop(key, None)
            return value

    def _total(self) -> int:
        return sum(nbytes for _, nbytes in self._items.values())

    def total_bytes(self) -> int:
        """Bytes held by the cached entries."""
        with self._lock:
            return self._total()

    def keys(self) -> list[tuple]:
        """Keys from least to most recently used."""
        with self._lock:
            return list(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
