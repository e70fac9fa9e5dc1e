"""A result stays tied to the network that produced it (issue 16 item 1), and the gradient-enabled analysis gives
the class-specific maps at one backward per class (item 5)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import random_image, small_model

import vizapp
from vizapp import models
from vizapp.errors import StaleResultError


def test_evicted_random_weight_model_is_refused_not_rebuilt(monkeypatch):
    """The issue's reproduction: after the cache drops a random-weight model, the class-specific methods used to run on
    a rebuilt network with fresh weights. Now they refuse."""
    monkeypatch.setattr(models, "MODEL_CACHE", models.BudgetedModelCache(1, 10**12))
    vm = small_model("vit_tiny_patch16_224", img_size=32, depth=2)
    r = vizapp.analyze(vm, random_image(1))
    c = int(r.probs.argmax())
    before = r.relevance(c)  # the model is alive: fine
    del vm
    small_model("deit_tiny_patch16_224", img_size=32, depth=2)  # evicts it; nothing else holds it
    import gc

    gc.collect()
    assert r.model_ref() is None
    for call in (
        lambda: r.faithfulness({"m": r.rollout()}, steps=4, random_seed=None),
        lambda: r.relevance(c + 1),
        lambda: r.grad_rollout(c + 1),
    ):
        with pytest.raises(StaleResultError, match="random weights"):
            call()
    assert before.shape == r.grid_size


def test_weights_changed_in_memory_are_detected():
    vm = small_model("vit_tiny_patch16_224", img_size=32, depth=2, num_classes=7)
    r = vizapp.analyze(vm, random_image(2))
    r.grad_rollout(1)
    original = vm.model.head.weight.detach().clone()
    vm.model.head.weight.data.mul_(1.5)  # through .data: no version counter sees it
    with pytest.raises(StaleResultError, match="changed"):
        r.relevance(2)
    vm.model.head.weight.data.copy_(original)  # the very weights again: accepted
    assert r.relevance(2).shape == r.grid_size


def test_weights_key_sees_replaced_and_modified_weights_and_equals_the_parameter_walk():
    vm = small_model("vit_tiny_patch16_224", img_size=32, depth=2, num_classes=7)
    key = vm.weights_key()
    walk = [(id(t), t.data_ptr(), t._version) for t in (*vm.model.parameters(), *vm.model.buffers())]
    assert sorted(key[1:]) == sorted(walk) and vm.weights_key() == key  # key[0]: the module tree's structure
    with torch.no_grad():
        vm.model.head.bias.add_(1.0)  # in place through torch: the version counter moves
    assert vm.weights_key() != key
    key = vm.weights_key()
    vm.model.blocks[1].mlp.fc1.weight = torch.nn.Parameter(vm.model.blocks[1].mlp.fc1.weight.detach().clone())
    assert vm.weights_key() != key


def test_a_reloaded_model_with_the_same_weights_is_accepted(card_model, monkeypatch):
    """Weights from a file reload identically: the result goes on working after an eviction."""
    monkeypatch.setattr(models, "MODEL_CACHE", models.BudgetedModelCache(1, 10**12))
    vm = vizapp.load_model(card_model, device="cpu")
    r = vizapp.analyze(vm, random_image(3))
    expected = r.relevance(1)
    del vm
    small_model("vit_tiny_patch16_224", img_size=32, depth=2)
    import gc

    gc.collect()
    assert r.model_ref() is None
    r._cache.clear()
    np.testing.assert_allclose(r.relevance(1), expected, atol=1e-6)


def test_gradient_analysis_equals_the_two_pass_path_and_costs_one_backward_per_class():
    vm = small_model("deit_tiny_distilled_patch16_224", img_size=64, depth=3)
    img = random_image(4)
    plain = vizapp.analyze(vm, img)
    fast = vizapp.analyze(vm, img, gradients=True)
    np.testing.assert_allclose(fast.mean_distance, plain.mean_distance, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(fast.rollout(), plain.rollout(), atol=1e-6)
    np.testing.assert_allclose(fast.probs, plain.probs, atol=1e-6)
    forwards = []
    handle = vm.model.patch_embed.register_forward_hook(lambda *a: forwards.append(1))
    try:
        for c in (0, 3, 5):
            np.testing.assert_allclose(fast.relevance(c), plain.relevance(c), rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(fast.grad_rollout(c), plain.grad_rollout(c), rtol=1e-4, atol=1e-6)
    finally:
        handle.remove()
    assert len(forwards) == 3  # the plain result ran one forward per class; the gradient-enabled one none
    clone = copy.deepcopy(fast)  # the graph is not copied: the copy falls back to a forward and a backward
    assert clone.graph.maps is None and fast.graph.maps is not None
    np.testing.assert_allclose(clone.relevance(4), fast.relevance(4), rtol=1e-4, atol=1e-6)


# -- the weights digest sees permutations, dtype and device changes, and edits through .data (issue 27, medium 6) ----


@pytest.fixture
def private_model(monkeypatch):
    """A tiny model in a cache of its own, so that what a test does to its weights reaches no other test."""
    monkeypatch.setattr(models, "MODEL_CACHE", models.BudgetedModelCache(4, 10**12))
    return small_model("vit_tiny_patch16_224", img_size=32, depth=2, num_classes=7)


def _swap_data(a: torch.Tensor, b: torch.Tensor) -> None:
    with torch.no_grad():
        tmp = a.detach().clone()
        a.data.copy_(b.data)
        b.data.copy_(tmp)


def _swap_blocks(m: torch.nn.Module) -> None:
    m.blocks[0], m.blocks[1] = m.blocks[1], m.blocks[0]


@pytest.mark.parametrize(
    "edit",
    [
        # two tensors of the same shape trade places (count, sum, sum of squares unchanged)
        lambda m: _swap_data(m.blocks[0].attn.qkv.weight, m.blocks[1].attn.qkv.weight),
        # two whole blocks trade places in the module tree
        lambda m: _swap_blocks(m),
        # two elements of one tensor 31 apart trade places (the old strided sample saw neither move)
        lambda m: _swap_data(m.head.weight.view(-1)[3:4], m.head.weight.view(-1)[34:35]),
    ],
    ids=["two-tensors", "two-blocks", "two-elements"],
)
def test_a_permutation_of_the_weights_is_refused(private_model, edit):
    vm = private_model
    r = vizapp.analyze(vm, random_image(5))
    assert r.relevance(2).shape == r.grid_size
    edit(vm.model)
    assert vm.fingerprint() != r.model_fingerprint
    with pytest.raises(StaleResultError, match="changed since"):
        r.relevance(3)


def test_swapped_blocks_change_the_weights_key(private_model):
    vm = private_model
    key = vm.weights_key()
    _swap_blocks(vm.model)
    assert vm.weights_key() != key  # the cached module walk is redone when a submodule moves


def test_an_edit_through_data_is_seen_by_the_next_analysis(private_model):
    """The issue's two reproductions: edit through .data, analyse (r2), then ask r2 before and after restoring."""
    vm = private_model
    img = random_image(6)
    r1 = vizapp.analyze(vm, img)
    r1.relevance(1)
    original = vm.model.blocks[0].mlp.fc1.weight.detach().clone()
    vm.model.blocks[0].mlp.fc1.weight.data.mul_(-2.0)  # no version counter moves
    r2 = vizapp.analyze(vm, img)
    # asked before restoring: r2's model is the one it was made with, so it explains (it raised a false error)
    fresh = vizapp.analyze(vm, img)
    np.testing.assert_allclose(r2.relevance(1), fresh.relevance(1), atol=1e-6)
    with pytest.raises(StaleResultError):
        r1.relevance(2)
    vm.model.blocks[0].mlp.fc1.weight.data.copy_(original)
    # restored: r2's weights are gone (it used to record the pre-edit digest and explained with neither set)
    with pytest.raises(StaleResultError, match="changed since"):
        r2.relevance(2)
    assert r1.relevance(2).shape == r1.grid_size  # r1's weights are back


