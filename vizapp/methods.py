"""The registry of explanation methods: one entry per method, used by the API, the app, the evaluation and bench.

Adding a method is one analysis function (in :mod:`vizapp.analysis`, or a method on
:class:`~vizapp.pipeline.Analysis`) plus one :class:`Method` entry below. Nothing else lists method names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from vizapp.errors import BadParameterError

if TYPE_CHECKING:
    from vizapp.pipeline import Analysis


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
    """

    name: str
    label: str
    needs_class: bool
    compute: Callable[..., np.ndarray]
    slow: bool = False
    controls: tuple[str, ...] = ()
    reports_progress: bool = False


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("rollout", "Attention rollout", False, lambda r, c, **kw: r.rollout(**kw),
               controls=("head_fusion", "discard_ratio", "start_layer")),
        Method("attention", "Last-layer CLS attention", False, lambda r, c, **kw: r.last_layer_attention()),
        Method("flow", "Attention flow", False, lambda r, c, **kw: r.attention_flow(**kw), slow=True,
               reports_progress=True),
        Method("grad_rollout", "Gradient rollout", True, lambda r, c, **kw: r.grad_rollout(c, **kw)),
        Method("relevance", "Chefer relevance", True, lambda r, c, **kw: r.relevance(c, **kw)),
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
