"""Attention flow through windows and patch merging (issue 25): by hand on a two-layer graph, against networkx's
max-flow on the dense graph built from each layer's full [N, N] attention, against the plain ViT's flow where the
window is the whole grid, and through the result, the registry, the batch API, the evaluation and the app."""

from __future__ import annotations

import networkx as nx
import numpy as np
import pytest
import torch

import vizapp
from tests.conftest import random_image
from tests.test_swin import TINY
from vizapp import methods
from vizapp.analysis import windows as W
from vizapp.analysis.flow import attention_flow
from vizapp.analysis.windows_flow import edge_count, layer_capacities, layered_graph, windowed_flow
from vizapp.errors import BadParameterError

# the rollout hand case's attention (tests/test_swin.py::test_rollout_through_merge_by_hand)
A = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.0, 1.0, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25], [0.5, 0.0, 0.0, 0.5]])


@pytest.fixture(scope="module")
def vm():
    """6x10 then 3x5 grids, windows of 4 (padded, shifted), heads 2, 2, 4, 4."""
    torch.manual_seed(0)
    return vizapp.load_model("swin_tiny_patch4_window7_224", pretrained=False, device="cpu", **TINY)


def test_flow_through_a_merge_by_hand():
    """A 2x2 grid in one window (attention A), a merge to 1x1, a 1x1 layer, the output. Â = 0.5·A + 0.5·I; each
    layer-1 token's only way on is its merge edge of 1/4, and the 1x1 layer and the output pass 1, so the flow from
    patch p is Σ_i min(Â[i, p], 1/4):
    p=0: column (0.85, 0, 0.125, 0.25) -> 0.25 + 0 + 0.125 + 0.25 = 0.625;
    p=1: (0.05, 1, 0.125, 0) -> 0.425;  p=2: (0.05, 0, 0.625, 0) -> 0.3;  p=3: (0.05, 0, 0.125, 0.75) -> 0.425."""
    windows = [A[None, None], torch.ones(1, 1, 1, 1)]
    idx = [W.window_index((2, 2), (2, 2), (0, 0)), W.window_index((1, 1), (1, 1), (0, 0))]
    got = windowed_flow(windows, idx, [(2, 2), (1, 1)], torch.ones(1, dtype=torch.float64))
    np.testing.assert_allclose(got.numpy(), [0.625, 0.425, 0.3, 0.425], atol=1e-6)
    assert edge_count(idx, [(2, 2), (1, 1)]) == 16 + 4 + 1 + 1  # window pairs, merge, 1x1 layer, output
    caps = layer_capacities(A[None].double(), idx[0], 4, 1e6)  # the capacities themselves: Â scaled
    np.testing.assert_array_equal(caps.toarray(), np.rint((0.5 * A.double() + 0.5 * torch.eye(4)).numpy() * 1e6))


def test_padded_slots_carry_no_flow_and_rows_renormalise_over_real_keys():
    """A 1x3 grid in a window of 2 (padded to 1x4): the second window holds token 2 and a padded slot. Token 2's
    attention (0.6 to itself, 0.4 to the pad) is renormalised over its real key: Â[2, 2] = (1 + 1) / 2 = 1."""
    idx = W.window_index((1, 3), (1, 2), (0, 0))
    assert idx.tolist() == [[0, 1], [2, -1]]
    win = torch.tensor([[[0.5, 0.5], [0.2, 0.8]], [[0.6, 0.4], [0.5, 0.5]]])[:, None]  # [nW=2, H=1, 2, 2]
    fused = W.fuse_windows(win, idx)
    caps = layer_capacities(fused, idx, 3, 1e6).toarray() / 1e6
    np.testing.assert_allclose(caps, [[0.75, 0.25, 0], [0.1, 0.9, 0], [0, 0, 1.0]], atol=1e-6)


