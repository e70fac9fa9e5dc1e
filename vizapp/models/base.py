"""What every model adapter produces (:class:`VizModel`), the model cache, id checks and hub helpers.

An adapter (one module per library: :mod:`.timm`, :mod:`.hf`, :mod:`.torchvision`, :mod:`.bundled`) reads from the
loaded network, once, everything vizapp needs that is not generic: the token bookkeeping (prefix tokens, which is
CLS, the patch grid and patch size), the preprocessing, the class names, how to get logits, and the position scheme.
The analyses then never look inside the network again.
"""

from __future__ import annotations

import os
import re
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch
from PIL import Image

from vizapp.cudagraph import GraphCache
from vizapp.errors import BadParameterError

ASSETS_DIR = Path(__file__).resolve().parents[2] / "assets"
BUNDLED_CARD = Path(__file__).resolve().parents[1] / "bundled" / "weights" / "fmnist_vit.json"
BUNDLED = "bundled"
HUB_TIMEOUT_S = 3.0
PREFIXES = ("timm:", "hf:", "torchvision:")
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,199}$")
_REPO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}$")

#: Position schemes and what the position view shows for each.
POSITION_SCHEMES = {
    "learned": "learned absolute position embeddings: cosine similarity between positions",
    "rope": "rotary position embedding (RoPE): the similarity the rotation alone induces between positions",
    "relative": "learned relative position bias: the bias each head adds for an offset (Δrow, Δcol)",
    "none": "no position information the model learned or applies (e.g. fixed sin-cos)",
}


#: What the model's output reads from the last block's tokens. The output row of rollout, gradient rollout, Chefer
#: relevance and attention flow is this mix of the tokens' rows (see :func:`readout_weights`).
READOUTS = {
    "cls": "the class token",
    "cls+dist": "the class and distillation tokens (the mean of their two heads)",
    "cls+patches": "the class token beside the mean of the patch tokens (half each)",
    "patches": "the mean of the patch tokens",
    "tokens": "every token, pooled together (an attention-pooling head)",
}


def readout_weights(readout: str, num_tokens: int, num_prefix_tokens: int) -> torch.Tensor:
    """[N] float64 weights over the tokens whose rows the output reads, summing to 1: one-hot at the class token for
    "cls", a half each on tokens 0 and 1 for "cls+dist", uniform over the patches for "patches", a half on the class
    token and a half spread over the patches for "cls+patches", uniform over all tokens for "tokens"."""
    if readout not in READOUTS:
        raise ValueError(f"readout must be one of {list(READOUTS)}, got {readout!r}")
    p, n = int(num_prefix_tokens), int(num_tokens)
    w = torch.zeros(n, dtype=torch.float64)
    if readout == "tokens":
        w[:] = 1.0 / n
        return w
    patches = 1.0 if readout == "patches" else 0.5 if readout == "cls+patches" else 0.0
    if patches:
        w[p:] = patches / (n - p)
    if readout == "cls+dist":
        w[:2] = 0.5
    elif readout != "patches":
        w[0] = 1.0 - patches
    return w


def pair(x: Any) -> tuple[int, int]:
    if isinstance(x, (int, np.integer)):
        return (int(x), int(x))
    return (int(x[0]), int(x[1]))


