"""The label-free views through the public API (issue 14): wiring of vizapp.analysis.features into analyze, checked
against second code paths (timm's forward_intermediates, the model's own logits, plain numpy)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import random_image, small_model

import vizapp
from vizapp.analysis.features import feature_pca as pure_pca


@pytest.fixture(scope="module")
def reg4():
    return small_model("vit_small_patch14_reg4_dinov2", img_size=56, depth=3)


def test_token_norms_equal_timm_forward_intermediates(reg4):
    r = vizapp.analyze(reg4, random_image(1))
    with torch.no_grad():
        inter = reg4.model.forward_intermediates(
            r.input, return_prefix_tokens=True, norm=False, intermediates_only=True, output_fmt="NLC"
        )
    for layer, (patches, prefix) in enumerate(inter):
        tokens = torch.cat([prefix, patches], dim=1)[0]  # [N, D], prefix first as the model orders them
        np.testing.assert_allclose(r.token_norms()[layer], torch.linalg.norm(tokens, dim=-1).numpy(), rtol=1e-5)
    assert r.token_norms().shape == (3, r.num_tokens) and r.num_registers == 4
    assert r.artifact_tokens().shape == r.token_norms().shape


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("vit_tiny_patch16_224", dict(img_size=64, depth=3)),
        ("deit_tiny_distilled_patch16_224", dict(img_size=64, depth=2)),
        ("vit_little_patch16_reg4_gap_256", dict(img_size=64, depth=2)),
        ("torchvision:vit_b_16", dict(image_size=32, num_classes=7)),
    ],
)
def test_logit_lens_last_layer_is_the_model_prediction(name, kwargs):
    torch.manual_seed(0)
    vm = vizapp.load_model(name, pretrained=False, device="cpu", **kwargs)
    if vm.family == "torchvision":  # its head starts at zero, which would make every layer's lens uniform
        torch.nn.init.normal_(vm.model.heads[-1].weight)
    r = vizapp.analyze(vm, random_image(2))
    assert r.lens_probs.shape == (r.num_layers, len(r.labels))
    np.testing.assert_allclose(r.lens_probs[-1], r.probs, atol=1e-6)
    lens = r.logit_lens(k=3)
    assert len(lens) == r.num_layers
    # every layer's lens is read in one batched call, so the last one equals the prediction to rounding, not bitwise
    assert [name for name, _ in lens[-1]] == [name for name, _ in r.top_k[:3]]
    np.testing.assert_allclose([p for _, p in lens[-1]], [p for _, p in r.top_k[:3]], atol=1e-6)
    assert not np.array_equal(r.lens_probs[0], r.lens_probs[-1])  # each layer is read on its own


def test_norms_and_lens_taken_as_blocks_arrive_equal_those_of_kept_outputs(monkeypatch):
    """Over BLOCK_OUTPUT_BYTES only the last block's output is kept and each layer's token norms and lens are taken
    as its output arrives (written into one block for all layers): the values of the other path, which keeps every
    output and reads them after the forward, and the norms computed by hand from the kept last output."""
    from vizapp import limits

    vm = small_model("vit_tiny_patch16_224", img_size=64, depth=3)
    kept = vizapp.analyze(vm, random_image(4))
    monkeypatch.setattr(limits, "BLOCK_OUTPUT_BYTES", 0)
    streamed = vizapp.analyze(vm, random_image(4))
    assert sorted(kept.block_outputs) == [0, 1, 2] and sorted(streamed.block_outputs) == [2]
    assert streamed.block_norms.shape == (3, streamed.num_tokens) and streamed.lens_probs.shape == (3, 1000)
    np.testing.assert_allclose(streamed.block_norms, kept.block_norms, rtol=1e-6)
    np.testing.assert_allclose(streamed.lens_probs, kept.lens_probs, atol=1e-7)
    last = streamed.block_outputs[2].numpy().astype(np.float64)
    np.testing.assert_allclose(streamed.block_norms[2], np.sqrt((last**2).sum(-1)), rtol=1e-6)
    np.testing.assert_allclose(streamed.lens_probs[2], streamed.probs, atol=1e-7)
    assert not np.allclose(streamed.block_norms[0], streamed.block_norms[1])  # each row is its own layer's


def test_block_features_second_forward_leaves_the_first_ones_norms():
    from vizapp.streaming import BlockFeatures

    bf = BlockFeatures(2, None, budget=0)  # no output kept: norms written as each block's output arrives
    bf(0, torch.tensor([[[3.0, 4.0], [0.0, 1.0]]]))
    bf(1, torch.tensor([[[6.0, 8.0], [0.0, 2.0]]]))
    bf.finish()
    first = bf.stacked("norms")
    assert torch.equal(first, torch.tensor([[[5.0, 1.0]], [[10.0, 2.0]]]))  # [L, B, N]
    assert torch.equal(bf.norms[1], torch.tensor([[10.0, 2.0]]))
    bf(0, torch.tensor([[[0.0, 0.0], [5.0, 12.0]]]))  # a second forward
    bf(1, torch.tensor([[[1.0, 0.0], [0.0, 0.0]]]))
    bf.finish()
    assert torch.equal(bf.stacked("norms"), torch.tensor([[[0.0, 13.0]], [[1.0, 0.0]]]))
    assert torch.equal(first, torch.tensor([[[5.0, 1.0]], [[10.0, 2.0]]]))  # a new block: the first is unchanged


def test_kept_block_outputs_are_copied_into_one_block_during_the_forward():
    """Every layer's output kept (budget large): each is copied into one [L, B, N, D] block as it arrives, so the
    model's own tensor is not held (a later write to it changes nothing kept); the norms are taken from the block
    after the forward, by hand here; a second forward gets a new block."""
    from vizapp.streaming import BlockFeatures

    bf = BlockFeatures(2, None, budget=2**20)
    x0, x1 = torch.tensor([[[3.0, 4.0], [0.0, 1.0]]]), torch.tensor([[[6.0, 8.0], [0.0, 2.0]]])
    bf(0, x0)
    bf(1, x1)
    x0.zero_()  # the model reuses its buffer: the kept output is a copy
    bf.finish()
    assert torch.equal(bf.outputs[0], torch.tensor([[[3.0, 4.0], [0.0, 1.0]]]))
    assert torch.equal(bf.outputs[1], x1)
    assert bf.outputs[1].data_ptr() == bf.outputs[0].data_ptr() + 4 * 4  # views of one block, layer after layer
    assert torch.equal(bf.stacked("norms"), torch.tensor([[[5.0, 1.0]], [[10.0, 2.0]]]))  # [L, B, N]
    first = bf.outputs[0]
    bf(0, torch.ones(1, 2, 2))
    bf(1, torch.ones(1, 2, 2))
    bf.finish()
    assert torch.equal(first, torch.tensor([[[3.0, 4.0], [0.0, 1.0]]]))  # a new block: the first is unchanged


def test_feature_pca_and_similarity(reg4):
    r = vizapp.analyze(reg4, random_image(3))
    rgb = r.feature_pca()
    assert rgb.shape == (*r.grid_size, 3) and rgb.min() >= 0 and rgb.max() <= 1
    feats = r.block_outputs[r.num_layers - 1][r.num_prefix_tokens :]
    np.testing.assert_allclose(rgb.reshape(-1, 3), pure_pca(feats).rgb.reshape(-1, 3).numpy(), atol=1e-6)
    sim = r.feature_similarity((1, 2))
    assert sim[1, 2] == pytest.approx(1.0, abs=1e-6)
    f = feats.numpy()
    q = f[1 * r.grid_size[1] + 2]
    expected = f @ q / (np.linalg.norm(f, axis=1) * np.linalg.norm(q))
    np.testing.assert_allclose(sim.ravel(), expected, atol=1e-5)
    other = vizapp.analyze(reg4, random_image(4))
    cross = r.feature_similarity((1, 2), layer=1, other=other)
    g = other.block_outputs[1][other.num_prefix_tokens :].numpy()
    q1 = r.block_outputs[1][r.num_prefix_tokens :].numpy()[1 * r.grid_size[1] + 2]
    np.testing.assert_allclose(cross.ravel(), g @ q1 / (np.linalg.norm(g, axis=1) * np.linalg.norm(q1)), atol=1e-5)
    with pytest.raises(vizapp.BadParameterError, match="patch"):
        r.feature_similarity("cls")


def test_shared_pca_over_several_images_equals_one_pca_of_their_features(reg4):
    imgs = [random_image(5), random_image(6)]
    shared = vizapp.feature_pca(reg4, imgs, layer=1)
    feats = torch.stack([vizapp.analyze(reg4, im).block_outputs[1][5:] for im in imgs])  # [2, P, D]
    np.testing.assert_allclose(shared.reshape(2, -1, 3), pure_pca(feats).rgb.numpy(), atol=1e-5)


def test_dino_masks_and_register_attention(reg4):
    r = vizapp.analyze(reg4, random_image(7))
    masks = r.dino_masks(0.6)
    assert masks.shape == (r.num_heads, *r.grid_size) and masks.dtype == bool
    att = r.attention(r.num_layers - 1)  # [H, gh, gw]
    for h in range(r.num_heads):
        w = att[h].ravel() / att[h].sum()
        kept = w[masks[h].ravel()].sum()
        assert kept >= 0.6 - 1e-6  # the kept patches hold at least the threshold's share of the mass
        assert kept - w[masks[h].ravel()].min() < 0.6 + 1e-6  # and dropping the smallest kept one falls below it
    reg = r.register_attention()
    assert reg["from_cls"].shape == (3, r.num_heads, 4) and reg["from_patches"].shape == (3, r.num_heads, 4)
    a = r.attention_layer(0).numpy()
    np.testing.assert_allclose(reg["from_cls"][0], a[:, 0, 1:5], atol=1e-6)


def test_models_without_a_head_have_no_logit_lens():
    vm = small_model("vit_small_patch14_reg4_dinov2", img_size=56, depth=2, num_classes=0)
    r = vizapp.analyze(vm, random_image(8))
    assert r.lens_probs is None
    with pytest.raises(vizapp.BadParameterError, match="no classifier head"):
        r.logit_lens()