def test_layered_graph_prunes_only_nodes_off_every_path():
    """First layer 3 nodes, middle 2, sink 1. Middle node 1 has no edge to the sink, so it goes, and with it first
    node 1 (its only way on); first node 2 has no edge out. Kept: first node 0, middle node 0, the sink; the flows
    are those of the whole graph: min(3, 5) = 3 from node 0, 0 from the others."""
    import scipy.sparse

    from vizapp.analysis.flow import max_flows

    first = scipy.sparse.csr_array(np.array([[3, 0, 0], [1, 1, 0]], dtype=np.int64))  # [2, 3]: rows are heads
    last = scipy.sparse.csr_array(np.array([[5, 0]], dtype=np.int64))  # [1, 2]: only middle node 0 reaches the sink
    graph, sources, sink = layered_graph([first, last])
    assert graph.shape == (3, 3) and sources.tolist() == [0, -1, -1] and sink == 2
    assert graph.toarray().tolist() == [[0, 3, 0], [0, 0, 5], [0, 0, 0]]
    assert max_flows(graph, sources, sink, 1.0).tolist() == [3.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="one node"):
        layered_graph([first])


def _networkx_flow(windows, r, fusion: str = "mean") -> np.ndarray:
    """The second path: the dense graph from each layer's whole-grid attention (W.full_attention of ``windows`` on
    r's geometry, heads fused, each row's padded mass spread over its real keys, then A + I with rows renormalised),
    the dense merge matrix, the uniform readout, float capacities, and networkx's preflow-push max-flow from every
    first-stage token."""
    g = nx.DiGraph()
    layers = []
    for layer, win in enumerate(windows):
        a = win.double()
        full = W.full_attention(a, r.index(layer), r.tokens_per_layer[layer])  # [H, N, N], padded keys dropped
        full = {"mean": full.mean(0), "max": full.amax(0)}[fusion]
        total = {"mean": a.mean(1), "max": a.amax(1)}[fusion].sum(-1)  # [nW, w²]: each row's total with padding
        idx = r.index(layer)
        row_total = torch.zeros(full.shape[0], dtype=torch.float64)
        row_total[idx[idx >= 0]] = total[idx >= 0]
        full = full * (row_total / full.sum(-1))[:, None]
        full = full + torch.eye(full.shape[0], dtype=torch.float64)
        layers.append(full / full.sum(-1, keepdim=True))
        if layer + 1 < r.num_layers and r.layer_grids[layer + 1] != r.layer_grids[layer]:
            layers.append(W.merge_matrix(r.layer_grids[layer]))
    n_last = r.tokens_per_layer[-1]
    layers.append(torch.full((1, n_last), 1.0 / n_last, dtype=torch.float64))
    for k, m in enumerate(layers):
        heads, tails = torch.nonzero(m > 0, as_tuple=True)
        for i, j in zip(heads.tolist(), tails.tolist(), strict=True):
            g.add_edge((k, j), (k + 1, i), capacity=float(m[i, j]))
    sink = (len(layers), 0)
    return np.array([nx.maximum_flow_value(g, (0, p), sink) for p in range(r.tokens_per_layer[0])])


def test_flow_equals_networkx_on_the_dense_graph(vm):
    """Shifted, padded windows and a merge (6x10 -> 3x5): every one of the 60 flows within the rounding bound (at
    most 0.5/scale for each of the <= 30 edges of a cut), for the model's own attention (near uniform with random
    weights, so the flows are near 1) and for peaked attention of the same shapes, which spreads them out."""
    r = vizapp.analyze(vm, random_image(0))
    got = r.attention_flow()
    assert got.shape == (6, 10)
    np.testing.assert_allclose(got, _networkx_flow(r.windows, r).reshape(6, 10), atol=2e-5)
    assert got.min() > 0 and got.max() <= 1 + 2e-5
    g = torch.Generator().manual_seed(3)
    peaked = [torch.softmax(4 * torch.randn(w.shape, generator=g), dim=-1) for w in r.windows]
    idx = [r.index(i) for i in range(r.num_layers)]
    for fusion in ("mean", "max"):
        got = windowed_flow(peaked, idx, r.layer_grids, r._readout(), fusion).numpy()
        np.testing.assert_allclose(got, _networkx_flow(peaked, r, fusion), atol=2e-5, err_msg=fusion)
        assert got.max() - got.min() > 0.2  # not a constant map
    assert edge_count(idx, r.layer_grids) == sum(int((m > 0).sum()) for m in _dense_layers(r))


