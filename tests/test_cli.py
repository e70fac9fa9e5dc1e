"""The terminal command prints each image's top-5 and per-layer distances, saves a batch's maps, and fails cleanly on
bad input."""

from __future__ import annotations

import numpy as np
import pytest

import vizapp
from tests.conftest import random_image
from vizapp import cli


def test_cli_prints_top5_and_distances(card_model, photo, capsys):
    assert cli.main([photo, "--model", card_model]) == 0
    out = capsys.readouterr().out
    assert "top-5:" in out and out.count("%") >= 5
    assert "layer  0:" in out and "layer  1:" in out


def test_cli_bad_image_is_a_clear_error(card_model, tmp_path, capsys):
    bad = tmp_path / "x.png"
    bad.write_bytes(b"")
    assert cli.main([str(bad), "--model", card_model]) == 2
    assert "error:" in capsys.readouterr().err


def _images(folder, n):
    paths = []
    for i in range(n):
        p = folder / f"img{i}.png"
        random_image(20 + i, size=(40 + 8 * i, 36)).save(p)
        paths.append(str(p))
    return paths


def test_cli_analyses_several_images_in_batches_and_saves_each_images_own_maps(
    card_model, tmp_path, capsys, monkeypatch
):
    """Three images and an unreadable file, two images per batch: the file is reported by name and left out, each
    image printed under its path, the batch API called on groups of 2 and 1, and the saved maps (loaded without
    pickle) equal each image analysed alone."""
    paths = _images(tmp_path, 3)
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    groups = []
    real = vizapp.analyze

    def counted(vm, images, **kw):
        groups.append(len(images))
        return real(vm, images, **kw)

    monkeypatch.setattr(vizapp, "analyze", counted)
    argv = [paths[0], str(bad), *paths[1:], "--model", card_model, "--batch-size", "2"]
    rc = cli.main([*argv, "--explain", "rollout,relevance", "--class", "3", "--out", str(tmp_path / "maps")])
    assert rc == 1
    out, err = capsys.readouterr()
    assert f"error: {bad}: " in err and "not image data" in err
    assert [line[3:] for line in out.splitlines() if line.startswith("== ")] == paths
    assert groups == [2, 1]
    monkeypatch.setattr(vizapp, "analyze", real)
    with np.load(tmp_path / "maps.npz", allow_pickle=False) as saved:
        assert saved["images"].tolist() == paths
        vm = vizapp.load_model(card_model)
        for i, p in enumerate(paths):
            alone = vizapp.analyze(vm, p)
            np.testing.assert_allclose(saved["rollout"][i], alone.rollout(), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(saved["relevance"][i], alone.relevance(3), rtol=1e-5, atol=1e-6)
        assert not np.allclose(saved["relevance"][0], saved["relevance"][1])


def test_cli_refuses_a_bad_method_or_class_before_printing_and_fails_when_no_image_is_readable(
    card_model, tmp_path, capsys
):
    paths = _images(tmp_path, 1)
    with pytest.raises(SystemExit) as stop:  # argparse's refusal: status 2, before the model loads
        cli.main([*paths, "--model", card_model, "--explain", "rollout,nope", "--out", str(tmp_path / "m")])
    assert stop.value.code == 2 and "--explain takes methods among rollout" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # maps are asked for with nowhere to save them
        cli.main([*paths, "--model", card_model, "--explain", "rollout"])
    capsys.readouterr()
    rc = cli.main(
        [*paths, "--model", card_model, "--explain", "relevance", "--class", "99", "--out", str(tmp_path / "m")]
    )
    out, err = capsys.readouterr()
    assert rc == 2 and "class of image 0 must be a label or an index in 0..9, got 99" in err and out == ""
    assert not (tmp_path / "m.npz").exists()
    bad = tmp_path / "empty.png"
    bad.write_bytes(b"")
    assert cli.main([str(bad), str(bad), "--model", card_model]) == 2
    assert capsys.readouterr().err.count("error:") == 2


def test_cli_on_a_windowed_model_prints_each_layers_own_heads(tmp_path, capsys):
    """A transformers Swin folder (3 heads in the first stage, 6 in the second): the header gives the range of heads,
    and each layer's distances are over its own heads, not the NaN cells the [L, max H] table has for the others."""
    from tests.test_swin import write_swin_folder

    folder = write_swin_folder(tmp_path / "swin", heads=(3, 6))
    paths = _images(tmp_path, 2)
    assert cli.main([*paths, "--model", str(folder)]) == 0
    out = capsys.readouterr().out
    assert out.count("layers, 3-6 heads,") == 2
    r = vizapp.analyze(vizapp.load_model(str(folder)), paths[0])
    rows = [line for line in out.split("== ")[1].splitlines() if line.startswith("  layer ")]
    assert len(rows) == r.num_layers and "nan" not in out
    first = r.mean_distance[0][np.isfinite(r.mean_distance[0])]
    assert len(first) == 3 and f"{first.mean():7.1f}" in rows[0]
