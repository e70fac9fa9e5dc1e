"""Cosine similarity of learned position embeddings (Dosovitskiy et al., ICLR 2021, Fig. 7 centre).

Tile (i, j) of the figure is patch position (i, j); cell (k, l) of that tile is the cosine similarity between the
embedding of position (i, j) and that of position (k, l).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def patch_pos_embed(pos_embed: torch.Tensor, num_prefix_tokens: int, no_embed_class: bool) -> torch.Tensor:
    """The patch rows of a timm ``pos_embed`` [1, E, D] (or [E, D]) -> [P, D].

    The leading ``num_prefix_tokens`` rows are dropped only when the model embeds its prefix tokens
    (``no_embed_class=False``); DeiT-III, register and DINOv2 models have patch rows only.
    """
    pe = pos_embed.detach()
    if pe.dim() == 3:
        pe = pe[0]
    if pe.dim() != 2:
        raise ValueError(f"expected pos_embed [1, E, D] or [E, D], got {tuple(pos_embed.shape)}")
    return pe if no_embed_class else pe[num_prefix_tokens:]


def pos_embed_similarity(patch_pos_embed: torch.Tensor, grid_size: int | Sequence[int]) -> torch.Tensor:
    """Cosine similarity grid of patch position embeddings.

    Args:
        patch_pos_embed: [P, D], one row per patch position in row-major order (prefix rows already removed).
        grid_size: (gh, gw) with gh * gw == P.

    Returns:
        [gh, gw, gh, gw]; [i, j, k, l] = cos(e_(i,j), e_(k,l)).
    """
    gh, gw = (grid_size, grid_size) if isinstance(grid_size, int) else (int(grid_size[0]), int(grid_size[1]))
    if patch_pos_embed.dim() != 2 or patch_pos_embed.shape[0] != gh * gw:
        raise ValueError(f"expected [{gh * gw}, D] patch embeddings for a {gh}x{gw} grid, got {tuple(patch_pos_embed.shape)}")
    e = patch_pos_embed.to(torch.float64)
    e = e / e.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    sim = (e @ e.T).clamp(-1.0, 1.0)  # [P, P]
    return sim.reshape(gh, gw, gh, gw).to(torch.float32)


def resample_patch_pos_embed(
    patch_pos_embed: torch.Tensor, old_grid: Sequence[int], new_grid: Sequence[int], interpolation: str = "bicubic"
) -> torch.Tensor:
    """Interpolate patch position embeddings [P, D] from ``old_grid`` to ``new_grid`` with timm's resampler."""
    from timm.layers import resample_abs_pos_embed

    out = resample_abs_pos_embed(
        patch_pos_embed[None].float(),
        new_size=[int(new_grid[0]), int(new_grid[1])],
        old_size=[int(old_grid[0]), int(old_grid[1])],
        num_prefix_tokens=0,
        interpolation=interpolation,
        antialias=True,
    )
    return out[0]
