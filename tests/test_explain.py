"""Tests for gradient rollout, Chefer relevance, attention flow and deletion/insertion curves.

Papers: Chefer, Gur & Wolf, ICCV 2021; Abnar & Zuidema, ACL 2020; Petsiuk, Das & Saenko, BMVC 2018 (RISE).
"""

from __future__ import annotations

import networkx as nx
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vizapp.analysis.faithfulness import (
    Curve,
    patch_order,
    perturbation_curve,
    random_order_saliency,
    step_counts,
    trapezoid_auc,
)
from vizapp.analysis.flow import attention_flow, flow_capacities, flow_graph
from vizapp.analysis.relevance import chefer_relevance, cls_map, grad_rollout
from vizapp.analysis.rollout import add_residual, fuse_heads, rollout

# ---------------------------------------------------------------------------------------------------------------------
# Hand-computed two-layer example: N = 3 tokens (CLS + 2 patches), H = 2 heads.
# Layer 0, head 0: A ⊙ G = [[1, 1, -1], [0, 1, 0], [1, 0, 1]] -> clamp [[1, 1, 0], [0, 1, 0], [1, 0, 1]]
# Layer 0, head 1: A ⊙ G = [[1, 1, 0], [0, -1, 0], [0, 0, 1]] -> clamp [[1, 1, 0], [0, 0, 0], [0, 0, 1]]
#   Ā_0 = [[1, 1, 0], [0, .5, 0], [.5, 0, 1]];  Ā_0 + I = [[2, 1, 0], [0, 1.5, 0], [.5, 0, 2]] (row sums 3, 1.5, 2.5)
#   Â_0 = [[2/3, 1/3, 0], [0, 1, 0], [1/5, 0, 4/5]]
# Layer 1, head 0: A ⊙ G = [[1, 1, 0], [1, 1, -1], [0, 1, 1]] -> clamp [[1, 1, 0], [1, 1, 0], [0, 1, 1]]
# Layer 1, head 1: A ⊙ G = [[1, 0, 1], [0, 1, 0], [1, 0, 0]]
#   Ā_1 = [[1, .5, .5], [.5, 1, 0], [.5, .5, .5]];  Ā_1 + I = [[2, .5, .5], [.5, 2, 0], [.5, .5, 1.5]] (sums 3, 2.5, 2.5)
#   Â_1 = [[2/3, 1/6, 1/6], [1/5, 4/5, 0], [1/5, 1/5, 3/5]]
# ---------------------------------------------------------------------------------------------------------------------
ATTN = torch.tensor(
    [
        [
            [[0.5, 0.25, 0.25], [0.5, 0.5, 0.0], [0.25, 0.25, 0.5]],
            [[0.5, 0.5, 0.0], [0.0, 1.0, 0.0], [0.5, 0.0, 0.5]],
        ],
        [
            [[0.25, 0.5, 0.25], [0.5, 0.25, 0.25], [0.0, 0.5, 0.5]],
            [[0.5, 0.0, 0.5], [0.0, 0.5, 0.5], [1.0, 0.0, 0.0]],
        ],
    ]
)  # [L=2, H=2, N=3, N=3]
GRAD = torch.tensor(
    [
        [
            [[2.0, 4.0, -4.0], [0.0, 2.0, 1.0], [4.0, 0.0, 2.0]],
            [[2.0, 2.0, 7.0], [3.0, -1.0, 5.0], [0.0, 0.0, 2.0]],
        ],
        [
            [[4.0, 2.0, 0.0], [2.0, 4.0, -4.0], [0.0, 2.0, 2.0]],
            [[2.0, 0.0, 2.0], [0.0, 2.0, 0.0], [1.0, 3.0, 3.0]],
        ],
    ]
)  # [2, 2, 3, 3]
A_HAT_0 = [[2 / 3, 1 / 3, 0.0], [0.0, 1.0, 0.0], [1 / 5, 0.0, 4 / 5]]
A_HAT_1 = [[2 / 3, 1 / 6, 1 / 6], [1 / 5, 4 / 5, 0.0], [1 / 5, 1 / 5, 3 / 5]]


def _t(x: list) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)


def test_grad_rollout_one_layer_by_hand() -> None:
    joint = grad_rollout(ATTN[:1], GRAD[:1], num_prefix_tokens=1)
    assert joint.dtype == torch.float32
    torch.testing.assert_close(joint, _t(A_HAT_0))
    torch.testing.assert_close(cls_map(joint, 1), _t([1 / 3, 0.0]))


