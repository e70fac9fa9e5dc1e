"""``analyze``: one forward pass with capture, then every analysis the views need, layer by layer.

The result is a frozen :class:`Analysis` of CPU tensors and numpy arrays: it holds q and k of every layer (so any
query's per-head map, and rollout with other settings, is recomputed without another forward pass) but never all
layers' full attention at once.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from vizapp import cudagraph, limits
from vizapp.analysis.rollout import HEAD_FUSIONS, rollout_row
from vizapp.capture import AttentionCapture, attention_from_qk, host_copies
from vizapp.errors import BadParameterError, StaleResultError
from vizapp.models import VizModel
from vizapp.models.base import READOUTS, readout_weights
from vizapp.streaming import BlockFeatures, LayerStatistics, fused_layer

Query = str | int | tuple[int, int]
#: Where the maps carried down from the output start: the tokens the output reads, or the CLS token whatever it reads.
START_ROWS = ("output", "cls")


def _row_key(start_row: str) -> tuple[str, ...]:
    """The cache key's suffix for a map's start row (none for the output's, the key the forward fills)."""
    return () if start_row == "output" else (start_row,)


def to_pil(image: Any) -> tuple[Image.Image, tuple[str, ...]]:
    """An RGB image and notes on what decoding did, from anything :func:`vizapp.imageio.decode_image` takes (an RGB
    PIL image as it is); BadImageError for what it refuses."""
    from vizapp.imageio import DecodedImage, decode_image

    if isinstance(image, DecodedImage):
        return image.image, tuple(image.notes)
    if isinstance(image, Image.Image) and image.mode == "RGB":
        return image, ()

    decoded = decode_image(image)
    return decoded.image, decoded.notes


def model_view(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """The model's input [C, H, W] de-normalised to a uint8 RGB image [H, W, 3] (what the model saw)."""
    m = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    img = (x.detach().float().cpu() * s + m).clamp(0, 1)
    if img.shape[0] == 1:
        img = img.expand(3, -1, -1)
    return (img[:3].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


class GradientGraph:
    """The autograd graph of a gradient-enabled forward (``analyze(..., gradients=True)``): each layer's attention
    in the graph and the logits, so that every further class costs one backward pass. Never copied or pickled (a
    copy of the Analysis falls back to a new forward and backward).

    Attributes:
        maps: each layer's attention in the graph, [B, H, N, N] for the forward's batch.
        logits: [B, K] in the graph.
        image: this analysis's image in the batch.
        given: class -> ∂logit[class]/∂A of this image [L, H, N, N], already found by a backward of the whole batch
            (:func:`class_gradients`), so that asking for that class costs nothing more.
    """

    def __init__(
        self, maps: list[torch.Tensor] | None = None, logits: torch.Tensor | None = None, image: int = 0
    ) -> None:
        self.maps, self.logits, self.image = maps, logits, image
        self.given: dict[int, torch.Tensor] = {}

    def __deepcopy__(self, memo: dict) -> GradientGraph:
        return GradientGraph()

    def __reduce__(self) -> tuple:
        return (GradientGraph, ())


@dataclass(frozen=True, eq=False)
class Analysis:
    """Everything vizapp computed for one image and one model (CPU tensors / numpy; deep-copyable).

    Attributes:
        model_name: the model's id; ``load_args`` reload it (from the cache) for gradient methods.
        labels: class names; ``probs`` [K] class probabilities (None without a classifier head).
        top_k: [(label, probability)] best first.
        image: the model's view of the input, uint8 [H, W, 3].
        input: the model's input tensor [1, C, H, W].
        q, k: per layer [H, N, head_dim] float32 (post q_norm / k_norm, before scaling).
        scales: per-layer softmax scale.
        biases: per layer, the additive bias the layer adds before its softmax ([H or 1, N, N], e.g. BEiT's
            relative-position bias), or None; empty when no layer has one.
        recomputed_layers: layers whose attention stayed inside the model and was formed again from q and k.
        block_norms: [L, N] L2 norm of every token's output after each block (prefix tokens first).
        block_outputs: layer -> that block's output [N, D] (every layer for models up to about ViT-B size, else the
            last), for the feature views.
        lens_probs: [L, K] the logit lens: class probabilities from each block's output through the model's final
            norm, pooling and head (None without a classifier head).
        num_registers: register tokens among the prefix tokens.
        model_ref: a weak reference to the model the result came from, and ``model_fingerprint`` a digest of its
            weights then (:meth:`VizModel.fingerprint`): methods that run the model again use that very network or
            refuse (:class:`~vizapp.errors.StaleResultError`), never another one.
        graph: with ``analyze(..., gradients=True)``, the forward's autograd graph (see :class:`GradientGraph`).
        mean_distance: [L, H] mean attention distance in pixels.
        notes: remarks about the input (e.g. "animated GIF: first frame").
    """

    model_name: str
    load_args: tuple[tuple[str, Any], ...]
    labels: tuple[str, ...]
    probs: np.ndarray | None
    top_k: list[tuple[str, float]]
    num_prefix_tokens: int
    grid_size: tuple[int, int]
    patch_size: tuple[int, int]
    image: np.ndarray
    input: torch.Tensor
    q: tuple[torch.Tensor, ...]
    k: tuple[torch.Tensor, ...]
    scales: tuple[float, ...]
    mean_distance: np.ndarray
    notes: tuple[str, ...] = ()
    has_class_token: bool = True
    readout: str = "cls"
    biases: tuple[torch.Tensor | None, ...] = ()
    recomputed_layers: tuple[int, ...] = ()
    block_norms: np.ndarray | None = None
    block_outputs: dict = field(default_factory=dict)
    lens_probs: np.ndarray | None = None
    num_registers: int = 0
    model_ref: Any = field(default=None, repr=False)
    model_fingerprint: tuple[float, ...] = ()
    graph: GradientGraph = field(default_factory=GradientGraph, repr=False)
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def num_layers(self) -> int:
        return len(self.q)

    @property
    def num_heads(self) -> int:
        return int(self.q[0].shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.q[0].shape[1])

    # -- validation -----------------------------------------------------------------------------------------------
    def _layer(self, layer: Any) -> int:
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
            raise BadParameterError(f"layer must be an integer, got {layer!r}"[:200])
        if not -self.num_layers <= layer < self.num_layers:
            raise BadParameterError(f"layer {layer} is out of range; this model has layers 0..{self.num_layers - 1}")
        return int(layer) % self.num_layers

    def _head(self, head: Any) -> int | None:
        if head is None:
            return None
        if isinstance(head, bool) or not isinstance(head, (int, np.integer)):
            raise BadParameterError(f"head must be an integer or None, got {head!r}"[:200])
        if not 0 <= head < self.num_heads:
            raise BadParameterError(f"head {head} is out of range; this model has heads 0..{self.num_heads - 1}")
        return int(head)

    def query_index(self, query: Query) -> int:
        """Token index of a query: "cls" (token 0), a prefix token index, or a patch (row, col)."""
        p = self.num_prefix_tokens
        gh, gw = self.grid_size
        if isinstance(query, str):
            if query.lower() != "cls":
                raise BadParameterError(f"query must be 'cls' or a patch (row, col), got {query[:40]!r}")
            if not self.has_class_token:
                raise BadParameterError("this model has no CLS token (it pools its patches); click a patch to use it")
            return 0
        if isinstance(query, (int, np.integer)) and not isinstance(query, bool):
            if not 0 <= query < self.num_tokens:
                raise BadParameterError(f"token {query} is out of range 0..{self.num_tokens - 1}")
            return int(query)
        if (
            isinstance(query, (tuple, list))
            and len(query) == 2
            and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in query)
        ):
            r, c = int(query[0]), int(query[1])
            if not (0 <= r < gh and 0 <= c < gw):
                raise BadParameterError(f"patch ({r}, {c}) is outside the {gh}x{gw} grid")
            return p + r * gw + c
        raise BadParameterError(f"query must be 'cls' or a patch (row, col), got {query!r}"[:200])

    # -- per-head maps ---------------------------------------------------------------------------------------------
    def attention_layer(self, layer: int) -> torch.Tensor:
        """Full attention of one layer, [H, N, N] float32 (recomputed from q and k)."""
        layer = self._layer(layer)
        return attention_from_qk(self.q[layer], self.k[layer], self.scales[layer], self._bias(layer))

    def _bias(self, layer: int) -> torch.Tensor | None:
        """The layer's additive attention bias [H or 1, N, N] (relative position), or None."""
        return self.biases[layer] if self.biases else None

    def attention_row(self, layer: int, query: Query = "cls") -> torch.Tensor:
        """Attention of one query token to every token, [H, N]."""
        layer = self._layer(layer)
        i = self.query_index(query)
        bias = self._bias(layer)
        return attention_from_qk(
            self.q[layer][:, i : i + 1], self.k[layer], self.scales[layer], None if bias is None else bias[:, i : i + 1]
        )[:, 0]

    def attention(self, layer: int, head: int | None = None, query: Query = "cls") -> np.ndarray:
        """The query's raw attention weights to the patch tokens: [H, gh, gw], or [gh, gw] for one head."""
        head = self._head(head)
        row = self.attention_row(layer, query)[:, self.num_prefix_tokens :]  # [H, P]
        maps = row.reshape(self.num_heads, *self.grid_size).numpy()
        return maps if head is None else maps[head]

    def attention_all_layers(self, query: Query = "cls") -> np.ndarray:
        """[L, H, gh, gw] maps of one query for every layer."""
        return np.stack([self.attention(layer, None, query) for layer in range(self.num_layers)])

    def prefix_attention(self, layer: int, query: Query = "cls") -> np.ndarray:
        """[H, num_prefix_tokens] weights the query sends to the prefix tokens (CLS/dist/registers)."""
        return self.attention_row(layer, query)[:, : self.num_prefix_tokens].numpy()

    # -- rollout ----------------------------------------------------------------------------------------------------
    def fused(self, head_fusion: str = "mean") -> torch.Tensor:
        """Head-fused attention of every layer [L, N, N]; cached while small."""
        if head_fusion not in HEAD_FUSIONS:
            raise BadParameterError(f"head_fusion must be one of {list(HEAD_FUSIONS)}, got {str(head_fusion)[:40]!r}")
        key = ("fused", head_fusion)
        if key in self._cache:
            return self._cache[key]
        fused = torch.stack([self._fused_layer(i, head_fusion) for i in range(self.num_layers)])
        if fused.numel() * 4 <= limits.FUSED_CACHE_LIMIT_BYTES:
            self._cache[key] = fused
        return fused

    def _fused_layer(self, layer: int, head_fusion: str) -> torch.Tensor:
        return fused_layer(self.q[layer], self.k[layer], self.scales[layer], head_fusion, bias=self._bias(layer))

    def rollout(
        self, head_fusion: str = "mean", discard_ratio: float = 0.0, start_layer: int = 0, start_row: str = "output"
    ) -> np.ndarray:
        """Attention rollout map: the output's row of the joint attention over the patches, raw, [gh, gw] (the CLS
        row for a ViT that reads its class token; see :meth:`output_weights`). ``start_row="cls"``: the CLS row
        whatever the output reads."""
        if (
            isinstance(discard_ratio, bool)
            or not isinstance(discard_ratio, (int, float))
            or not (0.0 <= float(discard_ratio) < 1.0)
        ):
            raise BadParameterError(f"discard_ratio must be a number in [0, 1), got {discard_ratio!r}"[:200])
        start_layer = self._layer(start_layer)
        if head_fusion not in HEAD_FUSIONS:
            raise BadParameterError(f"head_fusion must be one of {list(HEAD_FUSIONS)}, got {str(head_fusion)[:40]!r}")
        weights = self.output_weights(start_row)
        key = ("rollout", head_fusion, float(discard_ratio), start_layer) + _row_key(start_row)
        if key not in self._cache:
            cached = self._cache.get(("fused", head_fusion))

            def fused_layer(layer: int) -> torch.Tensor:
                return cached[layer] if cached is not None else self._fused_layer(layer, head_fusion)

            row = rollout_row(
                fused_layer,
                self.num_layers,
                weights,
                self.num_prefix_tokens,
                float(discard_ratio),
                start_layer,
            )
            self._cache[key] = self._patch_map(row[self.num_prefix_tokens :])
        return self._cache[key]

    # -- class-specific explanations (issue: beyond attention maps) -------------------------------------------
    def _class(self, class_idx: Any) -> int:
        if self.probs is None:
            raise BadParameterError("this model has no classifier head, so there is no class to explain")
        if class_idx is None:
            return int(np.argmax(self.probs))
        if isinstance(class_idx, str):
            if class_idx not in self.labels:
                raise BadParameterError(f"unknown class {class_idx[:60]!r}; pick one of the top-5")
            return self.labels.index(class_idx)
        if isinstance(class_idx, bool) or not isinstance(class_idx, (int, np.integer)):
            raise BadParameterError(f"class must be an index or a label, got {class_idx!r}"[:200])
        if not 0 <= class_idx < len(self.probs):
            raise BadParameterError(f"class {class_idx} is out of range 0..{len(self.probs) - 1}")
        return int(class_idx)

    def attention_stack(self) -> torch.Tensor:
        """Every layer's attention [L, H, N, N] (materialised on demand for the methods that need all of it)."""
        if self.graph.maps is not None:
            return torch.stack([m[self.graph.image].detach().float().cpu() for m in self.graph.maps])
        return torch.stack([self.attention_layer(i) for i in range(self.num_layers)])

    def _model(self) -> VizModel:
        """The network this result came from: the same object while it is alive, else the cache's copy when its
        weights are the same; otherwise StaleResultError (a random-weight model rebuilt, weights changed)."""
        from vizapp.models import reload

        vm = self.model_ref() if self.model_ref is not None else None
        where = "changed since"
        if vm is None:
            if self.model_ref is not None and not dict(self.load_args).get("pretrained", True):
                raise StaleResultError(
                    f"{self.model_name} (random weights) is no longer in memory, and a rebuilt copy would have other "
                    "weights; analyze the image again"
                )
            vm = reload(self.load_args)
            where = "reloaded, and its weights differ from those of"
        if self.model_fingerprint and vm.fingerprint(fresh=True) != self.model_fingerprint:
            raise StaleResultError(
                f"the weights of {self.model_name} have {where} this result; analyze the image again to explain it"
            )
        return vm

    def attention_gradients(self, class_idx: Any = None) -> torch.Tensor:
        """∂logit[class]/∂A for every layer and head, [L, H, N, N] (one forward + backward, fused attention kept)."""
        cls = self._class(class_idx)
        key = ("grads", cls)
        if key in self._cache:
            return self._cache[key]
        if cls in self.graph.given:  # found by the backward of a whole batch (class_gradients)
            return self.graph.given[cls]
        if self.graph.maps is not None:  # the gradient-enabled forward of analyze: one backward per class
            i = self.graph.image
            grads = torch.autograd.grad(self.graph.logits[i, cls], self.graph.maps, retain_graph=True)
            out = torch.stack([g[i].float().cpu() for g in grads])
            if out.numel() * 4 <= limits.FUSED_CACHE_LIMIT_BYTES:
                self._cache[key] = out
            return out
        vm = self._model()
        x = self.input.to(device=vm.device, dtype=vm.dtype).requires_grad_(True)
        with torch.enable_grad(), AttentionCapture(vm.model, with_grad=True) as cap:
            logits = vm.logits(x)
            grads = cap.attention_grads(logits[0, cls])
        out = torch.stack([g[0].detach().float().cpu() for g in grads])
        if out.numel() * 4 <= limits.FUSED_CACHE_LIMIT_BYTES:
            self._cache[key] = out
        return out

    def output_weights(self, start_row: str = "output") -> torch.Tensor:
        """[N] float64 weights over the tokens whose joint-attention rows make the output's map: the tokens the
        model's output reads (:attr:`readout`; one-hot at CLS for a ViT that reads its class token, uniform over the
        patches for one that averages them, as BEiT's head does though it has a CLS token). ``start_row="cls"``:
        one-hot at the CLS token instead (a model's class token, even where its head never reads it)."""
        if start_row not in START_ROWS:
            raise BadParameterError(f"start_row must be one of {list(START_ROWS)}, got {str(start_row)[:40]!r}")
        if start_row == "cls":
            self.query_index("cls")  # a clear error for a model without a class token
            return readout_weights("cls", self.num_tokens, self.num_prefix_tokens)
        return readout_weights(self.readout, self.num_tokens, self.num_prefix_tokens)

    @property
    def readout_text(self) -> str:
        """What the output reads, in words (for titles and notes)."""
        return READOUTS[self.readout]

    def _patch_map(self, flat: torch.Tensor) -> np.ndarray:
        return flat.reshape(self.grid_size).float().numpy()

    def grad_weighted_heads(self, class_idx: Any = None) -> torch.Tensor:
        """Ā = mean over heads of max(∇A ⊙ A, 0) for a class, every layer, [L, N, N] float64 (the fusion both
        gradient methods share; formed once per class)."""
        from vizapp.analysis.relevance import grad_weighted_heads

        cls = self._class(class_idx)
        key = ("grad_heads", cls)
        if key in self._cache:
            return self._cache[key]
        fused = grad_weighted_heads(self.attention_stack(), self.attention_gradients(cls))
        if fused.numel() * 8 <= limits.FUSED_CACHE_LIMIT_BYTES:
            self._cache[key] = fused
        return fused

    def grad_rollout(
        self, class_idx: Any = None, discard_ratio: float = 0.0, start_layer: int = 0, start_row: str = "output"
    ) -> np.ndarray:
        """Gradient-weighted rollout for a class, [gh, gw]: each layer's gradient paired with its own attention (the
        rollout of :meth:`grad_weighted_heads`, carried as one row from the top layer down; ``start_row`` as in
        :meth:`rollout`)."""
        weights = self.output_weights(start_row)
        start_layer = self._layer(start_layer)
        if (
            isinstance(discard_ratio, bool)
            or not isinstance(discard_ratio, (int, float))
            or not (0.0 <= float(discard_ratio) < 1.0)
        ):
            raise BadParameterError(f"discard_ratio must be a number in [0, 1), got {discard_ratio!r}"[:200])
        fused = self.grad_weighted_heads(class_idx)
        row = rollout_row(
            lambda layer: fused[layer],
            self.num_layers,
            weights,
            self.num_prefix_tokens,
            float(discard_ratio),
            start_layer,
        )
        return self._patch_map(row[self.num_prefix_tokens :])

    def relevance(self, class_idx: Any = None, start_layer: int = 0, start_row: str = "output") -> np.ndarray:
        """Chefer et al. (ICCV 2021) gradient x attention relevance for a class, [gh, gw] (the row of R read by the
        output, carried from the top layer down; ``start_row`` as in :meth:`rollout`)."""
        from vizapp.analysis.relevance import relevance_row

        start_layer = self._layer(start_layer)
        weights = self.output_weights(start_row)
        row = relevance_row(self.grad_weighted_heads(class_idx), weights, start_layer)
        return self._patch_map(row[self.num_prefix_tokens :])

    def transformer_attribution(self, class_idx: Any = None, start_layer: int = 1) -> np.ndarray:
        """Transformer Attribution (Chefer, Gur & Wolf, CVPR 2021) for a class, [gh, gw]: LRP relevance of each
        block's attention times this analysis's attention gradient, rolled out from ``start_layer`` (the authors' 1);
        see :func:`vizapp.analysis.lrp.transformer_attribution`. Runs the model again, in float64."""
        from vizapp.analysis.lrp import SUPPORTED, unsupported
        from vizapp.analysis.lrp import transformer_attribution as run

        cls, start_layer = self._class(class_idx), self._layer(start_layer)
        key = ("transformer_attribution", cls, start_layer)
        if key not in self._cache:
            vm = self._model()
            why = unsupported(vm.model, self.num_prefix_tokens)
            if why:
                raise BadParameterError(
                    f"Transformer Attribution is not defined for {self.model_name}: {why}; {SUPPORTED}"
                )
            x = self.input.to(device=vm.device, dtype=vm.dtype)
            grads = self.attention_gradients(cls)[None]  # [1, L, H, N, N], from this analysis's own backward
            found = run(
                vm.model, x, self.num_prefix_tokens, cls, self.grid_size, start_layer=start_layer, attn_grads=grads
            )
            self._cache[key] = found[0].cpu().numpy()
        return self._cache[key]

    def attention_flow(
        self,
        head_fusion: str = "mean",
        progress: Callable[[int, int], None] | None = None,
        start_row: str = "output",
    ) -> np.ndarray:
        """Exact attention flow (max-flow) from each patch to the output, [gh, gw]: to the CLS token for a ViT that
        reads it, else to an output node fed by the tokens the output reads (see :attr:`readout`); to the CLS token
        with ``start_row="cls"``."""
        from vizapp.analysis.flow import attention_flow

        weights = self.output_weights(start_row)
        key = ("flow", head_fusion) + _row_key(start_row)
        if key not in self._cache:
            flat = attention_flow(
                self.attention_stack(),
                self.num_prefix_tokens,
                head_fusion=head_fusion,
                progress=progress,
                readout=weights,
            )
            self._cache[key] = self._patch_map(flat)
        return self._cache[key]

    def last_layer_attention(self) -> np.ndarray:
        """CLS attention of the last layer, averaged over heads, [gh, gw] (DINO-style baseline map)."""
        return self.attention(self.num_layers - 1, None, "cls").mean(axis=0)  # needs a CLS token

    def explain(self, method: str, class_idx: Any = None, **kwargs: Any) -> np.ndarray:
        """Any registered method's map by name (see :data:`vizapp.methods.METHODS`)."""
        from vizapp import methods

        return methods.explain(self, method, class_idx, **kwargs)

    def faithfulness(
        self,
        maps: dict[str, np.ndarray],
        class_idx: Any = None,
        steps: int | None = 20,
        baseline: float = 0.0,
        random_seed: int | None = 0,
        batch_size: int = 64,
    ) -> dict[str, dict[str, Any]]:
        """Deletion and insertion curves (Petsiuk et al. 2018) of each map for a class.

        Patches are removed from the image (deletion) or revealed on the baseline (insertion) in the order of the
        map's importance, and the class probability tracked. ``baseline`` is in the model's normalised input space,
        so 0.0 is the dataset-mean colour. A random order is added as "random" unless ``random_seed`` is None.

        Returns:
            {name: {"deletion": Curve, "insertion": Curve}}
        """
        from vizapp.analysis.faithfulness import perturbation_curve, random_order_saliency

        cls = self._class(class_idx)
        vm = self._model()
        maps = dict(maps)
        if random_seed is not None:
            g = torch.Generator().manual_seed(int(random_seed))
            maps["random"] = random_order_saliency(self.grid_size[0] * self.grid_size[1], g).numpy()

        def predict(batch: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return torch.softmax(vm.logits(batch.to(device=vm.device, dtype=vm.dtype)).float(), -1).cpu()

        out: dict[str, dict[str, Any]] = {}
        for name, m in maps.items():
            sal = torch.as_tensor(np.asarray(m, dtype=np.float32)).reshape(-1)
            out[name] = {
                mode: perturbation_curve(
                    predict,
                    self.input[0],
                    sal,
                    self.grid_size,
                    self.patch_size,
                    cls,
                    mode=mode,
                    steps=steps,
                    baseline=baseline,
                    batch_size=batch_size,
                )
                for mode in ("deletion", "insertion")
            }
        return out

    # -- label-free views (issue: beyond class labels) -----------------------------------------------------
    def _features(self, layer: int) -> torch.Tensor:
        """The patch tokens' output features after block ``layer``, [P, D]."""
        layer = self._layer(layer)
        if layer not in self.block_outputs:
            kept = sorted(self.block_outputs)
            raise BadParameterError(
                f"layer {layer}'s features were not kept for this model (too large); layers with features: {kept}"
            )
        return self.block_outputs[layer][self.num_prefix_tokens :]

    def feature_pca(self, layer: int = -1, foreground_threshold: float | None = None) -> np.ndarray:
        """The patch features after block ``layer`` on their first 3 principal components as RGB [gh, gw, 3] in
        [0, 1] (Oquab et al. 2023, DINOv2 Fig. 1); with ``foreground_threshold``, the PCA is refit on the patches
        whose first component is above it (scaled to [0, 1]) and the background is black."""
        from vizapp.analysis.features import feature_pca

        res = feature_pca(self._features(layer), foreground_threshold=foreground_threshold, grid_size=self.grid_size)
        return res.rgb.reshape(*self.grid_size, 3).numpy()

    def feature_similarity(self, query: Query, layer: int = -1, other: Analysis | None = None) -> np.ndarray:
        """Cosine similarity between the query patch's feature after block ``layer`` and every patch's feature, of
        this image or of ``other`` (dense correspondence), [gh, gw] of the image compared with."""
        from vizapp.analysis.features import feature_similarity

        i = self.query_index(query) - self.num_prefix_tokens
        if i < 0:
            raise BadParameterError("the feature similarity is between patches: pick a patch (row, col)")
        target = other if other is not None else self
        sim = feature_similarity(self._features(layer), i, target._features(layer) if other is not None else None)
        return sim.reshape(target.grid_size).numpy()

    def token_norms(self) -> np.ndarray:
        """[L, N] L2 norm of every token's output after each block, prefix tokens first, in the model's order."""
        if self.block_norms is None:
            raise BadParameterError("token norms were not recorded for this analysis")
        return self.block_norms

    def artifact_tokens(self, k: float = 10.0) -> np.ndarray:
        """[L, N] bool: tokens whose norm is above median + k·MAD of their layer (Darcet et al. 2024's high-norm
        artifact tokens; see :func:`vizapp.analysis.features.artifact_tokens`)."""
        from vizapp.analysis.features import artifact_tokens

        return artifact_tokens(torch.as_tensor(self.token_norms()), k=k).numpy()

    def register_attention(self) -> dict[str, np.ndarray | None]:
        """How much attention CLS and the patches give each register, per layer and head: {"from_cls": [L, H, R]
        or None, "from_patches": [L, H, R]}; empty arrays for a model without registers."""
        from vizapp.analysis.features import register_attention

        rows = []
        for layer in range(self.num_layers):
            rows.append(
                register_attention(
                    self.attention_layer(layer), self.num_prefix_tokens, self.num_registers, self.has_class_token
                )
            )
        from_cls = None if rows[0].from_cls is None else torch.stack([r.from_cls for r in rows]).numpy()
        return {"from_cls": from_cls, "from_patches": torch.stack([r.from_patches for r in rows]).numpy()}

    def dino_masks(self, threshold: float = 0.6) -> np.ndarray:
        """[H, gh, gw] bool: per head of the last layer, the patches holding the top ``threshold`` fraction of the
        CLS attention mass (Caron et al. 2021)."""
        from vizapp.analysis.features import dino_masks

        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 < threshold <= 1.0:
            raise BadParameterError(f"threshold must be a number in (0, 1], got {threshold!r}"[:200])
        rows = torch.as_tensor(self.attention(self.num_layers - 1, None, "cls"))  # [H, gh, gw]
        masks = dino_masks(rows.reshape(self.num_heads, -1), float(threshold))
        return masks.reshape(self.num_heads, *self.grid_size).numpy()

    def logit_lens(self, k: int = 5) -> list[list[tuple[str, float]]]:
        """Per layer, the top-``k`` classes of the logit lens (nostalgebraist 2020): each block's output through the
        model's final norm, pooling and head; the last layer's is the model's own prediction."""
        if self.lens_probs is None:
            raise BadParameterError("this model has no classifier head, so there is no logit lens")
        out = []
        for row in self.lens_probs:
            order = np.argsort(-row, kind="stable")[: max(0, int(k))]
            out.append([(self.labels[i], float(row[i])) for i in order])
        return out

    # -- export ------------------------------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """A JSON-serialisable summary of the analysis."""
        return {
            "model": self.model_name,
            "top_k": [{"label": lbl, "probability": float(p)} for lbl, p in self.top_k],
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "num_tokens": self.num_tokens,
            "num_prefix_tokens": self.num_prefix_tokens,
            "readout": self.readout,
            "grid_size": list(self.grid_size),
            "patch_size": list(self.patch_size),
            "mean_distance_px": np.round(self.mean_distance, 3).tolist(),
            "rollout_mean": np.round(self.rollout(), 6).tolist(),
            "notes": list(self.notes),
        }

    def arrays(self, max_bytes: int | None = None) -> dict[str, np.ndarray]:
        """Arrays for an .npz export: full attention [L, H, N, N] when it fits in ``max_bytes``, else CLS rows."""
        out: dict[str, np.ndarray] = {
            "mean_distance": self.mean_distance,
            "rollout": self.rollout(),
            "image": self.image,
            "num_prefix_tokens": np.array(self.num_prefix_tokens),
            "grid_size": np.array(self.grid_size),
            "patch_size": np.array(self.patch_size),
        }
        full = self.num_layers * self.num_heads * self.num_tokens**2 * 4
        if full <= (limits.EXPORT_ATTENTION_BYTES if max_bytes is None else max_bytes):
            out["attention"] = torch.stack([self.attention_layer(i) for i in range(self.num_layers)]).numpy()
        else:
            out["cls_attention"] = torch.stack([self.attention_row(i) for i in range(self.num_layers)]).numpy()
        if self.probs is not None:
            out["probs"] = self.probs
        return out


@dataclass(frozen=True)
class _PassSetup:
    """What one analysis forward needs besides its input, made before it (a CUDA graph must not copy from the host)."""

    grid: tuple[int, int]
    n: int  # tokens
    keep_fused: bool  # keep every layer's mean fusion for the views
    store_mean: bool  # the rollout from stored mean fusions (else multiplied up during the forward)
    dist: torch.Tensor  # [P, P] patch distances in pixels, on the model's device
    weights: torch.Tensor  # [N] float64: the rows whose joint attention is the default rollout map
    inline: bool
    gradients: bool

    @classmethod
    def of(cls, vm: VizModel, grid: tuple[int, int], inline: bool, gradients: bool) -> _PassSetup:
        """The setup for ``grid``; its two tensors are made once per model, grid and device (they are only read)."""
        p = vm.num_prefix_tokens
        n = p + grid[0] * grid[1]
        key = ("rollout row weights", tuple(grid), str(vm.device))
        weights = vm._digest.get(key)
        if weights is None:
            weights = vm._digest[key] = readout_weights(vm.readout, n, p).to(vm.device)
        layer_bytes = vm.num_layers * n * n * 4
        return cls(
            grid=tuple(grid),
            n=n,
            keep_fused=layer_bytes <= limits.FUSED_CACHE_LIMIT_BYTES,
            store_mean=layer_bytes <= limits.ROLLOUT_STORE_LIMIT_BYTES,
            dist=vm.patch_distances(grid),
            weights=weights,
            inline=inline,
            gradients=gradients,
        )

    def graph_bytes(self, vm: VizModel) -> int:
        """A high estimate of the memory a recorded graph keeps: q and k of every layer, the kept fusions and block
        outputs, one chunk of attention and its scores, the forward's own activations."""
        width = vm.num_heads * 64  # most ViTs' heads are 64 wide
        kept = vm.num_layers * self.n * self.n * 4 * self.store_mean  # the mean fusions (kept ones included)
        return (
            2 * vm.num_layers * self.n * width * 4 + kept + 2 * limits.ATTENTION_CHUNK_BYTES + 12 * self.n * width * 4
        )


def _graphable(vm: VizModel, setup: _PassSetup) -> bool:
    """The plain analysis forward on a GPU runs as a replayed CUDA graph (see :mod:`vizapp.cudagraph`); the q/k
    replay path (``inline=False``) and gradient-enabled passes stay eager, the first as the second code path that
    checks the graph."""
    return (
        vm.device.type == "cuda"
        and setup.inline
        and not setup.gradients
        and cudagraph.enabled()
        and setup.graph_bytes(vm) <= limits.GRAPH_MEMORY_BYTES
    )


@dataclass
class _PassResult:
    """What one analysis forward leaves on the model's device (in a CUDA graph's memory when replayed), or the same
    on the CPU (:meth:`to_host`)."""

    logits: torch.Tensor  # [K] detached
    rollout: torch.Tensor  # [P] the default rollout of the patches
    distances: torch.Tensor  # [L, H]
    norms: torch.Tensor  # [L, N]
    lens: torch.Tensor | None  # [L, K]
    fused_mean: torch.Tensor | None  # [L, N, N]
    biases: tuple[torch.Tensor | None, ...]
    outputs: dict[int, torch.Tensor]
    q: tuple[torch.Tensor, ...]
    k: tuple[torch.Tensor, ...]
    scales: tuple[float, ...]
    replayed: tuple[int, ...]
    maps: list[torch.Tensor | None] = field(default_factory=list)  # with gradients: the attention in the graph
    logits_graph: torch.Tensor | None = None

    def parts(self) -> list[torch.Tensor]:
        """Every result but q and k, in the order :meth:`from_host` reads them back."""
        parts: list[torch.Tensor] = [self.logits, self.rollout, self.distances, self.norms]
        parts += [] if self.lens is None else [self.lens]
        parts += [] if self.fused_mean is None else [self.fused_mean]
        parts += [b for b in self.biases if b is not None]
        return parts + [self.outputs[i] for i in sorted(self.outputs)]

    def staged(self) -> list[torch.Tensor]:
        """What a CUDA graph copies to its pinned host buffer: :meth:`parts`, then q and k of every layer."""
        return [*self.parts(), *self.q, *self.k]

    def from_host(self, parts: list[torch.Tensor], q: tuple, k: tuple) -> _PassResult:
        """This result with :meth:`parts` and q, k replaced by their copies on the host."""
        host = iter(parts)
        logits, rollout, distances, norms = (next(host) for _ in range(4))
        return _PassResult(
            logits=logits,
            rollout=rollout,
            distances=distances,
            norms=norms,
            lens=None if self.lens is None else next(host),
            fused_mean=None if self.fused_mean is None else next(host),
            biases=tuple(None if b is None else next(host) for b in self.biases),
            outputs={i: next(host) for i in sorted(self.outputs)},
            q=q,
            k=k,
            scales=self.scales,
            replayed=self.replayed,
        )

    def from_staged(self, host: list[torch.Tensor]) -> _PassResult:
        """The result from :meth:`staged`'s tensors on the host."""
        n, layers = len(host) - 2 * len(self.q), len(self.q)
        return self.from_host(host[:n], tuple(host[n : n + layers]), tuple(host[n + layers :]))

    def to_host(self) -> _PassResult:
        """Copy to the CPU: everything but q and k in one copy (on a GPU each copy waits for it), q and k per layer
        (see :meth:`AttentionCapture.qk_on_cpu`)."""
        return self.from_host(to_host(self.parts()), host_copies(self.q), host_copies(self.k))


def to_host(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors as float32 on the CPU, with one device-to-host copy for all of them when they are on a GPU (CPU
    tensors are returned as they are, converted only when not float32)."""
    if all(t.device.type == "cpu" for t in tensors):
        return [t.float() for t in tensors]
    flat = torch.cat([t.detach().reshape(-1).float() for t in tensors]).cpu()
    return [part.view(t.shape) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors, strict=True)]


def _device_pass(vm: VizModel, x: torch.Tensor, setup: _PassSetup) -> list[_PassResult]:
    """One forward of ``x`` [B, C, H, W] with capture, and every statistic the analysis keeps, left on the device: one
    result per image, views into the batch's tensors (the images of a batch are reduced one by one, each as a batch
    of one would be).

    Nothing here waits for the device, so the pass can be recorded as a CUDA graph.
    """
    p, n, n_layers, b = vm.num_prefix_tokens, setup.n, vm.num_layers, x.shape[0]
    # Only the mean fusion is reduced during the forward (the rollout needs it); a view that asks for max or min
    # forms it from q and k then (ViT-Ti/16: two fewer passes over every layer's attention in the forward).
    stats = LayerStatistics(
        [vm.num_heads] * n_layers,
        n,
        setup.dist,
        p,
        ("mean",) if setup.keep_fused else (),
        store_mean=setup.store_mean,
        batch=b,
    )
    blocks = BlockFeatures(n_layers, vm.lens_fn)
    with AttentionCapture(
        vm.model, on_attention=stats, inline=setup.inline, on_block=blocks, with_grad=setup.gradients
    ) as cap:
        logits = vm.logits(x)
    blocks.finish()
    n_seen = cap.q[0].shape[-2]
    if n_seen != n:
        raise RuntimeError(f"{n_seen} tokens do not match {p} prefix tokens + a {setup.grid[0]}x{setup.grid[1]} grid")
    if not stats.complete():
        raise RuntimeError("the attention of some layer never reached vizapp's statistics")
    rollout = stats.rollout_row(setup.weights)[:, p:].float()  # [B, P]
    distances = torch.stack(stats.distances).float()  # [L, B, H]
    norms = blocks.stacked("norms")  # [L, B, N]
    lens = blocks.stacked("lens") if vm.lens_fn is not None else None  # [L, B, K]
    detached = logits.detach()
    maps = list(cap.maps)
    results = []
    for i in range(b):
        q, k = cap.qk_on_device(i)
        results.append(
            _PassResult(
                logits=detached[i],
                rollout=rollout[i],
                distances=distances[:, i],
                norms=norms[:, i],
                lens=None if lens is None else lens[:, i],
                fused_mean=stats.mean_store[i] if setup.keep_fused else None,
                biases=tuple(None if t is None else t[i if t.shape[0] > 1 else 0].float() for t in cap.bias),
                outputs={layer: out[i] for layer, out in blocks.outputs.items()},
                q=q,
                k=k,
                scales=tuple(cap.scales),
                replayed=tuple(sorted(cap.replayed_layers)),
                maps=maps,
                logits_graph=logits if setup.gradients else None,
            )
        )
    return results


def analyze(
    vm: VizModel,
    image: Any,
    *,
    top_k: int = 5,
    progress: Callable[[float, str], None] | None = None,
    inline: bool = True,
    gradients: bool = False,
) -> Analysis | list[Analysis]:
    """Run the model once on ``image`` with capture and compute every core analysis.

    Args:
        vm: a model from :func:`vizapp.load_model`.
        image: a PIL image (or bytes / path / numpy array, decoded safely by :mod:`vizapp.imageio`); or a list or
            tuple of them, analysed together in one batched forward (see :func:`vizapp.batch.analyze_batch`).
        top_k: how many classes to report.
        progress: optional callback(fraction, message).
        inline: form each layer's attention once, in place of the model's SDPA call (default); False lets the model
            compute its own attention output and forms the attention again from the recorded q and k (the second
            code path the tests compare against; slower).
        gradients: run the forward with autograd, forming each layer's attention in the graph, and keep that graph
            in the result, so the class-specific methods (gradient rollout, Chefer relevance) cost one backward pass
            per class instead of a forward and a backward. Holds the forward's activations (about 150 MB for ViT-B/16)
            for as long as the result lives.

    Returns:
        an :class:`Analysis`; for a list or tuple of images, a list of them, one per image in order, each equal to
        that image's own analysis.
    """
    if isinstance(image, (list, tuple)):
        from vizapp.batch import analyze_batch

        return analyze_batch(vm, image, top_k=top_k, progress=progress, inline=inline, gradients=gradients)
    pil, notes = to_pil(image)
    x = vm.transform(pil)
    if x.dim() == 3:
        x = x[None]
    return analyze_inputs(vm, x, [notes], top_k=top_k, progress=progress, inline=inline, gradients=gradients)[0]


def analyze_inputs(
    vm: VizModel,
    x: torch.Tensor,
    notes: list[tuple[str, ...]] | None = None,
    *,
    top_k: int = 5,
    progress: Callable[[float, str], None] | None = None,
    inline: bool = True,
    gradients: bool = False,
) -> list[Analysis]:
    """The analyses of preprocessed inputs ``x`` [B, C, H, W] (what :attr:`VizModel.transform` gives, on the host) from
    one forward of the whole batch; ``notes`` per image. Arguments as in :func:`analyze`.

    One image on a GPU may run as a replayed CUDA graph; a batch always runs eagerly. The analyses of a batch share
    its tensors (q and k of each layer, block outputs, with ``gradients`` the autograd graph): that memory is freed
    when the last of them is.
    """
    b = x.shape[0]
    notes = [()] * b if notes is None else list(notes)
    x_dev = x.to(device=vm.device, dtype=vm.dtype)
    if progress:
        progress(0.1, "forward pass")
    grid = vm.grid_for(x.shape[-2], x.shape[-1])
    setup = _PassSetup.of(vm, grid, inline, gradients)
    graphed = None
    weights_key = None
    if b == 1 and _graphable(vm, setup):
        weights_key = vm.weights_key()  # also the fingerprint's, below
        key = cudagraph.graph_key(vm.model, weights_key, x_dev, inline)

        def plain_pass(xs: torch.Tensor) -> _PassResult:
            with torch.no_grad():  # nothing of autograd's is recorded or kept in the graph's memory
                return _device_pass(vm, xs, setup)[0]

        graphed = vm.graphs.get(key, plain_pass, x_dev, stage=_PassResult.staged, keep=setup)
    graphs = [GradientGraph() for _ in range(b)]
    if graphed is not None:  # one replay, its results staged in pinned memory and copied out under the graph's lock
        with graphed.run(x_dev) as (out, staged):
            hosts = [out.to_host() if staged is None else out.from_staged(staged)]
    else:
        with torch.enable_grad() if gradients else torch.no_grad():
            outs = _device_pass(vm, x_dev, setup)
        if gradients:
            graphs = [GradientGraph(out.maps, out.logits_graph, image=i) for i, out in enumerate(outs)]
        hosts = [out.to_host() for out in outs]
    if progress:
        progress(0.6, "attention analyses")
    fingerprint = vm.fingerprint(key=weights_key)
    results = [
        _analysis(vm, x[i : i + 1], host, grid, notes[i], graphs[i], fingerprint, top_k) for i, host in enumerate(hosts)
    ]
    if progress:
        progress(1.0, "done")
    return results


def _analysis(
    vm: VizModel,
    x: torch.Tensor,
    host: _PassResult,
    grid: tuple[int, int],
    notes: tuple[str, ...],
    graph: GradientGraph,
    fingerprint: tuple[float, ...],
    top_k: int,
) -> Analysis:
    """One image's :class:`Analysis` from its input ``x`` [1, C, H, W] and its pass's results on the host."""
    logits = host.logits
    probs = None
    top: list[tuple[str, float]] = []
    if vm.labels and logits.shape[-1] == len(vm.labels):
        probs = torch.softmax(logits, dim=-1).numpy()
        order = np.argsort(-probs, kind="stable")[: max(0, int(top_k))]
        top = [(vm.labels[i], float(probs[i])) for i in order]
    result = Analysis(
        model_name=vm.name,
        load_args=vm.load_args,
        labels=vm.labels,
        probs=probs,
        top_k=top,
        num_prefix_tokens=vm.num_prefix_tokens,
        grid_size=grid,
        patch_size=vm.patch_size,
        image=model_view(x[0], vm.mean, vm.std),
        input=x.cpu(),
        q=host.q,
        k=host.k,
        scales=host.scales,
        mean_distance=host.distances.numpy(),
        notes=tuple(notes),
        has_class_token=vm.has_class_token,
        readout=vm.readout,
        biases=host.biases if any(b is not None for b in host.biases) else (),
        recomputed_layers=host.replayed,
        block_norms=host.norms.numpy(),
        block_outputs=host.outputs,
        lens_probs=host.lens.numpy() if host.lens is not None and probs is not None else None,
        num_registers=vm.num_registers,
        model_ref=weakref.ref(vm),
        model_fingerprint=fingerprint,
        graph=graph,
    )
    if host.fused_mean is not None:
        result._cache[("fused", "mean")] = host.fused_mean  # [L, N, N]
    result._cache[("rollout", "mean", 0.0, 0)] = result._patch_map(host.rollout)
    return result


def class_gradients(analyses: Sequence[Analysis], classes: Sequence[Any]) -> list[int]:
    """∂logit_b[c_b]/∂A for every analysis b of one gradient-enabled batch (``analyze(images, gradients=True)``,
    one forward) and its class c_b, from ONE backward of Σ_b logit_b[c_b]: the images of a ViT batch never mix, so
    image b's share of that gradient is its own class's. Each analysis keeps its gradient (:class:`GradientGraph`),
    so its class maps for c_b need no further backward.

    Args:
        analyses: analyses of one gradient-enabled forward.
        classes: one per analysis: an index, a label, or None for its top-1 class.

    Returns:
        the class indices c_b.

    Raises:
        BadParameterError: the analyses do not come from one gradient-enabled forward.
    """
    if not analyses:
        return []
    graph = analyses[0].graph
    if graph.maps is None or any(r.graph.logits is not graph.logits for r in analyses):
        raise BadParameterError("class_gradients needs the analyses of one analyze(images, gradients=True) call")
    cls = [r._class(c) for r, c in zip(analyses, classes, strict=True)]
    rows = torch.tensor([r.graph.image for r in analyses], device=graph.logits.device)
    score = graph.logits[rows, torch.tensor(cls, device=graph.logits.device)].sum()
    # the graph is kept: a further class of one analysis is still one backward (Analysis.attention_gradients)
    grads = torch.autograd.grad(score, graph.maps, retain_graph=True)  # [B, H, N, N] per layer
    for r, c in zip(analyses, cls, strict=True):
        r.graph.given[c] = torch.stack([g[r.graph.image].float().cpu() for g in grads])  # [L, H, N, N]
    return cls


def feature_pca(vm: VizModel, images: Any, layer: int = -1, foreground_threshold: float | None = None) -> np.ndarray:
    """One PCA shared by several images, so that parts correspond by colour (Oquab et al. 2023, DINOv2 Fig. 1).

    Args:
        vm: a model from :func:`vizapp.load_model`.
        images: a sequence of images (PIL, bytes, paths or arrays, decoded safely), each brought to the model's
            configured input size by :attr:`VizModel.batch_transform` (a NaFlexViT's, too).
        layer: the block whose output features are used (default: the last).
        foreground_threshold: as in :meth:`Analysis.feature_pca`.

    Returns:
        [B, gh, gw, 3] RGB in [0, 1].
    """
    from vizapp.analysis.features import feature_pca as pca

    images = list(images)
    if not images:
        raise BadParameterError("feature_pca needs at least one image")
    if (
        isinstance(layer, bool)
        or not isinstance(layer, (int, np.integer))
        or not -vm.num_layers <= layer < vm.num_layers
    ):
        raise BadParameterError(
            f"layer must be an integer in {-vm.num_layers}..{vm.num_layers - 1}, got {layer!r}"[:200]
        )
    layer = int(layer) % vm.num_layers
    x = torch.stack([vm.batch_transform(to_pil(im)[0]) for im in images]).to(device=vm.device, dtype=vm.dtype)
    grid = vm.grid_for(x.shape[-2], x.shape[-1])
    kept: dict[int, torch.Tensor] = {}

    def keep(i: int, out: torch.Tensor) -> None:
        if i == layer:
            kept[i] = out[:, vm.num_prefix_tokens :].float().cpu()  # [B, P, D]

    with torch.no_grad(), AttentionCapture(vm.model, on_block=keep):
        vm.logits(x)
    res = pca(kept[layer], foreground_threshold=foreground_threshold, grid_size=grid)
    return res.rgb.reshape(len(images), *grid, 3).numpy()
