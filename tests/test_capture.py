"""Capture: exact attention with fused attention on, equal to timm's own non-fused path, and no leftovers."""

from __future__ import annotations

import threading
from unittest import mock

import numpy as np
import pytest
import torch

import vizapp
from tests.conftest import all_hooks, graph_reference, random_image, reference_attention, small_model
from tests.opcount import Ops
from vizapp.capture import AttentionCapture, attention_from_qk
from vizapp.resultcache import Key


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
    # DeiT's two heads read the class and distillation tokens; the avg-pooled model its patches.
    assert vm.readout == {"deit_distilled": "cls+dist", "gap_reg4": "patches"}.get(fid, "cls")
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
    # The rollout map is the row of the token the output reads: CLS, the mean of the CLS and distillation rows, or
    # the mean of the patch rows.
    joint = vizapp.analysis.rollout(r.attention_stack(), r.num_prefix_tokens)
    p = r.num_prefix_tokens
    expected = {"cls": joint[0], "cls+dist": (joint[0] + joint[1]) / 2, "patches": joint[p:].mean(0)}[r.readout][p:]
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
    ref, maps = graph_reference(vm.model)
    ref(x)[0, 3].backward()
    with AttentionCapture(vm.model, with_grad=True) as cap:
        score = vm.model(x)[0, 3]
    grads = cap.attention_grads(score)
    for g, a in zip(grads, maps, strict=True):
        torch.testing.assert_close(g, a.grad, atol=1e-5, rtol=1e-4)
    assert all_hooks(vm.model) == 0


def test_unsupported_model_gets_a_clear_error():
    # timm's Swin V2 "cr" variant (its own block layout; plain Swin and Swin V2 are supported, tests/test_swin.py)
    with pytest.raises(vizapp.UnsupportedModelError, match="SwinTransformerV2Cr"):
        vizapp.load_model("swinv2_cr_tiny_224", pretrained=False, device="cpu", img_size=64, window_size=4)


ANALYZE_PATHS = ["inline", "inline_joint", "recompute", "recompute_chunked_no_cache"]


@pytest.mark.parametrize("path", ANALYZE_PATHS)
def test_analyze_equals_analyses_of_timm_non_fused_attention(family, monkeypatch, path):
    """Every way analyze can compute its statistics, against the plain functions of vizapp.analysis applied to
    timm's own materialised attention: inline during the forward (all fusions kept; or one head and a few query
    rows per chunk with the rollout multiplied up bottom-up and nothing cached, as for 1,374-token models), and recomputed from q and k
    after a forward whose attention stayed inside the model (fused_attn off), whole or one head per chunk."""
    from vizapp import limits
    from vizapp.analysis import fuse_heads, mean_attention_distance, rollout

    fid, vm = family
    if path in ("inline_joint", "recompute_chunked_no_cache"):
        # one head per chunk in blocks of 3 query rows (blocks straddle the prefix tokens / patches boundary)
        monkeypatch.setattr(limits, "MIN_CHUNK_ROWS", 3)
        monkeypatch.setattr(limits, "ROW_BLOCK_BYTES", 1)
        monkeypatch.setattr(limits, "INLINE_CHUNK_BYTES", 1)
        monkeypatch.setattr(limits, "ATTENTION_CHUNK_BYTES", 1)
        monkeypatch.setattr(limits, "FUSED_CACHE_LIMIT_BYTES", 0)
        monkeypatch.setattr(limits, "ROLLOUT_STORE_LIMIT_BYTES", 0)
    if path.startswith("recompute"):
        for blk in vm.model.blocks:
            monkeypatch.setattr(blk.attn, "fused_attn", False)
    img = random_image(7)
    r = vizapp.analyze(vm, img)
    assert r.recomputed_layers == (tuple(range(r.num_layers)) if path.startswith("recompute") else ())
    _, maps = reference_attention(vm.model, r.input)
    attn = torch.stack([m[0] for m in maps])  # [L, H, N, N]
    p = r.num_prefix_tokens
    expected_dist = mean_attention_distance(attn, r.grid_size, r.patch_size, p)
    np.testing.assert_allclose(r.mean_distance, expected_dist.numpy(), rtol=1e-4, atol=1e-3)
    joint = rollout(attn, p)
    expected = (r.output_weights().to(joint.dtype) @ joint)[p:]
    cached = r._cache.peek(Key("rollout", ("mean", 0.0, 0)))
    np.testing.assert_allclose(cached, expected.reshape(r.grid_size).numpy(), atol=1e-5)
    assert (Key("fused", ("mean",)) in r._cache) == (path in ("inline", "recompute"))  # reduced during the forward
    for fusion in ("mean", "max", "min"):
        torch.testing.assert_close(r.fused(fusion), fuse_heads(attn, fusion).float(), atol=1e-5, rtol=0)
    # a view's rollout with another fusion and discard ratio (from the cache, or layer by layer from q and k)
    joint = rollout(attn, p, head_fusion="max", discard_ratio=0.5)
    expected = (r.output_weights().to(joint.dtype) @ joint)[p:]
    np.testing.assert_allclose(r.rollout("max", 0.5), expected.reshape(r.grid_size).numpy(), atol=1e-5)