def test_grad_rollout_two_layers_by_hand() -> None:
    # joint = Â_1 Â_0; row 0 = 2/3 [2/3, 1/3, 0] + 1/6 [0, 1, 0] + 1/6 [1/5, 0, 4/5] = [43/90, 35/90, 12/90]
    expected = [[43 / 90, 35 / 90, 12 / 90], [2 / 15, 13 / 15, 0.0], [19 / 75, 4 / 15, 12 / 25]]
    joint = grad_rollout(ATTN, GRAD, num_prefix_tokens=1)
    torch.testing.assert_close(joint, _t(expected))
    torch.testing.assert_close(cls_map(joint, 1), _t([7 / 18, 2 / 15]))
    # start_layer=1 keeps Â_1 only
    torch.testing.assert_close(grad_rollout(ATTN, GRAD, 1, start_layer=1), _t(A_HAT_1))


def test_chefer_relevance_one_layer_by_hand() -> None:
    r = chefer_relevance(ATTN[:1], GRAD[:1])  # I + Ā_0
    assert r.dtype == torch.float32
    torch.testing.assert_close(r, _t([[2.0, 1.0, 0.0], [0.0, 1.5, 0.0], [0.5, 0.0, 2.0]]))
    torch.testing.assert_close(cls_map(r, 1), _t([1.0, 0.0]))


def test_chefer_relevance_two_layers_by_hand() -> None:
    # R = (I + Ā_1)(I + Ā_0) = [[2, .5, .5], [.5, 2, 0], [.5, .5, 1.5]] @ [[2, 1, 0], [0, 1.5, 0], [.5, 0, 2]]
    expected = [[4.25, 2.75, 1.0], [1.0, 3.5, 0.0], [1.75, 1.25, 3.0]]
    r = chefer_relevance(ATTN, GRAD)
    torch.testing.assert_close(r, _t(expected))
    torch.testing.assert_close(cls_map(r, 1), _t([2.75, 1.0]))
    torch.testing.assert_close(
        chefer_relevance(ATTN, GRAD, start_layer=1), _t([[2, 0.5, 0.5], [0.5, 2, 0], [0.5, 0.5, 1.5]])
    )


def test_reversed_gradient_pairing_gives_a_different_answer() -> None:
    # vit-explain pairs attention l with gradient L-1-l; on this two-layer case that changes both maps.
    ours = cls_map(grad_rollout(ATTN, GRAD, 1), 1)
    reversed_pairing = cls_map(grad_rollout(ATTN, GRAD.flip(0), 1), 1)
    assert (ours - reversed_pairing).abs().max() > 1e-2
    ours_r = cls_map(chefer_relevance(ATTN, GRAD), 1)
    reversed_r = cls_map(chefer_relevance(ATTN, GRAD.flip(0)), 1)
    assert (ours_r - reversed_r).abs().max() > 1e-2


def test_grad_rollout_with_zero_gradient_is_identity() -> None:
    # Ā = 0 in every layer: add_residual turns each all-zero row into the identity's row, so joint = I.
    joint = grad_rollout(ATTN, torch.zeros_like(GRAD), 1)
    torch.testing.assert_close(joint, torch.eye(3))
    torch.testing.assert_close(chefer_relevance(ATTN, -GRAD.abs()), torch.eye(3))


def test_grad_rollout_with_unit_gradient_is_rollout() -> None:
    attn = torch.softmax(torch.randn(3, 4, 6, 6, generator=torch.Generator().manual_seed(0)), dim=-1)
    torch.testing.assert_close(grad_rollout(attn, torch.ones_like(attn), 2), rollout(attn, 2))
    torch.testing.assert_close(grad_rollout(attn, torch.ones_like(attn), 2, 0.5), rollout(attn, 2, discard_ratio=0.5))


def test_relevance_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        grad_rollout(ATTN, GRAD[:1], 1)
    with pytest.raises(ValueError):
        chefer_relevance(ATTN[0], GRAD[0])
    with pytest.raises(ValueError):
        chefer_relevance(ATTN, GRAD, start_layer=2)
    with pytest.raises(ValueError):
        cls_map(torch.eye(3), 3)


# ---------------------------------------------------------------------------------------------------------------------
# Attention flow
# ---------------------------------------------------------------------------------------------------------------------
def attention_flow_networkx(
    attn: torch.Tensor,
    num_prefix_tokens: int,
    head_fusion: str = "mean",
    residual: bool = True,
    query: int = 0,
    readout: np.ndarray | None = None,
) -> np.ndarray:
    """Reference attention flow with float capacities and networkx (small graphs only): flat [P] float64. With
    ``readout``, the sink is an extra "out" node fed by each top-layer token i with capacity readout[i]."""
    a = fuse_heads(attn.to(torch.float64), head_fusion).numpy()  # [L, N, N]
    if residual:  # written out here, not vizapp's add_residual: rows of A + I renormalised, layer by layer
        a = a + np.eye(a.shape[-1])
        a = a / a.sum(axis=-1, keepdims=True)
    num_layers, n, _ = a.shape
    g = nx.DiGraph()
    g.add_nodes_from((layer, i) for layer in range(num_layers + 1) for i in range(n))
    for layer in range(num_layers):
        for i in range(n):
            for j in range(n):
                if a[layer, i, j] > 0:
                    g.add_edge((layer, j), (layer + 1, i), capacity=float(a[layer, i, j]))
    sink = (num_layers, query)
    if readout is not None:
        sink = "out"
        for i in np.nonzero(readout)[0]:
            g.add_edge((num_layers, int(i)), sink, capacity=float(readout[i]))
    return np.array([nx.maximum_flow_value(g, (0, s), sink) for s in range(num_prefix_tokens, n)])


