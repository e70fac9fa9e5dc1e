"""The CUDA-graph bookkeeping that does not need a GPU: which results a recorded pass stages to the host and in what
order, how the analysis reads them back, and the per-model cache of recordings (LRU, failures remembered, the
fallback without host staging). The recording and replay themselves are tested on a GPU in tests/test_cuda.py."""

from __future__ import annotations

import contextlib
import dataclasses
import re
from unittest import mock

import numpy as np
import pytest
import torch

import vizapp
from benchmarks.launches import StandInGraph
from tests.conftest import random_image, small_model
from vizapp import cudagraph, limits, pipeline
from vizapp.resultcache import Key


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("vit_tiny_patch16_224", dict(img_size=32, depth=3)),
        ("beit_base_patch16_224", dict(img_size=32, depth=2, num_classes=5)),  # per-layer biases staged too
        ("deit_tiny_distilled_patch16_224", dict(img_size=(32, 48), depth=2)),
    ],
)
def test_analysis_read_back_from_staged_results_equals_the_plain_path(name, kwargs, monkeypatch):
    vm = small_model(name, **kwargs)
    img = random_image(3)
    plain = vizapp.analyze(vm, img)
    calls, grad, real = [], [], pipeline._device_pass
    monkeypatch.setattr(pipeline, "_graphable", lambda vm, setup, batch=1: True)
    monkeypatch.setattr(pipeline, "_device_pass", lambda *a: grad.append(torch.is_grad_enabled()) or real(*a))
    monkeypatch.setattr(
        vm.graphs,
        "get",
        lambda key, fn, x, stage=None, keep=None: calls.append(keep) or StandInGraph(fn, x, stage),
    )
    staged = vizapp.analyze(vm, img)
    # the graph keeps the pass's constants (distances, rollout weights) alive: it reads their memory on every replay
    assert len(calls) == 1 and isinstance(calls[0], pipeline._PassSetup)
    assert grad == [False]  # the recorded pass keeps nothing for autograd
    np.testing.assert_array_equal(staged.probs, plain.probs)
    np.testing.assert_array_equal(staged.mean_distance, plain.mean_distance)
    np.testing.assert_array_equal(staged.block_norms, plain.block_norms)
    np.testing.assert_array_equal(staged.rollout(), plain.rollout())
    for layer in range(plain.num_layers):
        torch.testing.assert_close(staged.q[layer], plain.q[layer], atol=0, rtol=0)
        torch.testing.assert_close(staged.k[layer], plain.k[layer], atol=0, rtol=0)
        np.testing.assert_array_equal(staged.attention(layer), plain.attention(layer))
    assert len(staged.biases) == len(plain.biases)
    for b, a in zip(staged.biases, plain.biases, strict=True):
        assert (b is None) == (a is None) and (a is None or torch.equal(a, b))
    assert sorted(staged.block_outputs) == sorted(plain.block_outputs)
    for layer, out in plain.block_outputs.items():
        torch.testing.assert_close(staged.block_outputs[layer], out, atol=0, rtol=0)
    if plain.lens_probs is not None:
        np.testing.assert_array_equal(staged.lens_probs, plain.lens_probs)
    fused = Key("fused", ("mean",))
    assert (fused in staged._cache) == (fused in plain._cache)
    if fused in plain._cache:
        torch.testing.assert_close(staged._cache.peek(fused), plain._cache.peek(fused), atol=0, rtol=0)


class _ReplayingGraph(StandInGraph):
    """Like a replayed graph, writes every run's results into the SAME tensors (its memory), which it hands out."""

    @contextlib.contextmanager
    def run(self, x, meanwhile=None):
        out = self.fn(x)
        if meanwhile is not None:
            meanwhile()
        if not hasattr(self, "memory"):
            self.memory = out
        else:
            for mine, new in zip(self._tensors(self.memory), self._tensors(out), strict=True):
                mine.copy_(new)
        yield self.memory, [t.detach().float().clone() for t in self.stage(self.memory)]

    @staticmethod
    def _tensors(outs):
        return [t for out in outs for t in (*out.small(), *out.large())]


