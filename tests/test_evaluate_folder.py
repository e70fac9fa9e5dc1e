"""vizapp.evaluate's output folder under misuse (issue 27, low): a corrupt job.json, an --out that is a file, a stray
shard file, two runs on one folder, CSV cells a spreadsheet would run as formulas, and a full disk."""

from __future__ import annotations

import builtins
import csv
import errno
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vizapp.evaluate import main
from vizapp.evaluate.engines import JobError, lock_folder, write_shard
from vizapp.evaluate.report import csv_text, escape_cell, unescape_cell

ARGS = ["--model", "bundled", "--methods", "rollout", "--steps", "0", "--shard-size", "1"]


def flat_folder(folder: Path, names: tuple[str, ...]) -> Path:
    folder.mkdir()
    for i, name in enumerate(names):
        Image.fromarray(np.full((28, 28), 40 * i, np.uint8)).save(folder / name)
    return folder


def rows_of(out: Path) -> list[dict[str, str]]:
    with open(out / "results.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def finished(tmp_path):
    """A finished two-image job (one image a shard): (data folder, out folder)."""
    data = flat_folder(tmp_path / "data", ("a.png", "b.png"))
    out = tmp_path / "out"
    assert main([str(data), "--out", str(out), *ARGS]) == 0
    return data, out


def test_a_corrupt_job_file_is_a_message_not_a_traceback(finished, capsys):
    data, out = finished
    (out / "job.json").write_text('{"data": "x", "mod')  # cut short
    capsys.readouterr()
    assert main([str(data), "--out", str(out), *ARGS]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: job.json in --out 'out' cannot be read") and "--overwrite" in err
    assert "Traceback" not in err and str(out.parent) not in err
    (out / "job.json").write_text("[1, 2]")  # JSON, but not a job
    assert main([str(data), "--out", str(out), *ARGS]) == 2
    assert "is not a job's settings" in capsys.readouterr().err
    assert main([str(data), "--out", str(out), *ARGS, "--overwrite"]) == 0  # what the message says to do works
    assert len(rows_of(out)) == 2


def test_an_out_that_is_a_file_is_refused(tmp_path, capsys):
    data = flat_folder(tmp_path / "data", ("a.png",))
    out = tmp_path / "results.txt"
    out.write_text("keep me")
    assert main([str(data), "--out", str(out), *ARGS]) == 2
    err = capsys.readouterr().err
    assert "--out 'results.txt' is a file, not a folder" in err and "Traceback" not in err
    assert out.read_text() == "keep me"


def test_stray_files_in_the_shard_folder_are_not_rows(finished, capsys):
    data, out = finished
    shards = out / "shards"
    shutil.copy(shards / "shard-00000.json", shards / "shard-00000 copy.json")  # a copy beside the original
    shutil.copy(shards / "shard-00001.json", shards / "shard-00007.json")  # past the job's two shards
    (shards / "shard-00002.json").write_text("{")  # a torn file
    assert main([str(data), "--out", str(out), *ARGS, "--report-only"]) == 0
    assert sorted(r["id"] for r in rows_of(out)) == ["a.png", "b.png"]
    assert "2 listed, 2 evaluated" in (out / "summary.md").read_text()
    # a shard file holding another shard's number (renamed by hand) is redone, not read twice
    shutil.copy(shards / "shard-00000.json", shards / "shard-00001.json")
    assert main([str(data), "--out", str(out), *ARGS]) == 0
    assert sorted(r["id"] for r in rows_of(out)) == ["a.png", "b.png"]
    assert json.loads((shards / "shard-00001.json").read_text())["shard"] == 1


def test_an_overwrite_run_needs_the_folder_alone(finished, capsys):
    """Two runs with --overwrite on one folder used to delete each other's shards and mix their rows: a run holds
    a lock on the folder (shared to resume or add shards, exclusive to overwrite) and one that cannot have it stops
    before writing anything."""
    data, out = finished
    before = {p.name: p.read_bytes() for p in (out / "shards").iterdir()}
    capsys.readouterr()
    with lock_folder(out, exclusive=False):  # another run resuming this job (e.g. a --shards split)
        assert main([str(data), "--out", str(out), *ARGS, "--overwrite"]) == 2
        err = capsys.readouterr().err
        assert "another evaluation is running in --out 'out'" in err and "wait for it" in err
        assert {p.name: p.read_bytes() for p in (out / "shards").iterdir()} == before  # nothing deleted
        assert main([str(data), "--out", str(out), *ARGS]) == 0  # runs of one job may share the folder
    capsys.readouterr()
    with lock_folder(out, exclusive=True):  # another run overwriting it
        assert main([str(data), "--out", str(out), *ARGS]) == 2
        assert "another evaluation is running" in capsys.readouterr().err
        assert main([str(data), "--out", str(out), *ARGS, "--overwrite"]) == 2
    assert main([str(data), "--out", str(out), *ARGS, "--overwrite"]) == 0  # the lock goes with its holder


def test_csv_text_cells_are_escaped_and_numbers_are_not():
    rows = [
        {"id": '=HYPERLINK("http://x")', "source": "+1.png", "message": "-cmd|' /C calc'!A0", "target_label": "@SUM"},
        {"id": "\tx", "source": "\rx", "message": "plain", "target_label": "a-b", "prob_pred": -0.5, "correct": -1},
    ]
    cols = ["id", "source", "message", "target_label", "prob_pred", "correct"]
    got = list(csv.DictReader(io.StringIO(csv_text(rows, cols), newline="")))
    assert [got[0][c] for c in cols[:4]] == ['\'=HYPERLINK("http://x")', "'+1.png", "'-cmd|' /C calc'!A0", "'@SUM"]
    # numbers are data; a raw carriage return would split the row, so it is written as \r
    assert [got[1][c] for c in cols] == ["'\tx", "\\rx", "plain", "a-b", "-0.5", "-1"]
    assert [unescape_cell(got[0][c]) for c in cols[:4]] == [rows[0][c] for c in cols[:4]]
    assert unescape_cell(got[1]["id"]) == "\tx" and escape_cell("\rx") == "'\rx"
    assert escape_cell("'=x") == "'=x" and unescape_cell("'=x") == "=x" and unescape_cell("'quoted") == "'quoted"


def test_file_names_that_look_like_formulas_are_escaped_in_the_report(tmp_path, capsys):
    data = flat_folder(tmp_path / "data", ("=1+2.png", "-5.png", "@x.png", "ok.png"))
    out = tmp_path / "out"
    assert main([str(data), "--out", str(out), *ARGS]) == 0
    rows = rows_of(out)
    assert sorted(r["id"] for r in rows) == ["'-5.png", "'=1+2.png", "'@x.png", "ok.png"]
    assert all(r["status"] == "ok" and float(r["prob_pred"]) > 0 for r in rows)
    # a rerun resumes from the shards (the CSV is only written), and writes the same table
    text = (out / "results.csv").read_text()
    assert main([str(data), "--out", str(out), *ARGS]) == 0
    assert (out / "results.csv").read_text() == text


class _FullDisk:
    """A file whose writes fail as on a full disk."""

    def __init__(self, f):
        self._f = f

    def write(self, _data):
        raise OSError(errno.ENOSPC, "No space left on device")

    def close(self):
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def full_disk_for_temporary_files(monkeypatch):
    """Every file opened for writing under a name ending in ``.tmp`` fails its writes with ENOSPC (builtins.open and
    io.open, which pathlib uses)."""
    real_open = builtins.open

    def fake_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        return _FullDisk(f) if "w" in mode and str(file).endswith(".tmp") else f

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(io, "open", fake_open)


def test_a_full_disk_leaves_no_temporary_file(tmp_path, monkeypatch):
    out = tmp_path / "out"
    (out / "shards").mkdir(parents=True)
    write_shard(out, 0, [{"id": "a"}], 1.0, "test")
    before = (out / "shards" / "shard-00000.json").read_text()
    full_disk_for_temporary_files(monkeypatch)
    with pytest.raises(JobError, match="could not write shard-00000.json: the disk is full; free some space"):
        write_shard(out, 0, [{"id": "b"}], 1.0, "test")
    with pytest.raises(JobError, match="could not write shard-00001.json"):
        write_shard(out, 1, [{"id": "c"}], 1.0, "test")
    monkeypatch.undo()
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["shard-00000.json"]  # no stale .tmp
    assert (out / "shards" / "shard-00000.json").read_text() == before  # the old shard is whole


def test_a_full_disk_during_a_run_is_a_message(tmp_path, monkeypatch, capsys):
    data = flat_folder(tmp_path / "data", ("a.png",))
    out = tmp_path / "out"
    full_disk_for_temporary_files(monkeypatch)
    assert main([str(data), "--out", str(out), *ARGS]) == 2
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert "the disk is full" in err and "rerun the same command" in err and "Traceback" not in err
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
