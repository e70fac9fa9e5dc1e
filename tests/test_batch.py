"""The batch API: ``vizapp.analyze`` of a list (one forward, one Analysis per image) and ``vizapp.explain`` (maps of a
batch, the class-specific ones from one forward and ONE backward), against the one-image path image by image."""

from __future__ import annotations

import argparse
import contextlib
import io
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import vizapp
from tests.conftest import FAMILIES, random_image, small_model
from vizapp import limits
from vizapp.errors import BadImageError, BadParameterError, UnsupportedModelError
from vizapp.methods import METHODS, unavailable

TOL = dict(rtol=1e-5, atol=1e-5)


def assert_same_map(actual, expected) -> None:
    """Equal to 1e-5 of the expected map's largest value: class maps of random-weight models can be ~1e-5 in all
    (the card model's Transformer Attribution), where a fixed atol of 1e-5 would accept any map of that size."""
    expected = np.asarray(expected)
    scale = float(np.abs(expected).max()) or 1.0
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5 * scale)


def maps_differ(a, b) -> bool:
    """Whether two maps differ by more than :func:`assert_same_map`'s tolerance (so that a test comparing images' maps
    could tell them apart)."""
    scale = max(float(np.abs(a).max()), float(np.abs(b).max())) or 1.0
    return not np.allclose(a, b, rtol=1e-5, atol=1e-5 * scale)


SIZES = [(96, 128), (64, 64), (120, 90), (50, 200)]  # each image brought to the model's size by its own transform
FAMILY = {f[0]: f for f in FAMILIES}
BEIT = ("beit", "beit_base_patch16_224", dict(img_size=48, depth=2, embed_dim=64, num_heads=4))  # relative bias


def images(n: int = 4, seed: int = 0) -> list:
    return [random_image(seed + i, size=SIZES[i % len(SIZES)]) for i in range(n)]


def load(fid: str, card_model: str):
    if fid == "card":
        torch.manual_seed(0)
        return vizapp.load_model(card_model)
    _, name, kwargs = BEIT if fid == "beit" else FAMILY[fid]
    vm = small_model(name, **kwargs)
    with torch.no_grad():
        for module in vm.model.modules():
            if type(module).__name__ == "LayerScale":
                # DINOv2's and the gap model's LayerScale starts at 1e-5: the attention would barely reach the
                # logits (gradients ~1e-6) and every class map be flat to 1e-7, so no class test could fail
                module.gamma.fill_(1.0)
    return vm


WRITTEN_OUT = {"transformer_attribution"}
"""Methods whose forward does not call the model: their own float64 forward of a copy (vizapp.analysis.lrp)."""


@contextlib.contextmanager
def counted_forwards(vm):
    """The batch size of every forward of ``vm``'s network inside the block."""
    sizes: list[int] = []
    handle = vm.model.register_forward_pre_hook(lambda _m, args: sizes.append(int(args[0].shape[0])))
    try:
        yield sizes
    finally:
        handle.remove()


@contextlib.contextmanager
def counted_backwards(monkeypatch):
    """Every backward pass run through torch.autograd.grad or torch.autograd.backward (Tensor.backward too); not
    those a backward runs inside itself (vizapp.graph_maps forms each layer's attention again in its backward)."""
    calls: list[str] = []
    grad, backward = torch.autograd.grad, torch.autograd.backward
    depth = [0]

    def counted(name, run):
        def call(*args, **kwargs):
            if depth[0] == 0:
                calls.append(name)
            depth[0] += 1
            try:
                return run(*args, **kwargs)
            finally:
                depth[0] -= 1

        return call

    counting_grad, counting_backward = counted("grad", grad), counted("backward", backward)

    monkeypatch.setattr(torch.autograd, "grad", counting_grad)
    monkeypatch.setattr(torch.autograd, "backward", counting_backward)
    yield calls


def queries(r) -> list:
    """CLS (where there is one), a prefix token, the first and the last patch."""
    gh, gw = r.grid_size
    found = [(0, 0), (gh - 1, gw - 1), r.num_prefix_tokens - 1 if r.num_prefix_tokens else 0]
    return (["cls"] if r.has_class_token else []) + found


