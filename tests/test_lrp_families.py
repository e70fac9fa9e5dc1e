"""Transformer Attribution (Chefer, Gur & Wolf, CVPR 2021) on transformers and torchvision ViTs.

The second code path is timm's: a random timm ViT's weights are copied into the other library's model, and the two
maps (and each block's float64 attention relevance and gradient) must agree. Then the method through the front doors
(``r.explain``, ``vizapp.explain``, ``vizapp.evaluate``) for each new family, and one sentence for every family the
authors' rules are not defined for.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import vizapp
from tests.conftest import random_image
from vizapp.analysis import lrp
from vizapp.analysis.lrp_families import Affine
from vizapp.errors import BadParameterError

transformers = pytest.importorskip("transformers", reason="the hf extra is installed by requirements-dev.txt")
torchvision = pytest.importorskip("torchvision")

WIDTH, HEADS, DEPTH, MLP, SIZE, PATCH, CLASSES = 32, 4, 3, 64, 32, 8, 5
GRID = (SIZE // PATCH, SIZE // PATCH)


def timm_vit(reg_tokens: int = 0, seed: int = 0) -> torch.nn.Module:
    """A random timm ViT with a random head (timm zeroes it) and, with ``reg_tokens``, position rows for them (the
    layout of a DeiT's CLS and distillation tokens)."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    model = VisionTransformer(
        img_size=SIZE,
        patch_size=PATCH,
        embed_dim=WIDTH,
        depth=DEPTH,
        num_heads=HEADS,
        mlp_ratio=MLP / WIDTH,
        num_classes=CLASSES,
        qkv_bias=True,
        reg_tokens=reg_tokens,
        no_embed_class=False,
    )
    with torch.no_grad():
        for name, p in model.named_parameters():  # nothing left at zero or one: every piece must be copied right
            if name.endswith(("bias", "token", "pos_embed")) or "norm" in name or "head" in name:
                p.copy_(0.1 * torch.randn_like(p) + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    return model.eval()


def timm_to_hf(model: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """timm's state dict named as transformers' ViT/ViT-MSN/DeiT classifier (``prefix``: "vit" or "deit"); q, k and
    v are the three thirds of timm's fused qkv."""
    ts, sd = model.state_dict(), {}
    emb = f"{prefix}.embeddings."
    sd[emb + "cls_token"] = ts["cls_token"]
    if "reg_token" in ts:  # DeiT's distillation token: a second prefix token with its own position row
        sd[emb + "distillation_token"] = ts["reg_token"]
    sd[emb + "position_embeddings"] = ts["pos_embed"]
    for w in ("weight", "bias"):
        sd[f"{emb}patch_embeddings.projection.{w}"] = ts[f"patch_embed.proj.{w}"]
        sd[f"{prefix}.layernorm.{w}"] = ts[f"norm.{w}"]
        sd[f"classifier.{w}"] = ts[f"head.{w}"]
        for i in range(DEPTH):
            t, h = f"blocks.{i}.", f"{prefix}.layers.{i}."
            for a, b in (
                ("norm1", "layernorm_before"),
                ("norm2", "layernorm_after"),
                ("attn.proj", "attention.o_proj"),
                ("mlp.fc1", "mlp.fc1"),
                ("mlp.fc2", "mlp.fc2"),
            ):
                sd[f"{h}{b}.{w}"] = ts[f"{t}{a}.{w}"]
            for name, third in zip(("q_proj", "k_proj", "v_proj"), ts[f"{t}attn.qkv.{w}"].chunk(3), strict=True):
                sd[f"{h}attention.{name}.{w}"] = third
    return sd


def timm_to_torchvision(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """timm's state dict named as torchvision's VisionTransformer (MultiheadAttention's fused ``in_proj``)."""
    ts = model.state_dict()
    sd = {"class_token": ts["cls_token"], "encoder.pos_embedding": ts["pos_embed"]}
    for w in ("weight", "bias"):
        sd[f"conv_proj.{w}"] = ts[f"patch_embed.proj.{w}"]
        sd[f"encoder.ln.{w}"] = ts[f"norm.{w}"]
        sd[f"heads.head.{w}"] = ts[f"head.{w}"]
        for i in range(DEPTH):
            t, v = f"blocks.{i}.", f"encoder.layers.encoder_layer_{i}."
            for a, b in (
                ("norm1", "ln_1"),
                ("norm2", "ln_2"),
                ("attn.qkv", "self_attention.in_proj"),
                ("attn.proj", "self_attention.out_proj"),
                ("mlp.fc1", "mlp.0"),
                ("mlp.fc2", "mlp.3"),
            ):
                sd[f"{v}{b}{'_' if b.endswith('in_proj') else '.'}{w}"] = ts[f"{t}{a}.{w}"]
    return sd


def torchvision_vit() -> torch.nn.Module:
    return torchvision.models.VisionTransformer(
        image_size=SIZE,
        patch_size=PATCH,
        num_layers=DEPTH,
        num_heads=HEADS,
        hidden_dim=WIDTH,
        mlp_dim=MLP,
        num_classes=CLASSES,
    ).eval()


# transformers classifiers of the authors' block: (id, config class, model class, base attribute, timm reg_tokens)
HF = [
    ("vit", "ViTConfig", "ViTForImageClassification", "vit", 0),
    ("vit_msn", "ViTMSNConfig", "ViTMSNForImageClassification", "vit", 0),
    ("deit", "DeiTConfig", "DeiTForImageClassification", "deit", 1),  # CLS + distillation token, one head on CLS
]


def save_hf_copy(folder, config_cls: str, model_cls: str, prefix: str, timm_model: torch.nn.Module) -> str:
    """``timm_model``'s weights in a transformers model, written by save_pretrained to ``folder``."""
    config = getattr(transformers, config_cls)(
        hidden_size=WIDTH,
        num_hidden_layers=DEPTH,
        num_attention_heads=HEADS,
        intermediate_size=MLP,
        patch_size=PATCH,
        image_size=SIZE,
        num_labels=CLASSES,
        layer_norm_eps=1e-6,
        hidden_act="gelu",
    )
    model = getattr(transformers, model_cls)(config)
    model.load_state_dict(timm_to_hf(timm_model, prefix), strict=True)
    model.save_pretrained(folder)
    return str(folder)


def assert_same_maps(ours: torch.nn.Module, ref: torch.nn.Module, prefix: int, x: torch.Tensor) -> None:
    """The float64 relevance and gradient of every block, and the maps from layers 0 and 1, of two models that are
    one network."""
    classes = [0, 3]
    cams, grads = lrp.attention_relevance(ours, x, classes, gradients=True)
    ref_cams, ref_grads = lrp.attention_relevance(ref, x, classes, gradients=True)
    for got, want in zip(cams + grads, ref_cams + ref_grads, strict=True):
        assert got.dtype == torch.float64 and want.abs().max() > 0
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6 * want.abs().max().item())
    for start in (0, 1):
        got = lrp.transformer_attribution(ours, x, prefix, classes, GRID, start_layer=start)
        want = lrp.transformer_attribution(ref, x, prefix, classes, GRID, start_layer=start)
        assert want.max() > 0 and not torch.allclose(want[0], want[1])
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6 * want.abs().max().item())


# -- the q/k/v projection ----------------------------------------------------------------------------------------------


def test_the_z_plus_rule_on_q_k_v_apart_is_the_rule_on_their_concatenation():
    # by hand: x = [1, -2] into two one-output layers, W_a = [2, -1], W_b = [1, 3], with R = [1, 2]: output a's
    # positive contributions are 2 and 2 (Z = 4), output b's only 1 (Z = 1): R_x = [2/4 + 2, 2/4] whether the two rows
    # are one layer or two
    x = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    w = torch.tensor([[2.0, -1.0], [1.0, 3.0]], dtype=torch.float64)
    r = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    fused = lrp.qkv_relprop(x, (Affine(w, None),), r, eps=0.0)
    apart = lrp.qkv_relprop(x, (Affine(w[:1], None), Affine(w[1:], None)), r, eps=0.0)
    assert fused.tolist() == apart.tolist() == [[2.5, 0.5]]
    # random q, k and v of a block, with biases (which the rule leaves out)
    g = torch.Generator().manual_seed(0)
    n1 = torch.randn(2, 5, 8, generator=g, dtype=torch.float64)
    w3 = torch.randn(24, 8, generator=g, dtype=torch.float64)
    b3 = torch.randn(24, generator=g, dtype=torch.float64)
    rel = torch.randn(2, 5, 24, generator=g, dtype=torch.float64)
    fused = lrp.qkv_relprop(n1, (Affine(w3, b3),), rel)
    apart = lrp.qkv_relprop(n1, tuple(Affine(w, b) for w, b in zip(w3.chunk(3), b3.chunk(3), strict=True)), rel)
    torch.testing.assert_close(apart, fused, rtol=1e-12, atol=1e-14)
    assert fused.abs().max() > 0.1


# -- the second code path: timm's map of the same weights ------------------------------------------------------------


@pytest.mark.parametrize("fid, config_cls, model_cls, prefix, reg", HF, ids=[h[0] for h in HF])
def test_a_transformers_classifier_gives_the_map_of_the_timm_vit_with_its_weights(
    tmp_path, fid, config_cls, model_cls, prefix, reg
):
    ref = timm_vit(reg_tokens=reg)
    vm = vizapp.load_model(save_hf_copy(tmp_path, config_cls, model_cls, prefix, ref), device="cpu")
    assert vm.family == "hf" and vm.num_prefix_tokens == 1 + reg and vm.grid_size == GRID
    assert lrp.unsupported(vm.model, vm.num_prefix_tokens) == ""
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(vm.logits(x), ref(x), rtol=1e-5, atol=1e-5)  # one network
    assert_same_maps(vm.model, ref, 1 + reg, x)


def test_a_torchvision_vit_gives_the_map_of_the_timm_vit_with_its_weights():
    ref = timm_vit()
    model = torchvision_vit()
    model.load_state_dict(timm_to_torchvision(ref), strict=True)
    assert lrp.unsupported(model, 1) == ""
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)
    assert_same_maps(model, ref, 1, x)


