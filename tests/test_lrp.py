"""Transformer Attribution (Chefer, Gur & Wolf, CVPR 2021): each LRP rule by hand, the whole map against a slower
reference written the authors' way (each rule as X · ∂Z/∂X · R/Z through autograd, a forward through timm's own
submodules, the rollout as their matrix product), and the method through the API, the batch API and the evaluation."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vizapp
from tests.conftest import random_image, small_model
from vizapp.analysis import lrp
from vizapp.bundled.data import FASHION_MNIST_DIR
from vizapp.errors import BadParameterError

TINY = ("vit_tiny_patch16_224", dict(img_size=64, depth=2))


# -- each rule by hand -----------------------------------------------------------------------------------------------


def test_safe_divide_is_the_authors():
    a = torch.tensor([1.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    b = torch.tensor([2.0, 0.0, -1e-9, -4.0], dtype=torch.float64)
    # a / (b + 1e-9) whatever b's sign; 0 where b == 0; b == -eps divides by eps instead of 0
    expected = [1 / (2 + 1e-9), 0.0, 0.0 + 1 / 1e-9, 1 / (-4 + 1e-9)]
    np.testing.assert_allclose(lrp.safe_divide(a, b).numpy(), expected, rtol=1e-15)
    # broadcast against a larger a, in a's precision, bit for bit the authors' three lines
    a2 = torch.tensor([[1.0, -3.0, 2.0, 5.0], [0.5, 7.0, -1.0, 0.0]], dtype=torch.float32)
    b32 = b.float()[None]
    den = b32.clamp(min=1e-9) + b32.clamp(max=1e-9)
    den = den + den.eq(0).type(den.type()) * 1e-9
    authors = a2 / den * b32.ne(0).type(b32.type())
    found = lrp.safe_divide(a2, b32)
    assert found.dtype == torch.float32 and found.shape == (2, 4)
    np.testing.assert_array_equal(found.numpy(), authors.numpy())


def test_linear_zplus_2x2_by_hand_conserves():
    # x = [1, -2], W = [[2, -1], [1, 3]]: output 0 gets contributions 1·2 = 2 and (-2)(-1) = 2 (both positive, Z0 = 4);
    # output 1 gets 1·1 = 1 and (-2)·3 = -6 (negative, left out: Z1 = 1). With R = [1, 2]:
    # R_x0 = 2/4·1 + 1/1·2 = 2.5, R_x1 = 2/4·1 + 0 = 0.5; the bias never enters.
    x = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    w = torch.tensor([[2.0, -1.0], [1.0, 3.0]], dtype=torch.float64)
    r = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    out = lrp.linear_relprop(x, w, r, eps=0.0)
    assert out.tolist() == [[2.5, 0.5]]
    assert out.sum().item() == r.sum().item() == 3.0
    np.testing.assert_allclose(lrp.linear_relprop(x, w, r).numpy(), [[2.5, 0.5]], rtol=1e-8)  # the authors' eps
    # alpha=1, beta=0 means x's sign picks the weights' sign: flip x and the same contributions come from -W's part
    np.testing.assert_allclose(lrp.linear_relprop(-x, -w, r, eps=0.0).numpy(), [[2.5, 0.5]])


def test_add_rule_by_hand_rescales_and_conserves():
    # a = [1, 2], b = [3, -4], z = [4, -2], R = [2, 1]: R/z = [0.5, -0.5]; a·R/z = [0.5, -1] (sum -0.5),
    # b·R/z = [1.5, 2] (sum 3.5). Shares |−0.5| : |3.5| = 1 : 7 of ΣR = 3 -> 0.375 and 2.625; each part is rescaled
    # to its share: a's by 0.375 / -0.5 = -0.75 -> [-0.375, 0.75], b's by 2.625 / 3.5 = 0.75 -> [1.125, 1.5].
    a = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    b = torch.tensor([[3.0, -4.0]], dtype=torch.float64)
    r = torch.tensor([[2.0, 1.0]], dtype=torch.float64)
    ra, rb = lrp.add_relprop(a, b, r, eps=0.0)
    assert ra.tolist() == [[-0.375, 0.75]] and rb.tolist() == [[1.125, 1.5]]
    assert ra.sum().item() + rb.sum().item() == 3.0
    # per image of a batch: a second image with other numbers leaves the first one's split unchanged
    ra2, rb2 = lrp.add_relprop(torch.cat([a, 5 * b]), torch.cat([b, a]), torch.cat([r, -r]), eps=0.0)
    assert ra2[0].tolist() == [-0.375, 0.75] and rb2[0].tolist() == [1.125, 1.5]
    assert (ra2[1].sum() + rb2[1].sum()).item() == pytest.approx(-3.0, abs=1e-12)


def test_matmul_and_clone_rules_by_hand():
    # [1, 2] @ [3, 4]ᵀ = 11 with R = 22 (R/z = 2): R_a = [1·3·2, 2·4·2] = [6, 16], R_b = [3·1·2, 4·2·2] = [6, 16];
    # each operand carries the whole relevance (the attention halves them)
    a = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    b = torch.tensor([[3.0], [4.0]], dtype=torch.float64)
    ra, rb = lrp.matmul_relprop(a, b, torch.tensor([[22.0]], dtype=torch.float64), eps=0.0)
    assert ra.tolist() == [[6.0, 16.0]] and rb.tolist() == [[6.0], [16.0]]
    # the residual fork sums its two relevances, and x == 0 gets none
    x = torch.tensor([2.0, 0.0], dtype=torch.float64)
    out = lrp.clone_relprop(x, (torch.tensor([1.0, 1.0]).double(), torch.tensor([3.0, 5.0]).double()), eps=0.0)
    assert out.tolist() == [4.0, 0.0]


@torch.no_grad()
def test_relevance_is_conserved_through_every_block():
    vm = small_model(TINY[0], **TINY[1])
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    net = lrp._net(lrp._copy_in(vm.model, torch.float64))
    _, records, (pooled, tokens) = lrp._forward(net, x.double())
    one_hot = F.one_hot(torch.tensor([0, 3]), net.head.out_features).double()
    r_pooled = lrp.linear_relprop(pooled, net.head.weight, one_hot)
    np.testing.assert_allclose(r_pooled.sum(-1).numpy(), [1.0, 1.0], rtol=1e-7)
    r = torch.zeros_like(tokens)
    r[:, 0] = r_pooled
    for layer in (1, 0):
        r, cam = lrp._block_relprop(net.blocks[layer], records[layer], r, lrp.EPS)
        np.testing.assert_allclose(r.sum(dim=(1, 2)).numpy(), [1.0, 1.0], rtol=1e-6)
        # the attention's share of the relevance reaching this block is halved at A v: R_A sums to half of it
        assert cam.shape == (2, 3, 17, 17)


# -- the whole map against the authors' way of computing it --------------------------------------------------------


def _ref_safe_divide(a, b):
    den = b.clamp(min=1e-9) + b.clamp(max=1e-9)
    den = den + den.eq(0).type(den.type()) * 1e-9
    return a / den * b.ne(0).type(b.type())


def _gradprop(fn, inputs, relevance):
    """Their RelPropSimple: Z = fn(X); S = R / Z; C = ∂(Z·S)/∂X by autograd; R_X = X · C, per input."""
    xs = [t.detach().requires_grad_(True) for t in inputs]
    with torch.enable_grad():
        z = fn(*xs)
        cs = torch.autograd.grad(z, xs, _ref_safe_divide(relevance, z))
    return [xi.detach() * c for xi, c in zip(xs, cs, strict=True)]


def _ref_linear(x, weight, relevance):
    """Their Linear.relprop with alpha=1 (beta=0): the activator term, through autograd."""
    pw, nw = weight.clamp(min=0), weight.clamp(max=0)
    px, nx = x.clamp(min=0).requires_grad_(True), x.clamp(max=0).requires_grad_(True)
    with torch.enable_grad():
        z1, z2 = F.linear(px, pw), F.linear(nx, nw)
        s = _ref_safe_divide(relevance, z1 + z2)
        c1 = px * torch.autograd.grad(z1, px, s)[0]
        c2 = nx * torch.autograd.grad(z2, nx, s)[0]
    return (c1 + c2).detach()


def _ref_add(a, b, relevance):
    ra, rb = _gradprop(torch.add, [a, b], relevance)
    sa, sb = ra.sum(), rb.sum()  # whole-tensor sums, as theirs (batch of one)
    fa = _ref_safe_divide(sa.abs(), sa.abs() + sb.abs()) * relevance.sum()
    fb = _ref_safe_divide(sb.abs(), sa.abs() + sb.abs()) * relevance.sum()
    return ra * _ref_safe_divide(fa, ra.sum()), rb * _ref_safe_divide(fb, rb.sum())


def _ref_clone(x, relevances):
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        zs = [x * 1.0 for _ in relevances]
        c = torch.autograd.grad(zs, x, [_ref_safe_divide(r, z) for r, z in zip(relevances, zs, strict=True)])[0]
    return x.detach() * c


def reference_map(
    model: torch.nn.Module, x: torch.Tensor, cls: int, start_layer: int = 1, prompt: tuple | None = None
) -> torch.Tensor:
    """One image's map computed the authors' way, written out: a float64 copy of the model run through timm's own
    submodules, explicit per-layer loops, autograd for every rule, and the rollout as a product of full matrices.
    ``prompt`` = (P [E, D], T [K, E] unit rows, scale): the head is the prompt score scale · cos(cls Pᵀ, T_k) in
    place of the model's own, and relevance crosses its dot product with T, then P, by their Linear rule."""
    m = copy.deepcopy(model).double().eval()
    h = m.blocks[0].attn.num_heads
    with torch.enable_grad():
        t = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x.double())))).detach()
        saved, attns = [], []
        for blk in m.blocks:
            b_, n, _ = t.shape
            n1 = blk.norm1(t)
            q, k, v = blk.attn.qkv(n1).reshape(b_, n, 3, h, -1).permute(2, 0, 3, 1, 4).unbind(0)
            a = torch.einsum("bhid,bhjd->bhij", q, k) * blk.attn.scale
            a = a.softmax(dim=-1)
            a.retain_grad()
            o = torch.einsum("bhij,bhjd->bhid", a, v).transpose(1, 2).reshape(b_, n, -1)
            br1 = blk.ls1(blk.attn.proj(o))
            mid = t + br1
            n2 = blk.norm2(mid)
            hid = blk.mlp.act(blk.mlp.fc1(n2))
            br2 = blk.ls2(blk.mlp.fc2(hid))
            saved.append(dict(x=t, n1=n1, q=q, k=k, v=v, a=a, o=o, br1=br1, mid=mid, n2=n2, hid=hid, br2=br2))
            attns.append(a)
            t = mid + br2
        tokens = m.norm(t)
        if prompt is None:
            logits = m.head(tokens[:, 0])
            torch.testing.assert_close(logits.float(), model(x), rtol=1e-4, atol=1e-5)  # the copy is the model
        else:
            p_, t_, scale = (prompt[0].double(), prompt[1].double(), prompt[2])
            emb = tokens[:, 0] @ p_.T
            logits = scale * (emb / emb.norm(dim=-1, keepdim=True)) @ t_.T
        logits[0, cls].backward()
    grads = [a.grad for a in attns]
    saved = [{k_: v_.detach() for k_, v_ in s.items()} for s in saved]
    tokens = tokens.detach()

    one_hot = torch.zeros(1, logits.shape[-1], dtype=torch.float64)
    one_hot[0, cls] = 1.0
    if prompt is None:
        r = _ref_linear(tokens[:, 0], m.head.weight.detach(), one_hot)
    else:
        r = _ref_linear(tokens[:, 0] @ p_.T, t_, one_hot)  # the dot product with each prompt's text embedding
        r = _ref_linear(tokens[:, 0], p_, r)  # the projection
    r = _gradprop(lambda z: z[:, 0], [tokens], r)[0]  # their IndexSelect
    cams = {}
    for layer in range(len(m.blocks) - 1, -1, -1):
        blk, s = m.blocks[layer], saved[layer]
        b_, _, n, d = s["q"].shape
        r_mid, r_mlp = _ref_add(s["mid"], s["br2"], r)
        r_hid = _ref_linear(s["hid"], blk.mlp.fc2.weight.detach(), r_mlp)
        r_n2 = _ref_linear(s["n2"], blk.mlp.fc1.weight.detach(), r_hid)
        r = _ref_clone(s["mid"], [r_mid, r_n2])
        r_x, r_attn = _ref_add(s["x"], s["br1"], r)
        r_o = _ref_linear(s["o"], blk.attn.proj.weight.detach(), r_attn)
        r_o = r_o.reshape(b_, n, h, d).transpose(1, 2)
        cam, r_v = _gradprop(lambda a, v: torch.einsum("bhij,bhjd->bhid", a, v), [s["a"], s["v"]], r_o)
        cam, r_v = cam / 2, r_v / 2
        cams[layer] = cam
        r_q, r_k = _gradprop(lambda q, k: torch.einsum("bhid,bhjd->bhij", q, k), [s["q"], s["k"]], cam)
        r_qkv = torch.stack([r_q / 2, r_k / 2, r_v]).permute(1, 3, 0, 2, 4).reshape(b_, n, -1)
        r_n1 = _ref_linear(s["n1"], blk.attn.qkv.weight.detach(), r_qkv)
        r = _ref_clone(s["x"], [r_x, r_n1])

    # their "transformer_attribution" branch and compute_rollout_attention of ViT_LRP.py (no renormalisation)
    mats = []
    for layer in range(len(m.blocks)):
        c = (grads[layer][0] * cams[layer][0]).clamp(min=0).mean(dim=0)
        mats.append(c[None] + torch.eye(c.shape[-1], dtype=c.dtype)[None])
    joint = mats[start_layer]
    for layer in range(start_layer + 1, len(mats)):
        joint = mats[layer].bmm(joint)
    return joint[0, 0]  # the CLS row over every token


