"""Head importance for windowed models (Swin): each head ablated where its layer hands the heads to the output
projection, against a second path that edits the weights instead (a head whose value projection is zero outputs 0;
one whose value projection is the constant m outputs m, since each attention row sums to 1)."""

from __future__ import annotations

import copy

import pytest
import torch

import vizapp
from tests.conftest import needs_timm_1_0_31
from tests.test_swin import TINY, hf_swin, random_tables
from vizapp import limits
from vizapp.ablation import head_importance
from vizapp.analysis.windows import window_index
from vizapp.errors import BadParameterError, UnsupportedModelError
from vizapp.windows import WindowCapture, window_sites


def _timm_vm(name="swin_tiny_patch4_window7_224"):
    torch.manual_seed(0)
    vm = vizapp.load_model(name, pretrained=False, device="cpu", **TINY)
    with torch.no_grad():  # weights far from timm's small init, so that every head changes the logits visibly
        for m in vm.model.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.normal_(0, 0.3)
            elif isinstance(m, torch.nn.LayerNorm):  # Swin V2 starts its post-norms at 0, silencing every branch
                m.weight.fill_(1.0)
    return vm


@pytest.fixture(scope="module")
def timm_vm():
    return _timm_vm()


def _hf_vm(folder, kind):
    model_cls, cfg = hf_swin(kind, initializer_range=0.3)
    random_tables(model_cls(cfg)).save_pretrained(folder)
    return vizapp.load_model(str(folder), device="cpu")


