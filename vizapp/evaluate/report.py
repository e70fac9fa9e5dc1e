"""Shards -> one table and a summary: ``results.csv``, ``summary.json``, ``summary.md`` and ``curves.html``.

Everything here reads the shard files only, so a report can be rebuilt from a partial or resumed job: the job's own
shards, ``shards/shard-00000.json`` up to its shard count, each holding its own number (a file copied or renamed
into the folder is not read). Every file is written atomically (:func:`~vizapp.evaluate.engines.write_atomic`).

Text cells of ``results.csv`` (file names, labels, messages) that a spreadsheet would read as a formula (starting
with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return) get a leading single quote, as OWASP recommends against
CSV injection; numbers are written as numbers (``-0.5`` stays ``-0.5``). :func:`unescape_cell` undoes it. A carriage return inside
a text cell is written as the two characters ``\r`` (a raw one would split the row).
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from vizapp.analysis.perturbation import CHEFER_FRACTIONS, DIRECTIONS
from vizapp.evaluate.engines import merge_records, read_shard, write_atomic
from vizapp.evaluate.worker import CLASS_KINDS, RANDOM

BASE_COLUMNS = (
    "id",
    "source",
    "status",
    "message",
    "target",
    "target_label",
    "predicted",
    "predicted_label",
    "correct",
    "prob_pred",
    "protocol",
)

PAPERS = {
    "rollout": "Abnar & Zuidema, ACL 2020",
    "flow": "Abnar & Zuidema, ACL 2020",
    "relevance": "Chefer, Gur & Wolf, ICCV 2021, “Generic Attention-model Explainability”",
    "grad_rollout": "jacobgil/vit-explain's gradient rollout",
    "transformer_attribution": (
        "Chefer, Gur & Wolf, CVPR 2021, “Transformer Interpretability Beyond Attention Visualization”"
    ),
    "attnlrp": (
        "Achtibat et al., ICML 2024, “AttnLRP: Attention-Aware Layer-Wise Relevance Propagation for Transformers” "
        "(the rules of its library lxt for ViTs)"
    ),
    "legrad": (
        "Bousselham et al., 2024, “LeGrad: An Explainability Method for Vision Transformers via Feature Formation "
        "Sensitivity”"
    ),
}
"""The paper (or tool) each method of the report comes from, shown beside its label."""

REPORT_LABELS = {
    "relevance": "GAE relevance (gradient × attention)",
    "transformer_attribution": "Transformer Attribution (LRP × gradient, rolled out from layer 1)",
    "attnlrp": "AttnLRP (input × LRP-modified gradient, signed)",
    "legrad": "LeGrad (each layer's score gradient on its attention, all layers)",
    "last_layer": "Attention each last-stage token receives (windowed models; mean over queries and heads)",
}
"""Report labels that differ from the registry's: vizapp's ``relevance`` is the ICCV 2021 rule (GAE), not the CVPR 2021
Transformer Attribution whose published numbers the report quotes (``transformer_attribution``, always from layer 1)."""

REFERENCE = (
    "Published reference (ViT-B/16, ImageNet validation, predicted class, the `chefer2021` pixel protocol), from Chefer, "
    "Gur & Wolf, CVPR 2021, “Transformer Interpretability Beyond Attention Visualization”, Table 1, and the "
    "authors in hila-chefer/Transformer-Explainability issue #31: **Transformer Attribution** (that paper's LRP-based "
    "method, vizapp's `transformer_attribution`) 54.16 negative / 17.03 positive (independent reproductions: 55.20 / "
    "16.61); the authors' rollout baseline (from layer 1) 53.1 negative; Grad-CAM 41.52 negative. None of these is "
    "vizapp's `relevance` (GAE, Chefer et al.'s ICCV 2021 rule, not in that table). They give the scale of the "
    "published protocol; a different model, data set and patch grid give different numbers."
)

PROTOCOL_TEXT = {
    "chefer2021": (
        "Protocol `chefer2021`: the authors' procedure step for step, as their code runs it (hila-chefer/"
        "Transformer-Explainability, `baselines/ViT/generate_visualizations.py` and "
        "`pertubation_eval_from_hdf5.py`; the AUC as the first author gives it in issue #31). Each image is "
        "explained once for the **predicted** class and once for the **target** (ground-truth) class. The [gh, gw] "
        'map is upsampled bilinearly by the patch size (`F.interpolate(map, scale_factor=patch, mode="bilinear")`) '
        "and min-max scaled; at each step f = 0.1, 0.2, ... 0.9 the top `int(f·H·W)` **pixels** (`torch.topk` over "
        "the flattened pixels; **positive** ranks the map, most relevant first, **negative** ranks `-map`, least "
        "relevant first) are set to 0 on every channel before the input normalisation (black), and the model "
        "classifies the image again; top-1 accuracy is counted against the target label. x = 0 is the unperturbed "
        "accuracy; the score is the trapezoid area under accuracy over the nominal x = 0, 0.1, ... 0.9, × 100. "
        "Positive: lower is better. Negative: higher is better."
    ),
    "patches": (
        "Protocol `patches`: vizapp's patch variant, **not** the published protocol. Each image is explained once for the "
        "**predicted** class and once for the **target** class; at each step f = 0.1, 0.2, ... 0.9 the "
        "`floor(f·P)` patches (P per image) ranked first by the patch map (**positive**: most relevant first, "
        "**negative**: least relevant first, ties by patch index) are set to black (0 before normalisation), and "
        "top-1 accuracy is counted against the target label. x = 0 is the unperturbed accuracy; the score is the "
        "trapezoid area under accuracy over the fraction of patches actually removed, `floor(f·P)/P` (4/49, 9/49, "
        "... 44/49 on a 7×7 grid), × 100, so its maximum is 100·floor(0.9·P)/P rather than 90. Positive: lower is "
        "better. Negative: higher is better."
    ),
}

TIES_TEXT = {
    "chefer2021": (
        "Where the authors' code leaves room: ties among pixels are broken by `torch.topk` itself (bilinear "
        "upsampling makes ties at the image border; which tied pixel topk returns is its own choice and may differ "
        "between CPU and GPU); a constant map is scaled to zeros (the authors' min-max would divide by zero); the "
        "random baseline is a random permutation of the patches, upsampled like any map; the steps remove "
        "`int(f·H·W)` pixels, a pixel short of f·H·W when that is not whole, and the AUC is still taken over the "
        "nominal f, as the authors take it."
    ),
    "patches": (
        "Ties in a map are broken by patch index; the random baseline ranks patches by a permutation seeded from "
        "the job seed and the image id."
    ),
}


def method_labels(registry_labels: dict[str, str]) -> dict[str, str]:
    """The report's label of each method: the registry's, :data:`REPORT_LABELS` where they differ, and the random
    baseline's."""
    return {**registry_labels, **REPORT_LABELS, RANDOM: "Random order (baseline)"}


