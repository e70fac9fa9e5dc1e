"""Transformer Attribution with text prompts as classes (issue 25): the prompt score read as two linear maps (the
image projection, then the dot product with each prompt's text embedding), against the authors' way written out
with that head, on a transformers CLIP tower against a timm ViT holding its weights, and through the API and the
batch API; towers without prompts or of other layouts are refused in one sentence."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers

import vizapp
from tests.conftest import random_image, small_model
from tests.test_lrp import reference_map
from tests.test_prompts import PROMPTS, save_whole
from vizapp.analysis import lrp
from vizapp.analysis.lrp_families import NO_PROMPTS, PromptScore
from vizapp.errors import BadParameterError


def _score(dim: int, seed: int = 0, k: int = 3, e: int = 6, scale: float = 4.0) -> PromptScore:
    g = torch.Generator().manual_seed(seed)
    return PromptScore(torch.randn(e, dim, generator=g), F.normalize(torch.randn(k, e, generator=g), dim=-1), scale)


@pytest.mark.parametrize("start_layer", [0, 1])
def test_the_prompt_head_equals_the_authors_way_written_out(start_layer):
    """A CLIP-like timm ViT (norm before the blocks, quick GELU) with a prompt score for its head: the map equals the
    reference of test_lrp written out with the same head, for two images and two prompts."""
    vm = small_model("vit_tiny_patch16_224", img_size=64, depth=3, pre_norm=True, act_layer="quick_gelu")
    ps = _score(vm.model.embed_dim)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    classes = [0, 2]
    got = lrp.transformer_attribution(vm.model, x, 1, classes, (4, 4), start_layer=start_layer, prompt=ps)
    for b, c in enumerate(classes):
        ref = reference_map(vm.model, x[b : b + 1], c, start_layer, prompt=(ps.projection, ps.text, ps.scale))
        assert ref[0].item() > 1.0
        torch.testing.assert_close(got[b].double(), ref[1:].reshape(4, 4), rtol=1e-5, atol=1e-12)
    other = lrp.transformer_attribution(vm.model, x, 1, [1, 1], (4, 4), start_layer=start_layer, prompt=ps)
    assert not torch.allclose(other[1], got[1])  # each prompt its own map


def _clip_to_timm(vision: torch.nn.Module) -> torch.nn.Module:
    """A timm ViT holding a transformers CLIP vision tower's weights (pre-norm, quick GELU, no patch bias; CLIP's
    post-LN on the CLS token is timm's final norm, per token)."""
    import timm

    cfg = vision.config
    m = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=cfg.image_size,
        patch_size=cfg.patch_size,
        embed_dim=cfg.hidden_size,
        depth=cfg.num_hidden_layers,
        num_heads=cfg.num_attention_heads,
        mlp_ratio=cfg.intermediate_size / cfg.hidden_size,
        pre_norm=True,
        act_layer="quick_gelu",
        num_classes=0,
    ).eval()
    for mod in m.modules():  # CLIP's LayerNorm epsilon (timm's default is 1e-6)
        if isinstance(mod, torch.nn.LayerNorm):
            mod.eps = cfg.layer_norm_eps
    emb = vision.embeddings
    with torch.no_grad():
        m.patch_embed.proj.weight.copy_(emb.patch_embedding.weight)
        if m.patch_embed.proj.bias is not None:  # timm leaves it out with pre_norm, as CLIP does
            m.patch_embed.proj.bias.zero_()
        m.cls_token.copy_(emb.class_embedding.reshape(1, 1, -1))
        m.pos_embed.copy_(emb.position_embedding.weight[None])
        m.norm_pre.load_state_dict(vision.pre_layrnorm.state_dict())
        m.norm.load_state_dict(vision.post_layernorm.state_dict())
        for blk, layer in zip(m.blocks, vision.encoder.layers, strict=True):
            a = layer.self_attn
            blk.norm1.load_state_dict(layer.layer_norm1.state_dict())
            blk.norm2.load_state_dict(layer.layer_norm2.state_dict())
            blk.attn.qkv.weight.copy_(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]))
            blk.attn.qkv.bias.copy_(torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]))
            blk.attn.proj.load_state_dict(a.out_proj.state_dict())
            blk.mlp.fc1.load_state_dict(layer.mlp.fc1.state_dict())
            blk.mlp.fc2.load_state_dict(layer.mlp.fc2.state_dict())
    return m


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    whole = save_whole(folder, "clip")
    return str(folder), whole


