"""Kernel launches per call, counted on the CPU: ``python -m benchmarks.launches``.

On a GPU at batch 1, a ViT's bare forward and vizapp's additions are bound by kernel launches and Python, not by
arithmetic (docs/gpu.md: 493 kernel launches per ViT-B analysis in run 2, each costing host time). The GPU rows of
issue 23 (analyze, class maps) are therefore mostly a count of launches, and that count does not need a GPU: the
model runs on the simulated GPU of ``tests/devicesim.py`` (CPU tensors that say ``cuda:0``), and every ATen operator
that computes (not a view, not an allocation) on such a tensor is one or more kernels on a real one: an operator
counts as the device's when the torch function that dispatched it was called on the device, since the tensors a
composite operator makes inside C++ (a 3-D matmul's reshapes) no longer carry the simulated device. Operators on
host tensors alone are counted apart (CPU work on a GPU machine, no launch). This script counts them per call with
``TorchDispatchMode`` and says where in vizapp the kernels come from, so that a change that cuts launches shows here
without a GPU. Counts are exact and repeatable; time is not measured (but for the host ops' own time, below).

Calls, each for the astronaut photo and random weights:

- bare: preprocessing and a forward under ``no_grad`` (the model's own fused attention);
- analyze: ``vizapp.analyze(vm, image)``;
- class maps: ``analyze(gradients=True)`` then ``relevance`` and ``grad_rollout`` of one class (the class-map
  benchmark's path);
- class maps, analyze() first: ``analyze(vm, image)`` then the same two maps, the app's path: the analysis keeps no
  autograd graph, so the maps run a forward and a backward (:mod:`vizapp.gradient_pass`);
- batch analyze: ``vizapp.analyze(vm, 16 images)`` against the same bare forward;
- batch class maps: ``vizapp.explain(vm, 16 images, ["relevance", "grad_rollout"])`` against a bare forward of the 16;
- with ``--evaluation``, evaluation: ``Evaluator.evaluate_batch`` of the 16 images as ``benchmarks.evaluation`` runs
  it (every method but flow, the authors' protocol, no curves): its maps, and the forwards of its perturbed copies.

On a GPU, vizapp replays some of this work as CUDA graphs (:mod:`vizapp.cudagraph`): the weights digest, an analysis's
device pass (one image, or a batch shape met before, within ``limits.GRAPH_MEMORY_BYTES``), one image's gradient passes.
The simulated GPU takes the same route: vizapp decides what to record as it would on a GPU, and :class:`StandInGraph`,
in place of :class:`~vizapp.cudagraph.GraphedPass`, runs a "replay" eagerly, counting its kernels as the graph's (one
launch on a GPU). The "outside graphs" column counts the rest: what a GPU still launches one by one (but for the
copies out of a graph's memory after a replay: one storage copy per block, which the counter does not see). Each call
is counted the second time it runs, after one that warms the caches (and records the graphs).

It also sums, per call, the device's work (the FLOPs of its matrix products and attention, with their float64 share,
and the bytes its operators read and write) and counts the host's waits for the device, which with the launches
bound a GPU's time from below without a GPU; the host ops' own time is the one thing timed.

Writes docs/benchmarks-launches.md.
"""

from __future__ import annotations

import collections
import contextlib
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry, sdpa_flop_count

import vizapp
from benchmarks import tables
from benchmarks.bench.specs import parse_spec
from tests import devicesim
from tests.devicesim import OnDevice, is_device_call, simulated_gpu

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

_replaying = [0]
"""Depth of :meth:`StandInGraph.run` calls: their kernels are a graph's."""

_counting: list[Counter] = []
"""The counters entered, innermost last (:func:`stand_in_kernels` adds to the innermost)."""


