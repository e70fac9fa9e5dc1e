"""Predicted work and bytes of the forward and of the analysis, from N, L, H, D (printed beside the measurements)."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch

from vizapp import limits


@dataclass
class Shape:
    """What the cost model needs about one model at one input size."""

    tokens: int  # N, prefix tokens included
    prefix: int
    patches: int  # P = gh * gw
    layers: int  # L
    heads: int  # H
    width: int  # D
    mlp_hidden: int  # usually 4 D
    in_chans: int
    patch_pixels: int  # ph * pw
    num_classes: int
    weight_bytes: int = 0  # every parameter and buffer: what the weights digest reads


def model_shape(vm: Any) -> Shape:
    """Token and layer counts read from the loaded model."""
    from vizapp.capture import encoder_layers

    gh, gw = vm.grid_size
    block = encoder_layers(vm.model)[0][0]
    linears = [mod for mod in block.modules() if isinstance(mod, torch.nn.Linear)]
    mha = [mod for mod in block.modules() if isinstance(mod, torch.nn.MultiheadAttention)]
    width = int(mha[0].embed_dim) if mha else min(int(lin.in_features) for lin in linears)
    hidden = max(int(lin.out_features) for lin in linears if int(lin.in_features) == width)
    return Shape(
        tokens=vm.num_prefix_tokens + gh * gw,
        prefix=vm.num_prefix_tokens,
        patches=gh * gw,
        layers=vm.num_layers,
        heads=vm.num_heads,
        width=width,
        mlp_hidden=hidden if hidden != 3 * width else 4 * width,
        in_chans=int(vm.input_size[0]),
        patch_pixels=int(vm.patch_size[0] * vm.patch_size[1]),
        num_classes=len(vm.labels),
        weight_bytes=sum(t.numel() * t.element_size() for t in (*vm.model.parameters(), *vm.model.buffers())),
    )


def cost_model(s: Shape, batch: int = 1) -> dict[str, float]:
    """Predicted work and bytes (fp32, CPU budgets) of the forward and of the analysis as the library does it.

    Forward, per layer and image: qkv 3·N·D², q kᵀ N²·D, A v N²·D, proj N·D², MLP 2·N·D·M -> with M = 4D
    12·N·D² + 2·N²·D; plus the patch embedding P·(C·p²)·D and the head D·K once.

    Analysis, per layer and image, on the CPU: the capture forms the attention in place of SDPA in chunks of c heads x
    r query rows (``limits.chunk_shape`` of ``limits.chunk_bytes``: INLINE_CHUNK_BYTES on the CPU; same MACs as
    SDPA; the scores are written out, softmaxed into a second buffer and read back by A·v: ~3 passes over H·N² that SDPA's
    blocked kernel keeps in registers), and ``streaming.LayerStatistics.chunk`` reduces each hot chunk: the
    distance numerator (attention x pixel distance, then a sum: 2 passes over H·P²), its denominator (1 pass over
    H·P²), the entropy from the scores (5 passes over H·N²: the rows' largest score and largest weight, m - s, its
    product with the weights and the rows' sums, :func:`vizapp.analysis.headstats.row_entropy_from_scores`), the head
    sum (1 pass over H·N²) and, while the fused cache fits FUSED_CACHE_LIMIT_BYTES, max and min (2 more). Rollout:
    the mean-fused matrices are kept (L·N² floats, when under ROLLOUT_STORE_LIMIT_BYTES) and
    ``LayerStatistics.rollout_row`` carries the CLS row down after the forward (L vector-matrix products, 1 pass over
    N² each); above the limit ``layer_done`` multiplies the joint attention up bottom-up, one N x N x N product per
    layer. Memory: q and k of every layer (2·L·N·D floats, one contiguous copy per layer), one chunk and its distance
    product (c·r·N + c·r·P floats), the kept means (L·N²) or the joint (2·N²), and the other two fusions (2·L·N²)
    while the cache fits, briefly twice while ``torch.stack`` runs. Once per call, the weights digest every analysis
    records (:meth:`vizapp.VizModel.fingerprint`) reads every weight byte (``digest_bytes``).
    """
    n, p, L, h, d, m = s.tokens, s.patches, s.layers, s.heads, s.width, s.mlp_hidden
    f32 = 4
    fwd_layer = 4 * n * d * d + 2 * n * d * m + 2 * n * n * d
    fwd = batch * (L * fwd_layer + p * s.in_chans * s.patch_pixels * d + d * s.num_classes)
    keep_fused = L * n * n * f32 <= limits.FUSED_CACHE_LIMIT_BYTES
    store_mean = L * n * n * f32 <= limits.ROLLOUT_STORE_LIMIT_BYTES
    gemm_extra = 0 if store_mean else batch * L * n**3  # bottom-up rollout
    elementwise = (
        batch * L * ((3 + 5 + 1 + (2 if keep_fused else 0)) * h * n * n + 3 * h * p * p + (n * n if store_mean else 0))
    )
    chunk, rows = limits.chunk_shape(h, n, limits.chunk_bytes(torch.device("cpu")))
    qk = 2 * L * n * d * f32 * batch
    means = L * n * n * f32 if store_mean else 2 * n * n * f32
    fused = (2 * L * n * n * f32 if keep_fused else 0) * batch
    transient = chunk * (rows * n + max(0, rows - s.prefix) * p) * f32  # c·(N² + P²) for whole heads
    return {
        "forward_macs": float(fwd),
        "forward_attn_macs": float(batch * L * 2 * n * n * d),
        "extra_gemm_macs": float(gemm_extra),
        "extra_elementwise": float(elementwise),
        "digest_bytes": float(s.weight_bytes),
        "chunk_heads": float(chunk),
        "chunk_rows": float(rows),
        "qk_bytes": float(qk),
        "fused_bytes": float(fused + means),
        "transient_bytes": float(transient),
        "predicted_added_bytes": float(qk + means + 2 * fused + transient),
    }


def elementwise_rate(s: Shape, repeats: int = 3) -> float:
    """Measured elements per second of a softmax over one attention chunk [c, r, N] (counted as 3 passes)."""
    c = cost_model(s)
    x = torch.randn(int(c["chunk_heads"]), int(c["chunk_rows"]), s.tokens)
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        torch.softmax(x, dim=-1)
        times.append(time.perf_counter() - t0)
    return 3 * x.numel() / statistics.median(times[1:])


def digest_rate(repeats: int = 3, tensors: int = 64, size: int = 8 << 20) -> float:
    """Measured bytes per second of the weights digest (:func:`vizapp.models.digest.weights_digest`) of a module
    holding ``tensors`` float32 parameters of ``size`` bytes each (ViT-B/16's largest are 7 and 9 MiB): 512 MiB by
    default, more than the last-level cache of the machines measured (32 and 300 MiB), so that the weights come
    from memory, as a model's do; the checksums' hashing is included."""
    from vizapp.models.digest import weights_digest

    module = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(size // 4)) for _ in range(tensors))
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        weights_digest(module)
        times.append(time.perf_counter() - t0)
    return tensors * size / statistics.median(times[1:])


COST_MODEL_TEXT = """\
## Cost model

Notation: B images, N tokens (prefix tokens included), P = gh·gw patches, L layers, H heads of width d = D/H,
model width D, MLP hidden width M (= 4D in all models here), patch p×p pixels, C channels, K classes. Counts are
multiply-accumulates (MACs) for matrix products and element passes for elementwise work; memory in fp32 bytes.

**(a) forward, per image.** Per layer: qkv projection 3·N·D², q kᵀ N²·D, A·v N²·D, output projection N·D², MLP
2·N·D·M. With M = 4D:

    forward ≈ B · [ L · (12·N·D² + 2·N²·D) + P·C·p²·D + D·K ]  MACs

The 12·N·D² term (projections and MLP) dominates while N < 6D: it is 96 % of the forward for ViT-B/16 at 224 px
(N = 197, D = 768), 91 % for ViT-L/16 at 384 px (N = 577) and 82 % for the 1,374-token ViT-L/14 at 518 px; the
attention term 2·N²·D takes over only beyond N = 6D (4,608 tokens for ViT-B, 6,144 for ViT-L). Time is linear in B
and L, ~quadratic in D, and between linear and quadratic in N. Memory: with fused SDPA the H·N² weights are never
materialised, so the forward's activations are O(B·N·max(3D, M)) floats per layer, freed layer by layer (a few MB).

**(b) extra analysis work, per image** (what `analyze` adds on top of the same forward, as implemented in the
measured sources, see the hashes above):

* the attention is formed once, inside the forward: `capture.AttentionCapture` catches this thread's SDPA call in
  each attention module (`F.scaled_dot_product_attention` routed per thread while a capture is open, additive bias
  included) and computes softmax(q kᵀ·scale
  + bias) and A·v itself through `capture.attention_chunks`, c heads x r query rows at a time, sized by
  `vizapp.limits.chunk_shape` from `limits.chunk_bytes(device)` (on the CPU `INLINE_CHUNK_BYTES`, 3 MiB: all 12
  heads of ViT-B/224, 2 of ViT-L/384, 1 at 1,374 tokens; one head is split into row blocks only beyond 2,048
  tokens), so a chunk and its distance product stay in the last-level cache. No extra MACs (SDPA does the same
  products); the extra is that the scores are written out, softmaxed into a second buffer and read back, ~3 passes over H·N²
  that SDPA's blocked kernel keeps in registers. Layers that never call SDPA (timm `Attention` with `fused_attn`
  off) are replayed from the recorded q and k at the end of the layer (`capture.feed`: N²·D more MACs and 2 more
  passes per layer; an earlier version that did this for every layer measured 1.19–1.25 b/a for ViT-L/384 against
  1.01–1.04 inline); calls it cannot reproduce (dropout, causal) are left to SDPA and refused by the views;
* from the hot chunk (`streaming.LayerStatistics.chunk`): mean attention distance Σ_j a_ij·d_ij over Σ_j a_ij (the
  renormalisation over the patches): ~3 passes over H·P²; each row's attention entropy from its scores (5 passes
  over H·N²: the largest score and the largest weight of each row, m − s, its product with the weights, the row
  sums); the head sum for the mean fusion (1 pass over H·N²: a chunk of one head is added as it is, of two in one
  elementwise sum); max and min (2 more) only while the fused matrices of all layers fit `FUSED_CACHE_LIMIT_BYTES`
  (16 MiB: ViT-S/B at 224 px yes, the ViT-L models no);
