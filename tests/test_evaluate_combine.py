"""``python -m vizapp.evaluate.combine``: one table over several finished jobs on the same images."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vizapp.bundled.data import FASHION_MNIST_DIR
from vizapp.errors import VizappError
from vizapp.evaluate import evaluate
from vizapp.evaluate.combine import combine, main

pytestmark = pytest.mark.skipif(
    not Path(FASHION_MNIST_DIR, "t10k-images-idx3-ubyte.gz").exists(),
    reason="Debian dataset-fashion-mnist is not installed (make test installs it)",
)
JOB = dict(steps=0, shard_size=4, limit=8, progress=False)


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """Two jobs over the same 8 images (rollout from layer 1 with the random baseline; rollout from layer 0 and
    last-layer attention with it), and one over another 4."""
    root = tmp_path_factory.mktemp("combine")
    a, b, c = root / "a", root / "b", root / "c"
    sa = evaluate("fmnist-test", a, methods="rollout,random", **JOB)
    sb = evaluate("fmnist-test", b, methods="rollout,attention,random", rollout_start_layer=0, **JOB)
    evaluate("fmnist-test", c, methods="rollout", **{**JOB, "limit": 4})
    return a, b, c, sa, sb


def _row(text: str, start: str) -> list[str]:
    line = next(line for line in text.splitlines() if line.startswith(start))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_one_row_per_method_and_setting_with_each_jobs_numbers(jobs):
    a, b, _, sa, sb = jobs
    text = combine([a, b], ["job a", "job b"], note="Where it ran.")
    assert "1. `job a`" in text and "2. `job b`" in text and "Where it ran." in text
    table = [line for line in text.splitlines() if line.startswith("| ") and "method (" not in line]
    # rollout from layer 1 (job 1), random once (job 1's), rollout from layer 0 and attention (job 2)
    assert len(table) == 4 and sum("Random order" in line for line in table) == 1
    r1, r0 = _row(text, "| Attention rollout, from layer 1"), _row(text, "| Attention rollout, from layer 0")
    assert r1[1] == "1" and r0[1] == "2"
    for row, s in ((r1, sa), (r0, sb)):
        m, se = s["methods"]["rollout"]["pred.negative"]["auc"]
        assert row[2] == f"{m:.2f} ± {se:.2f}"
    assert _row(text, "| Last-layer CLS attention")[1] == "2"


def test_jobs_that_cannot_share_a_table_are_refused(jobs, tmp_path):
    a, b, c, _, _ = jobs
    with pytest.raises(VizappError, match="another job.*limit"):
        combine([a, c], ["a", "c"])
    # a shared method whose numbers differ is two different runs, not one
    bad = tmp_path / "bad"
    bad.mkdir()
    s = json.loads((b / "summary.json").read_text())
    s["methods"]["random"]["pred.negative"]["auc"][0] += 1.0
    (bad / "summary.json").write_text(json.dumps(s))
    with pytest.raises(VizappError, match="'random' differs between jobs 1 and 2"):
        combine([a, bad], ["a", "bad"])
    # an unfinished job
    s["images"] = 3
    (bad / "summary.json").write_text(json.dumps(s))
    with pytest.raises(VizappError, match="not finished"):
        combine([bad], ["bad"])
    with pytest.raises(VizappError, match="no summary.json"):
        combine([tmp_path], ["x"])


def test_the_command_line_writes_the_table_with_each_jobs_command(jobs, tmp_path):
    a, b, _, _, _ = jobs
    md = tmp_path / "all.md"
    main([str(a), str(b), "--markdown", str(md)])
    text = md.read_text()
    assert (
        f"--methods rollout,attention,random --steps 0 --protocol chefer2021 --rollout-start-layer 0 --limit 8 --out {b}"
        in text
    )
