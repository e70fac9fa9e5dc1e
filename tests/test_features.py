"""Label-free views (vizapp.analysis.features): hand-made cases and second code paths on tiny random-weight ViTs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import random_image, small_model
from vizapp.analysis.features import (
    artifact_tokens,
    dino_masks,
    feature_pca,
    feature_similarity,
    fix_component_signs,
    logit_lens,
    register_attention,
    token_norms,
)

# CLS only; CLS + distillation token; CLS + 4 registers; 4 registers and no CLS token (mean pooling).
LENS_FAMILIES = [
    ("vit", "vit_tiny_patch16_224", dict(img_size=32, depth=2, num_classes=7)),
    ("deit_distilled", "deit_tiny_distilled_patch16_224", dict(img_size=32, depth=2, num_classes=7)),
    ("reg4", "vit_small_patch14_reg4_dinov2", dict(img_size=28, depth=2, num_classes=7)),
    ("gap_reg4", "vit_little_patch16_reg4_gap_256", dict(img_size=32, depth=2, num_classes=7)),
]


def _block_outputs(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each block's output [L, N, D] for one image (plain forward hooks, independent of vizapp) and the logits."""
    outs: list[torch.Tensor] = []
    handles = [blk.register_forward_hook(lambda m, a, o: outs.append(o)) for blk in model.blocks]
    try:
        with torch.no_grad():
            logits = model(x)
    finally:
        for h in handles:
            h.remove()
    return torch.stack([o[0] for o in outs]), logits


def _known_features(seed: int, dirs: torch.Tensor, stds=(3.0, 2.0, 1.0), m: int = 300, noise: float = 1e-4):
    """m patches = scores · dirs + small noise; returns (features [m, D], scores [m, 3])."""
    g = torch.Generator().manual_seed(seed)
    # centred, uncorrelated scores with exactly the given standard deviations, so the principal directions are dirs
    raw = torch.randn(m, 3, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(raw - raw.mean(0))
    scores = q * torch.tensor(stds, dtype=torch.float64) * m**0.5
    feats = scores @ dirs + noise * torch.randn(m, dirs.shape[1], generator=g, dtype=torch.float64)
    return feats, scores


def _minmax(v: torch.Tensor) -> torch.Tensor:
    return (v - v.min(0).values) / (v.max(0).values - v.min(0).values)


def _orthonormal_dirs(d: int = 8, seed: int = 3) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q[:, :3].T.contiguous()  # [3, D]


# --- PCA ---------------------------------------------------------------------------------------------------------


def test_pca_recovers_known_directions_and_colours():
    dirs = _orthonormal_dirs()
    feats, scores = _known_features(0, dirs)
    r = feature_pca(feats)
    assert r.rgb.shape == (1, 300, 3) and r.rgb.dtype == torch.float64
    assert float(r.rgb.min()) == 0.0 and float(r.rgb.max()) == 1.0
    expected_dirs = fix_component_signs(dirs)
    assert torch.allclose(r.components, expected_dirs, atol=1e-3)
    # each channel is the min-max scaled score along its direction, with the sign the convention chose
    signs = (expected_dirs * dirs).sum(-1)  # +-1
    assert torch.allclose(r.rgb[0], _minmax(scores * signs), atol=2e-3)
    # explained variance: the centred scores' variances over the total variance of the centred features
    c = scores - scores.mean(0)
    total = ((feats - feats.mean(0)) ** 2).sum()
    assert torch.allclose(r.explained_variance_ratio, (c**2).sum(0) / total, atol=1e-4)
    assert r.foreground is None


def test_pca_sign_convention_is_stated_and_stable_across_noise_seeds():
    dirs = _orthonormal_dirs()
    comps = [feature_pca(_known_features(seed, dirs)[0]).components for seed in range(5)]
    for c in comps:
        # the entry of largest |loading| of every component is positive
        assert bool((c.gather(-1, c.abs().argmax(-1, keepdim=True)) > 0).all())
        assert torch.allclose(c, comps[0], atol=2e-3)
    # negating the input directions gives the same components (the convention, not the data, picks the sign)
    flipped = feature_pca(_known_features(0, -dirs)[0]).components
    assert torch.allclose(flipped, comps[0], atol=2e-3)


def test_pca_matches_eigendecomposition_of_the_covariance():
    # second solver path: eigh of the covariance has its own arbitrary signs; after the convention they agree
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(2, 40, 6, generator=g, dtype=torch.float64) * torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0, 0.5])
    r = feature_pca(feats)
    x = feats.reshape(-1, 6)
    xc = x - x.mean(0)
    evals, evecs = torch.linalg.eigh(xc.T @ xc)  # ascending
    comps = fix_component_signs(evecs[:, [-1, -2, -3]].T)
    assert torch.allclose(r.components, comps, atol=1e-10)
    assert torch.allclose(r.explained_variance_ratio, evals[[-1, -2, -3]] / evals.sum(), atol=1e-12)
    assert torch.allclose(r.rgb.reshape(-1, 3), _minmax(xc @ comps.T), atol=1e-10)


