"""Time the weights digest that every analysis records (:func:`vizapp.models.digest.weights_digest`).

``python -m benchmarks.digest [--models vit_base_patch16_224 ...] [--runs 7]`` builds each architecture with random
weights (no download) and prints the median and spread of the digest's time beside one forward pass of the same model,
on the CPU (and on the GPU when there is one). On the CPU both forms are timed in the same run, alternating: the int8
checksums every analysis uses, and SHA-256 of the raw bytes (the form used where the int8 product is missing).
"""

from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch

import vizapp.models.digest as digest
from vizapp.models.digest import weights_digest


def _median_ms(fn, runs: int, sync=lambda: None) -> tuple[float, float, float]:
    times = []
    for _ in range(runs):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times), min(times), max(times)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["vit_base_patch16_224"])
    p.add_argument("--runs", type=int, default=7)
    a = p.parse_args(argv)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"{torch.get_num_threads()} CPU threads; {a.runs} runs; medians (min-max) in ms")
    print("| model | M values | MB | device | digest | SHA-256 of the bytes | forward |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name in a.models:
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False).eval()
        tensors = (*model.parameters(), *model.buffers())
        n = sum(t.numel() for t in tensors)
        mb = sum(t.numel() * t.element_size() for t in tensors) / 1e6
        size = model.default_cfg.get("input_size", (3, 224, 224))
        for dev in devices:
            model = model.to(dev)
            sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
            x = torch.randn(1, *size, device=dev)
            forms = {"digest": True, "sha": False} if dev == "cpu" else {"digest": None}
            found: dict[str, list[float]] = {k: [] for k in forms}
            for _ in range(a.runs):  # the forms alternate, so the machine's load falls on both
                for key, gemm in forms.items():
                    digest._gemm_ok = gemm
                    if len(found[key]) == 0:
                        weights_digest(model)  # warm-up (the matrix or position weights made once per device)
                    found[key].append(_median_ms(lambda m=model: weights_digest(m), 1, sync)[0])
            digest._gemm_ok = None
            with torch.no_grad():
                model(x)
                f = _median_ms(lambda m=model, x=x: m(x), a.runs, sync)

            def cell(ts: list[float]) -> str:
                return f"{statistics.median(ts):.0f} ({min(ts):.0f}-{max(ts):.0f})"

            sha = cell(found["sha"]) if "sha" in found else "-"
            print(f"| {name} | {n / 1e6:.1f} | {mb:.0f} | {dev} | {cell(found['digest'])} | {sha} | {f[0]:.0f} |")


if __name__ == "__main__":
    main()
