"""One layer's attention output and the statistics vizapp takes of it, in two fused kernels that never write the
attention out (Triton; used on a GPU).

On a GPU, an analysis that forms each layer's attention [B, H, N, N] to reduce it passes over it about nine times (the
scores written, the softmax read and written, A·v, the distance, the entropy, the head sum): at 1,374 tokens and 16
heads that is 121 MB a layer, and an analysis moved about 50 GB where its bare forward moves 7 (simulated GPU,
docs/benchmarks-launches-large.md). Here, as in FlashAttention (Dao et al., NeurIPS 2022), the scores of a block of
queries are formed tile by tile in registers with a running maximum, and beside the output the kernel keeps per query
row the moments the registered statistics are made of:

- ``_rows_kernel``, one program per (image·head, block of queries): the output softmax(q kᵀ·scale)·v, each row's
  maximum m and normaliser l = Σ_j exp(s_j - m), the entropy -Σ_j a_j log a_j = T/l + log l with
  T = Σ_j exp(s_j - m)·(m - s_j) (all its terms are ≥ 0: no cancellation), and the mean distance
  Σ_j a_j·d_ij / Σ_j a_j over the patch keys (the l cancels, as in :func:`vizapp.analysis.distance.distance_terms`).
  When the running maximum grows from m to m', every sum so far is rescaled by exp(m - m'), T besides gaining
  l·(m' - m).
- ``_head_sum_kernel``, one program per (image, block of queries, block of keys): Σ_h exp(s_h - m_h) / l_h, the sum of
  the heads' attention that the rollout's mean fusion is made of, written once ([B, N, N], 1/H of the heads' bytes).

Everything is fp32 (``input_precision="ieee"``: no TF32), so the results equal the formed attention's to rounding.
Self-attention with or without an additive bias or mask (BEiT's relative position, a -inf mask) is taken; a caller
forms the attention for anything else, and for any statistic whose row value is not one of :data:`ROW_QUANTITIES`.

``VIZAPP_FUSED_ATTENTION``: unset or ``1``, the kernels run on a CUDA device where Triton imports; ``0``, never;
``interpret``, also on the CPU through Triton's interpreter (slow: for tests; the process must start with
``TRITON_INTERPRET=1``). Each compile of them (its dtypes, head block, bias and statistics) runs a small layer on a
device before its first use there and is compared with float64 (:mod:`vizapp.fused_check`). Kernels that fail that
check are reported (:func:`failure`), and the process forms the attention from then on; a variant of them that fails
to compile or launch (for one head width, bias or set of statistics) is reported once, and the layers that need it are
formed. Triton compiles each kernel at its first launch for a new shape (an eager run, before any CUDA graph records
it) and keeps it in its on-disk cache.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from vizapp import fused_check

tl = None  # triton.language, imported once the kernels may run (_triton): importing it costs a CPU process 0.5 s

if TYPE_CHECKING:
    from vizapp.statistics import StatisticsReducer

log = logging.getLogger(__name__)

#: the per-row quantities the kernel computes: a head statistic whose rows equal one of them (its ``fused_row``) can be
#: taken without forming the attention
ROW_QUANTITIES = ("entropy", "distance")

#: Each kernel's tiles and launch, by the head's block (its width rounded up to a power of two, at least 16):
#: (BLOCK_M query rows, BLOCK_N key rows, warps, pipeline stages). Chosen without a GPU from what Triton compiles for
#: sm_75 to sm_90 (benchmarks.kernel_resources, docs/benchmarks-kernels.md): no registers spilled to local memory (but
#: 8 bytes a thread of the rows kernel at 128-wide heads on three targets) and at most 56 KB of shared memory a block
#: (a T4 has 64). The 64 x 64 tiles of 8 warps at Triton's default 3 stages, which the kernels had before, spilled
#: about 1 KB a thread and needed 144 KB on sm_90 (more than an A10G's, L4's or T4's most). Wider heads than 128 are
#: formed. Which launch is fastest needs a GPU to time (the benchmark's --time, gpu.sh's step kernels).
ROWS_TILES: dict[int, tuple[int, int, int, int]] = {
    16: (64, 32, 8, 1),
    32: (64, 32, 8, 1),
    64: (64, 32, 8, 1),
    128: (32, 32, 8, 1),
}
SUM_TILES: dict[int, tuple[int, int, int, int]] = {
    16: (64, 32, 8, 2),
    32: (64, 32, 8, 2),
    64: (32, 64, 8, 2),
    128: (32, 64, 8, 2),
}
# CUDA's limit on a launch grid's second and third axes: a layer of more than 65,535 // H images (4,095 at 16 heads)
# is launched in parts, each a slice of the images
GRID_YZ_LIMIT = 65_535

_lock = threading.Lock()
_kernels: tuple | None = None  # (rows kernel, head-sum kernel), once jitted
_failure: str | None = None  # why the kernels are off in this process (a failed self-check)
_declined: dict[tuple, str] = {}  # a kernel variant (head block, statistics, bias, head sum) -> why it failed to run


def mode() -> str:
    """``VIZAPP_FUSED_ATTENTION``'s setting: "0", "1" (the default) or "interpret"."""
    value = os.environ.get("VIZAPP_FUSED_ATTENTION", "1").strip().lower()
    return value if value in ("0", "interpret") else "1"