def _random_attention(seed: int, num_layers: int, heads: int, n: int, sparsity: float = 0.0) -> torch.Tensor:
    """Row-stochastic attention [L, H, N, N]; with ``sparsity`` > 0 some off-diagonal entries are exactly 0."""
    g = torch.Generator().manual_seed(seed)
    a = torch.softmax(2.0 * torch.randn(num_layers, heads, n, n, generator=g, dtype=torch.float64), dim=-1)
    if sparsity > 0:
        keep = (torch.rand(a.shape, generator=g, dtype=torch.float64) >= sparsity) | torch.eye(n, dtype=torch.bool)
        a = a * keep
        a = a / a.sum(dim=-1, keepdim=True)
    return a


def test_flow_one_layer_is_the_edge_capacity() -> None:
    # One layer: the only path from (0, s) to (1, q) is the edge itself, so the flow is Â[q, s] = the rollout map.
    attn = _random_attention(1, 1, 3, 5)
    for residual in (True, False):
        fused = fuse_heads(attn, "mean")[0]
        a_hat = add_residual(fused) if residual else fused
        for q in (0, 2):
            flow = attention_flow(attn, 1, residual=residual, query=q)
            np.testing.assert_allclose(flow.numpy(), a_hat[q, 1:].numpy(), atol=1e-6)
    np.testing.assert_allclose(attention_flow(attn, 2).numpy(), rollout(attn, 2)[0, 2:].numpy(), atol=1e-6)


def test_flow_two_layers_by_hand() -> None:
    # Two layers, residual off, q = CLS: each path (0, s) -> (1, j) -> (2, 0) uses its own middle node, so the min cut
    # takes the smaller edge of each: flow(s) = sum_j min(A0[j, s], A1[0, j]).
    a0 = [[0.2, 0.5, 0.3], [0.1, 0.6, 0.3], [0.4, 0.1, 0.5]]
    a1 = [[0.5, 0.3, 0.2], [0.1, 0.1, 0.8], [0.3, 0.3, 0.4]]
    attn = torch.tensor([[a0], [a1]], dtype=torch.float64)  # [2, 1, 3, 3]
    # s = 1: min(.5, .5) + min(.6, .3) + min(.1, .2) = .9;  s = 2: min(.3, .5) + min(.3, .3) + min(.5, .2) = .8
    flow = attention_flow(attn, 1, residual=False)
    np.testing.assert_allclose(flow.numpy(), [0.9, 0.8], atol=2e-6)
    # rollout would give (A1 A0)[0, 1:] = [.45, .34]: flow is not the product
    np.testing.assert_allclose(attention_flow_networkx(attn, 1, residual=False), [0.9, 0.8], atol=1e-9)


@pytest.mark.parametrize("seed", range(8))
def test_flow_matches_networkx(seed: int) -> None:
    rng = np.random.default_rng(seed)
    num_layers, n = int(rng.integers(2, 4)), int(rng.integers(4, 7))
    prefix = int(rng.integers(0, 3))
    query = int(rng.integers(0, n))
    fusion = ("mean", "max", "min")[seed % 3]
    residual = seed % 4 != 3
    attn = _random_attention(seed, num_layers, 3, n, sparsity=0.5 if seed % 2 else 0.0)
    scale = 1e6
    ours = attention_flow(attn, prefix, head_fusion=fusion, residual=residual, scale=scale, query=query)
    ref = attention_flow_networkx(attn, prefix, head_fusion=fusion, residual=residual, query=query)
    assert ours.shape == (n - prefix,)
    # each rounded edge is off by <= 0.5 / scale; a cut has at most L * N^2 edges
    np.testing.assert_allclose(ours.numpy(), ref, atol=0.5 * num_layers * n * n / scale + 1e-6)


