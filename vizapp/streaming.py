"""Per-layer reducers: the statistics vizapp takes from each chunk of attention while it is still in cache.

Every path that sees attention feeds one of these through the :class:`~vizapp.capture.AttentionConsumer` protocol:
the attention formed inside the forward, the replay from recorded q and k (layers whose attention SDPA kept), and
dataset mode. The maths is written once, in :mod:`vizapp.analysis` (:func:`~vizapp.analysis.rollout.fuse_heads_into`,
:func:`~vizapp.analysis.rollout.residual_step`, :func:`~vizapp.analysis.distance.distance_terms`); this module only
decides what to keep of each chunk. Byte budgets live in :mod:`vizapp.limits`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from vizapp import limits
from vizapp.analysis.distance import BlockDistanceTerms
from vizapp.analysis.rollout import FUSION_START, finish_fusion, fuse_heads_into, residual_step
from vizapp.capture import attention_chunks

TINY = torch.finfo(torch.float32).tiny


class LayerStatistics:
    """What :func:`vizapp.analyze` keeps of every layer: mean distance per head, head fusions, the default rollout.

    Per chunk [c, r, N] (heads ``head .. head + c``, query rows ``row .. row + r``): the distance numerator and
    denominator of each patch query, and the running head fusions. Per layer: the mean distance per head [H], and
    for the rollout either the mean-fused matrix (``store_mean``: a top-down vector pass after the forward) or, for
    models too big to hold L x N x N, the joint attention multiplied up bottom-up as the forward goes.

    Args:
        heads: heads per layer.
        num_tokens: N.
        dist: [P, P] patch distances in pixels, on the device the attention arrives on.
        num_prefix_tokens: tokens before the patches.
        fusions: head fusions to keep per layer ("mean", "max", "min").
        store_mean: keep each layer's mean fusion for :meth:`rollout_row` (implied by "mean" in ``fusions``).
    """

    def __init__(
        self,
        heads: Sequence[int],
        num_tokens: int,
        dist: torch.Tensor,
        num_prefix_tokens: int,
        fusions: Sequence[str] = (),
        store_mean: bool = True,
    ) -> None:
        self.heads, self.n, self.p = list(heads), num_tokens, num_prefix_tokens
        self.terms = BlockDistanceTerms(dist, num_prefix_tokens)
        self.store_mean = store_mean or "mean" in fusions
        self.kept = tuple(dict.fromkeys((*fusions, "mean") if self.store_mean else fusions))
        n_layers = len(self.heads)
        self.distances: list[torch.Tensor | None] = [None] * n_layers  # [H] per layer
        self.fused: dict[str, list[torch.Tensor | None]] = {f: [None] * n_layers for f in self.kept}
        self.joint: torch.Tensor | None = None  # bottom-up rollout when not store_mean
        self.valid = True  # False once a chunk could not be used (a batch of several images, a token mismatch)
        self._num = self._den = None
        self._acc: dict[str, torch.Tensor] = {}

    # AttentionConsumer
    def chunk(self, layer: int, batch: int, head: int, attn: torch.Tensor, row: int) -> None:
        c, r, n = attn.shape
        if batch != 0 or n != self.n or not self.valid:
            self.valid = False
            return
        if head == 0 and row == 0:
            dev = attn.device
            self._num = torch.empty(self.heads[layer], n - self.p, device=dev)
            self._den = torch.empty(self.heads[layer], n - self.p, device=dev)
            self._acc = {f: torch.full((n, n), FUSION_START[f], device=dev) for f in (*self.kept, "mean")}
        terms = self.terms(attn, row)
        if terms is not None:
            q0, q1, num, den = terms
            self._num[head : head + c, q0:q1] = num
            self._den[head : head + c, q0:q1] = den
        for f, acc in self._acc.items():
            fuse_heads_into(acc[row : row + r], attn, f)

    def layer_done(self, layer: int) -> None:
        if not self.valid or not self._acc:
            return
        self.distances[layer] = (self._num / self._den.clamp_min(TINY)).mean(dim=-1)
        fused = {f: finish_fusion(acc, self.heads[layer], f) for f, acc in self._acc.items()}
        for f in self.kept:
            self.fused[f][layer] = fused[f]
        if not self.store_mean:
            mean = fused["mean"]
            eye = torch.eye(self.n, dtype=mean.dtype, device=mean.device)
            self.joint = residual_step(mean, eye if self.joint is None else self.joint, side="right")
        self._acc = {}

    def complete(self) -> bool:
        """Every layer was reduced from one image's attention."""
        return self.valid and all(d is not None for d in self.distances)

    def rollout_row(self, weights: torch.Tensor) -> torch.Tensor:
        """The default rollout's row: ``weights`` [N] (float64) through every layer, top-down -> [N] float64."""
        if self.store_mean:
            for mean in reversed(self.fused["mean"]):
                weights = residual_step(mean, weights.to(torch.float32)).to(torch.float64)
            return weights
        return torch.matmul(weights.to(torch.float32), self.joint).to(torch.float64)


