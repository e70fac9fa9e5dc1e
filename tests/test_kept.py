"""vizapp.kept: the host blocks an analysis keeps are handed out again once free, never while anything refers to them,
and an analysis written into reused blocks is the analysis written into fresh ones."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

import vizapp
from tests.conftest import random_image, small_model
from vizapp import kept, limits

UNIT = 2**16  # bytes of one float32 [128, 128] block


@pytest.fixture(autouse=True)
def fresh_pool(monkeypatch):
    """An empty pool of its own for each test (whatever earlier tests' analyses still hold), pooling blocks from 1 KiB
    and holding at most 8 units."""
    monkeypatch.setattr(limits, "KEPT_POOL_MIN_BYTES", 2**10)
    monkeypatch.setattr(limits, "KEPT_POOL_BYTES", 8 * UNIT)
    monkeypatch.setattr(kept, "_pool", [])


def block(units: float = 1) -> torch.Tensor:
    return kept.empty((int(units * 128), 128))


def test_free_block_is_handed_out_again():
    a = block()
    ptr = a.data_ptr()
    assert kept.held() == (UNIT, 0)
    del a
    assert kept.held() == (0, UNIT)
    b = block()
    assert b.data_ptr() == ptr and b.shape == (128, 128) and b.is_contiguous()
    c = kept.empty((64, 256), torch.int32)  # the same bytes as another dtype and shape: the block is in use by b
    assert c.data_ptr() != ptr and c.dtype == torch.int32 and c.shape == (64, 256)
    assert kept.held() == (2 * UNIT, 0)


@pytest.mark.parametrize("holder", ["tensor", "view", "numpy", "storage", "dlpack"])
def test_block_in_use_is_never_handed_out(holder):
    a = block()
    ptr = a.data_ptr()
    held = {
        "tensor": lambda t: t,
        "view": lambda t: t[5:7, 3],
        "numpy": lambda t: t.numpy()[1:],
        "storage": lambda t: t.untyped_storage(),
        "dlpack": lambda t: torch.utils.dlpack.to_dlpack(t),
    }[holder](a)
    del a
    b = block()
    assert b.data_ptr() != ptr, f"a block still held by a {holder} was handed out again"
    del b
    del held
    assert block().data_ptr() == ptr


def test_smallest_fitting_free_block_at_most_twice_the_size():
    small, large = block(1), block(3)
    p_small, p_large = small.data_ptr(), large.data_ptr()
    del small, large
    # 2 units: the 1-unit block is too small, the 3-unit one at most twice the size
    two = block(2)
    assert two.data_ptr() == p_large
    del two
    # 1.25 units: the 3-unit block would be more than twice the size, the 1-unit one too small: a new block
    odd = block(1.25)
    assert odd.data_ptr() not in (p_small, p_large)
    # half a unit: the 1-unit block, not the larger free one
    half = block(0.5)
    assert half.data_ptr() == p_small


def test_pool_holds_at_most_its_budget():
    a, b = block(3), block(3)  # 6 of 8 units, both in use
    c = block(3)  # no room: an ordinary allocation the pool does not remember
    assert kept.held() == (6 * UNIT, 0)
    del c, a  # 3 units free, 3 in use
    d = block(4)  # needs room: the free 3-unit block (the oldest free) is dropped, the new one remembered
    # a block of its own size (the allocator may well hand the dropped block's address out again: not the pool's doing)
    assert d.untyped_storage().nbytes() == 4 * UNIT
    assert kept.held() == (7 * UNIT, 0)
    del b, d
    assert kept.release() == 7 * UNIT and kept.held() == (0, 0)


def test_free_block_no_recent_request_took_is_dropped(monkeypatch):
    monkeypatch.setattr(limits, "KEPT_POOL_RECENT", 4)
    monkeypatch.setattr(limits, "KEPT_POOL_BYTES", 64 * UNIT)
    a = block(1)
    del a
    others = [block(0.25)]  # too small for the free block: a new one
    assert kept.held() == (UNIT // 4, UNIT)
    others += [block(0.25) for _ in range(2)]  # 3 requests since a's: still held
    assert kept.held() == (3 * UNIT // 4, UNIT)
    others.append(block(0.25))  # the 4th: a was not handed out by any of the last 4
    assert kept.held() == (UNIT, 0)
    del others
    assert kept.held() == (0, UNIT)  # free, and each taken by one of the last 4 requests


def test_small_blocks_and_other_devices_are_not_pooled(monkeypatch):
    monkeypatch.setattr(limits, "KEPT_POOL_MIN_BYTES", 2 * UNIT)
    a = block(1)
    assert a.shape == (128, 128) and kept.held() == (0, 0)
    m = kept.empty((1024, 1024), torch.float32, "meta")
    assert m.device.type == "meta" and kept.held() == (0, 0)


def test_deterministic_mode_fills_a_reused_block_with_nan():
    a = block()
    a.fill_(1.0)
    ints = kept.empty((128, 128), torch.int32)
    ints.fill_(7)
    del a, ints
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        b = block()
        i = kept.empty((128, 128), torch.int32)
    finally:
        torch.use_deterministic_algorithms(before)
    assert torch.isnan(b).all()
    assert (i == torch.iinfo(torch.int32).max).all()


def _kept_arrays(a) -> dict[str, np.ndarray]:
    """Everything an analysis keeps, and what the views draw from it, as numpy copies."""
    out = {f"q{i}": t.numpy().copy() for i, t in enumerate(a.q)} | {
        f"k{i}": t.numpy().copy() for i, t in enumerate(a.k)
    }
    out |= {f"out{i}": t.numpy().copy() for i, t in a.block_outputs.items()}
    out |= {f"stat_{name}": np.asarray(v).copy() for name, v in a.statistics.items()}
    out |= {"norms": a.block_norms.copy(), "rollout": a.rollout(), "cls_rows": a.attention_all_layers()}
    return out


def test_analysis_in_reused_blocks_equals_analysis_in_fresh_ones(monkeypatch):
    """Two analyses in a row, the first dropped: the second writes into the first's blocks (filled with NaN first,
    as deterministic mode does) and keeps exactly what it keeps in fresh memory, the pool switched off."""
    vm = small_model("vit_tiny_patch16_224", img_size=64, depth=3)
    first, second = [random_image(s) for s in (1, 2)], [random_image(s) for s in (3, 4, 5)]
    monkeypatch.setattr(limits, "KEPT_POOL_MIN_BYTES", 1 << 62)  # the pool off: the reference
    fresh = [_kept_arrays(a) for a in vizapp.analyze(vm, second)]
    assert kept.held() == (0, 0)
    monkeypatch.setattr(limits, "KEPT_POOL_MIN_BYTES", 2**10)
    monkeypatch.setattr(limits, "KEPT_POOL_BYTES", 2**30)
    # the first batch of 3 sets the block sizes; then its analyses are dropped
    results = vizapp.analyze(vm, [random_image(6)] + first)
    used, _ = kept.held()
    q_ptr = results[0].q[0].untyped_storage().data_ptr()
    assert used > 0
    del results
    assert kept.held() == (0, used)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        again = vizapp.analyze(vm, second)
    finally:
        torch.use_deterministic_algorithms(before)
    assert again[0].q[0].untyped_storage().data_ptr() == q_ptr, "the second analysis did not reuse the first's block"
    assert kept.held() == (used, 0)
    for want, got in zip(fresh, (_kept_arrays(a) for a in again), strict=True):
        assert want.keys() == got.keys()
        for name in want:
            np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_concurrent_analyses_get_their_own_blocks(monkeypatch):
    monkeypatch.setattr(limits, "KEPT_POOL_BYTES", 2**30)
    vm = small_model("vit_tiny_patch16_224", img_size=64, depth=2)
    batches = [[random_image(10 * t + i) for i in range(3)] for t in range(4)]
    monkeypatch.setattr(limits, "KEPT_POOL_MIN_BYTES", 1 << 62)
    alone = [[a.rollout() for a in vizapp.analyze(vm, b)] for b in batches]
    monkeypatch.setattr(limits, "KEPT_POOL_MIN_BYTES", 2**10)
    got: dict[int, list] = {}

    def run(t: int) -> None:
        for _ in range(3):  # each round drops the last one's analyses: their blocks go back to the pool
            got[t] = [a.rollout() for a in vizapp.analyze(vm, batches[t])]

    threads = [threading.Thread(target=run, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for t in range(4):
        for want, have in zip(alone[t], got[t], strict=True):
            np.testing.assert_allclose(have, want, rtol=1e-6, atol=1e-7)


def test_as_pair_views_q_and_k_unbound_from_one_projection_and_nothing_else():
    """q and k unbound from one qkv tensor (timm's layout [B, N, 3, H, d] permuted to [3, B, H, N, d]) are one view
    [2, B, H, N, d] of its storage: writing through it is writing q and k. Tensors in separate storages, with other
    strides or shapes, or k before q, give None."""
    qkv = torch.arange(2 * 5 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 5, 3, 4, 6).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    pair = kept.as_pair(q, k)
    assert pair is not None and pair.shape == (2, *q.shape)
    assert torch.equal(pair[0], q) and torch.equal(pair[1], k)
    assert pair.untyped_storage().data_ptr() == q.untyped_storage().data_ptr()  # a view, not a copy
    by_hand = kept.as_pair(q, v)  # v lies further on at twice the step: a pair too
    assert by_hand is not None and torch.equal(by_hand[1], v)
    assert kept.as_pair(k, q) is None  # k before q
    assert kept.as_pair(q, k.clone()) is None  # separate storages (transformers' q and k projections)
    assert kept.as_pair(q, k.contiguous()) is None  # another storage and strides
    assert kept.as_pair(q, k[:, :, :3]) is None  # another shape
    assert kept.as_pair(q, k.double()) is None
