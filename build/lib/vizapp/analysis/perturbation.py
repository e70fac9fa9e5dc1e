"""Positive and negative perturbation tests, with accuracy-AUC scores.

Paper: Chefer, Gur & Wolf, "Transformer Interpretability Beyond Attention Visualization", CVPR 2021 (Sec. 4, Table 1).

Patches are removed in the order of a relevance map: *positive* perturbation removes the most relevant first (a
faithful map makes accuracy fall fast: lower AUC is better), *negative* perturbation the least relevant first (a
faithful map keeps accuracy up: higher AUC is better). Accuracy is measured after removing 10 %, 20 %, ... 90 % of the
patches; the point x = 0 is the unperturbed accuracy, and the score is the trapezoid area under accuracy over x,
times 100. Because the area is linear in the accuracies, the mean of per-image areas equals the area of the mean
curve, so per-image areas give standard errors directly.

Everything here is pure torch/numpy: no model, no hooks.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from vizapp.analysis.faithfulness import patch_order, trapezoid_auc

CHEFER_FRACTIONS: tuple[float, ...] = tuple(k / 10 for k in range(10))
"""x of the published curves: 0 (the unperturbed image), 0.1, ... 0.9 of the patches removed."""

DIRECTIONS = ("positive", "negative")


def removal_order(saliency: torch.Tensor, direction: str) -> torch.Tensor:
    """Patch indices in the order they are removed, flat [P] int64.

    Args:
        saliency: [P] or [gh, gw] relevance; higher means more relevant.
        direction: "positive" (most relevant first) or "negative" (least relevant first). Ties go in increasing
            patch index order either way.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    s = saliency.detach().reshape(-1).to(device="cpu", dtype=torch.float64)
    return patch_order(s if direction == "positive" else -s)


def removal_counts(num_patches: int, fractions: Sequence[float] = CHEFER_FRACTIONS) -> np.ndarray:
    """Patches removed at each fraction: floor(f * P) [S] int64 (a small epsilon guards 0.3 * 10 = 2.9999...)."""
    if num_patches < 1:
        raise ValueError(f"num_patches must be >= 1, got {num_patches}")
    f = np.asarray(fractions, dtype=np.float64)
    if f.ndim != 1 or (f < 0).any() or (f > 1).any():
        raise ValueError(f"fractions must be a 1-D sequence in [0, 1], got {fractions!r}")
    return np.floor(f * num_patches + 1e-9).astype(np.int64)


def changed_masks(order: torch.Tensor, counts: np.ndarray | Sequence[int]) -> torch.Tensor:
    """[S, P] bool: patch p is changed at step s when it is among the first ``counts[s]`` patches of ``order``."""
    order = torch.as_tensor(order, dtype=torch.int64).reshape(-1)
    num_patches = order.numel()
    rank = torch.empty(num_patches, dtype=torch.int64)
    rank[order] = torch.arange(num_patches)
    cnt = torch.as_tensor(np.asarray(counts, dtype=np.int64))  # [S]
    if (cnt < 0).any() or (cnt > num_patches).any():
        raise ValueError(f"counts must be in [0, {num_patches}]")
    return rank[None, :] < cnt[:, None]  # [S, P]


def compose(
    masks: torch.Tensor,
    changed: torch.Tensor,
    unchanged: torch.Tensor,
    grid_size: int | Sequence[int],
    patch_size: int | Sequence[int],
) -> torch.Tensor:
    """Images [S, C, H, W] showing ``changed`` where a patch's mask is set and ``unchanged`` elsewhere.

    Args:
        masks: [S, P] bool, row-major patches.
        changed: what a changed patch shows, broadcastable to [C, H, W] (the fill value, or the image for insertion).
        unchanged: what the other patches show, broadcastable to [C, H, W].
        grid_size: gh or (gh, gw); patch_size: ph or (ph, pw); H = gh * ph, W = gw * pw.
    """
    gh, gw = (grid_size, grid_size) if isinstance(grid_size, int) else tuple(grid_size)
    ph, pw = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)
    s = masks.shape[0]
    if masks.shape[1] != gh * gw:
        raise ValueError(f"masks have {masks.shape[1]} patches for a {gh}x{gw} grid")
    pix = masks.reshape(s, gh, gw).repeat_interleave(ph, dim=1).repeat_interleave(pw, dim=2)  # [S, H, W]
    return torch.where(pix[:, None].to(unchanged.device), changed, unchanged)  # [S, C, H, W]


def perturbed_images(
    image: torch.Tensor,
    saliency: torch.Tensor,
    grid_size: int | Sequence[int],
    patch_size: int | Sequence[int],
    direction: str,
    fill: torch.Tensor | float,
    fractions: Sequence[float] = CHEFER_FRACTIONS[1:],
) -> torch.Tensor:
    """The image with ``fractions`` of its patches removed (set to ``fill``) in ``direction`` order: [S, C, H, W].

    Args:
        image: [C, H, W] model input. fill: a float or a tensor broadcastable to [C, H, W] (e.g. per-channel [C, 1, 1]).
        fractions: the removed fractions; the default 0.1 .. 0.9 leaves out x = 0, which is the image itself.
    """
    if image.dim() != 3:
        raise ValueError(f"expected image [C, H, W], got {tuple(image.shape)}")
    order = removal_order(saliency, direction)
    masks = changed_masks(order, removal_counts(order.numel(), fractions))
    fill_t = torch.as_tensor(fill, dtype=image.dtype, device=image.device).expand_as(image)  # [C, H, W]
    return compose(masks, fill_t, image, grid_size, patch_size)


def accuracy_auc(correct: np.ndarray | Sequence[float], fractions: Sequence[float] = CHEFER_FRACTIONS) -> np.ndarray:
    """Area under accuracy over the removed fraction, times 100 (the score of Chefer et al.'s Table 1).

    Args:
        correct: [..., S] accuracies (or 0/1 per image) at ``fractions``, x = 0 first.
        fractions: [S] x values.

    Returns:
        [...] areas, float64 (a 0-d array for one curve).
    """
    y = np.asarray(correct, dtype=np.float64)
    x = np.asarray(fractions, dtype=np.float64)
    if y.shape[-1] != x.shape[0]:
        raise ValueError(f"{y.shape[-1]} accuracies for {x.shape[0]} fractions")
    if y.ndim == 1:
        return np.asarray(100.0 * trapezoid_auc(x, y))
    return 100.0 * np.sum((x[1:] - x[:-1]) * (y[..., 1:] + y[..., :-1]) / 2.0, axis=-1)
