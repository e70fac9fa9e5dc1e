"""Which position scheme a timm model uses, and its parameters, for the position views (issue 13).

Learned absolute embeddings (ViT, Dosovitskiy et al. 2021) are shown by :func:`vizapp.analysis.pos_embed_similarity`.
Rotary embeddings (RoFormer, Su et al. 2021; 2-D axial and mixed, Heo et al. ECCV 2024) are read here from the rotation
angles timm itself produces (the model's ``rope.get_embed``), so every timm variant (EVA02's rescaled index grid,
DINOv3's centred coordinates, mixed RoPE's learned per-head vectors) is covered by one rule: angles that are affine
in the patch index give frequencies in radians per patch step. Relative-position biases (BEiT, Bao et al. ICLR 2022;
timm's ``vit_relpos_*``) are read from each block's table or MLP as maps over the offset.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vizapp.analysis.posembed import (
    grid_positions,
    relative_bias_offset_map,
    rope_angle_similarity,
    rope_similarity,
)

__all__ = [
    "POSITION_KINDS",
    "PositionInfo",
    "position_info",
    "relative_bias_maps",
    "rope_angles",
    "rope_frequencies_from_timm",
    "rope_position_similarity",
]

POSITION_KINDS = ("learned", "rope-axial", "rope-mixed", "relative-bias", "none")


@dataclass(frozen=True, eq=False)
class PositionInfo:
    """A model's position scheme.

    Attributes:
        kind: one of :data:`POSITION_KINDS`.
        grid_size: (gh, gw) patch grid the parameters refer to.
        frequencies: RoPE frequency vectors (ω_row, ω_col) in radians per patch step: [F, 2] for "rope-axial",
            [L, H, F, 2] for "rope-mixed"; None otherwise, or when the angles are not affine in the patch index.
        has_learned_pos_embed: True when a learned absolute ``pos_embed`` is also added (e.g. EVA02, ``*_rope_ape_*``).
        sentence: what to tell the person looking at the position view.
    """

    kind: str
    grid_size: tuple[int, int]
    frequencies: torch.Tensor | None
    has_learned_pos_embed: bool
    sentence: str


def _grid_size(model: torch.nn.Module) -> tuple[int, int]:
    g = model.patch_embed.grid_size
    return (int(g[0]), int(g[1]))


def _has_learned_pos_embed(model: torch.nn.Module) -> bool:
    return isinstance(getattr(model, "pos_embed", None), torch.nn.Parameter)


def _rope_module(model: torch.nn.Module) -> torch.nn.Module | None:
    rope = getattr(model, "rope", None)
    return rope if isinstance(rope, torch.nn.Module) and hasattr(rope, "get_embed") else None


def _rotate_half(model: torch.nn.Module) -> bool:
    """timm's two sin/cos layouts: interleaved pairs (x0, x1) or halves (x_f, x_{f + D/2}); the attention knows."""
    attn = getattr(model.blocks[0], "attn", None)
    return bool(getattr(attn, "rotate_half", getattr(_rope_module(model), "rotate_half", False)))


