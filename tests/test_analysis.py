"""Analyses: hand-worked cases, agreement with a second code path, and properties over many seeds."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vizapp.analysis import (
    mean_attention_distance,
    patch_pos_embed,
    pos_embed_similarity,
    resample_patch_pos_embed,
    rollout,
    uniform_reference_distance,
)
from vizapp.analysis.rollout import discard_lowest, fuse_heads

# ---------------------------------------------------------------------------------------------------- rollout


def test_rollout_two_layers_three_tokens_by_hand():
    a1 = torch.tensor([[0.5, 0.25, 0.25], [0.0, 1.0, 0.0], [0.5, 0.0, 0.5]])
    a2 = torch.tensor([[0.2, 0.4, 0.4], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    attn = torch.stack([a1, a2])[:, None]  # [L=2, H=1, 3, 3]
    joint = rollout(attn, num_prefix_tokens=1)
    # Â1 = [[.75,.125,.125],[0,1,0],[.25,0,.75]], Â2 = [[.6,.2,.2],[.25,.75,0],[0,0,1]], joint = Â2 Â1
    expected = torch.tensor([[0.5, 0.275, 0.225], [0.1875, 0.78125, 0.03125], [0.25, 0.0, 0.75]])
    torch.testing.assert_close(joint, expected, atol=1e-6, rtol=0)
    # start_layer=1 keeps only Â2
    torch.testing.assert_close(rollout(attn, 1, start_layer=1)[0], torch.tensor([0.6, 0.2, 0.2]), atol=1e-6, rtol=0)


def test_rollout_discard_renormalises_rows_not_columns():
    a = torch.tensor([[0.2, 0.5, 0.3], [0.1, 0.6, 0.3], [0.4, 0.4, 0.2]])[None, None]
    joint = rollout(a, num_prefix_tokens=1, discard_ratio=0.25)
    # Lowest patch-patch entry (0.2 at [2, 2]) is zeroed; A+I rows sum to 2, 2, 1.8 and each row is divided by its own sum.
    expected = torch.tensor([[0.6, 0.25, 0.15], [0.05, 0.8, 0.15], [4 / 18, 4 / 18, 10 / 18]])
    torch.testing.assert_close(joint, expected, atol=1e-6, rtol=0)
    # vit-explain's bug (a / a.sum(-1) without keepdim) would give 0.3 / 1.8 for joint[0, 2]:
    assert not math.isclose(float(joint[0, 2]), 0.3 / 1.8, abs_tol=1e-3)


def test_discard_never_touches_prefix_rows_or_columns():
    a = torch.rand(7, 7)
    a[0, :] = 1e-9
    a[:, 1] = 1e-9
    out = discard_lowest(a, num_prefix_tokens=2, discard_ratio=0.9)
    assert torch.equal(out[:2], a[:2]) and torch.equal(out[:, :2], a[:, :2])
    assert int((out[2:, 2:] == 0).sum()) == int(25 * 0.9)


def test_head_fusions():
    a = torch.softmax(torch.randn(1, 3, 4, 4), -1)
    m = rollout(a, 1, head_fusion="max")
    n = rollout(a, 1, head_fusion="min")
    assert m.shape == n.shape == (4, 4)
    with pytest.raises(ValueError, match="head_fusion"):
        rollout(a, 1, head_fusion="median")


def test_head_fusion_in_chunks_by_hand():
    """Two heads of a 1x2 attention, fused by hand; the first chunk of rows is written, later ones folded in, in either
    order of heads, and the layer statistics' fusion equals the whole-head fusion whatever the chunking."""
    from vizapp.analysis.distance import patch_distance_matrix
    from vizapp.analysis.rollout import FUSION_START, finish_fusion, fuse_heads_into, start_fusion
    from vizapp.streaming import LayerStatistics

    a = torch.tensor([[[0.25, 0.75]], [[0.5, 0.5]]])  # [H=2, r=1, N=2]
    expected = {"mean": [[0.375, 0.625]], "max": [[0.5, 0.75]], "min": [[0.25, 0.5]]}
    for f, want in expected.items():
        out = finish_fusion(start_fusion(torch.empty(1, 2), a, f), 2, f)
        assert out.tolist() == want
        folded = fuse_heads_into(torch.full((1, 2), FUSION_START[f]), a, f)
        assert finish_fusion(folded, 2, f).tolist() == want
        later_first = fuse_heads_into(start_fusion(torch.empty(1, 2), a[1:], f), a[:1], f)
        assert finish_fusion(later_first, 2, f).tolist() == want
    attn = random_attention(3, 1, 4, 5)[0]  # [H=4, N=5], 1 prefix token + a 2x2 grid
    dist = patch_distance_matrix((2, 2), (16, 16))
    whole = LayerStatistics([4], 5, dist, 1, ("mean", "max"))
    whole.chunk(0, 0, 0, attn, 0)
    whole.layer_done(0)
    parts = LayerStatistics([4], 5, dist, 1, ("mean", "max"))
    for h0 in (0, 2):  # heads in two chunks, rows in two blocks (as attention_chunks hands them over)
        for r0 in (0, 3):
            parts.chunk(0, 0, h0, attn[h0 : h0 + 2, r0 : r0 + 3], r0)
    parts.layer_done(0)
    for f in ("mean", "max"):
        torch.testing.assert_close(parts.fused[f][0], whole.fused[f][0])
        torch.testing.assert_close(whole.fused[f][0][0], fuse_heads(attn, f))  # image 0 of a batch of one
    torch.testing.assert_close(parts.distances[0], whole.distances[0])


