"""What the page's modules share: the components by name, the re-render event settings, and how a handler's
named result reaches gradio."""

from __future__ import annotations

import functools
import inspect
import itertools
import threading
from collections import OrderedDict
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any, NamedTuple

import gradio as gr

from vizapp.ui.common import session_id
from vizapp.ui.outputs import for_gradio

# Re-render events fire on every control change; only the last of a burst runs.
RERENDER = dict(api_visibility="undocumented", trigger_mode="always_last")
#: Events that run the model (a forward, a backward, ablations, max-flows): one concurrency group, so that
#: VIZAPP_CONCURRENCY bounds how many run at once in all (gradio's limit is per event otherwise: with a limit of 2,
#: ten different heavy events could run together). Redraws from a kept analysis stay outside it.
MODEL_WORK = dict(concurrency_id="vizapp-model-work")
#: Two plots in a row stay side by side while each gets this much (440 px at 1,280 px and wider); in a narrower window
#: (a half-screen one, 900 px) gradio's row wraps them one above the other at the column's width, instead of 184 px
#: each with their titles cut off.
PAIR = dict(min_width=300)
_EVENT_KEYS = itertools.count()


class Components(SimpleNamespace):
    """The page's components by name (names match the fields of :mod:`vizapp.ui.outputs`)."""


