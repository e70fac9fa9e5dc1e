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
    assert sorted(key) == sorted(walk) and vm.weights_key() == key
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
