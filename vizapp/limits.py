"""Every byte budget vizapp works within, in one place (the model cache and upload limits aside).

The figures were measured on a 2-vCPU AMD EPYC (32 MiB shared L3) unless a comment names the 2-vCPU Intel Xeon (2 MiB
L2 a core, 300 MiB L3) that other sessions get; docs/benchmarks.md has the runs. Each module reads these names at
call time, so a test may lower one with ``monkeypatch.setattr(limits, ...)``.
"""

from __future__ import annotations

import torch

# Attention per chunk handed over during the forward on the CPU: with the distance product beside it, about 2x this
# stays in the last-level cache (2 heads of ViT-L/16 at 384 px, all 12 of ViT-B/16 at 224 px; one head at 1,374
# tokens). Per ViT-L/384 layer, distance and rollout statistics took 15.5 ms in chunks of 2 heads against 21 ms for
# all 16 at once (median of 22 interleaved rounds).
INLINE_CHUNK_BYTES = 3 * 2**20
# Whole images are formed and handed over together on the CPU ([g, H, N, N], every head of g images) while they fit
# this: a batch's statistics then run as fewer, larger ops, which wait less for their second thread. ViT-S/16 and
# ViT-B/16, analyze of 16 images on 2 threads, one process, medians: 1,084 against 1,133 ms (6 images a group against
# 3 with INLINE_CHUNK_BYTES) and 3,550 against 3,660 ms (3 against 1); on 1 thread ViT-S took 1,913 against 1,879.
IMAGE_GROUP_BYTES = 6 * 2**20
# At most this much of one layer's attention exists at once on a GPU, and on any device when a view recomputes a
# layer from q and k.
ATTENTION_CHUNK_BYTES = 32 * 2**20
# One head is split into blocks of query rows only when its N x N exceeds this (N > 2,048): 1,374-token heads took
# 77 ms for 16 heads whole, 79 ms in 2 blocks and 117 ms in 3 (SDPA: 63 ms). On the Intel Xeon, whose 2 MiB L2 a
# block of 1 or 2 MiB would fit, the whole analysis of that 24-layer model took 4,158 ms with this limit against
# 4,265, 4,299 and 4,461 ms with 4, 2 and 1 MiB blocks (medians of 4 interleaved rounds).
ROW_BLOCK_BYTES = 16 * 2**20
MIN_CHUNK_ROWS = 128  # smaller row blocks cost more in per-call overhead than they save
# Keep head-fused matrices of every layer only while they stay small (vit_base: 1.9 MB per fusion; ViT-L/16 at 384 px
# would need 32 MB per fusion, so big models recompute them from q and k when a view asks).
FUSED_CACHE_LIMIT_BYTES = 16 * 2**20
# Keep every layer's mean-fused attention for the rollout below this size; above it, multiply the rollout up as the
# forward goes (one N x N x N product per layer) instead of holding L x N x N floats. Above FUSED_CACHE_LIMIT_BYTES
# the views do not keep the fusions, so storing them would only spare the products, for memory held through the
# forward. ViT-L/16 at 384 px (30.5 MiB of fusions), 2 threads: analyze's peak above a bare forward's, 114 MB streamed
# against 161 MB stored (3 fresh processes each); analyze 2,540 against 2,494 ms (medians of 6 interleaved rounds).
ROLLOUT_STORE_LIMIT_BYTES = 16 * 2**20
# On a GPU the mean fusions are stored up to this instead (:func:`rollout_store_bytes`): there the products cost
# device time that memory does not, since the fusions are formed in the pass's own (graph) memory and dropped after it.
# A 24-layer, 1,374-token model (DINOv2-L/14 at 518 px) stores 181 MB and spares 23 products of 1,374^3 (60 GMAC,
# about 2 ms of an H100's float32 rate: issue 23's goal of 1.15 leaves about 5 ms beyond the bare forward).
ROLLOUT_STORE_LIMIT_BYTES_GPU = 256 * 2**20
# The attention statistics' rows (a float32 per layer, image, head and query, for each statistic over heads) are kept
# for every layer of a forward while they fit this, so that their means over the queries are one operation for all
# layers (a GPU's kernel), not one a layer (ViT-B/16: 226 KB an image for distance and entropy); above it, one
# layer's rows at a time.
STATISTIC_ROWS_BYTES = 4 * 2**20
# Every block's output [L, N, D] is kept for the feature views (PCA, similarity) below this size; above it only the
# last block's (ViT-B/16 at 224 px: 7.3 MB for all 12; ViT-L/16 at 384 px would need 57 MB).
BLOCK_OUTPUT_BYTES = 32 * 2**20
# Exact head importance on the generic path runs H copies of the image through the model at once (one head ablated in
# each); more copies than fit this estimate of activation memory (see :func:`ablation_batch`) run in sub-batches.
ABLATION_BATCH_BYTES = 512 * 2**20
# Full attention [L, H, N, N] goes into an .npz export only below this size (CLS rows otherwise).
EXPORT_ATTENTION_BYTES = 256 * 2**20
# CUDA graphs (vizapp.cudagraph) kept per model: of the analysis forward, one per input shape (a batch's size is part
# of its shape), and of a class map's forward and backward (vizapp.gradient_pass), so that an image's analysis, its class
# maps and one batch shape stay recorded together. Each keeps the memory it was recorded with reserved (ViT-B/16, one
# image's analysis: about 70 MB). Passes whose estimate (pipeline._PassSetup.graph_bytes: 16 ViT-B/16 images about
# 445 MB, one image of DINOv2-L/14 at 518 px 586 MB with its stored fusions; gradient_pass.graph_memory: ViT-B/16 about
# 243 MB) exceeds GRAPH_MEMORY_BYTES run eagerly.
CUDA_GRAPHS = 3
GRAPH_MEMORY_BYTES = 640 * 2**20
# A list of images given to ``vizapp.analyze`` or ``vizapp.explain`` goes through the model in forwards of at most this
# estimate each (see :func:`analysis_bytes`; one image always runs, as it does alone): ViT-B/16 at 224 px, about 35 MB
# an image (58 per forward), 240 MB with gradients (8 per forward).
BATCH_FORWARD_BYTES = 2 * 2**30
# On a CUDA device the same estimate may take an eighth of the device's memory, up to this (never less than
# BATCH_FORWARD_BYTES; an eighth, so that the evaluation's Ray actors can share one GPU: its default two take a
# quarter of it at most): more images share one forward and one backward, whose kernels are launched once instead
# of once per 8 images (ViT-B/16 with gradients: 33 images per forward in 8 GiB). At batch sizes like these a GPU is
# bound by launches, and 16 ViT-B images' class maps launch 946 kernels in two forwards against 473 in one
# (docs/benchmarks-launches.md).
BATCH_FORWARD_BYTES_GPU = 8 * 2**30
# Perturbed copies per forward in the evaluation (vizapp.evaluate; see :func:`perturbation_batch`). A GPU is filled by
# large batches. On the CPU a forward of many copies costs more per copy: its activations outgrow the caches, and
# blocks over glibc's mmap threshold come back as fresh pages every forward. On 2 threads, bare forwards of 16 copies
# cost 0.91, 0.63, 0.76 and 0.96 of what batches of 256 cost per copy for the bundled model, ViT-Ti, ViT-S and ViT-B
# (docs/benchmarks-copies-batch.md), and the evaluation of 16 ViT-Ti images ran 1.34 times as fast with them.
PERTURBATION_BATCH_CPU = 16
PERTURBATION_BATCH_GPU = 256
# What the analyses of one ``vizapp.analyze(vm, images)`` keep in all (q and k of every layer, block outputs, fusions;
# with gradients, the autograd graphs): a list over this is refused before any forward. ``vizapp.explain`` keeps maps
# only and is not bounded by it.
BATCH_RECORD_BYTES = 4 * 2**30
# Blocks an analysis keeps on the CPU (q and k, fusions, block outputs) of at least KEPT_POOL_MIN_BYTES come from
# vizapp.kept, which hands them out again once the analysis holding them is gone: a fresh block is faulted in page by
# page (16 ViT-S/16 images keep about 200 MB, some 50,000 faults a forward; 64 keep 816 MB). The pool holds at most
# KEPT_POOL_BYTES, in use and free together, so that much may stay held once every analysis is gone
# (vizapp.kept.release() gives it back); a block beyond that is an ordinary allocation.
KEPT_POOL_MIN_BYTES = 1 * 2**20
KEPT_POOL_BYTES = 1 * 2**30
# A free block none of the pool's last KEPT_POOL_RECENT requests took is given back (an analysis asks for about 3).
KEPT_POOL_RECENT = 16


