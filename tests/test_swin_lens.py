"""Swin's logit lens over its last stage, its exports and head importance in the app's downloads: the lens worked out
by hand on known tokens and a known head, the last layer's lens against the model's own output (timm and transformers,
Swin and Swin V2), every last-stage layer against the library's own blocks read through its own norm, pooling and
head; the Features tab's lens view, its export and the figures .zip (head importance included) through gradio's real
server; and the API export's block norms against the norms the analysis kept."""

from __future__ import annotations

import json
import logging
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from appdriver import AppDriver, assert_clean, plot_of
from conftest import needs_timm_1_0_31, random_image, start_app
from PIL import Image
from test_swin import TINY, hf_swin, random_tables, write_swin_folder

import vizapp
from vizapp.errors import BadParameterError
from vizapp.models.swin import token_lens
from vizapp.swin_result import UNDEFINED

EXAMPLES = vizapp.models.ASSETS_DIR / "examples"


def _spread(model: torch.nn.Module) -> None:
    """Weights far from the small random init, so that the lens of one layer differs visibly from the next's (and
    Swin V2's post-norms, which start at 0, pass their branches)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.normal_(0, 0.3)
            elif isinstance(m, torch.nn.LayerNorm):
                m.weight.fill_(1.0)


def _timm_vm(name: str = "swin_tiny_patch4_window7_224", **kw):
    torch.manual_seed(0)
    vm = vizapp.load_model(name, pretrained=False, device="cpu", **{**TINY, **kw})
    _spread(vm.model)
    return vm


def _hf_vm(folder: Path, kind: str):
    model_cls, cfg = hf_swin(kind)
    model = random_tables(model_cls(cfg))
    _spread(model)
    model.save_pretrained(folder)
    return vizapp.load_model(str(folder), device="cpu")


def _vm(family: str, tmp_path: Path):
    if family == "timm":
        return _timm_vm()
    if family == "timm_v2":
        return _timm_vm("swinv2_tiny_window8_256")
    return _hf_vm(tmp_path / family, family)


def _library_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The library's own blocks of the last stage, in order."""
    if hasattr(model, "layers"):  # timm
        return list(model.layers[-1].blocks)
    base = model.swin if hasattr(model, "swin") else model.swinv2
    return list(base.encoder.layers[-1].blocks)


def _by_hand(model: torch.nn.Module, out: torch.Tensor) -> torch.Tensor:
    """A last-stage block's output as the library gives it (timm [B, H, W, C], transformers [B, N, C]) through the
    final norm, the mean over tokens and the linear head written out here (not the library's head call)."""
    if hasattr(model, "layers"):  # timm: model.norm, then head.fc of the average over the grid
        z = model.norm(out).flatten(1, 2)
        return z.mean(1) @ model.head.fc.weight.T + model.head.fc.bias
    base = model.swin if hasattr(model, "swin") else model.swinv2
    z = base.layernorm(out)
    return z.mean(1) @ model.classifier.weight.T + model.classifier.bias


@pytest.mark.parametrize("family", ["timm", pytest.param("timm_v2", marks=needs_timm_1_0_31), "swin", "swinv2"])
def test_the_lens_is_the_last_stages_blocks_through_the_models_own_head(tmp_path, family):
    """The last layer's lens equals the model's own probabilities (to 1e-5), and every last-stage layer's equals its
    block's output, caught by a hook on the library's block, through the norm, mean and head written out by hand;
    the earlier stage's rows are NaN and its top-k rows empty; the layers differ."""
    vm = _vm(family, tmp_path)
    image = random_image(3)
    r = vizapp.analyze(vm, image)
    model = vm.model
    blocks = _library_blocks(model)
    outs: dict[int, torch.Tensor] = {}
    hooks = [
        b.register_forward_hook(lambda _m, _a, o, i=i: outs.__setitem__(i, o[0] if isinstance(o, tuple) else o))
        for i, b in enumerate(blocks)
    ]
    try:
        with torch.no_grad():
            own = vm.logits(r.input)
    finally:
        for h in hooks:
            h.remove()
    own_probs = torch.softmax(own.float(), -1)[0].numpy()
    assert r.lens_layers == (2, 3) and r.lens_probs.shape == (4, 5)
    assert np.isnan(r.lens_probs[:2]).all() and np.isfinite(r.lens_probs[2:]).all()
    np.testing.assert_allclose(r.lens_probs[-1], r.probs, atol=1e-5, rtol=0)
    np.testing.assert_allclose(r.lens_probs[-1], own_probs, atol=1e-5, rtol=0)
    with torch.no_grad():
        for j, layer in enumerate(r.lens_layers):
            want = torch.softmax(_by_hand(model, outs[j]).float(), -1)[0].numpy()
            np.testing.assert_allclose(r.lens_probs[layer], want, atol=1e-5, rtol=0)
    diff = float(np.abs(r.lens_probs[2] - r.lens_probs[3]).max())
    print(f"{family}: lens layer 2 vs 3 differ by {diff:.3e}")
    assert diff > 1e-3  # each layer is read on its own
    rows = r.logit_lens(k=2)
    assert rows[0] == [] and rows[1] == [] and len(rows[3]) == 2
    assert rows[3][0][0] == r.top_k[0][0] and rows[3][0][1] == pytest.approx(r.top_k[0][1], abs=1e-5)


