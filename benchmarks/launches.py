"""Kernel launches per call, counted on the CPU: ``python -m benchmarks.launches``.

On a GPU at batch 1, a ViT's bare forward and vizapp's additions are bound by kernel launches and Python, not by
arithmetic (docs/gpu.md: 493 kernel launches per ViT-B analysis in run 2, each costing host time). The GPU rows of
issue 23 (analyze, class maps) are therefore mostly a count of launches, and that count does not need a GPU: the
model runs on the simulated GPU of ``tests/devicesim.py`` (CPU tensors that say ``cuda:0``), and every ATen operator
that computes (not a view, not an allocation) on such a tensor is one or more kernels on a real one. Operators on
host tensors alone are counted apart (CPU work on a GPU machine, no launch). This script counts them per call with
``TorchDispatchMode`` and says where in vizapp the kernels come from, so that a change that cuts launches shows here
without a GPU. Counts are exact and repeatable; time is not measured.

Calls, each for the astronaut photo and random weights:

- bare: preprocessing and a forward under ``no_grad`` (the model's own fused attention);
- analyze: ``vizapp.analyze(vm, image)``. On a GPU its forward and the weights digest each run as a CUDA graph, one
  replay instead of their launches (:mod:`vizapp.cudagraph`); the "outside graphs" column counts what remains;
- class maps: ``analyze(gradients=True)`` then ``relevance`` and ``grad_rollout`` of one class (the class-map
  benchmark's path; only the digest is graphed: the analysis keeps its autograd graph);
- class maps, analyze() first: ``analyze(vm, image)`` then the same two maps, the app's path: the analysis keeps no
  autograd graph, so the maps run a forward and a backward (:mod:`vizapp.gradient_pass`), which a GPU replays as one
  CUDA graph while its estimate fits ``limits.GRAPH_MEMORY_BYTES``, as it does the analysis's device pass;
- batch analyze: ``vizapp.analyze(vm, 16 images)`` against the same bare forward (on a GPU its device pass is a CUDA
  graph from the second call of a batch shape, while the batch's record fits ``limits.GRAPH_MEMORY_BYTES``);
- batch class maps: ``vizapp.explain(vm, 16 images, ["relevance", "grad_rollout"])`` against a bare forward of the 16.

Writes docs/benchmarks-launches.md.
"""

from __future__ import annotations

import collections
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import vizapp
from benchmarks import tables
from tests.devicesim import OnDevice, simulated_gpu

OUT = Path(__file__).resolve().parents[1] / "docs" / "benchmarks-launches.md"
MODELS = ("vit_small_patch16_224", "vit_base_patch16_224")

NO_KERNEL = {
    "aten.empty",
    "aten.empty_strided",
    "aten.empty_like",
    "aten._unsafe_view",
    "aten.lift_fresh",
    "aten.detach",
    "aten.alias",
    "aten.set_",
    "aten.resize_",
    "aten.sym_size",
    "aten.sym_stride",
    "aten.sym_numel",
    "aten.is_same_size",
}
"""Operators that allocate or describe memory but launch no kernel (besides every view operator)."""

DEVICE_PASS = ("pipeline.py", "_device_pass")
"""The device pass of an analysis (the model's forward with the capture, its statistics and the kept results), which
a GPU analysis of one image without gradients replays as one CUDA graph."""

DIGEST = "models/digest.py"
"""The weights digest, which a GPU replays as a CUDA graph in every analysis."""

GRADIENT_PASSES = ("gradient_pass.py", "_passes")
"""The forward and backward a class map of ``analyze()``'s result runs, which a GPU replays as one CUDA graph."""


def _vizapp_file(frame: traceback.FrameSummary) -> str | None:
    name = frame.filename.replace("\\", "/")
    return name.rsplit("/vizapp/", 1)[1] if "/vizapp/" in name else None


def source(stack: list[traceback.FrameSummary]) -> str:
    """The vizapp file (relative to the package) of the innermost vizapp frame of ``stack``, else "other"."""
    for frame in reversed(stack):
        found = _vizapp_file(frame)
        if found is not None:
            return found
    return "other"


def within(stack: list[traceback.FrameSummary], file: str, function: str | None = None) -> bool:
    """Whether some frame of ``stack`` runs in vizapp's ``file`` (and in ``function``, when given)."""
    return any(_vizapp_file(f) == file and function in (None, f.name) for f in stack)


class Counter(TorchDispatchMode):
    """Counts the computing operators dispatched inside it: on the device (``kernels``: a tensor of theirs is on the
    simulated GPU, :class:`OnDevice`; outside :func:`simulated_gpu` none is) and on the host (``host``), the views and
    allocations (``other``), and the kernels per vizapp source file (``by_source``)."""

    def __init__(self) -> None:
        super().__init__()
        self.kernels = 0
        self.host = 0
        self.other = 0
        self.by_source: collections.Counter[str] = collections.Counter()
        self.digest = 0
        self.device_pass = 0
        self.gradient_passes = 0
        self.graphed = False  # a GPU replays the device pass as one CUDA graph (set by measure)
        self.gradients_graphed = False  # and the gradient passes (set by measure)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        name = str(func.overloadpacket)
        out = func(*args, **(kwargs or {}))
        if getattr(func, "is_view", False) or name in NO_KERNEL:
            self.other += 1
        elif torch._C._current_autograd_node() is None and not any(
            isinstance(t, OnDevice) for t in tree_flatten((args, kwargs, out))[0]
        ):  # a backward's kernels (its gradients are plain tensors here) run where its forward ran: on the device
            self.host += 1
        else:
            self.kernels += 1
            stack = traceback.extract_stack()
            self.by_source[source(stack)] += 1
            in_digest = within(stack, DIGEST)
            self.digest += in_digest
            self.device_pass += not in_digest and within(stack, *DEVICE_PASS)
            self.gradient_passes += within(stack, *GRADIENT_PASSES)
        return out


