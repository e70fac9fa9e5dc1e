"""AttnLRP (Achtibat et al., ICML 2024) on OpenCLIP's ViT towers, in both block flavours vizapp captures (torch's
nn.MultiheadAttention, OpenCLIP's own Attention): QuickGELU's identity rule by hand, conservation over every additive
source with every block option OpenCLIP offers, the same map as on a timm ViT given the same weights (timm's path is
checked against the rules written out in tests/test_attnlrp.py), prompts through the batch API, and the refusals.

Random-weight towers only, built small through OpenCLIP's own config overrides (offline: its tokenizer ships with it).
"""

from __future__ import annotations

import copy
import functools
from functools import partial

import numpy as np
import pytest
import torch
from conftest import all_hooks, random_image

import vizapp
from vizapp import methods, views
from vizapp.analysis.attnlrp import EPS, attnlrp, relevance_rules, unsupported
from vizapp.capture import AttentionCapture
from vizapp.errors import BadParameterError
from vizapp.models.openclip import image_embedding
from vizapp.models.prompts import prompt_logits, text_embeddings, with_prompts

open_clip = pytest.importorskip("open_clip", reason="open_clip_torch is installed by requirements.txt")

VISION = dict(image_size=32, layers=2, width=64, patch_size=8, head_width=16)
TEXT = dict(context_length=16, vocab_size=49408, width=32, heads=2, layers=1)
PROMPTS = ["a photo of a dog", "a photo of a cat", "a red car", "a bird"]
#: flavour -> (OpenCLIP architecture, vision_cfg options): torch's MHA blocks with GELU; OpenCLIP's own Attention
#: (custom blocks) with QuickGELU and layer scale; the custom blocks with every extra norm and scale they offer
FLAVOURS = {
    "mha": ("ViT-B-32", {}),
    "custom": ("ViT-B-32-quickgelu", dict(block_type="custom", ls_init_value=0.5)),
    "custom_all": (
        "ViT-B-32",
        dict(qk_norm=True, scale_heads=True, scale_attn_inner=True, scale_attn=True, scale_fc=True, ls_init_value=0.5),
    ),
    "avg_final_ln": ("ViT-B-32", dict(pool_type="avg", final_ln_after_pool=True)),
}


@functools.cache
def tower(flavour: str) -> vizapp.VizModel:
    """A tiny OpenCLIP model of ``flavour``, every parameter of its vision tower moved off OpenCLIP's start (biases
    at zero, LayerNorms the identity), so that each weight the timm copy maps counts. Made once per flavour (the
    model cache would hand the same object back to a second load)."""
    arch, options = FLAVOURS[flavour]
    torch.manual_seed(0)
    vm = vizapp.load_model(
        f"open_clip:{arch}",
        pretrained=False,
        device="cpu",
        embed_dim=32,
        vision_cfg=dict(VISION, **options),
        text_cfg=TEXT,
    )
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in vm.model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return vm


def inputs(vm: vizapp.VizModel, seeds=(1, 2)) -> torch.Tensor:
    return torch.stack([vm.transform(random_image(s)) for s in seeds])


# -- by hand ----------------------------------------------------------------------------------------------------------


def test_quick_gelu_gets_the_identity_rule_by_hand():
    """OpenCLIP's QuickGELU, x · σ(1.702 x): QuickGELU(2) = 2 σ(3.404) = 1.935659 and QuickGELU(-1) = -σ(-1.702) =
    -0.154204. The rule's backward is the ratio f(x) / x, 0.967829 and 0.154204, so x · gradient = f(x) (the
    relevance passes unchanged), where the true derivative at 2 would be 1.073815."""
    from open_clip.transformer import QuickGELU

    act = QuickGELU()
    x = torch.tensor([2.0, -1.0], dtype=torch.float64, requires_grad=True)
    with relevance_rules(act):
        y = act(x)
    (g,) = torch.autograd.grad(y.sum(), x)
    assert torch.allclose(y.detach(), torch.tensor([1.935659, -0.154204], dtype=torch.float64), atol=1e-6)
    assert torch.allclose(g, torch.tensor([0.967829, 0.154204], dtype=torch.float64), atol=1e-6)
    assert torch.allclose(g, y.detach() / (x.detach() + EPS)) and torch.allclose(x * g, y)
    (plain,) = torch.autograd.grad(act(x)[0], x)
    assert abs(float(plain[0]) - 1.073815) < 1e-6 and all_hooks(act) == 0


# -- conservation -----------------------------------------------------------------------------------------------------

#: the tower's additive sources: the input, every bias (LayerNorms', attention's, MLP's), the CLS and position rows
_SOURCES = ("bias", "class_embedding", "positional_embedding")


