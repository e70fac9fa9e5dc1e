"""The analysis of one image by a windowed-attention model (Swin): :class:`WindowAnalysis`, and
:func:`analyze_windowed`, which makes it from one forward with :class:`vizapp.windows.WindowCapture`.

Layers differ in token grid, head count and window, so the record is per layer: the window attention as the forward
used it ([nW, H_l, w², w²]) and its geometry. Maps are drawn on each layer's own grid; rollout and the
class-specific maps are carried down to the first stage's grid through the patch mergings (equal shares, see
:mod:`vizapp.analysis.windows`).

The label-free feature views are per layer on that layer's own grid (:mod:`vizapp.swin_features`, :data:`FEATURES`):
feature PCA, the cosine similarity to a token, token norms and the high-norm tokens among them.

What is not defined for Swin, in one sentence each (:data:`UNDEFINED`): it has no class token, so no CLS-row view
and no DINO masks; it has no learned absolute position embedding; no registers or other prefix tokens; its head reads
the last stage's width only, so the logit lens is read for the last stage's layers only; Transformer Attribution's LRP
rules are written for a plain ViT block. Attention flow runs on the graph the rollout multiplies along
(:mod:`vizapp.analysis.windows_flow`: window attention with the residual, each merging as equal-share edges, the pooled
output as the sink). AttnLRP and LeGrad run the model again with their own rules for windows
(:mod:`vizapp.analysis.windows_explain`; LeGrad over the last stage's blocks); head importance ablates each layer's own
heads (:func:`vizapp.ablation.head_importance`, [L, max H] with NaN for the heads a layer lacks).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from vizapp import checks
from vizapp.analysis import windows as W
from vizapp.errors import BadParameterError
from vizapp.models import VizModel
from vizapp.result import ModelRuns, to_pil
from vizapp.result_features import to_numpy
from vizapp.resultcache import Key, ResultCache
from vizapp.swin_features import WindowBlockOutputs, WindowFeatureViews, WindowLens
from vizapp.transfer import tensor_on, to_device
from vizapp.windows import WindowCapture, WindowGeometry, read_relative_bias

#: the maps a windowed model's analysis gives by name (:meth:`WindowAnalysis.explain`)
METHODS = ("rollout", "flow", "grad_rollout", "relevance", "attnlrp", "legrad", "last_layer")
#: the maps that run the model again themselves (their own forward and backward; :meth:`WindowAnalysis.model_map`)
MODEL_METHODS = ("attnlrp", "legrad")
#: view -> why it is not defined for a windowed model (one sentence each)
UNDEFINED = {
    "cls": "Swin has no class token (its head averages the last stage's tokens), so there is no CLS row to show.",
    "pos_embed": "Swin has no learned absolute position embedding; its position information is the relative bias "
    "inside each window (the position view shows it).",
    "transformer_attribution": "Transformer Attribution's LRP rules are written for a plain ViT block, not for "
    "windowed attention and patch merging.",
    "dino_masks": "DINO masks are drawn from the class token's attention in the last layer, and Swin has no class "
    "token (its head averages the last stage's tokens).",
    "logit_lens": "The logit lens is read for the last stage's layers only: the model's final norm and head take the "
    "last stage's width, and the earlier stages' tokens are of other widths (each patch merging doubles it).",
    "registers": "Swin has no prefix tokens (no class token, no registers): every token is a patch of its stage's "
    "grid.",
    "discard": "The discard ratio is not used for Swin: it drops the smallest entries of a dense N x N attention "
    "matrix, which the windowed rollout never forms.",
}

#: what the Features tab and the API offer a windowed model, in one sentence
FEATURES = (
    "Feature PCA, the cosine similarity to a chosen token and the token norms (with their high-norm tokens) are drawn "
    "per layer on that layer's own grid, tokens 2^stage patches apart, since Swin's token set changes at every patch "
    "merging."
)

#: the maps of :data:`METHODS` that are for one class
CLASS_METHODS = ("grad_rollout", "relevance", *MODEL_METHODS)
#: the registry's methods (vizapp.methods) that a windowed model does not offer -> (label, the sentence saying why)
NOT_OFFERED = {
    "attention": ("Last-layer CLS attention", UNDEFINED["cls"]),
    "transformer_attribution": ("Transformer Attribution", UNDEFINED["transformer_attribution"]),
}


def undefined(view: str) -> str:
    """The sentence saying why ``view`` is not defined for a windowed model."""
    return UNDEFINED[view]


def refusal(method: str) -> str:
    """Why a windowed model does not offer ``method`` (a registry name or anything else), in one sentence."""
    if method in NOT_OFFERED:
        label, why = NOT_OFFERED[method]
        return f"{label} ({method!r}) is not offered for windowed models: {why}"
    return f"{str(method)[:40]!r} is not a map of windowed models; they offer {', '.join(METHODS)}."


@dataclass(frozen=True, eq=False)
class WindowAnalysis(WindowFeatureViews, ModelRuns):
    """Everything vizapp computed for one image and one windowed model: the record of its forward (window attention,
    block outputs) as tensors on the model's device (:meth:`to` moves it); what the views draw as it is
    (probabilities, statistics, norms, the lens, the relative bias) as numpy or tensors on the host.

    Attributes:
        model_name, load_args, labels, probs, top_k, image, input, notes, model_ref, model_fingerprint: as in
            :class:`vizapp.result.Analysis`.
        grid_size: the first stage's token grid; ``patch_size`` the patch size in pixels.
        geometry: per layer, its :class:`~vizapp.windows.WindowGeometry` (grid, window, shift, stage).
        windows: per layer, one image's window attention [nW, H_l, w², w²] float32 as the forward used it.
        strides: per layer, its stage's token spacing in input pixels.
        mean_distance: [L, max H] in input pixels, NaN for heads a layer does not have (``statistics["distance"]``).
        statistics: every registered statistic (:mod:`vizapp.statistics`) of this image, name -> [L, max H] per head
            (NaN for heads a layer does not have) or [L] per block, each layer's token rows taken over their windows
            (:mod:`vizapp.statistics_pass`); NaN for a statistic not defined for windowed models (:attr:`notes`
            says why).
        relative_bias: per layer, the learned bias over (Δrow, Δcol) = query − key, [H_l, 2wh − 1, 2ww − 1], read
            from the weights when the image was analysed (None where the model computes it otherwise, Swin V2).
        block_outputs: layer -> that layer's block output [N_l, C_l] float32, row-major over its grid: every layer
            while one image's Σ_l N_l·C_l floats fit :data:`vizapp.limits.BLOCK_OUTPUT_BYTES`, else the last layer's
            (a feature method forms another layer's again, :mod:`vizapp.swin_features`).
        block_norms: per layer, the L2 norm of every token of its block output, [N_l] float32.
        lens_probs: [L, K] the logit lens of the last stage's layers (:class:`~vizapp.swin_features.WindowLens`), NaN
            rows for the earlier layers; None without a classifier head.
        graph_maps, graph_logits: with ``gradients=True``, the forward's probabilities and logits in the graph.
    """

    model_name: str
    load_args: tuple[tuple[str, Any], ...]
    labels: tuple[str, ...]
    probs: np.ndarray | None
    top_k: list[tuple[str, float]]
    grid_size: tuple[int, int]
    patch_size: tuple[int, int]
    image: np.ndarray
    input: torch.Tensor
    geometry: tuple[WindowGeometry, ...]
    windows: tuple[torch.Tensor, ...]
    strides: tuple[tuple[int, int], ...]
    mean_distance: np.ndarray
    statistics: dict[str, np.ndarray] = field(default_factory=dict)
    relative_bias: tuple[torch.Tensor | None, ...] = ()
    block_outputs: dict = field(default_factory=dict)
    block_norms: tuple[np.ndarray, ...] = ()
    lens_probs: np.ndarray | None = None
    notes: tuple[str, ...] = ()
    model_ref: Any = field(default=None, repr=False)
    model_fingerprint: Any = None
    graph_maps: Any = field(default=None, repr=False)
    graph_logits: Any = field(default=None, repr=False)
    graph_image: int = 0
    _cache: ResultCache = field(default_factory=ResultCache, repr=False)

    windowed = True
    has_class_token = False
    num_prefix_tokens = 0
    readout = "patches"

    # -- shape ------------------------------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.windows)

    @property
    def heads_per_layer(self) -> tuple[int, ...]:
        return tuple(int(w.shape[1]) for w in self.windows)

    @property
    def num_heads(self) -> int:
        """The most heads any layer has (the width of :attr:`mean_distance`)."""
        return max(self.heads_per_layer)

    @property
    def device(self) -> torch.device:
        """Where the record is (window attention, block outputs): the model's device, unless moved by :meth:`to`."""
        return self.windows[0].device

    def _moved(self, move: Any) -> dict[str, Any]:
        return {
            "windows": tuple(move(w) for w in self.windows),
            "block_outputs": {i: move(t) for i, t in self.block_outputs.items()},
            "graph_maps": None,
            "graph_logits": None,
        }

    @property
    def layer_grids(self) -> tuple[tuple[int, int], ...]:
        """The (gh, gw) token grid of each attention layer, in order."""
        return tuple(g.grid for g in self.geometry)

    @property
    def tokens_per_layer(self) -> tuple[int, ...]:
        return tuple(g.grid[0] * g.grid[1] for g in self.geometry)

    @property
    def padded_layers(self) -> tuple[int, ...]:
        """Layers whose grid is not a multiple of their window: the library pads it, and padded tokens are not drawn."""
        return tuple(i for i, g in enumerate(self.geometry) if g.padded != g.grid)

    def index(self, layer: int) -> torch.Tensor:
        """[nW, w²] the grid token in each window slot of ``layer`` (-1: padding); see
        :func:`vizapp.analysis.windows.window_index`."""
        layer = self._layer(layer)
        g = self.geometry[layer]
        return self._cache.get(
            Key("window_index", (layer,)),
            lambda: to_device(W.window_index(g.grid, g.window, g.shift, g.pad_first), self.device),
        )

    # -- validation -------------------------------------------------------------------------------------------------
    def _layer(self, layer: Any) -> int:
        return checks.layer_index(layer, self.num_layers)

    def _head(self, layer: int, head: Any) -> int | None:
        return checks.head_index(head, self.heads_per_layer[layer], owner=f"layer {layer}")

    def query_token(self, layer: int, query: Any) -> int:
        """The token id of a (row, col) query on ``layer``'s grid."""
        if isinstance(query, str):
            raise BadParameterError(undefined("cls") + " Pick a token (row, col) on the layer's grid.")
        gh, gw = self.geometry[layer].grid
        if (
            isinstance(query, (tuple, list))
            and len(query) == 2
            and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in query)
        ):
            r, c = int(query[0]), int(query[1])
            if not (0 <= r < gh and 0 <= c < gw):
                raise BadParameterError(f"token ({r}, {c}) is outside layer {layer}'s {gh}x{gw} grid")
            return r * gw + c
        raise BadParameterError(f"query must be a token (row, col) on the layer's grid, got {query!r}"[:200])

    @property
    def undefined_statistics(self) -> dict[str, str]:
        """name -> why, for each registered statistic that is NaN in :attr:`statistics` (not defined for Swin)."""
        from vizapp.statistics import undefined_statistics

        return undefined_statistics(self.num_prefix_tokens, True)

    # -- per-layer maps ---------------------------------------------------------------------------------------------
    def attention(self, layer: int, head: int | None = None, query: Any = (0, 0)) -> np.ndarray:
        """The query token's attention over ``layer``'s whole grid: [H_l, gh_l, gw_l] (``head`` None) or [gh_l, gw_l],
        zero outside its (shifted) window; the mass on padded tokens is not drawn."""
        layer = self._layer(layer)
        head = self._head(layer, head)
        token = self.query_token(layer, query)
        m = W.query_map(self.windows[layer], self.index(layer), self.geometry[layer].grid, token)
        return to_numpy(m if head is None else m[head])

    def window_mask(self, layer: int, query: Any = (0, 0)) -> np.ndarray:
        """bool [gh_l, gw_l]: the tokens in the query's window on ``layer`` (a shifted window may wrap around the
        grid's edges: the roll brings tokens from the far side, which the shift mask keeps apart)."""
        layer = self._layer(layer)
        token = self.query_token(layer, query)
        mask = torch.zeros(self.tokens_per_layer[layer], dtype=torch.bool, device=self.device)
        mask[W.window_cells(self.index(layer), token)] = True
        return to_numpy(mask.view(self.geometry[layer].grid))

    def full_attention(self, layer: int) -> torch.Tensor:
        """``layer``'s attention on its whole grid, [H_l, N_l, N_l] float32, zero outside the windows."""
        layer = self._layer(layer)
        return W.full_attention(self.windows[layer], self.index(layer), self.tokens_per_layer[layer])

    # -- maps over the first stage's grid --------------------------------------------------------------------------
    def _first_grid_map(self, flat: torch.Tensor) -> np.ndarray:
        return to_numpy(flat.reshape(self.geometry[0].grid).float())

    def _readout(self) -> torch.Tensor:
        n = self.tokens_per_layer[-1]
        return torch.full((n,), 1.0 / n, dtype=torch.float64, device=self.device)

    def rollout(self, head_fusion: str = "mean", start_layer: int = 0) -> np.ndarray:
        """Attention rollout (Abnar & Zuidema 2020) through windows and patch merging, [gh_0, gw_0]: the average-pooled
        output's row carried down to the first stage's tokens (see :func:`vizapp.analysis.windows.rollout_through`)."""
        start_layer = self._layer(start_layer)
        if head_fusion not in ("mean", "max", "min"):
            raise BadParameterError(f"head_fusion must be 'mean', 'max' or 'min', got {str(head_fusion)[:40]!r}")

        def make() -> np.ndarray:
            fused = [W.fuse_windows(w, self.index(i), head_fusion) for i, w in enumerate(self.windows)]
            idx = [self.index(i) for i in range(self.num_layers)]
            row = W.rollout_through(fused, idx, self.layer_grids, self._readout(), "rollout", start_layer)
            return self._first_grid_map(row)

        return self._cache.get(Key("rollout", (head_fusion, start_layer)), make)

    def attention_flow(
        self, head_fusion: str = "mean", progress: Callable[[int, int], None] | None = None, start_row: str = "output"
    ) -> np.ndarray:
        """Attention flow (Abnar & Zuidema 2020) from each first-stage token to the average-pooled output, [gh_0, gw_0]:
        exact max-flows on the graph rollout multiplies along (:mod:`vizapp.analysis.windows_flow`)."""
        from vizapp.analysis.windows_flow import windowed_flow

        if start_row != "output":
            raise BadParameterError(undefined("cls"))
        if head_fusion not in ("mean", "max", "min"):
            raise BadParameterError(f"head_fusion must be 'mean', 'max' or 'min', got {str(head_fusion)[:40]!r}")

        def make() -> np.ndarray:
            idx = [self.index(i) for i in range(self.num_layers)]
            flat = windowed_flow(self.windows, idx, self.layer_grids, self._readout(), head_fusion, progress=progress)
            return self._first_grid_map(flat)

        return self._cache.get(Key("flow", (head_fusion,)), make)

    def attention_gradients(self, class_idx: Any = None) -> list[torch.Tensor]:
        """∂logit[class]/∂A per layer, [nW, H_l, w², w²] each (the gradient-enabled forward's graph when kept, else
        one forward and backward of the same network)."""
        cls = self._class(class_idx)
        key = Key("grads", (cls,))
        if key in self._cache:
            return self._cache.peek(key)
        if self.graph_maps is not None:
            i = self.graph_image
            grads = torch.autograd.grad(self.graph_logits[i, cls], self.graph_maps, retain_graph=True)
            nw = [g.num_windows for g in self.geometry]
            out = [gr.reshape(-1, n, *gr.shape[1:])[i].detach().float() for gr, n in zip(grads, nw, strict=True)]
        else:
            vm = self._model()
            x = to_device(self.input, vm.device, vm.dtype)
            with torch.enable_grad(), WindowCapture(vm.model, with_grad=True) as cap:
                logits = vm.logits(x)
                grads = torch.autograd.grad(logits[0, cls], cap.graph_maps())
            out = [g.detach().float().to(self.device) for g in grads]
        return self._cache.put(key, out)

    def _weighted(self, class_idx: Any) -> list[torch.Tensor]:
        """Per layer Ā = mean_h max(∇A ⊙ A, 0) on its windows, [nW, w², w²] float64 (Chefer et al., ICCV 2021)."""
        grads = self.attention_gradients(class_idx)
        out = []
        for i, (a, g) in enumerate(zip(self.windows, grads, strict=True)):
            f = (g.double() * a.double()).clamp(min=0).mean(1)
            out.append(f * (self.index(i) >= 0)[:, None, :].double())
        return out

    def grad_rollout(self, class_idx: Any = None, start_layer: int = 0) -> np.ndarray:
        """Gradient-weighted rollout for a class, [gh_0, gw_0]: each layer's Ā + I with rows renormalised, carried
        down from the pooled output through windows and merges."""
        start_layer = self._layer(start_layer)
        cls = self._class(class_idx)

        def make() -> np.ndarray:
            fused = [
                W.fuse_windows(f[:, None], self.index(i), "mean", renorm=False)
                for i, f in enumerate(self._weighted(cls))
            ]
            idx = [self.index(i) for i in range(self.num_layers)]
            row = W.rollout_through(fused, idx, self.layer_grids, self._readout(), "grad_rollout", start_layer)
            return self._first_grid_map(row)

        return self._cache.get(Key("map", ("grad_rollout", cls, start_layer)), make)

    def relevance(self, class_idx: Any = None, start_layer: int = 0) -> np.ndarray:
        """Chefer et al. (ICCV 2021) relevance R ← R + Ā·R for a class through windows and merges, [gh_0, gw_0]."""
        start_layer = self._layer(start_layer)
        cls = self._class(class_idx)

        def make() -> np.ndarray:
            idx = [self.index(i) for i in range(self.num_layers)]
            row = W.rollout_through(
                self._weighted(cls), idx, self.layer_grids, self._readout(), "relevance", start_layer
            )
            return self._first_grid_map(row)

        return self._cache.get(Key("map", ("relevance", cls, start_layer)), make)

    def last_layer_attention(self) -> np.ndarray:
        """How much attention each token of the last layer receives, averaged over its queries and heads,
        [gh_L, gw_L] (Swin has no CLS row; this is the pooled output's row of the last layer)."""
        full = self.full_attention(self.num_layers - 1).double().mean(0)  # [N, N]
        return to_numpy(full.mean(0).reshape(self.layer_grids[-1]).float())

    def explain(self, method: str, class_idx: Any = None, **kwargs: Any) -> np.ndarray:
        """A map by name: "rollout", "flow", "grad_rollout", "relevance", "attnlrp", "legrad" over the first stage's grid,
        "last_layer" over the last stage's; any other method is refused with the reason."""
        if method in MODEL_METHODS:  # the registry's entry: its own forward and backward (Method.batch)
            from vizapp import methods

            return methods.explain(self, method, class_idx, **kwargs)
        if method == "rollout":
            return self.rollout(**kwargs)
        if method == "grad_rollout":
            return self.grad_rollout(class_idx, **kwargs)
        if method == "relevance":
            return self.relevance(class_idx, **kwargs)
        if method == "last_layer":
            return self.last_layer_attention()
        if method in ("flow", "attention_flow"):
            return self.attention_flow(**kwargs)
        if method == "transformer_attribution":
            raise BadParameterError(undefined(method))
        raise BadParameterError(f"method {str(method)[:40]!r} is not offered for windowed models; use one of {METHODS}")

    def first_grid_map(self, method: str, class_idx: Any = None, **kwargs: Any) -> np.ndarray:
        """A map of :meth:`explain` on the first stage's grid [gh_0, gw_0], the grid the perturbation tests remove
        from: rollout and the class maps are there already; "last_layer" (on the last stage's grid) is brought there
        by repetition, each first-stage token taking the value of the last-stage token it was merged into
        (:func:`vizapp.analysis.windows.repeat_to_grid`)."""
        found = self.explain(method, class_idx, **kwargs)
        if method != "last_layer":
            return found
        return W.repeat_to_grid(found, self.layer_grids[0], self.geometry[-1].stage)

    def _perturbation_grid(self) -> tuple[tuple[int, int], Any, str]:
        """Patches of the first stage, the grid every map of :meth:`first_grid_map` is on."""
        return self.layer_grids[0], self.strides[0], " (the first stage's)"

    def arrays(self) -> dict[str, np.ndarray]:
        """The record as named arrays (for an .npz export): each layer's window attention ``layer{i}_windows``
        [nW, H_l, w², w²] and its slot-to-token index ``layer{i}_index`` [nW, w²] (-1 = padding), the grids,
        windows, shifts and stages per layer, the mean distance [L, max H] (NaN: no such head), every registered statistic
        (``statistic_{name}``), the rollout, and the class probabilities when the model has a classifier."""
        out: dict[str, np.ndarray] = {}
        for i, w in enumerate(self.windows):
            out[f"layer{i}_windows"] = to_numpy(w)
            out[f"layer{i}_index"] = to_numpy(self.index(i))
        out["layer_grids"] = np.array(self.layer_grids, dtype=np.int64)
        out["layer_windows"] = np.array([g.window for g in self.geometry], dtype=np.int64)
        out["layer_shifts"] = np.array([g.shift for g in self.geometry], dtype=np.int64)
        out["layer_stages"] = np.array([g.stage for g in self.geometry], dtype=np.int64)
        out["mean_distance_px"] = np.asarray(self.mean_distance, dtype=np.float64)
        out |= {f"statistic_{k}": np.asarray(v, dtype=np.float64) for k, v in self.statistics.items()}
        out["rollout"] = self.rollout()
        if self.probs is not None:
            out["probs"] = np.asarray(self.probs)
        return out

    def summary(self) -> dict[str, Any]:
        """A JSON-serialisable summary of the analysis."""
        return {
            "model": self.model_name,
            "top_k": [{"label": lbl, "probability": float(p)} for lbl, p in self.top_k],
            "num_layers": self.num_layers,
            "heads_per_layer": list(self.heads_per_layer),
            "layer_grids": [list(g) for g in self.layer_grids],
            "windows": [list(g.window) for g in self.geometry],
            "shifts": [list(g.shift) for g in self.geometry],
            "readout": self.readout,
            "grid_size": list(self.grid_size),
            "patch_size": list(self.patch_size),
            "mean_distance_px": [
                [None if np.isnan(v) else round(float(v), 3) for v in row] for row in self.mean_distance
            ],
            "statistics": {k: np.where(np.isnan(v), None, np.round(v, 6)).tolist() for k, v in self.statistics.items()},
            "statistics_undefined": self.undefined_statistics,
            "rollout_mean": np.round(self.rollout(), 6).tolist(),
            "notes": list(self.notes),
        }


