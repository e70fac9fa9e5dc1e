"""Swin's label-free feature views, per layer on that layer's own grid: feature PCA and cosine similarity worked out by
hand on a known token matrix; the block outputs the analysis keeps against the library's own stage outputs (timm's
``forward_intermediates``, transformers' ``reshaped_hidden_states`` before downsampling) and its own stages run
block by block; the byte budget; and the Features tab through gradio's real server."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from appdriver import AppDriver, assert_clean, heatmap_z, plot_of
from conftest import random_image, start_app
from PIL import Image
from test_swin import TINY, hf_swin, random_tables, write_swin_folder

import vizapp
from vizapp.errors import BadParameterError, StaleResultError
from vizapp.resultcache import ResultCache
from vizapp.swin_result import UNDEFINED, WindowAnalysis

EXAMPLES = vizapp.models.ASSETS_DIR / "examples"


@pytest.fixture(scope="module")
def vm():
    torch.manual_seed(0)
    return vizapp.load_model("swin_tiny_patch4_window7_224", pretrained=False, device="cpu", **TINY)


def _known_tokens() -> torch.Tensor:
    """[15, 32] tokens of the 3x5 last-stage grid, spanned by three orthogonal zero-mean directions of known variance:
    token t = (10·u_t, 3·v_t, w_t, 0, ...)."""
    half_u, half_v, half_w = [1] * 7, [1, -1, 1, -1, 1, -1, 0], [1, 1, -1, -1, 0, 0, 0]
    u = half_u + [-v for v in half_u] + [0]
    v = half_v + half_v + [0]
    w = half_w + [-v for v in half_w] + [0]
    x = torch.zeros(15, 32)
    x[:, 0], x[:, 1], x[:, 2] = 10 * torch.tensor(u), 3 * torch.tensor(v), torch.tensor(w)
    return x


def test_pca_and_similarity_of_a_known_token_matrix_by_hand(vm):
    """u, v, w are zero-mean and orthogonal with squared lengths 14·100 > 12·9 > 8·1, so the principal axes are e0, e1,
    e2 in that order (each sign fixed by its largest loading, +1) and each colour channel is its direction min-max
    scaled: R = (u + 1)/2, G = (v + 1)/2, B = (w + 1)/2. Cosines: token 0 = (10, 3, 1) with itself 1, with token 7 =
    (-10, 3, -1) (-100 + 9 - 1)/110, with token 1 = (10, -3, 1) (100 - 9 + 1)/110, with the zero token 14: 0."""
    r = vizapp.analyze(vm, random_image(0))
    assert r.layer_grids[3] == (3, 5) and r.block_outputs[3].shape == (15, 32)
    known = dataclasses.replace(r, block_outputs={**r.block_outputs, 3: _known_tokens()}, _cache=ResultCache())
    rgb = known.feature_pca(3)
    assert rgb.shape == (3, 5, 3)
    x = _known_tokens()
    want = np.stack([(x[:, 0] / 10 + 1) / 2, (x[:, 1] / 3 + 1) / 2, (x[:, 2] + 1) / 2], -1).reshape(3, 5, 3)
    np.testing.assert_allclose(rgb, want, atol=1e-6)
    sim = known.feature_similarity((0, 0), 3)
    assert sim.shape == (3, 5)
    assert sim[0, 0] == pytest.approx(1.0, abs=1e-6)
    assert sim[1, 2] == pytest.approx(-92 / 110, abs=1e-6)  # token 7 = (1, 2) on the 3x5 grid
    assert sim[0, 1] == pytest.approx(92 / 110, abs=1e-6)
    assert sim[2, 4] == 0.0  # the zero token
    # the layer's own grid: a token outside it is refused, as is a query on the first stage's 6x10 grid
    with pytest.raises(BadParameterError, match="outside layer 3's 3x5 grid"):
        known.feature_similarity((5, 9), 3)


def test_feature_views_are_on_each_layers_grid(vm):
    """Every layer's views have its grid; the norms are each token's L2 norm; the views Swin does not define say why."""
    r = vizapp.analyze(vm, random_image(1))
    assert isinstance(r, WindowAnalysis) and sorted(r.block_outputs) == [0, 1, 2, 3]
    for layer, grid in enumerate(r.layer_grids):
        assert r.feature_pca(layer).shape == (*grid, 3)
        assert r.feature_similarity((0, 0), layer).shape == grid
        feats = r.block_outputs[layer]
        np.testing.assert_allclose(r.token_norms()[layer], torch.linalg.vector_norm(feats, dim=-1).numpy(), rtol=1e-6)
        assert r.artifact_tokens()[layer].shape == (grid[0] * grid[1],)
    assert [n.shape for n in r.token_norms()] == [(60,), (60,), (15,), (15,)]
    assert r.lens_layers == (2, 3) and r.logit_lens()[:2] == [[], []]  # the lens: the last stage only (test_swin_lens)
    for call, key in ((r.dino_masks, "dino_masks"), (r.register_attention, "registers")):
        with pytest.raises(BadParameterError) as e:
            call()
        assert str(e.value) == UNDEFINED[key]


def _timm_stage_by_stage(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Every block's output [B, N, C] by running timm's own modules one by one (patch embedding, each stage's
    downsampling, then its blocks), no hooks."""
    outs = []
    with torch.no_grad():
        h = model.patch_embed(x)  # [B, H, W, C]
        for stage in model.layers:
            h = stage.downsample(h)
            for blk in stage.blocks:
                h = blk(h)
                outs.append(h.reshape(h.shape[0], -1, h.shape[-1]))
    return outs


