"""vizapp.evaluate: hand-computed perturbation and head-statistics maths, the local job, resumption, bad inputs, and
the Ray engine giving exactly the local engine's table (also after a worker is killed)."""

from __future__ import annotations

import csv
import io
import json
import math
import re
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vizapp.analysis.faithfulness import random_order_saliency
from vizapp.analysis.headstats import attention_entropy, token_norm_stats
from vizapp.analysis.perturbation import (
    CHEFER_FRACTIONS,
    accuracy_auc,
    patch_fractions,
    patch_perturbed_images,
    pixel_masks,
    pixel_perturbed_images,
    removal_counts,
    removal_order,
    upsample_map,
)
from vizapp.bundled.data import CLASS_NAMES, FASHION_MNIST_DIR, load_fashion_mnist
from vizapp.errors import VizappError
from vizapp.evaluate import evaluate, main
from vizapp.evaluate.dataset import DatasetError, list_items
from vizapp.evaluate.engines import JobError

needs_fmnist = pytest.mark.skipif(
    not Path(FASHION_MNIST_DIR, "t10k-images-idx3-ubyte.gz").exists(),
    reason="Debian dataset-fashion-mnist is not installed (make test installs it)",
)
# batches of 3 in shards of 8 (3 + 3 + 2): an engine that cut batches differently would round differently
SMALL = dict(methods="rollout,relevance,random", steps=4, shard_size=8, limit=16, batch_size=3)


# -- pure maths, by hand -------------------------------------------------------------------------------------------


def test_removal_counts_by_hand():
    assert removal_counts(10).tolist() == list(range(10))  # 0.3 * 10 must give 3, not 2
    assert removal_counts(49).tolist() == [0, 4, 9, 14, 19, 24, 29, 34, 39, 44]
    assert removal_counts(196).tolist() == [0, 19, 39, 58, 78, 98, 117, 137, 156, 176]
    with pytest.raises(ValueError):
        removal_counts(4, [0.5, 1.5])


def test_removal_order_directions_and_ties():
    s = torch.tensor([[0.2, 0.9], [0.2, 0.5]])
    assert removal_order(s, "positive").tolist() == [1, 3, 0, 2]  # most relevant first, ties by index
    assert removal_order(s, "negative").tolist() == [0, 2, 3, 1]  # least relevant first, ties by index
    with pytest.raises(ValueError, match="direction"):
        removal_order(s, "sideways")


def test_four_patch_image_with_a_fake_predictor_by_hand():
    # 2x2 grid of 1-pixel patches with values 4 3 / 2 1; saliency = the values. The fake model says class 1 when the
    # remaining pixels sum to more than 5, else class 0; the target is class 1.
    image = torch.tensor([[[4.0, 3.0], [2.0, 1.0]]])  # [1, 2, 2]
    fractions = [0.25, 0.5, 0.75]

    def accuracy(direction: str) -> list[int]:
        imgs = patch_perturbed_images(image, image[0], 2, 1, direction, 0.0, fractions)  # [3, 1, 2, 2]
        assert imgs.shape == (3, 1, 2, 2)
        sums = imgs.sum(dim=(1, 2, 3))
        return [1] + [int(s > 5) for s in sums]  # x = 0: the whole image (sum 10) is correct

    # positive: remove 4 (sum 6: right), then 3 (sum 3: wrong), then 2 (sum 1: wrong)
    assert accuracy("positive") == [1, 1, 0, 0]
    # negative: remove 1 (9: right), then 2 (7: right), then 3 (4: wrong)
    assert accuracy("negative") == [1, 1, 1, 0]
    x = [0.0, *fractions]
    # trapezoids of width 0.25: (1+1)/2 + (1+0)/2 + 0 = 1.5 -> 0.375 -> 37.5; negative 1 + 1 + 0.5 -> 62.5
    assert float(accuracy_auc(accuracy("positive"), x)) == pytest.approx(37.5)
    assert float(accuracy_auc(accuracy("negative"), x)) == pytest.approx(62.5)


def test_perturbed_pixels_take_the_fill_value():
    image = torch.arange(16.0).reshape(1, 4, 4)  # 2x2 grid of 2x2 patches
    fill = torch.tensor([-7.0])[:, None, None]
    imgs = patch_perturbed_images(image, torch.tensor([1.0, 4.0, 3.0, 2.0]), (2, 2), (2, 2), "positive", fill, [0.5])
    # patches 1 (top right) and 2 (bottom left) are the two most relevant
    expect = image.clone()
    expect[:, 0:2, 2:4] = -7.0
    expect[:, 2:4, 0:2] = -7.0
    assert torch.equal(imgs[0], expect)


def test_accuracy_auc_full_and_batched():
    assert float(accuracy_auc(np.ones(10))) == pytest.approx(90.0)  # x runs 0 .. 0.9
    assert float(accuracy_auc(np.zeros(10))) == 0.0
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, size=(5, 10))
    batched = accuracy_auc(y, CHEFER_FRACTIONS)
    assert batched.shape == (5,)
    np.testing.assert_allclose(batched, [float(accuracy_auc(r)) for r in y])
    # linear in the accuracies: the mean of per-image areas is the area of the mean curve
    assert batched.mean() == pytest.approx(float(accuracy_auc(y.mean(axis=0))))