class StandInGraph:
    """Stands in for :class:`vizapp.cudagraph.GraphedPass` on the simulated GPU (or the CPU): recording does nothing; a
    replay runs ``fn`` on the input it is given, both counted as the graph's, and hands out copies on the host of what
    ``stage`` picks, as a replay does."""

    def __init__(self, fn: Callable[[Any], Any], example: Any, stage: Any = None, keep: Any = None) -> None:
        self.fn, self.stage = fn, stage
        self.input = example

    @contextlib.contextmanager
    def run(
        self, x: Any, meanwhile: Callable[[], Any] | None = None
    ) -> Iterator[tuple[Any, list[torch.Tensor] | None]]:
        _replaying[0] += 1
        try:
            out = self.fn(x)
        finally:
            _replaying[0] -= 1
        if meanwhile is not None:  # host work between the replay and its synchronisation, as GraphedPass.run
            meanwhile()
        staged = None
        if self.stage is not None:  # the graph's own copies into pinned memory (no wait), then one synchronisation
            _replaying[0] += 1
            try:
                staged = [t.detach().float().to("cpu", non_blocking=True).clone() for t in self.stage(out)]
            finally:
                _replaying[0] -= 1
            devicesim.waited("a replayed graph's synchronisation")
        yield out, staged


def stand_in_kernels(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    rows: dict[str, torch.Tensor],
    dist: torch.Tensor | None = None,
    num_prefix_tokens: int = 0,
    head_sum: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Stands in for :func:`vizapp.fused_attention.attention` on the simulated GPU (Triton's interpreter would take
    minutes a layer at 1,374 tokens): the same results, computed by torch with the counter suspended, counted as the
    two kernels they are on a GPU. Each kernel's bytes are its inputs and outputs once each, as for an operator (the
    rows kernel: q, k, v, the bias if any, the output, each row's maximum and normaliser, the statistics' rows and the
    distances it reads; the head-sum kernel: q, k, the bias, the maxima and normalisers, the sum); its FLOPs those of
    its matrix products (q kᵀ and A·v; q kᵀ again), by torch's FLOP counter's rule of 2 per multiply-add."""
    from torch.utils._python_dispatch import _disable_current_modes

    p = num_prefix_tokens
    with torch.no_grad(), _disable_current_modes():
        scores = (q.float() @ k.float().transpose(-1, -2)) * scale
        a = torch.softmax(scores if bias is None else scores + bias.float(), dim=-1)  # [B, H, N, N]
        out = (a @ v.float()).to(v.dtype)
        if "entropy" in rows:
            rows["entropy"].copy_(torch.special.entr(a).sum(-1))
        if "distance" in rows:
            patches = a[:, :, p:, p:]
            tiny = torch.finfo(torch.float32).tiny
            rows["distance"].copy_((patches * dist).sum(-1) / patches.sum(-1).clamp_min(tiny))
        if head_sum is not None:
            head_sum.copy_(a.sum(1))
    b, h, n, d = q.shape

    def size(*ts: torch.Tensor | None) -> int:
        return sum(t.numel() * t.element_size() for t in ts if t is not None)

    maxima = 2 * b * h * n * 4  # each row's maximum and normaliser, float32
    product = 2 * b * h * n * n * d  # one [N, d] x [d, N] (or [N, N] x [N, d]) per image and head
    if _counting:
        where = "fused_attention.py"
        read = dist if "distance" in rows else None
        _counting[-1].kernel(size(q, k, v, bias, out, read, *rows.values()) + maxima, 2 * product, where)
        if head_sum is not None:
            _counting[-1].kernel(size(q, k, bias, head_sum) + maxima, product, where)
    return out


@contextlib.contextmanager
def fused_kernels() -> Iterator[None]:
    """vizapp's fused attention kernels on (:mod:`vizapp.fused_attention`), stood in for (:func:`stand_in_kernels`)."""
    from vizapp import fused_attention

    with (
        mock.patch.object(fused_attention, "usable", lambda device: True),
        mock.patch.object(fused_attention, "attention", stand_in_kernels),
    ):
        yield


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


class _DeviceCalls(TorchFunctionMode):
    """Says, while a torch function runs, whether it runs on the simulated GPU (:func:`tests.devicesim.is_device_call`):
    an operator it dispatches is then the device's even when none of its tensors is an :class:`OnDevice` there, as
    for the tensors a composite operator makes inside C++ (a 3-D matmul's reshapes and ``mm``) or a dtype cast on the
    device, which :class:`OnDevice` only wraps once it returns."""

    def __init__(self) -> None:
        super().__init__()
        self.on_device = False

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        outer, self.on_device = self.on_device, is_device_call(func, args, kwargs)
        try:
            return func(*args, **kwargs)
        finally:
            self.on_device = outer