def test_chunks_of_one_or_two_heads_are_fused_without_a_reduction():
    """A chunk of one head (a 1,374-token model's heads come one at a time) is written or folded as it is, and one of
    two heads (ViT-L/16 at 384 px) by one elementwise operation: bitwise what the reduction over the head axis gives,
    with no sum, max or min over it. By hand: folding [0.25, 0.75] into [0.5, 0.5] gives the sum [0.75, 1.25], max
    [0.5, 0.75] and min [0.25, 0.5]; the two heads [0.25, 0.75] and [0.5, 0.5] start the sum at [0.75, 1.25]."""
    from tests.opcount import Ops
    from vizapp.analysis.rollout import fuse_heads_into, start_fusion

    head, other = torch.tensor([[[0.25, 0.75]]]), torch.tensor([[[0.5, 0.5]]])  # [c=1, r=1, N=2] each
    by_hand = {"mean": [[0.75, 1.25]], "max": [[0.5, 0.75]], "min": [[0.25, 0.5]]}
    reduce = {"mean": torch.sum, "max": torch.amax, "min": torch.amin}
    pairwise = {"mean": torch.add, "max": torch.maximum, "min": torch.minimum}
    for f, want in by_hand.items():
        with Ops() as ops:
            assert fuse_heads_into(torch.full((1, 2), 0.5), head, f).tolist() == want
            assert torch.equal(start_fusion(torch.empty(1, 2), head, f), head[0])
            assert start_fusion(torch.empty(1, 2), torch.cat([head, other]), f).tolist() == want
        assert not {"aten.sum", "aten.amax", "aten.amin"} & set(ops.names), (f, ops.names)
    for c in (1, 2):
        attn = random_attention(5, 1, 2 * c, 7)[0]  # [2c, N=7, N=7]: two chunks of c heads
        for f in by_hand:
            with Ops() as ops:
                started = start_fusion(torch.empty(7, 7), attn[:c], f)
                folded = fuse_heads_into(started.clone(), attn[c:], f, work=torch.empty(7, 7))
            assert not {"aten.sum", "aten.amax", "aten.amin"} & set(ops.names), (c, f, ops.names)
            assert torch.equal(started, reduce[f](attn[:c], dim=-3)), (c, f)
            assert torch.equal(folded, pairwise[f](reduce[f](attn[:c], dim=-3), reduce[f](attn[c:], dim=-3)))
            if f != "mean":  # max and min are exact in any order: the fusion of all 2c heads
                assert torch.equal(folded, reduce[f](attn, dim=-3)), (c, f)


