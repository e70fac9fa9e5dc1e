"""AttnLRP (Achtibat et al., ICML 2024) as lxt 2.1 applies it to a ViT: its rules by hand, against lxt itself on a
torchvision ViT, against the rules written out for timm, conservation over every additive source on each family, and
through the registry, the batch API and the evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import all_hooks, needs_timm_1_0_31, random_image, small_model

import vizapp
from vizapp import methods, views
from vizapp.analysis.attnlrp import EPS, attnlrp, patch_sums, relevance_rules, unsupported
from vizapp.capture import AttentionCapture
from vizapp.errors import BadParameterError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


# -- the rules by hand ------------------------------------------------------------------------------------------------


def test_layer_norm_rule_by_hand():
    """x = [1, 3]: mean 2, std 1 (eps 0), y = [-1, 1]. With the std detached, ∂y_0/∂x = (1 - 1/2, -1/2) / 1, so the
    relevance x · ∂y_0/∂x = (0.5, -1.5), which sums to y_0 = -1 (the identity rule conserves it; no bias)."""
    ln = torch.nn.LayerNorm(2, eps=0.0, elementwise_affine=False)
    x = torch.tensor([[1.0, 3.0]], requires_grad=True)
    with relevance_rules(ln):
        y = ln(x)
    assert torch.equal(y.detach(), torch.tensor([[-1.0, 1.0]]))  # the module's own value
    (g,) = torch.autograd.grad(y[0, 0], x)
    assert torch.allclose(g, torch.tensor([[0.5, -0.5]]))
    assert torch.allclose(x * g, torch.tensor([[0.5, -1.5]]))
    plain = torch.autograd.grad(ln(x)[0, 0], x)[0]  # without the rule: the std's gradient cancels it all
    assert torch.allclose(plain, torch.zeros(1, 2), atol=1e-6)
    assert all_hooks(ln) == 0


def test_activation_rule_by_hand():
    """GELU(2) = 2 Φ(2) = 1.954500: the backward is the ratio GELU(2) / 2 = 0.977250, so x · gradient = GELU(2): the
    relevance passes unchanged (the identity rule), where the true derivative would give 2 · 1.085.. ."""
    act = torch.nn.GELU()
    x = torch.tensor([2.0, -1.0], requires_grad=True)
    with relevance_rules(act):
        y = act(x)
    (g,) = torch.autograd.grad(y.sum(), x)
    expected = F.gelu(x.detach()) / (x.detach() + EPS)
    assert abs(float(y[0].detach()) - 1.954500) < 1e-6 and abs(float(g[0]) - 0.977250) < 1e-6
    assert torch.allclose(g, expected) and torch.allclose(x * g, y)


def test_patch_sums_by_hand():
    r = torch.arange(2 * 4 * 6, dtype=torch.float32).reshape(1, 2, 4, 6)  # 2 channels, 2x3 patches of 2x2
    s = patch_sums(r, (2, 3), (2, 2))
    assert s.shape == (1, 2, 3)
    top_left = r[0, :, :2, :2].sum()
    assert float(s[0, 0, 0]) == float(top_left) and float(s.sum()) == float(r.sum())


# -- against lxt on torchvision -----------------------------------------------------------------------------------


def _tv_model(dtype: torch.dtype):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=3, num_heads=4, hidden_dim=32, mlp_dim=64, num_classes=5
    )
    torch.nn.init.normal_(model.heads.head.weight, std=0.5)  # torchvision's head starts at zero
    return model.eval().to(dtype)


def _lxt_vit_rules():
    """lxt's ViT rule map (``lxt.efficient.models.vit_torch.cp_LRP``)."""
    return _lxt("lxt.efficient.models.vit_torch").cp_LRP


def _lxt(name: str):
    """A module of lxt's ``efficient`` package. lxt 2.1's package imports its transformers-LLM patches on import,
    which need transformers 4 (``transformers.modeling_attn_mask_utils``); its ViT module, patches and rules need only
    torch and torchvision, so the two packages are entered without running their ``__init__``."""
    import importlib
    import sys
    import types

    spec = importlib.util.find_spec("lxt")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("lxt is installed by requirements-dev.txt")
    root = Path(list(spec.submodule_search_locations)[0])
    saved = {n: sys.modules.get(n) for n in ("lxt.efficient", "lxt.efficient.models")}
    try:
        for package, folder in (
            ("lxt.efficient", root / "efficient"),
            ("lxt.efficient.models", root / "efficient/models"),
        ):
            if package not in sys.modules or not hasattr(sys.modules[package], "__path__"):
                pkg = types.ModuleType(package)
                pkg.__path__ = [str(folder)]
                sys.modules[package] = pkg
        return importlib.import_module(name)
    finally:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m