def _cpu_attention_flops(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any) -> int:
    """The CPU's fused attention (``_scaled_dot_product_flash_attention_for_cpu``, which the simulated GPU's SDPA
    dispatches to) counted as torch's rule counts a GPU's: q kᵀ and A·v."""
    return sdpa_flop_count(query.shape, key.shape, value.shape)


def _flop_rule(packet: Any, name: str) -> Callable[..., int] | None:
    """torch's FLOP counter's rule for an operator, an in-place one's (``baddbmm_``: the attention's scores) being its
    functional form's, whose arguments it takes (the registry has only the functional forms); the CPU's fused
    attention has a GPU's (the registry has only the GPU's kernels)."""
    if name == "aten._scaled_dot_product_flash_attention_for_cpu":
        return _cpu_attention_flops
    rule = flop_registry.get(packet)
    if rule is None and name.endswith("_"):
        functional = getattr(torch.ops.aten, name.rsplit(".", 1)[-1][:-1], None)
        rule = flop_registry.get(functional) if functional is not None else None
    return rule


class Counter(TorchDispatchMode):
    """Counts the computing operators dispatched inside it: on the device (``kernels``: called by a torch function on
    the simulated GPU, one of whose tensors is an :class:`OnDevice` or which names the device, or run by a backward;
    outside :func:`simulated_gpu` no tensor is an :class:`OnDevice`) and on the host (``host``), the views and
    allocations (``other``), and the kernels per vizapp source file (``by_source``)."""

    def __init__(self) -> None:
        super().__init__()
        self._calls = _DeviceCalls()
        self.kernels = 0
        self.host = 0
        self.other = 0
        self.by_source: collections.Counter[str] = collections.Counter()
        self.in_graphs = 0  # kernels of a replayed graph (:class:`StandInGraph`)
        self.outside: collections.Counter[str] = collections.Counter()  # by source, the kernels outside graphs
        self.host_seconds = 0.0  # the host ops' own time on this CPU (CPU work on a GPU machine too)
        self.flops = 0  # of the device's matrix products, convolutions and attention (torch's FLOP counter's rules)
        self.flops64 = 0  # the part of them in float64
        self.bytes = 0  # read and written by the device's computing operators (inputs and outputs, once each)
        self.waits: collections.Counter[str] = collections.Counter()  # waits for the device, by source
        self.why: collections.Counter[str] = collections.Counter()  # and by kind (:data:`tests.devicesim.WAITS`)
        self._recording = devicesim.recording(self)

    def copied(self, t: torch.Tensor) -> None:
        """A copy to the host (:func:`tests.devicesim.recording`): a kernel already counted as the device's."""

    def waited(self, why: str) -> None:
        """The host waited for the device (:func:`tests.devicesim.recording`)."""
        self.waits[source(traceback.extract_stack())] += 1
        self.why[why] += 1

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        name = str(func.overloadpacket)
        start = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        took = time.perf_counter() - start
        if getattr(func, "is_view", False) or name in NO_KERNEL:
            self.other += 1
            return out
        tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
        wrapped = name == "aten.scalar_tensor" and not isinstance(out, OnDevice)
        if wrapped or (
            not self._calls.on_device
            and torch._C._current_autograd_node() is None
            and not any(isinstance(t, OnDevice) for t in tensors)
        ):  # a backward's kernels (its gradients are plain tensors here) run where its forward ran: on the device;
            # a Python number torch wraps as a 0-d host tensor (torch.where(c, x, 0.0)) is an argument of the
            # device's kernel, not a launch
            self.host += 1
            self.host_seconds += took
        else:
            self.kernels += 1
            self.bytes += sum(t.numel() * t.element_size() for t in tensors)
            rule = _flop_rule(func.overloadpacket, name)
            if rule is not None:
                n = int(rule(*args, **(kwargs or {}), out_val=out))
                self.flops += n
                self.flops64 += n if any(t.dtype == torch.float64 for t in tensors) else 0
            where = source(traceback.extract_stack())
            self.by_source[where] += 1
            if _replaying[0] > 0:
                self.in_graphs += 1
            else:
                self.outside[where] += 1
        return out

    def kernel(self, nbytes: int, flops: int, where: str) -> None:
        """One kernel launched outside ATen (vizapp's Triton kernels, see :func:`stand_in_kernels`), reading and
        writing ``nbytes`` and computing ``flops``: the device's, as an operator's would be."""
        self.kernels += 1
        self.bytes += nbytes
        self.flops += flops
        self.by_source[where] += 1
        if _replaying[0] > 0:
            self.in_graphs += 1
        else:
            self.outside[where] += 1

    def __enter__(self) -> Counter:
        self._recording.__enter__()
        self._calls.__enter__()
        _counting.append(self)
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        _counting.remove(self)
        try:
            super().__exit__(*exc)
        finally:
            try:
                self._calls.__exit__(*exc)
            finally:
                self._recording.__exit__(*exc)