def test_a_clip_tower_with_prompts_gives_the_map_of_the_timm_vit_with_its_weights(clip_folder):
    """The second path: the transformers CLIP vision tower and a timm ViT holding its weights give one map, with the
    prompt score built from the whole CLIP model's own projection, text features and logit scale; and
    ``r.explain`` of the prompted analysis (its prompts encoded by vizapp) is that map."""
    folder, whole = clip_folder
    vision = whole.vision_model.eval()
    timm_vit = _clip_to_timm(vision)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(timm_vit.forward_features(x)[:, 0], vision(pixel_values=x).pooler_output)
        tok = transformers.AutoTokenizer.from_pretrained(folder)
        feats = whole.get_text_features(**tok(PROMPTS, return_tensors="pt", padding=True))
        text = F.normalize(getattr(feats, "pooler_output", feats), dim=-1)
    ps = PromptScore(whole.visual_projection.weight.detach(), text, float(whole.logit_scale.detach().exp()))
    classes = [2, 0]
    ours = lrp.transformer_attribution(vision, x, 1, classes, (4, 4), prompt=ps)
    ref = lrp.transformer_attribution(timm_vit, x, 1, classes, (4, 4), prompt=ps)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-7)
    assert float(ours.std()) > 0
    vm = vizapp.load_model(folder, device="cpu")
    img = random_image(5)
    r = vizapp.analyze(vm, img, prompts=PROMPTS)
    x1 = r.input.to(torch.float32)
    want = lrp.transformer_attribution(vision, x1, 1, [2], (4, 4), prompt=ps)[0].numpy()
    np.testing.assert_allclose(r.explain("transformer_attribution", 2), want, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(r.explain("transformer_attribution", "a red car"), want, rtol=1e-4, atol=1e-7)
    batch = vizapp.explain(vm, [img, random_image(6)], "transformer_attribution", classes=[2, 1], prompts=PROMPTS)
    np.testing.assert_allclose(batch[0], want, rtol=1e-4, atol=1e-7)


def _openclip_to_timm(visual: torch.nn.Module) -> torch.nn.Module:
    """A timm ViT holding an OpenCLIP VisionTransformer's weights (pre-norm, GELU, LayerNorm eps 1e-5)."""
    import timm

    width = visual.transformer.width
    blocks = visual.transformer.resblocks
    m = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=visual.image_size,
        patch_size=visual.patch_size,
        embed_dim=width,
        depth=len(blocks),
        num_heads=blocks[0].attn.num_heads,
        mlp_ratio=blocks[0].mlp.c_fc.out_features / width,
        pre_norm=True,
        num_classes=0,
    ).eval()
    for mod in m.modules():
        if isinstance(mod, torch.nn.LayerNorm):
            mod.eps = visual.ln_pre.eps
    with torch.no_grad():
        m.patch_embed.proj.weight.copy_(visual.conv1.weight)
        if m.patch_embed.proj.bias is not None:
            m.patch_embed.proj.bias.zero_()
        m.cls_token.copy_(visual.class_embedding.reshape(1, 1, -1))
        m.pos_embed.copy_(visual.positional_embedding[None])
        m.norm_pre.load_state_dict(visual.ln_pre.state_dict())
        m.norm.load_state_dict(visual.ln_post.state_dict())
        for blk, rb in zip(m.blocks, blocks, strict=True):
            blk.norm1.load_state_dict(rb.ln_1.state_dict())
            blk.norm2.load_state_dict(rb.ln_2.state_dict())
            blk.attn.qkv.weight.copy_(rb.attn.in_proj_weight)
            blk.attn.qkv.bias.copy_(rb.attn.in_proj_bias)
            blk.attn.proj.load_state_dict(rb.attn.out_proj.state_dict())
            blk.mlp.fc1.load_state_dict(rb.mlp.c_fc.state_dict())
            blk.mlp.fc2.load_state_dict(rb.mlp.c_proj.state_dict())
    return m