def _dense_layers(r) -> list[torch.Tensor]:
    out = []
    for layer in range(r.num_layers):
        out.append(r.full_attention(layer).double().mean(0) + torch.eye(r.tokens_per_layer[layer]))
        if layer + 1 < r.num_layers and r.layer_grids[layer + 1] != r.layer_grids[layer]:
            out.append(W.merge_matrix(r.layer_grids[layer]))
    return out + [torch.ones(1, r.tokens_per_layer[-1])]


def test_one_window_over_the_whole_grid_is_the_plain_flow():
    """One stage whose window is the whole 3x3 grid (no shift, no merge): the windowed flow equals the plain ViT's
    attention_flow on the same attention with the output reading every token equally."""
    g = torch.Generator().manual_seed(1)
    attn = torch.softmax(3 * torch.randn(3, 2, 9, 9, generator=g), dim=-1)  # [L, H, N, N]
    idx = W.window_index((3, 3), (3, 3), (0, 0))
    assert idx.tolist() == [list(range(9))]
    uniform = torch.full((9,), 1 / 9, dtype=torch.float64)
    for fusion in ("mean", "max"):
        got = windowed_flow([a[None] for a in attn], [idx] * 3, [(3, 3)] * 3, uniform, fusion)
        want = attention_flow(attn, 0, head_fusion=fusion, readout=uniform)
        np.testing.assert_allclose(got.numpy(), want.numpy(), atol=3e-6)


def test_a_node_with_hundreds_of_edges_is_not_pruned():
    """One layer on a 16x16 grid in one window: every token has 256 keys, and the output node reads all 256 tokens,
    so a node's live-neighbour count passes 255 (it once wrapped around in int8 and pruned the sink: every flow 0).
    The flows equal the plain ViT's attention_flow on the same attention."""
    g = torch.Generator().manual_seed(2)
    attn = torch.softmax(4 * torch.randn(1, 1, 256, 256, generator=g), dim=-1)
    idx = W.window_index((16, 16), (16, 16), (0, 0))
    uniform = torch.full((256,), 1 / 256, dtype=torch.float64)
    got = windowed_flow([attn[0][None]], [idx], [(16, 16)], uniform)
    want = attention_flow(attn, 0, readout=uniform)
    assert float(got.min()) > 0
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-5)


def test_the_result_registry_batch_and_refusals(vm):
    imgs = [random_image(0), random_image(5)]
    r = vizapp.analyze(vm, imgs[0])
    flow = r.explain("flow")
    assert r.explain("attention_flow") is flow  # cached: one set of max-flows
    np.testing.assert_array_equal(methods.explain(r, "flow"), flow)
    assert not np.allclose(r.attention_flow("max"), flow)
    seen = []
    r2 = vizapp.analyze(vm, imgs[1])
    r2.attention_flow(progress=lambda done, total: seen.append((done, total)))
    assert seen[0] == (1, 60) and seen[-1] == (60, 60)
    batch = vizapp.explain(vm, imgs, "flow")
    assert batch.shape == (2, 6, 10)
    np.testing.assert_allclose(batch[0], flow, atol=1e-6)
    np.testing.assert_allclose(batch[1], r2.attention_flow(), atol=1e-6)
    with pytest.raises(BadParameterError, match="class token"):
        r.attention_flow(start_row="cls")
    with pytest.raises(BadParameterError, match="head_fusion"):
        r.attention_flow("median")
    with pytest.raises(BadParameterError, match="Transformer Attribution"):
        r.explain("transformer_attribution")
    cost = methods.cost(r, "flow")
    edges = edge_count([r.index(i) for i in range(4)], r.layer_grids)
    assert cost.work.startswith("60 max-flow problems") and f"({edges:,} edges)" in cost.work
    assert cost.seconds > 0 and "estimate" in cost.basis


