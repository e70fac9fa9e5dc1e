"""The GPU path against the CPU path: the same random-weight model, the same image, analysed on CUDA and on the CPU.

Skipped where no CUDA device exists (CI); run on a GPU machine with ``pytest tests/test_cuda.py``. The CPU run is the
second code path: every analysis must agree within GPU rounding (cuDNN's TF32 patch-embedding convolution included),
and every view and export must work with the model on the GPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import vizapp
from tests.conftest import random_image

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

MODELS = [
    ("vit", "vit_tiny_patch16_224", dict(img_size=64, depth=3)),
    ("reg4", "vit_small_patch14_reg4_dinov2", dict(img_size=56, depth=2, num_classes=7)),
    ("dinov3", "vit_small_patch16_dinov3", dict(img_size=64, depth=2, num_classes=5)),
    ("beit", "beit_base_patch16_224", dict(img_size=64, depth=2, num_classes=5)),
    ("deit_distilled", "deit_tiny_distilled_patch16_224", dict(img_size=(48, 80), depth=2)),
]
TOL = dict(rtol=2e-3, atol=2e-3)


def pair(name: str, kwargs: dict, dtype: torch.dtype = torch.float32):
    torch.manual_seed(0)
    cpu = vizapp.load_model(name, pretrained=False, device="cpu", **kwargs)
    torch.manual_seed(0)
    gpu = vizapp.load_model(name, pretrained=False, device="cuda", dtype=dtype, **kwargs)
    assert gpu.device.type == "cuda"
    return cpu, gpu


@pytest.mark.parametrize("fid,name,kwargs", MODELS, ids=[m[0] for m in MODELS])
def test_every_analysis_on_cuda_equals_the_cpu(fid, name, kwargs):
    cpu, gpu = pair(name, kwargs)
    img = random_image(1)
    a, b = vizapp.analyze(cpu, img, gradients=True), vizapp.analyze(gpu, img, gradients=True)
    np.testing.assert_allclose(b.probs, a.probs, **TOL)
    np.testing.assert_allclose(b.mean_distance, a.mean_distance, rtol=2e-3, atol=2e-2)
    # every registered statistic (the GPU's entropy is torch.special.entr and a sum, the CPU's three passes)
    assert set(b.statistics) == set(a.statistics)
    for name, values in a.statistics.items():
        np.testing.assert_allclose(b.statistics[name], values, rtol=2e-3, atol=2e-2, err_msg=name)
    for layer in range(a.num_layers):
        np.testing.assert_allclose(b.attention(layer), a.attention(layer), **TOL)
    np.testing.assert_allclose(b.rollout(), a.rollout(), **TOL)
    np.testing.assert_allclose(b.rollout("max"), a.rollout("max"), **TOL)
    np.testing.assert_allclose(b.token_norms(), a.token_norms(), rtol=2e-3, atol=2e-2)
    np.testing.assert_allclose(b.relevance(1), a.relevance(1), rtol=1e-2, atol=1e-4)
    np.testing.assert_allclose(b.grad_rollout(1), a.grad_rollout(1), rtol=1e-2, atol=1e-4)
    np.testing.assert_allclose(b.attention_flow(), a.attention_flow(), **TOL)
    # every export and view works with the model on the GPU
    assert set(b.arrays()) == set(a.arrays())
    from vizapp.views import render_all

    figs = render_all(b, gpu.pos_similarity())
    assert figs["rollout"] is not None and figs["heads"] is not None
    maps = {"rollout": b.rollout(), "relevance": b.relevance(1)}
    fa, fb = a.faithfulness(maps, class_idx=1, steps=4), b.faithfulness(maps, class_idx=1, steps=4)
    for m in maps:
        for mode in ("deletion", "insertion"):
            np.testing.assert_allclose(fb[m][mode].probs, fa[m][mode].probs, atol=1e-2)


@pytest.mark.parametrize("inline", [True, False], ids=["inline", "from_qk"])
def test_both_capture_paths_agree_on_cuda(inline):
    cpu, gpu = pair("vit_tiny_patch16_224", dict(img_size=64, depth=3))
    img = random_image(2)
    a, b = vizapp.analyze(cpu, img), vizapp.analyze(gpu, img, inline=inline)
    np.testing.assert_allclose(b.mean_distance, a.mean_distance, rtol=2e-3, atol=2e-2)
    np.testing.assert_allclose(b.rollout(), a.rollout(), **TOL)


def test_half_precision_forward_keeps_attention_close_to_fp32():
    cpu, gpu = pair("vit_tiny_patch16_224", dict(img_size=64, depth=3), dtype=torch.float16)
    img = random_image(3)
    a, b = vizapp.analyze(cpu, img), vizapp.analyze(gpu, img)
    np.testing.assert_allclose(b.rollout(), a.rollout(), rtol=2e-2, atol=2e-3)
    np.testing.assert_allclose(b.mean_distance, a.mean_distance, rtol=2e-2, atol=0.2)
    assert np.isfinite(b.token_norms()).all()


def test_head_importance_on_cuda_equals_the_cpu():
    from vizapp.ablation import head_importance

    cpu, gpu = pair("vit_tiny_patch16_224", dict(img_size=64, depth=2))
    x = cpu.transform(random_image(4))
    ea, eb = head_importance(cpu, x, method="exact"), head_importance(gpu, x, method="exact")
    np.testing.assert_allclose(np.asarray(eb.drop), np.asarray(ea.drop), rtol=1e-2, atol=1e-3)
    ga, gb = head_importance(cpu, x, method="gradient"), head_importance(gpu, x, method="gradient")
    np.testing.assert_allclose(np.asarray(gb.drop), np.asarray(ga.drop), rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("fid,name,kwargs", MODELS, ids=[m[0] for m in MODELS])
def test_a_batch_on_cuda_equals_the_cpu_batch_and_each_image_alone(fid, name, kwargs):
    """The batch API on the GPU (eager: a batch shape met once runs without a CUDA graph): each analysis equals the
    CPU's batch and the GPU's own analysis of that image; the class maps of ``vizapp.explain`` equal the CPU's."""
    cpu, gpu = pair(name, kwargs)
    imgs = [random_image(i) for i in range(3)]
    on_cpu, on_gpu = vizapp.analyze(cpu, imgs), vizapp.analyze(gpu, imgs)
    for img, a, b in zip(imgs, on_cpu, on_gpu, strict=True):
        np.testing.assert_allclose(b.probs, a.probs, **TOL)
        np.testing.assert_allclose(b.rollout(), a.rollout(), **TOL)
        np.testing.assert_allclose(b.mean_distance, a.mean_distance, rtol=2e-3, atol=2e-2)
        _same_analysis(b, vizapp.analyze(gpu, img), tol=2e-3, same_path=False)
    # straight from one forward's attention graph (vizapp.graph_maps), no analysis of any image, on either device
    names = ["relevance", "grad_rollout", "rollout", *(["attention"] if gpu.has_class_token else [])]
    ma, mb = vizapp.explain(cpu, imgs, names, 1), vizapp.explain(gpu, imgs, names, 1)
    alone = vizapp.explain(gpu, imgs[2:], names, 1)  # one image on the GPU: its analysis, graphs replayed
    for n in names:
        np.testing.assert_allclose(mb[n], ma[n], rtol=1e-2, atol=1e-4, err_msg=n)
        np.testing.assert_allclose(alone[n][0], mb[n][2], rtol=1e-2, atol=1e-4, err_msg=n)