def test_the_copied_timm_map_still_equals_the_authors_way_written_out():
    # the timm side of the comparisons above is itself checked against the reference of test_lrp
    from tests.test_lrp import reference_map

    ref = timm_vit()
    x = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    got = lrp.transformer_attribution(ref, x, 1, 2, GRID)
    torch.testing.assert_close(got[0].double(), reference_map(ref, x, 2)[1:].reshape(GRID), rtol=1e-5, atol=1e-12)


# -- through the front doors ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_vit_folder(tmp_path_factory):
    return save_hf_copy(tmp_path_factory.mktemp("hf_vit"), "ViTConfig", "ViTForImageClassification", "vit", timm_vit())


@pytest.fixture
def torchvision_small(monkeypatch):
    """``torchvision:vit_b_16`` built at 32 px with a random head (torchvision zeroes it), for a quick evaluation;
    the model cache is emptied before and after, so no other test gets this model under that name."""
    from vizapp.models import MODEL_CACHE

    real = torchvision.models.get_model

    def small(arch, **kwargs):
        model = real(arch, **{**kwargs, "image_size": SIZE})
        torch.nn.init.normal_(model.heads.head.weight, std=0.02)
        return model

    MODEL_CACHE.clear()
    monkeypatch.setattr(torchvision.models, "get_model", small)
    yield "torchvision:vit_b_16"
    MODEL_CACHE.clear()


