"""What the page's modules share: the components by name, the re-render event settings, and how a handler's
named result reaches gradio."""

from __future__ import annotations

import functools
import inspect
from types import SimpleNamespace
from typing import Any

import gradio as gr

from vizapp.ui.outputs import for_gradio

# Re-render events fire on every control change; only the last of a burst runs.
RERENDER = dict(api_visibility="undocumented", trigger_mode="always_last")
#: Events that run the model (a forward, a backward, ablations, max-flows): one concurrency group, so that
#: VIZAPP_CONCURRENCY bounds how many run at once in all (gradio's limit is per event otherwise: with a limit of 2,
#: ten different heavy events could run together). Redraws from a kept analysis stay outside it.
MODEL_WORK = dict(concurrency_id="vizapp-model-work")


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


def on_change(controls: list[Any], fn: Any, **kwargs: Any) -> Any:
    """One event that a change of any of ``controls`` fires (``gr.on``; ``kwargs`` as for ``.change``, usually with
    :data:`RERENDER`), instead of one event per control. Separate events ran side by side, so the redraw for the
    first of two controls set in a row (row, then column; or the several a new analysis sets at once) could answer
    last and leave a figure that matches neither the controls nor the second redraw. One event runs one redraw at a
    time, and with ``trigger_mode="always_last"`` the changes made while it runs become one more run, with the
    controls' values as they are when it starts."""
    return gr.on([c.change for c in controls], fn, **kwargs)


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
