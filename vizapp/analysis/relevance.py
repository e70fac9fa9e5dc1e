"""Gradient-weighted attention maps: gradient rollout and relevance propagation (Chefer, Gur & Wolf, ICCV 2021).

Paper: "Generic Attention-model Explainability for Interpreting Bi-Modal and Encoder-Decoder Transformers"; its
self-attention rule is R <- R + Ā R with Ā = E_h[(∇A ⊙ A)^+].

Both maps weight each layer's attention by the gradient of the class score with respect to that same layer's
attention. ``grad[l]`` must be the gradient of ``attn[l]``: jacobgil/vit-explain zips its attention list with the
reversed gradient list (its issue #6), which pairs layer l's attention with layer L-1-l's gradient; this module does
not. Everything is computed in float64 and returned as float32.
"""

from __future__ import annotations

import torch

from vizapp.analysis.rollout import add_row_product, rollout_fused
from vizapp.transfer import to_device


def _check_pair(attn: torch.Tensor, grad: torch.Tensor, start_layer: int) -> None:
    if attn.dim() != 4 or attn.shape[-1] != attn.shape[-2]:
        raise ValueError(f"expected attention shaped [L, H, N, N], got {tuple(attn.shape)}")
    if grad.shape != attn.shape:
        raise ValueError(f"gradient shape {tuple(grad.shape)} differs from attention shape {tuple(attn.shape)}")
    if not 0 <= start_layer < attn.shape[0]:
        raise ValueError(f"start_layer must be in [0, {attn.shape[0] - 1}], got {start_layer}")


