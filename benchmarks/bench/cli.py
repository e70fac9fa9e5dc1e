"""The command line: ``python -m benchmarks.bench [--quick] [--models ...] [--out FILE] ...``."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from benchmarks.bench.machine import fused_route, machine_info, photo
from benchmarks.bench.markdown import (
    DEFAULT_OUT,
    TABLE_COLUMNS,
    evaluate_targets,
    md_table,
    render_markdown,
    table_rows,
    write_report,
)
from benchmarks.bench.memory import MEM_MARK, measure_memory_here
from benchmarks.bench.run import run_dataset, run_model
from benchmarks.bench.specs import (
    DATASET_MODEL,
    DEFAULT_MODELS,
    FAMILY_MODELS,
    LARGE_MACS,
    QUICK_DATASET_MODEL,
    QUICK_MODELS,
    SMALL_MACS,
    parse_spec,
)


def build_parser() -> argparse.ArgumentParser:
    """The options of ``python -m benchmarks.bench``."""
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench",
        description="What vizapp adds on top of a bare ViT forward pass: time, memory, figure size.",
    )
    p.add_argument("--quick", action="store_true", help="smoke test: vit_tiny at 64 px, 2 repeats")
    p.add_argument(
        "--models",
        nargs="+",
        type=parse_spec,
        default=None,
        help="timm names, optionally name@key=value,... (create_model kwargs); default: the issue's five",
    )
    p.add_argument(
        "--families",
        action="store_true",
        help="the model-family rows (DINOv3, EVA-02, BEiT, torchvision, transformers) instead of the default set",
    )
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per model (default 7; 2 with --quick)")
    p.add_argument("--large-repeats", type=int, default=3, help=f"repeats for models over {LARGE_MACS / 1e9:.0f} GMAC")
    p.add_argument(
        "--small-repeats",
        type=int,
        default=None,
        help=f"repeats for models under {SMALL_MACS / 1e9:.0f} GMAC (default 5 x --repeats; --repeats with --quick)",
    )
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds before the repeats")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="markdown report (default docs/benchmarks.md)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "float16", "bfloat16"),
        help="the model's forward precision (vizapp's attention maths stay fp32)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    p.add_argument(
        "--mem-repeats",
        type=int,
        default=None,
        help="fresh subprocesses per memory measurement of (a) and (b); the median is reported "
        "(default 3, 1 with --quick)",
    )
    p.add_argument("--no-profile", action="store_true", help="skip the cProfile run of (b)")
    p.add_argument(
        "--dataset-images",
        type=int,
        default=None,
        help="images for the dataset-mode throughput (default 48; 8 with --quick; none with --models; 0 skips it)",
    )
    p.add_argument("--_measure-mem", nargs=2, metavar=("STAGE", "MODEL"), dest="measure_mem", help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is available", file=sys.stderr)
        return 2
    if args.measure_mem:
        stage, label = args.measure_mem
        print(MEM_MARK + json.dumps(measure_memory_here(stage, parse_spec(label), args.device, args.dtype)), flush=True)
        return 0
    chosen = FAMILY_MODELS if args.families else QUICK_MODELS if args.quick else DEFAULT_MODELS
    specs = args.models or [parse_spec(s) for s in chosen]
    if args.repeats is None:
        args.repeats = 2 if args.quick else 7
    if args.mem_repeats is None:
        args.mem_repeats = 1 if args.quick else 3
    if args.small_repeats is None:
        args.small_repeats = args.repeats if args.quick else 5 * args.repeats
    info = machine_info(args.device)
    img, image_desc = photo()
    print("\n".join(f"{k}: {v}" for k, v in info.items()), flush=True)
    t0 = time.perf_counter()
    results = []
    for spec in specs:
        results.append(
            run_model(
                spec,
                img,
                (args.small_repeats, args.repeats, args.large_repeats),
                args.warmup,
                args.device,
                args.threads,
                dtype=args.dtype,
                profile=not args.no_profile,
                memory=not args.no_memory,
                log=lambda s: print(s, flush=True),
                mem_repeats=args.mem_repeats,
            )
        )
    dataset = None
    # default: with the default or quick model set (a --models run measures only what it names)
    n_ds = (
        args.dataset_images
        if args.dataset_images is not None
        else (0 if args.models or args.families else 8 if args.quick else 48)
    )
    if n_ds > 0:
        ds_spec = parse_spec(QUICK_DATASET_MODEL if args.quick else DATASET_MODEL)
        dataset = run_dataset(
            ds_spec,
            img,
            n_ds,
            4 if args.quick else 8,
            args.device,
            log=lambda s: print(s, flush=True),
            dtype=args.dtype,
        )
    wall = time.perf_counter() - t0
    with contextlib.suppress(OSError):
        info["load average at end (1/5/15 min)"] = "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    info.update(fused_route(args.device, after=True))  # a kernel that failed during the run says so in the table
    print()
    print("\n".join(md_table(TABLE_COLUMNS, table_rows(results))))
    targets = evaluate_targets(results, dataset, args.device)
    if targets:
        print()
        print("\n".join(md_table(["target", "model", "measured", ""], targets)))
    write_report(args.out, render_markdown(results, info, args, image_desc, wall, dataset))
    print(f"\nwrote {args.out} ({wall / 60:.1f} min)")
    return 0
