"""Model loading under misuse (issue 27, low): malformed checkpoints and configs are refused with a message that says
what to do (never a traceback, never the generic message, never a server path); a folder that asks to run its own
code is refused before transformers can ask; an allow-list entry written ``timm:X`` loads."""

from __future__ import annotations

import builtins
import json
import shutil
from pathlib import Path

import pytest
import torch

import vizapp
from tests.conftest import write_card_model
from vizapp import budget as B
from vizapp.errors import ModelLoadError, ModelTooLargeError


def test_an_allow_list_entry_with_the_timm_prefix_loads(monkeypatch):
    """``VIZAPP_MODELS=timm:X`` passed load_model's check but the timm adapter checked the bare ``X`` and refused it:
    such an entry never loaded, with either spelling of the id."""
    monkeypatch.setattr(B, "BUDGET", B.Budget(allowed=frozenset({"timm:vit_tiny_patch16_224"})))
    kw = dict(pretrained=False, device="cpu", img_size=32, depth=1)
    assert vizapp.load_model("timm:vit_tiny_patch16_224", **kw).source == "random"
    assert vizapp.load_model("vit_tiny_patch16_224", **kw).source == "random"
    with pytest.raises(ModelTooLargeError, match="not one of the models this server offers"):
        vizapp.load_model("timm:vit_small_patch16_224", **kw)
    monkeypatch.setattr(B, "BUDGET", B.Budget(allowed=frozenset({"vit_tiny_patch16_224"})))
    assert vizapp.load_model("timm:vit_tiny_patch16_224", **kw).source == "random"
