"""Boundary validation: the API accepts whatever a client sends, so every value is checked before it is used.

Each function returns the value in the type the handlers need, or raises :class:`~vizapp.errors.BadParameterError`
with a message that names the control and its allowed range.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any

from vizapp import models
from vizapp.errors import BadParameterError

MAX_STRING = 300


def as_int(value: Any, name: str, lo: int, hi: int) -> int:
    """``value`` as an integer in ``[lo, hi]`` (floats with an integral value are accepted; booleans are not)."""
    if isinstance(value, bool) or value is None:
        raise BadParameterError(f"{name} must be an integer between {lo} and {hi}")
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise BadParameterError(f"{name} must be an integer between {lo} and {hi}, got {str(value)[:40]!r}") from None
    if not math.isfinite(f) or f != int(f) or not lo <= int(f) <= hi:
        raise BadParameterError(f"{name} must be an integer between {lo} and {hi}, got {str(value)[:40]!r}")
    return int(f)


def as_head_or_mean(value: Any, num_heads: int) -> int | None:
    """The head the head dropdown chose, or None for "mean of the layer's heads" (its value -1, or nothing chosen)."""
    return None if value in (None, -1, "-1") else as_int(value, "head", 0, num_heads - 1)


def as_float(value: Any, name: str, lo: float, hi: float, hi_inclusive: bool = True) -> float:
    """``value`` as a finite float in ``[lo, hi]`` (or ``[lo, hi)`` when ``hi_inclusive`` is False)."""
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise BadParameterError(f"{name} must be a number in [{lo}, {hi}], got {str(value)[:40]!r}") from None
    if isinstance(value, bool) or not math.isfinite(f) or f < lo or (f > hi if hi_inclusive else f >= hi):
        raise BadParameterError(f"{name} must be a number in [{lo}, {hi}{']' if hi_inclusive else ')'}, got {f}")
    return f


def as_choice(value: Any, name: str, choices: Collection[str]) -> str:
    """``value`` if it is one of ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise BadParameterError(f"{name} must be one of {list(choices)}, got {str(value)[:40]!r}")
    return value


def as_model_id(value: Any) -> str:
    """A model id a visitor may ask for: a registry name or hub id, never a local file."""
    if isinstance(value, str) and len(value) > MAX_STRING:
        raise BadParameterError(f"model id is {len(value)} characters long; pick a model from the list")
    return models.validate_model_id(value, allow_files=False)
