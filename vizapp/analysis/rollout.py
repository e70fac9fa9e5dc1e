"""Attention rollout (Abnar & Zuidema, "Quantifying Attention Flow in Transformers", ACL 2020).

Each layer's head-fused attention gets the identity added for the residual path and its rows renormalised
(keepdim: every row sums to 1), then the layers are multiplied from ``start_layer`` upward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from vizapp.transfer import to_device

HEAD_FUSIONS = ("mean", "max", "min")


FUSION_START = {"mean": 0.0, "max": -float("inf"), "min": float("inf")}


_PAIRWISE = {"mean": torch.add, "max": torch.maximum, "min": torch.minimum}
_OVER_HEADS = {"mean": torch.sum, "max": torch.amax, "min": torch.amin}


def _over_heads(attn: torch.Tensor, head_fusion: str, out: torch.Tensor | None = None) -> torch.Tensor:
    """The heads of ``attn`` [..., c, r, N] summed ("mean"), or their max or min: [..., r, N], into ``out`` when given.

    One head is itself (a view, or copied into ``out``) and two are one elementwise operation: bitwise what the
    reduction over the head axis gives (a sum of two floats is rounded once however it is taken), without the
    reduction, which on the CPU fills its output first and, over one head, only copies it. The 1,374-token ViT-L/14
    hands its heads over one at a time, ViT-L/16 at 384 px two at a time (:func:`vizapp.limits.chunk_shape`).
    """
    if head_fusion not in HEAD_FUSIONS:
        raise ValueError(f"head_fusion must be one of {HEAD_FUSIONS}, got {head_fusion!r}")
    c = attn.shape[-3]
    if c == 1:
        one = attn.select(-3, 0)
        return one if out is None else out.copy_(one)
    if c == 2:
        return _PAIRWISE[head_fusion](attn.select(-3, 0), attn.select(-3, 1), out=out)
    return _OVER_HEADS[head_fusion](attn, dim=-3, out=out)


def fuse_heads_into(
    acc: torch.Tensor, attn: torch.Tensor, head_fusion: str = "mean", work: torch.Tensor | None = None
) -> torch.Tensor:
    """Fold the heads of ``attn`` [..., c, r, N] into the running fusion ``acc`` [..., r, N], in place.

    ``acc`` starts at :data:`FUSION_START` [head_fusion]; after every head has been folded in, "mean" still has to be
    divided by the number of heads (:func:`finish_fusion`). Chunks of heads may arrive in any order. ``work`` (shaped
    like ``acc``, optional) receives the heads' sum, max or min on the way, instead of a new tensor (a chunk of one
    head is folded in as it is).
    """
    heads = _over_heads(attn, head_fusion, work if attn.shape[-3] > 1 else None)
    return _PAIRWISE[head_fusion](acc, heads, out=acc)


def start_fusion(out: torch.Tensor, attn: torch.Tensor, head_fusion: str = "mean") -> torch.Tensor:
    """The running fusion ``out`` [..., r, N] of the first heads of these rows, written (not folded) from ``attn``
    [..., c, r, N]: what :func:`fuse_heads_into` gives from an accumulator at :data:`FUSION_START`, without filling it
    first. Later chunks of the same rows are folded in with :func:`fuse_heads_into`."""
    return _over_heads(attn, head_fusion, out)


def finish_fusion(acc: torch.Tensor, num_heads: int, head_fusion: str) -> torch.Tensor:
    """The fused attention from an accumulator that has seen all ``num_heads`` heads (in place)."""
    return acc.div_(num_heads) if head_fusion == "mean" else acc


def fuse_heads(attn: torch.Tensor, head_fusion: str = "mean") -> torch.Tensor:
    """Fuse the head axis (dim -3) of ``attn`` [..., H, N, N] into [..., N, N]."""
    if head_fusion not in HEAD_FUSIONS:
        raise ValueError(f"head_fusion must be one of {HEAD_FUSIONS}, got {head_fusion!r}")
    shape = attn.shape[:-3] + attn.shape[-2:]
    acc = torch.full(shape, FUSION_START[head_fusion], dtype=attn.dtype, device=attn.device)
    return finish_fusion(fuse_heads_into(acc, attn, head_fusion), attn.shape[-3], head_fusion)


def discard_lowest(fused: torch.Tensor, num_prefix_tokens: int, discard_ratio: float) -> torch.Tensor:
    """Zero the lowest ``discard_ratio`` fraction of patch-to-patch entries of each [N, N] matrix.

    Entries in rows or columns of prefix tokens (CLS, distillation token, registers) are never discarded, so the
    CLS row keeps its mass. Exactly ``k = floor(ratio * P*P)`` entries go: the k smallest values, ties broken by
    position, lowest row-major (flat) index of the [P, P] patch block first. The order comes from a stable sort, so
    the result is the same on every build and device (``topk`` returns tied entries in an unspecified order).

    Args:
        fused: head-fused attention [..., N, N].
        num_prefix_tokens: leading tokens whose rows and columns are kept.
        discard_ratio: fraction in [0, 1) of the [P, P] patch-to-patch entries to zero.

    Returns:
        a copy of ``fused`` [..., N, N] with those entries zeroed (``fused`` itself when the ratio is 0).
    """
    if not 0.0 <= discard_ratio < 1.0:
        raise ValueError(f"discard_ratio must be in [0, 1), got {discard_ratio}")
    if discard_ratio == 0.0:
        return fused
    p = num_prefix_tokens
    out = fused.clone()
    patch = out[..., p:, p:]  # [..., P, P] view
    flat = patch.reshape(*patch.shape[:-2], -1)
    k = int(flat.shape[-1] * discard_ratio)
    if k > 0:
        # stable ascending sort: equal values keep their flat order, so the lowest indices among ties go first
        idx = torch.sort(flat, dim=-1, stable=True).indices[..., :k]  # [..., k]
        flat = flat.scatter(-1, idx, 0.0)
        out[..., p:, p:] = flat.reshape(patch.shape)
    return out


def add_row_product(v: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``v + v @ a`` in one operation (one kernel on a GPU): ``v`` [N] or [B, N]; ``a`` [N, N], or [B, N, N] for a
    batch whose images each take their own matrix (a row [N] shared by the batch then becomes one per image)."""
    if a.dim() == 2:
        return torch.addmv(v, a.mT, v) if v.dim() == 1 else torch.addmm(v, v, a)
    if a.dim() == 3:
        row = v.expand(a.shape[0], -1).unsqueeze(-2)  # [B, 1, N]
        return torch.baddbmm(row, row, a).squeeze(-2)
    return torch.matmul(v.unsqueeze(-2), a).squeeze(-2) + v


