"""The checks of the controls that several result types and the batch API take (layer, head, start row, discard
ratio, head fusion), with one message each, so that a value refused before a batched forward is refused the same way by
``r.explain`` afterwards."""

from __future__ import annotations

from typing import Any

import numpy as np

from vizapp.errors import BadParameterError

#: Which joint-attention row a rollout-style map starts from: what the output reads, or the CLS token.
START_ROWS = ("output", "cls")
NO_CLS = "this model has no CLS token (it pools its patches); click a patch to use it"


def layer_index(layer: Any, num_layers: int) -> int:
    """``layer`` as an index in 0..num_layers-1 (negative counts from the end)."""
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
        raise BadParameterError(f"layer must be an integer, got {layer!r}"[:200])
    if not -num_layers <= layer < num_layers:
        raise BadParameterError(f"layer {layer} is out of range; this model has layers 0..{num_layers - 1}")
    return int(layer) % num_layers


def head_index(head: Any, num_heads: int, owner: str = "this model") -> int | None:
    """``head`` as an index in 0..num_heads-1, or None (every head); ``owner`` names what has those heads (a layer,
    where layers differ in head count)."""
    if head is None:
        return None
    if isinstance(head, bool) or not isinstance(head, (int, np.integer)):
        raise BadParameterError(f"head must be an integer or None, got {head!r}"[:200])
    if not 0 <= head < num_heads:
        raise BadParameterError(f"head {head} is out of range; {owner} has heads 0..{num_heads - 1}")
    return int(head)


def discard_ratio(value: Any) -> float:
    """A rollout's discard ratio, a number in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 <= float(value) < 1.0):
        raise BadParameterError(f"discard_ratio must be a number in [0, 1), got {value!r}"[:200])
    return float(value)


def head_fusion(value: Any) -> str:
    """One of :data:`vizapp.analysis.rollout.HEAD_FUSIONS` ("mean", "max", "min")."""
    from vizapp.analysis.rollout import HEAD_FUSIONS

    if not isinstance(value, str) or value not in HEAD_FUSIONS:
        raise BadParameterError(f"head_fusion must be one of {list(HEAD_FUSIONS)}, got {str(value)[:40]!r}")
    return value


def start_row(value: Any, has_class_token: bool) -> str:
    """One of :data:`START_ROWS`; "cls" only for a model with a class token."""
    if not isinstance(value, str) or value not in START_ROWS:
        raise BadParameterError(f"start_row must be one of {list(START_ROWS)}, got {str(value)[:40]!r}")
    if value == "cls" and not has_class_token:
        raise BadParameterError(NO_CLS)
    return value
