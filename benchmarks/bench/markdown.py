"""The markdown report (docs/benchmarks.md): tables, targets, method, cost model, findings."""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.bench.costmodel import COST_MODEL_TEXT
from benchmarks.bench.machine import ROOT
from benchmarks.bench.run import MB, ModelResult
from benchmarks.bench.specs import LARGE_MACS, SMALL_MACS

DEFAULT_OUT = ROOT / "docs" / "benchmarks.md"
# Everything from this line to the end of an existing report is kept when the benchmark rewrites it.
NOTES_MARKER = "<!-- hand-written notes below: kept when `python -m benchmarks.bench` rewrites this file -->"
# The same line as written while the benchmark was ``vizapp.bench``: still found, and rewritten as NOTES_MARKER.
OLD_NOTES_MARKERS = ("<!-- hand-written notes below: kept when `python -m vizapp.bench` rewrites this file -->",)
TABLE_COLUMNS = (
    "model",
    "tokens N",
    "layers L",
    "heads H",
    "a ms",
    "b ms",
    "c ms",
    "d ms",
    "d max ms",
    "b/a",
    "b/a CPU time",
    "c/a",
    "d/a",
    "max fig JSON kB",
    "peak mem a MB",
    "peak mem b MB",
    "added MB",
    "repeats",
)


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}" if seconds < 10 else f"{seconds * 1e3:.0f}"


def table_rows(results: Sequence[ModelResult]) -> list[list[str]]:
    """One row per model, in :data:`TABLE_COLUMNS` order."""
    rows = []
    for res in results:
        a = res.med("a")
        rows.append(
            [
                res.spec.label,
                str(res.shape.tokens),
                str(res.shape.layers),
                str(res.shape.heads),
                ms(a),
                ms(res.med("b")),
                ms(res.med("c")),
                ms(res.d_median),
                ms(res.d_max),
                f"{res.med('b') / a:.3f}",
                f"{res.med('b_cpu') / res.med('a_cpu'):.3f}",
                f"{res.med('c') / a:.3f}",
                f"{res.d_median / a:.3f}",
                f"{max(res.fig_json.values(), default=0) / 1e3:.1f}",
                f"{res.mem_mb('a'):.1f}",
                f"{res.mem_mb('b'):.1f}",
                f"{res.added_mb:.1f}",
                str(res.repeats),
            ]
        )
    return rows


def _find(results: Sequence[ModelResult], name: str, **kwargs: Any) -> ModelResult | None:
    for res in results:
        if res.spec.name == name and all(dict(res.spec.kwargs).get(k) == v for k, v in kwargs.items()):
            return res
    return None


def evaluate_targets(
    results: Sequence[ModelResult], dataset: dict[str, Any] | None = None, device: str = "cpu"
) -> list[list[str]]:
    """[target, model, measured, met] for every target of the issues whose model was measured on ``device`` (the
    CPU targets of the first benchmark issue; on CUDA issue 13's b/a <= 1.2 for vit_base and ViT-L/384)."""
    base = _find(results, "vit_base_patch16_224")
    large = _find(results, "vit_large_patch16_384")
    reg = next((r for r in results if r.spec.name == "vit_large_patch14_reg4_dinov2" and r.shape.tokens >= 1000), None)
    rows: list[list[str]] = []

    def add(target: str, res: ModelResult | None, value: float, limit: float, fmt: str, strict: bool = False) -> None:
        if res is None or math.isnan(value):
            return
        ok = value < limit if strict else value <= limit
        rows.append([target, res.spec.label, fmt.format(value), "met" if ok else "**missed**"])

    if device == "cuda":
        for res in (base, large):
            if res:
                add("b/a <= 1.2 (GPU, batch 1)", res, res.med("b") / res.med("a"), 1.2, "{:.3f}")
        return rows
    if base:
        add("b/a <= 1.2 (CPU, batch 1)", base, base.med("b") / base.med("a"), 1.2, "{:.3f}")
        add("c <= 0.3 s", base, base.med("c"), 0.3, "{:.3f} s")
        add("each figure's JSON <= 1 MB", base, max(base.fig_json.values(), default=0) / MB, 1.0, "{:.3f} MB (largest)")
        add("d <= 100 ms (median of the changes)", base, base.d_median * 1e3, 100, "{:.1f} ms")
        add("d <= 100 ms (slowest change)", base, base.d_max * 1e3, 100, "{:.1f} ms")
    if large:
        add("b/a <= 1.15", large, large.med("b") / large.med("a"), 1.15, "{:.3f}")
        add("analysis adds < 200 MB over the bare forward", large, large.added_mb, 200, "{:.0f} MB", strict=True)
    if reg:
        add(
            f"{reg.shape.tokens}-token register model adds < 0.5 GB",
            reg,
            reg.added_mb / 1e3,
            0.5,
            "{:.2f} GB",
            strict=True,
        )
    if dataset and not math.isnan(dataset["ratio"]):
        ok = dataset["ratio"] >= 0.8
        rows.append(
            [
                "dataset mode throughput >= 0.8x a bare batched forward",
                dataset["model"],
                f"{dataset['ratio']:.3f}",
                "met" if ok else "**missed**",
            ]
        )
    return rows