@pytest.mark.parametrize("convert", [lambda m: m.double(), lambda m: m.to("meta")], ids=["double", "meta"])
def test_a_converted_or_moved_model_is_refused_cleanly(private_model, convert):
    vm = private_model
    r = vizapp.analyze(vm, random_image(7))
    convert(vm.model)
    for call in (lambda: r.relevance(1), lambda: r.faithfulness({"m": r.rollout()}, steps=4, random_seed=None)):
        with pytest.raises(StaleResultError, match="converted, moved or renamed"):
            call()


def test_the_digest_is_exact_on_the_cpu_and_position_weighted_on_a_device():
    from vizapp.models.digest import CHUNK, device_sums, weights_digest

    m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    d = weights_digest(m)
    assert weights_digest(copy.deepcopy(m)) == d  # the same weights, another copy: equal
    with torch.no_grad():
        m[0].weight.view(-1)[5] = torch.nextafter(m[0].weight.view(-1)[5], torch.tensor(9.0))  # one ulp
    assert weights_digest(m).values != d.values and weights_digest(m).layout == d.layout
    # the device path (used for GPU tensors; run here on the CPU): one sum per chunk, weighted by position
    t = torch.randn(CHUNK + 10, generator=torch.Generator().manual_seed(0))
    s = device_sums(t)
    assert s.shape == (2,) and s.dtype == torch.float64
    swapped = t.clone()
    swapped[[1, 2]] = t[[2, 1]]
    assert device_sums(swapped)[0] != s[0] and device_sums(swapped)[1] == s[1]
    assert torch.equal(device_sums(t.clone()), s)


def test_device_sums_are_one_weighted_sum_per_chunk_whatever_the_grouping(monkeypatch):
    """The grouped matrix-vector form equals the definition: chunk c's sum is Σ_i t[c·CHUNK + i] · w[i]."""
    import vizapp.models.digest as digest

    monkeypatch.setattr(digest, "GROUP", 2)  # 5 whole chunks: groups of 2, 2 and 1, then a partial chunk
    t = torch.randn(5 * digest.CHUNK + 3, generator=torch.Generator().manual_seed(1))
    w = digest._weights_on(t.device)
    want = [
        torch.dot(t[lo : lo + digest.CHUNK].double(), w[: min(digest.CHUNK, t.numel() - lo)])
        for lo in range(0, t.numel(), digest.CHUNK)
    ]
    got = digest.device_sums(t)
    assert got.shape == (6,)
    assert torch.allclose(got, torch.stack(want), rtol=1e-12, atol=0)
    assert digest.device_sums(torch.zeros(0)).shape == (0,)
