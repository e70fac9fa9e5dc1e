"""Head ablation (vizapp.ablation): a hand-written forward, the naive L·H forwards, toy models, cleanliness."""

from __future__ import annotations

import copy
import dataclasses
import threading
from types import SimpleNamespace

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from tests.conftest import random_image, small_model
from vizapp.ablation import (
    ablate_heads,
    attribution_drops,
    head_importance,
    rank_correlation,
    record_head_outputs,
)
from vizapp.errors import BadParameterError

# CLS only; CLS + distillation token; CLS + 4 registers; 4 registers, no CLS token, mean pooling; no classifier head.
ABLATION_FAMILIES = [
    ("vit", "vit_tiny_patch16_224", dict(img_size=32, depth=2, num_classes=5)),
    ("deit_distilled", "deit_tiny_distilled_patch16_224", dict(img_size=32, depth=2, num_classes=5)),
    ("reg4", "vit_small_patch14_reg4_dinov2", dict(img_size=28, depth=2, embed_dim=64, num_heads=4, num_classes=5)),
    ("gap_reg4", "vit_little_patch16_reg4_gap_256", dict(img_size=32, depth=2, num_classes=5)),
    ("headless", "vit_small_patch14_reg4_dinov2", dict(img_size=28, depth=2, embed_dim=64, num_heads=4, num_classes=0)),
]


@torch.no_grad()
def _strengthen(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Redraw every weight at unit-variance scale (and layer scales at 1): timm's initialisation (std 0.02, DINOv2's
    layer scale 1e-5) makes every head's effect on the output too small to tell apart from rounding."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith(".gamma"):
            p.fill_(1.0)
        elif p.dim() >= 2:
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) / p[0].numel() ** 0.5)
        elif "norm" in name and name.endswith("weight"):
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        else:
            p.copy_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def _private_vm(name: str, dtype=torch.float64, **kwargs):
    """A loaded model copied out of the shared cache (so tests may change it), redrawn at a scale where heads matter,
    in float64 for tight comparisons."""
    vm = small_model(name, **kwargs)
    model = _strengthen(copy.deepcopy(vm.model).to(dtype))
    return dataclasses.replace(vm, model=model, dtype=dtype)


def _input(vm, seed: int = 0) -> torch.Tensor:
    return vm.transform(random_image(seed)).unsqueeze(0).to(vm.dtype)


def _score(vm, out: torch.Tensor, clean: torch.Tensor, cls: int | None) -> torch.Tensor:
    """The score drop's reference: probability of cls, or 1 - cos with the clean feature (model without head)."""
    if cls is None:
        return torch.nn.functional.cosine_similarity(out, clean, dim=-1)
    return out.softmax(-1)[:, cls]


def _manual_forward(model: VisionTransformer, x: torch.Tensor, layer: int, head: int) -> torch.Tensor:
    """The model's output with one head's output zeroed, written out by hand over timm's blocks (no vizapp hooks)."""
    first: list[torch.Tensor] = []
    handle = model.blocks[0].register_forward_pre_hook(lambda m, a: first.append(a[0]))
    try:
        model(x)  # only to read the embedded tokens the first block receives
    finally:
        handle.remove()
    h = first[0]
    for i, blk in enumerate(model.blocks):
        a = blk.attn
        b, n, c = h.shape
        nh, d = a.num_heads, a.head_dim
        y = blk.norm1(h)
        q, k, v = a.qkv(y).reshape(b, n, 3, nh, d).permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, N, d] each
        q, k = a.q_norm(q), a.k_norm(k)
        attn = torch.softmax((q * a.scale) @ k.transpose(-2, -1), dim=-1)  # [B, H, N, N]
        o = (attn @ v).transpose(1, 2)  # [B, N, H, d]
        if i == layer:
            o = o.clone()
            o[:, :, head] = 0.0
        h = h + blk.ls1(a.proj(a.norm(o.reshape(b, n, nh * d))))
        h = h + blk.ls2(blk.mlp(blk.norm2(h)))
    return model.forward_head(model.norm(h))


@torch.no_grad()
def test_zeroing_a_head_matches_a_hand_written_forward():
    vm = _private_vm("vit_tiny_patch16_224", img_size=32, depth=2, num_classes=5)
    model, x = vm.model, _input(vm)
    clean = model(x)
    cls = int(clean.argmax())
    imp = head_importance(vm, x[0], mode="zero", method="exact")
    assert imp.class_idx == cls and imp.score == "probability" and imp.layers_done == 2
    num_heads = model.blocks[0].attn.num_heads
    for layer in range(2):
        for head in range(num_heads):
            manual = _manual_forward(model, x, layer, head)
            mask = torch.zeros(num_heads, dtype=torch.bool)
            mask[head] = True
            with ablate_heads(model, {layer: mask}):
                hooked = model(x)
            assert torch.allclose(hooked, manual, atol=1e-12, rtol=0)
            assert not torch.allclose(hooked, clean, atol=1e-6)  # the head did change something
            expected = clean.softmax(-1)[0, cls] - manual.softmax(-1)[0, cls]
            assert abs(float(imp.drop[layer, head]) - float(expected)) < 1e-6