def test_an_analysis_from_a_replay_keeps_its_own_copy_of_the_graphs_memory(monkeypatch):
    """The next replay rewrites the graph's memory: q, k, biases, block outputs and fusions of an earlier analysis
    are copies (on the device), not views of it, so they still equal that image's own eager analysis."""
    vm = small_model("beit_base_patch16_224", img_size=32, depth=2, num_classes=5)
    imgs = [random_image(4), random_image(5)]
    plain = [vizapp.analyze(vm, img) for img in imgs]
    graph: list = []
    monkeypatch.setattr(pipeline, "_graphable", lambda vm, setup, batch=1: True)
    monkeypatch.setattr(
        vm.graphs,
        "get",
        lambda key, fn, x, stage=None, keep=None: (graph or graph.append(_ReplayingGraph(fn, x, stage)) or graph)[0],
    )
    first = vizapp.analyze(vm, imgs[0])
    vizapp.analyze(vm, imgs[1])  # rewrites the graph's memory
    for layer in range(first.num_layers):
        torch.testing.assert_close(first.q[layer], plain[0].q[layer], atol=0, rtol=0)
        torch.testing.assert_close(first.biases[layer], plain[0].biases[layer], atol=0, rtol=0)
    for layer, out in plain[0].block_outputs.items():
        torch.testing.assert_close(first.block_outputs[layer], out, atol=0, rtol=0)
    np.testing.assert_array_equal(first.rollout("max"), plain[0].rollout("max"))
    assert not np.array_equal(plain[0].rollout("max"), plain[1].rollout("max"))


def test_a_batch_is_graphed_from_its_second_call_and_keeps_its_own_copy(monkeypatch):
    """A batch's shape is recorded the second time it comes; each analysis read back from the replay equals the eager
    batch's, and keeps it after the next replay rewrites the graph's memory (one copy per shared block: q and k of
    every layer and image are views of one)."""
    vm = small_model("beit_base_patch16_224", img_size=32, depth=2, num_classes=5)
    first, second = [random_image(i) for i in (4, 5, 6)], [random_image(i) for i in (7, 8, 9)]
    plain = vizapp.analyze(vm, first)
    graph: list = []
    made = []
    monkeypatch.setattr(pipeline, "_graphable", lambda vm, setup, batch=1: True)

    def get(key, fn, x, stage=None, keep=None):
        made.append(key)
        return (graph or graph.append(_ReplayingGraph(fn, x, stage)) or graph)[0]

    monkeypatch.setattr(vm.graphs, "get", get)
    vizapp.analyze(vm, first)
    assert made == []  # a shape met once runs eagerly
    copied, real = [], pipeline.copies
    monkeypatch.setattr(pipeline, "copies", lambda ts: copied.append(len(ts)) or real(ts))
    graphed = vizapp.analyze(vm, first)
    assert len(made) == 1 and made[0][0] == (3, 3, 32, 32) and len(copied) == 1
    vizapp.analyze(vm, second)  # rewrites the graph's memory
    assert len(made) == 2 and len(graph) == 1
    for a, g in zip(plain, graphed, strict=True):
        np.testing.assert_array_equal(g.probs, a.probs)
        np.testing.assert_array_equal(g.mean_distance, a.mean_distance)
        np.testing.assert_array_equal(g.block_norms, a.block_norms)
        np.testing.assert_array_equal(g.rollout(), a.rollout())
        np.testing.assert_array_equal(g.rollout("max"), a.rollout("max"))  # from the copied q and k
        for layer in range(a.num_layers):
            torch.testing.assert_close(g.q[layer], a.q[layer], atol=0, rtol=0)
            torch.testing.assert_close(g.k[layer], a.k[layer], atol=0, rtol=0)
            torch.testing.assert_close(g.biases[layer], a.biases[layer], atol=0, rtol=0)
        for layer, out in a.block_outputs.items():
            torch.testing.assert_close(g.block_outputs[layer], out, atol=0, rtol=0)
    q_blocks = {t.untyped_storage().data_ptr() for g in graphed for t in (*g.q, *g.k)}
    assert len(q_blocks) == 1  # one copy of the batch's packed q and k
    assert q_blocks.isdisjoint(t.untyped_storage().data_ptr() for out in graph[0].memory for t in out.q)