def _sum_of_relevance(model, x: torch.Tensor, k: int, rules: bool) -> tuple[float, float]:
    """(Σ source · ∂̃y/∂source over every additive source, y) for the k-th component y of the first image's embedding,
    with AttnLRP's rules (LayerNorm, activation, attention detached) or with the plain gradient."""
    sources = [p for n, p in model.named_parameters() if n.endswith(_SOURCES)]
    x = x.clone().requires_grad_(True)
    if rules:
        with torch.enable_grad(), relevance_rules(model), AttentionCapture(model, with_grad=True) as cap:
            y = image_embedding(model, x)[0, k]
        assert all(a is not None for a in cap.maps) and not cap.unexact_layers
        for a in cap.maps:
            a.register_hook(torch.zeros_like)
    else:
        y = image_embedding(model, x)[0, k]
    grads = torch.autograd.grad(y, [x, *sources], allow_unused=True)
    total = sum(float((s * g).sum().detach()) for s, g in zip([x, *sources], grads, strict=True) if g is not None)
    return total, float(y.detach())


@pytest.mark.parametrize("flavour", list(FLAVOURS))
def test_relevance_is_conserved_on_every_tower_flavour(flavour):
    """With the rules the embedding is linear in its additive sources jointly, so their relevance sums to it; a
    non-linearity left without its rule (or the plain gradient) breaks that."""
    vm = tower(flavour)
    assert unsupported(vm.model) == ""
    model = copy.deepcopy(vm.model).double()
    x = inputs(vm, (3,)).double()
    for k in (0, 5):
        total, y = _sum_of_relevance(model, x, k, rules=True)
        gap = abs(total - y)
        print(f"attnlrp open_clip {flavour} [{k}]: conservation gap {gap:.2e} of |y| = {abs(y):.2e}")
        assert abs(y) > 1e-3 and gap < 1e-6 * abs(y)  # as test_attnlrp.py (the capture forms A · v in fp32)
        plain, _ = _sum_of_relevance(model, x, k, rules=False)
        print(f"  plain gradient: gap {abs(plain - y):.2e}")
        assert abs(plain - y) > 1e3 * gap  # the check can fail
    assert all_hooks(model) == 0


# -- the same weights in timm -----------------------------------------------------------------------------------------


def timm_copy(visual: torch.nn.Module) -> torch.nn.Module:
    """A timm VisionTransformer (CLIP's layout: ``pre_norm``, a CLS token read by ``global_pool='token'``, no patch
    bias) holding the OpenCLIP tower's weights: in_proj -> qkv, out_proj -> proj, c_fc / c_proj -> fc1 / fc2,
    ln_pre / ln_1 / ln_2 / ln_post -> norm_pre / norm1 / norm2 / norm, and ``proj`` as a bias-free linear head."""
    from timm.layers import QuickGELU
    from timm.models.vision_transformer import VisionTransformer

    blocks = visual.transformer.resblocks
    first = blocks[0]
    quick = type(first.mlp.gelu).__name__ == "QuickGELU"
    ls = getattr(first.ls_1, "gamma", None)
    width, embed = visual.proj.shape
    model = VisionTransformer(
        img_size=visual.image_size,
        patch_size=visual.patch_size,
        embed_dim=width,
        depth=len(blocks),
        num_heads=first.attn.num_heads,
        mlp_ratio=first.mlp.c_fc.out_features / width,
        qkv_bias=True,
        init_values=1.0 if ls is not None else None,  # gamma copied below
        pre_norm=True,
        class_token=True,
        global_pool="token",
        num_classes=embed,
        norm_layer=partial(torch.nn.LayerNorm, eps=first.ln_1.eps),
        act_layer=QuickGELU if quick else torch.nn.GELU,
    ).eval()
    model.head = torch.nn.Linear(width, embed, bias=False)

    def put(dst: torch.nn.Module, src: torch.nn.Module) -> None:
        dst.weight.copy_(src.weight)
        if getattr(src, "bias", None) is not None:
            dst.bias.copy_(src.bias)

    with torch.no_grad():
        model.patch_embed.proj.weight.copy_(visual.conv1.weight)
        model.cls_token.copy_(visual.class_embedding.reshape(1, 1, -1))
        model.pos_embed.copy_(visual.positional_embedding[None])
        put(model.norm_pre, visual.ln_pre)
        put(model.norm, visual.ln_post)
        model.head.weight.copy_(visual.proj.T)
        for ours, theirs in zip(model.blocks, blocks, strict=True):
            ours.attn.qkv.weight.copy_(theirs.attn.in_proj_weight)
            ours.attn.qkv.bias.copy_(theirs.attn.in_proj_bias)
            put(ours.attn.proj, theirs.attn.out_proj)
            put(ours.norm1, theirs.ln_1)
            put(ours.norm2, theirs.ln_2)
            put(ours.mlp.fc1, theirs.mlp.c_fc)
            put(ours.mlp.fc2, theirs.mlp.c_proj)
            if ls is not None:
                ours.ls1.gamma.copy_(theirs.ls_1.gamma)
                ours.ls2.gamma.copy_(theirs.ls_2.gamma)
    return model


