"""Fashion-MNIST loading from the IDX files shipped by Debian's ``dataset-fashion-mnist`` package.

The bundled offline model is trained and evaluated on this data set. The IDX format (LeCun et al.) is a big-endian
header followed by raw bytes: images carry magic 2051 and three dimensions, labels carry magic 2049 and one.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
from pathlib import Path
from typing import Literal

import numpy as np

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
"""Where Debian's ``dataset-fashion-mnist`` package installs the files."""

FMNIST_ENV_VAR = "VIZAPP_FMNIST_DIR"
"""Environment variable that overrides :data:`FASHION_MNIST_DIR`."""

CLASS_NAMES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
"""Label index -> class name, in Zalando Research's order."""

IMAGE_MAGIC = 2051
LABEL_MAGIC = 2049

_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

_INSTALL_HINT = (
    "install it with `apt-get install -y dataset-fashion-mnist` (Debian/Ubuntu), "
    f"or pass the folder holding the IDX files (argument `folder` or environment variable {FMNIST_ENV_VAR})"
)


def resolve_folder(folder: str | os.PathLike[str] | None = None) -> Path:
    """The Fashion-MNIST folder: ``folder`` if given, else ``$VIZAPP_FMNIST_DIR``, else the Debian location.

    Args:
        folder: explicit folder, or None.

    Returns:
        The folder as a Path (not checked for existence).
    """
    if folder is not None:
        return Path(folder)
    return Path(os.environ.get(FMNIST_ENV_VAR) or FASHION_MNIST_DIR)


def _open_idx(path: Path):
    # Accept both the gzipped files Debian ships and already-decompressed copies.
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _find(folder: Path, name: str) -> Path:
    for candidate in (folder / name, folder / name.removesuffix(".gz")):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"Fashion-MNIST file {name} not found in {folder}: {_INSTALL_HINT}")


def _read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    """Read one IDX file of unsigned bytes, checking its magic number and that the payload matches the header."""
    with _open_idx(path) as f:
        data = f.read()
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise ValueError(f"{path}: truncated IDX header ({len(data)} bytes)")
    found = struct.unpack(">I", data[:4])[0]
    if found != magic:
        raise ValueError(f"{path}: bad IDX magic number {found}, expected {magic}")
    dims = struct.unpack(f">{ndim}I", data[4:header_len])
    expected = int(np.prod(dims))
    payload = len(data) - header_len
    if payload != expected:
        raise ValueError(f"{path}: header says {dims} ({expected} bytes) but the file holds {payload} bytes")
    return np.frombuffer(data, dtype=np.uint8, offset=header_len).reshape(dims)


def load_fashion_mnist(
    split: Literal["train", "test"] = "train", folder: str | os.PathLike[str] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Load one split of Fashion-MNIST.

    Args:
        split: "train" (60,000 images) or "test" (10,000 images).
        folder: folder with the IDX files; defaults to ``$VIZAPP_FMNIST_DIR`` or :data:`FASHION_MNIST_DIR`.

    Returns:
        (images uint8 [n, 28, 28], labels int64 [n]).

    Raises:
        FileNotFoundError: the folder or a file is missing (the message says how to install the data).
        ValueError: a file is corrupt (wrong magic number, size, or image/label count mismatch).
    """
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = resolve_folder(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"Fashion-MNIST folder {root} does not exist: {_INSTALL_HINT}")
    img_name, lbl_name = _FILES[split]
    images = _read_idx(_find(root, img_name), IMAGE_MAGIC, 3)
    labels = _read_idx(_find(root, lbl_name), LABEL_MAGIC, 1)
    if images.shape[1:] != (28, 28):
        raise ValueError(f"{img_name}: expected 28x28 images, got {images.shape[1:]}")
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{split}: {images.shape[0]} images but {labels.shape[0]} labels")
    if labels.size and int(labels.max()) >= len(CLASS_NAMES):
        raise ValueError(f"{lbl_name}: label {int(labels.max())} out of range 0..{len(CLASS_NAMES) - 1}")
    # frombuffer views are read-only; copy so callers get ordinary writable arrays.
    return images.copy(), labels.astype(np.int64)


def dataset_checksums(folder: str | os.PathLike[str] | None = None) -> dict[str, str]:
    """SHA-256 of each Fashion-MNIST file present in the folder, to record in the model card.

    Args:
        folder: folder with the IDX files; defaults as in :func:`load_fashion_mnist`.

    Returns:
        {file name: hex sha256}, in a fixed order, for the files that exist.
    """
    root = resolve_folder(folder)
    out: dict[str, str] = {}
    for split in ("train", "test"):
        for name in _FILES[split]:
            try:
                path = _find(root, name)
            except FileNotFoundError:
                continue
            out[path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out