def _lxt_relevance(model: torch.nn.Module, x: torch.Tensor, cls: list[int]) -> torch.Tensor:
    """lxt's own rules on torchvision's ViT, applied as its ``monkey_patch`` applies a rule map (class-wide: put back
    after), and x · gradient."""
    rules = _lxt_vit_rules()
    classes = (torch.nn.GELU, torch.nn.LayerNorm, torch.nn.MultiheadAttention)
    saved = {c: c.forward for c in classes}
    try:
        for target, patch in rules.items():  # lxt.efficient.core.monkey_patch's loop
            assert patch(target)
        assert all(c.forward is not saved[c] for c in classes)
        x = x.clone().requires_grad_(True)
        y = model(x)
        y[torch.arange(x.shape[0]), torch.tensor(cls)].sum().backward()
        return (x * x.grad).detach()
    finally:
        for c, f in saved.items():
            c.forward = f
            if "original_forward" in vars(c):
                delattr(c, "original_forward")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_equals_lxt_on_a_torchvision_vit(dtype):
    model = _tv_model(dtype)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)).to(dtype)
    cls = [1, 4]
    found, used = attnlrp(model, model, x, cls, (4, 4), (8, 8))
    ref = patch_sums(_lxt_relevance(model, x, cls), (4, 4), (8, 8)).float()
    assert used == cls and all_hooks(model) == 0
    scale = float(ref.abs().max())
    diff = float((found - ref).abs().max())
    print(f"attnlrp torchvision {dtype}: max abs diff vs lxt {diff:.2e} (map scale {scale:.2e})")
    assert scale > 1e-3 and diff < 1e-5 * scale
    # lxt's rules differ from the plain gradient: the comparison can fail
    x2 = x.clone().requires_grad_(True)
    model(x2)[torch.arange(2), torch.tensor(cls)].sum().backward()
    plain = patch_sums((x2 * x2.grad).detach(), (4, 4), (8, 8)).float()
    assert float((plain - ref).abs().max()) > 100 * diff


# -- against lxt on transformers' DINOv2 with a SwiGLU MLP ---------------------------------------------------------

SWIGLU = ("Dinov2Config", "Dinov2ForImageClassification", dict(image_size=32, num_labels=3, use_swiglu_ffn=True))


def _lxt_dinov2_relevance(model: torch.nn.Module, x: torch.Tensor, cls: list[int], uniform: bool = True):
    """lxt's own patches on a copy of a transformers DINOv2 (class-wide and module-wide: put back after): LayerNorm's
    ``layer_norm_forward``, the SwiGLU's ``gated_mlp_forward`` (its gate_proj / up_proj / down_proj / act_fn layout is
    the one lxt's LLM MLPs have), and CP-LRP in the attention (``cp_wrap_attention_forward``: q and k detached) on the
    eager attention; then x · gradient. ``uniform=False``: the product's gradient not halved (a check that can fail)."""
    import copy

    from transformers.models.dinov2 import modeling_dinov2

    patches = _lxt("lxt.efficient.patches")
    ref = copy.deepcopy(model)
    ref.config._attn_implementation = "eager"
    ffn = modeling_dinov2.Dinov2SwiGLUFFN
    saved = (torch.nn.LayerNorm.forward, ffn.forward, modeling_dinov2.eager_attention_forward)

    def without_uniform(self, h):
        return self.down_proj(patches.identity_rule_implicit(self.act_fn, self.gate_proj(h)) * self.up_proj(h))

    try:
        assert patches.patch_method(patches.layer_norm_forward, torch.nn.LayerNorm)
        assert patches.patch_method(patches.gated_mlp_forward if uniform else without_uniform, ffn)
        modeling_dinov2.eager_attention_forward = patches.cp_wrap_attention_forward(saved[2])
        x = x.clone().requires_grad_(True)
        y = ref(pixel_values=x).logits
        y[torch.arange(x.shape[0]), torch.tensor(cls)].sum().backward()
        return (x * x.grad).detach()
    finally:
        torch.nn.LayerNorm.forward, ffn.forward, modeling_dinov2.eager_attention_forward = saved