def test_copies_copy_each_shared_block_once_and_lone_tensors_alone():
    block = torch.arange(24.0).reshape(2, 3, 4)
    big = torch.arange(100.0)
    views = [block[0], block[1, :, 1:], block[1], big[:10]]
    out = pipeline.copies(views)
    for v, c in zip(views, out, strict=True):
        torch.testing.assert_close(c, v, atol=0, rtol=0)
        assert c.stride() == v.stride() and c.untyped_storage().data_ptr() != v.untyped_storage().data_ptr()
    assert (
        out[0].untyped_storage().data_ptr()
        == out[1].untyped_storage().data_ptr()
        == out[2].untyped_storage().data_ptr()
    )
    assert out[3].untyped_storage().nbytes() == 10 * 4  # a tenth of its storage: cloned alone, not the whole 100
    block.zero_()
    assert out[2].sum().item() == sum(range(12, 24))  # the copies are their own memory


def test_a_key_is_asked_before_only_after_a_first_ask():
    cache = cudagraph.GraphCache()
    assert not cache.asked_before(("a",)) and cache.asked_before(("a",))
    for i in range(cudagraph.ASKED):
        cache.asked_before((i,))
    assert not cache.asked_before(("a",))  # forgotten after ASKED other keys


def test_pass_constants_are_made_once_per_model_and_grid(monkeypatch):
    vm = small_model("vit_tiny_patch16_224", img_size=32, depth=2)
    a = pipeline._PassSetup.of(vm, (2, 2), True, False)
    b = pipeline._PassSetup.of(vm, (2, 2), False, False)
    assert b.dist is a.dist and b.weights is a.weights and not b.inline
    assert pipeline._PassSetup.of(vm, (2, 3), True, False).dist.shape == (6, 6)
    assert a.weights.tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]  # the CLS row
    monkeypatch.setattr(limits, "FUSED_CACHE_LIMIT_BYTES", 0)  # the byte budgets are read every time
    assert a.keep_fused and not pipeline._PassSetup.of(vm, (2, 2), True, False).keep_fused


def test_only_the_plain_gpu_pass_is_graphed():
    vm = small_model("vit_tiny_patch16_224", img_size=32, depth=2)
    setup = pipeline._PassSetup.of(vm, vm.grid_size, inline=True, gradients=False)
    replay = pipeline._PassSetup.of(vm, vm.grid_size, inline=False, gradients=False)
    assert not pipeline._graphable(vm, setup)  # on the CPU
    vm = dataclasses.replace(vm, device=torch.device("cuda"))  # only the decision is asked here, nothing runs
    assert pipeline._graphable(vm, setup)
    assert not pipeline._graphable(vm, replay)
    assert not pipeline._graphable(vm, dataclasses.replace(setup, gradients=True))
    with pytest.MonkeyPatch.context() as m:
        m.setenv("VIZAPP_CUDA_GRAPHS", "0")
        assert not pipeline._graphable(vm, setup)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(limits, "GRAPH_MEMORY_BYTES", setup.graph_bytes(vm) - 1)
        assert not pipeline._graphable(vm, setup)
    with pytest.MonkeyPatch.context() as m:  # a batch's graph holds each image's record
        m.setattr(limits, "GRAPH_MEMORY_BYTES", setup.graph_bytes(vm, 3))
        assert pipeline._graphable(vm, setup, 3) and not pipeline._graphable(vm, setup, 4)
    assert setup.graph_bytes(vm, 4) - setup.graph_bytes(vm, 3) == setup.graph_bytes(vm, 2) - setup.graph_bytes(vm)