class _Recorder:
    def __init__(self):
        self.chunks = []
        self.done = []

    def chunk(self, layer, batch, head, attn, row):
        self.chunks.append((layer, batch, head, row, attn.clone()))

    def layer_done(self, layer):
        self.done.append(layer)


def test_inline_capture_hands_over_timm_attention_and_keeps_the_output():
    """The consumer sees exactly timm's non-fused attention, chunk by chunk, for every image of a batch, and the
    forward's output is the fused forward's to float rounding."""
    vm = small_model("vit_tiny_patch16_224", img_size=64, depth=3)
    x = torch.stack([vm.transform(random_image(i)) for i in (1, 2)])
    with torch.no_grad():
        plain = vm.model(x)
    rec = _Recorder()
    with torch.no_grad(), AttentionCapture(vm.model, on_attention=rec, chunk_bytes=2 * 17 * 17 * 4) as cap:
        out = vm.model(x)
    assert cap.inline_layers == {0, 1, 2}
    assert rec.done == [0, 1, 2]
    torch.testing.assert_close(out, plain, atol=1e-5, rtol=1e-5)
    _, maps = reference_attention(vm.model, x)
    heads = vm.model.blocks[0].attn.num_heads
    assert len(rec.chunks) == 3 * 2 * ((heads + 1) // 2)
    for layer, b, h0, row, a in rec.chunks:
        assert a.shape[0] <= 2 and row == 0 and a.shape[1] == 17
        torch.testing.assert_close(a, maps[layer][b, h0 : h0 + a.shape[0]], atol=1e-6, rtol=1e-5)


class _ScratchRecorder(_Recorder):
    takes_scratch = True

    def chunk(self, layer, batch, head, attn, row, scratch=None):
        assert scratch is not None and scratch.shape == attn.shape and scratch.dtype == attn.dtype
        assert scratch.data_ptr() != attn.data_ptr()
        super().chunk(layer, batch, head, attn, row)
        scratch.fill_(float("nan"))  # the consumer may overwrite it: the attention and the output stay exact


@pytest.mark.parametrize("inline", [True, False])
def test_a_consumer_that_takes_scratch_may_overwrite_it_and_the_chunk_buffer_goes_after_the_forward(inline):
    """A consumer with ``takes_scratch`` gets a buffer beside each chunk (inline and replayed from q and k) and may
    overwrite it: its chunks and the forward's output are bitwise those a plain consumer sees. The inline chunk buffer
    is dropped after the last layer (a second forward makes it again and gives the same)."""
    vm = small_model("vit_tiny_patch16_224", img_size=64, depth=3)
    if not inline:
        for blk in vm.model.blocks:
            blk.attn.fused_attn = False  # no SDPA call: the consumer is fed from q and k at the end of each layer
    x = torch.stack([vm.transform(random_image(i)) for i in (1, 2)])
    outs = []
    for rec in (_Recorder(), _ScratchRecorder(), _ScratchRecorder()):
        with torch.no_grad(), AttentionCapture(vm.model, on_attention=rec, chunk_bytes=2 * 17 * 17 * 4) as cap:
            outs.append((vm.model(x), rec))
            assert cap._work is None
            assert (cap.inline_layers if inline else cap.replayed_layers) == {0, 1, 2}
    (plain, a), (given, b), (again, c) = outs
    assert torch.equal(given, plain) and torch.equal(again, plain)
    assert len(a.chunks) == len(b.chunks) == len(c.chunks) == 3 * 2 * 2
    for one, two, three in zip(a.chunks, b.chunks, c.chunks, strict=True):
        assert one[:4] == two[:4] == three[:4]
        assert torch.equal(one[4], two[4]) and torch.equal(one[4], three[4])


class _ScoresRecorder(_Recorder):
    takes_scratch = takes_scores = True
    image_groups = True

    def __init__(self):
        super().__init__()
        self.told = []

    def chunk(self, layer, batch, head, attn, row, scratch=None, scores_in_scratch=False):
        self.told.append(scores_in_scratch)
        if scores_in_scratch:  # the scratch holds the scores whose softmax the chunk is
            torch.testing.assert_close(torch.softmax(scratch, dim=-1), attn, rtol=1e-6, atol=1e-7)
        super().chunk(layer, batch, head, attn, row)


@pytest.mark.parametrize(("inline", "biased"), [(True, False), (False, False), (True, True)])
def test_a_consumer_that_takes_scores_is_told_when_the_scratch_holds_them(inline, biased):
    """Inline (image groups and chunks of heads) and replayed from q and k: without an additive bias the scratch holds
    each chunk's scores, and the consumer is told; with one (BEiT's relative position bias, inline: timm's BEiT has no
    SDPA call to replay from with fused attention off) it is not told."""
    if biased:
        vm = small_model("beit_base_patch16_224", img_size=48, depth=2, embed_dim=64, num_heads=4)
    else:
        vm = small_model("vit_tiny_patch16_224", img_size=48, depth=2)  # a model of its own: fused attention goes off
    if not inline:
        for blk in vm.model.blocks:
            blk.attn.fused_attn = False
    x = torch.stack([vm.transform(random_image(i)) for i in (1, 2, 3)])
    for chunk_bytes in (2 * 10 * 10 * 4, 10**6):  # chunks of heads of one image; whole images grouped (inline)
        rec = _ScoresRecorder()
        with torch.no_grad(), AttentionCapture(vm.model, on_attention=rec, chunk_bytes=chunk_bytes):
            vm.model(x)
        assert rec.chunks and rec.told == [not biased] * len(rec.chunks)


def test_inline_capture_splits_one_head_into_row_blocks_when_it_does_not_fit(monkeypatch):
    from vizapp import limits

    assert limits.chunk_shape(16, 577, 3 * 2**20) == (2, 577)  # ViT-L/384 on the CPU
    assert limits.chunk_shape(16, 1374, 3 * 2**20) == (1, 1374)  # one whole head: 7.5 MB
    assert limits.chunk_shape(16, 4097, 3 * 2**20) == (1, 820)  # 67 MB a head: 5 equal blocks of rows
    monkeypatch.setattr(limits, "MIN_CHUNK_ROWS", 4)
    monkeypatch.setattr(limits, "ROW_BLOCK_BYTES", 17 * 17 * 4 - 1)
    assert limits.chunk_shape(3, 17, 1) == (1, 9)  # 16 rows fit the row budget: 2 equal blocks, 9 and 8 rows
    monkeypatch.setattr(limits, "ROW_BLOCK_BYTES", 1)
    assert limits.chunk_shape(3, 17, 1) == (1, 4)  # at least MIN_CHUNK_ROWS rows (5 blocks: 4, 4, 4, 4, 1)
    assert limits.chunk_shape(3, 17, 2 * 17 * 17 * 4) == (2, 17)
    vm = small_model("vit_tiny_patch16_224", img_size=64, depth=2)
    x = vm.transform(random_image(6))[None]
    rec = _Recorder()
    with torch.no_grad(), AttentionCapture(vm.model, on_attention=rec, chunk_bytes=1) as cap:
        out = vm.model(x)
    with torch.no_grad():
        torch.testing.assert_close(out, vm.model(x), atol=1e-5, rtol=1e-5)
    assert cap.inline_layers == {0, 1}
    _, maps = reference_attention(vm.model, x)
    heads = vm.model.blocks[0].attn.num_heads
    assert [(c[0], c[2], c[3]) for c in rec.chunks] == [
        (layer, h, row) for layer in range(2) for h in range(heads) for row in (0, 4, 8, 12, 16)
    ]
    for layer, b, h0, row, a in rec.chunks:
        torch.testing.assert_close(a, maps[layer][b, h0 : h0 + 1, row : row + 4], atol=1e-6, rtol=1e-5)


def test_inline_capture_leaves_other_threads_and_other_calls_alone():
    import torch.nn.functional as F

    vm = small_model("vit_tiny_patch16_224", img_size=64, depth=2)
    x = vm.transform(random_image(3))[None]
    rec = _Recorder()
    seen = {}

    def other_thread():
        with torch.no_grad():
            seen["out"] = vm.model(x)

    with torch.no_grad(), AttentionCapture(vm.model, on_attention=rec) as cap:
        t = threading.Thread(target=other_thread)
        t.start()
        t.join()
        assert rec.chunks == [] and cap.inline_layers == set()
        q = torch.randn(1, 2, 5, 4)
        torch.testing.assert_close(F.scaled_dot_product_attention(q, q, q), attention_from_qk(q, q, 0.5) @ q)
        assert rec.chunks == []  # an SDPA call that follows no recorded q and k is SDPA's
    with torch.no_grad():
        torch.testing.assert_close(seen["out"], vm.model(x))
    # the mode is gone after the block: a call now goes straight to SDPA
    from torch.overrides import _get_current_function_mode_stack

    assert not any(type(m).__name__ == "_LayerMode" for m in _get_current_function_mode_stack())


def test_capture_lets_sdpa_run_what_it_cannot_reproduce_and_refuses_to_show_it():
    """Dropout in training is left to SDPA (the output stays the model's own), and the layer's attention is then
    refused with a clear message instead of shown."""
    vm = small_model("vit_tiny_patch16_224", img_size=64, depth=2, attn_drop_rate=0.5)
    x = vm.transform(random_image(2))[None]
    rec = _Recorder()
    vm.model.train()
    try:
        with torch.no_grad(), AttentionCapture(vm.model, on_attention=rec) as cap:
            vm.model(x)
    finally:
        vm.model.eval()
    assert cap.unexact_layers == {0: "dropout", 1: "dropout"}
    assert rec.chunks == [] and cap.inline_layers == set() and cap.replayed_layers == set()
    with pytest.raises(vizapp.UnsupportedModelError, match="dropout"):
        cap.attention(0)


def test_capture_keeps_copies_of_q_and_k_not_the_layer_qkv_buffer():
    vm = small_model("vit_tiny_patch16_224", img_size=64, depth=2)
    x = vm.transform(random_image(2))[None]
    with torch.no_grad(), AttentionCapture(vm.model) as cap:
        vm.model(x)
        first_q0 = cap.q[0].clone()
        held = cap.q[0]
        storages = {t.untyped_storage().data_ptr() for t in cap.q + cap.k}
        assert len(storages) == 1  # one block per forward, holding q and k only (not the layers' qkv buffers)
        assert cap.q[0].untyped_storage().nbytes() == sum(t.numel() * t.element_size() for t in cap.q + cap.k)
        vm.model(x.flip(-1))  # a second forward records new tensors: those from the first stay valid
    assert torch.equal(held, first_q0)
    assert not torch.equal(cap.q[0], held)
    assert all(t.is_contiguous() for t in cap.q + cap.k)


def test_inline_capture_mark_is_gone_when_a_layer_raises(monkeypatch):
    """The SDPA route is marked per layer; an exception inside an attention module still unmarks it, and SDPA is
    torch's own again on this thread."""
    from vizapp import capture

    vm = small_model("vit_tiny_patch16_224", img_size=64, depth=2)
    x = vm.transform(random_image(4))[None]

    def broken(_x):
        assert [layer for _, layer in capture._ROUTE.stack] == [1]
        raise RuntimeError("proj failed")

    monkeypatch.setattr(vm.model.blocks[1].attn.proj, "forward", broken)
    rec = _Recorder()
    with pytest.raises(RuntimeError, match="proj failed"), torch.no_grad():
        with AttentionCapture(vm.model, on_attention=rec):
            vm.model(x)
    assert rec.done == [0, 1]
    assert capture._ROUTE.stack == [] and capture._ROUTE.top is None
    assert torch.nn.functional.scaled_dot_product_attention is capture._ORIGINAL_SDPA  # torch's own again


def test_sdpa_route_is_open_while_any_capture_is_and_only_sees_its_own_thread():
    """The replaced SDPA stays while a capture is open on any thread and is torch's own after the last one closes;
    a call from a thread with no capture running a layer is torch's own function's result."""
    import threading

    from vizapp import capture

    vm = small_model("vit_tiny_patch16_224", img_size=32, depth=2)
    x = vm.transform(random_image(5))[None]
    q, k, v = (torch.randn(1, 2, 5, 4) for _ in range(3))
    opened, release = threading.Event(), threading.Event()

    def holder():
        with AttentionCapture(vm.model):
            opened.set()
            release.wait(10)

    t = threading.Thread(target=holder)
    t.start()
    opened.wait(10)
    try:
        assert torch.nn.functional.scaled_dot_product_attention is not capture._ORIGINAL_SDPA
        with torch.no_grad(), AttentionCapture(vm.model, on_attention=_Recorder()) as cap:
            vm.model(x)
        assert cap.inline_layers == {0, 1}
        # still open: the other thread's capture holds it; a bare call here is torch's own result
        assert torch.nn.functional.scaled_dot_product_attention is not capture._ORIGINAL_SDPA
        torch.testing.assert_close(
            torch.nn.functional.scaled_dot_product_attention(q, k, v), capture._ORIGINAL_SDPA(q, k, v), atol=0, rtol=0
        )
    finally:
        release.set()
        t.join(10)
    assert torch.nn.functional.scaled_dot_product_attention is capture._ORIGINAL_SDPA


def test_torchvision_mha_mode_is_gone_when_a_layer_raises(monkeypatch):
    """torch's MultiheadAttention is marked with a TorchFunctionMode (it also turns off the fused MHA fast path);
    an exception inside it still pops the mode."""
    from torch.overrides import _get_current_function_mode_stack

    vm = vizapp.load_model("torchvision:vit_b_16", pretrained=False, device="cpu", image_size=32)
    x = vm.transform(random_image(4))[None]
    seen, real = [], AttentionCapture._mha_call

    def broken(self, layer, args, kwargs):
        seen.append(layer)
        if layer == 1:
            raise RuntimeError("layer 1 failed")
        return real(self, layer, args, kwargs)

    monkeypatch.setattr(AttentionCapture, "_mha_call", broken)
    with pytest.raises(RuntimeError, match="layer 1 failed"), torch.no_grad():
        with AttentionCapture(vm.model, on_attention=_Recorder()):
            vm.model(x)
    assert seen == [0, 1]
    assert _get_current_function_mode_stack() == []


def test_half_precision_forward_keeps_attention_maths_in_fp32():
    """A bfloat16 model: the forward runs in bf16, the attention the analyses read is fp32 softmax of the bf16 q
    and k, so it equals the fp32 reference on those same q and k to fp32 rounding, and the maps stay close to the
    fp32 model's (bf16 weights and activations: about 1% apart)."""
    from vizapp.analysis import mean_attention_distance

    vm32 = small_model("vit_tiny_patch16_224", img_size=64, depth=3)
    vm16 = small_model("vit_tiny_patch16_224", img_size=64, depth=3, dtype=torch.bfloat16)
    assert next(vm16.model.parameters()).dtype == torch.bfloat16
    img = random_image(5)
    r16, r32 = vizapp.analyze(vm16, img), vizapp.analyze(vm32, img)
    assert r16.mean_distance.dtype == np.float32 and r16.q[0].dtype == torch.float32
    # the reference maths on the captured (bf16-valued) q and k
    attn = torch.stack([attention_from_qk(q, k, s) for q, k, s in zip(r16.q, r16.k, r16.scales, strict=True)])
    expected = mean_attention_distance(attn, r16.grid_size, r16.patch_size, r16.num_prefix_tokens)
    np.testing.assert_allclose(r16.mean_distance, expected.numpy(), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(r16.mean_distance, r32.mean_distance, rtol=0.03)
    np.testing.assert_allclose(r16.rollout(), r32.rollout(), atol=0.03 * r32.rollout().max())
    # three images in one forward, formed several at a time (capture._inline_images: fp32 products written into the
    # bf16 output): each image's probabilities as the model's own bf16 forward gives them, in the images' order
    imgs = [random_image(i) for i in (5, 6, 7)]
    batch = vizapp.analyze(vm16, imgs)
    with torch.no_grad():
        own = torch.log_softmax(vm16.logits(torch.stack([vm16.transform(im) for im in imgs]).bfloat16()).float(), -1)
    for i, r in enumerate(batch):  # about 0.01 apart (bf16 rounding); another image's are about 1 apart
        np.testing.assert_allclose(np.log(r.probs), own[i].numpy(), atol=0.05)
    np.testing.assert_allclose(batch[0].mean_distance, r16.mean_distance, rtol=0.01)


@pytest.mark.parametrize("batch", [1, 2])
def test_qk_on_cpu_gives_each_layers_q_and_k_of_one_image(batch):
    """The same q and k as the capture's per-layer tensors, contiguous, without a copy on the CPU (views of the
    packed block), also for a layer that is no longer in the packed block."""
    vm = small_model("vit_tiny_patch16_224", img_size=32, depth=3)
    x = torch.stack([vm.transform(random_image(i)) for i in range(batch)])
    with torch.no_grad(), AttentionCapture(vm.model) as cap:
        vm.model(x)
    image = batch - 1
    q, k = cap.qk_on_cpu(image)
    assert len(q) == len(k) == 3
    for layer in range(3):
        assert q[layer].is_contiguous() and q[layer].shape == cap.q[layer][image].shape
        torch.testing.assert_close(q[layer], cap.q[layer][image], atol=0, rtol=0)
        torch.testing.assert_close(k[layer], cap.k[layer][image], atol=0, rtol=0)
    if batch == 1:  # on the CPU in float32 the packed block is used as it is
        assert q[0].untyped_storage().data_ptr() == cap.q[0].untyped_storage().data_ptr()
    cap.q[1] = cap.q[1].clone()  # no longer in the packed block
    q2, k2 = cap.qk_on_cpu(image)
    for layer in range(3):
        torch.testing.assert_close(q2[layer], q[layer], atol=0, rtol=0)
        torch.testing.assert_close(k2[layer], k[layer], atol=0, rtol=0)
    cap.k[2] = None
    with pytest.raises(RuntimeError, match="no q and k"):
        cap.qk_on_cpu()


def test_a_torch_compiled_model_is_captured_exactly():
    """A model wrapped by torch.compile (dynamo; the eager backend needs no compiler) is still captured: dynamo cannot
    trace the capture's thread check (``threading.get_ident``, it warns so), breaks its graph there and runs the
    hooks and the routed SDPA call eagerly, so the attention is the plain model's."""
    vm = small_model("vit_tiny_patch16_224", img_size=32, depth=2)
    compiled = torch.compile(vm.model, backend="eager")
    x = vm.transform(random_image(3))[None]
    with torch.no_grad(), AttentionCapture(vm.model) as plain:
        expected = vm.model(x)
    with torch.no_grad(), AttentionCapture(vm.model) as cap:
        logits = compiled(x)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)
    for layer in range(2):
        torch.testing.assert_close(cap.attention(layer), plain.attention(layer), atol=1e-6, rtol=0)
    assert all_hooks(vm.model) == 0


@pytest.mark.parametrize("biased", [False, True])
def test_the_attention_stack_formed_layers_at_a_time_equals_each_layers_own(monkeypatch, biased):
    """``Analysis.attention_stack`` forms as many layers at once as fit ``limits.chunk_bytes`` (a product and a softmax
    for them all): whatever the grouping (every layer alone, groups of 2 of 3 layers, all at once), it equals the
    layers' own ``attention_layer`` bitwise, with BEiT's relative position bias too; and at once it dispatches a
    handful of operators where layer by layer it dispatches three a layer."""
    from benchmarks.launches import Counter
    from vizapp import limits

    if biased:
        vm = small_model("beit_base_patch16_224", img_size=48, depth=3, embed_dim=64, num_heads=4)
    else:
        vm = small_model("vit_tiny_patch16_224", img_size=48, depth=3)
    r = vizapp.analyze(vm, random_image(4))
    assert bool(r.biases) == biased
    each = torch.stack([r.attention_layer(i) for i in range(r.num_layers)])  # [L, H, N, N]
    layer_bytes = each[0].numel() * 4
    computed = {}
    for layers in (1, 2, 3):
        monkeypatch.setattr(limits, "chunk_bytes", lambda device, group=False, n=layers: n * layer_bytes)
        counter = Counter()
        with counter:
            got = r.attention_stack()
        assert torch.equal(got, each), layers
        computed[layers] = counter.host  # the CPU's operators
    assert computed[3] <= 7 < 3 * r.num_layers <= computed[1], computed


def test_q_and_k_of_one_projection_are_kept_in_one_copy_a_layer():
    """Where q and k are unbound from one qkv projection (timm), the capture keeps both with one copy a layer (one
    kernel on a GPU, not two); where they are separate tensors (as transformers' projections give) it copies each.
    Either way the kept q and k are bitwise the ones the layer hands over."""
    vm = small_model("vit_tiny_patch16_224", img_size=32, depth=3)
    x = vm.transform(random_image(4))[None]
    real = AttentionCapture._record

    def shared(self, layer, q, k, *rest):
        handed[layer] = (q.clone(), k.clone())
        return real(self, layer, q, k, *rest)

    def apart(self, layer, q, k, *rest):
        handed[layer] = (q.clone(), k.clone())
        return real(self, layer, q.clone(), k.clone(), *rest)

    for record, per_layer in ((shared, 1), (apart, 2)):
        handed: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        with mock.patch.object(AttentionCapture, "_record", record), torch.no_grad():
            with Ops() as ops, AttentionCapture(vm.model) as cap:
                vm.model(x)
        block = cap.q[0].untyped_storage().data_ptr()
        copies = ops.written.count(("aten.copy_", block))
        assert copies == 3 * per_layer, (record.__name__, copies)
        for layer in range(3):
            assert cap.q[layer].untyped_storage().data_ptr() == block == cap.k[layer].untyped_storage().data_ptr()
            assert torch.equal(cap.q[layer], handed[layer][0]) and torch.equal(cap.k[layer], handed[layer][1])
