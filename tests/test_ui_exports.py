"""Downloads on a full disk (issue 27, low): the person gets a message that says what to do and names no server
path, nothing half-written stays in the export folder, and the app keeps serving (the next export works)."""

from __future__ import annotations

import errno
from pathlib import Path

import gradio as gr
import numpy as np
import pytest

from vizapp import ui, views
from vizapp.ui import common, handlers


def _noprogress(*args, **kwargs):
    return None


@pytest.fixture(scope="module")
def state(card_model, photo):
    return ui.analyze_image(photo, card_model, progress=_noprogress, trusted_model=card_model).state


def _files_under_export_root() -> set[str]:
    root = common.export_folder().parent
    return {str(p) for p in root.rglob("*") if p.is_file()}


def _fill_then_fail(path, *args, **kwargs):
    """A write that gets some bytes onto the disk and then finds it full, as numpy's and zipfile's would."""
    with open(path, "wb") as f:
        f.write(b"PK\x03\x04 half a file")
    raise OSError(errno.ENOSPC, "No space left on device", str(path))


def _zip_then_fail(figs, path):
    return _fill_then_fail(path)


EXPORTS = {
    "attention": (lambda st: ui.export_files(st), (np, "savez_compressed", _fill_then_fail)),
    "features": (lambda st: ui.export_features(st, -1, 0.0, 1, 2, 0.6), (np, "savez_compressed", _fill_then_fail)),
    "figures": (lambda st: handlers.export_figures(st, -1, 0.5, None), (views, "figures_zip", _zip_then_fail)),
}


@pytest.mark.parametrize("kind", list(EXPORTS))
def test_a_full_disk_is_a_message_and_leaves_no_file(state, monkeypatch, kind):
    export, (owner, attr, fake) = EXPORTS[kind]
    before = _files_under_export_root()
    monkeypatch.setattr(owner, attr, fake)
    with pytest.raises(gr.Error) as err:
        export(state)
    msg = str(err.value.message if hasattr(err.value, "message") else err.value)
    assert "the server's disk is full" in msg and "try again" in msg
    assert "/tmp" not in msg and "vizapp-export" not in msg and "Errno" not in msg
    assert _files_under_export_root() == before, "a half-written download stayed behind"
    monkeypatch.undo()
    out = export(state)  # the app keeps serving: the next export works
    assert Path(out[0]).is_file() and Path(out[0]).parent.parent == common.export_folder().parent
