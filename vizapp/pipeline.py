"""``analyze``: one forward pass with capture (for one image or a batch), then every analysis the views need, layer
by layer, into one :class:`~vizapp.result.Analysis` per image.

The result holds q and k of every layer (so any query's per-head map, and rollout with other settings, is recomputed
without another forward pass) but never all layers' full attention at once.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from vizapp import cudagraph, fused_attention, gradient_pass, limits
from vizapp.capture import AttentionCapture
from vizapp.errors import BadParameterError
from vizapp.models import VizModel
from vizapp.models.base import readout_weights
from vizapp.models.prompts import probabilities
from vizapp.result import (  # noqa: F401  (the result's names, where callers have always found them)
    START_ROWS,
    Analysis,
    GradientGraph,
    Query,
    model_view,
    to_pil,
)
from vizapp.resultcache import Key
from vizapp.streaming import BlockFeatures, LayerStatistics
from vizapp.transfer import tensor_on, to_device


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
    def of(cls, vm: VizModel, grid: tuple[int, int], inline: bool, gradients: bool, batch: int = 1) -> _PassSetup:
        """The setup for ``grid``; its two tensors are made once per model, grid and device (they are only read).

        The mean fusions are stored within :func:`~vizapp.limits.rollout_store_bytes` of the device, but for one rule
        on a GPU: a replayed graph is worth more than the rollout's products, so they are not stored (the rollout is
        multiplied up during the forward instead) where storing them alone would keep the plain pass of ``batch``
        images out of its graph (:data:`~vizapp.limits.GRAPH_MEMORY_BYTES`)."""
        p = vm.num_prefix_tokens
        n = p + grid[0] * grid[1]
        key = ("rollout row weights", tuple(grid), str(vm.device))
        weights = vm._digest.get(key)
        if weights is None:
            weights = vm._digest[key] = to_device(readout_weights(vm.readout, n, p), vm.device)  # once per grid
        layer_bytes = vm.num_layers * n * n * 4
        setup = cls(
            grid=tuple(grid),
            n=n,
            keep_fused=layer_bytes <= limits.FUSED_CACHE_LIMIT_BYTES,
            store_mean=layer_bytes <= limits.rollout_store_bytes(vm.device),
            dist=vm.patch_distances(grid),
            weights=weights,
            inline=inline,
            gradients=gradients,
        )
        plain = replace(setup, gradients=False)
        if (
            setup.store_mean
            and not _graphable(vm, plain, batch)
            and _graphable(vm, replace(plain, store_mean=False), batch)
        ):
            return replace(setup, store_mean=False)
        return setup

    def graph_bytes(self, vm: VizModel, batch: int = 1) -> int:
        """A high estimate of the memory a recorded graph of ``batch`` images keeps: q and k of every layer, the kept
        fusions and block outputs and the forward's own activations of each image, and one chunk of attention and its
        scores."""
        width = vm.num_heads * 64  # most ViTs' heads are 64 wide
        kept = vm.num_layers * self.n * self.n * 4 * self.store_mean  # the mean fusions (kept ones included)
        per_image = 2 * vm.num_layers * self.n * width * 4 + kept + 12 * self.n * width * 4
        return batch * per_image + 2 * limits.ATTENTION_CHUNK_BYTES


def _graphable(vm: VizModel, setup: _PassSetup, batch: int = 1) -> bool:
    """The plain analysis forward of ``batch`` images on a GPU runs as a replayed CUDA graph (see
    :mod:`vizapp.cudagraph`) while its memory fits :data:`~vizapp.limits.GRAPH_MEMORY_BYTES`; the q/k replay path
    (``inline=False``) and gradient-enabled passes stay eager, the first as the second code path that checks the
    graph."""
    return (
        vm.device.type == "cuda"
        and setup.inline
        and not setup.gradients
        and cudagraph.enabled()
        and setup.graph_bytes(vm, batch) <= limits.GRAPH_MEMORY_BYTES
    )


@dataclass
class _PassResult:
    """What one analysis forward leaves on the model's device (in a CUDA graph's memory when replayed); :func:`settle`
    brings the small part to the host."""

    logits: torch.Tensor  # [K] detached
    rollout: torch.Tensor  # [P] the default rollout of the patches
    statistics: dict[str, torch.Tensor]  # every registered statistic: name -> [L, H] or [L]
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

    def small(self) -> list[torch.Tensor]:
        """What the views draw as it is, a few kB an image: the logits, the default rollout, the token norms, every
        statistic and the lens, in the order :meth:`with_small` reads them back."""
        parts: list[torch.Tensor] = [self.logits, self.rollout, self.norms, *self.statistics.values()]
        return parts + ([] if self.lens is None else [self.lens])

    def with_small(self, host: list[torch.Tensor]) -> _PassResult:
        """This result with :meth:`small`'s tensors replaced by ``host`` (their copies on the host)."""
        it = iter(host)
        logits, rollout, norms = next(it), next(it), next(it)
        statistics = {name: next(it) for name in self.statistics}
        lens = None if self.lens is None else next(it)
        return replace(self, logits=logits, rollout=rollout, norms=norms, statistics=statistics, lens=lens)

    def large(self) -> list[torch.Tensor]:
        """What stays on the model's device (q, k, the kept biases, block outputs and fusions), in the order
        :meth:`with_large` reads them back."""
        biases = [t for t in self.biases if t is not None]
        outputs = [self.outputs[i] for i in sorted(self.outputs)]
        return [*self.q, *self.k, *biases, *outputs] + ([] if self.fused_mean is None else [self.fused_mean])

    def with_large(self, tensors: list[torch.Tensor]) -> _PassResult:
        """This result with :meth:`large`'s tensors replaced by ``tensors``."""
        it = iter(tensors)
        q, k = tuple(next(it) for _ in self.q), tuple(next(it) for _ in self.k)
        biases = tuple(None if t is None else next(it) for t in self.biases)
        outputs = {i: next(it) for i in sorted(self.outputs)}
        fused_mean = None if self.fused_mean is None else next(it)
        return replace(self, q=q, k=k, biases=biases, outputs=outputs, fused_mean=fused_mean)


