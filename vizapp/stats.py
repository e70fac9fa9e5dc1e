"""Every registered statistic per layer and head over a folder of images (``python -m vizapp.stats FOLDER --model NAME``).

Every image under the folder (recursively; png, jpg/jpeg, webp, bmp, gif, tif/tiff) is decoded with
:func:`vizapp.imageio.decode_image` (undecodable files are skipped and counted), preprocessed with the model's own
transform and run through the model in batches from a torch DataLoader. Each batch is one captured forward
(:func:`vizapp.statistics_pass.forward_statistics`): a plain ViT's attention is formed once, in place of SDPA, a few
heads at a time (:class:`vizapp.capture.AttentionCapture`), a windowed model's (Swin) layer by layer as its blocks run
(:class:`vizapp.windows.WindowCapture`), and either goes to :class:`vizapp.statistics.StatisticsReducer`, which
reduces it to every registered statistic (:mod:`vizapp.statistics`: mean attention distance, attention entropy,
token norms, and any a user registers) while it is hot, so nothing of a layer outlives it. Each image's statistics
are summed over all images and divided by their count: the mean of what :func:`vizapp.analyze` gives each image.
Writes a CSV (layer, head, one column per statistic, n_images; a windowed model's rows are the heads each layer has)
and an offline plotly HTML figure of the mean distance, prints why a statistic is NaN where it is not defined for the
model, and compares the throughput with a bare batched forward of the same model on the same batches.
"""

from __future__ import annotations

import argparse
import ast
import csv
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from vizapp.analysis.distance import uniform_reference_distance
from vizapp.errors import BadImageError, VizappError
from vizapp.imageio import decode_image
from vizapp.models import VizModel
from vizapp.statistics import STATISTICS, HeadStatistic, undefined_statistics
from vizapp.statistics_pass import forward_statistics, layer_heads

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def csv_columns() -> tuple[str, ...]:
    """The CSV's columns: layer, head, one per registered statistic (:mod:`vizapp.statistics`), n_images."""
    return ("layer", "head", *(s.column for s in STATISTICS.values()), "n_images")