def _value_rows(site, head: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of the weight rows [d, C] and the bias [d] that make head ``head``'s values."""
    if site.library == "timm":  # qkv: rows [q; k; v], each C wide; Swin V2 keeps the v bias apart
        c = site.attn.qkv.out_features // 3
        d = c // site.heads
        weight = site.attn.qkv.weight[2 * c + head * d : 2 * c + (head + 1) * d]
        v2 = getattr(site.attn, "v_bias", None)
        bias = v2[head * d : (head + 1) * d] if v2 is not None else site.attn.qkv.bias[2 * c + head * d :][:d]
        return weight, bias
    lin = getattr(site.attn, "v_proj", None) or site.attn.value  # transformers Swin / Swinv2
    d = lin.out_features // site.heads
    return lin.weight[head * d : (head + 1) * d], lin.bias[head * d : (head + 1) * d]


def _logits(vm, model, x):
    out = model(x) if vm.family != "hf" else model(pixel_values=x)
    return (out.logits if hasattr(out, "logits") else out).float()


def _edited_logit(vm, x, layer, head, value):
    """The class logit of a copy of the model whose head ``head`` of ``layer`` gets values ``value`` ([d] or 0)."""
    model = copy.deepcopy(vm.model)
    site = window_sites(model)[layer]
    weight, bias = _value_rows(site, head)
    with torch.no_grad():
        weight.zero_()
        bias.copy_(torch.as_tensor(value).expand_as(bias))
        return _logits(vm, model, x)


def _clean_head_means(vm, x):
    """Per layer, each head's clean output averaged over the image's real tokens [H, d] (padding slots left out, as
    :func:`window_index` says, which is checked against the library's forward in tests/test_swin.py)."""
    seen = {}
    sites = window_sites(vm.model)
    projs = [s.attn.proj if s.library == "timm" else None for s in sites]
    with WindowCapture(vm.model) as cap, torch.no_grad():
        hooks = []
        for i, s in enumerate(sites):
            proj = projs[i] or getattr(s.attn, "o_proj", None) or s.block.attention.output.dense
            hooks.append(proj.register_forward_pre_hook(lambda _m, a, i=i: seen.__setitem__(i, a[0].clone())))
        try:
            _logits(vm, vm.model, x)
        finally:
            for h in hooks:
                h.remove()
        means, all_slots = [], []
        for i, s in enumerate(sites):
            g = cap.geometry[i]
            real = window_index(g.grid, g.window, g.shift, g.pad_first).reshape(-1) >= 0
            o = seen[i].reshape(real.numel(), s.heads, -1)  # one image: [nW*w², H, d]
            means.append(o[real].mean(0))
            all_slots.append(o.mean(0))
    return means, all_slots


@pytest.mark.parametrize("family", ["timm", pytest.param("timm_v2", marks=needs_timm_1_0_31), "swin", "swinv2"])
@pytest.mark.parametrize("mode", ["zero", "mean"])
def test_exact_drop_equals_the_model_with_edited_value_weights(timm_vm, tmp_path, family, mode):
    """Every head of every layer: the drop of the class logit when the head is ablated by the capture equals the drop
    when, in a copy of the model, that head's value projection is set to give 0 ("zero") or the head's clean mean
    over the image's real tokens ("mean"); drop is [L, max H] = [4, 4] with NaN for the first stage's missing heads."""
    vm = {"timm": lambda: timm_vm, "timm_v2": lambda: _timm_vm("swinv2_tiny_window8_256")}.get(
        family, lambda: _hf_vm(tmp_path, family)
    )()
    torch.manual_seed(1)
    x = torch.randn(1, 3, *vm.input_size[-2:])
    res = head_importance(vm, x, class_idx=2, mode=mode, score="logit")
    assert res.drop.shape == (4, 4) and res.layers_done == 4 and res.score == "logit"
    heads = [s.heads for s in window_sites(vm.model)]
    assert heads == [2, 2, 4, 4]
    assert torch.isnan(res.drop[:2, 2:]).all() and not torch.isnan(res.drop[:2, :2]).any()
    assert not torch.isnan(res.drop[2:]).any()
    with torch.no_grad():
        clean = _logits(vm, vm.model, x)[0, 2]
    assert res.clean_score == pytest.approx(float(clean), abs=1e-5)
    means, all_slots = _clean_head_means(vm, x) if mode == "mean" else (None, None)
    for layer, n in enumerate(heads):
        for h in range(n):
            value = 0.0 if mode == "zero" else means[layer][h]
            want = clean - _edited_logit(vm, x, layer, h, value)[0, 2]
            assert float(res.drop[layer, h]) == pytest.approx(float(want), rel=1e-4, abs=1e-5), (layer, h)
    assert res.drop[~torch.isnan(res.drop)].abs().min() > 1e-3  # the heads matter: the check above can fail
    if mode == "mean":  # every layer is padded here: the mean over all slots, padding included, is another value
        assert all(not torch.allclose(a, b, atol=1e-4) for a, b in zip(means, all_slots, strict=True))


def test_sub_batches_and_probability_score(timm_vm, monkeypatch):
    """Copies run one at a time (a tiny batch budget) give the same drops as all at once; the probability score is
    the softmax's drop."""
    x = torch.randn(1, 3, 24, 40, generator=torch.Generator().manual_seed(2))
    whole = head_importance(timm_vm, x, mode="mean")
    monkeypatch.setattr(limits, "ABLATION_BATCH_BYTES", 1)
    one = head_importance(timm_vm, x, mode="mean")
    torch.testing.assert_close(one.drop, whole.drop, atol=1e-6, rtol=0, equal_nan=True)
    assert whole.score == "probability" and whole.class_idx == int(timm_vm.model(x).argmax())


def test_gradient_estimate_is_the_derivative_along_the_ablation(timm_vm):
    """Attribution patching on a Swin: the estimate for head h is the derivative of the score along the path from
    the clean head output to zero, checked by a central difference on a copy whose head values are scaled by
    1 - t (float64); NaN where the exact result has it."""
    x = torch.randn(1, 3, 24, 40, generator=torch.Generator().manual_seed(3))
    est = head_importance(timm_vm, x, class_idx=1, method="gradient", score="logit")
    assert est.method == "gradient" and torch.isnan(est.drop[:2, 2:]).all() and not torch.isnan(est.drop[2:]).any()
    model = copy.deepcopy(timm_vm.model).double()
    xd = x.double()
    eps = 1e-4
    for layer, h in [(0, 1), (1, 0), (2, 3), (3, 2)]:
        site = window_sites(model)[layer]
        weight, bias = _value_rows(site, h)
        w, b = weight.clone(), bias.clone()
        scores = []
        with torch.no_grad():
            for t in (-eps, eps):
                weight.copy_(w * (1 - t))
                bias.copy_(b * (1 - t))
                scores.append(float(model(xd)[0, 1]))
            weight.copy_(w)
            bias.copy_(b)
        derivative = (scores[1] - scores[0]) / (2 * eps)  # d score / dt; the estimated drop is its negative
        assert float(est.drop[layer, h]) == pytest.approx(-derivative, rel=1e-3, abs=1e-6), (layer, h)


def test_refusals(timm_vm):
    x = torch.randn(1, 3, 24, 40)
    with pytest.raises(UnsupportedModelError, match="not a timm VisionTransformer"):
        head_importance(timm_vm, x, path="reuse")
    with pytest.raises(BadParameterError, match="ablation mode"):
        head_importance(timm_vm, x, mode="resample")
    with pytest.raises(BadParameterError, match="ablated layer must be in"):
        WindowCapture(timm_vm.model, ablate={4: torch.ones(2, dtype=torch.bool)})
    with (
        pytest.raises(BadParameterError, match="does not fit"),
        WindowCapture(timm_vm.model, ablate={2: torch.ones(2, dtype=torch.bool)}, maps=False),
    ):
        timm_vm.model(x)  # layer 2 has 4 heads, not 2


def test_without_a_classifier_the_score_is_one_minus_cos_of_the_pooled_feature():
    """A Swin without a head (num_classes=0): the exact drop is 1 - cos(ablated, clean pooled feature), equal to the
    edited-weights copy's for every head of layer 2; the gradient estimate is refused (its gradient is 0 there)."""
    torch.manual_seed(0)
    vm = vizapp.load_model("swin_tiny_patch4_window7_224", pretrained=False, device="cpu", **{**TINY, "num_classes": 0})
    x = torch.randn(1, 3, 24, 40, generator=torch.Generator().manual_seed(4))
    res = head_importance(vm, x, mode="zero")
    assert res.score == "1 - cos" and res.class_idx is None and res.drop.shape == (4, 4)
    assert torch.isnan(res.drop[:2, 2:]).all() and not torch.isnan(res.drop[2:]).any()
    with torch.no_grad():
        clean = vm.model(x)
    for h in range(4):
        model = copy.deepcopy(vm.model)
        weight, bias = _value_rows(window_sites(model)[2], h)
        with torch.no_grad():
            weight.zero_()
            bias.zero_()
            want = 1 - torch.nn.functional.cosine_similarity(model(x), clean, dim=-1)[0]
        assert float(res.drop[2, h]) == pytest.approx(float(want), abs=1e-6)
    assert float(res.drop[2].min()) > 5e-5  # every head of layer 2 moves the feature: the check above can fail
    with pytest.raises(BadParameterError, match="no classifier head"):
        head_importance(vm, x, method="gradient")


def test_swin_head_importance_on_the_simulated_gpu_equals_the_cpu(timm_vm):
    """Exact ("mean": its real-token mask is made on the host and moved to the device) and gradient head importance
    of a Swin under the simulated GPU (tests/devicesim.py: a device tensor meeting a host one raises, as CUDA does)
    equal the CPU's, NaN cells included."""
    from tests.devicesim import simulated_gpu

    x = torch.randn(1, 3, 24, 40, generator=torch.Generator().manual_seed(5))
    runs = [("exact", "mean"), ("exact", "zero"), ("gradient", "mean")]
    want = [head_importance(timm_vm, x, mode=mode, method=method).drop for method, mode in runs]
    with simulated_gpu(timm_vm):
        got = [head_importance(timm_vm, x, mode=mode, method=method).drop for method, mode in runs]
    for (method, mode), a, b in zip(runs, got, want, strict=True):
        assert a.device.type == "cpu", (method, mode)  # returned on the host, as the plain ViT's
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, equal_nan=True, msg=f"{method} {mode}")
