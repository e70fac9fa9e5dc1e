"""What head importance costs, in bare forwards: one forward, exact ablation of every head, the gradient estimate.

Usage: python benchmarks/ablation_cost.py [--model vit_base_patch16_224] [--threads 2] [--repeats 5] [--path auto]

``--path capture`` times the generic path (L forwards of H copies, every family) on a timm ViT, ``reuse`` (the
default there) the block re-run from cached inputs.

Random weights (pretrained=False), CPU, no downloads. Prints median wall-clock times and their ratios to one bare
forward; the targets are exact <= 80 forwards (H·(L+1)/2 = 78 for ViT-B/16) and gradient <= 4.

Measured 2026-11-28 on a shared 2-core machine (load average 8-11, so read the CPU-time columns):
ViT-B/16, 1 thread: forward 0.341 CPU s; exact 23.1 CPU s = 67.8 forwards; gradient 0.82 CPU s = 2.4 forwards.
ViT-B/16, 2 threads: forward 1.46 CPU s (inflated by thread contention); exact 21.4 forwards; gradient 1.8 forwards.
The exact method needs fewer than H·(L+1)/2 forwards' time because it runs H copies per batch.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import vizapp  # noqa: E402
from vizapp.ablation import exact_forward_passes, head_importance, rank_correlation, reuses_blocks  # noqa: E402


def median_time(
    fn: Callable[[], object], repeats: int, warmup: bool = True, sync: Callable[[], None] = lambda: None
) -> tuple[float, float, object]:
    """Median (wall-clock, process CPU) seconds of ``repeats`` calls (after a warm-up call), and the last result.

    CPU time (all threads of this process) is much less sensitive than wall-clock time to other processes sharing
    the cores, so on a loaded machine its ratios are the ones to read. ``sync`` waits for the device around each
    call (``VizModel.synchronize``), so that GPU timings include the queued work.
    """
    if warmup:
        fn()
    wall, cpu = [], []
    result = None
    for _ in range(repeats):
        sync()
        w0, c0 = time.perf_counter(), time.process_time()
        result = fn()
        sync()
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu), result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="repeats of the forward and the gradient estimate")
    parser.add_argument("--path", default="auto", choices=("auto", "reuse", "capture"), help="head_importance's path")
    parser.add_argument("--exact-repeats", type=int, default=1, help="repeats of the exact ablation")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    vm = vizapp.load_model(args.model, pretrained=False, device=args.device)
    x = vm.transform(_sample_image(vm)).unsqueeze(0).to(vm.device)
    num_layers, num_heads = vm.num_layers, vm.num_heads

    def forward() -> None:
        with torch.no_grad():
            vm.model(x)

    *t_fwd, _ = median_time(forward, args.repeats, sync=vm.synchronize)
    *t_grad, grad = median_time(
        lambda: head_importance(vm, x[0], method="gradient", path=args.path).drop, args.repeats, sync=vm.synchronize
    )
    # the forwards above warmed the model up; the exact run is long enough not to need its own warm-up
    *t_exact, exact = median_time(
        lambda: head_importance(vm, x[0], method="exact", path=args.path).drop,
        args.exact_repeats,
        False,
        sync=vm.synchronize,
    )

    print(f"model {args.model} (random weights), {num_layers} layers x {num_heads} heads = {num_layers * num_heads}")
    print(
        f"{args.device}, {args.threads} CPU threads, torch {torch.__version__}; medians of {args.repeats} ({args.exact_repeats} exact)"
    )
    print(f"{'what':<28}{'wall s':>9}{'forwards':>10}{'CPU s':>9}{'forwards':>10}{'target':>8}")
    for what, (wall, cpu), target in [
        ("one bare forward", t_fwd, ""),
        ("exact ablation, all heads", t_exact, "<= 80"),
        ("gradient estimate", t_grad, "<= 4"),
    ]:
        print(f"{what:<28}{wall:>9.3f}{wall / t_fwd[0]:>10.1f}{cpu:>9.3f}{cpu / t_fwd[1]:>10.1f}{target:>8}")
    reuse = args.path == "reuse" or (args.path == "auto" and reuses_blocks(vm.model))
    formula = "H(L+1)/2" if reuse else "L·H"
    print(
        f"predicted exact cost ({'reuse' if reuse else 'capture'} path) {formula} = "
        f"{exact_forward_passes(num_layers, num_heads, reuse):.0f} forwards"
    )
    print(f"Spearman(exact, gradient) = {rank_correlation(exact, grad):.3f} (random weights: not a quality measure)")


def _sample_image(vm: vizapp.models.VizModel):
    """A fixed random image at the model's input size (no files, no network)."""
    import numpy as np
    from PIL import Image

    _, h, w = vm.input_size
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


if __name__ == "__main__":
    main()
