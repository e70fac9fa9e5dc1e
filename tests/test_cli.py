"""The terminal command prints the top-5 and the per-layer distances, and fails cleanly on bad input."""

from __future__ import annotations

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
