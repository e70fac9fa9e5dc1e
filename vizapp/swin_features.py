"""The label-free feature views of a windowed (Swin) analysis, per layer on that layer's own token grid.

A Swin's token stream changes at every patch merging (the grid halves, the width doubles), so there is no [L, N, D]
stack as in a plain ViT; but each layer's block output is a well-defined set of tokens [N_l, C_l] on its grid
(gh_l, gw_l), and the views are taken there:

- feature PCA (Oquab et al. 2023, DINOv2 Fig. 1): the first 3 principal components of one layer's tokens as RGB;
- feature similarity (DINO's demos): the cosine of every token of one layer to one token of the same layer;
- token norms (Darcet et al. 2024): the L2 norm of every token after each block, [N_l] per layer. Swin has no prefix
  tokens (no class token, no registers): every token is a patch of its stage's grid;
- the logit lens (nostalgebraist 2020) of the last stage's layers (:class:`WindowLens`): each block's output through
  the model's own final norm, average pooling and head; the earlier stages' tokens are of other widths than the head
  takes, so they have none.

:class:`WindowBlockOutputs` keeps the block outputs during the analysis forward, within the plain ViT's budget
(:data:`vizapp.limits.BLOCK_OUTPUT_BYTES` per image): every layer's while their sum fits, else the last layer's only;
a layer not kept is formed again by one forward of the very network the analysis came from when a method asks for it
(the app's views, redrawn on every control change, draw the kept layer instead and say so:
:func:`vizapp.feature_views_windows.feature_layer`).
The grid each output is drawn on is the one the forward used (:attr:`WindowAnalysis.layer_grids`), never assumed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from vizapp import limits
from vizapp.errors import BadParameterError
from vizapp.result_features import to_numpy
from vizapp.resultcache import Key, ResultCache

if TYPE_CHECKING:
    from vizapp.models import VizModel
    from vizapp.windows import WindowGeometry


class WindowBlockOutputs:
    """What a windowed analysis keeps of each block's output (``WindowCapture(on_block=...)``), for every image of
    the batch: the L2 norm of every token, [B, N_l] per layer (always, a few floats), and the output itself
    [B, N_l, C_l] float32 for the feature views, for every layer while one image's Σ_l N_l·C_l floats fit
    ``budget`` bytes, else for the last layer only.

    The sum is counted as the outputs arrive: once it passes the budget the outputs kept so far are dropped, so a
    forward holds at most the budget and one layer's output more, and the last layer's is kept when it comes.

    Args:
        num_layers: L, the windowed model's attention layers.
        budget: bytes per image; default :data:`vizapp.limits.BLOCK_OUTPUT_BYTES`.
    """

    def __init__(self, num_layers: int, budget: int | None = None) -> None:
        self.num_layers = num_layers
        self.budget = limits.BLOCK_OUTPUT_BYTES if budget is None else budget
        self.norms: list[torch.Tensor | None] = [None] * num_layers  # [B, N_l] float32
        self.outputs: dict[int, torch.Tensor] = {}  # layer -> [B, N_l, C_l] float32
        self.bytes_per_image = 0
        self.keep_all = True

    def __call__(self, layer: int, out: torch.Tensor) -> None:
        """``on_block``: block ``layer``'s output tokens [B, N_l, C_l] (detached), in its grid's row-major order."""
        self.norms[layer] = torch.linalg.vector_norm(out.float(), dim=-1)
        self.bytes_per_image += out[0].numel() * 4
        if self.keep_all and self.bytes_per_image > self.budget:
            self.keep_all = False
            self.outputs.clear()
        if self.keep_all or layer == self.num_layers - 1:
            self.outputs[layer] = out.float()

    def check(self, geometry: tuple[WindowGeometry, ...]) -> None:
        """Raise unless every layer's output arrived with one token per cell of the grid its forward used."""
        for i, g in enumerate(geometry):
            n, seen = g.grid[0] * g.grid[1], self.norms[i]
            if seen is None or seen.shape[-1] != n or (i in self.outputs and self.outputs[i].shape[-2] != n):
                got = None if seen is None else seen.shape[-1]
                raise RuntimeError(f"layer {i}'s block output has {got} tokens, not one per cell of its {g.grid} grid")


def layer_outputs(
    vm: VizModel, x: torch.Tensor, layers: set[int]
) -> tuple[dict[int, torch.Tensor], tuple[tuple[int, int], ...]]:
    """The block outputs of ``layers`` for a batch ``x`` [B, C, H, W] by one forward of ``vm`` that forms no attention
    map: layer -> [B, N_l, C_l] float32 on the model's device, and every layer's grid as that forward used it."""
    from vizapp.windows import WindowCapture

    kept: dict[int, torch.Tensor] = {}

    def keep(i: int, out: torch.Tensor) -> None:
        if i in layers:
            kept[i] = out.float()

    with torch.no_grad(), WindowCapture(vm.model, on_block=keep, maps=False) as cap:
        vm.logits(x.to(device=vm.device, dtype=vm.dtype))
    if set(kept) != layers or any(g is None for g in cap.geometry):
        raise RuntimeError(f"layers {sorted(layers - set(kept))} never ran; their block outputs were not seen")
    return kept, tuple(g.grid for g in cap.geometry)