def count(fn: Callable[[], object]) -> Counter:
    """The counts of one call of ``fn``, after one call that warms its caches."""
    fn()
    c = Counter()
    with c:
        fn()
    return c


def calls(vm: Any, batch: int, evaluator: Any = None) -> dict[str, Callable[[], object]]:
    """The measured calls (see the module docstring); with ``evaluator`` (an :class:`Evaluator` of ``vm``), also its
    batch of the ``batch`` images."""
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

    found = {
        "bare": bare,
        "analyze": lambda: vizapp.analyze(vm, img),
        "class maps": lambda: class_maps(True),
        "class maps, analyze() first": lambda: class_maps(False),
        f"bare, {batch} images": bare_batch,
        f"batch analyze, {batch} images": lambda: vizapp.analyze(vm, images),
        f"batch class maps, {batch} images": lambda: vizapp.explain(vm, images, ["relevance", "grad_rollout"], 1),
    }
    for name in ("analyze", f"batch analyze, {batch} images"):
        found[f"{name}, fused kernels"] = _with_fused_kernels(found[name])
    if evaluator is not None:
        items = [{"id": f"astronaut/{i}", "source": "astronaut", "target": -1} for i in range(batch)]
        pixels = [np.asarray(i.convert("RGB")) for i in images]
        found[f"evaluation, {batch} images"] = lambda: evaluator.evaluate_batch(items, pixels)
    return found


def _with_fused_kernels(call: Callable[[], object]) -> Callable[[], object]:
    def run() -> object:
        with fused_kernels():
            return call()

    return run


def measure(
    model: str, batch: int, evaluation: bool = False, only: Sequence[str] | None = None
) -> list[tuple[str, Counter]]:
    """Each call's counts, the model on the simulated GPU, its CUDA graphs stood in for (see the module docstring);
    ``evaluation`` adds the evaluation's batch; ``only``: those calls alone (the first of them is the rows' "bare").
    ``model`` may be a ``name@key=value,...`` spec (:func:`benchmarks.bench.specs.parse_spec`)."""
    from benchmarks.evaluation import default_methods
    from vizapp import cudagraph, limits
    from vizapp.evaluate.worker import Evaluator

    ev = None
    if evaluation:  # as the evaluation's benchmark runs it: every method but flow, the authors' protocol, no curves
        ev = Evaluator(  # built on the CPU, run on the simulated GPU: a GPU's copies per forward
            model,
            default_methods(),
            steps=0,
            pretrained=False,
            device="cpu",
            threads=torch.get_num_threads(),
            batch_size=limits.PERTURBATION_BATCH_GPU,
        )
        vm = ev.vm
    else:
        vm = parse_spec(model).load("cpu")
    with simulated_gpu(vm), mock.patch.object(cudagraph, "GraphedPass", StandInGraph):
        with mock.patch.dict("os.environ", {"VIZAPP_CUDA_GRAPHS": "1"}):  # the simulated GPU turns them off
            found = calls(vm, batch, ev)
            unknown = [name for name in only or () if name not in found]
            if unknown:
                raise SystemExit(f"no call named {unknown}; the calls: {list(found)}")
            return [(name, count(found[name])) for name in (only or found)]