def test_shared_pca_over_two_images_is_the_pca_of_their_concatenation():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(20, 5, generator=g) * torch.tensor([4.0, 3.0, 2.0, 1.0, 0.5])
    perm = torch.randperm(20, generator=g)
    b = a[perm] + 0.0  # the same parts in another order
    joint = feature_pca(torch.stack([a, b]))
    concat = feature_pca(torch.cat([a, b]))
    assert torch.allclose(joint.rgb.reshape(40, 3), concat.rgb[0], atol=1e-6)
    # parts correspond by colour across images
    assert torch.allclose(joint.rgb[1], joint.rgb[0][perm], atol=1e-6)
    # a separate fit per image would not (it scales each image on its own range)
    c = feature_pca(torch.cat([a, 2 * b]))
    assert not torch.allclose(c.rgb[0, :20], feature_pca(a).rgb[0], atol=1e-3)


def test_pca_components_and_grey_for_one_component():
    feats, scores = _known_features(0, _orthonormal_dirs())
    r1 = feature_pca(feats, n_components=1)
    assert r1.rgb.shape == (1, 300, 3)
    assert torch.equal(r1.rgb[..., 0], r1.rgb[..., 1]) and torch.equal(r1.rgb[..., 0], r1.rgb[..., 2])
    r2 = feature_pca(feats, n_components=2)
    assert float(r2.rgb[..., 2].abs().max()) == 0.0
    with pytest.raises(ValueError):
        feature_pca(feats, n_components=4)


def _object_on_background(grid=(6, 6), seed=0, images=2):
    """Features of an object (the centre 2x2... 4x4 block) on a background: two clusters, plus structure inside the
    object along one direction so the refit has something to show."""
    gh, gw = grid
    g = torch.Generator().manual_seed(seed)
    obj = torch.zeros(gh, gw, dtype=torch.bool)
    obj[1:5, 2:5] = True
    obj = obj.reshape(-1)
    d = 6
    bg_centre = torch.tensor([4.0, 0, 0, 0, 0, 0], dtype=torch.float64)
    fg_centre = torch.tensor([-4.0, 0, 0, 0, 0, 0], dtype=torch.float64)
    feats = []
    for _ in range(images):
        x = bg_centre + 0.1 * torch.randn(gh * gw, d, generator=g, dtype=torch.float64)
        inside = fg_centre + torch.randn(int(obj.sum()), d, generator=g, dtype=torch.float64) * torch.tensor(
            [0.1, 2.0, 1.0, 0.5, 0.1, 0.1], dtype=torch.float64
        )
        x[obj] = inside
        feats.append(x)
    return torch.stack(feats), obj


def test_pca_foreground_mask_and_refit():
    feats, obj = _object_on_background()
    r = feature_pca(feats, foreground_threshold=0.5, foreground_side="border", grid_size=(6, 6))
    assert torch.equal(r.foreground, obj.expand(2, -1))
    assert float(r.rgb[:, ~obj].abs().max()) == 0.0  # background black
    # refit on the foreground only: the first component is the object's own main axis (dim 1), not the fg/bg split
    assert torch.allclose(r.components[0].abs(), torch.eye(6, dtype=torch.float64)[1], atol=0.1)
    ref = feature_pca(feats[:, obj])
    assert torch.allclose(r.rgb[:, obj], ref.rgb, atol=1e-10)
    assert torch.allclose(r.explained_variance_ratio, ref.explained_variance_ratio)
    # "high"/"low" give the mask and its complement (which is which depends only on the sign convention)
    hi = feature_pca(feats, foreground_threshold=0.5, foreground_side="high").foreground
    lo = feature_pca(feats, foreground_threshold=0.5, foreground_side="low").foreground
    assert torch.equal(hi, ~lo)
    assert torch.equal(hi, obj.expand(2, -1)) or torch.equal(lo, obj.expand(2, -1))
    with pytest.raises(ValueError, match="grid_size"):
        feature_pca(feats, foreground_threshold=0.5, foreground_side="border")


