"""Run an evaluation job: split it into shards, evaluate each shard (locally or on Ray), keep each shard on disk.

A job is the item list plus its settings. It is split into fixed shards of ``shard_size`` items in item order;
shard ``k`` is written to ``OUT/shards/shard-00007.json`` atomically (temporary file + rename) once all its images
are done, so a killed run loses at most the shards in flight, and a rerun with the same settings skips every shard
already on disk. ``OUT/job.json`` records the settings; a rerun with different ones stops with a clear message
instead of mixing results. A run holds an advisory lock on ``OUT/.lock`` (:func:`lock_folder`): runs of one job may
share a folder (``--shards`` splits), but a run with ``--overwrite`` needs it alone, so two runs can never mix their
rows. Every file is written atomically, and a write that fails (a full disk) leaves no temporary file behind.
"""

from __future__ import annotations

import collections
import errno
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vizapp.errors import VizappError

JOB_FILE = "job.json"
SHARD_DIR = "shards"
LOCK_FILE = ".lock"


class JobError(VizappError):
    """The output folder holds a different job, or the job cannot run as asked."""


@dataclass(frozen=True)
class Job:
    """The settings that determine every number of a job (engine, workers and threads do not)."""

    data: str
    model: str
    methods: tuple[str, ...]
    steps: int = 10
    seed: int = 0
    shard_size: int = 64
    batch_size: int = 32
    pretrained: bool = True
    protocol: str = "chefer2021"
    rollout_start_layer: int = 1
    limit: int | None = None
    items_sha256: str = ""
    num_items: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    #: a CLIP-like model's text prompts as its classes (None: the model's own classes)
    prompts: tuple[str, ...] | None = None
    #: the statistics of the user's own registered for the job (None: the built-in ones only): they are columns of
    #: its rows, so a folder made with them does not resume without them, nor the other way round
    statistics: tuple[str, ...] | None = None

    def evaluator_kwargs(self) -> dict[str, Any]:
        return {
            "prompts": self.prompts,
            "model": self.model,
            "methods": list(self.methods),
            "steps": self.steps,
            "seed": self.seed,
            "pretrained": self.pretrained,
            "protocol": self.protocol,
            "rollout_start_layer": self.rollout_start_layer,
        }


def items_digest(items: Sequence[dict[str, Any]]) -> str:
    """SHA-256 of the item list, to refuse resuming a job over different data."""
    h = hashlib.sha256()
    for it in items:
        h.update(json.dumps([it["id"], it["source"], it["target"]]).encode())
    return h.hexdigest()


def shard_path(out: Path, k: int) -> Path:
    return out / SHARD_DIR / f"shard-{k:05d}.json"


def shards(items: Sequence[dict[str, Any]], shard_size: int) -> list[list[dict[str, Any]]]:
    """Consecutive slices of ``shard_size`` items (the last may be shorter)."""
    return [list(items[i : i + shard_size]) for i in range(0, len(items), shard_size)]


def batches(shard: Sequence[dict[str, Any]], batch_size: int) -> list[list[dict[str, Any]]]:
    """A shard's batches, one captured forward each: consecutive slices of ``batch_size`` items (the last may be
    shorter). Both engines cut every shard this way, so an image is forwarded with the same neighbours whatever the
    engine, and its row is the same to the last bit."""
    return [list(shard[i : i + batch_size]) for i in range(0, len(shard), batch_size)]


def check_out_folder(out: Path) -> None:
    """Refuse an output path that exists and is not a folder (a file, say), before anything is loaded."""
    if out.exists() and not out.is_dir():
        raise JobError(f"--out {out.name!r} is a file, not a folder; pass a folder (it is created if missing)")


