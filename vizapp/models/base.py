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
from vizapp.errors import BadParameterError, ModelLoadError
from vizapp.models.digest import WeightsDigest, weights_digest
from vizapp.transfer import to_device

ASSETS_DIR = Path(__file__).resolve().parents[2] / "assets"
BUNDLED_CARD = Path(__file__).resolve().parents[1] / "bundled" / "weights" / "fmnist_vit.json"
BUNDLED = "bundled"
HUB_TIMEOUT_S = 3.0
PREFIXES = ("timm:", "hf:", "torchvision:", "open_clip:")
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
        text_tower: a CLIP-like model's text side (:class:`vizapp.models.prompts.TextTower`), or None.
        prompts: the prompts that are this model's classes (see :func:`vizapp.models.prompts.with_prompts`).
        prompt_embeddings: their unit text embeddings [K, E] on the model's device, which its logits read (None
            without prompts).
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
    text_tower: Any = None
    prompts: tuple[str, ...] = ()
    prompt_embeddings: Any = None
    windowed: bool = False
    _digest: dict = field(default_factory=dict, repr=False, compare=False)
    #: the analysis forward's recorded CUDA graphs (see :mod:`vizapp.cudagraph`); empty on the CPU
    graphs: GraphCache = field(default_factory=GraphCache, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.readout not in READOUTS:
            raise ValueError(f"readout must be one of {list(READOUTS)}, got {self.readout!r}")
        if self.readout.startswith("cls") and not self.has_class_token:
            raise ValueError(f"readout {self.readout!r} needs a class token, and {self.name} has none")

    @property
    def activation(self) -> str:
        """How logits become probabilities: "softmax", or "sigmoid" for prompts of a SigLIP model."""
        return self.text_tower.activation if self.prompts else "softmax"

    def weights_key(self) -> tuple:
        """Cheap identity of the weights: each parameter and buffer's object, storage and in-place version counter
        (changes when a weight is replaced, reloaded, converted, moved, or modified in place through torch; not when
        modified through ``.data``, which only :meth:`fingerprint` sees)."""
        # The module list is walked once per model (``Module.parameters()`` walks the tree again on every call: about
        # 0.6-0.9 ms per analysis, 5 % of a ViT-Ti/16 forward); a replaced parameter or buffer still shows, since the
        # modules' own dicts are read each time, and so does a replaced or reordered submodule (two blocks swapped),
        # since the submodule dicts are read each time too and a change there walks the tree again.
        cached = self._digest.get("modules")
        structure = None if cached is None else tuple(id(m) for d in cached[2] for m in d.values())
        if cached is None or cached[0] is not self.model or structure != cached[3]:
            modules = list(self.model.modules())
            dicts = tuple(d for m in modules for d in (m._parameters, m._buffers))
            children = tuple(m._modules for m in modules)
            structure = tuple(id(m) for d in children for m in d.values())
            cached = self._digest["modules"] = (self.model, dicts, children, structure)
        return (structure, *[(id(t), t.data_ptr(), t._version) for d in cached[1] for t in d.values() if t is not None])

    def patch_distances(self, grid: tuple[int, int]) -> torch.Tensor:
        """Distances in pixels between the patch centres of ``grid``, [P, P] float32 on the model's device, made once
        per grid (callers only read it)."""
        key = ("patch distances", tuple(grid), str(self.device))
        dist = self._digest.get(key)
        if dist is None:
            from vizapp.analysis.distance import patch_distance_matrix

            dist = patch_distance_matrix(grid, self.patch_size, dtype=torch.float32)
            dist = self._digest[key] = to_device(dist, self.device)  # once per grid; no wait (vizapp.transfer)
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

    def fingerprint(self) -> WeightsDigest:
        """A digest of the weights (:func:`vizapp.models.digest.weights_digest`): their names, dtypes, devices and
        shapes, and their contents position by position. Computed afresh on every call: an edit through ``.data``
        moves no version counter, so nothing cheaper can prove the weights unchanged. On a CUDA device the sums are
        a CUDA graph kept with the model (:func:`vizapp.models.digest.graphed_sums`)."""
        graphs = self._digest.get("digest graphs")
        if graphs is None and self.device.type == "cuda":
            from vizapp.cudagraph import GraphCache

            graphs = self._digest.setdefault("digest graphs", GraphCache())
        return weights_digest(self.model, graphs)

    def graph_failures(self) -> list[str]:
        """Why each of this model's CUDA graphs that could not be recorded (the analysis and class-map passes, the
        weights digest) failed, and the recordings that fell back to something slower: those passes run eagerly, with
        the same results, at the eager pass's speed. Empty on the CPU and when every recording worked."""
        out = [*self.graphs.failures(), *self.graphs.notes]
        digest = self._digest.get("digest graphs")
        if digest is not None:
            out += [f"the weights digest: {why}" for why in (*digest.failures(), *digest.notes)]
        return out

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The model's output for a batch [B, C, H, W]: logits [B, K] (or the pooled feature without a head)."""
        return self.forward_fn(self.model, x)

    def grid_for(self, height: int, width: int) -> tuple[int, int]:
        """Patch grid the model uses for an input of this size (dynamic-size models resize on the fly)."""
        return self.grid_fn(int(height), int(width))

    def tokens_for(self, height: int, width: int) -> int:
        """Tokens of each layer for an input of this size: the prefix tokens and the patches of :meth:`grid_for`."""
        gh, gw = self.grid_for(height, width)
        return self.num_prefix_tokens + gh * gw

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
    "hf:owner/repo" (a transformers model); "torchvision:vit_b_16"; "open_clip:ViT-B-32[/tag]"; and, when ``allow_files``, a path to a
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
    if name.startswith("open_clip:"):
        from vizapp.models import openclip

        return openclip.check_name(name)
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


# ----------------------------------------------------------------------------------------------------------------
# Malformed checkpoints and configs: messages, never tracebacks or server paths

#: What a model's geometry must hold: whole numbers above zero (0 heads or a 0 px patch divide by zero when built).
GEOMETRY_FIELDS = (
    "num_heads",
    "num_attention_heads",
    "patch_size",
    "embed_dim",
    "hidden_size",
    "depth",
    "num_hidden_layers",
    "img_size",
    "image_size",
    "in_chans",
    "num_channels",
)


def check_geometry(name: str, values: dict[str, Any], fix: str) -> None:
    """Refuse a config whose heads, patch size, width, depth or input size (those of :data:`GEOMETRY_FIELDS` that
    ``values`` names) are not whole numbers above zero, or pairs of them.

    Args:
        name: the model, as the message names it.
        values: config fields (others are ignored).
        fix: what to do, e.g. "fix model_args in its model card".

    Raises:
        ModelLoadError: naming the first bad field and its value.
    """

    def positive(v: Any) -> bool:
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool) and int(v) > 0

    for key in GEOMETRY_FIELDS:
        if key not in values or values[key] is None:
            continue
        v = values[key]
        ok = positive(v) or (isinstance(v, (list, tuple)) and len(v) in (1, 2, 3) and all(positive(x) for x in v))
        if not ok:
            raise ModelLoadError(
                f"{name}: {key} must be a whole number above zero, got {str(v)[:40]}; {fix}, or pick another model"
            )


