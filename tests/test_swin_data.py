"""Swin beyond one image (issue 25): dataset mode and the dataset evaluation run windowed models, with the statistics
and maps vizapp.analyze gives each image; transformers Swin hub ids load offline from the cache; the heads mosaic's
title fits its plot."""

from __future__ import annotations

import csv
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import vizapp
from tests.conftest import random_image
from tests.test_swin import TINY, write_swin_folder
from vizapp import stats
from vizapp.analysis import windows as W
from vizapp.errors import VizappError
from vizapp.windows import WindowGeometry

METHODS = "rollout,grad_rollout,relevance,last_layer,random"
ROOT2 = math.sqrt(2)


@pytest.fixture(scope="module")
def timm_swin():
    """6x10 then 3x5 grids, windows of 4 (padded), heads 2, 2, 4, 4."""
    torch.manual_seed(0)
    return vizapp.load_model("swin_tiny_patch4_window7_224", pretrained=False, device="cpu", **TINY)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> str:
    """A transformers Swin classifier folder: 36 px, a 9x9 first grid (windows of 4, padded), then 5x5; heads 3, 6."""
    return write_swin_folder(tmp_path_factory.mktemp("swin-folder"), heads=(3, 6))


@pytest.fixture(scope="module")
def hf_swin(hf_folder):
    return vizapp.load_model(hf_folder, device="cpu")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Five PNGs of different sizes and one file that is not an image."""
    root = tmp_path_factory.mktemp("swin-images")
    for i in range(5):
        random_image(i, size=(30 + 7 * i, 50 - 4 * i)).save(root / f"img{i}.png")
    (root / "broken.png").write_bytes(b"\x89PNG not really")
    return root


def images_of(folder: Path) -> list[Path]:
    return sorted(folder.glob("img*.png"))


# -- statistics of windowed layers ---------------------------------------------------------------------------------


def test_window_statistics_by_hand_with_a_padded_window():
    """A 1x3 grid of 4-px tokens, windows of 2x2 (padded to 2x4: windows {0, 1} and {2}), and the library's uniform
    attention over all four slots of each window, padded ones included. Over the real keys, tokens 0 and 1 split
    their attention between each other (distance 4/2 = 2 px, entropy log 2) and token 2 sees only itself (0 px,
    entropy 0): the layer's mean distance is 4/3 px and its entropy 2·log 2 / 3."""
    from vizapp.statistics import STATISTICS, StatisticsReducer
    from vizapp.statistics_pass import feed_window_layer

    g = WindowGeometry(grid=(1, 3), window=(2, 2), shift=(0, 0), pad_first=False, stage=0)
    index = W.window_index(g.grid, g.window, g.shift)
    assert index.tolist() == [[0, 1, -1, -1], [2, -1, -1, -1]]
    attn = torch.full((1, 2, 1, 4, 4), 0.25)  # [B, nW, H, w², w²]
    rows = W.token_rows(attn, index, 3)[0, 0]  # [N, w²]
    assert rows.tolist() == [[0.5, 0.5, 0, 0], [0.5, 0.5, 0, 0], [1, 0, 0, 0]]
    assert W.token_key_distances(index, g.grid, (4, 4)).tolist() == [[0, 4, 0, 0], [4, 0, 0, 0], [0, 0, 0, 0]]
    red = StatisticsReducer([1], 1, None, [STATISTICS["distance"], STATISTICS["entropy"]], device="cpu")
    feed_window_layer(red, 0, attn, g, (4, 4))
    assert red.complete()
    assert red.values["distance"][0, 0, 0].item() == pytest.approx(4 / 3)
    assert red.values["entropy"][0, 0, 0].item() == pytest.approx(2 * math.log(2) / 3)
    assert float(W.mean_distance(attn[0], index, g.grid, (4, 4))[0]) == pytest.approx(4 / 3)  # the direct formula


def test_token_row_gather_by_hand():
    """A 2x2 grid in windows of 1x2 (windows {0, 1} and {2, 3}), 2 heads: the window rows are (window, head, slot),
    so head 0's tokens 0..3 are rows 0, 1, 4, 5 and head 1's are rows 2, 3, 6, 7."""
    index = W.window_index((2, 2), (1, 2), (0, 0))
    assert index.tolist() == [[0, 1], [2, 3]]
    slots = W.token_slots(index, 4)
    assert W.token_row_gather(slots, 2, 2).tolist() == [0, 1, 4, 5, 2, 3, 6, 7]