def test_a_gpu_stores_the_rollouts_fusions_only_where_the_pass_stays_a_graph():
    """The mean fusions stored on a GPU (limits.rollout_store_bytes) spare the rollout's products, but a pass whose
    graph they alone would push over GRAPH_MEMORY_BYTES multiplies the rollout up instead, and stays a graph."""
    from tests.devicesim import simulated_gpu

    vm = small_model("vit_tiny_patch16_224", img_size=32, depth=2)
    grid = vm.grid_size
    assert pipeline._PassSetup.of(vm, grid, True, False, 1).store_mean  # the CPU: within its own limit
    # the simulated GPU turns graphs off; only decisions are asked here
    with simulated_gpu(vm), mock.patch.dict("os.environ", {"VIZAPP_CUDA_GRAPHS": "1"}):
        stored = pipeline._PassSetup.of(vm, grid, True, False, 1)
        assert stored.store_mean and pipeline._graphable(vm, stored)
        streamed = dataclasses.replace(stored, store_mean=False)
        assert streamed.graph_bytes(vm) < stored.graph_bytes(vm)
        with pytest.MonkeyPatch.context() as m:
            m.setattr(limits, "GRAPH_MEMORY_BYTES", streamed.graph_bytes(vm))  # the fusions alone do not fit
            assert pipeline._PassSetup.of(vm, grid, True, False, 1) == streamed
            assert pipeline._PassSetup.of(vm, grid, True, True, 1) == dataclasses.replace(streamed, gradients=True)
            m.setattr(limits, "GRAPH_MEMORY_BYTES", streamed.graph_bytes(vm) - 1)  # no graph either way: stored
            assert pipeline._PassSetup.of(vm, grid, True, False, 1).store_mean
        with pytest.MonkeyPatch.context() as m:  # a batch's graph holds each image's fusions
            m.setattr(limits, "GRAPH_MEMORY_BYTES", streamed.graph_bytes(vm, 3))
            assert pipeline._PassSetup.of(vm, grid, True, False, 2).store_mean  # 2 images fit with their fusions
            assert pipeline._PassSetup.of(vm, grid, True, False, 3) == streamed  # 3 only without


class _FakePass:
    """Records the arguments; fails to record when told to, as a pass with a host sync would."""

    made: list = []
    fail_staged = False
    fail_all = False
    error: type = RuntimeError

    def __init__(self, fn, example, stage=None, keep=None):
        if self.fail_all or (self.fail_staged and stage is not None):
            raise self.error("operation not permitted when stream is capturing\nmore")
        self.stage = stage
        _FakePass.made.append(self)


@pytest.fixture()
def fake_pass(monkeypatch):
    _FakePass.made, _FakePass.fail_staged, _FakePass.fail_all, _FakePass.error = [], False, False, RuntimeError
    monkeypatch.setattr(cudagraph, "GraphedPass", _FakePass)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    return _FakePass


def test_graph_cache_keeps_the_latest_recordings_and_remembers_failures(fake_pass, monkeypatch):
    monkeypatch.setattr(limits, "CUDA_GRAPHS", 2)
    cache = cudagraph.GraphCache()
    x = torch.zeros(1)
    a = cache.get(("a",), None, x)
    assert cache.get(("a",), None, x) is a and len(fake_pass.made) == 1  # recorded once
    cache.get(("b",), None, x)
    cache.get(("a",), None, x)  # a is now the most recent
    cache.get(("c",), None, x)  # pushes out b, the least recently used
    assert len(cache) == 2 and len(fake_pass.made) == 3
    cache.get(("b",), None, x)
    assert len(fake_pass.made) == 4  # b was recorded again
    fake_pass.fail_all = True
    assert cache.get(("d",), None, x) is None
    # the error's first line, and where vizapp met it (here the recording's call: the stand-in raises in this file)
    assert re.fullmatch(
        r"RuntimeError: operation not permitted when stream is capturing \(raised at vizapp/cudagraph\.py:\d+ \(_record\)\)",
        cache.failure(("d",)),
    ), cache.failure(("d",))
    fake_pass.fail_all = False
    assert cache.get(("d",), None, x) is None  # the failure is remembered, not tried again
    assert cache.failures() == [cache.failure(("d",))]
    # and it took no recorded graph's place: c and b are still replayed, not recorded again
    made = len(fake_pass.made)
    assert cache.get(("c",), None, x) is not None and cache.get(("b",), None, x) is not None
    assert len(fake_pass.made) == made and len(cache) == 2
    # nor is it forgotten when more graphs are recorded than the cache keeps
    for key in ("e", "f", "g"):
        cache.get((key,), None, x)
    assert cache.get(("d",), None, x) is None and len(fake_pass.made) == made + 3 and cache.asked_before(("d",))