def test_an_openclip_tower_with_prompts_gives_the_map_of_the_timm_vit_with_its_weights():
    """OpenCLIP's ViT given prompts: the map equals a timm ViT's holding its weights, with the prompt score built
    from OpenCLIP's own ``encode_text`` and logit scale, and ``r.explain`` of the prompted analysis is that map."""
    import open_clip

    from tests.test_openclip import SMALL, small

    vm = small()
    visual = vm.model.eval()
    timm_vit = _openclip_to_timm(visual)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    clip = vm.text_tower.modules[0]
    with torch.no_grad():
        torch.testing.assert_close(timm_vit.forward_features(x)[:, 0] @ visual.proj, visual(x), rtol=1e-4, atol=1e-5)
        tokenizer = open_clip.get_tokenizer("ViT-B-32", context_length=SMALL["text_cfg"]["context_length"])
        text = F.normalize(clip.encode_text(tokenizer(PROMPTS)), dim=-1)
    ps = PromptScore(visual.proj.detach().T, text, float(clip.logit_scale.detach().exp()))
    ours = lrp.transformer_attribution(visual, x, 1, [2, 0], (4, 4), prompt=ps)
    ref = lrp.transformer_attribution(timm_vit, x, 1, [2, 0], (4, 4), prompt=ps)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-7)
    assert float(ours.std()) > 0
    img = random_image(5)
    r = vizapp.analyze(vm, img, prompts=PROMPTS)
    want = lrp.transformer_attribution(visual, r.input.float(), 1, [2], (4, 4), prompt=ps)[0].numpy()
    np.testing.assert_allclose(r.explain("transformer_attribution", 2), want, rtol=1e-4, atol=1e-7)


def test_towers_without_prompts_or_of_other_layouts_say_why(clip_folder):
    from tests.test_openclip import small

    folder, _ = clip_folder
    vm = vizapp.load_model(folder, device="cpu")
    r = vizapp.analyze(vm, random_image(1))  # no prompts: no classes
    assert lrp.unsupported(vm.model, 1) == NO_PROMPTS
    assert lrp.unsupported(vm.model, 1, prompted=True) == ""
    with pytest.raises(BadParameterError):
        r.explain("transformer_attribution", 0)
    assert lrp.unsupported(small().model, 1) == NO_PROMPTS
    import open_clip

    from tests.test_openclip import SMALL

    vision = dict(SMALL["vision_cfg"], attentional_pool=True)  # CoCa's attentional pooler
    pooled = open_clip.create_model("ViT-B-32", pretrained=None, **dict(SMALL, vision_cfg=vision)).visual
    assert "attentional pooler" in lrp.unsupported(pooled, 1, prompted=True)


@pytest.mark.parametrize("family", ["transformers", "open_clip"])
def test_prompt_maps_on_the_device_equal_the_cpus(clip_folder, family):
    """A CLIP model (a transformers folder, an OpenCLIP ViT) with prompts on the (simulated) GPU: relevance,
    Transformer Attribution, AttnLRP and LeGrad of a prompt, one image and a batch, equal the CPU's."""
    from tests.devicesim import simulated_gpu
    from tests.test_openclip import small

    vm = vizapp.load_model(clip_folder[0], device="cpu") if family == "transformers" else small()
    imgs = [random_image(7), random_image(8)]
    names = ["relevance", "transformer_attribution", "attnlrp", "legrad"]

    def maps() -> dict[str, np.ndarray]:
        r = vizapp.analyze(vm, imgs[0], prompts=PROMPTS)
        out = {m: r.explain(m, 2) for m in names}
        out |= {f"batch_{m}": v for m, v in vizapp.explain(vm, imgs, names, classes=2, prompts=PROMPTS).items()}
        return out

    want = maps()
    with simulated_gpu(vm):
        got = maps()
    for key, value in want.items():
        np.testing.assert_allclose(got[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
