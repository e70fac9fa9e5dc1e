"""vizapp.stats: dataset-wide mean attention distance, checked against vizapp.analyze image by image."""

from __future__ import annotations

import csv
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import vizapp
from vizapp import stats

MODEL = "vit_tiny_patch16_224"
KWARGS = {"img_size": 64, "depth": 2}


@pytest.fixture(scope="module")
def vm():
    torch.manual_seed(0)
    return vizapp.load_model(MODEL, pretrained=False, device="cpu", **KWARGS)


@pytest.fixture
def folder(tmp_path):
    """Five PNGs of different sizes (two in a subfolder), one broken JPEG and a text file that is not an image."""
    rng = np.random.default_rng(0)
    (tmp_path / "sub").mkdir()
    for i in range(5):
        where = tmp_path / "sub" if i % 2 else tmp_path
        arr = rng.integers(0, 256, (48 + 16 * i, 96 - 8 * i, 3), dtype=np.uint8)
        Image.fromarray(arr).save(where / f"img{i}.png")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    (tmp_path / "notes.txt").write_text("not an image")
    return tmp_path


def good_images(folder):
    return sorted(p for p in folder.rglob("*.png"))


def test_find_images_is_recursive_and_filters_by_suffix(folder):
    names = [p.name for p in stats.find_images(folder)]
    assert sorted(names) == sorted(["img0.png", "img1.png", "img2.png", "img3.png", "img4.png", "broken.jpg"])
    assert len(stats.find_images(folder, limit=2)) == 2


def test_matches_analyze_image_by_image(vm, folder):
    paths = stats.find_images(folder)
    with pytest.warns(UserWarning, match="skipped 1 undecodable"):
        mean, n = stats.dataset_mean_distance(vm, paths, batch_size=2)
    assert n == 5
    assert mean.shape == (vm.num_layers, vm.num_heads) == (2, 3)
    # Second code path: one analyze() per image (its own decode, transform, capture and distance), then the mean.
    expected = np.mean([vizapp.analyze(vm, p).mean_distance for p in good_images(folder)], axis=0)
    np.testing.assert_allclose(mean, expected, atol=1e-4, rtol=0)


