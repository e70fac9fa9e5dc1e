"""vizapp's fused attention kernels (:mod:`vizapp.fused_attention`): one layer's output, the statistics' rows and the
heads' sum without the attention formed. On a GPU they are the default; here they run through Triton's interpreter
(``TRITON_INTERPRET=1`` is set by conftest.py before anything imports Triton, when no GPU is present), the same kernel
code, checked against the formed attention, a hand-computed case, and every analysis route that uses them."""

from __future__ import annotations

import math
import os
from dataclasses import replace
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from conftest import FAMILIES, random_image, small_model

import vizapp
from vizapp import fused_attention, fused_check, statistics
from vizapp.analysis.distance import patch_distance_matrix
from vizapp.statistics import HeadStatistic
from vizapp.statistics_pass import forward_statistics

interpreted = pytest.mark.skipif(
    not fused_attention.interpreted(), reason="Triton's interpreter is off in this process (a GPU is present)"
)
pytestmark = interpreted
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def fused(monkeypatch):
    """The kernels on for CPU tensors (through the interpreter), and a fresh process state for each test."""
    monkeypatch.setenv("VIZAPP_FUSED_ATTENTION", "interpret")
    monkeypatch.setattr(fused_attention, "_failure", None)
    monkeypatch.setattr(fused_attention, "_declined", {})
    assert fused_attention.usable(torch.device("cpu"))
    return fused_attention


def reference(q, k, v, scale, dist, p, bias=None):
    """What the formed route computes, in float64: the output, entropy and mean-distance rows, and the heads' sum."""
    r = fused_check.reference(q, k, v, scale, dist, p, bias)
    return r["output"], r["entropy"], r["distance"], r["head sum"]


def run(q, k, v, scale, dist, p, head_sum=True, bias=None):
    b, h, n, _ = q.shape
    rows = {"entropy": torch.full((b, h, n), math.nan), "distance": torch.full((b, h, n - p), math.nan)}
    hs = torch.full((b, n, n), math.nan) if head_sum else None
    out = fused_attention.attention(q, k, v, scale, rows, dist, p, hs, bias)
    return out, rows["entropy"], rows["distance"], hs


@pytest.mark.parametrize(
    "b, h, grid, p, d",
    [
        (2, 3, (10, 10), 1, 16),  # 101 tokens: two query and two key tiles, the second mostly empty
        (1, 2, (5, 7), 5, 24),  # a non-square grid after CLS and 4 registers; a head width not a power of two
        (1, 4, (8, 8), 0, 32),  # no prefix token: exactly one tile of 64
        (3, 1, (9, 9), 4, 64),  # prefix tokens only in the first tile's rows, 85 tokens
    ],
)
def test_the_kernels_equal_the_formed_attention(fused, b, h, grid, p, d):
    torch.manual_seed(1)
    n = p + grid[0] * grid[1]
    # q, k, v as a qkv projection lays them out (strided views), scores of a few units as in a trained model
    q, k, v = (torch.randn(b, n, 3, h, d) * 1.5).permute(2, 0, 3, 1, 4)
    dist = patch_distance_matrix(grid, 16)
    scale = d**-0.5
    out, ent, dst, hs = run(q, k, v, scale, dist, p)
    want = reference(q, k, v, scale, dist, p)
    assert fused.failure() is None
    torch.testing.assert_close(out.double(), want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.double(), want[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dst.double(), want[2], rtol=1e-5, atol=1e-4)  # distances of up to 180 px
    torch.testing.assert_close(hs.double(), want[3], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(1, 3), (2, 1), (1, 1)], ids=["per head", "per image", "shared"])