@contextmanager
def lock_folder(out: Path, exclusive: bool) -> Iterator[None]:
    """Hold an advisory lock (``fcntl.flock``) on ``out`` for a ``with`` block: shared for a run that resumes or adds
    shards of the folder's job (several may run at once, e.g. ``--shards`` splits), exclusive for ``--overwrite``,
    which deletes the folder's shards. A run that cannot have its lock fails at once.

    Raises:
        JobError: another run holds the folder in a way that excludes this one.
    """
    import fcntl

    check_out_folder(out)
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            why = "this run's --overwrite needs it alone" if exclusive else "that run has it alone (--overwrite)"
            raise JobError(
                f"another evaluation is running in --out {out.name!r} ({why}); wait for it to finish, or pass "
                "another --out"
            ) from None
        yield
    finally:
        os.close(fd)  # releases the lock


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: a reader sees the whole file or the old one,
    and a failed write (a full disk) removes its temporary file.

    Raises:
        JobError: the file could not be written (the message says why, e.g. the disk is full, and what to do).
    """
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
            why = "the disk is full" if full else (exc.strerror or type(exc).__name__).lower()
            raise JobError(
                f"could not write {path.name}: {why}; free some space (or fix the folder) and rerun the same command: "
                "finished shards are kept"
            ) from exc
        raise


def prepare(out: Path, job: Job, overwrite: bool = False) -> None:
    """Create ``out``, or check that it holds the same job (to resume it)."""
    check_out_folder(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / SHARD_DIR).mkdir(exist_ok=True)
    path = out / JOB_FILE
    mine = asdict(job)
    for optional in ("prompts", "statistics"):  # a job without them is written as before they existed (and resumes)
        if mine[optional] is None:
            del mine[optional]
    if path.exists() and not overwrite:
        try:
            theirs = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise JobError(
                f"{JOB_FILE} in --out {out.name!r} cannot be read (cut short or corrupt); rerun with --overwrite to "
                "start this folder afresh, or pass another --out"
            ) from exc
        if not isinstance(theirs, dict):
            raise JobError(
                f"{JOB_FILE} in --out {out.name!r} is not a job's settings; rerun with --overwrite to start this "
                "folder afresh, or pass another --out"
            )
        if theirs != json.loads(json.dumps(mine)):
            diff = sorted(k for k in {*mine, *theirs} if json.dumps(mine.get(k)) != json.dumps(theirs.get(k)))
            raise JobError(
                f"{out} holds results of a different job (differs in: {', '.join(diff)}); pass another --out, or "
                "--overwrite to discard them"
            )
        return
    if overwrite:
        for p in (out / SHARD_DIR).glob("shard-*.json"):
            p.unlink()
    write_atomic(path, json.dumps(mine, indent=1))


def write_shard(
    out: Path,
    k: int,
    rows: list[dict[str, Any]],
    seconds: float,
    worker: str,
    record: dict[str, Any] | None = None,
) -> None:
    """Write shard ``k`` atomically: a reader sees the whole shard or none of it. ``record``: what went slower than
    it should while its rows were made (:func:`batch_record`; kept only when there was any)."""
    record = record or {}
    d: dict[str, Any] = {"shard": k, "seconds": seconds, "worker": worker}
    d |= {key: record[key] for key in RECORD_KEYS if record.get(key)}
    write_atomic(shard_path(out, k), json.dumps(d | {"rows": rows}))


RECORD_KEYS = ("fallbacks", "fallback_sites", "graph_failures")
"""What a shard file (and summary.json) keeps of the slow paths its rows took: the batches that ran again one image at
a time, by stage and error (:meth:`~vizapp.evaluate.worker.Evaluator.fell_back`); where vizapp met each of those
errors (:func:`vizapp.errors.raised_at`); and the CUDA graphs that could not be recorded, whose passes ran eagerly
(:meth:`vizapp.models.VizModel.graph_failures`). Each is right in its rows, only slower."""


def batch_record(ev: Any, before: collections.Counter[str]) -> dict[str, Any]:
    """What ``ev`` recorded (see :data:`RECORD_KEYS`) since its fallback counter was ``before`` (a copy of
    :attr:`Evaluator.fallbacks`): the new fallbacks with their sites, and the model's failed graphs so far."""
    fell = dict(ev.fallbacks - before)
    return {
        "fallbacks": dict(sorted(fell.items())),
        "fallback_sites": {why: ev.fallback_sites[why] for why in sorted(fell) if why in ev.fallback_sites},
        "graph_failures": ev.vm.graph_failures(),
    }


