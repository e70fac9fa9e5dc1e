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
from vizapp import limits
from vizapp.ablation import (
    ablate_heads,
    attribution_drops,
    head_importance,
    rank_correlation,
    record_head_outputs,
)
from vizapp.capture import AttentionCapture, attention_layers, encoder_layers
from vizapp.errors import BadParameterError, UnsupportedModelError

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


# -- the generic path: AttentionCapture(ablate=...) for every family ----------------------------------------------------


def _one_head(num_heads: int, head: int) -> torch.Tensor:
    mask = torch.zeros(1, num_heads, dtype=torch.bool)  # [1, H]
    mask[0, head] = True
    return mask


def _capture_naive_drops(vm, x: torch.Tensor, mode: str, cls: int | None) -> torch.Tensor:
    """L·H forwards of one image, each with one head ablated through the capture option ([1, H] mask)."""
    layers = attention_layers(vm.model)
    with torch.no_grad():
        clean = vm.logits(x)
        base = _score(vm, clean, clean, cls)
        drops = []
        for layer in range(len(layers)):
            row = []
            for head in range(vm.num_heads):
                with AttentionCapture(vm.model, ablate={layer: _one_head(vm.num_heads, head)}, ablate_mode=mode):
                    row.append(float((base - _score(vm, vm.logits(x), clean, cls))[0]))
            drops.append(row)
    return torch.tensor(drops, dtype=torch.float64)


def _dinov3_vm():
    import vizapp

    torch.manual_seed(0)
    vm = vizapp.load_model(
        "vit_small_patch16_dinov3", pretrained=False, device="cpu", img_size=32, depth=2, num_classes=5
    )
    return dataclasses.replace(vm, model=_strengthen(copy.deepcopy(vm.model).double()), dtype=torch.float64)


def _hf_vit_vm(folder):
    import vizapp

    vm = vizapp.load_model(str(folder), device="cpu")
    return dataclasses.replace(vm, model=_strengthen(copy.deepcopy(vm.model).double()), dtype=torch.float64)