def test_mean_does_not_depend_on_batching(vm, folder):
    paths = good_images(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to skip here, so no warning
        m1, n1 = stats.dataset_mean_distance(vm, paths, batch_size=1)
        m3, n3 = stats.dataset_mean_distance(vm, paths, batch_size=3)
    assert n1 == n3 == 5
    np.testing.assert_allclose(m1, m3, atol=1e-5, rtol=0)


def test_collect_stats_counts_skipped_and_times_the_baseline(vm, folder):
    res = stats.collect_stats(vm, stats.find_images(folder), batch_size=2, baseline_batches=-1)
    assert res.n_images == 5
    assert [p.endswith("broken.jpg") for p, _ in res.skipped] == [True]
    assert res.timed_images > 0 and res.bare_seconds > 0 and res.analysis_seconds > 0
    assert np.isfinite(res.throughput_ratio)


def test_cli_writes_csv_and_offline_html(vm, folder, tmp_path, capsys):
    out_csv, out_html = tmp_path / "s.csv", tmp_path / "d.html"
    rc = stats.main(
        [
            str(folder),
            "--model",
            MODEL,
            "--random",
            "--img-size",
            "64",
            "--model-arg",
            "depth=2",
            "--batch-size",
            "2",
            "--workers",
            "0",
            "--device",
            "cpu",
            "--out-csv",
            str(out_csv),
            "--out-html",
            str(out_html),
            "--no-progress",
        ]
    )
    assert rc == 0
    captured = capsys.readouterr()
    assert "skipped 1 undecodable" in captured.err and "broken.jpg" in captured.err
    assert "5 images analysed, 1 skipped" in captured.out
    assert "bare forward" in captured.out and "ratio" in captured.out
    with open(out_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == [
        "layer",
        "head",
        "mean_distance_px",
        "entropy",
        "norm_patch_mean",
        "norm_patch_max",
        "norm_prefix_mean",
        "n_images",
    ]
    assert len(rows) == vm.num_layers * vm.num_heads
    assert {(int(r["layer"]), int(r["head"])) for r in rows} == {(layer, h) for layer in range(2) for h in range(3)}
    assert {r["n_images"] for r in rows} == {"5"}
    mean, _ = stats.dataset_mean_distance(vm, good_images(folder), batch_size=4)
    got = np.array([float(r["mean_distance_px"]) for r in rows]).reshape(2, 3)
    np.testing.assert_allclose(got, mean, atol=1e-4, rtol=0)
    html = out_html.read_text(encoding="utf-8")
    assert "<script src=" not in html  # plotly.js inlined: works offline
    assert "Mean attention distance" in html and "5 images" in html


def test_cli_limit_and_empty_folder(folder, tmp_path, capsys):
    out_csv = tmp_path / "lim.csv"
    rc = stats.main(
        [
            str(folder),
            "--model",
            MODEL,
            "--random",
            "--img-size",
            "64",
            "--model-arg",
            "depth=2",
            "--limit",
            "2",
            "--device",
            "cpu",
            "--out-csv",
            str(out_csv),
            "--out-html",
            str(tmp_path / "lim.html"),
            "--no-progress",
            "--baseline-batches",
            "0",
        ]
    )
    assert rc == 0
    with open(out_csv, newline="") as f:
        assert {r["n_images"] for r in csv.DictReader(f)} <= {"1", "2"}
    empty = tmp_path / "empty"
    empty.mkdir()
    assert stats.main([str(empty), "--model", MODEL, "--random", "--no-progress"]) == 1
    assert "no images" in capsys.readouterr().err


@pytest.mark.parametrize("path", ["inline", "inline_row_blocks", "from_qk"])
def test_both_capture_paths_match_timm_non_fused_attention(vm, folder, monkeypatch, path):
    """The dataset mean against vizapp.analysis.mean_attention_distance on timm's own materialised attention of the
    same batch: with the attention formed inside the forward (default; or one head in blocks of 3 query rows, as
    for 1,374-token models), and from q and k when fused_attn is off."""
    import copy

    from vizapp import capture, limits
    from vizapp.analysis import mean_attention_distance

    if path == "inline_row_blocks":
        monkeypatch.setattr(limits, "MIN_CHUNK_ROWS", 3)
        monkeypatch.setattr(limits, "ROW_BLOCK_BYTES", 1)
        monkeypatch.setattr(limits, "INLINE_CHUNK_BYTES", 1)

    seen = []
    real_inline = capture.AttentionCapture._inline
    monkeypatch.setattr(capture.AttentionCapture, "_inline", lambda self, *a: seen.append(1) or real_inline(self, *a))
    model = vm.model
    if path == "from_qk":
        for blk in model.blocks:
            monkeypatch.setattr(blk.attn, "fused_attn", False)
    paths = good_images(folder)
    got = stats.collect_stats(vm, paths, batch_size=3)
    assert bool(seen) == path.startswith("inline")
    x = torch.stack([vm.transform(vizapp.imageio.decode_image(p).image) for p in paths])
    ref = copy.deepcopy(model)
    maps = []
    for blk in ref.blocks:
        blk.attn.fused_attn = False
        blk.attn.attn_drop.register_forward_hook(lambda m, args, out: maps.append(args[0].detach().clone()))
    with torch.no_grad():
        ref(x)
    attn = torch.stack(maps, dim=1)  # [B, L, H, N, N]
    expected = mean_attention_distance(attn, vm.grid_size, vm.patch_size, vm.num_prefix_tokens)
    np.testing.assert_allclose(got.mean_distance, expected.numpy(), rtol=1e-5, atol=1e-4)
    assert got.n_images == 5


# -- per-image statistics of a batch (vizapp.statistics.StatisticsReducer, used by every path) ---------------------


def test_batch_statistics_by_hand():
    """Two images, two heads, 1 CLS + a 2x2 grid of 1-pixel patches, fed in two row blocks as the capture would."""
    import math

    from vizapp.analysis.distance import patch_distance_matrix
    from vizapp.statistics import Geometry, StatisticsReducer

    n = 5
    uniform = torch.full((n, n), 1 / n)
    neighbour = torch.zeros(n, n)  # half on CLS, half on the horizontal neighbour (patch 0 <-> 1, 2 <-> 3)
    neighbour[:, 0] = 0.5
    for q, k in ((0, 1), (1, 2), (2, 1), (3, 4), (4, 3)):  # token index; CLS (0) -> patch 0 (token 1)
        neighbour[q, k] += 0.5
    self_only = torch.eye(n)
    patches = torch.zeros(n, n)
    patches[:, 1:] = 0.25
    attn = torch.stack([torch.stack([uniform, neighbour]), torch.stack([self_only, patches])])  # [B=2, H=2, N, N]
    dist = patch_distance_matrix((2, 2), 1)
    red = StatisticsReducer([2], 2, Geometry(n, 1, dist))
    for b in range(2):
        for lo, hi in ((0, 2), (2, 5)):  # rows 0-1 (CLS + patch 0), then rows 2-4
            red.chunk(0, b, 0, attn[b, :, lo:hi].clone(), lo)
    assert not red.complete()  # no block output yet
    red.layer_done(0)
    tokens = torch.tensor(
        [
            [[3.0, 4.0], [0.0, 0.0], [6.0, 8.0], [0.0, 1.0], [1.0, 0.0]],  # CLS 5; patches 0, 10, 1, 1
            [[0.0, 0.0], [0.0, 2.0], [2.0, 0.0], [0.0, -2.0], [-2.0, 0.0]],  # CLS 0; patches 2, 2, 2, 2
        ]
    )
    red.block(0, tokens)
    assert red.complete()
    every = (2 + math.sqrt(2)) / 4  # uniform over the 2x2 grid: distances 0, 1, 1, sqrt 2 from every patch
    v = red.values
    np.testing.assert_allclose(v["entropy"][0].numpy(), [[math.log(5), math.log(2)], [0.0, math.log(4)]], atol=1e-6)
    np.testing.assert_allclose(v["distance"][0].numpy(), [[every, 1.0], [0.0, every]], atol=1e-6)
    np.testing.assert_allclose(v["norm_patch_mean"][0].numpy(), [3.0, 2.0])
    np.testing.assert_allclose(v["norm_patch_max"][0].numpy(), [10.0, 2.0])
    np.testing.assert_allclose(v["norm_prefix_mean"][0].numpy(), [5.0, 0.0])


def test_batch_statistics_refuse_missing_rows():
    from vizapp.analysis.distance import patch_distance_matrix
    from vizapp.statistics import Geometry, StatisticsReducer

    red = StatisticsReducer([1], 2, Geometry(5, 1, patch_distance_matrix((2, 2), 1)))
    red.chunk(0, 0, 0, torch.full((1, 5, 5), 0.2), 0)  # image 1 never arrives
    with pytest.raises(RuntimeError, match="expected 10"):
        red.layer_done(0)
    with pytest.raises(ValueError, match="grid has 4 patches"):
        StatisticsReducer([1], 2, Geometry(6, 1, patch_distance_matrix((2, 2), 1)))


@pytest.mark.parametrize("path", ["inline", "inline_row_blocks", "from_qk"])
def test_batch_statistics_match_analyze_image_by_image(vm, folder, monkeypatch, path):
    """Second code path: one captured forward of a 5-image batch against vizapp.analyze of each image alone (its
    own capture, LayerStatistics for the distance, the attention recomputed from q and k in float64 for the entropy,
    BlockFeatures for the token norms); with the attention formed inside the forward (whole heads, or one head in
    blocks of 3 query rows), and replayed from q and k when fused_attn is off."""
    from vizapp import limits
    from vizapp.analysis.distance import patch_distance_matrix
    from vizapp.analysis.headstats import attention_entropy, token_norm_stats
    from vizapp.capture import AttentionCapture
    from vizapp.statistics import Geometry, StatisticsReducer

    paths = good_images(folder)
    expected = [vizapp.analyze(vm, p) for p in paths]  # before any monkeypatching
    if path == "inline_row_blocks":
        monkeypatch.setattr(limits, "MIN_CHUNK_ROWS", 3)
        monkeypatch.setattr(limits, "ROW_BLOCK_BYTES", 1)
    if path == "from_qk":
        for blk in vm.model.blocks:
            monkeypatch.setattr(blk.attn, "fused_attn", False)
    x = torch.stack([vm.transform(vizapp.imageio.decode_image(p).image) for p in paths])
    p = vm.num_prefix_tokens
    geometry = Geometry(p + 16, p, patch_distance_matrix(vm.grid_size, vm.patch_size))
    red = StatisticsReducer([vm.num_heads] * vm.num_layers, len(paths), geometry)
    rows_seen = set()
    real_chunk = red.chunk
    monkeypatch.setattr(
        red, "chunk", lambda layer, b, h, a, row, **kw: rows_seen.add(row) or real_chunk(layer, b, h, a, row, **kw)
    )
    real_kernel = red.softmax_rows  # the chunks the CPU kernel takes (vizapp.cpu_rows) are not handed over
    monkeypatch.setattr(
        red,
        "softmax_rows",
        lambda layer, b, h, s, row, out: real_kernel(layer, b, h, s, row, out) and rows_seen.add(row) is None,
    )
    chunk_bytes = 1 if path == "inline_row_blocks" else None
    with (
        torch.no_grad(),
        AttentionCapture(vm.model, on_attention=red, on_block=red.block, chunk_bytes=chunk_bytes) as cap,
    ):
        vm.model(x)
    assert red.complete()
    assert bool(cap.replayed_layers) == (path == "from_qk")
    assert (rows_seen == {0}) == (path != "inline_row_blocks")  # 17 query rows in blocks of 3, or whole
    for b, r in enumerate(expected):
        np.testing.assert_allclose(red.values["distance"][:, b].numpy(), r.mean_distance, rtol=1e-6, atol=1e-6)
        ent = torch.stack([attention_entropy(r.attention_layer(layer)) for layer in range(vm.num_layers)])
        np.testing.assert_allclose(red.values["entropy"][:, b].numpy(), ent.numpy(), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(r.statistics["entropy"], ent.numpy(), rtol=1e-5, atol=1e-6)  # analyze's own
        st = token_norm_stats(torch.from_numpy(r.token_norms()), p)  # [L] each
        for key in ("patch_mean", "patch_max", "prefix_mean"):
            got = red.values[f"norm_{key}"][:, b].numpy()
            np.testing.assert_allclose(got, st[key].numpy(), rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(r.statistics[f"norm_{key}"], st[key].numpy(), rtol=1e-5, atol=1e-5)
