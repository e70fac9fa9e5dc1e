"""Fashion-MNIST loader and the training script's smoke run."""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from vizapp.bundled.data import CLASS_NAMES, FASHION_MNIST_DIR, dataset_checksums, load_fashion_mnist, resolve_folder

HAVE_FMNIST = (Path(FASHION_MNIST_DIR) / "t10k-images-idx3-ubyte.gz").is_file()
needs_fmnist = pytest.mark.skipif(
    not HAVE_FMNIST,
    reason=f"Fashion-MNIST not installed in {FASHION_MNIST_DIR} (apt-get install dataset-fashion-mnist)",
)


def _write_idx(path: Path, magic: int, array: np.ndarray, extra: bytes = b"") -> None:
    header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes() + extra)


def _write_split(
    folder: Path, n: int = 5, image_magic: int = 2051, label_magic: int = 2049, extra: bytes = b""
) -> None:
    rng = np.random.default_rng(0)
    _write_idx(folder / "t10k-images-idx3-ubyte.gz", image_magic, rng.integers(0, 256, (n, 28, 28)), extra)
    _write_idx(folder / "t10k-labels-idx1-ubyte.gz", label_magic, np.arange(n) % 10)


def test_synthetic_files_round_trip(tmp_path: Path) -> None:
    _write_split(tmp_path, n=7)
    x, y = load_fashion_mnist("test", tmp_path)
    assert x.shape == (7, 28, 28) and x.dtype == np.uint8 and x.flags.writeable
    assert y.dtype == np.int64 and y.tolist() == [0, 1, 2, 3, 4, 5, 6]
    sums = dataset_checksums(tmp_path)
    assert set(sums) == {"t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"}
    assert all(len(v) == 64 for v in sums.values())


def test_bad_magic_number_is_rejected(tmp_path: Path) -> None:
    # The label magic on an image file is the classic mix-up the check exists for.
    _write_split(tmp_path, image_magic=2049)
    with pytest.raises(ValueError, match="magic"):
        load_fashion_mnist("test", tmp_path)


def test_size_mismatch_is_rejected(tmp_path: Path) -> None:
    _write_split(tmp_path, extra=b"\x00" * 13)
    with pytest.raises(ValueError, match="bytes"):
        load_fashion_mnist("test", tmp_path)


def test_missing_folder_says_how_to_install(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        load_fashion_mnist("test", tmp_path / "nowhere")


def test_missing_file_says_how_to_install(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        load_fashion_mnist("train", tmp_path)


def test_bad_split_name() -> None:
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist("validation")  # type: ignore[arg-type]


def test_env_var_overrides_default_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_split(tmp_path, n=3)
    monkeypatch.setenv("VIZAPP_FMNIST_DIR", str(tmp_path))
    assert resolve_folder() == tmp_path
    assert load_fashion_mnist("test")[0].shape == (3, 28, 28)
    assert resolve_folder("/elsewhere") == Path("/elsewhere")


@needs_fmnist
@pytest.mark.parametrize(("split", "n"), [("train", 60_000), ("test", 10_000)])
def test_real_dataset_shapes(split: str, n: int) -> None:
    x, y = load_fashion_mnist(split)  # type: ignore[arg-type]
    assert x.shape == (n, 28, 28) and x.dtype == np.uint8
    assert y.shape == (n,) and y.dtype == np.int64
    assert y.min() == 0 and y.max() == len(CLASS_NAMES) - 1
    # Fashion-MNIST is balanced: every class has exactly a tenth of each split.
    assert np.bincount(y).tolist() == [n // 10] * 10


@needs_fmnist
def test_train_smoke_run_writes_loadable_card_and_weights(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from vizapp.bundled.train import build_model, main

    card = main(
        [
            "--out",
            str(tmp_path),
            "--name",
            "smoke",
            "--epochs",
            "1",
            "--limit",
            "256",
            "--batch-size",
            "128",
            "--embed-dim",
            "32",
            "--depth",
            "2",
            "--num-heads",
            "2",
            "--device",
            "cpu",
            "--log-every",
            "1000",
        ]
    )
    on_disk = json.loads((tmp_path / "smoke.json").read_text())
    assert on_disk == card
    expected_keys = {
        "name",
        "architecture",
        "model_args",
        "input_size",
        "mean",
        "std",
        "polarity",
        "interpolation",
        "class_names",
        "dataset",
        "dataset_sha256",
        "epochs",
        "seed",
        "batch_size",
        "lr",
        "augmentation",
        "test_accuracy",
        "train_seconds",
        "hardware",
        "torch_version",
        "timm_version",
        "created",
    }
    assert set(card) == expected_keys
    assert card["architecture"] == "VisionTransformer" and card["input_size"] == [1, 28, 28]
    assert card["polarity"] == "light_on_dark" and card["class_names"] == list(CLASS_NAMES)
    assert 0.0 <= card["test_accuracy"] <= 1.0
    assert len(card["dataset_sha256"]) == 4
    model = build_model(card["model_args"])
    model.load_state_dict(load_file(str(tmp_path / "smoke.safetensors")), strict=True)
    with torch.inference_mode():
        assert model.eval()(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    # The resumable checkpoint holds tensors and plain containers only.
    ckpt = torch.load(tmp_path / "smoke.ckpt.pt", weights_only=True)
    assert ckpt["epoch"] == 1
