"""Attention flow (Abnar & Zuidema, "Quantifying Attention Flow in Transformers", ACL 2020), as exact max-flows.

The attention graph has L+1 layers of N nodes: node (l, j) is token j at the input of layer l, node (L, i) token i at
the output. Every layer l adds edges (l, j) -> (l+1, i) with capacity Â_l[i, j], where Â_l is the head-fused
attention, with the identity added for the residual path and rows renormalised when ``residual`` is set (as in
:func:`vizapp.analysis.rollout.add_residual`). The flow map of a query token is, for each patch p, the value of the
maximum flow from node (0, p) to node (L, query).

scipy's max-flow solvers need integer capacities, so capacities are multiplied by ``scale`` and rounded to the
nearest integer; those below 0.5 / scale become 0 and their edges are dropped. Every edge is then off by at most
0.5 / scale, so a flow value is off by at most 0.5 * k / scale, where k is the number of edges crossing a minimum
cut of the exact or of the rounded graph (k <= N when that cut is the sink's N in-edges, as it mostly is; k never
exceeds the edge count L * N^2). With the default scale 1e6 and 197 tokens that is 1e-4 in the worst case for a
sink cut, and typically a few 1e-6 since the rounding errors have random signs.

A model whose output reads several tokens (BEiT's mean over its patches, DeiT's two heads) gets one more node, the
output, with an edge from each top-layer node i it reads of capacity w_i, the weight token i has in the output (the
weights sum to 1, as a top-layer node's in-edges do); the map is then the max-flow from each patch to the output.

The graph is built once and shared by the P max-flows (one per patch, each from its own layer-0 node). Before that,
nodes that cannot reach the sink, or cannot be reached from a patch's layer-0 node, are removed with their edges:
the layer-0 prefix-token nodes, and all top-layer nodes but the query, always go; more go when rounding zeroes
edges. This changes no flow value.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import scipy.sparse
import torch
from scipy.sparse.csgraph import maximum_flow

from vizapp.analysis.rollout import add_residual, fuse_heads

_INT32_MAX = np.iinfo(np.int32).max


def flow_capacities(
    attn: torch.Tensor, head_fusion: str = "mean", residual: bool = True, scale: float = 1e6
) -> np.ndarray:
    """Integer edge capacities of the attention graph.

    Args:
        attn: attention [L, H, N, N], non-negative.
        head_fusion: "mean", "max" or "min" (see :func:`vizapp.analysis.rollout.fuse_heads`).
        residual: add the identity and renormalise rows, as attention rollout does.
        scale: capacities are ``rint(Â * scale)``.

    Returns:
        caps [L, N, N] int64; ``caps[l, i, j]`` is the capacity of the edge (l, j) -> (l+1, i).

    Raises:
        ValueError: for a bad shape, negative or non-finite attention, or a scale that overflows int32 capacities.
    """
    if attn.dim() != 4 or attn.shape[-1] != attn.shape[-2]:
        raise ValueError(f"expected attention shaped [L, H, N, N], got {tuple(attn.shape)}")
    if not (np.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite number, got {scale}")
    fused = fuse_heads(attn.detach().to(device="cpu", dtype=torch.float64), head_fusion)  # [L, N, N]
    if not bool(torch.isfinite(fused).all()):
        raise ValueError("attention contains non-finite values")
    if bool((fused < 0).any()):
        raise ValueError("attention must be non-negative to serve as flow capacities")
    if residual:
        fused = add_residual(fused)
    scaled = np.rint(fused.numpy() * scale)  # [L, N, N]
    if scaled.size and scaled.max() > _INT32_MAX:
        raise ValueError(f"scale {scale} makes capacities overflow int32 (largest {scaled.max():.3g})")
    return scaled.astype(np.int64)


def _alive_nodes(caps: np.ndarray, num_prefix_tokens: int, query: int) -> np.ndarray:
    """[L+1, N] bool: nodes on some path from a patch's layer-0 node to (L, query) along positive edges."""
    num_layers, n, _ = caps.shape
    edge = caps > 0  # [L, N(head i), N(tail j)]
    forward = np.zeros((num_layers + 1, n), dtype=bool)
    forward[0, num_prefix_tokens:] = True
    for layer in range(num_layers):
        forward[layer + 1] = (edge[layer] & forward[layer][None, :]).any(axis=1)
    backward = np.zeros((num_layers + 1, n), dtype=bool)
    backward[num_layers, query] = True
    for layer in range(num_layers - 1, -1, -1):
        backward[layer] = (edge[layer] & backward[layer + 1][:, None]).any(axis=0)
    return forward & backward