def _same_analysis(b, a, tol: float = 1e-5, same_path: bool = True) -> None:
    """Every field an analysis computes in its forward, and the views built on them, agree to ``tol``."""
    close = dict(rtol=tol, atol=tol)
    np.testing.assert_allclose(b.probs, a.probs, **close)
    np.testing.assert_allclose(b.mean_distance, a.mean_distance, rtol=tol, atol=10 * tol)
    for layer in range(a.num_layers):
        np.testing.assert_allclose(b.q[layer].cpu().numpy(), a.q[layer].cpu().numpy(), **close)
        np.testing.assert_allclose(b.k[layer].cpu().numpy(), a.k[layer].cpu().numpy(), **close)
    assert len(b.biases) == len(a.biases)
    for x, y in zip(b.biases, a.biases, strict=True):
        assert (x is None) == (y is None)
        if x is not None:
            np.testing.assert_allclose(x.cpu().numpy(), y.cpu().numpy(), **close)
    np.testing.assert_allclose(b.block_norms, a.block_norms, rtol=tol, atol=10 * tol)
    assert sorted(b.block_outputs) == sorted(a.block_outputs)
    for layer, out in a.block_outputs.items():
        np.testing.assert_allclose(b.block_outputs[layer].cpu().numpy(), out.cpu().numpy(), rtol=tol, atol=10 * tol)
    if a.lens_probs is not None:
        np.testing.assert_allclose(b.lens_probs, a.lens_probs, **close)
    np.testing.assert_allclose(b.rollout(), a.rollout(), **close)
    np.testing.assert_allclose(b.attention(a.num_layers - 1), a.attention(a.num_layers - 1), **close)
    if same_path:
        assert b.recomputed_layers == a.recomputed_layers


