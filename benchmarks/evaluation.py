"""The evaluation's rate against its floor (issue 23, "Measure"): ``python -m benchmarks.evaluation``.

For each model, B images and the methods (default every registered method but flow, plus the random baseline), the
authors' perturbation protocol (``chefer2021``; vizapp's deletion/insertion curves off, ``steps=0``), in
interleaved rounds, the medians of:

- batched: ``Evaluator.evaluate_batch`` of the B images at once (what each engine runs per batch);
- one by one: the same images evaluated one at a time (``Evaluator.evaluate``), the path before batching;
- floor: a bare batched forward (no capture, no autograd, batches of the evaluator's ``batch_size``) of as many
  inputs as the protocol classifies: the B images themselves and every perturbed copy (counted from the evaluator's
  own forwards, printed). The issue's target is batched rate >= 0.7 x the floor's rate.

Explanations need more than forwards (a backward per class for the class-specific maps, the LRP methods' float64
re-run), so the ratio says how much of the evaluation is the protocol's unavoidable forwards. Writes
docs/benchmarks-evaluation.md.
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

from benchmarks.bench.machine import device_name
from benchmarks.bench.specs import parse_spec
from vizapp.evaluate.report import fallback_causes
from vizapp.evaluate.worker import RANDOM, Evaluator

OUT = Path(__file__).resolve().parents[1] / "docs" / "benchmarks-evaluation.md"
TARGET = 0.7


def default_methods() -> list[str]:
    from vizapp import methods as registry

    return [name for name in registry.METHODS if name != "flow"] + [RANDOM]


def _images(ev: Evaluator, count: int, data: str | None) -> tuple[list[dict], list[np.ndarray]]:
    """``count`` items and their pixels: from ``data`` (a dataset name) or random images of the model's input size."""
    if data is not None:
        from vizapp.evaluate.dataset import list_items, load_pixels

        items = list_items(data, ev.labels)[:count]
        return items, [load_pixels(it) for it in items]
    rng = np.random.default_rng(0)
    _, h, w = ev.vm.input_size
    pixels = [rng.integers(0, 256, (int(h), int(w), 3), dtype=np.uint8) for _ in range(count)]
    items = [{"id": f"random/{i}", "source": "random", "target": -1} for i in range(count)]
    return items, pixels


def measure(ev: Evaluator, items: list[dict], pixels: list[np.ndarray], repeats: int) -> dict[str, float]:
    """Medians (seconds) of the batched and one-by-one evaluation and of the floor, and the copies classified."""
    classified = [0]
    real = ev.classify

    def counting(x: torch.Tensor) -> torch.Tensor:
        classified[0] += x.shape[0]
        return real(x)

    ev.classify = counting  # type: ignore[method-assign]
    rows = ev.evaluate_batch(items, pixels)  # warm-up, and the count of copies
    ev.classify = real  # type: ignore[method-assign]
    bad = [r["message"] for r in rows if r["status"] != "ok"]
    if bad:
        raise RuntimeError(f"{len(bad)} rows failed: {bad[0]}")
    needed = classified[0] + len(items)  # every copy, and each image once for its prediction
    x = torch.stack([ev._preprocess(ev_image) for ev_image in _decoded(pixels)])
    floor_x = x[torch.arange(needed) % len(items)].to(device=ev.vm.device, dtype=ev.vm.dtype)
    times: dict[str, list[float]] = {"batched": [], "one_by_one": [], "floor": []}
    for _ in range(repeats):
        for name in ("floor", "batched", "one_by_one"):
            t0 = time.perf_counter()
            if name == "batched":
                ev.evaluate_batch(items, pixels)
            elif name == "one_by_one":
                for it, px in zip(items, pixels, strict=True):
                    ev.evaluate(it, px)
            else:
                with torch.no_grad():
                    for lo in range(0, needed, ev.batch_size):
                        ev.vm.logits(floor_x[lo : lo + ev.batch_size])
            ev.vm.synchronize()
            times[name].append(time.perf_counter() - t0)
    out = {k: statistics.median(v) for k, v in times.items()}
    alone: dict[str, float] = {}  # the same phases with each image evaluated alone, summed over the images
    for it, px in zip(items, pixels, strict=True):
        for k, v in phases(ev, [it], [px]).items():
            alone[k] = alone.get(k, 0.0) + v
    return (
        out
        | {"copies": float(classified[0]), "needed": float(needed), "per_forward": float(ev.batch_size)}
        | phases(ev, items, pixels)
        | {f"alone_{k}": v for k, v in alone.items()}
    )


