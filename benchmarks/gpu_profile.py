"""Where ``analyze`` and the class maps spend their time on a GPU at batch 1: wall time of the forward alone, inside
the capture with a no-op consumer, and the full analysis; then the class maps split into their parts (the gradient
analysis, one further class's backward and maps, the batch API's path); for each of the two paths torch.profiler's
top operators by self CPU time, the host-device synchronisations (each one stalls the Python thread until the GPU
catches up) and the kernel launches. Then the same for ``vizapp.analyze`` of a list of ``--batch`` images, split into
preprocessing, the device pass, its copy to the host and the rest, with cProfile's Python functions.

    python -m benchmarks.gpu_profile [--model vit_base_patch16_224] [--repeats 20] [--device cuda] [--batch 16]

``--device cpu`` runs the same script on the CPU (no graph rows, no CUDA events): a check that it runs.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time
from collections.abc import Callable

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


def _median_ms(vm: vizapp.VizModel, fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        vm.synchronize()
        t0 = time.perf_counter()
        fn()
        vm.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _profiled(vm: vizapp.VizModel, what: str, fn: Callable[[], object], runs: int = 5) -> None:
    """torch.profiler over ``runs`` calls of ``fn``: the top operators, the synchronisations and launches per call."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if vm.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(runs):
            fn()
        vm.synchronize()
    events = prof.key_averages()
    print(f"\n{what}: torch.profiler over {runs} calls")
    print(events.table(sort_by="self_cpu_time_total", row_limit=30))
    sync_names = ("aten::item", "aten::_local_scalar_dense", "cudaStreamSynchronize", "cudaMemcpyAsync", "aten::to")
    for e in events:
        if e.key in sync_names or "Synchronize" in e.key:
            print(f"  per call: {e.key:<32} {e.count / runs:7.1f} calls, {e.cpu_time_total / runs / 1e3:7.2f} ms CPU")
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
    print(f"  kernel launches per call: {launches / runs:.0f}")


