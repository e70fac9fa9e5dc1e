"""Exceptions whose messages are shown to the person using the app.

Every message should say what went wrong and what to do about it, in plain words. Messages must not contain stack
traces, server file paths or other internals, because the hosted app shows them verbatim to anonymous users. Code that
catches a lower-level exception and raises one of these should chain it (``raise ... from exc``) so the cause still
reaches the server log.
"""

from __future__ import annotations

import traceback
from pathlib import Path

__all__ = [
    "BadImageError",
    "BadParameterError",
    "ModelLoadError",
    "ModelTooLargeError",
    "UnsupportedModelError",
    "VizappError",
    "raised_at",
]


class VizappError(Exception):
    """Base class for every error the app reports to a person rather than treating as a bug."""


class BadImageError(VizappError):
    """The given image could not be used: unreadable, corrupt, unsupported format, or over a size limit."""


class BadParameterError(VizappError):
    """A user-chosen setting (layer, head, ratio, ...) is out of range or inconsistent with the model."""


class ModelLoadError(VizappError):
    """A model could not be loaded: download failure, bad or unsafe weights file, out of memory."""


class ModelTooLargeError(ModelLoadError):
    """A model was refused before loading: over the operator's size budget, or not on the allow-list."""


class UnsupportedModelError(VizappError):
    """The requested model exists but is not one the app can analyse, or its id is not acceptable."""


class StaleResultError(VizappError):
    """A result's model is gone from memory or its weights changed since the result was made."""


def unexact_layer(layer: int, why: str) -> UnsupportedModelError:
    """The refusal of a layer whose attention ran where vizapp does not reproduce it (``why``: dropout, causal, ...)."""
    return UnsupportedModelError(
        f"layer {layer} ran with {why}, which vizapp does not reproduce; its attention is not shown (put the model in "
        "eval mode)"
    )


_PACKAGE = Path(__file__).resolve().parent  # the vizapp package, for raised_at


def raised_at(exc: BaseException) -> str:
    """Where ``exc`` left vizapp's own code, as ``path:line (function)``: its traceback's innermost frame in the
    ``vizapp`` package (the call into torch or a model that failed, or the raise itself), else its innermost frame.
    For logs and benchmark output, where it lets one run find a bug; never for a message a user of the app sees (it
    names the server's files)."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return "an unknown place (no traceback)"
    ours = [f for f in frames if Path(f.filename).resolve().is_relative_to(_PACKAGE)]
    frame = (ours or frames)[-1]
    where = Path(frame.filename).resolve()
    name = where.relative_to(_PACKAGE.parent).as_posix() if ours else where.name
    return f"{name}:{frame.lineno} ({frame.name})"
