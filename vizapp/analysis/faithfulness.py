"""Deletion and insertion curves for judging saliency maps.

Paper: Petsiuk, Das & Saenko, "RISE: Randomized Input Sampling for Explanation of Black-box Models", BMVC 2018.

Patches are ranked by decreasing saliency. Deletion starts from the image and replaces the top-ranked patches by a
baseline, a few at a time; insertion starts from the baseline and reveals the image's patches in the same order.
The class probability is recorded after every step and the area under the curve is taken over the fraction of
patches changed, in [0, 1]. A faithful saliency map makes the probability fall fast under deletion (lower deletion
AUC is better) and rise fast under insertion (higher insertion AUC is better). Compare a map's AUCs with those of
:func:`random_order_saliency`.

Insertion here starts from the same baseline as deletion (a constant or a given image, not the paper's blurred
copy of the input); pass a blurred image as ``baseline`` to get the paper's variant.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

MODES = ("deletion", "insertion")


@dataclass(frozen=True, eq=False)
class Curve:
    """A deletion or insertion curve.

    Attributes:
        fractions: [S+1] fraction of the patches deleted (or inserted) at each step, from 0 to 1.
        probs: [S+1] probability of the class at each step; ``probs[0]`` is the unchanged image (deletion) or the
            baseline (insertion), ``probs[-1]`` the other end.
        auc: trapezoid-rule area under ``probs`` over ``fractions``.
    """

    fractions: np.ndarray
    probs: np.ndarray
    auc: float


def _pair(x: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(x, int):
        return (x, x)
    a, b = x
    return (int(a), int(b))


def trapezoid_auc(x: np.ndarray, y: np.ndarray) -> float:
    """Area under the piecewise-linear curve through (x[k], y[k]) [K] by the trapezoid rule."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2.0))


def patch_order(saliency: torch.Tensor) -> torch.Tensor:
    """Patch indices by decreasing saliency, ties in increasing index order: flat [P] int64."""
    s = saliency.detach().reshape(-1).to(device="cpu", dtype=torch.float64)
    if not bool(torch.isfinite(s).all()):
        raise ValueError("saliency contains non-finite values")
    return torch.from_numpy(np.argsort(-s.numpy(), kind="stable"))


def step_counts(num_patches: int, steps: int | None = None) -> np.ndarray:
    """Number of patches changed after each step, [S+1] int64 from 0 to ``num_patches``, strictly increasing.

    ``steps=None`` changes one patch per step (S = P); otherwise step k changes floor(k * P / S) patches in all.
    """
    if steps is None:
        steps = num_patches
    if not 1 <= steps <= num_patches:
        raise ValueError(f"steps must be in [1, {num_patches}], got {steps}")
    k = np.arange(steps + 1, dtype=np.int64)
    return (k * num_patches) // steps