def find_images(folder: str | Path, limit: int | None = None) -> list[Path]:
    """Image files under ``folder`` (recursive, by suffix, case-insensitive), sorted; the first ``limit`` if given."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder")
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    return paths[:limit] if limit is not None and limit >= 0 else paths


class ImageFileDataset(Dataset):
    """``(tensor or None, path, reason)`` per file: the model's transform of the decoded image, or why it failed.

    Args:
        paths: image files.
        transform: PIL.Image -> tensor [C, H, W] (``vm.batch_transform``).
    """

    def __init__(self, paths: Sequence[str | Path], transform: Any) -> None:
        self.paths = [str(p) for p in paths]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, str, str]:
        path = self.paths[index]
        try:
            image = decode_image(path).image
        except (BadImageError, OSError) as exc:
            return None, path, str(exc)
        return self.transform(image), path, ""


@dataclass
class Batch:
    """A collated batch: the decodable images stacked (None when there is none) and the files skipped."""

    x: torch.Tensor | None
    skipped: list[tuple[str, str]]
    size: int


def collate(items: Sequence[tuple[torch.Tensor | None, str, str]]) -> Batch:
    """Stack the decoded images of a batch and list the files that could not be decoded."""
    tensors = [t for t, _, _ in items if t is not None]
    skipped = [(path, reason) for t, path, reason in items if t is None]
    return Batch(torch.stack(tensors) if tensors else None, skipped, len(items))


@dataclass
class DatasetStats:
    """Result of :func:`collect_stats`.

    Attributes:
        mean_distance: [L, H] mean attention distance in pixels over ``n_images`` images (NaN when none; a windowed
            model's is [L, max H], NaN for the heads a layer does not have).
        statistics: every registered statistic averaged over the images: name -> [L, H] (per head) or [L] (per
            block); ``statistics["distance"]`` is ``mean_distance``.
        n_images: images that were decoded and analysed.
        skipped: (path, reason) of every file that could not be decoded.
        grid_size, patch_size: the patch grid and patch size (a windowed model's first stage).
        heads: the heads of each layer.
        undefined: name -> the sentence saying why that statistic is NaN for this model.
        windowed: the model attends within windows (Swin): its distances have no uniform-attention reference.
        seconds: wall time of the whole loop (decoding, forward and analysis).
        timed_images: images in the batches used for the throughput comparison.
        analysis_seconds: time of forward-with-capture + distances on those batches.
        bare_seconds: time of a bare forward (no capture) of the same batches.
    """

    mean_distance: np.ndarray
    n_images: int
    statistics: dict[str, np.ndarray] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    grid_size: tuple[int, int] = (0, 0)
    patch_size: tuple[int, int] = (0, 0)
    heads: list[int] = field(default_factory=list)
    undefined: dict[str, str] = field(default_factory=dict)
    windowed: bool = False
    seconds: float = 0.0
    timed_images: int = 0
    analysis_seconds: float = 0.0
    bare_seconds: float = 0.0

    @property
    def throughput(self) -> float:
        """Images per second of the whole loop (decoding included)."""
        return self.n_images / self.seconds if self.seconds > 0 else float("nan")

    @property
    def analysis_throughput(self) -> float:
        return self.timed_images / self.analysis_seconds if self.analysis_seconds > 0 else float("nan")

    @property
    def bare_throughput(self) -> float:
        return self.timed_images / self.bare_seconds if self.bare_seconds > 0 else float("nan")

    @property
    def throughput_ratio(self) -> float:
        """Analysis throughput / bare-forward throughput on the same batches (target >= 0.8)."""
        return self.bare_seconds / self.analysis_seconds if self.analysis_seconds > 0 else float("nan")


def collect_stats(
    vm: VizModel,
    paths: Sequence[str | Path],
    batch_size: int = 32,
    *,
    workers: int = 0,
    progress: bool = False,
    baseline_batches: int = 0,
) -> DatasetStats:
    """Every registered statistic (:mod:`vizapp.statistics`: mean attention distance, entropy, token norms ...) per
    layer (and head) over ``paths``, averaged over the images, with throughput figures.

    Args:
        vm: a model from :func:`vizapp.load_model`.
        paths: image files; undecodable ones are skipped and listed in ``skipped``.
        batch_size: images per forward pass.
        workers: DataLoader worker processes (0 decodes in this process).
        progress: show a progress bar on stderr.
        baseline_batches: for this many batches (-1: all) also time a bare forward of the same batch, alternating
            which runs first; the first of them is a warm-up when there are more than one.

    Returns:
        a :class:`DatasetStats`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = vm.device
    _, in_h, in_w = vm.input_size
    grid = vm.grid_for(int(in_h), int(in_w))
    heads = layer_heads(vm)
    sums: dict[str, torch.Tensor] = {}  # name -> the sum over images, [L, H] or [L], float64
    undefined = undefined_statistics(vm.num_prefix_tokens, vm.windowed)
    loader = DataLoader(
        ImageFileDataset(paths, vm.batch_transform),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=device.type == "cuda",
    )
    skipped: list[tuple[str, str]] = []
    n_images = timed_images = 0
    analysis_s = bare_s = 0.0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(paths), unit="img", file=sys.stderr, desc=f"{vm.name}", dynamic_ncols=True)
    t_start = time.perf_counter()
    try:
        for i, batch in enumerate(loader):
            skipped.extend(batch.skipped)
            if batch.x is not None:
                x = batch.x.to(device=device, dtype=vm.dtype, non_blocking=True)
                timed = baseline_batches < 0 or i < baseline_batches
                warmup = timed and i == 0 and (baseline_batches < 0 or baseline_batches > 1)
                if timed and i % 2 == 0:
                    t_bare = _bare_forward(vm, x)
                t0 = time.perf_counter()
                found = forward_statistics(vm, x)
                for name, v in found.values.items():  # [L, B, H] or [L, B]
                    total = v.sum(dim=1)
                    sums[name] = total if name not in sums else sums[name] + total
                vm.synchronize()
                t_ana = time.perf_counter() - t0
                if timed and i % 2 == 1:
                    t_bare = _bare_forward(vm, x)
                if timed and not warmup:
                    timed_images += len(x)
                    analysis_s += t_ana
                    bare_s += t_bare
                n_images += len(x)
            if bar is not None:
                bar.update(batch.size)
                if skipped:
                    bar.set_postfix(skipped=len(skipped))
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t_start
    means: dict[str, np.ndarray] = {}
    for name, stat in STATISTICS.items():
        shape = (len(heads), max(heads)) if isinstance(stat, HeadStatistic) else (len(heads),)
        means[name] = (sums[name] / n_images).cpu().numpy() if n_images else np.full(shape, np.nan)
    return DatasetStats(
        mean_distance=means["distance"],
        statistics=means,
        n_images=n_images,
        skipped=skipped,
        grid_size=grid,
        patch_size=(int(vm.patch_size[0]), int(vm.patch_size[1])),
        heads=heads,
        undefined=undefined,
        windowed=vm.windowed,
        seconds=seconds,
        timed_images=timed_images,
        analysis_seconds=analysis_s,
        bare_seconds=bare_s,
    )


def _bare_forward(vm: VizModel, x: torch.Tensor) -> float:
    t0 = time.perf_counter()
    with torch.no_grad():
        vm.logits(x)
    vm.synchronize()
    return time.perf_counter() - t0


def dataset_mean_distance(
    vm: VizModel, paths: Sequence[str | Path], batch_size: int = 32, *, workers: int = 0, progress: bool = False
) -> tuple[np.ndarray, int]:
    """Mean attention distance [L, H] in pixels over the decodable images of ``paths``, and how many there were.

    Undecodable files are skipped with one warning that counts them. The mean is the sum over images divided by
    the number of images, so it does not depend on how the images fall into batches.
    """
    stats = collect_stats(vm, paths, batch_size, workers=workers, progress=progress)
    if stats.skipped:
        warnings.warn(f"skipped {len(stats.skipped)} undecodable file(s), e.g. {stats.skipped[0][0]}", stacklevel=2)
    return stats.mean_distance, stats.n_images


def write_csv(
    path: str | Path, statistics: dict[str, np.ndarray], n_images: int, heads: Sequence[int] | None = None
) -> None:
    """One row per (layer, head), the columns of :func:`csv_columns`: a per-head statistic is that head's, a
    per-block statistic (token norms) is the layer's, the same on each of its heads' rows. ``heads``: the heads of each
    layer (a windowed model's differ by stage: a layer's rows are the heads it has); default every column of
    ``statistics["distance"]``."""
    stats = [(s, np.asarray(statistics[s.name])) for s in STATISTICS.values()]
    num_layers, num_heads = np.asarray(statistics["distance"]).shape
    heads = [num_heads] * num_layers if heads is None else list(heads)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(csv_columns())
        for layer in range(num_layers):
            for head in range(heads[layer]):
                values = [float(v[layer, head] if v.ndim == 2 else v[layer]) for _, v in stats]
                w.writerow([layer, head, *(f"{v:.6f}" for v in values), n_images])


def write_html(path: str | Path, stats: DatasetStats, model_name: str) -> None:
    """The ViT paper's distance plot as a self-contained HTML file (plotly.js inlined: works offline)."""
    from vizapp import figures

    if stats.windowed:  # attention within windows: no whole-grid uniform reference
        ref = None
        what = (
            f"within windows, in input pixels (first stage {stats.grid_size[0]}x{stats.grid_size[1]} tokens "
            f"{stats.patch_size[0]} px apart, twice that per patch merging)"
        )
    else:
        ref = uniform_reference_distance(stats.grid_size, stats.patch_size)
        what = f"({stats.grid_size[0]}x{stats.grid_size[1]} patches of {stats.patch_size[0]} px)"
    fig = figures.distance_figure(
        stats.mean_distance, ref, title=f"Mean attention distance of {model_name} over {stats.n_images} images {what}"
    )
    fig.write_html(str(path), include_plotlyjs=True, full_html=True)


def _model_arg(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key.strip(), ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
        return key.strip(), value.strip()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vizapp.stats", description=__doc__.split("\n\n")[0])
    p.add_argument("folder", type=Path, help="folder of images (searched recursively)")
    p.add_argument("--model", required=True, help="timm name (e.g. vit_base_patch16_224.augreg2_in21k_ft_in1k)")
    weights = p.add_mutually_exclusive_group()
    weights.add_argument(
        "--pretrained",
        dest="pretrained",
        action="store_true",
        default=True,
        help="pretrained weights (default; needs the hub or a cached copy)",
    )
    weights.add_argument("--random", dest="pretrained", action="store_false", help="random weights (tests, timing)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--out-csv", type=Path, default=Path("stats.csv"))
    p.add_argument("--out-html", type=Path, default=Path("distance.html"))
    p.add_argument("--limit", type=int, default=None, help="use only the first N images (sorted by path)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--img-size", type=int, default=None, help="input size passed to timm.create_model")
    p.add_argument(
        "--model-arg",
        type=_model_arg,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="other timm.create_model keyword arguments (repeatable), e.g. depth=2",
    )
    p.add_argument(
        "--baseline-batches",
        type=int,
        default=4,
        help="batches also run through a bare forward for the throughput comparison (-1: all, 0: none)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--statistics",
        action="append",
        default=[],
        metavar="MODULE",
        help="a module of yours whose import registers statistics (repeatable): each gets its CSV column",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    from vizapp.models import load_model
    from vizapp.user_statistics import import_statistics

    try:
        import_statistics(args.statistics)
    except VizappError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    if args.threads:
        torch.set_num_threads(args.threads)
    kwargs = dict(args.model_arg)
    if args.img_size is not None:
        kwargs["img_size"] = args.img_size
    try:
        paths = find_images(args.folder, args.limit)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not paths:
        print(f"error: no images ({', '.join(IMAGE_SUFFIXES)}) under {args.folder}", file=sys.stderr)
        return 1
    try:
        vm = load_model(args.model, pretrained=args.pretrained, device=args.device, **kwargs)
    except VizappError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    stats = collect_stats(
        vm,
        paths,
        args.batch_size,
        workers=args.workers,
        progress=not args.no_progress,
        baseline_batches=args.baseline_batches,
    )
    if stats.skipped:
        print(f"warning: skipped {len(stats.skipped)} undecodable file(s):", file=sys.stderr)
        for path, reason in stats.skipped[:5]:
            print(f"  {path}: {reason}", file=sys.stderr)
        if len(stats.skipped) > 5:
            print(f"  ... and {len(stats.skipped) - 5} more", file=sys.stderr)
    if stats.n_images == 0:
        print("error: none of the files could be decoded", file=sys.stderr)
        return 1
    write_csv(args.out_csv, stats.statistics, stats.n_images, stats.heads)
    write_html(args.out_html, stats, vm.name)
    shape = (
        f"{len(stats.heads)} layers x {vm.num_heads} heads"
        if len(set(stats.heads)) == 1
        else f"{len(stats.heads)} layers with {', '.join(map(str, stats.heads))} heads"
    )
    print(f"{vm.name} ({vm.source} weights): {stats.n_images} images analysed, {len(stats.skipped)} skipped, {shape}")
    for why in stats.undefined.values():
        print(f"note: {why}")
    print(f"end to end (decoding included): {stats.throughput:.1f} images/s over {stats.seconds:.1f} s")
    if stats.timed_images:
        print(
            f"same {stats.timed_images} images: analysis {stats.analysis_throughput:.1f} images/s, bare forward "
            f"{stats.bare_throughput:.1f} images/s, ratio {stats.throughput_ratio:.2f} (target >= 0.8)"
        )
    print(f"wrote {args.out_csv} and {args.out_html}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
