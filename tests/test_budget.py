"""Size budget and allow-list checked before any download or allocation, and the byte-bounded model cache."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import timm
import torch

import vizapp
from vizapp import budget as B
from vizapp.errors import ModelLoadError, ModelTooLargeError, VizappError
from vizapp.models import timm as _timm_adapter  # noqa: F401 - models.timm is patched below

GIANTS = [
    ("vit_giant_patch14_dinov2", 1_136_479_232),
    ("vit_gigantic_patch14_clip_224", 1_844_908_544),
    ("vit_7b_patch16_dinov3", None),  # count checked against timm below only when timm has it
]


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


@pytest.mark.parametrize(("name", "expected"), GIANTS)
def test_giants_are_refused_quickly_with_size_and_limit(name, expected):
    if not timm.is_model(name):
        pytest.skip(f"timm {timm.__version__} has no {name}")
    rss0 = _peak_rss_mib()
    t0 = time.monotonic()
    with pytest.raises(ModelTooLargeError) as err:
        B.check_budget(name, B.Budget())
    assert time.monotonic() - t0 < 5
    assert _peak_rss_mib() - rss0 < 500  # a float32 giant would be >= 4.5 GB
    msg = str(err.value)
    assert name in msg and "400.0 M" in msg and "VIZAPP_MAX_PARAMS" in msg and " B parameters" in msg
    if expected is not None:
        assert B.count_parameters(name) == expected
    assert isinstance(err.value, ModelLoadError) and isinstance(err.value, VizappError)


def test_parameter_counts_match_a_real_build():
    for name, kwargs in [("vit_tiny_patch16_224", {}), ("vit_small_patch16_dinov3", dict(img_size=64, depth=2))]:
        real = timm.create_model(name, pretrained=False, **kwargs)
        n = sum(t.numel() for t in list(real.parameters()) + list(real.buffers()))
        assert B.count_parameters(name, **kwargs) == n
        assert B.count_parameters(name + ".some_tag", **kwargs) == n
        assert B.module_nbytes(real) == 4 * n
    assert B.module_nbytes(timm.create_model("vit_tiny_patch16_224", depth=1).half()) == 2 * B.count_parameters(
        "vit_tiny_patch16_224", depth=1
    )  # no buffers: every element at 2 bytes


def test_counting_does_not_move_the_rng():
    torch.manual_seed(3)
    before = torch.random.get_rng_state()
    B.count_parameters("vit_tiny_patch16_224")
    assert torch.equal(torch.random.get_rng_state(), before)


def test_small_and_large_pass_the_default_budget():
    assert B.check_budget("vit_tiny_patch16_224.augreg_in21k_ft_in1k", B.Budget()) == 5_717_416
    assert B.check_budget("vit_large_patch16_224", B.Budget()) == 304_326_632  # ViT-L is the documented ceiling
    with pytest.raises(ModelTooLargeError, match="630.8 M"):
        B.check_budget("vit_huge_patch14_224", B.Budget())
    assert B.check_budget("vit_giant_patch14_dinov2", B.Budget(max_params=None)) is None  # operator turned it off


def test_kwargs_change_the_count():
    small = B.count_parameters("vit_tiny_patch16_224", depth=2)
    assert small < B.count_parameters("vit_tiny_patch16_224")
    with pytest.raises(ModelTooLargeError):
        B.check_budget("vit_tiny_patch16_224", B.Budget(max_params=small - 1), depth=2)
    assert B.check_budget("vit_tiny_patch16_224", B.Budget(max_params=small), depth=2) == small


def test_allow_list_refuses_everything_else():
    b = B.Budget(allowed=frozenset({"vit_tiny_patch16_224.augreg_in21k_ft_in1k"}))
    assert B.check_budget("vit_tiny_patch16_224.augreg_in21k_ft_in1k", b) == 5_717_416
    for other in ["vit_tiny_patch16_224", "vit_small_patch16_224", "hf-hub:someone/anything"]:
        with pytest.raises(ModelTooLargeError, match="not one of the models this server offers.*augreg_in21k"):
            B.check_budget(other, b)


def test_budget_from_env():
    assert B.Budget.from_env({}) == B.Budget(B.DEFAULT_MAX_PARAMS, None, B.DEFAULT_CACHE_BYTES)
    b = B.Budget.from_env({"VIZAPP_MAX_PARAMS": "1e8", "VIZAPP_MODELS": " a, b.tag ,, ", "VIZAPP_CACHE_BYTES": "1_000"})
    assert b == B.Budget(100_000_000, frozenset({"a", "b.tag"}), 1000)
    assert B.Budget.from_env({"VIZAPP_MAX_PARAMS": "none"}).max_params is None
    for bad in [{"VIZAPP_MAX_PARAMS": "lots"}, {"VIZAPP_MAX_PARAMS": "0"}, {"VIZAPP_CACHE_BYTES": "-5"}]:
        with pytest.raises(ValueError, match="VIZAPP_"):
            B.Budget.from_env(bad)


def test_unbuildable_architecture_fails_closed():
    with pytest.raises(ModelLoadError, match="cannot build"):
        B.check_budget("vit_tiny_patch16_224", B.Budget(), no_such_kwarg=1)


def test_hub_id_counted_from_its_config_only(monkeypatch):
    cfg = {"architecture": "vit_giant_patch14_dinov2", "num_classes": 0, "model_args": {"img_size": 518}}
    monkeypatch.setattr(B, "hub_config", lambda repo, probe=None: cfg if repo == "someone/big" else pytest.fail(repo))
    with pytest.raises(ModelTooLargeError, match="hf-hub:someone/big.*1.1"):
        B.check_budget("hf-hub:someone/big", B.Budget())
    monkeypatch.setattr(B, "hub_config", lambda repo, probe=None: {"architecture": "not_a_model"})
    with pytest.raises(ModelLoadError, match="no timm architecture"):
        B.check_budget("hf-hub:someone/odd", B.Budget())


def test_uncached_hub_id_offline_fails_fast(tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path))
    t0 = time.monotonic()
    with pytest.raises(ModelLoadError, match="unreachable"):
        B.check_budget("hf-hub:someone/uncached", B.Budget(), hub_reachable=lambda: False)
    assert time.monotonic() - t0 < 2
    monkeypatch.setattr(B, "BUDGET", B.Budget())
    monkeypatch.setattr(
        vizapp.models.timm, "hub_reachable", lambda *a, **k: False
    )  # what load_model's probe says offline
    with pytest.raises(ModelLoadError, match="unreachable"):
        vizapp.load_model("hf-hub:someone/uncached", device="cpu")
    assert time.monotonic() - t0 < 4


def test_hub_config_read_from_the_local_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    rev = "0" * 40
    base = tmp_path / "models--someone--tiny"
    (base / "snapshots" / rev).mkdir(parents=True)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(rev)
    (base / "snapshots" / rev / "config.json").write_text(json.dumps({"architecture": "vit_tiny_patch16_224"}))
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path))
    assert B.check_budget("hf-hub:someone/tiny", B.Budget()) == 5_717_416


def test_load_model_refuses_a_giant_before_allocating(monkeypatch):
    monkeypatch.setattr(B, "BUDGET", B.Budget())  # the defaults, whatever this machine's environment says
    rss0 = _peak_rss_mib()
    t0 = time.monotonic()
    with pytest.raises(ModelTooLargeError, match="vit_giant_patch14_dinov2"):
        vizapp.load_model("vit_giant_patch14_dinov2", pretrained=False, device="cpu")
    assert time.monotonic() - t0 < 5 and _peak_rss_mib() - rss0 < 500
    with pytest.raises(ModelTooLargeError):  # the pretrained path is refused before the hub is consulted
        vizapp.load_model("vit_giant_patch14_dinov2.lvd142m", device="cpu")
    monkeypatch.setattr(B, "BUDGET", B.Budget(allowed=frozenset({"vit_tiny_patch16_224"})))
    with pytest.raises(ModelTooLargeError, match="not one of"):
        vizapp.load_model("vit_small_patch16_224", pretrained=False, device="cpu", img_size=32, depth=1)
    vm = vizapp.load_model("vit_tiny_patch16_224", pretrained=False, device="cpu", img_size=32, depth=1)
    assert vm.source == "random"


def test_three_giants_in_a_fresh_process_stay_small():
    # A fresh interpreter, so its peak RSS says what refusing costs: imports only, no GBs of weights.
    code = textwrap.dedent(
        """
        import resource, sys, vizapp
        from vizapp.errors import ModelTooLargeError
        for name in sys.argv[1:]:
            try:
                vizapp.load_model(name, pretrained=False, device="cpu")
            except ModelTooLargeError:
                continue
            raise SystemExit(name + " loaded")
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
        """
    )
    names = [n for n, _ in GIANTS if timm.is_model(n)]
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("VIZAPP_")}
    out = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.strip().splitlines()[-1]) < 2000  # MiB; torch + timm import ~0.7 GB, one giant is 4.5 GB


# ----------------------------------------------------------------------------------------------------------------
# The cache


class Fake:
    def __init__(self, name: str, nbytes: int) -> None:
        self.name, self.nbytes = name, nbytes


def fake_cache(max_models: int = 10, max_bytes: int = 100) -> B.BudgetedModelCache:
    return B.BudgetedModelCache(max_models, max_bytes, size_of=lambda f: f.nbytes)


def test_cache_evicts_least_recently_used_until_the_new_model_fits():
    c = fake_cache(max_bytes=100)
    a = c.get_or_load(("a",), lambda: Fake("a", 40))
    c.get_or_load(("b",), lambda: Fake("b", 40))
    assert c.get_or_load(("a",), lambda: pytest.fail("cached")) is a  # a is now the most recent
    c.get_or_load(("c",), lambda: Fake("c", 50))  # 130 > 100: b (LRU) goes, 90 left
    assert c.keys() == [("a",), ("c",)] and c.total_bytes() == 90
    c.get_or_load(("d",), lambda: Fake("d", 95))  # both a and c must go
    assert c.keys() == [("d",)] and c.total_bytes() == 95


def test_cache_is_bounded_by_count_too():
    c = fake_cache(max_models=2, max_bytes=10**9)
    for k in "abc":
        c.get_or_load((k,), lambda k=k: Fake(k, 1))
    assert c.keys() == [("b",), ("c",)]


def test_cache_of_size_zero_keeps_nothing():
    c = fake_cache(max_models=0)
    assert c.get_or_load(("a",), lambda: Fake("a", 1)).name == "a"
    assert c.keys() == [] and c.total_bytes() == 0


def test_cache_refuses_a_model_bigger_than_the_whole_budget_and_keeps_the_rest():
    c = fake_cache(max_bytes=100)
    c.get_or_load(("a",), lambda: Fake("a", 60))
    with pytest.raises(ModelTooLargeError, match="VIZAPP_CACHE_BYTES"):
        c.get_or_load(("huge",), lambda: Fake("huge", 101))
    assert c.keys() == [("a",)]
    assert c.get_or_load(("exact",), lambda: Fake("exact", 100)).name == "exact"  # equal to the budget fits
    assert c.keys() == [("exact",)]


def test_cache_failed_load_is_not_cached_and_can_be_retried():
    c = fake_cache()

    def boom() -> Fake:
        raise ModelLoadError("offline")

    with pytest.raises(ModelLoadError):
        c.get_or_load(("a",), boom)
    assert c.keys() == []
    assert c.get_or_load(("a",), lambda: Fake("a", 1)).name == "a"


def test_cache_concurrent_first_loads_load_once():
    c = fake_cache()
    calls = []
    gate = threading.Event()

    def slow() -> Fake:
        calls.append(1)
        gate.wait(5)
        return Fake("a", 1)

    results: list[Fake] = []
    threads = [threading.Thread(target=lambda: results.append(c.get_or_load(("a",), slow))) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    gate.set()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len({id(r) for r in results}) == 1


def test_default_size_is_the_model_bytes():
    vm = vizapp.load_model("vit_tiny_patch16_224", pretrained=False, device="cpu", img_size=32, depth=1)
    c = B.BudgetedModelCache(3, max_bytes=10**9)
    c.get_or_load(("t",), lambda: vm)
    assert c.total_bytes() == B.module_nbytes(vm.model) > 0
    assert isinstance(vizapp.models.MODEL_CACHE, B.BudgetedModelCache)
    assert vizapp.models.MODEL_CACHE.max_bytes == B.BUDGET.cache_bytes


def test_module_nbytes_counts_buffers():
    m = torch.nn.BatchNorm1d(4)
    assert B.module_nbytes(m) == 4 * 8 + 4 * 8 + 8  # weight, bias, running mean/var (float32), num_batches (int64)
