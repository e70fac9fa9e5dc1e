"""Command line: ``python -m vizapp.cli IMAGE [IMAGE ...] [--model NAME]`` prints each image's top-5 and mean
attention distances; ``--explain rollout,relevance --out maps.npz`` saves the methods' maps of every image.

The images go through the batch API (:func:`vizapp.analyze` and :func:`vizapp.explain` with a list): one batched
forward per ``--batch-size`` images, not one per image. An image that cannot be read is reported with the reason
and left out; the others are analysed. Exit status: 0 every image analysed, 1 some left out, 2 none (or the model
or an option was refused).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np


def _groups(paths: list[str], size: int, bad: list[str]) -> Iterator[list[tuple[str, Any]]]:
    """The images that decode, as (path, decoded image) in groups of ``size``, each decoded once (read safely, never
    unpickled) and held only while its group is analysed; a path that does not decode is reported on stderr and
    added to ``bad``."""
    from vizapp.errors import BadImageError
    from vizapp.imageio import decode_image

    group: list[tuple[str, Any]] = []
    for path in paths:
        try:
            group.append((path, decode_image(path)))
        except BadImageError as e:
            print(f"error: {path}: {e}", file=sys.stderr)
            bad.append(path)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def _print_analysis(vm: Any, r: Any, path: str, several: bool) -> None:
    if several:
        print(f"== {path}")
    heads = sorted(set(getattr(r, "heads_per_layer", (r.num_heads,))))  # a windowed model's stages differ
    span = str(heads[0]) if len(heads) == 1 else f"{heads[0]}-{heads[-1]}"
    print(
        f"model {vm.name}: {r.num_layers} layers, {span} heads, grid {r.grid_size}, {r.num_prefix_tokens} prefix tokens"
    )
    for note in (vm.note, *r.notes):
        if note:
            print(f"note: {note}")
    if r.top_k:
        print("top-5:")
        for label, p in r.top_k:
            print(f"  {p:7.2%}  {label}")
    print("mean attention distance (px), per layer: mean over heads [min, max]")
    for layer, row in enumerate(r.mean_distance):
        row = row[np.isfinite(row)]  # a windowed model's table is [L, max H]: NaN for heads a stage lacks
        print(f"  layer {layer:2d}: {np.mean(row):7.1f}  [{np.min(row):6.1f}, {np.max(row):6.1f}]")


def _class_arg(text: str | None) -> int | str | None:
    """``--class``: an index, a label, or None (each image's top-1)."""
    if text is None:
        return None
    return int(text) if text.lstrip("-").isdigit() else text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vizapp.cli", description="Analyse images with a ViT and print what vizapp sees."
    )
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG, GIF, WebP, BMP, TIFF)")
    parser.add_argument("--model", default="bundled", help="timm name, hf-hub:id, .safetensors path or 'bundled'")
    parser.add_argument("--arch", default=None, help="timm architecture of a .safetensors checkpoint")
    parser.add_argument("--random", action="store_true", help="random weights (no download)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per batched forward (default 16)")
    parser.add_argument(
        "--explain", default=None, help="comma-separated methods whose maps to save, e.g. rollout,relevance"
    )
    parser.add_argument("--class", dest="cls", default=None, help="class to explain (index or label; default top-1)")
    parser.add_argument("--out", type=Path, default=None, help=".npz file for the --explain maps")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    if (args.explain is None) != (args.out is None):
        parser.error("--explain and --out go together: the maps are saved to the --out file")

    methods = [m.strip() for m in args.explain.split(",") if m.strip()] if args.explain is not None else []
    import vizapp
    from vizapp.methods import METHODS

    unknown = [m for m in methods if m not in METHODS]
    if unknown or (args.explain is not None and not methods):
        parser.error(f"--explain takes methods among {', '.join(METHODS)}; got {args.explain!r}")
    out = None if args.out is None else args.out.with_name(args.out.name.removesuffix(".npz") + ".npz")
    good: list[str] = []
    bad: list[str] = []
    try:
        vm = vizapp.load_model(args.model, pretrained=not args.random, arch=args.arch)
        maps: dict[str, list[np.ndarray]] = {m: [] for m in methods}
        for group in _groups(args.images, args.batch_size, bad):
            images = [decoded for _, decoded in group]  # the batch API takes them as decoded, notes included
            if methods:  # first: a class the model lacks is refused before anything is printed
                found = vizapp.explain(vm, images, methods, classes=_class_arg(args.cls))
                for m in methods:
                    maps[m].append(found[m])
            for (path, _), r in zip(group, vizapp.analyze(vm, images), strict=True):
                _print_analysis(vm, r, path, several=len(args.images) > 1)
            good += [path for path, _ in group]
    except vizapp.VizappError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not good:
        return 2
    if methods:
        arrays = {m: np.concatenate(v) for m, v in maps.items()}
        # str arrays, not objects: the file loads without pickle
        np.savez(out, images=np.array(good, dtype=str), **arrays)
        shapes = ", ".join(f"{m} {list(a.shape)}" for m, a in arrays.items())
        print(f"saved {shapes} to {out}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
