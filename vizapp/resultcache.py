"""What a result keeps of what its views computed: one budgeted cache with typed keys.

A result (:class:`vizapp.result.Analysis`, :class:`vizapp.swin_result.WindowAnalysis`) caches what its methods
derive from its record (head fusions, rollouts, attention gradients, explanation maps). Every entry goes through
:meth:`ResultCache.put`, which keeps the per-layer N x N kinds (:data:`BUDGETED`) only while they fit
:data:`vizapp.limits.FUSED_CACHE_LIMIT_BYTES`: one check in one place, where each method wrote its own
``numel() * 4 <= LIMIT`` before; maps are always kept. Keys are :class:`Key` (what is
cached, and its arguments), so that two methods cannot collide on a bare tuple.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

import numpy as np
import torch

from vizapp import limits

T = TypeVar("T")

KINDS = (
    "fused",
    "rollout",
    "grads",
    "grad_heads",
    "map",
    "flow",
    "window_index",
    "window_fused",
    "window_map",
    "block_output",
)
"""What a result may cache (:attr:`Key.kind`)."""

BUDGETED = ("fused", "grads", "grad_heads", "window_fused", "block_output")
"""The kinds that hold per-layer N x N tensors (or a windowed layer's block output [N_l, C_l], formed again when the
analysis did not keep it) and are kept only within the entry budget; the others are maps ([gh, gw]) and indices, kept
always (the forward's own rollout map among them)."""


class Key(NamedTuple):
    """A cache entry's name: ``kind`` (one of :data:`KINDS`) and the arguments that determine it."""

    kind: str
    args: tuple = ()


def nbytes(value: Any) -> int:
    """Bytes of a tensor, an array, or a list or tuple of them (0 for anything else)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    if isinstance(value, (list, tuple)):
        return sum(nbytes(v) for v in value)
    return 0


class ResultCache:
    """A result's derived values by :class:`Key`, each kept while it fits ``entry_budget`` bytes.

    Args:
        entry_budget: the most one entry may hold (default :data:`vizapp.limits.FUSED_CACHE_LIMIT_BYTES`, read when
            an entry is offered, so a test or an operator may change it).
    """

    def __init__(self, entry_budget: int | None = None) -> None:
        self._entry_budget = entry_budget
        self._items: dict[Key, Any] = {}

    @property
    def entry_budget(self) -> int:
        return limits.FUSED_CACHE_LIMIT_BYTES if self._entry_budget is None else self._entry_budget

    @staticmethod
    def _checked(key: Key) -> Key:
        if not isinstance(key, Key) or key.kind not in KINDS:
            raise TypeError(f"a result cache key is a Key with a kind in {KINDS}, got {key!r}"[:200])
        return key

    def __contains__(self, key: Key) -> bool:
        return self._checked(key) in self._items

    def __len__(self) -> int:
        return len(self._items)

    def peek(self, key: Key) -> Any:
        """The value under ``key``, or None."""
        return self._items.get(self._checked(key))

    def put(self, key: Key, value: T) -> T:
        """Keep ``value`` under ``key`` (a :data:`BUDGETED` kind only if it fits the entry budget); return it."""
        if self._checked(key).kind not in BUDGETED or nbytes(value) <= self.entry_budget:
            self._items[self._checked(key)] = value
        return value

    def get(self, key: Key, make: Callable[[], T]) -> T:
        """The value under ``key``, made by ``make()`` (and offered to the cache) when it is not there."""
        found = self._items.get(self._checked(key))
        return found if found is not None else self.put(key, make())

    def copy(self) -> ResultCache:
        """A new cache with the same entries (the values shared, not copied) and the same budget."""
        out = ResultCache(self._entry_budget)
        out._items = dict(self._items)
        return out

    def clear(self) -> None:
        """Forget every entry (each is made again when next asked)."""
        self._items.clear()

    def nbytes(self) -> int:
        """Bytes of every entry (an entry sharing storage with the record is counted in full)."""
        return sum(nbytes(v) for v in self._items.values())