def residual_step(
    fused: torch.Tensor, x: torch.Tensor, side: str = "left", sums: torch.Tensor | None = None
) -> torch.Tensor:
    """One layer of the rollout with the residual path: ``x @ Â`` (side "left", x [..., N]) or ``Â @ x`` (side
    "right", x [N, M], ``fused`` [N, N] or a stack [L, N, N]), where Â = (A + I) with each row renormalised to sum to
    1, without forming Â.

    With s the row sums of A + I: x @ Â = (x / s) @ A + x / s, and Â @ x = (A @ x + x) / s. On the left, ``fused``
    may be a batch [B, N, N] with ``x`` [B, N] (or [N], the same row for every matrix): one row through each matrix.
    ``sums``: s when the caller has it already (e.g. taken for every layer at once), else it is taken here.
    """
    s = fused.sum(dim=-1) + 1.0 if sums is None else sums  # [N], or [B, N]
    if side == "left":
        return add_row_product(x / s, fused)
    if side == "right":  # row i of each matrix by its own sum (a stack [L, N, N] too)
        if fused.dim() == x.dim() == 2:
            return torch.addmm(x, fused, x).div_(s.unsqueeze(-1))  # x + A @ x in one operation
        if fused.dim() == x.dim() == 3:
            return torch.baddbmm(x, fused, x).div_(s.unsqueeze(-1))  # a batch of matrices, each with its own x
        return (fused @ x + x) / s.unsqueeze(-1)
    raise ValueError(f"side must be 'left' or 'right', got {side!r}")


def add_residual(fused: torch.Tensor) -> torch.Tensor:
    """Â = (A + I) with each row renormalised to sum to 1 (the residual connection's share), [N, N]."""
    sums = fused.sum(dim=-1, keepdim=True).add_(1.0)  # the row sums of A + I, as residual_step takes them
    out = fused.clone()
    out.diagonal(dim1=-2, dim2=-1).add_(1.0)  # A + I, without a product with the identity
    return out.div_(sums)


