"""What a batch's class maps straight from one forward's graph (:class:`vizapp.graph_maps.AttentionGraph`) hold and
take, with the attention formed again in the backward (``recompute=True``: always on a GPU, and on the CPU where
keeping it would pass the forward budget, :func:`vizapp.graph_maps.recomputes`) and kept in the graph (``False``):
``python -m benchmarks.graph_memory``.

Each (model, batch, route) runs in a fresh process (random weights, CPU). After the model is loaded and the batch
preprocessed, the peak resident memory is reset (``/proc/self/clear_refs``); one AttentionGraph forward, its attention
rollout and the relevance and gradient rollout of one class per image then run (a warm-up), and the peak (``VmHWM``)
above that point is read. The time is the median of the repeats that follow, in the same process. Writes
docs/benchmarks-graph-memory.md. ``--device cuda``: the same on a GPU, whose peak is the device's
(``torch.cuda.max_memory_allocated`` above what the loaded model and the batch hold), each map's time taken after the
device finishes; there the default rule always forms the attention again, and this measures whether keeping it would
be faster.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.bench.machine import device_name

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "benchmarks-graph-memory.md"
OUT_CUDA = OUT.with_name("benchmarks-graph-memory-cuda.md")
MARK = "GRAPH_MEMORY "
CASES = (("vit_base_patch16_224", 16), ("vit_large_patch16_384", 2))


def measure(name: str, batch: int, recompute: bool, repeats: int, device: str = "cpu") -> dict:
    """One case in this process: peak bytes above the memory after loading and preprocessing, and median seconds."""
    from benchmarks.bench.memory import PeakMemory
    from vizapp import graph_maps, load_model

    vm = load_model(name, pretrained=False, device=device)
    pixels = [np.random.default_rng(i).integers(0, 256, (300, 260, 3), dtype=np.uint8) for i in range(batch)]
    x = torch.stack([vm.transform(Image.fromarray(p)) for p in pixels]).to(vm.device)
    asked = {m: graph_maps.options(vm, m) for m in ("rollout", *graph_maps.GRADIENT_METHODS)}

    def maps() -> dict:
        graph = graph_maps.AttentionGraph(vm, x, recompute=recompute)
        found = graph.plain_maps(asked) | graph.class_maps(asked, [i % 1000 for i in range(batch)])
        vm.synchronize()
        return found

    peak_from_here = PeakMemory(vm.device)
    if not peak_from_here.cuda and not peak_from_here.reset:
        raise SystemExit("this benchmark needs /proc/self/clear_refs (Linux)")
    maps()
    peak = peak_from_here.bytes()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        maps()
        times.append(time.perf_counter() - t0)
    return {"model": name, "batch": batch, "recompute": recompute, "peak": peak, "seconds": statistics.median(times)}


def interleaved(name: str, batch: int, repeats: int, device: str = "cpu") -> tuple[float, float]:
    """Median seconds of ``vizapp.explain(vm, images, ["relevance", "grad_rollout"])`` with the attention formed again
    and kept, the two alternating in one process (after one warm-up each): explain's own forwards (sized by the
    formed-again route's estimate, the same for both)."""
    import functools

    from vizapp import explain, graph_maps, load_model

    vm = load_model(name, pretrained=False, device=device)
    pixels = [np.random.default_rng(i).integers(0, 256, (300, 260, 3), dtype=np.uint8) for i in range(batch)]
    images = [Image.fromarray(p) for p in pixels]
    real = graph_maps.AttentionGraph
    times: dict[bool, list[float]] = {True: [], False: []}
    try:
        for round_ in range(repeats + 1):
            for recompute in (True, False):
                graph_maps.AttentionGraph = functools.partial(real, recompute=recompute)
                t0 = time.perf_counter()
                explain(vm, images, ["relevance", "grad_rollout"])  # numpy maps: the device has finished
                if round_:
                    times[recompute].append(time.perf_counter() - t0)
    finally:
        graph_maps.AttentionGraph = real
    return statistics.median(times[True]), statistics.median(times[False])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--case", action="append", help="MODEL:IMAGES (default: ViT-B/16 of 16, ViT-L/16 at 384 of 2)")
    parser.add_argument(
        "--interleave", nargs="*", default=["vit_small_patch16_224:16", "vit_base_patch16_224:16"],
        help="MODEL:IMAGES whose explain is timed with both routes alternating in one process",
    )  # fmt: skip
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--out", type=Path, help=f"default {OUT.relative_to(ROOT)} (cpu), {OUT_CUDA.name} (cuda)")
    parser.add_argument("--_case", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args._case:
        name, batch, recompute = args._case
        print(MARK + json.dumps(measure(name, int(batch), recompute == "1", args.repeats, args.device)), flush=True)
        return
    rows = []
    cases = [(c.split(":")[0], int(c.split(":")[1])) for c in args.case] if args.case else CASES
    for name, batch in cases:
        found = {}
        for recompute in ("1", "0"):
            cmd = [sys.executable, "-m", "benchmarks.graph_memory", "--_case", name, str(batch), recompute]
            cmd += ["--repeats", str(args.repeats), "--threads", str(args.threads), "--device", args.device]
            done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
            line = next(ln for ln in done.stdout.splitlines() if ln.startswith(MARK))
            found[recompute] = json.loads(line[len(MARK) :])
        new, old = found["1"], found["0"]
        rows.append(
            f"| {name} | {batch} | {old['peak'] / 2**20:,.0f} | {new['peak'] / 2**20:,.0f} | "
            f"{new['peak'] / old['peak']:.2f} | {old['seconds']:.2f} | {new['seconds']:.2f} | "
            f"{new['seconds'] / old['seconds']:.2f} |"
        )
        print(rows[-1], flush=True)
    timed = []
    for name, batch in [(c.split(":")[0], int(c.split(":")[1])) for c in args.interleave or []]:
        again, kept = interleaved(name, batch, args.repeats, args.device)
        timed.append(f"| {name} | {batch} | {kept:.2f} | {again:.2f} | {again / kept:.2f} |")
        print(timed[-1], flush=True)
    cuda = torch.device(args.device).type == "cuda"
    where = device_name(args.device)
    peak_text = (
        "device memory (max_memory_allocated above the loaded model and batch)"
        if cuda
        else "resident memory (VmHWM, reset after loading and preprocessing)"
    )
    text = "\n".join(
        [
            "# Class maps of a batch from one forward's graph: the attention kept, or formed again in the backward",
            "",
            f"Generated by `python -m benchmarks.graph_memory` (random weights, {where}, {args.threads} threads, "
            f"{torch.__version__}); edit the code, not this file. Each route of each case in its own process: peak "
            f"{peak_text} of one AttentionGraph forward with "
            "attention rollout, relevance and gradient rollout of one class per image; seconds: the median of "
            f"{args.repeats} repeats after it, in that process. Kept: `recompute=False` (the attention of every layer in "
            "the autograd graph: the CPU's route where the forward budget holds it); formed again: `recompute=True` "
            "(always on a GPU, and on the CPU beyond that budget).",
            "",
            "| model | images | kept MiB | formed again MiB | ratio | kept s | formed again s | ratio |",
            "|---|---|---|---|---|---|---|---|",
            *rows,
            "",
            *(
                [
                    '`vizapp.explain(vm, images, ["relevance", "grad_rollout"])` with either route, alternating in '
                    f"one process, medians of {args.repeats} rounds after a warm-up (explain's own forwards):",
                    "",
                    "| model | images | kept s | formed again s | ratio |",
                    "|---|---|---|---|---|",
                    *timed,
                    "",
                ]
                if timed
                else []
            ),
        ]
    )
    out = args.out or (OUT_CUDA if cuda else OUT)
    out.write_text(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
