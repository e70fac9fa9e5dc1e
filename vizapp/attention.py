"""The attention arithmetic the capture uses: softmax(q kᵀ · scale + bias) in fp32, a few heads at a time within the
byte budget (:func:`attention_chunks`), the consumer protocol the statistics implement and how chunks reach it, an
additive bias from a mask, and head ablation."""

from __future__ import annotations

from typing import Any, Protocol

import torch

from vizapp import limits
from vizapp.errors import BadParameterError


def attention_from_qk(q: torch.Tensor, k: torch.Tensor, scale: float, bias: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q kᵀ · scale + bias) in fp32: q, k [..., N, d], bias broadcastable to [..., N, N] -> [..., N, N]."""
    s = (q.float() * scale) @ k.float().transpose(-2, -1)
    if bias is not None:
        s = s + bias.float()
    return torch.softmax(s, dim=-1)


def attention_chunks(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    heads: int,
    rows: int,
    work: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    softmax: Any = None,
):
    """softmax(q kᵀ · scale + bias) of q, k [H, N, d] in chunks of ``heads`` heads x ``rows`` query rows, fp32.

    ``bias`` (optional) is [H or 1, N, N]. Yields (first head, first row, attention [c, r, N], taken). ``work`` ([2,
    heads, rows, N] or larger; allocated when None) holds every chunk: its scores in ``work[0]``, the softmax of them
    in ``work[1]``, so a chunk is valid only until the next one. ``softmax`` (optional): ``softmax(head, row, scores,
    out) -> bool`` is offered each chunk's scores first (a consumer's ``softmax_rows``, see :func:`softmax_by`);
    ``taken`` says it formed the softmax into ``out`` and took what it keeps of the chunk.
    """
    h, n, _ = q.shape
    if work is None:
        work = torch.empty((2, heads, rows, n), dtype=torch.float32, device=q.device)
    scores, probs = work[0], work[1]
    qf = q.float()
    kt = k.float().transpose(-2, -1)
    for h0 in range(0, h, heads):
        m = min(heads, h - h0)
        for r0 in range(0, n, rows):
            r = min(rows, n - r0)
            # the scale inside the product (alpha) and beta=0, which ignores the buffer's old contents: no scaled
            # copy of q per layer (ViT-Ti/16 on 2 CPU threads: 237 µs a layer, SDPA 228, q·scale then matmul 270)
            s = scores[:m, :r].baddbmm_(qf[h0 : h0 + m, r0 : r0 + r], kt[h0 : h0 + m], beta=0.0, alpha=scale)
            if bias is not None:
                b = bias if bias.shape[0] == 1 else bias[h0 : h0 + m]
                s.add_(b[:, r0 : r0 + r])
            # The softmax goes into a second buffer: onto its own input torch's kernel is slower (2 CPU threads:
            # 53 against 45 µs for [3, 197, 197]), and a new tensor per chunk is memory the allocator may hand back
            # and fault in again (1,374-token ViT-L: 7.5 MB per head, 384 times per forward).
            out = probs[:m, :r]
            if softmax is not None and softmax(h0, r0, s, out):
                yield h0, r0, out, True
            else:
                yield h0, r0, torch.ops.aten._softmax.out(s, -1, False, out=out), False


class AttentionConsumer(Protocol):
    """What ``AttentionCapture(on_attention=...)`` feeds, layer by layer, in the forward's order."""

    def chunk(self, layer: int, batch: int, head: int, attn: torch.Tensor, row: int) -> None:
        """Attention [c, r, N] fp32 of heads ``head .. head + c`` of image ``batch``, query rows ``row .. row + r``
        (all N rows unless one head's N x N exceeds the chunk size); valid only during the call.

        A consumer whose ``image_groups`` attribute is true may also receive [g, H, N, N]: every head and row of the
        g images ``batch .. batch + g`` at once (``head`` and ``row`` 0), when whole images fit the chunk size
        (:func:`image_group`).

        A consumer whose ``takes_scratch`` attribute is true is also passed ``scratch=``: a buffer of ``attn``'s shape
        and dtype (the chunk's scores, spent once their softmax is formed) that it may overwrite during the call, so
        that it needs no working memory of its own; or None where there is none (see :func:`hand_over`). One whose
        ``takes_scores`` attribute is true as well is also passed ``scores_in_scratch=``: True when the scratch holds,
        on entry, the finite scores whose softmax ``attn`` is (a statistic may read them before anything overwrites
        them: :meth:`vizapp.statistics.HeadStatistic.rows_from_scores`)."""

    def layer_done(self, layer: int) -> None:
        """Every chunk of ``layer`` has been passed."""

    # Optional: ``attend(layer, q, k, v, scale, bias) -> output | None``. A consumer with this method is offered each
    # layer the capture would form inline before any chunk of it, with q, k, v [B, H, N, d] of the whole batch and
    # the additive bias (or None). It returns the layer's output softmax(q kᵀ·scale + bias)·v [B, H, N, d] in v's
    # dtype, having taken what it keeps of the layer without the capture forming the attention (vizapp's fused
    # kernels, :mod:`vizapp.fused_attention`); the capture then calls only :meth:`layer_done`. Or None: the capture
    # forms the attention and hands it over in chunks as usual.
    #
    # Optional: ``softmax_rows(layer, batch, head, scores, row, out) -> bool``: offered the scores of each chunk the
    # capture forms, shaped as :meth:`chunk`'s attention would be, before their softmax. A consumer that forms the
    # softmax into ``out`` itself, taking in the same pass what it keeps of the chunk (the CPU kernel,
    # :mod:`vizapp.cpu_rows`), returns True and is not handed that chunk; else False, with nothing written.


