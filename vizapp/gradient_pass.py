"""One image's attention gradients from a forward and a backward of its model: what a result's class-specific maps
run when it keeps no gradient-enabled forward (``analyze()`` without ``gradients=True``, as the app analyses, or a
result moved to another device).

On a GPU the two passes are a few hundred kernel launches, each with its Python, for about a millisecond of
arithmetic (ViT-B/16 on an H200: docs/gpu.md). They are therefore recorded as one CUDA graph (:mod:`vizapp.cudagraph`)
and replayed: the class explained is an input of the graph, a one-hot row over the logits, so one recording serves
every class of every image of that shape. The gradient of Σ_k onehot_k · logit_k is the gradient of the one logit
(the backward starts from the same one-hot row either way), so the graph gives what the eager passes give.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from vizapp import cudagraph, limits
from vizapp.capture import AttentionCapture
from vizapp.models import VizModel
from vizapp.transfer import to_device


def graph_memory(vm: VizModel, x: torch.Tensor) -> int:
    """A high estimate of what the recorded passes of one input ``x`` [1, C, H, W] keep in the graph's memory: an
    analysis with gradients (:func:`vizapp.batch.forward_groups`'s estimate), whose autograd graph is what they hold."""
    from vizapp.batch import _image_bytes  # vizapp.batch imports the pipeline, which imports this module

    return sum(_image_bytes(vm, x, gradients=True))


def graphable(vm: VizModel, x: torch.Tensor) -> bool:
    """The passes run as a replayed CUDA graph: on a GPU, graphs on, and the estimate within
    :data:`vizapp.limits.GRAPH_MEMORY_BYTES`."""
    return vm.device.type == "cuda" and cudagraph.enabled() and graph_memory(vm, x) <= limits.GRAPH_MEMORY_BYTES


def _passes(vm: VizModel, x: torch.Tensor, target: int | torch.Tensor) -> torch.Tensor:
    """∂score/∂A of every layer, [L, H, N, N] float32 on the model's device: score = logit[target] for a class index,
    Σ_k target_k · logit_k for a one-hot row [1, K] (the graph's input)."""
    with torch.enable_grad(), AttentionCapture(vm.model, with_grad=True) as cap:
        # the input in the graph: the attention must depend on something that needs a gradient even when no weight does
        logits = vm.logits(x.detach().requires_grad_(True))
        score = logits[0, target] if isinstance(target, int) else (logits.float() * target).sum()
        grads = cap.attention_grads(score)
    return torch.stack([g[0].detach().float() for g in grads])


def attention_gradients(
    vm: VizModel, x: torch.Tensor, cls: int, num_classes: int, meanwhile: Callable[[], None] | None = None
) -> torch.Tensor:
    """∂logit[cls]/∂A of every layer and head of input ``x`` [1, C, H, W], [L, H, N, N] float32 on ``vm.device``;
    ``num_classes``: the logits' length. A replay of the recorded passes where :func:`graphable` (recorded the first
    time an input shape, dtype and weights come), else the passes run eagerly. ``meanwhile`` (e.g. the check that
    the weights are the result's, :func:`vizapp.models.pinned_later`) is called once the passes are queued and before
    their gradients are handed out: on a GPU it runs while the device computes; if it raises, nothing is returned."""
    checked = []

    def check() -> None:
        checked.append(True)
        if meanwhile is not None:
            meanwhile()

    try:
        x = to_device(x, vm.device, vm.dtype)
        if graphable(vm, x):
            onehot = to_device(F.one_hot(torch.tensor([int(cls)]), int(num_classes)), vm.device, torch.float32)
            key = cudagraph.graph_key(vm.model, vm.weights_key(), x, "attention gradients", int(num_classes))
            graphed = vm.graphs.get(key, lambda inputs: _passes(vm, *inputs), (x, onehot))
            if graphed is not None:
                with graphed.run((x, onehot), meanwhile=check) as (out, _):
                    return out.clone()  # out of the graph's memory, which the next replay rewrites
        grads = _passes(vm, x, int(cls))
    except Exception:
        if not checked:  # a model that is no longer the result's (converted, moved) says so, not how its pass failed
            check()
        raise
    check()
    return grads
