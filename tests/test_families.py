"""Every model family vizapp loads, against the library's own explicit attention (random weights, small configs).

The reference per family is the library's second code path: timm with ``fused_attn=False`` (the softmax read at
``attn_drop``'s input), transformers with ``attn_implementation="eager"`` and ``output_attentions=True``, torchvision's
``nn.MultiheadAttention`` with ``need_weights=True, average_attn_weights=False``.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import all_hooks, graph_reference, random_image, reference_attention, timm_version

import vizapp
from vizapp.analysis import mean_attention_distance, rollout
from vizapp.capture import AttentionCapture
from vizapp.models.base import readout_weights

transformers = pytest.importorskip("transformers", reason="the hf extra is installed by requirements-dev.txt")

TIMM = [
    ("dinov3_small", "vit_small_patch16_dinov3", dict(img_size=64, depth=2)),  # RoPE, CLS + 4 registers
    ("eva02_tiny", "eva02_tiny_patch14_224", dict(img_size=56, depth=2)),
    ("rope_reg1_gap", "vit_base_patch16_rope_reg1_gap_256", dict(img_size=48, depth=2, embed_dim=64, num_heads=4)),
    ("rope_mixed", "vit_base_patch16_rope_mixed_224", dict(img_size=48, depth=2, embed_dim=64, num_heads=4)),
    ("beit", "beit_base_patch16_224", dict(img_size=48, depth=2, embed_dim=64, num_heads=4)),  # relative bias
    ("relpos", "vit_relpos_base_patch16_224", dict(img_size=(48, 64), depth=2, embed_dim=64, num_heads=4)),
    (
        "naflex",
        "naflexvit_base_patch16_gap",
        dict(depth=2, embed_dim=64, num_heads=4, pretrained_cfg_overlay=dict(input_size=(3, 64, 48))),
    ),
]
HF_COMMON = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, patch_size=8)
HF = [
    ("hf_vit", "ViTConfig", "ViTForImageClassification", dict(image_size=32, num_labels=5)),
    ("hf_vit_nonsquare", "ViTConfig", "ViTForImageClassification", dict(image_size=[24, 40], num_labels=3)),
    ("hf_vit_msn", "ViTMSNConfig", "ViTMSNForImageClassification", dict(image_size=32, num_labels=3)),
    ("hf_deit_teacher", "DeiTConfig", "DeiTForImageClassificationWithTeacher", dict(image_size=32, num_labels=3)),
    ("hf_dinov2", "Dinov2Config", "Dinov2Model", dict(image_size=32)),
    (
        "hf_dinov2_reg",
        "Dinov2WithRegistersConfig",
        "Dinov2WithRegistersModel",
        dict(image_size=32, num_register_tokens=4),
    ),
    (
        "hf_dinov2_reg_cls",  # its head reads the CLS token beside the patch tokens' mean
        "Dinov2WithRegistersConfig",
        "Dinov2WithRegistersForImageClassification",
        dict(image_size=32, num_register_tokens=2, num_labels=3),
    ),
    ("hf_dinov3", "DINOv3ViTConfig", "DINOv3ViTModel", dict(image_size=32, num_register_tokens=4)),  # RoPE
    (
        "hf_beit",  # relative position bias per layer, mean-pooled head
        "BeitConfig",
        "BeitForImageClassification",
        dict(image_size=32, use_relative_position_bias=True, use_mean_pooling=True, num_labels=3),
    ),
    (
        "hf_data2vec",  # BEiT's architecture, the bias inside the self-attention module
        "Data2VecVisionConfig",
        "Data2VecVisionForImageClassification",
        dict(image_size=32, use_relative_position_bias=True, use_mean_pooling=True, num_labels=3),
    ),
    ("hf_ijepa", "IJepaConfig", "IJepaForImageClassification", dict(image_size=32, num_labels=3)),  # no CLS token
    ("hf_ijepa_backbone", "IJepaConfig", "IJepaModel", dict(image_size=32)),  # no CLS token, head or pooler
    ("hf_vit_mae", "ViTMAEConfig", "ViTMAEForPreTraining", dict(image_size=32)),  # shuffles and masks its patches
    ("hf_clip", "CLIPVisionConfig", "CLIPVisionModel", dict(image_size=32)),
    ("hf_siglip", "SiglipVisionConfig", "SiglipVisionModel", dict(image_size=32)),
    ("hf_chinese_clip", "ChineseCLIPVisionConfig", "ChineseCLIPVisionModel", dict(image_size=32)),
    ("hf_altclip", "AltCLIPVisionConfig", "AltCLIPVisionModel", dict(image_size=32)),
    ("hf_metaclip2", "MetaClip2VisionConfig", "MetaClip2VisionModel", dict(image_size=32)),
    ("hf_owlvit", "OwlViTVisionConfig", "OwlViTVisionModel", dict(image_size=32)),
    ("hf_owlv2", "Owlv2VisionConfig", "Owlv2VisionModel", dict(image_size=32)),
    ("hf_aimv2", "Aimv2VisionConfig", "Aimv2VisionModel", dict(image_size=32)),  # no CLS token, attention pooling
]
# (id, expected prefix tokens, has CLS, grid)
EXPECTED = {
    "dinov3_small": (5, True, (4, 4)),
    "eva02_tiny": (1, True, (4, 4)),
    "rope_reg1_gap": (1, False, (3, 3)),
    "rope_mixed": (1, True, (3, 3)),
    "beit": (1, True, (3, 3)),
    "relpos": (0, False, (3, 4)),
    "naflex": (4, False, (4, 3)),
    "hf_vit": (1, True, (4, 4)),
    "hf_vit_nonsquare": (1, True, (3, 5)),
    "hf_vit_msn": (1, True, (4, 4)),
    "hf_deit_teacher": (2, True, (4, 4)),
    "hf_dinov2": (1, True, (4, 4)),
    "hf_dinov2_reg": (5, True, (4, 4)),
    "hf_dinov2_reg_cls": (3, True, (4, 4)),
    "hf_dinov3": (5, True, (4, 4)),
    "hf_beit": (1, True, (4, 4)),
    "hf_ijepa": (0, False, (4, 4)),
    "hf_ijepa_backbone": (0, False, (4, 4)),
    "hf_data2vec": (1, True, (4, 4)),
    "hf_vit_mae": (1, True, (4, 4)),
    "hf_clip": (1, True, (4, 4)),
    "hf_siglip": (0, False, (4, 4)),
    "hf_chinese_clip": (1, True, (4, 4)),
    "hf_altclip": (1, True, (4, 4)),
    "hf_metaclip2": (1, True, (4, 4)),
    "hf_owlvit": (1, True, (4, 4)),
    "hf_owlv2": (1, True, (4, 4)),
    "hf_aimv2": (0, False, (4, 4)),
    "tv_vit_b_16": (1, True, (2, 2)),
}
IDS = [t[0] for t in TIMM] + [h[0] for h in HF] + ["tv_vit_b_16"]
# What each output reads (checked against the model's own gradients below): BEiT, EVA-02, timm's DINOv3 backbone and
# the gap models average their patches, DeiT's two heads read the CLS and distillation tokens, DINOv2's classifier
# the CLS token beside the patch mean, SigLIP's attention-pooling head every token (it has no prefix tokens); the rest
# read the CLS token (transformers' DINOv3 and DINOv2 backbones pool by it).
READOUT = {"hf_deit_teacher": "cls+dist", "hf_dinov2_reg_cls": "cls+patches"} | dict.fromkeys(
    ("dinov3_small", "eva02_tiny", "rope_reg1_gap", "beit", "relpos", "naflex", "hf_beit", "hf_data2vec"),
    "patches",
)
READOUT |= {"hf_ijepa": "patches", "hf_ijepa_backbone": "patches", "hf_siglip": "patches", "hf_aimv2": "patches"}


def save_hf(folder, config_cls: str, model_cls: str, extra: dict):
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**HF_COMMON, **extra)
    model = getattr(transformers, model_cls)(config)
    for name, param in model.named_parameters():
        # zeros at init (the bias tables; BEiT's absolute table): give them something to carry
        if "relative_position_bias_table" in name or ("position_embeddings" in name and not param.any()):
            torch.nn.init.normal_(param)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    return {fid: str(save_hf(tmp_path_factory.mktemp(fid), c, m, e)) for fid, c, m, e in HF}


def load(fid: str, hf_folders) -> vizapp.VizModel:
    torch.manual_seed(0)
    for tid, name, kwargs in TIMM:
        if tid == fid:
            return vizapp.load_model(name, pretrained=False, device="cpu", **kwargs)
    if fid == "tv_vit_b_16":
        vm = vizapp.load_model("torchvision:vit_b_16", pretrained=False, device="cpu", image_size=32)
        # torchvision initialises the head to zeros: the logits would depend on nothing, and every gradient be 0
        torch.nn.init.normal_(vm.model.heads.head.weight, std=0.02)
        return vm
    return vizapp.load_model(hf_folders[fid], device="cpu")


def reference(vm: vizapp.VizModel, fid: str, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per-layer attention [B, H, N, N] and logits from the library's own explicit path."""
    if vm.family == "timm":
        logits, maps = reference_attention(vm.model, x)
        return maps, logits
    if vm.family == "hf":
        folder = vm.name
        if fid == "hf_vit_mae":  # its encoder with nothing masked, the patches in order (ascending noise)
            ref = type(vm.model).from_pretrained(folder, attn_implementation="eager", mask_ratio=0.0).eval()
            n = vm.grid_size[0] * vm.grid_size[1]
            extra = {"noise": torch.arange(n, dtype=torch.float32).expand(x.shape[0], n)}
        else:
            ref, extra = type(vm.model).from_pretrained(folder, attn_implementation="eager").eval(), {}
        with torch.no_grad():
            out = ref(pixel_values=x, output_attentions=True, **extra)
            return list(out.attentions), vm.forward_fn(ref, x)
    model = vm.model  # torchvision: run the blocks by hand, asking each MHA for its per-head weights
    maps = []
    with torch.no_grad():
        h = model._process_input(x)
        h = torch.cat([model.class_token.expand(h.shape[0], -1, -1), h], dim=1) + model.encoder.pos_embedding
        for blk in model.encoder.layers:
            y = blk.ln_1(h)
            maps.append(blk.self_attention(y, y, y, need_weights=True, average_attn_weights=False)[1])
            h = blk(h)
        logits = model(x)
    return maps, logits