@pytest.mark.parametrize("fid,name,kwargs", MODELS, ids=[m[0] for m in MODELS])
def test_cuda_graph_replay_equals_the_eager_pass(fid, name, kwargs, monkeypatch):
    """The recorded graph is replayed on a second image (new input values, same shape) and gives what an eager pass
    gives for that image: no value of the recording image is left in it."""
    torch.manual_seed(0)
    gpu = vizapp.load_model(name, pretrained=False, device="cuda", **kwargs)
    first, second = random_image(5), random_image(6)
    g1 = vizapp.analyze(gpu, first)  # records, then replays
    # memory freed since the recording is handed out and overwritten: a graph reading anything not kept alive with
    # it (the pass's constants) would now read NaN
    junk = [torch.full((n,), float("nan"), device="cuda") for n in (2**8, 2**12, 2**16, 2**20) for _ in range(4)]
    del junk
    g2 = vizapp.analyze(gpu, second)  # replays
    if fid == "dinov3" and len(gpu.graphs) == 0:
        # timm 1.0.31 builds DINOv3's dynamic-size RoPE table on the CPU in every forward, which a recording cannot
        # copy: it runs eagerly, and says why
        assert gpu.graphs.failures()
    else:
        assert len(gpu.graphs) == 1, gpu.graphs.failures()
    monkeypatch.setenv("VIZAPP_CUDA_GRAPHS", "0")
    e1, e2 = vizapp.analyze(gpu, first), vizapp.analyze(gpu, second)
    _same_analysis(g1, e1)
    _same_analysis(g2, e2)
    assert not np.allclose(g1.mean_distance, g2.mean_distance)
    # and the graph against the q/k replay path, the second code path
    _same_analysis(g2, vizapp.analyze(gpu, second, inline=False), tol=1e-4, same_path=False)


def test_the_gpus_stored_fusions_give_the_rollout_the_cpu_multiplies_up(monkeypatch):
    """Above the CPU's store limit the CPU multiplies the default rollout up during the forward; a GPU stores the
    fusions (limits.rollout_store_bytes) and carries the row down after it: the same maps, recorded and replayed as a
    graph, eager, and for a batch; the mean distances (one batched product a chunk on a GPU) agree too."""
    from vizapp import limits, pipeline

    monkeypatch.setattr(limits, "ROLLOUT_STORE_LIMIT_BYTES", 0)  # the CPU stores no fusion, as for a large model
    monkeypatch.setattr(limits, "FUSED_CACHE_LIMIT_BYTES", 0)  # and the views keep none
    cpu, gpu = pair("vit_tiny_patch16_224", dict(img_size=64, depth=3))
    assert pipeline._PassSetup.of(gpu, gpu.grid_size, True, False, 1).store_mean
    assert not pipeline._PassSetup.of(cpu, cpu.grid_size, True, False, 1).store_mean
    images = [random_image(4), random_image(8)]
    want = [vizapp.analyze(cpu, img) for img in images]
    for graphs in ("1", "1", "0"):  # records, replays, eager
        monkeypatch.setenv("VIZAPP_CUDA_GRAPHS", graphs)
        for a, b in zip(want, [vizapp.analyze(gpu, img) for img in images], strict=True):
            np.testing.assert_allclose(b.rollout(), a.rollout(), **TOL)
            np.testing.assert_allclose(b.mean_distance, a.mean_distance, rtol=2e-3, atol=2e-2)
    for a, b in zip(want, vizapp.analyze(gpu, images), strict=True):
        np.testing.assert_allclose(b.rollout(), a.rollout(), **TOL)


