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
        raise ValueError(
            f"expected [{gh * gw}, D] patch embeddings for a {gh}x{gw} grid, got {tuple(patch_pos_embed.shape)}"
        )
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


# ----------------------------------------------------------------------------------------------------------------
# Position structure of schemes without a learned absolute embedding (issue 13)


def _grid(grid_size: int | Sequence[int]) -> tuple[int, int]:
    return (grid_size, grid_size) if isinstance(grid_size, int) else (int(grid_size[0]), int(grid_size[1]))


def grid_positions(grid_size: int | Sequence[int]) -> torch.Tensor:
    """Integer (row, col) of every patch, [gh, gw, 2] float64: the unit in which :func:`rope_similarity` reads ω."""
    gh, gw = _grid(grid_size)
    rows, cols = torch.meshgrid(
        torch.arange(gh, dtype=torch.float64), torch.arange(gw, dtype=torch.float64), indexing="ij"
    )
    return torch.stack([rows, cols], dim=-1)


def axial_rope_freqs(row_freqs: torch.Tensor, col_freqs: torch.Tensor) -> torch.Tensor:
    """Frequency vectors of axial 2-D RoPE: ``row_freqs`` [Fr] act on the row, ``col_freqs`` [Fc] on the column.

    Returns:
        [Fr + Fc, 2]; row f is (ω_row, ω_col) of frequency pair f, one of them zero.
    """
    r = row_freqs.to(torch.float64).flatten()
    c = col_freqs.to(torch.float64).flatten()
    return torch.cat([torch.stack([r, torch.zeros_like(r)], -1), torch.stack([torch.zeros_like(c), c], -1)])


def rope_angle_similarity(angles: torch.Tensor, grid_size: int | Sequence[int]) -> torch.Tensor:
    """Similarity RoPE induces between positions, from the rotation angle of every frequency pair at every position.

    For identical q = k whose frequency pairs all have the same norm, the rotated dot product between positions i and
    j, divided by |q|², is mean_f cos(θ_f(i) − θ_f(j)); computed as (cos·cosᵀ + sin·sinᵀ) / F.

    Args:
        angles: [..., P, F] rotation angle (radians) of each of F frequency pairs at each of P = gh·gw positions.
        grid_size: (gh, gw).

    Returns:
        [..., gh, gw, gh, gw] in [-1, 1], 1 on the diagonal.
    """
    gh, gw = _grid(grid_size)
    if angles.dim() < 2 or angles.shape[-2] != gh * gw:
        raise ValueError(f"expected angles [..., {gh * gw}, F] for a {gh}x{gw} grid, got {tuple(angles.shape)}")
    a = angles.to(torch.float64)
    c, s = a.cos(), a.sin()  # [..., P, F]
    sim = (c @ c.transpose(-1, -2) + s @ s.transpose(-1, -2)) / a.shape[-1]  # [..., P, P]
    return sim.clamp(-1.0, 1.0).reshape(*a.shape[:-2], gh, gw, gh, gw).to(torch.float32)


def rope_similarity(
    freqs: torch.Tensor, grid_size: int | Sequence[int], positions: torch.Tensor | None = None
) -> torch.Tensor:
    """Similarity the rotary embedding alone induces between grid positions (Su et al. 2021; 2-D: Heo et al. 2024).

    With frequency vectors ω_f = (ω_row, ω_col) and positions p, identical q and k (equal-norm frequency pairs) give
    sim(i, j) = (1/F) Σ_f cos(ω_f · (p_i − p_j)). Axial RoPE has one zero component per ω_f (see
    :func:`axial_rope_freqs`); mixed RoPE learns both, per head (and per layer in timm).

    Args:
        freqs: [F, 2] (axial or one head) or [..., F, 2] (e.g. [H, F, 2], [L, H, F, 2]); radians per unit of
            ``positions``.
        grid_size: (gh, gw).
        positions: [gh, gw, 2] (row, col) coordinate of each patch; default the integer grid (:func:`grid_positions`).

    Returns:
        [..., gh, gw, gh, gw]: [..., i, j, k, l] = similarity between patches (i, j) and (k, l).
    """
    gh, gw = _grid(grid_size)
    if freqs.dim() < 2 or freqs.shape[-1] != 2:
        raise ValueError(f"expected frequency vectors [..., F, 2], got {tuple(freqs.shape)}")
    pos = grid_positions((gh, gw)) if positions is None else positions.to(torch.float64)
    if tuple(pos.shape) != (gh, gw, 2):
        raise ValueError(f"expected positions [{gh}, {gw}, 2], got {tuple(pos.shape)}")
    angles = pos.reshape(-1, 2) @ freqs.to(torch.float64).transpose(-1, -2)  # [..., P, F]
    return rope_angle_similarity(angles, (gh, gw))


def relative_bias_offset_map(table: torch.Tensor, grid_size: int | Sequence[int]) -> torch.Tensor:
    """A learned relative-position bias table as a map over offsets (BEiT, Bao et al. 2022; Swin-style tables).

    timm lays the table out row-major over offsets: entry (Δrow + gh − 1)·(2gw − 1) + (Δcol + gw − 1) holds the bias
    for a query at p_i and a key at p_j with (Δrow, Δcol) = p_i − p_j. Entries past (2gh − 1)(2gw − 1) (BEiT's three
    CLS entries) are ignored.

    Args:
        table: [R, H] with R >= (2gh − 1)(2gw − 1).
        grid_size: (gh, gw).

    Returns:
        [H, 2gh − 1, 2gw − 1]; [h, Δrow + gh − 1, Δcol + gw − 1] = bias of head h at that offset.
    """
    gh, gw = _grid(grid_size)
    n = (2 * gh - 1) * (2 * gw - 1)
    if table.dim() != 2 or table.shape[0] < n:
        raise ValueError(f"expected a bias table [>= {n}, H] for a {gh}x{gw} grid, got {tuple(table.shape)}")
    return table[:n].detach().T.reshape(table.shape[1], 2 * gh - 1, 2 * gw - 1)


def relative_bias_matrix(offset_map: torch.Tensor) -> torch.Tensor:
    """Patch-to-patch bias [H, P, P] from an offset map [H, 2gh − 1, 2gw − 1]: bias[h, i, j] = map at p_i − p_j."""
    if offset_map.dim() != 3 or offset_map.shape[-1] % 2 == 0 or offset_map.shape[-2] % 2 == 0:
        raise ValueError(f"expected an offset map [H, 2gh-1, 2gw-1], got {tuple(offset_map.shape)}")
    gh, gw = (offset_map.shape[-2] + 1) // 2, (offset_map.shape[-1] + 1) // 2
    pos = grid_positions((gh, gw)).reshape(-1, 2).long()  # [P, 2]
    d = pos[:, None, :] - pos[None, :, :]  # [P, P, 2]: p_i - p_j
    return offset_map[:, d[..., 0] + gh - 1, d[..., 1] + gw - 1]  # [H, P, P]