def test_equals_lxt_on_a_transformers_dinov2_with_a_swiglu_mlp(tmp_path):
    import test_families as fam

    vm = vizapp.load_model(str(fam.save_hf(tmp_path, *SWIGLU)), device="cpu")
    assert type(vm.model.dinov2.encoder.layer[0].mlp).__name__ == "Dinov2SwiGLUFFN" and unsupported(vm.model) == ""
    vm.model.double()
    try:
        x = torch.stack([vm.transform(random_image(s)) for s in (1, 2)]).double()
        cls = [0, 2]
        found, _ = attnlrp(vm.model, vm.logits, x, cls, vm.grid_size, vm.patch_size)
        ref = patch_sums(_lxt_dinov2_relevance(vm.model, x, cls), vm.grid_size, vm.patch_size)
        diff, scale = float((found.double() - ref).abs().max()), float(ref.abs().max())
        print(f"attnlrp hf dinov2 swiglu: max abs diff vs lxt {diff:.2e} (map scale {scale:.2e})")
        assert scale > 1e-3 and diff < 1e-5 * scale
        # without lxt's uniform rule on the gate's product the map is another one: the comparison can fail
        other = patch_sums(_lxt_dinov2_relevance(vm.model, x, cls, uniform=False), vm.grid_size, vm.patch_size)
        assert float((other - ref).abs().max()) > 100 * diff
        assert all_hooks(vm.model) == 0
    finally:
        vm.model.float()
    r = vizapp.analyze(vm, random_image(3))
    assert methods.unavailable(r, "attnlrp") == ""
    assert np.isfinite(r.explain("attnlrp", 1)).all()


# -- the rules written out for timm -------------------------------------------------------------------------------


def _ln(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    if isinstance(m, torch.nn.Identity):
        return x
    mu = x.mean(-1, keepdim=True)
    sd = ((x - mu) ** 2).mean(-1, keepdim=True).add(m.eps).sqrt().detach()
    return (x - mu) / sd * m.weight + m.bias


def _timm_reference(model, x: torch.Tensor, cls: list[int]) -> torch.Tensor:
    """A timm VisionTransformer's forward written out with AttnLRP's rules, and x · ∂̃y/∂x."""
    x = x.clone().requires_grad_(True)
    t = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    for blk in model.blocks:
        a = blk.attn
        b, n, _ = t.shape
        qkv = a.qkv(_ln(blk.norm1, t)).reshape(b, n, 3, a.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = torch.softmax(q.detach() @ k.detach().transpose(-2, -1) * a.scale, dim=-1)  # a constant
        t = t + blk.ls1(a.proj((attn @ v).transpose(1, 2).reshape(b, n, -1)))
        h = blk.mlp.fc1(_ln(blk.norm2, t))
        h = h * (F.gelu(h) / (h + 1e-10)).detach()
        t = t + blk.ls2(blk.mlp.fc2(h))
    t = _ln(model.norm, t)
    if getattr(model, "head_dist", None) is not None:  # DeiT distilled: the CLS and distillation heads averaged
        y = (model.head(t[:, 0]) + model.head_dist(t[:, 1])) / 2
    else:
        pooled = t[:, 0] if model.global_pool == "token" else t[:, model.num_prefix_tokens :].mean(dim=1)
        y = model.head(_ln(model.fc_norm, pooled))
    (g,) = torch.autograd.grad(y[torch.arange(x.shape[0]), torch.tensor(cls)].sum(), x)
    return (x * g).detach()


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("vit_tiny_patch16_224", dict(img_size=48, depth=2)),
        ("vit_small_patch14_reg4_dinov2", dict(img_size=42, depth=2, num_classes=7)),  # registers, layer scale
        ("vit_little_patch16_reg4_gap_256", dict(img_size=48, depth=2)),  # no CLS token: mean pooling
        ("deit_tiny_distilled_patch16_224", dict(img_size=48, depth=2)),  # CLS + distillation token
    ],
    ids=["vit", "reg4", "gap_reg4", "deit_distilled"],
)
def test_equals_the_rules_written_out_on_timm(name, kwargs):
    vm = small_model(name, **kwargs)
    x = torch.stack([vm.transform(random_image(s)) for s in (1, 2)])
    cls = [3, 5]
    found, _ = attnlrp(vm.model, vm.logits, x, cls, vm.grid_size, vm.patch_size)
    ref = patch_sums(_timm_reference(vm.model, x, cls), vm.grid_size, vm.patch_size)
    diff, scale = float((found - ref).abs().max()), float(ref.abs().max())
    print(f"attnlrp timm {name}: max abs diff vs the written-out rules {diff:.2e} (map scale {scale:.2e})")
    assert scale > 0 and diff < 1e-5 * scale


# -- conservation: every non-linearity has its rule -----------------------------------------------------------------

