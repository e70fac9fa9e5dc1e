"""The softmax of a chunk of attention scores on the CPU, with the statistics' rows taken in the same pass (a small C
kernel, ``cpu_rows.c`` beside this file, compiled on first use).

On the CPU an analysis forms each layer's attention in cache-sized chunks (:func:`vizapp.attention.attention_chunks`):
the scores by one batched product, then torch's softmax, then each statistic's own passes over the chunk (the entropy
from the scores and the softmax, the mean distance by a product with the distances) and the heads' sum for the
rollout, each reading the chunk anew. The kernel reads each row of scores once into the cache and, while it is there,
takes its maximum, its exponentials (a polynomial that vectorises), their sum, the entropy T/l + log l
(:func:`vizapp.analysis.headstats.row_entropy_from_scores`'s identity), the renormalised mean distance over the patch
keys and the row's share of its image's heads' sum, and writes the softmax the caller multiplies by v. For one layer
of 16 ViT-S/16 images on 2 threads of an AMD EPYC that took 4.7 ms against torch's operations' 13.0
(docs/benchmarks-cpu-rows.md), beside SDPA's 8.7 ms for the whole layer and 7.5 ms for the two products. It runs on
OpenMP, whose runtime in a process with torch is torch's own libgomp, so its rows go to torch's threads: with threads of
its own (its first version), the second one waited for a core that torch's spinning thread held.

It serves a :class:`~vizapp.statistics.StatisticsReducer` whose every head statistic is one the kernel computes (its
``fused_row``, as for the GPU's :mod:`vizapp.fused_attention`) on a layer whose keys are its tokens; anything else is
formed as before.

``VIZAPP_CPU_KERNEL``: unset or ``1``, used where it builds; ``0``, never. The C compiler is ``$CC`` or ``cc``; the
library is cached under ``$VIZAPP_CACHE_DIR`` (default ``~/.cache/vizapp``), named by a digest of the source, the
flags, the compiler and the processor (it is built for the processor it runs on); where that folder cannot be
written, it is built in a private temporary folder for the process, never a shared one. Before its first use in a process
it runs a small chunk, with a masked key and a distance, against float64: a library that fails to build, to load or
that check is reported once in the log and the process forms the attention as before.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from vizapp.statistics import StatisticsReducer

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_rows.c")
FLAGS = ("-O3", "-fopenmp-simd", "-fno-math-errno", "-fno-trapping-math", "-fPIC", "-shared")
#: tried in this order: built for this processor, with OpenMP (whose runtime torch has loaded: the kernel then runs on
#: torch's own threads), then without either where the compiler refuses them (its own POSIX threads)
VARIANTS = (("-fopenmp", "-march=native"), ("-fopenmp",), ("-march=native",), ())
#: rows below which the chunk runs on one thread (starting a thread costs about what 8,000 weights do)
MIN_ROWS_PER_THREAD = 64

_lock = threading.Lock()
_state: dict[str, object] = {}  # "lib": the loaded library or None, once tried; "why": why not, for the log


def enabled() -> bool:
    return os.environ.get("VIZAPP_CPU_KERNEL", "1").strip() != "0"


def _cache_dir() -> Path:
    root = os.environ.get("VIZAPP_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "vizapp"
    )
    return Path(root) / "kernels"


def _processor() -> str:
    """What a library built with -march=native depends on: the architecture and the CPU's model and flags."""
    lines = []
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("model name", "flags", "Features", "CPU part")):
                    lines.append(line.strip())
                if not line.strip() and lines:
                    break  # the first processor's block
    except OSError:
        pass
    return "\n".join([platform.machine(), platform.processor(), *lines])


def _compiler() -> str | None:
    cc = os.environ.get("CC") or "cc"
    return shutil.which(cc) or shutil.which("gcc")


