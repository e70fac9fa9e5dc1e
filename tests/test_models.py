"""Model loading: local files, the hub cache path (with locally saved files), offline failure, the LRU cache."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import vizapp
from tests.conftest import random_image, small_model
from vizapp import models
from vizapp.models import timm as _timm_adapter  # noqa: F401 - models.timm is patched below


def _save_random(arch: str, path: Path, **kwargs) -> torch.nn.Module:
    import timm

    torch.manual_seed(7)
    m = timm.create_model(arch, pretrained=False, **kwargs).eval()
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(path))
    return m


def test_local_safetensors_with_arch(tmp_path):
    ref = _save_random("vit_tiny_patch16_224", tmp_path / "w.safetensors")
    vm = vizapp.load_model(str(tmp_path / "w.safetensors"), arch="vit_tiny_patch16_224", device="cpu")
    assert vm.source == "file"
    x = vm.transform(random_image(0))[None]
    with torch.no_grad():
        assert torch.equal(vm.model(x), ref(x))
    assert vm.labels[1].startswith("goldfish")  # ImageNet-1k head -> timm's ImageNet names


def test_local_safetensors_needs_arch_and_must_match(tmp_path):
    _save_random("vit_tiny_patch16_224", tmp_path / "w.safetensors")
    with pytest.raises(vizapp.BadParameterError, match="arch"):
        vizapp.load_model(str(tmp_path / "w.safetensors"), device="cpu")
    with pytest.raises(vizapp.ModelLoadError, match="does not match"):
        vizapp.load_model(str(tmp_path / "w.safetensors"), arch="vit_small_patch16_224", device="cpu")
    (tmp_path / "bad.safetensors").write_bytes(b"\x80\x04not a safetensors file")
    with pytest.raises(vizapp.VizappError):
        vizapp.load_model(str(tmp_path / "bad.safetensors"), arch="vit_tiny_patch16_224", device="cpu")
    with pytest.raises(vizapp.BadParameterError, match="disabled"):
        vizapp.load_model(str(tmp_path / "w.safetensors"), arch="vit_tiny_patch16_224", allow_files=False)


def _fake_hub_cache(root: Path, repo: str, files: dict[str, Path]) -> None:
    """Lay files out as huggingface_hub's cache does (models--owner--name/snapshots/<rev>/...)."""
    rev = "0" * 40
    base = root / ("models--" + repo.replace("/", "--"))
    snap = base / "snapshots" / rev
    snap.mkdir(parents=True)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(rev)
    for name, src in files.items():
        (snap / name).write_bytes(src.read_bytes())