def assert_same_analysis(batched, alone) -> None:
    """Every public output of the two analyses agrees to 1e-5."""
    assert batched.grid_size == alone.grid_size and batched.num_prefix_tokens == alone.num_prefix_tokens
    assert [lbl for lbl, _ in batched.top_k] == [lbl for lbl, _ in alone.top_k]
    np.testing.assert_allclose([p for _, p in batched.top_k], [p for _, p in alone.top_k], **TOL)
    if alone.probs is not None:
        np.testing.assert_allclose(batched.probs, alone.probs, **TOL)
    torch.testing.assert_close(batched.input, alone.input, rtol=0, atol=0)
    np.testing.assert_array_equal(batched.image, alone.image)
    assert batched.notes == alone.notes
    np.testing.assert_allclose(batched.mean_distance, alone.mean_distance, **TOL)
    np.testing.assert_allclose(batched.token_norms(), alone.token_norms(), rtol=1e-5, atol=1e-4)
    if alone.lens_probs is not None:
        np.testing.assert_allclose(batched.lens_probs, alone.lens_probs, **TOL)
        assert [[c for c, _ in row] for row in batched.logit_lens()] == [
            [c for c, _ in row] for row in alone.logit_lens()
        ]
    for layer in range(alone.num_layers):
        for query in queries(alone):
            np.testing.assert_allclose(
                batched.attention(layer, None, query), alone.attention(layer, None, query), **TOL
            )
        np.testing.assert_allclose(batched.attention(layer, 1, (0, 1)), alone.attention(layer, 1, (0, 1)), **TOL)
    np.testing.assert_allclose(batched.rollout(), alone.rollout(), **TOL)
    np.testing.assert_allclose(batched.rollout("max", 0.5, 1), alone.rollout("max", 0.5, 1), **TOL)
    np.testing.assert_allclose(batched.feature_pca(), alone.feature_pca(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
        batched.feature_similarity((0, 0)), alone.feature_similarity((0, 0)), rtol=1e-5, atol=1e-5
    )
    if alone.probs is not None:
        for name in ("grad_rollout", "relevance"):
            assert_same_map(batched.explain(name, 1), alone.explain(name, 1))


@pytest.mark.parametrize("fid", ["card", *FAMILY, "beit"])
def test_a_batch_analysis_equals_each_image_alone(fid, card_model):
    vm = load(fid, card_model)
    imgs = images(4)
    with counted_forwards(vm) as forwards:
        batch = vizapp.analyze(vm, imgs)
    assert forwards == [4]  # one batched forward
    assert isinstance(batch, list) and len(batch) == 4
    for img, r in zip(imgs, batch, strict=True):
        assert_same_analysis(r, vizapp.analyze(vm, img))
    # the images really differ, so a batch that gave every image image 0's record would fail above
    assert not np.allclose(batch[0].rollout(), batch[1].rollout())


def test_a_batch_through_the_replay_path_equals_each_image_alone():
    """inline=False: the model's own SDPA forms each layer's output and the statistics are fed from q and k."""
    vm = small_model(FAMILY["deit_distilled"][1], **FAMILY["deit_distilled"][2])
    imgs = images(3, seed=5)
    for img, r in zip(imgs, vizapp.analyze(vm, imgs, inline=False), strict=True):
        assert r.recomputed_layers == tuple(range(vm.num_layers))
        assert_same_analysis(r, vizapp.analyze(vm, img))


def test_a_tuple_is_a_batch_and_one_image_stays_one_analysis(image):
    vm = small_model(FAMILY["vit"][1], **FAMILY["vit"][2])
    assert isinstance(vizapp.analyze(vm, image), vizapp.Analysis)
    arr = np.asarray(image)
    assert isinstance(vizapp.analyze(vm, arr), vizapp.Analysis)  # an array is one image, not a batch of rows
    out = vizapp.analyze(vm, (image, arr))
    assert isinstance(out, list) and len(out) == 2
    np.testing.assert_allclose(out[0].probs, out[1].probs, **TOL)
    with pytest.raises(BadParameterError, match="at least one image"):
        vizapp.analyze(vm, [])


def test_a_gradient_batch_gives_each_image_its_own_gradients(monkeypatch):
    vm = small_model(FAMILY["deit_distilled"][1], **FAMILY["deit_distilled"][2])
    imgs = images(3, seed=2)
    batch = vizapp.analyze(vm, imgs, gradients=True)
    for img, r in zip(imgs, batch, strict=True):
        alone = vizapp.analyze(vm, img, gradients=True)
        for c in (None, 3, 7):
            expected = alone.attention_gradients(c)
            scale = float(expected.abs().max()) or 1.0
            assert scale > 1e-6  # gradients that can be told apart at the tolerance below
            torch.testing.assert_close(r.attention_gradients(c), expected, rtol=1e-5, atol=1e-5 * scale)
            assert_same_map(r.relevance(c), alone.relevance(c))
    with counted_backwards(monkeypatch) as calls:
        vizapp.pipeline.class_gradients(batch, [5, vm.labels[9], None])
    assert calls == ["grad"]
    with counted_backwards(monkeypatch) as calls:  # the classes found by that backward cost nothing more
        batch[0].grad_rollout(5), batch[1].relevance(9), batch[2].relevance(None)
    assert calls == []


def expected_map(r, name: str, cls, **controls):
    """The one-image path's map, or the error it raises."""
    try:
        return r.explain(name, cls, **{k: v for k, v in controls.items() if k in METHODS[name].options})
    except BadParameterError as exc:
        return exc


@pytest.mark.parametrize("fid", ["card", "deit_distilled", "gap_reg4"])
@pytest.mark.parametrize("classes", [None, 3, "per image"])
def test_explain_equals_each_images_own_map_for_every_method(fid, classes, card_model, monkeypatch):
    vm = load(fid, card_model)
    imgs = images(3, seed=7)
    if classes == "per image":
        classes = [2, vm.labels[5], np.int64(1)]  # an index, a label, a numpy integer
    alone = [vizapp.analyze(vm, img) for img in imgs]
    wanted = classes if isinstance(classes, list) else [classes] * len(imgs)
    for name in METHODS:
        expected = [expected_map(r, name, c) for r, c in zip(alone, wanted, strict=True)]
        if isinstance(expected[0], Exception):  # e.g. the last layer's CLS attention of a model without CLS
            with pytest.raises(type(expected[0]), match=re.escape(str(expected[0]))):
                vizapp.explain(vm, imgs, name, classes)
            continue
        with counted_forwards(vm) as forwards, counted_backwards(monkeypatch) as backwards:
            maps = vizapp.explain(vm, imgs, name, classes)
        # Transformer Attribution's one forward is its own, written out in float64 on a copy of the network
        assert forwards == ([] if name in WRITTEN_OUT else [3])
        assert backwards == (["grad"] if METHODS[name].needs_class else [])
        assert maps.shape == (3, *alone[0].grid_size) and maps.dtype == np.float32
        assert maps_differ(maps[0], maps[1])  # maps that differ by more than the tolerance
        for b in range(3):
            assert_same_map(maps[b], expected[b])


@pytest.mark.parametrize("fid", ["card", "deit_distilled", "gap_reg4"])
def test_class_maps_of_a_batch_take_one_forward_and_one_backward(fid, card_model, monkeypatch):
    vm = load(fid, card_model)
    imgs = images(4, seed=3)
    probe = vizapp.analyze(vm, imgs[0])
    names = [n for n, m in METHODS.items() if m.needs_class and not unavailable(probe, n)]
    assert {"relevance", "grad_rollout"} <= set(names)
    # AttnLRP and LeGrad run the model themselves (their own backward rules): one forward and one backward each
    own = [n for n in names if METHODS[n].batch is not None]
    assert {"attnlrp", "legrad"} <= set(own)
    classes = [0, 4, 2, 4]
    with counted_forwards(vm) as forwards, counted_backwards(monkeypatch) as backwards:
        maps = vizapp.explain(vm, imgs, names, classes, start_layer=1)
    # one forward of vm's network for the analysis and one for each own-run method but Transformer Attribution,
    # whose forward is written out in float64 on a copy; one backward each
    called = [n for n in own if n not in WRITTEN_OUT]
    assert forwards == [4] * (1 + len(called)) and backwards == ["grad"] * (1 + len(own))
    assert set(maps) == set(names)
    for b, img in enumerate(imgs):
        r = vizapp.analyze(vm, img)
        for name in names:
            assert_same_map(maps[name][b], r.explain(name, classes[b], start_layer=1))
        # each image's own class: another class's map differs, so one class for all would have failed
        assert not np.allclose(r.relevance(classes[b]), r.relevance(classes[b] + 1))


def test_explain_passes_each_method_the_controls_it_takes(card_model):
    vm = load("card", card_model)
    imgs = images(2, seed=4)
    controls = dict(head_fusion="max", discard_ratio=0.3, start_layer=1, start_row="cls")
    maps = vizapp.explain(vm, imgs, list(METHODS), 1, **controls)
    for b, img in enumerate(imgs):
        r = vizapp.analyze(vm, img)
        for name in METHODS:
            assert_same_map(maps[name][b], expected_map(r, name, 1, **controls))
    # the controls made a difference: without them the rollout is another map
    assert not np.allclose(maps["rollout"][0], vizapp.explain(vm, imgs, "rollout")[0])
    with pytest.raises(BadParameterError, match="head_fusion"):
        vizapp.explain(vm, imgs, "relevance", head_fusion="max")
    with pytest.raises(BadParameterError, match="method must be one of"):
        vizapp.explain(vm, imgs, "saliency")


def test_every_option_a_method_declares_is_one_its_compute_takes(image):
    """vizapp.explain passes a method only the options it declares: each must be a keyword its compute accepts."""
    vm = small_model(FAMILY["vit"][1], **FAMILY["vit"][2])
    r = vizapp.analyze(vm, image)
    values = dict(
        head_fusion="max",
        discard_ratio=0.1,
        start_layer=1,
        start_row="cls",
        progress=None,
        empty_prompt_correction=False,
    )
    for name, m in METHODS.items():
        assert set(m.controls) <= set(m.options), name
        for option in m.options:
            found = m.compute(r, 1, **{option: values[option]})  # a TypeError for a keyword compute does not take
            assert found.shape == r.grid_size and np.isfinite(found).all(), (name, option)


def test_bad_classes_are_refused_before_any_forward(card_model):
    vm = load("card", card_model)
    imgs = images(3)
    with counted_forwards(vm) as forwards:
        for classes, message in (
            ([1, 2], "2 classes given for 3 images"),
            ([1, 2, "no such class"], "class of image 2: unknown label"),
            ([1, 10, 2], "class of image 1 must be"),
            ([1, True, 2], "class of image 1 must be"),
            (2.5, "classes must be None"),
        ):
            with pytest.raises(BadParameterError, match=message):
                vizapp.explain(vm, imgs, ["relevance", "rollout"], classes)
    assert forwards == []


def test_an_undecodable_image_is_named_by_its_index_before_any_forward(card_model):
    vm = load("card", card_model)
    buf = io.BytesIO()
    random_image(1).save(buf, format="PNG")
    batch = [random_image(0), buf.getvalue(), b"not an image", random_image(2)]
    with counted_forwards(vm) as forwards:
        with pytest.raises(BadImageError, match=r"^image 2: ") as exc:
            vizapp.analyze(vm, batch)
        with pytest.raises(BadImageError, match=r"^image 2: "):
            vizapp.explain(vm, batch, "relevance")
        with pytest.raises(BadImageError, match=r"^image 0: "):
            vizapp.analyze(vm, [b"\x89PNG\r\n\x1a\n truncated", random_image(0)])
    assert forwards == []
    with pytest.raises(BadImageError) as alone:  # the same clear message as the image alone gets
        vizapp.analyze(vm, b"not an image")
    assert str(exc.value) == f"image 2: {alone.value}"


def test_a_batch_over_the_forward_budget_is_split_and_still_exact(card_model, monkeypatch):
    vm = load("card", card_model)
    imgs = images(5, seed=9)
    gh, gw = vm.grid_size
    kept, working = limits.analysis_bytes(vm.num_layers, vm.num_prefix_tokens + gh * gw, vm.num_heads)
    monkeypatch.setattr(limits, "BATCH_FORWARD_BYTES", 2 * (kept + working) + 1)  # two images per forward
    with counted_forwards(vm) as forwards:
        batch = vizapp.analyze(vm, imgs)
    assert forwards == [2, 2, 1]
    for img, r in zip(imgs, batch, strict=True):
        assert_same_analysis(r, vizapp.analyze(vm, img))
    # with gradients the estimate is larger: one image per forward, one backward each, maps still each image's own
    kept_g, working_g = limits.analysis_bytes(vm.num_layers, vm.num_prefix_tokens + gh * gw, vm.num_heads, True)
    assert kept_g + working_g > 2 * (kept + working) + 1
    with counted_forwards(vm) as forwards, counted_backwards(monkeypatch) as backwards:
        maps = vizapp.explain(vm, imgs, ["relevance", "rollout"], [1, 2, 3, 4, 5])
    assert forwards == [1] * 5 and backwards == ["grad"] * 5
    for b, img in enumerate(imgs):
        assert_same_map(maps["relevance"][b], vizapp.analyze(vm, img).relevance(b + 1))


def test_a_batch_whose_analyses_would_exceed_the_budget_is_refused_before_any_forward(card_model, monkeypatch):
    vm = load("card", card_model)
    gh, gw = vm.grid_size
    kept, _ = limits.analysis_bytes(vm.num_layers, vm.num_prefix_tokens + gh * gw, vm.num_heads)
    monkeypatch.setattr(limits, "BATCH_RECORD_BYTES", 3 * kept)
    with counted_forwards(vm) as forwards:
        assert len(vizapp.analyze(vm, images(3))) == 3
        with pytest.raises(BadParameterError, match="analyse at most 3 images at once"):
            vizapp.analyze(vm, images(4))
    assert forwards == [3]
    # vizapp.explain keeps maps only: the same four images run
    assert vizapp.explain(vm, images(4), "rollout").shape == (4, gh, gw)


def test_the_forward_budget_holds_a_real_model_within_its_limit():
    """ViT-B/16 at 224 px: the estimate puts tens of images in one forward, and fewer with gradients."""
    kept, working = limits.analysis_bytes(12, 197, 12)
    kept_g, working_g = limits.analysis_bytes(12, 197, 12, gradients=True)
    q_and_k = 2 * 12 * 197 * 768 * 4
    assert q_and_k < kept < 3 * q_and_k
    assert 16 <= limits.BATCH_FORWARD_BYTES // (kept + working) <= 128
    assert 4 <= limits.BATCH_FORWARD_BYTES // (kept_g + working_g) < limits.BATCH_FORWARD_BYTES // (kept + working)


def test_a_lists_images_are_preprocessed_on_threads_each_as_alone_and_the_first_bad_one_is_named(card_model):
    from vizapp.batch import _inputs

    vm = load("card", card_model)
    imgs = images(6, seed=3)
    found = _inputs(vm, imgs)
    for img, (x, notes) in zip(imgs, found, strict=True):
        (alone, alone_notes) = _inputs(vm, [img])[0]
        assert torch.equal(x, alone) and notes == alone_notes
    bad = [imgs[0], b"not an image", imgs[2], b"\x89PNG\r\n\x1a\n truncated", imgs[4]]
    with pytest.raises(BadImageError, match=r"^image 1: "):
        _inputs(vm, bad)


def test_a_forked_child_preprocesses_a_list_with_its_own_threads(card_model):
    # the parent's pool exists; a child forked afterwards must not wait on threads it does not have
    import multiprocessing

    from vizapp.batch import _inputs

    vm = load("card", card_model)
    imgs = images(3, seed=4)
    want = [x for x, _ in _inputs(vm, imgs)]
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()

    def child() -> None:
        queue.put([x.numpy() for x, _ in _inputs(vm, imgs)])

    proc = ctx.Process(target=child)
    proc.start()
    try:
        got = queue.get(timeout=60)
        proc.join(timeout=60)
    finally:
        if proc.is_alive():
            proc.kill()
    assert proc.exitcode == 0
    for a, b in zip(want, got, strict=True):
        np.testing.assert_array_equal(a.numpy(), b)


def test_a_gpu_takes_a_larger_forward_budget_fixed_by_its_size(monkeypatch):
    """ViT-B/16 with gradients: 8 images per forward on the CPU; on a GPU an eighth of its memory up to 8 GiB (33 on
    an H200), never less than the CPU's; a device this torch cannot query (the tests' simulated GPU) takes 8 GiB."""
    import types

    kept_g, working_g = limits.analysis_bytes(12, 197, 12, gradients=True)
    per_forward = {}
    for name, total in (("small", 16 * 2**30), ("mid", 40 * 2**30), ("h200", 143_771 * 2**20)):
        props = types.SimpleNamespace(total_memory=total)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device, props=props: props)
        per_forward[name] = limits.batch_forward_bytes(torch.device("cuda", 0))
    assert per_forward == {"small": 2 * 2**30, "mid": 5 * 2**30, "h200": 8 * 2**30}
    assert limits.batch_forward_bytes(torch.device("cpu")) == limits.BATCH_FORWARD_BYTES == 2 * 2**30
    assert limits.BATCH_FORWARD_BYTES // (kept_g + working_g) == 8
    assert per_forward["h200"] // (kept_g + working_g) == 33
    monkeypatch.undo()

    def unavailable(device):
        raise AssertionError("Torch not compiled with CUDA enabled")

    monkeypatch.setattr(torch.cuda, "get_device_properties", unavailable)
    assert limits.batch_forward_bytes(torch.device("cuda", 0)) == 8 * 2**30