* default rollout: while L·N² floats fit `limits.rollout_store_bytes(device)` (on the CPU `ROLLOUT_STORE_LIMIT_BYTES`,
  16 MiB, as the fused cache; on a GPU `ROLLOUT_STORE_LIMIT_BYTES_GPU`, 256 MiB), the mean-fused
  matrices are kept and `LayerStatistics.rollout_row` carries the CLS row from the top layer down after the forward,
  row ← (row·M_l + row)/2: L vector-matrix products. Above it (on the CPU ViT-L/384: 32 MB; 1,374 tokens: 181 MB)
  `layer_done` multiplies the joint attention up during the forward, R ← (M_l·R + R)/2: N³ MACs per layer (0.19
  GMAC at N = 577, 2.6 at 1,374), which trades time for L·N² − 2·N² floats (29 MB at 577 tokens, 166 MB at 1,374);
  this table's predictions take the CPU's limits;
* memory: q and k of every layer, 2·L·N·D floats, one contiguous copy per layer by the capture (kept: the per-head
  views of any layer and query are recomputed from them); one chunk and its distance product, c·(N² + P²) floats
  for whole heads; the kept means L·N² (or the joint, 2·N²); the max/min cache 2·L·N² while small, briefly twice
  (lists + `torch.stack`);
* once per call, the weights digest the analysis records (`VizModel.fingerprint`, so that a method that runs the
  model again can prove it is the same network): every parameter and buffer read once, W bytes (ViT-B/16: 346 MB,
  ViT-L/16: 1.2 GB), whatever the input size.

