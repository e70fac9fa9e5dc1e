"""Position structure of non-learned schemes (issue 13): RoPE similarity, relative-bias maps, scheme detection."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from timm.layers import apply_rot_embed_cat

from vizapp.analysis.posembed import (
    axial_rope_freqs,
    relative_bias_matrix,
    relative_bias_offset_map,
    rope_angle_similarity,
    rope_similarity,
)
from vizapp.posinfo import (
    POSITION_KINDS,
    position_info,
    relative_bias_maps,
    rope_angles,
    rope_frequencies_from_timm,
    rope_position_similarity,
)

ROPE_MODELS = [
    ("eva02_tiny_patch14_224", dict(img_size=56, depth=2), "rope-axial"),  # index grid rescaled to ref 16x16
    ("vit_small_patch16_dinov3", dict(img_size=64, depth=2), "rope-axial"),  # centred coords, half layout
    ("vit_small_patch16_rope_224", dict(img_size=(48, 80), depth=2), "rope-axial"),  # 'xy' indexing, non-square
    ("vit_base_patch16_rope_mixed_224", dict(img_size=64, depth=2), "rope-mixed"),
]


def build(name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **kwargs).eval()


# ----------------------------------------------------------------------------------------------------------------
# Hand-computed RoPE cases


def test_one_frequency_pair_gives_cos_of_the_offset():
    w = 0.7
    sim = rope_similarity(torch.tensor([[0.0, w]]), (1, 5))  # one pair acting on the column
    assert sim.shape == (1, 5, 1, 5)
    for j in range(5):
        for k in range(5):
            assert float(sim[0, j, 0, k]) == pytest.approx(math.cos(w * (j - k)), abs=1e-6)


def test_axial_pairs_average_their_cosines():
    freqs = axial_rope_freqs(torch.tensor([0.5], dtype=torch.float64), torch.tensor([1.3], dtype=torch.float64))
    assert freqs.tolist() == [[0.5, 0.0], [0.0, 1.3]]
    sim = rope_similarity(freqs, (3, 4))
    # (row 2, col 0) against (row 0, col 3): Δ = (2, -3)
    assert float(sim[2, 0, 0, 3]) == pytest.approx((math.cos(0.5 * 2) + math.cos(1.3 * -3)) / 2, abs=1e-6)


def test_mixed_frequency_vectors_per_head():
    freqs = torch.tensor([[[0.3, 0.5]], [[1.0, 0.0]]])  # [H=2, F=1, 2]
    sim = rope_similarity(freqs, (3, 4))
    assert sim.shape == (2, 3, 4, 3, 4)
    assert float(sim[0, 2, 3, 0, 1]) == pytest.approx(math.cos(0.3 * 2 + 0.5 * 2), abs=1e-6)
    assert float(sim[1, 2, 3, 0, 1]) == pytest.approx(math.cos(2.0), abs=1e-6)
    assert float(sim[1, 0, 0, 0, 3]) == pytest.approx(1.0, abs=1e-6)  # head 1 ignores the column


@pytest.mark.parametrize("seed", range(5))
def test_rope_similarity_is_symmetric_with_unit_diagonal(seed):
    g = torch.Generator().manual_seed(seed)
    freqs = torch.randn(3, 8, 2, generator=g)
    sim = rope_similarity(freqs, (4, 6)).reshape(3, 24, 24)
    torch.testing.assert_close(sim, sim.transpose(-1, -2))
    torch.testing.assert_close(torch.diagonal(sim, dim1=-2, dim2=-1), torch.ones(3, 24))
    # the angle form and the frequency form agree
    angles = torch.randn(5, 24, 7, generator=g)
    assert rope_angle_similarity(angles, (4, 6)).shape == (5, 4, 6, 4, 6)


def test_rope_similarity_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\[\.\.\., F, 2\]"):
        rope_similarity(torch.zeros(4, 3), (2, 2))
    with pytest.raises(ValueError, match="positions"):
        rope_similarity(torch.zeros(4, 2), (2, 2), positions=torch.zeros(3, 3, 2))


# ----------------------------------------------------------------------------------------------------------------
# timm RoPE models: frequencies read from the model, checked against timm's own rotation


def _equal_norm_pairs(head_dim: int, half: bool, seed: int) -> torch.Tensor:
    """A random unit vector whose F = head_dim / 2 rotation pairs all have norm 1/sqrt(F), in timm's layout."""
    g = torch.Generator().manual_seed(seed)
    f = head_dim // 2
    pairs = torch.randn(f, 2, generator=g, dtype=torch.float64)
    pairs = pairs / pairs.norm(dim=-1, keepdim=True) / math.sqrt(f)
    if half:
        return torch.cat([pairs[:, 0], pairs[:, 1]])  # (x_f, x_{f+D/2})
    return pairs.reshape(-1)  # (x_2f, x_2f+1)