def feature_pca_images(
    vm: VizModel, images: Any, layer: int = -1, foreground_threshold: float | None = None
) -> tuple[np.ndarray, tuple[int, int]]:
    """One PCA shared by several images at one layer of a windowed model, so that parts correspond by colour (the
    windowed counterpart of :func:`vizapp.pipeline.feature_pca`): [B, gh_l, gw_l, 3] RGB in [0, 1], and that layer's
    token spacing in input pixels (the patch size times 2 per patch merging before it)."""
    from vizapp.analysis.features import feature_pca
    from vizapp.models.swin import stage_strides
    from vizapp.result import to_pil
    from vizapp.windows import window_sites

    images = list(images)
    if not images:
        raise BadParameterError("feature_pca needs at least one image")
    n = vm.num_layers
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not -n <= layer < n:
        raise BadParameterError(f"layer must be an integer in {-n}..{n - 1}, got {layer!r}"[:200])
    layer = int(layer) % n
    x = torch.stack([vm.batch_transform(to_pil(im)[0]) for im in images])
    kept, grids = layer_outputs(vm, x, {layer})
    res = feature_pca(kept[layer], foreground_threshold=foreground_threshold, grid_size=grids[layer])
    stage = window_sites(vm.model)[layer].stage
    return to_numpy(res.rgb.reshape(len(images), *grids[layer], 3)), stage_strides(vm, stage + 1)[stage]


class WindowLens:
    """The logit lens of a windowed model's last stage, read during the analysis forward (``WindowCapture(on_block=
    ...)``): each last-stage block's output [B, N, C] through the model's own final norm, average pooling and linear
    head (:func:`vizapp.models.swin.token_lens`, the function LeGrad scores with), logits [B, K] per such layer. The
    last layer's is the model's own output. No layer has a lens when the model has no classifier head.

    Args:
        model: the windowed model (:func:`vizapp.windows.window_sites` reads its layers and stages).
    """

    def __init__(self, model: torch.nn.Module) -> None:
        from vizapp.models.swin import token_lens
        from vizapp.windows import window_sites

        stages = [s.stage for s in window_sites(model)]
        self.num_layers = len(stages)
        self.fn = token_lens(model)
        self.layers = () if self.fn is None else tuple(i for i, s in enumerate(stages) if s == max(stages))
        self.logits: dict[int, torch.Tensor] = {}  # layer -> [B, K] float32

    def __call__(self, layer: int, out: torch.Tensor, grid: tuple[int, int]) -> None:
        """Block ``layer``'s output tokens [B, N, C] row-major over ``grid``: its lens logits when it is of the last
        stage (under no_grad: the lens is a view of the forward, never part of its graph)."""
        if layer in self.layers:
            with torch.no_grad():
                self.logits[layer] = self.fn(out, grid).float()

    def probabilities(self) -> torch.Tensor | None:
        """[B, L, K] the softmax of each layer's lens logits, NaN rows for the layers before the last stage; None
        without a classifier head."""
        if self.fn is None:
            return None
        if set(self.logits) != set(self.layers):
            raise RuntimeError(f"last-stage layers {sorted(set(self.layers) - set(self.logits))} never ran")
        first = self.logits[self.layers[0]]
        out = torch.full((first.shape[0], self.num_layers, first.shape[1]), float("nan"))
        for i, lg in self.logits.items():
            out[:, i] = torch.softmax(lg, -1).cpu()
        return out


