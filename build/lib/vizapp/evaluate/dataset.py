"""What an evaluation runs over: an ImageFolder tree, a flat folder of images, or the Fashion-MNIST test set.

An item is a small JSON-able dict ``{"id", "source", "target"}``: ``source`` is a file path or ``fmnist-test:INDEX``,
``target`` the model's class index for the image (-1 when the data carries no label: the predicted class is used).
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from vizapp.errors import VizappError

FMNIST_TEST = "fmnist-test"
"""The DATA argument naming Debian's Fashion-MNIST test split."""

NO_TARGET = -1

Item = dict[str, Any]


class DatasetError(VizappError):
    """The DATA argument cannot be evaluated (missing, empty, or its class folders do not match the model)."""


def _visible(p: Path) -> bool:
    return not p.name.startswith(".")


def _key(name: str) -> str:
    # "T-shirt/top" cannot be a folder name: match on lower-case letters and digits only ("t-shirt_top" works).
    return re.sub(r"[^0-9a-z]", "", name.lower())


def class_index(folder_name: str, labels: tuple[str, ...]) -> int:
    """The model's class index for an ImageFolder sub-folder, matched by name (exact, else letters and digits)."""
    if folder_name in labels:
        return labels.index(folder_name)
    keys = [_key(lbl) for lbl in labels]
    k = _key(folder_name)
    if k and keys.count(k) == 1:
        return keys.index(k)
    shown = ", ".join(repr(lbl) for lbl in labels[:12]) + (" ..." if len(labels) > 12 else "")
    raise DatasetError(
        f"class folder {folder_name!r} is not one of the model's {len(labels)} classes ({shown}); rename the folder to a "
        "class name, or put the images in one flat folder to score them against the predicted class"
    )


def list_items(data: str | os.PathLike[str], labels: tuple[str, ...], fmnist_dir: str | None = None) -> list[Item]:
    """Every item of ``data`` in a fixed order (sorted by class folder, then file name).

    Args:
        data: a folder (ImageFolder layout: one sub-folder per class; or flat: image files only), or ``fmnist-test``.
        labels: the model's class names, to map class folders (and Fashion-MNIST labels) to class indices.
        fmnist_dir: folder with the Fashion-MNIST IDX files (default: Debian's location or ``$VIZAPP_FMNIST_DIR``).

    Raises:
        DatasetError: missing or empty folder, a class folder with no files, a folder name that is not a class, a
            folder that mixes files and class folders, or Fashion-MNIST classes the model does not have.
    """
    if str(data) == FMNIST_TEST:
        from vizapp.bundled.data import CLASS_NAMES

        _, targets = _fmnist_test(fmnist_dir)
        to_model = np.array([class_index(name, labels) for name in CLASS_NAMES])
        return [
            {"id": f"{FMNIST_TEST}/{i:05d}", "source": f"{FMNIST_TEST}:{i}", "target": int(to_model[t])}
            for i, t in enumerate(targets)
        ]
    root = Path(data)
    if not root.is_dir():
        raise DatasetError(f"{str(data)[:200]!r} is not a folder; pass an image folder or {FMNIST_TEST!r}")
    entries = sorted(p for p in root.iterdir() if _visible(p))
    dirs = [p for p in entries if p.is_dir()]
    files = [p for p in entries if p.is_file()]
    if not entries:
        raise DatasetError(f"{root} is empty: put images in it (flat) or one sub-folder of images per class")
    if dirs and files:
        raise DatasetError(
            f"{root} mixes {len(files)} files with {len(dirs)} sub-folders; use either class sub-folders only "
            "(ImageFolder layout) or image files only"
        )
    if files:
        return [{"id": p.name, "source": str(p.resolve()), "target": NO_TARGET} for p in files]
    items: list[Item] = []
    for d in dirs:
        target = class_index(d.name, labels)
        inside = sorted(p for p in d.rglob("*") if p.is_file() and _visible(p))
        if not inside:
            raise DatasetError(f"class folder {d.name!r} has no images; remove it or add its images")
        items += [
            {"id": f"{d.name}/{p.relative_to(d).as_posix()}", "source": str(p.resolve()), "target": target}
            for p in inside
        ]
    return items


@functools.lru_cache(maxsize=2)
def _fmnist_test(fmnist_dir: str | None) -> tuple[np.ndarray, np.ndarray]:
    from vizapp.bundled.data import load_fashion_mnist

    return load_fashion_mnist("test", fmnist_dir)


def load_pixels(item: Item, fmnist_dir: str | None = None) -> np.ndarray:
    """The item's image as RGB uint8 [H, W, 3], decoded with :func:`vizapp.imageio.decode_image` (size-limited).

    Raises:
        vizapp.BadImageError: unreadable, corrupt, too large or not an image.
    """
    src = str(item["source"])
    if src.startswith(FMNIST_TEST + ":"):
        gray = _fmnist_test(fmnist_dir)[0][int(src.split(":", 1)[1])]  # [28, 28]
        return np.repeat(gray[:, :, None], 3, axis=2)
    from vizapp.imageio import decode_image

    return np.asarray(decode_image(src).image, dtype=np.uint8)
