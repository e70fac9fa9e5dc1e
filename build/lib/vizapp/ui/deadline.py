"""Bounded request time: a deadline and a cancel flag that long operations check between their steps.

Gradio's ``cancels=[...]`` stops waiting for an event, but a handler that is already running keeps its worker until
it returns. So the long handlers (attention flow, the Compare tab's faithfulness curves) open a :class:`Deadline`
with :func:`running` and call :meth:`Deadline.check` between steps (after each max-flow, between methods and curve
modes). A check raises a clear error once the time set by ``VIZAPP_REQUEST_SECONDS`` has passed, or once the person
pressed Cancel (:func:`cancel` flags every deadline of their session), and the worker is free again.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from vizapp.errors import VizappError

log = logging.getLogger("vizapp")

REQUEST_SECONDS_ENV = "VIZAPP_REQUEST_SECONDS"
DEFAULT_REQUEST_SECONDS = 120.0


class RequestStopped(VizappError):
    """A long operation stopped at its deadline or because the person cancelled it."""


def request_seconds() -> float:
    """The operator's time limit for one long operation, from VIZAPP_REQUEST_SECONDS (default 120 s; 0 allows none)."""
    raw = os.environ.get(REQUEST_SECONDS_ENV)
    if raw is None or not raw.strip():
        return DEFAULT_REQUEST_SECONDS
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not math.isfinite(value) or value < 0:
        log.warning(
            "%s=%r is not a number of seconds >= 0; using %g", REQUEST_SECONDS_ENV, raw, DEFAULT_REQUEST_SECONDS
        )
        return DEFAULT_REQUEST_SECONDS
    return value


class Deadline:
    """A time limit and a cancel flag for one request.

    Args:
        limit_s: seconds allowed from construction.
        clock: a monotonic clock in seconds (tests pass a fake one).
    """

    def __init__(self, limit_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit_s = float(limit_s)
        self._clock = clock
        self._started = clock()
        self._cancelled = threading.Event()

    @property
    def elapsed(self) -> float:
        return self._clock() - self._started

    def cancel(self) -> None:
        self._cancelled.set()

    def check(self, doing: str) -> None:
        """Raise :class:`RequestStopped` if the person cancelled or the limit has passed; ``doing`` names the step."""
        elapsed = self.elapsed
        if self._cancelled.is_set():
            raise RequestStopped(f"stopped after {elapsed:.0f} s: cancelled during {doing}")
        if elapsed >= self.limit_s:
            raise RequestStopped(
                f"stopped after {elapsed:.0f} s: {doing} reached the {self.limit_s:g} s limit set by "
                f"{REQUEST_SECONDS_ENV}; try a smaller model or fewer curve steps, leave attention flow out, or ask "
                "the operator to raise the limit"
            )

    def progress(self, doing: str, report: Callable[[float, str], None] | None = None) -> Callable[[int, int], None]:
        """A ``progress(done, total)`` callback for a method that reports progress: checks, then reports."""

        def callback(done: int, total: int) -> None:
            self.check(doing)
            if report is not None:
                report(done / max(total, 1), f"{doing}: {done} of {total}")

        return callback


_lock = threading.Lock()
_running: dict[str, set[Deadline]] = {}


@contextmanager
def running(session: str | None, limit_s: float | None = None) -> Iterator[Deadline]:
    """A deadline for the duration of a ``with`` block, registered under ``session`` so that Cancel can reach it.

    Args:
        session: gradio's session hash of the person, or None (direct calls; nothing can cancel them).
        limit_s: seconds allowed; default :func:`request_seconds`.
    """
    deadline = Deadline(request_seconds() if limit_s is None else limit_s)
    if session:
        with _lock:
            _running.setdefault(session, set()).add(deadline)
    try:
        yield deadline
    finally:
        if session:
            with _lock:
                left = _running.get(session, set())
                left.discard(deadline)
                if not left:
                    _running.pop(session, None)


def cancel(session: str | None) -> int:
    """Flag every long operation of ``session``; each stops at its next check. Returns how many were running."""
    if not session:
        return 0
    with _lock:
        deadlines = list(_running.get(session, ()))
    for d in deadlines:
        d.cancel()
    return len(deadlines)


def running_sessions() -> list[str]:
    """Sessions with a long operation under way (for tests and logs)."""
    with _lock:
        return sorted(_running)
