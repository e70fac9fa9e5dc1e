"""LeGrad (Bousselham et al., 2024): the formula by hand, against the paper's definition written out (one
``torch.autograd.grad`` per layer on each library's own materialised attention), per family, and through the registry,
the batch API and the evaluation."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from conftest import all_hooks, graph_reference, random_image, small_model

import vizapp
from vizapp import methods, views
from vizapp.analysis.legrad import layer_relevance, legrad, min_max
from vizapp.capture import AttentionCapture
from vizapp.errors import BadParameterError

TIMM = {
    "vit": ("vit_tiny_patch16_224", dict(img_size=48, depth=3)),
    "reg4": ("vit_small_patch14_reg4_dinov2", dict(img_size=42, depth=2, num_classes=7)),
    "gap_reg4": ("vit_little_patch16_reg4_gap_256", dict(img_size=48, depth=2)),  # no CLS: the mean of the patches
    "deit_distilled": ("deit_tiny_distilled_patch16_224", dict(img_size=48, depth=2)),  # two heads averaged
}


def _finish(grads: list[torch.Tensor], p: int, grid: tuple[int, int]) -> torch.Tensor:
    """The paper's steps after the gradients, written out: ReLU, mean over heads, mean over query rows, the patch
    columns, summed over layers, min-max scaled (per image)."""
    total = 0
    for g in grads:  # [B, H, N, N]
        total = total + torch.relu(g).mean(dim=1).mean(dim=1)[:, p:]
    out = []
    for e in total:
        out.append((e - e.min()) / (e.max() - e.min()))
    return torch.stack(out).reshape(-1, *grid)


def _timm_reference(vm, x: torch.Tensor, cls: list[int]) -> torch.Tensor:
    """timm's explicit attention path (fused attention off, attn_drop's input kept in the graph), each block's output
    kept, s_l = the model's own norm + head on it, and ∂s_l/∂A_l by one autograd.grad per layer on the whole graph."""
    ref, maps = graph_reference(vm.model)
    outs: list[torch.Tensor] = []
    for blk in ref.blocks:
        blk.register_forward_hook(lambda m, a, out: outs.append(out))
    ref(x)
    grads = []
    for layer, z in enumerate(outs):
        s = ref.forward_head(ref.norm(z))  # [B, K]
        score = s[torch.arange(x.shape[0]), torch.tensor(cls)].sum()
        grads.append(torch.autograd.grad(score, maps[layer], retain_graph=True)[0])
    return _finish(grads, vm.num_prefix_tokens, vm.grid_size)


def test_the_formula_by_hand():
    # one image, two heads, three tokens (one prefix token): ReLU, mean over heads, mean over the query rows
    g = torch.tensor(
        [
            [[0.0, 1.0, -2.0], [0.0, 3.0, 1.0], [1.0, -1.0, 2.0]],
            [[5.0, -1.0, 2.0], [0.0, 1.0, 1.0], [0.0, 0.0, -4.0]],
        ]
    )[None]
    # column 1: heads' ReLU means by row: (1+0)/2, (3+1)/2, (0+0)/2 -> rows' mean (0.5 + 2 + 0) / 3 = 5/6
    # column 2: (0+2)/2, (1+1)/2, (2+0)/2 -> (1 + 1 + 1) / 3 = 1
    e = layer_relevance([g, 2 * g], 1)
    assert e.shape == (1, 2, 2)
    assert torch.allclose(e[0, 0], torch.tensor([5 / 6, 1.0]))
    assert torch.allclose(e[0, 1], torch.tensor([10 / 6, 2.0]))
    assert torch.allclose(min_max(torch.tensor([[2.0, 4.0, 3.0]])), torch.tensor([[0.0, 1.0, 0.5]]))
    assert torch.equal(min_max(torch.tensor([[3.0, 3.0]])), torch.zeros(1, 2))  # constant: zeros, not NaN