@pytest.mark.parametrize("fid,name,kwargs", MODELS[:2], ids=[m[0] for m in MODELS[:2]])
def test_cuda_graph_of_a_batch_replays_what_the_eager_batch_gives(fid, name, kwargs, monkeypatch):
    """A batch's shape is recorded the second time it comes, and a replay on another batch of that shape gives each
    image what the eager batch gives (q and k of every image copied out of the graph's memory as one block)."""
    torch.manual_seed(0)
    gpu = vizapp.load_model(name, pretrained=False, device="cuda", **kwargs)
    first, second = [random_image(i) for i in (1, 2, 3)], [random_image(i) for i in (4, 5, 6)]
    vizapp.analyze(gpu, first)
    assert len(gpu.graphs) == 0  # a shape met once runs eagerly
    g1 = vizapp.analyze(gpu, first)  # records, then replays
    assert len(gpu.graphs) == 1, gpu.graphs.failures()
    junk = [torch.full((n,), float("nan"), device="cuda") for n in (2**8, 2**12, 2**16, 2**20) for _ in range(4)]
    del junk
    g2 = vizapp.analyze(gpu, second)  # replays
    monkeypatch.setenv("VIZAPP_CUDA_GRAPHS", "0")
    for graphed, images in ((g1, first), (g2, second)):
        for g, e in zip(graphed, vizapp.analyze(gpu, images), strict=True):
            _same_analysis(g, e)
    assert len({t.untyped_storage().data_ptr() for g in g1 for t in (*g.q, *g.k)}) == 1


@pytest.mark.parametrize("fid,name,kwargs", [MODELS[0], MODELS[3]], ids=[MODELS[0][0], MODELS[3][0]])
def test_the_gradient_passes_replayed_as_a_cuda_graph_give_the_eager_class_maps(fid, name, kwargs, monkeypatch):
    """analyze() keeps no gradient-enabled forward, so a class map runs a forward and a backward: on a GPU one recorded
    graph (vizapp.gradient_pass) whose inputs are the image and the class's one-hot row. Two classes and a second
    image replay the one recording; each map equals the eager passes' (graphs off) within GPU rounding."""
    torch.manual_seed(0)
    gpu = vizapp.load_model(name, pretrained=False, device="cuda", **kwargs)
    images = [random_image(11), random_image(12)]
    found = {}
    for i, img in enumerate(images):
        r = vizapp.analyze(gpu, img)
        before = len(gpu.graphs)
        for c in (0, 2):
            found[i, c] = (r.relevance(c), r.grad_rollout(c), r.attention_gradients(c).clone())
        assert r.attention_gradients(0).device.type == "cuda"
        assert len(gpu.graphs) - before == (1 if i == 0 else 0), gpu.graphs.failures()
    monkeypatch.setenv("VIZAPP_CUDA_GRAPHS", "0")
    for (i, c), (rel, roll, grads) in found.items():
        e = vizapp.analyze(gpu, images[i])
        np.testing.assert_allclose(rel, e.relevance(c), **TOL)
        np.testing.assert_allclose(roll, e.grad_rollout(c), **TOL)
        torch.testing.assert_close(grads, e.attention_gradients(c), **TOL)
    assert not np.allclose(found[0, 0][0], found[0, 2][0])