def test_flow_to_an_output_that_reads_several_tokens_by_hand() -> None:
    # One layer, residual off, no prefix, the output reads tokens 0 and 1 half each: the paths from (0, s) are
    # (0, s) -> (1, i) -> out for i in {0, 1}, each limited by its smaller edge, so flow(s) = sum_i min(A[i, s], w_i).
    a = [[0.2, 0.5, 0.3], [0.1, 0.6, 0.3], [0.4, 0.1, 0.5]]
    attn = torch.tensor([[a]], dtype=torch.float64)  # [1, 1, 3, 3]
    w = torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64)
    # s = 0: min(.2, .5) + min(.1, .5) = .3;  s = 1: min(.5, .5) + min(.6, .5) = 1.0;  s = 2: .3 + .3 = .6
    flow = attention_flow(attn, 0, residual=False, readout=w)
    np.testing.assert_allclose(flow.numpy(), [0.3, 1.0, 0.6], atol=2e-6)
    np.testing.assert_allclose(
        attention_flow_networkx(attn, 0, residual=False, readout=w.numpy()), [0.3, 1.0, 0.6], atol=1e-12
    )
    # a one-hot readout is that token's query
    onehot = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    np.testing.assert_array_equal(
        attention_flow(attn, 0, residual=False, readout=onehot).numpy(),
        attention_flow(attn, 0, residual=False, query=1).numpy(),
    )
    with pytest.raises(ValueError, match="summing to 1"):
        attention_flow(attn, 0, readout=torch.tensor([0.5, 0.2, 0.0]))


@pytest.mark.parametrize("seed", range(4))
def test_flow_to_a_pooled_output_matches_networkx(seed: int) -> None:
    from vizapp.models.base import readout_weights

    rng = np.random.default_rng(100 + seed)
    num_layers, n, prefix = int(rng.integers(2, 4)), int(rng.integers(4, 7)), int(rng.integers(1, 3))
    attn = _random_attention(seed, num_layers, 3, n, sparsity=0.5 if seed % 2 else 0.0)
    for readout in ("patches", "cls+patches", "tokens", "cls+dist"):
        w = readout_weights(readout, n, prefix)
        ours = attention_flow(attn, prefix, readout=w)
        ref = attention_flow_networkx(attn, prefix, readout=w.numpy())
        np.testing.assert_allclose(ours.numpy(), ref, atol=0.5 * (num_layers * n * n + n) / 1e6 + 1e-6)


def test_readout_weights_by_hand() -> None:
    from vizapp.models.base import readout_weights

    # 2 prefix tokens (CLS, distillation) and 4 patches
    rows = {name: readout_weights(name, 6, 2).tolist() for name in ("cls", "cls+dist", "patches", "cls+patches")}
    assert rows == {
        "cls": [1, 0, 0, 0, 0, 0],
        "cls+dist": [0.5, 0.5, 0, 0, 0, 0],
        "patches": [0, 0, 0.25, 0.25, 0.25, 0.25],
        "cls+patches": [0.5, 0, 0.125, 0.125, 0.125, 0.125],
    }
    assert readout_weights("tokens", 4, 1).tolist() == [0.25] * 4
    with pytest.raises(ValueError, match="readout must be one of"):
        readout_weights("mean", 4, 1)


def test_flow_coarse_scale_stays_within_the_bound() -> None:
    attn = _random_attention(3, 3, 2, 5)
    scale = 1e3
    ours = attention_flow(attn, 1, scale=scale)
    ref = attention_flow_networkx(attn, 1)
    np.testing.assert_allclose(ours.numpy(), ref, atol=0.5 * 3 * 25 / scale)


def test_flow_pruning_of_disconnected_tokens() -> None:
    # Residual off. Layer 0: only token 3 attends to token 3, so node (0, 3) has the single edge to (1, 3).
    # Layer 1: CLS gives token 3 zero attention, so (1, 3) cannot reach the sink (2, 0) and patch 3's flow is 0.
    attn = _random_attention(5, 2, 1, 4)
    attn[0, 0, :, 3] = 0.0
    attn[0, 0, 3, 3] = 1.0  # row 3 renormalised: token 3 only keeps itself
    attn[0, 0] = attn[0, 0] / attn[0, 0].sum(-1, keepdim=True)
    attn[1, 0, 0, 3] = 0.0
    attn[1, 0] = attn[1, 0] / attn[1, 0].sum(-1, keepdim=True)
    ours = attention_flow(attn, 1, residual=False)
    ref = attention_flow_networkx(attn, 1, residual=False)
    np.testing.assert_allclose(ours.numpy(), ref, atol=1e-5)
    assert ours[2] == 0.0  # (0, 3) -> (1, 3) -> (2, 0) has a 0 edge
    caps = flow_capacities(attn, residual=False)
    graph, sources, sink = flow_graph(caps, 1)
    assert sources[2] == -1 and sink >= 0
    # kept: (0, 1), (0, 2); (1, 0), (1, 1), (1, 2); (2, 0). Gone: layer-0 CLS, (0, 3), (1, 3), top non-query nodes.
    assert graph.shape[0] == 6


