"""What the handlers share: the analysis kept for a person's state (in :mod:`vizapp.ui.store`), the view controls, the session, the error
wrapper that turns every failure into a message, the GPU decoration for ZeroGPU Spaces, and private export folders."""

from __future__ import annotations

import errno
import functools
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import gradio as gr
import numpy as np
import torch

from vizapp import views
from vizapp.errors import BadParameterError, VizappError
from vizapp.pipeline import Analysis, analyze
from vizapp.ui import deadline
from vizapp.ui.outputs import CompareOutputs
from vizapp.ui.store import STORED, ResultKey
from vizapp.ui.validation import as_choice

log = logging.getLogger("vizapp")

F = TypeVar("F", bound=Callable[..., Any])


def cleared_outputs() -> dict[str, Any]:
    """The outputs a new analysis empties (the "Cleared" fields of :class:`vizapp.ui.outputs.AnalyzeOutputs`): what the
    previous image's slow operations and exports left must not stay up beside the new image's views."""
    return dict(
        compare=None,
        deletion=None,
        insertion=None,
        auc_table=gr.update(value=None),
        importance=None,
        importance_note="",
        npz_file=None,
        json_file=None,
        features_npz=None,
        pca_gallery=None,
        second_note="",
        figures_zip=None,
        figures_note="",
    )


# Exported files: gradio copies what a handler returns into its own cache, so ours are only needed until then.
EXPORT_MAX_AGE_S = 3600.0
_export_root: tempfile.TemporaryDirectory | None = None
_export_lock = threading.Lock()


def export_folder(now: float | None = None) -> Path:
    """A fresh private folder for one export. All live under one folder per process, removed when the process
    exits; folders older than :data:`EXPORT_MAX_AGE_S` are removed here, so a server that runs for weeks does not
    fill its disk."""
    global _export_root
    with _export_lock:
        if _export_root is None:
            _export_root = tempfile.TemporaryDirectory(prefix="vizapp-export-")
        root = Path(_export_root.name)
        cutoff = (time.time() if now is None else now) - EXPORT_MAX_AGE_S
        for old in root.iterdir():
            try:
                if old.stat().st_mtime < cutoff:
                    shutil.rmtree(old, ignore_errors=True)
            except FileNotFoundError:
                pass
        return Path(tempfile.mkdtemp(dir=root))


def write_export(name: str, write: Callable[[Path], None], folder: Path | None = None) -> Path:
    """Write one download: ``write(path)`` writes a temporary file, renamed to ``name`` once whole, in ``folder`` (a
    fresh :func:`export_folder` when None). When the write fails (a full disk), the folder goes too, so nothing
    half-written stays behind, and the person gets a message without the server's paths.

    Raises:
        VizappError: the file could not be written.
    """
    try:
        folder = export_folder() if folder is None else folder
        tmp = folder / f".part-{name}"  # keeps the suffix: numpy's savez adds ".npz" to a name without it
        write(tmp)
        path = folder / name
        os.replace(tmp, path)
        return path
    except OSError as e:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
        log.warning("export %s failed: %r", name, e)
        why = (
            "the server's disk is full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else "the server could not store it"
        )
        raise VizappError(
            f"the download could not be written: {why}; try again in a while (your analysis is kept)"
        ) from None