def fallbacks(ev: Evaluator) -> str:
    """What the evaluator's batched path did, in a sentence: never ran a batch's images again one at a time, or where
    and why it did (:attr:`Evaluator.fallbacks`, with the code each cause was raised in; every timed row above is then
    partly one image at a time, and the log above has each cause's traceback); and
    on a GPU, which CUDA graphs could not be recorded and ran eagerly (:meth:`vizapp.models.VizModel.graph_failures`)."""
    failed = ev.vm.graph_failures()  # a CUDA graph that could not be recorded runs eagerly
    graphs = f"; CUDA graphs that fell back to eager passes: {'; '.join(failed)}" if failed else ""
    if not ev.fallbacks:
        return "never fell back to one image at a time" + graphs
    n = sum(ev.fallbacks.values())
    return (
        f"FELL BACK to one image at a time {'once' if n == 1 else f'{n} times'}: "
        + fallback_causes(ev.fallbacks, ev.fallback_sites)
        + graphs
    )


PHASES = ("statistics", "maps", "forming", "classifying")
"""Where one batched evaluation's time goes: the statistics forward, every method's maps (their forwards, backwards
and relevance passes), forming the perturbed copies (masks and copies), and classifying them."""


GRAPH_MAPS = "the attention graph's maps"
"""The by-method table's column of :mod:`vizapp.graph_maps`' route: one forward with the attention in the graph, its
backwards (one per class kind) and the maps it gives (rollout, the CLS attention, gradient rollout, relevance), for
the group at once."""
REST_OF_MAPS = "the analysis forward, its backwards and the rest"
"""The maps phase less every column before it: on the analysis route its forward and backwards, and the Python of
the phase."""


def phases(ev: Evaluator, items: list[dict], pixels: list[np.ndarray]) -> dict[str, float]:
    """Seconds of each of :data:`PHASES` in one more batched evaluation (each timer waits for the device), and
    ``rest``: what none of them covers (decoding, preprocessing, rows)."""
    from vizapp.evaluate import scores

    spent = dict.fromkeys(PHASES, 0.0)
    by_method: dict[str, float] = {}  # the maps phase's time in each method's own calls
    saved = {"_statistics": ev._statistics, "classify": ev.classify, "explain": ev.explain}
    saved_scores = {
        "_maps": scores._maps,
        "_classified": scores._classified,
        "_own_run_maps": scores._own_run_maps,
        "_graph_maps": scores._graph_maps,
    }

    def timed(table: dict[str, float], name_of: Callable[..., str], fn):  # noqa: ANN202 - a wrapper of any signature
        """``fn`` timed (waiting for the device before and after) into ``table[name_of(*its arguments)]``."""

        def run(*args, **kwargs):  # noqa: ANN202
            ev.vm.synchronize()
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                ev.vm.synchronize()
                name = name_of(*args, **kwargs)
                table[name] = table.get(name, 0.0) + time.perf_counter() - t0

        return run

    def phase(name: str) -> Callable[..., str]:
        return lambda *a, **k: name

    ev._statistics = timed(spent, phase("statistics"), saved["_statistics"])  # type: ignore[method-assign]
    ev.classify = timed(spent, phase("classifying"), saved["classify"])  # type: ignore[method-assign]
    ev.explain = timed(by_method, lambda r, name, *a, **k: name, saved["explain"])  # type: ignore[method-assign]
    scores._maps = timed(spent, phase("maps"), saved_scores["_maps"])
    scores._classified = timed(spent, phase("forming"), saved_scores["_classified"])  # less classifying, below
    scores._own_run_maps = timed(by_method, lambda ev_, m, *a, **k: m.name, saved_scores["_own_run_maps"])
    scores._graph_maps = timed(by_method, phase(GRAPH_MAPS), saved_scores["_graph_maps"])
    try:
        t0 = time.perf_counter()
        ev.evaluate_batch(items, pixels)
        ev.vm.synchronize()
        total = time.perf_counter() - t0
    finally:
        for name, fn in saved.items():
            setattr(ev, name, fn)
        for name, fn in saved_scores.items():
            setattr(scores, name, fn)
    spent["forming"] -= spent["classifying"]
    by_method[REST_OF_MAPS] = spent["maps"] - sum(by_method.values())
    return (
        {f"phase_{k}": v for k, v in spent.items()}
        | {"phase_rest": total - sum(spent.values())}
        | {f"method_{k}": v for k, v in by_method.items()}
    )


