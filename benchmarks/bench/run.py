"""One model through every measurement (timed stages, profile, memory), and dataset mode's throughput."""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from benchmarks.bench.costmodel import Shape, cost_model, digest_rate, elementwise_rate, model_shape
from benchmarks.bench.memory import measure_memory
from benchmarks.bench.profiling import profile_b
from benchmarks.bench.specs import LARGE_MACS, SMALL_MACS, ModelSpec
from benchmarks.bench.stages import (
    cache_snapshot,
    control_changes,
    fresh_copy,
    stage_a,
    stage_b,
    stage_c,
    stage_d,
    timed,
    timed_cpu,
)

MB = 1e6  # all sizes in the report are decimal: 1 MB = 10^6 bytes, 1 kB = 10^3 bytes


@dataclass
class ModelResult:
    """Everything measured for one model."""

    spec: ModelSpec
    shape: Shape
    repeats: int
    times: dict[str, list[float]] = field(default_factory=dict)  # seconds per repeat: a, b, c, and one per change
    fig_json: dict[str, int] = field(default_factory=dict)  # bytes per figure of (c)
    pos_sim_s: float = 0.0
    mem: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # one result per fresh subprocess
    elem_rate: float = float("nan")  # elements/s of a softmax pass, measured beside the timings
    # bytes/s of the weights digest (checksums and hashing), measured beside the timings
    digest_rate: float = float("nan")
    profile: dict[str, float] = field(default_factory=dict)
    cost: dict[str, float] = field(default_factory=dict)

    def med(self, key: str) -> float:
        return statistics.median(self.times[key])

    @property
    def change_keys(self) -> list[str]:
        return [k for k in self.times if k.startswith("d:")]

    @property
    def d_median(self) -> float:
        return statistics.median([self.med(k) for k in self.change_keys])

    @property
    def d_max(self) -> float:
        return max(self.med(k) for k in self.change_keys)

    def paired_ratio(self, key: str) -> float:
        return statistics.median([x / a for x, a in zip(self.times[key], self.times["a"], strict=True)])

    def mem_mb(self, stage: str) -> float:
        """Median peak (MB) over the fresh subprocesses of ``stage``."""
        if not self.mem.get(stage):
            return float("nan")
        return statistics.median(m["peak_bytes"] for m in self.mem[stage]) / MB

    def mem_range(self, stage: str) -> str:
        peaks = [m["peak_bytes"] / MB for m in self.mem.get(stage, [])]
        return f"{min(peaks):.0f}–{max(peaks):.0f}" if peaks else "–"

    def mem_field(self, stage: str, key: str) -> float:
        vals = [m[key] for m in self.mem.get(stage, []) if key in m]
        return statistics.median(vals) if vals else float("nan")

    @property
    def added_mb(self) -> float:
        return self.mem_mb("b") - self.mem_mb("a")