def test_graph_cache_remembers_the_last_failures_only(fake_pass):
    """Failures hold no memory but are not kept forever: the last ``ASKED`` of them, the least recently asked going
    first; a key forgotten so is tried again."""
    fake_pass.fail_all = True
    cache = cudagraph.GraphCache()
    x = torch.zeros(1)
    for i in range(cudagraph.ASKED + 1):
        assert cache.get((i,), None, x) is None
    assert len(cache.failures()) == cudagraph.ASKED and cache.failure((0,)) is None and cache.failure((1,)) is not None
    fake_pass.fail_all = False
    assert cache.get((0,), None, x) is not None and cache.get((1,), None, x) is None


def test_any_failure_to_record_leaves_the_pass_to_run_eagerly(fake_pass, caplog):
    # not only CUDA's capture errors: whatever a recording raises (here an AssertionError, as torch raises for some
    # misuse) is remembered as that key's failure, and the caller runs the pass eagerly; the log has its traceback,
    # once per key
    fake_pass.fail_all, fake_pass.error = True, AssertionError
    cache = cudagraph.GraphCache()
    with caplog.at_level("WARNING", logger="vizapp.cudagraph"):
        assert cache.get(("a",), None, torch.zeros(1)) is None
        assert cache.get(("a",), None, torch.zeros(1)) is None
    [why] = cache.failures()
    assert why.startswith("AssertionError: operation not permitted when stream is capturing (raised at vizapp/")
    assert f"could not be recorded; the pass runs eagerly: {why}" in caplog.text
    assert caplog.text.count("Traceback (most recent call last)") == 1 and "in __init__" in caplog.text


def test_graph_cache_falls_back_to_recording_without_host_staging(fake_pass):
    cache = cudagraph.GraphCache()
    fake_pass.fail_staged = True
    g = cache.get(("a",), None, torch.zeros(1), stage=lambda out: [out])
    assert g is not None and g.stage is None
    assert len(cache.notes) == 1 and "without host staging" in cache.notes[0]
    # neither form records (another error, so another note's text): a failure, and no note of a slower recording
    fake_pass.fail_all, fake_pass.error = True, AssertionError
    assert cache.get(("b",), None, torch.zeros(1), stage=lambda out: [out]) is None
    assert len(cache.notes) == 1 and cache.failure(("b",)) is not None


def test_graph_key_changes_with_what_a_recording_depends_on():
    vm = small_model("vit_tiny_patch16_224", img_size=32, depth=2)
    x = torch.zeros(1, 3, 32, 32)
    key = cudagraph.graph_key(vm.model, vm.weights_key(), x, True)
    assert cudagraph.graph_key(vm.model, vm.weights_key(), x, True) == key
    assert cudagraph.graph_key(vm.model, vm.weights_key(), torch.zeros(1, 3, 32, 48), True) != key
    assert cudagraph.graph_key(vm.model, vm.weights_key(), x.half(), True) != key
    with torch.no_grad():
        vm.model.head.weight.add_(1.0)  # modified in place: its version counter moves
    assert cudagraph.graph_key(vm.model, vm.weights_key(), x, True) != key
    vm.model.train()
    assert cudagraph.graph_key(vm.model, vm.weights_key(), x, True)[3] is True


class _TensorReplay(StandInGraph):
    """A replayed graph of a pass that returns one tensor: every run writes into the same memory, which it hands out."""

    def __init__(self, fn, example):
        super().__init__(fn, example)
        self.inputs, self.memory = [], None

    @contextlib.contextmanager
    def run(self, x, meanwhile=None):
        self.inputs.append(x)
        out = self.fn(x)
        if meanwhile is not None:
            meanwhile()
        if self.memory is None:
            self.memory = out
        else:
            self.memory.copy_(out)
        yield self.memory, None