def profiled(ev: Evaluator, items: list[dict], pixels: list[np.ndarray], rows: int) -> str:
    """One more batched evaluation under cProfile: its ``rows`` functions of most own time, as text (for a run on
    a machine that is lent for minutes, such as the GPU's, where the phases alone do not say which call to change)."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    try:
        ev.evaluate_batch(items, pixels)
        ev.vm.synchronize()
    finally:
        prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(rows)
    return out.getvalue()


def device_microseconds(events: list) -> float:
    """The time the device was busy in torch.profiler's ``events``: the kernels' own events summed, as torch's table
    sums its "Self CUDA time total" (an operator's row repeats the time of the kernels it launched)."""
    from torch.autograd import DeviceType

    return sum(
        e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA and not e.is_user_annotation
    )


def device_profiled(ev: Evaluator, items: list[dict], pixels: list[np.ndarray], rows: int) -> str:
    """One more batched evaluation under torch.profiler: its wall time against the time the device was busy (the
    sum of its kernels' own times, on a GPU) and the host's own time in operators, then the ``rows`` operators of
    most device time (most host time on the CPU). Where the device was busy for a small part of the wall time, the
    evaluation is bound by the host (cProfile's table says where); where most, by its kernels (this table says
    which)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = ev.vm.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        ev.evaluate_batch(items, pixels)
        ev.vm.synchronize()
        wall = time.perf_counter() - t0
    events = prof.key_averages()
    device_us = device_microseconds(events)
    host_us = sum(e.self_cpu_time_total for e in events)
    head = (
        f"wall {wall:.2f} s; device busy {device_us / 1e6:.2f} s (its kernels' own time, summed); "
        f"host in operators {host_us / 1e6:.2f} s (profiled, so slower than the timed runs)"
    )
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    return head + "\n" + events.table(sort_by=key, row_limit=rows)


def _decoded(pixels: list[np.ndarray]) -> list:
    from vizapp.imageio import decode_image

    return [decode_image(px).image for px in pixels]


def ev_device(args: argparse.Namespace) -> str:
    return (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).upper()


def _runs(b: int) -> tuple[tuple[str, int, str], ...]:
    """The two runs the phase tables show for a batch of ``b`` images, as (key prefix of :func:`measure`, images per
    evaluated batch, label after the model's name): the batch, then its images one at a time."""
    return ("", b, ""), ("alone_", 1, ", one at a time")


def markdown(
    rows: list[tuple[str, int, str, dict[str, float]]],
    args: argparse.Namespace,
    methods: list[str],
    fell_back: dict[str, str] | None = None,
) -> str:
    lines = [
        "# The evaluation's rate against its floor",
        "",
        f"Generated by `python -m benchmarks.evaluation {' '.join(args.argv)}` "
        f"({device_name(ev_device(args).lower())}, {args.threads} torch threads, medians of {args.repeats} "
        "interleaved rounds after a warm-up); edit the code, not this file.",
        "",
        f"Methods: {', '.join(methods)}; protocol `chefer2021` (the authors' pixel procedure), curves off. Batched: "
        "`Evaluator.evaluate_batch` of the B images at once. One by one: the same images evaluated alone, as before "
        "batching. Floor: a bare batched forward of every input the protocol classifies (each image once, and every "
        "perturbed copy the evaluator formed), in batches of the evaluator's batch size (the table's copies per "
        "forward, which the evaluation's own forwards take too). Target: batched rate >= "
        f"{TARGET} x floor rate. Weights: the bundled model's own (Fashion-MNIST test images); timm models random "
        "(random images, the predicted class as target). A model written `name@key=value,...` is that architecture "
        "built with those `create_model` arguments: `vit_base_patch16_224@embed_dim=48,img_size=32` keeps ViT-B's "
        "depth, heads and operators (so its launches and waits) with 5 tokens of width 48, almost no arithmetic, so "
        "its rates say what the host's work, the dispatch and the waits cost the evaluation on this machine, and "
        "its target row means nothing.",
        "",
        "| model | B | copies classified | floor img/s | batched img/s | batched / floor | one by one img/s "
        "| batched / one by one | target | copies per forward |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for model, b, data, m in rows:
        floor, batched, single = (b / m[k] for k in ("floor", "batched", "one_by_one"))
        verdict = "met" if batched / floor >= TARGET else "missed"
        lines.append(
            f"| {model} ({data}) | {b} | {int(m['copies'])} | {floor:.1f} | {batched:.2f} | {batched / floor:.2f} "
            f"| {single:.2f} | {batched / single:.2f} | {verdict} | {int(m['per_forward'])} |"
        )
    lines += [
        "",
        "The batched path in these runs (a batch whose shared work fails runs again one image at a time):",
        "",
    ]
    lines += [f"- {model}: {said}" for model, said in (fell_back or {}).items()]
    lines += [
        "",
        "Where one more batched evaluation's time went, in milliseconds per image (one run; each timer waits for the "
        "device): the statistics forward; the methods' maps (their forwards, backwards and relevance passes); forming "
        "the perturbed copies (masks on the host, copies on the model's device); classifying them; the rest "
        "(decoding, preprocessing, rows). Below each model's batch, the same images evaluated one at a time (B = 1, "
        "the phases summed over the images): a phase whose time per image is about the same either way does not "
        "gain from batching.",
        "",
        "| model | B | statistics | maps | forming copies | classifying copies | rest |",
        "|---|---|---|---|---|---|---|",
    ]
    for model, b, data, m in rows:
        for prefix, size, label in _runs(b):
            if f"{prefix}phase_rest" in m:
                cells = " | ".join(f"{1e3 * m[f'{prefix}phase_{k}'] / b:.1f}" for k in (*PHASES, "rest"))
                lines.append(f"| {model} ({data}){label} | {size} | {cells} |")
    names = list(dict.fromkeys(k[7:] for _, _, _, m in rows for k in m if k.startswith("method_")))
    lines += [
        "",
        "The maps phase of that run by method, in milliseconds per image: each method's own calls (a method that runs "
        "the model itself: its forward, backward and relevance pass for the batch; on the analysis route, the others' "
        "maps read from each image's analysis); the attention graph's maps (vizapp.graph_maps: one forward with the "
        "attention in the autograd graph, one backward per class kind, and the maps of rollout, the CLS attention, "
        "gradient rollout and relevance for the whole group, which then need no analysis; one image on a GPU takes "
        "the analysis route); and the rest of the phase (on the analysis route its forward and backwards); below "
        "each batch, its images one at a time, as above.",
        "",
        "| model | B | " + " | ".join(names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for model, b, data, m in rows:
        for prefix, size, label in _runs(b):
            if not any(k.startswith(f"{prefix}method_") for k in m):
                continue
            cells = " | ".join(
                f"{1e3 * m[f'{prefix}method_{k}'] / b:.1f}" if f"{prefix}method_{k}" in m else "" for k in names
            )
            lines.append(f"| {model} ({data}){label} | {size} | {cells} |")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return "\n".join([*lines, "", f"Load average (1 min) at the end: {load:.1f} ({os.cpu_count()} CPUs).", ""])


def main(argv: list[str] | None = None) -> int:
    import sys

    p = argparse.ArgumentParser(prog="python -m benchmarks.evaluation", description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["bundled", "vit_small_patch16_224"])
    p.add_argument("--images", type=int, default=16, help="B, images per evaluated batch")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="perturbed copies per forward (default: the evaluator's, vizapp.limits.perturbation_batch of the device)",
    )
    p.add_argument("--methods", default=None, help="comma-separated; default every method but flow, and random")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument(
        "--profile", type=int, default=0, help="also print cProfile's N functions of most own time in one more run"
    )
    p.add_argument(
        "--torch-profile",
        type=int,
        default=0,
        help="also print the device's busy time against the wall time and torch.profiler's N operators of most "
        "device time in one more run",
    )
    p.add_argument(
        "--device", default=None, help="the model's device (default: vizapp's choice, a GPU when there is one)"
    )
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    methods = args.methods.split(",") if args.methods else default_methods()
    rows = []
    fell_back: dict[str, str] = {}
    for model in args.models:
        bundled = model == "bundled"
        spec = parse_spec(model)
        ev = Evaluator(
            # name@key=value: the architecture with those create_model arguments, random weights (see markdown)
            spec.load(ev_device(args).lower()) if spec.kwargs else model,
            methods,
            steps=0,
            threads=args.threads,
            batch_size=args.batch_size,
            pretrained=bundled,
            device=args.device,
        )
        items, pixels = _images(ev, args.images, "fmnist-test" if bundled else None)
        m = measure(ev, items, pixels, args.repeats)
        rows.append((model, len(items), "fmnist-test" if bundled else "random", m))
        print(f"{model}: {m}", flush=True)
        if args.profile > 0:
            print(f"{model}, one batched evaluation under cProfile:\n{profiled(ev, items, pixels, args.profile)}")
        if args.torch_profile > 0:
            found = device_profiled(ev, items, pixels, args.torch_profile)
            print(f"{model}, one batched evaluation under torch.profiler: {found}")
        fell_back[model] = fallbacks(ev)
        print(f"{model}: the batched path {fell_back[model]}", flush=True)
    text = markdown(rows, args, methods, fell_back)
    print(text)
    args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