_SOURCES = (
    "bias",
    "pos_embed",
    "cls_token",
    "reg_token",
    "dist_token",
    "distillation_token",
    "register_tokens",
    "position_embeddings",
    "pos_embedding",
    "class_token",
)


def _conservation_gap(model, logits_fn, x: torch.Tensor, cls: int) -> tuple[float, float]:
    """With the rules, the score is linear in its additive sources jointly (the input, every bias, the position
    embeddings and prefix tokens), so Σ source · ∂̃y/∂source = y; a non-linearity left without its rule breaks it."""
    sources = [p for n, p in model.named_parameters() if n.endswith(_SOURCES)]
    x = x.clone().requires_grad_(True)
    with torch.enable_grad(), relevance_rules(model), AttentionCapture(model, with_grad=True) as cap:
        y = logits_fn(x)[0, cls]
    for a in cap.maps:
        a.register_hook(torch.zeros_like)
    grads = torch.autograd.grad(y, [x, *sources], allow_unused=True)
    total = sum(float((s * g).sum().detach()) for s, g in zip([x, *sources], grads, strict=True) if g is not None)
    return abs(total - float(y.detach())), abs(float(y.detach()))


@pytest.mark.parametrize(
    "fid",
    [
        "vit",
        "eva02",
        "beit",
        "relpos",
        pytest.param("rope_mixed", marks=needs_timm_1_0_31),
        "hf_vit",
        "hf_vit_msn",
        "hf_ijepa",
        "hf_deit_teacher",
        "hf_dinov2_reg_cls",
        "hf_beit",
        "hf_dinov2_swiglu",
        "tv",
    ],
)
def test_relevance_is_conserved_on_every_family(fid, tmp_path):
    import test_families as fam

    folders = {}
    for hid, config, cls_name, extra in [*fam.HF, ("hf_dinov2_swiglu", *SWIGLU)]:
        if hid == fid:
            folders[hid] = str(fam.save_hf(tmp_path, config, cls_name, extra))
    if fid == "tv":  # torchvision's VisionTransformer, small
        model = _tv_model(torch.float64)
        logits_fn, x = model, torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2)).double()
    else:
        timm = {
            "vit": ("vit_tiny_patch16_224", dict(img_size=48, depth=2)),
            "eva02": ("eva02_tiny_patch14_224", dict(img_size=56, depth=2, num_classes=5)),  # RoPE, SwiGLU MLP
        }
        vm = small_model(timm[fid][0], **timm[fid][1]) if fid in timm else fam.load(fid, folders)
        model, logits_fn = vm.model.double(), vm.logits
        x = vm.transform(random_image(2))[None].double()
    try:
        assert unsupported(model) == ""
        gap, scale = _conservation_gap(model, logits_fn, x, 1)
        print(f"attnlrp {fid}: conservation gap {gap:.2e} of |y| = {scale:.2e}")
        # The capture forms the attention and A·v in fp32 whatever the model's dtype (vizapp.attention), so the sum
        # is exact only to fp32 rounding there, which depends on the CPU's matrix kernels: torchvision's model gave
        # 3.0e-7 of |y| = 0.149 on one Xeon, under 1.5e-7 where CI ran before; a rule left out misses by orders of |y|.
        assert gap < 1e-5 * max(scale, 1e-3)
        # without the rules the same sum misses the score: the check can fail
        xg = x.clone().requires_grad_(True)
        srcs = [p for n, p in model.named_parameters() if n.endswith(_SOURCES)]
        y = logits_fn(xg)[0, 1]
        grads = torch.autograd.grad(y, [xg, *srcs], allow_unused=True)
        plain = sum(float((s * g).sum().detach()) for s, g in zip([xg, *srcs], grads, strict=True) if g is not None)
        assert abs(plain - float(y.detach())) > 1e3 * gap
    finally:
        model.float()


# -- through the front doors ------------------------------------------------------------------------------------------