def softmax_by(consumer: AttentionConsumer, layer: int, batch: int, images: int | None = None) -> Any:
    """The ``softmax`` hook of :func:`attention_chunks` for chunks of image ``batch`` of ``layer``: the consumer's
    ``softmax_rows``, or None where it has none. With ``images``, each chunk is every head of that many images from
    ``batch`` on, [g·H, N, N], offered as [g, H, N, N]."""
    rows = getattr(consumer, "softmax_rows", None)
    if rows is None:
        return None
    if images is None:
        return lambda head, row, scores, out: rows(layer, batch, head, scores, row, out)

    def whole(_head: int, _row: int, scores: torch.Tensor, out: torch.Tensor) -> bool:
        shape = (images, scores.shape[0] // images, *scores.shape[1:])
        return rows(layer, batch, 0, scores.view(shape), 0, out.view(shape))

    return whole


def offer(
    consumer: AttentionConsumer,
    layer: int,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None,
) -> torch.Tensor | None:
    """``consumer.attend(...)`` where the consumer has it (see :class:`AttentionConsumer`), else None."""
    attend = getattr(consumer, "attend", None)
    return None if attend is None else attend(layer, q, k, v, scale, bias)


def hand_over(
    consumer: AttentionConsumer,
    layer: int,
    batch: int,
    head: int,
    attn: torch.Tensor,
    row: int,
    scratch: torch.Tensor | None = None,
    scores: bool = False,
) -> None:
    """``consumer.chunk(layer, batch, head, attn, row)``, with ``scratch`` (a buffer of ``attn``'s shape and dtype it
    may overwrite; ``scores``: it holds the finite scores ``attn`` is the softmax of) for a consumer that takes one
    (see :meth:`AttentionConsumer.chunk`)."""
    if not getattr(consumer, "takes_scratch", False):
        consumer.chunk(layer, batch, head, attn, row)
    elif getattr(consumer, "takes_scores", False):
        told = scores and scratch is not None
        consumer.chunk(layer, batch, head, attn, row, scratch=scratch, scores_in_scratch=told)  # type: ignore[call-arg]
    else:
        consumer.chunk(layer, batch, head, attn, row, scratch=scratch)  # type: ignore[call-arg]


def image_group(consumer: Any, batch: int, heads: int, tokens: int, budget: int) -> int:
    """How many whole images go into one chunk for ``consumer``: 1 unless it takes image groups (see
    :meth:`AttentionConsumer.chunk`) and one image's attention, every head, fits ``budget`` bytes; then as many as fit.
    A batch analysed on a GPU thus forms and reduces its attention in a few large operations per layer, not about ten
    small ones per image."""
    if not getattr(consumer, "image_groups", False) or batch < 2:
        return 1
    return images_within(budget, heads, tokens, batch)


def images_within(budget: int, heads: int, tokens: int, batch: int) -> int:
    """How many of ``batch`` images' fp32 attention (``heads`` x ``tokens`` x ``tokens`` each) fit ``budget`` bytes;
    at least 1."""
    return max(1, min(batch, budget // (heads * tokens * tokens * 4)))


def feed(
    consumer: AttentionConsumer,
    layer: int,
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None = None,
    budget: int | None = None,
) -> None:
    """Hand the attention of recorded q, k [B, H, N, d] (bias [B or 1, H or 1, N, N]) to ``consumer`` chunk by
    chunk, as the forward would have, then close the layer."""
    b, h, n, _ = q.shape
    c, rows = limits.chunk_shape(h, n, limits.chunk_bytes(q.device) if budget is None else budget)
    work = torch.empty((2, c, rows, n), dtype=torch.float32, device=q.device)
    with torch.no_grad():
        for i in range(b):
            bi = None if bias is None else bias[i if bias.shape[0] > 1 else 0]
            for h0, r0, a, taken in attention_chunks(
                q[i], k[i], scale, c, rows, work, bi, softmax_by(consumer, layer, i)
            ):
                if not taken:
                    hand_over(consumer, layer, i, h0, a, r0, work[0, : a.shape[0], : a.shape[1]], scores=bi is None)
    consumer.layer_done(layer)


def group_bias(bias: torch.Tensor | None, first: int, g: int, h: int, n: int) -> torch.Tensor | None:
    """The additive bias [B or 1, H or 1, N, N] of images ``first .. first + g`` as their heads' [g·H, N, N] chunk, or
    [1, N, N] where one bias serves every head and image (None stays None)."""
    if bias is None:
        return None
    one = bias[first : first + g] if bias.shape[0] > 1 else bias[:1]
    return one[0] if one.shape[:2] == (1, 1) else one.expand(g, h, n, n).reshape(g * h, n, n)


def host_copies(tensors: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Each tensor on the CPU, contiguous, one copy each (none for contiguous CPU tensors); see
    :meth:`AttentionCapture.qk_on_cpu` for why q and k come from a GPU one layer at a time."""
    return tuple(t.cpu().contiguous() for t in tensors)


def additive_bias(mask: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """SDPA's ``attn_mask`` as an additive fp32 bias [B or 1, H or 1, N, N] (boolean: False -> -inf)."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill_(~mask, -torch.inf)
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    return mask.detach().float().expand(*mask.shape[:2], n, n)


ABLATE_MODES = ("zero", "mean")


def ablate_head_output(heads: torch.Tensor, mask: torch.Tensor, mode: str = "zero") -> torch.Tensor:
    """Heads' outputs [B, H, N, d] with the heads in ``mask`` ([B, H] per image, or [H] for all) ablated.

    ``mode="zero"`` multiplies them by 0; ``mode="mean"`` replaces each by its mean over the N tokens (prefix
    tokens included) of the same image and head. Other heads are returned unchanged (the same values).
    """
    if mode not in ABLATE_MODES:
        raise BadParameterError(f"ablation mode must be one of {ABLATE_MODES}, got {mode!r}")
    b, h = heads.shape[:2]
    m = mask.to(device=heads.device, dtype=torch.bool)
    if m.dim() == 1:
        m = m.unsqueeze(0)
    if m.dim() != 2 or m.shape[1] != h or m.shape[0] not in (1, b):
        raise BadParameterError(f"head mask {tuple(mask.shape)} does not fit [B={b}, H={h}] (or [H={h}])")
    m = m[:, :, None, None]  # [B or 1, H, 1, 1]
    if mode == "zero":
        return heads * (~m).to(heads.dtype)
    return torch.where(m, heads.mean(dim=-2, keepdim=True).expand_as(heads), heads)