@pytest.mark.parametrize("start_layer", [0, 1])
def test_the_map_equals_the_authors_way_written_out(start_layer):
    vm = small_model("vit_tiny_patch16_224", img_size=64, depth=3)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    classes = [0, 3]
    got = lrp.transformer_attribution(vm.model, x, 1, classes, (4, 4), start_layer=start_layer)
    for b, c in enumerate(classes):
        ref = reference_map(vm.model, x[b : b + 1], c, start_layer)
        assert ref[0].item() > 1.0  # the CLS row of I + Ā: a map that lost the identity would fail here
        torch.testing.assert_close(got[b].double(), ref[1:].reshape(4, 4), rtol=1e-5, atol=1e-12)


def test_the_blocks_below_the_start_layer_are_neither_propagated_nor_differentiated():
    # from start_layer 2 of 4: R_A and ∂y/∂A of blocks 2 and 3 are those of the whole pass, exactly; below, None
    # (the backward stops at block 2's attention, the relevance pass at its R_A, and blocks 0-1 keep no graph)
    vm = small_model("vit_tiny_patch16_224", img_size=64, depth=4)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    whole_cams, whole_grads = lrp.attention_relevance(vm.model, x, [1, 4], 0, gradients=True)
    cams, grads = lrp.attention_relevance(vm.model, x, [1, 4], 2, gradients=True)
    assert cams[:2] == [None, None] and grads[:2] == [None, None]
    for layer in (2, 3):
        torch.testing.assert_close(cams[layer], whole_cams[layer], rtol=0, atol=0)
        torch.testing.assert_close(grads[layer], whole_grads[layer], rtol=0, atol=0)
        assert grads[layer].abs().sum() > 0 and cams[layer].abs().sum() > 0