def test_flow_progress_and_errors() -> None:
    attn = _random_attention(0, 2, 2, 5)
    calls: list[tuple[int, int]] = []
    attention_flow(attn, 1, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(k, 4) for k in range(1, 5)]
    with pytest.raises(ValueError):
        attention_flow(attn, 1, scale=1e10)  # capacities beyond int32
    with pytest.raises(ValueError):
        attention_flow(-attn, 1, residual=False)
    with pytest.raises(ValueError):
        attention_flow(attn[0], 1)
    with pytest.raises(ValueError):
        attention_flow(attn, 1, query=5)


# ---------------------------------------------------------------------------------------------------------------------
# Property tests over random row-stochastic attention
# ---------------------------------------------------------------------------------------------------------------------
shapes = st.tuples(
    st.integers(0, 2**31 - 1),  # seed
    st.integers(1, 3),  # L
    st.integers(1, 3),  # H
    st.integers(2, 6),  # N
    st.sampled_from([0.0, 0.5]),  # sparsity
)


@settings(max_examples=40, deadline=None)
@given(shapes, st.data())
def test_relevance_properties(shape: tuple[int, int, int, int, float], data: st.DataObject) -> None:
    seed, num_layers, heads, n, sparsity = shape
    prefix = data.draw(st.integers(0, n - 1))
    start = data.draw(st.integers(0, num_layers - 1))
    discard = data.draw(st.sampled_from([0.0, 0.3, 0.9]))
    attn = _random_attention(seed, num_layers, heads, n, sparsity).to(torch.float32)
    grad = torch.randn(attn.shape, generator=torch.Generator().manual_seed(seed + 1))
    joint = grad_rollout(attn, grad, prefix, discard, start)
    assert joint.shape == (n, n) and joint.dtype == torch.float32
    assert bool(torch.isfinite(joint).all()) and bool((joint >= 0).all())
    torch.testing.assert_close(joint.sum(-1), torch.ones(n), atol=1e-5, rtol=0)
    r = chefer_relevance(attn, grad, start)
    assert bool(torch.isfinite(r).all())
    assert bool((r - torch.eye(n) >= -1e-6).all())  # R >= I, hence non-negative
    assert cls_map(r, prefix).shape == (n - prefix,)


@settings(max_examples=25, deadline=None)
@given(shapes, st.data())
def test_flow_properties(shape: tuple[int, int, int, int, float], data: st.DataObject) -> None:
    seed, num_layers, heads, n, sparsity = shape
    prefix = data.draw(st.integers(0, n - 1))
    attn = _random_attention(seed, num_layers, heads, n, sparsity)
    flow = attention_flow(attn, prefix)
    assert flow.shape == (n - prefix,) and flow.dtype == torch.float32
    assert bool(torch.isfinite(flow).all()) and bool((flow >= 0).all())
    assert bool((flow <= 1 + 0.5 * n / 1e6).all())  # bounded by the sink's in-capacity, a row of Â summing to 1


# ---------------------------------------------------------------------------------------------------------------------
# Deletion / insertion curves
# ---------------------------------------------------------------------------------------------------------------------
# A 2x2 grid of 2x2 patches, one channel, each patch constant: means m = [1, .5, 1, .25]. The toy model's class-0
# probability is s = sum_p w_p * mean_p(x) with w = [.1, .2, .3, .4] (class 1: 1 - s). Contributions w * m =
# [.1, .1, .3, .1], s(image) = .6, s(zeros) = 0. Saliency [.5, .9, .1, .9] ranks patches 1, 3 (tie broken by index),
# 0, 2.
PATCH_MEANS = torch.tensor([[1.0, 0.5], [1.0, 0.25]])
IMAGE = PATCH_MEANS.repeat_interleave(2, 0).repeat_interleave(2, 1)[None]  # [1, 4, 4]
WEIGHTS = torch.tensor([0.1, 0.2, 0.3, 0.4])
SALIENCY = torch.tensor([0.5, 0.9, 0.1, 0.9])


def linear_predict(x: torch.Tensor) -> torch.Tensor:
    """[B, C, 4, 4] -> [B, 2] probabilities [s, 1 - s] with s = sum_p w_p * mean of patch p."""
    means = torch.nn.functional.avg_pool2d(x.mean(dim=1, keepdim=True), 2).flatten(1)  # [B, 4]
    s = (means * WEIGHTS.to(x.dtype)).sum(-1)
    return torch.stack([s, 1 - s], dim=-1)


def test_patch_order_and_step_counts() -> None:
    assert patch_order(SALIENCY).tolist() == [1, 3, 0, 2]
    assert patch_order(torch.zeros(2, 3)).tolist() == list(range(6))
    assert step_counts(4).tolist() == [0, 1, 2, 3, 4]
    assert step_counts(4, 2).tolist() == [0, 2, 4]
    assert step_counts(10, 3).tolist() == [0, 3, 6, 10]
    with pytest.raises(ValueError):
        step_counts(4, 5)


