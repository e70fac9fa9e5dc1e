"""The evaluation job from arguments to report: list items, split into shards, run an engine, write the report."""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from vizapp.analysis.perturbation import PROTOCOLS
from vizapp.errors import VizappError
from vizapp.evaluate.engines import (
    Job,
    Progress,
    check_out_folder,
    done_shards,
    items_digest,
    lock_folder,
    prepare,
    run_local,
    run_ray,
    shards,
)
from vizapp.evaluate.worker import RANDOM, default_rollout_start_layer
from vizapp.user_statistics import for_workers, import_statistics, registered_beyond_built_ins

DEFAULT_METHODS = ("rollout", "grad_rollout", "relevance", "attention", "flow", RANDOM)


def parse_methods(text: str | list[str] | tuple[str, ...]) -> list[str]:
    """Method names from "a,b,c" (registry names, a windowed model's maps and "random"), checked; "" gives
    statistics only. Which of them the model offers is checked when it is loaded (:class:`Evaluator`)."""
    from vizapp import methods as registry
    from vizapp.swin_result import METHODS as WINDOW_METHODS

    names = [t.strip() for t in text.split(",")] if isinstance(text, str) else list(text)
    names = [n for n in names if n]
    for n in names:
        if n != RANDOM and n not in WINDOW_METHODS:
            registry.get(n)  # raises with the list of known names
    if len(set(names)) != len(names):
        raise VizappError(f"a method is listed twice in {names}")
    return names