def test_timm_block_outputs_equal_the_models_own_stages(vm):
    """The kept outputs equal timm's forward_intermediates (the last block of each stage, NCHW) and the stages run
    block by block, to 1e-5; their norms too."""
    r = vizapp.analyze(vm, random_image(2))
    x = r.input
    with torch.no_grad():
        stages = vm.model.forward_intermediates(x, norm=False, intermediates_only=True)  # [B, C, H, W] per stage
    assert len(stages) == 2
    for layer, stage in ((1, 0), (3, 1)):  # the last block of each stage
        ref = stages[stage][0].permute(1, 2, 0)  # [H, W, C]
        assert tuple(ref.shape[:2]) == r.layer_grids[layer]
        torch.testing.assert_close(r.block_outputs[layer], ref.reshape(-1, ref.shape[-1]), atol=1e-5, rtol=0)
    for layer, ref in enumerate(_timm_stage_by_stage(vm.model, x)):
        torch.testing.assert_close(r.block_outputs[layer], ref[0], atol=1e-5, rtol=0)
        np.testing.assert_allclose(r.token_norms()[layer], ref[0].norm(dim=-1).numpy(), atol=1e-5)


@pytest.mark.parametrize("kind", ["swin", "swinv2"])
def test_transformers_block_outputs_equal_its_reshaped_hidden_states(tmp_path, kind):
    """A transformers Swin / Swinv2 folder (a 9x9 grid padded to windows of 4, then 5x5): each stage's last block
    output equals the encoder's reshaped_hidden_states before downsampling ([B, C, H, W], the library's own), to 1e-5."""

    model_cls, cfg = hf_swin(kind)
    random_tables(model_cls(cfg)).save_pretrained(tmp_path)
    vm = vizapp.load_model(str(tmp_path), device="cpu")
    r = vizapp.analyze(vm, random_image(3))
    assert r.layer_grids == ((9, 9), (9, 9), (5, 5), (5, 5)) and sorted(r.block_outputs) == [0, 1, 2, 3]
    base = getattr(vm.model, kind)
    with torch.no_grad():
        emb, dims = base.embeddings(r.input)
        enc = base.encoder(emb, dims, output_hidden_states=True, output_hidden_states_before_downsampling=True)
    states = enc.reshaped_hidden_states[1:]  # [B, C, H, W] per stage, the stem's first
    for layer, stage in ((1, 0), (3, 1)):
        ref = states[stage][0].permute(1, 2, 0)
        assert tuple(ref.shape[:2]) == r.layer_grids[layer]
        torch.testing.assert_close(r.block_outputs[layer], ref.reshape(-1, ref.shape[-1]), atol=1e-5, rtol=0)
        np.testing.assert_allclose(r.token_norms()[layer], ref.reshape(-1, ref.shape[-1]).norm(dim=-1), atol=1e-5)