def user_errors(fn: F) -> F:
    """Turn every failure into a gr.Error with a message a person can act on; the server keeps serving."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except VizappError as e:
            raise gr.Error(str(e)) from None
        except torch.OutOfMemoryError:
            raise gr.Error("out of memory for this model and image; pick a smaller model") from None
        except Exception:
            log.exception("unexpected error in %s", fn.__name__)
            raise gr.Error(
                "something went wrong on our side while doing this; the app is still running — try again, "
                "or another image or model"
            ) from None

    return wrapper  # type: ignore[return-value]


def on_gpu(fn: F) -> F:
    """On Hugging Face ZeroGPU Spaces, run ``fn`` with a GPU attached; elsewhere unchanged."""
    try:
        import spaces  # type: ignore[import-not-found]
    except ImportError:
        return fn
    return spaces.GPU(fn)


analyze_on_gpu = on_gpu(analyze)  # decorated once, at import, as ZeroGPU expects


def analysis_state(state: Any, request: gr.Request | None = None) -> dict[str, Any]:
    """A session's state with its kept analysis (and second image's, under "other") fetched from the results store
    (:mod:`vizapp.ui.store`): what handlers work with. ResultDroppedError when the store no longer keeps it; what a
    handler returns as the new state is :func:`kept_state` of it."""
    key = state.get("result") if isinstance(state, dict) else None
    if not isinstance(key, ResultKey):
        raise BadParameterError("no analysis yet: upload an image (or pick an example) and press Analyze")
    return {**state, **key.store.get(key, session_id(request))}


def kept_state(st: dict[str, Any]) -> dict[str, Any]:
    """What the ``gr.State`` keeps of a working state: everything but the analyses, which stay in the store."""
    return {k: v for k, v in st.items() if k not in STORED}


def colormap_choice(value: Any) -> str:
    """The colour map a person picked (None: the default)."""
    return views.Controls().colorscale if value in (None, "") else as_choice(value, "colour map", views.COLOR_SCALES)


def view_controls(state: dict[str, Any], **kw: Any) -> views.Controls:
    return views.Controls(query=state.get("query", "cls"), tile=state.get("tile", (0, 0)), **kw)


def session_id(request: gr.Request | None) -> str | None:
    return getattr(request, "session_hash", None)


def patch_at(state: Any, evt: gr.SelectData, request: gr.Request | None = None) -> tuple[int, int]:
    """The patch (row, col) under a click on the clickable image (the model's view upscaled by
    :func:`vizapp.views.query_image_scale`)."""
    r: Analysis = analysis_state(state, request)["analysis"]
    x, y = (evt.index if isinstance(evt.index, (list, tuple)) else (0, 0))[:2]
    s = views.query_image_scale(r)
    row = int(np.clip(int(y) // (r.patch_size[0] * s), 0, r.grid_size[0] - 1))
    col = int(np.clip(int(x) // (r.patch_size[1] * s), 0, r.grid_size[1] - 1))
    return row, col


def compared(
    r: Any,
    chosen: list[tuple[str, Callable[[deadline.Deadline], np.ndarray]]],
    cls: Any,
    n_steps: int,
    progress: Any,
    request: gr.Request | None,
) -> CompareOutputs:
    """The Compare tab's outputs for an analysis ``r`` (a plain or a windowed one): each map of ``chosen`` (its label,
    and what computes it given the request's deadline), then each map's deletion and insertion curves one map at a
    time, then the random order's (last, as ``faithfulness`` adds it). The deadline (VIZAPP_REQUEST_SECONDS, tripped
    by Cancel too) is checked before each map and each map's curves."""
    maps: dict[str, np.ndarray] = {}
    curves: dict[str, Any] = {}
    with deadline.running(session_id(request)) as d:
        for i, (label, compute) in enumerate(chosen):
            d.check(f"computing {label}")
            progress(0.6 * i / len(chosen), desc=f"computing {label}")
            maps[label] = compute(d)
        for i, (label, heat) in enumerate(maps.items()):
            d.check(f"the {label} deletion / insertion curves")
            progress(0.6 + 0.4 * i / (len(maps) + 1), desc=f"deletion / insertion curves: {label}")
            curves.update(r.faithfulness({label: heat}, cls, steps=n_steps, random_seed=None))
        d.check("the random-order curves")
        curves.update(r.faithfulness({}, cls, steps=n_steps))
    v = views.faithfulness_views(r, maps, curves)
    return CompareOutputs(compare=v.maps, deletion=v.deletion, insertion=v.insertion, auc_table=v.table)
