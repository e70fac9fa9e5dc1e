"""Where ``analyze`` spends its time on a GPU at batch 1: wall time of the forward alone, inside the capture with a
no-op consumer, and the full analysis; then torch.profiler's top operators by self CPU time and the host-device
synchronisations (each one stalls the Python thread until the GPU catches up).

    python -m benchmarks.gpu_profile [--model vit_base_patch16_224] [--repeats 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch
from PIL import Image

import vizapp
from vizapp.capture import AttentionCapture
from vizapp.cudagraph import GraphedPass


class _Sink:
    """An attention consumer that does nothing: what the capture costs before any statistic."""

    def chunk(self, *args: object) -> None:
        pass

    def layer_done(self, layer: int) -> None:
        pass


def _median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    vm = vizapp.load_model(args.model, pretrained=False, device="cuda")
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8))
    x = vm.transform(img)[None].to(vm.device)

    def bare() -> None:
        with torch.no_grad():
            vm.model(x)

    def captured() -> None:
        with torch.no_grad(), AttentionCapture(vm.model, on_attention=_Sink(), inline=True, keep_qk=False):
            vm.model(x)

    def captured_qk() -> None:
        with torch.no_grad(), AttentionCapture(vm.model, on_attention=_Sink(), inline=True):
            vm.model(x)

    def full() -> None:
        vizapp.analyze(vm, img)

    def transform() -> None:
        vm.transform(img)[None].to(vm.device)

    def eager() -> None:
        os.environ["VIZAPP_CUDA_GRAPHS"] = "0"
        try:
            vizapp.analyze(vm, img)
        finally:
            os.environ.pop("VIZAPP_CUDA_GRAPHS")

    def bare_model(t: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return vm.model(t)

    bare_graph = GraphedPass(bare_model, x)  # the same forward with its launches recorded: the floor a graph reaches

    def bare_graphed() -> None:
        with bare_graph.run(x):
            pass  # the timer synchronises after the replay

    rows = [
        ("preprocessing + copy to GPU", _median_ms(transform, args.repeats)),
        ("bare forward", _median_ms(bare, args.repeats)),
        ("forward in capture, no-op consumer, no q/k kept", _median_ms(captured, args.repeats)),
        ("forward in capture, no-op consumer, q/k kept", _median_ms(captured_qk, args.repeats)),
        ("analyze (preprocessing included)", _median_ms(full, args.repeats)),
        ("analyze, CUDA graphs off (preprocessing included)", _median_ms(eager, args.repeats)),
        ("bare forward replayed as a CUDA graph", _median_ms(bare_graphed, args.repeats)),
    ]
    print(f"{args.model} on {torch.cuda.get_device_name(0)}, batch 1, medians of {args.repeats}")
    for name, t in rows:
        print(f"  {name:<52}{t:8.2f} ms")
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            full()
        torch.cuda.synchronize()
    events = prof.key_averages()
    print(events.table(sort_by="self_cpu_time_total", row_limit=30))
    sync_names = ("aten::item", "aten::_local_scalar_dense", "cudaStreamSynchronize", "cudaMemcpyAsync", "aten::to")
    for e in events:
        if e.key in sync_names or "Synchronize" in e.key:
            print(f"  per analyze: {e.key:<32} {e.count / 5:7.1f} calls, {e.cpu_time_total / 5 / 1e3:7.2f} ms CPU")
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
    print(f"  kernel launches per analyze: {launches / 5:.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