def _front_doors(vm: vizapp.VizModel) -> None:
    imgs = [random_image(i) for i in range(3)]
    r = vizapp.analyze(vm, imgs[0])
    assert vizapp.methods.unavailable(r, "transformer_attribution") == ""
    got = r.explain("transformer_attribution", 2)
    alone = lrp.transformer_attribution(vm.model, r.input, vm.num_prefix_tokens, 2, r.grid_size)[0].numpy()
    assert got.shape == vm.grid_size and got.max() > 0
    np.testing.assert_allclose(got, alone, rtol=1e-6, atol=0)
    maps = vizapp.explain(vm, imgs, "transformer_attribution", [2, 0, 1])
    assert maps.shape == (3, *vm.grid_size)
    np.testing.assert_allclose(maps[0], got, rtol=1e-5, atol=1e-7 * got.max())
    for b in (1, 2):
        one = vizapp.analyze(vm, imgs[b]).explain("transformer_attribution", [2, 0, 1][b])
        np.testing.assert_allclose(maps[b], one, rtol=1e-5, atol=1e-7 * one.max())


def test_a_transformers_vit_through_explain_and_the_batch_api(hf_vit_folder):
    _front_doors(vizapp.load_model(hf_vit_folder, device="cpu"))


def test_a_torchvision_vit_through_explain_and_the_batch_api(torchvision_small):
    vm = vizapp.load_model(torchvision_small, pretrained=False, device="cpu")
    assert vm.grid_size == (2, 2) and vm.family == "torchvision"
    _front_doors(vm)