@pytest.mark.parametrize("family", ["timm", "swin"])
def test_the_lens_by_hand_on_known_tokens(tmp_path, family):
    """Known last-stage tokens through :func:`token_lens`: on the 3x5 grid, 10 tokens are (+1, -1, 0, ...) and 5 are
    (-1, +1, 0, ...) of width C; the final norm (weight 1, bias 0) makes each ±(s, -s, 0, ...) with
    s = 1 / sqrt(2/C + eps); their mean is (s/3, -s/3, 0, ...); a head whose row k is (k, 0, ...) with no bias gives
    logit k·s/3, so the lens is softmax(k·s/3) over k = 0..4, whatever the weights before the last stage."""
    model = _vm(family, tmp_path).model
    if family == "timm":
        norm, fc = model.norm, model.head.fc
    else:
        norm, fc = model.swin.layernorm, model.classifier
    with torch.no_grad():
        norm.weight.fill_(1.0)
        norm.bias.zero_()
        fc.weight.zero_()
        fc.weight[:, 0] = torch.arange(5.0)
        fc.bias.zero_()
    c = fc.in_features
    tokens = torch.zeros(1, 15, c)
    signs = torch.tensor([1.0] * 10 + [-1.0] * 5)[torch.randperm(15, generator=torch.Generator().manual_seed(0))]
    tokens[0, :, 0], tokens[0, :, 1] = signs, -signs
    s = 1 / np.sqrt(2 / c + norm.eps)
    want = np.exp(np.arange(5) * s / 3)
    want /= want.sum()
    with torch.no_grad():
        got = torch.softmax(token_lens(model)(tokens, (3, 5)), -1)[0].numpy()
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
    assert want[-1] > 0.5  # the hand value is far from uniform


def test_without_a_head_there_is_no_lens():
    """A timm Swin without a classifier: no lens, and asking for it says why in one sentence."""
    vm = _timm_vm(num_classes=0)
    r = vizapp.analyze(vm, random_image(0))
    assert r.lens_probs is None and r.lens_layers == ()
    with pytest.raises(BadParameterError, match="no classifier head, so there is no logit lens"):
        r.logit_lens()


def test_a_batch_keeps_each_images_own_lens():
    """A gradient-enabled batch of two: each image's lens is that image's alone, outside the graph."""
    vm = _timm_vm()
    both = vizapp.analyze(vm, [random_image(7), random_image(8)], gradients=True)
    alone = vizapp.analyze(vm, random_image(8))
    np.testing.assert_allclose(both[1].lens_probs, alone.lens_probs, atol=1e-6, equal_nan=True)
    assert float(np.nanmax(np.abs(both[0].lens_probs - both[1].lens_probs))) > 1e-4


def test_the_lens_views_and_the_features_export():
    """The lens table has the last stage's layers only, the curve sits at those layers with the lens' values, the
    note says why the earlier layers have none, and the Features arrays hold the lens with its layers."""
    from vizapp import feature_views_windows as FV

    vm = _timm_vm()
    r = vizapp.analyze(vm, random_image(1))
    label = r.labels[2]
    lens = FV.logit_lens_views(r, label)
    assert [row[0] for row in lens.table] == [2, 3] and len(lens.table[0]) == 6
    assert lens.table[1][1] == f"{r.top_k[0][0]} ({r.top_k[0][1]:.3f})"
    assert list(lens.depth.data[0].x) == [2, 3]
    np.testing.assert_allclose(lens.depth.data[0].y, r.lens_probs[[2, 3], 2])
    assert FV.lens_note(r) == UNDEFINED["logit_lens"] + " Shown for layers 2-3: stage 1, 3x5 tokens."
    with pytest.raises(BadParameterError, match="unknown class"):
        FV.logit_lens_views(r, "no such class")
    arrays = FV.feature_arrays(r, -1)
    np.testing.assert_array_equal(arrays["logit_lens_probs"], r.lens_probs)
    np.testing.assert_array_equal(arrays["logit_lens_layers"], [2, 3])