@torch.no_grad()
def rope_angles(model: torch.nn.Module) -> torch.Tensor:
    """Rotation angle of every frequency pair at every patch, from the model's own RoPE embedding.

    Args:
        model: a timm model with a ``rope`` module (Eva family: eva02_*, vit_*_dinov3, vit_*_rope_*).

    Returns:
        [P, F] for axial RoPE, [L, H, P, F] for mixed RoPE; radians in (-π, π]; P = gh·gw patches in row-major order,
        F = head_dim / 2.
    """
    rope = _rope_module(model)
    if rope is None:
        raise ValueError(f"{type(model).__name__} has no rotary position embedding")
    emb = rope.get_embed(shape=list(_grid_size(model))).detach().to(torch.float64)  # [..., P, 2 * head_dim]
    sin, cos = emb.chunk(2, dim=-1)  # [..., P, head_dim] each
    d = sin.shape[-1]
    if _rotate_half(model):
        sin, cos = sin[..., : d // 2], cos[..., : d // 2]  # [f0, f1, ..., f0, f1, ...]
    else:
        sin, cos = sin[..., 0::2], cos[..., 0::2]  # [f0, f0, f1, f1, ...]
    return torch.atan2(sin, cos)


def _affine_frequencies(angles: torch.Tensor, grid_size: tuple[int, int], atol: float = 1e-4) -> torch.Tensor | None:
    """(ω_row, ω_col) per pair [..., F, 2] when angles [..., P, F] are θ0 + row·ω_row + col·ω_col (mod 2π), else None."""
    gh, gw = grid_size
    if gh < 2 or gw < 2:
        return None
    a = angles.reshape(*angles.shape[:-2], gh, gw, angles.shape[-1])  # [..., gh, gw, F]
    d_row = a[..., 1, 0, :] - a[..., 0, 0, :]
    d_col = a[..., 0, 1, :] - a[..., 0, 0, :]
    w_row, w_col = torch.atan2(d_row.sin(), d_row.cos()), torch.atan2(d_col.sin(), d_col.cos())  # wrap to (-π, π]
    freqs = torch.stack([w_row, w_col], dim=-1)  # [..., F, 2]
    # the rebuilt angles must match the model's everywhere (compared as points on the circle, so mod 2π is fine)
    rebuilt = a[..., :1, :1, :] + torch.einsum("hwc,...fc->...hwf", grid_positions((gh, gw)), freqs)
    if (rebuilt - a).cos().min() < 1 - atol:
        return None
    return freqs


def rope_frequencies_from_timm(model: torch.nn.Module) -> tuple[str, torch.Tensor | None]:
    """("rope-axial", [F, 2]) or ("rope-mixed", [L, H, F, 2]) frequency vectors in radians per patch step.

    The frequencies are None when the model's angles are not affine in the patch index (then use
    :func:`rope_angles` with :func:`vizapp.analysis.rope_angle_similarity`). Raises ValueError without RoPE.
    """
    angles = rope_angles(model)
    kind = "rope-axial" if angles.dim() == 2 else "rope-mixed"
    return kind, _affine_frequencies(angles, _grid_size(model))


def _holds_bias(module: torch.nn.Module | None) -> bool:
    """A BEiT table or a timm RelPosMlp on this module itself (what :func:`_bias_map_of` reads)."""
    return isinstance(getattr(module, "relative_position_bias_table", None), torch.Tensor) or (
        getattr(module, "mlp", None) is not None and isinstance(getattr(module, "rel_coords_log", None), torch.Tensor)
    )


def _bias_map_of(module: torch.nn.Module, grid_size: tuple[int, int]) -> torch.Tensor | None:
    """[H, 2gh-1, 2gw-1] from a BEiT attention / shared bias, or a timm RelPosBias / RelPosMlp; None if it has none."""
    table = getattr(module, "relative_position_bias_table", None)
    if isinstance(table, torch.Tensor):
        return relative_bias_offset_map(table, grid_size)
    mlp, coords = getattr(module, "mlp", None), getattr(module, "rel_coords_log", None)
    if mlp is not None and isinstance(coords, torch.Tensor):  # RelPosMlp: bias = gain * act(mlp(log coords))
        bias = mlp(coords).permute(2, 0, 1)  # [H, 2gh-1, 2gw-1]
        bias = module.bias_act(bias)
        gain = getattr(module, "bias_gain", None)
        return (bias if gain is None else gain * bias).detach()
    return None


@torch.no_grad()
def relative_bias_maps(model: torch.nn.Module) -> torch.Tensor:
    """Learned relative-position bias of every layer and head as maps over the offset (Δrow, Δcol) = p_query − p_key.

    Args:
        model: a timm BEiT (per-block tables and/or a shared one, summed as the model adds them) or a
            VisionTransformerRelPos (``vit_relpos_*``: per-block or shared table or MLP).

    Returns:
        [L, H, 2gh − 1, 2gw − 1]; [l, h, Δrow + gh − 1, Δcol + gw − 1] is added to the attention logit of a query at
        p_i and a key at p_j = p_i − (Δrow, Δcol) in layer l, head h (prefix tokens' entries are not included).
    """
    own, shared = relative_bias_modules(model)
    return layer_bias_maps(own, shared, _grid_size(model), type(model).__name__)


def relative_bias_modules(model: torch.nn.Module) -> tuple[list[torch.nn.Module | None], torch.nn.Module | None]:
    """A timm model's relative-position bias modules: each block's own (its attention's BEiT table or RelPosMlp, or
    its ``rel_pos``; None where it has none) and the one shared by all blocks (BEiT's ``rel_pos_bias``,
    VisionTransformerRelPos's ``shared_rel_pos``), or None."""
    shared = next(
        (
            m
            for m in (getattr(model, n, None) for n in ("rel_pos_bias", "shared_rel_pos"))
            if isinstance(m, torch.nn.Module)
        ),
        None,
    )
    own = []
    for blk in model.blocks:
        attn = getattr(blk, "attn", None)
        rel_pos = getattr(attn, "rel_pos", None)
        own.append(attn if _holds_bias(attn) else rel_pos if isinstance(rel_pos, torch.nn.Module) else None)
    return own, shared


@torch.no_grad()
def layer_bias_maps(
    layers: list[torch.nn.Module | None],
    shared: torch.nn.Module | None,
    grid: tuple[int, int],
    what: str,
) -> torch.Tensor:
    """[L, H, 2gh − 1, 2gw − 1]: each layer's own bias module (a BEiT table, timm's RelPosBias / RelPosMlp; None for
    none) plus the ``shared`` one, as the model adds them (see :func:`relative_bias_maps`). ``what`` names the model in
    the error when no layer has a bias."""
    common = _bias_map_of(shared, grid) if isinstance(shared, torch.nn.Module) else None
    maps = []
    for module in layers:
        mine = _bias_map_of(module, grid) if isinstance(module, torch.nn.Module) else None
        if mine is None and common is None:
            raise ValueError(f"{what} has no learned relative-position bias")
        maps.append(mine + common if mine is not None and common is not None else mine if mine is not None else common)
    return torch.stack(maps).float()  # [L, H, 2gh-1, 2gw-1]


def _has_relative_bias(model: torch.nn.Module) -> bool:
    try:
        relative_bias_maps(model)
    except (ValueError, AttributeError, RuntimeError):
        return False
    return True


RELATIVE_BIAS_SENTENCE = (
    "Learned relative-position bias: each head adds a learned value to the attention logit that depends only "
    "on the (row, column) offset between query and key."
)
AXIAL_ROPE_SENTENCE = (
    "Rotary position embedding (axial 2-D RoPE): each pair of query/key channels is rotated by an angle "
    "proportional to the row or the column index, so attention depends on the offset between patches."
)


def position_info(model: torch.nn.Module) -> PositionInfo:
    """Classify a timm ViT's position scheme and read its parameters.

    Args:
        model: a timm ViT-like model (``blocks`` and ``patch_embed.grid_size``).

    Returns:
        the :class:`PositionInfo`; RoPE is checked first, then a relative-position bias, then ``pos_embed``.
    """
    grid = _grid_size(model)
    learned = _has_learned_pos_embed(model)
    also = " A learned absolute position embedding is added as well." if learned else ""
    if _rope_module(model) is not None:
        kind, freqs = rope_frequencies_from_timm(model)
        if kind == "rope-axial":
            sentence = AXIAL_ROPE_SENTENCE
        else:
            sentence = (
                "Mixed rotary position embedding (Heo et al. 2024): every head of every layer learns its own 2-D "
                "frequency directions, so each head can prefer a different direction of offset."
            )
        if freqs is None:
            sentence += " Its angles are not on a regular grid here, so no frequencies are given."
        return PositionInfo(kind, grid, freqs, learned, sentence + also)
    if _has_relative_bias(model):
        return PositionInfo("relative-bias", grid, None, learned, RELATIVE_BIAS_SENTENCE + also)
    if learned:
        return PositionInfo(
            "learned", grid, None, True, "Learned absolute position embedding: one learned vector per patch position."
        )
    pe = getattr(model, "pos_embed", None)
    if isinstance(pe, torch.Tensor):
        sentence = "Fixed (not learned) absolute position embedding, e.g. 2-D sin-cos: nothing learned to show."
    else:
        sentence = "No position information is added: the model sees the patches as an unordered set."
    return PositionInfo("none", grid, None, False, sentence)


def rope_position_similarity(model: torch.nn.Module) -> torch.Tensor:
    """The RoPE similarity grid of a model: [gh, gw, gh, gw] (axial) or [L, H, gh, gw, gh, gw] (mixed)."""
    kind, freqs = rope_frequencies_from_timm(model)
    grid = _grid_size(model)
    if freqs is not None:
        return rope_similarity(freqs, grid)
    return rope_angle_similarity(rope_angles(model), grid)
