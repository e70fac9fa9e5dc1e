"""Size limits checked before a model is downloaded or built, and a model cache bounded by bytes as well as count.

On a public Space anyone can type a timm or ``hf-hub:`` id. Without a limit, ``vit_giant_patch14_dinov2`` (1.1 B
parameters, 4.5 GB in float32), ``vit_gigantic_patch14_clip_224`` (1.8 B) or ``vit_7b_patch16_dinov3`` (6.7 B) would
be downloaded and instantiated for them, and a few of those in the cache take a 16 GB Space down. The size of a timm
architecture is known without allocating anything: built under ``torch.device("meta")`` its parameters have shapes
but no storage, so summing their ``numel`` costs a fraction of a second and no memory.

Operator settings (read once at import; an invalid value stops the app at start-up rather than silently changing a
limit):

=============================  ==============  ==================================================================
Variable                       Default         Meaning
=============================  ==============  ==================================================================
``VIZAPP_MAX_PARAMS``          ``400000000``   Largest model (parameters + buffers) a timm/hub id may build;
                                               ``none`` turns the check off (a trusted local machine).
``VIZAPP_MODELS``              unset           Comma-separated allow-list of timm/hub ids; when set, only those
                                               exact ids load (``bundled`` and the operator's own files are not
                                               ids), checked before anything is read.
``VIZAPP_CACHE_BYTES``         ``6442450944``  Total bytes (6 GiB) of parameters + buffers the model cache keeps.
``VIZAPP_MAX_LAYERS``          ``64``          Most encoder layers a config may ask for; ``none``: no limit.
``VIZAPP_MAX_ANALYSIS_BYTES``  ``1073741824``  Most bytes (1 GiB) one image's analysis may hold, estimated by
                                               :func:`analysis_memory` from the model's tokens at its configured
                                               input size, layers, heads and width; ``none``: no limit.
``VIZAPP_MAX_RESULTS_BYTES``   ``1073741824``  Most bytes (1 GiB) the app keeps of its visitors' analyses, all
                                               sessions together (:mod:`vizapp.ui.store`): least recently used
                                               dropped first; ``none``: no limit (still freed per session).
=============================  ==============  ==================================================================

Why 400 M parameters: the ViT-L family (ViT-L/16 304 M, CLIP ViT-L/14 304 M, DINOv2-L 304 M, EVA02-L 304 M) fits with
room for a larger image size or head, while ViT-H/14 (631 M), every giant (1.0-1.1 B), gigantic (1.8 B) and the 7 B
DINOv3 are refused. A pretrained load briefly holds the state dict and the model (2x the float32 size: 2.4 GB for a
ViT-L), and a free CPU Space has 16 GB and 2 vCPUs, on which a ViT-H forward pass with attention capture already takes
many seconds. Why 6 GiB of cache: three ViT-L models in float32 (3.7 GB) or many smaller ones, leaving about 10 GB
for the process itself (~1.5 GB), one load in flight (<= 3.2 GB at the parameter limit) and concurrent analyses
(a ViT-L at 384 px captures 24x16x577x577 float32 attention = 0.5 GB per image).

Why a layer limit: a config can ask for any depth (``num_hidden_layers`` 200,000 at width 8), and building such a
model, even on the meta device, creates every layer one by one (minutes, gigabytes of Python objects). Every ViT in
timm and transformers has at most 48 layers (ViT-22B; giants and the 7 B DINOv3 have 40), so 64 refuses only configs
made to hurt, before anything is built; and the parameter count of a deep config is arithmetic (one and two layers
built on the meta device, the difference multiplied), so it never builds the whole model either.

Why 1 GiB per analysis: the parameter limit says nothing about the input. A 531 k-parameter ViT at 1448 px with 8 px
patches has 32,762 tokens, and one N x N float32 matrix of it is 4.3 GB (the rollout and the patch distances each hold
one or more). The estimate (:func:`analysis_memory`) of a 24-layer ViT-L/14 at 1,374 tokens (DINOv2 at 518 px) is
0.42 GiB and of a ViT-L/16 at 384 px 0.21 GiB; 1 GiB passes both with room (ViT-B/16 at 1024 px, 4,097 tokens, is
0.94 GiB) and refuses a ViT-L past about 3,100 tokens, a ViT-B past 4,300 and any model past 5,700, where the N x N
terms alone pass it. Measured against the peak RSS rise of one ``vizapp.analyze`` on the CPU (transformers ViTs,
random weights): 477 MiB for an estimate of 540 at 4,097 tokens (2 layers, width 8), 140 for 184 at 2,305 tokens,
346 for 347 at 3,137 tokens (6 layers, width 64); but 222 MiB for 146 at 1,025 tokens with 12 layers of width 256,
where the allocator keeps freed per-layer temporaries: the estimate counts live tensors, not the allocator's slack.
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
from vizapp.limits import analysis_memory  # the one estimate, shared with the batch budgets

__all__ = [
    "Budget",
    "BudgetedModelCache",
    "BUDGET",
    "DEFAULT_CACHE_BYTES",
    "DEFAULT_MAX_ANALYSIS_BYTES",
    "DEFAULT_MAX_LAYERS",
    "DEFAULT_MAX_PARAMS",
    "DEFAULT_MAX_RESULTS_BYTES",
    "analysis_memory",
    "check_allowed",
    "check_analysis_budget",
    "check_budget",
    "configured_layers",
    "layered_parameter_count",
    "count_parameters",
    "hub_config",
    "meta_parameter_count",
    "module_nbytes",
]

DEFAULT_MAX_PARAMS = 400_000_000
DEFAULT_CACHE_BYTES = 6 * 1024**3
DEFAULT_MAX_LAYERS = 64
DEFAULT_MAX_ANALYSIS_BYTES = 1024**3
# Kept analyses, every session together: about 12 ViT-B/16 at 384 px (82 MB each), 40 at 224 px, 9 ViT-L/16 at 384 px
# (113 MiB), beside the 6 GiB model cache and two analyses in flight on a 16 GB Space.
DEFAULT_MAX_RESULTS_BYTES = 1024**3
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
        max_layers: most encoder layers a config may ask for; None means no limit.
        max_analysis_bytes: most bytes one image's analysis may hold (:func:`analysis_memory`); None: no limit.
        max_results_bytes: most bytes the app keeps of its sessions' analyses in all (:mod:`vizapp.ui.store`);
            None: no limit.
    """

    max_params: int | None = DEFAULT_MAX_PARAMS
    allowed: frozenset[str] | None = None
    cache_bytes: int = DEFAULT_CACHE_BYTES
    max_layers: int | None = DEFAULT_MAX_LAYERS
    max_analysis_bytes: int | None = DEFAULT_MAX_ANALYSIS_BYTES
    max_results_bytes: int | None = DEFAULT_MAX_RESULTS_BYTES

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Budget:
        """Read ``VIZAPP_MAX_PARAMS``, ``VIZAPP_MODELS``, ``VIZAPP_CACHE_BYTES``, ``VIZAPP_MAX_LAYERS``,
        ``VIZAPP_MAX_ANALYSIS_BYTES`` and ``VIZAPP_MAX_RESULTS_BYTES``; ValueError on a bad value."""
        env = os.environ if environ is None else environ
        raw_models = env.get("VIZAPP_MODELS", "")
        allowed = None
        if raw_models.strip():
            allowed = frozenset(m.strip() for m in raw_models.split(",") if m.strip())
        raw_cache = env.get("VIZAPP_CACHE_BYTES", "").strip()
        cache_bytes = _positive_int("VIZAPP_CACHE_BYTES", raw_cache) if raw_cache else DEFAULT_CACHE_BYTES
        return cls(
            max_params=_limit(env, "VIZAPP_MAX_PARAMS", DEFAULT_MAX_PARAMS),
            allowed=allowed,
            cache_bytes=cache_bytes,
            max_layers=_limit(env, "VIZAPP_MAX_LAYERS", DEFAULT_MAX_LAYERS),
            max_analysis_bytes=_limit(env, "VIZAPP_MAX_ANALYSIS_BYTES", DEFAULT_MAX_ANALYSIS_BYTES),
            max_results_bytes=_limit(env, "VIZAPP_MAX_RESULTS_BYTES", DEFAULT_MAX_RESULTS_BYTES),
        )