def test_deletion_by_hand() -> None:
    curve = perturbation_curve(linear_predict, IMAGE, SALIENCY, 2, 2, class_idx=0, mode="deletion")
    assert isinstance(curve, Curve)
    np.testing.assert_allclose(curve.fractions, [0, 0.25, 0.5, 0.75, 1])
    np.testing.assert_allclose(curve.probs, [0.6, 0.5, 0.4, 0.3, 0.0], atol=1e-6)
    # 0.25 * ((.6 + .5) + (.5 + .4) + (.4 + .3) + (.3 + 0)) / 2
    assert curve.auc == pytest.approx(0.375, abs=1e-6)
    two = perturbation_curve(linear_predict, IMAGE, SALIENCY.reshape(2, 2), (2, 2), (2, 2), 0, steps=2)
    np.testing.assert_allclose(two.fractions, [0, 0.5, 1])
    np.testing.assert_allclose(two.probs, [0.6, 0.4, 0.0], atol=1e-6)
    assert two.auc == pytest.approx(0.5 * (0.5 + 0.2), abs=1e-6)


def test_insertion_by_hand() -> None:
    curve = perturbation_curve(linear_predict, IMAGE, SALIENCY, 2, 2, class_idx=0, mode="insertion")
    np.testing.assert_allclose(curve.probs, [0.0, 0.1, 0.2, 0.3, 0.6], atol=1e-6)
    assert curve.auc == pytest.approx(0.25 * (0.1 + 0.3 + 0.5 + 0.9) / 2, abs=1e-6)
    other = perturbation_curve(linear_predict, IMAGE, SALIENCY, 2, 2, class_idx=1, mode="insertion", batch_size=2)
    np.testing.assert_allclose(other.probs, [1.0, 0.9, 0.8, 0.7, 0.4], atol=1e-6)


def test_baseline_image_and_endpoints() -> None:
    # Three channels, a per-channel baseline [C, 1, 1] = 0.5: a removed patch has mean 0.5.
    image = IMAGE.expand(3, 4, 4)
    base = torch.full((3, 1, 1), 0.5)
    dele = perturbation_curve(linear_predict, image, SALIENCY, 2, 2, 0, baseline=base, batch_size=3)
    # delete patch 1 (.5 -> .5, no change), 3 (.25 -> .5: +.1), 0 (1 -> .5: -.05), 2 (1 -> .5: -.15)
    np.testing.assert_allclose(dele.probs, [0.6, 0.6, 0.7, 0.65, 0.5], atol=1e-6)
    ins = perturbation_curve(linear_predict, image, SALIENCY, 2, 2, 0, mode="insertion", baseline=0.5)
    # from all-0.5 (s = .5), reveal patch 1 (no change), 3 (-.1), 0 (+.05), 2 (+.15)
    np.testing.assert_allclose(ins.probs, [0.5, 0.5, 0.4, 0.45, 0.6], atol=1e-6)
    full = linear_predict(image[None])[0, 0].item()
    empty = linear_predict(torch.full((1, 3, 4, 4), 0.5))[0, 0].item()
    assert dele.probs[0] == pytest.approx(full) and dele.probs[-1] == pytest.approx(empty)
    assert ins.probs[0] == pytest.approx(empty) and ins.probs[-1] == pytest.approx(full)


def test_random_order_saliency() -> None:
    s1 = random_order_saliency(10, torch.Generator().manual_seed(0))
    s2 = random_order_saliency(10, torch.Generator().manual_seed(0))
    assert s1.dtype == torch.float32 and torch.equal(s1, s2)
    assert sorted(patch_order(s1).tolist()) == list(range(10))


