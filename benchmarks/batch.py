"""What the batch API costs against a bare batched forward (issue 23, "Measure"): ``python -m benchmarks.batch``.

For each model (random weights) and batch size B, in interleaved rounds, the medians of:

- a: a bare forward of the B preprocessed images as one batch [B, C, H, W] (the model's own fused attention, no
  autograd);
- b: ``vizapp.analyze(vm, images)`` of the same B images (PIL, 224 x 224), preprocessing included: B analyses
  (target b/a <= 1.20 for ViT-S and ViT-B at 16 and 64 images, CPU, 2 threads);
- c: ``vizapp.explain(vm, images, ["relevance", "grad_rollout"])``: both class maps of every image's top-1 class
  (target c/a <= 2.5), for the batch sizes in ``--class-batches``.

The forwards columns say how many forwards the memory budget (``vizapp.limits.BATCH_FORWARD_BYTES``) cut each call
into. Times are wall and process CPU time (all threads); ratios are between medians of the same run, and "paired"
is the median over rounds of each round's own ratio (with the smallest and largest: how much the machine moved the
ratio from round to round; the verdicts use the ratio of medians, as the issue defines the target). One table per
``--threads`` value (the machine's load average is printed with each: on a shared machine a busy neighbour stalls the
second thread of every small parallel op). Writes docs/benchmarks-batch.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import vizapp
from benchmarks.bench.machine import device_name
from benchmarks.bench.specs import ModelSpec, parse_spec
from vizapp import limits
from vizapp.attention import images_within
from vizapp.batch import forward_groups

MODELS = ("vit_small_patch16_224", "vit_base_patch16_224")
BATCHES = (16, 64)
CLASS_BATCHES = (16,)
ANALYZE_TARGET, CLASS_MAP_TARGET = 1.20, 2.5
CLASS_METHODS = ["relevance", "grad_rollout"]
OUT = Path(__file__).resolve().parents[1] / "docs" / "benchmarks-batch.md"


def _faults() -> int:
    """Minor page faults of this process so far (every thread), or 0 where the platform does not count them."""
    try:
        import resource
    except ImportError:  # not on Windows
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _timed(vm: vizapp.VizModel, fn: Callable[[], object]) -> tuple[float, float, int]:
    vm.synchronize()
    t0, c0, f0 = time.perf_counter(), time.process_time(), _faults()
    fn()
    vm.synchronize()
    return time.perf_counter() - t0, time.process_time() - c0, _faults() - f0


def random_batch(vm: vizapp.VizModel, batch: int) -> tuple[list[Image.Image], Callable[[], None]]:
    """``batch`` random 224 x 224 images (seeded by ``batch``) and a bare forward of them: their preprocessed batch
    [B, C, H, W] on the model's device, through the model without autograd."""
    rng = np.random.default_rng(batch)
    images = [Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)) for _ in range(batch)]
    x = torch.stack([vm.transform(im) for im in images]).to(device=vm.device, dtype=vm.dtype)

    def bare() -> None:
        with torch.no_grad():
            vm.logits(x)

    return images, bare


def measure(vm: vizapp.VizModel, batch: int, class_maps: bool, repeats: int, warmup: int) -> dict[str, float]:
    """Medians of a, b (and c) for ``batch`` random 224 x 224 images, in ``repeats`` interleaved rounds."""
    images, bare = random_batch(vm, batch)

    def batch_analysis() -> None:
        vizapp.analyze(vm, images)

    def batch_maps() -> None:
        vizapp.explain(vm, images, CLASS_METHODS)

    runs = {"a": bare, "b": batch_analysis} | ({"c": batch_maps} if class_maps else {})
    for _ in range(warmup):
        for fn in runs.values():
            fn()
    times: dict[str, list[tuple[float, float, int]]] = {k: [] for k in runs}
    for _ in range(repeats):
        for k, fn in runs.items():
            times[k].append(_timed(vm, fn))
    out: dict[str, float] = {}
    for k, v in times.items():
        out[f"{k}_wall"] = statistics.median(t[0] for t in v)
        out[f"{k}_cpu"] = statistics.median(t[1] for t in v)
        out[f"{k}_faults"] = statistics.median(t[2] for t in v)
        if k != "a":  # within each round, over that round's bare forward: what the machine's drift moves least
            paired = [t[0] / a[0] for t, a in zip(v, times["a"], strict=True)]
            out[f"{k}_paired"], out[f"{k}_lo"], out[f"{k}_hi"] = statistics.median(paired), min(paired), max(paired)
    inputs = [vm.transform(im)[None] for im in images]
    out["b_forwards"] = len(forward_groups(vm, inputs))
    out["c_forwards"] = len(forward_groups(vm, inputs, gradients=True, graph=True)) if class_maps else float("nan")
    return out


def _paired(m: dict[str, float], k: str, digits: int) -> str:
    return f"{m[k + '_paired']:.{digits}f} [{m[k + '_lo']:.{digits}f}, {m[k + '_hi']:.{digits}f}]"


def _verdict(ratio: float, target: float) -> str:
    return "met" if ratio <= target else "missed"