def test_on_the_simulated_gpu_a_batch_takes_the_gpus_budget(card_model, monkeypatch):
    from tests.devicesim import simulated_gpu
    from vizapp.batch import forward_groups

    vm = load("card", card_model)
    gh, gw = vm.grid_size
    kept, working = limits.analysis_bytes(vm.num_layers, vm.num_prefix_tokens + gh * gw, vm.num_heads)
    monkeypatch.setattr(limits, "BATCH_FORWARD_BYTES", 2 * (kept + working) + 1)  # two images per forward on the CPU
    monkeypatch.setattr(limits, "BATCH_FORWARD_BYTES_GPU", 4 * (kept + working) + 1)  # four on a GPU
    inputs = [torch.zeros(1, 3, 8, 8)] * 5
    assert forward_groups(vm, inputs) == [[0, 1], [2, 3], [4]]
    with simulated_gpu(vm):
        assert forward_groups(vm, inputs) == [[0, 1, 2], [3, 4]]  # two forwards, even: not four and one
    assert forward_groups(vm, [torch.zeros(1, 3, 8, 8)] * 7) == [[0, 1], [2, 3], [4, 5], [6]]


def test_the_graph_keeps_the_attention_on_the_cpu_where_the_budget_holds_it(card_model, monkeypatch):
    """graph_maps.recomputes: on the CPU a batch whose graph with every layer's attention kept fits
    limits.batch_forward_bytes keeps it (by hand: 8·L·H·N² bytes above the formed-again graph's estimate), one byte
    less forms it again in the backward; on a GPU it is always formed again. explain() takes that route."""
    from tests.devicesim import simulated_gpu
    from vizapp import graph_maps

    assert (
        limits.attention_graph_bytes(2, 10, 3, width=192, kept=True)
        == limits.attention_graph_bytes(2, 10, 3, width=192) + 8 * 2 * 3 * 100
    )
    vm = load("card", card_model)
    gh, gw = vm.grid_size
    n = vm.num_prefix_tokens + gh * gw
    each = limits.attention_graph_bytes(vm.num_layers, n, vm.num_heads) + 8 * vm.num_layers * vm.num_heads * n * n
    x = torch.zeros(3, 1, *vm.input_size[-2:])
    monkeypatch.setattr(limits, "BATCH_FORWARD_BYTES", 3 * each)
    assert graph_maps.recomputes(vm, x) is False
    with simulated_gpu(vm):
        assert graph_maps.recomputes(vm, x) is True
    routes: list[bool] = []
    init = graph_maps.AttentionGraph.__init__

    def spy(self, vm, x, recompute=None):
        init(self, vm, x, recompute)
        routes.append(self.formed is None)

    monkeypatch.setattr(graph_maps.AttentionGraph, "__init__", spy)
    kept = vizapp.explain(vm, images(3, seed=7), GRADIENT_MAPS)
    monkeypatch.setattr(limits, "BATCH_FORWARD_BYTES", 3 * each - 1)
    assert graph_maps.recomputes(vm, x) is True
    formed = vizapp.explain(vm, images(3, seed=7), GRADIENT_MAPS)
    assert routes == [False, True]  # one forward each (3 graphs' estimate fits either budget), kept then formed again
    for name in GRADIENT_MAPS:
        np.testing.assert_array_equal(kept[name], formed[name])  # the same operations either way