@pytest.mark.parametrize("fid", list(TIMM))
def test_equals_the_papers_definition_on_timm(fid):
    name, kwargs = TIMM[fid]
    vm = small_model(name, **kwargs)
    x = torch.stack([vm.transform(random_image(s)) for s in (1, 2)])
    cls = [3, 5]
    found, used = legrad(vm.model, vm.logits, vm.lens_fn, x, cls, vm.num_prefix_tokens, vm.grid_size)
    ref = _timm_reference(vm, x, cls)
    assert used == cls and found.shape == (2, *vm.grid_size)
    diff = float((found - ref).abs().max())
    print(f"legrad {fid}: max abs diff vs the per-layer reference {diff:.2e}")
    assert diff < 1e-5
    assert float(found.min()) == 0.0 and float(found.max()) == 1.0


def test_one_backward_equals_a_backward_per_layer_on_the_capture_path():
    """The isolation of each block (one backward) against the capture's own graph, one autograd.grad per layer."""
    vm = small_model("vit_tiny_patch16_224", img_size=48, depth=3)
    x = vm.transform(random_image(4))[None]
    outs: list[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda m, a, out: outs.append(out)) for b in vm.model.blocks]
    try:
        with torch.enable_grad(), AttentionCapture(vm.model, with_grad=True) as cap:
            vm.logits(x)
    finally:
        for h in hooks:
            h.remove()
    grads = [
        torch.autograd.grad(vm.lens_fn(z)[0, 2], cap.maps[layer], retain_graph=True)[0] for layer, z in enumerate(outs)
    ]
    found, _ = legrad(vm.model, vm.logits, vm.lens_fn, x, [2], vm.num_prefix_tokens, vm.grid_size)
    assert torch.allclose(found, _finish(grads, vm.num_prefix_tokens, vm.grid_size), atol=1e-6)
    # later layers' scores do reach earlier attention: the full-graph gradient of Σ_l s_l is not LeGrad's
    total = sum(vm.lens_fn(z)[0, 2] for z in outs)
    mixed = torch.autograd.grad(total, cap.maps[0], retain_graph=True)[0]
    assert float((mixed - grads[0]).abs().max()) > 1e-6


@pytest.mark.parametrize("fid", ["hf_vit", "hf_deit_teacher", "hf_dinov2_reg_cls", "hf_beit"])
def test_equals_the_papers_definition_on_transformers(fid, tmp_path):
    """transformers' eager attention (output_attentions: the weights its matmul uses) and output_hidden_states."""
    import test_families as fam

    for hid, config, cls_name, extra in fam.HF:
        if hid == fid:
            folder = fam.save_hf(tmp_path, config, cls_name, extra)
    vm = vizapp.load_model(str(folder), device="cpu")
    x = torch.stack([vm.transform(random_image(s)) for s in (1, 2)])
    cls = [1, 2]
    found, _ = legrad(vm.model, vm.logits, vm.lens_fn, x, cls, vm.num_prefix_tokens, vm.grid_size)
    ref_model = type(vm.model).from_pretrained(folder, attn_implementation="eager").eval()
    hf = ref_model(pixel_values=x, output_attentions=True, output_hidden_states=True)
    grads = []
    base = getattr(
        ref_model, next(n for n in ("vit", "deit", "dinov2_with_registers", "beit") if hasattr(ref_model, n))
    )
    for layer in range(vm.num_layers):
        z = hf.hidden_states[layer + 1]
        s = _hf_readout(ref_model, base, z, vm)
        score = s[torch.arange(2), torch.tensor(cls)].sum()
        grads.append(torch.autograd.grad(score, hf.attentions[layer], retain_graph=True)[0])
    ref = _finish(grads, vm.num_prefix_tokens, vm.grid_size)
    diff = float((found - ref).abs().max())
    print(f"legrad {fid}: max abs diff vs the per-layer eager reference {diff:.2e}")
    assert diff < 1e-5