def merge_records(records: Iterable[dict[str, Any] | None]) -> dict[str, Any]:
    """Records (:func:`batch_record`, or shard files) as one: fallbacks summed, each cause's first site, each failed
    graph once, in the order first met."""
    fell: collections.Counter[str] = collections.Counter()
    sites: dict[str, str] = {}
    graphs: dict[str, None] = {}
    for r in records:
        r = r or {}
        fell.update(r.get("fallbacks") or {})
        for why, site in (r.get("fallback_sites") or {}).items():
            sites.setdefault(why, site)
        graphs.update(dict.fromkeys(r.get("graph_failures") or ()))
    return {
        "fallbacks": dict(sorted(fell.items())),
        "fallback_sites": dict(sorted(sites.items())),
        "graph_failures": list(graphs),
    }


def read_shard(out: Path, k: int) -> dict[str, Any] | None:
    """Shard ``k`` of ``out`` as written by :func:`write_shard`, or None when it is missing, torn or not shard ``k``
    (a file copied or renamed into the folder)."""
    try:
        d = json.loads(shard_path(out, k).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(d, dict) or d.get("shard") != k or not isinstance(d.get("rows"), list):
        return None
    return d


def done_shards(out: Path, count: int) -> set[int]:
    """Shards already on disk and readable (a torn or foreign file is redone)."""
    return {k for k in range(count) if read_shard(out, k) is not None}


class Progress:
    """Plain stderr progress lines: images done, images/s and ETA (at most one line every ``every`` seconds, and
    never the same count twice: a forced line after the last shard's says nothing new)."""

    def __init__(self, total: int, already: int = 0, every: float = 5.0, stream: Any = None) -> None:
        self.total, self.done, self.start_done = total, already, already
        self.every, self.stream = every, stream or sys.stderr
        self.t0 = self.last = time.perf_counter()
        self.shown: int | None = None  # the count of the last line printed

    def update(self, n: int, force: bool = False) -> None:
        self.done += n
        now = time.perf_counter()
        if (not force and now - self.last < self.every) or self.done == self.shown:
            return
        self.last, self.shown = now, self.done
        rate = (self.done - self.start_done) / max(now - self.t0, 1e-9)
        left = self.total - self.done
        eta = f"{left / rate:.0f} s" if rate > 0 else "?"
        print(f"[evaluate] {self.done}/{self.total} images  {rate:.2f} img/s  ETA {eta}", file=self.stream, flush=True)


def _load(item: dict[str, Any], fmnist_dir: str | None) -> tuple[Any, str | None]:
    """(RGB pixels, None), or (None, why the file cannot be used)."""
    from vizapp.errors import BadImageError
    from vizapp.evaluate.dataset import load_pixels

    try:
        return load_pixels(item, fmnist_dir), None
    except BadImageError as exc:
        return None, str(exc) or "bad image"


def _evaluate_shard(
    ev: Any, shard: list[dict[str, Any]], fmnist_dir: str | None, batch_size: int
) -> list[dict[str, Any]]:
    rows = []
    for part in batches(shard, batch_size):
        loaded = [_load(item, fmnist_dir) for item in part]
        rows += ev.evaluate_batch(part, [px for px, _ in loaded], [err for _, err in loaded])
    return rows


def run_local(
    job: Job,
    items: Sequence[dict[str, Any]],
    out: Path,
    todo: Iterable[int],
    threads: int = 1,
    time_limit: float = 60.0,
    fmnist_dir: str | None = None,
    progress: Progress | None = None,
    evaluator: Any = None,
) -> None:
    """Evaluate the shards ``todo`` in this process with one model, writing each shard as soon as it is done."""
    from vizapp.evaluate.worker import Evaluator

    ev = evaluator or Evaluator(**job.evaluator_kwargs(), threads=threads, time_limit=time_limit)
    parts = shards(items, job.shard_size)
    for k in todo:
        t0 = time.perf_counter()
        before = collections.Counter(ev.fallbacks)
        rows = _evaluate_shard(ev, parts[k], fmnist_dir, job.batch_size)
        write_shard(out, k, rows, time.perf_counter() - t0, f"local:{os.getpid()}", batch_record(ev, before))
        if progress:
            progress.update(len(rows))


# -- Ray --------------------------------------------------------------------------------------------------------------


def _decode(row: dict[str, Any]) -> dict[str, Any]:
    """Ray task: decode the files of one batch (size-limited, safe) into RGB pixels, one byte string for the whole
    batch, and record why a file cannot be used."""
    loaded = [_load(item, row["fmnist_dir"] or None) for item in json.loads(row["items"])]
    return {
        "shard": row["shard"],
        "items": row["items"],
        "pixels": b"".join(px.tobytes() for px, _ in loaded if px is not None),
        "shapes": json.dumps([None if px is None else list(px.shape) for px, _ in loaded]),
        "errors": json.dumps([err for _, err in loaded]),
    }


def _unpack(data: bytes, shapes: list[list[int] | None]) -> list[Any]:
    """The images :func:`_decode` packed into one byte string (None where a file was bad)."""
    import numpy as np

    out, lo = [], 0
    for shape in shapes:
        if shape is None:
            out.append(None)
            continue
        n = int(np.prod(shape))
        out.append(np.frombuffer(data, dtype=np.uint8, count=n, offset=lo).reshape(shape).copy())
        lo += n
    return out


class RayAnalyser:
    """Ray actor (``map_batches`` callable class): one model per actor; each input row is one evaluation batch of
    decoded images (see :func:`batches`), each output row one image's result; the first row of each evaluation batch
    also carries the batch's record of slow paths (JSON, :func:`batch_record`), the others "".

    ``crash_once`` (tests only) is ``"MARKER_PATH:ITEM_ID"``: the first actor to reach that item creates the marker
    and kills its own process, as a lost worker would; Ray restarts the actor and retries the batch.
    """

    def __init__(
        self,
        kwargs: dict[str, Any],
        threads: int,
        time_limit: float,
        crash_once: str = "",
        statistics: dict[str, list[str]] | None = None,
    ) -> None:
        from vizapp.evaluate.worker import Evaluator
        from vizapp.user_statistics import in_worker

        if statistics:  # the user's own, as the driver registered them (vizapp.user_statistics.for_workers)
            in_worker(statistics)

        self.ev = Evaluator(**kwargs, threads=threads, time_limit=time_limit)
        self.crash_once = crash_once

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        t0 = time.perf_counter()
        shards, rows, records = [], [], []
        for k, items_json, data, shapes, errors in zip(
            batch["shard"], batch["items"], batch["pixels"], batch["shapes"], batch["errors"], strict=True
        ):
            items = json.loads(items_json)
            if self.crash_once:
                marker, crash_id = self.crash_once.rsplit(":", 1) if ":" in self.crash_once else ("", "")
                if any(it["id"] == crash_id for it in items) and marker and not os.path.exists(marker):
                    Path(marker).write_text(str(os.getpid()))
                    os._exit(1)
            pixels = _unpack(bytes(data), json.loads(shapes))
            before = collections.Counter(self.ev.fallbacks)
            for i, row in enumerate(self.ev.evaluate_batch(items, pixels, json.loads(errors))):
                shards.append(int(k))
                rows.append(json.dumps(row))
                records.append(json.dumps(batch_record(self.ev, before)) if i == 0 else "")
        busy = (time.perf_counter() - t0) / max(1, len(rows))  # this call's seconds, shared out over its rows
        return {
            "shard": np.asarray(shards, dtype=np.int64),
            "row": np.asarray(rows, dtype=object),
            "fell_back": np.asarray(records, dtype=object),
            "busy": np.full(len(rows), busy),
        }


def init_ray(address: str | None = None, num_cpus: int = 2) -> None:
    """Join the cluster at ``address``, or start a local one with ``num_cpus`` CPUs; workers can import vizapp."""
    import ray

    pkg_root = str(Path(__file__).resolve().parents[2])
    env = {"PYTHONPATH": os.pathsep.join(p for p in (pkg_root, os.environ.get("PYTHONPATH", "")) if p)}
    if address:
        ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=False)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, runtime_env={"env_vars": env}, log_to_driver=False)


