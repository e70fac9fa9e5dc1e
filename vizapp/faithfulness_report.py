"""Which explanation is faithful? Deletion/insertion AUCs of every method on the bundled model's test set.

``python -m vizapp.faithfulness_report [--images 1000] [--out docs/faithfulness.md]`` explains each Fashion-MNIST
test image's predicted class with every method, computes deletion and insertion curves (Petsiuk et al., "RISE",
BMVC 2018) one patch per step, and writes a table of mean AUCs with a random-order baseline.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vizapp.methods import METHODS


def evaluate(num_images: int = 1000, steps: int | None = None, seed: int = 0, model: str = "bundled",
             data_dir: str | None = None, progress: bool = True) -> dict[str, dict[str, np.ndarray]]:
    """AUCs per method: {method: {"deletion": [n], "insertion": [n]}} over the first ``num_images`` test images."""
    import vizapp
    from vizapp.bundled.data import load_fashion_mnist

    vm = vizapp.load_model(model)
    images, _labels = load_fashion_mnist("test", data_dir)
    n = min(num_images, len(images))
    aucs: dict[str, dict[str, list[float]]] = {}
    t0 = time.time()
    for i in range(n):
        r = vizapp.analyze(vm, Image.fromarray(images[i]).convert("RGB"))
        maps = {name: r.explain(name) for name in METHODS}
        curves = r.faithfulness(maps, None, steps=steps, random_seed=seed + i)
        for name, c in curves.items():
            d = aucs.setdefault(name, {"deletion": [], "insertion": []})
            d["deletion"].append(c["deletion"].auc)
            d["insertion"].append(c["insertion"].auc)
        if progress and (i + 1) % 50 == 0:
            rate = (i + 1) / (time.time() - t0)
            print(f"\r{i + 1}/{n} images ({rate:.1f}/s)", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    return {m: {k: np.asarray(v) for k, v in d.items()} for m, d in aucs.items()}


def markdown(aucs: dict[str, dict[str, np.ndarray]], seconds: float, model_note: str, steps: int | None = 16) -> str:
    names = {**{k: m.label for k, m in METHODS.items()}, "random": "Random order (baseline)"}
    rows = []
    for m, d in aucs.items():
        dl, ins = d["deletion"], d["insertion"]
        se = lambda x: x.std(ddof=1) / np.sqrt(len(x)) if len(x) > 1 else float("nan")  # noqa: E731
        rows.append((names.get(m, m), dl.mean(), se(dl), ins.mean(), se(ins), ins.mean() - dl.mean()))
    rows.sort(key=lambda r: -r[5])
    n = len(next(iter(aucs.values()))["deletion"])
    lines = [
        "# Faithfulness of the explanations on the bundled model",
        "",
        f"`python -m vizapp.faithfulness_report --images {n} --steps {steps or 0}`: {n} Fashion-MNIST test images, each explained for its "
        "predicted class. Patches are deleted (replaced by the dataset-mean value, i.e. 0 in normalised input space) or "
        "inserted onto that baseline in the order of each map's importance, "
        + (f"in {steps} equal steps" if steps else "one patch per step")
        + ", and the predicted "
        "class's probability is tracked; the AUC is the trapezoid area over the fraction of patches changed "
        "(Petsiuk et al., RISE, BMVC 2018). **Deletion: lower is more faithful. Insertion: higher is more faithful.** "
        "The random row shuffles patch order (a different seed per image).",
        "",
        f"{model_note}",
        "",
        "| method | deletion AUC ↓ | ± s.e. | insertion AUC ↑ | ± s.e. | insertion − deletion ↑ |",
        "|---|---|---|---|---|---|",
    ]
    for name, dm, dse, im, ise, diff in rows:
        lines.append(f"| {name} | {dm:.4f} | {dse:.4f} | {im:.4f} | {ise:.4f} | {diff:.4f} |")
    lines += [
        "",
        f"Computed in {seconds:.0f} s on {platform.processor() or platform.machine()} "
        f"({torch.get_num_threads()} torch threads), {time.strftime('%Y-%m-%d')}.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=16, help="curve steps (0: one patch per step)")
    parser.add_argument("--model", default="bundled")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default="docs/faithfulness.md")
    args = parser.parse_args(argv)
    import vizapp

    vm = vizapp.load_model(args.model)
    t0 = time.time()
    aucs = evaluate(args.images, args.steps or None, model=args.model, data_dir=args.data_dir)
    text = markdown(aucs, time.time() - t0, vm.note or vm.name, args.steps or None)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