def test_true_contributions_beat_random_orders() -> None:
    # For an additive model, ranking patches by their contribution is the best possible order for both curves.
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 8, 8, generator=g)
    weights = torch.rand(16, generator=g)

    def predict(x: torch.Tensor) -> torch.Tensor:
        s = (torch.nn.functional.avg_pool2d(x, 2).flatten(1) * weights).sum(-1) / weights.sum()
        return torch.stack([s, 1 - s], -1)

    truth = torch.nn.functional.avg_pool2d(image, 2).flatten() * weights
    best_del = perturbation_curve(predict, image, truth, 4, 2, 0).auc
    best_ins = perturbation_curve(predict, image, truth, 4, 2, 0, mode="insertion").auc
    for seed in range(5):
        rand = random_order_saliency(16, torch.Generator().manual_seed(seed))
        assert best_del <= perturbation_curve(predict, image, rand, 4, 2, 0).auc + 1e-9
        assert best_ins >= perturbation_curve(predict, image, rand, 4, 2, 0, mode="insertion").auc - 1e-9


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 4), st.integers(1, 4), st.data())
def test_curves_are_monotone(seed: int, gh: int, gw: int, data: st.DataObject) -> None:
    # sigmoid of a positive-weighted sum of pixels: removing pixels (>= baseline 0) never raises the probability.
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(2, gh * 3, gw * 2, generator=g)
    weights = torch.rand(2, gh * 3, gw * 2, generator=g)
    saliency = torch.randn(gh * gw, generator=g)
    steps = data.draw(st.one_of(st.none(), st.integers(1, gh * gw)))

    def predict(x: torch.Tensor) -> torch.Tensor:
        p = torch.sigmoid((x * weights).sum(dim=(1, 2, 3)) - 1.0)
        return torch.stack([1 - p, p], -1)

    dele = perturbation_curve(predict, image, saliency, (gh, gw), (3, 2), 1, steps=steps, batch_size=3)
    ins = perturbation_curve(predict, image, saliency, (gh, gw), (3, 2), 1, mode="insertion", steps=steps)
    num_steps = gh * gw if steps is None else steps
    assert dele.probs.shape == (num_steps + 1,) and dele.fractions[0] == 0 and dele.fractions[-1] == 1
    assert np.all(np.diff(dele.probs) <= 1e-7) and np.all(np.diff(ins.probs) >= -1e-7)
    np.testing.assert_allclose(dele.probs[[0, -1]], ins.probs[[-1, 0]], atol=1e-7)
    assert 0 <= dele.auc <= 1 and dele.auc == pytest.approx(trapezoid_auc(dele.fractions, dele.probs))


def test_perturbation_curve_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        perturbation_curve(linear_predict, IMAGE, SALIENCY, 2, 3, 0)  # grid does not cover the image
    with pytest.raises(ValueError):
        perturbation_curve(linear_predict, IMAGE, SALIENCY[:3], 2, 2, 0)
    with pytest.raises(ValueError):
        perturbation_curve(linear_predict, IMAGE, SALIENCY, 2, 2, 0, mode="blur")
    with pytest.raises(ValueError):
        perturbation_curve(linear_predict, IMAGE, torch.tensor([0.0, float("nan"), 1.0, 2.0]), 2, 2, 0)


def test_relevance_row_equals_a_row_of_the_full_relevance_matrix() -> None:
    from vizapp.analysis.relevance import grad_weighted_heads, relevance_row

    g = torch.Generator().manual_seed(3)
    attn = torch.softmax(torch.randn(4, 3, 6, 6, generator=g), dim=-1)
    grad = torch.randn(4, 3, 6, 6, generator=g)
    w = torch.rand(6, generator=g, dtype=torch.float64)
    for start in (0, 2):
        full = chefer_relevance(attn, grad, start_layer=start).double()
        torch.testing.assert_close(
            relevance_row(grad_weighted_heads(attn, grad), w, start), w @ full, rtol=1e-6, atol=1e-6
        )