def run_model(
    spec: ModelSpec,
    img: Image.Image,
    repeats: int | tuple[int, int],
    warmup: int,
    device: str,
    threads: int | None,
    profile: bool = True,
    memory: bool = True,
    log: Callable[[str], None] = print,
    mem_repeats: int = 3,
    dtype: str = "float32",
) -> ModelResult:
    """Time stages (a)-(d) with interleaved repeats, then profile (b) and measure memory in subprocesses.

    Args:
        repeats: timed repeats, or (repeats for models under :data:`SMALL_MACS`, repeats, repeats for models over
            :data:`LARGE_MACS`).
        mem_repeats: fresh subprocesses per memory measurement of (a) and (b) (the median is reported: the peak RSS
            of one run varies with the address-space layout); the capture-only diagnostic runs once.
    """
    from vizapp.models import MODEL_CACHE

    vm = spec.load(device, dtype)
    shape = model_shape(vm)
    cost = cost_model(shape)
    if isinstance(repeats, tuple):
        macs = cost["forward_macs"]
        repeats = repeats[0] if macs < SMALL_MACS else repeats[2] if macs > LARGE_MACS else repeats[1]
    res = ModelResult(spec=spec, shape=shape, repeats=repeats, cost=cost)
    log(
        f"{spec.label}: N={shape.tokens} tokens ({shape.prefix} prefix + {shape.patches} patches), "
        f"L={shape.layers}, H={shape.heads}, D={shape.width}; {repeats} repeats after {warmup} warm-up"
    )
    t0 = time.perf_counter()
    pos_sim = vm.pos_similarity()
    res.pos_sim_s = time.perf_counter() - t0
    for key in ("a", "b", "c", "a_cpu", "b_cpu"):
        res.times[key] = []
    r_cache: Any = None
    r = None
    for i in range(warmup + repeats):
        order = ("a", "b") if i % 2 == 0 else ("b", "a")
        for key in order:
            if key == "a":
                ta, ca, _ = timed_cpu(stage_a, vm, img)
            else:
                tb, cb, r = timed_cpu(stage_b, vm, img)
                r_cache = cache_snapshot(r)
        tc, sizes = timed(stage_c, r, pos_sim)
        tds = {}
        for name, fn in control_changes(r).items():
            tds[name], _ = timed(stage_d, fn, fresh_copy(r, r_cache))
        if i >= warmup:
            res.times["a"].append(ta)
            res.times["b"].append(tb)
            res.times["a_cpu"].append(ca)
            res.times["b_cpu"].append(cb)
            res.times["c"].append(tc)
            for name, t in tds.items():
                res.times.setdefault(f"d:{name}", []).append(t)
            res.fig_json = sizes
        log(
            f"  {'warm-up' if i < warmup else f'repeat {i - warmup + 1}'}: a {ta * 1e3:.1f} ms, b {tb * 1e3:.1f} ms, "
            f"c {tc * 1e3:.1f} ms, d " + "/".join(f"{t * 1e3:.1f}" for t in tds.values()) + " ms"
        )
    if device == "cpu":
        res.elem_rate = elementwise_rate(shape)
        res.digest_rate = digest_rate()
    else:
        failed = vm.graph_failures()
        log(f"  CUDA graphs: {len(vm.graphs)} recorded" + (f"; failed or slower: {failed}" if failed else ""))
    if profile:
        res.profile = profile_b(vm, img)
    del r, vm
    MODEL_CACHE.clear()
    gc.collect()
    if memory:
        for i in range(max(1, mem_repeats)):
            for stage in ("a", "b") if i else ("a", "cap", "b"):
                res.mem.setdefault(stage, []).append(measure_memory(spec, stage, device, threads, dtype))
        log(
            f"  peak memory above loaded model (median of {mem_repeats}): a {res.mem_mb('a'):.1f} MB "
            f"({res.mem_range('a')}), capture only {res.mem_mb('cap'):.1f} MB, b {res.mem_mb('b'):.1f} MB "
            f"({res.mem_range('b')})"
        )
    return res


def run_dataset(
    spec: ModelSpec,
    img: Image.Image,
    n_images: int,
    batch_size: int,
    device: str,
    log: Callable[[str], None] = print,
    dtype: str = "float32",
) -> dict[str, Any]:
    """``vizapp.stats.collect_stats`` over ``n_images`` PNG files (the photo, flipped and rotated so that they
    differ), timing every batch's analysis beside a bare batched forward of the same batch (order alternating)."""
    import tempfile

    from vizapp.stats import collect_stats

    vm = spec.load(device, dtype)
    variants = [img, img.transpose(Image.Transpose.FLIP_LEFT_RIGHT), img.rotate(90), img.rotate(270)]
    with tempfile.TemporaryDirectory(prefix="vizapp-bench-") as tmp:
        paths = []
        for i in range(n_images):
            path = Path(tmp) / f"img{i:04d}.png"
            variants[i % len(variants)].save(path, compress_level=1)
            paths.append(path)
        st = collect_stats(vm, paths, batch_size, baseline_batches=-1)
    out = {
        "model": spec.label,
        "images": st.n_images,
        "timed_images": st.timed_images,
        "batch_size": batch_size,
        "analysis_ips": st.analysis_throughput,
        "bare_ips": st.bare_throughput,
        "ratio": st.throughput_ratio,
        "end_to_end_ips": st.throughput,
    }
    log(
        f"dataset mode {spec.label}: {st.timed_images} timed images in batches of {batch_size}: analysis "
        f"{st.analysis_throughput:.2f} img/s, bare forward {st.bare_throughput:.2f} img/s, ratio {st.throughput_ratio:.3f}"
    )
    return out
