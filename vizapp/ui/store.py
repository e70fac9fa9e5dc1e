"""The analyses the app keeps for its visitors, within one byte budget across every session.

A person's ``gr.State`` holds a :class:`ResultKey` (an unguessable token, the session it belongs to, and which store),
never the :class:`~vizapp.pipeline.Analysis` itself: gradio keeps a closed session's state for an hour and up to
10,000 sessions, so analyses kept there (a ViT-B/16 at 384 px about 82 MB, a ViT-L/16 at 384 px 113 MiB) added up
without bound. The store (one per demo) holds each session's latest analysis (and its second image) by token, counts
the bytes of the tensors and arrays each holds (again whenever it is used, as its caches grow), and when the total
passes ``VIZAPP_MAX_RESULTS_BYTES`` (:data:`vizapp.budget.DEFAULT_MAX_RESULTS_BYTES`) drops the least recently used
first. The result just made or just asked for is never dropped by its own request, so the store exceeds the budget
by at most that one result (itself bounded by ``VIZAPP_MAX_ANALYSIS_BYTES``). A session's entry goes when the session
ends (gradio's unload, when the page's connection closes) or when the same session analyses another image. A handler
whose result was dropped says so (:class:`ResultDroppedError`: the budget, or the session's newer analysis) and the
app keeps serving. A key fetches only its own session's result: the token is 128 random bits and the session must
match.
"""

from __future__ import annotations

import dataclasses
import secrets
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from vizapp import budget
from vizapp.errors import VizappError

#: What the store keeps of a session's working state (the rest stays in its ``gr.State``).
STORED = ("analysis", "other")
DROPPED = "this result was dropped to keep the server within its memory budget for kept results; press Analyze again"
#: What a request on a session's earlier analysis is told once the session has analysed another image.
REPLACED = "this was asked of an earlier analysis, which your newer one has replaced; ask again with the new one"
#: How many replaced tokens are remembered (to say REPLACED rather than DROPPED), across sessions.
REPLACED_KEEP = 4096


class ResultDroppedError(VizappError):
    """The session's analysis is no longer kept (the results budget, or the session ended): analyse again."""

    def __init__(self, message: str = DROPPED) -> None:
        super().__init__(message)


def result_bytes(*objects: Any) -> int:
    """Bytes of the tensors (any device) and numpy arrays reachable from ``objects`` through containers, dataclasses
    and vizapp's own objects, each storage counted once (views and tensors shared between results included once).
    Weak references (the model) are not followed; an autograd graph's saved tensors beyond those reachable are not
    counted."""
    total, seen, storages = 0, set(), set()
    stack = list(objects)
    while stack:
        o = stack.pop()
        if o is None or isinstance(o, (str, bytes, int, float, bool, weakref.ref)) or id(o) in seen:
            continue
        seen.add(id(o))
        if isinstance(o, torch.Tensor):
            if o.device.type == "meta":
                continue
            s = o.untyped_storage()
            key = (str(o.device), s.data_ptr())
            if key not in storages:
                storages.add(key)
                total += s.nbytes()
        elif isinstance(o, np.ndarray):
            root = o
            while isinstance(root.base, np.ndarray):
                root = root.base
            if id(root) not in storages:
                storages.add(id(root))
                total += root.nbytes
        elif isinstance(o, dict):
            stack.extend(tuple(o.values()))  # a snapshot: another request may be filling a cache
        elif isinstance(o, (list, tuple, set, frozenset)):
            stack.extend(tuple(o))
        elif dataclasses.is_dataclass(o) or type(o).__module__.startswith("vizapp"):
            stack.extend(tuple(getattr(o, "__dict__", {}).values()))
    return total


@dataclass(frozen=True, eq=False)
class ResultKey:
    """What a session's ``gr.State`` holds instead of its analysis: the store, a random token and the session."""

    store: ResultStore = field(repr=False)
    token: str = field(repr=False)
    session: str | None = field(repr=False)

    def __deepcopy__(self, memo: dict) -> ResultKey:
        return self  # a copy of a state names the same kept result (the store is never copied)


