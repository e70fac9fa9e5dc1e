"""The shared control checks (vizapp.checks): what each accepts, what it refuses and with which message."""

from __future__ import annotations

import numpy as np
import pytest

from vizapp import checks
from vizapp.errors import BadParameterError


def test_layer_index():
    assert checks.layer_index(2, 4) == 2 and checks.layer_index(-1, 4) == 3 and checks.layer_index(np.int64(0), 4) == 0
    for bad, message in ((4, "layer 4 is out of range; this model has layers 0..3"), (-5, "out of range")):
        with pytest.raises(BadParameterError, match=message):
            checks.layer_index(bad, 4)
    for bad in (True, 1.0, "1", None):
        with pytest.raises(BadParameterError, match="layer must be an integer"):
            checks.layer_index(bad, 4)


def test_head_index():
    assert checks.head_index(None, 3) is None and checks.head_index(2, 3) == 2
    with pytest.raises(BadParameterError, match="head 3 is out of range; this model has heads 0..2"):
        checks.head_index(3, 3)
    with pytest.raises(BadParameterError, match="head 6 is out of range; layer 4 has heads 0..5"):
        checks.head_index(6, 6, owner="layer 4")
    with pytest.raises(BadParameterError, match="head must be an integer or None"):
        checks.head_index(False, 3)


def test_discard_ratio_and_start_row():
    assert checks.discard_ratio(0) == 0.0 and checks.discard_ratio(0.9) == 0.9
    for bad in (1.0, -0.1, True, "0.5"):
        with pytest.raises(BadParameterError, match=r"discard_ratio must be a number in \[0, 1\)"):
            checks.discard_ratio(bad)
    assert checks.start_row("output", False) == "output" and checks.start_row("cls", True) == "cls"
    with pytest.raises(BadParameterError, match="no CLS token"):
        checks.start_row("cls", False)
    with pytest.raises(BadParameterError, match="start_row must be one of"):
        checks.start_row("first", True)


def test_head_fusion():
    assert [checks.head_fusion(f) for f in ("mean", "max", "min")] == ["mean", "max", "min"]
    for bad in ("avg", None, 1, ["mean"]):
        with pytest.raises(BadParameterError, match=r"head_fusion must be one of \['mean', 'max', 'min'\]"):
            checks.head_fusion(bad)
