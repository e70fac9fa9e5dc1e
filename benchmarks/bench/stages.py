"""The four timed stages: (a) bare forward, (b) ``analyze``, (c) every figure, (d) one control change."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image


def stage_a(vm: Any, img: Image.Image) -> torch.Tensor:
    """Preprocessing + bare forward (the model's own fused attention), no capture."""
    x = vm.transform(img)
    if x.dim() == 3:
        x = x[None]
    with torch.no_grad():
        out = vm.model(x.to(device=vm.device, dtype=vm.dtype))
    vm.synchronize()
    return out


def stage_b(vm: Any, img: Image.Image) -> Any:
    """:func:`vizapp.analyze` plus the last layer's per-head CLS maps."""
    from vizapp.pipeline import analyze

    r = analyze(vm, img)
    r.attention(r.num_layers - 1)
    vm.synchronize()
    return r


def figures_json(figs: dict[str, Any]) -> dict[str, int]:
    """JSON size (bytes) of every plotly figure in ``figs``."""
    import plotly.graph_objects as go

    return {k: len(f.to_json()) for k, f in figs.items() if isinstance(f, go.Figure)}


def stage_c(r: Any, pos_sim: np.ndarray | None) -> dict[str, int]:
    """Build and serialise every figure of :func:`vizapp.views.render_all`; JSON size (bytes) per figure."""
    from vizapp.views import Controls, default_query, render_all

    return figures_json(render_all(r, pos_sim, Controls(query=default_query(r))))


def control_changes(r: Any) -> dict[str, Callable[[Any], Any]]:
    """The re-renders (analysis -> figure) after one control change each; none runs a forward pass."""
    from vizapp.views import Controls, default_query, heads_view, rollout_view

    gh, gw = r.grid_size
    changes: dict[str, Callable[[Any], Any]] = {}
    if r.num_prefix_tokens:
        changes["head fusion max (rollout)"] = lambda a: rollout_view(a, Controls(head_fusion="max"))
    mid = max(0, r.num_layers // 2 - 1)
    changes[f"layer {mid} (heads)"] = lambda a: heads_view(a, Controls(layer=mid, query=default_query(a)))
    changes[f"query patch ({gh // 2}, {gw // 2}) (heads)"] = lambda a: heads_view(
        a, Controls(layer=-1, query=(gh // 2, gw // 2))
    )
    return changes


def stage_d(change: Callable[[Any], Any], r: Any) -> dict[str, int]:
    """One control change: build the figure it changes and serialise it."""
    return figures_json({"fig": change(r)})


# ``Analysis`` has no public way to copy itself with the cache ``analyze`` left, so these two read and replace its
# ``_cache`` field: the benchmark's one use of a private name, kept here.
def cache_snapshot(r: Any) -> Any:
    """What the analysis has cached so far (right after ``analyze``: the fusions and the default rollout)."""
    return r._cache.copy()


def fresh_copy(r: Any, cache: Any) -> Any:
    """The analysis with its cache as ``analyze`` left it (so a repeat does not hit what the last one cached)."""
    return dataclasses.replace(r, _cache=cache.copy())


def timed(fn: Callable[..., Any], *args: Any) -> tuple[float, Any]:
    """Wall seconds and result of ``fn(*args)``."""
    wall, _cpu, out = timed_cpu(fn, *args)
    return wall, out


def timed_cpu(fn: Callable[..., Any], *args: Any) -> tuple[float, float, Any]:
    """Wall seconds, CPU seconds of this process (all threads; not counting time other tenants took), result."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn(*args)
    return time.perf_counter() - t0, time.process_time() - c0, out