def failure() -> str | None:
    """Why the kernels were turned off in this process (a failed self-check), else why the first of their variants
    that failed to compile or launch did (layers needing it are formed), or None."""
    if _failure is not None:
        return _failure
    return next(iter(_declined.values()), None)


def _triton() -> bool:
    """Import Triton's language for the kernels (their global ``tl``); False where it is not installed or broken."""
    global tl
    if tl is None:
        try:
            import triton.language as language
        except Exception:  # noqa: BLE001  (not installed, or broken: the kernels are then never used)
            return False
        tl = language
    return True


def interpreted() -> bool:
    """Triton was imported with ``TRITON_INTERPRET=1``: its kernels run on the CPU, through its interpreter."""
    if not _triton():
        return False
    try:
        from triton import knobs  # Triton 3.4 and later
    except ImportError:
        return os.environ.get("TRITON_INTERPRET", "0") == "1"
    return bool(knobs.runtime.interpret)


def usable(device: torch.device) -> bool:
    """The fused kernels may run for tensors on ``device``: a CUDA device with Triton (unless turned off), or the CPU
    with ``VIZAPP_FUSED_ATTENTION=interpret`` in a process started with ``TRITON_INTERPRET=1`` (Triton reads it when it
    is first imported: its own helpers are then interpreted too). Each compile of them is checked at its first use
    there (:func:`vizapp.fused_check.checked`)."""
    setting = mode()
    if setting == "0" or _failure is not None:
        return False
    if setting == "interpret":
        return interpreted()
    # a real CUDA device (not the simulated one of tests/devicesim), Triton importable and not interpreting
    return device.type == "cuda" and torch.cuda.is_available() and _triton() and not interpreted()