def random_order_saliency(num_patches: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A saliency [P] float32 whose ranking is a uniformly random permutation (the random baseline).

    The values are a random permutation of 0..P-1, so there are no ties; pass a seeded ``generator`` to reproduce.
    """
    if num_patches < 1:
        raise ValueError(f"num_patches must be >= 1, got {num_patches}")
    return torch.randperm(num_patches, generator=generator).to(torch.float32)


def perturbation_curve(
    predict: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    saliency: torch.Tensor,
    grid_size: int | Sequence[int],
    patch_size: int | Sequence[int],
    class_idx: int,
    mode: str = "deletion",
    steps: int | None = None,
    baseline: torch.Tensor | float = 0.0,
    batch_size: int = 32,
) -> Curve:
    """Deletion or insertion curve of ``saliency`` for class ``class_idx``.

    Args:
        predict: maps images [B, C, H, W] to class probabilities [B, K] (apply softmax inside). Called under
            ``torch.no_grad()`` with batches of at most ``batch_size`` images on ``image``'s device and dtype.
        image: the input [C, H, W], already preprocessed as ``predict`` expects; H = gh * ph and W = gw * pw.
        saliency: [P] (row-major) or [gh, gw] patch scores; higher means more important.
        grid_size: gh or (gh, gw) patches.
        patch_size: ph or (ph, pw) pixels.
        class_idx: column of ``predict``'s output to record.
        mode: "deletion" (image -> baseline, lower AUC is better) or "insertion" (baseline -> image, higher AUC is
            better).
        steps: number of steps S; None changes one patch per step (S = P). Step k has floor(k * P / S) patches
            changed, so ``fractions`` are exact fractions of patches.
        baseline: value of a removed (deletion) or not yet revealed (insertion) pixel: a float, or a tensor
            broadcastable to [C, H, W] (e.g. a blurred copy of the image, or per-channel means as [C, 1, 1]).
        batch_size: images per ``predict`` call.

    Returns:
        :class:`Curve` with S+1 points: step 0 is the image (deletion) or the baseline (insertion), step S the other
        end.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if image.dim() != 3:
        raise ValueError(f"expected image [C, H, W], got {tuple(image.shape)}")
    gh, gw = _pair(grid_size)
    ph, pw = _pair(patch_size)
    c, h, w = image.shape
    if (h, w) != (gh * ph, gw * pw):
        raise ValueError(f"image is {h}x{w} but a {gh}x{gw} grid of {ph}x{pw} patches covers {gh * ph}x{gw * pw}")
    num_patches = gh * gw
    if saliency.numel() != num_patches:
        raise ValueError(f"saliency has {saliency.numel()} entries for a {gh}x{gw} grid")
    image = image.detach()
    if isinstance(baseline, torch.Tensor):
        base = baseline.detach().to(device=image.device, dtype=image.dtype).expand(c, h, w)  # [C, H, W]
    else:
        base = torch.full_like(image, float(baseline))  # [C, H, W]

    order = patch_order(saliency)  # [P]
    counts = step_counts(num_patches, steps)  # [S+1]
    # rank[p] = position of patch p in the order; patch p is changed at a step with count c iff rank[p] < c.
    rank = torch.empty(num_patches, dtype=torch.int64)
    rank[order] = torch.arange(num_patches)
    rank_pix = rank.reshape(gh, gw).repeat_interleave(ph, dim=0).repeat_interleave(pw, dim=1).to(image.device)  # [H, W]

    # Deletion shows the image where a pixel is unchanged; insertion shows it where a pixel is changed.
    start, end = (image, base) if mode == "deletion" else (base, image)
    probs = np.empty(counts.shape[0], dtype=np.float64)  # [S+1]
    with torch.no_grad():
        for lo in range(0, counts.shape[0], batch_size):
            cnt = torch.as_tensor(counts[lo : lo + batch_size], device=image.device)  # [B]
            changed = (rank_pix[None] < cnt[:, None, None])[:, None]  # [B, 1, H, W]
            batch = torch.where(changed, end[None], start[None])  # [B, C, H, W]
            out = predict(batch)  # [B, K]
            if out.dim() != 2 or out.shape[0] != batch.shape[0]:
                raise ValueError(f"predict must return [B, K] probabilities, got {tuple(out.shape)}")
            probs[lo : lo + batch.shape[0]] = out[:, class_idx].detach().to("cpu", torch.float64).numpy()
    fractions = counts.astype(np.float64) / num_patches
    return Curve(fractions=fractions, probs=probs, auc=trapezoid_auc(fractions, probs))


def deletion_insertion(
    predict: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    maps: dict[str, np.ndarray],
    grid_size: Sequence[int],
    patch_size: int | Sequence[int],
    class_idx: int,
    steps: int | None = 20,
    baseline: float = 0.0,
    random_seed: int | None = 0,
    batch_size: int = 64,
) -> dict[str, dict[str, Curve]]:
    """The deletion and insertion curves (:func:`perturbation_curve`) of every map [gh, gw] for one class, and of a
    random order named "random" (seeded by ``random_seed``; None leaves it out).

    Raises:
        ValueError: a map whose size is not the grid's.
    """
    gh, gw = (int(v) for v in grid_size)
    maps = dict(maps)
    if random_seed is not None:
        maps["random"] = random_order_saliency(gh * gw, torch.Generator().manual_seed(int(random_seed))).numpy()
    out: dict[str, dict[str, Curve]] = {}
    for name, m in maps.items():
        sal = torch.as_tensor(np.asarray(m, dtype=np.float32)).reshape(-1)
        if sal.numel() != gh * gw:
            raise ValueError(f"map {str(name)[:40]!r} has {sal.numel()} values for the {gh}x{gw} grid")
        out[name] = {
            mode: perturbation_curve(
                predict,
                image,
                sal,
                (gh, gw),
                patch_size,
                class_idx,
                mode=mode,
                steps=steps,
                baseline=baseline,
                batch_size=batch_size,
            )
            for mode in ("deletion", "insertion")
        }
    return out
