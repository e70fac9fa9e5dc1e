"""The registry of explanation methods: one entry per method, used by the API, the app, the evaluation and bench.

Adding a method is one analysis function (in :mod:`vizapp.analysis`, or a method on
:class:`~vizapp.pipeline.Analysis`) plus one :class:`Method` entry below. Nothing else lists method names.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from vizapp.errors import BadParameterError

if TYPE_CHECKING:
    from vizapp.pipeline import Analysis


@dataclass(frozen=True)
class Cost:
    """What one run of a method costs on one analysis, said before it runs.

    Attributes:
        work: the work in the method's own terms, e.g. "196 max-flow problems on a graph of 13 x 197 nodes".
        seconds: an estimate of the wall time on this server.
        basis: how ``seconds`` was estimated, so nobody mistakes it for a measurement.
    """

    work: str
    seconds: float
    basis: str


@dataclass(frozen=True)
class Method:
    """One explanation method.

    Attributes:
        name: the key used everywhere (API, app, CSV columns).
        label: what a person reads.
        needs_class: the map is for one class (takes ``class_idx``; needs a classifier head).
        slow: costs far more than the others (the app offers it as an opt-in).
        compute: ``compute(analysis, class_idx, **kwargs) -> [gh, gw]`` map.
        controls: keyword arguments of ``compute`` that the app's view controls set (fields of
            :class:`vizapp.views.Controls` with the same names).
        reports_progress: ``compute`` accepts ``progress=callback(done, total)``, called between its steps.
        cost: ``cost(analysis) -> Cost``, an estimate of what ``compute`` will cost (set for slow methods).
        from_output: the map is carried down from the tokens the output reads (``Analysis.output_weights``), not
            from one fixed token.
        options: every keyword argument ``compute`` takes (``controls`` among them): what ``vizapp.explain`` passes
            it of the options it is given.
        unavailable: ``unavailable(analysis) -> str``, why the method is not defined for that analysis's model ("" when
            it is), for a method whose rules hold for some architectures only; None: defined wherever its class is.
    """

    name: str
    label: str
    needs_class: bool
    compute: Callable[..., np.ndarray]
    slow: bool = False
    controls: tuple[str, ...] = ()
    reports_progress: bool = False
    cost: Callable[[Analysis], Cost] | None = None
    from_output: bool = True
    options: tuple[str, ...] = ()
    unavailable: Callable[[Analysis], str] | None = None


# Calibration graph for the flow estimate: small enough to cost ~20 ms, big enough that per-edge time settles.
_FLOW_CALIBRATION = dict(layers=4, tokens=65, flows=8)


@functools.cache
def _flow_seconds_per_edge() -> float:
    """Median seconds per max-flow per graph edge, measured once per process on random attention."""
    import torch

    from vizapp.analysis.flow import attention_flow

    layers, tokens, flows = (_FLOW_CALIBRATION[k] for k in ("layers", "tokens", "flows"))
    g = torch.Generator().manual_seed(0)
    attn = torch.softmax(2.0 * torch.randn(layers, 1, tokens, tokens, generator=g), dim=-1)  # [L, 1, N, N]
    stamps: list[float] = []

    class _Enough(Exception):
        pass

    def tick(done: int, total: int) -> None:
        stamps.append(time.perf_counter())
        if done > flows:
            raise _Enough

    with contextlib.suppress(_Enough):
        attention_flow(attn, 1, progress=tick)
    per_flow = float(np.median(np.diff(stamps)))
    return per_flow / (layers * tokens * tokens)


def _flow_cost(r: Analysis) -> Cost:
    """Attention flow: one max-flow per patch on the (L+1) x N graph; time scaled from a calibration run by edges."""
    num_patches = r.grid_size[0] * r.grid_size[1]
    read = int((r.output_weights() > 0).sum())  # tokens the output reads: more than one adds an output node
    edges = r.num_layers * r.num_tokens**2 + (read if read > 1 else 0)
    nodes = f"{r.num_layers + 1} x {r.num_tokens} nodes" + (" and an output node" if read > 1 else "")
    cal = _FLOW_CALIBRATION
    return Cost(
        work=f"{num_patches} max-flow problems on a graph of {nodes} ({edges:,} edges)",
        seconds=num_patches * edges * _flow_seconds_per_edge(),
        basis=f"estimate: {cal['flows']} max-flows timed on this server on a random {cal['layers']}-layer, "
        f"{cal['tokens']}-token graph, scaled by edge count; real attention can be 2-3x faster or slower",
    )


def _lrp_unavailable(r: Analysis) -> str:
    """Transformer Attribution's LRP rules are written for timm ViTs that read their CLS token (see
    :func:`vizapp.analysis.lrp.unsupported`); "" while the result's model is gone (computing it then says)."""
    from vizapp.analysis.lrp import unsupported

    vm = r.model_ref() if r.model_ref is not None else None
    return unsupported(vm.model, r.num_prefix_tokens) if vm is not None else ""


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            "rollout",
            "Attention rollout",
            False,
            lambda r, c, **kw: r.rollout(**kw),
            controls=("head_fusion", "discard_ratio", "start_layer", "start_row"),
            options=("head_fusion", "discard_ratio", "start_layer", "start_row"),
        ),
        Method(
            "attention",
            "Last-layer CLS attention",
            False,
            lambda r, c, **kw: r.last_layer_attention(),
            from_output=False,
        ),
        Method(
            "flow",
            "Attention flow",
            False,
            lambda r, c, **kw: r.attention_flow(**kw),
            controls=("start_row",),
            slow=True,
            reports_progress=True,
            cost=_flow_cost,
            options=("head_fusion", "progress", "start_row"),
        ),
        Method(
            "grad_rollout",
            "Gradient rollout",
            True,
            lambda r, c, **kw: r.grad_rollout(c, **kw),
            controls=("start_row",),
            options=("discard_ratio", "start_layer", "start_row"),
        ),
        Method(
            "relevance",
            "GAE relevance (Chefer et al., ICCV 2021)",
            True,
            lambda r, c, **kw: r.relevance(c, **kw),
            controls=("start_row",),
            options=("start_layer", "start_row"),
        ),
        Method(
            "transformer_attribution",
            "Transformer Attribution (Chefer et al., CVPR 2021)",
            True,
            lambda r, c, **kw: r.transformer_attribution(c, **kw),
            from_output=False,
            options=("start_layer",),
            unavailable=_lrp_unavailable,
        ),
    )
}


def get(name: Any) -> Method:
    """The method called ``name``, or a clear error listing the known ones."""
    if not isinstance(name, str) or name not in METHODS:
        raise BadParameterError(f"method must be one of {list(METHODS)}, got {str(name)[:40]!r}")
    return METHODS[name]


def explain(r: Analysis, name: str, class_idx: Any = None, **kwargs: Any) -> np.ndarray:
    """The map of method ``name`` for ``r`` ([gh, gw]); ``class_idx`` is ignored by methods that need no class."""
    m = get(name)
    return m.compute(r, class_idx if m.needs_class else None, **kwargs)


def unavailable(r: Analysis, name: str) -> str:
    """Why method ``name`` is not defined for ``r``'s model, in a phrase ("" when it is; see ``Method.unavailable``)."""
    m = get(name)
    return m.unavailable(r) if m.unavailable is not None else ""


def cost(r: Analysis, name: str) -> Cost | None:
    """What method ``name`` will cost on ``r``, for methods that say (the slow ones); else None."""
    m = get(name)
    return m.cost(r) if m.cost is not None else None