def bilinear_reference(m: np.ndarray, ph: int, pw: int) -> np.ndarray:
    """Bilinear upsampling written out (half-pixel centres, edges clamped: PyTorch's align_corners=False)."""

    def axis(n_in: int, scale: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        src = np.maximum((np.arange(n_in * scale) + 0.5) / scale - 0.5, 0.0)
        i0 = np.floor(src).astype(int)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, src - i0

    r0, r1, wr = axis(m.shape[0], ph)
    c0, c1, wc = axis(m.shape[1], pw)
    top = m[r0][:, c0] * (1 - wc) + m[r0][:, c1] * wc
    bottom = m[r1][:, c0] * (1 - wc) + m[r1][:, c1] * wc
    return top * (1 - wr)[:, None] + bottom * wr[:, None]


def test_upsample_map_by_hand_and_against_a_written_out_bilinear():
    # 2x2 map 0 1 / 2 4, patch 2: output pixel i samples source row/column max(0, (i + 0.5) / 2 - 0.5), i.e. 0, 1/4,
    # 3/4, 1 (edges clamped), so pixel (r, c) is c + 2r + rc at those coordinates; x16 below, then min-max (max 4)
    up = upsample_map(torch.tensor([[0.0, 1.0], [2.0, 4.0]]), 2)
    by_hand = torch.tensor([[0, 4, 12, 16], [8, 13, 23, 28], [24, 31, 45, 52], [32, 40, 56, 64]]) / 64.0
    assert up.dtype == torch.float32 and torch.equal(up, by_hand)
    g = torch.Generator().manual_seed(0)
    for (gh, gw), (ph, pw) in (((7, 7), (4, 4)), ((3, 5), (2, 3)), ((14, 14), (16, 16))):
        m = torch.rand(gh, gw, generator=g) * 10 - 3
        ref = bilinear_reference(m.double().numpy(), ph, pw)
        ref = (ref - ref.min()) / (ref.max() - ref.min())
        got = upsample_map(m, (ph, pw))
        assert got.shape == (gh * ph, gw * pw)
        np.testing.assert_allclose(got.numpy(), ref, rtol=0, atol=1e-6)
        # and what the authors' line gives: F.interpolate(scale_factor=patch, mode="bilinear"), then min-max
        theirs = torch.nn.functional.interpolate(m[None, None], scale_factor=(ph, pw), mode="bilinear")[0, 0]
        assert torch.equal(got, (theirs - theirs.min()) / (theirs.max() - theirs.min()))
    assert torch.equal(upsample_map(torch.full((2, 2), 3.0), 2), torch.zeros(4, 4))  # constant: all tie, no NaN


# the 4x4 pixels of the map above, most relevant first (values x16: 64 56 52 45 40 32 31 28 24 23 16 13 12 8 4 0)
HAND_ORDER = [
    (3, 3), (3, 2), (2, 3), (2, 2), (3, 1), (3, 0), (2, 1), (1, 3),
    (2, 0), (1, 2), (0, 3), (1, 1), (0, 2), (1, 0), (0, 1), (0, 0),
]  # fmt: skip


def test_pixel_masks_by_hand():
    pix = upsample_map(torch.tensor([[0.0, 1.0], [2.0, 4.0]]), 2)  # 16 distinct values: no ties
    counts = [int(16 * f) for f in CHEFER_FRACTIONS[1:]]
    assert counts == [1, 3, 4, 6, 8, 9, 11, 12, 14]  # int(1.6), int(3.2), int(4.8), ...
    for direction, order in (("positive", HAND_ORDER), ("negative", HAND_ORDER[::-1])):
        masks = pixel_masks(pix, direction)
        assert masks.shape == (9, 4, 4) and masks.dtype == torch.bool
        for step, k in enumerate(counts):
            expect = torch.zeros(4, 4, dtype=torch.bool)
            for r, c in order[:k]:
                expect[r, c] = True
            assert torch.equal(masks[step], expect), (direction, step)
    # step 0.5 (8 pixels) spelled out
    assert pixel_masks(pix, "positive", [0.5])[0].int().tolist() == [
        [0, 0, 0, 0], [0, 0, 0, 1], [0, 1, 1, 1], [1, 1, 1, 1]
    ]  # fmt: skip
    assert pixel_masks(pix, "negative", [0.5])[0].int().tolist() == [
        [1, 1, 1, 1], [1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]
    ]  # fmt: skip
    with pytest.raises(ValueError, match="direction"):
        pixel_masks(pix, "sideways")


@pytest.mark.parametrize("seed", range(20))
def test_pixel_masks_with_ties_remove_a_top_set_of_the_right_size(seed):
    # maps with many ties (few distinct values): whichever tied pixels topk picks, every removed pixel ranks at least
    # as high as every kept one, and int(f * H * W) pixels go
    g = torch.Generator().manual_seed(seed)
    pix = upsample_map(torch.randint(0, 3, (3, 4), generator=g).float(), (2, 3))  # [6, 12]
    for direction, sign in (("positive", 1.0), ("negative", -1.0)):
        masks = pixel_masks(pix, direction)
        for step, f in enumerate(CHEFER_FRACTIONS[1:]):
            m = masks[step]
            assert int(m.sum()) == int(72 * f)
            if 0 < int(m.sum()) < 72:
                assert float((sign * pix)[m].min()) >= float((sign * pix)[~m].max())
            _, idx = torch.topk((sign * pix).reshape(1, -1), int(72 * f), dim=-1)  # torch.topk's own tie choice
            assert sorted(idx[0].tolist()) == torch.nonzero(m.reshape(-1))[:, 0].tolist()


@pytest.mark.parametrize("seed", range(6))
def test_a_stack_of_maps_gives_each_maps_own_masks_as_the_authors_sorted_topk_picks_them(seed):
    # the evaluator makes an image's masks together (one topk per step over the stack, sorted=False); each map's masks
    # must be exactly the pixels the authors' per-map call torch.topk(vis, k) returns, ties included: tie-heavy maps
    # (three values) on the 224 x 224 grid of a ViT-B/16 and on a non-square one, mixed directions
    g = torch.Generator().manual_seed(seed)
    grid, patch = ((14, 14), 16) if seed % 2 == 0 else ((3, 5), (4, 6))
    sal = torch.randint(0, 3, (5, *grid), generator=g).float() if seed < 4 else torch.rand(5, *grid, generator=g)
    sal[4] = 1.0  # a constant map: every pixel ties
    directions = ["positive", "negative", "negative", "positive", "negative"]
    pix = upsample_map(sal, patch)
    masks = pixel_masks(pix, directions)
    h, w = pix.shape[-2:]
    assert masks.shape == (5, 9, h, w)
    for m in range(5):
        assert torch.equal(pix[m], upsample_map(sal[m], patch))  # the stack's scaling is per map
        vis = pix[m].reshape(1, -1) * (1.0 if directions[m] == "positive" else -1.0)
        for step, f in enumerate(CHEFER_FRACTIONS[1:]):
            _, idx = torch.topk(vis, int(h * w * f), dim=-1)  # the authors' call (sorted)
            expect = torch.zeros(h * w, dtype=torch.bool)
            expect[idx[0]] = True
            assert torch.equal(masks[m, step].reshape(-1), expect), (m, step)
    assert torch.equal(pixel_masks(pix[1], "negative"), masks[1])  # one map alone: the same masks
    with pytest.raises(ValueError, match="2 directions for 5 maps"):
        pixel_masks(pix, ["positive", "negative"])


def test_pixel_perturbed_images_zero_every_channel_with_the_fill():
    image = torch.stack([torch.arange(16.0).reshape(4, 4), -torch.arange(16.0).reshape(4, 4)])  # [2, 4, 4]
    fill = torch.tensor([-7.0, 9.0])[:, None, None]  # per channel: (0 - mean) / std
    sal = torch.tensor([[0.0, 1.0], [2.0, 4.0]])
    imgs = pixel_perturbed_images(image, sal, 2, "positive", fill)
    assert imgs.shape == (9, 2, 4, 4)
    for step, k in enumerate([1, 3, 4, 6, 8, 9, 11, 12, 14]):
        expect = image.clone()
        for r, c in HAND_ORDER[:k]:
            expect[:, r, c] = torch.tensor([-7.0, 9.0])
        assert torch.equal(imgs[step], expect)
    with pytest.raises(ValueError, match="patch size"):
        pixel_perturbed_images(image, sal, 3, "positive", fill)  # 6x6 map on a 4x4 image


def test_accuracy_auc_on_a_hand_made_curve():
    acc = [1, 1, 1, 0, 1, 0, 0, 0, 0, 0]  # at x = 0, 0.1, ... 0.9
    # trapezoids of width 0.1: (1+1)/2 + (1+1)/2 + (1+0)/2 + (0+1)/2 + (1+0)/2 = 3.5 -> 0.35 -> 35
    assert float(accuracy_auc(acc)) == pytest.approx(35.0, abs=1e-12)
    assert float(accuracy_auc(acc)) == pytest.approx(100 * np.trapezoid(acc, np.arange(10) / 10))
    # the patch protocol's x on a 7x7 grid: 0, 4/49, 9/49, ... 44/49
    x = patch_fractions(49)
    np.testing.assert_array_equal(x, np.array([0, 4, 9, 14, 19, 24, 29, 34, 39, 44]) / 49)
    assert float(accuracy_auc(np.ones(10), x)) == pytest.approx(100 * 44 / 49)  # not 90
    # 1 at 0 and 4/49, 0 after: 4/49 * 1 + 5/49 * 1/2 = 6.5/49
    assert float(accuracy_auc([1, 1] + [0] * 8, x)) == pytest.approx(100 * 6.5 / 49)


@pytest.mark.parametrize("n", [1, 2, 7, 50, 197])
def test_entropy_of_uniform_attention_is_log_n(n):
    attn = torch.full((3, n, n), 1.0 / n, dtype=torch.float64)
    np.testing.assert_allclose(attention_entropy(attn).numpy(), [math.log(n)] * 3, rtol=1e-12)


def test_entropy_one_hot_and_two_keys():
    one_hot = torch.eye(4)[None]  # [1, 4, 4]: each query attends to itself only
    assert attention_entropy(one_hot).tolist() == [0.0]
    half = torch.tensor([[[0.5, 0.5, 0.0, 0.0]] * 4, [[0.25] * 4] * 4])  # [2, 4, 4]
    np.testing.assert_allclose(attention_entropy(half).numpy(), [math.log(2), math.log(4)])


def test_token_norm_stats_by_hand():
    tokens = torch.tensor([[3.0, 4.0], [0.0, 0.0], [6.0, 8.0]])  # CLS norm 5; patches 0 and 10
    st = token_norm_stats(torch.linalg.norm(tokens, dim=-1), num_prefix_tokens=1)
    assert float(st["prefix_mean"]) == 5.0
    assert float(st["patch_mean"]) == 5.0
    assert float(st["patch_max"]) == 10.0
    assert math.isnan(float(token_norm_stats(torch.linalg.norm(tokens, dim=-1), 0)["prefix_mean"]))


def read_table(out: Path) -> str:
    return (out / "results.csv").read_text()


def read_rows(out: Path) -> list[dict[str, str]]:
    import csv

    with open(out / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def local_job(tmp_path_factory):
    """32 Fashion-MNIST test images, every method, the local engine."""
    if not Path(FASHION_MNIST_DIR, "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip("Debian dataset-fashion-mnist is not installed (make test installs it)")
    out = tmp_path_factory.mktemp("local32")
    methods = "rollout,grad_rollout,relevance,attention,flow,random"
    summary = evaluate("fmnist-test", out, methods=methods, steps=4, shard_size=8, limit=32, progress=False)
    return out, summary


def test_local_job_table_and_summary(local_job):
    out, summary = local_job
    rows = read_rows(out)
    assert len(rows) == 32 and summary["evaluated"] == 32 and summary["status"] == {"ok": 32}
    assert [r["id"] for r in rows] == [f"fmnist-test/{i:05d}" for i in range(32)]
    _, labels = load_fashion_mnist("test")
    assert [int(r["target"]) for r in rows] == labels[:32].tolist()
    for r in rows:
        assert int(r["correct"]) == int(int(r["predicted"]) == int(r["target"]))
        for m in ("rollout", "grad_rollout", "relevance", "attention", "flow", "random"):
            for key in ("pred.positive", "pred.negative", "target.positive", "target.negative"):
                accs = [int(r["correct"])] + [int(r[f"{m}.{key}.acc{k}"]) for k in range(1, 10)]
                assert float(r[f"{m}.{key}.auc"]) == pytest.approx(float(accuracy_auc(accs)))
            assert 0.0 <= float(r[f"{m}.deletion_auc"]) <= 1.0 and 0.0 <= float(r[f"{m}.insertion_auc"]) <= 1.0
        # methods without a class, and correct predictions, give the same numbers for both class settings
        assert r["rollout.pred.positive.auc"] == r["rollout.target.positive.auc"]
        if r["correct"] == "1":
            assert r["relevance.pred.negative.auc"] == r["relevance.target.negative.auc"]
        # 50 tokens: entropy between 0 and log 50; mean distance positive and below the 7x7 grid's diagonal (4 px)
        ent = [float(v) for k, v in r.items() if k.startswith("entropy.")]
        dist = [float(v) for k, v in r.items() if k.startswith("distance.")]
        assert len(ent) == len(dist) > 0 and all(0 <= e <= math.log(50) + 1e-9 for e in ent)
        assert all(0 < d < 6 * 4 * math.sqrt(2) for d in dist)
        assert float(r["norm_patch_max.l0"]) >= float(r["norm_patch_mean.l0"]) > 0
    # summary: mean curves start at the accuracy, AUCs are the mean of per-image AUCs
    acc = summary["accuracy"][0]
    for m, d in summary["methods"].items():
        assert d["pred.negative"]["curve"][0] == pytest.approx(acc)
        mean = np.mean([float(r[f"{m}.pred.negative.auc"]) for r in rows])
        assert d["pred.negative"]["auc"][0] == pytest.approx(mean)
        assert float(accuracy_auc(d["pred.negative"]["curve"])) == pytest.approx(mean)
        assert d["pred.negative"]["auc"][1] > 0  # a standard error
    # A faithful map beats a random order on this model: removing the most relevant patches first hurts more.
    assert (
        summary["methods"]["relevance"]["pred.positive"]["auc"][0]
        < summary["methods"]["random"]["pred.positive"]["auc"][0]
    )
    assert {r["protocol"] for r in rows} == {"chefer2021"} and summary["protocol"] == "chefer2021"
    assert summary["perturbation_x"] == list(CHEFER_FRACTIONS)
    assert json.loads((out / "job.json").read_text())["rollout_start_layer"] == 1  # the authors' rollout baseline
    md = (out / "summary.md").read_text()
    assert "54.16" in md and "Random order (baseline)" in md and "32 evaluated" in md
    assert "**Subset:** the first 32 images of fmnist-test in item order (`--limit 32`)" in md
    assert md.startswith("# Evaluation: bundled on fmnist-test, perturbation protocol `chefer2021`")
    assert "## Perturbation test, protocol `chefer2021` (the authors' pixel procedure" in md
    # the published numbers belong to Transformer Attribution (CVPR 2021); vizapp's relevance is GAE (ICCV 2021)
    assert "**Transformer Attribution** (that paper's LRP-based method, vizapp's `transformer_attribution`) 54.16" in md
    assert "| GAE relevance (gradient × attention); Chefer, Gur & Wolf, ICCV 2021, “Generic Attention-model" in md
    assert "| Attention rollout, from layer 1; Abnar & Zuidema, ACL 2020 |" in md
    assert "Chefer relevance" not in md
    page = (out / "curves.html").read_text()
    assert (
        '<script src="https://cdn.plot.ly' not in page and "Plotly.newPlot" in page and len(page) > 1_000_000
    )  # plotly.js inline
    assert json.loads((out / "summary.json").read_text())["evaluated"] == 32


def test_resume_after_a_killed_run(local_job, tmp_path):
    out, _ = local_job
    copy = tmp_path / "resume"
    shutil.copytree(out, copy)
    before = read_table(out)
    (copy / "shards" / "shard-00002.json").unlink()  # never written: the run died during shard 2
    (copy / "shards" / "shard-00002.json.123.tmp").write_text('{"shard": 2, "ro')  # its torn temporary file
    (copy / "results.csv").unlink()
    methods = "rollout,grad_rollout,relevance,attention,flow,random"
    summary = evaluate("fmnist-test", copy, methods=methods, steps=4, shard_size=8, limit=32, progress=False)
    assert summary["images_run"] == 8  # only the missing shard
    assert read_table(copy) == before


def test_report_only_on_a_partial_job_says_so(local_job, tmp_path):
    out, _ = local_job
    copy = tmp_path / "partial"
    shutil.copytree(out, copy)
    (copy / "shards" / "shard-00003.json").unlink()  # the run is still going (or was stopped)
    methods = "rollout,grad_rollout,relevance,attention,flow,random"
    summary = evaluate(
        "fmnist-test", copy, methods=methods, steps=4, shard_size=8, limit=32, progress=False, report_only=True
    )
    assert summary["images_run"] == 0 and summary["evaluated"] == 24
    md = (copy / "summary.md").read_text()
    assert "Partial result: 24 of the job's 32 images are done" in md and "items 0–23 in item order" in md
    assert len(read_rows(copy)) == 24


def test_rerun_with_other_settings_is_refused(local_job, tmp_path):
    out, _ = local_job
    copy = tmp_path / "other"
    shutil.copytree(out, copy)
    with pytest.raises(JobError, match="different job.*methods"):
        evaluate("fmnist-test", copy, methods="rollout", steps=4, shard_size=8, limit=32, progress=False)
    methods = "rollout,grad_rollout,relevance,attention,flow,random"
    with pytest.raises(JobError, match="different job.*batch_size"):
        evaluate("fmnist-test", copy, methods=methods, steps=4, shard_size=8, limit=32, progress=False, batch_size=4)
    assert json.loads((copy / "job.json").read_text())["batch_size"] == 32


# -- batches: one captured forward per batch, the same row as one image alone --------------------------------------


def statistics_columns(row: dict) -> dict:
    return {k: v for k, v in row.items() if k.split(".")[0] in ("distance", "entropy") or k.startswith("norm_")}


@pytest.fixture(scope="module")
def evaluator():
    from vizapp.evaluate.worker import Evaluator

    return Evaluator("bundled", [], steps=0)


@needs_fmnist
def test_evaluate_batch_matches_analyze_image_by_image(evaluator):
    """Second code path: vizapp.analyze of each image alone, the statistics computed as the one-image evaluation
    did before batching (entropy from the attention recomputed from q and k in float64)."""
    import vizapp
    from vizapp.evaluate.dataset import load_pixels

    vm = evaluator.vm
    items = list_items("fmnist-test", evaluator.labels)[:6]
    pixels = [load_pixels(it) for it in items]
    rows = evaluator.evaluate_batch(items, pixels)
    assert [r["status"] for r in rows] == ["ok"] * 6
    for item, px, row in zip(items, pixels, rows, strict=True):
        r = vizapp.analyze(vm, px)
        assert row["predicted"] == int(np.argmax(r.probs)) and row["target"] == item["target"]
        assert row["prob_pred"] == pytest.approx(float(np.max(r.probs)), rel=1e-6)
        expect = {}
        for layer in range(vm.num_layers):
            ent = attention_entropy(r.attention_layer(layer))
            st = token_norm_stats(torch.from_numpy(r.token_norms()[layer]), r.num_prefix_tokens)
            for h in range(vm.num_heads):
                expect[f"distance.l{layer}.h{h}"] = float(r.mean_distance[layer, h])
                expect[f"entropy.l{layer}.h{h}"] = float(ent[h])
            for key, value in st.items():
                expect[f"norm_{key}.l{layer}"] = float(value)
        got = statistics_columns(row)
        assert got.keys() == expect.keys() and len(got) == vm.num_layers * (2 * vm.num_heads + 3)
        np.testing.assert_allclose([got[k] for k in expect], list(expect.values()), rtol=1e-6, atol=1e-6)


def authors_accuracies(vm, x, sal, target, negative, black):
    """Chefer et al.'s loop (``generate_visualizations.py``, ``pertubation_eval_from_hdf5.py``) for one image, written as
    they write it: upsample, min-max, negate for negative, topk of int(base_size * step) pixels, scatter the removed
    pixels on every channel (their 0 before normalising is ``black`` after it), classify, compare with the target."""
    gh, gw = sal.shape
    res = torch.nn.functional.interpolate(
        sal.reshape(1, 1, gh, gw).float(), scale_factor=vm.patch_size, mode="bilinear"
    )
    res = (res - res.min()) / (res.max() - res.min())
    vis = (-res if negative else res).reshape(1, -1)
    org_shape = x.shape  # [1, C, H, W]
    base_size = org_shape[-2] * org_shape[-1]
    batch = []
    for step in [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]:
        _data = x.clone()
        _, idx = torch.topk(vis, int(base_size * step), dim=-1)
        _data = _data.reshape(org_shape[0], org_shape[1], -1)
        for c in range(org_shape[1]):
            _data[:, c].scatter_(-1, idx, float(black[c]))
        batch.append(_data.reshape(*org_shape))
    with torch.no_grad():
        pred = vm.logits(torch.cat(batch)).argmax(dim=-1)
    return (pred == target).long().tolist()


@needs_fmnist
def test_chefer2021_rows_equal_the_authors_loop():
    """The evaluation's chefer2021 accuracies and AUCs against the authors' procedure written out above, for maps of
    the predicted class: rollout from layer 1 (their baseline), GAE relevance, and the random baseline."""
    import vizapp
    from vizapp import methods as registry
    from vizapp.evaluate.dataset import load_pixels
    from vizapp.evaluate.worker import Evaluator, image_seed

    ev = Evaluator("bundled", ["rollout", "relevance", "random"], steps=0)
    assert ev.protocol == "chefer2021" and ev.rollout_start_layer == 1
    items = list_items("fmnist-test", ev.labels)[:4]
    for item in items:
        px = load_pixels(item)
        row = ev.evaluate(item, px)
        assert row["status"] == "ok" and row["protocol"] == "chefer2021"
        r = vizapp.analyze(ev.vm, px, gradients=True)
        pred, target = row["predicted"], row["target"]
        g = torch.Generator().manual_seed(image_seed(0, item["id"]))
        maps = {
            "rollout": torch.as_tensor(r.rollout(start_layer=1)),
            "relevance": torch.as_tensor(registry.explain(r, "relevance", pred)),
            "random": random_order_saliency(49, g).reshape(7, 7),
        }
        for name, sal in maps.items():
            for direction in ("positive", "negative"):
                accs = authors_accuracies(ev.vm, r.input, sal, target, direction == "negative", ev.black[:, 0, 0])
                got = [row[f"{name}.pred.{direction}.acc{k}"] for k in range(1, 10)]
                assert got == accs, (item["id"], name, direction)
                auc = 100 * np.trapezoid([row["correct"], *accs], [0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
                assert row[f"{name}.pred.{direction}.auc"] == pytest.approx(auc, abs=1e-9)
        assert [row[f"perturbation_x{k}"] for k in range(1, 10)] == list(CHEFER_FRACTIONS[1:])


@needs_fmnist
def test_the_evaluations_maps_of_a_group_equal_each_images_own(monkeypatch):
    """Rollout, the CLS attention, gradient rollout and relevance of a batch come from one forward's graph
    (vizapp.graph_maps), with no analysis of any image: each map equal to that image's own analysis's, for its
    predicted class and, where the target differs, for its target (one more backward, of those images only)."""
    import vizapp
    import vizapp.pipeline
    from vizapp import methods as registry
    from vizapp.evaluate import scores
    from vizapp.evaluate.dataset import load_pixels
    from vizapp.evaluate.worker import Evaluator
    from vizapp.imageio import decode_image

    names = ["rollout", "attention", "grad_rollout", "relevance"]
    ev = Evaluator("bundled", names, steps=0)
    items = list_items("fmnist-test", ev.labels)[:5]
    pixels = [load_pixels(it) for it in items]
    inputs = {i: ev._preprocess(decode_image(px).image) for i, px in enumerate(pixels)}
    heads = {i: ev._head(items[i], *found) for i, found in ev._statistics(inputs).items()}
    for i in (1, 3):  # a target that is not the prediction
        heads[i]["target"] = (heads[i]["predicted"] + 1 + i) % len(ev.labels)

    def no_analysis(*args, **kwargs):
        raise AssertionError("the maps went through per-image analyses")

    monkeypatch.setattr(vizapp.pipeline, "analyze_inputs", no_analysis)
    maps = scores._maps(ev, list(range(5)), items, inputs, heads, scores.Clocks(range(5), 60.0))
    monkeypatch.undo()
    for i, px in enumerate(pixels):
        r = vizapp.analyze(ev.vm, px)
        for kind in scores.CLASS_KINDS:
            cls = heads[i]["predicted"] if kind == "pred" else heads[i]["target"]
            for name in names:
                kw = {"start_layer": ev.rollout_start_layer} if name == "rollout" else {}
                want = registry.explain(r, name, cls, **kw).reshape(-1)
                got = maps[i][(name, kind)].numpy()
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max(), err_msg=(i, name))
        # the target's class maps are the target's, not the prediction's
        if i in (1, 3):
            assert not np.allclose(maps[i][("relevance", "target")], maps[i][("relevance", "pred")])


@needs_fmnist
def test_the_perturbed_copies_per_forward_follow_the_device():
    from vizapp import limits
    from vizapp.evaluate.worker import Evaluator

    # the CPU's (smaller forwards are faster per copy there: docs/benchmarks-copies-batch.md), a GPU's, or as given
    assert Evaluator("bundled", ["rollout"], steps=0).batch_size == limits.PERTURBATION_BATCH_CPU == 16
    assert limits.perturbation_batch(torch.device("cuda")) == limits.PERTURBATION_BATCH_GPU == 256
    assert limits.perturbation_batch("cpu") == 16
    assert Evaluator("bundled", ["rollout"], steps=0, batch_size=5).batch_size == 5


def test_rollout_start_layer_follows_the_protocol(tmp_path):
    from vizapp.evaluate.worker import Evaluator

    assert Evaluator("bundled", ["rollout"], steps=0, protocol="patches").rollout_start_layer == 0
    assert Evaluator("bundled", ["rollout"], steps=0, rollout_start_layer=0).rollout_start_layer == 0
    with pytest.raises(VizappError, match="rollout start layer 6"):
        Evaluator("bundled", ["rollout"], steps=0, rollout_start_layer=6)  # the bundled model has 6 layers
    with pytest.raises(VizappError, match="protocol"):
        Evaluator("bundled", ["rollout"], steps=0, protocol="pixels")


@needs_fmnist
def test_bad_and_failing_images_inside_a_batch_cost_only_their_rows(evaluator, monkeypatch):
    from vizapp.evaluate.dataset import load_pixels

    items = list_items("fmnist-test", evaluator.labels)[:5]
    pixels = [load_pixels(it) for it in items]
    alone = {it["id"]: evaluator.evaluate(it, px) for it, px in zip(items, pixels, strict=True)}  # batches of one
    real = evaluator._preprocess

    # item 3's input gets 3 channels: a group of its own whose forward fails (the model takes 1 channel)
    def preprocess(image):
        x = real(image)
        return x.expand(3, -1, -1) if np.array_equal(np.asarray(image), pixels[3]) else x

    monkeypatch.setattr(evaluator, "_preprocess", preprocess)
    errors = [None, None, "not an image", None, None]
    rows = evaluator.evaluate_batch(items, [None if e else px for px, e in zip(pixels, errors, strict=True)], errors)
    assert [r["status"] for r in rows] == ["ok", "ok", "bad_file", "error", "ok"]
    assert rows[2]["message"] == "not an image" and "channels" in rows[3]["message"]
    assert rows[2].keys() == rows[3].keys() == {"id", "source", "target", "status", "message", "protocol"}
    for i in (0, 1, 4):  # the same numbers as each image alone, to rounding
        a, b = statistics_columns(rows[i]), statistics_columns(alone[items[i]["id"]])
        assert rows[i]["predicted"] == alone[items[i]["id"]]["predicted"] and a.keys() == b.keys()
        np.testing.assert_allclose([a[k] for k in b], list(b.values()), rtol=1e-6, atol=1e-6)


@needs_fmnist
@pytest.mark.parametrize("stage", ["the statistics forward", "the maps", "the perturbation scores"])
def test_a_batch_that_fails_runs_again_image_by_image_and_says_so(monkeypatch, caplog, stage):
    """A failure of a batch's shared work (here one that happens only for batches of more than one image, as a bug of
    the batched path would) costs no row: the images run again one at a time, each row what that image gives alone;
    but it is recorded (``Evaluator.fallbacks``, which the evaluation benchmark prints) and logged, not silent."""
    import vizapp.graph_maps
    from vizapp.evaluate import scores
    from vizapp.evaluate.dataset import load_pixels
    from vizapp.evaluate.worker import Evaluator

    ev = Evaluator("bundled", ["rollout", "relevance", "random"], steps=2)
    items = list_items("fmnist-test", ev.labels)[:3]
    pixels = [load_pixels(it) for it in items]
    alone = [ev.evaluate(it, px) for it, px in zip(items, pixels, strict=True)]
    assert not ev.fallbacks  # batches of one never fall back

    def batch_only(real, batch_size):
        def run(*args, **kwargs):
            if batch_size(*args) > 1:
                raise RuntimeError("a batched-path bug")
            return real(*args, **kwargs)

        return run

    if stage == "the statistics forward":
        monkeypatch.setattr(ev, "statistics", batch_only(ev.statistics, lambda x: x.shape[0]))
    elif stage == "the maps":  # rollout and relevance come from one forward's graph (vizapp.graph_maps)
        real = vizapp.graph_maps.AttentionGraph
        monkeypatch.setattr(vizapp.graph_maps, "AttentionGraph", batch_only(real, lambda vm, x: x.shape[0]))
    else:
        monkeypatch.setattr(scores, "_scores", batch_only(scores._scores, lambda ev_, images, *a: len(images)))
    with caplog.at_level("WARNING", logger="vizapp.evaluate.worker"):
        rows = ev.evaluate_batch(items, pixels)
    why = f"{stage}: RuntimeError: a batched-path bug"
    assert ev.fallbacks == {why: 1}
    # where vizapp met it: the call into the failing function, the innermost frame in the package
    site = {
        "the statistics forward": "_statistics",
        "the maps": "_graph_maps",
        "the perturbation scores": "method_scores",
    }
    module = "worker" if stage == "the statistics forward" else "scores"
    assert re.fullmatch(rf"vizapp/evaluate/{module}\.py:\d+ \({site[stage]}\)", ev.fallback_sites[why]), (
        ev.fallback_sites
    )
    assert (
        f"a batch of 3 images ran again one at a time after {why} (raised at {ev.fallback_sites[why]})" in caplog.text
    )
    assert "Traceback (most recent call last)" in caplog.text and caplog.text.count("Traceback") == 1
    for a, b in zip(alone, rows, strict=True):
        assert b["status"] == "ok" and a.keys() == b.keys()
        if stage != "the statistics forward":  # the maps and scores ran as each image alone: the same accuracies
            assert {k: v for k, v in b.items() if ".acc" in k} == {k: v for k, v in a.items() if ".acc" in k}
    from benchmarks.evaluation import fallbacks

    assert (
        fallbacks(ev) == f"FELL BACK to one image at a time once: 1x after {why} (raised at {ev.fallback_sites[why]})"
    )
    caplog.clear()
    with caplog.at_level("WARNING", logger="vizapp.evaluate.worker"):
        ev.evaluate_batch(items, pixels)  # the same cause again: counted and logged in a line, without its traceback
    assert ev.fallbacks == {why: 2} and "(raised at" in caplog.text and "Traceback" not in caplog.text
    ev.fallbacks.clear()
    assert fallbacks(ev) == "never fell back to one image at a time"
    # a recording that failed (eager from then on); undone after the test, as the loaded model is shared
    monkeypatch.setitem(ev.vm.graphs._failed, ("a shape",), "RuntimeError: capture failed")
    assert fallbacks(ev).endswith("; CUDA graphs that fell back to eager passes: RuntimeError: capture failed")


def test_raised_at_names_the_innermost_frame_in_vizapp_or_else_the_innermost():
    from vizapp.evaluate.worker import raised_at
    from vizapp.models import load_model

    def here():
        raise RuntimeError("outside vizapp")

    try:
        here()
    except RuntimeError as exc:
        line = exc.__traceback__.tb_next.tb_frame.f_lineno  # here()'s raise
        assert raised_at(exc) == f"test_evaluate.py:{line} (here)"
    with pytest.raises(VizappError) as info:
        load_model("no-such-model-name", pretrained=False)  # raised inside vizapp (and maybe deeper, in timm)
    assert re.fullmatch(r"vizapp/[\w/]+\.py:\d+ \(\w+\)", raised_at(info.value)), raised_at(info.value)
    assert raised_at(RuntimeError("never raised")) == "an unknown place (no traceback)"


def _batches_fail(monkeypatch) -> str:
    """Makes the perturbation scores fail for batches of more than one image (a bug of the batched path); returns the
    fallback record's key."""
    from vizapp.evaluate import scores

    real = scores._scores

    def run(ev_, images, *args, **kwargs):
        if len(images) > 1:
            raise RuntimeError("a batched-path bug")
        return real(ev_, images, *args, **kwargs)

    monkeypatch.setattr(scores, "_scores", run)
    return "the perturbation scores: RuntimeError: a batched-path bug"


@needs_fmnist
def test_the_job_report_says_which_batches_ran_one_image_at_a_time(monkeypatch, tmp_path, capsys):
    """A job's fallbacks, with where each cause was raised, and its CUDA graphs that could not be recorded reach its
    shard files, summary.json, summary.md and the command's exit lines, and survive a resumed run's report; a job
    without any says nothing (its shard files carry no such key)."""
    from vizapp.evaluate.engines import read_shard
    from vizapp.models import load_model

    job = dict(methods="rollout,random", steps=0, shard_size=4, limit=8, batch_size=3)
    clean = evaluate("fmnist-test", tmp_path / "clean", **job, progress=False)
    assert (clean["fallbacks"], clean["fallback_sites"], clean["graph_failures"]) == ({}, {}, [])
    text = (tmp_path / "clean" / "summary.md").read_text()
    assert "one image at a time" not in text and "CUDA graph" not in text
    assert not {"fallbacks", "fallback_sites", "graph_failures"} & set(read_shard(tmp_path / "clean", 0))

    why = _batches_fail(monkeypatch)
    # a recording that failed, as a GPU would keep it (the loaded model is shared: undone after the test)
    failed = "RuntimeError: capture failed (raised at vizapp/cudagraph.py:1 (_record))"
    monkeypatch.setitem(load_model("bundled").graphs._failed, ("a shape",), failed)
    out = tmp_path / "fell"
    # shards of 4 in batches of 3: each shard has a batch of 3 (falls back) and one of 1 (cannot)
    argv = ["fmnist-test", "--out", str(out), "--methods", "rollout,random", "--steps", "0", "--shard-size", "4"]
    argv += ["--limit", "8", "--batch-size", "3"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "warning: a batch ran again one image at a time 2 time(s)" in err
    assert "warning: 1 CUDA graph recording(s) failed or fell back (right rows, slower)" in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["fallbacks"] == {why: 2} and summary["graph_failures"] == [failed]
    site = summary["fallback_sites"][why]
    assert re.fullmatch(r"vizapp/evaluate/scores\.py:\d+ \(method_scores\)", site), site  # where _scores is called
    for k in (0, 1):
        shard = read_shard(out, k)
        assert (shard["fallbacks"], shard["fallback_sites"], shard["graph_failures"]) == (
            {why: 1},
            {why: site},
            [failed],
        )
    text = (out / "summary.md").read_text()
    assert (
        "**A batch ran again one image at a time 2 times.**" in text and f"2x after {why} (raised at {site})." in text
    )
    assert "**CUDA graphs: 1 recording failed or fell back.** The rows are the same; a pass that could not" in text
    assert f"both slower. {failed}." in text
    assert read_table(out) == read_table(tmp_path / "clean")  # the rows are each image's alone: here the same
    monkeypatch.undo()
    again = evaluate("fmnist-test", out, **job, progress=False)  # resumes: nothing to run, the record is kept
    assert again["images_run"] == 0 and again["fallbacks"] == {why: 2} and again["graph_failures"] == [failed]


def test_records_of_slow_paths_merge_by_hand():
    """Shard records merge as the report reads them: counts summed, each cause's first site, each graph once."""
    from vizapp.evaluate.engines import merge_records

    a = {"fallbacks": {"x": 1}, "fallback_sites": {"x": "here:1 (f)"}, "graph_failures": ["g1"]}
    b = {
        "fallbacks": {"x": 2, "y": 1},
        "fallback_sites": {"x": "there:2 (g)", "y": "y:3 (h)"},
        "graph_failures": ["g1", "g2"],
    }
    assert merge_records([a, None, {}, b]) == {
        "fallbacks": {"x": 3, "y": 1},
        "fallback_sites": {"x": "here:1 (f)", "y": "y:3 (h)"},
        "graph_failures": ["g1", "g2"],
    }
    assert merge_records([]) == {"fallbacks": {}, "fallback_sites": {}, "graph_failures": []}


@needs_fmnist
def test_a_ray_actor_hands_on_its_batches_fallbacks(monkeypatch, tmp_path):
    """The Ray actor's output carries each evaluation batch's fallbacks (with their sites) on its first row, and the
    driver's writer merges them into the shard file; both called here in this process, where the evaluator can be
    made to fail."""
    from vizapp.evaluate.engines import RayAnalyser, ShardWriter, _decode, read_shard

    why = _batches_fail(monkeypatch)
    items = list_items("fmnist-test", tuple(CLASS_NAMES))[:5]
    actor = RayAnalyser({"model": "bundled", "methods": ("rollout", "random"), "steps": 0}, 1, 60.0)
    parts = [_decode({"shard": 0, "items": json.dumps(part), "fmnist_dir": ""}) for part in (items[:3], items[3:])]
    out = actor({k: [p[k] for p in parts] for k in parts[0]})
    records = [json.loads(f) if f else "" for f in out["fell_back"]]
    site = actor.ev.fallback_sites[why]
    first = {"fallbacks": {why: 1}, "fallback_sites": {why: site}, "graph_failures": []}
    assert records == [first, "", "", first, ""]
    assert len(out["row"]) == 5
    (tmp_path / "shards").mkdir()  # as prepare() makes it
    writer = ShardWriter(tmp_path, {0: 5})
    writer.add({k: v[:2] for k, v in out.items()})  # the driver takes rows in batches of any size
    assert read_shard(tmp_path, 0) is None  # not all of its rows are in yet
    writer.add({k: v[2:] for k, v in out.items()})
    shard = read_shard(tmp_path, 0)
    assert shard["fallbacks"] == {why: 2} and shard["fallback_sites"] == {why: site}
    assert "graph_failures" not in shard  # none failed: the key is left out
    assert [r["id"] for r in shard["rows"]] == [it["id"] for it in items]


def test_batches_are_fixed_slices_of_a_shard():
    from vizapp.evaluate.engines import batches, shards

    items = [{"id": str(i)} for i in range(19)]
    parts = shards(items, 8)
    assert [[len(b) for b in batches(p, 3)] for p in parts] == [[3, 3, 2], [3, 3, 2], [3]]
    assert [it["id"] for p in parts for b in batches(p, 3) for it in b] == [str(i) for i in range(19)]


def test_progress_lines_are_throttled_and_never_repeat_a_count():
    from vizapp.evaluate.engines import Progress

    out = io.StringIO()
    bar = Progress(10, already=2, every=3600.0, stream=out)
    bar.update(3)  # within the hour: throttled
    assert out.getvalue() == ""
    bar.update(0, force=True)  # the end of a job: the count the throttle hid
    bar.update(0, force=True)  # again: nothing new to say
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("[evaluate] 5/10 images ") and " img/s  ETA " in lines[0]
    bar.every = 0.0
    bar.update(5)  # unthrottled: the new count, then the forced line at the end says it no more
    bar.update(0, force=True)
    lines = out.getvalue().splitlines()
    assert [line.split()[1] for line in lines] == ["5/10", "10/10"] and lines[1].endswith("ETA 0 s")


@needs_fmnist
def test_batch_size_changes_only_the_rounding(small_local, tmp_path):
    evaluate("fmnist-test", tmp_path, **{**SMALL, "batch_size": 16}, progress=False)  # one batch per 8-image shard
    other, ref = read_rows(tmp_path), list(csv.DictReader(io.StringIO(small_local)))
    assert [r["id"] for r in other] == [r["id"] for r in ref] and other[0].keys() == ref[0].keys()
    for a, b in zip(other, ref, strict=True):
        for k in a:
            try:
                fa, fb = float(a[k]), float(b[k])
            except ValueError:
                assert a[k] == b[k]
                continue
            assert fa == pytest.approx(fb, rel=1e-5, abs=1e-6), k


# -- bad inputs ----------------------------------------------------------------------------------------------------


def huge_png_header() -> bytes:
    """A PNG that declares 100000 x 100000 pixels (no pixel data): must be refused before decoding."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_bad_files_are_skipped_and_counted(tmp_path, capsys):
    data = tmp_path / "flat"
    data.mkdir()
    Image.fromarray(np.full((28, 28), 200, np.uint8)).save(data / "a_good.png")
    (data / "b_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(200)))
    (data / "c_notes.txt").write_text("not an image")
    (data / "d_huge.png").write_bytes(huge_png_header())
    out = tmp_path / "out"
    assert main([str(data), "--out", str(out), "--methods", "rollout,random", "--steps", "2"]) == 0
    assert "1/4 images evaluated" in capsys.readouterr().out
    rows = {r["id"]: r for r in read_rows(out)}
    assert rows["a_good.png"]["status"] == "ok" and rows["a_good.png"]["protocol"] == "chefer2021"  # the default
    assert rows["a_good.png"]["target"] == rows["a_good.png"]["predicted"]  # flat folder: predicted class as target
    assert [rows[k]["status"] for k in ("b_corrupt.png", "c_notes.txt", "d_huge.png")] == ["bad_file"] * 3
    assert "pixels" in rows["d_huge.png"]["message"] or "large" in rows["d_huge.png"]["message"]
    assert all(rows[k]["message"] for k in ("b_corrupt.png", "c_notes.txt"))
    md = (out / "summary.md").read_text()
    assert "4 listed, 1 evaluated, 3 bad file" in md


@needs_fmnist
def test_imagefolder_classes_map_to_the_model_labels(tmp_path):
    images, labels = load_fashion_mnist("test")
    for folder, cls in (("t-shirt_top", 0), ("Trouser", 1)):
        (tmp_path / folder).mkdir()
        i = int(np.flatnonzero(labels == cls)[0])
        Image.fromarray(images[i]).save(tmp_path / folder / f"{i}.png")
    items = list_items(tmp_path, CLASS_NAMES)
    assert [(it["id"].split("/")[0], it["target"]) for it in items] == [("Trouser", 1), ("t-shirt_top", 0)]
    summary = evaluate(str(tmp_path), tmp_path / "out", methods="rollout", steps=0, progress=False)
    assert summary["status"] == {"ok": 2}


def test_dataset_errors_say_what_to_do(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="empty"):
        list_items(empty, CLASS_NAMES)
    tree = tmp_path / "tree"
    (tree / "Trouser").mkdir(parents=True)
    with pytest.raises(DatasetError, match="'Trouser' has no images"):
        list_items(tree, CLASS_NAMES)
    (tree / "Trouser" / "x.png").write_bytes(b"x")
    (tree / "Giraffe").mkdir()
    (tree / "Giraffe" / "y.png").write_bytes(b"y")
    with pytest.raises(DatasetError, match="'Giraffe' is not one of the model's 10 classes"):
        list_items(tree, CLASS_NAMES)
    (tree / "stray.png").write_bytes(b"z")
    with pytest.raises(DatasetError, match="mixes"):
        list_items(tree, CLASS_NAMES)
    with pytest.raises(DatasetError, match="not a folder"):
        list_items(tmp_path / "missing", CLASS_NAMES)


def test_model_that_cannot_load_and_unknown_method(tmp_path, capsys):
    assert main(["fmnist-test", "--out", str(tmp_path / "o"), "--model", "not_a_model_xyz"]) == 2
    assert "unknown model 'not_a_model_xyz'" in capsys.readouterr().err
    assert main(["fmnist-test", "--out", str(tmp_path / "o"), "--methods", "rollout,magic"]) == 2
    assert "method must be one of" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing half-written


@needs_fmnist
def test_patches_protocol_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "patches"
    args = ["fmnist-test", "--out", str(out), "--methods", "rollout,random", "--steps", "0", "--limit", "4"]
    assert main([*args, "--protocol", "patches"]) == 0
    job = json.loads((out / "job.json").read_text())
    assert job["protocol"] == "patches" and job["rollout_start_layer"] == 0
    x = patch_fractions(49)  # 7x7 grid: the fraction of the patches actually removed
    rows = read_rows(out)
    assert len(rows) == 4
    for r in rows:
        assert r["protocol"] == "patches"
        np.testing.assert_array_equal([float(r[f"perturbation_x{k}"]) for k in range(1, 10)], x[1:])
        for key in ("pred.positive", "pred.negative"):
            accs = [int(r["correct"])] + [int(r[f"rollout.{key}.acc{k}"]) for k in range(1, 10)]
            assert float(r[f"rollout.{key}.auc"]) == pytest.approx(float(accuracy_auc(accs, x)))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["protocol"] == "patches" and summary["perturbation_x"] == pytest.approx(list(x))
    md = (out / "summary.md").read_text()
    assert "## Perturbation test, protocol `patches` (vizapp's patch variant" in md
    assert (
        "**not** the published protocol" in md and "measured with the `chefer2021` pixel protocol, not this one" in md
    )
    assert "| Attention rollout, from layer 0; Abnar" in md
    # resuming with the other protocol is refused rather than mixing tables
    assert main([*args, "--protocol", "chefer2021"]) == 2
    assert "differs in: protocol, rollout_start_layer" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*args, "--protocol", "pixels"])  # argparse refuses an unknown protocol
    assert "invalid choice: 'pixels'" in capsys.readouterr().err


@needs_fmnist
def test_per_image_time_limit(tmp_path):
    summary = evaluate("fmnist-test", tmp_path, methods="rollout", steps=0, limit=3, time_limit=1e-9, progress=False)
    assert summary["status"] == {"timeout": 3}
    assert "timeout" in (tmp_path / "summary.md").read_text()


def test_random_baseline_seed_depends_on_the_image_only():
    from vizapp.evaluate.worker import image_seed

    a = random_order_saliency(49, torch.Generator().manual_seed(image_seed(0, "fmnist-test/00007")))
    b = random_order_saliency(49, torch.Generator().manual_seed(image_seed(0, "fmnist-test/00007")))
    c = random_order_saliency(49, torch.Generator().manual_seed(image_seed(0, "fmnist-test/00008")))
    assert torch.equal(a, b) and not torch.equal(a, c)


# -- Ray: the same table -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    from vizapp.evaluate.engines import init_ray, local_cluster_cpus

    init_ray(None, local_cluster_cpus(2))
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def small_local(tmp_path_factory):
    if not Path(FASHION_MNIST_DIR, "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip("Debian dataset-fashion-mnist is not installed (make test installs it)")
    out = tmp_path_factory.mktemp("small-local")
    evaluate("fmnist-test", out, **SMALL, progress=False)
    return read_table(out)


@pytest.mark.ray
def test_ray_two_workers_equal_local_engine(ray_cluster, small_local, tmp_path):
    summary = evaluate("fmnist-test", tmp_path, **SMALL, engine="ray", workers=2, progress=False)
    assert summary["evaluated"] == SMALL["limit"]
    assert read_table(tmp_path) == small_local  # same numbers, same order, byte for byte
    assert summary["fallbacks"] == {}  # every batch ran batched
    timing = summary["engine_timing"]  # start-up up to the first rows; the actors' busy time, summed
    assert 0 < timing["first_s"] <= timing["wall_s"] <= summary["seconds"]
    assert 0 < timing["busy_s"] < 2 * timing["wall_s"]  # 2 actors


@pytest.mark.ray
def test_ray_equals_local_engine_under_the_patches_protocol(ray_cluster, tmp_path):
    if not Path(FASHION_MNIST_DIR, "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip("Debian dataset-fashion-mnist is not installed (make test installs it)")
    small = {**SMALL, "limit": 8, "protocol": "patches"}
    evaluate("fmnist-test", tmp_path / "local", **small, progress=False)
    evaluate("fmnist-test", tmp_path / "ray", **small, engine="ray", workers=2, progress=False)
    assert read_table(tmp_path / "ray") == read_table(tmp_path / "local")
    assert read_rows(tmp_path / "ray")[0]["protocol"] == "patches"


@pytest.mark.ray
def test_ray_worker_killed_mid_job_gives_the_same_table(ray_cluster, small_local, tmp_path):
    marker = tmp_path / "crashed"
    evaluate(
        "fmnist-test",
        tmp_path / "out",
        **SMALL,
        engine="ray",
        workers=2,
        progress=False,
        crash_once=f"{marker}:fmnist-test/00013",
    )
    assert marker.exists()  # an actor process did die mid-job
    assert read_table(tmp_path / "out") == small_local


@pytest.mark.ray
def test_ray_equals_local_engine_on_a_swin(ray_cluster, tmp_path):
    """A windowed model (a transformers Swin folder): its maps over the first stage's grid, both class kinds and
    per-head columns of different widths per stage give the same table from both engines, byte for byte."""
    from conftest import random_image
    from test_swin import write_swin_folder

    folder = write_swin_folder(tmp_path / "swin", heads=(3, 6))
    data = tmp_path / "data"
    for i in range(6):
        (data / f"LABEL_{i % 5}").mkdir(parents=True, exist_ok=True)
        random_image(i, size=(36 + 2 * i, 40)).save(data / f"LABEL_{i % 5}" / f"{i}.png")
    job = dict(model=folder, methods="rollout,grad_rollout,relevance,last_layer,random", steps=3, shard_size=4)
    evaluate(str(data), tmp_path / "local", **job, batch_size=3, progress=False)
    evaluate(str(data), tmp_path / "ray", **job, batch_size=3, engine="ray", workers=2, progress=False)
    table = read_table(tmp_path / "local")
    assert read_table(tmp_path / "ray") == table
    assert "last_layer.target.negative.auc" in table and "distance.l3.h5" in table and "distance.l0.h3" not in table
    assert [r["status"] for r in read_rows(tmp_path / "ray")] == ["ok"] * 6


def test_throughput_table_on_a_folder(tmp_path, capsys):
    from vizapp.evaluate import throughput

    for i in range(3):
        Image.fromarray(np.full((28, 28), 60 * i, np.uint8)).save(tmp_path / f"{i}.png")
    args = ["--images", "4", "--method-images", "2", "--steps", "2", "--repeats", "1", "--batch-size", "2"]
    assert throughput.main([*args, "--data", str(tmp_path)]) == 0
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][1:]  # after the header
    assert [line.split(" | ")[0] for line in table] == [
        "| bare forward, batch 64 (reference)",
        "| bare forward, batch 1",
        "| local engine, statistics only (batches of 2)",
        "| local engine, every method + both protocols",
    ]
    assert [line.split(" | ")[1] for line in table] == ["4", "4", "3", "2"]  # the folder holds 3 images
    assert table[0].endswith(" | 1.000× |")


def test_naflex_images_are_evaluated_at_their_own_aspect_ratio(evaluator, monkeypatch):
    """A NaFlexViT's images keep their aspect ratios in the evaluation, as in vizapp.analyze: images of one shape share
    a forward, and each row equals analyze of that image alone."""
    from conftest import random_image

    import vizapp

    torch.manual_seed(0)
    vm = vizapp.load_model(
        "naflexvit_base_patch16_gap",
        pretrained=False,
        device="cpu",
        depth=2,
        embed_dim=64,
        num_heads=4,
        num_classes=3,
        pretrained_cfg_overlay=dict(input_size=(3, 64, 48)),
    )
    monkeypatch.setattr(evaluator, "vm", vm)
    sizes = [(60, 160), (160, 60), (60, 160)]  # wide, tall, wide: two shapes in one batch
    pixels = [np.asarray(random_image(i, size=s)) for i, s in enumerate(sizes)]
    items = [{"id": f"img{i}", "source": f"img{i}.png", "target": 0} for i in range(3)]
    rows = evaluator.evaluate_batch(items, pixels)
    assert [r["status"] for r in rows] == ["ok"] * 3
    grids = set()
    for px, row in zip(pixels, rows, strict=True):
        r = vizapp.analyze(vm, px)
        grids.add(r.grid_size)
        assert row["prob_pred"] == pytest.approx(float(np.max(r.probs)), rel=1e-5)
        got = [row[f"distance.l{layer}.h{h}"] for layer in range(2) for h in range(4)]
        np.testing.assert_allclose(got, r.mean_distance.ravel(), rtol=1e-5, atol=1e-5)
    assert len(grids) == 2  # a wide and a tall grid


def test_a_file_name_that_is_not_utf8_is_reported(tmp_path):
    """Issue 27 (medium 8): a file whose name has bytes that are not UTF-8 used to crash the report on every rerun
    (UnicodeEncodeError), leaving a one-row CSV and no summary."""
    import os

    data = tmp_path / "data"
    data.mkdir()
    for raw in (b"ok.png", b"bad\xff\xfe.png"):
        Image.fromarray(np.zeros((28, 28), np.uint8)).save(
            os.path.join(os.fsencode(data), raw).decode("utf-8", "surrogateescape")
        )
    out = tmp_path / "out"
    main([str(data), "--model", "bundled", "--out", str(out), "--methods", "rollout", "--steps", "0"])
    with open(out / "results.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["id"] for r in rows) == ["bad\\xff\\xfe.png", "ok.png"]
    assert all(r["status"] == "ok" for r in rows)
    assert "2 evaluated" in (out / "summary.md").read_text(encoding="utf-8")