class DatasetDistances:
    """Dataset mode's consumer: the mean attention distance per layer and head, summed over every image of every
    batch; nothing of a layer outlives its chunks.

    Args:
        num_layers, num_heads: L and H.
        dist: [P, P] patch distances in pixels, on the model's device.
        num_prefix_tokens: tokens before the patches.
    """

    def __init__(self, num_layers: int, num_heads: int, dist: torch.Tensor, num_prefix_tokens: int) -> None:
        self.dist = dist
        self.p = num_prefix_tokens
        self.terms = BlockDistanceTerms(dist, num_prefix_tokens)
        self.sums = torch.zeros(num_layers, num_heads, dtype=torch.float64, device=dist.device)  # [L, H]
        self.counts = torch.zeros(num_layers, dtype=torch.long)  # images seen per layer (a consistency check)
        self._images = 0

    def chunk(self, layer: int, batch: int, head: int, attn: torch.Tensor, row: int) -> None:
        n_patches = self.dist.shape[-1]
        if attn.shape[-1] - self.p != n_patches:
            raise ValueError(
                f"attention has {attn.shape[-1] - self.p} patch tokens after {self.p} prefix tokens, "
                f"but the grid has {n_patches}"
            )
        self._images = max(self._images, batch + 1)
        terms = self.terms(attn, row)
        if terms is None:
            return
        _, _, num, den = terms
        # this block's share of the mean over all query patches
        self.sums[layer, head : head + attn.shape[0]] += ((num / den.clamp_min(TINY)).sum(dim=-1) / n_patches).double()

    def layer_done(self, layer: int) -> None:
        self.counts[layer] += self._images
        self._images = 0


def fused_layer(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    head_fusion: str,
    budget: int | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """One layer's head-fused attention [N, N] from q, k [H, N, d], a cache-sized chunk of heads at a time (the
    softmax in place in one reused buffer), never the layer's whole [H, N, N]."""
    h, n, _ = q.shape
    out = torch.full((n, n), FUSION_START[head_fusion], device=q.device)
    shape = limits.chunk_shape(h, n, limits.INLINE_CHUNK_BYTES if budget is None else budget)
    for _, r0, a in attention_chunks(q, k, scale, *shape, bias=bias):
        fuse_heads_into(out[r0 : r0 + a.shape[1]], a, head_fusion)
    return finish_fusion(out, h, head_fusion)


class BlockFeatures:
    """What :func:`vizapp.analyze` keeps of each encoder block's output (``AttentionCapture(on_block=...)``).

    Per layer: the L2 norm of every token [N] (always, a few floats); the logit lens, the model's own final norm,
    pooling and head applied to the block's output, as probabilities [K] (when the model has a head); and the output
    itself [N, D] for the feature views, for every layer while L x N x D floats fit ``budget`` bytes, else for the
    last layer only.

    Args:
        num_layers: L.
        lens_fn: tokens [B, N, D] -> logits [B, K], or None.
        budget: default :data:`vizapp.limits.BLOCK_OUTPUT_BYTES`.
    """

    def __init__(
        self, num_layers: int, lens_fn: Callable[[torch.Tensor], torch.Tensor] | None, budget: int | None = None
    ) -> None:
        self.num_layers = num_layers
        self.budget = limits.BLOCK_OUTPUT_BYTES if budget is None else budget
        self.lens_fn = lens_fn
        self.norms: list[torch.Tensor | None] = [None] * num_layers  # [N] per layer
        self.lens: list[torch.Tensor | None] = [None] * num_layers  # [K] per layer
        self.outputs: dict[int, torch.Tensor] = {}  # layer -> [N, D] float32

    def outputs_on_cpu(self) -> dict[int, torch.Tensor]:
        """The kept block outputs on the CPU, with one device-to-host copy for all of them (not one per layer)."""
        if not self.outputs or all(t.device.type == "cpu" for t in self.outputs.values()):
            return dict(self.outputs)
        layers = sorted(self.outputs)
        host = torch.stack([self.outputs[i] for i in layers]).cpu()
        return dict(zip(layers, host.unbind(0), strict=True))

    def __call__(self, layer: int, out: torch.Tensor) -> None:
        x = out[0]  # image 0 of the batch: [N, D]
        self.norms[layer] = torch.linalg.vector_norm(x.float(), dim=-1)
        if self.num_layers * x.numel() * 4 <= self.budget or layer == self.num_layers - 1:
            self.outputs[layer] = x.float()
        if self.lens_fn is not None:
            with torch.no_grad():
                self.lens[layer] = torch.softmax(self.lens_fn(out[:1]).float()[0], dim=-1)
