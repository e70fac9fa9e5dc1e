"""Positive and negative perturbation tests, with accuracy-AUC scores, under two protocols.

Paper: Chefer, Gur & Wolf, "Transformer Interpretability Beyond Attention Visualization", CVPR 2021 (Sec. 4, Table 1).

*Positive* perturbation removes the most relevant input first (a faithful map makes accuracy fall fast: lower AUC is
better), *negative* perturbation the least relevant first (a faithful map keeps accuracy up: higher AUC is better).
Two protocols (:data:`PROTOCOLS`):

- ``"chefer2021"``, the authors' own procedure (hila-chefer/Transformer-Explainability,
  ``baselines/ViT/generate_visualizations.py`` and ``pertubation_eval_from_hdf5.py``): the [gh, gw] map is upsampled
  bilinearly by the patch size and min-max scaled (:func:`upsample_map`); at each step fraction f = 0.1 ... 0.9 the top
  ``int(H·W·f)`` **pixels** of the map (``torch.topk`` over the flattened pixels; negative ranks ``-map``) are set to 0
  on every channel before the input normalisation (:func:`pixel_masks`, :func:`pixel_perturbed_images`). The AUC is
  taken over the nominal x = 0, 0.1, ... 0.9, as the authors take it.
- ``"patches"``, vizapp's patch variant: whole patches are removed in the order of the patch map, ``floor(f·P)`` of
  them at step f (:func:`patch_perturbed_images`); the AUC is taken over the fraction actually removed,
  ``floor(f·P) / P`` (:func:`patch_fractions`), e.g. 4/49, 9/49, ... 44/49 on a 7x7 grid.

In both, x = 0 is the unperturbed accuracy and the score is the trapezoid area under accuracy over x, times 100.
Because the area is linear in the accuracies, the mean of per-image areas equals the area of the mean curve (for a
fixed x), so per-image areas give standard errors directly.

Everything here is pure torch/numpy: no model, no hooks.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from vizapp.analysis.faithfulness import patch_order, trapezoid_auc
from vizapp.transfer import to_device

CHEFER_FRACTIONS: tuple[float, ...] = tuple(k / 10 for k in range(10))
"""x of the published curves: 0 (the unperturbed image), 0.1, ... 0.9 of the image removed."""

DIRECTIONS = ("positive", "negative")

PROTOCOLS = ("chefer2021", "patches")
"""``chefer2021``: the authors' pixel procedure; ``patches``: vizapp's whole-patch variant (see the module docstring)."""


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


def patch_fractions(num_patches: int, fractions: Sequence[float] = CHEFER_FRACTIONS) -> np.ndarray:
    """The fraction of the patches the ``patches`` protocol actually removes at each step: floor(f·P) / P [S] float64.

    These are its curves' x positions: on a 7x7 grid, 0, 4/49, 9/49, ... 44/49 rather than the nominal 0, 0.1, ... 0.9.
    """
    return removal_counts(num_patches, fractions) / float(num_patches)


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
    # the patch masks (not their pixels) move to where the images are, without a wait (vizapp.transfer)
    pix = to_device(masks, unchanged.device).reshape(s, gh, gw).repeat_interleave(ph, dim=1)
    pix = pix.repeat_interleave(pw, dim=2)  # [S, H, W]
    return torch.where(pix[:, None], changed, unchanged)  # [S, C, H, W]


def patch_perturbed_images(
    image: torch.Tensor,
    saliency: torch.Tensor,
    grid_size: int | Sequence[int],
    patch_size: int | Sequence[int],
    direction: str,
    fill: torch.Tensor | float,
    fractions: Sequence[float] = CHEFER_FRACTIONS[1:],
) -> torch.Tensor:
    """The ``patches`` protocol: the image with floor(f·P) of its patches removed (set to ``fill``) in ``direction``
    order, for each f of ``fractions``: [S, C, H, W]. Ties in the map go by patch index (:func:`removal_order`).

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


def upsample_map(saliency: torch.Tensor, patch_size: int | Sequence[int]) -> torch.Tensor:
    """A patch map as a pixel map, as Chefer et al.'s ``generate_visualizations.py`` forms it: [H, W] float32.

    ``F.interpolate(map[None, None], scale_factor=patch, mode="bilinear")`` (align_corners=False, PyTorch's default and
    the authors'), then min-max scaled to [0, 1] in float32. A constant map (max = min, where the authors' division
    would give NaN everywhere) is returned as zeros: every pixel ties. A stack [M, gh, gw] gives [M, H, W], each map
    scaled by its own min and max (bilinear interpolation and the scaling are per map, so a stack equals its maps
    one by one).

    Args:
        saliency: [gh, gw] patch map (or a stack [M, gh, gw]); higher means more relevant.
        patch_size: ph or (ph, pw); H = gh·ph, W = gw·pw.
    """
    if saliency.dim() not in (2, 3):
        raise ValueError(f"expected a [gh, gw] map, got {tuple(saliency.shape)}")
    ph, pw = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)
    s = saliency.detach().to(device="cpu", dtype=torch.float32)
    if not bool(torch.isfinite(s).all()):
        raise ValueError("saliency contains non-finite values")
    stack = s.reshape(-1, 1, *s.shape[-2:])  # [M, 1, gh, gw]
    up = F.interpolate(stack, scale_factor=(ph, pw), mode="bilinear")[:, 0]  # [M, H, W]
    lo = up.amin(dim=(1, 2), keepdim=True)
    hi = up.amax(dim=(1, 2), keepdim=True)
    span = hi - lo
    out = torch.where(span > 0, (up - lo) / torch.where(span > 0, span, 1.0), 0.0)
    return out.reshape(*s.shape[:-2], *up.shape[-2:])