METHOD_TEXT = """\
## Method

* Input: {image}, batch 1, model forward in {dtype} (vizapp's attention maths in fp32), device `{device}`.
* All stages of one model run in one process; each repeat runs (a) and (b) (order alternating between repeats),
  then (c) and (d), so load changes hit all stages alike. Times are medians over the repeats after {warmup} warm-up
  round(s); ratios are ratios of those medians (the medians of the per-repeat paired ratios are in the details).
  `b/a CPU time` is the same ratio of the process's CPU time (`time.process_time`, both threads): on a shared
  2-vCPU machine wall time also moves with what other tenants run, CPU time much less, so it separates vizapp's
  own cost from the noise. The targets are judged on wall time.
* (a) `vm.transform(photo)` + `vm.model(x)` under `torch.no_grad()`, timm's fused attention (SDPA).
* (b) `vizapp.analyze(vm, photo)` (forward with q/k capture and each layer's attention formed inside it, top-5,
  mean attention distance, head fusions, rollout)
  + `r.attention(last_layer)` (per-head CLS maps).
* (c) `views.render_all(r, pos_sim, Controls())` and `fig.to_json()` of every figure it returns (the query image is
  a numpy array: built, not serialised). `vm.pos_similarity()` is computed once per model outside the timing (see
  details).
* (d) build + `to_json` of the one figure that changes after a control change, from a copy of the analysis with its
  cache as `analyze` left it: rollout with head fusion `max`, the heads mosaic of another layer, the heads mosaic for
  a query patch. `d ms` is the median over the changes, `d max ms` the slowest change.
* Peak memory: (a) and (b) each in {mem_repeats} fresh subprocesses (median reported), a capture-only forward once
  (`python -m benchmarks.bench --_measure-mem STAGE MODEL`), peak minus the memory right after the model was loaded
  (CPU: `VmHWM` of `/proc/self/status` after resetting it via `/proc/self/clear_refs`, not `ru_maxrss`, which
  keeps the high-water mark of the forked parent across exec; CUDA:
  `torch.cuda.max_memory_allocated`). `added MB` = peak(b) − peak(a). 1 MB = 10⁶ bytes. The first forward in a
  fresh process also pays one-off allocations (library initialisation), which appear in both (a) and (b).
* Repeats: {repeats} per model, {small_repeats} for models whose forward is under {small_gmac:.0f} GMAC (their runs
  are short and their medians noisiest), {large_repeats} for models whose forward exceeds {large_gmac:.0f} GMAC (the
  ViT-L models), to keep the run short on this machine.
"""


