"""Command line: `python -m vizapp.cli IMAGE [--model NAME]` prints the top-5 and mean attention distances."""

from __future__ import annotations

import argparse
import sys

import numpy as np


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Analyse one image with a ViT and print what vizapp sees.")
    parser.add_argument("image", help="path to an image file")
    parser.add_argument("--model", default="bundled", help="timm name, hf-hub:id, .safetensors path or 'bundled'")
    parser.add_argument("--arch", default=None, help="timm architecture of a .safetensors checkpoint")
    parser.add_argument("--random", action="store_true", help="random weights (no download)")
    args = parser.parse_args(argv)

    import vizapp

    try:
        vm = vizapp.load_model(args.model, pretrained=not args.random, arch=args.arch)
        r = vizapp.analyze(vm, args.image)
    except vizapp.VizappError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"model {vm.name}: {r.num_layers} layers, {r.num_heads} heads, grid {r.grid_size}, "
        f"{r.num_prefix_tokens} prefix tokens"
    )
    for note in (vm.note, *r.notes):
        if note:
            print(f"note: {note}")
    print("top-5:")
    for label, p in r.top_k:
        print(f"  {p:7.2%}  {label}")
    print("mean attention distance (px), per layer: mean over heads [min, max]")
    for layer, row in enumerate(r.mean_distance):
        print(f"  layer {layer:2d}: {np.mean(row):7.1f}  [{np.min(row):6.1f}, {np.max(row):6.1f}]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
