"""The maps of a batch straight from one forward's attention, with no :class:`~vizapp.Analysis` of any image:
attention rollout, the last layer's CLS attention, gradient rollout and relevance.

A forward that forms every layer's attention in the autograd graph (:class:`~vizapp.capture.AttentionCapture` with
``with_grad``, as the gradient-enabled analysis runs) holds what the four need: the attention of every layer and head
of every image, and, after one backward of Σ_b logit_b[c_b], each image's gradient for its own class (the images of a
ViT batch never mix). Their maps are then formed for the whole batch at once, a layer's fusion and a layer's row
product for every image in one operation each (on a GPU one kernel launch, not one per image), and they stay on the
model's device until the caller copies all of them to the host together. Each equals that image's
:meth:`Analysis.rollout`, :meth:`Analysis.last_layer_attention`, :meth:`Analysis.grad_rollout` and
:meth:`Analysis.relevance` to float rounding; a batch of one image takes the one-image operations.

Used by :func:`vizapp.explain` and by the evaluation (:mod:`vizapp.evaluate.scores`) when a gradient method is asked
(the forward keeps every layer's attention for it anyway); rollout alone keeps taking the analysis's streaming pass,
which keeps q and k, not every layer's attention, and so does one image on a GPU (:func:`replayed`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vizapp import checks, gradient_pass, limits
from vizapp.analysis.relevance import grad_weighted_heads, grad_weighted_heads_into, relevance_row
from vizapp.analysis.rollout import fuse_heads, rollout_row
from vizapp.attention import attention_from_qk
from vizapp.capture import AttentionCapture
from vizapp.errors import BadParameterError, UnsupportedModelError, unexact_layer
from vizapp.models import VizModel
from vizapp.models.base import readout_weights
from vizapp.models.prompts import probabilities
from vizapp.pipeline import to_host as pipeline_to_host
from vizapp.result import class_index
from vizapp.transfer import tensor_on, to_device

#: the class maps formed from the graph's gradients
GRADIENT_METHODS = ("grad_rollout", "relevance")
#: every method this module forms
DIRECT_METHODS = ("rollout", "attention", *GRADIENT_METHODS)


@dataclass(frozen=True)
class Options:
    """One method's checked controls (:func:`options`)."""

    start_layer: int = 0
    start_row: str = "output"
    discard_ratio: float = 0.0
    head_fusion: str = "mean"


def options(vm: VizModel, name: str, **controls: Any) -> Options:
    """``name``'s controls checked before any forward, with the messages, and in the order, of the
    :class:`Analysis` method it stands for (BadParameterError)."""
    if name == "attention":
        return Options()  # it takes none
    if name == "relevance":
        first = checks.layer_index(controls.get("start_layer", 0), vm.num_layers)
        return Options(first, checks.start_row(controls.get("start_row", "output"), vm.has_class_token))
    if name == "grad_rollout":
        row = checks.start_row(controls.get("start_row", "output"), vm.has_class_token)
        first = checks.layer_index(controls.get("start_layer", 0), vm.num_layers)
        return Options(first, row, checks.discard_ratio(controls.get("discard_ratio", 0.0)))
    if name == "rollout":
        ratio = checks.discard_ratio(controls.get("discard_ratio", 0.0))
        first = checks.layer_index(controls.get("start_layer", 0), vm.num_layers)
        fusion = checks.head_fusion(controls.get("head_fusion", "mean"))
        return Options(first, checks.start_row(controls.get("start_row", "output"), vm.has_class_token), ratio, fusion)
    raise BadParameterError(f"{name!r} is not formed from the attention graph; these are: {list(DIRECT_METHODS)}")


def takes(vm: VizModel, names: Sequence[str]) -> bool:
    """These methods' maps come from one :class:`AttentionGraph`: a ViT (not a windowed model), every name one of
    :data:`DIRECT_METHODS` with at least one gradient method among them, and the last layer's CLS attention only
    from a model with a class token (else the analysis's message says why it has none)."""
    names = set(names)
    return (
        not vm.windowed
        and bool(names)
        and names <= set(DIRECT_METHODS)
        and bool(names & set(GRADIENT_METHODS))
        and ("attention" not in names or vm.has_class_token)
    )