def class_gradients(analyses: Sequence[WindowAnalysis], classes: Sequence[Any]) -> list[int]:
    """∂logit_b[c_b]/∂A for every analysis b of one gradient-enabled windowed batch (``analyze(images,
    gradients=True)``) and its class c_b, from ONE backward of Σ_b logit_b[c_b]: a Swin batch's windows never mix
    images, so image b's share of that gradient is its own class's (as :func:`vizapp.pipeline.class_gradients` for a
    plain ViT). Each analysis keeps its gradient; returns the class indices c_b."""
    if not analyses:
        return []
    logits, maps = analyses[0].graph_logits, analyses[0].graph_maps
    if maps is None or any(r.graph_logits is not logits for r in analyses):
        raise BadParameterError("class_gradients needs the analyses of one analyze(images, gradients=True) call")
    cls = [r._class(c) for r, c in zip(analyses, classes, strict=True)]
    rows = tensor_on([r.graph_image for r in analyses], logits.device)
    score = logits[rows, tensor_on(cls, logits.device)].sum()
    grads = torch.autograd.grad(score, maps, retain_graph=True)  # [B·nW, H, w², w²] per layer
    nw = [g.num_windows for g in analyses[0].geometry]
    for r, c in zip(analyses, cls, strict=True):
        mine = [
            g.reshape(-1, n, *g.shape[1:])[r.graph_image].detach().float().to(r.device)
            for g, n in zip(grads, nw, strict=True)
        ]
        r._cache.put(Key("grads", (c,)), mine)
    return cls


