"""Throughput of the evaluation engines against a bare forward of the same model (prints a Markdown table).

``python -m vizapp.evaluate.throughput [--images 200] [--method-images 24] [--ray] [--model NAME --random-weights]
[--data DATA]`` measures, on DATA (default the Fashion-MNIST test images; a folder's images are reused in turn when
there are fewer than asked) and one torch thread per worker:

- a bare batched forward (batch 64, no hooks, no analysis) and a bare batch-1 forward: the references, on inputs
  preprocessed beforehand (median of 3 passes);
- the local engine with statistics only (mean distance, entropy, token norms; no methods, no curves), in batches of
  ``--batch-size``;
- the local engine with every method and both perturbation protocols (``--method-images 0`` skips it);
- with ``--ray``: the Ray engine with 1 and 2 workers, both method sets, cluster start-up reported separately.

Engine figures exclude model loading and count every image of the job (decoding, preprocessing and shard writes
included); the statistics-only row is the median of ``--repeats`` jobs.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time

import torch

ALL_METHODS = "rollout,grad_rollout,relevance,attention,flow,random"


def inputs(data: str, n: int, vm) -> tuple[torch.Tensor, list[dict]]:
    """The first ``n`` items of ``data`` (repeated in turn when there are fewer) and their preprocessed inputs."""
    from vizapp.evaluate.dataset import list_items, load_pixels
    from vizapp.imageio import decode_image

    items = list_items(data, tuple(vm.labels))
    items = [items[i % len(items)] for i in range(n)]
    x = torch.stack([vm.batch_transform(decode_image(load_pixels(it)).image) for it in items])
    return x, items


def bare_forward(vm, x: torch.Tensor, batch_size: int, repeats: int = 3) -> float:
    """Images/s of a bare forward of ``vm`` on inputs ``x`` in batches of ``batch_size`` (median of ``repeats``
    passes, after one warm-up batch)."""
    rates = []
    n = x.shape[0]
    x = x.to(vm.device)
    with torch.no_grad():
        vm.logits(x[:batch_size])
        for _ in range(repeats):
            vm.synchronize()
            t0 = time.perf_counter()
            for lo in range(0, n, batch_size):
                vm.logits(x[lo : lo + batch_size])
            vm.synchronize()
            rates.append(n / (time.perf_counter() - t0))
    return statistics.median(rates)


def engine(data: str, n: int, methods: str, steps: int, repeats: int = 1, **kwargs) -> tuple[int, float]:
    """(images, images/s) of an evaluation job of the first ``n`` images of ``data`` (fewer when it holds fewer; model
    loading excluded; median of ``repeats`` jobs)."""
    images, rate, _ = engine_timed(data, n, methods, steps, repeats, **kwargs)
    return images, rate


def engine_timed(
    data: str, n: int, methods: str, steps: int, repeats: int = 1, **kwargs
) -> tuple[int, float, dict | None]:
    """:func:`engine` plus the last job's engine timing (Ray: start-up and steady state, see ``run_ray``)."""
    from vizapp.evaluate import evaluate

    rates, images, timing = [], 0, None
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as out:
            s = evaluate(data, out, methods=methods, steps=steps, limit=n, progress=False, **kwargs)
        images, timing = s["images_run"], s.get("engine_timing")
        rates.append(images / s["seconds"])
    return images, statistics.median(rates), timing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200, help="images for the forward and statistics-only rows")
    parser.add_argument("--method-images", type=int, default=24, help="images for the every-method rows")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--ray", action="store_true")
    parser.add_argument("--model", default="bundled")
    parser.add_argument("--random-weights", action="store_true", help="the model with random weights (offline)")
    parser.add_argument("--data", default="fmnist-test", help="an image folder, or fmnist-test (default)")
    parser.add_argument("--batch-size", type=int, default=32, help="the engines' statistics batch")
    parser.add_argument("--shard-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="statistics-only jobs (the median is reported)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    import vizapp

    pretrained = not args.random_weights
    vm = vizapp.load_model(args.model, pretrained=pretrained)
    x, _ = inputs(args.data, args.images, vm)
    job = {
        "model": args.model,
        "pretrained": pretrained,
        "batch_size": args.batch_size,
        "shard_size": args.shard_size,
    }
    rows: list[tuple[str, int, float]] = []
    fwd = bare_forward(vm, x, 64)
    rows.append(("bare forward, batch 64 (reference)", args.images, fwd))
    rows.append(("bare forward, batch 1", args.images, bare_forward(vm, x, 1)))
    local_stats = engine(args.data, args.images, "", 0, repeats=args.repeats, **job)
    rows.append((f"local engine, statistics only (batches of {args.batch_size})", *local_stats))
    if args.method_images > 0:
        rows.append(
            (
                "local engine, every method + both protocols",
                *engine(args.data, args.method_images, ALL_METHODS, args.steps, **job),
            )
        )
    if args.ray:
        import ray

        from vizapp.evaluate.engines import init_ray, local_cluster_cpus

        for w in (1, 2):
            t0 = time.perf_counter()
            init_ray(None, local_cluster_cpus(w))
            start = time.perf_counter() - t0
            images, rate, timing = engine_timed(args.data, args.images, "", 0, engine="ray", workers=w, **job)
            rows.append(
                (f"Ray, {w} worker(s), statistics only (cluster start {start:.0f} s not counted)", images, rate)
            )
            if timing:
                print(
                    f"Ray, {w} worker(s), statistics only: {timing['wall_s']:.1f} s in the job, "
                    f"{timing['first_s']:.1f} s before the first rows arrived, actors busy {timing['busy_s']:.1f} s "
                    f"(summed); the local engine took {images / local_stats[1]:.1f} s for the same images"
                )
            if args.method_images > 0:
                rows.append(
                    (
                        f"Ray, {w} worker(s), every method + both protocols",
                        *engine(args.data, args.method_images, ALL_METHODS, args.steps, engine="ray", workers=w, **job),
                    )
                )
            ray.shutdown()
    load = os.getloadavg()
    print(
        f"Measured {time.strftime('%Y-%m-%d %H:%M')} on {platform.machine()}, {os.cpu_count()} cores, load average "
        f"{load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}, torch {torch.__version__}, 1 torch thread per worker; "
        f"{args.model}{'' if pretrained else ' (random weights)'} on {args.data}.\n"
    )
    print("| run | images | images/s | vs bare batched forward |")
    print("|---|---|---|---|")
    for name, n, ips in rows:
        print(
            f"| {name} | {n} | {ips:.1f} | {ips / fwd:.3f}× |"
            if ips >= 10
            else f"| {name} | {n} | {ips:.2f} | {ips / fwd:.3f}× |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