def _tv_small_vm():
    """torchvision's VisionTransformer (the class vit_b_16 builds, same nn.MultiheadAttention path), small."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64, num_classes=5
    )
    model = _strengthen(model.eval().double())
    return SimpleNamespace(
        model=model,
        logits=model,
        transform=None,
        device=torch.device("cpu"),
        dtype=torch.float64,
        labels=tuple(f"class {i}" for i in range(5)),
        num_heads=4,
    )


@pytest.fixture(scope="module")
def hf_vit_folder(tmp_path_factory):
    transformers = pytest.importorskip("transformers", reason="the hf extra is installed by requirements-dev.txt")
    torch.manual_seed(0)
    config = transformers.ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        patch_size=8,
        image_size=32,
        num_labels=5,
    )
    folder = tmp_path_factory.mktemp("hf_vit")
    transformers.ViTForImageClassification(config).save_pretrained(folder)
    return folder


def _family_vm(fid: str, hf_vit_folder):
    if fid == "dinov3":
        return _dinov3_vm()
    if fid == "hf_vit":
        return _hf_vit_vm(hf_vit_folder)
    return _tv_small_vm()


def _family_input(vm, seed: int = 1) -> torch.Tensor:
    return torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("mode", ["zero", "mean"])
@pytest.mark.parametrize("fid", ["dinov3", "hf_vit", "torchvision"])
def test_generic_exact_equals_one_head_per_forward(fid, mode, hf_vit_folder):
    vm = _family_vm(fid, hf_vit_folder)
    x = _family_input(vm)
    seen: list[tuple[int, int]] = []
    imp = head_importance(vm, x, mode=mode, method="exact", progress=lambda d, t: seen.append((d, t)))
    assert imp.drop.shape == (2, vm.num_heads) and imp.layers_done == 2 and seen == [(1, 2), (2, 2)]
    assert imp.score == "probability" and imp.class_idx is not None
    naive = _capture_naive_drops(vm, x, mode, imp.class_idx)
    assert torch.allclose(imp.drop.double(), naive, atol=1e-6, rtol=0)  # scores are taken in float32
    assert bool((naive != 0).all()) and float(naive.abs().max()) > 1e-5  # every head changed something


def _hf_output_projections(model: torch.nn.Module) -> list[torch.nn.Linear]:
    """Each layer's output projection, fed with the heads concatenated [B, N, H·d]: ``o_proj`` (transformers 5) or
    ``attention.output.dense`` (transformers 4)."""
    layers, attns = encoder_layers(model)
    return [getattr(a, "o_proj", None) or layer.attention.output.dense for layer, a in zip(layers, attns, strict=True)]


def _hf_dense_hook_drops(vm, x: torch.Tensor, mode: str, cls: int) -> torch.Tensor:
    """The independent reference: zero (or token-mean) a head's columns of HF ViT's output projection input (the heads
    concatenated, [B, N, H·d]) with a plain forward pre-hook, no vizapp hook involved."""
    model = vm.model
    layers = _hf_output_projections(model)
    h = vm.num_heads
    with torch.no_grad():
        clean = model(pixel_values=x).logits
        base = clean.softmax(-1)[0, cls]
        drops = torch.zeros(len(layers), h, dtype=torch.float64)
        for layer, blk in enumerate(layers):
            for head in range(h):

                def hook(_m, args, head=head):
                    o = args[0].unflatten(-1, (h, -1)).clone()  # [B, N, H, d]
                    o[:, :, head] = 0.0 if mode == "zero" else o[:, :, head].mean(dim=1, keepdim=True)
                    return (o.flatten(-2),)

                handle = blk.register_forward_pre_hook(hook)
                try:
                    drops[layer, head] = base - model(pixel_values=x).logits.softmax(-1)[0, cls]
                finally:
                    handle.remove()
    return drops


@pytest.mark.parametrize("mode", ["zero", "mean"])
def test_generic_exact_equals_a_hand_hook_on_hf_output_projection(mode, hf_vit_folder):
    vm = _hf_vit_vm(hf_vit_folder)
    x = _family_input(vm, 2)
    imp = head_importance(vm, x, mode=mode)
    ref = _hf_dense_hook_drops(vm, x, mode, imp.class_idx)
    assert torch.allclose(imp.drop.double(), ref, atol=1e-6, rtol=0)
    assert float(ref.abs().max()) > 1e-3


@pytest.mark.parametrize("mode", ["zero", "mean"])
def test_generic_gradient_is_the_derivative_along_the_ablation_on_hf(mode, hf_vit_folder):
    vm = _hf_vit_vm(hf_vit_folder)
    model, x = vm.model, _family_input(vm, 3)
    grad = head_importance(vm, x, mode=mode, method="gradient")
    cls, h, eps = grad.class_idx, vm.num_heads, 1e-5
    fd = torch.zeros(2, h, dtype=torch.float64)
    with torch.no_grad():
        for layer, blk in enumerate(_hf_output_projections(model)):
            for head in range(h):

                def prob(alpha: float, head=head, blk=blk) -> torch.Tensor:
                    def hook(_m, args):  # move head's columns alpha of the way to the ablated value
                        o = args[0].unflatten(-1, (h, -1)).clone()  # [B, N, H, d]
                        oh = o[:, :, head]
                        target = torch.zeros_like(oh) if mode == "zero" else oh.mean(dim=1, keepdim=True)
                        o[:, :, head] = oh + alpha * (target - oh)
                        return (o.flatten(-2),)

                    handle = blk.register_forward_pre_hook(hook)
                    try:
                        return model(pixel_values=x).logits.softmax(-1)[0, cls]
                    finally:
                        handle.remove()

                fd[layer, head] = -(prob(eps) - prob(-eps)) / (2 * eps)
    assert torch.allclose(grad.drop.double(), fd, rtol=1e-4, atol=1e-9)
    assert float(fd.abs().max()) > 1e-3


@pytest.mark.parametrize("mode", ["zero", "mean"])
@pytest.mark.parametrize("fid,name,kwargs", ABLATION_FAMILIES[:3], ids=[f[0] for f in ABLATION_FAMILIES[:3]])
def test_capture_path_equals_reuse_path_on_timm_vit(fid, name, kwargs, mode):
    vm = _private_vm(name, **kwargs)
    x = _input(vm, 1)
    for method in ("exact", "gradient"):
        reuse = head_importance(vm, x, mode=mode, method=method, path="reuse")
        generic = head_importance(vm, x, mode=mode, method=method, path="capture")
        assert generic.class_idx == reuse.class_idx and generic.clean_score == pytest.approx(reuse.clean_score)
        assert torch.allclose(generic.drop, reuse.drop, atol=1e-5, rtol=0)
        assert float(reuse.drop.abs().max()) > 1e-4


@pytest.mark.parametrize("mode", ["zero", "mean"])
def test_capture_gradient_is_exact_when_the_score_is_linear_in_the_head_outputs(mode):
    model = _two_head_model(depth=1)
    with torch.no_grad():
        model.blocks[0].mlp.fc2.weight.zero_()
        model.blocks[0].mlp.fc2.bias.zero_()
    model.norm = torch.nn.Identity()
    x = torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    vm = _toy_vm(model)
    exact = head_importance(vm, x, class_idx=2, mode=mode, method="exact", score="logit", path="capture")
    grad = head_importance(vm, x, class_idx=2, mode=mode, method="gradient", score="logit", path="capture")
    assert torch.allclose(grad.drop, exact.drop, atol=1e-6, rtol=0)
    assert float(exact.drop.abs().min()) > 1e-3


def test_capture_path_splits_copies_into_sub_batches(monkeypatch):
    vm = _dinov3_vm()
    x = _family_input(vm)
    whole = head_importance(vm, x, mode="mean")
    calls: list[int] = []
    forward = vm.forward_fn
    small = dataclasses.replace(vm, forward_fn=lambda m, t: calls.append(t.shape[0]) or forward(m, t))
    monkeypatch.setattr(limits, "ABLATION_BATCH_BYTES", 1)  # one copy at a time
    split = head_importance(small, x, mode="mean")
    assert calls == [1] + [1] * (2 * vm.num_heads)  # the clean forward, then L·H single copies
    assert torch.allclose(split.drop, whole.drop, atol=1e-12, rtol=0)


def test_vit_b_16_first_layer_equals_one_head_per_forward():
    import vizapp

    torch.manual_seed(0)
    vm = vizapp.load_model("torchvision:vit_b_16", pretrained=False, device="cpu", image_size=32, num_classes=5)
    vm = dataclasses.replace(vm, model=copy.deepcopy(vm.model))  # not the cached one
    with torch.no_grad():  # torchvision zeroes the classifier at init: give it weights so heads can matter
        vm.model.heads.head.weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(0))
    x = _family_input(vm).float()
    done: list[int] = []
    imp = head_importance(vm, x, should_stop=lambda: len(done) >= 1, progress=lambda d, t: done.append(d))
    assert imp.layers_done == 1 and imp.drop.shape == (12, 12) and bool(torch.isnan(imp.drop[1:]).all())
    with torch.no_grad():
        clean = vm.logits(x)
        base = clean.softmax(-1)[0, imp.class_idx]
        for head in range(12):
            with AttentionCapture(vm.model, ablate={0: _one_head(12, head)}):
                drop = base - vm.logits(x).softmax(-1)[0, imp.class_idx]
            assert abs(float(imp.drop[0, head]) - float(drop)) < 1e-5
    assert float(imp.drop[0].abs().max()) > 0


def _capture_hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


@pytest.mark.parametrize("fid", ["dinov3", "hf_vit", "torchvision"])
def test_capture_ablation_is_this_threads_and_leaves_nothing(fid, hf_vit_folder):
    vm = _family_vm(fid, hf_vit_folder)
    model, x = vm.model, _family_input(vm).expand(2, -1, -1, -1)
    h = vm.num_heads
    with torch.no_grad():
        clean = vm.logits(x)
        with AttentionCapture(model):
            captured = vm.logits(x)  # torch's MHA is evaluated by the capture: equal to rounding only
        assert torch.allclose(captured, clean, atol=1e-12, rtol=0)
        with AttentionCapture(
            model,
            ablate={0: torch.zeros(2, h, dtype=torch.bool), 1: torch.zeros(h, dtype=torch.bool)},
            ablate_mode="mean",
        ):
            assert torch.equal(vm.logits(x), captured)  # nothing ablated: exactly the captured forward's logits
        other: list[torch.Tensor] = []
        mask = torch.tensor([[True] * h, [False] * h])  # image 0: every head of layer 0; image 1: none

        def work() -> None:
            with torch.no_grad():  # as this thread (torch's MHA takes another kernel with gradients on)
                other.append(vm.logits(x))

        with AttentionCapture(model, ablate={0: mask}, record_head_outputs=True) as cap:
            ablated = vm.logits(x)
            worker = threading.Thread(target=work)
            worker.start()
            worker.join()
        assert not torch.allclose(ablated[0], clean[0]) and torch.allclose(ablated[1], clean[1], atol=1e-12)
        assert torch.equal(other[0], clean)  # another thread's forward is untouched
        assert cap.head_outputs[0].shape[:2] == (2, h) and bool((cap.head_outputs[0][0] == 0).all())
        assert not bool((cap.head_outputs[0][1] == 0).all()) and cap.head_outputs[1] is not None
    assert _capture_hook_count(model) == 0
    with pytest.raises(BadParameterError, match="does not fit"), AttentionCapture(model, ablate={0: torch.ones(1, 7)}):
        vm.logits(x)
    assert _capture_hook_count(model) == 0
    with torch.no_grad():
        assert torch.equal(vm.logits(x), clean)
    head_importance(vm, x[:1], method="gradient")
    assert _capture_hook_count(model) == 0 and not any(p.grad is not None for p in model.parameters())
    with pytest.raises(BadParameterError, match="ablated layer"):
        AttentionCapture(model, ablate={5: torch.ones(h, dtype=torch.bool)})
    with pytest.raises(BadParameterError, match="mode"):
        AttentionCapture(model, ablate_mode="random")


def test_capture_refuses_a_layer_it_cannot_ablate():
    vm = _private_vm("vit_tiny_patch16_224", img_size=32, depth=2, num_classes=5)
    for blk in vm.model.blocks:
        blk.attn.fused_attn = False  # timm's explicit path: no SDPA call whose output could be ablated
    x = _input(vm)
    with pytest.raises(UnsupportedModelError, match="cannot ablate"):
        head_importance(vm, x, path="capture")
    assert torch.isfinite(head_importance(vm, x, path="reuse").drop).all()  # the reuse path still works there
    with pytest.raises(UnsupportedModelError, match="path='capture'"):
        head_importance(_dinov3_vm(), x, path="reuse")
    assert _capture_hook_count(vm.model) == 0


class _Sink:
    """An AttentionConsumer that takes every chunk and keeps nothing (it only makes the capture form attention)."""

    def chunk(self, layer: int, batch: int, head: int, attn: torch.Tensor, row: int) -> None:
        pass

    def layer_done(self, layer: int) -> None:
        pass


@pytest.mark.parametrize("mode", ["zero", "mean"])
@pytest.mark.parametrize("fid", ["dinov3", "hf_vit", "torchvision"])
def test_ablation_is_the_same_on_every_capture_path(fid, mode, hf_vit_folder):
    """The model's own SDPA, the inline path (a consumer), the with_grad path and inline=False agree."""
    vm = _family_vm(fid, hf_vit_folder)
    x = _family_input(vm, 4).expand(2, -1, -1, -1)
    h = vm.num_heads
    ablate = {
        0: torch.tensor([[True] + [False] * (h - 1), [False, True] + [False] * (h - 2)]),
        1: torch.tensor([False] * (h - 1) + [True]),
    }
    paths = {
        "sdpa": dict(),
        "inline": dict(on_attention=_Sink()),
        "no_inline": dict(on_attention=_Sink(), inline=False),
        "with_grad": dict(with_grad=True),
    }
    out = {}
    for name, kwargs in paths.items():
        with (
            torch.set_grad_enabled(name == "with_grad"),
            AttentionCapture(vm.model, ablate=ablate, ablate_mode=mode, **kwargs) as cap,
        ):
            out[name] = vm.logits(x).detach()
        if name == "inline":
            assert cap.inline_layers == {0, 1}  # the consumer's path formed the layers' outputs
    with torch.no_grad():
        clean = vm.logits(x)
    effect = float((out["sdpa"] - clean).abs().max())
    assert effect > 1e-5
    for name in paths:  # the inline and with_grad paths form the attention in float32: agree to 1% of the effect
        assert float((out[name] - out["sdpa"]).abs().max()) < 0.01 * effect, name