def test_one_gradient_analysis_on_cuda_replays_and_gives_the_kept_graphs_class_maps(monkeypatch):
    """analyze(image, gradients=True) of one image: its pass and each class's gradients replayed as CUDA graphs (no
    autograd graph kept); its class maps, and class_gradients for another class, equal the eager gradient-enabled
    analysis's (graphs off: the forward keeps its graph)."""
    from vizapp import pipeline

    torch.manual_seed(0)
    gpu = vizapp.load_model("vit_tiny_patch16_224", pretrained=False, device="cuda", img_size=64, depth=3)
    img = random_image(13)
    r = vizapp.analyze(gpu, img, gradients=True)
    assert r.graph.replays and r.graph.maps is None, gpu.graphs.failures()
    top = int(np.argmax(r.probs))
    other = (top + 1) % len(r.probs)
    replayed = {c: (r.relevance(c), r.grad_rollout(c)) for c in (top, other)}
    fresh = vizapp.analyze(gpu, img, gradients=True)
    assert pipeline.class_gradients([fresh], [other]) == [other]
    assert len(gpu.graphs) == 2 and not gpu.graphs.failures()  # the pass, and the gradient passes for both classes
    monkeypatch.setenv("VIZAPP_CUDA_GRAPHS", "0")
    e = vizapp.analyze(gpu, img, gradients=True)
    assert e.graph.maps is not None and not e.graph.replays
    for c, (rel, roll) in replayed.items():
        np.testing.assert_allclose(rel, e.relevance(c), **TOL)
        np.testing.assert_allclose(roll, e.grad_rollout(c), **TOL)
    torch.testing.assert_close(fresh.graph.given[other], e.attention_gradients(other), **TOL)


def test_cuda_graph_is_recorded_again_for_new_weights(monkeypatch):
    torch.manual_seed(0)
    gpu = vizapp.load_model("vit_tiny_patch16_224", pretrained=False, device="cuda", img_size=64, depth=2)
    img = random_image(7)
    before = vizapp.analyze(gpu, img)
    with torch.no_grad():  # a replaced parameter: the old graph would read freed memory
        gpu.model.head.weight = torch.nn.Parameter(torch.randn_like(gpu.model.head.weight))
    after = vizapp.analyze(gpu, img)
    assert not np.allclose(after.probs, before.probs)
    monkeypatch.setenv("VIZAPP_CUDA_GRAPHS", "0")
    _same_analysis(after, vizapp.analyze(gpu, img))
    monkeypatch.delenv("VIZAPP_CUDA_GRAPHS")
    assert len(gpu.graphs) == 2  # the graph of the old weights is kept only until the cache's limit pushes it out


def test_cuda_graph_failure_falls_back_to_eager():
    from vizapp.cudagraph import GraphCache

    cache = GraphCache()
    x = torch.ones(3, device="cuda")

    def syncs(t: torch.Tensor) -> torch.Tensor:
        return t * float(t.sum())  # waits for the device: cannot be recorded

    assert cache.get(("k",), syncs, x) is None
    assert cache.failure(("k",))
    assert cache.get(("k",), syncs, x) is None  # remembered, not tried again
    ok = cache.get(("ok",), lambda t: t * 2, x, stage=lambda out: [out, out.sum()])
    with ok.run(torch.full((3,), 5.0, device="cuda")) as (out, host):
        assert out.tolist() == [10.0, 10.0, 10.0]
        assert host[0].device.type == "cpu" and not host[0].is_pinned()
        assert host[0].tolist() == [10.0, 10.0, 10.0] and host[1].item() == 30.0
    with ok.run(torch.full((3,), 1.0, device="cuda")) as (_, again):
        assert again[0].tolist() == [2.0, 2.0, 2.0]
    assert host[0].tolist() == [10.0, 10.0, 10.0]  # a copy: the next replay does not rewrite it
    assert len(cache) == 1


def test_concurrent_analyses_on_one_graphed_model_do_not_mix():
    from concurrent.futures import ThreadPoolExecutor

    torch.manual_seed(0)
    gpu = vizapp.load_model("vit_tiny_patch16_224", pretrained=False, device="cuda", img_size=64, depth=3)
    imgs = [random_image(10 + i) for i in range(4)]
    alone = [vizapp.analyze(gpu, im) for im in imgs]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda im: vizapp.analyze(gpu, im), imgs * 3))
    for i, r in enumerate(together):
        _same_analysis(r, alone[i % 4])