def _limit(env: Mapping[str, str], var: str, default: int) -> int | None:
    """A positive limit from ``env[var]``; "none", "off" or "unlimited" turn it off (None); unset: ``default``."""
    raw = env.get(var, "").strip()
    if raw.lower() in ("none", "off", "unlimited"):
        return None
    return _positive_int(var, raw) if raw else default


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
    """Parameters + buffers of the module ``build()`` makes, built on the meta device (nothing allocated); building
    does not move the global RNG, so a seeded load gets the same weights with or without the count."""
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        module = build()
    return sum(t.numel() for t in (*module.parameters(), *module.buffers()))


def layered_parameter_count(build: Callable[[int | None], torch.nn.Module], layers: int | None) -> int:
    """Parameters + buffers of a model of ``layers`` identical encoder layers, never building more than two of them.

    Args:
        build: k -> the architecture with k encoder layers (None: as configured), called on the meta device.
        layers: the configured layer count, or None when the config does not say (the model is then built whole).

    Returns:
        the count of a whole build up to two layers; deeper, c1 + (layers - 1) * (c2 - c1) from builds of one and two
        layers (the layers of one ViT config are alike; tests check the sum against whole builds of every family).
    """
    if layers is None or layers <= 2:
        return meta_parameter_count(lambda: build(layers))
    one = meta_parameter_count(lambda: build(1))
    two = meta_parameter_count(lambda: build(2))
    return one + (layers - 1) * (two - one)


