"""A small stand-in for gradio's browser front end, for tests: it drives a running app over HTTP the way the page does.

It reads the served ``/config``, keeps every component's value as the page would, fires an event by its index
through the real queue (``/gradio_api/queue/join`` and the SSE stream; ``/gradio_api/run/predict`` for unqueued
events), applies the returned values and ``gr.update`` props, then fires what the page fires next: the events chained
with ``.then`` / ``.success`` and the ``change`` events of every component whose value the outputs changed. So a
handler's return value goes through gradio's own preprocessing and postprocessing, which is where a one-field tuple
or a shared update dict fails.
"""

from __future__ import annotations

import copy
import json
import socket
import urllib.parse
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

UPDATE = "update"


@dataclass
class Fired:
    """One event as it ran: its index, whether it succeeded, its error message, and the warnings it showed."""

    index: int
    success: bool
    error: str = ""
    warnings: list[str] = field(default_factory=list)
    outputs: list[Any] = field(default_factory=list)


class AppDriver:
    """Drives the app at ``url`` as one visitor (one session)."""

    def __init__(self, url: str, max_events: int = 400, timeout: float = 300.0) -> None:
        self.url = url.rstrip("/")
        self.http = httpx.Client(timeout=timeout)
        self.config = self.http.get(f"{self.url}/config").json()
        self.api = self.url + self.config.get("api_prefix", "/gradio_api")
        self.session = uuid.uuid4().hex[:11]
        self.components = {c["id"]: c for c in self.config["components"]}
        self.values: dict[int, Any] = {
            cid: copy.deepcopy(c["props"].get("value")) for cid, c in self.components.items()
        }
        self.props: dict[int, dict[str, Any]] = {cid: dict(c["props"]) for cid, c in self.components.items()}
        self.deps: list[dict[str, Any]] = self.config["dependencies"]
        self.max_events = max_events
        self.log: list[Fired] = []  # every event fired, in order
        self.written: set[int] = set()  # components written since the last reset_written()

    # -- what the page holds -------------------------------------------------------------------------------------

    def by_elem_id(self, elem_id: str) -> int:
        for cid, c in self.components.items():
            if c["props"].get("elem_id") == elem_id:
                return cid
        raise KeyError(elem_id)

    def by_label(self, label: str, kind: str | None = None) -> int:
        found = [
            cid
            for cid, c in self.components.items()
            if str(c["props"].get("label") or c["props"].get("value") or "").startswith(label)
            and (kind is None or c["type"] == kind)
        ]
        if len(found) != 1:
            raise KeyError(f"{len(found)} components labelled {label!r}")
        return found[0]

    def kind(self, cid: int) -> str:
        return self.components.get(cid, {}).get("type", "")

    def events_of(self, cid: int, event: str) -> list[int]:
        """Indices of the backend events triggered by ``event`` on component ``cid``."""
        return [
            i
            for i, d in enumerate(self.deps)
            if d.get("backend_fn") and any(t[0] == cid and t[1] == event for t in d["targets"])
        ]

    # -- the session's connection ----------------------------------------------------------------------------------

    def connect(self) -> None:
        """Open the page's heartbeat stream (``/heartbeat/<session>``), as the browser does on load: gradio ends the
        session, and fires the app's ``unload``, when that connection closes (see :meth:`close`)."""
        u = urllib.parse.urlsplit(self.api)
        sock = socket.create_connection((u.hostname, u.port), timeout=30)
        request = (
            f"GET {u.path}/heartbeat/{self.session} HTTP/1.1\r\nHost: {u.netloc}\r\nAccept: text/event-stream\r\n\r\n"
        )
        sock.sendall(request.encode())
        seen = b""
        while b"ALIVE" not in seen:  # the server answers at once: the session's stream is open
            chunk = sock.recv(4096)
            if not chunk:
                raise ConnectionError("the heartbeat stream closed at once")
            seen += chunk
        self._heartbeat = sock

    def close(self) -> None:
        """The visitor closes the tab: the heartbeat connection drops (gradio then runs the app's unload)."""
        sock = getattr(self, "_heartbeat", None)
        if sock is not None:
            sock.close()
            self._heartbeat = None
        self.http.close()

    def load(self) -> list[Fired]:
        """What the page runs when it opens: every backend event on the app's ``load``."""
        events = [i for i in self.backend_events() if any(t[1] == "load" for t in self.deps[i]["targets"])]
        if not events:
            raise AssertionError("the app wires no load event")
        return [f for i in events for f in self.fire(i)]

    def backend_events(self) -> list[int]:
        return [i for i, d in enumerate(self.deps) if d.get("backend_fn")]

    def upload(self, path: str | Path) -> dict[str, Any]:
        """Upload a file as the page does; returns the FileData a file component sends."""
        with open(path, "rb") as f:
            r = self.http.post(f"{self.api}/upload", files={"files": (Path(path).name, f)})
        r.raise_for_status()
        server_path = r.json()[0]
        return {"path": server_path, "orig_name": Path(path).name, "meta": {"_type": "gradio.FileData"}}

    def set(self, cid: int, value: Any, fire_change: bool = True) -> list[Fired]:
        """A person sets a control: its value changes and its ``change`` (and ``input``) events fire."""
        old = self.values.get(cid)
        self.values[cid] = value
        if not fire_change or old == value:
            return []
        out = []
        for i in self.events_of(cid, "input") + self.events_of(cid, "change"):
            out += self.fire(i)
        return out

    def click(self, cid: int, event_data: Any = None) -> list[Fired]:
        out = []
        for i in self.events_of(cid, "click"):
            out += self.fire(i, event_data)
        return out

    def reset_written(self) -> None:
        self.written = set()

    def analyze(self, image: str | Path) -> list[Fired]:
        """A person uploads ``image`` and presses Analyze; returns the Analyze click's events (what the upload fired
        is left out, and so are the components it wrote: :attr:`written` starts afresh)."""
        self.set(self.by_label("Image", "image"), self.upload(image), fire_change=True)
        self.reset_written()
        return self.click(self.by_label("Analyze", "button"))

    # -- firing ----------------------------------------------------------------------------------------------------

    def fire(self, index: int, event_data: Any = None, _budget: list[int] | None = None) -> list[Fired]:
        """Run event ``index`` and everything the page would run after it; returns each event as it ran."""
        budget = _budget if _budget is not None else [self.max_events]
        if budget[0] <= 0:
            raise RuntimeError(f"more than {self.max_events} events cascaded: a change loop?")
        budget[0] -= 1
        dep = self.deps[index]
        data = [None if self.kind(cid) == "state" else copy.deepcopy(self.values.get(cid)) for cid in dep["inputs"]]
        fired = self._run(index, data, event_data)
        self.log.append(fired)
        done = [fired]
        changed = self._apply(dep["outputs"], fired.outputs) if fired.success else []
        for i, d in enumerate(self.deps):  # .then / .success / .failure chains
            if d.get("trigger_after") == index and d.get("backend_fn"):
                if d.get("trigger_only_on_success") and not fired.success:
                    continue
                if d.get("trigger_only_on_failure") and fired.success:
                    continue
                done += self.fire(i, None, budget)
        for cid in changed:  # the page fires `change` when an output changes a component's value
            for i in self.events_of(cid, "change"):
                done += self.fire(i, None, budget)
        return done

    def _run(self, index: int, data: list[Any], event_data: Any) -> Fired:
        dep = self.deps[index]
        body = {"data": data, "fn_index": index, "session_hash": self.session, "event_data": event_data}
        body["trigger_id"] = dep["targets"][0][0] if dep["targets"] and dep["targets"][0][0] is not None else None
        if not dep.get("queue", True):
            r = self.http.post(f"{self.api}/run/predict", json=body)
            payload = r.json()
            if r.status_code != 200 or "error" in payload and payload.get("error"):
                return Fired(index, False, str(payload.get("error") or payload))
            return Fired(index, True, outputs=payload.get("data", []))
        r = self.http.post(f"{self.api}/queue/join", json=body)
        if r.status_code != 200:
            return Fired(index, False, f"queue/join {r.status_code}: {r.text[:300]}")
        event_id = r.json()["event_id"]
        warnings: list[str] = []
        with self.http.stream("GET", f"{self.api}/queue/data", params={"session_hash": self.session}) as stream:
            for line in stream.iter_lines():
                if not line.startswith("data:"):
                    continue
                msg = json.loads(line[5:])
                if msg.get("event_id") not in (None, event_id):
                    continue
                if msg.get("msg") == "log":
                    warnings.append(f"{msg.get('level')}: {msg.get('log')}")
                if msg.get("msg") == "process_completed":
                    out = msg.get("output") or {}
                    if not msg.get("success"):
                        return Fired(index, False, str(out.get("error") or out), warnings)
                    return Fired(index, True, warnings=warnings, outputs=out.get("data", []))
        return Fired(index, False, "the event stream ended before the event completed", warnings)

    def _apply(self, outputs: list[int], values: list[Any]) -> list[int]:
        """Put an event's returned values into the page; returns the components whose value changed."""
        changed = []
        for cid, val in zip(outputs, values, strict=False):
            self.written.add(cid)
            if isinstance(val, dict) and val.get("__type__") == UPDATE:
                props = {k: v for k, v in val.items() if k != "__type__"}
                if not props:
                    self.written.discard(cid)  # gr.skip(): nothing written
                self.props[cid].update({k: v for k, v in props.items() if k != "value"})
                if "value" not in props:
                    continue
                val = props["value"]
            if self.kind(cid) == "state":
                continue
            if self.values.get(cid) != val:
                changed.append(cid)
            self.values[cid] = copy.deepcopy(val)
        return changed