@pytest.mark.parametrize(("name", "kwargs", "kind"), ROPE_MODELS, ids=[m[0] for m in ROPE_MODELS])
def test_rope_similarity_equals_timm_rotated_dot_products(name, kwargs, kind):
    # q_rot(i) · q_rot(j) = Σ_f |q_f|² cos(θ_f(i) − θ_f(j)) = mean_f cos(...) for a unit q with equal-norm pairs.
    model = build(name, **kwargs)
    info = position_info(model)
    assert info.kind == kind and info.frequencies is not None
    gh, gw = info.grid_size
    p = gh * gw
    emb = model.rope.get_embed(shape=[gh, gw]).double()  # [..., P, 2 * head_dim], the tensor the attention applies
    head_dim = emb.shape[-1] // 2
    half = bool(getattr(model.blocks[0].attn, "rotate_half", False))
    q = _equal_norm_pairs(head_dim, half, seed=1).expand(*emb.shape[:-2], p, head_dim)
    q_rot = apply_rot_embed_cat(q, emb, half=half)  # [..., P, head_dim]
    dots = q_rot @ q_rot.transpose(-1, -2)  # [..., P, P]
    sim = rope_position_similarity(model)
    assert sim.shape == (*emb.shape[:-2], gh, gw, gh, gw)
    torch.testing.assert_close(sim.reshape(dots.shape).double(), dots, atol=2e-5, rtol=0)
    # and the frequency form alone (integer patch grid) reproduces it
    torch.testing.assert_close(rope_similarity(info.frequencies, (gh, gw)), sim, atol=1e-6, rtol=0)


def test_axial_frequencies_act_on_one_axis_each_and_mixed_on_both():
    kind, freqs = rope_frequencies_from_timm(build("vit_small_patch16_rope_224", img_size=(48, 80), depth=2))
    assert kind == "rope-axial" and freqs.shape == (32, 2)
    one_axis = (freqs[:, 0].abs() < 1e-9) | (freqs[:, 1].abs() < 1e-9)
    assert bool(one_axis.all())
    assert int((freqs[:, 0].abs() > 1e-9).sum()) == int((freqs[:, 1].abs() > 1e-9).sum()) == 16  # half rows, half cols
    kind, freqs = rope_frequencies_from_timm(build("vit_base_patch16_rope_mixed_224", img_size=64, depth=2))
    assert kind == "rope-mixed" and freqs.shape == (2, 12, 32, 2)  # [L, H, F, 2]
    assert bool(((freqs[..., 0].abs() > 1e-6) & (freqs[..., 1].abs() > 1e-6)).any())


def test_rope_angles_of_a_model_without_rope():
    with pytest.raises(ValueError, match="no rotary"):
        rope_angles(build("vit_tiny_patch16_224", img_size=32, depth=1))


# ----------------------------------------------------------------------------------------------------------------
# Relative-position bias


def _known_table(table: torch.Tensor) -> torch.Tensor:
    r, h = table.shape
    return (1000 * torch.arange(h)[None, :] + torch.arange(r)[:, None]).to(table.dtype)  # [R, H]: 1000·head + row


def test_offset_map_reads_the_table_at_the_right_offsets_by_hand():
    table = _known_table(torch.zeros(5 * 7 + 3, 2))  # 3x4 grid: 5x7 offsets, plus BEiT's 3 CLS rows
    m = relative_bias_offset_map(table, (3, 4))
    assert m.shape == (2, 5, 7)
    # (Δrow, Δcol) = (1, -2) -> row (1 + 2) * 7 + (-2 + 3) = 22 of the table
    assert float(m[1, 1 + 2, -2 + 3]) == 1000 + 22
    assert float(m[0, 0, 0]) == 0 and float(m[0, 4, 6]) == 34  # most negative and most positive offsets
    b = relative_bias_matrix(m)  # [H, 12, 12]
    # query (2, 0) = patch 8, key (1, 2) = patch 6: p_i - p_j = (1, -2)
    assert float(b[1, 8, 6]) == 1022 and float(b[0, 6, 8]) == (-1 + 2) * 7 + (2 + 3)