@dataclass(frozen=True, eq=False)
class VizModel:
    """A loaded ViT and the token bookkeeping read from it by its library's adapter.

    Attributes:
        name: the id it was loaded by.
        model: the nn.Module, in eval mode, on ``device``.
        transform: PIL.Image -> input tensor [C, H, W], the library's own preprocessing for this model, for one
            image (a NaFlexViT keeps the image's aspect ratio, so H and W vary; see :attr:`batch_transform`).
        labels: class names, one per output (empty when the model has no classifier head).
        num_prefix_tokens: tokens before the patches (CLS, distillation token, registers), in the model's order.
        grid_size: patch grid (gh, gw) at the configured input size.
        patch_size: patch size in pixels (ph, pw).
        no_embed_class: True when the learned position embedding has patch rows only.
        input_size: (C, H, W) the transform produces.
        mean, std: the input normalisation (to show the model's view of the image).
        source: "pretrained", "random", "file" or "bundled".
        note: a sentence for the UI about what this model is (e.g. random weights).
        family: the adapter: "timm", "hf" or "torchvision".
        num_layers, num_heads: encoder layers and heads per layer.
        has_class_token: token 0 is a CLS token (False for models with none, which pool their patches).
        readout: which tokens the output reads, a key of :data:`READOUTS` (e.g. "patches" for BEiT, whose CLS token
            the mean-pooled head never reads).
        position: the position scheme, a key of :data:`POSITION_SCHEMES`.
        forward_fn: (model, x [B, C, H, W]) -> logits [B, K], or the pooled feature [B, D] without a head.
        grid_fn: (height, width) of an input -> the patch grid the model uses for it.
        pos_embed_fn: () -> the learned patch position embeddings [P, D] (prefix rows removed), or None; set
            whenever the model adds such a table, also beside RoPE or a relative bias (then ``position`` names those).
        lens_fn: tokens [B, N, D] (a block's output) -> logits [B, K] through the model's own final norm, pooling
            and head (the logit lens; the last block's output gives the model's logits), or None without a head.
        num_registers: register tokens among the prefix tokens (they come after CLS and a distillation token).
        fixed_transform: a transform to the configured input size, when ``transform`` gives images of varying size.
        rope_angles_fn: for an axial-RoPE model whose position view is not read from timm: () -> the rotation angle
            of every frequency pair at every patch of the configured grid, [P, F] radians, from the model's own
            rotary module.
        relative_bias_fn: for a relative-position-bias model whose position view is not read from timm: () -> every
            layer's learned bias as maps over the offset (Δrow, Δcol), [L, H, 2gh − 1, 2gw − 1].
        windowed: the layers attend within (shifted) windows on per-stage grids (Swin, :mod:`vizapp.models.swin`):
            ``grid_size`` is the first stage's, ``num_heads`` the most any layer has, and :func:`vizapp.analyze`
            returns a :class:`vizapp.swin_result.WindowAnalysis`.
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
    num_layers: int
    num_heads: int
    forward_fn: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]
    grid_fn: Callable[[int, int], tuple[int, int]]
    note: str = ""
    dtype: torch.dtype = torch.float32
    card: dict[str, Any] = field(default_factory=dict)
    load_args: tuple[tuple[str, Any], ...] = ()
    has_class_token: bool = True
    readout: str = "cls"
    family: str = "timm"
    position: str = "learned"
    pos_embed_fn: Callable[[], torch.Tensor | None] | None = None
    lens_fn: Callable[[torch.Tensor], torch.Tensor] | None = None
    num_registers: int = 0
    fixed_transform: Callable[[Image.Image], torch.Tensor] | None = None
    rope_angles_fn: Callable[[], torch.Tensor] | None = None
    relative_bias_fn: Callable[[], torch.Tensor] | None = None
    windowed: bool = False
    _digest: dict = field(default_factory=dict, repr=False, compare=False)
    #: the analysis forward's recorded CUDA graphs (see :mod:`vizapp.cudagraph`); empty on the CPU
    graphs: GraphCache = field(default_factory=GraphCache, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.readout not in READOUTS:
            raise ValueError(f"readout must be one of {list(READOUTS)}, got {self.readout!r}")
        if self.readout.startswith("cls") and not self.has_class_token:
            raise ValueError(f"readout {self.readout!r} needs a class token, and {self.name} has none")

    def weights_key(self) -> tuple:
        """Cheap identity of the weights: each parameter and buffer's object, storage and in-place version counter
        (changes when a weight is replaced, reloaded or modified in place through torch, not through ``.data``)."""
        # The module list is walked once per model (``Module.parameters()`` walks the tree again on every call: about
        # 0.6-0.9 ms per analysis, 5 % of a ViT-Ti/16 forward); a replaced parameter or buffer still shows, since the
        # modules' own dicts are read each time.
        cached = self._digest.get("modules")
        if cached is None or cached[0] is not self.model:
            dicts = tuple(d for m in self.model.modules() for d in (m._parameters, m._buffers))
            cached = self._digest["modules"] = (self.model, dicts)
        return tuple([(id(t), t.data_ptr(), t._version) for d in cached[1] for t in d.values() if t is not None])

    def patch_distances(self, grid: tuple[int, int]) -> torch.Tensor:
        """Distances in pixels between the patch centres of ``grid``, [P, P] float32 on the model's device, made once
        per grid (callers only read it)."""
        key = ("patch distances", tuple(grid), str(self.device))
        dist = self._digest.get(key)
        if dist is None:
            from vizapp.analysis.distance import patch_distance_matrix

            dist = self._digest[key] = patch_distance_matrix(grid, self.patch_size, dtype=torch.float32).to(self.device)
        return dist

    @property
    def batch_transform(self) -> Callable[[Image.Image], torch.Tensor]:
        """The transform for images that go through the model together: the same size for every image (the
        configured input size; ``transform`` itself for every model whose ``transform`` already gives one size)."""
        return self.fixed_transform or self.transform

    def synchronize(self) -> None:
        """Wait for the model's device (nothing to wait for on the CPU), so that a timer read afterwards includes the
        work queued on it."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def fingerprint(self, fresh: bool = False, key: tuple | None = None) -> tuple[float, ...]:
        """A digest of the weights: count, sum, sum of squares and a strided sample's sum, accumulated in float64.

        Computed again only when :meth:`weights_key` changed, unless ``fresh`` (what a check before reuse asks
        for: it also sees changes made through ``.data``). ``key``: :meth:`weights_key` as the caller just took it.
        """
        key = self.weights_key() if key is None else key
        if not fresh and self._digest.get("key") == key:
            return self._digest["value"]
        total = [0.0, 0.0, 0.0, 0.0]
        step = 1 << 20  # elements per chunk: the float64 sums never copy more than 8 MB at once
        with torch.no_grad():
            for t in (*self.model.parameters(), *self.model.buffers()):
                flat = t.detach().reshape(-1)
                total[0] += flat.numel()
                for lo in range(0, flat.numel(), step):
                    c = flat[lo : lo + step].to(torch.float64)
                    total[1] += float(c.sum())
                    total[2] += float((c * c).sum())
                    total[3] += float(c[(-lo) % 31 :: 31].sum())  # every 31st element of the whole tensor
        value = tuple(total)
        self._digest.update(key=key, value=value)
        return value

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The model's output for a batch [B, C, H, W]: logits [B, K] (or the pooled feature without a head)."""
        return self.forward_fn(self.model, x)

    def grid_for(self, height: int, width: int) -> tuple[int, int]:
        """Patch grid the model uses for an input of this size (dynamic-size models resize on the fly)."""
        return self.grid_fn(int(height), int(width))

    @property
    def pos_embed_status(self) -> str:
        """Empty when the model has a learned absolute position embedding (its scheme, or added beside RoPE or a
        relative bias as in EVA-02), else the reason it has none."""
        if self.pos_embed_fn is not None:
            return ""
        return f"{self.name} has no learned absolute position embedding: {POSITION_SCHEMES[self.position]}"

    def patch_pos_embed(self) -> torch.Tensor | None:
        """The learned patch position embeddings [P, D] (prefix rows removed when present), or None."""
        if self.pos_embed_status:
            return None
        return self.pos_embed_fn().detach().float().cpu()

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
# Ids