@pytest.mark.parametrize("pad_first", [False, True])
def test_token_rows_equal_each_row_read_from_its_window(pad_first):
    """token_rows (one gather of every head's rows) equals each (image, head, token) row read from the token's own
    window slot one by one, renormalised over the real keys, on a shifted layer padded at the edge (5x7 grid, windows
    of 3, shift 1), with and without the precomputed gather, and written into a caller's buffer."""
    torch.manual_seed(0)
    g = WindowGeometry(grid=(5, 7), window=(3, 3), shift=(1, 1), pad_first=pad_first, stage=0)
    index = W.window_index(g.grid, g.window, g.shift, g.pad_first)
    n, h = 35, 3
    attn = torch.softmax(torch.randn(2, g.num_windows, h, 9, 9), -1)  # [B, nW, H, w², w²]
    rows = W.token_rows(attn, index, n)
    slots = W.token_slots(index, n)
    gather = W.token_row_gather(slots, h, 9)
    assert torch.equal(W.token_rows(attn, index, n, slots, gather), rows)
    buffer = torch.full((attn.numel(),), float("nan"))  # the caller's buffer: the rows are written into it
    into = W.token_rows(attn, index, n, slots, gather, buffer)
    assert torch.equal(into, rows) and into.data_ptr() == buffer.data_ptr()
    with pytest.raises(ValueError, match="buffer"):
        W.token_rows(attn, index, n, slots, gather, torch.empty(rows.numel() - 1))
    assert rows.shape == (2, h, n, 9) and rows.is_contiguous()
    for t in range(n):
        w, s = divmod(int(slots[t]), 9)
        assert int(index[w, s]) == t
        real = (index[w] >= 0).float()
        for b in range(2):
            for head in range(h):
                expect = attn[b, w, head, s] * real
                torch.testing.assert_close(rows[b, head, t], expect / expect.sum(), rtol=1e-6, atol=0)


def _reduce_one_layer(attn, g, chosen, window_layout=True, monkeypatch=None):
    """The reducer's values for one windowed layer fed by feed_window_layer (with its scratch), and how many images
    went through the library's window layout (StatisticsReducer.put_rows)."""
    from vizapp import statistics_pass
    from vizapp.statistics import StatisticsReducer

    red = StatisticsReducer([attn.shape[2]], attn.shape[0], None, chosen, device="cpu")
    put = []
    real_put = red.put_rows
    red.put_rows = lambda *a: put.append(a[1]) or real_put(*a)
    if not window_layout:
        monkeypatch.setattr(statistics_pass, "_in_window_layout", lambda *a: False)
    statistics_pass.feed_window_layer(red, 0, attn, g, (4, 4), [])
    assert red.complete()
    return red.values, len(put)


def test_window_layout_statistics_equal_the_token_rows(monkeypatch):
    """Second code path: an unpadded shifted layer (6x6 grid, windows of 3, shift 1, 3 heads, 2 images) reduced where
    the library left its rows (MeanDistance and AttentionEntropy's window_rows) gives exactly the values of the rows
    gathered in token order; a windowed statistic without window_rows makes the layer take the gathered rows."""
    from vizapp import statistics

    torch.manual_seed(1)
    g = WindowGeometry(grid=(6, 6), window=(3, 3), shift=(1, 1), pad_first=False, stage=0)
    attn = torch.softmax(3 * torch.randn(2, g.num_windows, 3, 9, 9), -1)
    chosen = [statistics.STATISTICS["distance"], statistics.STATISTICS["entropy"]]
    fast, put = _reduce_one_layer(attn, g, chosen)
    assert put == 2  # both images through the window layout
    with monkeypatch.context() as m:
        slow, put = _reduce_one_layer(attn, g, chosen, window_layout=False, monkeypatch=m)
    assert put == 0
    for name in ("distance", "entropy"):
        assert torch.equal(fast[name], slow[name]), name

    class Largest(statistics.HeadStatistic):  # a user's windowed statistic with rows only
        name, label, unit, windowed = "largest_rows_only", "largest weight", "", True

        def rows(self, attn, row, geometry, out, work):
            torch.amax(attn, dim=-1, out=out)

    mixed, put = _reduce_one_layer(attn, g, [*chosen, Largest()])
    assert put == 0 and torch.equal(mixed["distance"], slow["distance"])
    torch.testing.assert_close(mixed["largest_rows_only"][0], attn.amax(-1).mean((1, 3)).double())