def markdown(results: dict[str, list[tuple[str, Counter]]], argv: list[str]) -> list[str]:
    lines = [
        "# Kernel launches per call",
        "",
        f"Generated by `{' '.join(['python -m benchmarks.launches', *argv])}` (CPU, random weights, skimage's "
        "astronaut); edit the code, not this file.",
        "",
        "Kernels: ATen operators that compute on the (simulated) GPU, each one or more kernel launches on a real "
        "one (those of a torch function called on the device, including the operators a composite one such as a "
        "3-D matmul dispatches inside, and copies to and from the device); host ops: those on host tensors alone "
        "(CPU work there); views and allocations are left out. x bare: "
        "against the bare forward of the same batch. Outside graphs: what a GPU still launches one by one, vizapp's "
        "CUDA graphs each one replay (the weights digest; an analysis's device pass, of one image or of a batch shape "
        "met before, within `limits.GRAPH_MEMORY_BYTES`; one image's gradient passes, `gradient_pass._passes`), "
        "counted here as the simulated GPU takes vizapp's own route with a stand-in for each graph; the copies out of "
        "a graph's memory after a replay (one storage copy per block, which the counter does not see) are not "
        "counted. Sources: the innermost vizapp file of each kernel's call stack (the backward's kernels count "
        "where `autograd.grad` was called). Only the calling thread is seen: the batch API preprocesses a list's "
        "images on a thread pool, so its host ops leave them out (the bare batch rows preprocess on the caller's "
        "thread). Evaluation (`--evaluation`): `Evaluator.evaluate_batch` of the same images, every method but flow, "
        "the authors' protocol, no curves; its x bare is against one bare forward of the batch, while it classifies "
        "every perturbed copy too (2 directions x 9 steps of each map, in forwards of 256). Waits: the times the host "
        "waits for the device (a blocking copy to the host; a blocking copy from the host to the device, after which "
        "torch synchronises the stream: `x.to(device)`, `torch.tensor(data, device=...)`, indexing a device tensor "
        "with a list; a scalar read such as `.item()` or `bool()`, an operation whose output shape depends on the "
        "values, such as `nonzero` or a boolean mask; a replayed graph that stages results on the host, once), each "
        "a point where a GPU's queue drains and the device idles until the host launches again; by source, with "
        "the kinds over all sources. Device work: the FLOPs of the device's matrix "
        "products, convolutions and attention (torch's FLOP counter's rules; elementwise work is not counted), with "
        "the float64 share, and the bytes its computing operators read and write (each input and output once, so "
        "an upper bound on the memory traffic of fused kernels), which bound the device's time from below at a "
        "GPU's rates. Host ops ms: the host ops' own time in this one run on this CPU (the only timing here; on a GPU "
        "machine they are CPU work too, while the device may idle).",
        "",
        "| model | call | kernels | x bare | outside graphs | host ops | views and allocations "
        "| top sources (kernels) | top sources outside graphs | waits | top sources of waits (kinds) "
        "| device GFLOP (float64) | device GB | host ops ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for model, rows in results.items():
        bare = {1: rows[0][1].kernels}
        for name, c in rows:
            if name.startswith("bare, "):
                bare[2] = c.kernels
            base = bare.get(2, bare[1]) if " images" in name else bare[1]
            outside = c.kernels - c.in_graphs
            top, top_out, top_waits = (
                ", ".join(f"{k} {v}" for k, v in n.most_common(5)) for n in (c.by_source, c.outside, c.waits)
            )
            kinds = ", ".join(f"{k} {v}" for k, v in c.why.most_common())
            waits = f"{top_waits} ({kinds})" if kinds else ""
            cells = [model, name, c.kernels, f"{c.kernels / base:.1f}", outside, c.host, c.other, top, top_out]
            cells += [
                sum(c.waits.values()),
                waits,
                f"{c.flops / 1e9:.1f} ({c.flops64 / 1e9:.1f})",
                f"{c.bytes / 1e9:.2f}",
                f"{1e3 * c.host_seconds:.0f}",
            ]
            lines.append("| " + " | ".join(str(v) for v in cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = tables.parser(__doc__, list(MODELS))
    p.add_argument("--batch", type=int, default=16, help="images of the batch rows")
    p.add_argument("--evaluation", action="store_true", help="also the evaluation's batch (minutes a model on the CPU)")
    p.add_argument("--calls", nargs="+", help="only these calls, by name (the first is the rows' bare forward)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = {model: measure(model, args.batch, args.evaluation, args.calls) for model in args.models}
    given = list(sys.argv[1:] if argv is None else argv)
    tables.emit(markdown(results, [a for a in given if not a.startswith("--out") and a != args.out]), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
