"""The statistics registry (vizapp.statistics): one class, registered once, found by every path."""

from __future__ import annotations

import csv
import math

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


def test_entropy_from_scores_by_hand():
    """H = Σ a (m - s) - log a_m of softmax rows, with no log per weight: rows worked out by hand."""
    from vizapp.analysis.headstats import row_entropy_from_scores

    scores = torch.tensor(
        [
            [0.0, 0.0, 0.0, 0.0],  # uniform over 4: log 4
            [math.log(1.0), math.log(3.0), -1e4, -1e4],  # weights 1/4, 3/4, 0, 0
            [5.0, -200.0, -200.0, -200.0],  # one weight 1, the rest underflow to 0: 0
        ]
    )
    attn = torch.softmax(scores, dim=-1)
    got = row_entropy_from_scores(attn, scores.clone())
    want = [math.log(4), -(0.25 * math.log(0.25) + 0.75 * math.log(0.75)), 0.0]
    np.testing.assert_allclose(got.numpy(), want, atol=2e-7)


def test_entropy_from_scores_equals_the_log_per_weight():
    """Against row_entropy (a log per weight, the other path) and float64, on spread scores (weights down to 0)."""
    from vizapp.analysis.headstats import row_entropy, row_entropy_from_scores

    g = torch.Generator().manual_seed(0)
    scores = torch.randn(6, 50, 197, generator=g) * torch.tensor([0.1, 1, 5, 20, 60, 100])[:, None, None]
    attn = torch.softmax(scores, dim=-1)
    spent = scores.clone()
    out = torch.empty(6, 50)
    got = row_entropy_from_scores(attn, spent, out=out)
    assert got.data_ptr() == out.data_ptr() and not torch.equal(spent, scores)  # the scores are overwritten
    a64 = torch.softmax(scores.double(), dim=-1)
    exact = -(a64 * a64.clamp_min(1e-300).log()).sum(-1)
    np.testing.assert_allclose(got.double().numpy(), exact.numpy(), rtol=1e-5, atol=2e-6)
    np.testing.assert_allclose(got.numpy(), row_entropy(attn).numpy(), rtol=1e-5, atol=2e-6)


def test_entropy_on_a_device_is_two_operations_with_the_hosts_values():
    """On a GPU the terms are one elementwise pass (torch.special.entr) and the sum a second, not five passes; the
    values are the host form's (rows by hand: uniform, a zero weight, one-hot; spread rows against float64), into
    the caller's buffers."""
    from benchmarks.launches import Counter
    from tests.devicesim import OnDevice
    from vizapp.analysis.headstats import row_entropy

    g = torch.Generator().manual_seed(1)
    scores = torch.randn(6, 50, 197, generator=g) * torch.tensor([0.1, 1, 5, 20, 60, 100])[:, None, None]
    host = torch.softmax(scores, dim=-1)
    host[0, 0] = torch.tensor([0.25, 0.75] + [0.0] * 195)
    host[0, 1] = 1.0 / 197
    host[0, 2] = torch.nn.functional.one_hot(torch.tensor(3), 197).float()
    device = host.as_subclass(OnDevice)  # reports cuda:0: the device form, computed here
    work, out = torch.empty_like(host).as_subclass(OnDevice), torch.empty(6, 50).as_subclass(OnDevice)
    with Counter() as c:
        got = row_entropy(device, out=out, work=work)
    assert c.kernels == 2, c.kernels
    assert got.data_ptr() == out.data_ptr() and got.device.type == "cuda"
    got = got.cpu()
    by_hand = [-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)), math.log(197), 0.0]
    np.testing.assert_allclose(got[0, :3].numpy(), by_hand, rtol=1e-6, atol=1e-6)
    a64 = host.double()
    exact = -(a64 * a64.clamp_min(1e-300).log()).sum(-1)
    np.testing.assert_allclose(got.double().numpy(), exact.numpy(), rtol=1e-5, atol=2e-6)
    np.testing.assert_allclose(got.numpy(), row_entropy(host).numpy(), rtol=1e-6, atol=1e-6)  # the host's form
    assert row_entropy(device).cpu().shape == (6, 50)  # without buffers too


