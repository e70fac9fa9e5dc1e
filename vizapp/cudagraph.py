"""CUDA graphs of a fixed-shape device pass: one launch per analysis instead of hundreds.

At batch 1 a ViT on a modern GPU is bound by kernel launches and Python, not by arithmetic (ViT-B/16 on an H200:
3.5 ms of forward, 493 launches per analysis; docs/gpu.md). A CUDA graph records the kernels of one run of a function
and replays them with a single launch, reading its input from, and writing its results to, the same device memory
every time. So :class:`GraphedPass` runs the function eagerly once (lazy initialisation, cuBLAS workspaces), records
it on a side stream, and thereafter copies each new input into its static input tensor and replays.

What a graph cannot hold, and how this module keeps to it:
- Python runs only while recording: the hooks, consumers and every shape decision are those of the recorded run. A
  graph is therefore kept per input shape, dtype, weights and train/eval mode (:func:`graph_key`), and a change of any
  of these records a new one.
- Nothing may wait for the device while recording (no ``.item()``, no host copy). A function that does raises; the
  failure is remembered for that key and the caller runs eagerly (:meth:`GraphCache.get` returns None).
- Results live in the graph's memory and are overwritten by the next replay, so :meth:`GraphedPass.run` hands them
  out under a lock, for the caller to copy to the host before another thread replays.

The memory a graph records with stays reserved while the graph is cached (at most :data:`vizapp.limits.CUDA_GRAPHS`
graphs per model, least recently used dropped first).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

import torch

from vizapp import limits
from vizapp.errors import raised_at

log = logging.getLogger(__name__)


def enabled() -> bool:
    """Graphs are used unless ``VIZAPP_CUDA_GRAPHS=0`` (or :data:`vizapp.limits.CUDA_GRAPHS` is 0)."""
    return os.environ.get("VIZAPP_CUDA_GRAPHS", "1") != "0" and limits.CUDA_GRAPHS > 0


Inputs = torch.Tensor | tuple[torch.Tensor, ...]
"""A graph's input: one tensor, or a tuple of them."""


def _tensors(x: Inputs) -> tuple[torch.Tensor, ...]:
    return x if isinstance(x, tuple) else (x,)


def _first(x: Inputs) -> torch.Tensor:
    return _tensors(x)[0]


def _cloned(x: Inputs) -> Inputs:
    copies = tuple(t.detach().clone() for t in _tensors(x))
    return copies if isinstance(x, tuple) else copies[0]


class GraphedPass:
    """``fn(x)`` recorded as a CUDA graph for inputs shaped like ``example``.

    Args:
        fn: device work on x (on ``example``'s CUDA device); returns any structure of tensors, which the graph
            rewrites in place on every replay.
        example: an input of the shape, dtype and device every later input will have (its values are used for the
            eager warm-up run), or a tuple of such tensors (``fn`` then takes the tuple, and :meth:`run` one alike).
        stage: output -> the tensors the caller wants on the host. The graph itself copies them, as float32, into
            one pinned host buffer (page-locked memory, which a device copies to at full speed, while an ordinary
            copy to pageable memory ran at about 3.3 GB/s on the H200 machine); :meth:`run` hands out copies of
            them in ordinary memory.
        keep: whatever holds the device tensors ``fn`` reads that were made outside it (constants prepared before
            the recording): the graph reads their memory on every replay, so they are kept alive with it.
    """

    def __init__(
        self,
        fn: Callable[[Any], Any],
        example: Inputs,
        stage: Callable[[Any], list[torch.Tensor]] | None = None,
        keep: Any = None,
    ) -> None:
        device = _first(example).device
        self._keep = keep
        self.input = _cloned(example)
        self.graph = torch.cuda.CUDAGraph()
        self._lock = threading.Lock()
        self._stage = stage
        side = torch.cuda.Stream(device=device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            warm = fn(self.input)  # warm-up: lazy initialisation must not happen while recording
            shapes = [t.shape for t in stage(warm)] if stage is not None else []
            del warm
        torch.cuda.current_stream(device).wait_stream(side)
        sizes = [s.numel() for s in shapes]
        # allocated before recording: page-locking memory is not allowed while a stream records
        host = torch.empty(sum(sizes), dtype=torch.float32, pin_memory=stage is not None)
        self._slots = [h.view(s) for h, s in zip(host.split(sizes), shapes, strict=True)]
        # thread_local: another thread's CUDA work (another user's analysis) does not invalidate the recording
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.output = fn(self.input)
            if stage is not None:
                staged = stage(self.output)
                if [t.shape for t in staged] != shapes:
                    raise RuntimeError("the staged results changed shape between the warm-up and the recording")
                for slot, t in zip(self._slots, staged, strict=True):
                    slot.copy_(t.detach(), non_blocking=True)

    @contextlib.contextmanager
    def run(self, x: Inputs, meanwhile: Callable[[], Any] | None = None) -> Iterator[tuple[Any, list[torch.Tensor]]]:
        """Replay on ``x``; yield the recorded output structure and the staged tensors copied to ordinary host memory
        (one tensor each; None without ``stage``). Read the output structure inside the block: the next replay
        rewrites it. ``meanwhile``: host work called once the replay is queued and before the host waits for it, so
        that it runs while the device replays (work it queues on the device runs after the replay)."""
        with self._lock:
            for static, given in zip(_tensors(self.input), _tensors(x), strict=True):
                static.copy_(given)
            self.graph.replay()
            if meanwhile is not None:
                meanwhile()
            if self._stage is None:
                yield self.output, None
            else:
                torch.cuda.current_stream(_first(self.input).device).synchronize()
                yield self.output, [slot.clone() for slot in self._slots]


def _record(
    fn: Callable[[Any], Any], x: Inputs, stage: Callable[[Any], list[torch.Tensor]] | None, keep: Any
) -> GraphedPass | str:
    """A :class:`GraphedPass`, or why it could not be recorded."""
    try:
        return GraphedPass(fn, x, stage, keep)
    # e.g. a host sync or a copy from pageable memory inside fn; any other failure too: the caller then runs fn
    # eagerly, which raises again whatever is wrong with the model or the input itself
    except Exception as e:  # noqa: BLE001
        torch.cuda.synchronize(_first(x).device)
        why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300] + f" (raised at {raised_at(e)})"
        # once per key (the cache remembers the failure): the traceback, so that one run is enough to find the cause
        log.warning("a CUDA graph could not be recorded; the pass runs eagerly: %s", why, exc_info=e)
        return why


