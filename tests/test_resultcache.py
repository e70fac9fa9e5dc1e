"""The result cache (vizapp.resultcache): typed keys and one budget check."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vizapp import limits
from vizapp.resultcache import Key, ResultCache, nbytes


def test_budget_applies_to_the_n_by_n_kinds_and_maps_are_always_kept(monkeypatch):
    monkeypatch.setattr(limits, "FUSED_CACHE_LIMIT_BYTES", 100)
    c = ResultCache()
    small, large = torch.zeros(5, 5), torch.zeros(6, 5)  # 100 and 120 bytes of float32
    assert c.put(Key("fused", ("mean",)), small) is small and Key("fused", ("mean",)) in c
    assert c.put(Key("grads", (3,)), large) is large and Key("grads", (3,)) not in c  # returned, not kept
    assert c.put(Key("grads", (4,)), [small, small]) is not None and Key("grads", (4,)) not in c  # 200 bytes in all
    big_map = np.zeros((100, 100), np.float32)  # 40 kB: a map is kept whatever the budget
    c.put(Key("map", ("relevance", 1)), big_map)
    assert c.peek(Key("map", ("relevance", 1))) is big_map
    assert c.nbytes() == 100 + 40_000 and len(c) == 2
    c.clear()
    assert len(c) == 0 and c.peek(Key("fused", ("mean",))) is None


def test_get_makes_once_and_keys_are_typed():
    c = ResultCache(entry_budget=10**6)
    made = []
    for _ in range(3):
        c.get(Key("rollout", ("mean", 0.0, 0)), lambda: made.append(1) or np.ones((2, 2)))
    assert made == [1]
    with pytest.raises(TypeError, match="a Key with a kind"):
        c.put(("rollout", "mean"), np.ones(2))  # a bare tuple, as the result used to write
    with pytest.raises(TypeError, match="a Key with a kind"):
        c.peek(Key("nonsense"))
    assert nbytes([torch.zeros(2, dtype=torch.float64), np.zeros(3, np.int8)]) == 16 + 3 and nbytes("x") == 0