class ScoreTop(statistics.HeadStatistic):
    """A toy statistic read from the scores when it gets them (their row maximum), else 0 from the attention."""

    name, label, unit = "score_top", "largest score", ""

    def rows(self, attn, row, geometry, out, work):
        out.zero_()

    def rows_from_scores(self, attn, scores, row, geometry, out):
        torch.amax(scores, dim=-1, out=out)
        scores.fill_(float("nan"))  # it may overwrite them: no other statistic reads them after it
        return True


def _reduced(chosen, attn, scores, given):
    red = statistics.StatisticsReducer([3], 2, statistics.Geometry(5, 1, patch_distance_matrix((2, 2), 16)), chosen)
    red.chunk(0, 0, 0, attn, 0, scratch=scores.clone(), scores_in_scratch=given)
    red.layer_done(0)
    return red.values


def test_reducer_offers_the_scores_first_and_once():
    """Chunks [images, heads, N, N] whose scratch holds the scores: the first statistic taking them reads them intact
    (the distance, listed before it, overwrites its working buffer: the scratch), a later one falls back to the
    attention; the entropy from the scores equals the entropy from the attention and float64."""
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(2, 3, 5, 5, generator=g) * 4
    attn = torch.softmax(scores, dim=-1)
    first, second = ScoreTop(), ScoreTop()
    second.name = "score_top_2"
    distance, entropy = statistics.STATISTICS["distance"], statistics.STATISTICS["entropy"]
    got = _reduced([distance, first, second], attn, scores, True)
    torch.testing.assert_close(got["score_top"][0], scores.amax(-1).mean(-1).double())
    assert (got["score_top_2"][0] == 0).all()
    assert (_reduced([distance, first], attn, scores, False)["score_top"][0] == 0).all()  # not told: no scores
    with_scores, without = (_reduced([distance, entropy, first], attn, scores, given) for given in (True, False))
    assert (with_scores["score_top"][0] == 0).all()  # the entropy took them
    for name in ("distance", "entropy"):
        torch.testing.assert_close(with_scores[name], without[name], rtol=1e-6, atol=1e-6)
    a64 = attn.double()
    torch.testing.assert_close(with_scores["entropy"][0], -(a64 * a64.log()).sum(-1).mean(-1), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("images", [1, 3])
def test_every_layers_means_at_once_equal_layer_by_layer(monkeypatch, images):
    """Where every layer's rows fit ``STATISTIC_ROWS_BYTES`` each layer keeps its own, and the means over the queries
    are taken after the last layer, one operation a statistic for all (a GPU's kernels: 2 for 3 layers, not 6);
    bitwise the values of one layer's rows at a time (the limit at 0). Until the last layer, nothing is averaged. By
    hand: uniform attention over 5 tokens has entropy log 5 in every row. And a layer given another geometry later
    (a windowed model's) turns the rows back to one layer's, averaging the layers done so far."""
    from tests.opcount import Ops

    g = torch.Generator().manual_seed(3)
    attn = torch.softmax(3 * torch.randn(3, images, 4, 5, 5, generator=g), dim=-1)  # [L, B, H, N, N]
    attn[1, -1] = 0.2  # the last image's layer 1: uniform
    geometry = statistics.Geometry(5, 1, patch_distance_matrix((2, 2), (16, 16)))

    def reduce(limit: int) -> tuple[statistics.StatisticsReducer, Ops]:
        monkeypatch.setattr(statistics.limits, "STATISTIC_ROWS_BYTES", limit)
        red = statistics.StatisticsReducer([4] * 3, images, geometry)
        with Ops() as ops:
            for layer in range(3):
                red.chunk(layer, 0, 0, attn[layer], 0)  # every image's heads at once
                red.layer_done(layer)
                if limit and layer < 2:
                    assert red.values["distance"].isnan().all()
        return red, ops

    by_layer, ops = reduce(2**20)
    one_layer, ops_one = reduce(0)
    for name, v in one_layer.values.items():  # block statistics stay NaN here (no block outputs)
        torch.testing.assert_close(by_layer.values[name], v, rtol=0, atol=0, equal_nan=True)
    assert not by_layer.values["entropy"].isnan().any()
    torch.testing.assert_close(by_layer.values["entropy"][1, -1], torch.full((4,), math.log(5), dtype=torch.float64))
    assert (ops.names["aten.mean"], ops_one.names["aten.mean"]) == (2, 6)

    monkeypatch.setattr(statistics.limits, "STATISTIC_ROWS_BYTES", 2**20)
    mixed = statistics.StatisticsReducer([4] * 3, images, geometry)
    for layer in range(3):
        if layer == 2:  # an equal geometry, but another object: as a windowed forward gives each layer's
            mixed.set_geometry(2, statistics.Geometry(5, 1, geometry.dist))
        mixed.chunk(layer, 0, 0, attn[layer], 0)
        mixed.layer_done(layer)
    for name, v in one_layer.values.items():
        torch.testing.assert_close(mixed.values[name], v, rtol=0, atol=0, equal_nan=True)


def test_toy_statistic_reaches_the_app(toy, tmp_path):
    """Registered before the app is built, the toy head statistic is offered in the Attention distance tab (the block
    one is not: one number per layer), drawn through the server as analyze computed it, with no reference line."""
    from appdriver import AppDriver, assert_clean, plot_of, shipped
    from conftest import start_app

    from vizapp import models

    sneaker = models.ASSETS_DIR / "examples" / "fmnist_7_sneaker.png"
    demo = start_app(models.BUNDLED)
    try:
        d = AppDriver(demo.local_url)
        choice = d.by_elem_id("vizapp-statistic")
        offered = d.props[choice]["choices"]
        assert [c[1] for c in offered] == ["distance", "entropy", "largest_weight"]
        assert offered[-1][0] == "largest attention weight"
        d.set(choice, "largest_weight", fire_change=False)
        assert_clean(d.analyze(sneaker), "analyze with the toy statistic chosen")
        fig = plot_of(d, "vizapp-distance-plot")
    finally:
        demo.close()
    expected = vizapp.analyze(vizapp.load_model("bundled"), sneaker).statistics["largest_weight"]  # [L, H]
    np.testing.assert_allclose(shipped(fig["data"][0]["y"]), expected.ravel(), rtol=1e-6)
    assert "Largest attention weight per head" in fig["layout"]["title"]["text"].replace("<br>", " ")
    assert not fig["layout"].get("shapes")


def test_the_entropy_line_is_uniform_attention_over_every_key_unless_a_mask_hides_some():
    """The Attention distance tab's entropy: dots equal to analyze's entropy, under log N for N = 50 tokens (1 CLS +
    7x7 patches of the bundled model; uniform attention over N keys has entropy log N, the most a row can have);
    with a -inf in a layer's bias (a mask hiding keys) there is no line, and the title says why."""
    from dataclasses import replace

    from vizapp import views

    vm = vizapp.load_model("bundled")
    r = vizapp.analyze(vm, Image.fromarray(np.random.default_rng(1).integers(0, 255, (28, 28), dtype=np.uint8)))
    fig = views.head_statistic_view(r, "entropy")
    np.testing.assert_array_equal(fig.data[0].y, r.statistics["entropy"].ravel())
    assert fig.layout.shapes[0].y0 == pytest.approx(math.log(50)) and (r.statistics["entropy"] <= math.log(50)).all()
    mask = torch.zeros(1, 50, 50)
    mask[0, 3, 7] = -math.inf
    masked = views.head_statistic_view(replace(r, biases=(mask,) * vm.num_layers), "entropy")
    assert not masked.layout.shapes and "mask hides some keys" in masked.layout.title.text.replace("<br>", " ")
    with pytest.raises(vizapp.errors.BadParameterError, match="no per-head statistic 'norm_patch_max'"):
        views.head_statistic_view(r, "norm_patch_max")  # a per-block statistic: not a dot per head