def test_registry_batch_and_cleanliness(card_model):
    m = methods.get("attnlrp")
    assert m.needs_class and m.label == "AttnLRP (Achtibat et al., ICML 2024)" and m.batch is not None
    vm = vizapp.load_model(card_model, device="cpu")
    images = [random_image(s, (28, 28)) for s in (1, 2, 3)]
    before = all_hooks(vm.model)
    with torch.no_grad():
        clean = vm.logits(vm.transform(images[0])[None])
    batch = vizapp.explain(vm, images, ["attnlrp", "legrad", "rollout"], classes=[1, None, 2])
    assert batch["attnlrp"].shape == (3, *vm.grid_size) and all_hooks(vm.model) == before
    for i, img in enumerate(images):
        r = vizapp.analyze(vm, img)
        alone = r.explain("attnlrp", [1, None, 2][i])
        np.testing.assert_allclose(batch["attnlrp"][i], alone, rtol=1e-4, atol=1e-6 * np.abs(alone).max())
    with torch.no_grad():
        assert torch.equal(vm.logits(vm.transform(images[0])[None]), clean)  # the model is unchanged
    assert all(p.grad is None for p in vm.model.parameters())
    r = vizapp.analyze(vm, images[0])
    assert {"attnlrp", "legrad"} <= set(views.available_methods(r))
    cost = methods.cost(r, "attnlrp")
    assert cost is not None and "one forward and one backward" in cost.work and cost.seconds > 0
    assert float(np.abs(r.explain("attnlrp", 1)).max()) > 0


def test_models_without_rules_are_refused_in_one_sentence():
    # an attention-pooling head (MAP, as SigLIP's): a softmax outside the encoder
    vm = small_model("vit_base_patch16_siglip_224", img_size=32, depth=2, embed_dim=64, num_heads=4, num_classes=5)
    r = vizapp.analyze(vm, random_image(1))
    why = views.method_unavailable(r, "attnlrp")
    assert "pools by attention" in why and "attnlrp" not in views.available_methods(r)
    with pytest.raises(BadParameterError, match="AttnLRP is not defined for .*pools by attention"):
        r.explain("attnlrp", 0)
    with pytest.raises(BadParameterError, match="pools by attention"):
        vizapp.explain(vm, [random_image(1)], "attnlrp", classes=0)
    assert not views.method_unavailable(r, "legrad")  # LeGrad reads the score through the pooling
    # transformers' DINOv2 SwiGLU MLP is covered (its SiLU is a module, its product gets the uniform rule at
    # down_proj's input); with the activation a plain function no hook reaches it, and it is refused
    transformers = pytest.importorskip("transformers", reason="the hf extra is installed by requirements-dev.txt")
    config = transformers.Dinov2Config(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, image_size=32, patch_size=8, use_swiglu_ffn=True
    )
    model = transformers.Dinov2Model(config)
    assert unsupported(model) == ""
    mlp = model.encoder.layer[0].mlp
    del mlp.act_fn
    mlp.act_fn = F.silu
    assert "gated" in unsupported(model)


@pytest.mark.skipif(
    not Path(FASHION_MNIST_DIR, "t10k-images-idx3-ubyte.gz").exists(),
    reason="Debian dataset-fashion-mnist is not installed (make test installs it)",
)
def test_the_evaluation_runs_both_on_the_bundled_model(tmp_path):
    from vizapp.evaluate import main

    out = tmp_path / "out"
    args = ["fmnist-test", "--out", str(out), "--methods", "attnlrp,legrad", "--limit", "3", "--steps", "2"]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    for name in ("attnlrp", "legrad"):
        assert {"pred.positive", "pred.negative", "target.positive", "target.negative"} <= set(summary["methods"][name])
    md = (out / "summary.md").read_text()
    assert "| AttnLRP (input × LRP-modified gradient, signed); Achtibat et al., ICML 2024" in md
    assert "| LeGrad (each layer's score gradient on its attention, all layers); Bousselham et al., 2024" in md


def test_the_rules_touch_only_the_thread_that_runs_them():
    """A cached model serves several visitors: another thread's forward inside the rules' block keeps the model's true
    gradient (and LeGrad's isolation does not cut its graph)."""
    import threading

    from vizapp.analysis.legrad import isolated_blocks

    vm = small_model("vit_tiny_patch16_224", img_size=48, depth=2)
    x = vm.transform(random_image(3))[None]

    def input_gradient() -> torch.Tensor:
        xg = x.clone().requires_grad_(True)
        return torch.autograd.grad(vm.logits(xg)[0, 1], xg)[0]

    plain = input_gradient()
    with relevance_rules(vm.model):
        assert not torch.allclose(input_gradient(), plain)  # this thread: the rules apply
        seen: list[torch.Tensor] = []
        worker = threading.Thread(target=lambda: seen.append(input_gradient()))
        worker.start()
        worker.join()
    assert torch.equal(seen[0], plain)
    outputs: list = [None, None]
    with isolated_blocks(list(vm.model.blocks), outputs):
        worker = threading.Thread(target=lambda: seen.append(input_gradient()))
        worker.start()
        worker.join()
    assert torch.equal(seen[1], plain) and outputs == [None, None]
    assert all_hooks(vm.model) == 0