def _hf_readout(model, base, z: torch.Tensor, vm) -> torch.Tensor:
    """Each transformers classifier's own head on a block's output, written out from its forward."""
    h = base.layernorm(z)
    p = vm.num_prefix_tokens
    if hasattr(model, "cls_classifier"):  # DeiT with teacher: the mean of its two heads
        return (model.cls_classifier(h[:, 0]) + model.distillation_classifier(h[:, 1])) / 2
    if hasattr(model, "dinov2_with_registers"):  # the CLS token beside the patch tokens' mean
        return model.classifier(torch.cat([h[:, 0], h[:, p:].mean(dim=1)], dim=-1))
    if hasattr(model, "beit"):  # mean pooling through its pooler's layer norm
        return model.classifier(base.pooler.layernorm(z[:, 1:].mean(dim=1)))
    return model.classifier(h[:, 0])


def test_torchvision_equals_a_backward_per_layer():
    """torchvision's MHA returns its weights only as a view made after they are used, so the reference is the
    capture's own graph without the isolation, one autograd.grad per layer."""
    import test_families as fam

    vm = fam.load("tv_vit_b_16", {})
    vm = dataclasses.replace(vm, model=copy.deepcopy(vm.model))
    vm.model.encoder.layers = vm.model.encoder.layers[:3]  # three of its twelve blocks, to keep the test fast
    vm = dataclasses.replace(vm, num_layers=3)
    x = vm.transform(random_image(3))[None]
    outs: list[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda m, a, out: outs.append(out)) for b in vm.model.encoder.layers]
    try:
        with torch.enable_grad(), AttentionCapture(vm.model, with_grad=True) as cap:
            vm.logits(x)
    finally:
        for h in hooks:
            h.remove()
    heads = vm.model.heads
    grads = [
        torch.autograd.grad(heads(vm.model.encoder.ln(z)[:, 0])[0, 1], cap.maps[layer], retain_graph=True)[0]
        for layer, z in enumerate(outs)
    ]
    found, _ = legrad(vm.model, vm.logits, vm.lens_fn, x, [1], vm.num_prefix_tokens, vm.grid_for(32, 32))
    diff = float((found - _finish(grads, 1, vm.grid_for(32, 32))).abs().max())
    print(f"legrad torchvision: max abs diff vs the per-layer reference {diff:.2e}")
    assert diff < 1e-5


def test_registry_batch_and_cleanliness(card_model):
    vm = vizapp.load_model(card_model, device="cpu")
    images = [random_image(s, (28, 28)) for s in (1, 2, 3)]
    before = all_hooks(vm.model)
    batch = vizapp.explain(vm, images, "legrad", classes=[1, 2, None])
    assert batch.shape == (3, *vm.grid_size) and all_hooks(vm.model) == before
    for i, img in enumerate(images):
        r = vizapp.analyze(vm, img)
        single = r.explain("legrad", [1, 2, None][i])
        assert np.abs(single - batch[i]).max() < 1e-5
    assert all(p.grad is None for p in vm.model.parameters())  # nothing accumulated in the model
    r = vizapp.analyze(vm, images[0])
    assert "legrad" in views.available_methods(r) and not views.method_unavailable(r, "legrad")
    cost = methods.cost(r, "legrad")
    assert cost is not None and "one forward and one backward" in cost.work and cost.seconds > 0
    with pytest.raises(BadParameterError, match="start_layer"):
        r.explain("legrad", 0, start_layer=99)
    late = r.explain("legrad", 0, start_layer=1)
    assert late.shape == vm.grid_size


def test_a_model_without_a_readout_is_refused_clearly(card_model):
    vm = vizapp.load_model(card_model, device="cpu")
    r = vizapp.analyze(vm, random_image(1, (28, 28)))
    vm_without = dataclasses.replace(vm, lens_fn=None)
    with pytest.raises(BadParameterError, match="logit lens"):
        methods.METHODS["legrad"].batch(vm_without, r.input, [0])