def local_cluster_cpus(workers: int) -> int:
    """Logical CPUs of a local cluster: one per actor plus one slot for the decode tasks (without it the actors
    hold every CPU and the decode tasks feeding them never get scheduled)."""
    return workers + 1


class ShardWriter:
    """The Ray driver's side of the actors' output (:class:`RayAnalyser`): rows come back in item order, and shard
    ``k`` is written (with its batches' records merged, :func:`merge_records`) once all of its ``need[k]`` rows are
    in."""

    def __init__(self, out: Path, need: dict[int, int], progress: Progress | None = None) -> None:
        self.out, self.need, self.progress = out, need, progress
        self.rows: dict[int, list[dict[str, Any]]] = {k: [] for k in need}
        self.records: dict[int, list[dict[str, Any]]] = {k: [] for k in need}
        self.t0: dict[int, float] = {}

    def add(self, batch: dict[str, Any]) -> None:
        """Takes a batch of the actors' output rows (columns ``shard``, ``row``, ``fell_back``)."""
        for k, row, record in zip(batch["shard"], batch["row"], batch["fell_back"], strict=True):
            k = int(k)
            self.t0.setdefault(k, time.perf_counter())
            self.rows[k].append(json.loads(row))
            if record:
                self.records[k].append(json.loads(record))
            if len(self.rows[k]) == self.need[k]:
                seconds = time.perf_counter() - self.t0[k]
                write_shard(self.out, k, self.rows.pop(k), seconds, "ray", merge_records(self.records.pop(k)))
                if self.progress:
                    self.progress.update(self.need[k])