def replayed(vm: VizModel, x: torch.Tensor) -> bool:
    """Whether one image's gradient-enabled analysis replays recorded CUDA graphs (:func:`vizapp.gradient_pass.graphable`:
    a batch of one on a GPU, graphs on): its analysis pass and its gradient passes, a few launches in all, where this
    module's forward and backward run eagerly, several hundred launches. Such an input takes the analysis route."""
    return x.shape[0] == 1 and gradient_pass.graphable(vm, x[:1])


def _fuse_into(out: torch.Tensor, a: torch.Tensor, grad: torch.Tensor) -> None:
    """Ā = mean_h max(grad ⊙ a, 0) of a layer's attention ``a`` and its gradient ``grad`` [B, H, N, N] into ``out``
    [B, N, N] float64; on the CPU in float32 the product is formed in ``grad``'s memory (which nobody reads again)."""
    if a.dtype == grad.dtype == torch.float32 and a.device.type == "cpu":
        grad_weighted_heads_into(out, a, grad)
    else:
        out.copy_(grad_weighted_heads(a, grad))


class _Recomputed(torch.autograd.Function):
    """A layer's output softmax(q kᵀ·scale + bias)·v, in the operations of the attention formed in the graph (so its
    value, and every gradient, is theirs), without keeping the attention: its backward forms it again from the saved
    q, k and v, takes their gradients through it, and writes the layer's Ā = mean_h max(∂score/∂A ⊙ A, 0) into
    ``out`` [B, N, N] float64. The graph thus holds q, k and v a layer, not the attention (H·N² floats a layer and
    image; on the CPU the peak of a batch's maps falls to 0.62 to 0.86 of the kept route's, benchmarks.graph_memory,
    at about its time)."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Any, scale: float, out: Any) -> Any:
        ctx.save_for_backward(q, k, v, bias)
        ctx.scale, ctx.out = scale, out  # (box, layer): box[0] is the [L, B, N, N] buffer
        return (attention_from_qk(q, k, scale, bias) @ v.float()).to(v.dtype)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple:
        q, k, v, bias = ctx.saved_tensors
        with torch.enable_grad():
            qkv = [t.detach().requires_grad_(True) for t in (q, k, v)]
            a = attention_from_qk(qkv[0], qkv[1], ctx.scale, None if bias is None else bias.detach())
            output = (a @ qkv[2].float()).to(v.dtype)
            *grads, grad_a = torch.autograd.grad(output, (*qkv, a), grad_out)
        a = a.detach()
        box, layer = ctx.out
        _fuse_into(box[0][layer], a, grad_a)
        needs = ctx.needs_input_grad
        return tuple(g if needs[i] else None for i, g in enumerate(grads)) + (None, None, None)


def recomputes(vm: VizModel, x: torch.Tensor) -> bool:
    """Whether an :class:`AttentionGraph` of inputs ``x`` [B, C, H, W] forms each layer's attention again in the
    backward (:class:`_Recomputed`) rather than keeping it in the graph. On a GPU always: it takes the attention's
    writes and reads out of the forward and frees its memory for larger batches. On the CPU only where keeping it
    would take the forward beyond :func:`vizapp.limits.batch_forward_bytes` (by
    :func:`~vizapp.limits.attention_graph_bytes` with ``kept``): there the kept route is the faster one where it
    fits, by one QKᵀ product and one softmax a layer (``vizapp.explain`` of 16 images, 2 threads, the two routes
    paired in one process: formed again 1.03 to 1.09 of the kept route's time for ViT-S/16, 1.00 for ViT-B/16).
    The maps are the same either way (to 1e-12, tests)."""
    if vm.device.type != "cpu":
        return True
    each = limits.attention_graph_bytes(vm.num_layers, vm.tokens_for(x.shape[-2], x.shape[-1]), vm.num_heads, kept=True)
    return x.shape[0] * each > limits.batch_forward_bytes(vm.device)


class AttentionGraph:
    """One forward of inputs ``x`` [B, C, H, W] whose every layer's attention takes part in the autograd graph (its
    check that every layer's attention is vizapp's exact one raises UnsupportedModelError), and the maps it gives.
    ``recompute`` (default: :func:`recomputes`): the attention is formed again in the backward rather than kept
    (:class:`_Recomputed`), and the plain maps form it again from the kept q and k; False keeps it in the graph
    instead."""

    def __init__(self, vm: VizModel, x: torch.Tensor, recompute: bool | None = None) -> None:
        self.vm = vm
        self.size, self.p = x.shape[0], vm.num_prefix_tokens
        self.grid = vm.grid_for(x.shape[-2], x.shape[-1])
        n = self.p + self.grid[0] * self.grid[1]
        self.n = n
        # [L, B, N, N] float64, each layer's Ā from the last backward, in a box the backward finds it in: not this
        # object, which the graph would then hold in a reference cycle through autograd's nodes that Python's garbage
        # collector cannot see (a leak of the graph)
        self._box: list[torch.Tensor | None] = [None]
        cap = AttentionCapture(vm.model, with_grad=True)
        if recompute is None:
            recompute = recomputes(vm, x)
        if recompute:
            cap.recompute = self._layer
        with torch.enable_grad(), cap:  # (the input needs a gradient: the graph is made when no weight needs one too)
            self.logits = vm.logits(to_device(x, vm.device, vm.dtype).detach().requires_grad_(True))
        for layer, q in enumerate(cap.q):
            if layer in cap.unexact_layers:
                raise unexact_layer(layer, cap.unexact_layers[layer])
            if q is None or cap.maps[layer] is None:
                raise UnsupportedModelError(
                    f"layer {layer} formed its attention without scaled_dot_product_attention, so vizapp cannot take "
                    "its gradient (is fused attention off?)"
                )
        if cap.q[0].shape[-2] != n:
            raise RuntimeError(
                f"{cap.q[0].shape[-2]} tokens do not match {self.p} prefix tokens + a {self.grid[0]}x{self.grid[1]} "
                "grid"
            )
        #: recompute=False: each layer's attention [B, H, N, N] in the graph
        self.formed: list[torch.Tensor] | None = None if recompute else list(cap.maps)
        # what the backward is asked the gradients of: the first layer's q, k and v, so that every layer's backward
        # runs (each layer's output is on the way from them to the logits) and no other gradient is kept
        self.inputs = list(cap.maps) if self.formed is not None else list(cap.maps[0])
        self.layers = [(cap.q[i], cap.k[i], cap.scales[i], cap.bias[i]) for i in range(len(cap.q))]

    def _layer(
        self, cap: AttentionCapture, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
        bias: torch.Tensor | None,
    ) -> torch.Tensor:  # fmt: skip
        """``AttentionCapture.recompute``: the layer's output through :class:`_Recomputed`, its Ā into this graph's
        buffer."""
        cap.maps[layer] = (q, k, v)
        return _Recomputed.apply(q, k, v, bias, scale, (self._box, layer))

    def _attention(self, layer: int) -> torch.Tensor:
        """Layer ``layer``'s attention [B, H, N, N] float32, formed again from its kept q and k."""
        if self.formed is not None:
            return self.formed[layer].detach().float()
        q, k, scale, bias = self.layers[layer]
        with torch.no_grad():
            return attention_from_qk(q.detach(), k.detach(), scale, None if bias is None else bias.detach())

    def classes(self, wanted: Sequence[int | None]) -> list[int]:
        """One class per image, None -> its top-1 (one copy of the logits to the host, only when one is asked)."""
        if all(c is not None for c in wanted):
            return [int(c) for c in wanted]  # type: ignore[arg-type]
        host = self.logits.detach().float().cpu()  # [B, K]
        vm = self.vm
        head = bool(vm.labels) and host.shape[-1] == len(vm.labels)
        return [
            class_index(probabilities(host[i], vm.activation).numpy() if head else None, vm.labels, c)
            for i, c in enumerate(wanted)
        ]

    def _weights(self, opt: Options) -> torch.Tensor:
        return readout_weights("cls" if opt.start_row == "cls" else self.vm.readout, self.n, self.p)

    def _rows(self, fused: torch.Tensor, name: str, opt: Options) -> torch.Tensor:
        """The map rows [b, N] of fusions ``fused`` [L, b, N, N] (gradient-weighted for the class maps)."""
        weights, b = self._weights(opt), fused.shape[1]
        stack = fused[:, 0] if b == 1 else fused  # one image: the one-image operations, as its Analysis takes them
        if name == "relevance":  # relevance_row takes a batch image first
            rows = relevance_row(stack if b == 1 else stack.transpose(0, 1), weights, opt.start_layer)
        else:
            rows = rollout_row(stack, len(stack), weights, self.p, opt.discard_ratio, opt.start_layer)
        return rows.reshape(b, -1)

    def plain_maps(self, asked: Mapping[str, Options]) -> dict[str, torch.Tensor]:
        """Attention rollout and the last layer's CLS attention (those of ``asked``), [B, P] float32 on the model's
        device each."""
        out = {}
        for name, opt in asked.items():
            if name == "attention":  # the CLS query's weights to the patches, averaged over the heads
                out[name] = self._attention(len(self.layers) - 1)[:, :, 0, self.p :].mean(dim=1)
            elif name == "rollout":
                fused = torch.stack(
                    [fuse_heads(self._attention(layer), opt.head_fusion) for layer in range(len(self.layers))]
                )  # [L, B, N, N]
                out[name] = self._rows(fused, name, opt)[:, self.p :].float()
        return out

    def fused_heads(
        self, classes: Sequence[int], members: Sequence[int] | None = None, retain: bool = False
    ) -> torch.Tensor:
        """Ā = mean_h max(∂logit[c_j]/∂A ⊙ A, 0) of every layer for images ``members`` (all by default), each for its
        class ``classes[j]``, [L, b, N, N] float64 on the model's device, from ONE backward of Σ_j logit[c_j];
        ``retain`` keeps the graph for a further call (e.g. another class for some images)."""
        rows = list(range(self.size)) if members is None else list(members)
        if len(classes) != len(rows):
            raise ValueError(f"{len(classes)} classes for {len(rows)} images")
        dev = self.logits.device
        picked = tensor_on(rows, dev)
        score = self.logits[picked, tensor_on(list(classes), dev)].sum()
        fused = self._box[0]
        if fused is None:
            fused = self._box[0] = torch.zeros(
                (len(self.layers), self.size, self.n, self.n), dtype=torch.float64, device=dev
            )
        else:
            fused.zero_()  # (a layer whose attention the score does not reach has no backward: its Ā is 0)
        # each layer's backward writes its Ā [B, N, N] (the images' other than `rows` are 0: their scores are not in it)
        grads = list(torch.autograd.grad(score, self.inputs, retain_graph=retain, allow_unused=True))
        for layer, a in enumerate(self.formed or []):  # the attention kept in the graph: ∂score/∂A of every layer
            grad, grads[layer] = grads[layer], None  # each layer's gradient goes once it is fused
            _fuse_into(fused[layer], a.detach(), grad)
        return fused if len(rows) == self.size else fused[:, picked]

    def class_maps(
        self,
        asked: Mapping[str, Options],
        classes: Sequence[int],
        members: Sequence[int] | None = None,
        retain: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Gradient rollout and relevance (those of ``asked``) of images ``members`` (all by default), each for its
        class ``classes[j]``, [b, P] float32 on the model's device each, from ONE backward of Σ_j logit[c_j] to the
        attention maps (:meth:`fused_heads`)."""
        fused = self.fused_heads(classes, members, retain)
        return {
            name: self._rows(fused, name, opt)[:, self.p :].float()
            for name, opt in asked.items()
            if name in GRADIENT_METHODS
        }


def one_image_heads(vm: VizModel, x: torch.Tensor, cls: int, check: Callable[[], None]) -> torch.Tensor:
    """Ā of every layer of one input ``x`` [1, C, H, W] for class ``cls``, [L, N, N] float64 on the model's device,
    from one forward and backward of an :class:`AttentionGraph` (which keeps no attention on a GPU, or where keeping
    it would pass the forward budget: :func:`recomputes`); ``check`` (that the weights are still the analysis's) is
    called before it is returned. What :meth:`Analysis.grad_weighted_heads` takes where no per-head gradient is at
    hand and no recorded CUDA graph replays the passes: the passes formed with the attention kept held 3.4 GB for
    ViT-L/16 at 384 px, and the per-head gradients and attention 0.5 GB each besides."""
    try:
        fused = AttentionGraph(vm, x).fused_heads([cls])[:, 0]
    except Exception:
        check()  # a model that is no longer the analysis's (converted, moved) says so, not how its pass failed
        raise
    check()
    return fused


def to_host(found: Mapping[Any, torch.Tensor], grid: tuple[int, int]) -> dict[Any, np.ndarray]:
    """Maps [b, P] of one graph (b may differ between them) to the host in one copy
    (:func:`vizapp.pipeline.to_host`), each [b, gh, gw] float32."""
    keys = list(found)
    return {
        key: t.numpy().reshape(t.shape[0], *grid)
        for key, t in zip(keys, pipeline_to_host([found[key] for key in keys]), strict=True)
    }