def test_budget_keeps_all_layers_or_the_last_and_forms_the_others_again(vm, monkeypatch):
    """The tiny Swin's outputs take 2·60·16·4 + 2·15·32·4 = 11520 bytes per image: at that budget every layer is
    kept, one byte less only the last; the app's views then draw the last layer and say so, the API forms another layer
    by one more forward of the same network (equal to the kept one), and after the weights change it is refused, not
    formed by another network."""
    from vizapp import feature_views_windows as FV
    from vizapp import limits
    from vizapp.models.swin import analysis_memory

    def held(r: WindowAnalysis) -> int:  # what the record holds of the block outputs and norms, in bytes
        return sum(o.numel() * 4 for o in r.block_outputs.values()) + sum(n.size * 4 for n in r.token_norms())

    monkeypatch.setattr(limits, "BLOCK_OUTPUT_BYTES", 11520)
    full = vizapp.analyze(vm, random_image(4))
    assert sorted(full.block_outputs) == [0, 1, 2, 3]
    assert analysis_memory(vm)["block_outputs"] == held(full) == 11520 + 150 * 4  # the load-time estimate
    monkeypatch.setattr(limits, "BLOCK_OUTPUT_BYTES", 11519)
    r = vizapp.analyze(vm, random_image(4))
    assert sorted(r.block_outputs) == [3] and len(r.token_norms()) == 4  # the norms of every layer, always
    assert analysis_memory(vm)["block_outputs"] == held(r) == 15 * 32 * 4 + 150 * 4
    torch.testing.assert_close(r.block_outputs[3], full.block_outputs[3], atol=0, rtol=0)
    assert not r.feature_kept(0) and FV.feature_layer(full, 0) == (0, "")
    # the app's views, redrawn on every control change, run no forward: they draw the kept layer and say so
    shown, note = FV.feature_layer(r, 1)
    assert shown == 3 and "Layer 1's tokens were not kept" in note and "showing layer 3" in note
    assert "showing layer 3" in FV.feature_pca_view(r, 1).layout.title.text.replace("<br>", " ")
    assert np.asarray(FV.feature_similarity_view(r, (5, 9), 1).data[1].z).shape == (3, 5)  # layer 3's grid
    # the API forms the layer again by one forward of the same network
    np.testing.assert_allclose(r.feature_pca(0), full.feature_pca(0), atol=1e-5)
    np.testing.assert_allclose(r.feature_similarity((2, 3), 1), full.feature_similarity((2, 3), 1), atol=1e-5)
    stale = vizapp.analyze(vm, random_image(5))
    w = vm.model.head.fc.weight
    saved = w.detach().clone()
    w.data.mul_(2.0)
    try:
        with pytest.raises(StaleResultError):
            stale.feature_pca(0)
    finally:
        w.data.copy_(saved)


def test_pca_across_images_is_one_pca_at_the_layers_grid(vm):
    """The shared PCA of one image is that image's own PCA (the API's), at the layer's grid and token spacing."""
    from vizapp.swin_features import feature_pca_images

    img = random_image(6)
    rgbs, stride = feature_pca_images(vm, [img], layer=2)
    assert rgbs.shape == (1, 3, 5, 3) and stride == (8, 8)
    np.testing.assert_allclose(rgbs[0], vizapp.analyze(vm, img).feature_pca(2), atol=1e-5)
    np.testing.assert_array_equal(vizapp.feature_pca(vm, [img], layer=2), rgbs)  # the public API goes there too
    with pytest.raises(BadParameterError, match="layer must be an integer"):
        feature_pca_images(vm, [img], layer=4)


# -- the app, through gradio's server ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def swin_app(tmp_path_factory):
    folder = write_swin_folder(tmp_path_factory.mktemp("swinfeat"))
    demo = start_app(folder)
    yield demo.local_url, folder
    demo.close()