def test_stored_mean_fusions_are_divided_once_for_every_layer():
    """The stored mean fusions hold the heads' sums until the last layer is done, then one division makes every
    layer's mean (one operator for 3 layers, not 3), bitwise each layer's own ``finish_fusion``; layers that differ in
    heads are divided each by its own count. By hand: two heads of uniform rows over 5 tokens sum to 0.4, mean 0.2."""
    from tests.opcount import Ops
    from vizapp.analysis.distance import patch_distance_matrix
    from vizapp.analysis.rollout import finish_fusion, start_fusion
    from vizapp.streaming import LayerStatistics

    dist = patch_distance_matrix((2, 2), (16, 16))
    for heads in ([4, 4, 4], [4, 2, 4]):
        attn = [random_attention(7 + i, 1, h, 5)[0] for i, h in enumerate(heads)]  # [H, N, N] per layer
        if heads[1] == 2:
            attn[1] = torch.full((2, 5, 5), 0.2)
        stats = LayerStatistics(heads, 5, dist, 1, ("mean",))
        with Ops() as ops:
            for layer, a in enumerate(attn):
                stats.chunk(layer, 0, 0, a, 0)
                stats.layer_done(layer)
                if layer < 2:  # not yet divided: the heads' sum
                    assert torch.equal(stats.fused["mean"][layer][0], start_fusion(torch.empty(5, 5), a, "mean"))
        for layer, a in enumerate(attn):
            want = finish_fusion(start_fusion(torch.empty(5, 5), a, "mean"), heads[layer], "mean")
            assert torch.equal(stats.mean_store[0, layer], want), (heads, layer)
            assert stats.fused["mean"][layer].data_ptr() == stats.mean_store[:, layer].data_ptr()  # views of it
        store = stats.mean_store.untyped_storage().data_ptr()
        divisions = ops.written.count(("aten.div_", store))
        if heads[1] == 2:
            assert torch.equal(stats.mean_store[0, 1], torch.full((5, 5), 0.2)) and divisions == 3
        else:
            assert divisions == 1, divisions