def cloned(outs: list[_PassResult]) -> list[_PassResult]:
    """The large results of one forward (:meth:`_PassResult.large`) copied into memory of their own on the same
    device, as a replayed CUDA graph's results must be before its next replay rewrites them: one copy per block of
    memory they share (:func:`copies`), so a batch's q and k of every layer, views of one block, are one copy."""
    large = [out.large() for out in outs]
    fresh = iter(copies([t for parts in large for t in parts]))
    return [out.with_large([next(fresh) for _ in parts]) for out, parts in zip(outs, large, strict=True)]


def copies(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each tensor in memory of its own, on its device. Tensors that together view most of one storage
    (:func:`_whole_storages`) are copied as that storage, once, and view the copy where they viewed the original (a
    CUDA device copies it in one operation); any other tensor is cloned alone."""
    whole = _whole_storages(tensors)
    fresh: dict[tuple[int, torch.dtype], torch.UntypedStorage] = {}
    out = []
    for t in tensors:
        key = _storage_key(t)
        if key not in whole:
            out.append(t.clone())
            continue
        if key not in fresh:
            fresh[key] = t.untyped_storage().clone()
        out.append(
            torch.empty(0, dtype=t.dtype, device=t.device).set_(fresh[key], t.storage_offset(), t.shape, t.stride())
        )
    return out


def _storage_key(t: torch.Tensor) -> tuple[int, torch.dtype]:
    return t.untyped_storage().data_ptr(), t.dtype


def _whole_storages(tensors: list[torch.Tensor]) -> set[tuple[int, torch.dtype]]:
    """The storages (address, dtype) that ``tensors`` view for at least half of their bytes together: worth copying
    whole, once, and reading back where each tensor lies in them (:func:`to_host`, :func:`copies`)."""
    used: dict[tuple[int, torch.dtype], int] = {}
    for t in tensors:
        key = _storage_key(t)
        used[key] = used.get(key, 0) + t.numel() * t.element_size()
    return {_storage_key(t) for t in tensors if t.untyped_storage().nbytes() <= 2 * used[_storage_key(t)]}


def settle(outs: list[_PassResult]) -> list[_PassResult]:
    """The results of one forward as an analysis keeps them: what the views draw as it is (:meth:`_PassResult.small`)
    on the host, in ONE copy for the whole batch; q, k, the kept fusions, biases and block outputs left on the model's
    device, where the views compute on them (they move only what they draw). On the CPU nothing is copied."""
    small = [out.small() for out in outs]
    host = iter(to_host([t for parts in small for t in parts]))
    return [out.with_small([next(host) for _ in parts]) for out, parts in zip(outs, small, strict=True)]


def _small_of_all(outs: list[_PassResult]) -> list[torch.Tensor]:
    """What a recorded pass stages to the host: every image's :meth:`_PassResult.small`, image after image."""
    return [t for out in outs for t in out.small()]


def to_host(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors as float32 on the CPU, with one device-to-host copy for all of them when they are on a GPU (CPU
    tensors are returned as they are, converted only when not float32).

    Views that together take up most of one storage (each image's slice of a batch's statistics, norms, logits) are
    copied as that storage, once, and read back on the host where they lie in it: flattening a strided slice on the
    device is a kernel per slice (a batch of 16 ViT-S images: 64 of the analysis's 484 launches outside the digest's
    graph)."""
    if all(t.device.type == "cpu" for t in tensors):
        return [t.float() for t in tensors]

    keys = [_storage_key(t) for t in tensors]
    whole = _whole_storages(tensors)
    roots: dict[tuple[int, torch.dtype], torch.Tensor] = {}  # storages copied whole, each as a 1-D tensor
    for key, t in zip(keys, tensors, strict=True):
        if key in whole and key not in roots:
            size = t.untyped_storage().nbytes() // t.element_size()
            roots[key] = torch.empty(0, dtype=t.dtype, device=t.device).set_(t.untyped_storage(), 0, (size,))
    loose = [t for key, t in zip(keys, tensors, strict=True) if key not in roots]
    sources = [*roots.values(), *loose]
    pieces = iter(
        torch.cat([t.detach().reshape(-1).float() for t in sources]).cpu().split([t.numel() for t in sources])
    )
    host = {key: next(pieces) for key in roots}  # pieces of one host tensor: as_strided counts from its start
    return [
        host[key].as_strided(t.shape, t.stride(), host[key].storage_offset() + t.storage_offset())
        if key in roots
        else next(pieces).view(t.shape)  # the loose tensors' pieces follow, in the same order
        for key, t in zip(keys, tensors, strict=True)
    ]


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

    def on_block(layer: int, out: torch.Tensor) -> None:
        if not blocks(layer, out):  # kept: its statistics are taken with every layer's after the forward
            stats.block(layer, out.detach())

    with AttentionCapture(
        vm.model, on_attention=stats, inline=setup.inline, on_block=on_block, with_grad=setup.gradients
    ) as cap:
        logits = vm.logits(x)
    blocks.finish()
    if blocks.output_stack is not None:  # every layer's block statistics at once (see StatisticsReducer.blocks)
        stats.statistics.blocks(blocks.output_stack, blocks.stacked("norms"))
    n_seen = cap.q[0].shape[-2]
    if n_seen != n:
        raise RuntimeError(f"{n_seen} tokens do not match {p} prefix tokens + a {setup.grid[0]}x{setup.grid[1]} grid")
    if not stats.complete() or not stats.statistics.complete():
        raise RuntimeError("the attention of some layer never reached vizapp's statistics")
    rollout = stats.rollout_row(setup.weights)[:, p:].float()  # [B, P]
    statistics = {name: v.float() for name, v in stats.statistics.values.items()}  # [L, B, H] or [L, B]
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
                statistics={name: v[:, i] for name, v in statistics.items()},
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
    prompts: Any = None,
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
            for as long as the result lives. On a GPU, one image whose passes run as CUDA graphs keeps no autograd
            graph: each class's gradients come from one replay of a recorded forward and backward
            (:mod:`vizapp.gradient_pass`): one launch in place of a forward's and a backward's hundreds.
        prompts: for a CLIP-like model (a text tower): text prompts that become its classes, in the order given
            (``class_idx=k`` is the k-th); ``top_k`` then lists every prompt, best first (see
            :mod:`vizapp.models.prompts`).

    Returns:
        an :class:`Analysis`; for a list or tuple of images, a list of them, one per image in order, each equal to
        that image's own analysis.
    """
    if prompts is not None:
        vm, top_k = prompted(vm, prompts)
    if isinstance(image, (list, tuple)):
        from vizapp.batch import analyze_batch

        return analyze_batch(vm, image, top_k=top_k, progress=progress, inline=inline, gradients=gradients)
    pil, notes = to_pil(image)
    x = vm.transform(pil)
    if x.dim() == 3:
        x = x[None]
    return analyze_inputs(vm, x, [notes], top_k=top_k, progress=progress, inline=inline, gradients=gradients)[0]


def prompted(vm: VizModel, prompts: Any) -> tuple[VizModel, int]:
    """(``vm`` with ``prompts`` as its classes, how many classes its ``top_k`` lists: all of them)."""
    from vizapp.models.prompts import with_prompts

    vm = with_prompts(vm, prompts)
    return vm, len(vm.labels)


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

    On a GPU the forward may run as a replayed CUDA graph: one image at once, a batch from the second time its shape
    comes, while its memory fits (:func:`_graphable`). The analyses of a batch share its tensors (q and k of each
    layer, block outputs, with ``gradients`` the autograd graph): that memory is freed when the last of them is.
    """
    b = x.shape[0]
    notes = [()] * b if notes is None else list(notes)
    if vm.windowed:  # Swin: per-layer windows and grids, its own record (vizapp.swin_result)
        from vizapp.swin_result import analyze_windowed

        return analyze_windowed(vm, x, notes, top_k=top_k, gradients=gradients)  # type: ignore[return-value]
    x_dev = to_device(x, vm.device, vm.dtype)
    if progress:
        progress(0.1, "forward pass")
    grid = vm.grid_for(x.shape[-2], x.shape[-1])
    setup = _PassSetup.of(vm, grid, inline, gradients, b)
    # one image's gradients on a GPU: its plain pass replayed, and each class's gradients from the recorded forward and
    # backward of vizapp.gradient_pass, instead of an eager forward that keeps its autograd graph
    replay_gradients = (
        gradients and b == 1 and gradient_pass.graphable(vm, x_dev) and _graphable(vm, replace(setup, gradients=False))
    )
    if replay_gradients:
        setup = replace(setup, gradients=False)
    graphed = None
    if _graphable(vm, setup, b):
        # the kernels' route is recorded too: a graph of the formed attention must not answer for the fused one
        key = cudagraph.graph_key(vm.model, vm.weights_key(), x_dev, inline, fused_attention.usable(vm.device))

        def plain_pass(xs: torch.Tensor) -> list[_PassResult]:
            with torch.no_grad():  # nothing of autograd's is recorded or kept in the graph's memory
                return _device_pass(vm, xs, setup)

        # one image is recorded at once (the app analyses image after image); a batch's shape when it comes again,
        # so that a size met once does not pay for a recording
        if b == 1 or vm.graphs.asked_before(key):
            graphed = vm.graphs.get(key, plain_pass, x_dev, stage=_small_of_all, keep=setup)
    graphs = [GradientGraph() for _ in range(b)]
    # The weights' digest is taken afresh (an edit through .data since the last analysis moves no counter), once the
    # pass is queued and before the host waits for it: on a GPU its walk of the weights runs while the device
    # computes, and its own wait covers the pass too (see vizapp.models.digest).
    digest: list[tuple[str, ...]] = []
    if graphed is not None:  # one replay: the small results staged in pinned memory, the large ones copied on the
        # device, both under the graph's lock (the next replay rewrites them)
        with graphed.run(x_dev, meanwhile=lambda: digest.append(vm.fingerprint())) as (outs, staged):
            it = iter(staged)
            hosts = cloned([out.with_small([next(it) for _ in out.small()]) for out in outs])
    else:
        if replay_gradients:  # the pass could not be recorded: the eager forward keeps its autograd graph after all
            setup, replay_gradients = replace(setup, gradients=True), False
        with torch.enable_grad() if gradients else torch.no_grad():
            outs = _device_pass(vm, x_dev, setup)
        if gradients:
            graphs = [GradientGraph(out.maps, out.logits_graph, image=i) for i, out in enumerate(outs)]
        digest.append(vm.fingerprint())
        hosts = settle(outs)
    if progress:
        progress(0.6, "attention analyses")
    [fingerprint] = digest
    results = [
        _analysis(vm, x[i : i + 1], host, grid, notes[i], graphs[i], fingerprint, top_k) for i, host in enumerate(hosts)
    ]
    if replay_gradients:  # each class's gradients, when asked, from one replay of the recorded passes
        results[0].graph.replays = True
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
    fingerprint: tuple[str, ...],
    top_k: int,
) -> Analysis:
    """One image's :class:`Analysis` from its input ``x`` [1, C, H, W] and its pass's results on the host."""
    logits = host.logits
    probs = None
    top: list[tuple[str, float]] = []
    if vm.labels and logits.shape[-1] == len(vm.labels):
        probs = probabilities(logits, vm.activation).numpy()
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
        mean_distance=host.statistics["distance"].numpy(),
        statistics={name: v.numpy() for name, v in host.statistics.items()},
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
        result._cache.put(Key("fused", ("mean",)), host.fused_mean)  # [L, N, N]
    result._cache.put(Key("rollout", ("mean", 0.0, 0)), result._patch_map(host.rollout))
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
    if len(analyses) == 1 and graph.replays:  # one image's gradients from replayed passes: one more replay
        cls = [analyses[0]._class(classes[0])]
        graph.given[cls[0]] = analyses[0].attention_gradients(cls[0])
        return cls
    if graph.maps is None or any(r.graph.logits is not graph.logits for r in analyses):
        raise BadParameterError("class_gradients needs the analyses of one analyze(images, gradients=True) call")
    cls = [r._class(c) for r, c in zip(analyses, classes, strict=True)]
    rows = tensor_on([r.graph.image for r in analyses], graph.logits.device)
    score = graph.logits[rows, tensor_on(cls, graph.logits.device)].sum()
    # the graph is kept: a further class of one analysis is still one backward (Analysis.attention_gradients)
    grads = torch.autograd.grad(score, graph.maps, retain_graph=True)  # [B, H, N, N] per layer
    for r, c in zip(analyses, cls, strict=True):
        r.graph.given[c] = torch.stack([g[r.graph.image].float() for g in grads])  # [L, H, N, N] on the device
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
        [B, gh, gw, 3] RGB in [0, 1]; for a windowed model (Swin), on that layer's own token grid.
    """
    from vizapp.analysis.features import feature_pca as pca

    if vm.windowed:
        from vizapp.swin_features import feature_pca_images

        return feature_pca_images(vm, images, layer, foreground_threshold)[0]
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
    x = to_device(torch.stack([vm.batch_transform(to_pil(im)[0]) for im in images]), vm.device, vm.dtype)
    grid = vm.grid_for(x.shape[-2], x.shape[-1])
    kept: dict[int, torch.Tensor] = {}

    def keep(i: int, out: torch.Tensor) -> None:
        if i == layer:
            kept[i] = out[:, vm.num_prefix_tokens :].float().cpu()  # [B, P, D]

    with torch.no_grad(), AttentionCapture(vm.model, on_block=keep):
        vm.logits(x)
    res = pca(kept[layer], foreground_threshold=foreground_threshold, grid_size=grid)
    return res.rgb.reshape(len(images), *grid, 3).numpy()