class WindowFeatureViews:
    """Methods of :class:`~vizapp.swin_result.WindowAnalysis` that need no class, on each layer's own grid: they read
    its block outputs and norms (the attributes and helpers the WindowAnalysis defines)."""

    # set by WindowAnalysis; declared for readers and type checkers
    block_outputs: dict[int, torch.Tensor]
    block_norms: tuple[np.ndarray, ...]
    input: torch.Tensor
    labels: tuple[str, ...]
    lens_probs: np.ndarray | None  # [L, K], NaN rows before the last stage
    _cache: ResultCache

    #: Swin's views that the plain ViT's Analysis has and that read no class token (for the app's checks)
    num_registers = 0

    def _features(self, layer: int) -> torch.Tensor:
        """The tokens of ``layer``'s block output, [N_l, C_l] float32, row-major over its grid: kept by the analysis,
        or formed again by one forward of the network it came from (cached), when all layers' would not fit."""
        layer = self._layer(layer)
        if layer in self.block_outputs:
            return self.block_outputs[layer]

        def make() -> torch.Tensor:
            vm = self._model()  # the very network (StaleResultError when it changed)
            out = layer_outputs(vm, self.input, {layer})[0][layer][0].to(self.device)
            if out.shape[0] != self.tokens_per_layer[layer]:
                raise RuntimeError(f"layer {layer} gave {out.shape[0]} tokens, not {self.tokens_per_layer[layer]}")
            return out

        return self._cache.get(Key("block_output", (layer,)), make)

    def feature_kept(self, layer: int) -> bool:
        """Whether ``layer``'s block output was kept by the analysis (else a feature view runs the model once more)."""
        return self._layer(layer) in self.block_outputs

    def feature_pca(self, layer: int = -1, foreground_threshold: float | None = None) -> np.ndarray:
        """``layer``'s tokens on their first 3 principal components as RGB [gh_l, gw_l, 3] in [0, 1] (Oquab et al.
        2023); with ``foreground_threshold``, refit on the tokens whose scaled first component is above it, the
        background black (see :func:`vizapp.analysis.features.feature_pca`)."""
        from vizapp.analysis.features import feature_pca

        layer = self._layer(layer)
        grid = self.layer_grids[layer]
        res = feature_pca(self._features(layer), foreground_threshold=foreground_threshold, grid_size=grid)
        return to_numpy(res.rgb.reshape(*grid, 3))

    def feature_similarity(self, query: Any, layer: int = -1, other: Any = None) -> np.ndarray:
        """Cosine similarity between the token ``query`` (row, col) of ``layer``'s grid and every token of that layer,
        of this image or of ``other`` (a windowed analysis by the same model), [gh_l, gw_l]."""
        from vizapp.analysis.features import feature_similarity

        layer = self._layer(layer)
        token = self.query_token(layer, query)
        target = self if other is None else other
        if not getattr(target, "windowed", False) or target.layer_grids[layer] != self.layer_grids[layer]:
            raise BadParameterError(f"the second image has no layer {layer} on the same {self.layer_grids[layer]} grid")
        keys = None if other is None else other._features(layer)
        if keys is not None and keys.shape[-1] != self._features(layer).shape[-1]:
            raise BadParameterError("the second image's features have another width: analyse it with the same model")
        sim = feature_similarity(self._features(layer), token, keys)
        return to_numpy(sim.reshape(target.layer_grids[layer]))

    def token_norms(self) -> tuple[np.ndarray, ...]:
        """Per layer, the L2 norm of every token of its block output, [N_l] float32 row-major over its grid (the
        plain ViT's [L, N] rows; a Swin's layers differ in N, and it has no prefix tokens)."""
        if not self.block_norms:
            raise BadParameterError("token norms were not recorded for this analysis")
        return self.block_norms

    def artifact_tokens(self, k: float = 10.0) -> tuple[np.ndarray, ...]:
        """Per layer, bool [N_l]: tokens whose norm is above median + k·MAD of their layer (Darcet et al. 2024; see
        :func:`vizapp.analysis.features.artifact_tokens`)."""
        from vizapp.analysis.features import artifact_tokens

        return tuple(artifact_tokens(torch.as_tensor(n), k=k).numpy() for n in self.token_norms())

    def register_attention(self) -> dict[str, np.ndarray | None]:
        from vizapp.swin_result import undefined

        raise BadParameterError(undefined("registers"))

    def dino_masks(self, threshold: float = 0.6) -> np.ndarray:
        from vizapp.swin_result import undefined

        raise BadParameterError(undefined("dino_masks"))

    @property
    def lens_layers(self) -> tuple[int, ...]:
        """The layers that have a logit lens: those of the last stage (none without a classifier head)."""
        if self.lens_probs is None:
            return ()
        return tuple(i for i, row in enumerate(self.lens_probs) if not np.isnan(row).all())

    def logit_lens(self, k: int = 5) -> list[list[tuple[str, float]]]:
        """Per layer, the top-``k`` classes of the logit lens (nostalgebraist 2020) for the layers of the last stage
        (:attr:`lens_layers`): each block's output through the model's own final norm, average pooling and head, then
        a softmax; the last layer's is the model's own prediction. The rows of the earlier stages' layers are empty
        (:data:`vizapp.swin_result.UNDEFINED` says why in one sentence)."""
        if self.lens_probs is None:
            raise BadParameterError("this model has no classifier head, so there is no logit lens")
        out: list[list[tuple[str, float]]] = []
        for row in self.lens_probs:
            order = [] if np.isnan(row).all() else np.argsort(-row, kind="stable")[: max(0, int(k))]
            out.append([(self.labels[i], float(row[i])) for i in order])
        return out