def random_attention(seed: int, layers: int, heads: int, n: int, peak: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(layers, heads, n, n, generator=g) * peak, dim=-1)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    layers=st.integers(1, 4),
    heads=st.integers(1, 4),
    prefix=st.integers(0, 3),
    grid=st.integers(1, 4),
    fusion=st.sampled_from(["mean", "max", "min"]),
    discard=st.floats(0.0, 0.95),
)
def test_rollout_rows_stay_stochastic(seed, layers, heads, prefix, grid, fusion, discard):
    n = prefix + grid * grid
    joint = rollout(random_attention(seed, layers, heads, n), prefix, fusion, discard)
    assert torch.all(joint >= 0)
    torch.testing.assert_close(joint.sum(-1), torch.ones(n), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------- distance


def test_uniform_attention_reference_values():
    # ViT paper's reference: uniform attention over 14x14 patches of 16 px ~ 116.5 px; 7x7 of 32 px ~ 115.5 px.
    a = torch.full((1, 1, 197, 197), 1 / 197)
    assert mean_attention_distance(a, 14, 16, 1).item() == pytest.approx(116.49, abs=0.01)
    assert uniform_reference_distance((7, 7), 32) == pytest.approx(115.50, abs=0.01)


def test_self_attention_has_zero_distance():
    a = torch.eye(1 + 9)[None, None]
    assert mean_attention_distance(a, 3, 16, 1).item() == 0.0


def test_distance_by_hand_with_and_without_renormalisation():
    # 2x2 grid of 10-px patches, one CLS. Patch (0,0) sends 0.5 to CLS and 0.5 to patch (0,1) (10 px away);
    # the other patches attend to themselves.
    a = torch.zeros(5, 5)
    a[0, 0] = 1.0
    a[1, 0], a[1, 2] = 0.5, 0.5
    for i in (2, 3, 4):
        a[i, i] = 1.0
    a = a[None, None]
    assert mean_attention_distance(a, 2, 10, 1).item() == pytest.approx(10 / 4)
    assert mean_attention_distance(a, 2, 10, 1, renormalize=False).item() == pytest.approx(5 / 4)


def test_distance_non_square_patches_and_grid():
    # 1x2 grid of 8x20-px patches: the two patches are 20 px apart horizontally.
    a = torch.tensor([[0.0, 1.0], [1.0, 0.0]])[None, None]
    assert mean_attention_distance(a, (1, 2), (8, 20), 0).item() == pytest.approx(20.0)
    a = torch.tensor([[0.0, 1.0], [1.0, 0.0]])[None, None]
    assert mean_attention_distance(a, (2, 1), (8, 20), 0).item() == pytest.approx(8.0)


def test_distance_batch_is_mean_over_images():
    a = random_attention(1, 2, 3, 10)
    b = random_attention(2, 2, 3, 10)
    both = mean_attention_distance(torch.stack([a, b]), 3, 16, 1)
    torch.testing.assert_close(both, (mean_attention_distance(a, 3, 16, 1) + mean_attention_distance(b, 3, 16, 1)) / 2)


def test_distance_matches_an_independent_loop():
    a = random_attention(3, 1, 2, 1 + 6)
    gh, gw, ps = 2, 3, 16
    got = mean_attention_distance(a, (gh, gw), ps, 1)
    for h in range(2):
        total = 0.0
        for qi in range(6):
            w = a[0, h, 1 + qi, 1:]
            w = w / w.sum()
            for ki in range(6):
                dy, dx = (qi // gw - ki // gw) * ps, (qi % gw - ki % gw) * ps
                total += float(w[ki]) * math.hypot(dy, dx)
        assert got[0, h].item() == pytest.approx(total / 6, rel=1e-5)


def test_a_cpu_block_of_many_heads_takes_the_distance_sums_as_one_product(monkeypatch):
    """On the CPU a block of at least CPU_PRODUCT_MIN_HEADS heads takes Σ_j a_ij·d_ij and Σ_j a_ij as one batched
    product with [d_i | 1]: by hand, a head whose every patch query sends 0.25 to a prefix token and 0.75 to the next
    patch (sums 0.75·d and 0.75); for random heads, equal to the product and two sums a smaller block takes."""
    from vizapp.analysis import distance

    p, grid, cell = 2, (3, 4), (16, 8)
    dist = distance.patch_distance_matrix(grid, cell)
    n, heads = p + 12, distance.CPU_PRODUCT_MIN_HEADS + 1
    attn = torch.softmax(torch.randn(heads, n, n, generator=torch.Generator().manual_seed(5)), dim=-1)
    attn[0] = 0.0
    for q in range(12):
        attn[0, p + q, 1], attn[0, p + q, p + (q + 1) % 12] = 0.25, 0.75
    products: list[int] = []
    real = distance.BlockDistanceTerms._sums_by_product
    monkeypatch.setattr(
        distance.BlockDistanceTerms, "_sums_by_product", lambda self, *a: products.append(1) or real(self, *a)
    )
    q0, q1, num, den = distance.BlockDistanceTerms(dist, p)(attn, 0)
    assert (q0, q1, products) == (0, 12, [1])
    by_hand = [0.75 * float(dist[q, (q + 1) % 12]) for q in range(12)]
    np.testing.assert_allclose(num[0].numpy(), by_hand, rtol=1e-6)
    np.testing.assert_allclose(den[0].numpy(), 0.75, rtol=1e-6)
    monkeypatch.setattr(distance, "CPU_PRODUCT_MIN_HEADS", heads + 1)  # the same block through the passes
    _, _, num2, den2 = distance.BlockDistanceTerms(dist, p)(attn, 0)
    assert products == [1]
    torch.testing.assert_close(num, num2, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(den, den2, rtol=1e-6, atol=1e-6)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), prefix=st.integers(0, 5), gh=st.integers(1, 5), gw=st.integers(1, 5))
def test_distance_between_zero_and_grid_diameter(seed, prefix, gh, gw):
    a = random_attention(seed, 2, 2, prefix + gh * gw)
    d = mean_attention_distance(a, (gh, gw), 16, prefix)
    diameter = math.hypot((gh - 1) * 16, (gw - 1) * 16)
    assert torch.all(d >= 0) and torch.all(d <= diameter + 1e-4)


# ---------------------------------------------------------------------------------------------------- pos-embed


def test_pos_embed_known_cosines():
    e = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])  # a 1x3 grid
    sim = pos_embed_similarity(e, (1, 3))
    assert sim.shape == (1, 3, 1, 3)
    r = 1 / math.sqrt(2)
    expected = torch.tensor([[1.0, 0.0, r], [0.0, 1.0, r], [r, r, 1.0]]).reshape(1, 3, 1, 3)
    torch.testing.assert_close(sim, expected, atol=1e-6, rtol=0)