# --- similarity ----------------------------------------------------------------------------------------------------


def test_feature_similarity_self_is_one_and_matches_numpy():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(12, 9)).astype(np.float32)
    b = rng.normal(size=(7, 9)).astype(np.float32)
    s = feature_similarity(torch.from_numpy(a), 4)
    assert s.shape == (12,) and abs(float(s[4]) - 1.0) < 1e-6
    ref = a @ a[4] / (np.linalg.norm(a, axis=1) * np.linalg.norm(a[4]))
    np.testing.assert_allclose(s.numpy(), ref, atol=1e-6)
    s2 = feature_similarity(torch.from_numpy(a), 4, torch.from_numpy(b))
    ref2 = b @ a[4] / (np.linalg.norm(b, axis=1) * np.linalg.norm(a[4]))
    np.testing.assert_allclose(s2.numpy(), ref2, atol=1e-6)
    with pytest.raises(ValueError):
        feature_similarity(torch.from_numpy(a), 12)


# --- norms, artifacts, registers -----------------------------------------------------------------------------------


@pytest.mark.parametrize("fid,name,kwargs", LENS_FAMILIES, ids=[f[0] for f in LENS_FAMILIES])
def test_token_norms_match_forward_intermediates(fid, name, kwargs):
    vm = small_model(name, **kwargs)
    model = vm.model
    x = vm.transform(random_image(1)).unsqueeze(0)
    outs, _ = _block_outputs(model, x)
    norms = token_norms(outs)
    assert norms.shape == (len(model.blocks), outs.shape[1])
    with torch.no_grad():
        inter = model.forward_intermediates(
            x, return_prefix_tokens=True, norm=False, output_fmt="NLC", intermediates_only=True
        )
    # timm returns (spatial [B, P, D], prefix [B, num_prefix, D]) per block; put the prefix first, the model's order
    ref = torch.stack([torch.linalg.norm(torch.cat([pre, sp], dim=1)[0], dim=-1) for sp, pre in inter])
    assert inter[0][1].shape[1] == model.num_prefix_tokens == vm.num_prefix_tokens
    assert torch.allclose(norms, ref, rtol=1e-6, atol=1e-6)


def test_artifact_rule_on_a_synthetic_bimodal_set():
    g = torch.Generator().manual_seed(0)
    n = 2000
    norms = 50 + 5 * torch.randn(3, n, generator=g)
    truth = torch.zeros(3, n, dtype=torch.bool)
    idx = torch.randperm(n, generator=g)[:60]  # 3 % artifacts in layers 1 and 2, none in layer 0
    for layer in (1, 2):
        truth[layer, idx] = True
        norms[layer, idx] = 300 + 30 * torch.randn(60, generator=g)
    flagged = artifact_tokens(norms)
    assert torch.equal(flagged, truth)
    # the rule by hand for one layer: median + 10 * MAD
    med = norms[1].median()
    mad = (norms[1] - med).abs().median()
    assert torch.equal(flagged[1], norms[1] > med + 10 * mad)
    # a fixed threshold (the paper's 150 for DINOv2-L) gives the same split here
    assert torch.equal(artifact_tokens(norms, threshold=150.0), truth)
    # a small k flags the Gaussian tail too
    assert int(artifact_tokens(norms[:1], k=2.0).sum()) > 0


def test_register_attention_by_hand():
    # tokens: [cls, reg0, reg1, p0, p1, p2]; rows are made-up distributions
    h, n = 2, 6
    attn = torch.zeros(h, n, n)
    attn[:] = 1.0 / n
    attn[0, 0] = torch.tensor([0.1, 0.5, 0.2, 0.1, 0.05, 0.05])
    attn[0, 3:, 1] = torch.tensor([0.9, 0.3, 0.0])
    attn[0, 3:, 2] = torch.tensor([0.0, 0.3, 0.6])
    r = register_attention(attn, num_prefix_tokens=3, num_registers=2)
    assert torch.allclose(r.from_cls[0], torch.tensor([0.5, 0.2]))
    assert torch.allclose(r.from_cls[1], torch.full((2,), 1.0 / n))
    assert torch.allclose(r.from_patches[0], torch.tensor([0.4, 0.3]))
    # a stack of layers keeps the layer axis; without a CLS token there is no CLS row
    stack = register_attention(attn.expand(4, -1, -1, -1), 3, 2, has_class_token=False)
    assert stack.from_cls is None and stack.from_patches.shape == (4, 2, 2)
    with pytest.raises(ValueError, match="no register"):
        register_attention(attn, 1, 0)


