"""LeGrad and the logit lens through an attention-pooling head (MAP, as SigLIP's): timm ViTs with
``global_pool="map"`` and transformers SigLIP with prompts. The readout against each library's own forward, LeGrad
against the authors' definition for such models written out here (the gradient on the pooling head's attention,
reached through each library's own modules and hooks), and a case computed by hand."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import random_image, small_model

import vizapp
from vizapp import methods, views
from vizapp.analysis.legrad import legrad_pooled
from vizapp.errors import BadParameterError
from vizapp.models.pooling import PooledReadout
from vizapp.models.prompts import with_prompts

SIGLIP = "vit_base_patch16_siglip_224"
MAP = dict(img_size=64, depth=3, embed_dim=64, num_heads=4, num_classes=5)
TIMM = {
    "siglip": (SIGLIP, MAP),  # no prefix token, the head reads the patches
    "cls_in_pool": (SIGLIP, dict(MAP, class_token=True, pool_include_prefix=True)),  # the CLS token read too
    "cls_reg_out": (SIGLIP, dict(MAP, class_token=True, reg_tokens=2)),  # prefix tokens left out of the pooling
    "naflex": ("naflexvit_base_patch16_map", dict(MAP, depth=2)),  # NaFlexVit's own pooling path
    "pe_core": ("vit_pe_core_tiny_patch16_384", dict(img_size=64, depth=2, num_classes=5)),  # Eva: RoPE, CLS read
}


def timm_map(fid: str):
    name, kwargs = TIMM[fid]
    return small_model(name, **kwargs)


def block_outputs(blocks, run) -> list[torch.Tensor]:
    """Every block's output during ``run()``, from forward hooks of the test's own."""
    outs: list[torch.Tensor] = []
    handles = [
        b.register_forward_hook(lambda m, a, out: outs.append(out[0] if isinstance(out, tuple) else out))
        for b in blocks
    ]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return outs


def finish(grads: list[torch.Tensor], key_prefix: int, grid: tuple[int, int]) -> torch.Tensor:
    """The authors' steps after the gradients: ReLU, mean over heads, mean over the (learned) query rows, the patch
    columns, summed over layers, min-max scaled per image."""
    total = sum(torch.relu(g).mean(dim=1).mean(dim=1)[:, key_prefix:] for g in grads)
    return torch.stack([(e - e.min()) / (e.max() - e.min()) for e in total]).reshape(-1, *grid).detach()


def attention_gradient(out_grad: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """∂s/∂A from the gradient on the attention's output before the output projection, [B, Q, C], and the values
    [B, M, C]: A v per head is linear in A, so ∂s/∂A[h, q, m] = ⟨∂s/∂(A v)[h, q], v[h, m]⟩ -> [B, H, Q, M]."""
    b, q, c = out_grad.shape
    g = out_grad.reshape(b, q, heads, c // heads).transpose(1, 2)
    vv = v.reshape(b, v.shape[1], heads, c // heads).transpose(1, 2)
    return g @ vv.transpose(-2, -1)


# -- timm: global_pool="map" ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("fid", list(TIMM))
def test_timm_readout_of_the_last_block_is_the_models_output(fid):
    vm = timm_map(fid)
    assert isinstance(vm.lens_fn, PooledReadout)
    x = torch.stack([vm.transform(random_image(s)) for s in (1, 2)])
    with torch.no_grad():
        outs = block_outputs(vm.model.blocks, lambda: vm.model(x))
        logits, attn = vm.lens_fn.with_attention(outs[-1])
        own = vm.model(x)
    assert float((logits - own).abs().max()) < 1e-5
    p = vm.num_prefix_tokens if getattr(vm.model, "pool_include_prefix", True) else 0  # the tokens the head reads
    gh, gw = vm.grid_for(*x.shape[-2:])
    assert attn.shape == (2, vm.model.attn_pool.num_heads, 1, p + gh * gw) and vm.lens_fn.key_prefix == p
    torch.testing.assert_close(attn.sum(dim=-1), torch.ones(attn.shape[:3]))
    r = vizapp.analyze(vm, random_image(1))
    np.testing.assert_allclose(r.lens_probs[-1], r.probs, atol=1e-6)  # the logit lens view's last layer


def timm_reference(vm, x: torch.Tensor, cls: list[int]) -> torch.Tensor:
    """Per layer: the block's output (a hook) through timm's own norm and forward_head (fused attention as timm runs
    it); ∂s_l/∂A^pool_l from autograd's gradient on the pooling head's proj input and its kv output (hooks)."""
    ref = copy.deepcopy(vm.model)
    pool = ref.attn_pool
    seen: dict[str, torch.Tensor] = {}
    pool.proj.register_forward_hook(lambda m, a, out: seen.__setitem__("mixed", a[0]))
    pool.kv.register_forward_hook(lambda m, a, out: seen.__setitem__("kv", out))
    outs = block_outputs(ref.blocks, lambda: ref(x))
    grads = []
    for z in outs:
        s = ref.forward_head(ref.norm(z.detach()))
        score = s[torch.arange(x.shape[0]), torch.tensor(cls)].sum()
        v = seen["kv"].chunk(2, dim=-1)[1]  # [B, M, C]: kv's output is k then v, each over all heads
        (g,) = torch.autograd.grad(score, seen["mixed"])
        grads.append(attention_gradient(g, v, pool.num_heads))
    return finish(grads, vm.lens_fn.key_prefix, vm.grid_for(*x.shape[-2:]))


@pytest.mark.parametrize("fid", list(TIMM))
def test_timm_legrad_equals_the_authors_definition(fid):
    vm = timm_map(fid)
    x = torch.stack([vm.transform(random_image(s)) for s in (1, 2)])
    cls = [3, 1]
    found, used = legrad_pooled(vm.model, vm.logits, vm.lens_fn, x, cls, vm.grid_for(*x.shape[-2:]))
    ref = timm_reference(vm, x, cls)
    diff = float((found - ref).abs().max())
    print(f"legrad_pooled {fid}: max abs diff vs the hooked reference {diff:.2e}")
    assert used == cls and diff < 1e-5
    assert float(found.std()) > 0.05  # a map, not a constant
    # through the registry: the same map, and one image's map equals its row of the batch
    r = vizapp.analyze(vm, random_image(2))
    np.testing.assert_allclose(r.explain("legrad", 1), found[1].numpy(), atol=1e-6)
    batch = vizapp.explain(vm, [random_image(1), random_image(2)], "legrad", classes=cls)
    np.testing.assert_allclose(np.asarray(batch)[0], found[0].numpy(), atol=1e-6)
    assert "legrad" in views.available_methods(r)


def test_the_self_attention_gradient_would_give_another_map():
    """The pooled path is taken: the block self-attention variant (vizapp.analysis.legrad.legrad) differs here."""
    from vizapp.analysis.legrad import legrad

    vm = timm_map("siglip")
    x = vm.transform(random_image(3))[None]
    pooled, _ = legrad_pooled(vm.model, vm.logits, vm.lens_fn, x, [2], vm.grid_size)
    own, _ = legrad(vm.model, vm.logits, vm.lens_fn, x, [2], vm.num_prefix_tokens, vm.grid_size)
    r = vizapp.analyze(vm, random_image(3))
    np.testing.assert_allclose(r.explain("legrad", 2), pooled[0].numpy(), atol=1e-6)
    assert float((pooled - own).abs().max()) > 0.1


def test_by_hand_a_pooling_that_averages_the_tokens_themselves():
    """A readout written here: one head, one query, A = softmax(tokens · u), pooled = A · tokens, the score of class c
    the pooled feature c. So s = Σ_m A_m z_mc, ∂s/∂A_m = z_mc, and the map is minmax over the patches of
    Σ_l ReLU(z_l[m, c]), from each block's output z_l."""
    vm = timm_map("cls_reg_out")  # 3 prefix tokens, all read by this pooling
    d = vm.model.embed_dim
    u = torch.linspace(-1, 1, d)

    def pool(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = torch.softmax(t @ u, dim=-1)[:, None, None, :]  # [B, 1, 1, N]
        return (a[:, 0] @ t)[:, 0], a

    readout = PooledReadout(norm=lambda t: t, pool=pool, after=lambda f: f, key_prefix=vm.num_prefix_tokens)
    x = torch.stack([vm.transform(random_image(s)) for s in (4, 5)])
    cls = [7, 30]
    found, _ = legrad_pooled(vm.model, vm.logits, readout, x, cls, vm.grid_size, start_layer=1)
    with torch.no_grad():
        outs = block_outputs(vm.model.blocks, lambda: vm.model(x))
    for i, c in enumerate(cls):
        e = sum(torch.relu(z[i, vm.num_prefix_tokens :, c]) for z in outs[1:])
        expected = (e - e.min()) / (e.max() - e.min())
        torch.testing.assert_close(found[i].flatten(), expected, atol=1e-6, rtol=0)


def test_values_alike_at_every_token_prefer_no_patch():
    """With the pooling head's values equal at every token (the v part of kv: no weight, a bias), ∂s/∂A[h, q, m] =
    ⟨∂s/∂(A v), v⟩ is the same for every m: every layer's row is constant and the map is zero everywhere."""
    vm = timm_map("siglip")
    with torch.no_grad():
        c = vm.model.embed_dim
        vm.model.attn_pool.kv.weight[c:] = 0
        vm.model.attn_pool.kv.bias[c:] = torch.linspace(-1, 1, c)
    x = vm.transform(random_image(6))[None]
    found, _ = legrad_pooled(vm.model, vm.logits, vm.lens_fn, x, [0], vm.grid_size)
    assert torch.equal(found, torch.zeros_like(found))


# -- transformers SigLIP: the vision tower's pooling head, and prompts ----------------------------------------------

transformers = pytest.importorskip("transformers", reason="the hf extra is installed by requirements-dev.txt")


@pytest.fixture(scope="module")
def siglip(tmp_path_factory):
    from test_prompts import save_whole

    folder = tmp_path_factory.mktemp("siglip")
    whole = save_whole(folder, "siglip")
    return str(folder), whole


PROMPTS = ["a photo of a dog", "a cat", "a red car"]


def text_embeddings(folder: str, whole, prompts: list[str]) -> torch.Tensor:
    """The prompts' unit text embeddings by the folder's own tokenizer and transformers' text tower."""
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    inputs = tok(prompts, return_tensors="pt", padding="max_length", max_length=64, truncation=True)
    with torch.no_grad():
        t = whole.get_text_features(**inputs)
    t = getattr(t, "pooler_output", t)
    return t / t.norm(dim=-1, keepdim=True)


def test_siglip_readout_of_the_last_block_is_the_models_output(siglip):
    folder, whole = siglip
    vm = vizapp.load_model(folder, device="cpu")
    x = vm.transform(random_image(1))[None]
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    inputs = tok(PROMPTS, return_tensors="pt", padding="max_length", max_length=64, truncation=True)
    with torch.no_grad():
        out = whole(pixel_values=x, **inputs, output_hidden_states=True)
        last = out.vision_model_output.hidden_states[-1]  # the last block's output, before post_layernorm
        prompted = with_prompts(vm, PROMPTS)
        assert isinstance(prompted.lens_fn, PooledReadout) and prompted.lens_fn.activation == "sigmoid"
        torch.testing.assert_close(prompted.lens_fn(last), out.logits_per_image, atol=1e-5, rtol=0)
        pooled, attn = vm.text_tower.embed_from_tokens.with_attention(last)
        torch.testing.assert_close(pooled, out.vision_model_output.pooler_output, atol=1e-5, rtol=0)
    assert attn.shape == (1, 4, 1, 16) and float(attn.std()) > 0  # one probe over 16 patches, not uniform
    # the logit lens view: each prompt's sigmoid, the last layer's equal to the model's own
    r = vizapp.analyze(vm, random_image(1), prompts=PROMPTS)
    np.testing.assert_allclose(r.lens_probs[-1], r.probs, atol=1e-6)
    assert r.lens_probs.shape == (2, 3) and abs(r.lens_probs[0].sum() - 1) > 1e-3  # sigmoids, not a softmax
    lens = views.logit_lens_views(r, PROMPTS[1])  # the app's view: top prompts per layer, one prompt across depth
    assert len(lens.table) == 2 and f"({r.lens_probs[0].max():.3f})" in lens.table[0][1]
    np.testing.assert_allclose(lens.depth.data[0].y, r.lens_probs[:, 1])


def siglip_reference(whole, x: torch.Tensor, text: torch.Tensor, cls: list[int], cosine: bool = False) -> torch.Tensor:
    """Σ_l E_l [B, P] as the authors define it for SigLIP. Per layer: the whole model's hidden state through its own
    post_layernorm and pooling head, the prompt score exp(t)·cos + b (``cosine``: the cosine alone, as the authors'
    code scores it); ∂s_l/∂A^pool_l from autograd's gradient on the head's attention output (a hook on the
    nn.MultiheadAttention) mapped back through out_proj, and the values from the head's own weights."""
    vision = whole.vision_model
    mha = vision.head.attention
    seen: dict[str, torch.Tensor] = {}
    handle = mha.register_forward_hook(lambda m, a, out: seen.update(y=out[0], kv=a[2]))
    try:
        with torch.no_grad():
            hidden = vision(pixel_values=x, output_hidden_states=True).hidden_states[1:]
        total = 0
        for z in hidden:
            e = vision.head(vision.post_layernorm(z))
            s = (e / e.norm(dim=-1, keepdim=True)) @ text.T
            if not cosine:
                s = whole.logit_scale.exp() * s + whole.logit_bias
            score = s[torch.arange(x.shape[0]), torch.tensor(cls)].sum()
            (gy,) = torch.autograd.grad(score, seen["y"])  # [B, 1, D]: the MHA's output
            g = gy @ mha.out_proj.weight  # y = o Wᵀ + b -> ∂s/∂o
            v = seen["kv"] @ mha.in_proj_weight.chunk(3)[2].T + mha.in_proj_bias.chunk(3)[2]
            total = total + torch.relu(attention_gradient(g, v, mha.num_heads)).mean(dim=1).mean(dim=1)
    finally:
        handle.remove()
    return total.detach()


def scaled(e: torch.Tensor) -> torch.Tensor:
    return torch.stack([(row - row.min()) / (row.max() - row.min()) for row in e])


def test_siglip_prompt_legrad_equals_the_authors_definition(siglip):
    folder, whole = siglip
    vm = vizapp.load_model(folder, device="cpu")
    images = [random_image(1), random_image(2)]
    x = torch.stack([vm.transform(i) for i in images])
    cls = [2, 0]
    total = siglip_reference(whole, x, text_embeddings(folder, whole, PROMPTS), cls)
    ref = scaled(total).reshape(2, *vm.grid_size)
    found = vizapp.explain(vm, images, "legrad", classes=cls, prompts=PROMPTS, empty_prompt_correction=False)
    diff = float(np.abs(np.asarray(found) - ref.numpy()).max())
    print(f"legrad_pooled siglip prompts: max abs diff vs the hooked reference {diff:.2e}")
    assert diff < 1e-5 and float(ref.std()) > 0.05
    r = vizapp.analyze(vm, images[0], prompts=PROMPTS)  # one image, a prompt by its text
    np.testing.assert_allclose(r.explain("legrad", PROMPTS[2], empty_prompt_correction=False), ref[0], atol=1e-5)

    # the authors' correction, on by default for SigLIP: the patches where the empty prompt's scaled map (its cosine
    # alone, as they score it) exceeds 0.8 are set to zero before the final scaling
    background = scaled(siglip_reference(whole, x, text_embeddings(folder, whole, ["a photo of a"]), [0, 0], True))
    corrected = scaled(torch.where(background > 0.8, 0.0, total)).reshape(2, *vm.grid_size)
    assert 0 < int((background > 0.8).sum()) < background.numel() // 2  # some patches, not most
    found = vizapp.explain(vm, images, "legrad", classes=cls, prompts=PROMPTS)
    np.testing.assert_allclose(np.asarray(found), corrected.numpy(), atol=1e-5)
    assert float(np.abs(np.asarray(found) - ref.numpy()).max()) > 0.05  # it changed the maps
    np.testing.assert_allclose(r.explain("legrad", PROMPTS[2]), corrected[0], atol=1e-5)


def test_the_correction_is_refused_where_it_is_undefined():
    vm = timm_map("siglip")
    r = vizapp.analyze(vm, random_image(1))
    with pytest.raises(BadParameterError, match="empty-prompt correction is defined for SigLIP prompts only"):
        r.explain("legrad", 0, empty_prompt_correction=True)
    with pytest.raises(BadParameterError, match="must be True, False or None"):
        r.explain("legrad", 0, empty_prompt_correction="yes")
    np.testing.assert_array_equal(r.explain("legrad", 0, empty_prompt_correction=False), r.explain("legrad", 0))


def test_siglip_tower_without_prompts_is_refused_in_one_sentence(siglip):
    folder, _ = siglip
    vm = vizapp.load_model(folder, device="cpu")
    assert vm.lens_fn is None and vm.labels == ()  # no classes: the pooled feature alone
    r = vizapp.analyze(vm, random_image(1))
    assert views.method_unavailable(r, "legrad") == "it explains a class, and this model has no classifier head"
    with pytest.raises(BadParameterError) as e:
        vizapp.explain(vm, [random_image(1)], "legrad", classes=0)
    print(e.value)
    # the vision tower's own readout is there (its pooled output, no class scores), and the refusal names the lens
    assert isinstance(vm.text_tower.embed_from_tokens, PooledReadout)
    with pytest.raises(BadParameterError, match="LeGrad is not available for .*logit lens"):
        methods._legrad_batch(vm, vm.transform(random_image(1))[None], [0])