def test_the_class_maps_of_a_batch_go_in_forwards_of_the_attention_graphs_size(card_model, monkeypatch):
    """The maps straight from an AttentionGraph keep no attention, so their forwards are sized by
    limits.attention_graph_bytes (by hand: 22·L·N·D + 10·N·D + 4·H·N² floats' bytes, and 12·L·N²), not by an analysis
    with its attention in the graph."""
    assert (
        limits.attention_graph_bytes(2, 10, 3, width=192)
        == 4 * (22 * 2 * 10 * 192 + 10 * 10 * 192 + 4 * 3 * 100) + 2400
    )
    vm = load("card", card_model)
    gh, gw = vm.grid_size
    each = limits.attention_graph_bytes(vm.num_layers, vm.num_prefix_tokens + gh * gw, vm.num_heads)
    for layers, tokens, heads in ((12, 197, 12), (24, 577, 16)):  # ViT-B/16 (0.70 of it); ViT-L/16 at 384 px (0.41)
        graph = limits.attention_graph_bytes(layers, tokens, heads)
        assert graph < sum(limits.analysis_bytes(layers, tokens, heads, True)) / 1.4
    monkeypatch.setattr(limits, "BATCH_FORWARD_BYTES", 2 * each + 1)
    imgs = images(5, seed=2)
    with counted_forwards(vm) as forwards:
        maps = vizapp.explain(vm, imgs, GRADIENT_MAPS)
    assert forwards == [2, 2, 1]
    with counted_forwards(vm) as forwards:
        alone = vizapp.explain(vm, imgs[4:], GRADIENT_MAPS)
    for name in GRADIENT_MAPS:
        np.testing.assert_allclose(maps[name][4:], alone[name], rtol=1e-5, atol=1e-7)