Extra time ≈ [L·N³ without kept means] / R_gemm + L·(9..11·H·N² + 3·H·P²) / R_elem + W / R_digest, over forward ≈
L·(12·N·D² + 2·N²·D) / R_gemm. The elementwise part does not use the matrix units, runs at cache or memory
bandwidth (R_elem is one to two orders of magnitude below R_gemm in elements/s vs MAC/s) and grows with H·N², so
it dominates the extra time of ViT-L/384; at 1,374 tokens the bottom-up rollout's N³ GEMM is about as large. The
digest reads at about memory bandwidth and does not grow with N: at 224 px it is the largest term (the table
below), and a processor whose matrix units are faster makes it and the elementwise part a larger share of a faster
forward, so the same analysis gives a higher b/a there. Added memory grows as L·N·D (q/k, linear in N) + L·N²
(kept means, only while ≤ 16 MiB) + c·N²: for all models here the q/k term dominates.

Measured RSS can exceed these tensor-level counts: glibc's dynamic mmap threshold serves blocks up to 32 MB from the
heap, where blocks freed during the forward can stay resident, and the first forward in a process also maps library
code and one-off buffers (in both (a) and (b)). The peak also moves with where the heap's holes fall: the ViT-L/384
analysis measured 238–584 MB above load in six fresh processes (bimodal) before an earlier version packed q and k
into one block per forward and reused its per-layer buffers, 197–202 MB in three after; the capture now copies q
and k per layer instead, which only a full run re-measures.
"""