def event(fn: Any) -> Any:
    """``fn`` as gradio calls it: a one-field result handed over as its only value (see
    :func:`vizapp.ui.outputs.for_gradio`). The signature is kept, so gradio still injects Progress, Request and
    SelectData."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        return for_gradio(fn(*args, **kwargs))

    return run


def redraw(fn: Any, outputs: type) -> Any:
    """``fn`` for a control that redraws the session's analysis (state first among its inputs): before there is one
    (nothing analysed yet), a change of the control leaves every output as it is (``outputs``: the event's
    NamedTuple of :mod:`vizapp.ui.outputs`), with no error, and the next Analyze draws with its value; after, ``fn``.
    An analysis the store no longer keeps is still said (``fn`` raises it)."""
    count = len(outputs._fields)

    def nothing_yet(state: Any) -> Any:
        if isinstance(state, dict) and state.get("result") is not None:
            return None
        return gr.skip() if count == 1 else tuple(gr.skip() for _ in range(count))

    if inspect.iscoroutinefunction(fn):  # e.g. stops_when_cancelled's: gradio awaits what it sees is async

        @functools.wraps(fn)
        async def run_async(state: Any, *args: Any, **kwargs: Any) -> Any:
            skipped = nothing_yet(state)
            return skipped if skipped is not None else await fn(state, *args, **kwargs)

        return run_async

    @functools.wraps(fn)
    def run(state: Any, *args: Any, **kwargs: Any) -> Any:
        skipped = nothing_yet(state)
        return skipped if skipped is not None else fn(state, *args, **kwargs)

    return run


class _Answers:
    """For each session and redraw event: how many of its runs have started, and the newest run whose answer was
    shown. A run that answers after a newer one did is not shown (:func:`on_input`)."""

    def __init__(self, keep: int = 4096) -> None:
        self._lock = threading.Lock()
        self._runs: OrderedDict[tuple[str, int], tuple[int, int]] = OrderedDict()  # (started, newest shown)
        self._keep = keep

    def start(self, key: tuple[str, int]) -> int:
        with self._lock:
            started, shown = self._runs.pop(key, (0, 0))
            self._runs[key] = (started + 1, shown)
            while len(self._runs) > self._keep:  # sessions long gone
                self._runs.popitem(last=False)
            return started + 1

    def shown(self, key: tuple[str, int], run: int) -> bool:
        """Whether run number ``run`` (from :meth:`start`) may show its answer: no run started after it has."""
        with self._lock:
            started, shown = self._runs.get(key, (run, 0))
            if run < shown:
                return False
            self._runs[key] = (started, run)
            return True

    def supersede(self, session: str) -> None:
        """Every run of ``session``'s redraws started so far answers unseen: they read the state of an analysis that
        a new one has replaced (a slow map of the last image must not land over the new image's page)."""
        with self._lock:
            for key, (started, _) in list(self._runs.items()):
                if key[0] == session:
                    self._runs[key] = (started, started + 1)


_ANSWERS = _Answers()


class Redraw(NamedTuple):
    """A tab's redraw, as :func:`on_input` wires it."""

    event: Any  # the event the controls fire (for Cancel)
    # after(dep): the same redraw also runs when ``dep`` (a click that sets controls) succeeds
    after: Callable[[Any], Any]


def on_input(controls: list[Any], fn: Any, *, inputs: Any, outputs: Any, **kwargs: Any) -> Redraw:
    """The redraw ``fn`` of a tab, run when a person changes any of ``controls`` (``kwargs`` as for an event, usually
    with :data:`RERENDER`): one event for them all (``gr.on`` over their ``input``), whose answers are shown in the
    order the runs started.

    - ``input``, not ``change``: a change also fires when a handler sets the control, and Analyze sets many at once
      (the query row and column, the layers' ranges ...) while drawing every tab itself: one analysis set off up to
      five Features redraws of about 150 ms each on the bundled model, for a 150 ms analysis. A handler that only sets
      controls (a click on a patch, a dot, a tile) runs the redraw after itself through :attr:`Redraw.after`.
    - One event, not one per control: separate events ran side by side, and the redraw for the first of two controls
      set in a row could answer last, leaving a figure that matched neither the controls nor the second redraw (a Swin
      screenshot showed the Heads tab at (4, 0) with its sliders at (4, 4)). With ``trigger_mode="always_last"`` the
      changes made while a run is under way become one more run, with the controls' values as they are when it starts.
    - In order: the redraw a click runs after itself (:attr:`Redraw.after`) is an event of its own, so it and the
      controls' run both run when a control is changed while the click's is under way (the queue runs two events at
      once); the click's run, which read the old value, may answer last. Each session's runs of the redraw, from
      either event, are numbered as they start, and a run that answers after a newer one did returns ``gr.skip()``
      for every output. ``fn`` must take a ``request`` (the session); without one (a direct call) every answer is
      shown.
    """
    count = len(outputs) if isinstance(outputs, (list, tuple)) else 1
    keep = gr.skip() if count == 1 else tuple(gr.skip() for _ in range(count))
    signature = inspect.signature(fn)
    if "request" not in signature.parameters:
        raise TypeError(f"{getattr(fn, '__name__', fn)} takes no request: its answers could not be ordered")
    event_key = next(_EVENT_KEYS)

    def begin(args: Any, kw: Any) -> tuple[tuple[str, int] | None, int]:
        """(this run's key, its number); no key for a call without a session."""
        session = _session(signature, args, kw)
        key = None if session is None else (session, event_key)
        return key, _ANSWERS.start(key) if key else 0

    def finish(key: tuple[str, int] | None, run: int, answer: Any, error: Exception | None) -> Any:
        if key is None or _ANSWERS.shown(key, run):
            if error is not None:
                raise error
            return answer
        return keep  # a newer run answered first; an error about a superseded state is not said either

    if inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def run_async(*args: Any, **kw: Any) -> Any:
            key, run = begin(args, kw)
            try:
                answer = await fn(*args, **kw)
            except Exception as exc:
                return finish(key, run, None, exc)
            return finish(key, run, answer, None)

        newest: Any = run_async
    else:

        @functools.wraps(fn)
        def run_sync(*args: Any, **kw: Any) -> Any:
            key, run = begin(args, kw)
            try:
                answer = fn(*args, **kw)
            except Exception as exc:
                return finish(key, run, None, exc)
            return finish(key, run, answer, None)

        newest = run_sync
    event = gr.on([c.input for c in controls], newest, inputs=inputs, outputs=outputs, **kwargs)
    return Redraw(event, lambda dep: dep.success(newest, inputs=inputs, outputs=outputs, **kwargs))


def supersedes_redraws(fn: Any) -> Any:
    """``fn`` (a handler that takes a ``request`` and replaces the session's analysis: Analyze), after whose answer
    no redraw run started before it is shown (:meth:`_Answers.supersede`): a redraw still running from the last
    analysis read its state, and would otherwise draw the old image over the new one's page."""
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        answer = fn(*args, **kwargs)
        session = _session(signature, args, kwargs)
        if session is not None:
            _ANSWERS.supersede(session)
        return answer

    return run


def _session(signature: inspect.Signature, args: Any, kwargs: Any) -> str | None:
    """The session of a handler's call, from the ``request`` among its arguments (by ``signature``, the handler's)."""
    return session_id(signature.bind_partial(*args, **kwargs).arguments.get("request"))


def bind(fn: Any, **bound: Any) -> Any:
    """``fn`` with keyword arguments ``bound``, keeping what gradio reads of it: its signature and its type hints,
    by which gradio injects Request and SelectData (``functools.partial`` hides the type hints, so a bound handler
    got no Request and no session)."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **bound, **kwargs)

    return run


def patch_picker(label: str, elem_id: str, height: int) -> gr.Image:
    """The image a user clicks to pick a query patch (a PNG the handlers draw the grid on; no download buttons)."""
    return gr.Image(label=label, interactive=False, elem_id=elem_id, height=height, format="png", buttons=[])