def test_layer_statistics_of_a_batch_equal_each_image_alone():
    """Chunks of two images arriving interleaved, heads and rows split, reduce as two batches of one."""
    from vizapp.analysis.distance import patch_distance_matrix
    from vizapp.streaming import LayerStatistics

    g = torch.Generator().manual_seed(0)
    attn = torch.softmax(3 * torch.randn(2, 3, 4, 5, 5, generator=g), dim=-1)  # [B, L, H, N, N]: 1 prefix + 2x2
    dist = patch_distance_matrix((2, 2), (16, 16))
    weights = torch.tensor([1.0, 0, 0, 0, 0], dtype=torch.float64)
    for store_mean in (True, False):
        both = LayerStatistics([4] * 3, 5, dist, 1, store_mean=store_mean, batch=2)
        alone = [LayerStatistics([4] * 3, 5, dist, 1, store_mean=store_mean) for _ in range(2)]
        for layer in range(3):
            for h0 in (0, 2):
                for b in (1, 0):
                    both.chunk(layer, b, h0, attn[b, layer, h0 : h0 + 2], 0)
                    alone[b].chunk(layer, 0, h0, attn[b, layer, h0 : h0 + 2], 0)
            both.layer_done(layer)
            for s in alone:
                s.layer_done(layer)
        assert both.complete()
        rows = both.rollout_row(weights)
        for b in range(2):
            torch.testing.assert_close(rows[b], alone[b].rollout_row(weights)[0])
            for layer in range(3):
                torch.testing.assert_close(both.distances[layer][b], alone[b].distances[layer][0])
    missing = LayerStatistics([4], 5, dist, 1, batch=2)
    missing.chunk(0, 0, 0, attn[0, 0], 0)  # image 1 never arrives
    missing.layer_done(0)
    assert not missing.complete()


def test_layer_statistics_with_a_scratch_buffer_equal_those_without():
    """A scratch buffer handed with each chunk (what the capture's spent scores give) may hold anything: every
    statistic, fusion and the rollout are bitwise those reduced without one, and it is used (overwritten). By hand:
    uniform attention over 5 tokens has entropy log 5 in every row."""
    from vizapp.analysis.distance import patch_distance_matrix
    from vizapp.streaming import LayerStatistics

    g = torch.Generator().manual_seed(1)
    attn = torch.softmax(3 * torch.randn(2, 3, 4, 5, 5, generator=g), dim=-1)  # [B, L, H, N, N]
    attn[1, 2] = 0.2  # image 1's last layer: uniform
    dist = patch_distance_matrix((2, 2), (16, 16))
    weights = torch.tensor([1.0, 0, 0, 0, 0], dtype=torch.float64)
    plain = LayerStatistics([4] * 3, 5, dist, 1, ("mean", "max", "min"), batch=2)
    given = LayerStatistics([4] * 3, 5, dist, 1, ("mean", "max", "min"), batch=2)
    assert given.takes_scratch
    used = []
    for layer in range(3):
        for b in range(2):
            for h0 in (0, 2):  # two chunks of two heads: the second is folded into the fusions through the scratch
                chunk = attn[b, layer, h0 : h0 + 2].clone()
                scratch = torch.full_like(chunk, float("nan"))
                plain.chunk(layer, b, h0, chunk, 0)
                given.chunk(layer, b, h0, chunk, 0, scratch=scratch)
                used.append(not scratch.isnan().all())
        plain.layer_done(layer)
        given.layer_done(layer)
    assert given.complete() and all(used)
    for name, v in plain.statistics.values.items():  # block statistics stay NaN here (no block outputs)
        torch.testing.assert_close(given.statistics.values[name], v, rtol=0, atol=0, equal_nan=True)
    assert not plain.statistics.values["distance"].isnan().any()
    for f in ("mean", "max", "min"):
        for layer in range(3):
            assert torch.equal(given.fused[f][layer], plain.fused[f][layer])
    assert torch.equal(given.rollout_row(weights), plain.rollout_row(weights))
    entropy = given.statistics.values["entropy"][2, 1]  # [H] of image 1's uniform layer
    torch.testing.assert_close(entropy, torch.full((4,), np.log(5), dtype=torch.float64), rtol=1e-6, atol=0)