def render_markdown(
    results: Sequence[ModelResult],
    info: dict[str, Any],
    args: argparse.Namespace,
    image_desc: str,
    wall_s: float,
    dataset: dict[str, Any] | None = None,
) -> str:
    """The markdown report."""
    lines = ["# vizapp benchmark: what the analysis costs on top of a bare ViT forward", ""]
    cmd = "python -m benchmarks.bench " + " ".join(args.argv) if args.argv else "python -m benchmarks.bench"
    lines += [
        (
            f"Generated by `{cmd}` in {wall_s / 60:.1f} min. Random weights (`pretrained=False`): timings and memory do "
            "not depend on the weights' values."
        ),
        "",
    ]
    lines += ["## Machine", ""] + md_table(["", ""], [[k, v] for k, v in info.items()]) + [""]
    lines += [
        METHOD_TEXT.format(
            image=image_desc,
            device=args.device,
            dtype=getattr(args, "dtype", "float32"),
            warmup=args.warmup,
            repeats=args.repeats,
            large_repeats=args.large_repeats,
            large_gmac=LARGE_MACS / 1e9,
            small_repeats=getattr(args, "small_repeats", args.repeats),
            small_gmac=SMALL_MACS / 1e9,
            mem_repeats=getattr(args, "mem_repeats", 1),
        )
    ]
    lines += ["## Results", ""] + md_table(TABLE_COLUMNS, table_rows(results)) + [""]
    target_rows = evaluate_targets(results, dataset, args.device)
    if target_rows:
        lines += ["## Targets from the issue", ""] + md_table(["target", "model", "measured", ""], target_rows) + [""]
    if dataset:
        lines += (
            [
                "## Dataset mode (`python -m vizapp.stats`)",
                "",
                (
                    f"`collect_stats` over {dataset['images']} PNG files (the photo and three flips/rotations), batches of "
                    f"{dataset['batch_size']} through its DataLoader; every batch is also run through a bare batched forward "
                    "(order alternating, the first batch a warm-up). Throughputs are over the forward passes only, "
                    "decoding excluded, as the target compares them."
                ),
                "",
            ]
            + md_table(
                ["model", "timed images", "analysis img/s", "bare forward img/s", "ratio", "end to end img/s"],
                [
                    [
                        dataset["model"],
                        str(dataset["timed_images"]),
                        f"{dataset['analysis_ips']:.2f}",
                        f"{dataset['bare_ips']:.2f}",
                        f"{dataset['ratio']:.3f}",
                        f"{dataset['end_to_end_ips']:.2f}",
                    ]
                ],
            )
            + [""]
        )
    lines += ["## Details", "", "### Figure JSON sizes (c), kB", ""]
    fig_names = sorted({k for res in results for k in res.fig_json})
    lines += md_table(
        ["model", *fig_names, "pos_similarity() once, ms"],
        [
            [
                res.spec.label,
                *(f"{res.fig_json[k] / 1e3:.1f}" if k in res.fig_json else "–" for k in fig_names),
                ms(res.pos_sim_s),
            ]
            for res in results
        ],
    ) + [""]
    lines += ["### Control changes (d), median ms", ""]
    change_rows = []
    for res in results:
        for k in res.change_keys:
            change_rows.append([res.spec.label, k[2:], ms(res.med(k)), ms(max(res.times[k]))])
    lines += md_table(["model", "change", "median ms", "max ms"], change_rows) + [""]
    lines += ["### Spread and paired ratios", ""]
    lines += md_table(
        ["model", "a min–max ms", "b min–max ms", "paired b/a (median)", "paired c/a", "c min–max ms"],
        [
            [
                res.spec.label,
                f"{ms(min(res.times['a']))}–{ms(max(res.times['a']))}",
                f"{ms(min(res.times['b']))}–{ms(max(res.times['b']))}",
                f"{res.paired_ratio('b'):.3f}",
                f"{res.paired_ratio('c'):.3f}",
                f"{ms(min(res.times['c']))}–{ms(max(res.times['c']))}",
            ]
            for res in results
        ],
    ) + [""]
    if any(res.mem for res in results):
        lines += [
            "### Memory decomposition",
            "",
            (
                "Medians over the fresh subprocesses, with the range: the peak RSS of the same run varies from process "
                "to process (with the address-space layout, i.e. where glibc's heap and mmap blocks land). `capture "
                "only`: a forward inside `AttentionCapture` with the capture kept alive (one run). `q/k storage held`: "
                "bytes of the distinct storages the captured q and k tensors keep alive; `q/k needed`: bytes of the q "
                "and k tensors themselves."
            ),
            "",
        ]
        lines += md_table(
            [
                "model",
                "peak a MB (range)",
                "peak b MB (range)",
                "peak capture-only MB",
                "q/k storage held MB",
                "q/k needed MB",
                "baseline RSS after load MB",
                "runs",
            ],
            [
                [
                    res.spec.label,
                    f"{res.mem_mb('a'):.1f} ({res.mem_range('a')})",
                    f"{res.mem_mb('b'):.1f} ({res.mem_range('b')})",
                    f"{res.mem_mb('cap'):.1f}",
                    f"{res.mem_field('cap', 'qk_storage_bytes') / MB:.1f}",
                    f"{res.mem_field('cap', 'qk_tensor_bytes') / MB:.1f}",
                    f"{res.mem_field('a', 'baseline_bytes') / MB:.0f}",
                    str(len(res.mem.get("b", []))),
                ]
                for res in results
                if res.mem
            ],
        ) + [""]
    if any(res.profile for res in results):
        lines += [
            "### Where the time of (b) goes (one cProfile'd run, cumulative ms per stage)",
            "",
            "cProfile adds some overhead to the Python-heavy parts. The stages do not overlap, except the 'of which' "
            "rows, which are parts of the forward (the replay row also holds its share of the chunk and statistics "
            "rows). Every stage names vizapp functions by their public names; a name the library lacks stops the "
            "run instead of showing 0.",
            "",
        ]
        stage_names = [k for k in next(res.profile for res in results if res.profile) if k != "total"]
        prof_rows = []
        for name in [*stage_names, "total"]:
            row = [name]
            for res in results:
                if res.profile:
                    v = res.profile.get(name, 0.0)
                    row.append(f"{ms(v)} ({100 * v / res.profile['total']:.0f} %)")
            prof_rows.append(row)
        lines += md_table(["stage", *[res.spec.label for res in results if res.profile]], prof_rows) + [""]
    lines += [COST_MODEL_TEXT]
    lines += [
        "### Predicted vs measured",
        "",
        (
            "Predicted extra time of (b) over (a) = extra GEMM MACs / the GEMM rate achieved by (a) + extra "
            "elementwise element-passes / the rate of a softmax over one attention chunk measured in the same "
            "process + the weights' bytes / the rate of the weights digest over 64 tensors of 8 MiB, measured in the "
            "same process (its share of the prediction in the digest column). Predicted added memory = q/k + kept "
            "means (or the joint) + 2 × the max/min cache (lists + `torch.stack`) + one chunk; "
            "the measured value is the median peak of (b) minus that of (a)."
        ),
        "",
    ]
    cm_rows = []
    for res in results:
        c = res.cost
        gemm_rate = c["forward_macs"] / res.med("a")
        digest_s = c["digest_bytes"] / res.digest_rate
        pred_s = c["extra_gemm_macs"] / gemm_rate + c["extra_elementwise"] / res.elem_rate + digest_s
        cm_rows.append(
            [
                res.spec.label,
                f"{c['forward_macs'] / 1e9:.2f}",
                f"{100 * c['forward_attn_macs'] / c['forward_macs']:.1f}",
                f"{gemm_rate / 1e9:.0f}",
                f"{c['extra_gemm_macs'] / 1e9:.2f}",
                f"{c['extra_elementwise'] / 1e6:.0f}",
                f"{res.elem_rate / 1e9:.2f}",
                f"{c['digest_bytes'] / MB:.0f}",
                f"{res.digest_rate / 1e9:.1f}",
                f"{ms(digest_s)} ms",
                f"{ms(pred_s)} ms ({100 * pred_s / res.med('a'):.1f} %)",
                f"{ms(res.med('b') - res.med('a'))} ms ({100 * (res.med('b') / res.med('a') - 1):.1f} %)",
                f"{c['qk_bytes'] / MB:.1f}",
                f"{c['fused_bytes'] / MB:.1f}",
                f"{int(c['chunk_heads'])}",
                f"{c['transient_bytes'] / MB:.1f}",
                f"{c['predicted_added_bytes'] / MB:.0f}",
                f"{res.added_mb:.0f}",
            ]
        )
    lines += md_table(
        [
            "model",
            "forward GMAC",
            "attention share %",
            "GEMM GMAC/s (a)",
            "extra GEMM GMAC",
            "extra elementwise M",
            "elementwise G/s",
            "weights MB (digest)",
            "digest GB/s",
            "digest ms",
            "predicted extra time",
            "measured extra time",
            "q/k MB (2LND)",
            "fusions kept MB",
            "chunk heads c",
            "chunk MB (c(N²+P²))",
            "predicted added MB",
            "measured added MB",
        ],
        cm_rows,
    ) + [""]
    lines += findings(results)
    return "\n".join(lines) + "\n"