def count(fn: Callable[[], object]) -> Counter:
    """The counts of one call of ``fn``, after one call that warms its caches."""
    fn()
    c = Counter()
    with c:
        fn()
    return c


def calls(vm: Any, batch: int) -> dict[str, Callable[[], object]]:
    """The measured calls (see the module docstring)."""
    img = tables.photo()
    images = [img.rotate(15 * i) for i in range(batch)]

    def inputs(imgs: list) -> torch.Tensor:
        x = torch.stack([(t[0] if t.dim() == 4 else t) for t in (vm.transform(i) for i in imgs)])
        return x.to(vm.device)

    def bare() -> None:
        with torch.no_grad():
            vm.logits(inputs([img]))

    def bare_batch() -> None:
        with torch.no_grad():
            vm.logits(inputs(images))

    def class_maps(gradients: bool) -> None:
        r = vizapp.analyze(vm, img, gradients=gradients)
        r.relevance(1)
        r.grad_rollout(1)

    return {
        "bare": bare,
        "analyze": lambda: vizapp.analyze(vm, img),
        "class maps": lambda: class_maps(True),
        "class maps, analyze() first": lambda: class_maps(False),
        f"bare, {batch} images": bare_batch,
        f"batch analyze, {batch} images": lambda: vizapp.analyze(vm, images),
        f"batch class maps, {batch} images": lambda: vizapp.explain(vm, images, ["relevance", "grad_rollout"], 1),
    }


def measure(model: str, batch: int) -> list[tuple[str, Counter]]:
    """Each call's counts, the model on the simulated GPU; ``graphed`` says whether a GPU replays the call's device
    pass as a CUDA graph (analyze of one image, and of a batch whose record fits ``limits.GRAPH_MEMORY_BYTES``: the
    counted call is the second of its shape)."""
    from vizapp import gradient_pass, limits, pipeline

    vm = vizapp.load_model(model, pretrained=False)
    setup = pipeline._PassSetup.of(vm, vm.grid_size, inline=True, gradients=False)
    with simulated_gpu(vm):
        rows = [(name, count(fn)) for name, fn in calls(vm, batch).items()]
    x = torch.zeros(1, 3, *vm.input_size[-2:])
    for name, c in rows:
        images = batch if name.startswith("batch analyze") else 1
        c.graphed = name in ("analyze", "class maps, analyze() first", f"batch analyze, {batch} images") and (
            setup.graph_bytes(vm, images) <= limits.GRAPH_MEMORY_BYTES
        )
        c.gradients_graphed = gradient_pass.graph_memory(vm, x) <= limits.GRAPH_MEMORY_BYTES
    return rows


def markdown(results: dict[str, list[tuple[str, Counter]]], argv: list[str]) -> list[str]:
    lines = [
        "# Kernel launches per call",
        "",
        f"Generated by `{' '.join(['python -m benchmarks.launches', *argv])}` (CPU, random weights, skimage's "
        "astronaut); edit the code, not this file.",
        "",
        "Kernels: ATen operators that compute on the (simulated) GPU, each one or more kernel launches on a real "
        "one; host ops: those on host tensors alone (CPU work there); views and allocations are left out. x bare: "
        "against the bare forward of the same batch. Outside graphs: what a GPU still launches one by one, where the "
        "weights digest is one CUDA graph replay in every call, and so is an analysis's device pass "
        "(`pipeline._device_pass`: the forward with the capture and its statistics) in analyze without gradients, of "
        "one image and of a batch whose shape came before (the counted call is the second) and whose record fits "
        "`limits.GRAPH_MEMORY_BYTES`, and so are the forward and backward of a class map of `analyze()`'s result "
        "(`gradient_pass._passes`); copying the large results out of a graph's memory (one copy per block) is not "
        "counted. Sources: the innermost vizapp file of each kernel's call stack (the backward's kernels count "
        "where `autograd.grad` was called). Only the calling thread is seen: the batch API preprocesses a list's "
        "images on a thread pool, so its host ops leave them out (the bare batch rows preprocess on the caller's "
        "thread).",
        "",
        "| model | call | kernels | x bare | outside graphs | host ops | views and allocations "
        "| top sources (kernels) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for model, rows in results.items():
        bare = {1: rows[0][1].kernels}
        for name, c in rows:
            if name.startswith("bare, "):
                bare[2] = c.kernels
            base = bare.get(2, bare[1]) if ", " in name else bare[1]
            outside = c.kernels - c.digest - (c.device_pass if c.graphed else 0)
            outside -= c.gradient_passes if c.gradients_graphed else 0
            top = ", ".join(f"{k} {v}" for k, v in c.by_source.most_common(5))
            cells = [model, name, c.kernels, f"{c.kernels / base:.1f}", outside, c.host, c.other, top]
            lines.append("| " + " | ".join(str(v) for v in cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = tables.parser(__doc__, list(MODELS))
    p.add_argument("--batch", type=int, default=16, help="images of the batch rows")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = {model: measure(model, args.batch) for model in args.models}
    given = list(sys.argv[1:] if argv is None else argv)
    tables.emit(markdown(results, [a for a in given if not a.startswith("--out") and a != args.out]), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