def test_pretrained_tag_loads_from_hub_cache_without_network(tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    name = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    ref = _save_random("vit_tiny_patch16_224", tmp_path / "model.safetensors")
    _fake_hub_cache(tmp_path / "hub", "timm/" + name, {"model.safetensors": tmp_path / "model.safetensors"})
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(models.timm, "hub_reachable", lambda *a, **k: pytest.fail("must not touch the network"))
    models.MODEL_CACHE.clear()
    vm = vizapp.load_model(name, device="cpu")
    assert vm.source == "pretrained"
    assert vm.input_size == (3, 224, 224) and vm.mean == (0.5, 0.5, 0.5)  # from the tag's data config
    x = vm.transform(random_image(1))[None]
    with torch.no_grad():
        torch.testing.assert_close(vm.model(x), ref(x))


def test_a_cached_hub_file_is_read_as_a_state_dict_whatever_the_timm_version(tmp_path, monkeypatch):
    """The AugReg tags say custom_load=True (their first weights were JAX .npz files). timm 1.0.31 drops that when an
    overlay names a file; timm 1.0.30 and earlier keep it and hand the hub's model.safetensors to the .npz reader
    (timm 1.0.29 refuses it, so the test above fails there without this). So the overlay says which reader."""
    import huggingface_hub.constants as hc
    import timm

    name = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    assert timm.models.get_pretrained_cfg(name).custom_load is True  # the case this is about
    _save_random("vit_tiny_patch16_224", tmp_path / "model.safetensors")
    _fake_hub_cache(tmp_path / "hub", "timm/" + name, {"model.safetensors": tmp_path / "model.safetensors"})
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(models.timm, "hub_reachable", lambda *a, **k: pytest.fail("must not touch the network"))
    overlays = []
    real = timm.create_model

    def create_model(*args, **kwargs):
        overlays.append(kwargs.get("pretrained_cfg_overlay"))
        return real(*args, **kwargs)

    monkeypatch.setattr(timm, "create_model", create_model)
    models.MODEL_CACHE.clear()
    vizapp.load_model(name, device="cpu")
    (overlay,) = [o for o in overlays if o]
    assert overlay["file"].endswith("model.safetensors") and overlay["custom_load"] is False
    assert models.timm._from_file("/x/weights.npz")["custom_load"] is True  # an original .npz: the model's reader
    models.MODEL_CACHE.clear()


def test_hf_hub_id_loads_from_hub_cache_without_network(tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    ref = _save_random("vit_tiny_patch16_224", tmp_path / "model.safetensors", num_classes=3)
    cfg = {
        "architecture": "vit_tiny_patch16_224",
        "num_classes": 3,
        "pretrained_cfg": {
            "input_size": [3, 224, 224],
            "mean": [0.1, 0.2, 0.3],
            "std": [0.5, 0.5, 0.5],
            "label_names": ["cat", "dog", "eel"],
            "crop_pct": 1.0,
            "interpolation": "bicubic",
        },
    }
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    _fake_hub_cache(
        tmp_path / "hub",
        "someone/tiny-vit",
        {"model.safetensors": tmp_path / "model.safetensors", "config.json": tmp_path / "config.json"},
    )
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(models.timm, "hub_reachable", lambda *a, **k: pytest.fail("must not touch the network"))
    vm = vizapp.load_model("hf-hub:someone/tiny-vit", device="cpu")
    assert vm.labels == ("cat", "dog", "eel")
    assert vm.mean == pytest.approx((0.1, 0.2, 0.3))
    x = vm.transform(random_image(2))[None]
    with torch.no_grad():
        torch.testing.assert_close(vm.model(x), ref(x))


def test_offline_and_uncached_fails_fast_with_a_useful_message(tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "empty"))
    t0 = time.monotonic()
    with pytest.raises(vizapp.ModelLoadError) as err:
        vizapp.load_model("vit_small_patch16_224.augreg_in21k_ft_in1k", device="cpu")
    assert time.monotonic() - t0 < 10
    msg = str(err.value)
    assert "vit_small_patch16_224.augreg_in21k_ft_in1k" in msg and ".safetensors" in msg and "bundled" in msg
    # The failure is not cached: a later successful source would still be tried.
    assert not any(k[0] == "vit_small_patch16_224.augreg_in21k_ft_in1k" for k in models.MODEL_CACHE.keys())  # noqa: SIM118 - the cache is not a dict


@pytest.mark.parametrize(
    "bad, match",
    [
        ("", "empty"),
        ("x" * 400, "characters"),
        ("vit_base_patch16_reg4_dinov2", "did you mean vit_base_patch14_reg4_dinov2"),
        ("../../etc/passwd", "not a timm model name"),
        ("hf-hub:../../x", "not a valid hub id"),
        (42, "string"),
    ],
)
def test_model_ids_are_validated_before_loading(bad, match):
    with pytest.raises(vizapp.BadParameterError, match=match):
        vizapp.load_model(bad)


def test_cache_returns_the_same_object_and_is_bounded(monkeypatch):
    monkeypatch.setattr(models, "MODEL_CACHE", models.BudgetedModelCache(2, 10**12))
    a = small_model("vit_tiny_patch16_224", img_size=32, depth=1)
    assert small_model("vit_tiny_patch16_224", img_size=32, depth=1) is a
    small_model("vit_tiny_patch16_224", img_size=48, depth=1)
    small_model("vit_tiny_patch16_224", img_size=64, depth=1)
    assert len(models.MODEL_CACHE.keys()) == 2
    assert small_model("vit_tiny_patch16_224", img_size=32, depth=1) is not a  # evicted, reloaded


def test_transform_follows_the_data_config():
    vm = small_model("vit_tiny_patch16_224", img_size=(48, 80), depth=1)
    x = vm.transform(random_image(3, size=(300, 200)))
    assert x.shape == (3, 48, 80)
    r = vizapp.analyze(vm, random_image(3))
    assert r.image.shape == (48, 80, 3) and r.image.dtype == np.uint8
