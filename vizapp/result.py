"""The result of one analysed image: :class:`Analysis`, the record of the forward pass (q and k of every layer, the
statistics, block outputs and the logit lens) with every view's computation, and :class:`GradientGraph`, the
forward's autograd graph kept for the class-specific maps. :mod:`vizapp.pipeline` makes them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from PIL import Image

from vizapp import checks, gradient_pass, limits
from vizapp.analysis.rollout import rollout_row
from vizapp.capture import attention_from_qk
from vizapp.errors import BadParameterError
from vizapp.models import VizModel
from vizapp.models.base import READOUTS, readout_weights
from vizapp.models.digest import WeightsDigest
from vizapp.result_features import LabelFreeViews, to_numpy
from vizapp.resultcache import Key, ResultCache
from vizapp.streaming import fused_layer
from vizapp.transfer import to_device

Query = str | int | tuple[int, int]
#: Where the maps carried down from the output start: the tokens the output reads, or the CLS token whatever it reads.
START_ROWS = checks.START_ROWS


def _row_key(start_row: str) -> tuple[str, ...]:
    """The cache key's suffix for a map's start row (none for the output's, the key the forward fills)."""
    return () if start_row == "output" else (start_row,)


def class_index(probs: np.ndarray | None, labels: tuple[str, ...], class_idx: Any) -> int:
    """A result's class: an index or a label checked against its classes, or None for the top-1 of ``probs``."""
    if probs is None:
        raise BadParameterError("this model has no classifier head, so there is no class to explain")
    if class_idx is None:
        return int(np.argmax(probs))
    if isinstance(class_idx, str):
        if class_idx not in labels:
            raise BadParameterError(f"unknown class {class_idx[:60]!r}; pick one of the top-5")
        return labels.index(class_idx)
    if isinstance(class_idx, bool) or not isinstance(class_idx, (int, np.integer)):
        raise BadParameterError(f"class must be an index or a label, got {class_idx!r}"[:200])
    if not 0 <= class_idx < len(probs):
        raise BadParameterError(f"class {class_idx} is out of range 0..{len(probs) - 1}")
    return int(class_idx)


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
        replays: a gradient-enabled analysis whose gradients come from replayed passes (one image on a GPU:
            :func:`vizapp.pipeline.analyze_inputs`) instead of a kept graph (``maps`` and ``logits`` are None).
    """

    def __init__(
        self, maps: list[torch.Tensor] | None = None, logits: torch.Tensor | None = None, image: int = 0
    ) -> None:
        self.maps, self.logits, self.image = maps, logits, image
        self.given: dict[int, torch.Tensor] = {}
        self.replays = False

    def __deepcopy__(self, memo: dict) -> GradientGraph:
        return GradientGraph()

    def __reduce__(self) -> tuple:
        return (GradientGraph, ())


class ModelRuns:
    """What a result that runs its model again shares (:class:`Analysis`, ``WindowAnalysis``): its classes by index or
    label, the very network it came from, and the maps of the methods that run that network themselves. Reads the
    result's ``probs``, ``labels``, ``model_ref``, ``load_args``, ``model_name``, ``model_fingerprint``, ``input`` and
    ``_cache``."""

    def _class(self, class_idx: Any) -> int:
        return class_index(self.probs, self.labels, class_idx)

    def _model(self) -> VizModel:
        """The network this result came from: the same object while it is alive, else the cache's copy when its
        weights are the same; otherwise StaleResultError (a random-weight model rebuilt, weights changed)."""
        from vizapp.models import pinned

        return pinned(self.model_ref, self.load_args, self.model_name, self.model_fingerprint)

    def _model_later(self) -> tuple[VizModel, Callable[[], None]]:
        """:meth:`_model` in two steps: the network, and the check of its weights, to call once the work given to it
        is queued and before its results are taken (:func:`vizapp.models.pinned_later`)."""
        from vizapp.models import pinned_later

        return pinned_later(self.model_ref, self.load_args, self.model_name, self.model_fingerprint)

    def _moved(self, move: Callable[[Any], Any]) -> dict[str, Any]:
        """The record's fields, each tensor passed through ``move``, and the fields a moved copy starts afresh (each
        result type's own; its ``device`` property says where the record is)."""
        raise NotImplementedError

    def model_map(self, name: str, class_idx: Any, run: Callable[..., Any], **options: Any) -> np.ndarray:
        """The map of a method that runs the model again on this result's input, for a class: ``run(vm, x [1, C, H,
        W], [class], **options) -> [1, gh, gw]`` (its own forward and backward; the first stage's grid for a windowed
        model), cached by name, class and options (see ``Method.batch`` in :mod:`vizapp.methods`)."""
        cls = self._class(class_idx)

        def make() -> np.ndarray:
            vm = self._model()
            return np.asarray(run(vm, to_device(self.input, vm.device, vm.dtype), [cls], **options))[0]

        return self._cache.get(Key("map", (name, cls, *sorted(options.items()))), make)

    def _perturbation_grid(self) -> tuple[tuple[int, int], Any, str]:
        """The grid the perturbation tests remove patches from, one cell's pixels, and what a refusal adds to say so
        (each result type's own)."""
        raise NotImplementedError

    def faithfulness(
        self,
        maps: dict[str, np.ndarray],
        class_idx: Any = None,
        steps: int | None = 20,
        baseline: float = 0.0,
        random_seed: int | None = 0,
        batch_size: int | None = None,
    ) -> dict[str, dict[str, Any]]:
        """Deletion and insertion curves (Petsiuk et al. 2018) of each map for a class.

        Patches are removed from the image (deletion) or revealed on the baseline (insertion) in the order of the
        map's importance, and the class probability tracked; a windowed model's maps are over its first stage's grid
        and so are the patches. ``baseline`` is in the model's normalised input space, so 0.0 is the dataset-mean
        colour. A random order is added as "random" unless ``random_seed`` is None. ``batch_size``: perturbed images
        per forward (None: :func:`vizapp.limits.perturbation_batch` of the model's device, as the evaluation's).

        Returns:
            {name: {"deletion": Curve, "insertion": Curve}}
        """
        from vizapp.analysis.faithfulness import deletion_insertion
        from vizapp.models.prompts import probabilities

        cls = self._class(class_idx)
        vm = self._model()
        grid, patch, where = self._perturbation_grid()
        if batch_size is None:
            batch_size = limits.perturbation_batch(vm.device)

        def predict(batch: torch.Tensor) -> torch.Tensor:  # class probabilities (SigLIP prompts: their sigmoids)
            with torch.no_grad():
                logits = vm.logits(to_device(batch, vm.device, vm.dtype)).float()
                return probabilities(logits, vm.activation).cpu()

        try:
            return deletion_insertion(
                predict, self.input[0], maps, grid, patch, cls, steps, baseline, random_seed, batch_size
            )
        except ValueError as exc:
            raise BadParameterError(f"{exc}{where}") from exc

    def to(self, device: torch.device | str) -> Any:
        """This result with its record on ``device``, e.g. ``r.to("cpu")`` to keep many results of a GPU model
        without holding GPU memory; every view then computes there. The same object when it is already there.

        The copy does not carry the gradient-enabled forward's autograd graph (``analyze(..., gradients=True)``),
        which lives with the model: a class-specific map of the copy runs the model again (one forward and one
        backward per class) and brings its gradients to ``device``. What the original had cached is formed again."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if self.device == device:
            return self
        return replace(self, **self._moved(lambda t: None if t is None else t.to(device)), _cache=ResultCache())


#: False: an analysis's class maps always take the per-head gradients (:meth:`Analysis.attention_gradients`), as
#: before 2026-12-07, where no graph or batch backward holds them (benchmarks.graph_memory's comparison)
RECOMPUTED = True


@dataclass(frozen=True, eq=False)
class Analysis(LabelFreeViews, ModelRuns):
    """Everything vizapp computed for one image and one model (deep-copyable): what its forward made, q, k, biases,
    block outputs and the kept fusions, as tensors on the model's device; what the views draw as it is (probabilities,
    statistics, norms, the lens) as numpy on the host. Every view returns numpy.

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
            weights then (:meth:`VizModel.fingerprint`: names, dtypes, devices and contents by position): methods
            that run the model again use that very network or refuse (:class:`~vizapp.errors.StaleResultError`),
            never another one.
        graph: with ``analyze(..., gradients=True)``, the forward's autograd graph (see :class:`GradientGraph`).
        mean_distance: [L, H] mean attention distance in pixels (``statistics["distance"]``).
        statistics: every registered statistic (:mod:`vizapp.statistics`) of this image: name -> [L, H] for a
            per-head statistic (``"distance"``, ``"entropy"`` ...), [L] for a per-block one (``"norm_patch_mean"`` ...).
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
    statistics: dict[str, np.ndarray] = field(default_factory=dict)
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
    model_fingerprint: WeightsDigest | tuple = ()
    graph: GradientGraph = field(default_factory=GradientGraph, repr=False)
    _cache: ResultCache = field(default_factory=ResultCache, repr=False)

    @property
    def num_layers(self) -> int:
        return len(self.q)

    @property
    def num_heads(self) -> int:
        return int(self.q[0].shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.q[0].shape[1])

    @property
    def device(self) -> torch.device:
        """Where the record is (q, k, biases, block outputs): the model's device, unless moved by :meth:`to`."""
        return self.q[0].device

    def _moved(self, move: Callable[[Any], Any]) -> dict[str, Any]:
        return {
            "q": tuple(move(t) for t in self.q),
            "k": tuple(move(t) for t in self.k),
            "biases": tuple(move(b) for b in self.biases),
            "block_outputs": {i: move(t) for i, t in self.block_outputs.items()},
            "graph": GradientGraph(),
        }

    # -- validation -----------------------------------------------------------------------------------------------
    def _layer(self, layer: Any) -> int:
        return checks.layer_index(layer, self.num_layers)

    def _head(self, head: Any) -> int | None:
        return checks.head_index(head, self.num_heads)

    def query_index(self, query: Query) -> int:
        """Token index of a query: "cls" (token 0), a prefix token index, or a patch (row, col)."""
        p = self.num_prefix_tokens
        gh, gw = self.grid_size
        if isinstance(query, str):
            if query.lower() != "cls":
                raise BadParameterError(f"query must be 'cls' or a patch (row, col), got {query[:40]!r}")
            if not self.has_class_token:
                raise BadParameterError(checks.NO_CLS)
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
        maps = to_numpy(row.reshape(self.num_heads, *self.grid_size))
        return maps if head is None else maps[head]

    def attention_all_layers(self, query: Query = "cls") -> np.ndarray:
        """[L, H, gh, gw] maps of one query for every layer."""
        return np.stack([self.attention(layer, None, query) for layer in range(self.num_layers)])

    def prefix_attention(self, layer: int, query: Query = "cls") -> np.ndarray:
        """[H, num_prefix_tokens] weights the query sends to the prefix tokens (CLS/dist/registers)."""
        return to_numpy(self.attention_row(layer, query)[:, : self.num_prefix_tokens])

    # -- rollout ----------------------------------------------------------------------------------------------------
    def fused(self, head_fusion: str = "mean") -> torch.Tensor:
        """Head-fused attention of every layer [L, N, N]; cached while small."""
        checks.head_fusion(head_fusion)
        return self._cache.get(
            Key("fused", (head_fusion,)),
            lambda: torch.stack([self._fused_layer(i, head_fusion) for i in range(self.num_layers)]),
        )

    def _fused_layer(self, layer: int, head_fusion: str) -> torch.Tensor:
        return fused_layer(self.q[layer], self.k[layer], self.scales[layer], head_fusion, bias=self._bias(layer))

    def rollout(
        self, head_fusion: str = "mean", discard_ratio: float = 0.0, start_layer: int = 0, start_row: str = "output"
    ) -> np.ndarray:
        """Attention rollout map: the output's row of the joint attention over the patches, raw, [gh, gw] (the CLS
        row for a ViT that reads its class token; see :meth:`output_weights`). ``start_row="cls"``: the CLS row
        whatever the output reads."""
        checks.discard_ratio(discard_ratio)
        start_layer = self._layer(start_layer)
        checks.head_fusion(head_fusion)
        weights = self.output_weights(start_row)
        key = Key("rollout", (head_fusion, float(discard_ratio), start_layer, *_row_key(start_row)))

        def make() -> np.ndarray:
            cached = self._cache.peek(Key("fused", (head_fusion,)))

            row = rollout_row(
                cached if cached is not None else lambda layer: self._fused_layer(layer, head_fusion),
                self.num_layers,
                weights,
                self.num_prefix_tokens,
                float(discard_ratio),
                start_layer,
            )
            return self._patch_map(row[self.num_prefix_tokens :])

        return self._cache.get(key, make)

    # -- class-specific explanations (issue: beyond attention maps) -------------------------------------------
    def attention_stack(self) -> torch.Tensor:
        """Every layer's attention [L, H, N, N] (materialised on demand for the methods that need all of it): as many
        layers at a time as fit :func:`vizapp.limits.chunk_bytes` on the record's device (on a GPU a ViT-B's twelve
        in one product and one softmax, not twelve of each), where the layers share their shapes, scale and bias
        shape; else layer by layer."""
        if self.graph.maps is not None:
            return torch.stack([m[self.graph.image].detach().float() for m in self.graph.maps])
        h, n, _ = self.q[0].shape
        per = limits.chunk_bytes(self.device) // (h * n * n * 4)
        same = {(tuple(q.shape), tuple(k.shape), s) for q, k, s in zip(self.q, self.k, self.scales, strict=True)}
        biased = {None if b is None else tuple(b.shape) for b in self.biases}
        if per < 2 or len(same) > 1 or len(biased) > 1:
            return torch.stack([self.attention_layer(i) for i in range(self.num_layers)])
        parts = []
        for lo in range(0, self.num_layers, per):
            layers = slice(lo, min(self.num_layers, lo + per))
            bias = torch.stack(self.biases[layers]) if biased - {None} else None  # [g, H or 1, N, N]
            q, k = torch.stack(self.q[layers]), torch.stack(self.k[layers])  # [g, H, N, d]
            parts.append(attention_from_qk(q, k, self.scales[0], bias))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def attention_gradients(self, class_idx: Any = None) -> torch.Tensor:
        """∂logit[class]/∂A for every layer and head, [L, H, N, N] (one forward + backward, fused attention kept)."""
        return self._attention_gradients(self._class(class_idx))

    def _attention_gradients(self, cls: int, later: tuple[VizModel, Callable[[], None]] | None = None) -> torch.Tensor:
        """Of a checked class; ``later``: :meth:`_model_later`'s answer where the caller has it (loaded once)."""
        if (key := Key("grads", (cls,))) in self._cache:
            return self._cache.peek(key)
        if cls in self.graph.given:  # found by the backward of a whole batch (class_gradients)
            return self.graph.given[cls]
        if self.graph.maps is not None:  # the gradient-enabled forward of analyze: one backward per class
            i = self.graph.image
            grads = torch.autograd.grad(self.graph.logits[i, cls], self.graph.maps, retain_graph=True)
            return self._cache.put(key, torch.stack([g[i].float() for g in grads]))
        # a forward and a backward (on a GPU one replayed CUDA graph a shape), the weights checked once it is queued
        vm, check = later or self._model_later()
        grads = gradient_pass.attention_gradients(vm, self.input, cls, len(self.probs), meanwhile=check)
        return self._cache.put(key, grads.to(self.device))

    def output_weights(self, start_row: str = "output") -> torch.Tensor:
        """[N] float64 weights over the tokens whose joint-attention rows make the output's map: the tokens the
        model's output reads (:attr:`readout`; one-hot at CLS for a ViT that reads its class token, uniform over the
        patches for one that averages them, as BEiT's head does though it has a CLS token). ``start_row="cls"``:
        one-hot at the CLS token instead (a model's class token, even where its head never reads it)."""
        if checks.start_row(start_row, self.has_class_token) == "cls":
            return readout_weights("cls", self.num_tokens, self.num_prefix_tokens)
        return readout_weights(self.readout, self.num_tokens, self.num_prefix_tokens)

    @property
    def readout_text(self) -> str:
        """What the output reads, in words (for titles and notes)."""
        return READOUTS[self.readout]

    def _patch_map(self, flat: torch.Tensor) -> np.ndarray:
        return to_numpy(flat.reshape(self.grid_size).float())

    def grad_weighted_heads(self, class_idx: Any = None) -> torch.Tensor:
        """Ā = mean over heads of max(∇A ⊙ A, 0) for a class, every layer, [L, N, N] float64 (the fusion both
        gradient methods share; formed once per class)."""
        from vizapp import graph_maps  # (which imports this module)
        from vizapp.analysis.relevance import grad_weighted_heads

        cls = self._class(class_idx)

        def make() -> torch.Tensor:
            later = None
            if RECOMPUTED and self.graph.maps is None and Key("grads", (cls,)) not in self._cache:
                later = vm, check = self._model_later()  # no per-head gradients at hand, and none replayed on a GPU:
                x = to_device(self.input, vm.device, vm.dtype)  # one forward and backward (graph_maps)
                if cls not in self.graph.given and not gradient_pass.graphable(vm, x):
                    return graph_maps.one_image_heads(vm, x, cls, check).to(self.device)
            return grad_weighted_heads(self.attention_stack(), self._attention_gradients(cls, later))

        return self._cache.get(Key("grad_heads", (cls,)), make)

    def grad_rollout(
        self, class_idx: Any = None, discard_ratio: float = 0.0, start_layer: int = 0, start_row: str = "output"
    ) -> np.ndarray:
        """Gradient-weighted rollout for a class, [gh, gw]: each layer's gradient paired with its own attention (the
        rollout of :meth:`grad_weighted_heads`, carried as one row from the top layer down; ``start_row`` as in
        :meth:`rollout`)."""
        weights = self.output_weights(start_row)
        start_layer = self._layer(start_layer)
        checks.discard_ratio(discard_ratio)
        fused = self.grad_weighted_heads(class_idx)
        row = rollout_row(
            fused,  # [L, N, N]: without discarding, every layer's row sums in one pass
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
        block's attention times its attention gradient, rolled out from ``start_layer`` (the authors' 1); see
        :func:`vizapp.analysis.lrp.transformer_attribution`. Runs the model again, forward and backward, in float64
        (the same computation as ``vizapp.explain`` of a batch: :func:`vizapp.methods.transformer_attribution_batch`)."""
        from vizapp.methods import transformer_attribution_batch

        cls, start_layer = self._class(class_idx), self._layer(start_layer)
        return self.model_map("transformer_attribution", cls, transformer_attribution_batch, start_layer=start_layer)

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
        key = Key("flow", (head_fusion, *_row_key(start_row)))

        def make() -> np.ndarray:
            flat = attention_flow(
                self.attention_stack(),
                self.num_prefix_tokens,
                head_fusion=head_fusion,
                progress=progress,
                readout=weights,
            )
            return self._patch_map(flat)

        return self._cache.get(key, make)

    def _perturbation_grid(self) -> tuple[tuple[int, int], Any, str]:
        return self.grid_size, self.patch_size, ""

    def last_layer_attention(self) -> np.ndarray:
        """CLS attention of the last layer, averaged over heads, [gh, gw] (DINO-style baseline map)."""
        return self.attention(self.num_layers - 1, None, "cls").mean(axis=0)  # needs a CLS token

    def explain(self, method: str, class_idx: Any = None, **kwargs: Any) -> np.ndarray:
        """Any registered method's map by name (see :data:`vizapp.methods.METHODS`)."""
        from vizapp import methods

        return methods.explain(self, method, class_idx, **kwargs)

    # -- label-free views (issue: beyond class labels) -----------------------------------------------------
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
            # NaN (a statistic a model does not have, e.g. prefix-token norms without prefix tokens) -> null in JSON
            "statistics": {k: np.where(np.isnan(v), None, np.round(v, 6)).tolist() for k, v in self.statistics.items()},
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
        } | {f"statistic_{k}": v for k, v in self.statistics.items()}
        full = self.num_layers * self.num_heads * self.num_tokens**2 * 4
        if full <= (limits.EXPORT_ATTENTION_BYTES if max_bytes is None else max_bytes):
            out["attention"] = to_numpy(torch.stack([self.attention_layer(i) for i in range(self.num_layers)]))
        else:
            out["cls_attention"] = to_numpy(torch.stack([self.attention_row(i) for i in range(self.num_layers)]))
        if self.probs is not None:
            out["probs"] = self.probs
        return out