def test_put_rows_refuses_values_of_another_shape():
    from vizapp import statistics

    red = statistics.StatisticsReducer(
        [2], 1, statistics.Geometry(4, 0, torch.zeros(4, 4)), statistics.head_statistics()
    )
    with pytest.raises(ValueError, match="2 heads x 4 rows"):
        red.put_rows(0, 0, {s.name: torch.zeros(2, 3) for s in statistics.head_statistics()})


def test_dataset_mode_on_uniform_windows_by_hand(tmp_path):
    """A Swin whose q, k and relative bias are zero attends uniformly within each window (4x4 grid of 4-px tokens,
    windows 2x2). Layer 0 (no shift): every token's window is a full 2x2 block, distance (0 + 4 + 4 + 4√2) / 4 =
    2 + √2 px, entropy log 4. Layer 1 (shift 1, with the library's mask): the 4 centre tokens share a window
    (2 + √2 px), the 8 edge tokens pair up with their wrapped neighbour (2 px, log 2), the 4 corners are alone (0):
    mean (4·(2 + √2) + 8·2) / 16 = 1.5 + √2/4 px, entropy (4·log 4 + 8·log 2) / 16 = log 2."""
    from vizapp.models import MODEL_CACHE

    torch.manual_seed(0)
    kwargs = dict(img_size=16, embed_dim=8, depths=(2,), num_heads=(2,), window_size=2, num_classes=3)
    vm = vizapp.load_model("swin_tiny_patch4_window7_224", pretrained=False, device="cpu", **kwargs)
    MODEL_CACHE.clear()  # the model is edited below: no later load gets it
    with torch.no_grad():
        for blk in vm.model.layers[0].blocks:
            blk.attn.qkv.weight.zero_()
            blk.attn.qkv.bias.zero_()
            blk.attn.relative_position_bias_table.zero_()
    for i in range(3):
        random_image(i, size=(20, 24)).save(tmp_path / f"{i}.png")
    res = stats.collect_stats(vm, stats.find_images(tmp_path), batch_size=2)
    assert res.n_images == 3 and res.heads == [2, 2] and res.windowed
    expect_distance = [[2 + ROOT2] * 2, [1.5 + ROOT2 / 4] * 2]
    np.testing.assert_allclose(res.mean_distance, expect_distance, atol=1e-5)
    np.testing.assert_allclose(res.statistics["entropy"], [[math.log(4)] * 2, [math.log(2)] * 2], atol=1e-5)


@pytest.mark.parametrize("family", ["timm", "hf"])
def test_dataset_mode_equals_the_mean_of_analyze(family, timm_swin, hf_swin, folder):
    """Second code path: vizapp.analyze of each image alone (its own decode, transform and forward), then the mean;
    every registered statistic, to 1e-5, with NaN where a layer has no such head and where a statistic is not
    defined for Swin (said in one sentence)."""
    vm = timm_swin if family == "timm" else hf_swin
    res = stats.collect_stats(vm, stats.find_images(folder), batch_size=3)
    assert res.n_images == 5 and [Path(p).name for p, _ in res.skipped] == ["broken.png"]
    analyses = [vizapp.analyze(vm, p) for p in images_of(folder)]
    for name, got in res.statistics.items():
        want = np.mean([r.statistics[name] for r in analyses], axis=0)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, equal_nan=True, err_msg=name)
    heads = [2, 2, 4, 4] if family == "timm" else [3, 3, 6, 6]
    assert res.heads == heads and res.mean_distance.shape == (4, max(heads))
    for layer, h in enumerate(heads):
        assert np.isfinite(res.mean_distance[layer, :h]).all() and np.isnan(res.mean_distance[layer, h:]).all()
        assert np.isfinite(res.statistics["entropy"][layer, :h]).all()
    assert np.isfinite(res.statistics["norm_patch_mean"]).all() and np.isnan(res.statistics["norm_prefix_mean"]).all()
    assert "no prefix tokens" in res.undefined["norm_prefix_mean"]