def findings(results: Sequence[ModelResult]) -> list[str]:
    """Data-driven notes on where time and memory go, from this run's numbers."""
    out = ["## Findings from this run", ""]
    for res in results:
        notes = []
        held, need = res.mem_field("cap", "qk_storage_bytes") / MB, res.mem_field("cap", "qk_tensor_bytes") / MB
        if need > 0 and held > 1.2 * need:  # False for NaN
            notes.append(
                f"capture keeps {held:.0f} MB of storage alive for {need:.0f} MB of q/k "
                f"({held / need:.1f}x: the detached q/k views pin each layer's whole qkv output)"
            )
        if res.change_keys and res.d_max > 3 * res.d_median:
            slow = max(res.change_keys, key=res.med)
            notes.append(
                f"the slowest control change is '{slow[2:]}' ({ms(res.med(slow))} ms vs a median of "
                f"{ms(res.d_median)} ms)"
            )
        if res.profile:
            tot = res.profile["total"]
            top = sorted(((v, k) for k, v in res.profile.items() if k != "total"), reverse=True)[:3]
            notes.append("largest stages of (b): " + ", ".join(f"{k} {100 * v / tot:.0f} %" for v, k in top))
        if notes:
            out.append(f"* **{res.spec.label}**: " + "; ".join(notes) + ".")
    return out + [""]


def write_report(path: Path, report: str) -> None:
    """Write ``report`` to ``path``, keeping the hand-written notes below the marker of the file it replaces."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file():
        old = path.read_text(encoding="utf-8")
        for marker in (NOTES_MARKER, *OLD_NOTES_MARKERS):
            if marker in old:
                report += "\n" + NOTES_MARKER + old[old.index(marker) + len(marker) :]
                break
    path.write_text(report, encoding="utf-8")