def test_a_bias_and_a_mask_go_into_the_scores(fused, shape):
    """An additive bias broadcast over images or heads (BEiT's relative position is [1, H, N, N]), with -inf where a
    key is masked: for some rows every key of the first tile (64) and more, so the running maximum starts at -inf."""
    torch.manual_seed(4)
    b, h, p, d, grid = 2, 3, 1, 16, (10, 10)
    n = p + grid[0] * grid[1]
    q, k, v = (torch.randn(b, n, 3, h, d) * 1.5).permute(2, 0, 3, 1, 4)
    bias = torch.randn(*shape, n, n)
    bias[..., :5, :70] = -math.inf  # the first five queries see keys 70.. only
    bias[..., 90:, 3:40] = -math.inf
    dist = patch_distance_matrix(grid, 16)
    got = run(q, k, v, d**-0.5, dist, p, bias=bias)
    want = reference(q, k, v, d**-0.5, dist, p, bias.expand(b, h, n, n))
    assert fused.failure() is None
    for mine, theirs, name in zip(got, want, ("output", "entropy", "distance", "head sum"), strict=True):
        torch.testing.assert_close(mine.double(), theirs, rtol=1e-5, atol=1e-4, msg=name)


def test_uniform_attention_by_hand(fused):
    """q = 0: every weight is 1/N. Then each row's entropy is log N, the heads' sum H/N everywhere, the output the
    tokens' mean value, and the mean distance over the queries the ViT paper's 116.5 px for 14 x 14 patches of 16 px
    (the mean of the distance matrix; test_analysis checks the same figure on the formed route)."""
    b, h, p, d = 1, 2, 1, 16
    n = p + 14 * 14
    q = torch.zeros(b, h, n, d)
    k = torch.randn(b, h, n, d)
    v = torch.randn(b, h, n, d)
    out, ent, dst, hs = run(q, k, v, 0.125, patch_distance_matrix(14, 16), p)
    torch.testing.assert_close(ent, torch.full_like(ent, math.log(n)))
    torch.testing.assert_close(hs, torch.full_like(hs, h / n))
    torch.testing.assert_close(out, v.mean(dim=2, keepdim=True).expand_as(out))
    assert abs(dst.mean().item() - 116.5) < 0.05