def rollout_fused(
    fused: torch.Tensor, num_prefix_tokens: int, discard_ratio: float = 0.0, start_layer: int = 0
) -> torch.Tensor:
    """Rollout of already head-fused attention ``fused`` [L, N, N] -> joint attention [N, N].

    joint = Â_{L-1} ··· Â_{start_layer}, with Â as in :func:`add_residual` after :func:`discard_lowest`.
    """
    if fused.dim() != 3 or fused.shape[-1] != fused.shape[-2]:
        raise ValueError(f"expected fused attention shaped [L, N, N], got {tuple(fused.shape)}")
    num_layers, n, _ = fused.shape
    if not 0 <= start_layer < num_layers:
        raise ValueError(f"start_layer must be in [0, {num_layers - 1}], got {start_layer}")
    if not 0 <= num_prefix_tokens < n:
        raise ValueError(f"num_prefix_tokens must be in [0, {n - 1}], got {num_prefix_tokens}")
    joint = torch.eye(n, dtype=torch.float64, device=fused.device)
    for layer in range(start_layer, num_layers):
        a = discard_lowest(fused[layer].to(torch.float64), num_prefix_tokens, discard_ratio)
        joint = residual_step(a, joint, side="right")  # [N, N]
    return joint.to(fused.dtype)


def rollout(
    attn: torch.Tensor,
    num_prefix_tokens: int,
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
    start_layer: int = 0,
) -> torch.Tensor:
    """Attention rollout of per-head attention ``attn`` [L, H, N, N] -> joint attention [N, N].

    Args:
        attn: post-softmax attention of every layer and head, rows summing to 1.
        num_prefix_tokens: CLS + distillation + register tokens at the front of the sequence.
        head_fusion: "mean" (the paper), "max" or "min" (as offered by vit-explain).
        discard_ratio: fraction of the fused patch-to-patch entries to zero per layer (0 keeps all).
        start_layer: first layer included in the product.

    Returns:
        joint [N, N]; row 0 restricted to columns ``num_prefix_tokens:`` is the CLS rollout map over the patches.
    """
    if attn.dim() != 4:
        raise ValueError(f"expected attention shaped [L, H, N, N], got {tuple(attn.shape)}")
    return rollout_fused(fuse_heads(attn, head_fusion), num_prefix_tokens, discard_ratio, start_layer)


def rollout_row(
    fused_layer: Callable[[int], torch.Tensor] | torch.Tensor,
    num_layers: int,
    weights: torch.Tensor,
    num_prefix_tokens: int,
    discard_ratio: float = 0.0,
    start_layer: int = 0,
) -> torch.Tensor:
    """One row of the rollout, ``weights`` [N] @ Â_{L-1} ··· Â_{start_layer}, in O(L·N²) instead of O(L·N³).

    Equal to ``weights @ rollout_fused(...)`` but multiplies a vector through the layers from the top down, so the
    [N, N] joint matrix is never formed and each layer's fused attention is needed only once.

    Args:
        fused_layer: layer index -> head-fused attention [N, N] of that layer (called from the top layer down), or
            [B, N, N] for a batch of B images (each image's row through its own matrices; the result is then [B, N]);
            or every layer's at once, stacked layer first ([L, N, N] or [L, B, N, N]): without discarding, their row
            sums are then taken in one pass and each layer costs two operations (a GPU's kernel launches), not four.
        num_layers: L.
        weights: [N]; e.g. one-hot at the CLS token for the CLS row (or [B, N], one row per image of a batch).
        num_prefix_tokens, discard_ratio, start_layer: as in :func:`rollout_fused`.
    """
    if not 0 <= start_layer < num_layers:
        raise ValueError(f"start_layer must be in [0, {num_layers - 1}], got {start_layer}")
    v = weights.to(torch.float64)
    sums = None
    if isinstance(fused_layer, torch.Tensor):
        stack = fused_layer
        if stack.shape[0] != num_layers:
            raise ValueError(f"a stack of {stack.shape[0]} layers' fused attention, expected {num_layers}")
        if discard_ratio == 0.0:  # the row sums of A + I of every layer used, in one pass
            sums = stack[start_layer:].sum(dim=-1, dtype=torch.float64).add_(1.0)
        fused_layer = stack.__getitem__
    for layer in range(num_layers - 1, start_layer - 1, -1):
        a = discard_lowest(fused_layer(layer).to(torch.float64), num_prefix_tokens, discard_ratio)
        # [N], on the attention's device (the weights are made on the host)
        v = residual_step(a, to_device(v, a.device), sums=None if sums is None else sums[layer - start_layer])
    return v.to(weights.dtype if weights.is_floating_point() else torch.float32)
