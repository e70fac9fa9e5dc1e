"""Statistics of one's own from the command line (vizapp.user_statistics): ``--statistics MODULE`` for the app,
dataset mode and the evaluation."""

from __future__ import annotations

import csv
import sys

import numpy as np
import pytest
from PIL import Image

import vizapp
from vizapp import statistics
from vizapp.errors import BadParameterError, VizappError
from vizapp.user_statistics import import_statistics, registered_beyond_built_ins

MODULE = """
import torch

from vizapp import statistics


class RowPeak(statistics.HeadStatistic):
    name, label, unit = "row_peak", "largest attention weight of a row", ""

    def rows(self, attn, row, geometry, out, work):
        torch.amax(attn, dim=-1, out=out)


statistics.register(RowPeak())
"""


@pytest.fixture
def own_module(tmp_path, monkeypatch):
    """A module of one's own on sys.path, ``rowpeak_stats``, whose import registers ``row_peak``; forgotten after."""
    (tmp_path / "rowpeak_stats.py").write_text(MODULE)
    (tmp_path / "empty_stats.py").write_text("X = 1\n")
    (tmp_path / "broken_stats.py").write_text("raise RuntimeError('no GPU here')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "rowpeak_stats"
    if "row_peak" in statistics.STATISTICS:
        statistics.unregister("row_peak")
    for name in ("rowpeak_stats", "empty_stats", "broken_stats"):
        sys.modules.pop(name, None)


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).save(folder / f"img{i}.png")
    return folder


def test_a_module_registers_its_statistic_and_a_bad_one_is_named(own_module):
    assert registered_beyond_built_ins() == []
    assert import_statistics([own_module]) == ["row_peak"]
    assert registered_beyond_built_ins() == ["row_peak"]
    assert import_statistics([own_module]) == []  # imported already: registered then, nothing twice
    with pytest.raises(BadParameterError, match="--statistics broken_stats: could not import it.*no GPU here"):
        import_statistics(["broken_stats"])
    with pytest.raises(BadParameterError, match="--statistics empty_stats: importing it registered no statistic"):
        import_statistics(["empty_stats"])
    with pytest.raises(BadParameterError, match="--statistics no_such_module_here: could not import it"):
        import_statistics(["no_such_module_here"])


def test_dataset_mode_and_the_evaluation_take_the_module(own_module, images, tmp_path, capsys):
    """``--statistics`` on both command lines: a CSV column in dataset mode, equal to the mean of analyze's values
    (the largest weight of each row, by hand from the attention), and a column per layer and head in the
    evaluation, whose job then differs from the same command without the module; the Ray engine is refused with the
    statistic named, before any worker starts."""
    from vizapp import stats
    from vizapp.evaluate import run

    out_csv = tmp_path / "stats.csv"
    args = [str(images), "--model", "bundled", "--out-csv", str(out_csv), "--out-html", str(tmp_path / "d.html")]
    assert stats.main([*args, "--no-progress", "--statistics", own_module]) == 0
    with open(out_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    vm = vizapp.load_model("bundled")
    analyses = [vizapp.analyze(vm, p) for p in sorted(images.glob("*.png"))]
    by_hand = [
        np.stack([r.attention_layer(layer).amax(dim=-1).mean(dim=-1).numpy() for layer in range(vm.num_layers)])
        for r in analyses
    ]
    got = np.array([float(r["row_peak"]) for r in rows]).reshape(vm.num_layers, vm.num_heads)
    np.testing.assert_allclose(got, np.mean(by_hand, axis=0), atol=1e-5)

    out = tmp_path / "eval"
    common = [str(images), "--out", str(out), "--methods", "", "--steps", "0", "--statistics", own_module]
    assert run.main(common) == 0
    with open(out / "results.csv", newline="") as f:
        first = next(csv.DictReader(f))
    assert float(first["row_peak.l0.h0"]) == pytest.approx(float(by_hand[0][0, 0]), abs=1e-5)
    statistics.unregister("row_peak")  # the same folder without the module: another job, not a resume
    capsys.readouterr()
    assert run.main(common[:-2]) == 2
    assert "different job (differs in: statistics)" in capsys.readouterr().err
    statistics.register(sys.modules[own_module].RowPeak())
    with pytest.raises(VizappError, match=r"registered in this process alone \(row_peak\).*--statistics MODULE"):
        run.evaluate(str(images), tmp_path / "ray", methods="", steps=0, engine="ray", progress=False)


def test_rays_actors_import_the_module_and_give_the_local_rows(own_module, images, tmp_path):
    """The Ray engine with ``statistics_modules``: each actor imports the module from the folder the driver found it
    in, and the rows hold the same statistic, byte for byte, as the local engine's."""
    from vizapp.evaluate import run

    job = dict(methods="", steps=0, statistics_modules=[own_module], progress=False)
    run.evaluate(str(images), tmp_path / "local", **job)
    run.evaluate(str(images), tmp_path / "ray", engine="ray", workers=1, **job)
    tables = []
    for engine in ("local", "ray"):
        with open(tmp_path / engine / "results.csv", newline="") as f:
            tables.append(
                {r["id"]: {k: v for k, v in r.items() if k.startswith("row_peak.")} for r in csv.DictReader(f)}
            )
    assert (
        tables[0] == tables[1] and len(tables[0]) == 2 and len(next(iter(tables[0].values()))) == 18
    )  # 6 layers x 3 heads


def test_the_app_offers_the_modules_statistic(own_module, monkeypatch):
    """``python app.py --statistics MODULE``: the module is imported before the page is built, so the Attention
    distance tab offers its statistic; VIZAPP_STATISTICS does the same without arguments; a module that cannot be
    imported stops the start with its name."""
    import app
    from vizapp import ui

    built, real_build = [], ui.build_demo

    class NotServed:
        def launch(self, **kwargs):
            built.append(kwargs)

    def choices(model):
        demo = real_build(model)
        [dropdown] = [c for c in demo.config["components"] if c["props"].get("elem_id") == "vizapp-statistic"]
        built.append([c[1] for c in dropdown["props"]["choices"]])
        return demo

    monkeypatch.setattr(ui, "build_demo", choices)
    monkeypatch.setattr(ui, "queue", lambda demo: NotServed())
    app.main(["--model", "bundled", "--statistics", own_module])
    assert built[0] == ["distance", "entropy", "row_peak"]
    with pytest.raises(SystemExit):
        app.main(["--model", "bundled", "--statistics", "broken_stats"])
    statistics.unregister("row_peak")  # forgotten, so that the variable's import is the one that registers it
    sys.modules.pop(own_module)
    monkeypatch.setenv("VIZAPP_STATISTICS", f" {own_module} ,")
    app.main(["--model", "bundled"])
    assert built[-2] == ["distance", "entropy", "row_peak"]