def _evaluate(tmp_path, model: str, *extra: str) -> dict:
    from PIL import Image

    from vizapp.evaluate import main

    data = tmp_path / "data"
    data.mkdir()
    for i in range(2):
        Image.fromarray(np.asarray(random_image(i, size=(40, 40)))).save(data / f"{i}.png")
    out = tmp_path / "out"
    args = [str(data), "--model", model, "--out", str(out), "--methods", "transformer_attribution", "--steps", "2"]
    assert main([*args, *extra]) == 0
    rows = (out / "results.csv").read_text().splitlines()
    assert len(rows) == 3 and "error" not in (out / "results.csv").read_text()
    return json.loads((out / "summary.json").read_text())["methods"]["transformer_attribution"]


def test_the_evaluation_runs_it_on_a_transformers_vit(tmp_path, hf_vit_folder):
    scores = _evaluate(tmp_path, hf_vit_folder)
    assert {"pred.positive", "pred.negative"} <= set(scores)


def test_the_evaluation_runs_it_on_a_torchvision_vit(tmp_path, torchvision_small):
    scores = _evaluate(tmp_path, torchvision_small, "--random-weights")
    assert {"pred.positive", "pred.negative"} <= set(scores)


# -- where the rules are not defined: one sentence each -------------------------------------------------------------

HF_COMMON = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, patch_size=8)
REFUSED_HF = [
    ("Dinov2Config", "Dinov2ForImageClassification", dict(num_labels=3), "beside the mean of the patch tokens"),
    ("Dinov2Config", "Dinov2ForImageClassification", dict(use_swiglu_ffn=True), "SwiGLU"),
    ("Dinov2Config", "Dinov2Model", {}, "no classifier head"),
    ("ViTConfig", "ViTModel", {}, "no classifier head"),
    ("DeiTConfig", "DeiTForImageClassificationWithTeacher", {}, "averages the heads of a CLS and a distillation"),
    ("BeitConfig", "BeitForImageClassification", dict(use_relative_position_bias=True), "relative-position bias"),
    ("BeitConfig", "BeitForImageClassification", dict(use_mean_pooling=True), "the mean of the patch tokens"),
    ("Data2VecVisionConfig", "Data2VecVisionForImageClassification", dict(use_relative_position_bias=True), "bias"),
    ("CLIPVisionConfig", "CLIPVisionModel", {}, "vision tower given no text prompts, so it has no classes"),
    ("SiglipVisionConfig", "SiglipVisionModel", {}, "no CLS token: its head pools every token by attention"),
    ("IJepaConfig", "IJepaForImageClassification", {}, "no CLS token: its output is the mean of the patch tokens"),
    ("DINOv3ViTConfig", "DINOv3ViTModel", {}, "rotary position embedding (RoPE)"),
]