def batch_forward_bytes(device: torch.device) -> int:
    """The estimate one forward of a list of images may take on ``device`` (:data:`BATCH_FORWARD_BYTES`,
    :data:`BATCH_FORWARD_BYTES_GPU`); fixed for a device type and size, so that a job's batches are the same on every
    run."""
    if device.type != "cuda":
        return BATCH_FORWARD_BYTES
    try:
        total = torch.cuda.get_device_properties(device).total_memory
    except (AssertionError, RuntimeError):  # no CUDA in this torch: a device simulated in the tests
        return max(BATCH_FORWARD_BYTES, BATCH_FORWARD_BYTES_GPU)
    return max(BATCH_FORWARD_BYTES, min(BATCH_FORWARD_BYTES_GPU, total // 8))


def perturbation_batch(device: torch.device) -> int:
    """Perturbed copies per forward of the evaluation on ``device`` (:data:`PERTURBATION_BATCH_CPU`,
    :data:`PERTURBATION_BATCH_GPU`): fixed for a device type, so that the engines batch alike on it."""
    return PERTURBATION_BATCH_CPU if torch.device(device).type == "cpu" else PERTURBATION_BATCH_GPU


def chunk_bytes(device: torch.device, group: bool = False) -> int:
    """Attention per chunk formed during the forward: cache-sized on the CPU, larger on a GPU; with ``group``, per
    group of whole images handed over at once (:data:`IMAGE_GROUP_BYTES` on the CPU)."""
    if device.type != "cpu":
        return ATTENTION_CHUNK_BYTES
    return IMAGE_GROUP_BYTES if group else INLINE_CHUNK_BYTES


def rollout_store_bytes(device: torch.device | str | None = None) -> int:
    """The most every layer's mean fusion may take for the default rollout to be carried down from them after the
    forward; above it the rollout is multiplied up during the forward, an N x N x N product a layer:
    :data:`ROLLOUT_STORE_LIMIT_BYTES` on the CPU (None), :data:`ROLLOUT_STORE_LIMIT_BYTES_GPU` on any other device."""
    if device is None or torch.device(device).type == "cpu":
        return ROLLOUT_STORE_LIMIT_BYTES
    return ROLLOUT_STORE_LIMIT_BYTES_GPU


def chunk_shape(heads: int, tokens: int, budget: int) -> tuple[int, int]:
    """(heads, query rows) per chunk: as many whole heads as fit ``budget`` bytes (at least one), and one head in
    equal blocks of query rows (at least :data:`MIN_CHUNK_ROWS`) once its N x N exceeds :data:`ROW_BLOCK_BYTES`."""
    per_head = tokens * tokens * 4
    if per_head <= budget:
        return max(1, min(heads, budget // per_head)), tokens
    if per_head <= ROW_BLOCK_BYTES:
        return 1, tokens
    rows = max(MIN_CHUNK_ROWS, ROW_BLOCK_BYTES // (tokens * 4))
    blocks = -(-tokens // rows)
    return 1, -(-tokens // blocks)  # equal blocks


def ablation_batch(
    copies: int, tokens: int, width: int, heads: int, element_bytes: int, keys: int | None = None
) -> int:
    """How many ablated copies of one image go through the model together, within :data:`ABLATION_BATCH_BYTES`.

    A copy's peak activations are estimated as a block's widest tensors, the MLP's 4·N·D and the input, q, k, v and
    outputs (6·N·D), plus one layer's attention H·N·N if the attention is materialised (H·N·w² for windowed
    attention: ``keys`` = w², the keys each query sees).
    """
    per_copy = (10 * tokens * width + heads * tokens * (tokens if keys is None else keys)) * element_bytes
    return max(1, min(copies, ABLATION_BATCH_BYTES // max(1, per_copy)))


KEPT_TERMS = ("record", "block_outputs", "fusions", "autograd_graph")
"""The terms of :func:`analysis_memory` that an analysis keeps for as long as it lives; the others are working memory
of its forward."""


def analysis_memory(
    layers: int,
    tokens: int,
    heads: int,
    width: int | None = None,
    patches: int | None = None,
    gradients: bool = False,
    device: torch.device | str | None = None,
) -> dict[str, int]:
    """High estimate, in bytes (float32), of what one image's forward and analysis hold at once, term by term: the
    one estimate behind the per-analysis budget (:func:`vizapp.budget.check_analysis_budget`) and the batch budgets
    (:func:`analysis_bytes`).

    Kept while the analysis lives (:data:`KEPT_TERMS`):

    - ``record``: q and k of every layer, 2·L·N·D (views recompute attention from them).
    - ``block_outputs``: every block's output L·N·D while that fits :data:`BLOCK_OUTPUT_BYTES`, else the last one.
    - ``fusions``: every layer's mean fusion L·N² while that fits :func:`rollout_store_bytes` of ``device``, else 2·N²
      (the running rollout and the fusion being accumulated, multiplied up during the forward).
    - ``autograd_graph`` (with ``gradients``): each layer's widest activations 14·N·D and its attention, softmax and
      their gradients 3·H·N², and the image's attention gradients 2·L·H·N².

    Working memory of the forward:

    - ``activations``: one block's widest activations, 10·N·D (input, q, k, v, output, the MLP's 4·N·D).
    - ``output_stack``: the block outputs' block [L, N, D] in the model's dtype, written during the forward
      (:class:`vizapp.streaming.BlockFeatures`), when every layer's is kept: in float32 the kept outputs are views of
      it and this term is an upper bound; in a half-precision forward their float32 copies are made from it after.
    - ``attention_chunk``: one chunk of attention (:func:`chunk_shape` at :data:`ATTENTION_CHUNK_BYTES`) and the
      product beside it, 2·heads·rows·N.
    - ``token_matrices``: the N x N working matrices, 4·N² while the fusions are stored; above that 5·N² (the
      identity, the fusion plus identity, its normalisation, the product and the previous rollout: measured at 4,097
      tokens, 7.8·N² in all with the two kept, the patch distances and the chunk).
    - ``patch_distances``: the P x P matrix of distances between patch centres, P².
    - ``statistic_rows``: a float32 per head and query for each registered statistic over heads, for every layer
      while that fits :data:`STATISTIC_ROWS_BYTES` (:class:`vizapp.statistics.StatisticsReducer`), else for one.

    Args:
        layers: encoder layers L.
        tokens: tokens per image N (prefix tokens and patches).
        heads: attention heads per layer H.
        width: the model's width D; None: 64 per head, as most ViTs have.
        patches: patch tokens P; None: N - 1.
        gradients: the forward keeps its autograd graph (class-specific maps).
        device: where the analysis runs (None: the CPU), for the fusions' limit.

    Returns:
        term -> bytes; their sum is the estimate.
    """
    f32 = 4
    L, N, H = int(layers), int(tokens), int(heads)
    D = H * 64 if width is None else int(width)
    P = N - 1 if patches is None else int(patches)
    outputs = L * N * D * f32
    kept_outputs = outputs <= BLOCK_OUTPUT_BYTES
    stored = L * N * N * f32 <= rollout_store_bytes(device)
    chunk_heads, chunk_rows = chunk_shape(H, N, ATTENTION_CHUNK_BYTES)
    terms = {
        "record": 2 * L * N * D * f32,
        "block_outputs": outputs if kept_outputs else N * D * f32,
        "fusions": L * N * N * f32 if stored else 2 * N * N * f32,
        "activations": 10 * N * D * f32,
        "output_stack": outputs if kept_outputs else 0,
        "attention_chunk": 2 * chunk_heads * chunk_rows * N * f32,
        "token_matrices": (4 if stored else 5) * N * N * f32,
        "patch_distances": P * P * f32,
        "statistic_rows": _statistic_rows(L, N, H),
    }
    if gradients:
        terms["autograd_graph"] = L * (14 * N * D + 3 * H * N * N) * f32 + 2 * L * H * N * N * f32
    return terms


def attention_graph_bytes(layers: int, tokens: int, heads: int, width: int | None = None, kept: bool = False) -> int:
    """High estimate, in bytes, of one image's share of the forward and backward of a
    :class:`vizapp.graph_maps.AttentionGraph` (the batch's class maps without an analysis): its autograd graph, which
    holds no attention (the graph forms it again in the backward), 22·N·D a layer (a block saves about 16·N·D for its
    backward: its norms' inputs, q, k and v, the heads' output, the MLP's 4·N·D twice; the rest is the allocator's
    slack); each layer's Ā in float64 and its float32 rollout fusion, 12·L·N²; and what one layer needs at once,
    10·N·D of activations and 4·H·N² in the forward or the backward (the attention, its gradient, the softmax's
    backward and the product). Measured by benchmarks.graph_memory on the CPU (docs/benchmarks-graph-memory.md):
    ViT-B/16, 16 images, 163 MB an image against this estimate's 179; ViT-L/16 at 384 px, 2 images, 1.31 GB against
    1.45.

    ``kept``: the graph that keeps every layer's attention instead (``AttentionGraph(recompute=False)``), which holds
    it, and at the backward's end every layer's gradient of it, 8·L·H·N² more (the same runs' whole peaks, model
    included: 2,907 and 3,033 MiB for 16 ViT-B/16 images against 3,411 MiB here, 3,765 and 3,853 MiB for 2 ViT-L/16
    images at 384 px against 4,721)."""
    f32 = 4
    L, N, H = int(layers), int(tokens), int(heads)
    D = H * 64 if width is None else int(width)
    kept_attention = 2 * L * H * N * N * f32 if kept else 0
    return L * 22 * N * D * f32 + 12 * L * N * N + 10 * N * D * f32 + 4 * H * N * N * f32 + kept_attention


def statistic_rows_by_layer(layers: int, layer_bytes: int) -> bool:
    """Whether the statistics' rows of a forward are kept for every layer (``layer_bytes`` each), within
    :data:`STATISTIC_ROWS_BYTES`, rather than for one layer at a time."""
    return layers * layer_bytes <= STATISTIC_ROWS_BYTES


def _statistic_rows(layers: int, tokens: int, heads: int) -> int:
    from vizapp.statistics import STATISTICS, HeadStatistic  # which imports this module

    per_layer = sum(isinstance(s, HeadStatistic) for s in STATISTICS.values()) * heads * tokens * 4
    return per_layer * (layers if statistic_rows_by_layer(layers, per_layer) else 1)


def analysis_bytes(
    layers: int, tokens: int, heads: int, gradients: bool = False, device: torch.device | str | None = None
) -> tuple[int, int]:
    """(what one image's analysis keeps, what its forward needs besides) in a batch, in bytes: the sums of the kept
    and the working terms of :func:`analysis_memory` (widths taken as 64 per head) on ``device`` (None: the CPU)."""
    terms = analysis_memory(layers, tokens, heads, gradients=gradients, device=device)
    kept = sum(v for k, v in terms.items() if k in KEPT_TERMS)
    return kept, sum(terms.values()) - kept