def cited(method: str, labels: dict[str, str], job: dict[str, Any]) -> str:
    """A method's table label with its paper and, for rollout, its first layer."""
    text = labels.get(method, method)
    if method == "rollout":
        text += f", from layer {int(job.get('rollout_start_layer') or 0)}"
    return f"{text}; {PAPERS[method]}" if method in PAPERS else text


def read_rows(out: Path, count: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(rows in item order, shard metadata without rows) from the job's ``count`` shard files under ``out``; a
    missing or torn shard, and any other file in the shard folder, is not read."""
    rows, meta = [], []
    for k in range(count):
        d = read_shard(out, k)
        if d is None:
            continue
        rows += d.pop("rows")
        meta.append(d)
    return rows, meta


def shard_count(job: dict[str, Any]) -> int:
    """How many shards the job has: its items in shards of ``shard_size``."""
    size = max(1, int(job.get("shard_size") or 1))
    return -(-int(job.get("num_items") or 0) // size)


def _natural(key: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def columns(rows: list[dict[str, Any]], methods: list[str]) -> list[str]:
    """The table's columns in a fixed order: base, per-head statistics, then per method its perturbation scores."""
    from vizapp.statistics import STATISTICS

    keys = {k for r in rows for k in r}
    stats = sorted((k for k in keys if k.split(".")[0] in STATISTICS), key=_natural)  # every registered statistic
    per_method = []
    for m in methods:
        for kind in CLASS_KINDS:
            for d in DIRECTIONS:
                per_method += [f"{m}.{kind}.{d}.acc{k}" for k in range(1, len(CHEFER_FRACTIONS))]
                per_method.append(f"{m}.{kind}.{d}.auc")
        per_method += [f"{m}.deletion_auc", f"{m}.insertion_auc"]
    xs = [f"perturbation_x{k}" for k in range(1, len(CHEFER_FRACTIONS))]
    cols = list(BASE_COLUMNS) + stats + [c for c in xs + per_method if c in keys]
    return cols + sorted(keys - set(cols))


#: What a spreadsheet reads as the start of a formula (OWASP, "CSV Injection").
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def csv_text(rows: list[dict[str, Any]], cols: list[str]) -> str:
    f = io.StringIO()
    w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({c: _fmt(r.get(c, "")) for c in cols})
    return f.getvalue()


def write_csv(path: Path, rows: list[dict[str, Any]], cols: list[str]) -> None:
    write_atomic(path, csv_text(rows, cols))


def _fmt(v: Any) -> Any:
    if isinstance(v, str):
        # a raw carriage return would split the row (the writer quotes only "\n"): written as the two characters \r
        return escape_cell(printable(v).replace("\r", "\\r"))
    return repr(v) if isinstance(v, float) else v  # repr: the shortest string that reads back to the same float


def escape_cell(text: str) -> str:
    """A text cell a spreadsheet cannot take for a formula: a single quote before a leading ``=``, ``+``, ``-``,
    ``@``, tab or carriage return (numbers are not text cells and are never escaped)."""
    return "'" + text if text.startswith(FORMULA_STARTS) else text


def unescape_cell(text: str) -> str:
    """The text :func:`escape_cell` was given (for a program reading ``results.csv`` back)."""
    return text[1:] if text.startswith("'") and text[1:].startswith(FORMULA_STARTS) else text


def printable(text: str) -> str:
    """``text`` as UTF-8 can hold it: a file name's bytes that are not UTF-8 (which Python keeps as surrogates)
    become backslash escapes (``b\\xff.png``), so the report can always be written."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def mean_se(x: np.ndarray) -> tuple[float, float]:
    """Mean and standard error of the mean (NaN s.e. below two values)."""
    x = np.asarray(x, dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return float("nan"), float("nan")
    se = float(x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else float("nan")
    return float(x.mean()), se


def _finite_mean(x: np.ndarray) -> float:
    """The mean of the finite values of ``x``; NaN (without numpy's empty-slice warning) when there is none, e.g. a
    statistic not defined for the model."""
    x = x[np.isfinite(x)]
    return float(x.mean()) if x.size else float("nan")


def item_ranges(shards: list[int], shard_size: int, num_items: int) -> str:
    """The item index ranges the finished ``shards`` cover, e.g. "0–3455, 6656–9999" (0-based, inclusive)."""
    spans: list[list[int]] = []
    for k in sorted(shards):
        lo, hi = k * shard_size, min((k + 1) * shard_size, num_items or (k + 1) * shard_size) - 1
        if spans and spans[-1][1] + 1 == lo:
            spans[-1][1] = hi
        else:
            spans.append([lo, hi])
    return ", ".join(f"{a}–{b}" for a, b in spans) or "none"


def fallback_causes(counts: dict[str, int], sites: dict[str, str] | None = None) -> str:
    """Fallbacks counted by cause (:attr:`~vizapp.evaluate.worker.Evaluator.fallbacks`, or a job's, merged by
    :func:`~vizapp.evaluate.engines.merge_records`) in
    words, the most frequent first: "2x after the maps: RuntimeError: ...; 1x after ..."; with ``sites``
    (:attr:`~vizapp.evaluate.worker.Evaluator.fallback_sites`), each cause's " (raised at path:line (function))"."""
    sites = sites or {}
    return "; ".join(
        f"{n}x after {why}" + (f" (raised at {sites[why]})" if why in sites else "")
        for why, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    )


def summarise(
    rows: list[dict[str, Any]],
    methods: list[str],
    job: dict[str, Any],
    meta_shards: list[int] | None = None,
    record: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Counts, accuracy, Chefer AUCs (mean ± s.e.), mean curves, deletion/insertion AUCs and per-head statistics;
    ``record``: the slow paths the rows took (:func:`~vizapp.evaluate.engines.merge_records` of the shards': the
    batches that ran again one image at a time, where their errors were raised, the CUDA graphs that ran eagerly)."""
    meta_shards = meta_shards or []
    ok = [r for r in rows if r["status"] == "ok"]
    status: dict[str, int] = {}
    for r in rows:
        status[r["status"]] = status.get(r["status"], 0) + 1

    def col(name: str) -> np.ndarray:
        return np.array([r.get(name, np.nan) for r in ok], dtype=np.float64)

    out: dict[str, Any] = {
        "job": job,
        "protocol": job.get("protocol", "chefer2021"),
        "images": len(rows),
        "status": status,
        "evaluated": len(ok),
    }
    out["item_ranges"] = item_ranges(meta_shards, int(job.get("shard_size") or 1), int(job.get("num_items") or 0))
    out |= merge_records([record])  # each of RECORD_KEYS, empty when the rows took no slow path
    if not ok:
        return out
    out["accuracy"] = mean_se(col("correct"))
    if "perturbation_x1" in ok[0]:
        # the curves' x: the nominal fractions (chefer2021), or the mean fraction of patches removed (patches; the
        # same for every image of a fixed-size model)
        out["perturbation_x"] = [0.0] + [
            float(np.nanmean(col(f"perturbation_x{k}"))) for k in range(1, len(CHEFER_FRACTIONS))
        ]
    per: dict[str, Any] = {}
    for m in methods:
        d: dict[str, Any] = {}
        for kind in CLASS_KINDS:
            for dr in DIRECTIONS:
                pre = f"{m}.{kind}.{dr}"
                if f"{pre}.auc" not in ok[0]:
                    continue
                curve = [float(col("correct").mean())] + [
                    float(col(f"{pre}.acc{k}").mean()) for k in range(1, len(CHEFER_FRACTIONS))
                ]
                d[f"{kind}.{dr}"] = {"auc": mean_se(col(f"{pre}.auc")), "curve": curve}
        for mode in ("deletion", "insertion"):
            if f"{m}.{mode}_auc" in ok[0]:
                d[mode] = mean_se(col(f"{m}.{mode}_auc"))
        per[m] = d
    out["methods"] = per

    def grid(prefix: str) -> list[list[float]]:
        layers: dict[int, dict[int, float]] = {}
        for k in ok[0]:
            mt = re.fullmatch(rf"{prefix}\.l(\d+)\.h(\d+)", k)
            if mt:
                layers.setdefault(int(mt[1]), {})[int(mt[2])] = _finite_mean(col(k))
        return [[layers[li][h] for h in sorted(layers[li])] for li in sorted(layers)]

    out["mean_distance_px"] = grid("distance")
    out["attention_entropy_nats"] = grid("entropy")
    norms: dict[str, list[float]] = {}
    for stat in ("patch_mean", "patch_max", "prefix_mean"):
        ks = sorted((k for k in ok[0] if k.startswith(f"norm_{stat}.l")), key=_natural)
        norms[stat] = [_finite_mean(col(k)) for k in ks]
    out["token_norms"] = norms
    return out


def _pm(v: tuple[float, float], digits: int = 2) -> str:
    m, se = v
    return f"{m:.{digits}f} ± {se:.{digits}f}" if math.isfinite(se) else f"{m:.{digits}f}"


def markdown(summary: dict[str, Any], command: str, labels: dict[str, str]) -> str:
    """The summary as Markdown: protocol, counts, the model's notes, the two tables, per-head statistics."""
    job = summary["job"]
    st = summary["status"]
    protocol = summary.get("protocol", job.get("protocol", "chefer2021"))
    lines = [
        f"# Evaluation: {job['model']} on {job['data']}, perturbation protocol `{protocol}`",
        "",
        f"Command: `{command}`",
        "",
        f"Images: {summary['images']} listed, {summary['evaluated']} evaluated"
        + "".join(f", {n} {s.replace('_', ' ')}" for s, n in sorted(st.items()) if s != "ok")
        + "."
        + (f" Top-1 accuracy {_pm(tuple(100 * x for x in summary['accuracy']))} %." if "accuracy" in summary else ""),
        "",
    ]
    total = int(job.get("num_items") or 0)
    if job.get("limit") is not None:
        lines += [
            f"**Subset:** the first {total} images of {job['data']} in item order (`--limit {job['limit']}`), not the "
            "whole data set.",
            "",
        ]
    if total > summary["images"]:
        lines += [
            f"**Partial result: {summary['images']} of the job's {total} images are done** (every finished shard: "
            f"items {summary.get('item_ranges', '?')} in item order). Rerun the command above to finish: it skips the "
            "finished shards.",
            "",
        ]
    for note in summary.get("notes") or ():
        lines += [note, ""]
    fell = summary.get("fallbacks") or {}
    if fell:
        n = sum(fell.values())
        lines += [
            f"**A batch ran again one image at a time {'once' if n == 1 else f'{n} times'}.** Its shared work (one "
            "stage of it) failed, so its images ran alone: their rows are what each image gives alone, but each cost "
            "what it costs alone. " + fallback_causes(fell, summary.get("fallback_sites")) + ".",
            "",
        ]
    graphs = summary.get("graph_failures") or []
    if graphs:
        lines += [
            f"**CUDA graphs: {len(graphs)} recording{'s' if len(graphs) > 1 else ''} failed or fell back.** The rows "
            "are the same; a pass that could not be recorded ran eagerly, and one recorded without host staging "
            "copied its results after each replay, both slower. " + "; ".join(graphs) + ".",
            "",
        ]
    if "methods" not in summary:
        return "\n".join(lines + ["No image could be evaluated.", ""])
    title = "the authors' pixel procedure" if protocol == "chefer2021" else "vizapp's patch variant"
    lines += [
        f"## Perturbation test, protocol `{protocol}` ({title}; Chefer, Gur & Wolf, CVPR 2021)",
        "",
        PROTOCOL_TEXT[protocol],
        "",
        TIES_TEXT[protocol]
        + " Values are mean ± standard error over images (the mean of per-image areas is the area of the mean "
        "curve).",
        "",
        f"| method (`{protocol}`) | negative, predicted ↑ | positive, predicted ↓ | negative, target ↑ | positive, "
        "target ↓ |",
        "|---|---|---|---|---|",
    ]
    for m, d in summary["methods"].items():
        cells = [
            _pm(tuple(d[k]["auc"])) if k in d else "–"
            for k in ("pred.negative", "pred.positive", "target.negative", "target.positive")
        ]
        lines.append(f"| {cited(m, labels, job)} | " + " | ".join(cells) + " |")
    lines += ["", REFERENCE, ""]
    if protocol != "chefer2021":
        lines += ["The published numbers were measured with the `chefer2021` pixel protocol, not this one.", ""]
    if any("deletion" in d for d in summary["methods"].values()):
        lines += [
            "## Deletion / insertion (vizapp, Petsiuk et al. 2018)",
            "",
            f"vizapp's own curves, whatever the perturbation protocol: probability of the predicted class as patches "
            f"are deleted (set to the dataset-mean colour) or inserted onto it, most important first, in {job['steps']} "
            "equal steps; trapezoid area over the fraction of patches. Deletion: lower is better; insertion: higher "
            "is better.",
            "",
            "| method | deletion AUC ↓ | insertion AUC ↑ |",
            "|---|---|---|",
        ]
        for m, d in summary["methods"].items():
            if "deletion" in d:
                lines.append(
                    f"| {cited(m, labels, job)} | {_pm(tuple(d['deletion']), 4)} | {_pm(tuple(d['insertion']), 4)} |"
                )
        lines.append("")
    lines += ["## Per-head statistics (mean over images)", ""]
    for title, key, digits in (
        ("Mean attention distance (px)", "mean_distance_px", 2),
        ("Attention entropy (nats)", "attention_entropy_nats", 3),
    ):
        g = summary.get(key) or []
        if g:
            width = max(len(row) for row in g)  # a windowed model's layers have more heads at each stage
            lines += [
                f"{title}:",
                "",
                "| layer | " + " | ".join(f"h{h}" for h in range(width)) + " |",
                "|---" * (width + 1) + "|",
            ]
            lines += [
                f"| {li} | " + " | ".join([f"{v:.{digits}f}" for v in row] + [""] * (width - len(row))) + " |"
                for li, row in enumerate(g)
            ]
            lines.append("")
    norms = summary.get("token_norms") or {}
    if norms.get("patch_mean"):
        lines += [
            "Token L2 norm of each block's output:",
            "",
            "| layer | patch mean | patch max | prefix mean |",
            "|---|---|---|---|",
        ]
        for li, vals in enumerate(zip(norms["patch_mean"], norms["patch_max"], norms["prefix_mean"], strict=True)):
            lines.append(f"| {li} | " + " | ".join(f"{v:.2f}" for v in vals) + " |")
        lines.append("")
    return "\n".join(lines)


def curves_html(summary: dict[str, Any], labels: dict[str, str]) -> str:
    """A self-contained HTML page (plotly.js inline, works offline) of the mean accuracy curves."""
    from vizapp.figures import perturbation_curves_figure

    panels = (
        ("pred.positive", "positive, predicted class"),
        ("pred.negative", "negative, predicted class"),
        ("target.positive", "positive, target class"),
        ("target.negative", "negative, target class"),
    )
    curves = {
        labels.get(m, m): {key: (d[key]["curve"], d[key]["auc"][0]) for key, _ in panels if key in d}
        for m, d in summary.get("methods", {}).items()
    }
    dotted = {labels.get(RANDOM, RANDOM)}
    job = summary["job"]
    protocol = summary.get("protocol", job.get("protocol", "chefer2021"))
    title = f"Perturbation curves, protocol {protocol}: {job['model']} on {job['data']} ({summary['evaluated']} images)"
    x = summary.get("perturbation_x") or list(CHEFER_FRACTIONS)
    unit = "pixels" if protocol == "chefer2021" else "patches"  # what each protocol removes
    fig = perturbation_curves_figure(curves, panels, [100 * f for f in x], dotted, title, f"{unit} removed (%)")
    return fig.to_html(include_plotlyjs=True, full_html=True)


def write_report(
    out: Path,
    methods: list[str],
    job: dict[str, Any],
    command: str,
    labels: dict[str, str],
    markdown_path: Path | None = None,
    notes: list[str] | None = None,
) -> dict[str, Any]:
    """Write results.csv, summary.json, summary.md and curves.html under ``out``; return the summary. ``notes``:
    sentences about the model that the summary repeats (where its maps lie, statistics not defined for it)."""
    rows, meta = read_rows(out, shard_count(job))
    write_csv(out / "results.csv", rows, columns(rows, methods))
    summary = summarise(rows, methods, job, [int(m["shard"]) for m in meta], merge_records(meta))
    summary["notes"] = list(notes or ())
    write_atomic(out / "summary.json", json.dumps(summary, indent=1))
    text = markdown(summary, command, labels)
    text = printable(text)
    write_atomic(out / "summary.md", text)
    if markdown_path is not None:
        markdown_path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(markdown_path, text)
    if "methods" in summary:
        write_atomic(out / "curves.html", curves_html(summary, labels))
    return summary