def test_class_maps_from_the_replayed_gradient_passes_equal_the_eager_ones(monkeypatch):
    """Without a kept gradient-enabled forward (``analyze()``, the app's path), a class map runs a forward and a backward
    (vizapp.gradient_pass); on a GPU those are one graph whose input is the image and a one-hot row of the class, so one
    recording serves every class. Stood in for on the CPU: the maps equal the eager passes' exactly, both classes use
    the one recording, and the first class's gradients survive the second replay (a copy, not the graph's memory)."""
    from vizapp import gradient_pass

    vm = small_model("vit_tiny_patch16_224", img_size=32, depth=3, num_classes=5)
    img = random_image(7)
    eager = vizapp.analyze(vm, img)
    plain = {c: (eager.relevance(c), eager.grad_rollout(c), eager.attention_gradients(c).clone()) for c in (1, 3)}
    assert not np.array_equal(plain[1][0], plain[3][0])
    graphs, keys = [], []
    monkeypatch.setattr(gradient_pass, "graphable", lambda vm, x: True)

    def get(key, fn, x, stage=None, keep=None):
        keys.append(key)
        if not graphs:
            graphs.append(_TensorReplay(fn, x))
        return graphs[0]

    monkeypatch.setattr(vm.graphs, "get", get)
    r = vizapp.analyze(vm, img)
    first = r.attention_gradients(1)
    for c in (1, 3):
        np.testing.assert_array_equal(r.relevance(c), plain[c][0])
        np.testing.assert_array_equal(r.grad_rollout(c), plain[c][1])
    assert len(keys) == 2 and keys[0] == keys[1] and "attention gradients" in keys[0]
    (x1, hot1), (x3, hot3) = graphs[0].inputs
    assert torch.equal(x1, x3) and torch.equal(x1, r.input)
    assert hot1.tolist() == [[0, 1, 0, 0, 0]] and hot3.tolist() == [[0, 0, 0, 1, 0]]
    torch.testing.assert_close(first, plain[1][2], atol=0, rtol=0)  # not rewritten by the replay for class 3
    assert not torch.equal(graphs[0].memory, first)


def test_the_recorded_gradient_passes_copy_nothing_to_the_host():
    """A CUDA graph cannot hold a copy to the host (it waits for the device): the passes it records, the image and a
    one-hot row in, the gradients out, copy nothing there (simulated GPU), and give the eager passes' gradients."""
    from tests.devicesim import OnDevice, host_copies, simulated_gpu
    from vizapp import gradient_pass

    vm = small_model("vit_tiny_patch16_224", img_size=32, depth=2, num_classes=4)
    x = vm.transform(random_image(2))
    x = x if x.dim() == 4 else x[None]
    want = gradient_pass._passes(vm, x, 2)
    with simulated_gpu(vm):
        xs = x.to(vm.device)
        hot = torch.tensor([[0.0, 0.0, 1.0, 0.0]]).to(vm.device)
        with host_copies() as copies:
            got = gradient_pass._passes(vm, xs, hot)
        assert isinstance(got, OnDevice) and copies.count == 0
        got = got.cpu()
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert want.shape == (2, vm.num_heads, 5, 5)


def test_the_gradient_passes_are_graphed_on_a_gpu_within_the_memory_budget():
    from vizapp import gradient_pass

    vm = small_model("vit_tiny_patch16_224", img_size=32, depth=2)
    x = torch.zeros(1, 3, 32, 32)
    assert not gradient_pass.graphable(vm, x)  # on the CPU
    vm = dataclasses.replace(vm, device=torch.device("cuda"))  # only the decision is asked here, nothing runs
    assert gradient_pass.graphable(vm, x)
    with pytest.MonkeyPatch.context() as m:
        m.setenv("VIZAPP_CUDA_GRAPHS", "0")
        assert not gradient_pass.graphable(vm, x)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(limits, "GRAPH_MEMORY_BYTES", gradient_pass.graph_memory(vm, x) - 1)
        assert not gradient_pass.graphable(vm, x)
    # ViT-B/16 fits (about 243 MB estimated), ViT-L/16 at 384 px (about 3.3 GB) runs eagerly
    b, large = (limits.analysis_bytes(*shape, gradients=True) for shape in ((12, 197, 12), (24, 577, 16)))
    assert sum(b) <= limits.GRAPH_MEMORY_BYTES < sum(large)