def test_the_batch_benchmark_writes_a_row_per_model_and_batch_size(tmp_path, monkeypatch):
    """benchmarks.batch on a tiny model, one round: a table per thread count, every cell filled where timed."""
    from benchmarks import batch as bench

    out = tmp_path / "batch.md"
    spec = "vit_tiny_patch16_224@img_size=32,depth=1"
    args = ["--models", spec, "--batches", "2", "3", "--class-batches", "2", "--repeats", "1", "--warmup", "0"]
    assert bench.main([*args, "--threads", "1", "2", "--out", str(out)]) == 0
    text = out.read_text(encoding="utf-8")
    cpu = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), flags=re.M)
    assert f"CPU ({cpu[1].strip()})" in text  # the processor the ratios were measured on
    assert f"--threads 1 2 --out {out}`" in text  # the command that wrote it, where it is not the default file
    kept = bench.header(
        argparse.Namespace(threads=[2], repeats=7, warmup=1, dtype="float32", device="cpu", out=bench.OUT)
    )
    assert "--threads 2` (random" in kept[2]
    # 6 MiB of fp32 attention holds 6 images of ViT-S/16 (6 x 197^2 x 4 = 931,416 bytes each) and 3 of ViT-B/16;
    # a GPU's 32 MiB, 36 and 18
    assert "6 MiB of attention: 6 ViT-S/16 images, 3 ViT-B/16" in kept[-1] and "second thread" in kept[-1]
    monkeypatch.setattr(bench, "device_name", lambda device: "CUDA (none here)")  # the header, as a GPU run writes it
    on_gpu = bench.header(
        argparse.Namespace(threads=[2], repeats=7, warmup=1, dtype="float32", device="cuda", out=bench.OUT)
    )
    assert "32 MiB of attention: 36 ViT-S/16 images, 18 ViT-B/16" in on_gpu[-1] and "thread" not in on_gpu[-1]
    for threads in (1, 2):
        table = text.split(f"## {threads} thread(s)", 1)[1].split("\n## ", 1)[0]
        rows = [
            [c.strip() for c in ln.strip("|").split("|")] for ln in table.splitlines() if ln.startswith(f"| {spec}")
        ]
        assert [r[1] for r in rows] == ["2", "3"]
        assert all(r[10] in ("met", "missed") and float(r[5]) > 0 for r in rows)
        assert all(len(r[8].split(", ")) == 2 and min(map(float, r[8].split(", "))) >= 0 for r in rows)  # faults
        for r in rows:  # one round: the paired ratio is that round's, which is also the ratio of the medians
            assert r[6] == f"{r[5]} [{r[5]}, {r[5]}]"
        assert rows[0][16] in ("met", "missed") and float(rows[0][12]) > 0  # class maps timed for B = 2
        assert rows[0][13] == f"{rows[0][12]} [{rows[0][12]}, {rows[0][12]}]"
        assert rows[1][11:] == [""] * 6  # and not for B = 3