def graph_key(model: torch.nn.Module, weights_key: tuple, x: torch.Tensor, *extra: Any) -> tuple:
    """What a recorded graph depends on besides the input's values."""
    return (tuple(x.shape), x.dtype, str(x.device), model.training, weights_key, *extra)


ASKED = 16
"""Keys :meth:`GraphCache.asked_before` remembers."""


class GraphCache:
    """A model's recorded graphs, by :func:`graph_key`: the :data:`vizapp.limits.CUDA_GRAPHS` most recently used; a
    key whose recording failed stays failed (eager) and takes no graph's place (the last :data:`ASKED` failures are
    remembered, each a line of text)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._graphs: OrderedDict[tuple, GraphedPass] = OrderedDict()
        self._failed: OrderedDict[tuple, str] = OrderedDict()  # keys whose recording failed -> why
        self._asked: OrderedDict[tuple, None] = OrderedDict()  # keys asked about (see asked_before)
        self.notes: list[str] = []  # recordings that fell back to something slower, and why (each once)

    def get(
        self,
        key: tuple,
        fn: Callable[[Any], Any],
        x: Inputs,
        stage: Callable[[Any], list[torch.Tensor]] | None = None,
        keep: Any = None,
    ) -> GraphedPass | None:
        """The graph of ``fn`` for ``key`` (see :class:`GraphedPass`), recorded now from ``x`` if needed; None when it
        cannot be recorded."""
        with self._lock:
            if key in self._failed:
                self._failed.move_to_end(key)
                return None
            found = self._graphs.get(key)
            if found is None:
                made = _record(fn, x, stage, keep)
                if isinstance(made, str) and stage is not None:  # the staging copies failed: results copied after
                    staged_failure = made
                    made = _record(fn, x, None, keep)
                    note = f"recorded without host staging ({staged_failure})"
                    if not isinstance(made, str) and note not in self.notes:
                        self.notes.append(note)
                if isinstance(made, str):
                    self._failed[key] = made
                    while len(self._failed) > ASKED:
                        self._failed.popitem(last=False)
                    return None
                found = self._graphs[key] = made
                while len(self._graphs) > max(1, limits.CUDA_GRAPHS):
                    self._graphs.popitem(last=False)
            self._graphs.move_to_end(key)
            return found

    def asked_before(self, key: tuple) -> bool:
        """Whether ``key`` has a graph, failed to record, or was asked about before (this call counts as asking; the
        last :data:`ASKED` keys are remembered)."""
        with self._lock:
            if key in self._graphs or key in self._failed:
                return True
            seen = key in self._asked
            self._asked[key] = None
            self._asked.move_to_end(key)
            while len(self._asked) > ASKED:
                self._asked.popitem(last=False)
            return seen

    def failure(self, key: tuple) -> str | None:
        """Why recording failed for ``key`` (None when it did not fail or was not tried)."""
        return self._failed.get(key)

    def failures(self) -> list[str]:
        """Why each failed recording failed (the last :data:`ASKED`)."""
        return list(self._failed.values())

    def __len__(self) -> int:
        return len(self._graphs)