def test_rows_of_a_batch_by_hand() -> None:
    """Two images, one layer, three tokens, the row of token 0: each image's row goes through its own Ā only."""
    from vizapp.analysis.relevance import relevance_row
    from vizapp.analysis.rollout import rollout_row

    fused = torch.tensor(
        [[[0.5, 0.5, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]], [[0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]],
        dtype=torch.float64,
    )  # [B=2, N, N]
    w = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    # relevance: v + v Ā, image 0: [1, 0, 0] + [0.5, 0.5, 0]; image 1: [1, 0, 0] + [0, 1, 0]
    expected = torch.tensor([[1.5, 0.5, 0.0], [1.0, 1.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(relevance_row(fused[:, None], w, 0), expected, rtol=0, atol=1e-12)
    # rollout: row sums of Ā + I are [2, 1, 1] for both, so w / s = [0.5, 0, 0] and the row is w/s Ā + w/s
    expected = torch.tensor([[0.75, 0.25, 0.0], [0.5, 0.5, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(rollout_row(lambda layer: fused, 1, w, 1), expected, rtol=0, atol=1e-12)
    # one row per image given: image 1 starts from token 1, whose row of Ā_1 is empty (only the residual stays)
    rows = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(relevance_row(fused[:, None], rows, 0)[1], rows[1], rtol=0, atol=1e-12)


@pytest.mark.parametrize("start", [0, 2])
@pytest.mark.parametrize("discard", [0.0, 0.4])
def test_rows_of_a_batch_equal_each_images_own_row(start: int, discard: float) -> None:
    from vizapp.analysis.relevance import grad_weighted_heads, relevance_row
    from vizapp.analysis.rollout import rollout_row

    g = torch.Generator().manual_seed(5)
    attn = torch.softmax(torch.randn(3, 4, 2, 7, 7, generator=g), dim=-1)  # [B, L, H, N, N]
    grad = torch.randn(3, 4, 2, 7, 7, generator=g)
    fused = grad_weighted_heads(attn, grad)  # [B, L, N, N]
    w = torch.rand(7, generator=g, dtype=torch.float64)
    batched = relevance_row(fused, w, start)
    rolled = rollout_row(lambda layer: fused[:, layer], 4, w, 1, discard, start)
    assert batched.shape == rolled.shape == (3, 7)
    for b in range(3):
        torch.testing.assert_close(batched[b], relevance_row(fused[b], w, start), rtol=1e-12, atol=1e-12)
        alone = rollout_row(lambda layer, b=b: fused[b, layer], 4, w, 1, discard, start)
        torch.testing.assert_close(rolled[b], alone, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(batched[0], batched[1])


def test_a_stack_of_layers_gives_each_row_of_the_per_layer_rollout() -> None:
    """Every layer's fused attention given at once (layer first) gives the row the per-layer calls give: one image
    ([L, N, N]) or a batch ([L, B, N, N]) with one row for all or one per image, from any start layer, discarding or
    not; and by hand, one layer of two images."""
    from vizapp.analysis.rollout import rollout_row

    g = torch.Generator().manual_seed(8)
    stack = torch.rand(4, 3, 7, 7, generator=g, dtype=torch.float64)  # [L, B, N, N], non-negative like Ā
    w, rows = torch.rand(7, generator=g, dtype=torch.float64), torch.rand(3, 7, generator=g, dtype=torch.float64)
    for start in (0, 2):
        for discard in (0.0, 0.4):
            for fused, weights in ((stack[:, 0], w), (stack, w), (stack, rows), (stack[:, 1], rows)):
                expected = rollout_row(lambda layer, f=fused: f[layer], 4, weights, 1, discard, start)
                got = rollout_row(fused, 4, weights, 1, discard, start)
                assert got.shape == expected.shape
                torch.testing.assert_close(got, expected, rtol=1e-13, atol=1e-13)
    hand = torch.tensor(
        [[[0.5, 0.5, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]], [[0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]],
        dtype=torch.float64,
    )[None]  # [L=1, B=2, N, N]: row sums of Ā + I are [2, 1, 1], so w / s = [0.5, 0, 0], then w/s Ā + w/s
    one_hot = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    expected = torch.tensor([[0.75, 0.25, 0.0], [0.5, 0.5, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(rollout_row(hand, 1, one_hot, 1), expected, rtol=0, atol=1e-15)
    with pytest.raises(ValueError, match="a stack of 1 layers"):
        rollout_row(hand, 2, one_hot, 1)


def test_rows_through_a_stack_cost_two_operations_a_layer() -> None:
    """What a GPU launches for the gradient methods' rows after their replayed passes (eager, one launch each):
    without discarding, a stack's row sums are one pass for every layer and each layer is a division and one fused
    product-and-add, where the per-layer form took four; relevance is one operation a layer for a batch too."""
    from benchmarks.launches import Counter
    from vizapp.analysis.relevance import relevance_row
    from vizapp.analysis.rollout import rollout_row

    g = torch.Generator().manual_seed(9)
    layers = 12
    for stack, w in (
        (torch.rand(layers, 9, 9, generator=g, dtype=torch.float64), torch.rand(9, dtype=torch.float64)),
        (torch.rand(layers, 2, 9, 9, generator=g, dtype=torch.float64), torch.rand(9, dtype=torch.float64)),
    ):
        with Counter() as stacked:
            rollout_row(stack, layers, w, 1)
        with Counter() as per_layer:
            rollout_row(lambda layer, s=stack: s[layer], layers, w, 1)
        assert stacked.host == 2 + 2 * layers, stacked.host  # the sums and their +1, then w / s and w + w A a layer
        assert per_layer.host >= 4 * layers, per_layer.host
        with Counter() as relevance:
            relevance_row(stack if stack.dim() == 3 else stack.transpose(0, 1), w, 0)
        assert relevance.host <= layers + 1, relevance.host  # v + v Ā a layer (a shared row expanded once, a view)


def test_grad_weighted_heads_into_equals_grad_weighted_heads_and_spends_the_gradient() -> None:
    from vizapp.analysis.relevance import grad_weighted_heads, grad_weighted_heads_into

    g = torch.Generator().manual_seed(6)
    attn = torch.softmax(torch.randn(2, 3, 4, 9, 9, generator=g), dim=-1)
    grad = torch.randn(2, 3, 4, 9, 9, generator=g)
    expected = grad_weighted_heads(attn, grad)
    out = torch.full((2, 3, 9, 9), float("nan"), dtype=torch.float64)
    spent = grad.clone()
    assert grad_weighted_heads_into(out, attn, spent) is out
    torch.testing.assert_close(out, expected, rtol=0, atol=0)  # the same operations, bit for bit
    torch.testing.assert_close(spent, (grad * attn).clamp(min=0.0), rtol=0, atol=0)  # the product, in place
    with pytest.raises(ValueError, match="float32"):
        grad_weighted_heads_into(out, attn.double(), grad.double())
