"""The statistics registry (vizapp.statistics): one class, registered once, found by every path."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from PIL import Image

import vizapp
from vizapp import statistics
from vizapp.analysis.distance import patch_distance_matrix


class LargestWeight(statistics.HeadStatistic):
    """A toy statistic: the largest attention weight of each query row, averaged over the rows."""

    name, label, unit = "largest_weight", "largest attention weight", ""

    def rows(self, attn, row, geometry, out, work):
        torch.amax(attn, dim=-1, out=out)


class PatchOverPrefix(statistics.BlockStatistic):
    """A toy block statistic: the number of patch tokens over the number of all tokens (no data needed)."""

    name, label, unit = "patch_share", "share of patch tokens", ""

    def of_block(self, tokens):
        b, n, _ = tokens.out.shape
        return torch.full((b,), (n - tokens.num_prefix_tokens) / n, dtype=torch.float64)


@pytest.fixture
def toy():
    """The two toy statistics, registered for one test."""
    stats = [statistics.register(LargestWeight()), statistics.register(PatchOverPrefix())]
    yield stats
    for s in stats:
        statistics.unregister(s.name)


def test_toy_statistic_by_hand_in_chunks(toy):
    """1 CLS + a 2x2 grid, two heads, rows fed in two blocks: the largest weight per row, by hand."""
    a = torch.tensor(
        [
            [[0.2] * 5, [0.6, 0.1, 0.1, 0.1, 0.1], [0.0, 1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0, 0, 0], [0.25] * 4 + [0.0]],
            [[0.2] * 5] * 5,
        ]
    )  # [H=2, N=5, N=5]
    red = statistics.StatisticsReducer([2], 1, statistics.Geometry(5, 1, patch_distance_matrix((2, 2), 1)))
    red.chunk(0, 0, 0, a[:, :2], 0)
    red.chunk(0, 0, 0, a[:, 2:], 2)
    red.layer_done(0)
    red.block(0, torch.zeros(1, 5, 3))
    assert red.complete()
    want = [(0.2 + 0.6 + 1.0 + 0.5 + 0.25) / 5, 0.2]
    np.testing.assert_allclose(red.values["largest_weight"][0, 0].numpy(), want, atol=1e-7)
    assert red.values["patch_share"][0, 0].item() == pytest.approx(0.8)


def test_registry_refuses_what_it_cannot_use():
    with pytest.raises(ValueError, match="registered already"):
        statistics.register(statistics.MeanDistance())
    with pytest.raises(TypeError, match="HeadStatistic or a BlockStatistic"):
        statistics.register(object())
    with pytest.raises(KeyError, match="no statistic called"):
        statistics.unregister("nope")


def test_toy_statistic_reaches_analyze_dataset_mode_and_the_evaluation(toy, tmp_path):
    """Registered once, the toy statistics appear in all three outputs, equal to each other and to the attention."""
    from vizapp import stats
    from vizapp.evaluate import evaluate

    vm = vizapp.load_model("bundled")
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).save(folder / f"img{i}.png")
    paths = sorted(folder.glob("*.png"))
    patches = vm.grid_size[0] * vm.grid_size[1]
    share = patches / (patches + vm.num_prefix_tokens)  # from the model: 49 / 50 for the bundled 7x7 grid and CLS

    # 1. analyze: r.statistics, against the attention it keeps (the second path)
    analyses = [vizapp.analyze(vm, p) for p in paths]
    for r in analyses:
        direct = np.stack(
            [r.attention_layer(layer).amax(dim=-1).mean(dim=-1).numpy() for layer in range(vm.num_layers)]
        )
        np.testing.assert_allclose(r.statistics["largest_weight"], direct, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(r.statistics["patch_share"], [share] * vm.num_layers, rtol=1e-6)

    # 2. dataset mode: one CSV column, the mean over the images
    out_csv = tmp_path / "stats.csv"
    args = [str(folder), "--model", "bundled", "--out-csv", str(out_csv), "--out-html", str(tmp_path / "d.html")]
    assert stats.main([*args, "--no-progress"]) == 0
    with open(out_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    assert "largest_weight" in rows[0] and "patch_share" in rows[0]
    got = np.array([float(r["largest_weight"]) for r in rows]).reshape(vm.num_layers, vm.num_heads)
    np.testing.assert_allclose(got, np.mean([r.statistics["largest_weight"] for r in analyses], axis=0), atol=1e-5)

    # 3. the evaluation: one column per layer and head
    out = tmp_path / "eval"
    evaluate(str(folder), out, methods="", steps=0, progress=False)
    with open(out / "results.csv", newline="") as f:
        ev = {r["id"]: r for r in csv.DictReader(f)}
    for p, r in zip(paths, analyses, strict=True):
        row = ev[p.name]
        table = np.array(
            [
                [float(row[f"largest_weight.l{layer}.h{h}"]) for h in range(vm.num_heads)]
                for layer in range(vm.num_layers)
            ]
        )
        np.testing.assert_allclose(table, r.statistics["largest_weight"], atol=1e-5)  # a batched forward: rounding
        assert float(row[f"patch_share.l{vm.num_layers - 1}"]) == pytest.approx(share)


def test_block_statistics_take_the_callers_token_norms():
    """By hand: a block of two tokens (3, 4) and (0, 5) has norms 5 and 5; the reducer computes them itself, or takes
    the norms the caller passes (a windowed analysis keeps them for its views) and then reads those: (1, 2) give a
    mean of 1.5 and a max of 2 though the tokens say otherwise."""
    geometry = statistics.Geometry(2, 0, torch.zeros(2, 2))
    out = torch.tensor([[[3.0, 4.0], [0.0, 5.0]]])  # [B, N, D]
    own = statistics.StatisticsReducer([1], 1, geometry, statistics.block_statistics())
    own.block(0, out)
    assert own.values["norm_patch_mean"][0].tolist() == [5.0] and own.values["norm_patch_max"][0].tolist() == [5.0]
    given = statistics.StatisticsReducer([1], 1, geometry, statistics.block_statistics())
    given.block(0, out, torch.tensor([[1.0, 2.0]]))
    assert given.values["norm_patch_mean"][0].tolist() == [1.5] and given.values["norm_patch_max"][0].tolist() == [2.0]


def test_every_layers_block_statistics_at_once_equal_layer_by_layer(toy):
    """StatisticsReducer.blocks: two layers x two images of 1 CLS + 2 patches, by hand (norms 5, 0 | 10, 5, ...),
    and equal to block() layer by layer for every registered block statistic, the toy one (which reads the outputs'
    shape) included; a stack of the wrong size is refused."""
    geometry = statistics.Geometry(3, 1, torch.zeros(2, 2))
    outputs = torch.tensor(
        [
            [[[3.0, 4.0], [0.0, 0.0], [6.0, 8.0]], [[0.0, 1.0], [0.0, 2.0], [0.0, 4.0]]],
            [[[1.0, 0.0], [3.0, 4.0], [5.0, 12.0]], [[2.0, 0.0], [0.0, 0.0], [0.0, 0.0]]],
        ]
    )  # [L=2, B=2, N=3, D=2]
    at_once = statistics.StatisticsReducer([1, 1], 2, geometry, statistics.block_statistics())
    at_once.blocks(outputs)
    by_layer = statistics.StatisticsReducer([1, 1], 2, geometry, statistics.block_statistics())
    for layer in range(2):
        by_layer.block(layer, outputs[layer])
    # patch tokens' norms: layer 0 (0, 10) and (2, 4); layer 1 (5, 13) and (0, 0); prefix: 5, 1 | 1, 2
    assert at_once.values["norm_patch_mean"].tolist() == [[5.0, 3.0], [9.0, 0.0]]
    assert at_once.values["norm_patch_max"].tolist() == [[10.0, 4.0], [13.0, 0.0]]
    assert at_once.values["norm_prefix_mean"].tolist() == [[5.0, 1.0], [1.0, 2.0]]
    assert at_once.values["patch_share"].tolist() == [[2 / 3] * 2] * 2
    for name, v in by_layer.values.items():
        assert torch.equal(at_once.values[name], v), name
    with pytest.raises(ValueError, match="outputs of 1 layers x 2 images"):
        at_once.blocks(outputs[:1])
