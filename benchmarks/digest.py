"""Time the weights digest that every analysis records (:func:`vizapp.models.digest.weights_digest`).

``python -m benchmarks.digest [--model vit_base_patch16_224] [--runs 7]`` builds the architecture with random weights
(no download) and prints the median and spread of the digest's time beside one forward pass of the same model, on
the CPU (and on the GPU when there is one).
"""

from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch

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
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--runs", type=int, default=7)
    a = p.parse_args(argv)
    torch.manual_seed(0)
    model = timm.create_model(a.model, pretrained=False).eval()
    n = sum(t.numel() for t in (*model.parameters(), *model.buffers()))
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"{a.model}: {n / 1e6:.1f} M parameters and buffers; {torch.get_num_threads()} CPU threads; {a.runs} runs")
    print("| device | digest median (min-max) ms | forward median ms |")
    print("| --- | --- | --- |")
    for dev in devices:
        model = model.to(dev)
        sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
        x = torch.randn(1, 3, 224, 224, device=dev)
        weights_digest(model)  # warm-up (position weights made once per device)
        d = _median_ms(lambda m=model: weights_digest(m), a.runs, sync)
        with torch.no_grad():
            model(x)
            f = _median_ms(lambda m=model, x=x: m(x), a.runs, sync)
        print(f"| {dev} | {d[0]:.0f} ({d[1]:.0f}-{d[2]:.0f}) | {f[0]:.0f} |")


if __name__ == "__main__":
    main()