def plot_of(d: AppDriver, elem_id: str) -> dict:
    """The plotly figure a component of the app shows, as the page receives it (its JSON)."""
    value = d.values[d.by_elem_id(elem_id)]
    assert value and value.get("type") == "plotly", value
    return json.loads(value["plot"])


def shipped(value: Any) -> np.ndarray:
    """An array of a figure as plotly ships it to the page: a binary array (with its shape when not 1-D) or nested
    lists (None for NaN), as float64."""
    import base64

    if isinstance(value, dict):
        flat = np.frombuffer(base64.b64decode(value["bdata"]), dtype=value["dtype"]).astype(np.float64)
        return flat.reshape(tuple(int(v) for v in str(value["shape"]).split(","))) if "shape" in value else flat
    return np.array(value, dtype=np.float64)  # None becomes NaN


def heatmap_z(trace: dict) -> np.ndarray:
    """A heatmap's values as plotly ships them (a binary array or nested lists)."""
    return shipped(trace["z"])


def assert_prompts_ranked(d: AppDriver, r: Any) -> int:
    """The Prediction tab ranks every prompt as ``r.top_k`` does (labels in order, probabilities to 1e-6), the status
    says how many prompts, and the class choice lists them in that order; returns that choice's component id."""
    shown = d.values[d.by_label("Top-5", "label")]
    assert [c["label"] for c in shown["confidences"]] == [p for p, _ in r.top_k]  # every prompt, best first
    for c, (_, prob) in zip(shown["confidences"], r.top_k, strict=True):
        assert abs(c["confidence"] - prob) <= 1e-6, (c, prob)
    assert f"{len(r.top_k)} text prompts" in d.values[d.by_elem_id("vizapp-status")]
    choice = d.by_label("Class to explain (gradient", "dropdown")
    assert [c[1] for c in d.props[choice]["choices"]] == [p for p, _ in r.top_k]
    return choice


def assert_clean(fired: list[Fired], what: str) -> None:
    """Every fired event succeeded without a warning."""
    bad = [(f.index, f.error or f.warnings) for f in fired if not f.success or f.warnings]
    assert not bad, f"{what}: events failed or warned: {bad}"
