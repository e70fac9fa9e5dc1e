"""Many images through the model together: :func:`analyze_batch` (``vizapp.analyze`` of a list) and :func:`explain`
(the maps of registered methods for a batch of images, the class-specific ones from one forward and one backward).

The images of a ViT batch never mix: every layer works on each image's tokens alone. So a batch's forward gives each
image what its own forward would (to float rounding), and the gradient of Σ_b logit_b[c_b] with respect to image b's
attention is ∂logit_b[c_b]/∂A_b, image b's own. Batches are cut to :func:`vizapp.limits.batch_forward_bytes` per
forward (2 GiB on the CPU, up to 8 GiB on a GPU) before anything runs, and one call's analyses to
:data:`vizapp.limits.BATCH_RECORD_BYTES`.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from vizapp import graph_maps, limits
from vizapp import methods as registry
from vizapp.errors import BadImageError, BadParameterError
from vizapp.models import VizModel
from vizapp.pipeline import Analysis, analyze_inputs, class_gradients, prompted, to_pil
from vizapp.swin_result import class_gradients as windowed_gradients
from vizapp.transfer import to_device

__all__ = ["analyze_batch", "explain", "forward_groups"]


_PREPROCESS_THREADS = min(8, os.cpu_count() or 1)


@functools.cache
def _pool() -> ThreadPoolExecutor:
    """The threads that decode and preprocess the images of a list, made once per process (again in a forked child,
    where the parent's threads do not exist)."""
    return ThreadPoolExecutor(_PREPROCESS_THREADS, thread_name_prefix="vizapp-preprocess")


os.register_at_fork(after_in_child=_pool.cache_clear)


def _inputs(vm: VizModel, images: Any) -> list[tuple[torch.Tensor, tuple[str, ...]]]:
    """Every image decoded and preprocessed by the model's own transform, [1, C, H, W] each with its notes, before
    anything runs; BadImageError naming the first image that cannot be used.

    The images of a list are decoded and preprocessed on several threads at once (Pillow releases the GIL while it
    decodes and resizes; the decoder sets no global state, :mod:`vizapp.imageio`): on a GPU, preprocessing 16 photos
    one by one took longer than analysing them. Each image's input is the one it gets alone."""
    if not isinstance(images, (list, tuple)):
        raise BadParameterError(f"images must be a list or tuple of images, got {type(images).__name__}")
    if not images:
        raise BadParameterError("no images were given; pass a list of at least one image")

    def one(i: int) -> tuple[torch.Tensor, tuple[str, ...]]:
        try:
            pil, notes = to_pil(images[i])
        except BadImageError as exc:
            raise BadImageError(f"image {i}: {exc}") from exc
        x = vm.transform(pil)
        return (x[None] if x.dim() == 3 else x, tuple(notes))

    if len(images) == 1 or _PREPROCESS_THREADS == 1:
        return [one(i) for i in range(len(images))]
    return list(_pool().map(one, range(len(images))))  # results, and the first failure, in the images' order


def _image_bytes(vm: VizModel, x: torch.Tensor, gradients: bool, graph: bool = False) -> tuple[int, int]:
    """(what one input [1, C, H, W]'s analysis keeps, what its forward needs besides) in bytes:
    :func:`vizapp.limits.analysis_bytes`, or for a windowed model (Swin, at its configured size) the terms of
    :func:`vizapp.models.swin.analysis_memory`: its window record kept (twice with gradients: the graph's copy) with
    its block outputs, its working set and its activations (with gradients, every layer's: the graph holds them for
    the backward). ``graph``: the maps of a :class:`vizapp.graph_maps.AttentionGraph` instead of an analysis
    (a ViT's: :func:`vizapp.limits.attention_graph_bytes`, all of it working memory)."""
    if vm.windowed:
        from vizapp.models.swin import analysis_memory

        t = analysis_memory(vm)
        kept = t["record"] * (2 if gradients else 1) + t["block_outputs"]
        return kept, t["working"] + t["activations"] * (vm.num_layers if gradients else 1)
    n = vm.tokens_for(x.shape[-2], x.shape[-1])
    if graph:
        return 0, limits.attention_graph_bytes(vm.num_layers, n, vm.num_heads)
    return limits.analysis_bytes(vm.num_layers, n, vm.num_heads, gradients, vm.device)


def forward_groups(
    vm: VizModel, inputs: Sequence[torch.Tensor], gradients: bool = False, graph: bool = False
) -> list[list[int]]:
    """The images (indices into ``inputs``, each [1, C, H, W]) that go through each forward: those of one input size
    together (a model whose transform keeps the aspect ratio gives several), at most as many as fit
    :func:`vizapp.limits.batch_forward_bytes` on the model's device by :func:`vizapp.limits.analysis_bytes`
    (``graph``: by :func:`vizapp.limits.attention_graph_bytes`, for the maps of a
    :class:`vizapp.graph_maps.AttentionGraph`), and at least one; as few forwards as that allows, of even sizes (a
    small last forward runs the model below its batched rate)."""
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, x in enumerate(inputs):
        by_shape.setdefault(tuple(x.shape), []).append(i)
    groups = []
    for members in by_shape.values():
        per_image = sum(_image_bytes(vm, inputs[members[0]], gradients, graph))
        size = max(1, limits.batch_forward_bytes(torch.device(vm.device)) // per_image)
        size = -(-len(members) // -(-len(members) // size))  # as few forwards, as even as they go (16 by 12: 8 and 8)
        groups += [members[j : j + size] for j in range(0, len(members), size)]
    return groups


def analyze_batch(
    vm: VizModel,
    images: Sequence[Any],
    *,
    top_k: int = 5,
    progress: Callable[[float, str], None] | None = None,
    inline: bool = True,
    gradients: bool = False,
    prompts: Any = None,
) -> list[Analysis]:
    """The :class:`Analysis` of each image, in order, from batched forwards (see :func:`forward_groups`): each equal to
    ``vizapp.analyze(vm, image)`` of that image alone. Arguments as in :func:`vizapp.analyze` (``prompts``: the
    classes of a CLIP-like model, every one listed in ``top_k``); with ``gradients``,
    a further class of one analysis costs a backward of its whole forward's batch (:func:`explain` takes one class
    per image from a single backward).

    Raises:
        BadImageError: an image cannot be used; the message starts with its index ("image 2: ..."). Nothing ran.
        BadParameterError: the analyses together would keep more than :data:`vizapp.limits.BATCH_RECORD_BYTES`
            (q and k of every layer...); nothing ran.
    """
    if prompts is not None:
        vm, top_k = prompted(vm, prompts)
    inputs = _inputs(vm, images)
    kept = [_image_bytes(vm, x, gradients)[0] for x, _ in inputs]
    if sum(kept) > limits.BATCH_RECORD_BYTES:
        each = max(kept)
        raise BadParameterError(
            f"{len(inputs)} analyses of {vm.name} would keep about {sum(kept) / 2**30:.1f} GB (q and k of every "
            f"layer{', the autograd graph' if gradients else ''}: up to {each / 2**20:.0f} MB an image), over the "
            f"{limits.BATCH_RECORD_BYTES / 2**30:.1f} GB limit; analyse at most {max(1, limits.BATCH_RECORD_BYTES // each)} "
            "images at once, or ask vizapp.explain for their maps only"
        )
    groups = forward_groups(vm, [x for x, _ in inputs], gradients)
    results: list[Analysis | None] = [None] * len(inputs)
    for g, members in enumerate(groups):
        if progress:
            progress(g / len(groups), f"forward {g + 1} of {len(groups)}")
        x = torch.cat([inputs[i][0] for i in members])
        found = analyze_inputs(vm, x, [inputs[i][1] for i in members], top_k=top_k, inline=inline, gradients=gradients)
        for i, r in zip(members, found, strict=True):
            results[i] = r
    if progress:
        progress(1.0, "done")
    return results


def _classes(vm: VizModel, classes: Any, count: int) -> list[int | None]:
    """One class per image (an index into ``vm.labels``, or None for the image's top-1), checked before any forward."""
    if not vm.labels:
        raise BadParameterError(f"{vm.name} has no classifier head, so there is no class to explain")
    if classes is None or isinstance(classes, (str, int, np.integer)):
        classes = [classes] * count
    if not isinstance(classes, (list, tuple, np.ndarray)):
        raise BadParameterError(f"classes must be None, a class or one class per image, got {type(classes).__name__}")
    if len(classes) != count:
        raise BadParameterError(f"{len(classes)} classes given for {count} images; give one per image, or one for all")
    out: list[int | None] = []
    for i, c in enumerate(classes):
        if c is None:
            out.append(None)
        elif isinstance(c, str):
            if c not in vm.labels:
                raise BadParameterError(f"class of image {i}: unknown label {c[:60]!r}")
            out.append(vm.labels.index(c))
        elif isinstance(c, (int, np.integer)) and not isinstance(c, bool) and 0 <= c < len(vm.labels):
            out.append(int(c))
        else:
            raise BadParameterError(
                f"class of image {i} must be a label or an index in 0..{len(vm.labels) - 1}, got {c!r}"[:200]
            )
    return out


def _method_controls(asked: Sequence[registry.Method], controls: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each asked method's share of ``controls``: the options it takes; BadParameterError for a control none takes."""
    unused = set(controls) - {o for m in asked for o in m.options}
    if unused:
        takes = {m.name: list(m.options) for m in asked}
        raise BadParameterError(f"no method asked takes {sorted(unused)}; their options: {takes}"[:300])
    return {m.name: {k: v for k, v in controls.items() if k in m.options} for m in asked}


def explain(
    vm: VizModel,
    images: Sequence[Any],
    methods: str | Sequence[str],
    classes: Any = None,
    prompts: Any = None,
    **controls: Any,
) -> np.ndarray | dict[str, np.ndarray]:
    """The maps of registered methods (:data:`vizapp.registry.METHODS`) for a batch of images.

    Each map equals ``vizapp.analyze(vm, image).explain(name, class)`` of that image alone. The images go through the
    model in batched forwards (:func:`forward_groups`; one for a batch that fits the budget); when a class-specific
    method is asked (gradient rollout, relevance), that forward keeps its attention in the autograd graph and ONE
    backward of Σ_b logit_b[c_b] gives every image its own class's gradient, however many methods are asked. When
    the methods on that forward are gradient rollout or relevance, with attention rollout and the last layer's CLS
    attention beside them if asked (a ViT, not a windowed model), no analysis of any image is formed: their maps come
    straight from that graph, the whole batch at once, and to the host in one copy (:mod:`vizapp.graph_maps`). A method
    that runs the model itself (``Method.batch``: AttnLRP, LeGrad) takes each group in its own single forward and
    backward, without the analysis forward when no other method is asked.

    Args:
        vm: a model from :func:`vizapp.load_model`.
        images: a list or tuple of images (PIL, bytes, paths or arrays, decoded safely).
        methods: one method name, or a sequence of them.
        classes: for the class-specific methods: None (each image's top-1 class), one class for every image (an index
            or a label), or a sequence with one class per image.
        prompts: for a CLIP-like model, text prompts that are its classes (a class is then a prompt or its index).
        **controls: options passed to the methods that take them (``head_fusion``, ``discard_ratio``,
            ``start_layer``, ``start_row``; see :attr:`vizapp.registry.Method.options`).

    Returns:
        for one name, the maps [B, gh, gw] float32; for a sequence of names, a dict name -> [B, gh, gw].

    Raises:
        BadImageError: an image cannot be used ("image 2: ..."); BadParameterError: an unknown method, class or
            control (a bad value of gradient rollout's or relevance's controls too, when they are the only methods
            on the analysis forward). All before any forward.
        UnsupportedModelError: a layer's attention cannot be taken in the graph (it never calls SDPA, or runs
            dropout).
    """
    names = [methods] if isinstance(methods, str) else list(dict.fromkeys(methods))
    if not names:
        raise BadParameterError(f"give at least one method of {list(registry.METHODS)}")
    asked = [registry.get(name) for name in names]
    per_method = _method_controls(asked, controls)
    if prompts is not None:
        vm = prompted(vm, prompts)[0]
    inputs = _inputs(vm, images)
    # methods that run the model themselves (Method.batch: their own forward and backward) take the whole group
    own_run = [m for m in asked if m.batch is not None]
    on_analysis = [m for m in asked if m.batch is None]
    gradients = any(m.needs_class for m in on_analysis)
    wanted = _classes(vm, classes, len(inputs)) if any(m.needs_class for m in asked) else [None] * len(inputs)
    # the gradient maps (with rollout and the CLS attention beside them) need no analysis: straight from the graph
    direct = graph_maps.takes(vm, [m.name for m in on_analysis])
    checked = {}
    if direct:
        checked = {m.name: graph_maps.options(vm, m.name, **per_method[m.name]) for m in on_analysis}
    maps: dict[str, list[np.ndarray | None]] = {name: [None] * len(inputs) for name in names}
    groups = forward_groups(vm, [x for x, _ in inputs], gradients or bool(own_run), graph=direct and not own_run)
    for members in groups:
        x = torch.cat([inputs[i][0] for i in members])
        for m in own_run:  # None -> each image's top-1 class, from the method's own forward
            found_maps = m.batch(
                vm, to_device(x, vm.device, vm.dtype), [wanted[i] for i in members], **per_method[m.name]
            )
            for j, i in enumerate(members):
                maps[m.name][i] = found_maps[j]
        if not on_analysis:
            continue
        if direct and not graph_maps.replayed(vm, x):  # one forward and one backward, every image's maps at once
            graph = graph_maps.AttentionGraph(vm, x)
            found = graph.plain_maps(checked) | graph.class_maps(checked, graph.classes([wanted[i] for i in members]))
            for name, group_maps in graph_maps.to_host(found, graph.grid).items():
                for j, i in enumerate(members):
                    maps[name][i] = group_maps[j]
            continue
        found = analyze_inputs(vm, x, [inputs[i][1] for i in members], gradients=gradients)
        cls = [wanted[i] for i in members]
        if gradients:  # the one backward of this forward; None -> each image's top-1
            cls = (windowed_gradients if vm.windowed else class_gradients)(found, cls)
        for j, i in enumerate(members):
            for m in on_analysis:
                maps[m.name][i] = registry.explain(found[j], m.name, cls[j], **per_method[m.name])
        del found  # this forward's graph and analyses go before the next forward
    stacked = {name: np.stack(found_maps).astype(np.float32, copy=False) for name, found_maps in maps.items()}
    return stacked[names[0]] if isinstance(methods, str) else stacked