def grad_weighted_heads(attn: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Ā = mean over heads of max(grad ⊙ attn, 0), per layer, accumulated in float64.

    The product is formed in the inputs' precision when both are float32 (one rounding of a product, far below the
    tolerance any view needs) and the head mean accumulated in float64: a third of the time of an all-float64 pass
    on ViT-B/16's [12, 12, 197, 197].

    Args:
        attn: attention [..., H, N, N].
        grad: gradient of the class score with respect to ``attn``, same shape.

    Returns:
        [..., N, N] float64. Entries are non-negative; rows need not sum to 1 and may be all zero.
    """
    dtype = torch.promote_types(torch.promote_types(attn.dtype, grad.dtype), torch.float32)
    a = attn.detach().to(dtype)
    g = grad.detach().to(device=a.device, dtype=dtype)
    return torch.mul(g, a).clamp_(min=0.0).mean(dim=-3, dtype=torch.float64)


def grad_weighted_heads_into(out: torch.Tensor, attn: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """:func:`grad_weighted_heads` of float32 ``attn`` and ``grad`` [..., H, N, N] written into ``out`` [..., N, N]
    float64, with the product formed in ``grad``'s own memory: ``grad`` is overwritten, so it must be a gradient
    nobody reads again. The same operations as :func:`grad_weighted_heads` (whose head mean on the CPU is this sum
    divided by H), without allocating the product or the fusion. Returns ``out``."""
    if attn.dtype != torch.float32 or grad.dtype != torch.float32 or grad.shape != attn.shape:
        raise ValueError(f"expected float32 attention and gradient of one shape, got {attn.dtype}, {grad.dtype}")
    product = grad.mul_(attn.detach()).clamp_(min=0.0)
    return torch.sum(product, dim=-3, dtype=torch.float64, out=out).div_(attn.shape[-3])


def grad_rollout(
    attn: torch.Tensor,
    grad: torch.Tensor,
    num_prefix_tokens: int,
    discard_ratio: float = 0.0,
    start_layer: int = 0,
) -> torch.Tensor:
    """Gradient-weighted attention rollout (the "grad rollout" of jacobgil/vit-explain, with per-layer pairing).

    Per layer the heads are fused as Ā_l = mean_h max(grad_l ⊙ attn_l, 0); then, as in
    :func:`vizapp.analysis.rollout.rollout_fused`, the lowest ``discard_ratio`` patch-to-patch entries are zeroed,
    the identity is added, rows are renormalised, and the layers are multiplied from ``start_layer`` upward.
    Ā's rows may sum to anything, including 0, but Ā + I has every row sum >= 1 (Ā >= 0 and the diagonal gets
    +1), so the renormalisation never divides by zero and every row of the result sums to 1.

    Note: vit-explain clamps after averaging the heads; this follows Chefer et al. and clamps each head first.

    Args:
        attn: post-softmax attention [L, H, N, N].
        grad: d(class score)/d(attn), [L, H, N, N]; ``grad[l]`` belongs to ``attn[l]``.
        num_prefix_tokens: CLS + distillation + register tokens before the patches.
        discard_ratio: fraction of the fused patch-to-patch entries zeroed per layer, in [0, 1).
        start_layer: first layer included in the product.

    Returns:
        joint [N, N] float32, row-stochastic. ``cls_map(joint, num_prefix_tokens)`` gives the flat [P] patch map.
    """
    _check_pair(attn, grad, start_layer)
    fused = grad_weighted_heads(attn, grad)  # [L, N, N] float64
    return rollout_fused(fused, num_prefix_tokens, discard_ratio, start_layer).to(torch.float32)


def chefer_relevance(attn: torch.Tensor, grad: torch.Tensor, start_layer: int = 0) -> torch.Tensor:
    """Relevance matrix of Chefer et al. (ICCV 2021), the self-attention update rule.

    R = I; for l = start_layer .. L-1: Ā_l = mean_h max(grad_l ⊙ attn_l, 0) and R <- R + Ā_l R.

    Args:
        attn: post-softmax attention [L, H, N, N].
        grad: d(class score)/d(attn), [L, H, N, N]; ``grad[l]`` belongs to ``attn[l]``.
        start_layer: first layer whose update is applied.

    Returns:
        R [N, N] float32, non-negative with R >= I elementwise. ``cls_map(R, num_prefix_tokens)`` is the flat [P]
        patch map (the paper's relevance of the CLS token).
    """
    _check_pair(attn, grad, start_layer)
    fused = grad_weighted_heads(attn, grad)  # [L, N, N] float64
    n = fused.shape[-1]
    r = torch.eye(n, dtype=torch.float64, device=fused.device)  # [N, N]
    for layer in range(start_layer, fused.shape[0]):
        r = r + fused[layer] @ r
    return r.to(torch.float32)


def relevance_row(fused: torch.Tensor, weights: torch.Tensor, start_layer: int = 0) -> torch.Tensor:
    """One row of Chefer et al.'s relevance, ``weights`` [N] @ R, from the gradient-weighted fusions Ā [L, N, N]
    (:func:`grad_weighted_heads`) in O(L·N²): R = (I + Ā_{L-1}) ··· (I + Ā_start), so the row is carried from the
    top layer down, v <- v + v Ā_l, and R itself is never formed. Equal to ``weights @ chefer_relevance(...)``.

    For a batch, Ā is [B, L, N, N] and ``weights`` [N] or [B, N]: each image's row through its own Ā, [B, N]."""
    if fused.dim() not in (3, 4) or not 0 <= start_layer < fused.shape[-3]:
        raise ValueError(
            f"expected Ā shaped [L, N, N] or [B, L, N, N] and start_layer in range, got {tuple(fused.shape)}, "
            f"{start_layer}"
        )
    v = to_device(weights, fused.device, torch.float64)  # the weights are made on the host
    for layer in range(fused.shape[-3] - 1, start_layer - 1, -1):
        a = fused[..., layer, :, :].to(torch.float64)
        v = add_row_product(v, a)  # v + v Ā_l in one operation (a batch: each image's row through its own)
    return v


def cls_map(joint: torch.Tensor, num_prefix_tokens: int, query: int = 0) -> torch.Tensor:
    """Row ``query`` of ``joint`` [N, N] over the patch columns -> flat [P] (reshape to [gh, gw] row-major).

    Args:
        joint: a rollout / relevance matrix [N, N].
        num_prefix_tokens: tokens before the patches; the map keeps columns ``num_prefix_tokens:``.
        query: the row (token) whose map is read, 0 for CLS.

    Returns:
        [P] view of ``joint``'s row, P = N - num_prefix_tokens.
    """
    if joint.dim() != 2 or joint.shape[0] != joint.shape[1]:
        raise ValueError(f"expected a square [N, N] matrix, got {tuple(joint.shape)}")
    n = joint.shape[0]
    if not 0 <= num_prefix_tokens < n:
        raise ValueError(f"num_prefix_tokens must be in [0, {n - 1}], got {num_prefix_tokens}")
    if not 0 <= query < n:
        raise ValueError(f"query must be in [0, {n - 1}], got {query}")
    return joint[query, num_prefix_tokens:]