def test_a_swin_on_cuda_equals_the_cpu():
    """Windowed attention (issue 25) on the GPU: statistics, each layer's window maps, rollout, the class maps, AttnLRP
    and LeGrad of one image and of a batch (``vizapp.explain``) equal the CPU's."""
    from vizapp import views_windows

    kwargs = dict(img_size=(24, 40), embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=4, num_classes=5)
    cpu, gpu = pair("swin_tiny_patch4_window7_224", kwargs)
    imgs = [random_image(i) for i in range(3)]
    a, b = vizapp.analyze(cpu, imgs[0], gradients=True), vizapp.analyze(gpu, imgs[0], gradients=True)
    np.testing.assert_allclose(b.mean_distance, a.mean_distance, rtol=2e-3, atol=2e-2)
    for name in a.statistics:
        np.testing.assert_allclose(b.statistics[name], a.statistics[name], rtol=2e-3, atol=2e-2, err_msg=name)
    for layer in range(len(a.layer_grids)):
        np.testing.assert_allclose(b.attention(layer, None, (1, 1)), a.attention(layer, None, (1, 1)), **TOL)
    np.testing.assert_allclose(b.rollout(), a.rollout(), **TOL)
    for m in ("grad_rollout", "relevance", "attnlrp", "legrad"):
        np.testing.assert_allclose(b.explain(m, 1), a.explain(m, 1), rtol=1e-2, atol=1e-4, err_msg=m)
    assert views_windows.render_all(b, 0)
    names = ["rollout", "grad_rollout", "relevance", "attnlrp", "legrad"]
    ma, mb = vizapp.explain(cpu, imgs, names, 1), vizapp.explain(gpu, imgs, names, 1)
    for n in names:
        np.testing.assert_allclose(mb[n], ma[n], rtol=1e-2, atol=1e-4, err_msg=n)


def test_the_graphed_weights_digest_equals_the_eager_one_and_sees_every_edit(monkeypatch):
    """The device digest replayed as a CUDA graph gives the eager digest's bytes, reads the weights' current contents
    (an edit through .data, which moves no version counter, changes it), and records again for a replaced tensor."""
    from vizapp.cudagraph import GraphCache
    from vizapp.models.digest import weights_digest

    torch.manual_seed(0)
    gpu = vizapp.load_model("vit_tiny_patch16_224", pretrained=False, device="cuda", img_size=64, depth=3)
    graphs = GraphCache()
    eager = weights_digest(gpu.model)
    assert weights_digest(gpu.model, graphs) == eager and len(graphs) == 1
    assert weights_digest(gpu.model, graphs) == eager and len(graphs) == 1  # replayed, not recorded again
    w = gpu.model.blocks[1].attn.qkv.weight
    w.data[3, 5] += 1e-3  # no version counter moves
    edited = weights_digest(gpu.model, graphs)
    assert edited.values != eager.values and edited == weights_digest(gpu.model) and len(graphs) == 1
    w.data[3, 5] -= 1e-3
    with torch.no_grad():
        w.data = w.data.clone()  # the same values at another address: a new graph, the same digest
    assert weights_digest(gpu.model, graphs) == weights_digest(gpu.model) and len(graphs) == 2
    # the model's own fingerprint uses its graphs, and an analysis pinned to it still runs its class maps
    r = vizapp.analyze(gpu, random_image(2))
    assert r.model_fingerprint == gpu.fingerprint() == weights_digest(gpu.model)
    assert r.relevance(1).shape == r.rollout().shape
    monkeypatch.setenv("VIZAPP_CUDA_GRAPHS", "0")  # graphs off: the eager sums, the same digest
    assert gpu.fingerprint() == r.model_fingerprint