def _digest_forms(vm: vizapp.VizModel, repeats: int) -> list[tuple[str, float]]:
    """The device part of the digest in each of its two forms, replayed as CUDA graphs of their own: the exact int8
    checksums (the form a device that passes its check uses) and the float64 sums (the fallback), so that one run
    says what the exact form saves; and whether this device passed the check."""
    from vizapp.cudagraph import GraphCache
    from vizapp.models import digest

    params, buffers = digest.named_tensors(vm.model)
    tensors = [t for _, t in params + buffers if t.device.type == "cuda"]
    exact = digest._device_exact_ok(vm.device)
    rows = []
    for name, form in (
        (f"  device checksums, exact int8 form (this GPU passed its check: {exact})", True),
        ("  device sums, float64 form", False),
    ):
        if form and not exact:  # the exact form runs only where the device passed its check
            rows.append((name, float("nan")))
            continue
        run = functools.partial(digest.graphed_sums, tensors, GraphCache(), form)  # each form a graph of its own
        rows.append((name, _median_ms(vm, run, repeats)))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--batch", type=int, default=16, help="images of the batch section (0: none)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    vm = vizapp.load_model(args.model, pretrained=False, device=args.device)
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8))
    x = vm.transform(img)[None].to(vm.device)
    n_classes = len(vm.labels) or 1
    classes = iter(range(10**9))

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

    def class_maps() -> None:  # what benchmarks.class_maps times
        r = vizapp.analyze(vm, img, gradients=True)
        r.relevance(1 % n_classes)
        r.grad_rollout(1 % n_classes)

    plain = vizapp.analyze(vm, img)

    def rerun_class() -> None:  # the app's path: analyze() keeps no autograd graph, so a forward and a backward
        c = next(classes) % n_classes
        plain.relevance(c)
        plain.grad_rollout(c)

    def gradient_analysis() -> vizapp.Analysis:
        return vizapp.analyze(vm, img, gradients=True)

    kept = gradient_analysis()

    def another_class() -> None:  # one backward and the two maps, for a class not asked before
        c = next(classes) % n_classes
        kept.relevance(c)
        kept.grad_rollout(c)

    def batch_path() -> None:
        vizapp.explain(vm, [img], ["relevance", "grad_rollout"], classes=1 % n_classes)

    rows = [
        ("preprocessing + copy to the device", _median_ms(vm, transform, args.repeats)),
        ("bare forward", _median_ms(vm, bare, args.repeats)),
        ("forward in capture, no-op consumer, no q/k kept", _median_ms(vm, captured, args.repeats)),
        ("forward in capture, no-op consumer, q/k kept", _median_ms(vm, captured_qk, args.repeats)),
        ("analyze (preprocessing included)", _median_ms(vm, full, args.repeats)),
        ("  of which the weights fingerprint (the digest)", _median_ms(vm, vm.fingerprint, args.repeats)),
    ]
    if vm.device.type == "cuda":
        rows.append(("analyze, CUDA graphs off (preprocessing included)", _median_ms(vm, eager, args.repeats)))

        def bare_model(t: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return vm.model(t)

        bare_graph = GraphedPass(bare_model, x)  # the same forward with its launches recorded: the floor of a graph

        def bare_graphed() -> None:
            with bare_graph.run(x):
                pass  # the timer synchronises after the replay

        rows.append(("bare forward replayed as a CUDA graph", _median_ms(vm, bare_graphed, args.repeats)))
        rows += _digest_forms(vm, args.repeats)
    rows += [
        ("class maps: analyze(gradients) + relevance + grad rollout", _median_ms(vm, class_maps, args.repeats)),
        ("  of which analyze(gradients=True)", _median_ms(vm, gradient_analysis, args.repeats)),
        ("  a further class: one backward + both maps", _median_ms(vm, another_class, args.repeats)),
        ("a class of analyze()'s result: forward + backward + both maps", _median_ms(vm, rerun_class, args.repeats)),
        ("class maps by vizapp.explain, one image", _median_ms(vm, batch_path, args.repeats)),
    ]
    where = torch.cuda.get_device_name(0) if vm.device.type == "cuda" else "the CPU"
    print(f"{args.model} on {where}, batch 1, medians of {args.repeats}")
    for name, t in rows:
        print(f"  {name:<60}{t:8.2f} ms")
    _profiled(vm, "analyze", full)
    _profiled(vm, "class maps (analyze with gradients, relevance, gradient rollout)", class_maps)
    if args.batch > 1:
        _batch_rows(vm, args.batch, args.repeats)
    return 0


def _batch_rows(vm: vizapp.VizModel, b: int, repeats: int) -> None:
    """Where ``vizapp.analyze(vm, images)`` of ``b`` images spends its time (issue 23's batch row): preprocessing the
    list, the device pass alone, eager (the forward with the capture and every statistic, left on the device), the
    same with its one copy to the host, and the whole call (on a GPU a replayed graph from the second call of the
    shape, and with graphs off), against a bare batched forward; then torch.profiler's operators and cProfile's
    Python functions of the whole call."""
    import cProfile
    import pstats

    from vizapp import batch, pipeline

    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)) for _ in range(b)]
    x = torch.cat([t for t, _ in batch._inputs(vm, images)]).to(device=vm.device, dtype=vm.dtype)
    setup = pipeline._PassSetup.of(vm, vm.grid_for(x.shape[-2], x.shape[-1]), inline=True, gradients=False)

    def bare() -> None:
        with torch.no_grad():
            vm.logits(x)

    def device_pass() -> list:
        with torch.no_grad():
            return pipeline._device_pass(vm, x, setup)

    def analyze() -> None:
        vizapp.analyze(vm, images)

    rows = [
        ("preprocessing the list (decode, transform, threads)", lambda: batch._inputs(vm, images)),
        ("bare forward of the preprocessed batch", bare),
        ("device pass: forward in capture + statistics", device_pass),
        ("device pass + settle (the one copy to the host)", lambda: pipeline.settle(device_pass())),
        ("weights fingerprint (the digest)", vm.fingerprint),
        ("analyze (preprocessing included)", analyze),
        ("class maps by vizapp.explain", lambda: vizapp.explain(vm, images, ["relevance", "grad_rollout"], 1)),
    ]
    if vm.device.type == "cuda":

        def eager() -> None:
            os.environ["VIZAPP_CUDA_GRAPHS"] = "0"
            try:
                analyze()
            finally:
                os.environ.pop("VIZAPP_CUDA_GRAPHS")

        rows.insert(-1, ("analyze, CUDA graphs off (preprocessing included)", eager))
    print(f"\nbatch of {b} images (224 x 224, random), medians of {repeats}")
    for name, fn in rows:
        print(f"  {name:<60}{_median_ms(vm, fn, repeats):8.2f} ms")
    _profiled(vm, f"analyze of {b} images", analyze)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(5):
        analyze()
    vm.synchronize()
    prof.disable()
    print(f"\nanalyze of {b} images: cProfile over 5 calls, Python functions by own time")
    pstats.Stats(prof).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    raise SystemExit(main())