def test_swin_t_graph_size():
    """Swin-T at 224 (56x56 tokens, windows of 7; 2, 2, 6, 2 blocks): the graph the cost note counts, by hand:
    3136·49 pairs in each of the first stage's 2 layers, 784·49 in the second's 2, 196·49 in the third's 6, 49·49 in
    the last 2 (windows tile every grid: no padding), 3136 + 784 + 196 merge edges and 49 output edges."""
    grids = [(56, 56)] * 2 + [(28, 28)] * 2 + [(14, 14)] * 6 + [(7, 7)] * 2
    idx = [W.window_index(g, (7, 7), (3, 3) if i % 2 else (0, 0)) for i, g in enumerate(grids)]
    want = 49 * (2 * 3136 + 2 * 784 + 6 * 196 + 2 * 49) + 3136 + 784 + 196 + 49
    assert edge_count(idx, grids) == want == 450_751


def test_the_evaluation_scores_flow_as_the_analysis_draws_it(tmp_path):
    """The dataset evaluation of a transformers Swin folder with "flow": each row's chefer2021 accuracies equal the
    authors' loop on that image's own ``r.attention_flow()``, upsampled by the first stage's token spacing."""
    from tests.test_swin import write_swin_folder
    from tests.test_swin_data import authors_accuracies
    from vizapp.evaluate.worker import Evaluator

    ev = Evaluator(write_swin_folder(tmp_path / "swin"), ["flow"], steps=0)
    items = [{"id": f"img{i}", "source": f"img{i}.png", "target": -1} for i in range(2)]
    pixels = [np.asarray(random_image(40 + i, size=(40, 44))) for i in range(2)]
    rows = ev.evaluate_batch(items, pixels)
    assert [row["status"] for row in rows] == ["ok"] * 2, rows
    for px, row in zip(pixels, rows, strict=True):
        r = vizapp.analyze(ev.vm, px)
        sal = torch.as_tensor(r.attention_flow())
        assert sal.shape == (9, 9)
        for direction in ("positive", "negative"):
            want = authors_accuracies(
                ev.vm, r.input, sal, r.strides[0], row["target"], direction == "negative", ev.black[:, 0, 0]
            )
            assert [row[f"flow.pred.{direction}.acc{k}"] for k in range(1, 10)] == want, direction


@pytest.mark.parametrize("fusion", ["mean", "max", "min"])
def test_windowed_rollout_of_one_whole_grid_window_is_the_plain_rollout(fusion):
    """The same graph for rollout: one stage whose window is the whole 3x3 grid gives the plain ViT's rollout
    (rows of fused A + I renormalised) read from the uniform readout, for every head fusion (max and min rows do not
    sum to 1, so the residual's share differs by row)."""
    from vizapp.analysis.rollout import rollout

    g = torch.Generator().manual_seed(4)
    attn = torch.softmax(3 * torch.randn(3, 2, 9, 9, generator=g), dim=-1).double()
    idx = W.window_index((3, 3), (3, 3), (0, 0))
    fused = [W.fuse_windows(a[None], idx, fusion) for a in attn]
    uniform = torch.full((9,), 1 / 9, dtype=torch.float64)
    got = W.rollout_through(fused, [idx] * 3, [(3, 3)] * 3, uniform)
    want = uniform @ rollout(attn, 0, head_fusion=fusion)
    torch.testing.assert_close(got, want)