def _naive_drops(vm, x: torch.Tensor, mode: str, cls: int | None) -> torch.Tensor:
    """L·H full forwards, one head ablated in each."""
    model = vm.model
    num_layers, num_heads = len(model.blocks), model.blocks[0].attn.num_heads
    with torch.no_grad():
        clean = model(x)
        base = _score(vm, clean, clean, cls)
        drops = torch.zeros(num_layers, num_heads, dtype=torch.float64)
        for layer in range(num_layers):
            for head in range(num_heads):
                mask = torch.zeros(num_heads, dtype=torch.bool)
                mask[head] = True
                with ablate_heads(model, {layer: mask}, mode=mode):
                    drops[layer, head] = (base - _score(vm, model(x), clean, cls))[0]
    return drops


@pytest.mark.parametrize("mode", ["zero", "mean"])
@pytest.mark.parametrize("fid,name,kwargs", ABLATION_FAMILIES, ids=[f[0] for f in ABLATION_FAMILIES])
def test_exact_method_equals_naive_forwards(fid, name, kwargs, mode):
    vm = _private_vm(name, **kwargs)
    x = _input(vm, 1)
    imp = head_importance(vm, x, mode=mode, method="exact")
    assert imp.drop.shape == (2, vm.model.blocks[0].attn.num_heads)
    if fid == "headless":
        assert imp.score == "1 - cos" and imp.class_idx is None and imp.clean_score == 1.0
    naive = _naive_drops(vm, x, mode, imp.class_idx)
    assert torch.allclose(imp.drop.double(), naive, atol=1e-5, rtol=0)
    assert float(naive.abs().max()) > 1e-4  # not trivially zero


def _two_head_model(depth: int = 2, seed: int = 0) -> VisionTransformer:
    torch.manual_seed(seed)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=16, depth=depth, num_heads=2, num_classes=4)
    return _strengthen(model.eval().to(torch.float64), seed)


def _toy_vm(model: torch.nn.Module) -> SimpleNamespace:
    return SimpleNamespace(model=model, transform=None, device=torch.device("cpu"), dtype=torch.float64, labels=())


@pytest.mark.parametrize("mode", ["zero", "mean"])
def test_a_head_that_cannot_matter_ranks_last(mode):
    model = _two_head_model()
    with torch.no_grad():
        for blk in model.blocks:  # head 1's output never reaches the residual stream
            d = blk.attn.head_dim
            blk.attn.proj.weight[:, d:] = 0.0
    x = torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for method in ("exact", "gradient"):
        for score in ("probability", "logit"):
            imp = head_importance(_toy_vm(model), x, mode=mode, method=method, score=score)
            assert float(imp.drop[:, 1].abs().max()) < 1e-12
            assert bool((imp.drop[:, 0].abs() > 1e-4).all())
            assert imp.drop.abs().argmax(dim=1).tolist() == [0, 0]


@pytest.mark.parametrize("mode", ["zero", "mean"])
def test_gradient_estimate_is_exact_when_the_score_is_linear_in_the_head_outputs(mode):
    # one block, no MLP contribution, no final norm, logit score: the logits are an affine function of the heads'
    # outputs, so the first-order estimate is the exact drop
    model = _two_head_model(depth=1)
    with torch.no_grad():
        model.blocks[0].mlp.fc2.weight.zero_()
        model.blocks[0].mlp.fc2.bias.zero_()
    model.norm = torch.nn.Identity()
    x = torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    vm = _toy_vm(model)
    exact = head_importance(vm, x, class_idx=2, mode=mode, method="exact", score="logit")
    grad = head_importance(vm, x, class_idx=2, mode=mode, method="gradient", score="logit")
    assert torch.allclose(grad.drop, exact.drop, atol=1e-6, rtol=0)
    assert float(exact.drop.abs().min()) > 1e-3
    # with the probability the score is no longer linear, and the estimate is only close
    p_exact = head_importance(vm, x, class_idx=2, mode=mode, method="exact")
    p_grad = head_importance(vm, x, class_idx=2, mode=mode, method="gradient")
    assert not torch.allclose(p_grad.drop, p_exact.drop, atol=1e-9, rtol=0)


@pytest.mark.parametrize("mode", ["zero", "mean"])
def test_gradient_estimate_is_the_derivative_along_the_ablation(mode):
    vm = _private_vm("vit_tiny_patch16_224", img_size=32, depth=2, num_classes=5)
    model, x = vm.model, _input(vm, 2)
    grad = head_importance(vm, x, mode=mode, method="gradient")
    cls = grad.class_idx
    eps = 1e-5
    num_heads = model.blocks[0].attn.num_heads
    fd = torch.zeros(2, num_heads, dtype=torch.float64)
    with torch.no_grad():
        for layer in range(2):
            for head in range(num_heads):
                mask = torch.zeros(num_heads, dtype=torch.bool)
                mask[head] = True
                with ablate_heads(model, {layer: mask}, mode=mode, alpha=eps):
                    plus = model(x).softmax(-1)[0, cls]
                with ablate_heads(model, {layer: mask}, mode=mode, alpha=-eps):
                    minus = model(x).softmax(-1)[0, cls]
                fd[layer, head] = -(plus - minus) / (2 * eps)  # drop per unit of ablation
    assert torch.allclose(grad.drop.double(), fd, rtol=1e-4, atol=1e-9)