def analyze_windowed(
    vm: VizModel, x: torch.Tensor, notes: list[tuple[str, ...]] | None = None, top_k: int = 5, gradients: bool = False
) -> list[WindowAnalysis]:
    """One forward of ``x`` [B, C, H, W] with :class:`WindowCapture` and every per-image analysis."""
    from vizapp.models.swin import stage_strides
    from vizapp.pipeline import model_view
    from vizapp.statistics_pass import every_statistic, window_reducer

    b = x.shape[0]
    notes = [()] * b if notes is None else list(notes)
    x_dev = to_device(x, vm.device, vm.dtype)
    # the registered statistics, from each layer's attention as the forward goes (the reducer dataset mode uses)
    reducer, on_layer = window_reducer(vm, b)
    blocks = WindowBlockOutputs(vm.num_layers)  # each block's output for the feature views, within a byte budget
    lens = WindowLens(vm.model)  # the last stage's logit lens

    def on_block(layer: int, out: torch.Tensor) -> None:
        blocks(layer, out)
        reducer.block(layer, out, blocks.norms[layer])  # the token norms once, for the views and the statistics
        lens(layer, out, cap.geometry[layer].grid)  # cap: bound by the time the forward calls this

    with (
        torch.enable_grad() if gradients else torch.no_grad(),
        WindowCapture(vm.model, with_grad=gradients, on_layer=on_layer, on_block=on_block) as cap,
    ):
        logits = vm.logits(x_dev)
    geometry = tuple(cap.geometry)
    if any(g is None for g in geometry) or not reducer.complete():
        raise RuntimeError("some windowed layer never ran; its attention was not captured")
    blocks.check(geometry)
    outputs = blocks.outputs  # [B, N_l, C_l] each, on the model's device
    norms = [n.cpu().numpy() for n in blocks.norms]  # [B, N_l] each
    lens_probs = lens.probabilities()  # [B, L, K] or None
    maps = [cap.attention(i) for i in range(len(cap))]  # [B, nW, H, w², w²], on the model's device
    strides = stage_strides(vm, max(g.stage for g in geometry) + 1)
    layer_strides = tuple(strides[g.stage] for g in geometry)
    biases = tuple(read_relative_bias(s) for s in cap.sites)
    graph_maps = cap.graph_maps() if gradients else None
    fingerprint = vm.fingerprint()
    heads = [m.shape[2] for m in maps]
    values = {k: v.cpu().numpy() for k, v in every_statistic(reducer.values, heads, b).items()}
    host_logits = logits.detach().float().cpu()  # one copy for the batch
    out = []
    for i in range(b):
        wins = tuple(m[i] for m in maps)
        stats = {k: v[:, i] for k, v in values.items()}  # [L, max H] or [L]
        lg = host_logits[i]
        probs, top = None, []
        if vm.labels and lg.shape[-1] == len(vm.labels):
            probs = torch.softmax(lg, -1).numpy()
            order = np.argsort(-probs, kind="stable")[: max(0, int(top_k))]
            top = [(vm.labels[j], float(probs[j])) for j in order]
        out.append(
            WindowAnalysis(
                model_name=vm.name,
                load_args=vm.load_args,
                labels=vm.labels,
                probs=probs,
                top_k=top,
                grid_size=tuple(vm.grid_size),
                patch_size=tuple(vm.patch_size),
                image=model_view(x[i].cpu(), vm.mean, vm.std),
                input=x[i : i + 1].cpu(),
                geometry=geometry,
                windows=wins,
                strides=layer_strides,
                mean_distance=stats["distance"],
                statistics=stats,
                relative_bias=biases,
                block_outputs={j: o[i] for j, o in outputs.items()},
                block_norms=tuple(n[i] for n in norms),
                lens_probs=None if probs is None or lens_probs is None else lens_probs[i].numpy(),
                notes=tuple(notes[i]),
                model_ref=weakref.ref(vm),
                model_fingerprint=fingerprint,
                graph_maps=graph_maps,
                graph_logits=logits if gradients else None,
                graph_image=i,
            )
        )
    return out


def analyze_image(vm: VizModel, image: Any, top_k: int = 5, gradients: bool = False) -> WindowAnalysis:
    """One image (PIL, bytes, path or array, decoded safely) through :func:`analyze_windowed`."""
    pil, notes = to_pil(image)
    x = vm.transform(pil)
    return analyze_windowed(vm, x[None] if x.dim() == 3 else x, [notes], top_k, gradients)[0]
