"""Throughput of the evaluation engines against a bare forward of the same model (prints a Markdown table).

``python -m vizapp.evaluate.throughput [--images 200] [--method-images 24] [--ray]`` measures, on Fashion-MNIST test
images and one torch thread per worker:

- a bare batched forward (batch 64, no hooks, no analysis) and a bare batch-1 forward: the references;
- the local engine with statistics only (mean distance, entropy, token norms; no methods, no curves);
- the local engine with every method and both perturbation protocols;
- with ``--ray``: the Ray engine with 1 and 2 workers, both method sets, cluster start-up reported separately.

Engine figures exclude model loading and count every image of the job (shard writes included).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import torch

ALL_METHODS = "rollout,grad_rollout,relevance,attention,flow,random"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_forward(n: int, batch_size: int, model: str = "bundled", repeats: int = 3) -> float:
    """Images/s of ``model`` on ``n`` preprocessed Fashion-MNIST images in batches of ``batch_size`` (best of
    ``repeats``)."""
    from PIL import Image

    import vizapp
    from vizapp.bundled.data import load_fashion_mnist

    vm = vizapp.load_model(model)
    images, _ = load_fashion_mnist("test")
    x = torch.stack([vm.transform(Image.fromarray(images[i]).convert("RGB")) for i in range(n)]).to(vm.device)
    best = 0.0
    with torch.no_grad():
        vm.logits(x[:batch_size])
        for _ in range(repeats):
            _sync(vm.device)
            t0 = time.perf_counter()
            for lo in range(0, n, batch_size):
                vm.logits(x[lo : lo + batch_size])
            _sync(vm.device)
            best = max(best, n / (time.perf_counter() - t0))
    return best


def engine(n: int, methods: str, steps: int, **kwargs) -> float:
    """Images/s of one evaluation job of ``n`` images (model loading excluded)."""
    from vizapp.evaluate import evaluate

    with tempfile.TemporaryDirectory() as out:
        s = evaluate("fmnist-test", out, methods=methods, steps=steps, limit=n, shard_size=16, progress=False, **kwargs)
    return n / s["seconds"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200, help="images for the forward and statistics-only rows")
    parser.add_argument("--method-images", type=int, default=24, help="images for the every-method rows")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--ray", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows: list[tuple[str, int, float]] = []
    fwd = bare_forward(args.images, 64)
    rows.append(("bare forward, batch 64 (reference)", args.images, fwd))
    rows.append(("bare forward, batch 1", args.images, bare_forward(args.images, 1)))
    rows.append(("local engine, statistics only", args.images, engine(args.images, "", 0)))
    rows.append(
        (
            "local engine, every method + both protocols",
            args.method_images,
            engine(args.method_images, ALL_METHODS, args.steps),
        )
    )
    if args.ray:
        import ray

        from vizapp.evaluate.engines import init_ray, local_cluster_cpus

        for w in (1, 2):
            t0 = time.perf_counter()
            init_ray(None, local_cluster_cpus(w))
            start = time.perf_counter() - t0
            rows.append(
                (
                    f"Ray, {w} worker(s), statistics only (cluster start {start:.0f} s not counted)",
                    args.images,
                    engine(args.images, "", 0, engine="ray", workers=w),
                )
            )
            rows.append(
                (
                    f"Ray, {w} worker(s), every method + both protocols",
                    args.method_images,
                    engine(args.method_images, ALL_METHODS, args.steps, engine="ray", workers=w),
                )
            )
            ray.shutdown()
    load = os.getloadavg()
    print(
        f"Measured {time.strftime('%Y-%m-%d %H:%M')} on {platform.machine()}, {os.cpu_count()} cores, load average "
        f"{load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}, torch {torch.__version__}, 1 torch thread per worker.\n"
    )
    print("| run | images | images/s | vs bare batched forward |")
    print("|---|---|---|---|")
    for name, n, ips in rows:
        print(f"| {name} | {n} | {ips:.1f} | {ips / fwd:.3f}× |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