def pixel_masks(
    pixel_map: torch.Tensor, direction: str | Sequence[str], fractions: Sequence[float] = CHEFER_FRACTIONS[1:]
) -> torch.Tensor:
    """[S, H, W] bool: the pixels the ``chefer2021`` protocol removes at each step, as the authors'
    ``pertubation_eval_from_hdf5.py`` picks them.

    At step fraction f the removed pixels are ``torch.topk(map, int(H·W·f))`` over the flattened map (positive), or
    over ``-map`` (negative). Each step is its own topk, as in the authors' loop. Ties are broken by ``torch.topk``
    itself (which pixel of a tie it returns is its own, unspecified choice; bilinear upsampling makes ties at the
    image border, where edge pixels copy the nearest value).

    A stack of maps [M, H, W] (with one direction, or one per map) gives [M, S, H, W] from one topk per step over
    the whole stack, on the host. The topk runs with ``sorted=False``: the authors' call sorts the k pixels it
    returns, which changes their order but not which pixels they are (the mask is a set), and at f >= 0.1 the sort
    was about nine tenths of the time (tests check the sets equal the authors' sorted call's, ties included).

    Args:
        pixel_map: [H, W] pixel relevance (see :func:`upsample_map`), or a stack [M, H, W].
        direction: "positive" (most relevant first) or "negative" (least relevant first); for a stack, one for all
            or a sequence of M.
        fractions: step fractions; the default 0.1 .. 0.9 leaves out x = 0, which is the image itself.
    """
    if pixel_map.dim() not in (2, 3):
        raise ValueError(f"expected an [H, W] map, got {tuple(pixel_map.shape)}")
    stack = pixel_map.detach().to("cpu").reshape(-1, *pixel_map.shape[-2:])  # [M, H, W]
    m, h, w = stack.shape
    directions = [direction] * m if isinstance(direction, str) else list(direction)
    if len(directions) != m:
        raise ValueError(f"{len(directions)} directions for {m} maps")
    for d in directions:
        if d not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {d!r}")
    for f in fractions:
        if not 0.0 <= float(f) <= 1.0:
            raise ValueError(f"fractions must be in [0, 1], got {f!r}")
    sign = torch.tensor([1.0 if d == "positive" else -1.0 for d in directions], dtype=stack.dtype)
    vis = stack.reshape(m, h * w) * sign[:, None]  # [M, H·W]; -map for the negative direction, as the authors
    masks = torch.zeros(m, len(fractions), h * w, dtype=torch.bool)
    for step, f in enumerate(fractions):
        _, idx = torch.topk(vis, int(h * w * f), dim=-1, sorted=False)  # [M, k]
        masks[:, step].scatter_(1, idx, True)
    return masks.reshape(m, len(fractions), h, w) if pixel_map.dim() == 3 else masks.reshape(len(fractions), h, w)


def pixel_perturbed_images(
    image: torch.Tensor,
    saliency: torch.Tensor,
    patch_size: int | Sequence[int],
    direction: str,
    fill: torch.Tensor | float,
    fractions: Sequence[float] = CHEFER_FRACTIONS[1:],
) -> torch.Tensor:
    """The ``chefer2021`` protocol: the image with the top ``int(H·W·f)`` pixels of the upsampled map set to ``fill``
    on every channel, for each f of ``fractions``: [S, C, H, W].

    Args:
        image: [C, H, W] model input (normalised). saliency: [gh, gw] patch map. patch_size: ph or (ph, pw).
        fill: the removed pixels' value, a float or a tensor broadcastable to [C, H, W]; the authors zero pixels
            before normalising, i.e. ``(0 - mean) / std`` per channel [C, 1, 1] in the normalised input.
    """
    if image.dim() != 3:
        raise ValueError(f"expected image [C, H, W], got {tuple(image.shape)}")
    return masked_copies(image, pixel_masks(upsample_map(saliency, patch_size), direction, fractions), fill)


def masked_copies(image: torch.Tensor, masks: torch.Tensor, fill: torch.Tensor | float) -> torch.Tensor:
    """[S, C, H, W]: ``image`` [C, H, W] with the pixels of each mask [S, H, W] (bool, any device) set to ``fill``
    (a float or a tensor broadcastable to [C, H, W]) on every channel, formed on the image's device."""
    if tuple(masks.shape[-2:]) != tuple(image.shape[-2:]):
        raise ValueError(
            f"the map upsampled by the patch size is {tuple(masks.shape[-2:])}, the image {tuple(image.shape[-2:])}: "
            "the image must be the patch grid times the patch size"
        )
    fill_t = torch.as_tensor(fill, dtype=image.dtype, device=image.device).expand_as(image)  # [C, H, W]
    return torch.where(masks.to(image.device)[:, None], fill_t, image)


def accuracy_auc(correct: np.ndarray | Sequence[float], fractions: Sequence[float] = CHEFER_FRACTIONS) -> np.ndarray:
    """Area under accuracy over the removed fraction, times 100 (the score of Chefer et al.'s Table 1): the trapezoid
    rule, as ``np.trapz(acc, x) * 100`` in the authors' issue #31.

    Args:
        correct: [..., S] accuracies (or 0/1 per image) at ``fractions``, x = 0 first.
        fractions: [S] x values: the nominal 0, 0.1, ... 0.9 for ``chefer2021``, :func:`patch_fractions` for
            ``patches``.

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