def test_register_bookkeeping_from_the_model():
    vm = small_model("vit_small_patch14_reg4_dinov2", img_size=28, depth=1)
    model = vm.model
    assert model.num_reg_tokens == 4 and model.num_prefix_tokens == 5
    n = model.num_prefix_tokens + vm.grid_size[0] * vm.grid_size[1]
    attn = torch.softmax(torch.randn(model.blocks[0].attn.num_heads, n, n), dim=-1)
    r = register_attention(attn, model.num_prefix_tokens, model.num_reg_tokens, model.cls_token is not None)
    assert torch.allclose(r.from_cls, attn[:, 0, 1:5])
    assert torch.allclose(r.from_patches, attn[:, 5:, 1:5].mean(dim=1))


# --- DINO masks ----------------------------------------------------------------------------------------------------


def test_dino_masks_hand_made_row():
    # mass 1/8, 4/8, 2/8, 1/8 (unnormalised input): ascending (stable) p0, p3, p2, p1; cumsum 1/8, 2/8, 4/8, 1
    row = torch.tensor([[1.0, 4.0, 2.0, 1.0]])
    assert dino_masks(row, 0.5).tolist() == [[False, True, False, False]]  # p1 alone holds exactly 1/2
    assert dino_masks(row, 0.6).tolist() == [[False, True, True, False]]  # p2 crosses 0.6 and is kept (mass 3/4)
    assert dino_masks(row, 0.75).tolist() == [[False, True, True, False]]
    assert dino_masks(row, 0.8).tolist() == [[False, True, True, True]]  # the tie: p3 kept, p0 (lower index) dropped
    assert dino_masks(row, 1.0).tolist() == [[True, True, True, True]]


def test_dino_masks_match_a_descending_loop():
    g = torch.Generator().manual_seed(0)
    attn = torch.rand(5, 30, generator=g, dtype=torch.float64)
    for t in (0.3, 0.6, 0.9):
        masks = dino_masks(attn, t)
        for h in range(5):
            p = attn[h] / attn[h].sum()
            keep = torch.zeros(30, dtype=torch.bool)
            before = 0.0
            for i in torch.argsort(p, descending=True).tolist():
                if before < t:
                    keep[i] = True
                before += float(p[i])
            assert torch.equal(masks[h], keep)
            assert float(p[masks[h]].sum()) >= t


# --- logit lens ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fid,name,kwargs", LENS_FAMILIES, ids=[f[0] for f in LENS_FAMILIES])
def test_logit_lens_last_layer_is_the_models_output(fid, name, kwargs):
    vm = small_model(name, **kwargs)
    model = vm.model
    x = vm.transform(random_image(2)).unsqueeze(0)
    outs, logits = _block_outputs(model, x)
    lens = logit_lens(outs, model.norm, model.forward_head, pool=None)  # [L, K]
    assert lens.shape == (len(model.blocks), 7)
    assert torch.allclose(lens.sum(-1), torch.ones(len(model.blocks)))
    assert torch.allclose(lens[-1], logits[0].softmax(-1), atol=1e-7, rtol=0)
    raw = logit_lens(outs, model.norm, model.forward_head, pool=None, return_logits=True)
    assert torch.allclose(raw[-1], logits[0], atol=1e-6, rtol=0)


POOLED_FAMILIES = [f for f in LENS_FAMILIES if f[0] != "deit_distilled"]  # DeiT averages two heads in forward_head


@pytest.mark.parametrize("fid,name,kwargs", POOLED_FAMILIES, ids=[f[0] for f in POOLED_FAMILIES])
def test_logit_lens_with_an_explicit_pooling_rule(fid, name, kwargs):
    vm = small_model(name, **kwargs)
    model = vm.model
    x = vm.transform(random_image(3)).unsqueeze(0)
    outs, logits = _block_outputs(model, x)

    def head(z):
        return model.head(model.fc_norm(z))

    # the pooling rule read from the model: CLS token, or the mean of the patch tokens when there is no CLS token
    pool = 0 if model.global_pool == "token" else "avg"
    assert (model.cls_token is None) == (pool == "avg") == (fid == "gap_reg4")
    lens = logit_lens(outs, model.norm, head, pool=pool, num_prefix_tokens=model.num_prefix_tokens)
    assert torch.allclose(lens[-1], logits[0].softmax(-1), atol=1e-7, rtol=0)
    assert torch.allclose(lens, logit_lens(outs, model.norm, model.forward_head, pool=None), atol=1e-7)
