"""Per-layer reducers: the statistics vizapp takes from each chunk of attention while it is still in cache.

:func:`vizapp.analyze` feeds :class:`LayerStatistics` through the :class:`~vizapp.capture.AttentionConsumer`
protocol (the attention formed inside the forward, or replayed from recorded q and k for layers whose attention SDPA
kept); its per-head statistics are the registry's (:mod:`vizapp.statistics`), reduced by the same
:class:`~vizapp.statistics.StatisticsReducer` that dataset mode and the evaluation use. The maths is written once, in :mod:`vizapp.analysis` (:func:`~vizapp.analysis.rollout.fuse_heads_into`,
:func:`~vizapp.analysis.rollout.residual_step`, :func:`~vizapp.analysis.distance.distance_terms`); this module only
decides what to keep of each chunk. Byte budgets live in :mod:`vizapp.limits`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from vizapp import fused_attention, kept, limits
from vizapp.analysis.rollout import (
    FUSION_START,
    add_residual,
    finish_fusion,
    fuse_heads_into,
    residual_step,
    start_fusion,
)
from vizapp.capture import attention_chunks
from vizapp.statistics import Geometry, Statistic, StatisticsReducer

TINY = torch.finfo(torch.float32).tiny


class LayerStatistics:
    """What :func:`vizapp.analyze` keeps of every layer: the registered statistics (:mod:`vizapp.statistics`: mean
    distance, entropy ... per head), head fusions, the default rollout.

    Per chunk [c, r, N] (image ``batch``, heads ``head .. head + c``, query rows ``row .. row + r``): the chunk goes to
    a :class:`~vizapp.statistics.StatisticsReducer` (:attr:`statistics`), and into the running head fusions. Per
    layer: the statistics per image and head, and for the rollout either the mean-fused matrices (``store_mean``: a top-down vector pass
    after the forward) or, for models too big to hold L x N x N per image, the joint attention multiplied up
    bottom-up as the forward goes. Every image of a batch is reduced on its own, with the same operations as a
    batch of one.

    Args:
        heads: heads per layer.
        num_tokens: N.
        dist: [P, P] patch distances in pixels, on the device the attention arrives on.
        num_prefix_tokens: tokens before the patches.
        fusions: head fusions to keep per layer ("mean", "max", "min").
        store_mean: keep each layer's mean fusion for :meth:`rollout_row` (implied by "mean" in ``fusions``); the
            stored fusions (``mean_store``, ``fused["mean"]``) hold the heads' sums until every layer is done.
        batch: B, images in the forward.
        statistics: the statistics to reduce; default every registered one (block statistics need :meth:`block`).
    """

    def __init__(
        self,
        heads: Sequence[int],
        num_tokens: int,
        dist: torch.Tensor,
        num_prefix_tokens: int,
        fusions: Sequence[str] = (),
        store_mean: bool = True,
        batch: int = 1,
        statistics: Sequence[Statistic] | None = None,
    ) -> None:
        self.heads, self.n, self.p, self.batch = list(heads), num_tokens, num_prefix_tokens, int(batch)
        self.statistics = StatisticsReducer(
            self.heads, self.batch, Geometry(num_tokens, num_prefix_tokens, dist), statistics
        )
        self.store_mean = store_mean or "mean" in fusions
        self.kept = tuple(dict.fromkeys((*fusions, "mean") if self.store_mean else fusions))
        self._accumulated = tuple(dict.fromkeys((*self.kept, "mean")))  # the rollout needs the mean
        n_layers = len(self.heads)
        self._done = [False] * n_layers
        self.fused: dict[str, list[torch.Tensor | None]] = {f: [None] * n_layers for f in self.kept}  # [B, N, N]
        #: with ``store_mean``: every layer's mean fusion in one [B, L, N, N] block (``fused["mean"]`` holds views of
        #: it), so that neither the rollout nor a caller has to stack them; ``mean_store[b]`` is image b's [L, N, N]
        self.mean_store: torch.Tensor | None = None
        self._mean_layers: tuple[torch.Tensor, ...] = ()  # mean_store[:, l] for every layer l
        self.joint: torch.Tensor | None = None  # [B, N, N]: the bottom-up rollout so far, when not store_mean
        self.valid = True  # False once a chunk could not be used (an image outside the batch, a token mismatch)
        self._acc: dict[str, torch.Tensor] = {}
        self._started: set[tuple[int, int]] = set()

    #: takes chunks of several whole images, and a scratch buffer with each (:meth:`AttentionConsumer.chunk`)
    image_groups = True
    takes_scratch = True
    takes_scores = True  # and is told when the scratch holds the chunk's scores

    # AttentionConsumer
    def chunk(
        self,
        layer: int,
        batch: int,
        head: int,
        attn: torch.Tensor,
        row: int,
        scratch: torch.Tensor | None = None,
        scores_in_scratch: bool = False,
    ) -> None:
        if attn.dim() == 4 and attn.shape[0] == 1:  # [g, H, N, N]: images batch .. batch + g, whole
            attn, scratch = attn[0], None if scratch is None else scratch[0]
        if not self._fits(batch, attn):
            self.valid = False
            return
        self.statistics.chunk(layer, batch, head, attn, row, scratch=scratch, scores_in_scratch=scores_in_scratch)
        self._fuse(layer, batch, attn, row, scratch)

    def softmax_rows(
        self, layer: int, batch: int, head: int, scores: torch.Tensor, row: int, out: torch.Tensor
    ) -> bool:
        """A chunk's softmax into ``out`` with its statistics and the heads' sum of the mean fusion in the same pass of
        the CPU kernel (:meth:`~vizapp.statistics.StatisticsReducer.softmax_rows`), then any other fusion (max, min)
        from that softmax as :meth:`chunk` takes it, the spent scores its scratch; False, with nothing taken, where
        the kernel does not serve (:meth:`chunk` is then handed the chunk)."""
        if not self._fits(batch, scores):
            return False
        self._begin_layer(layer, scores.device)
        images, r = (scores.shape[0] if scores.dim() == 4 else 1), scores.shape[-2]
        add = scores.dim() == 3 and (batch, row) in self._started  # a later chunk of heads of these rows
        summed = (self._acc["mean"][batch : batch + images, row : row + r], add)
        if not self.statistics.softmax_rows(layer, batch, head, scores, row, out, head_sum=summed):
            return False
        if out.dim() == 4 and out.shape[0] == 1:
            out, scores = out[0], scores[0]
        self._fuse(layer, batch, out, row, scores, summed="mean")
        return True

    def _fits(self, batch: int, attn: torch.Tensor) -> bool:
        images = attn.shape[0] if attn.dim() == 4 else 1
        return batch >= 0 and batch + images <= self.batch and attn.shape[-1] == self.n and self.valid

    def _begin_layer(self, layer: int, dev: torch.device) -> None:
        """At the layer's first chunk: its fusions' accumulators, and no (image, row block) pair holding heads yet."""
        if not self._acc:
            self._acc, self._started = self._accumulators(layer, dev), set()

    def _fuse(
        self, layer: int, batch: int, attn: torch.Tensor, row: int, scratch: torch.Tensor | None, summed: str = ""
    ) -> None:
        """The chunk into the layer's running head fusions but ``summed`` (taken by the kernel), ``scratch`` a buffer
        like ``attn`` it may overwrite."""
        images = attn.shape[0] if attn.dim() == 4 else 1
        r = attn.shape[-2]
        self._begin_layer(layer, attn.device)
        fusions = [(f, acc) for f, acc in self._acc.items() if f != summed]
        if images > 1:  # every head of these images: their fusions are written whole
            self._started.update((b, row) for b in range(batch, batch + images))
            for f, acc in fusions:
                start_fusion(acc[batch : batch + images, row : row + r], attn, f)
            return
        first = (batch, row) not in self._started
        self._started.add((batch, row))
        # the statistics are done with the scratch: it takes the heads' sum (or max, min) folded into each fusion
        work = scratch[0] if scratch is not None and scratch.shape == attn.shape else None
        for f, acc in fusions:
            if first:
                start_fusion(acc[batch, row : row + r], attn, f)
            else:
                fuse_heads_into(acc[batch, row : row + r], attn, f, work=work)

    def _accumulators(self, layer: int, dev: torch.device) -> dict[str, torch.Tensor]:
        """The layer's fusions [B, N, N] to accumulate into: the stored mean's view, new tensors for the others."""
        b, n = self.batch, self.n
        if self.store_mean and (layer == 0 or self.mean_store is None):  # a new forward: a new block
            self.mean_store = kept.empty((b, len(self.heads), n, n), torch.float32, dev)
            # every layer's view at once: one made per layer would outlive it among the layer's freed
            # activations and fragment the heap (see AttentionCapture._record)
            self._mean_layers = self.mean_store.unbind(1)
        return {
            f: self._mean_layers[layer] if f == "mean" and self.store_mean else torch.empty((b, n, n), device=dev)
            for f in self._accumulated
        }

    def attend(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        scale: float,
        bias: torch.Tensor | None,
    ) -> torch.Tensor | None:
        """The layer's output with its statistics and the heads' sum taken by vizapp's fused kernels, without the
        attention formed (:func:`vizapp.fused_attention.reduce_layer`: on a GPU, with or without a bias); None to
        have it formed and handed over in chunks. Only the mean fusion has a kernel; max and min need the chunks."""
        if not self.valid or self._acc or self._accumulated != ("mean",) or q.shape[-2] != self.n:
            return None
        made: dict[str, torch.Tensor] = {}

        def head_sum() -> torch.Tensor:
            made.update(self._accumulators(layer, q.device))
            return made["mean"]

        out = fused_attention.reduce_layer(self.statistics, layer, q, k, v, scale, bias, head_sum)
        if out is not None:
            self._acc, self._started = made, {(i, 0) for i in range(self.batch)}
        return out

    def layer_done(self, layer: int) -> None:
        if not self.valid or not self._acc:
            return
        if {b for b, _ in self._started} != set(range(self.batch)):
            self.valid = False  # some image of the batch sent no attention for this layer
            return
        self.statistics.layer_done(layer)
        self._done[layer] = True
        # the stored mean fusions (head sums until then) are divided once every layer is in: one operation for all
        fused = {
            f: acc if f == "mean" and self.store_mean else finish_fusion(acc, self.heads[layer], f)
            for f, acc in self._acc.items()
        }
        for f in self.kept:
            self.fused[f][layer] = fused[f]
        if not self.store_mean:
            mean = fused["mean"]
            self.joint = add_residual(mean) if self.joint is None else residual_step(mean, self.joint, side="right")
        elif all(self._done):
            self._divide_store()
        self._acc = {}

    def _divide_store(self) -> None:
        """Every layer's head sum in :attr:`mean_store` into its mean: one in-place division of the block where the
        layers' head counts agree (one kernel on a GPU, not one a layer), else layer by layer; bitwise the division
        :func:`~vizapp.analysis.rollout.finish_fusion` makes of one layer."""
        if len(set(self.heads)) == 1:
            finish_fusion(self.mean_store, self.heads[0], "mean")
        else:
            for layer, view in enumerate(self._mean_layers):
                finish_fusion(view, self.heads[layer], "mean")

    def block(self, layer: int, out: torch.Tensor) -> None:
        """``on_block``: the block statistics of block ``layer``'s output [B, N, D]."""
        self.statistics.block(layer, out)

    @property
    def distances(self) -> list[torch.Tensor]:
        """Every layer's mean attention distance per image and head, [B, H] float64 each."""
        return list(self.statistics.values["distance"].unbind(0))

    def complete(self) -> bool:
        """Every layer was reduced from the attention of every image."""
        return self.valid and all(self._done)

    def rollout_row(self, weights: torch.Tensor) -> torch.Tensor:
        """The default rollout's row of every image: ``weights`` [N] (float64) through every layer, top-down -> [B, N]
        float64.

        With the mean fusions stored, each layer is :func:`~vizapp.analysis.rollout.residual_step` written as two
        operations, the row sums of every layer taken at once: w ← w / s_l, then w ← w + w·M_l (``baddbmm``, every
        image of the batch in one operation).
        """
        w0 = weights.to(torch.float32)
        if not self.store_mean:
            return torch.matmul(w0, self.joint).to(torch.float64)
        store = self.mean_store  # [B, L, N, N]
        sums = store.sum(dim=-1).add_(1.0)  # [B, L, N]: row sums of M_l + I
        w = w0.expand(store.shape[0], 1, -1)  # [B, 1, N]: every image of the batch at once
        for layer in range(len(self.heads) - 1, -1, -1):
            w = w / sums[:, layer, None]
            w = torch.baddbmm(w, w, store[:, layer])  # w + w·M_l
        return w[:, 0].to(torch.float64)


