"""An analysis keeps what its forward made on the model's device and moves to the host only what a view draws (issue
23, item 2), checked on the CPU with a simulated GPU (:mod:`tests.devicesim`): a ``.numpy()`` of a device tensor or
an operation mixing device and host tensors fails there as CUDA would. ``tests/test_cuda.py`` runs the same on a
real GPU where one is lent."""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
import torch

import vizapp
from tests.conftest import random_image
from tests.devicesim import DeviceMixError, OnDevice, host_copies, simulated_gpu
from tests.test_cuda import MODELS as CUDA_MODELS

MODELS = CUDA_MODELS  # the families tests/test_cuda.py runs on a real GPU


def _load(name: str, kwargs: dict) -> vizapp.VizModel:
    torch.manual_seed(0)
    return vizapp.load_model(name, pretrained=False, device="cpu", **kwargs)


def test_the_simulated_gpu_fails_where_cuda_would():
    """The tool can fail: .numpy() of a device tensor, and a device tensor meeting a host-made one, both raise;
    .cpu() brings a tensor back, and 0-d host tensors and host indices mix as on CUDA."""
    vm = _load("vit_tiny_patch16_224", dict(img_size=64, depth=1))
    with simulated_gpu(vm):
        y = vm.logits(vm.transform(random_image(0))[None].to(vm.device)).detach()
        assert isinstance(y, OnDevice) and y.device.type == "cuda"
        with pytest.raises(TypeError, match="numpy"):
            y.numpy()
        with pytest.raises(TypeError, match="numpy"):
            np.asarray(y)
        with pytest.raises(DeviceMixError):
            y[0] + torch.ones(y.shape[-1])
        assert torch.equal(y + torch.tensor(1.0), y + 1)  # a 0-d host tensor is allowed
        assert y[0][torch.tensor([0, 1])].shape == (2,)  # host indices are allowed
        assert torch.ones(3, device=vm.device).device.type == "cuda"
        assert y.cpu().numpy().shape == tuple(y.shape)
    assert vm.device.type == "cpu" and not isinstance(next(vm.model.parameters()), OnDevice)


def _views(r: vizapp.Analysis) -> dict[str, object]:
    """Every analysis and view of the API (numpy out), computed where the analysis is."""
    from vizapp.views import render_all

    out: dict[str, object] = {
        "attention": r.attention(r.num_layers - 1),
        "attention_patch": r.attention(0, 0, (1, 1)),
        "prefix": r.prefix_attention(0),
        "rollout": r.rollout(),
        "rollout_max": r.rollout("max", 0.5),
        "rollout_min_from_1": r.rollout("min", 0.0, 1),
        "norms": r.token_norms(),
        "relevance": r.relevance(1),
        "grad_rollout": r.grad_rollout(1),
        "flow": r.attention_flow(),
        "last": r.last_layer_attention(),
        "pca": r.feature_pca(),
        "similarity": r.feature_similarity((1, 1)),
        "artifacts": r.artifact_tokens(),
        "attnlrp": r.explain("attnlrp", 1),
        "legrad": r.explain("legrad", 1),
    }
    if r.has_class_token:
        out["dino_masks"] = r.dino_masks()
    if r.num_registers:
        out["registers"] = r.register_attention()["from_patches"]
    out |= {f"array_{k}": v for k, v in r.arrays().items()}
    faith = r.faithfulness({"rollout": r.rollout()}, class_idx=1, steps=4, random_seed=None)
    out["deletion"] = faith["rollout"]["deletion"].probs
    assert all(v is not None for v in render_all(r, None).values() if v is not None)
    return out