def _grouping(device: str) -> str:
    """How b and c form the attention on ``device``, and (on the CPU) why their 2-thread ratios move with the load."""
    budget = limits.chunk_bytes(torch.device(device), group=True)
    name = "IMAGE_GROUP_BYTES" if device == "cpu" else "ATTENTION_CHUNK_BYTES"
    small, base = (images_within(budget, heads, 197, 64) for heads in (6, 12))  # ViT-S/16, ViT-B/16 at 224 px
    text = (
        "b and c form each layer's attention and its statistics a group of whole images at a time (as many as fit "
        f"`limits.{name}`, {budget / 2**20:g} MiB of attention: {small} ViT-S/16 images, {base} ViT-B/16), a few "
        "ops per group and layer, where the bare forward runs about ten per layer for the whole batch"
    )
    if device != "cpu":
        return text + "."
    from vizapp import cpu_rows

    kernel = "on" if cpu_rows.library() is not None else f"off: {cpu_rows.why_off() or 'VIZAPP_CPU_KERNEL=0'}"
    text += (
        f"; each group's softmax, with its entropy and mean distance, is one pass of the CPU kernel (`vizapp.cpu_rows`, "
        f"{kernel})"
    )
    return text + (
        ": when a neighbour holds a core, each of these parallel ops waits for its second thread, so on a loaded "
        "machine the 2-thread ratios grow with B and with the load; the 1-thread table shows the work itself."
    )


def header(args: argparse.Namespace) -> list[str]:
    threads = " ".join(map(str, args.threads))
    out = "" if args.out == OUT else f" --out {args.out}"  # as typed, where it is not the default file
    return [
        "# The batch API: cost against a bare batched forward",
        "",
        f"Generated by `python -m benchmarks.batch --repeats {args.repeats} --warmup {args.warmup} "
        f"--threads {threads}{out}` "
        f"(random weights, forward in {args.dtype}, {device_name(args.device)}, "
        f"{args.repeats} interleaved rounds after {args.warmup} warm-up, medians); edit the code, not this file.",
        "",
        "a: a bare forward of the B preprocessed images as one batch. b: `vizapp.analyze(vm, images)`, B analyses, "
        f"preprocessing included (target b/a <= {ANALYZE_TARGET:.2f}). c: `vizapp.explain(vm, images, "
        f'["relevance", "grad_rollout"])`, both maps of each image\'s top-1 class (target c/a <= {CLASS_MAP_TARGET}). '
        "Forwards: how many forwards the memory budget (`limits.BATCH_FORWARD_BYTES`) cut the call into. "
        "ms per image = wall time / B. Paired: the median over rounds of the ratio within each round, [smallest, "
        "largest] (the verdicts use the ratio of the medians). Page faults: the median minor page faults of the "
        "process during one call, in thousands (each is a fresh 4 KiB page the kernel zeroes and maps, roughly 2 µs: "
        "glibc gives large blocks back when they are freed, and whether a call's activations find their memory still "
        "mapped depends on what the process did before, so a bare forward's own count moves between runs).",
        "",
        _grouping(args.device),
    ]


def markdown(rows: list[tuple[str, int, dict[str, float]]], threads: int, load: tuple[float, float]) -> str:
    lines = [
        "",
        f"## {threads} thread(s)",
        "",
        f"Load average of the machine (1 min) at the start and end of this table: {load[0]:.1f}, {load[1]:.1f} "
        f"({os.cpu_count()} CPUs).",
        "",
        "| model | B | a ms | a ms/image | b ms | b/a | b/a paired | b/a CPU | page faults a, b (k) | b forwards "
        "| b target | c ms | c/a | c/a paired | c/a CPU | c forwards | c target |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, batch, m in rows:
        a, b = m["a_wall"], m["b_wall"]
        ba = b / a
        cells = [
            name,
            str(batch),
            f"{1e3 * a:.0f}",
            f"{1e3 * a / batch:.1f}",
            f"{1e3 * b:.0f}",
            f"{ba:.3f}",
            _paired(m, "b", 3),
            f"{m['b_cpu'] / m['a_cpu']:.3f}",
            f"{m['a_faults'] / 1e3:.1f}, {m['b_faults'] / 1e3:.1f}",
            f"{m['b_forwards']:.0f}",
            _verdict(ba, ANALYZE_TARGET),
        ]
        if "c_wall" in m:
            ca = m["c_wall"] / a
            cells += [
                f"{1e3 * m['c_wall']:.0f}",
                f"{ca:.2f}",
                _paired(m, "c", 2),
                f"{m['c_cpu'] / m['a_cpu']:.2f}",
                f"{m['c_forwards']:.0f}",
                _verdict(ca, CLASS_MAP_TARGET),
            ]
        else:
            cells += [""] * 6
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.batch", description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", type=parse_spec, default=[ModelSpec(m) for m in MODELS])
    p.add_argument("--batches", nargs="+", type=int, default=list(BATCHES), help="batch sizes for a and b")
    p.add_argument(
        "--class-batches", nargs="*", type=int, default=list(CLASS_BATCHES), help="batch sizes that also time c"
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", nargs="+", type=int, default=[2], help="one table per thread count")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument(
        "--dtype", default="float32", choices=("float32", "float16", "bfloat16"), help="the model's forward precision"
    )
    args = p.parse_args(argv)
    models = [(spec.label, spec.load(args.device, args.dtype)) for spec in args.models]
    text = "\n".join(header(args)) + "\n"
    for threads in args.threads:
        torch.set_num_threads(threads)
        rows = []
        start = os.getloadavg()[0]
        for label, vm in models:
            for batch in sorted(set(args.batches) | set(args.class_batches)):
                m = measure(vm, batch, batch in args.class_batches, args.repeats, args.warmup)
                rows.append((label, batch, m))
                print(f"{threads} thread(s), {label} B={batch}: " + ", ".join(f"{k} {v:.3f}" for k, v in m.items()))
        text += markdown(rows, threads, (start, os.getloadavg()[0]))
        print(text, flush=True)
        args.out.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