def test_attribution_drops_by_hand():
    # one layer, 2 tokens, 2 heads of width 1: outputs o, gradient g
    o = torch.tensor([[[1.0, 2.0], [3.0, -4.0]]])  # [1, N=2, H*d=2]
    g = torch.tensor([[[0.5, 1.0], [-1.0, 2.0]]])
    zero = attribution_drops([o], [g], num_heads=2, mode="zero")  # drop = sum g * o per head
    assert zero.tolist() == [[0.5 * 1 - 1.0 * 3, 1.0 * 2 + 2.0 * -4]]
    mean = attribution_drops([o], [g], num_heads=2, mode="mean")  # drop = -sum g * (mean - o)
    assert mean.tolist() == [[-(0.5 * (2 - 1) - 1.0 * (2 - 3)), -(1.0 * (-1 - 2) + 2.0 * (-1 + 4))]]


def test_headless_gradient_is_refused_and_bad_arguments_say_so():
    vm = _private_vm("vit_small_patch14_reg4_dinov2", img_size=28, depth=1, num_classes=0)
    x = _input(vm)
    with pytest.raises(BadParameterError, match="method='exact'"):
        head_importance(vm, x, method="gradient")
    with pytest.raises(BadParameterError, match="mode"):
        head_importance(vm, x, mode="random")
    with pytest.raises(BadParameterError, match="layer"):
        with ablate_heads(vm.model, {5: torch.ones(6, dtype=torch.bool)}):
            pass


def test_progress_and_stop_between_layers():
    vm = _private_vm("vit_tiny_patch16_224", img_size=32, depth=3, num_classes=5)
    seen: list[tuple[int, int]] = []
    imp = head_importance(
        vm, random_image(0), progress=lambda d, t: seen.append((d, t)), should_stop=lambda: len(seen) >= 2
    )
    assert seen == [(1, 3), (2, 3)]
    assert imp.layers_done == 2
    assert bool(torch.isfinite(imp.drop[:2]).all()) and bool(torch.isnan(imp.drop[2]).all())


def _hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def test_hooks_removed_on_error_and_only_this_thread_is_ablated():
    vm = _private_vm("vit_tiny_patch16_224", img_size=32, depth=2, num_classes=5)
    model, x = vm.model, _input(vm)
    with torch.no_grad():
        clean = model(x)
    mask = torch.ones(model.blocks[0].attn.num_heads, dtype=torch.bool)
    other: list[torch.Tensor] = []
    with torch.no_grad(), ablate_heads(model, {0: mask, 1: mask}):
        assert _hook_count(model) == 2
        ablated = model(x)
        worker = threading.Thread(target=lambda: other.append(model(x)))
        worker.start()
        worker.join()
    assert not torch.allclose(ablated, clean)
    assert torch.equal(other[0], clean)  # another thread's forward is untouched
    assert _hook_count(model) == 0
    with pytest.raises(RuntimeError, match="boom"), ablate_heads(model, {0: mask}):
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"), record_head_outputs(model) as outs:
        model(x)
        assert len(outs) == 2 and outs[0].shape == (1, x.shape[-1] // 16 * (x.shape[-2] // 16) + 1, 192)
        raise RuntimeError("boom")
    assert _hook_count(model) == 0
    # an ablation that raises inside the forward (wrong mask) leaves no hook behind either
    with (
        pytest.raises(BadParameterError, match="does not fit"),
        ablate_heads(model, {0: torch.ones(7, dtype=torch.bool)}),
    ):
        model(x)
    assert _hook_count(model) == 0
    head_importance(vm, x, method="gradient")
    head_importance(vm, x, method="exact")
    assert _hook_count(model) == 0
    assert not any(p.grad is not None for p in model.parameters())  # the gradient method leaves no .grad behind


def test_rank_correlation_matches_scipy():
    stats = pytest.importorskip("scipy.stats", reason="scipy gives the reference Spearman")
    g = torch.Generator().manual_seed(0)
    a = torch.randn(12, 12, generator=g)
    b = a + 0.7 * torch.randn(12, 12, generator=g)
    assert abs(rank_correlation(a, b) - stats.spearmanr(a.flatten(), b.flatten()).statistic) < 1e-12
    ties_a = torch.tensor([1.0, 2.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    ties_b = torch.tensor([0.3, 0.1, 0.2, 0.9, 0.4, 0.4, 1.0])
    assert abs(rank_correlation(ties_a, ties_b) - stats.spearmanr(ties_a, ties_b).statistic) < 1e-12
    assert rank_correlation(a, a) == pytest.approx(1.0) and rank_correlation(a, -a) == pytest.approx(-1.0)