def run_ray(
    job: Job,
    items: Sequence[dict[str, Any]],
    out: Path,
    todo: Iterable[int],
    workers: int = 2,
    threads: int = 1,
    time_limit: float = 60.0,
    fmnist_dir: str | None = None,
    address: str | None = None,
    progress: Progress | None = None,
    crash_once: str = "",
    log: Callable[[str], None] | None = None,
    statistics: dict[str, list[str]] | None = None,
) -> dict[str, float] | None:
    """Evaluate the shards ``todo`` with Ray Data: item list -> decode tasks -> actor pool -> shard files.

    Args:
        workers: actors in the pool (each holds one model); a GPU each when the cluster has GPUs.
        address: a Ray cluster to join ("auto", "ray://host:10001", ...); None starts a local one with ``workers``
            CPUs.

    One Ray row per evaluation batch (:func:`batches` of each shard, ``job.batch_size`` items, as the local engine
    cuts them): a decode task decodes the batch, an actor evaluates it in one call (a lost actor's batch is retried,
    so that is the work redone on failure) and returns one row per image.

    Returns the job's timing (None when there was nothing to do): ``wall_s``, the call's seconds; ``first_s``, from
    the call to the first rows reaching the driver (cluster start when this call starts one, actor start-up and model
    loading, the first batches' work); ``busy_s``, the seconds the actors spent evaluating, summed over actors (what
    the local engine would spend; the rest of ``wall_s`` × workers is Ray's overhead and idle actors).
    """
    import ray

    call_start = time.perf_counter()
    started = False
    if not ray.is_initialized():
        init_ray(address, local_cluster_cpus(workers))
        started = True
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True
        ctx.enable_progress_bars = False
        parts = shards(items, job.shard_size)
        todo = sorted(todo)
        rows_in = [
            {"shard": k, "items": json.dumps(part), "fmnist_dir": fmnist_dir or ""}
            for k in todo
            for part in batches(parts[k], job.batch_size)
        ]
        if not rows_in:
            return None
        gpus = float(ray.cluster_resources().get("GPU", 0))
        ds = ray.data.from_items(rows_in, override_num_blocks=len(rows_in))  # a block a batch
        ds = ds.map(_decode, num_cpus=0.25)
        ds = ds.map_batches(
            RayAnalyser,
            fn_constructor_kwargs={
                "kwargs": job.evaluator_kwargs(),
                "threads": threads,
                "time_limit": time_limit,
                "crash_once": crash_once,
                "statistics": statistics,
            },
            batch_size=1,  # one evaluation batch per call
            compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=1,
            num_gpus=min(1.0, gpus / workers) if gpus else 0,  # a GPU per actor, or a share when fewer GPUs
            # A lost actor is restarted and its batch retried: Ray Data's actor pool defaults to max_restarts=-1 and
            # max_task_retries=-1 (passing them here is deprecated since Ray 2.60; tests kill a worker to check).
        )
        shards_out = ShardWriter(out, {k: len(parts[k]) for k in todo}, progress)
        first = None
        busy = 0.0
        for batch in ds.iter_batches(batch_size=job.batch_size, batch_format="numpy"):
            if first is None:
                first = time.perf_counter()
            busy += float(batch["busy"].sum())
            shards_out.add(batch)
        if first is None:
            return None
        return {"wall_s": time.perf_counter() - call_start, "first_s": first - call_start, "busy_s": busy}
    finally:
        if started:
            ray.shutdown()