def evaluate(
    data: str,
    out: str | Path,
    model: str = "bundled",
    methods: str | list[str] | tuple[str, ...] = DEFAULT_METHODS,
    steps: int = 10,
    seed: int = 0,
    shard_size: int = 64,
    limit: int | None = None,
    engine: str = "local",
    workers: int = 2,
    threads: int = 1,
    time_limit: float = 60.0,
    address: str | None = None,
    fmnist_dir: str | None = None,
    overwrite: bool = False,
    markdown_path: str | Path | None = None,
    command: str = "",
    progress: bool = True,
    crash_once: str = "",
    report_only: bool = False,
    shard_range: tuple[int, int] | None = None,
    batch_size: int = 32,
    pretrained: bool = True,
    protocol: str = "chefer2021",
    rollout_start_layer: int | None = None,
    prompts: Any = None,
    statistics_modules: Sequence[str] = (),
) -> dict[str, Any]:
    """Run (or resume) a job and write its report; returns the summary dict.

    Args:
        data: an ImageFolder tree, a flat image folder, or ``"fmnist-test"``.
        out: output folder (shards, results.csv, summary.*); rerunning with the same settings resumes.
        model: a name for :func:`vizapp.load_model`.
        methods: registry method names plus ``"random"`` (comma-separated or a list); empty: statistics only. A
            windowed model (Swin) offers its own maps, ``rollout``, ``flow``, ``grad_rollout``, ``relevance``,
            ``attnlrp``, ``legrad`` and ``last_layer`` (:data:`vizapp.swin_result.METHODS`), over its first stage's grid; any other is refused
            with the reason.
        steps: deletion/insertion curve steps (0 turns those curves off).
        seed: seed of the random baseline (each image's order depends only on this and its id).
        shard_size: images per shard file (the unit of resumption).
        batch_size: images per captured forward for the class scores and statistics (consecutive slices of each
            shard; part of the job: a batched forward may round differently, so it fixes the numbers).
        limit: evaluate only the first ``limit`` items.
        engine: "local" (this process) or "ray".
        workers: Ray actors (one model each). threads: torch threads per worker. time_limit: seconds per image.
        address: Ray cluster to join; None starts a local one.
        fmnist_dir: Fashion-MNIST folder for ``fmnist-test``.
        overwrite: discard earlier results in ``out`` instead of resuming. Such a run needs ``out`` alone: it fails at
            once while another run uses the folder, and other runs fail while it goes on (see
            :func:`~vizapp.evaluate.engines.lock_folder`).
        markdown_path: also write the Markdown summary there (e.g. docs/faithfulness.md).
        command: the command line recorded in the summary.
        progress: print progress lines on stderr.
        crash_once: test hook for the Ray engine (see :class:`~vizapp.evaluate.engines.RayAnalyser`).
        report_only: write the report from the shards already on disk (e.g. while a long run goes on) and stop; it
            takes no lock (it only reads shards, and each report file is replaced atomically).
        shard_range: (start, stop): run only shards start .. stop-1 of the job (to split one job between processes or
            machines sharing ``out``; the report covers every finished shard).
        pretrained: False: the model with random weights (timing a large model offline; part of the job).
        protocol: the perturbation test's protocol: "chefer2021" (the authors' pixel procedure, the default) or
            "patches" (vizapp's whole-patch variant); part of the job, recorded in every row and the summary.
        rollout_start_layer: the ``rollout`` method's first layer; None: 1 under "chefer2021" (the authors' rollout
            baseline), 0 under "patches". Part of the job.
        prompts: for a CLIP-like model, text prompts that are its classes (class folders named as the prompts); part
            of the job.
        statistics_modules: modules of the user's own whose import registers statistics (``--statistics``), imported
            here and, with the Ray engine, in every actor (:mod:`vizapp.user_statistics`); every statistic of the
            user's own registered when the job starts is part of the job.
    """
    from vizapp import methods as registry
    from vizapp.evaluate.dataset import list_items
    from vizapp.evaluate.report import method_labels, write_report

    if engine not in ("local", "ray"):
        raise VizappError(f"engine must be 'local' or 'ray', got {engine!r}")
    import_statistics(statistics_modules)
    own = registered_beyond_built_ins()
    shared = for_workers(statistics_modules) if engine == "ray" and own and not report_only else None
    if protocol not in PROTOCOLS:
        raise VizappError(f"protocol must be one of {list(PROTOCOLS)}, got {protocol!r}")
    if rollout_start_layer is None:
        rollout_start_layer = default_rollout_start_layer(protocol)
    if shard_size < 1 or batch_size < 1 or workers < 1 or threads < 1 or steps < 0 or time_limit <= 0:
        raise VizappError("shard_size, batch_size, workers and threads must be >= 1, steps >= 0 and time_limit > 0")
    names = parse_methods(methods)
    if prompts is not None:
        from vizapp.models.prompts import check_prompts

        prompts = check_prompts(prompts)
    out = Path(out)
    check_out_folder(out)
    t_load = time.perf_counter()
    from vizapp.evaluate.worker import Evaluator

    ev = Evaluator(
        model,
        names,
        steps=steps,
        seed=seed,
        time_limit=time_limit,
        threads=threads,
        pretrained=pretrained,
        protocol=protocol,
        rollout_start_layer=rollout_start_layer,
        prompts=prompts,
    )  # fails early
    load_s = time.perf_counter() - t_load
    notes = ev.notes()
    items = list_items(data, ev.labels, fmnist_dir)
    if limit is not None:
        items = items[: max(0, int(limit))]
    if not items:
        raise VizappError(f"{data}: nothing to evaluate")
    job = Job(
        data=str(data),
        model=model,
        methods=tuple(names),
        steps=steps,
        seed=seed,
        shard_size=shard_size,
        batch_size=batch_size,
        pretrained=pretrained,
        protocol=protocol,
        rollout_start_layer=int(rollout_start_layer),
        limit=limit,
        items_sha256=items_digest(items),
        num_items=len(items),
        prompts=prompts,
        statistics=tuple(own) or None,
    )
    # the lock before anything is written, so that a second run fails at once; a report alone only reads shards
    with nullcontext() if report_only else lock_folder(out, exclusive=overwrite):
        prepare(out, job, overwrite)
        parts = shards(items, shard_size)
        done = done_shards(out, len(parts))
        lo, hi = shard_range if shard_range is not None else (0, len(parts))
        todo = [k for k in range(max(0, lo), min(hi, len(parts))) if k not in done]
        already = sum(len(parts[k]) for k in done)
        if progress:
            msg = f"[evaluate] {len(items)} images in {len(parts)} shards; model loaded in {load_s:.1f} s"
            if done:
                msg += f"; resuming: {len(done)} shards ({already} images) already done in {out}"
            print(msg, file=sys.stderr, flush=True)
        bar = Progress(already + sum(len(parts[k]) for k in todo), already) if progress else None
        t0 = time.perf_counter()
        timing = None
        if report_only:
            pass
        elif engine == "local":
            run_local(job, items, out, todo, fmnist_dir=fmnist_dir, progress=bar, evaluator=ev)
        else:
            del ev
            timing = run_ray(
                job,
                items,
                out,
                todo,
                workers=workers,
                threads=threads,
                time_limit=time_limit,
                fmnist_dir=fmnist_dir,
                address=address,
                progress=bar,
                crash_once=crash_once,
                statistics=shared,
            )
        seconds = time.perf_counter() - t0
        if bar:
            bar.update(0, force=True)
        labels = method_labels({k: m.label for k, m in registry.METHODS.items()})
        summary = write_report(
            out,
            names,
            {**job.__dict__, "extra": {}},
            command or "python -m vizapp.evaluate ...",
            labels,
            Path(markdown_path) if markdown_path else None,
            notes,
        )
        summary["seconds"] = seconds
        summary["engine_timing"] = timing  # Ray: start-up and steady-state timing (see run_ray); None locally
        summary["images_run"] = 0 if report_only else sum(len(parts[k]) for k in todo)
        return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vizapp.evaluate",
        description=sys.modules["vizapp.evaluate"].__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("data", help="ImageFolder tree, flat image folder, or 'fmnist-test'")
    parser.add_argument(
        "--prompt",
        action="append",
        help="a text prompt as a class of a CLIP-like model (repeat it, one per class folder, named as the prompt)",
    )
    parser.add_argument("--model", default="bundled")
    parser.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help="comma-separated registry methods and 'random'; '' for statistics only",
    )
    parser.add_argument("--out", default="eval-out")
    parser.add_argument("--steps", type=int, default=10, help="deletion/insertion steps (0: off)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard-size", type=int, default=64)
    parser.add_argument(
        "--batch-size", type=int, default=32, help="images per forward for the statistics (slices of each shard)"
    )
    parser.add_argument("--random-weights", action="store_true", help="the model with random weights (timing)")
    parser.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        default="chefer2021",
        help="perturbation test: 'chefer2021' (default) removes the top int(f*H*W) pixels of the bilinearly "
        "upsampled map, as the authors' code does; 'patches' removes floor(f*P) whole patches (vizapp's variant)",
    )
    parser.add_argument(
        "--rollout-start-layer",
        type=int,
        default=None,
        help="first layer of the rollout maps (default: 1 under chefer2021, the authors' baseline; 0 under patches)",
    )
    parser.add_argument("--limit", type=int, default=None, help="only the first N images")
    parser.add_argument("--engine", choices=("local", "ray"), default="local")
    parser.add_argument("--workers", type=int, default=2, help="Ray actors")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--time-limit", type=float, default=60.0, help="seconds per image")
    parser.add_argument("--address", default=None, help="Ray cluster to join (default: start a local one)")
    parser.add_argument("--fmnist-dir", default=None)
    parser.add_argument("--overwrite", action="store_true", help="discard earlier results in --out")
    parser.add_argument("--markdown", default=None, help="also write the summary Markdown here")
    parser.add_argument("--report-only", action="store_true", help="only rebuild the report from finished shards")
    parser.add_argument("--shards", default=None, help="START:STOP: run only these shards of the job (share --out)")
    parser.add_argument(
        "--statistics",
        action="append",
        default=[],
        metavar="MODULE",
        help="a module of yours whose import registers statistics (repeatable; Ray's actors import it too)",
    )
    args = parser.parse_args(argv)
    given = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--report-only"]
    if "--shards" in given:  # the recorded command is the whole job's
        i = given.index("--shards")
        given = given[:i] + given[i + 2 :]
    command = "python -m vizapp.evaluate " + shlex.join(given)
    try:
        summary = evaluate(
            args.data,
            args.out,
            args.model,
            args.methods,
            args.steps,
            args.seed,
            args.shard_size,
            args.limit,
            args.engine,
            args.workers,
            args.threads,
            args.time_limit,
            args.address,
            args.fmnist_dir,
            args.overwrite,
            args.markdown,
            command,
            report_only=args.report_only,
            shard_range=tuple(int(v) for v in args.shards.split(":")) if args.shards else None,
            batch_size=args.batch_size,
            pretrained=not args.random_weights,
            protocol=args.protocol,
            rollout_start_layer=args.rollout_start_layer,
            prompts=args.prompt or None,
            statistics_modules=args.statistics,
        )
    except (VizappError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the disk, the folder's permissions: said in a line, never as a traceback
        print(f"error: {exc.strerror or exc}; check --out and the disk, then rerun the same command", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: finished shards are kept in {args.out}; rerun the same command to resume", file=sys.stderr)
        return 130
    st = summary["status"]
    print(
        f"{summary['evaluated']}/{summary['images']} images evaluated ({st}); {summary['images_run']} this run in "
        f"{summary['seconds']:.1f} s; results in {args.out}/results.csv, summary in {args.out}/summary.md"
    )
    fell = summary.get("fallbacks") or {}
    if fell:
        print(
            f"warning: a batch ran again one image at a time {sum(fell.values())} time(s) (right rows, at the "
            f"one-image rate); see {args.out}/summary.md",
            file=sys.stderr,
        )
    graphs = summary.get("graph_failures") or []
    if graphs:
        print(
            f"warning: {len(graphs)} CUDA graph recording(s) failed or fell back (right rows, slower); see "
            f"{args.out}/summary.md",
            file=sys.stderr,
        )
    return 0