def test_registers_and_layer_scale_follow_the_same_rules():
    # CLS + 4 registers, LayerScale, no class-token position row; the patches start after the registers
    vm = small_model("vit_small_patch14_reg4_dinov2", img_size=56, depth=2, num_classes=10)
    with torch.no_grad():
        for blk in vm.model.blocks:
            blk.ls1.gamma.fill_(0.7), blk.ls2.gamma.fill_(1.3)
    x = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(2))
    got = lrp.transformer_attribution(vm.model, x, 5, 4, (4, 4), start_layer=0)
    ref = reference_map(vm.model, x, 4, start_layer=0)
    torch.testing.assert_close(got[0].double(), ref[5:].reshape(4, 4), rtol=1e-5, atol=1e-12)


# -- properties -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_maps_are_finite_non_negative_and_class_specific(seed):
    vm = small_model(*TINY[:1], **TINY[1])
    r = vizapp.analyze(vm, random_image(seed))
    a, b = r.explain("transformer_attribution", 0), r.explain("transformer_attribution", 3)
    for m in (a, b):
        assert m.shape == r.grid_size == (4, 4) and m.dtype == np.float32
        assert np.isfinite(m).all() and (m >= 0).all() and m.max() > 0
    assert not np.allclose(a, b, rtol=1e-3, atol=0)


