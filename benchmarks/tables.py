"""What the small benchmark scripts (``benchmarks.digest``, ``benchmarks.swin``, ``benchmarks.flow``) share: their
common options, the machine's load average for the table's header, the photo they analyse, and printing the table
(and writing it with ``--out``)."""

from __future__ import annotations

import argparse
import os

import numpy as np


def parser(doc: str, models: list[str]) -> argparse.ArgumentParser:
    """The options every such script takes: ``--models`` (default ``models``), ``--threads`` and ``--out``."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(models))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="also write the table to this markdown file")
    return p


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, for the table's header."""
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def photo():
    """skimage's astronaut (512x512 RGB), or noise of that size when scikit-image is missing."""
    from PIL import Image

    try:
        from skimage import data

        return Image.fromarray(data.astronaut())
    except ImportError:
        return Image.fromarray(np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8))


def emit(lines: list[str], out: str | None) -> None:
    """Print the table, and write it to ``out`` when given."""
    text = "\n".join(lines) + "\n"
    print(text)
    if out:
        with open(out, "w", encoding="utf-8") as f:
            f.write(text)
