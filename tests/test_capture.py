"""Capture: exact attention with fused attention on, equal to timm's own non-fused path, and no leftovers."""

from __future__ import annotations

import copy
import threading

import numpy as np
import pytest
import torch

import vizapp
from tests.conftest import random_image, small_model
from vizapp.capture import AttentionCapture


def reference_attention(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """timm's own attention: a copy of the model with fused attention off, hooking attn_drop's input."""
    ref = copy.deepcopy(model)
    maps: list[torch.Tensor] = []
    for blk in ref.blocks:
        blk.attn.fused_attn = False
        blk.attn.attn_drop.register_forward_hook(lambda m, args, out: maps.append(args[0].detach().clone()))
    with torch.no_grad():
        logits = ref(x)
    return logits, maps


def all_hooks(model: torch.nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules()
    )


def test_fused_attention_is_on_by_default(family):
    _, vm = family
    assert all(blk.attn.fused_attn for blk in vm.model.blocks), "the test must exercise the fused SDPA path"


def test_captured_attention_equals_timm_non_fused(family):
    fid, vm = family
    x = vm.transform(random_image(1))[None]
    if fid == "dynamic":  # a non-default size exercises the on-the-fly grid
        x = torch.nn.functional.interpolate(x, size=(48, 80), mode="bilinear")
    ref_logits, ref_maps = reference_attention(vm.model, x)
    with torch.no_grad(), AttentionCapture(vm.model) as cap:
        logits = vm.model(x)
    assert len(cap) == len(ref_maps) == len(vm.model.blocks)
    for layer, ref in enumerate(ref_maps):
        got = cap.attention(layer)
        assert got.shape == ref.shape
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)


def test_outputs_identical_with_and_without_capture(family):
    _, vm = family
    x = vm.transform(random_image(2))[None]
    with torch.no_grad():
        plain = vm.model(x)
        with AttentionCapture(vm.model):
            captured = vm.model(x)
    assert torch.equal(plain, captured)


def test_analyze_token_bookkeeping(family):
    fid, vm = family
    expected_prefix = {"vit": 1, "deit_distilled": 2, "reg4": 5, "nonsquare": 1, "dynamic": 1, "gap_reg4": 4}[fid]
    assert vm.num_prefix_tokens == expected_prefix
    assert vm.no_embed_class == (fid in ("reg4", "gap_reg4"))
    assert vm.has_class_token == (fid != "gap_reg4")
    r = vizapp.analyze(vm, random_image(3))
    gh, gw = r.grid_size
    assert r.num_tokens == expected_prefix + gh * gw
    if r.has_class_token:
        assert r.attention(0).shape == (vm.num_heads, gh, gw)
    else:  # token 0 is a register, not a CLS token: asking for CLS is an error, not a silent register map
        with pytest.raises(vizapp.BadParameterError, match="no CLS token"):
            r.attention(0)
    assert r.attention(1, head=0, query=(gh - 1, gw - 1)).shape == (gh, gw)
    assert r.rollout().shape == (gh, gw)
    # The rollout map is the CLS row, or the mean of the patch rows for a model without a CLS token.
    joint = vizapp.analysis.rollout(r.attention_stack(), r.num_prefix_tokens)
    p = r.num_prefix_tokens
    expected = joint[0, p:] if r.has_class_token else joint[p:, p:].mean(0)
    np.testing.assert_allclose(r.rollout(), expected.reshape(gh, gw).numpy(), atol=1e-5)
    assert r.mean_distance.shape == (len(vm.model.blocks), vm.num_heads)
    if fid == "nonsquare":
        assert (gh, gw) == (3, 5)
    # A query's weights to patches and prefix tokens together sum to one.
    row = r.attention(1, query=(0, 0)).reshape(vm.num_heads, -1).sum(-1) + r.prefix_attention(1, (0, 0)).sum(-1)
    np.testing.assert_allclose(row, 1.0, atol=1e-5)


def test_per_head_map_matches_full_attention(family):
    _, vm = family
    r = vizapp.analyze(vm, random_image(4))
    full = r.attention_layer(1)  # [H, N, N]
    p, (gh, gw) = r.num_prefix_tokens, r.grid_size
    if r.has_class_token:
        np.testing.assert_allclose(r.attention(1), full[:, 0, p:].reshape(-1, gh, gw).numpy(), atol=1e-6)
    i = p + 1 * gw + 0
    np.testing.assert_allclose(r.attention(1, query=(1, 0)), full[:, i, p:].reshape(-1, gh, gw).numpy(), atol=1e-6)


def test_no_hook_left_and_no_flag_changed_even_when_forward_raises():
    vm = small_model("vit_tiny_patch16_224", img_size=64, depth=2)
    flags = [blk.attn.fused_attn for blk in vm.model.blocks]
    before = all_hooks(vm.model)
    vizapp.analyze(vm, random_image(5))
    assert all_hooks(vm.model) == before == 0
    with pytest.raises(RuntimeError, match="boom"):
        with AttentionCapture(vm.model):
            assert all_hooks(vm.model) > 0
            raise RuntimeError("boom")
    assert all_hooks(vm.model) == 0
    with pytest.raises((RuntimeError, AssertionError, ValueError)):
        with AttentionCapture(vm.model, with_grad=True):
            vm.model(torch.zeros(1, 3, 17, 17))  # wrong size: timm raises inside the forward
    assert all_hooks(vm.model) == 0
    assert [blk.attn.fused_attn for blk in vm.model.blocks] == flags
    assert not vm.model.training


