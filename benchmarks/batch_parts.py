"""What each CPU mechanism of the batch analysis is worth: ``python -m benchmarks.batch_parts``.

``vizapp.analyze(vm, images)`` of B random 224 x 224 images, in one process, in interleaved rounds, with every
mechanism on and then with each one off in turn, beside a bare batched forward of the same preprocessed images:

- **kept pool** (:mod:`vizapp.kept`): the blocks an analysis keeps (q and k, fusions, block outputs) handed out again
  once free, instead of fresh memory the kernel faults in page by page; off: ``limits.KEPT_POOL_MIN_BYTES`` above
  every block;
- **CPU kernel** (:mod:`vizapp.cpu_rows`): each chunk's softmax with its entropy and mean distance in one pass over
  each row; off (``VIZAPP_CPU_KERNEL=0``): torch's softmax, then the statistics' own passes;
- **entropy from scores** (:meth:`vizapp.statistics.AttentionEntropy.rows_from_scores`): with the CPU kernel off, the
  attention entropy from the chunk's scores, without a log per weight; off (the kernel too): a log per weight;
- **image groups** (``limits.IMAGE_GROUP_BYTES``): whole images handed to the statistics several at a time in 6 MiB
  groups; off: groups as large as the 3 MiB chunk of heads (``limits.INLINE_CHUNK_BYTES``).

Medians of wall time; "paired" is the median over rounds of (this configuration / every mechanism on) taken within a
round, which the machine's drift moves least. Minor page faults per call as in ``benchmarks.batch``.

The pool is switched off in a process of its own, for the whole process, beside a bare forward there: without it,
each analysis gives hundreds of MB back to the kernel, and glibc's heap then serves the other configurations' (and
the bare forward's) activations from fresh pages too (a first version interleaved it with the rest: 680k faults per
bare forward of 64 images). Writes docs/benchmarks-batch-parts.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

import vizapp
from benchmarks.batch import _faults, random_batch
from benchmarks.bench.specs import ModelSpec, parse_spec
from vizapp import limits
from vizapp import statistics as vstats

OUT = Path(__file__).resolve().parents[1] / "docs" / "benchmarks-batch-parts.md"
CASES = (("vit_small_patch16_224", 16), ("vit_small_patch16_224", 64), ("vit_base_patch16_224", 16))


@contextmanager
def _off(part: str) -> Iterator[None]:
    """The mechanism ``part`` switched off for the duration ("" leaves everything on)."""
    entropy = type(vstats.STATISTICS["entropy"])
    saved = limits.KEPT_POOL_MIN_BYTES, limits.IMAGE_GROUP_BYTES, entropy.__dict__.get("rows_from_scores")
    kernel = os.environ.get("VIZAPP_CPU_KERNEL")
    try:
        if part in ("CPU kernel", "entropy from scores"):
            os.environ["VIZAPP_CPU_KERNEL"] = "0"
        if part == "kept pool":
            limits.KEPT_POOL_MIN_BYTES = 1 << 62
        elif part == "entropy from scores":
            entropy.rows_from_scores = vstats.HeadStatistic.rows_from_scores  # the default: not from scores
        elif part == "image groups":
            limits.IMAGE_GROUP_BYTES = limits.INLINE_CHUNK_BYTES
        yield
    finally:
        limits.KEPT_POOL_MIN_BYTES, limits.IMAGE_GROUP_BYTES = saved[0], saved[1]
        if kernel is None:
            os.environ.pop("VIZAPP_CPU_KERNEL", None)
        else:
            os.environ["VIZAPP_CPU_KERNEL"] = kernel
        if saved[2] is not None:
            entropy.rows_from_scores = saved[2]


PARTS = ("", "CPU kernel", "entropy from scores", "image groups")  # switched off in this process ("" : none)


def measure(
    vm: vizapp.VizModel, batch: int, repeats: int, warmup: int, parts: tuple[str, ...] = PARTS
) -> dict[str, dict[str, float]]:
    images, bare = random_batch(vm, batch)

    def analysis(part: str) -> Callable[[], None]:
        def run() -> None:
            with _off(part):
                vizapp.analyze(vm, images)

        return run

    runs = {"bare forward": bare} | {part: analysis(part) for part in parts}
    for _ in range(warmup):
        for fn in runs.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in runs}
    faults: dict[str, list[int]] = {k: [] for k in runs}
    for _ in range(repeats):
        for k, fn in runs.items():
            f0, t0 = _faults(), time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
            faults[k].append(_faults() - f0)
    bare_ms = statistics.median(times["bare forward"])
    return {
        k: {
            "ms": 1e3 * statistics.median(v),
            "ratio": statistics.median(v) / bare_ms,
            "paired": statistics.median(t / on for t, on in zip(v, times[""], strict=True)),
            "faults": statistics.median(faults[k]),
        }
        for k, v in times.items()
    }


def markdown(args: argparse.Namespace, tables: list[tuple[str, int, dict[str, dict[str, float]]]]) -> str:
    lines = [
        "# What each CPU mechanism of the batch analysis is worth",
        "",
        f"Generated by `python -m benchmarks.batch_parts --repeats {args.repeats} --warmup {args.warmup} --threads "
        f"{args.threads}` (random weights, CPU, {args.threads} thread(s), {args.repeats} interleaved rounds after "
        f"{args.warmup} warm-up, medians, one process); edit the code, not this file. See the module docstring of "
        "benchmarks/batch_parts.py for what each mechanism is and how it is switched off.",
        "",
        "ratio: the configuration's median over the bare forward's of the same process (the issue's target for "
        "every mechanism on: <= 1.20). paired: the median over rounds of this configuration's time over every "
        "mechanism on, within the round. Page faults: minor page faults per call, median, in thousands. The last two "
        "rows come from a process of its own with the pool off throughout (see the module docstring). Page faults "
        "move with each process's history (glibc serves a block above its mmap threshold, at most 32 MB, from "
        "fresh pages, and a bare forward of 64 images has activations that large), so compare them within a table.",
    ]
    for label, batch, rows in tables:
        lines += [
            "",
            f"## {label}, {batch} images",
            "",
            "| configuration | ms | ratio to the bare forward | paired, to every mechanism on | page faults (k) |",
            "|---|---|---|---|---|",
        ]
        for k, m in rows.items():
            name = "every mechanism on" if k == "" else (k if "forward" in k else f"{k} off")
            paired = "" if m["paired"] != m["paired"] else f"{m['paired']:.3f}"  # NaN: not in the same rounds
            lines.append(f"| {name} | {m['ms']:.0f} | {m['ratio']:.3f} | {paired} | {m['faults'] / 1e3:.1f} |")
    return "\n".join(lines) + "\n"


def _without_pool(case: str, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """The bare forward and the analysis with the pool off, measured in a process of its own (see the module)."""
    cmd = [sys.executable, "-m", "benchmarks.batch_parts", "--without-pool", "--cases", case]
    cmd += ["--repeats", str(args.repeats), "--warmup", str(args.warmup), "--threads", str(args.threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[1])
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    unpaired = {"paired": float("nan")}  # paired with the rows of another process: left blank
    return {"bare forward (own process)": rows["bare forward"] | unpaired, "kept pool": rows[""] | unpaired}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.batch_parts", description=__doc__.split("\n")[0])
    p.add_argument("--cases", nargs="+", default=[f"{m}:{b}" for m, b in CASES], help="MODEL:BATCH")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--without-pool", action="store_true", help="(internal) the pool off throughout; JSON out")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.without_pool:
        limits.KEPT_POOL_MIN_BYTES = 1 << 62
    tables = []
    for case in args.cases:
        spec_text, _, batch = case.rpartition(":")
        spec: ModelSpec = parse_spec(spec_text)
        vm = spec.load("cpu")
        rows = measure(vm, int(batch), args.repeats, args.warmup, ("",) if args.without_pool else PARTS)
        del vm
        if args.without_pool:
            print(json.dumps(rows))
            return 0
        rows |= _without_pool(case, args)
        for k, m in rows.items():
            print(
                f"{spec.label} B={batch} {k or 'every mechanism on'}: "
                + ", ".join(f"{a} {b:.3f}" for a, b in m.items())
            )
        tables.append((spec.label, int(batch), rows))
    text = markdown(args, tables)
    args.out.write_text(text, encoding="utf-8")
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
