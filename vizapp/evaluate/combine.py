"""One table of every method from several finished evaluation jobs over the same images.

``python -m vizapp.evaluate.combine OUT [OUT ...] --markdown PATH [--note TEXT]`` reads each job's ``summary.json``
(written by ``python -m vizapp.evaluate``) and writes one Markdown table of the perturbation AUCs of every method of
every job, one row per (job, method), with each job's command. It refuses jobs that cannot share a table: another
data set, model, protocol, item list or seed, or a job that is not finished. A method that two jobs both ran with the
same settings (the random baseline) is shown once, from the first job that has it, after checking that both give the
same numbers.
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path
from typing import Any

from vizapp.errors import VizappError
from vizapp.evaluate.report import PROTOCOL_TEXT, REFERENCE, TIES_TEXT, _pm, cited, method_labels, printable

#: what every combined job must share
SHARED = ("data", "model", "protocol", "items_sha256", "num_items", "seed", "limit", "pretrained", "prompts")
CELLS = ("pred.negative", "pred.positive", "target.negative", "target.positive")


def _load(out: Path) -> dict[str, Any]:
    path = Path(out) / "summary.json"
    if not path.is_file():
        raise VizappError(f"{out} has no summary.json; run the evaluation (or its --report-only) there first")
    return json.loads(path.read_text(encoding="utf-8"))


def combine(outs: list[Path], commands: list[str], note: str = "") -> str:
    """The Markdown of one table over the jobs in ``outs`` (``commands``: how each job was run, one per job)."""
    from vizapp import methods as registry

    if not outs or len(outs) != len(commands):
        raise VizappError("give at least one job folder and one command per job")
    summaries = [_load(o) for o in outs]
    first = summaries[0]["job"]
    for out, s in zip(outs, summaries, strict=True):
        job = s["job"]
        differ = [k for k in SHARED if job.get(k) != first.get(k)]
        if differ:
            raise VizappError(
                f"{out} is another job than {outs[0]} ({', '.join(differ)} differ); they cannot share a table"
            )
        if s["images"] != int(job.get("num_items") or 0) or "methods" not in s:
            raise VizappError(
                f"{out} is not finished ({s['images']} of {job.get('num_items')} images); finish it first"
            )
    labels = method_labels({k: m.label for k, m in registry.METHODS.items()})
    protocol = first.get("protocol", "chefer2021")
    rows: list[str] = []
    seen: dict[tuple[str, int], tuple[int, dict[str, Any]]] = {}
    for i, s in enumerate(summaries):
        for m, d in s["methods"].items():
            key = (m, int(s["job"].get("rollout_start_layer") or 0) if m == "rollout" else 0)
            if key in seen:
                j, other = seen[key]
                if any(other.get(c, {}).get("auc") != d.get(c, {}).get("auc") for c in CELLS):
                    raise VizappError(f"{m!r} differs between jobs {j + 1} and {i + 1}; they are not the same run")
                continue
            seen[key] = (i, d)
            cells = [_pm(tuple(d[c]["auc"])) if c in d else "–" for c in CELLS]
            rows.append(f"| {cited(m, labels, s['job'])} | {i + 1} | " + " | ".join(cells) + " |")
    acc = summaries[0].get("accuracy")
    lines = [
        f"# Faithfulness: every method, {first['model']} on {first['data']}, protocol `{protocol}`",
        "",
        f"{summaries[0]['images']} images"
        + (f", top-1 accuracy {_pm(tuple(100 * x for x in acc))} %" if acc else "")
        + f"; {len(outs)} jobs over the same images, combined by `python -m vizapp.evaluate.combine`:",
        "",
        *[f"{i + 1}. `{c}`" for i, c in enumerate(commands)],
        "",
    ]
    if note:
        lines += [note, ""]
    lines += [
        PROTOCOL_TEXT[protocol],
        "",
        TIES_TEXT[protocol] + " Values are mean ± standard error over images.",
        "",
        f"| method (`{protocol}`) | job | negative, predicted ↑ | positive, predicted ↓ | negative, target ↑ | "
        "positive, target ↓ |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        REFERENCE,
        "",
    ]
    if protocol != "chefer2021":
        lines += ["The published numbers were measured with the `chefer2021` pixel protocol, not this one.", ""]
    return printable("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m vizapp.evaluate.combine", description=__doc__.splitlines()[0])
    p.add_argument("outs", nargs="+", type=Path, help="finished job folders (--out of each evaluation)")
    p.add_argument("--markdown", type=Path, required=True)
    p.add_argument("--command", action="append", default=None, help="how each job was run (one per job, in order)")
    p.add_argument("--note", default="", help="a paragraph for the top (e.g. where the jobs ran)")
    a = p.parse_args(argv)
    commands = a.command or [
        " ".join(["python -m vizapp.evaluate", *map(shlex.quote, _job_args(_load(o)["job"], o))]) for o in a.outs
    ]
    text = combine(a.outs, commands, a.note)
    a.markdown.parent.mkdir(parents=True, exist_ok=True)
    a.markdown.write_text(text, encoding="utf-8")
    print(f"wrote {a.markdown}")


def _job_args(job: dict[str, Any], out: Path) -> list[str]:
    """The evaluation's command-line arguments that reproduce ``job`` into ``out``."""
    args = [job["data"], "--model", job["model"], "--methods", ",".join(job["methods"]), "--steps", str(job["steps"])]
    args += ["--protocol", job.get("protocol", "chefer2021")]
    args += ["--rollout-start-layer", str(int(job.get("rollout_start_layer") or 0))]
    if job.get("limit") is not None:
        args += ["--limit", str(job["limit"])]
    return [*args, "--out", str(out)]


if __name__ == "__main__":
    main()