@pytest.mark.parametrize(
    "config_cls, model_cls, extra, why", REFUSED_HF, ids=[f"{r[1]}-{r[3][:12]}" for r in REFUSED_HF]
)
def test_transformers_models_the_rules_do_not_cover_say_why(config_cls, model_cls, extra, why):
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**HF_COMMON, image_size=32, **extra))
    assert why in lrp.unsupported(model.eval())
    with pytest.raises(ValueError, match="not defined for this model: it"):
        lrp.transformer_attribution(model, torch.zeros(1, 3, 32, 32), 1, 0, GRID)


@pytest.mark.parametrize(
    "name, kwargs, why",
    [
        ("eva02_tiny_patch14_224", dict(img_size=56, depth=2), "RoPE"),
        ("vit_base_patch16_rope_reg1_gap_256", dict(img_size=48, depth=2, embed_dim=64, num_heads=4), "RoPE"),
        ("beit_base_patch16_224", dict(img_size=48, depth=2, embed_dim=64, num_heads=4), "relative-position bias"),
        ("vit_relpos_base_patch16_224", dict(img_size=48, depth=2, embed_dim=64, num_heads=4), "relative-position"),
        ("vit_little_patch16_reg4_gap_256", dict(img_size=64, depth=2), "no CLS token"),
        ("vit_tiny_patch16_224", dict(img_size=64, depth=2, global_pool="avg"), "does not read the CLS token"),
    ],
)
def test_timm_models_the_rules_do_not_cover_say_why(name, kwargs, why):
    import timm

    assert why in lrp.unsupported(timm.create_model(name, pretrained=False, **kwargs))


def test_an_openclip_tower_without_prompts_has_no_classes():
    open_clip = pytest.importorskip("open_clip", reason="open_clip_torch is installed by requirements.txt")
    model = open_clip.create_model(
        "ViT-B-32",
        pretrained=None,
        embed_dim=32,
        vision_cfg=dict(image_size=32, layers=1, width=32, patch_size=16, head_width=16),
        text_cfg=dict(context_length=8, vocab_size=64, width=16, heads=2, layers=1),
    )
    assert "vision tower given no text prompts, so it has no classes" in lrp.unsupported(model.visual)
    assert lrp.unsupported(model.visual, prompted=True) == ""  # given prompts: tests/test_lrp_prompts.py


def test_a_torchvision_pre_logits_head_is_refused_and_a_loaded_refusal_reaches_explain(tmp_path):
    model = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=1, num_heads=4, hidden_dim=32, mlp_dim=64, representation_size=16
    )
    assert "tanh pre-logits" in lrp.unsupported(model)
    folder = tmp_path / "dinov2"
    cfg = transformers.Dinov2Config(**HF_COMMON, image_size=32, num_labels=3)
    transformers.Dinov2ForImageClassification(cfg).save_pretrained(folder)
    vm = vizapp.load_model(str(folder), device="cpu")
    r = vizapp.analyze(vm, random_image(0))
    assert "beside the mean of the patch tokens" in vizapp.methods.unavailable(r, "transformer_attribution")
    with pytest.raises(BadParameterError, match="not defined for .*beside the mean of the patch tokens"):
        r.explain("transformer_attribution", 0)
    with pytest.raises(BadParameterError, match="not defined for"):
        vizapp.explain(vm, [random_image(1)], "transformer_attribution", [0])