def validate_model_id(name: Any, allow_files: bool = True) -> str:
    """Check a model id before anything is loaded; return it stripped, or raise BadParameterError.

    Accepted: "bundled"; "timm:NAME" or a bare timm name/tag; "hf-hub:owner/repo" (a timm model on the hub);
    "hf:owner/repo" (a transformers model); "torchvision:vit_b_16"; and, when ``allow_files``, a path to a
    .safetensors file, a model card .json, or a folder written by transformers' ``save_pretrained``.
    """
    if not isinstance(name, str):
        raise BadParameterError(f"model must be a string id, got {type(name).__name__}")
    name = name.strip()
    if not name:
        raise BadParameterError("model id is empty; pick a model from the list, e.g. 'bundled'")
    if len(name) > 300:
        raise BadParameterError(f"model id is {len(name)} characters long; timm and hub ids are at most 200")
    if name == BUNDLED:
        return name
    if name.startswith("hf-hub:") or name.startswith("hf:"):
        repo = name.split(":", 1)[1]
        if _REPO_RE.match(repo):
            return name
        if name.startswith("hf:") and allow_files and os.path.isdir(repo):
            return name
        raise BadParameterError(f"'{name[:80]}' is not a valid hub id; expected {name.split(':')[0]}:<owner>/<repo>")
    if name.endswith((".safetensors", ".json")) or (
        allow_files and os.path.isdir(name) and os.path.isfile(os.path.join(name, "config.json"))
    ):  # a visitor's id is never looked up on the disk: the answer must not depend on what the server holds
        if not allow_files:
            raise BadParameterError("loading local files is disabled here; pick a model from the list")
        return name
    if name.startswith("torchvision:"):
        from vizapp.models import torchvision as tv

        tv.check_name(name.split(":", 1)[1])
        return name
    bare = name.split(":", 1)[1] if name.startswith("timm:") else name
    if not _ID_RE.match(bare):
        hint = "; a transformers model is hf:<owner>/<repo>" if _REPO_RE.match(bare) else ""
        raise BadParameterError(
            f"'{name[:80]}' is not a timm model name; e.g. vit_base_patch16_224.augreg2_in21k_ft_in1k{hint}"
        )
    import timm

    arch = bare.split(".", 1)[0]
    if not timm.is_model(arch):
        import difflib

        close = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.75)
        hint = f"; did you mean {' or '.join(close)}?" if close else "; see timm.list_models('vit_*') for names"
        raise BadParameterError(f"unknown model '{name[:80]}'{hint}")
    return name