@pytest.mark.timeout(600)
def test_the_features_tab_draws_a_swin_layer_through_the_server(swin_app, tmp_path, caplog, capfd):
    """The transformers Swin folder (9x9 tokens 4 px apart, then 5x5 at 8 px): the Features tab is shown; at layer 2
    and the clicked first-stage patch (6, 1), which lies in layer 2's token (3, 0), the similarity map is that token's
    cosine to every token of the 5x5 grid, drawn 8 px apart, equal to the Python API's; the PCA and the token norms of
    layer 2 are on the same grid; DINO masks say why they are not drawn, the logit lens why it is drawn for the last
    stage only; the export holds the same arrays."""
    from vizapp.swin_result import FEATURES

    caplog.set_level(logging.WARNING)
    url, folder = swin_app
    photo = tmp_path / "a.png"
    Image.open(EXAMPLES / "chelsea.png").save(photo)
    d = AppDriver(url)
    assert_clean(d.analyze(photo), "analyze")
    assert d.props[d.by_elem_id("vizapp-features-body")]["visible"] is True
    assert FEATURES in d.values[d.by_elem_id("vizapp-status")]
    rows = [cid for cid in d.components if d.kind(cid) == "slider" and d.props[cid].get("label") == "Patch row"]
    cols = [cid for cid in d.components if d.kind(cid) == "slider" and d.props[cid].get("label") == "Patch column"]
    feat_row, feat_col = rows[-1], cols[-1]  # the Features tab's (built after the Heads tab's)
    assert_clean(d.set(d.by_label("Feature layer", "slider"), 2), "feature layer 2")
    assert_clean(d.set(d.by_label("Norm layer", "slider"), 2), "norm layer 2")
    assert_clean(d.set(feat_row, 6), "feature row")
    assert_clean(d.set(feat_col, 1), "feature column")
    r = vizapp.analyze(vizapp.load_model(folder), Image.open(photo))
    sim = plot_of(d, "vizapp-similarity-plot")
    heat = next(t for t in sim["data"] if t["type"] == "heatmap")
    assert heat["dx"] == 8 and "token (3, 0)" in sim["layout"]["title"]["text"]
    want = r.feature_similarity((3, 0), 2)
    assert want.shape == (5, 5) and want[3, 0] == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(heatmap_z(heat), (want - want.min()) / (want.max() - want.min()), atol=1e-5)
    raw = heat["customdata"]
    raw = heatmap_z({"z": raw}) if isinstance(raw, dict) else np.asarray(raw, dtype=float)
    np.testing.assert_allclose(raw[..., 2], want, atol=1e-5)  # the cosines themselves, in the hover
    pca_title = plot_of(d, "vizapp-pca-plot")["layout"]["title"]["text"].replace("<br>", " ")
    assert "Feature PCA after layer 2 (stage 1, 5x5 tokens 8 px apart)" in pca_title
    norm = next(t for t in plot_of(d, "vizapp-norm-grid-plot")["data"] if t["type"] == "heatmap")
    np.testing.assert_allclose(heatmap_z(norm), r.token_norms()[2].reshape(5, 5), rtol=1e-5)
    assert UNDEFINED["registers"] in d.values[d.by_elem_id("vizapp-norm-sentence")]
    assert d.values[d.by_elem_id("vizapp-mask-note")] == UNDEFINED["dino_masks"]
    assert d.values[d.by_elem_id("vizapp-lens-note")].startswith(UNDEFINED["logit_lens"])  # the last stage's only
    assert d.props[d.by_elem_id("vizapp-mask-plot")]["visible"] is False
    assert_clean(d.click(d.by_label("Export these arrays", "button")), "export")
    npz = np.load(d.values[d.by_elem_id("vizapp-features-npz")]["path"])
    np.testing.assert_allclose(npz["feature_similarity"], want, atol=1e-5)
    np.testing.assert_allclose(npz["feature_pca_rgb"], r.feature_pca(2), atol=1e-5)
    assert_clean(d.click(d.by_label("PCA across examples", "button")), "PCA across examples")
    assert "after layer 2" in plot_of(d, "vizapp-gallery-plot")["layout"]["title"]["text"].replace("<br>", " ")
    assert_clean(d.click(d.by_label("Download every figure", "button")), "every figure")
    import zipfile

    with zipfile.ZipFile(d.values[d.by_elem_id("vizapp-figures-zip")]["path"]) as z:
        names = {Path(n).stem for n in z.namelist()}
    assert {"features-pca", "features-similarity", "features-norm-grid", "features-norms-by-depth"} <= names, names
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err
    assert not [x for x in caplog.records if x.levelno >= logging.ERROR], [x.getMessage() for x in caplog.records]


def test_a_batch_keeps_each_images_own_block_outputs(vm):
    """A batch of two (with the gradient-enabled forward) keeps, for each image, the block outputs and norms of that
    image analysed alone, outside the autograd graph."""
    both = vizapp.analyze(vm, [random_image(7), random_image(8)], gradients=True)
    alone = vizapp.analyze(vm, random_image(8))
    for layer in range(4):
        assert not both[1].block_outputs[layer].requires_grad
        torch.testing.assert_close(both[1].block_outputs[layer], alone.block_outputs[layer], atol=1e-6, rtol=0)
        np.testing.assert_allclose(both[1].token_norms()[layer], alone.token_norms()[layer], atol=1e-6)
    assert not torch.equal(both[0].block_outputs[0], both[1].block_outputs[0])