@pytest.mark.parametrize("fid,name,kwargs", MODELS, ids=[m[0] for m in MODELS])
def test_the_record_stays_on_the_device_and_every_view_equals_the_cpus(fid, name, kwargs):
    vm = _load(name, kwargs)
    img = random_image(1)
    on_cpu = vizapp.analyze(vm, img, gradients=True)
    want = _views(on_cpu)
    with simulated_gpu(vm):
        r = vizapp.analyze(vm, img, gradients=True)
        # what the forward kept is on the device; what the views draw as it is came over in one copy
        assert all(isinstance(t, OnDevice) for t in (*r.q, *r.k, *r.block_outputs.values()))
        assert all(isinstance(b, OnDevice) for b in r.biases if b is not None)
        assert isinstance(r.mean_distance, np.ndarray) and isinstance(r.block_norms, np.ndarray)
        got = _views(r)
    assert set(got) == set(want)
    for key, value in want.items():
        np.testing.assert_allclose(got[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
    np.testing.assert_allclose(r.probs, on_cpu.probs, rtol=1e-6, atol=1e-7)


def test_a_default_analysis_on_the_device_copies_a_few_hundred_kilobytes_to_the_host_whatever_the_model_size():
    """Issue 23, item 2: what the forward keeps stays on the device; an analysis copies its small results to the host
    in one copy (and the weights digest in one more), a batch's in one copy too, and a view copies only what it
    draws. ViT-S/16 at 224 px (q and
    k of every layer: 7 MB) and ViT-B/16 at 384 px (85 MB)."""
    from benchmarks.tables import photo

    found = {}
    for name in ("vit_small_patch16_224", "vit_base_patch16_384"):
        vm = vizapp.load_model(name, pretrained=False)
        with simulated_gpu(vm):
            vizapp.analyze(vm, photo())  # the digest's constants and the patch distances, made once per model
            with host_copies() as analysis:
                r = vizapp.analyze(vm, photo())
            with host_copies() as view:
                heat = r.attention(-1)  # the last layer's CLS row, every head: [H, gh, gw]
            with host_copies() as batch:
                vizapp.analyze(vm, [photo().rotate(15 * i) for i in range(4)])
            assert batch.count == 2 and 3.5 * analysis.bytes < batch.bytes < 4.5 * analysis.bytes  # per batch
            assert all(isinstance(t, OnDevice) for t in (*r.q, *r.k))
        found[name] = (analysis.count, analysis.bytes, view.count, view.bytes, heat.size * 4)
    for name, (count, nbytes, view_count, view_bytes, drawn) in found.items():
        assert count == 2, name  # the small results, and the digest
        assert nbytes < 400_000, (name, nbytes)
        assert view_count == 1 and view_bytes == drawn, name  # the view's own map, nothing else
    assert found["vit_base_patch16_384"][1] < 3 * found["vit_small_patch16_224"][1]


@pytest.mark.parametrize("fid,name,kwargs", [MODELS[0], MODELS[3]], ids=[MODELS[0][0], MODELS[3][0]])
def test_an_analysis_moved_to_the_host_computes_every_view_there(fid, name, kwargs):
    """``r.to("cpu")`` of a GPU analysis: the record comes over, the original stays, and every view of the copy
    equals the CPU analysis's while computed on the host; its class maps run the model (still on the device) again
    and bring the gradients over (a view that mixed the two would fail here)."""
    vm = _load(name, kwargs)
    img = random_image(3)
    want = _views(vizapp.analyze(vm, img, gradients=True))
    with simulated_gpu(vm):
        r = vizapp.analyze(vm, img, gradients=True)
        moved = r.to("cpu")
        assert moved is not r and r.to(r.device) is r and moved.to("cpu") is moved
        assert moved.device.type == "cpu" and moved.graph.maps is None and r.graph.maps is not None
        kept = (*moved.q, *moved.k, *moved.block_outputs.values(), *(b for b in moved.biases if b is not None))
        assert kept and not any(isinstance(t, OnDevice) for t in kept)
        assert all(isinstance(t, OnDevice) for t in r.q)  # the original keeps its record on the device
        got = _views(moved)
        assert moved.attention_gradients(1).device.type == "cpu"
    assert set(got) == set(want)
    for key, value in want.items():
        np.testing.assert_allclose(got[key], value, rtol=1e-5, atol=1e-6, err_msg=key)


def test_a_batch_and_its_class_maps_stay_on_the_device():
    vm = _load("vit_tiny_patch16_224", dict(img_size=64, depth=2))
    imgs = [random_image(i) for i in range(3)]
    names = ["relevance", "grad_rollout", "rollout", "attnlrp", "legrad", "transformer_attribution"]
    want, want_rows = vizapp.explain(vm, imgs, names, 1), [r.rollout("max") for r in vizapp.analyze(vm, imgs)]
    with simulated_gpu(vm):
        rs = vizapp.analyze(vm, imgs)
        assert all(isinstance(r.q[0], OnDevice) for r in rs)
        rows = [r.rollout("max") for r in rs]
        got = vizapp.explain(vm, imgs, names, 1)
        # the two gradient maps alone take the direct path (one forward and one backward, no analysis per image)
        direct = vizapp.explain(vm, imgs, ["relevance", "grad_rollout"], [1, None, 2])
    for a, b in zip(rows, want_rows, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for n in names:
        np.testing.assert_allclose(got[n], want[n], rtol=1e-5, atol=1e-6, err_msg=n)
    want_direct = vizapp.explain(vm, imgs, ["relevance", "grad_rollout"], [1, None, 2])
    for n, m in want_direct.items():
        np.testing.assert_allclose(direct[n], m, rtol=1e-5, atol=1e-6, err_msg=n)


def test_one_images_graphed_route_stays_on_the_device_and_gives_the_cpus_class_maps():
    """The route a GPU takes for one image when its graphs are recorded (the analysis pass replayed, the class maps'
    forward and backward replayed, ``analyze(gradients=True)`` keeping no autograd graph), taken on the simulated GPU
    with each graph stood in for by its eager run (benchmarks.launches.StandInGraph): no tensor of the device meets
    one of the host, the record stays on the device, and every class map equals the CPU's."""
    from unittest import mock

    from benchmarks.launches import StandInGraph
    from vizapp import cudagraph

    vm = _load("vit_tiny_patch16_224", dict(img_size=64, depth=2, num_classes=5))
    img = random_image(21)
    cpu = vizapp.analyze(vm, img, gradients=True)
    want = {c: (cpu.relevance(c), cpu.grad_rollout(c), cpu.rollout()) for c in (1, 3)}
    with simulated_gpu(vm), mock.patch.object(cudagraph, "GraphedPass", StandInGraph):
        with mock.patch.dict("os.environ", {"VIZAPP_CUDA_GRAPHS": "1"}):
            kept = vizapp.analyze(vm, img, gradients=True)
            plain = vizapp.analyze(vm, img)
            got = {r: {c: (r.relevance(c), r.grad_rollout(c), r.rollout()) for c in (1, 3)} for r in (kept, plain)}
            assert kept.graph.replays and kept.graph.maps is None and isinstance(kept.q[0], OnDevice)
            assert isinstance(plain.attention_gradients(1), OnDevice)
            assert len(vm.graphs) == 2 and not vm.graphs.failures()  # the analysis pass, the gradient passes
    for maps in got.values():
        for c, values in want.items():
            for a, b in zip(maps[c], values, strict=True):
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_the_attention_graphs_maps_reach_the_host_in_one_copy_and_one_image_replays_its_graphs_instead():
    """On the (simulated) GPU, the maps vizapp.graph_maps forms for a batch (rollout, the CLS attention, gradient
    rollout, relevance; explicit classes, so the logits stay on the device) come to the host in ONE copy, replay no
    CUDA graph and equal the CPU's; a batch of one image, whose analysis replays recorded CUDA graphs there (stood
    in for by their eager run), takes that route instead: its analysis pass and its gradient passes, replayed."""
    from unittest import mock

    from benchmarks.launches import StandInGraph
    from vizapp import cudagraph

    replays: list[str] = []

    class Counted(StandInGraph):
        def run(self, x, meanwhile=None):
            replays.append("replay")
            return super().run(x, meanwhile)

    vm = _load("vit_tiny_patch16_224", dict(img_size=64, depth=2, num_classes=5))
    imgs = [random_image(30 + i) for i in range(2)]
    names = ["rollout", "attention", "grad_rollout", "relevance"]
    want = vizapp.explain(vm, imgs, names, [1, 3], start_layer=1)
    with simulated_gpu(vm), mock.patch.object(cudagraph, "GraphedPass", Counted):
        with mock.patch.dict("os.environ", {"VIZAPP_CUDA_GRAPHS": "1"}):
            with host_copies() as copies:
                got = vizapp.explain(vm, imgs, names, [1, 3], start_layer=1)
            assert copies.count == 1 and replays == [], (copies.count, replays)
            one = vizapp.explain(vm, imgs[1:], names, 3, start_layer=1)
            # the analysis pass and the weights digest; the gradient passes and the digest again (the check that the
            # weights are still the result's)
            assert len(replays) == 4 and not vm.graphs.failures(), replays
    for n in names:
        np.testing.assert_allclose(got[n], want[n], rtol=1e-5, atol=1e-6, err_msg=n)
        np.testing.assert_allclose(one[n][0], want[n][1], rtol=1e-5, atol=1e-6, err_msg=n)


def test_a_swin_analysis_and_its_views_run_on_the_device():
    """A windowed model's record stays on the (simulated) GPU, and its window maps, flow, class maps, AttnLRP, LeGrad,
    feature views, lens, export, figures and batch maps there equal the CPU's; ``r.to("cpu")`` brings the record
    over and its views, computed on the host (class maps by a run of the model on the device), equal them too."""
    from vizapp import feature_views_windows, views_windows

    kwargs = dict(img_size=(24, 40), embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=4, num_classes=5)
    vm = _load("swin_tiny_patch4_window7_224", kwargs)
    imgs = [random_image(i) for i in range(3)]
    names = ["rollout", "flow", "grad_rollout", "relevance", "attnlrp", "legrad"]

    def views(r):
        out = {m: r.explain(m, None if m in ("rollout", "flow") else 1) for m in names}
        out |= {f"layer{i}": r.attention(i, None, (1, 1)) for i in range(len(r.layer_grids))}
        out["deletion"] = r.faithfulness({"r": r.rollout()}, class_idx=1, steps=3, random_seed=None)["r"][
            "deletion"
        ].probs
        out |= {f"mask{i}": r.window_mask(i, (0, 1)) for i in range(len(r.layer_grids))}
        out["last"] = r.last_layer_attention()
        out |= {f"pca{i}": r.feature_pca(i) for i in range(len(r.layer_grids))}
        out["similarity"] = r.feature_similarity((1, 1), 0)
        out["norms"] = np.concatenate(r.token_norms())
        out["lens"] = r.lens_probs
        out |= {f"array_{k}": v for k, v in r.arrays().items()}
        out["pca_images"] = vizapp.feature_pca(vm, imgs[:2], layer=1)
        return out

    want, want_batch = views(vizapp.analyze(vm, imgs[0], gradients=True)), vizapp.explain(vm, imgs, names, 1)
    with simulated_gpu(vm):
        with host_copies() as analysis:
            r = vizapp.analyze(vm, imgs[0], gradients=True)
            maps = [r.explain(m, 1) for m in ("grad_rollout", "relevance", "legrad")]
        assert all(isinstance(t, OnDevice) for t in (*r.windows, *r.block_outputs.values()))
        got = views(r)
        assert views_windows.render_all(r, 0) and feature_views_windows.token_norm_views(r, 1)
        with host_copies() as batch:
            got_batch = vizapp.explain(vm, imgs, names, 1)
        moved = r.to("cpu")
        assert moved.to("cpu") is moved and moved.graph_maps is None and r.graph_maps is not None
        assert not any(isinstance(t, OnDevice) for t in (*moved.windows, *moved.block_outputs.values()))
        got_moved = views(moved)
        assert moved.attention_gradients(1)[0].device.type == "cpu"
    # the host waits for the device only for what comes back to it: never for a copy to the device (index tensors
    # made on the host go over without a wait) nor for a mask's count of elements (they were 36 waits of the batch)
    for copies in (analysis, batch):
        assert set(copies.why) <= {"a copy to the host", "a replayed graph's synchronisation"}, copies.why
    for key, value in want.items():
        np.testing.assert_allclose(got[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
        np.testing.assert_allclose(got_moved[key], value, rtol=1e-5, atol=1e-6, err_msg=f"moved {key}")
    for n in names:
        np.testing.assert_allclose(got_batch[n], want_batch[n], rtol=1e-5, atol=1e-6, err_msg=n)
    for m, found in zip(("grad_rollout", "relevance", "legrad"), maps, strict=True):
        np.testing.assert_allclose(found, want[m], rtol=1e-5, atol=1e-6, err_msg=m)


@pytest.mark.parametrize("cache", [None, 1])
def test_the_evaluation_records_each_cuda_graph_once(cache):
    """On a GPU, an evaluation replays the CUDA graphs it recorded the first time round and records none again (each
    recording costs passes of work): the graphs it asks for (one image's analysis pass and gradient passes, the
    weights digest) fit the model's cache (:data:`vizapp.limits.CUDA_GRAPHS`), so none pushes another out, whether a
    batch is evaluated at once or image by image. A cache of one graph does push them out (the test can fail). Taken
    on the simulated GPU with each graph stood in for by its eager run."""
    from benchmarks.launches import StandInGraph
    from vizapp import cudagraph, limits
    from vizapp.evaluate.worker import Evaluator

    recorded: list[str] = []

    class Counted(StandInGraph):
        def __init__(self, fn, example, stage=None, keep=None):
            recorded.append("graph")
            super().__init__(fn, example, stage, keep)

    vm = _load("vit_tiny_patch16_224", dict(img_size=64, depth=2, num_classes=5))
    ev = Evaluator(vm, ["rollout", "relevance", "transformer_attribution", "attnlrp", "random"], steps=0, batch_size=8)
    items = [{"id": f"img{i}", "source": "x", "target": (-1, 3)[i]} for i in range(2)]
    pixels = [np.asarray(random_image(60 + i, size=(64, 64))) for i in range(2)]
    rounds = []
    with (
        simulated_gpu(vm),
        mock.patch.object(cudagraph, "GraphedPass", Counted),
        mock.patch.dict("os.environ", {"VIZAPP_CUDA_GRAPHS": "1"}),
        mock.patch.object(limits, "CUDA_GRAPHS", cache or limits.CUDA_GRAPHS),
    ):
        for _ in range(2):
            recorded.clear()
            rows = ev.evaluate_batch(items, pixels)
            rows += [row for i in range(2) for row in ev.evaluate_batch(items[i : i + 1], pixels[i : i + 1])]
            assert [row["status"] for row in rows] == ["ok"] * 4, [row.get("message") for row in rows]
            rounds.append(len(recorded))
    assert not vm.graph_failures() and not ev.fallbacks
    if cache is None:
        assert rounds[0] >= 3 and rounds[1] == 0, rounds  # the digest's, one image's pass and its gradient passes
    else:
        assert rounds[1] > 0, rounds


@pytest.mark.parametrize("protocol", ["chefer2021", "patches"])
def test_the_evaluation_on_the_device_gives_the_cpus_rows(protocol):
    """The dataset evaluation with its model on the (simulated) GPU: maps, the perturbed copies formed on the device
    from masks made on the host (either protocol), curves and statistics give the CPU's rows (the removals are exact
    selections, so the accuracies are equal, not close)."""
    from vizapp.evaluate import scores
    from vizapp.evaluate.worker import Evaluator

    # forwards of 32 perturbed copies: several of them, whose class scores come to the host in one copy
    ev = Evaluator(
        "vit_tiny_patch16_224",
        ["rollout", "relevance", "attnlrp", "random"],
        steps=2,
        pretrained=False,
        batch_size=32,
        protocol=protocol,
    )
    items = [{"id": f"img{i}", "source": "x", "target": (-1, 3)[i]} for i in range(2)]
    pixels = [np.asarray(random_image(50 + i, size=(224, 224))) for i in range(2)]
    want = ev.evaluate_batch(items, pixels)
    copies: list[bool] = []
    classify, classified = ev.classify, scores._classified
    ev.classify = lambda x: copies.append(isinstance(x, OnDevice)) or classify(x)  # type: ignore[method-assign]
    waits: list[int] = []

    def counted(*args):
        with host_copies() as rec:
            try:
                return classified(*args)
            finally:
                waits.append(rec.waits)

    with simulated_gpu(ev.vm), mock.patch.object(scores, "_classified", counted):
        got = ev.evaluate_batch(items, pixels)
    assert len(copies) > 2 and all(copies)  # every batch of perturbed copies was formed on the device
    assert waits == [1]  # forming and classifying them waited once: the class scores of every forward to the host
    assert not ev.fallbacks  # the batched path itself ran on the device: no batch ran again one image at a time
    for a, b in zip(want, got, strict=True):
        assert a["status"] == b["status"] == "ok", (a.get("message"), b.get("message"))
        assert set(a) == set(b)
        for key, value in a.items():
            if "seconds" in key:
                continue
            if isinstance(value, float):
                assert np.isclose(b[key], value, rtol=1e-5, atol=1e-7, equal_nan=True), key
            else:
                assert b[key] == value, key
        assert any(k.endswith(".acc5") for k in a)


def test_to_host_copies_views_covering_a_batch_tensor_as_that_tensor():
    """pipeline.to_host on the simulated GPU: each image's slices of a batch tensor (strided, float64 or float32) come
    back equal to the tensors they are, from one copy with no kernel per slice; a slice covering part of its tensor
    and a tensor of its own are copied as themselves; one device-to-host copy in all."""
    from benchmarks.launches import Counter
    from vizapp.pipeline import to_host

    vm = _load("vit_tiny_patch16_224", dict(img_size=32, depth=1))
    with simulated_gpu(vm):
        stats = torch.arange(24, dtype=torch.float64, device=vm.device).view(3, 4, 2)  # [L, B, H]
        logits = torch.arange(20, dtype=torch.float32, device=vm.device).view(4, 5)  # [B, K]
        part = torch.arange(10.0, device=vm.device)
        own = torch.full((2, 3), 7.0, device=vm.device)
        tensors = [*(stats[:, i] for i in range(4)), *(logits[i] for i in range(4)), part[2:5], own]
        counter = Counter()
        with host_copies() as copies, counter:
            got = to_host(tensors)
        assert copies.count == 1
        slice_kernels = counter.kernels
        for t, h in zip(tensors, got, strict=True):
            assert not isinstance(h, OnDevice) and h.dtype == torch.float32 and h.shape == t.shape
            assert torch.equal(h, t.float().cpu())
        # the per-slice path would flatten each of the 4 strided statistic slices on the device
        assert slice_kernels <= 4, slice_kernels


@pytest.mark.parametrize("graphed", [True, False], ids=["replayed", "eager"])
def test_the_weights_digest_is_taken_before_the_host_first_waits_for_the_pass(graphed):
    """On the simulated GPU, ``analyze`` takes the weights' digest after its pass is queued and before the host's
    first wait for the device (the replay's synchronisation, or the eager pass's first copy to the host), so that on a
    GPU the digest's walk of the weights runs while the device computes, and its own wait covers the pass."""
    from unittest import mock

    from benchmarks.launches import StandInGraph
    from tests import devicesim
    from vizapp import cudagraph
    from vizapp.models import VizModel

    vm = _load("vit_tiny_patch16_224", dict(img_size=64, depth=2, num_classes=5))
    img = random_image(22)
    events: list[str] = []

    class Order:
        def copied(self, t):
            pass

        def waited(self, why):
            events.append(f"wait: {why}")

    real = VizModel.fingerprint

    def fingerprint(self):
        events.append("digest starts")
        return real(self)

    with simulated_gpu(vm), mock.patch.object(cudagraph, "GraphedPass", StandInGraph):
        with mock.patch.dict("os.environ", {"VIZAPP_CUDA_GRAPHS": "1" if graphed else "0"}):
            vizapp.analyze(vm, img)  # records the pass (and the digest's sums) when graphed
            with mock.patch.object(VizModel, "fingerprint", fingerprint), devicesim.recording(Order()):
                r = vizapp.analyze(vm, img)
            want = real(vm)
    assert events[0] == "digest starts" and events.count("digest starts") == 1, events
    assert "wait: a replayed graph's synchronisation" in events if graphed else "wait: a copy to the host" in events
    assert r.model_fingerprint == want  # the digest recorded is the model's, on its device


def test_a_class_maps_weight_check_runs_while_its_replayed_passes_run_and_still_refuses_an_edit():
    """A class map of ``analyze()``'s result replays the recorded forward and backward, then checks that the model's
    weights are still the result's (the digest) before it takes the gradients: on a GPU the check's walk runs while
    the device computes. An edit of the weights is still refused, with nothing handed out."""
    from unittest import mock

    from benchmarks.launches import StandInGraph
    from vizapp import cudagraph, gradient_pass
    from vizapp.errors import StaleResultError
    from vizapp.models import VizModel

    vm = _load("vit_tiny_patch16_224", dict(img_size=64, depth=2, num_classes=5))
    img = random_image(23)
    events: list[str] = []
    real_passes, real_fingerprint = gradient_pass._passes, VizModel.fingerprint

    def passes(*args):
        events.append("passes")
        return real_passes(*args)

    def fingerprint(self):
        events.append("digest")
        return real_fingerprint(self)

    with simulated_gpu(vm), mock.patch.object(cudagraph, "GraphedPass", StandInGraph):
        with mock.patch.dict("os.environ", {"VIZAPP_CUDA_GRAPHS": "1"}):
            r = vizapp.analyze(vm, img)
            with (
                mock.patch.object(gradient_pass, "_passes", passes),
                mock.patch.object(VizModel, "fingerprint", fingerprint),
            ):
                r.relevance(1)
                assert events == ["passes", "digest"]  # replayed (a stand-in records nothing), then checked
                assert r.graph.maps is None  # the passes ran as the stand-in graph of the gradient passes:
                assert any("attention gradients" in key for key in vm.graphs._graphs)
                with torch.no_grad():
                    weight = vm.model.blocks[0].attn.qkv.weight
                    weight.data[0, 0] += 1.0
                try:
                    with pytest.raises(StaleResultError, match="changed since this result"):
                        r.grad_rollout(2)
                finally:
                    with torch.no_grad():
                        weight.data[0, 0] -= 1.0


def test_a_gpu_stores_the_fusions_the_cpu_multiplies_up_and_their_rollouts_agree(monkeypatch):
    """The default rollout of a model whose every layer's mean fusion is over the CPU's store limit: the CPU multiplies
    the joint attention up during the forward (an N x N x N product a layer), a GPU stores the fusions (its limit,
    limits.rollout_store_bytes, is larger) and carries the row down after it. Both give the rollout of timm's own
    attention (the second code path), and the simulated GPU's matrix products shrink by the joint's."""
    from benchmarks.launches import Counter
    from tests.conftest import reference_attention
    from vizapp import limits, pipeline
    from vizapp.analysis.rollout import rollout
    from vizapp.resultcache import Key

    monkeypatch.setattr(limits, "ROLLOUT_STORE_LIMIT_BYTES", 0)  # the CPU stores no fusion, as for a large model
    monkeypatch.setattr(limits, "FUSED_CACHE_LIMIT_BYTES", 0)  # and the views keep none
    vm = _load("vit_tiny_patch16_224", dict(img_size=64, depth=3))
    img = random_image(5)
    on_cpu = vizapp.analyze(vm, img)
    n, grid, p = vm.num_prefix_tokens + 16, vm.grid_size, vm.num_prefix_tokens
    assert not pipeline._PassSetup.of(vm, grid, True, False).store_mean
    _, maps = reference_attention(vm.model, on_cpu.input)
    joint = rollout(torch.stack([m[0] for m in maps]), p)
    expected = (on_cpu.output_weights().to(joint.dtype) @ joint)[p:].reshape(grid).numpy()
    default = Key("rollout", ("mean", 0.0, 0))
    np.testing.assert_allclose(on_cpu._cache.peek(default), expected, atol=1e-5)
    flops = {}
    with simulated_gpu(vm):
        with Counter() as probe:  # what this torch's FLOP counter makes of the joint's last row
            torch.matmul(torch.ones(n, device=vm.device), torch.ones(1, n, n, device=vm.device))
        last_row = probe.flops
        assert last_row in (0, 2 * n**2)
        assert pipeline._PassSetup.of(vm, grid, True, False).store_mean
        assert limits.analysis_memory(3, n, 3, device=vm.device)["fusions"] == 3 * n * n * 4
        for store in (limits.ROLLOUT_STORE_LIMIT_BYTES_GPU, 0):
            monkeypatch.setattr(limits, "ROLLOUT_STORE_LIMIT_BYTES_GPU", store)
            with Counter() as c:
                r = vizapp.analyze(vm, img)
            flops[store > 0] = c.flops
            np.testing.assert_allclose(r._cache.peek(default), expected, atol=1e-5)
    assert limits.analysis_memory(3, n, 3)["fusions"] == 2 * n * n * 4  # the CPU's estimate
    # multiplied up: 2 products of N x N x N (the first layer's fusion plus I starts the joint) and the default row of
    # the joint, a [N] x [1, N, N] product (which torch's FLOP counter counts in some versions: 2.11, not 2.14);
    # stored: 3 rows through the layers, a [1, N] x [N, N] product each
    assert flops[False] - flops[True] == 2 * 2 * n**3 + last_row - 3 * 2 * n**2


def test_the_distance_sums_on_a_device_are_one_matrix_product_equal_to_the_cpus_passes():
    """On a GPU each query's Σ_j a_ij·d_ij and Σ_j a_ij come from one batched product with [d_i | 1] (one read of the
    block, one kernel); they equal the CPU's product and sums, for a block of whole heads, one that starts in the
    prefix rows, one of prefix rows only, and with the sums written into given buffers."""
    from benchmarks.launches import Counter
    from vizapp.analysis.distance import BlockDistanceTerms, patch_distance_matrix

    g = torch.Generator().manual_seed(3)
    p, grid = 2, (3, 4)
    n = p + 12
    dist = patch_distance_matrix(grid, (16, 8))
    attn = torch.softmax(torch.randn(5, n, n, generator=g), dim=-1)  # [heads, rows, keys]
    blocks = [(attn, 0), (attn[:, 1:6], 1), (attn[:, 5:], 5), (attn[:, :2], 0)]
    want = [BlockDistanceTerms(dist, p)(a, row) for a, row in blocks]
    vm = _load("vit_tiny_patch16_224", dict(img_size=32, depth=1))
    with simulated_gpu(vm):
        terms = BlockDistanceTerms(dist.to(vm.device), p)
        first = True
        for (a, row), expect in zip(blocks, want, strict=True):
            a = a.to(vm.device)
            with Counter() as c:
                got = terms(a, row)
            if expect is None:
                assert got is None and c.kernels == 0
                continue
            assert got[:2] == expect[:2] and c.kernels == (3 if first else 1)  # [d | 1] once, then one product
            first = False
            for x, y in zip(got[2:], expect[2:], strict=True):
                np.testing.assert_allclose(x.cpu().numpy(), y.numpy(), rtol=1e-6, atol=1e-6)
        into = (torch.zeros(5, 12).to(vm.device), torch.zeros(5, 12).to(vm.device))
        terms(attn.to(vm.device), 0, into=into)
        np.testing.assert_allclose(into[0].cpu().numpy(), want[0][2].numpy(), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(into[1].cpu().numpy(), want[0][3].numpy(), rtol=1e-6, atol=1e-6)