def test_float64_and_float32_agree_where_float32_is_well_conditioned():
    vm = small_model(*TINY[:1], **TINY[1])
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    f64 = lrp.transformer_attribution(vm.model, x, 1, [1, 2], (4, 4))
    f32 = lrp.transformer_attribution(vm.model, x, 1, [1, 2], (4, 4), dtype=torch.float32)
    # within 1 % of the map's largest value: float32's rounding differs with the CPU's vector units and thread count
    # (0.37 % of the largest value at one element on this 2-core machine; CI's passed at 0.1 %), while a wrong
    # rule moves the map by far more
    torch.testing.assert_close(f32, f64, rtol=1e-2, atol=1e-2 * f64.abs().max().item())


def test_the_analysis_gradient_and_the_float64_gradient_give_one_map():
    # the registry path pairs the float64 relevance with the analysis's own float32 ∂y/∂A (one backward, shared by a
    # batch); the function alone takes ∂y/∂A from its float64 forward
    vm = small_model(*TINY[:1], **TINY[1])
    r = vizapp.analyze(vm, random_image(4))
    alone = lrp.transformer_attribution(vm.model, r.input, 1, 5, r.grid_size)[0].numpy()
    np.testing.assert_allclose(r.transformer_attribution(5), alone, rtol=1e-4, atol=1e-6 * alone.max())
    assert r.transformer_attribution(5, start_layer=0).shape == (4, 4)