@pytest.mark.parametrize("kernel", ["torch", "CPU kernel"])
@pytest.mark.parametrize("fid", ["vit", "beit", "reg4", "gap_reg4"])
def test_whole_images_per_chunk_give_what_one_image_per_chunk_gives(fid, kernel, monkeypatch):
    """Where whole images fit the chunk size, a batch's attention is formed and reduced several images at a time
    ([g, H, N, N] chunks, relative bias included); every statistic, fusion and rollout equals the path that hands
    over one image at a time (the chunk size of one image). Both with the softmax and statistics by torch's operations
    and by the CPU kernel (vizapp.cpu_rows)."""
    from vizapp import attention, cpu_rows, streaming

    monkeypatch.setenv("VIZAPP_CPU_KERNEL", "1" if kernel == "CPU kernel" else "0")
    vm = load(fid, "")
    imgs = images(5)
    seen: list[int] = []
    real = streaming.LayerStatistics.chunk
    real_kernel = streaming.LayerStatistics.softmax_rows

    def spy(self, layer, batch, head, attn, row, **kw):
        seen.append(attn.shape[0] if attn.dim() == 4 else 1)
        return real(self, layer, batch, head, attn, row, **kw)

    def spy_kernel(self, layer, batch, head, scores, row, out):
        taken = real_kernel(self, layer, batch, head, scores, row, out)
        if taken:
            seen.append(scores.shape[0] if scores.dim() == 4 else 1)
        return taken

    from vizapp.statistics import STATISTICS

    reduced: list[int] = []  # the heads each statistic (or the kernel) reduced at once
    for stat in STATISTICS.values():
        if hasattr(stat, "rows"):
            monkeypatch.setattr(
                stat, "rows", lambda attn, *a, _f=stat.rows: reduced.append(attn.shape[0]) or _f(attn, *a)
            )
    real_rows = cpu_rows.softmax_rows
    monkeypatch.setattr(cpu_rows, "softmax_rows", lambda s, *a: reduced.append(s.shape[0]) or real_rows(s, *a))
    monkeypatch.setattr(streaming.LayerStatistics, "chunk", spy)
    monkeypatch.setattr(streaming.LayerStatistics, "softmax_rows", spy_kernel)
    grouped = vizapp.analyze(vm, imgs)
    assert max(seen) == 5  # the whole batch in one chunk per layer
    assert max(reduced) == 5 * vm.num_heads  # and each statistic reduced the 5 images' heads at once
    seen.clear()
    per_image = vm.num_heads * grouped[0].num_tokens ** 2 * 4
    monkeypatch.setattr(limits, "INLINE_CHUNK_BYTES", per_image)  # exactly one image fits a chunk
    monkeypatch.setattr(limits, "IMAGE_GROUP_BYTES", per_image)  # and a group
    assert attention.image_group(streaming.LayerStatistics, 5, vm.num_heads, grouped[0].num_tokens, per_image) == 1
    reduced.clear()
    alone = vizapp.analyze(vm, imgs)
    assert max(seen) == 1 and max(reduced) == vm.num_heads
    for a, b in zip(grouped, alone, strict=True):
        for name in a.statistics:
            np.testing.assert_allclose(a.statistics[name], b.statistics[name], rtol=1e-6, atol=1e-7, err_msg=name)
        np.testing.assert_allclose(a.rollout(), b.rollout(), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(a.rollout("max"), b.rollout("max"), rtol=1e-6, atol=1e-7)
        if a.probs is not None:
            np.testing.assert_allclose(a.probs, b.probs, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(a.block_norms, b.block_norms, rtol=1e-6, atol=1e-6)


GRADIENT_MAPS = ["grad_rollout", "relevance"]


@pytest.mark.parametrize("fid", ["card", "deit_distilled", "gap_reg4", "beit"])  # BEiT: a relative bias, a mean head
def test_the_maps_of_the_attention_graph_skip_the_analyses_and_equal_them(fid, card_model, monkeypatch):
    """Gradient rollout and relevance, with attention rollout and the last layer's CLS attention beside them, come
    straight from one forward's graph and one backward (no analysis of any image, vizapp.graph_maps): each map equal
    to its own analysis's, with every control, and to the analysis path of the same batch to 1e-6."""
    import vizapp.batch
    from vizapp import graph_maps

    vm = load(fid, card_model)
    imgs = images(3, seed=5)
    alone = [vizapp.analyze(vm, img) for img in imgs]
    classes = [1, None, 4]
    # the CLS attention only where there is a CLS token (else the analysis path says why there is none)
    names = [*GRADIENT_MAPS, "rollout", *(["attention"] if vm.has_class_token else [])]
    settings = [
        {},
        dict(start_layer=1, discard_ratio=0.3, head_fusion="max"),
        dict(start_row="cls", start_layer=-1, head_fusion="min"),
    ]
    with monkeypatch.context() as m:  # the analysis path of the same batches
        m.setattr(graph_maps, "takes", lambda *args: False)
        through_analyses = [vizapp.explain(vm, imgs, names, classes, **c) for c in settings[:2]]

    def no_analysis(*args, **kwargs):
        raise AssertionError("the maps went through per-image analyses")

    monkeypatch.setattr(vizapp.batch, "analyze_inputs", no_analysis)
    for i, controls in enumerate(settings):
        expected = {n: [expected_map(r, n, c, **controls) for r, c in zip(alone, classes, strict=True)] for n in names}
        error = next((e for found in expected.values() for e in found if isinstance(e, Exception)), None)
        if error is not None:  # start_row="cls" on a model without a CLS token: the one-image path's message
            with counted_forwards(vm) as forwards, pytest.raises(type(error), match=re.escape(str(error))):
                vizapp.explain(vm, imgs, names, classes, **controls)
            assert forwards == [] and not vm.has_class_token
            continue
        with counted_forwards(vm) as forwards, counted_backwards(monkeypatch) as backwards:
            maps = vizapp.explain(vm, imgs, names, classes, **controls)
        assert forwards == [3] and backwards == ["grad"]
        for name in names:
            assert maps[name].shape == (3, *alone[0].grid_size) and maps[name].dtype == np.float32
            # (this BEiT's class gradients are ~0, so its gradient maps are the uniform readout for every image)
            assert maps_differ(maps[name][0], maps[name][1]) or (fid == "beit" and name in GRADIENT_MAPS)
            for b in range(3):
                assert_same_map(maps[name][b], expected[name][b])
            if i < len(through_analyses):
                np.testing.assert_allclose(maps[name], through_analyses[i][name], rtol=0, atol=1e-6)


@pytest.mark.parametrize("fid", ["card", "beit", "gap_reg4"])
def test_the_attention_graph_forms_the_attention_again_in_the_backward_and_keeps_none(fid, card_model):
    """The graph holds each layer's q, k and v, not its attention: no [B, H, N, N] tensor is saved for the backward,
    where keeping the attention saves several a layer. Every map equals the kept attention's route (the second code
    path) to float64 rounding: the whole batch, a second class for some images from a retained graph, BEiT's bias."""
    from vizapp import graph_maps

    vm = load(fid, card_model)
    x = torch.stack([vm.transform(img) for img in images(3, seed=9)])
    gh, gw = vm.grid_for(x.shape[-2], x.shape[-1])
    n = vm.num_prefix_tokens + gh * gw
    asked = {name: graph_maps.options(vm, name) for name in ["rollout", *GRADIENT_MAPS]}
    found = {}
    for recompute in (True, False):
        square: list[tuple[int, ...]] = []

        def saved(t, square=square):
            if t.dim() == 4 and t.shape[0] == 3 and t.shape[-2:] == (n, n):  # (BEiT's shared bias is [1, H, N, N])
                square.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(saved, lambda t: t):
            graph = graph_maps.AttentionGraph(vm, x, recompute=recompute)
        assert (square == []) == recompute, square
        first = graph.plain_maps(asked) | graph.class_maps(asked, [1, 2, 0], retain=True)
        again = graph.class_maps(asked, [3, 4], members=[2, 0])
        found[recompute] = (first, again)
    for mine, kept in zip(found[True], found[False], strict=True):
        assert mine.keys() == kept.keys()
        for name in mine:
            torch.testing.assert_close(mine[name], kept[name], rtol=1e-12, atol=1e-12)
    assert maps_differ(found[True][1]["relevance"][0].numpy(), found[True][1]["relevance"][1].numpy()) or fid == "beit"


def test_an_attention_graph_is_freed_once_nothing_holds_it(card_model):
    """The recomputing layers' backward finds the graph's buffer without holding the graph: no reference cycle
    through autograd's nodes (which Python's collector cannot see) keeps the graph, its logits and their autograd
    graph alive after use."""
    import gc
    import weakref

    from vizapp import graph_maps

    vm = load("card", card_model)
    x = torch.stack([vm.transform(img) for img in images(2, seed=3)])
    graph = graph_maps.AttentionGraph(vm, x, recompute=True)
    graph.class_maps({"relevance": graph_maps.options(vm, "relevance")}, [0, 1], retain=True)
    refs = [weakref.ref(graph), weakref.ref(graph.logits), weakref.ref(graph.inputs[0])]
    del graph
    gc.collect()
    assert [ref() for ref in refs] == [None, None, None]


@pytest.mark.parametrize("recompute", [True, False], ids=["formed again", "kept"])
@pytest.mark.parametrize("fid", ["card", "deit_distilled", "beit"])
def test_an_analysis_s_class_maps_take_one_pass_of_the_attention_graph(fid, recompute, card_model, monkeypatch):
    """analyze() keeps no autograd graph: its relevance and gradient rollout for a class then take Ā from one forward
    and backward of an AttentionGraph (graph_maps.one_image_heads), form no per-head gradient, and equal the per-head
    route's maps (result.RECOMPUTED off) to 1e-12, with the attention formed again in the backward (which the forward
    then keeps none of) or kept (graph_maps.recomputes decides)."""
    from vizapp import gradient_pass, graph_maps, result

    monkeypatch.setattr(graph_maps, "recomputes", lambda vm, x: recompute)
    # The per-head route reads the attention of the analysis's own forward, whose softmax (without a graph) would be
    # the CPU kernel's: equal to torch's to about an ulp (tests/test_cpu_rows.py), not to 1e-12. Torch's here.
    monkeypatch.setenv("VIZAPP_CPU_KERNEL", "0")
    vm = load(fid, card_model)
    img = images(1, seed=4)[0]
    r = vizapp.analyze(vm, img)
    square: list[tuple[int, ...]] = []

    def saved(t):
        if t.dim() == 4 and t.shape[1:] == (vm.num_heads, r.num_tokens, r.num_tokens):
            square.append(tuple(t.shape))
        return t

    forward = graph_maps.AttentionGraph.__init__

    def hooked(*args, **kwargs):  # what the forward saves for the backward (the backward forms a layer at a time)
        with torch.autograd.graph.saved_tensors_hooks(saved, lambda t: t):
            forward(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(graph_maps.AttentionGraph, "__init__", hooked)
        m.setattr(gradient_pass, "attention_gradients", None)  # (the per-head route's pass: called, it would raise)
        found = {c: (r.relevance(c), r.grad_rollout(c, start_layer=1)) for c in (1, 3)}
    if recompute:
        assert fid == "beit" or square == []  # (BEiT's relative-position bias is [1, H, N, N], one a layer)
    else:  # every layer's attention saved, in the pass of each of the two classes
        assert square.count((1, vm.num_heads, r.num_tokens, r.num_tokens)) >= 2 * vm.num_layers
    monkeypatch.setattr(result, "RECOMPUTED", False)
    per_head = vizapp.analyze(vm, img)
    for c, maps in found.items():
        for mine, theirs in zip(maps, (per_head.relevance(c), per_head.grad_rollout(c, start_layer=1)), strict=True):
            np.testing.assert_allclose(mine, theirs, rtol=1e-12, atol=1e-12)
    assert maps_differ(found[1][0], found[3][0]) or fid == "beit"


def test_class_maps_from_replayed_gradients_ask_for_the_model_once(monkeypatch):
    """Where an analysis's per-head gradients come from a replayed pass (a GPU with CUDA graphs; stood in for here by
    graphable() answering True), grad_weighted_heads hands the model it asked for on to attention_gradients: a model
    no longer in memory is reloaded once, not twice. The map is the per-head route's."""
    from vizapp import gradient_pass, result

    vm = load("vit", "")
    img = images(1, seed=2)[0]
    monkeypatch.setattr(result, "RECOMPUTED", False)
    expected = vizapp.analyze(vm, img).grad_rollout(2)
    monkeypatch.setattr(result, "RECOMPUTED", True)
    r = vizapp.analyze(vm, img)
    asked: list[int] = []
    later, graphable, passes = result.ModelRuns._model_later, gradient_pass.graphable, gradient_pass.attention_gradients

    def eager(*args, **kwargs):  # the passes themselves eager: there is no GPU to replay them on
        with monkeypatch.context() as m:
            m.setattr(gradient_pass, "graphable", graphable)
            return passes(*args, **kwargs)

    monkeypatch.setattr(result.ModelRuns, "_model_later", lambda self: asked.append(1) or later(self))
    monkeypatch.setattr(gradient_pass, "graphable", lambda vm, x: True)
    monkeypatch.setattr(gradient_pass, "attention_gradients", eager)
    np.testing.assert_allclose(r.grad_rollout(2), expected, rtol=1e-12, atol=1e-12)
    assert asked == [1]


def test_one_image_of_the_attention_graph_takes_the_one_image_operations(card_model):
    """A batch of one image forms its rows as its Analysis does (a matrix-vector product a layer, not a batched one),
    so its maps are the analysis's bit for bit where both see the same attention: the gradient-enabled analysis of
    that image, whose attention is the graph's."""
    vm = load("card", card_model)
    img = images(1, seed=2)[0]
    r = vizapp.analyze(vm, img, gradients=True)
    maps = vizapp.explain(vm, [img], ["rollout", "attention", *GRADIENT_MAPS], 3, start_layer=1)
    np.testing.assert_array_equal(maps["relevance"][0], r.relevance(3, start_layer=1))
    np.testing.assert_array_equal(maps["grad_rollout"][0], r.grad_rollout(3, start_layer=1))
    assert_same_map(maps["rollout"][0], r.rollout(start_layer=1))
    assert_same_map(maps["attention"][0], r.last_layer_attention())


def test_bad_gradient_map_controls_are_refused_before_any_forward(card_model):
    """With the one-image path's message (which came after the forward before)."""
    vm = load("card", card_model)
    imgs = images(2)
    r = vizapp.analyze(vm, imgs[0])
    for name, controls in (
        ("relevance", dict(start_layer=99)),
        ("grad_rollout", dict(start_layer=True)),
        ("grad_rollout", dict(discard_ratio=1.0)),
        ("relevance", dict(start_row="middle")),
        ("grad_rollout", dict(start_row=["cls"], start_layer="1")),  # the start row is checked first
        ("relevance", dict(start_row=["cls"], start_layer="1")),  # the layer is checked first
    ):
        expected = expected_map(r, name, 1, **controls)
        assert isinstance(expected, BadParameterError), (name, controls)
        with counted_forwards(vm) as forwards, pytest.raises(BadParameterError, match=re.escape(str(expected))):
            vizapp.explain(vm, imgs, [name], 1, **controls)
        assert forwards == []


def test_batched_class_maps_equal_autograds_gradient_through_timms_own_attention():
    """The second code path: timm's explicit attention (fused_attn off, a copy of the model) in the graph,
    ∂Σ_b logit_b[c_b]/∂A from autograd, and the full matrices of chefer_relevance and grad_rollout per image."""
    from tests.conftest import graph_reference
    from vizapp.analysis.relevance import chefer_relevance, cls_map, grad_rollout

    vm = small_model(FAMILY["vit"][1], **FAMILY["vit"][2])
    imgs = images(3, seed=9)
    classes = [0, 5, 2]
    maps = vizapp.explain(vm, imgs, GRADIENT_MAPS, classes)
    ref, attn = graph_reference(vm.model)
    logits = ref(torch.cat([vm.transform(img)[None] for img in imgs]))
    logits[torch.arange(3), torch.tensor(classes)].sum().backward()
    a = torch.stack([m.detach() for m in attn], dim=1)  # [B, L, H, N, N]
    g = torch.stack([m.grad for m in attn], dim=1)
    for b in range(3):
        relevance = cls_map(chefer_relevance(a[b], g[b]), vm.num_prefix_tokens).reshape(maps["relevance"][b].shape)
        rolled = cls_map(grad_rollout(a[b], g[b], vm.num_prefix_tokens), vm.num_prefix_tokens)
        assert_same_map(maps["relevance"][b], relevance.numpy())
        assert_same_map(maps["grad_rollout"][b], rolled.reshape(maps["grad_rollout"][b].shape))
    assert maps_differ(maps["relevance"][0], maps["relevance"][1])


def test_gradient_maps_of_a_model_whose_attention_skips_sdpa_are_refused_clearly():
    """timm's explicit attention (fused_attn off) forms no attention vizapp can take a gradient of (this was a
    RuntimeError from autograd about NoneType)."""
    vm = small_model(FAMILY["vit"][1], **FAMILY["vit"][2])  # shared with other tests: its attention is restored
    for blk in vm.model.blocks:
        blk.attn.fused_attn = False
    try:
        with pytest.raises(UnsupportedModelError, match=r"layer 0 .*is fused attention off"):
            vizapp.explain(vm, images(2), "relevance")
    finally:
        for blk in vm.model.blocks:
            blk.attn.fused_attn = True