def test_the_api_export_holds_the_block_norms_as_the_plain_vit_does(card_model):
    """``arrays()`` and ``summary()`` hold the per-block norm statistics under the plain ViT's names (the plain ViT
    keeps its per-token norms and block outputs out of ``arrays()`` too: they are in the Features tab's .npz), and
    they equal the mean and the largest of the norms the analysis kept for each layer."""
    vm = _timm_vm()
    r = vizapp.analyze(vm, random_image(2))
    plain = vizapp.analyze(vizapp.load_model(card_model), random_image(2))
    arrays, summary = r.arrays(), r.summary()
    stats = {k for k in arrays if k.startswith("statistic_")}
    assert stats == {k for k in plain.arrays() if k.startswith("statistic_")}
    assert {"statistic_norm_patch_mean", "statistic_norm_patch_max"} <= stats
    assert not any("block_output" in k for k in (*arrays, *plain.arrays()))
    means = [float(n.astype(np.float64).mean()) for n in r.block_norms]
    maxes = [float(n.max()) for n in r.block_norms]
    np.testing.assert_allclose(arrays["statistic_norm_patch_mean"], means, rtol=1e-5)
    np.testing.assert_allclose(arrays["statistic_norm_patch_max"], maxes, rtol=1e-5)
    np.testing.assert_allclose(summary["statistics"]["norm_patch_mean"], means, rtol=1e-5)
    assert np.isnan(arrays["statistic_norm_prefix_mean"]).all()  # no prefix tokens; the notes say why
    assert "norm_prefix_mean" in summary["statistics_undefined"]
    json.dumps(summary)


# -- the app, through gradio's server ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def swin_app(tmp_path_factory):
    folder = write_swin_folder(tmp_path_factory.mktemp("swinlens"))
    demo = start_app(folder)
    yield demo.local_url, folder
    demo.close()


def _numbers(values) -> np.ndarray:
    import base64

    if isinstance(values, dict):
        return np.frombuffer(base64.b64decode(values["bdata"]), dtype=values["dtype"]).astype(float)
    return np.asarray([np.nan if v is None else v for v in values], dtype=float)


@pytest.mark.timeout(900)
def test_the_lens_and_head_importance_exports_through_the_server(swin_app, tmp_path, caplog, capfd):
    """The transformers Swin folder (stages of 9x9 and 5x5 tokens, layers 2-3 the last stage): the Features tab's
    lens table and curve are the Python API's lens at layers 2 and 3, following the class picked; the note says why
    the earlier layers have none; after the exact head ablation, the Features .npz holds the [4, 6] importance with
    NaN for the heads the first stage lacks, equal to the plot, with the lens; the figures .zip holds the head
    importance and the lens figures."""
    caplog.set_level(logging.WARNING)
    url, folder = swin_app
    photo = tmp_path / "a.png"
    Image.open(EXAMPLES / "chelsea.png").save(photo)
    d = AppDriver(url)
    assert_clean(d.analyze(photo), "analyze")
    r = vizapp.analyze(vizapp.load_model(folder), Image.open(photo))
    note = d.values[d.by_elem_id("vizapp-lens-note")]
    assert note == UNDEFINED["logit_lens"] + " Shown for layers 2-3: stage 1, 5x5 tokens."
    table = d.values[d.by_elem_id("vizapp-lens-table")]
    rows = table["data"] if isinstance(table, dict) else table
    assert [int(row[0]) for row in rows] == [2, 3]
    top = r.logit_lens(5)
    assert [list(row[1:]) for row in rows] == [[f"{lbl} ({p:.3f})" for lbl, p in top[i]] for i in (2, 3)]
    lens_class = d.by_label("Class to follow across depth (type to search)", "dropdown")
    for label in (r.top_k[0][0], r.top_k[-1][0]):
        assert_clean(d.set(lens_class, label), f"lens class {label}")
        curve = plot_of(d, "vizapp-lens-plot")["data"][0]
        assert list(_numbers(curve["x"])) == [2, 3]
        np.testing.assert_allclose(_numbers(curve["y"]), r.lens_probs[[2, 3], r.labels.index(label)], atol=1e-6)
    assert_clean(d.click(d.by_label("Exact ablation", "button")), "exact head ablation")
    plotted = plot_of(d, "vizapp-importance-plot")["data"][0]["z"]
    assert_clean(d.click(d.by_label("Export these arrays", "button")), "features export")
    npz = np.load(d.values[d.by_elem_id("vizapp-features-npz")]["path"])
    imp = npz["head_importance_exact"]
    assert imp.shape == (4, 6) and np.isnan(imp[:2, 3:]).all() and np.isfinite(imp[2:]).all()
    if isinstance(plotted, dict):
        plotted = _numbers(plotted).reshape(4, 6)
    np.testing.assert_allclose(imp, np.asarray(plotted, dtype=float), atol=1e-6, equal_nan=True)
    np.testing.assert_allclose(npz["logit_lens_probs"], r.lens_probs, atol=1e-6, equal_nan=True)
    assert_clean(d.click(d.by_label("Download every figure", "button")), "every figure")
    with zipfile.ZipFile(d.values[d.by_elem_id("vizapp-figures-zip")]["path"]) as z:
        names = {Path(n).stem for n in z.namelist()}
        page = z.read(next(n for n in z.namelist() if Path(n).stem == "features-head-importance")).decode()
    assert {"features-head-importance", "features-logit-lens"} <= names, names
    assert "Head importance" in page
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err
    assert not [x for x in caplog.records if x.levelno >= logging.ERROR], [x.getMessage() for x in caplog.records]