@dataclass
class _Entry:
    session: str | None
    items: dict[str, Any]
    nbytes: int


class ResultStore:
    """Analyses by token, least recently used first, within ``max_bytes`` in all (None: no byte limit).

    Thread-safe: one lock around the index; measuring a result walks its attributes, not its data.
    """

    def __init__(self, max_bytes: int | None) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self.dropped = 0  # entries evicted for the budget, since start (for the load test and the log)
        self._replaced: OrderedDict[str, str] = OrderedDict()  # token -> its session, the newest last

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        """What the kept results held when last measured, in bytes."""
        with self._lock:
            return sum(e.nbytes for e in self._entries.values())

    def put(self, session: str | None, analysis: Any) -> ResultKey:
        """Keep ``analysis`` for ``session`` (its earlier entries go: the page holds one key at a time); its key."""
        token = secrets.token_urlsafe(16)
        entry = _Entry(session, {"analysis": analysis}, result_bytes(analysis))
        with self._lock:
            if session is not None:
                for t in [t for t, e in self._entries.items() if e.session == session]:
                    del self._entries[t]
                    self._replaced[t] = session
                while len(self._replaced) > REPLACED_KEEP:
                    self._replaced.popitem(last=False)
            self._entries[token] = entry
            self._evict(keep=token)
        return ResultKey(self, token, session)

    def get(self, key: ResultKey, session: str | None) -> dict[str, Any]:
        """The kept items of ``key`` ({"analysis": ..., and "other" when a second image was analysed}); measured
        again and made the most recently used. ResultDroppedError when it is gone or belongs to another session; its
        message says when the session's own newer analysis replaced it (:data:`REPLACED`), not the budget."""
        with self._lock:
            entry = self._entries.get(key.token) if key.store is self else None
            if entry is None or entry.session != session or key.session != session:
                # its own session's key, replaced by that session's newer analysis
                owner = self._replaced.get(key.token) if entry is None and key.store is self else None
                replaced = owner is not None and key.session == session == owner
                raise ResultDroppedError(REPLACED if replaced else DROPPED)
            self._entries.move_to_end(key.token)
            items = dict(entry.items)
        nbytes = result_bytes(*items.values())  # outside the lock: another request may be using this result
        with self._lock:
            if key.token in self._entries:
                self._entries[key.token].nbytes = nbytes
                self._evict(keep=key.token)
        return items

    def attach(self, key: ResultKey, session: str | None, name: str, value: Any) -> None:
        """Keep ``value`` beside ``key``'s analysis under ``name`` (None removes it); counted with it."""
        items = self.get(key, session)
        if value is None:
            items.pop(name, None)
        else:
            items[name] = value
        nbytes = result_bytes(*items.values())
        with self._lock:
            entry = self._entries.get(key.token)
            if entry is None:
                raise ResultDroppedError()
            entry.items, entry.nbytes = items, nbytes
            self._evict(keep=key.token)

    def release(self, key: Any) -> None:
        """Forget ``key``'s result (gradio's delete callback for an expired state)."""
        if isinstance(key, ResultKey) and key.store is self:
            with self._lock:
                self._entries.pop(key.token, None)

    def drop_session(self, session: str | None) -> int:
        """Forget every result of ``session`` (the session ended); how many."""
        with self._lock:
            gone = [t for t, e in self._entries.items() if e.session == session]
            for t in gone:
                del self._entries[t]
        return len(gone)

    def _evict(self, keep: str) -> None:
        """Drop the least recently used entries, never ``keep``, until the total fits (lock held)."""
        if self.max_bytes is None:
            return
        total = sum(e.nbytes for e in self._entries.values())
        for t in list(self._entries):
            if total <= self.max_bytes:
                break
            if t != keep:
                total -= self._entries.pop(t).nbytes
                self.dropped += 1


_default: ResultStore | None = None
_default_lock = threading.Lock()


def default_store() -> ResultStore:
    """The store of handlers called without a demo's own (scripts and tests), with the configured budget."""
    global _default
    with _default_lock:
        if _default is None:
            _default = ResultStore(budget.BUDGET.max_results_bytes)
        return _default
