"""Attention flow (Abnar & Zuidema 2020) through windowed attention and patch merging (Swin), as exact max-flows.

The graph is the one attention rollout through windows multiplies along (:func:`vizapp.analysis.windows.rollout_through`),
with capacities in place of products, so that flow and rollout answer the same question on the same graph:

- one node per token at the input of each layer, and one per token at the output of the last layer;
- layer l adds an edge from key j to query i (both tokens of l's grid, in one window) of capacity Â_l[i, j], where
  Â_l = (A + I) / (row sum + 1): A the head-fused window attention with each row's mass on padded slots (which have
  no place in the image) spread over its real keys (:func:`vizapp.analysis.windows.fuse_windows`), I the residual
  path; for the paper's mean over heads the rows of A sum to 1 and Â = 0.5·A + 0.5·I;
- where the grid changes between two layers, a patch merging adds a layer of nodes on the merged grid and an edge from
  each source token to the token it is merged into, of capacity 1/k for its k real sources (vizapp's equal-share
  definition of the merge, :func:`vizapp.analysis.windows.merge_matrix`);
- Swin's head averages the last layer's N tokens, so the sink is an output node fed by each of them through an edge
  of capacity 1/N (as :func:`vizapp.analysis.flow.attention_flow` does for a plain model whose output reads several
  tokens).

The map is, for each first-stage token p, the value of the maximum flow from p's node at the input of layer 0 to the
output node. Capacities are rounded to integers at ``scale`` exactly as in :mod:`vizapp.analysis.flow` (the same error
bound: 0.5·k/scale for the k edges of a minimum cut), and nodes on no path from a source to the sink are removed,
which changes no flow value. The graph is sparse (each token has the w² keys of its window), so it is built as sparse
matrices and never as an [N, N] array per layer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import scipy.sparse
import torch

from vizapp.analysis.flow import max_flows
from vizapp.analysis.windows import fuse_windows, merge_parents, merges_after, token_row_sums

_INT32_MAX = np.iinfo(np.int32).max


def _rounded(m: scipy.sparse.coo_array, scale: float) -> scipy.sparse.csr_array:
    """Sum duplicate entries, then capacities ``rint(value * scale)`` with the zeros dropped, as int64 CSR."""
    csr = scipy.sparse.csr_array(m)
    csr.sum_duplicates()
    data = np.rint(csr.data * scale)
    if data.size and data.max() > _INT32_MAX:
        raise ValueError(f"scale {scale} makes capacities overflow int32 (largest {data.max():.3g})")
    out = scipy.sparse.csr_array((data.astype(np.int64), csr.indices, csr.indptr), shape=csr.shape)
    out.eliminate_zeros()
    return out


def layer_capacities(fused: torch.Tensor, index: torch.Tensor, num_tokens: int, scale: float) -> scipy.sparse.csr_array:
    """One attention layer's integer capacities [N, N] (row: the query i the edge enters, column: the key j it
    leaves), ``rint(Â[i, j] * scale)`` with Â = (A + I) / (row sum + 1).

    Args:
        fused: head-fused window maps [nW, w², w²] with padded keys' mass spread over the real keys
            (:func:`vizapp.analysis.windows.fuse_windows`), non-negative and finite.
        index: the layer's :func:`vizapp.analysis.windows.window_index` [nW, w²] (-1: padding).
        num_tokens: N, the layer's grid size.
        scale: capacity resolution.
    """
    a = fused.detach().to(device="cpu", dtype=torch.float64)
    idx = index.detach().cpu()
    if not bool(torch.isfinite(a).all()) or bool((a < 0).any()):
        raise ValueError("attention must be finite and non-negative to serve as flow capacities")
    real = idx >= 0
    keep = real[:, :, None] & real[:, None, :]  # [nW, w², w²]
    rows = idx[:, :, None].expand(keep.shape)[keep]  # query token of each kept entry
    cols = idx[:, None, :].expand(keep.shape)[keep]  # key token
    denom = token_row_sums(a, idx, num_tokens) + 1.0  # [N]
    vals = a[keep] / denom[rows]
    diag = torch.arange(num_tokens)
    data = torch.cat([vals, 1.0 / denom]).numpy()
    ij = (torch.cat([rows, diag]).numpy(), torch.cat([cols, diag]).numpy())
    return _rounded(scipy.sparse.coo_array((data, ij), shape=(num_tokens, num_tokens)), scale)


def merge_capacities(grid: tuple[int, int], scale: float) -> scipy.sparse.csr_array:
    """A patch merging's integer capacities [N', N] from a (gh, gw) grid to ((gh+1)//2, (gw+1)//2): each source token
    feeds the token it is merged into with ``rint(scale / k)``, k that token's real source count (equal shares)."""
    parent = merge_parents(grid).numpy()  # [N]
    count = np.bincount(parent)
    m = scipy.sparse.coo_array((1.0 / count[parent], (parent, np.arange(parent.size))), shape=(count.size, parent.size))
    return _rounded(m, scale)


def readout_capacities(weights: torch.Tensor, scale: float) -> scipy.sparse.csr_array:
    """The output node's in-edges [1, N]: ``rint(weights * scale)`` from each last-layer token it reads."""
    w = weights.detach().to(device="cpu", dtype=torch.float64).reshape(1, -1).numpy()
    return _rounded(scipy.sparse.coo_array(w), scale)


def layered_graph(layers: Sequence[scipy.sparse.csr_array]) -> tuple[scipy.sparse.csr_array, np.ndarray, int]:
    """A layered graph as one CSR capacity matrix, pruned to the nodes on some path from a first-layer node to the
    single last-layer node.

    Args:
        layers: integer capacities, layer k as [n_{k+1}, n_k] (row: head node, column: tail node); the last has one
            row (the sink).

    Returns:
        (graph, sources, sink) as :func:`vizapp.analysis.flow.flow_graph`: ``sources`` [n_0] the node index of each
        first-layer node, -1 where it was pruned; ``sink`` the last node's index, or -1.
    """
    sizes = [layers[0].shape[1]] + [m.shape[0] for m in layers]
    for k, m in enumerate(layers):
        if m.shape[1] != sizes[k]:
            raise ValueError(f"layer {k} takes {m.shape[1]} nodes, the layer before gives {sizes[k]}")
    if sizes[-1] != 1:
        raise ValueError(f"the last layer must have one node (the sink), got {sizes[-1]}")
    # reachability as counts of live neighbours: int64, so that a node with thousands of in- or out-edges (the
    # output node reads every last-layer token) cannot wrap around to 0
    edges = [(m > 0).astype(np.int64) for m in layers]
    forward = [np.ones(sizes[0], dtype=bool)]
    for e in edges:
        forward.append(e @ forward[-1].astype(np.int64) > 0)
    backward = [np.ones(1, dtype=bool)]
    for e in reversed(edges):
        backward.insert(0, e.T @ backward[0].astype(np.int64) > 0)
    alive = [f & b for f, b in zip(forward, backward, strict=True)]
    index, total = [], 0
    for a in alive:
        ids = np.full(a.shape, -1, dtype=np.int64)
        ids[a] = total + np.arange(int(a.sum()))
        index.append(ids)
        total += int(a.sum())
    tails, heads, data = [], [], []
    for k, m in enumerate(layers):
        coo = m.tocoo()
        t, h = index[k][coo.col], index[k + 1][coo.row]
        ok = (t >= 0) & (h >= 0)
        tails.append(t[ok])
        heads.append(h[ok])
        data.append(coo.data[ok])
    graph = scipy.sparse.csr_array(
        (np.concatenate(data).astype(np.int32), (np.concatenate(tails), np.concatenate(heads))), shape=(total, total)
    )
    graph.sum_duplicates()  # none: each (tail, head) pair is one entry of one layer; this sorts the indices
    graph.indices = graph.indices.astype(np.int32)
    graph.indptr = graph.indptr.astype(np.int32)
    return graph, index[0], int(index[-1][0])


def windowed_flow(
    windows: Sequence[torch.Tensor],
    indices: Sequence[torch.Tensor],
    grids: Sequence[tuple[int, int]],
    readout: torch.Tensor,
    head_fusion: str = "mean",
    scale: float = 1e6,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Attention flow from each first-stage token to the output, [N_0] float32 (row-major over the first grid).

    Args:
        windows: per layer, the window attention [nW, H_l, w², w²] as the forward used it.
        indices: per layer, its :func:`vizapp.analysis.windows.window_index`.
        grids: per layer, its token grid; a patch merging sits between two layers whose grids differ.
        readout: [N_last] non-negative weights summing to 1 of the last layer's tokens the output reads.
        head_fusion: "mean" (the paper), "max" or "min", over each layer's own heads.
        scale: capacity resolution (see :mod:`vizapp.analysis.flow`).
        progress: ``progress(done, total)`` after each of the N_0 max-flows.
    """
    if not (np.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite number, got {scale}")
    w = readout.detach().double().cpu()
    if w.numel() != grids[-1][0] * grids[-1][1] or bool((w < 0).any()) or abs(float(w.sum()) - 1) > 1e-6:
        raise ValueError(f"readout must be {grids[-1][0] * grids[-1][1]} non-negative weights summing to 1")
    layers = []
    for i, (win, idx) in enumerate(zip(windows, indices, strict=True)):
        n = grids[i][0] * grids[i][1]
        layers.append(layer_capacities(fuse_windows(win.detach().cpu(), idx.cpu(), head_fusion), idx, n, scale))
        if merges_after(grids, i):
            layers.append(merge_capacities(grids[i], scale))
    layers.append(readout_capacities(w, scale))
    graph, sources, sink = layered_graph(layers)
    return max_flows(graph, sources, sink, scale, progress)


def edge_count(indices: Sequence[torch.Tensor], grids: Sequence[tuple[int, int]]) -> int:
    """Edges of the unpruned flow graph: each layer's (query, key) pairs within windows (the residual edge is the
    token's own pair), each merging's source tokens, and the output's in-edges."""
    total = 0
    for i, idx in enumerate(indices):
        real = (idx >= 0).sum(-1).long()
        total += int((real * real).sum())
        if merges_after(grids, i):
            total += grids[i][0] * grids[i][1]
    return total + grids[-1][0] * grids[-1][1]
