"""Bounded request time: a deadline and a cancel flag that long operations check between their steps.

Gradio's ``cancels=[...]`` stops waiting for an event, but a handler that is already running keeps its worker until
it returns. So the long handlers (attention flow, the Compare tab's faithfulness curves) open a :class:`Deadline`
with :func:`running` and call :meth:`Deadline.check` between steps (after each max-flow, between methods and curve
modes). A check raises a clear error once the time set by ``VIZAPP_REQUEST_SECONDS`` has passed, or once the person
pressed Cancel (:func:`cancel` flags every deadline of their session), and the worker is free again.

An API client cancels differently: gradio_client's ``job.cancel()`` asks gradio (``/cancel``) to cancel the event's
asyncio task, and a handler gradio runs in a worker thread would not notice. Events wired through
:func:`stops_when_cancelled` run their handler in a worker thread themselves; when gradio cancels the event, the
deadlines the handler opened are flagged as by Cancel, so the work stops at its next check rather than at its
deadline.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, TypeVar

from vizapp.errors import VizappError

T = TypeVar("T")

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
        cancelled: the flag to check, when it is shared (the request's own, see :func:`stops_when_cancelled`).
    """

    def __init__(
        self,
        limit_s: float,
        clock: Callable[[], float] = time.monotonic,
        cancelled: threading.Event | None = None,
    ) -> None:
        self.limit_s = float(limit_s)
        self._clock = clock
        self._started = clock()
        self._cancelled = threading.Event() if cancelled is None else cancelled

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
#: the cancel flag of the event being handled, set by :func:`stops_when_cancelled` (None outside such an event)
_event_cancelled: ContextVar[threading.Event | None] = ContextVar("vizapp_event_cancelled", default=None)


@contextmanager
def running(session: str | None, limit_s: float | None = None) -> Iterator[Deadline]:
    """A deadline for the duration of a ``with`` block, registered under ``session`` so that Cancel can reach it.

    Args:
        session: gradio's session hash of the person, or None (direct calls; nothing can cancel them).
        limit_s: seconds allowed; default :func:`request_seconds`.
    """
    deadline = Deadline(request_seconds() if limit_s is None else limit_s, cancelled=_event_cancelled.get())
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


def reporting(
    session: str | None, label: str, work: Callable[[Callable[[int, int], None]], T], progress: Any = None
) -> T:
    """``work(report)`` for a method that reports its steps (attention flow's max-flows), under a deadline for
    ``session``: checked before it starts and at every ``report(done, total)``, each step also shown on gradio's
    ``progress`` bar when one is given."""
    with running(session) as d:
        d.check(label)
        if progress is not None:
            progress(0.0, desc=label)
        return work(d.progress(label, (lambda f, desc: progress(f, desc=desc)) if progress is not None else None))


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


def stops_when_cancelled(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` as gradio should run it when it opens deadlines: in a worker thread, and when gradio cancels the event
    (an API client's ``job.cancel()``; the Cancel button's ``cancels=``), every deadline ``fn`` opened with
    :func:`running` is flagged and the work stops at its next check. The signature is kept (``functools.wraps``), so
    gradio still injects Progress and Request; the context (gradio's request and progress) goes with the thread."""
    import anyio

    @functools.wraps(fn)
    async def run(*args: Any, **kwargs: Any) -> Any:
        flag = threading.Event()
        token = _event_cancelled.set(flag)  # copied into the worker thread's context
        try:
            # abandon_on_cancel: gradio's cancel reaches this await at once (by default it would wait for the thread)
            return await anyio.to_thread.run_sync(functools.partial(fn, *args, **kwargs), abandon_on_cancel=True)
        except anyio.get_cancelled_exc_class():
            flag.set()
            log.info("%s: the event was cancelled; its work stops at its next check", fn.__name__)
            raise
        finally:
            _event_cancelled.reset(token)

    return run
