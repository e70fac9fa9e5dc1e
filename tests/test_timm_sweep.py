"""scripts/timm_sweep.py: an analysed row compares with timm's own attention, a refused row carries the user's
message, and anything else fails the script."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def sweep():
    spec = importlib.util.spec_from_file_location("timm_sweep", ROOT / "scripts" / "timm_sweep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_an_analysed_row_matches_timm_and_a_refused_row_says_why(sweep):
    row = sweep.check("vit_tiny_patch16_224")
    assert row["outcome"] == "analysed" and row["built"] == "{'depth': 2}"
    assert row["layers x heads, tokens"] == "2 x 3, 197" and float(row["max |A - timm's A|"]) <= 1e-5
    assert row["maps"] == "rollout, grad_rollout, relevance: finite"
    row = sweep.check("cait_xxs24_224")
    import timm

    if hasattr(timm.create_model("cait_xxs24_224", depth=1), "num_prefix_tokens"):  # timm 1.0.31 and later
        assert row["outcome"] == "refused: block 0 uses TalkingHeadAttn, whose attention vizapp cannot capture exactly"
    else:  # timm before 1.0.31: Cait names no prefix-token count, so it is refused before its blocks are read
        assert row["outcome"] == (
            "refused: cait_xxs24_224 (Cait) is not a ViT with a patch embedding and prefix tokens vizapp can read"
        )


def test_a_wrong_attention_or_a_crash_fails_the_script(sweep, monkeypatch, tmp_path):
    import torch

    real = sweep._reference_attention
    monkeypatch.setattr(sweep, "_reference_attention", lambda m, x: [a * 1.01 for a in real(m, x)])
    assert sweep.check("vit_tiny_patch16_224")["outcome"] == "MISMATCH"
    monkeypatch.setattr(sweep, "_reference_attention", lambda m, x: torch.zeros(0).item())
    out = tmp_path / "sweep.md"
    assert sweep.main(["--names", "vit_tiny_patch16_224", "--out", str(out)]) == 1
    text = out.read_text()
    assert "0 analysed, 0 refused, 1 bugs or mismatches" in text
    assert "| vit_tiny_patch16_224 | {'depth': 2} | BUG: RuntimeError: " in text