@pytest.mark.parametrize("flavour", ["mha", "custom"])
def test_equals_attnlrp_on_a_timm_vit_with_the_same_weights(flavour):
    """The prompt score exp(logit_scale) · cos(embedding, text_k) of the same text embeddings on both models: the
    OpenCLIP tower through vizapp's prompted model, the timm copy through the same readout."""
    vm = tower(flavour)
    block = vm.model.transformer.resblocks[0]
    kinds = (type(block.attn).__name__, type(block.mlp.gelu).__name__, type(block.ls_1).__name__)
    assert kinds == (
        ("MultiheadAttention", "GELU", "Identity") if flavour == "mha" else ("Attention", "QuickGELU", "LayerScale")
    )
    prompted = with_prompts(vm, PROMPTS)
    text = text_embeddings(vm.text_tower, PROMPTS)
    ref = timm_copy(vm.model)
    x = inputs(vm)
    with torch.no_grad():
        torch.testing.assert_close(ref(x), vm.model(x), atol=1e-5, rtol=1e-5)

    def timm_scores(t: torch.Tensor) -> torch.Tensor:
        return prompt_logits(vm.text_tower, ref(t), text)

    cls = [2, 1]
    found, used = attnlrp(vm.model, prompted.logits, x, cls, vm.grid_size, vm.patch_size)
    want, _ = attnlrp(ref, timm_scores, x, cls, vm.grid_size, vm.patch_size)
    diff, scale = float((found - want).abs().max()), float(want.abs().max())
    print(f"attnlrp open_clip {flavour}: max abs diff vs timm {diff:.2e} (map scale {scale:.2e})")
    assert used == cls and scale > 1e-3 and diff < 1e-5 * scale
    assert all_hooks(vm.model) == 0 and all_hooks(ref) == 0
    # the rules change the map on this tower: the plain input × gradient is another one
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(prompted.logits(xg)[torch.arange(2), torch.tensor(cls)].sum(), xg)
    plain = (xg * g).detach().sum(1).reshape(2, 4, 8, 4, 8).sum((2, 4))
    assert float((plain - want).abs().max()) > 100 * diff


# -- through the front doors ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flavour", ["mha", "custom"])
def test_the_batch_api_equals_each_image_alone_with_prompts(flavour):
    vm = tower(flavour)
    images = [random_image(s, (40, 48)) for s in (4, 5, 6)]
    classes = [2, None, "a photo of a dog"]
    before = all_hooks(vm.model)
    with torch.no_grad():
        clean = vm.logits(inputs(vm))
    batch = vizapp.explain(vm, images, ["attnlrp", "rollout"], classes=classes, prompts=PROMPTS)
    assert batch["attnlrp"].shape == (3, 4, 4) and all_hooks(vm.model) == before
    for i, (img, c) in enumerate(zip(images, classes, strict=True)):
        r = vizapp.analyze(vm, img, prompts=PROMPTS)
        assert methods.unavailable(r, "attnlrp") == "" and "attnlrp" in views.available_methods(r)
        alone = r.explain("attnlrp", c)
        assert alone.shape == (4, 4) and float(np.abs(alone).max()) > 0
        np.testing.assert_allclose(batch["attnlrp"][i], alone, rtol=1e-4, atol=1e-6 * np.abs(alone).max())
    with torch.no_grad():
        assert torch.equal(vm.logits(inputs(vm)), clean)  # the model is unchanged
    assert all(p.grad is None for p in vm.model.parameters())


# -- refusals ---------------------------------------------------------------------------------------------------------


def test_coca_and_towers_with_other_modules_are_refused_in_one_sentence():
    from test_coca import PROMPTS as COCA_PROMPTS
    from test_coca import coca

    vm = coca()  # CoCa's tower pools through its AttentionalPooler: a softmax outside the encoder
    r = vizapp.analyze(vm, random_image(1), prompts=COCA_PROMPTS)
    why = views.method_unavailable(r, "attnlrp")
    assert "pools by attention (AttentionalPooler)" in why and "attnlrp" not in views.available_methods(r)
    assert why.count(". ") == 0 and "OpenCLIP ViT towers without an attentional pooler" in why
    with pytest.raises(BadParameterError, match=r"AttnLRP is not defined for open_clip:coca_ViT-B-32: its head pools"):
        r.explain("attnlrp", 0)
    with pytest.raises(BadParameterError, match="pools by attention"):
        vizapp.explain(vm, [random_image(1)], "attnlrp", classes=0, prompts=COCA_PROMPTS)
    assert not views.method_unavailable(r, "legrad")  # LeGrad reads the score through the pooler
    # an activation no rule is written for, in an otherwise covered tower
    visual = copy.deepcopy(tower("mha").model)
    visual.transformer.resblocks[1].mlp.gelu = torch.nn.Softplus()
    assert unsupported(visual) == (
        "transformer.resblocks.1.mlp.gelu is Softplus, for which vizapp's AttnLRP has no rule"
    )