@pytest.mark.parametrize("fid", IDS)
def test_capture_equals_the_library_explicit_attention(fid, hf_folders):
    vm = load(fid, hf_folders)
    p, has_cls, grid = EXPECTED[fid]
    assert (vm.num_prefix_tokens, vm.has_class_token, vm.grid_size) == (p, has_cls, grid)
    registers = {"dinov3_small": 4, "rope_reg1_gap": 1, "naflex": 4, "hf_dinov2_reg": 4, "hf_dinov2_reg_cls": 2}
    registers = registers | {"hf_dinov3": 4}
    assert vm.num_registers == registers.get(fid, 0)
    x = torch.stack([vm.transform(random_image(i)) for i in (1, 2)])
    maps, ref_logits = reference(vm, fid, x)
    assert vm.tokens_for(x.shape[-2], x.shape[-1]) == maps[0].shape[-1]  # the library's own token count

    class Sink:
        def chunk(self, *a):
            pass

        def layer_done(self, layer):
            pass

    hooks = all_hooks(vm.model)
    with torch.no_grad(), AttentionCapture(vm.model, on_attention=Sink()) as cap:
        logits = vm.logits(x)
    assert all_hooks(vm.model) == hooks
    assert cap.inline_layers == set(range(vm.num_layers)) and not cap.unexact_layers
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-4)
    assert len(maps) == len(cap) == vm.num_layers
    n = p + grid[0] * grid[1]
    for layer, ref in enumerate(maps):
        got = cap.attention(layer)
        assert got.shape == (2, vm.num_heads, n, n)
        torch.testing.assert_close(got, ref.float(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("fid", IDS)
@pytest.mark.parametrize("inline", [True, False], ids=["inline", "from_qk"])
def test_analyze_equals_analyses_of_the_reference_attention(fid, inline, hf_folders):
    vm = load(fid, hf_folders)
    r = vizapp.analyze(vm, random_image(3), inline=inline)
    assert r.recomputed_layers == (() if inline else tuple(range(vm.num_layers)))
    maps, logits = reference(vm, fid, r.input)
    attn = torch.stack([m[0] for m in maps]).float()  # [L, H, N, N]
    p = r.num_prefix_tokens
    expected = mean_attention_distance(attn, r.grid_size, r.patch_size, p)
    np.testing.assert_allclose(r.mean_distance, expected.numpy(), rtol=1e-4, atol=1e-3)
    joint = rollout(attn, p)
    row = (readout_weights(READOUT.get(fid, "cls"), r.num_tokens, p) @ joint.double())[p:]
    np.testing.assert_allclose(r.rollout(), row.reshape(r.grid_size).numpy(), atol=1e-5)
    np.testing.assert_allclose(
        r.attention(1, query=(0, 1)), attn[1, :, p + 1, p:].reshape(-1, *r.grid_size).numpy(), atol=1e-5
    )
    if vm.labels:
        np.testing.assert_allclose(r.probs, torch.softmax(logits[0], -1).numpy(), atol=1e-5)
        # the logit lens of the last block is the model's own prediction, through each head's own pooling
        np.testing.assert_allclose(r.lens_probs[-1], r.probs, atol=1e-6)
    else:
        assert r.probs is None


@pytest.mark.parametrize("fid", IDS)
def test_the_readout_is_what_the_output_depends_on(fid, hf_folders):
    """The tokens vizapp says the output reads are exactly the last layer's attention rows the output depends on:
    ∂(output)/∂A_last is non-zero on those rows and exactly zero on every other (autograd through the model itself)."""
    vm = load(fid, hf_folders)
    assert vm.readout == READOUT.get(fid, "cls")
    x = vm.transform(random_image(6))[None]
    with torch.enable_grad(), AttentionCapture(vm.model, with_grad=True) as cap:
        out = vm.logits(x)
        probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=out.dtype)
        grads = cap.attention_grads((out * probe).sum())
    read_rows = grads[-1][0].abs().sum(dim=(0, 2)) > 0  # [N]: rows of the last layer the output depends on
    expected = readout_weights(vm.readout, read_rows.shape[0], vm.num_prefix_tokens) > 0
    assert read_rows.tolist() == expected.tolist()


@pytest.mark.parametrize("fid", ["beit", "hf_deit_teacher", "tv_vit_b_16", "dinov3_small", "hf_beit"])
def test_attention_gradients_equal_autograd_through_the_reference_attention(fid, hf_folders):
    """∂logit/∂A from the capture (the attention formed in the graph) equals autograd through an explicit attention
    tensor: the library's own (timm non-fused, transformers eager) or, for torch's MHA, written out here from the
    module's weights (relative bias, RoPE, distillation token and MHA included)."""
    if fid == "dinov3_small":  # with a classifier head
        torch.manual_seed(0)
        vm = vizapp.load_model(
            "vit_small_patch16_dinov3", pretrained=False, device="cpu", img_size=64, depth=2, num_classes=5
        )
    else:
        vm = load(fid, hf_folders)
    x = vm.transform(random_image(4))[None]
    maps: list[torch.Tensor] = []
    if vm.family == "timm":
        ref, maps = graph_reference(vm.model)
        score = ref(x)[0, 1]
    elif vm.family == "hf":
        ref = type(vm.model).from_pretrained(vm.name, attn_implementation="eager").eval()
        out = ref(pixel_values=x, output_attentions=True)
        for a in out.attentions:
            a.retain_grad()
            maps.append(a)
        score = out.logits[0, 1]
    else:
        ref = copy.deepcopy(vm.model)
        h = ref._process_input(x)
        h = torch.cat([ref.class_token.expand(1, -1, -1), h], dim=1) + ref.encoder.pos_embedding
        for blk in ref.encoder.layers:
            mha = blk.self_attention
            y = blk.ln_1(h)  # [B, N, E]
            b, n, e = y.shape
            hd = e // mha.num_heads
            q, k, v = (
                t.reshape(b, n, mha.num_heads, hd).transpose(1, 2)
                for t in torch.nn.functional.linear(y, mha.in_proj_weight, mha.in_proj_bias).chunk(3, -1)
            )
            w = torch.softmax(q @ k.transpose(-2, -1) / hd**0.5, dim=-1)  # [B, H, N, N]
            w.retain_grad()
            maps.append(w)
            o = mha.out_proj((w @ v).transpose(1, 2).reshape(b, n, e))
            h = h + blk.dropout(o)
            h = h + blk.mlp(blk.ln_2(h))
        score = ref.heads(ref.encoder.ln(h)[:, 0])[0, 1]
    score.backward()
    r = vizapp.analyze(vm, random_image(4))
    grads = r.attention_gradients(1)
    for layer, a in enumerate(maps):
        torch.testing.assert_close(grads[layer], a.grad[0].float(), atol=1e-5, rtol=1e-4)
    assert r.relevance(1).shape == r.grid_size and r.grad_rollout(1).shape == r.grid_size


def test_models_without_a_head_say_so_for_class_methods(hf_folders):
    vm = load("hf_dinov2_reg", hf_folders)
    r = vizapp.analyze(vm, random_image(5))
    assert r.probs is None and r.top_k == []
    with pytest.raises(vizapp.BadParameterError, match="no classifier head"):
        r.relevance()
    assert r.rollout().shape == r.grid_size  # label-free views still work


def test_hf_folder_loads_offline_with_the_library_processor(hf_folders, tmp_path):
    """A save_pretrained folder without preprocessor_config.json gets the model type's default processor at the
    model's input size; with one, its values are used."""
    vm = load("hf_vit_nonsquare", hf_folders)
    assert vm.input_size == (3, 24, 40) and vm.transform(random_image(1)).shape == (3, 24, 40)
    assert vm.mean == (0.5, 0.5, 0.5)  # ViTImageProcessor's defaults
    folder = save_hf(tmp_path / "withproc", "ViTConfig", "ViTForImageClassification", dict(image_size=32))
    transformers.ViTImageProcessor(
        size={"height": 32, "width": 32}, image_mean=[0.1, 0.2, 0.3], image_std=[0.5, 0.5, 0.5]
    ).save_pretrained(folder)
    vm2 = vizapp.load_model(str(folder), device="cpu")
    assert vm2.mean == pytest.approx((0.1, 0.2, 0.3))
    assert vizapp.load_model("hf:" + str(folder), device="cpu").mean == vm2.mean


def test_hf_hub_ids_resolve_through_the_cache_offline(hf_folders, tmp_path, monkeypatch):
    """hf:owner/repo with files laid out as the hub cache loads with no network; absent, a clear error fast."""
    import shutil
    import time
    from pathlib import Path

    from huggingface_hub import constants

    cache = tmp_path / "hub"
    snap = cache / "models--owner--tiny-vit" / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    for f in Path(hf_folders["hf_vit"]).iterdir():
        shutil.copy(f, snap / f.name)
    (cache / "models--owner--tiny-vit" / "refs").mkdir()
    (cache / "models--owner--tiny-vit" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(vizapp.models.hf, "hub_reachable", lambda *a, **k: False)
    vm = vizapp.load_model("hf:owner/tiny-vit", device="cpu")
    assert vm.family == "hf" and vm.num_prefix_tokens == 1
    t0 = time.perf_counter()
    with pytest.raises(vizapp.ModelLoadError, match="hf:owner/missing"):
        vizapp.load_model("hf:owner/missing", device="cpu")
    assert time.perf_counter() - t0 < 10


def test_unsupported_families_get_an_error_naming_the_supported_ones():
    with pytest.raises(vizapp.UnsupportedModelError, match="supported: .*transformers|supported: .*Hugging Face"):
        vizapp.load_model("swinv2_cr_tiny_224", pretrained=False, device="cpu", img_size=64, window_size=4)
    # timm's parallel blocks (two attentions side by side) and CaiT's talking heads, which mix heads around the softmax
    with pytest.raises(vizapp.UnsupportedModelError, match=r"block 0 \(ParallelThingsBlock\) has no single attention"):
        vizapp.load_model("vit_small_patch16_18x2_224", pretrained=False, device="cpu", depth=1)
    # (timm before 1.0.31 gives CaiT no num_prefix_tokens, so it is refused a step earlier, still naming the supported)
    cait = "TalkingHeadAttn" if timm_version() >= (1, 0, 31) else r"\(Cait\) is not a ViT with a patch embedding"
    with pytest.raises(vizapp.UnsupportedModelError, match=cait + ".*supported: "):
        vizapp.load_model("cait_xxs24_224", pretrained=False, device="cpu", depth=1)


def test_a_transformers_folder_with_only_pickled_weights_is_refused(tmp_path):
    torch.manual_seed(0)
    config = transformers.ViTConfig(**HF_COMMON, image_size=32)
    model = transformers.ViTModel(config)
    model.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")  # what older transformers wrote: a pickle
    assert (tmp_path / "pytorch_model.bin").is_file() and not (tmp_path / "model.safetensors").exists()
    with pytest.raises(vizapp.ModelLoadError):
        vizapp.load_model(str(tmp_path), device="cpu")


def test_naflex_keeps_each_images_aspect_ratio_within_its_patch_budget(tmp_path):
    """One image goes through NaFlexViT at its own aspect ratio (timm's NaFlex resize, at most as many patches as the
    configured input size has), captured exactly; batches (dataset mode) get the configured size."""
    torch.manual_seed(0)
    name, kwargs = next((n, k) for fid, n, k in TIMM if fid == "naflex")
    vm = vizapp.load_model(name, pretrained=False, device="cpu", **kwargs)
    budget = vm.grid_size[0] * vm.grid_size[1]  # 4 x 3 at the configured 64 x 48
    wide, tall = random_image(1, size=(60, 160)), random_image(2, size=(160, 60))  # (rows, columns)
    for img, landscape in ((wide, True), (tall, False)):
        x = vm.transform(img)
        gh, gw = vm.grid_for(x.shape[-2], x.shape[-1])
        assert (gw > gh) == landscape and gh * gw <= budget
        assert vm.batch_transform(img).shape[-2:] == (64, 48)
        r = vizapp.analyze(vm, img)
        assert r.grid_size == (gh, gw) and r.num_tokens == vm.num_prefix_tokens + gh * gw == vm.tokens_for(
            *x.shape[-2:]
        )
        logits, maps = reference_attention(vm.model, x[None])
        for layer, ref in enumerate(maps):
            np.testing.assert_allclose(r.attention_layer(layer).numpy(), ref[0].numpy(), atol=1e-5)
        np.testing.assert_allclose(
            r.mean_distance,
            np.stack([mean_attention_distance(m, (gh, gw), vm.patch_size, vm.num_prefix_tokens)[0] for m in maps]),
            rtol=1e-5,
            atol=1e-4,
        )
    paths = []
    for i, img in enumerate((wide, tall, random_image(3))):
        paths.append(tmp_path / f"{i}.png")
        img.save(paths[-1])
    from vizapp.stats import collect_stats

    stats = collect_stats(vm, paths, batch_size=3)  # three aspect ratios in one batch, at one size
    assert stats.n_images == 3 and not stats.skipped and stats.grid_size == vm.grid_size
    assert stats.mean_distance.shape == (2, vm.num_heads) and np.isfinite(stats.mean_distance).all()


def test_hf_dinov3_position_view_equals_its_own_rotated_dot_products(hf_folders):
    """The RoPE view of a transformers DINOv3 against the rotation the model itself applies: HF's
    ``apply_rotary_pos_emb`` on an all-ones q = k (every frequency pair of equal norm) gives, between patches i and j,
    q_i·k_j / |q|² = mean over pairs of cos(θ_i − θ_j), which is what the view shows."""
    from transformers.models.dinov3_vit.modeling_dinov3_vit import apply_rotary_pos_emb

    from vizapp.analysis import rope_angle_similarity
    from vizapp.views import pos_embed_views

    vm = load("hf_dinov3", hf_folders)
    assert vm.position == "rope" and vm.patch_pos_embed() is None
    gh, gw = vm.grid_size
    head_dim = vm.model.config.hidden_size // vm.model.config.num_attention_heads
    with torch.no_grad():
        cos, sin = vm.model.rope_embeddings(torch.zeros(1, 3, *vm.input_size[1:]))
        ones = torch.ones(1, 1, gh * gw, head_dim, dtype=torch.float64)
        q, k = apply_rotary_pos_emb(ones, ones, cos.double(), sin.double())
    expected = (q[0, 0] @ k[0, 0].T / head_dim).reshape(gh, gw, gh, gw)
    views = pos_embed_views(vm, tile=(1, 2))
    assert views.figure is not None and "axial 2-D RoPE" in views.note
    tile = np.asarray(views.tile.data[0].z, dtype=np.float64)  # the enlarged tile: query at row 1, column 2
    np.testing.assert_allclose(tile, expected[1, 2].numpy(), atol=1e-6)
    got = rope_angle_similarity(vm.rope_angles_fn(), vm.grid_size).double()
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert not torch.allclose(got, torch.ones_like(got))  # positions differ


@pytest.mark.parametrize("fid", ["hf_beit", "hf_data2vec"])
def test_hf_beit_position_view_equals_the_bias_its_layers_add(fid, hf_folders):
    """Each layer's relative-bias map against the bias the layer itself computes for the attention logits
    (transformers' BeitRelativePositionBias, [1, H, N, N], on the layer in BEiT and on its self-attention in
    Data2VecVision): the map's entry at offset p_query − p_key is the bias between those two patches, for every
    pair."""
    from vizapp.capture import encoder_layers
    from vizapp.views import pos_embed_views

    vm = load(fid, hf_folders)
    assert vm.position == "relative" and vm.patch_pos_embed() is None and vm.rope_angles_fn is None
    gh, gw = vm.grid_size
    n = vm.num_prefix_tokens + gh * gw
    maps = vm.relative_bias_fn()  # [L, H, 2gh-1, 2gw-1]
    assert maps.shape == (vm.num_layers, vm.num_heads, 2 * gh - 1, 2 * gw - 1)
    rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    rows, cols = rows.reshape(-1), cols.reshape(-1)
    d_row = (rows[:, None] - rows[None, :]) + gh - 1  # [P, P]
    d_col = (cols[:, None] - cols[None, :]) + gw - 1
    for layer, (block, attn) in enumerate(zip(*encoder_layers(vm.model), strict=True)):
        module = getattr(block, "relative_position_bias", None) or attn.relative_position_bias
        with torch.no_grad():
            own = module((gh, gw), False, dim_size=n)[0]  # [H, N, N]
        expected = own[:, vm.num_prefix_tokens :, vm.num_prefix_tokens :]
        torch.testing.assert_close(maps[layer][:, d_row, d_col], expected, atol=1e-6, rtol=0)
    assert maps.abs().max() > 0.1  # the tables were randomised before saving
    views = pos_embed_views(vm, layer=1)
    assert views.figure is not None and views.layers == vm.num_layers and "relative-position bias" in views.note


def test_a_mean_pooled_model_maps_start_from_its_patches_and_say_so(hf_folders):
    """BEiT has a CLS token its head never reads: rollout, flow and relevance start from the patch rows, and the map's
    title says what the output reads."""
    from vizapp import views
    from vizapp.analysis.flow import attention_flow

    vm = load("beit", hf_folders)
    r = vizapp.analyze(vm, random_image(8))
    p, n = r.num_prefix_tokens, r.num_tokens
    attn = r.attention_stack().double()
    joint = rollout(attn, p)
    np.testing.assert_allclose(r.rollout(), joint[p:, p:].mean(0).reshape(r.grid_size).numpy(), atol=1e-5)
    patches = torch.zeros(n, dtype=torch.float64)
    patches[p:] = 1 / (n - p)
    np.testing.assert_allclose(
        r.attention_flow(), attention_flow(attn, p, readout=patches).reshape(r.grid_size).numpy(), atol=1e-6
    )
    assert "the output reads the mean of the patch tokens" in views.map_view(
        r, views.Controls(), "rollout"
    ).layout.title.text.replace("<br>", " ")
    assert "output reads" not in views.map_view(r, views.Controls(), "attention").layout.title.text.replace("<br>", " ")
    # its flow's cost counts the output node and the 9 patch edges into it: 2 layers of 10 x 10 edges + 9
    from vizapp import methods

    assert "on a graph of 3 x 10 nodes and an output node (209 edges)" in methods.cost(r, "flow").work


def test_a_learned_table_beside_rope_or_a_bias_is_shown_too(hf_folders, tmp_path):
    """EVA-02 adds a learned absolute table beside its RoPE, and a BEiT can add one beside its relative bias: the
    Position tab offers both views, and the table's is the cosine grid of the model's own patch rows."""
    from vizapp.views import POS_SHOWS, pos_embed_views

    beit = save_hf(
        tmp_path / "beit_abs",
        "BeitConfig",
        "BeitModel",
        dict(image_size=32, use_relative_position_bias=True, use_absolute_position_embeddings=True),
    )
    for vm, scheme in ((load("eva02_tiny", hf_folders), "rope"), (vizapp.load_model(str(beit)), "relative")):
        assert vm.position == scheme and not vm.pos_embed_status
        if vm.family == "timm":
            table = vm.model.pos_embed[0, vm.num_prefix_tokens :]
        else:
            table = vm.model.embeddings.position_embeddings[0, 1:]
        torch.testing.assert_close(vm.patch_pos_embed(), table.detach().float())
        assert table.abs().sum() > 0  # a table of zeros would make every cosine 0 on both sides
        unit = torch.nn.functional.normalize(table.detach().double(), dim=-1)
        gh, gw = vm.grid_size
        tile = pos_embed_views(vm, tile=(1, 2), show=POS_SHOWS[1])
        assert tile.shows == POS_SHOWS and "learned position embeddings" in tile.note.lower()
        z = np.asarray(tile.tile.data[0].z, dtype=np.float64)  # the enlarged tile: position (1, 2) against all
        np.testing.assert_allclose(z, (unit @ unit[1 * gw + 2]).reshape(gh, gw).numpy(), atol=1e-6)
        first = pos_embed_views(vm)
        assert first.shows == POS_SHOWS and "“learned table” view" in first.note
        assert ("RoPE" if scheme == "rope" else "relative-position bias") in first.note
    assert pos_embed_views(load("hf_vit", hf_folders)).shows == ()  # one scheme, one view
    with pytest.raises(vizapp.BadParameterError, match="show must be one of"):
        pos_embed_views(load("hf_vit", hf_folders), show="both")


@pytest.mark.parametrize(
    "config_cls, model_cls, tower",
    [
        ("CLIPConfig", "CLIPModel", "CLIPVisionModel"),
        ("MetaClip2Config", "MetaClip2Model", "MetaClip2VisionModel"),
        ("Owlv2Config", "Owlv2ForObjectDetection", "Owlv2VisionModel"),
    ],
    ids=["clip", "metaclip2", "owlv2"],
)
def test_an_image_text_or_detection_folder_loads_its_vision_tower(tmp_path, config_cls, model_cls, tower):
    """A folder of the whole model (text tower or detection heads included) loads its vision encoder alone, with the
    saved weights and the tower's bookkeeping."""
    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    config = getattr(transformers, config_cls)(
        text_config=dict(small, vocab_size=99), vision_config=dict(small, patch_size=8, image_size=32)
    )
    torch.manual_seed(0)
    whole = getattr(transformers, model_cls)(config).eval()
    whole.save_pretrained(tmp_path)
    vm = vizapp.load_model(str(tmp_path), device="cpu")
    assert type(vm.model).__name__ == tower and (vm.num_prefix_tokens, vm.grid_size, vm.readout) == (1, (4, 4), "cls")
    vision = getattr(whole, "vision_model", None) or whole.owlv2.vision_model
    x = vm.transform(random_image(2))[None]
    with torch.no_grad():
        torch.testing.assert_close(vm.logits(x), vision(pixel_values=x).pooler_output)
    r = vizapp.analyze(vm, random_image(2))
    assert r.rollout().shape == (4, 4) and r.probs is None


@pytest.mark.parametrize("fid", ["hf_beit", "hf_deit_teacher", "hf_dinov2_reg_cls"])
def test_class_maps_of_a_model_reading_several_tokens_mix_the_full_matrices(fid, hf_folders):
    """Gradient rollout and Chefer relevance, carried down as one row, equal the readout's mix of the rows of the
    full matrices formed the long way (vizapp.analysis.grad_rollout and chefer_relevance on every layer's attention
    and gradient)."""
    from vizapp.analysis import chefer_relevance, grad_rollout

    vm = load(fid, hf_folders)
    r = vizapp.analyze(vm, random_image(9))
    p = r.num_prefix_tokens
    w = readout_weights(READOUT[fid], r.num_tokens, p)
    attn, grads = r.attention_stack(), r.attention_gradients(1)
    relevance = w @ chefer_relevance(attn, grads).double()
    np.testing.assert_allclose(r.relevance(1), relevance[p:].reshape(r.grid_size).numpy(), rtol=1e-5, atol=1e-6)
    joint = w @ grad_rollout(attn, grads, p).double()
    np.testing.assert_allclose(r.grad_rollout(1), joint[p:].reshape(r.grid_size).numpy(), rtol=1e-5, atol=1e-6)


def test_a_pooled_models_maps_can_start_from_its_cls_token_instead(hf_folders):
    """start_row="cls": rollout, relevance, gradient rollout and flow from BEiT's CLS row (the classic maps, though its
    head never reads that token), against the full matrices' row 0; a model without a CLS token refuses it."""
    from vizapp import views
    from vizapp.analysis import chefer_relevance, grad_rollout
    from vizapp.analysis.flow import attention_flow

    r = vizapp.analyze(load("beit", hf_folders), random_image(10))
    p, grid = r.num_prefix_tokens, r.grid_size
    attn = r.attention_stack().double()
    np.testing.assert_allclose(r.rollout(start_row="cls"), rollout(attn, p)[0, p:].reshape(grid).numpy(), atol=1e-5)
    assert not np.allclose(r.rollout(start_row="cls"), r.rollout())  # the two rows differ
    grads = r.attention_gradients(1)
    relevance = chefer_relevance(attn.float(), grads)[0, p:]
    np.testing.assert_allclose(r.relevance(1, start_row="cls"), relevance.reshape(grid).numpy(), rtol=1e-5, atol=1e-6)
    joint = grad_rollout(attn.float(), grads, p)[0, p:]
    np.testing.assert_allclose(r.grad_rollout(1, start_row="cls"), joint.reshape(grid).numpy(), rtol=1e-5, atol=1e-6)
    flow = attention_flow(attn, p, query=0).reshape(grid).numpy()
    np.testing.assert_allclose(r.attention_flow(start_row="cls"), flow, atol=1e-6)
    title = views.map_view(r, views.Controls(start_row="cls"), "rollout").layout.title.text.replace("<br>", " ")
    assert "from the CLS row" in title and "output reads" not in title
    with pytest.raises(vizapp.BadParameterError, match="no CLS token"):
        vizapp.analyze(load("relpos", hf_folders), random_image(10)).rollout(start_row="cls")
    with pytest.raises(vizapp.BadParameterError, match="start_row must be one of"):
        r.rollout(start_row="registers")