def test_one_gradient_analysis_on_a_gpu_replays_its_pass_and_its_top_classs_gradients(monkeypatch):
    """``analyze(image, gradients=True)`` of one image on a GPU: the plain pass replayed, no autograd graph kept, and
    each class's gradients from one replay of the gradient passes when asked; every class map and ``class_gradients``
    equal those of the eager gradient-enabled analysis. Where the pass cannot be recorded, the eager forward keeps its
    graph as before. Stood in for on the CPU."""
    from vizapp import gradient_pass

    # The replayed pass forms its attention without a graph, the eager one in the graph: on a GPU both by torch's
    # softmax; the CPU standing in would take the first from the CPU kernel (vizapp.cpu_rows), not bit for bit torch's
    monkeypatch.setenv("VIZAPP_CPU_KERNEL", "0")
    vm = small_model("vit_tiny_patch16_224", img_size=32, depth=3, num_classes=5)
    img = random_image(8)
    eager = vizapp.analyze(vm, img, gradients=True)
    top = int(np.argmax(eager.probs))
    other = (top + 2) % 5
    assert eager.graph.maps is not None and not eager.graph.replays
    asked = []
    monkeypatch.setattr(pipeline, "_graphable", lambda vm, setup, batch=1: not setup.gradients)
    monkeypatch.setattr(gradient_pass, "graphable", lambda vm, x: True)

    def get(key, fn, x, stage=None, keep=None):
        asked.append("attention gradients" in key)
        return _TensorReplay(fn, x) if asked[-1] else StandInGraph(fn, x, stage)

    monkeypatch.setattr(vm.graphs, "get", get)
    r = vizapp.analyze(vm, img, gradients=True)
    assert asked == [False]  # the pass; no gradients before a class is asked
    assert r.graph.maps is None and r.graph.replays and not r.graph.given
    for c in (top, other):
        np.testing.assert_array_equal(r.relevance(c), eager.relevance(c))
        np.testing.assert_array_equal(r.grad_rollout(c), eager.grad_rollout(c))
    assert asked == [False, True, True]  # one replay per class
    fresh = vizapp.analyze(vm, img, gradients=True)
    assert pipeline.class_gradients([fresh], [other]) == [other]
    torch.testing.assert_close(fresh.graph.given[other], eager.attention_gradients(other), atol=0, rtol=0)
    monkeypatch.setattr(vm.graphs, "get", lambda key, fn, x, stage=None, keep=None: None)  # the recording failed
    kept = vizapp.analyze(vm, img, gradients=True)
    assert kept.graph.maps is not None and not kept.graph.replays
    np.testing.assert_array_equal(kept.relevance(other), eager.relevance(other))


def test_a_models_graph_failures_name_the_digests_and_the_slower_recordings(monkeypatch):
    """``VizModel.graph_failures`` lists the analysis graphs' failed recordings and their notes, and the weights
    digest's, named as the digest's; empty when every recording worked (on the CPU, none is tried)."""
    from vizapp.cudagraph import GraphCache

    vm = small_model("vit_tiny_patch16_224", img_size=32, depth=2)
    assert vm.graph_failures() == []
    monkeypatch.setitem(vm.graphs._failed, ("a shape",), "RuntimeError: capture failed (raised at x.py:1 (f))")
    monkeypatch.setattr(vm.graphs, "notes", ["recorded without host staging (RuntimeError: y)"])
    digest = GraphCache()
    digest._failed[("weights",)] = "RuntimeError: z (raised at vizapp/models/digest.py:9 (graphed_sums))"
    monkeypatch.setitem(vm._digest, "digest graphs", digest)
    assert vm.graph_failures() == [
        "RuntimeError: capture failed (raised at x.py:1 (f))",
        "recorded without host staging (RuntimeError: y)",
        "the weights digest: RuntimeError: z (raised at vizapp/models/digest.py:9 (graphed_sums))",
    ]
