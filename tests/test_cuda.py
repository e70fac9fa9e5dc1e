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