def _rows_kernel(
    Q, K, V, BIAS, OUT, M, L, ENT, DIST, D,  # noqa: N803  (Triton's pointer arguments)
    s_qb, s_qh, s_qn, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_bb, s_bh, s_bn, s_bm,
    s_ob, s_oh, s_on, s_od,
    s_eb, s_eh, s_en,
    s_db, s_dh, s_dn,
    s_dm,
    H, N, HEAD_DIM, PREFIX, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,  # noqa: N803
    ENTROPY: tl.constexpr, DISTANCE: tl.constexpr, HAS_BIAS: tl.constexpr,  # noqa: N803
):  # fmt: skip
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < N
    dim_ok = dims < HEAD_DIM
    q = tl.load(
        Q + b * s_qb + h * s_qh + rows[:, None] * s_qn + dims[None, :] * s_qd,
        mask=row_ok[:, None] & dim_ok[None, :],
        other=0.0,
    ).to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    t_i = tl.zeros([BLOCK_M], tl.float32)  # Σ exp(s - m)·(m - s), the entropy's
    dn = tl.zeros([BLOCK_M], tl.float32)  # Σ exp(s - m)·d over the patch keys
    dd = tl.zeros([BLOCK_M], tl.float32)  # Σ exp(s - m) over the patch keys
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    patch_row = row_ok & (rows >= PREFIX)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        kt = tl.load(
            K + b * s_kb + h * s_kh + cols[None, :] * s_kn + dims[:, None] * s_kd,
            mask=col_ok[None, :] & dim_ok[:, None],
            other=0.0,
        ).to(tl.float32)  # [BLOCK_D, BLOCK_N]
        s = tl.dot(q, kt, input_precision="ieee") * scale
        if HAS_BIAS:  # the additive bias or mask the layer passed (-inf where a key is masked)
            s += tl.load(
                BIAS + b * s_bb + h * s_bh + rows[:, None] * s_bn + cols[None, :] * s_bm,
                mask=row_ok[:, None] & col_ok[None, :],
                other=0.0,
            ).to(tl.float32)
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # -inf only while every key so far is masked
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_use)  # 0 until a key is met
        p = tl.exp(s - m_use[:, None])  # 0 off the keys and where masked
        if ENTROPY:
            grown = l_i * tl.where(l_i > 0, m_use - m_i, 0.0)  # no inf·0 until a key is met
            gap = p * tl.where(p > 0, m_use[:, None] - s, 0.0)  # a masked key's s is -inf: no 0·inf
            t_i = alpha * (t_i + grown) + tl.sum(gap, 1)
        if DISTANCE:
            patch_col = col_ok & (cols >= PREFIX)
            d = tl.load(
                D + (rows - PREFIX)[:, None] * s_dm + (cols - PREFIX)[None, :],
                mask=patch_row[:, None] & patch_col[None, :],
                other=0.0,
            ).to(tl.float32)  # (a float64 matrix would make the loop's sums float64: a compile error on a GPU)
            pp = tl.where(patch_col[None, :], p, 0.0)
            dn = dn * alpha + tl.sum(pp * d, 1)
            dd = dd * alpha + tl.sum(pp, 1)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            V + b * s_vb + h * s_vh + cols[:, None] * s_vn + dims[None, :] * s_vd,
            mask=col_ok[:, None] & dim_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(
        OUT + b * s_ob + h * s_oh + rows[:, None] * s_on + dims[None, :] * s_od,
        out.to(OUT.dtype.element_ty),
        mask=row_ok[:, None] & dim_ok[None, :],
    )
    stat = bh * N + rows  # M and L are [B, H, N], contiguous
    tl.store(M + stat, m_i, mask=row_ok)
    tl.store(L + stat, l_i, mask=row_ok)
    if ENTROPY:
        tl.store(ENT + b * s_eb + h * s_eh + rows * s_en, t_i / l_i + tl.log(l_i), mask=row_ok)
    if DISTANCE:
        tiny = 1.1754943508222875e-38  # float32's smallest normal, the clamp of the formed path
        tl.store(DIST + b * s_db + h * s_dh + (rows - PREFIX) * s_dn, dn / tl.maximum(dd, tiny), mask=patch_row)