def read_json_object(path: Path, what: str, fix: str) -> dict[str, Any]:
    """The JSON object in ``path``; a file that is not UTF-8 JSON holding an object is refused with a
    :class:`ModelLoadError` naming ``what`` (never the folder) and ``fix``, what to do."""
    import json

    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # unreadable, not UTF-8, not JSON, cut short
        where = f" (line {e.lineno}, column {e.colno})" if isinstance(e, json.JSONDecodeError) else ""
        raise ModelLoadError(f"{what} is not valid JSON{where}; {fix}") from e
    if not isinstance(value, dict):
        raise ModelLoadError(f"{what} is not a JSON object; {fix}")
    return value


_ABS_PATH = re.compile(r"(?<![\w.:/~])/(?:[^\s'\"/]+/)+([^\s'\"/]*)")


def without_paths(text: str, *folders: str | os.PathLike) -> str:
    """``text`` (a library's message) with each of ``folders``, as given and absolute, and any other absolute path
    replaced by its last part, so that a message shown to a person names no server path (URLs are kept)."""
    for folder in folders:
        for form in sorted({os.path.abspath(folder), os.fspath(folder).rstrip("/")}, key=len, reverse=True):
            if form and form not in ("/", "."):
                text = text.replace(form, os.path.basename(form) or form)
    return _ABS_PATH.sub(lambda m: m.group(1) or "/", text)


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its type's name when it has none), absolute paths cut to their
    last part (:func:`without_paths`), at most ``limit`` characters."""
    lines = str(exc).strip().splitlines()
    return without_paths(lines[0] if lines else type(exc).__name__)[:limit]