def flow_graph(
    caps: np.ndarray, num_prefix_tokens: int, query: int = 0
) -> tuple[scipy.sparse.csr_array, np.ndarray, int]:
    """The pruned attention graph as a CSR capacity matrix, built once for all patches.

    Args:
        caps: integer capacities [L, N, N] from :func:`flow_capacities`.
        num_prefix_tokens: tokens before the patches (their layer-0 nodes are not sources).
        query: output token whose flow is measured; the sink is node (L, query).

    Returns:
        (graph, sources, sink): ``graph`` is a [V, V] int32 CSR matrix with sorted indices whose entry (u, v) is the
        capacity of the edge u -> v; ``sources`` [P] int64 holds the node index of each patch's layer-0 node, or
        -1 where that node was pruned (its flow is 0); ``sink`` is the sink's node index, or -1 if it was pruned.
    """
    num_layers = caps.shape[0]
    alive = _alive_nodes(caps, num_prefix_tokens, query)  # [L+1, N]
    index = np.full(alive.shape, -1, dtype=np.int64)
    index[alive] = np.arange(int(alive.sum()))  # row-major: layer, then token
    num_nodes = int(alive.sum())
    # Edge (l, j) -> (l+1, i) kept when both ends are alive; enumerate as [l, j, i] so tails (then heads) ascend.
    keep = (caps.transpose(0, 2, 1) > 0) & alive[:-1, :, None] & alive[1:, None, :]  # [L, N(j), N(i)]
    layer, tail, head = np.nonzero(keep)
    tails = index[layer, tail]
    heads = index[layer + 1, head]
    data = caps[layer, head, tail].astype(np.int32)
    indptr = np.zeros(num_nodes + 1, dtype=np.int32)
    np.cumsum(np.bincount(tails, minlength=num_nodes), out=indptr[1:])
    graph = scipy.sparse.csr_array((data, heads.astype(np.int32), indptr), shape=(num_nodes, num_nodes))
    graph.has_sorted_indices = True  # tails ascend, and heads ascend within a tail, by construction
    sources = index[0, num_prefix_tokens:].copy()
    sink = int(index[num_layers, query])
    return graph, sources, sink


def attention_flow(
    attn: torch.Tensor,
    num_prefix_tokens: int,
    head_fusion: str = "mean",
    residual: bool = True,
    scale: float = 1e6,
    query: int = 0,
    progress: Callable[[int, int], None] | None = None,
    readout: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention flow map of token ``query`` over the patches (exact max-flow, up to the capacity rounding).

    Args:
        attn: post-softmax attention [L, H, N, N] of every layer and head.
        num_prefix_tokens: CLS + distillation + register tokens at the front of the sequence.
        head_fusion: "mean" (the paper), "max" or "min".
        residual: use Â = rownorm(A + I) as capacities (the paper); False uses the fused attention as is.
        scale: capacity resolution; see the module docstring for the error bound. Must keep scale * max capacity
            within int32.
        query: output token whose flow is measured (0 = CLS).
        progress: called as ``progress(done, total)`` after each of the ``total = P`` max-flows.
        readout: [N] non-negative weights summing to 1 of the tokens the output reads, instead of ``query``: the sink
            is then an output node fed by each top-layer token i through an edge of capacity ``readout[i]`` (a
            one-hot ``readout`` is the same as that token's ``query``).

    Returns:
        [P] float32 (P = N - num_prefix_tokens, row-major patches): max-flow value from each patch's layer-0 node to
        node (L, query), or to the output node. Values are >= 0 and, with ``residual``, at most 1 (the sink's
        in-capacity) up to rounding.
    """
    if attn.dim() != 4 or attn.shape[-1] != attn.shape[-2]:
        raise ValueError(f"expected attention shaped [L, H, N, N], got {tuple(attn.shape)}")
    n = attn.shape[-1]
    if attn.shape[0] < 1:
        raise ValueError("attention needs at least one layer")
    if not 0 <= num_prefix_tokens < n:
        raise ValueError(f"num_prefix_tokens must be in [0, {n - 1}], got {num_prefix_tokens}")
    if not 0 <= query < n:
        raise ValueError(f"query must be in [0, {n - 1}], got {query}")
    caps = flow_capacities(attn, head_fusion, residual, scale)  # [L, N, N]
    if readout is not None:
        w = readout.detach().to(device="cpu", dtype=torch.float64).reshape(-1)
        if (
            w.shape[0] != n
            or not bool(torch.isfinite(w).all())
            or bool((w < 0).any())
            or abs(float(w.sum()) - 1) > 1e-6
        ):
            raise ValueError(f"readout must be {n} non-negative weights summing to 1")
        read = torch.nonzero(w).flatten()
        if read.numel() == 1:
            query = int(read[0])
        else:  # one more layer whose node 0 is the output, fed by the tokens it reads
            out = np.zeros((1, n, n), dtype=np.int64)
            out[0, 0] = np.rint(w.numpy() * scale).astype(np.int64)
            caps, query = np.concatenate([caps, out]), 0
    graph, sources, sink = flow_graph(caps, num_prefix_tokens, query)
    return max_flows(graph, sources, sink, scale, progress)


def max_flows(
    graph: scipy.sparse.csr_array,
    sources: np.ndarray,
    sink: int,
    scale: float,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """[P] float32: the max-flow value from each of ``sources`` to ``sink`` on ``graph`` (integer capacities, see
    :func:`flow_graph`), divided by ``scale``; 0 where a source or the sink was pruned (index -1). ``progress(done,
    total)`` is called after each."""
    total = sources.shape[0]
    values = np.zeros(total, dtype=np.float64)  # [P]
    for k, source in enumerate(sources.tolist()):
        if source >= 0 and sink >= 0:
            values[k] = int(maximum_flow(graph, source, sink).flow_value) / scale
        if progress is not None:
            progress(k + 1, total)
    return torch.from_numpy(values).to(torch.float32)