def test_patch_rows_respect_no_embed_class():
    pe = torch.arange(6 * 2, dtype=torch.float32).reshape(1, 6, 2)
    assert patch_pos_embed(pe, num_prefix_tokens=2, no_embed_class=False).shape == (4, 2)
    assert torch.equal(patch_pos_embed(pe, num_prefix_tokens=2, no_embed_class=False), pe[0, 2:])
    assert torch.equal(patch_pos_embed(pe, num_prefix_tokens=5, no_embed_class=True), pe[0])


def test_cosine_is_not_a_dot_product():
    # probing-vits used dot products; a cosine ignores the embeddings' norms.
    e = torch.tensor([[1.0, 0.0], [10.0, 0.0]])
    assert torch.allclose(pos_embed_similarity(e, (1, 2)), torch.ones(1, 2, 1, 2))


def test_resample_keeps_shape_and_constant_embeddings():
    e = torch.ones(4 * 4, 8)
    out = resample_patch_pos_embed(e, (4, 4), (6, 3))
    assert out.shape == (18, 8)
    torch.testing.assert_close(out, torch.ones(18, 8), atol=1e-4, rtol=0)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), gh=st.integers(1, 6), gw=st.integers(1, 6), d=st.integers(1, 16))
def test_cosine_grid_symmetric_with_unit_diagonal(seed, gh, gw, d):
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(gh * gw, d, generator=g)
    sim = pos_embed_similarity(e, (gh, gw)).reshape(gh * gw, gh * gw)
    torch.testing.assert_close(sim, sim.T)
    torch.testing.assert_close(torch.diagonal(sim), torch.ones(gh * gw), atol=1e-6, rtol=0)
    assert torch.all(sim.abs() <= 1.0)


def test_model_pos_similarity_matches_manual_cosines():
    from tests.conftest import small_model

    vm = small_model("deit_tiny_distilled_patch16_224", img_size=64, depth=2)
    sim = vm.pos_similarity()
    pe = vm.model.pos_embed.detach()[0, 2:]  # DeiT distilled: CLS + dist rows first
    manual = torch.nn.functional.cosine_similarity(pe[:, None], pe[None], dim=-1).reshape(4, 4, 4, 4)
    np.testing.assert_allclose(sim, manual.numpy(), atol=1e-5)
    assert vm.pos_similarity((2, 3)).shape == (2, 3, 2, 3)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    layers=st.integers(1, 4),
    prefix=st.integers(0, 3),
    grid=st.integers(1, 4),
    discard=st.floats(0.0, 0.9),
    start=st.integers(0, 3),
)
def test_rollout_row_vector_pass_equals_full_joint(seed, layers, prefix, grid, discard, start):
    from vizapp.analysis import fuse_heads, rollout_fused, rollout_row

    n = prefix + grid * grid
    start = min(start, layers - 1)
    fused = fuse_heads(random_attention(seed, layers, 3, n), "mean")
    joint = rollout_fused(fused, prefix, discard, start)
    g = torch.Generator().manual_seed(seed)
    weights = torch.rand(n, generator=g, dtype=torch.float64)
    row = rollout_row(lambda i: fused[i], layers, weights, prefix, discard, start)
    torch.testing.assert_close(row, weights @ joint.double(), atol=1e-5, rtol=1e-5)