def _build(cc: str) -> Path:
    """The library for this source, compiler and processor: from the cache, else compiled into it."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    source, processor = SOURCE.read_bytes(), _processor().encode()
    folder = _cache_dir()
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not os.access(folder, os.W_OK):
            raise PermissionError(folder)
    except OSError:  # a private folder of this process's own, never a shared one another user could fill
        folder = Path(tempfile.mkdtemp(prefix="vizapp-kernel-"))
    error = ""
    for extra in VARIANTS:
        flags = (*FLAGS, *extra)
        key = hashlib.sha256(b"\0".join([source, " ".join(flags).encode(), version.encode(), processor]))
        target = folder / f"cpu_rows-{key.hexdigest()[:20]}.so"
        if target.exists():
            return target
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
        os.close(fd)
        done = subprocess.run(
            [cc, *flags, "-o", tmp, str(SOURCE), "-lm", "-lpthread"], capture_output=True, text=True, timeout=120
        )
        if done.returncode == 0:
            os.replace(tmp, target)  # whole or not at all, for another process building the same
            return target
        os.unlink(tmp)
        error = done.stderr.strip()[-400:]
    raise RuntimeError(f"{cc} could not compile {SOURCE.name}: {error}")


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    fn = lib.vz_softmax_rows
    p, n = ctypes.c_void_p, ctypes.c_long
    fn.argtypes = [p, p, n, n, n, n, n, n, p, p, n, n, n, n, p, n, n, n, n, p, n, n, ctypes.c_int, ctypes.c_int]
    fn.restype = ctypes.c_int
    return lib


def library() -> ctypes.CDLL | None:
    """The kernel, built, loaded and checked once per process; None where it is switched off or failed (logged)."""
    if not enabled():
        return None
    if "lib" in _state:
        return _state["lib"]  # type: ignore[return-value]
    with _lock:
        if "lib" not in _state:
            lib = None
            try:
                cc = _compiler()
                if cc is None:
                    raise RuntimeError("no C compiler (cc, gcc or $CC) on the PATH")
                lib = _load(_build(cc))
                _state["lib"] = lib  # for the check's own call
                bad = self_check()
                if bad:
                    raise RuntimeError(f"its results differ from float64: {bad}")
            except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                lib, _state["why"] = None, str(e)
                log.warning("vizapp: the CPU attention kernel is off, the attention is formed by torch: %s", e)
            _state["lib"] = lib
    return _state["lib"]  # type: ignore[return-value]


def why_off() -> str | None:
    """Why :func:`library` gave None in this process (None while it serves, or before it was tried)."""
    return _state.get("why")  # type: ignore[return-value]


def _target(out: torch.Tensor | None, first: int) -> tuple:
    """(pointer, image, head and query strides, first query) of a [B', H', Q] view whose [0, 0, 0] is the chunk's
    first image and head (NULL where the row is not taken)."""
    if out is None:
        return (None, 0, 0, 0, 0)
    return (out.data_ptr(), out.stride(0), out.stride(1), out.stride(2), first)


def softmax_rows(
    scores: torch.Tensor,
    out: torch.Tensor,
    row0: int = 0,
    per_image: int | None = None,
    prefix: int = 0,
    dist: torch.Tensor | None = None,
    entropy: tuple[torch.Tensor, int] | None = None,
    distance: tuple[torch.Tensor, int] | None = None,
    head_sum: tuple[torch.Tensor, bool] | None = None,
    threads: int | None = None,
) -> bool:
    """``out`` = softmax(``scores``, -1) for scores [M, R, N] (float32, contiguous; rows ``row0 .. row0 + R`` of M
    matrices, ``per_image`` of them an image: default all M one image's), and each row's statistics:

    - ``entropy`` (optional): (target [B', H', Q], first query): the entropy (nats) of query i of matrix m goes to
      ``target[m // per_image, m % per_image, i - first]`` for i >= first;
    - ``distance`` (optional): likewise, the mean distance Σ_j a_ij·d_ij / Σ_j a_ij over the patch keys j of patch
      query i (i >= ``prefix``), with ``dist`` [N - prefix, N - prefix] (float32, contiguous);
    - ``head_sum`` (optional): (target [M // per_image, R, N] with a unit last stride, add): each image's sum over its
      heads of the chunk's rows, written into the target or (``add``) added to what it holds.

    Returns False, with nothing written, where the kernel is not available (:func:`library`).
    """
    lib = library()
    if lib is None:
        return False
    m, r, n = scores.shape
    per_image = m if per_image is None else per_image
    for t in (scores, out):
        if t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous() or t.shape != (m, r, n):
            raise ValueError(f"scores and out: contiguous float32 [M, R, N] on the CPU, got {tuple(t.shape)}")
    if m % per_image:
        raise ValueError(f"{m} matrices are not whole images of {per_image}")
    if distance is not None and (
        dist is None or dist.dtype != torch.float32 or not dist.is_contiguous() or dist.shape != (n - prefix,) * 2
    ):
        raise ValueError(f"the mean distance needs the patch distances [{n - prefix}, {n - prefix}], float32")
    for target in (entropy, distance, head_sum):
        if target is not None and (target[0].dtype != torch.float32 or target[0].device.type != "cpu"):
            raise ValueError("the rows' targets must be float32 on the CPU")
    if head_sum is not None and (head_sum[0].shape != (m // per_image, r, n) or head_sum[0].stride(-1) != 1):
        raise ValueError(f"the heads' sum goes to [{m // per_image}, {r}, {n}] with a unit last stride")
    threads = torch.get_num_threads() if threads is None else threads
    threads = max(1, min(threads, m * r // MIN_ROWS_PER_THREAD))
    summed = (None, 0, 0, 0) if head_sum is None else (head_sum[0].data_ptr(), *head_sum[0].stride()[:2], head_sum[1])
    lib.vz_softmax_rows(
        scores.data_ptr(),
        out.data_ptr(),
        m,
        r,
        n,
        row0,
        prefix,
        per_image,
        None if dist is None or distance is None else dist.data_ptr(),
        *_target(*(entropy or (None, 0))),
        *_target(*(distance or (None, 0))),
        *summed[:3],
        int(bool(summed[3])),
        threads,
    )
    return True


def reduce_chunk(
    reducer: StatisticsReducer,
    layer: int,
    batch: int,
    head: int,
    scores: torch.Tensor,
    row: int,
    out: torch.Tensor,
    head_sum: tuple[torch.Tensor, bool] | None = None,
) -> bool:
    """The softmax of a chunk's ``scores`` into ``out`` with ``reducer``'s statistics of it written and counted: scores
    [c, r, N] of heads ``head .. head + c``, query rows ``row .. row + r`` of image ``batch``, or [g, H, N, N], every
    head and row of images ``batch .. batch + g``; ``head_sum`` as for :func:`softmax_rows` (its target [1 or g, r,
    N]). False, with nothing written, where the kernel does not serve (the
    device, a statistic it does not compute, a windowed layer, the kernel off): the caller forms the softmax and hands
    it over (:meth:`~vizapp.statistics.StatisticsReducer.chunk`)."""
    if scores.device.type != "cpu" or scores.dtype != torch.float32 or not enabled():
        return False
    quantities = [s.fused_row for s in reducer.head_stats]
    if not set(quantities) <= {"entropy", "distance"} or len(set(quantities)) != len(quantities):
        return False
    g = reducer.geometry[layer]
    images = scores.shape[0] if scores.dim() == 4 else 1
    flat = scores.reshape(-1, *scores.shape[-2:]) if scores.is_contiguous() else None
    m, r, n = scores.shape[-3] * images, scores.shape[-2], scores.shape[-1]
    if (
        g is None
        or flat is None
        or not out.is_contiguous()
        or out.shape != scores.shape
        or g.num_tokens != n
        or g.num_keys != n
        or g.dist.shape != (n - g.num_prefix_tokens,) * 2
        or g.dist.dtype != torch.float32
        or not g.dist.is_contiguous()
        or batch + images > reducer.batch
        or head + scores.shape[-3] > reducer.heads[layer]
    ):
        return False
    per_image = scores.shape[-3]
    buffers = reducer.row_buffers(layer, reducer.heads[layer])
    targets: dict[str | None, tuple[torch.Tensor, int]] = {
        s.fused_row: (buffers[s.name][batch:, head:], g.num_prefix_tokens if s.patch_queries else 0)
        for s in reducer.head_stats
    }
    if "distance" in targets and targets["distance"][1] != g.num_prefix_tokens:
        return False  # a distance row for every query: not the kernel's
    done = softmax_rows(
        flat,
        out.view(m, r, n),
        row,
        per_image,
        g.num_prefix_tokens,
        g.dist,
        targets.get("entropy"),
        targets.get("distance"),
        head_sum,
    )
    if done:
        reducer.rows_filled(layer, cells=m * r)
    return done


def self_check() -> str | None:
    """The kernel on a small chunk (2 images of 3 heads, rows 2..8 of 9 tokens after 1 prefix token, a masked key,
    the heads' sum added to ones) against float64 torch: None where every value agrees to 1e-5 (relative) and 1e-6,
    else what differs."""
    gen = torch.Generator().manual_seed(0)
    n, p, r0 = 9, 1, 2
    scores64 = torch.randn((6, n, n), generator=gen, dtype=torch.float64) * 4
    scores64[:, :, 3] = -torch.inf
    dist = torch.rand((n - p, n - p), generator=gen) * 50
    chunk = scores64[:, r0:].float().contiguous()
    out = torch.empty_like(chunk)
    ent, dis = torch.full((2, 3, n), torch.nan), torch.full((2, 3, n - p), torch.nan)
    summed = torch.ones((2, n - r0, n))
    softmax_rows(chunk, out, r0, 3, p, dist, (ent, 0), (dis, p), (summed, True))
    a = torch.softmax(chunk.double(), -1)
    logs = torch.where(a > 0, a.log(), torch.zeros_like(a))
    want_ent = -(a * logs).sum(-1).view(2, 3, -1)
    ap = a[..., p:]
    want_dis = ((ap * dist[r0 - p :].double()).sum(-1) / ap.sum(-1)).view(2, 3, -1)
    bad = []
    for name, got, want in (
        ("softmax", out, a),
        ("entropy", ent[..., r0:], want_ent),
        ("distance", dis[..., r0 - p :], want_dis),
        ("heads' sum", summed, 1 + a.view(2, 3, n - r0, n).sum(1)),
    ):
        if not torch.allclose(got.double(), want, rtol=1e-5, atol=1e-6):
            bad.append(f"{name} off by {(got.double() - want).abs().max().item():.3g}")
    if not (ent[..., :r0].isnan().all() and dis[..., : r0 - p].isnan().all()):
        bad.append("rows outside the chunk written")
    return "; ".join(bad) or None