# ----------------------------------------------------------------------------------------------------------------
# Device and hub


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def host_reachable(url: str, timeout: float = HUB_TIMEOUT_S) -> bool:
    """True when ``url``'s host answers a TCP connect within ``timeout`` s (DNS included); never blocks longer."""
    host = urlparse(url).hostname or ""
    port = urlparse(url).port or 443
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


def hub_reachable(timeout: float = HUB_TIMEOUT_S) -> bool:
    """True when the Hugging Face hub answers within ``timeout`` s (False in HF offline mode)."""
    try:
        from huggingface_hub import constants

        if constants.is_offline_mode():
            return False
        endpoint = constants.ENDPOINT
    except Exception:  # noqa: BLE001
        endpoint = "https://huggingface.co"
    return host_reachable(endpoint, timeout)


def cached_hub_file(repo_id: str, filenames: tuple[str, ...]) -> str | None:
    """The local path of the first of ``filenames`` in the hub cache for ``repo_id``, or None (no network)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for fn in filenames:
        path = try_to_load_from_cache(repo_id, fn)
        if isinstance(path, str) and os.path.isfile(path):
            return path
    return None


def offline_message(name: str, where: str | None, how: str) -> str:
    where = f" ({where})" if where else ""
    return (
        f"cannot load '{name}'{where}: the network is unreachable and its weights are not in the local cache. {how} "
        "The 'bundled' model works offline."
    )