def test_the_gpus_exact_checksums_equal_the_hosts_and_the_graph_replays_them():
    """On the GPU the digest takes the exact form: the int8 products and their int64 fold (vizapp.models.digest.
    device_checksums) pass the device's check, and give, eagerly and replayed as a CUDA graph, the very integers the
    same function gives on the host for the same bytes (a ViT-B's shapes: about 60 kernels in place of 400)."""
    from vizapp.cudagraph import GraphCache
    from vizapp.models import digest

    torch.manual_seed(0)
    gpu = vizapp.load_model("vit_base_patch16_224", pretrained=False, device="cuda", depth=2)
    assert digest._device_exact_ok(torch.device("cuda", torch.cuda.current_device())), (
        "the int8 product or the int64 fold failed the check on this GPU: its digests use the float64 sums"
    )
    params, buffers = digest.named_tensors(gpu.model)
    tensors = [t.detach() for _, t in params + buffers]
    host = digest.device_checksums([t.cpu() for t in tensors])
    assert torch.equal(digest.device_checksums(tensors).cpu(), host)
    graphs = GraphCache()
    assert torch.equal(digest.graphed_sums(tensors, graphs, exact=True), host) and len(graphs) == 1
    assert torch.equal(digest.graphed_sums(tensors, graphs, exact=True), host) and len(graphs) == 1  # replayed
    tensors[3].view(-1)[0] += 1  # an edit in place: the replay reads it
    assert not torch.equal(digest.graphed_sums(tensors, graphs, exact=True), host)


def test_copies_to_the_gpu_through_pinned_memory_arrive_whole_and_from_their_own_block():
    """vizapp.transfer.to_device on a real GPU: an asynchronous copy through a fresh pinned block, so the values
    arrive whole even when the caller changes its tensor at once, and in the asked dtype."""
    from vizapp.transfer import tensor_on, to_device

    host = torch.randn(64, 3, 224, 224)
    want = host.clone()
    dev = to_device(host, "cuda")
    half = to_device(host, "cuda", torch.bfloat16)
    host.zero_()  # at once, before the copies need have run
    assert dev.is_cuda and torch.equal(dev.cpu(), want)
    assert half.dtype == torch.bfloat16 and torch.equal(half.cpu(), want.to(torch.bfloat16))
    assert tensor_on([3, 1], "cuda").cpu().tolist() == [3, 1]
    assert to_device(dev, "cuda").data_ptr() == dev.data_ptr()


def test_the_evaluation_on_cuda_gives_the_cpus_predictions_and_every_row():
    """One batch of the evaluation (every method but flow, the authors' protocol) with the model on the GPU: every
    row is complete and predicts the CPU's classes (the scores themselves may differ where GPU rounding reorders a
    map's ties)."""
    from benchmarks.evaluation import default_methods
    from vizapp.evaluate.worker import Evaluator

    rows = {}
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        ev = Evaluator("vit_tiny_patch16_224", default_methods(), steps=0, pretrained=False, device=device)
        pixels = [np.asarray(random_image(s).resize((224, 224))) for s in range(2)]
        items = [{"id": f"random/{s}", "source": "random", "target": -1} for s in range(2)]
        rows[device] = ev.evaluate_batch(items, pixels)
        assert not ev.fallbacks, (device, ev.fallbacks)  # the batched path ran; no batch ran again image by image
    assert [r["status"] for r in rows["cuda"]] == ["ok"] * 2, [r.get("message") for r in rows["cuda"]]
    assert [r["predicted"] for r in rows["cuda"]] == [r["predicted"] for r in rows["cpu"]]
    assert set(rows["cuda"][0]) == set(rows["cpu"][0])