def test_beit_bias_maps_by_hand_and_against_its_own_bias_matrix():
    model = build("beit_base_patch16_224", img_size=48, depth=2)  # 3x3 grid
    attn = model.blocks[1].attn
    with torch.no_grad():
        attn.relative_position_bias_table.copy_(_known_table(attn.relative_position_bias_table))
    maps = relative_bias_maps(model)
    assert maps.shape == (2, 12, 5, 5)
    assert float(maps[1, 3, 2 + 2, -1 + 2]) == 3000 + (2 + 2) * 5 + (-1 + 2)  # Δ = (2, -1)
    for layer in range(2):
        # BEiT's own [1, H, N, N] matrix (N = 1 CLS + 9 patches), the one added to the logits
        own = model.blocks[layer].attn._get_rel_pos_bias()[0, :, 1:, 1:]
        torch.testing.assert_close(relative_bias_matrix(maps[layer]), own.float())


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),  # per-block log-coordinate MLP ('cr' mode)
        dict(rel_pos_type="mlp_swin"),  # 16·sigmoid(MLP) as in Swin-V2
        dict(rel_pos_type="bias"),  # per-block table
        dict(shared_rel_pos=True),  # one MLP shared by all blocks
        dict(class_token=True),  # prefix token: bias padded with zeros for it
    ],
    ids=["mlp", "mlp_swin", "bias", "shared", "cls"],
)
def test_relpos_vit_bias_maps_equal_the_models_own_bias(kwargs):
    model = build("vit_relpos_small_patch16_224", img_size=48, depth=2, **kwargs)
    maps = relative_bias_maps(model)
    assert maps.shape == (2, 6, 5, 5)
    p = model.num_prefix_tokens
    for layer in range(2):
        rel = model.shared_rel_pos if model.shared_rel_pos is not None else model.blocks[layer].attn.rel_pos
        own = rel.get_bias()[0]  # [H, N, N] with zero rows/columns for prefix tokens
        torch.testing.assert_close(relative_bias_matrix(maps[layer]), own[:, p:, p:].float())
    if kwargs.get("shared_rel_pos"):
        torch.testing.assert_close(maps[0], maps[1])


def test_relpos_bias_table_by_hand():
    model = build("vit_relpos_small_patch16_224", img_size=48, depth=1, rel_pos_type="bias")
    rel = model.blocks[0].attn.rel_pos
    with torch.no_grad():
        rel.relative_position_bias_table.copy_(_known_table(rel.relative_position_bias_table))
    maps = relative_bias_maps(model)
    assert float(maps[0, 5, -2 + 2, 0 + 2]) == 5000 + (-2 + 2) * 5 + (0 + 2)  # Δ = (-2, 0)


# ----------------------------------------------------------------------------------------------------------------
# Scheme detection


@pytest.mark.parametrize(
    ("name", "kwargs", "kind", "learned"),
    [
        ("vit_tiny_patch16_224", dict(img_size=32, depth=1), "learned", True),
        ("eva02_tiny_patch14_224", dict(img_size=56, depth=1), "rope-axial", True),
        ("vit_small_patch16_dinov3", dict(img_size=64, depth=1), "rope-axial", False),
        ("vit_base_patch16_rope_mixed_224", dict(img_size=64, depth=1), "rope-mixed", False),
        ("beit_base_patch16_224", dict(img_size=48, depth=1), "relative-bias", False),
        ("vit_relpos_small_patch16_224", dict(img_size=48, depth=1), "relative-bias", False),
        ("vit_srelpos_small_patch16_224", dict(img_size=48, depth=1), "relative-bias", False),  # one shared bias
        ("vit_tiny_patch16_224", dict(img_size=32, depth=1, pos_embed="none"), "none", False),
    ],
)
def test_position_info_kinds(name, kwargs, kind, learned):
    from vizapp.models.timm import position_scheme

    model = build(name, **kwargs)
    info = position_info(model)
    # the adapter's scheme (what the app's Position tab shows) agrees with posinfo's reading
    assert position_scheme(model) == {"rope-axial": "rope", "rope-mixed": "rope", "relative-bias": "relative"}.get(
        info.kind, info.kind
    )
    assert info.kind == kind and info.kind in POSITION_KINDS
    assert info.has_learned_pos_embed is learned
    assert info.sentence.endswith(".") and len(info.sentence) > 40
    assert ("learned absolute position embedding is added" in info.sentence) is (learned and kind != "learned")
    if kind.startswith("rope"):
        assert info.frequencies is not None
    else:
        assert info.frequencies is None