def _head_sum_kernel(
    Q, K, BIAS, M, L, F,  # noqa: N803
    s_qb, s_qh, s_qn, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_bb, s_bh, s_bn, s_bm,
    s_fb, s_fn,
    H, N, HEAD_DIM, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HAS_BIAS: tl.constexpr,  # noqa: N803
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < N
    col_ok = cols < N
    dim_ok = dims < HEAD_DIM
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for h in range(0, H):
        q = tl.load(
            Q + b * s_qb + h * s_qh + rows[:, None] * s_qn + dims[None, :] * s_qd,
            mask=row_ok[:, None] & dim_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        kt = tl.load(
            K + b * s_kb + h * s_kh + cols[None, :] * s_kn + dims[:, None] * s_kd,
            mask=col_ok[None, :] & dim_ok[:, None],
            other=0.0,
        ).to(tl.float32)
        s = tl.dot(q, kt, input_precision="ieee") * scale
        if HAS_BIAS:
            s += tl.load(
                BIAS + b * s_bb + h * s_bh + rows[:, None] * s_bn + cols[None, :] * s_bm,
                mask=row_ok[:, None] & col_ok[None, :],
                other=0.0,
            ).to(tl.float32)
        stat = (b * H + h) * N + rows
        m = tl.load(M + stat, mask=row_ok, other=0.0)
        l_h = tl.load(L + stat, mask=row_ok, other=1.0)
        acc += tl.exp(s - m[:, None]) / l_h[:, None]
    tl.store(F + b * s_fb + rows[:, None] * s_fn + cols[None, :], acc, mask=row_ok[:, None] & col_ok[None, :])


def _compiled() -> tuple:
    """The two kernels, jitted once per process (interpreted under ``TRITON_INTERPRET=1``)."""
    global _kernels
    with _lock:
        if _kernels is None:
            if not _triton():
                raise ImportError("Triton is not installed (or cannot be imported)")
            import triton

            _kernels = (triton.jit(_rows_kernel), triton.jit(_head_sum_kernel))
        return _kernels


def turned_off() -> bool:
    """A miscomputation (a failed self-check) turned every kernel off in this process."""
    return _failure is not None


def declined(variant: tuple) -> bool:
    """The kernel variant (:attr:`vizapp.fused_check.CheckLayer.variant`) failed to compile or launch in this
    process: layers that need it are formed."""
    return variant in _declined


def turn_off(error: BaseException) -> None:
    """Every kernel off for the rest of the process (the self-check found ``error``): layers are formed."""
    global _failure
    _failure = f"{type(error).__name__}: {error}"
    log.warning("vizapp's fused attention kernels failed (%s); forming the attention from now on", _failure)


def _decline(variant: tuple, error: BaseException) -> None:
    """One variant failed to compile or launch (a wide head's tiles beyond the device's shared memory, say): layers
    that need it are formed from now on, the others keep the kernels."""
    block_d, entropy, distance, bias, head_sum = variant
    parts = [f"{block_d}-wide head block"] + [
        name
        for name, on in (("entropy", entropy), ("distance", distance), ("a bias", bias), ("head sum", head_sum))
        if on
    ]
    _declined[variant] = f"{type(error).__name__}: {error} (the kernels for {', '.join(parts)})"
    log.warning("vizapp's fused attention kernels failed (%s); such layers are formed from now on", _declined[variant])


def block(head_dim: int) -> int:
    """The head's block in the kernels: its width rounded up to a power of two, at least 16."""
    return max(16, 1 << (head_dim - 1).bit_length())


def _bias_fits(bias: torch.Tensor | None, b: int, h: int, n: int) -> bool:
    """No bias, or an additive one the kernels take for [b, h, n, n] attention: [b or 1, h or 1, n, n]."""
    return bias is None or (
        bias.dim() == 4 and bias.shape[0] in (1, b) and bias.shape[1] in (1, h) and bias.shape[2:] == (n, n)
    )


def _offsets_fit(*tensors: torch.Tensor | None) -> bool:
    """Every element of each tensor lies within a 32-bit offset of its first (the kernels' index arithmetic)."""
    spans = [sum((n - 1) * st for n, st in zip(t.shape, t.stride(), strict=True)) for t in tensors if t is not None]
    return all(span < 2**31 for span in spans)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    rows: dict[str, torch.Tensor],
    dist: torch.Tensor | None = None,
    num_prefix_tokens: int = 0,
    head_sum: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """softmax(q kᵀ·scale + bias)·v for q, k, v [B, H, N, d], and the statistics' rows of every query, without forming
    the attention.

    Args:
        rows: quantity (of :data:`ROW_QUANTITIES`) -> where its rows go: "entropy" [B, H, N], "distance" [B, H, P]
            (the patch queries' rows, P = N - ``num_prefix_tokens``); any strides, float32.
        dist: [P, P] patch distances (contiguous rows), needed for "distance".
        num_prefix_tokens: tokens before the patches, first among queries and keys.
        head_sum: [B, N, N] float32 with a unit last stride, optional: receives Σ_h of the heads' attention.
        bias: additive, [B or 1, H or 1, N, N] (a relative-position bias, or a mask with -inf), optional. A row whose
            every key is masked is NaN, as the formed softmax's.

    Returns:
        the output [B, H, N, d] in v's dtype, or None when the kernels could not run (see :func:`failure`) or the
        tensors are too large for their 32-bit offsets: the caller then forms the attention itself.
    """
    unknown = set(rows) - set(ROW_QUANTITIES)
    if unknown:
        raise ValueError(f"the fused kernel computes {ROW_QUANTITIES}, not {sorted(unknown)}")
    b, h, n, _ = q.shape
    if not _bias_fits(bias, b, h, n):
        raise ValueError(f"a bias for [{b}, {h}, {n}, {n}] attention, got {tuple(bias.shape)}")
    if not _offsets_fit(q, k, v, head_sum, bias, *rows.values()) or b * h * n >= 2**31 or b * n * n >= 2**31:
        return None  # the kernels' offsets are 32-bit: so large a batch is formed instead
    if "distance" in rows and (dist is None or dist.stride(-1) != 1):
        raise ValueError("the mean distance needs the patch distances [P, P], contiguous rows")
    if head_sum is not None and head_sum.stride(-1) != 1:
        raise ValueError("the head sum needs a unit last stride")
    layer = fused_check.CheckLayer.of(q, rows, dist, num_prefix_tokens, head_sum is not None, bias)
    if layer.variant in _declined or layer.variant[0] not in ROWS_TILES:
        return None  # (a head wider than 128 is formed)
    if not fused_check.checked(q.device, layer):
        return None
    return launch(q, k, v, scale, rows, dist, num_prefix_tokens, head_sum, bias)


def launch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    rows: dict[str, torch.Tensor],
    dist: torch.Tensor | None,
    num_prefix_tokens: int,
    head_sum: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> torch.Tensor | None:
    """:func:`attention`'s launches, for arguments it has checked (and :func:`vizapp.fused_check.self_check`'s): the
    output, or None where this variant of the kernels is declined or failed to compile or launch now."""
    b, h, n, d = q.shape
    dev = q.device
    if bias is not None:
        bias = bias.expand(b, h, n, n)  # a broadcast dimension's stride is 0
    ent, dst = rows.get("entropy"), rows.get("distance")
    out = torch.empty((b, h, n, d), dtype=v.dtype, device=dev)
    m = torch.empty((b, h, n), dtype=torch.float32, device=dev)
    l_ = torch.empty_like(m)
    dummy = m  # an unused pointer argument (its flag is off)
    e_t, d_t = (ent if ent is not None else dummy), (dst if dst is not None else dummy)
    dmat = dist if dist is not None else dummy
    b_t, b_strides = (bias, bias.stride()) if bias is not None else (dummy, (0, 0, 0, 0))
    block_d = block(d)
    variant = (block_d, ent is not None, dst is not None, bias is not None, head_sum is not None)
    if variant in _declined or block_d not in ROWS_TILES:
        return None
    rows_m, rows_n, rows_warps, rows_stages = ROWS_TILES[block_d]
    sum_m, sum_n, sum_warps, sum_stages = SUM_TILES[block_d]

    try:
        rows_kernel, sum_kernel = _compiled()
        # Triton launches on the current device: a model on another GPU than that one would otherwise be handed
        # pointers it cannot read (an illegal access spoils the whole process's CUDA context)
        with torch.cuda.device(dev) if dev.type == "cuda" and torch.cuda.is_available() else contextlib.nullcontext():
            step = max(1, GRID_YZ_LIMIT // h)  # images a launch: b·h programs on the grid's second axis
            for i in range(0, b, step):
                j = min(b, i + step)
                # (the unused pointers are m, whose first axis is the images too)
                q_i, k_i, b_i, m_i, l_i = q[i:j], k[i:j], b_t[i:j], m[i:j], l_[i:j]
                hs_i = None if head_sum is None else head_sum[i:j]
                grid = ((n + rows_m - 1) // rows_m, (j - i) * h)
                rows_kernel[grid](
                    q_i, k_i, v[i:j], b_i, out[i:j], m_i, l_i, e_t[i:j], d_t[i:j], dmat,
                    *q.stride(), *k.stride(), *v.stride(), *b_strides, *out.stride(),
                    *(e_t.stride() if ent is not None else (0, 0, 0)),
                    *(d_t.stride() if dst is not None else (0, 0, 0)),
                    dmat.stride(0) if dist is not None else 0,
                    h, n, d, num_prefix_tokens, float(scale),
                    BLOCK_M=rows_m, BLOCK_N=rows_n, BLOCK_D=block_d,
                    ENTROPY=ent is not None, DISTANCE=dst is not None, HAS_BIAS=bias is not None,
                    num_warps=rows_warps, num_stages=rows_stages,
                )  # fmt: skip
                if head_sum is not None:
                    grid = ((n + sum_m - 1) // sum_m, (n + sum_n - 1) // sum_n, j - i)
                    sum_kernel[grid](
                        q_i, k_i, b_i, m_i, l_i, hs_i,
                        *q.stride(), *k.stride(), *b_strides, head_sum.stride(0), head_sum.stride(1),
                        h, n, d, float(scale),
                        BLOCK_M=sum_m, BLOCK_N=sum_n, BLOCK_D=block_d, HAS_BIAS=bias is not None,
                        num_warps=sum_warps, num_stages=sum_stages,
                    )  # fmt: skip
    except Exception as error:  # noqa: BLE001  (a compile or launch error of any kind: form the attention instead)
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise  # a graph being recorded must fail whole (the caller then runs eagerly), not change route midway
        log.debug("fused kernel", exc_info=True)
        _decline(variant, error)
        return None
    return out


def reduce_layer(
    reducer: StatisticsReducer,
    layer: int,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None,
    head_sum: Callable[[], torch.Tensor] | None = None,
) -> torch.Tensor | None:
    """One layer's output from :func:`attention`, its rows written into ``reducer``'s buffers
    (and, with ``head_sum``, a function giving the [B, N, N] tensor for the heads' sum, that sum): None where the
    kernel does not serve (the device, a statistic without a kernel form, the shapes) or failed; nothing
    of the layer has then been counted."""
    b, h, n, _ = q.shape
    if k.shape != q.shape or v.shape[:3] != q.shape[:3] or b != reducer.batch:
        return None
    if not _bias_fits(bias, b, h, n):
        return None
    if not usable(q.device):
        return None
    g = reducer.geometry[layer]
    if g is None or g.num_tokens != n or g.num_keys != n or h != reducer.heads[layer]:
        return None  # a windowed layer's keys are its window's, not its tokens
    quantities = {s.name: s.fused_row for s in reducer.head_stats}
    if None in quantities.values() or len(set(quantities.values())) != len(quantities):
        return None  # a statistic the kernel does not compute
    if "distance" in quantities.values() and (g.dist.dim() != 2 or g.dist.stride(-1) != 1):
        return None
    rows = {quantities[name]: buffer for name, buffer in reducer.row_buffers(layer, h).items()}  # type: ignore[misc]
    target = None if head_sum is None else head_sum()
    out = attention(q, k, v, scale, rows, g.dist, g.num_prefix_tokens, target, bias)
    if out is not None:
        reducer.rows_filled(layer)
    return out