def fused_layer(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    head_fusion: str,
    budget: int | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """One layer's head-fused attention [N, N] from q, k [H, N, d], a cache-sized chunk of heads at a time (the
    scores and their softmax in two reused buffers), never the layer's whole [H, N, N]."""
    h, n, _ = q.shape
    out = torch.full((n, n), FUSION_START[head_fusion], device=q.device)
    shape = limits.chunk_shape(h, n, limits.INLINE_CHUNK_BYTES if budget is None else budget)
    for _, r0, a, _ in attention_chunks(q, k, scale, *shape, bias=bias):
        fuse_heads_into(out[r0 : r0 + a.shape[1]], a, head_fusion)
    return finish_fusion(out, h, head_fusion)


class BlockFeatures:
    """What :func:`vizapp.analyze` keeps of each encoder block's output (``AttentionCapture(on_block=...)``), for
    every image of the batch.

    Per layer and image: the L2 norm of every token [N] (always, a few floats); the logit lens, the model's own final
    norm, pooling and head applied to the block's output, as probabilities [K] (when the model has a head); and the
    output itself [N, D] for the feature views, for every layer while one image's L x N x D floats fit ``budget``
    bytes, else for the last layer only.

    When every layer's output is kept, the norms and the lens are taken after the forward, all layers in one call
    (:meth:`finish`): the head's weights are then read once instead of once per layer (ViT-B/16 on 2 CPU threads: 1.1
    against 3.2 ms for 12 layers). Otherwise they are taken as each block's output arrives, into one block for all
    layers (see :meth:`_write`).

    Args:
        num_layers: L.
        lens_fn: tokens [B, N, D] -> logits [B, K], or None; its probabilities are the softmax, or the sigmoid where
            ``lens_fn.activation`` is "sigmoid".
        budget: default :data:`vizapp.limits.BLOCK_OUTPUT_BYTES`, per image.

    Attributes (after :meth:`finish`): ``norms`` [B, N] and ``lens`` [B, K] per layer, ``outputs`` layer -> [B, N, D].
    """

    def __init__(
        self, num_layers: int, lens_fn: Callable[[torch.Tensor], torch.Tensor] | None, budget: int | None = None
    ) -> None:
        self.num_layers = num_layers
        self.budget = limits.BLOCK_OUTPUT_BYTES if budget is None else budget
        self.lens_fn = lens_fn
        self.norms: list[torch.Tensor | None] = [None] * num_layers  # [B, N] per layer
        self.lens: list[torch.Tensor | None] = [None] * num_layers  # [B, K] per layer
        self.outputs: dict[int, torch.Tensor] = {}  # layer -> [B, N, D] float32
        self._deferred: dict[int, torch.Tensor] = {}  # layer -> [B, N, D] in the model's dtype, until finish()
        #: after :meth:`finish`, when every layer's output was kept: all of them, [L, B, N, D] in the model's dtype
        self.output_stack: torch.Tensor | None = None
        self._stacked: dict[str, torch.Tensor] = {}  # "norms", "lens": every layer's, as finish() computed them
        # "norms" [L, B, N], "lens" [L, B, K], "outputs" [L, B, N, D]: written during the forward (_write)
        self._blocks: dict[str, torch.Tensor] = {}
        self._slots: dict[str, tuple[torch.Tensor, ...]] = {}  # every layer's view of each block
        self._written: dict[str, set[int]] = {}  # the layers written into each of _blocks

    def __call__(self, layer: int, out: torch.Tensor) -> bool:
        """Take block ``layer``'s output; True when it is kept until :meth:`finish` (every layer's output is then
        there as :attr:`output_stack`), False when it was reduced now."""
        if self.num_layers * out[0].numel() * 4 <= self.budget:  # kept, and reduced in finish()
            self._defer(layer, out)
            return True
        if layer == self.num_layers - 1:
            self.outputs[layer] = out.float()
        self._write("norms", layer, torch.linalg.vector_norm(out.float(), dim=-1))
        if self.lens_fn is not None:
            with torch.no_grad():
                self._write("lens", layer, self._probabilities(self.lens_fn(out).float()))
        return False

    def _defer(self, layer: int, out: torch.Tensor) -> None:
        """Keep block ``layer``'s output [B, N, D] for :meth:`finish`, copied into the forward's "outputs" block
        (:meth:`_write`), which finish() then uses as the stack of the outputs. Holding each block's own output until
        finish() stacked them held the outputs twice at its end (ViT-S/16, 16 images: 58 MB each); with the copies the
        model's residual-stream tensors are freed as it goes."""
        self._deferred[layer] = self._write("outputs", layer, out)

    def _probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """The lens's logits as the model's own probabilities: the softmax, or each one's sigmoid where the lens says
        its model is a sigmoid one (``lens_fn.activation``, SigLIP's prompts)."""
        from vizapp.models.prompts import probabilities

        return probabilities(logits, getattr(self.lens_fn, "activation", "softmax"))

    def _write(self, what: str, layer: int, value: torch.Tensor) -> torch.Tensor:
        """Layer ``layer``'s ``value`` ([B, N] norms, [B, K] lens or [B, N, D] output) copied into one block for every
        layer, made at the forward's first layer (again for a layer unlike the block) with every layer's view: a
        tensor kept per layer would be a small allocation outliving the layer among its freed activations, which
        fragments the heap (see :meth:`vizapp.capture.AttentionCapture._record`). Returns the layer's view."""
        block = self._blocks.get(what)
        if layer == 0 or block is None or block.shape[1:] != value.shape or block.dtype != value.dtype:
            block = self._blocks[what] = kept.empty((self.num_layers, *value.shape), value.dtype, value.device)
            self._slots[what], self._written[what] = block.unbind(0), set()
        with torch.no_grad():  # a record, never in a graph
            view = self._slots[what][layer].copy_(value)
        self._written[what].add(layer)
        return view

    def finish(self) -> None:
        """Norms and lens of the layers whose outputs were kept, in one call each, and every layer's view of the
        blocks the others were written into; call once after the forward."""
        self.output_stack = None
        whole = {what for what, written in self._written.items() if len(written) == self.num_layers}
        outputs = self._blocks.pop("outputs", None)
        for what, block in self._blocks.items():
            for i in self._written[what]:
                getattr(self, what)[i] = block[i]
            if what in whole:
                self._stacked[what] = block
        self._blocks, self._written, self._slots = {}, {}, {}
        if not self._deferred:
            return
        layers = sorted(self._deferred)
        # [L, B, N, D]: every layer was copied into the block during the forward, unless a layer unlike the first
        # started a new one (the earlier layers' copies are then in the old one)
        stack = outputs if "outputs" in whole else torch.stack([self._deferred[i] for i in layers])
        self._deferred = {}
        if layers == list(range(self.num_layers)):
            self.output_stack = stack
        norms = torch.linalg.vector_norm(stack.float(), dim=-1)  # [l, B, N]
        lens = None
        if self.lens_fn is not None:
            with torch.no_grad():
                flat = self.lens_fn(stack.flatten(0, 1)).float()  # [l·B, K]: every layer and image in one call
                lens = self._probabilities(flat).unflatten(0, stack.shape[:2])  # [l, B, K]
        for j, i in enumerate(layers):
            self.outputs[i] = stack[j].float()  # a view of the stack: the block's own output is released
            self.norms[i] = norms[j]
            if lens is not None:
                self.lens[i] = lens[j]
        if layers == list(range(self.num_layers)):
            self._stacked = {"norms": norms} if lens is None else {"norms": norms, "lens": lens}

    def stacked(self, what: str) -> torch.Tensor:
        """Every layer's ``"norms"`` [L, B, N] or ``"lens"`` [L, B, K] as one tensor (no copy when :meth:`finish`
        took all layers at once or every layer was written into one block during the forward)."""
        found = self._stacked.get(what)
        return found if found is not None else torch.stack(getattr(self, what))