def test_concurrent_threads_get_their_own_maps():
    vm = small_model("vit_tiny_patch16_224", img_size=64, depth=2)
    images = [random_image(100 + i) for i in range(6)]
    expected = [vizapp.analyze(vm, im) for im in images]
    results: dict[int, list] = {i: [] for i in range(len(images))}
    barrier = threading.Barrier(len(images))
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            barrier.wait()
            for _ in range(5):
                results[i].append(vizapp.analyze(vm, images[i]))
        except BaseException as e:  # noqa: BLE001 - surfaced below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(images))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i, runs in results.items():
        assert len(runs) == 5
        for r in runs:
            np.testing.assert_allclose(r.mean_distance, expected[i].mean_distance, atol=1e-6)
            np.testing.assert_allclose(r.rollout(), expected[i].rollout(), atol=1e-6)
            np.testing.assert_allclose(r.attention(1, query=(1, 1)), expected[i].attention(1, query=(1, 1)), atol=1e-6)
    # Distinct images really give distinct maps, so the comparison above could fail.
    assert not np.allclose(expected[0].rollout(), expected[1].rollout())


def test_attention_gradients_equal_autograd_through_explicit_attention():
    vm = small_model("deit_tiny_distilled_patch16_224", img_size=64, depth=2)
    x = vm.transform(random_image(6))[None]
    # Reference: non-fused copy where A is a real tensor in the graph.
    ref = copy.deepcopy(vm.model)
    maps: list[torch.Tensor] = []

    def keep(m, args, out):
        args[0].retain_grad()
        maps.append(args[0])

    for blk in ref.blocks:
        blk.attn.fused_attn = False
        blk.attn.attn_drop.register_forward_hook(keep)
    ref(x)[0, 3].backward()
    with AttentionCapture(vm.model, with_grad=True) as cap:
        score = vm.model(x)[0, 3]
    grads = cap.attention_grads(score)
    for g, a in zip(grads, maps, strict=True):
        torch.testing.assert_close(g, a.grad, atol=1e-5, rtol=1e-4)
    assert all_hooks(vm.model) == 0


def test_unsupported_model_gets_a_clear_error():
    with pytest.raises(vizapp.UnsupportedModelError, match="Swin"):
        vizapp.load_model("swin_tiny_patch4_window7_224", pretrained=False)


@pytest.mark.parametrize("path", ["default", "chunked_no_cache"])
def test_analyze_equals_analyses_of_timm_non_fused_attention(family, monkeypatch, path):
    """analyze's single top-down pass (in-place softmax, vector rollout, fused distance) against the plain
    functions of vizapp.analysis applied to timm's own materialised attention."""
    from vizapp import pipeline
    from vizapp.analysis import fuse_heads, mean_attention_distance, rollout

    fid, vm = family
    if path == "chunked_no_cache":  # one head per chunk, and no fused cache: the path big models take
        monkeypatch.setattr(pipeline, "ATTENTION_CHUNK_BYTES", 1)
        monkeypatch.setattr(pipeline, "FUSED_CACHE_LIMIT_BYTES", 0)
    img = random_image(7)
    r = vizapp.analyze(vm, img)
    _, maps = reference_attention(vm.model, r.input)
    attn = torch.stack([m[0] for m in maps])  # [L, H, N, N]
    p = r.num_prefix_tokens
    expected_dist = mean_attention_distance(attn, r.grid_size, r.patch_size, p)
    np.testing.assert_allclose(r.mean_distance, expected_dist.numpy(), rtol=1e-4, atol=1e-3)
    joint = rollout(attn, p)
    expected = joint[0, p:] if r.has_class_token else joint[p:, p:].mean(0)
    cached = r._cache[("rollout", "mean", 0.0, 0)]
    np.testing.assert_allclose(cached, expected.reshape(r.grid_size).numpy(), atol=1e-5)
    for fusion in ("mean", "max", "min"):
        key = ("fused", fusion)
        assert (key in r._cache) == (path == "default")
        torch.testing.assert_close(r.fused(fusion), fuse_heads(attn, fusion).float(), atol=1e-5, rtol=0)


def test_capture_packs_q_and_k_in_one_block_per_forward():
    vm = small_model("vit_tiny_patch16_224", img_size=64, depth=2)
    x = vm.transform(random_image(2))[None]
    with torch.no_grad(), AttentionCapture(vm.model) as cap:
        vm.model(x)
        first_q0 = cap.q[0].clone()
        storages = {t.untyped_storage().data_ptr() for t in cap.q + cap.k}
        assert len(storages) == 1
        held = cap.q[0]
        vm.model(x.flip(-1))  # a second forward gets a new block: tensors from the first stay valid
    assert torch.equal(held, first_q0)
    assert cap.q[0].untyped_storage().data_ptr() != held.untyped_storage().data_ptr()
    assert all(t.is_contiguous() for t in cap.q + cap.k)