def configured_layers(args: Mapping[str, Any]) -> int | None:
    """The encoder layers timm constructor arguments ask for: the sum of every whole number under a key naming a
    depth (``depth``, a stage model's ``depths``, CaiT's ``depth_token_only``), or None when none is given (the
    architecture's own, bounded, default)."""
    total, found = 0, False
    for key, value in args.items():
        if "depth" not in str(key):
            continue
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if isinstance(v, int) and not isinstance(v, bool):
                total, found = total + v, True
    return total if found else None


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


def _timm_count(name: str, arch: str, model_args: dict[str, Any]) -> int:
    import timm

    depth = model_args.get("depth")
    layers = depth if isinstance(depth, int) and not isinstance(depth, bool) else None

    def build(k: int | None) -> torch.nn.Module:
        return timm.create_model(arch, pretrained=False, **(model_args if k is None else {**model_args, "depth": k}))

    try:
        return layered_parameter_count(build, layers)
    except Exception as e:  # noqa: BLE001 - whatever the constructor raises, the size is unknown: refuse
        # the constructor's own first line (e.g. an argument this architecture does not take): it names no file, as
        # nothing is read here, and it is what the caller needs to fix their call
        said = (str(e).strip().splitlines() or [""])[0][:200]
        raise ModelLoadError(
            f"cannot build '{name[:80]}' to check its size: {type(e).__name__}" + (f": {said}" if said else "")
        ) from e


def count_parameters(name: str, *, hub_reachable: Callable[[], bool] | None = None, **kwargs: Any) -> int:
    """Parameters + buffers of a timm model, counted on the meta device: nothing is downloaded or allocated.

    Args:
        name: a timm name or name.tag, or an ``hf-hub:owner/repo`` id (its config.json is read, not its weights).
        hub_reachable: probe asked before downloading a hub config (see :func:`hub_config`).
        **kwargs: as for ``timm.create_model`` (img_size, num_classes, ...), which can change the count.

    Returns:
        the element count; multiply by the dtype's size (4 for float32) for bytes. A ``depth`` given in the kwargs or
        the hub config is counted from builds of one and two layers (:func:`layered_parameter_count`).

    Raises:
        ModelLoadError: the architecture cannot be built (unknown name, bad kwargs, unreadable hub config).
    """
    arch, model_args = _architecture(name, kwargs, hub_reachable)
    return _timm_count(name, arch, model_args)


def _timm_bare(name: str) -> str:
    """A timm id without its optional ``timm:`` prefix: ``timm:X`` and ``X`` are one model (the timm adapter checks
    the bare name, ``load_model`` the id as given)."""
    return name[len("timm:") :] if name.startswith("timm:") else name


def check_allowed(name: str, budget: Budget | None = None) -> None:
    """Refuse an id that is not on ``VIZAPP_MODELS`` (when set); reads nothing, so call it before anything is read.
    An entry ``timm:X`` allows ``X`` and the other way round.

    Raises:
        ModelTooLargeError: naming the ids this server offers.
    """
    b = BUDGET if budget is None else budget
    if b.allowed is not None and _timm_bare(name) not in {_timm_bare(a) for a in b.allowed}:
        shown = ", ".join(sorted(b.allowed)[:10]) + (", ..." if len(b.allowed) > 10 else "")
        raise ModelTooLargeError(f"'{name[:80]}' is not one of the models this server offers; pick one of: {shown}")