def test_other_layouts_are_refused_saying_what_is_supported(image):
    for name, kwargs in (
        ("deit_tiny_distilled_patch16_224", dict(img_size=64, depth=2)),
        ("vit_little_patch16_reg4_gap_256", dict(img_size=64, depth=2)),
    ):
        vm = small_model(name, **kwargs)
        r = vizapp.analyze(vm, image)
        why = vizapp.methods.unavailable(r, "transformer_attribution")
        assert why
        with pytest.raises(BadParameterError, match="whose head is one linear layer on the CLS token: timm"):
            r.explain("transformer_attribution", 0)
        with pytest.raises(ValueError, match="not defined for this model"):
            lrp.transformer_attribution(vm.model, r.input, vm.num_prefix_tokens, 0, vm.grid_size)
    vm = small_model(*TINY[:1], **TINY[1])
    assert vizapp.methods.unavailable(vizapp.analyze(vm, image), "transformer_attribution") == ""
    with pytest.raises(ValueError, match="start_layer"):
        lrp.transformer_attribution(vm.model, torch.zeros(1, 3, 64, 64), 1, 0, (4, 4), start_layer=2)


# -- through the front doors ------------------------------------------------------------------------------------------


def test_registry_and_batch_api(card_model):
    m = vizapp.methods.get("transformer_attribution")
    assert m.needs_class and m.label == "Transformer Attribution (Chefer et al., CVPR 2021)"
    vm = vizapp.load_model(card_model)
    imgs = [random_image(i) for i in range(3)]
    maps = vizapp.explain(vm, imgs, "transformer_attribution", [1, 2, 3])
    assert maps.shape == (3, *vm.grid_size)
    for b, img in enumerate(imgs):
        alone = vizapp.analyze(vm, img).explain("transformer_attribution", b + 1)
        np.testing.assert_allclose(maps[b], alone, rtol=1e-5, atol=1e-7)


@pytest.mark.skipif(
    not Path(FASHION_MNIST_DIR, "t10k-images-idx3-ubyte.gz").exists(),
    reason="Debian dataset-fashion-mnist is not installed (make test installs it)",
)
def test_the_evaluation_runs_it_on_the_bundled_model(tmp_path):
    from vizapp.evaluate import main

    out = tmp_path / "out"
    args = ["fmnist-test", "--out", str(out), "--methods", "transformer_attribution", "--limit", "4", "--steps", "2"]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    scores = summary["methods"]["transformer_attribution"]
    assert {"pred.positive", "pred.negative", "target.positive", "target.negative"} <= set(scores)
    md = (out / "summary.md").read_text()
    assert "| Transformer Attribution (LRP × gradient, rolled out from layer 1); Chefer, Gur & Wolf, CVPR 2021" in md
