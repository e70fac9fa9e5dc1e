"""A cancel from the API client (issue 27, low): gradio_client's ``job.cancel()`` stops the model work at its next
deadline check, as the Cancel button does, instead of leaving it running until the deadline."""

from __future__ import annotations

import threading
import time

from vizapp import methods, ui
from vizapp.ui import deadline

STEP_S = 0.5  # each method's map takes this long in the test


def test_an_api_clients_cancel_stops_the_work(live_app, card_model, photo, monkeypatch):
    from gradio_client import Client, handle_file

    client = Client(live_app, verbose=False)
    client.predict(handle_file(photo), card_model, api_name="/analyze")  # the session's analysis
    started: list[float] = []
    lock = threading.Lock()
    real_explain = methods.explain

    def slow_explain(r, name, cls=None, **kwargs):
        with lock:
            started.append(time.monotonic())
        time.sleep(STEP_S)
        return real_explain(r, name, cls, **kwargs)

    monkeypatch.setattr(methods, "explain", slow_explain)  # the server runs in this process
    monkeypatch.setenv(deadline.REQUEST_SECONDS_ENV, "60")
    job = client.submit(None, 4, True, api_name="/compare")  # class (predicted), curve steps, slow methods too
    t0 = time.monotonic()
    while not started and time.monotonic() - t0 < 30:
        time.sleep(0.02)
    assert started, "the Compare tab never started"
    job.cancel()
    cancelled_at = time.monotonic()
    # the method running at the cancel finishes its step; no other starts, and the work is over within a step
    t1 = time.monotonic()
    while deadline.running_sessions() and time.monotonic() - t1 < 10:
        time.sleep(0.02)
    stopped_after = time.monotonic() - cancelled_at
    time.sleep(2 * STEP_S)  # time for another method to start, were the work still going
    with lock:
        after = [t for t in started if t > cancelled_at + 0.2]
        total = len(started)
    assert not deadline.running_sessions(), "the cancelled work is still running"
    assert stopped_after < 2 * STEP_S + 1, stopped_after
    assert not after and total <= 2, (total, after)
    # the server keeps serving
    out = ui.outputs.from_api(ui.AnalyzeOutputs, client.predict(handle_file(photo), card_model, api_name="/analyze"))
    assert out["label"]["label"]