def test_a_bfloat16_layer_computes_in_float32_and_returns_the_values_dtype(fused):
    torch.manual_seed(2)
    q, k, v = (torch.randn(2, 101, 3, 2, 32) * 2).to(torch.bfloat16).permute(2, 0, 3, 1, 4)
    dist = patch_distance_matrix(10, 16)
    out, ent, dst, hs = run(q, k, v, 32**-0.5, dist, 1)
    want = reference(q, k, v, 32**-0.5, dist, 1)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), want[0], rtol=1e-2, atol=1e-2)  # one bfloat16 rounding of the output
    torch.testing.assert_close(ent.double(), want[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hs.double(), want[3], rtol=1e-5, atol=1e-6)


def test_the_setting_parses_and_the_default_leaves_the_cpu_alone(monkeypatch):
    for value, want in (("0", "0"), ("interpret", "interpret"), (" Interpret ", "interpret"), ("1", "1"), ("x", "1")):
        monkeypatch.setenv("VIZAPP_FUSED_ATTENTION", value)
        assert fused_attention.mode() == want
    monkeypatch.delenv("VIZAPP_FUSED_ATTENTION")
    assert not fused_attention.usable(torch.device("cpu"))
    monkeypatch.setenv("VIZAPP_FUSED_ATTENTION", "interpret")
    assert fused_attention.usable(torch.device("cpu"))
    with pytest.raises(ValueError, match="computes"):
        fused_attention.attention(*torch.zeros(3, 1, 1, 4, 16), 1.0, {"max_weight": torch.zeros(1, 1, 4)})


def count_calls(monkeypatch) -> list[tuple[int, ...]]:
    calls: list[tuple[int, ...]] = []
    kernel = fused_attention.attention

    def counted(q, *args, **kwargs):
        calls.append(tuple(q.shape))
        return kernel(q, *args, **kwargs)

    monkeypatch.setattr(fused_attention, "attention", counted)
    return calls


def watch_launches(monkeypatch, before) -> None:
    """Each launch of either kernel calls ``before(grid, keyword arguments)`` first (which may raise, as a launch that
    fails would), then launches."""
    compiled = fused_attention._compiled()

    class Watched:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                before(grid, kwargs)
                return self.kernel[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(fused_attention, "_compiled", lambda: tuple(Watched(k) for k in compiled))


def analyses(vm, images, monkeypatch, setting):
    monkeypatch.setenv("VIZAPP_FUSED_ATTENTION", setting)
    return vizapp.analyze(vm, images)


def assert_same_analysis(formed, fused_one):
    assert formed.statistics.keys() == fused_one.statistics.keys()
    for name, value in formed.statistics.items():
        np.testing.assert_allclose(fused_one.statistics[name], value, rtol=1e-5, atol=1e-5, err_msg=name)
    np.testing.assert_allclose(fused_one.rollout(), formed.rollout(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(fused_one.token_norms(), formed.token_norms(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        fused_one.attention(1, 0, query=(1, 1)), formed.attention(1, 0, query=(1, 1)), rtol=1e-5, atol=1e-7
    )


@pytest.mark.parametrize("fid, name, kwargs", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_an_analysis_through_the_kernels_equals_the_formed_one_for_every_token_layout(
    fused, monkeypatch, fid, name, kwargs
):
    vm = small_model(name, **kwargs)
    images = [random_image(3), random_image(4, size=(70, 50))]
    formed = analyses(vm, images, monkeypatch, "0")
    calls = count_calls(monkeypatch)
    through = analyses(vm, images, monkeypatch, "interpret")
    assert len(calls) == vm.num_layers and calls[0][0] == 2  # every layer, the batch in one call
    assert fused.failure() is None
    for a, b in zip(formed, through, strict=True):
        assert_same_analysis(a, b)


def test_a_model_too_large_to_store_its_fusions_multiplies_the_kernels_head_sums_up(fused, monkeypatch):
    vm = small_model("vit_tiny_patch16_224", img_size=64, depth=3)
    images = [random_image(5)]
    formed = analyses(vm, images, monkeypatch, "0")
    monkeypatch.setattr(vizapp.limits, "ROLLOUT_STORE_LIMIT_BYTES", 0)
    calls = count_calls(monkeypatch)
    through = analyses(vm, images, monkeypatch, "interpret")
    assert len(calls) == 3
    assert_same_analysis(formed[0], through[0])


def test_dataset_mode_takes_its_statistics_from_the_kernels(fused, monkeypatch):
    vm = small_model("vit_small_patch14_reg4_dinov2", img_size=56, depth=2)
    x = torch.stack([vm.batch_transform(random_image(6)), vm.batch_transform(random_image(7))])
    monkeypatch.setenv("VIZAPP_FUSED_ATTENTION", "0")
    formed = forward_statistics(vm, x)
    calls = count_calls(monkeypatch)
    monkeypatch.setenv("VIZAPP_FUSED_ATTENTION", "interpret")
    through = forward_statistics(vm, x)
    assert len(calls) == 2
    for name, value in formed.values.items():
        torch.testing.assert_close(through.values[name], value, rtol=1e-5, atol=1e-5, equal_nan=True, msg=name)


class MaxWeight(HeadStatistic):
    name, label, unit = "max_weight_fused_test", "largest weight", ""

    def rows(self, attn, row, geometry, out, work):
        torch.amax(attn, dim=-1, out=out)


def test_a_statistic_without_a_kernel_form_has_the_attention_formed(fused, monkeypatch):
    vm = small_model("vit_tiny_patch16_224", img_size=64, depth=2)
    statistics.register(MaxWeight())
    try:
        calls = count_calls(monkeypatch)
        through = analyses(vm, [random_image(8)], monkeypatch, "interpret")[0]
    finally:
        statistics.unregister("max_weight_fused_test")
    assert calls == []  # offered, declined: nothing computed twice
    assert np.all(np.isfinite(through.statistics["max_weight_fused_test"]))


def test_a_relative_position_bias_goes_through_the_kernels(fused, monkeypatch):
    """BEiT hands SDPA its relative-position bias as ``attn_mask`` [1, H, N, N]: the kernels add it to the scores, and
    the analysis equals the formed one."""
    vm = small_model("beit_base_patch16_224", img_size=64, depth=2, embed_dim=48, num_heads=2)
    images = [random_image(9), random_image(10)]
    formed = analyses(vm, images, monkeypatch, "0")
    calls = count_calls(monkeypatch)
    through = analyses(vm, images, monkeypatch, "interpret")
    assert len(calls) == 2
    for a, b in zip(formed, through, strict=True):
        assert_same_analysis(a, b)


def test_kernels_that_fail_to_compile_are_declined_and_the_analysis_is_formed(fused, monkeypatch, caplog):
    """A compile that fails (here every one, at the check of its first use) declines its variant, reported once, and
    the layers are formed: an analysis equal to the formed one."""
    vm = small_model("vit_tiny_patch16_224", img_size=64, depth=2)
    images = [random_image(10)]
    formed = analyses(vm, images, monkeypatch, "0")

    def broken():
        raise RuntimeError("PTX assembly failed (simulated)")

    monkeypatch.setattr(fused_attention, "_compiled", broken)
    monkeypatch.setattr(fused_check, "_passed", {})  # the first use's check meets the failure, in any test order
    calls = count_calls(monkeypatch)
    with caplog.at_level("WARNING", logger="vizapp.fused_attention"):
        through = analyses(vm, images, monkeypatch, "interpret")
    assert "PTX assembly failed" in (fused_attention.failure() or "")
    assert caplog.text.count("such layers are formed from now on") == 1
    assert len(calls) == 2  # each layer asked; the first one's check declined the variant, the second's was declined
    assert len(fused_attention._declined) == 1 and not fused_check._passed
    assert_same_analysis(formed[0], through[0])


@pytest.mark.parametrize(
    "wrong, said",
    [
        ("entropy", "the entropy differs"),  # a row statistic 1e-3 off in one row
        ("head sum", "the head sum differs"),  # the heads' sum 1e-3 off in one element
        ("nan", "the distance differs"),  # a NaN where a number belongs
    ],
)
def test_a_device_that_computes_the_kernels_wrongly_fails_their_self_check_and_forms_the_attention(
    fused, monkeypatch, caplog, wrong, said
):
    """Before its first use on a device each compile of the kernels runs a small layer there against float64: a
    compiler or device that gets them wrong (which only a GPU would show) turns them off, and the analysis is the
    formed one."""
    assert fused_check.self_check(torch.device("cpu")) is None
    kernel = fused_attention.launch

    def miscomputed(q, k, v, scale, rows, dist, p, head_sum, bias):
        out = kernel(q, k, v, scale, rows, dist, p, head_sum, bias)
        if wrong == "entropy":
            rows["entropy"][0, 1, 5] += 1e-3
        elif wrong == "head sum":
            head_sum[1, 0, 68] += 1e-3
        else:
            rows["distance"][1, 2, 0] = math.nan
        return out

    vm = small_model("vit_tiny_patch16_224", img_size=64, depth=2)
    images = [random_image(13)]
    formed = analyses(vm, images, monkeypatch, "0")
    monkeypatch.setattr(fused_attention, "launch", miscomputed)
    assert said in (fused_check.self_check(torch.device("cpu")) or "")
    monkeypatch.setattr(fused_check, "_passed", {})
    calls = count_calls(monkeypatch)
    with caplog.at_level("WARNING", logger="vizapp.fused_attention"):
        through = analyses(vm, images, monkeypatch, "interpret")
    assert said in (fused.failure() or "") and "self-check on interpret (float32, 3 heads of 64" in fused.failure()
    assert "forming the attention from now on" in caplog.text
    assert calls == [(1, 3, 17, 64)]  # the first layer's check failed; the analysis formed every layer
    assert not fused.usable(torch.device("cpu"))
    assert_same_analysis(formed[0], through[0])


def test_a_variant_that_fails_to_launch_is_declined_and_the_others_still_run(fused, monkeypatch, caplog):
    """A GPU-only failure of one variant (here: tiles for 128-wide heads beyond the device's shared memory) forms the
    layers that need it, reported once, and leaves the kernels on for the others."""
    launches: list[int] = []

    def limited(grid, kwargs):
        launches.append(kwargs["BLOCK_D"])
        if kwargs["BLOCK_D"] > 64:
            raise RuntimeError("out of resource: shared memory, Required: 262144 (simulated)")

    torch.manual_seed(6)
    dist = patch_distance_matrix((2, 34), 16)
    wide = [t.contiguous() for t in torch.randn(3, 1, 2, 70, 80).unbind(0)]  # 80-wide heads: a 128-wide block
    narrow = [t.contiguous() for t in torch.randn(3, 1, 2, 70, 64).unbind(0)]
    run(*narrow, 64**-0.5, dist, 2)  # (its compile's check, before the launches are watched)
    watch_launches(monkeypatch, limited)
    with caplog.at_level("WARNING", logger="vizapp.fused_attention"):
        assert run(*wide, 80**-0.5, dist, 2)[0] is None
        assert run(*wide, 80**-0.5, dist, 2)[0] is None  # declined before any launch
    assert launches == [128]
    assert caplog.text.count("such layers are formed from now on") == 1
    said = fused.failure() or ""
    assert "out of resource" in said and "128-wide head block, entropy, distance, head sum" in said
    assert fused.usable(torch.device("cpu"))
    got = run(*narrow, 64**-0.5, dist, 2)
    want = reference(*narrow, 64**-0.5, dist, 2)
    for mine, theirs in zip(got, want, strict=True):
        torch.testing.assert_close(mine.double(), theirs, rtol=1e-5, atol=1e-5)
    assert launches == [128, 64, 64]


def test_a_self_check_that_raises_turns_the_kernels_off_instead_of_failing_the_analysis(fused, monkeypatch):
    def raising(device, layer):
        raise RuntimeError("CUDA error: out of memory (simulated)")

    monkeypatch.setattr(fused_check, "self_check", raising)
    monkeypatch.setattr(fused_check, "_passed", {})
    vm = small_model("vit_tiny_patch16_224", img_size=64, depth=2)
    calls = count_calls(monkeypatch)
    result = analyses(vm, [random_image(14)], monkeypatch, "interpret")[0]
    assert "the check raised RuntimeError: CUDA error: out of memory" in (fused.failure() or "")
    assert calls == [(1, 3, 17, 64)]  # the first layer's check raised: it and the other layer were formed
    assert np.isfinite(result.statistics["distance"]).all() and not fused.usable(torch.device("cpu"))


CHECKED_LAYERS = [
    fused_check.CheckLayer(),  # float32, 64-wide heads, a CLS token, entropy, distance and head sum
    fused_check.CheckLayer(bias=torch.float32),
    fused_check.CheckLayer(dtype=torch.bfloat16, bias=torch.bfloat16),
    fused_check.CheckLayer(dtype=torch.float16, head_sum=False),
    fused_check.CheckLayer(heads=1, head_dim=80, prefix=5, aligned=True),  # a 128-wide block, 80 tokens
    fused_check.CheckLayer(head_dim=24, prefix=0, entropy=False, dist=torch.float64),
    fused_check.CheckLayer(head_dim=16, prefix=70, distance=False),  # more prefix tokens than the default layer has
]


@pytest.mark.parametrize("layer", CHECKED_LAYERS, ids=str)
def test_the_check_of_each_compile_passes_on_the_kernels_themselves(fused, layer):
    assert fused_check.self_check(torch.device("cpu"), layer) is None


def test_each_compile_is_checked_once_at_its_first_use(fused, monkeypatch):
    """Triton compiles the kernels once per dtype, head block, bias and set of statistics (and for integers equal to 1
    or divisible by 16): each such compile runs its own check at its first launch, and only then."""
    seen: list[fused_check.CheckLayer] = []
    real = fused_check.self_check
    monkeypatch.setattr(fused_check, "self_check", lambda device, layer: seen.append(layer) or real(device, layer))
    monkeypatch.setattr(fused_check, "_passed", {})
    torch.manual_seed(8)
    dist = patch_distance_matrix((4, 4), 16)
    q, k, v = torch.randn(3, 1, 2, 17, 32).unbind(0)
    bias = torch.randn(1, 2, 17, 17)
    for _ in range(2):
        run(q, k, v, 32**-0.5, dist, 1)
        run(q, k, v, 32**-0.5, dist, 1, bias=bias)
        run(q, k, v, 32**-0.5, dist, 1, head_sum=False)
        run(*(t.bfloat16() for t in (q, k, v)), 32**-0.5, dist, 1)
        run(q[:, :1], k[:, :1], v[:, :1], 32**-0.5, dist, 1)  # one head
    plain = fused_check.CheckLayer(head_dim=32)
    assert seen == [
        plain,
        replace(plain, bias=torch.float32),
        replace(plain, head_sum=False),
        replace(plain, dtype=torch.bfloat16),
        replace(plain, heads=1),
    ]
    assert list(fused_check._passed.values()) == [True] * 5 and fused_attention.failure() is None


def test_a_benchmark_run_reports_the_compiles_checked(fused, monkeypatch):
    from benchmarks.bench.machine import fused_route

    monkeypatch.setattr(fused_check, "_passed", {})
    torch.manual_seed(9)
    dist = patch_distance_matrix((4, 4), 16)
    q, k, v = torch.randn(3, 1, 2, 17, 32).unbind(0)
    assert "0 compiles checked" in fused_route("cpu", after=True)["fused attention kernels at end"]
    run(q, k, v, 32**-0.5, dist, 1)
    run(q, k, v, 32**-0.5, dist, 1, head_sum=False)
    said = fused_route("cpu", after=True)["fused attention kernels at end"]
    assert said.startswith("on; 2 compiles checked and passed on interpret (Triton "), said
    fused_check._passed[("cuda:0", fused_check.CheckLayer(dtype=torch.bfloat16))] = False
    assert (
        "; failed: cuda:0 (bfloat16, 3 heads of 64, entropy, distance, head sum)"
        in fused_route("cpu", True)["fused attention kernels at end"]
    )


def test_a_bfloat16_compile_is_checked_apart_from_the_float32_one(fused, monkeypatch):
    """A device or compiler that gets only the bfloat16 kernels wrong passes the float32 layers' check; the first
    bfloat16 layer's own check then turns the kernels off, and that layer is formed."""
    kernel = fused_attention.launch

    def wrong_in_bfloat16(q, *args):
        out = kernel(q, *args)
        if out is not None and q.dtype == torch.bfloat16:
            out[0, 0, 0] += 0.05  # beyond bfloat16's rounding (2^-7 relative to max(|value|, 1))
        return out

    monkeypatch.setattr(fused_attention, "launch", wrong_in_bfloat16)
    monkeypatch.setattr(fused_check, "_passed", {})
    torch.manual_seed(7)
    dist = patch_distance_matrix((4, 17), 16)
    q, k, v = torch.randn(3, 1, 2, 69, 64).unbind(0)
    assert run(q, k, v, 0.125, dist, 1)[0] is not None
    assert run(*(t.bfloat16() for t in (q, k, v)), 0.125, dist, 1)[0] is None
    said = fused_attention.failure() or ""
    assert "self-check on interpret (bfloat16, 3 heads of 64, entropy, distance, head sum)" in said, said
    assert "the output differs from float64's" in said
    assert not fused_attention.usable(torch.device("cpu"))


def test_a_batch_beyond_the_grids_axis_limit_is_launched_in_slices_of_images(fused, monkeypatch):
    """CUDA caps a grid's second axis at 65,535 programs, and the rows kernel puts images x heads there (4,096 images of
    16 heads would not launch; the interpreter has no such cap). With the cap lowered to 7, a batch of 5 images of 3
    heads goes in three launches of 2, 2 and 1 images, and gives what one launch gives, bias and head sum included."""
    torch.manual_seed(5)
    q, k, v = (torch.randn(5, 70, 3, 3, 32) * 1.5).permute(2, 0, 3, 1, 4)
    dist = patch_distance_matrix((2, 34), 16)
    bias = torch.randn(5, 1, 70, 70)
    whole = run(q, k, v, 32**-0.5, dist, 2, bias=bias)
    grids: list[tuple[int, ...]] = []
    watch_launches(monkeypatch, lambda grid, kwargs: grids.append(grid))
    monkeypatch.setattr(fused_attention, "GRID_YZ_LIMIT", 7)
    sliced = run(q, k, v, 32**-0.5, dist, 2, bias=bias)
    (rows_m, *_), (sum_m, sum_n, *_) = fused_attention.ROWS_TILES[32], fused_attention.SUM_TILES[32]
    rows_tiles, sum_tiles = -(-70 // rows_m), (-(-70 // sum_m), -(-70 // sum_n))
    assert grids == [
        (rows_tiles, 6),
        (*sum_tiles, 2),
        (rows_tiles, 6),
        (*sum_tiles, 2),
        (rows_tiles, 3),
        (*sum_tiles, 1),
    ]
    for mine, theirs in zip(sliced, whole, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)


def test_a_layer_beyond_32_bit_offsets_is_left_to_the_formed_route(fused):
    """The kernels index with 32-bit offsets: a [B, H, N, d] view whose last element lies 2^31 floats past its first
    (on the meta device: a stride without the memory) is declined before any launch, not computed wrongly."""
    q = torch.empty_strided((2, 1, 8, 16), (2**31, 16, 16, 1), device="meta")
    small = torch.zeros(2, 1, 8, 16)
    assert fused_attention.attention(q, small, small, 1.0, {}) is None
    assert fused_attention.failure() is None  # declined, not failed
    assert fused_attention.attention(small, small, small, 1.0, {}) is not None


def test_on_the_simulated_gpu_the_kernels_route_keeps_to_the_device_and_equals_the_cpu(fused, monkeypatch):
    """The route's own tensors (the output, the rows' maxima and normalisers, the fusions' block) are made on the
    model's device: on the simulated GPU (tests/devicesim.py) a host tensor meeting a device one raises, as CUDA
    would, and the kernels are handed device tensors."""
    from tests.devicesim import OnDevice, simulated_gpu

    vm = small_model("vit_small_patch14_reg4_dinov2", img_size=56, depth=2)
    images = [random_image(11), random_image(12)]
    on_cpu = analyses(vm, images, monkeypatch, "0")
    calls: list[str] = []
    kernel = fused_attention.attention

    def counted(q, *args, **kwargs):
        calls.append(type(q).__name__)
        out = kernel(q, *args, **kwargs)
        calls.append(type(out).__name__)
        return out

    monkeypatch.setattr(fused_attention, "attention", counted)
    with simulated_gpu(vm), mock.patch.dict("os.environ", {"VIZAPP_FUSED_ATTENTION": "interpret"}):
        on_device = vizapp.analyze(vm, images)
        assert all(isinstance(t, OnDevice) for r in on_device for t in (*r.q, *r.k))
    assert calls == ["OnDevice"] * 2 * vm.num_layers
    for a, b in zip(on_cpu, on_device, strict=True):
        assert_same_analysis(a, b)


def test_the_operator_counts_stand_in_gives_the_kernels_results(fused):
    """benchmarks.launches counts the kernels on the simulated GPU through a torch stand-in (the interpreter would
    take minutes a layer at 1,374 tokens): it must compute what they compute."""
    from benchmarks.launches import stand_in_kernels

    torch.manual_seed(3)
    q, k, v = (torch.randn(2, 85, 3, 2, 32) * 1.5).permute(2, 0, 3, 1, 4)
    dist = patch_distance_matrix(9, 16)
    got = run(q, k, v, 32**-0.5, dist, 4)
    rows = {"entropy": torch.empty(2, 2, 85), "distance": torch.empty(2, 2, 81)}
    head_sum = torch.empty(2, 85, 85)
    out = stand_in_kernels(q, k, v, 32**-0.5, rows, dist, 4, head_sum)
    for mine, theirs in zip((out, rows["entropy"], rows["distance"], head_sum), got, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
    bias = torch.randn(1, 2, 85, 85)
    got = run(q, k, v, 32**-0.5, dist, 4, bias=bias)
    out = stand_in_kernels(q, k, v, 32**-0.5, rows, dist, 4, head_sum, bias)
    for mine, theirs in zip((out, rows["entropy"], rows["distance"], head_sum), got, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)


def test_without_a_gpu_a_device_that_says_cuda_does_not_take_the_compiled_kernels(monkeypatch):
    """The simulated GPU's tensors say cuda:0: with the default setting they are formed, not handed to a Triton
    compiler that finds no driver (turning the kernels off for the process)."""
    monkeypatch.setenv("VIZAPP_FUSED_ATTENTION", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(fused_attention, "interpreted", lambda: False)
    assert not fused_attention.usable(torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert fused_attention.usable(torch.device("cuda", 0))  # (each compile's check comes at its first launch)
    assert not fused_attention.usable(torch.device("cpu"))


FAMILY_IDS = ["eva02_tiny", "relpos", "hf_vit", "hf_beit", "hf_dinov2_reg", "tv_vit_b_16"]


@pytest.mark.parametrize("fid", FAMILY_IDS)
def test_every_library_s_attention_goes_through_the_kernels(fused, monkeypatch, tmp_path, fid):
    """RoPE (EVA-02: q and k rotated before SDPA), timm's relative position (relpos), transformers' sdpa attention
    (ViT, BEiT's bias per layer, DINOv2 with registers) and torchvision's MultiheadAttention, evaluated by the
    capture: every layer through the kernels, the analysis equal to the formed one."""
    import test_families as fam

    folders = {
        hid: str(fam.save_hf(tmp_path / hid, config, model, extra))
        for hid, config, model, extra in fam.HF
        if hid == fid
    }
    vm = fam.load(fid, folders)
    images = [random_image(13)]
    formed = analyses(vm, images, monkeypatch, "0")
    calls = count_calls(monkeypatch)
    through = analyses(vm, images, monkeypatch, "interpret")
    assert len(calls) == vm.num_layers, calls
    assert_same_analysis(formed[0], through[0])


def test_a_head_wider_than_the_tiles_is_formed_without_a_launch(fused):
    q = torch.randn(1, 2, 20, 160)  # a 256-wide block: no tiles are chosen for it
    rows = {"entropy": torch.empty(1, 2, 20)}
    assert 256 not in fused_attention.ROWS_TILES
    assert fused_attention.attention(q, q, q, 1.0, rows) is None
    assert fused_attention.failure() is None  # declined, not failed


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_the_chosen_tiles_compile_for_an_a10g_and_an_h100_without_spills_and_within_shared_memory(dtype):
    """Triton compiles the kernels for a GPU target without one (its passes, then the ptxas its wheel ships):
    benchmarks.kernel_resources --check exits 1 where a chosen launch spills registers to local memory or takes more
    shared memory than the target has. Run in a subprocess: this process has Triton's interpreter on."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    args = [sys.executable, "-m", "benchmarks.kernel_resources", "--check", "--widths", "64", "--targets", "86", "90"]
    args += ["--dtype", dtype]  # a bfloat16 model's layers are other compiles
    import triton

    if dtype == "bf16" and tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 3):
        pytest.skip(
            "Triton 3.2 (torch 2.6's) spills the bf16 rows kernel without a bias at every launch tried (120 to 1,788 "
            "bytes a thread on sm_86 and sm_90)"
        )
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    table = [line for line in done.stdout.splitlines() if line.startswith("| rows") or line.startswith("| head sum")]
    assert len(table) == 8  # two kernels, with and without a bias, two targets
    assert all(line.split("|")[9].strip() == "0" for line in table)  # spilled bytes


def test_the_gpu_timing_of_the_launches_runs_each_candidate_and_restores_the_chosen_tiles(fused):
    """gpu.sh's step `kernels` (benchmarks.kernel_resources --time) has one GPU run to work in: the same code, here
    on a 17-token layer through the interpreter, times every candidate launch and leaves the chosen tiles as they were."""
    from benchmarks.kernel_resources import time_on_device

    chosen = dict(fused_attention.ROWS_TILES), dict(fused_attention.SUM_TILES)
    text = time_on_device(1, "cpu", {"tiny": (1, 2, 4, 1, 16)}, [(32, 32, 4, 1)])
    rows = [line.split("|")[1:-1] for line in text.splitlines() if line.startswith("| tiny")]
    assert [r[1].strip() for r in rows] == [str(chosen[0][64]), "(32, 32, 4, 1)"]
    assert all(float(r[-1]) > 0 for r in rows), text  # both / SDPA, for each launch
    assert chosen == (fused_attention.ROWS_TILES, fused_attention.SUM_TILES)