def test_dataset_mode_command_line_on_a_swin_folder(hf_folder, hf_swin, folder, tmp_path, capsys):
    out_csv, out_html = tmp_path / "s.csv", tmp_path / "d.html"
    argv = [str(folder), "--model", hf_folder, "--out-csv", str(out_csv), "--out-html", str(out_html)]
    assert stats.main([*argv, "--batch-size", "2", "--no-progress", "--baseline-batches", "0"]) == 0
    out = capsys.readouterr().out
    assert "4 layers with 3, 3, 6, 6 heads" in out and "note: norm_prefix_mean is NaN" in out
    with open(out_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(int(r["layer"]), int(r["head"])) for r in rows] == [
        (li, h) for li, n in enumerate((3, 3, 6, 6)) for h in range(n)
    ]
    res = stats.collect_stats(hf_swin, stats.find_images(folder), batch_size=2)
    got = np.array([float(r["mean_distance_px"]) for r in rows])
    want = np.concatenate([res.mean_distance[li, :n] for li, n in enumerate((3, 3, 6, 6))])
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert {r["norm_prefix_mean"] for r in rows} == {"nan"}
    page = out_html.read_text()
    assert "within windows" in page and "uniform attention" not in page


def block_outputs(vm, x: torch.Tensor) -> list[torch.Tensor]:
    """Every block's output for ``x``, read by hooks of the test's own."""
    from vizapp.windows import window_sites

    seen: list[torch.Tensor] = []

    def keep(_m, _a, out):
        seen.append(out[0] if isinstance(out, tuple) else out)

    hooks = [s.block.register_forward_hook(keep) for s in window_sites(vm.model)]
    try:
        with torch.no_grad():
            vm.logits(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


def test_window_statistics_equal_a_dense_computation(timm_swin, hf_swin):
    """Second code path for each statistic of one analysis: the mean distance from the per-window formula
    (vizapp.analysis.windows.mean_distance), the entropy from each layer's attention scattered on its whole grid
    (zero outside the windows, padded keys left out) with rows renormalised, the token norms from hooks on the blocks."""
    for vm in (timm_swin, hf_swin):
        r = vizapp.analyze(vm, random_image(5))
        seen = block_outputs(vm, r.input)
        exported = r.arrays()  # the .npz export and the JSON summary carry them, NaN where undefined
        np.testing.assert_array_equal(exported["statistic_entropy"], r.statistics["entropy"])
        assert "norm_prefix_mean" in r.summary()["statistics_undefined"]
        for layer, g in enumerate(r.geometry):
            h = r.heads_per_layer[layer]
            index = W.window_index(g.grid, g.window, g.shift, g.pad_first)
            direct = W.mean_distance(r.windows[layer], index, g.grid, r.strides[layer]).numpy()
            np.testing.assert_allclose(r.statistics["distance"][layer, :h], direct, rtol=1e-5)
            full = r.full_attention(layer).double()  # [H, N, N]
            p = full / full.sum(-1, keepdim=True)
            ent = -(torch.where(p > 0, p * p.log(), torch.zeros_like(p))).sum(-1).mean(-1)
            np.testing.assert_allclose(r.statistics["entropy"][layer, :h], ent.numpy(), rtol=1e-5, atol=1e-6)
            norms = torch.linalg.vector_norm(seen[layer].reshape(1, -1, seen[layer].shape[-1]).double(), dim=-1)
            assert r.statistics["norm_patch_mean"][layer] == pytest.approx(float(norms.mean()), rel=1e-5)
            assert r.statistics["norm_patch_max"][layer] == pytest.approx(float(norms.max()), rel=1e-5)


def test_a_statistic_must_say_it_is_defined_for_windows(timm_swin, folder):
    """A registered statistic that does not declare ``windowed`` is NaN for Swin, with its reason; one that does is
    computed over each token's window (here: the largest weight of the row renormalised over real keys)."""
    from vizapp import statistics

    class Largest(statistics.HeadStatistic):
        name, label, unit = "largest_any", "largest weight", ""

        def rows(self, attn, row, geometry, out, work):
            torch.amax(attn, dim=-1, out=out)

    class LargestWindowed(Largest):
        name, windowed = "largest_windowed", True

    made = [statistics.register(Largest()), statistics.register(LargestWindowed())]
    try:
        r = vizapp.analyze(timm_swin, random_image(6))
        assert (
            np.isnan(r.statistics["largest_any"]).all() and "windowed = True" in r.undefined_statistics["largest_any"]
        )
        for layer in range(r.num_layers):
            full = r.full_attention(layer).double()
            want = (full / full.sum(-1, keepdim=True)).amax(-1).mean(-1).numpy()
            np.testing.assert_allclose(r.statistics["largest_windowed"][layer, : len(want)], want, rtol=1e-5)
        res = stats.collect_stats(timm_swin, images_of(folder)[:2], batch_size=2)
        assert "largest_any" in res.undefined and np.isfinite(res.statistics["largest_windowed"][0, :2]).all()
    finally:
        for s in made:
            statistics.unregister(s.name)


# -- the dataset evaluation ----------------------------------------------------------------------------------------


def test_repeat_to_grid_by_hand():
    last = np.arange(6.0).reshape(2, 3)  # a 3x5 grid merged once (padded to 4x6) is 2x3
    assert W.repeat_to_grid(last, (3, 5), 1).tolist() == [
        [0, 0, 1, 1, 2],
        [0, 0, 1, 1, 2],
        [3, 3, 4, 4, 5],
    ]
    assert W.repeat_to_grid(np.ones((1, 1)), (3, 3), 2).shape == (3, 3)
    with pytest.raises(ValueError, match="not the"):
        W.repeat_to_grid(last, (6, 10), 1)


def authors_accuracies(vm, x, sal, scale, target, negative, black):
    """Chefer et al.'s loop as test_evaluate writes it, with the upsampling factor given: upsample bilinearly by
    ``scale``, min-max, negate for negative, topk of int(H·W·f) pixels set to black, classify."""
    gh, gw = sal.shape
    res = torch.nn.functional.interpolate(sal.reshape(1, 1, gh, gw).float(), scale_factor=scale, mode="bilinear")
    res = (res - res.min()) / (res.max() - res.min())
    vis = (-res if negative else res).reshape(1, -1)
    batch = []
    for step in [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]:
        data = x.clone().reshape(1, x.shape[1], -1)
        _, idx = torch.topk(vis, int(x.shape[-2] * x.shape[-1] * step), dim=-1)
        for c in range(x.shape[1]):
            data[:, c].scatter_(-1, idx, float(black[c]))
        batch.append(data.reshape(x.shape))
    with torch.no_grad():
        pred = vm.logits(torch.cat(batch)).argmax(dim=-1)
    return (pred == target).long().tolist()


def test_swin_evaluation_rows_equal_analyze_and_the_authors_loop(hf_folder, monkeypatch):
    """Second code path: each row against vizapp.analyze of its image alone: the per-head statistics (a layer's
    columns are the heads it has), every map the evaluation made (its class maps from one backward for the batch)
    against the analysis's own, and every method's chefer2021 accuracies against the authors' loop run on that map,
    upsampled by the first stage's token spacing (4 px), for the predicted and the target class."""
    from vizapp.analysis.faithfulness import random_order_saliency
    from vizapp.evaluate.worker import Evaluator, image_seed

    ev = Evaluator(hf_folder, METHODS.split(","), steps=0)
    assert ev.map_grid(torch.zeros(3, 36, 36)) == ((9, 9), (4, 4)) and ev.rollout_start_layer == 1
    made: list[tuple[torch.Tensor, str, int, np.ndarray]] = []
    explain = ev.explain

    def recorded(r, name, cls, **kw):
        m = explain(r, name, cls, **kw)
        made.append((r.input, name, cls, m))
        return m

    monkeypatch.setattr(ev, "explain", recorded)
    items = [{"id": f"img{i}", "source": f"img{i}.png", "target": (-1, -1, 2)[i]} for i in range(3)]  # -1: predicted
    pixels = [np.asarray(random_image(10 + i, size=(40 + 6 * i, 44))) for i in range(3)]
    rows = ev.evaluate_batch(items, pixels)
    assert [row["status"] for row in rows] == ["ok"] * 3
    assert len(made) == 3 * 4 + (rows[2]["target"] != rows[2]["predicted"]) * 2  # + the target's class maps
    for item, px, row in zip(items, pixels, rows, strict=True):
        r = vizapp.analyze(ev.vm, px, gradients=True)
        assert row["predicted"] == int(np.argmax(r.probs))
        for layer, h in enumerate((3, 3, 6, 6)):
            got = [row[f"distance.l{layer}.h{k}"] for k in range(h)]
            np.testing.assert_allclose(got, r.statistics["distance"][layer, :h], rtol=1e-5)
            assert f"distance.l{layer}.h{h}" not in row  # no such head
        assert math.isnan(row["norm_prefix_mean.l0"])
        mine = [(name, cls, m) for x, name, cls, m in made if torch.equal(x, r.input)]
        g = torch.Generator().manual_seed(image_seed(0, item["id"]))
        for kind, cls in (("pred", row["predicted"]), ("target", row["target"])):
            maps = {
                "rollout": r.first_grid_map("rollout", start_layer=1),
                "grad_rollout": r.first_grid_map("grad_rollout", cls),
                "relevance": r.first_grid_map("relevance", cls),
                "last_layer": r.first_grid_map("last_layer"),
            }
            for name, c, m in mine:
                if name in maps and (c == cls or name in ("rollout", "last_layer")):
                    np.testing.assert_allclose(m, maps[name], rtol=1e-4, atol=1e-7, err_msg=f"{name} {c}")
            if kind == "pred":
                maps["random"] = random_order_saliency(81, g).reshape(9, 9).numpy()
            for name, sal in maps.items():
                for direction in ("positive", "negative"):
                    want = authors_accuracies(
                        ev.vm,
                        r.input,
                        torch.as_tensor(sal),
                        r.strides[0],
                        row["target"],
                        direction == "negative",
                        ev.black[:, 0, 0],
                    )
                    got = [row[f"{name}.{kind}.{direction}.acc{k}"] for k in range(1, 10)]
                    assert got == want, (item["id"], name, kind, direction)
        last = r.last_layer_attention()  # 5x5: each first-stage token takes its last-stage token's value
        assert maps["last_layer"][8, 8] == last[4, 4] and maps["last_layer"][2, 3] == last[1, 1]


def test_swin_evaluation_scores_attnlrp_and_legrad_from_their_own_batched_run(hf_folder):
    """AttnLRP and LeGrad run the model themselves (one forward and backward for the batch, per class kind); each
    row's accuracies equal the authors' loop on that image's own ``r.explain`` map, for the prediction and a target
    that differs."""
    from vizapp.evaluate.worker import Evaluator

    ev = Evaluator(hf_folder, ["attnlrp", "legrad"], steps=0)
    items = [{"id": f"img{i}", "source": f"img{i}.png", "target": (-1, 2)[i]} for i in range(2)]
    pixels = [np.asarray(random_image(30 + i, size=(40, 44))) for i in range(2)]
    rows = ev.evaluate_batch(items, pixels)
    assert [row["status"] for row in rows] == ["ok"] * 2, rows
    for px, row in zip(pixels, rows, strict=True):
        r = vizapp.analyze(ev.vm, px)
        for kind in ("pred", "target"):
            cls = row["predicted"] if kind == "pred" else row["target"]
            for name in ("attnlrp", "legrad"):
                sal = torch.as_tensor(r.explain(name, cls))
                want = authors_accuracies(ev.vm, r.input, sal, r.strides[0], row["target"], False, ev.black[:, 0, 0])
                got = [row[f"{name}.{kind}.positive.acc{k}"] for k in range(1, 10)]
                assert got == want, (name, kind)


def test_swin_evaluation_refuses_what_it_does_not_offer_in_one_sentence_each(hf_folder):
    from vizapp.evaluate.run import parse_methods
    from vizapp.evaluate.worker import Evaluator
    from vizapp.swin_result import UNDEFINED

    with pytest.raises(VizappError) as err:
        Evaluator(hf_folder, ["rollout", "flow", "transformer_attribution", "attnlrp", "legrad", "attention"])
    msg = str(err.value)
    assert "attnlrp" not in msg and "legrad" not in msg  # offered (vizapp.analysis.windows_explain)
    for key in ("transformer_attribution", "cls"):
        assert UNDEFINED[key] in msg
    assert "flow" not in msg  # offered (vizapp.analysis.windows_flow)
    assert "'rollout'" not in msg
    with pytest.raises(VizappError, match="windowed \\(Swin\\) model's map"):
        Evaluator("bundled", ["last_layer"], steps=0)
    assert parse_methods(METHODS) == METHODS.split(",")


@pytest.fixture(scope="module")
def swin_data(tmp_path_factory, hf_swin) -> Path:
    """An ImageFolder tree for the folder model: one class folder per label, 7 images."""
    root = tmp_path_factory.mktemp("swin-data")
    for i in range(7):
        d = root / hf_swin.labels[i % len(hf_swin.labels)]
        d.mkdir(exist_ok=True)
        random_image(20 + i, size=(36 + 3 * i, 40)).save(d / f"{i}.png")
    return root


@pytest.mark.parametrize("protocol", ["chefer2021", "patches"])
def test_swin_evaluation_job_under_both_protocols(protocol, hf_folder, swin_data, tmp_path):
    from vizapp.analysis.perturbation import patch_fractions
    from vizapp.evaluate import evaluate

    summary = evaluate(
        str(swin_data),
        tmp_path,
        model=hf_folder,
        methods=METHODS,
        steps=3,
        shard_size=4,
        batch_size=3,
        protocol=protocol,
        progress=False,
    )
    assert summary["status"] == {"ok": 7}
    with open(tmp_path / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["protocol"] for r in rows} == {protocol}
    x = [float(rows[0][f"perturbation_x{k}"]) for k in range(1, 10)]
    np.testing.assert_allclose(
        x, [k / 10 for k in range(1, 10)] if protocol == "chefer2021" else patch_fractions(81)[1:]
    )
    for m in METHODS.split(","):
        assert 0 <= float(rows[0][f"{m}.pred.negative.auc"]) <= 90 and f"{m}.deletion_auc" in rows[0]
    assert "distance.l0.h2" in rows[0] and "distance.l0.h3" not in rows[0] and "distance.l3.h5" in rows[0]
    md = (tmp_path / "summary.md").read_text()
    assert "first stage's 9x9 grid of tokens 4x4 px apart" in md and "norm_prefix_mean is NaN" in md
    assert "| layer | h0 | h1 | h2 | h3 | h4 | h5 |" in md  # the widest layer's heads
    assert "Attention each last-stage token receives" in md


# -- hub ids, offline ----------------------------------------------------------------------------------------------


def test_swin_hub_id_loads_from_the_cache_offline(hf_folder, hf_swin, tmp_path, monkeypatch):
    """hf:owner/repo of a transformers Swin, its files laid out as the hub cache keeps them, loads with no network
    through the same path as a ViT's id (also where local files are refused), equal to the folder; an uncached id
    fails fast with a clear error."""
    import time

    from huggingface_hub import constants

    cache = tmp_path / "hub"
    base = cache / "models--owner--tiny-swin"
    snap = base / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    for f in Path(hf_folder).iterdir():
        shutil.copy(f, snap / f.name)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    import vizapp.models.hf as hf_adapter

    monkeypatch.setattr(hf_adapter, "hub_reachable", lambda *a, **k: False)
    assert vizapp.models.weights_available_offline("hf:owner/tiny-swin")
    x = hf_swin.transform(random_image(7))[None]
    with torch.no_grad():
        want = hf_swin.logits(x)
    for allow_files in (True, False):
        vm = vizapp.load_model("hf:owner/tiny-swin", device="cpu", allow_files=allow_files)
        assert vm.windowed and vm.family == "hf" and vm.source == "pretrained" and vm.labels == hf_swin.labels
        with torch.no_grad():
            torch.testing.assert_close(vm.logits(x), want)
    r = vizapp.analyze(vm, random_image(7))
    assert r.layer_grids == ((9, 9), (9, 9), (5, 5), (5, 5))
    t0 = time.perf_counter()
    with pytest.raises(vizapp.ModelLoadError, match="hf:owner/missing-swin"):
        vizapp.load_model("hf:owner/missing-swin", device="cpu")
    assert time.perf_counter() - t0 < 10


# -- the heads mosaic's title --------------------------------------------------------------------------------------


def test_swin_heads_title_fits_its_plot(timm_swin):
    from vizapp import figures
    from vizapp import views_windows as V

    r = vizapp.analyze(timm_swin, random_image(8))
    fig = V.heads_view(r, 3, (1, 2))
    lines = fig.layout.title.text.split("<br>")
    assert len(lines) > 2 and all(len(line) <= figures.TITLE_CHARS for line in lines)
    assert fig.layout.margin.t >= 28 + 19 * len(lines)  # room for every line
    text = " ".join(lines)
    assert "over its window" in text and "padded to 3x8 for its windows: padded tokens are not drawn" in text