MORE_FAMILIES = [
    "eva02_tiny",
    "beit",
    "relpos",
    "rope_mixed",
    "naflex",
    "hf_deit_teacher",
    "hf_dinov2_reg",
    "hf_clip",
    "hf_siglip",
    "tv_vit_b_16",
]


@pytest.mark.parametrize("fid", MORE_FAMILIES)
def test_generic_exact_runs_on_every_family(fid, tmp_path_factory):
    """Every other family vizapp loads: exact importance on the capture path equals one-head-per-forward (layer 0),
    with the 1 - cos score for models without a classifier head."""
    import test_families as fam

    pytest.importorskip("transformers", reason="the hf extra is installed by requirements-dev.txt")
    folders = {}
    for hid, config, cls, extra in fam.HF:
        if hid == fid:
            folders[hid] = str(fam.save_hf(tmp_path_factory.mktemp(hid), config, cls, extra))
    vm = fam.load(fid, folders)  # a copy out of the cache, redrawn so that heads matter (at init some do not)
    vm = dataclasses.replace(vm, model=_strengthen(copy.deepcopy(vm.model)))
    x = vm.transform(random_image(5)).unsqueeze(0)
    done: list[int] = []
    imp = head_importance(vm, x, should_stop=lambda: len(done) >= 1, progress=lambda d, t: done.append(d))
    assert imp.drop.shape == (vm.num_layers, vm.num_heads) and imp.layers_done == 1
    assert imp.score == ("1 - cos" if not vm.labels else "probability")
    cls = imp.class_idx
    with torch.no_grad():
        clean = vm.logits(x)
        base = _score(vm, clean, clean, cls)
        for head in range(vm.num_heads):
            with AttentionCapture(vm.model, ablate={0: _one_head(vm.num_heads, head)}):
                ref = float((base - _score(vm, vm.logits(x), clean, cls))[0])
            assert abs(float(imp.drop[0, head]) - ref) < 1e-5
    assert bool(torch.isfinite(imp.drop[0]).all()) and float(imp.drop[0].abs().max()) > 0