@pytest.mark.parametrize("fid,name,kwargs", MODELS, ids=[m[0] for m in MODELS])
def test_the_fused_kernels_give_the_formed_attentions_analysis_on_cuda(fid, name, kwargs, monkeypatch):
    """The default route on a GPU (Triton's compiled kernels, vizapp.fused_attention) against the attention formed on
    the same GPU: a batch (eager) and one image (recorded as a CUDA graph with the kernels in it); BEiT's with its
    relative-position bias added in the kernels."""
    from tests.test_fused_attention import count_calls
    from vizapp import fused_attention, fused_check

    torch.manual_seed(0)
    gpu = vizapp.load_model(name, pretrained=False, device="cuda", **kwargs)
    images = [random_image(1), random_image(2)]
    monkeypatch.setenv("VIZAPP_FUSED_ATTENTION", "0")
    formed = vizapp.analyze(gpu, images) + [vizapp.analyze(gpu, images[0])]
    monkeypatch.setenv("VIZAPP_FUSED_ATTENTION", "1")
    for layer in (  # the small layers against float64, on this GPU: each compile is its own program
        fused_check.CheckLayer(),
        fused_check.CheckLayer(bias=torch.float32),
        fused_check.CheckLayer(dtype=torch.bfloat16, bias=torch.bfloat16),
        fused_check.CheckLayer(heads=1, head_dim=80, prefix=5, aligned=True),
    ):
        assert fused_check.self_check(gpu.device, layer) is None, layer
    assert fused_attention.usable(gpu.device), fused_attention.failure()
    calls = count_calls(monkeypatch)
    fused = vizapp.analyze(gpu, images) + [vizapp.analyze(gpu, images[0])]
    assert fused_attention.failure() is None
    assert len(calls) >= 2 * gpu.num_layers and calls[0][0] == 2
    for a, b in zip(formed, fused, strict=True):
        np.testing.assert_allclose(b.probs, a.probs, rtol=1e-4, atol=1e-5)
        for stat, values in a.statistics.items():
            np.testing.assert_allclose(b.statistics[stat], values, rtol=1e-4, atol=1e-4, err_msg=stat)
        np.testing.assert_allclose(b.rollout(), a.rollout(), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(b.token_norms(), a.token_norms(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_the_fused_kernels_on_cuda_equal_float64_at_1374_tokens(dtype):
    """DINOv2-L/14 at 518 px's layout (CLS + 4 registers + 37 x 37 patches of 14 px), 22 tiles of queries and keys."""
    from vizapp import fused_attention, fused_check
    from vizapp.analysis.distance import patch_distance_matrix

    torch.manual_seed(0)
    b, h, p, d = 2, 4, 5, 64
    n = p + 37 * 37
    q, k, v = (torch.randn(b, n, 3, h, d, device="cuda") * 1.5).to(dtype).permute(2, 0, 3, 1, 4)
    dist = patch_distance_matrix(37, 14).cuda()
    nan = float("nan")
    rows = {
        "entropy": torch.full((b, h, n), nan, device="cuda"),
        "distance": torch.full((b, h, n - p), nan, device="cuda"),
    }
    head_sum = torch.full((b, n, n), nan, device="cuda")
    out = fused_attention.attention(q, k, v, d**-0.5, rows, dist, p, head_sum)
    assert out is not None, fused_attention.failure()
    want = fused_check.reference(q, k, v, d**-0.5, dist, p)
    out_tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(out.double(), want["output"], **out_tol)
    torch.testing.assert_close(rows["entropy"].double(), want["entropy"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(rows["distance"].double(), want["distance"], rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(head_sum.double(), want["head sum"], rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second CUDA device")
def test_the_fused_kernels_run_on_the_tensors_gpu_not_the_current_one():
    """Triton launches on the current device; a layer on cuda:1 while cuda:0 is current must still be computed there
    (vizapp.fused_attention enters the tensors' device), not read through pointers of another GPU."""
    from vizapp import fused_attention, fused_check
    from vizapp.analysis.distance import patch_distance_matrix

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 70, 64, device="cuda:1") for _ in range(3))
    dist = patch_distance_matrix((2, 34), 16).to("cuda:1")
    rows = {"entropy": torch.empty(2, 3, 70, device="cuda:1"), "distance": torch.empty(2, 3, 68, device="cuda:1")}
    with torch.cuda.device(0):
        out = fused_attention.attention(q, k, v, 0.125, rows, dist, 2)
    assert out is not None, fused_attention.failure()
    want = fused_check.reference(q, k, v, 0.125, dist, 2)
    torch.testing.assert_close(out.double(), want["output"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(rows["entropy"].double(), want["entropy"], rtol=1e-4, atol=1e-4)