def check_budget(
    name: str,
    budget: Budget | None = None,
    *,
    hub_reachable: Callable[[], bool] | None = None,
    counter: Callable[[], int] | None = None,
    layers: int | None = None,
    **kwargs: Any,
) -> int | None:
    """Refuse a timm or ``hf-hub:`` id that is not allow-listed, asks for too many layers or is over the parameter
    limit, before any download and without building more than two of its layers.

    Call this at the start of every path that turns an id into a download or a ``timm.create_model`` call.

    Args:
        name: the id as validated (``validate_model_id``).
        budget: the limits; default :data:`BUDGET` (from the environment at import).
        hub_reachable: a quick probe (``models.hub_reachable``) asked before an uncached hub config is downloaded,
            so an offline server refuses within seconds.
        counter: counts the parameters of a model that is not a timm id (a transformers or torchvision adapter
            counts it on the meta device, see :func:`layered_parameter_count`); default :func:`count_parameters` of
            ``name``.
        layers: the encoder layers the config asks for, with ``counter`` (a timm id's are read from its arguments).
        **kwargs: the create_model kwargs the model will be built with.

    Returns:
        the parameter count (None when there is no limit and so nothing was counted).

    Raises:
        ModelTooLargeError: not on ``VIZAPP_MODELS``, more layers than ``VIZAPP_MAX_LAYERS`` or more parameters than
            ``VIZAPP_MAX_PARAMS``.
        ModelLoadError: the size could not be determined (fails closed).
    """
    b = BUDGET if budget is None else budget
    check_allowed(name, b)
    if counter is None:  # a timm id: its layers from the arguments it will be built with
        if b.max_layers is None and b.max_params is None:
            return None
        arch, model_args = _architecture(name, kwargs, hub_reachable)
        layers = configured_layers(model_args)

        def counter() -> int:
            return _timm_count(name, arch, model_args)

    if layers is not None and b.max_layers is not None and layers > b.max_layers:
        raise ModelTooLargeError(
            f"'{name[:80]}' asks for {layers:,} layers, over this server's limit of {b.max_layers} (VIZAPP_MAX_LAYERS);"
            " ViTs have at most 48: pick a model with its own depth"
        )
    if b.max_params is None:
        return None
    n = counter()
    if n > b.max_params:
        raise ModelTooLargeError(
            f"'{name[:80]}' has {_human_params(n)} parameters ({_human_bytes(4 * n)} in float32), over this server's "
            f"limit of {_human_params(b.max_params)} (VIZAPP_MAX_PARAMS); pick a smaller model (ViT-L size or below)"
        )
    return n


# ----------------------------------------------------------------------------------------------------------------
# What one analysis holds


def check_analysis_budget(
    name: str,
    *,
    layers: int,
    tokens: int,
    heads: int,
    width: int,
    patches: int,
    size: tuple[int, int] | None = None,
    budget: Budget | None = None,
    device: torch.device | str | None = None,
) -> int:
    """Refuse a model whose analysis of one image would hold more than ``VIZAPP_MAX_ANALYSIS_BYTES``, before any
    forward (a tiny model at a huge input size passes the parameter limit).

    Args:
        name: the id, for the message.
        layers, tokens, heads, width, patches: as for :func:`analysis_memory`, at the model's configured input size.
        size: that input size (height, width) in pixels, for the message.
        budget: the limits; default :data:`BUDGET`.
        device: where the model runs (None: the CPU; a GPU stores larger fusions, :func:`limits.rollout_store_bytes`).

    Returns:
        the estimate in bytes.

    Raises:
        ModelTooLargeError: naming the token count, the estimate, its largest term and the limit.
    """
    b = BUDGET if budget is None else budget
    terms = analysis_memory(layers, tokens, heads, width, patches, device=device)
    total = sum(terms.values())
    if b.max_analysis_bytes is not None and total > b.max_analysis_bytes:
        biggest = max(terms, key=terms.__getitem__)
        at = f" at {size[0]}x{size[1]} px" if size else ""
        raise ModelTooLargeError(
            f"'{name[:80]}' works on {tokens:,} tokens per image{at} ({layers} layers, {heads} heads, width {width}): "
            f"one analysis would hold about {_human_bytes(total)} ({biggest.replace('_', ' ')}: "
            f"{_human_bytes(terms[biggest])}), over this server's limit of {_human_bytes(b.max_analysis_bytes)} "
            "(VIZAPP_MAX_ANALYSIS_BYTES); pick a smaller input size (image_size, img_size) or another model"
        )
    return total


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
