"""Load test: many concurrent gradio_client users against a server on 127.0.0.1, checking for cross-talk.

``python -m benchmarks.loadtest [--requests 200] [--clients 8] [--model bundled]`` (from the repository root) starts
``app.py`` in a subprocess on a free loopback port, computes each image's single-user result first, then sends the
requests from concurrent clients (each with distinct images) and checks that every response equals the single-user
result for its image. It reports errors, p50/p95 latency and the server's RSS after warm-up and at the end. Bounded
in count and time; loopback only.

``python -m benchmarks.loadtest --retention [--visitors 25] [--model vit_tiny_patch16_384 --random-weights]`` is the
retention run instead: one-shot visitors each analyse one image and leave (their client closes, so the page's
heartbeat connection drops and gradio ends the session); it reports the server's RSS before the first visitor, just
after the last left, and ``--settle`` (30) seconds later, and how many results the server freed when sessions ended
(from its log). ``--results-bytes`` sets the server's VIZAPP_MAX_RESULTS_BYTES; ``--app-dir`` serves another checkout's
``app.py`` (to measure a version before a change).
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from vizapp.ui.outputs import AnalyzeOutputs, from_api
from vizapp.ui.serving import free_port

REPO = Path(__file__).resolve().parent.parent


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def make_images(folder: Path, count: int, seed: int = 0) -> list[str]:
    """Distinct images: a light blob at a different place and size in each, on a dark noisy background."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        h, w = 64 + 8 * (i % 5), 64 + 8 * (i % 3)
        img = rng.integers(0, 40, (h, w, 3)).astype(np.uint8)
        cy, cx, r = rng.integers(10, h - 10), rng.integers(10, w - 10), rng.integers(6, 20)
        yy, xx = np.mgrid[0:h, 0:w]
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.integers(150, 256, 3)
        path = folder / f"load_{i:03d}.png"
        Image.fromarray(img).save(path)
        paths.append(str(path))
    return paths


def _key(result: tuple) -> dict:
    summary = from_api(AnalyzeOutputs, result)["summary"]
    return {
        "top_k": [(d["label"], d["probability"]) for d in summary["top_k"]],
        "mean_distance": np.asarray(summary["mean_distance_px"], dtype=np.float64),
        "rollout": np.asarray(summary["rollout_mean"], dtype=np.float64),
    }


def _same(a: dict, b: dict, atol: float = 1e-5) -> bool:
    return (
        [lbl for lbl, _ in a["top_k"]] == [lbl for lbl, _ in b["top_k"]]
        and np.allclose([p for _, p in a["top_k"]], [p for _, p in b["top_k"]], atol=atol)
        and np.allclose(a["mean_distance"], b["mean_distance"], atol=1e-3)  # summary rounds to 3 decimals
        and np.allclose(a["rollout"], b["rollout"], atol=atol)
    )


@dataclass
class LoadReport:
    requests: int
    clients: int
    errors: list[str] = field(default_factory=list)
    mismatches: int = 0
    latencies: list[float] = field(default_factory=list)
    rss_warm_mb: float = float("nan")
    rss_end_mb: float = float("nan")
    wall_s: float = 0.0

    @property
    def p50(self) -> float:
        return statistics.median(self.latencies) if self.latencies else float("nan")

    @property
    def p95(self) -> float:
        return float(np.percentile(self.latencies, 95)) if self.latencies else float("nan")

    def table(self) -> str:
        return (
            "| requests | clients | errors | mismatches | p50 s | p95 s | wall s | RSS after warm-up MB | RSS end MB |\n"
            "|---|---|---|---|---|---|---|---|---|\n"
            f"| {self.requests} | {self.clients} | {len(self.errors)} | {self.mismatches} | {self.p50:.3f} | "
            f"{self.p95:.3f} | {self.wall_s:.1f} | {self.rss_warm_mb:.0f} | {self.rss_end_mb:.0f} |"
        )


def start_server(
    model: str,
    port: int,
    concurrency: int = 2,
    log_path: str | None = None,
    extra_env: dict[str, str] | None = None,
    app_dir: Path = REPO,
) -> subprocess.Popen:
    env = dict(os.environ, VIZAPP_CONCURRENCY=str(concurrency), GRADIO_ANALYTICS_ENABLED="False", **(extra_env or {}))
    log = open(log_path or os.devnull, "w")  # noqa: SIM115 - lives as long as the server
    proc = subprocess.Popen(
        [sys.executable, str(app_dir / "app.py"), "--model", model, "--host", "127.0.0.1", "--port", str(port)],
        cwd=app_dir,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode}; see {log_path}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("server did not start within 120 s")


def run(
    model: str, requests: int = 200, clients: int = 8, images: int = 16, concurrency: int = 2, timeout_s: float = 900.0
) -> LoadReport:
    """Run the load test and return its report (raises nothing for request errors: they are counted)."""
    from gradio_client import Client, handle_file

    report = LoadReport(requests=requests, clients=clients)
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="vizapp-load-") as tmp:
        paths = make_images(Path(tmp), images)
        server = start_server(model, port, concurrency, log_path=str(Path(tmp) / "server.log"))
        try:
            url = f"http://127.0.0.1:{port}/"
            single = Client(url, verbose=False)
            expected = {p: _key(single.predict(handle_file(p), model, api_name="/analyze")) for p in paths}
            report.rss_warm_mb = _rss_mb(server.pid)
            lock = threading.Lock()
            counter = iter(range(requests))
            t_end = time.monotonic() + timeout_s

            def worker(cid: int) -> None:
                client = Client(url, verbose=False)
                # Each client sends its own subset of images, so concurrent requests carry distinct inputs.
                mine = [p for i, p in enumerate(paths) if i % clients == cid] or paths
                j = 0
                while time.monotonic() < t_end:
                    with lock:
                        n = next(counter, None)
                    if n is None:
                        return
                    path = mine[j % len(mine)]
                    j += 1
                    t0 = time.perf_counter()
                    try:
                        got = _key(client.predict(handle_file(path), model, api_name="/analyze"))
                    except Exception as e:  # noqa: BLE001 - every failure is counted and reported
                        with lock:
                            report.errors.append(f"{type(e).__name__}: {str(e)[:200]}")
                        continue
                    dt = time.perf_counter() - t0
                    with lock:
                        report.latencies.append(dt)
                        report.mismatches += not _same(got, expected[path])

            t0 = time.perf_counter()
            threads = [threading.Thread(target=worker, args=(c,)) for c in range(clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            report.wall_s = time.perf_counter() - t0
            report.rss_end_mb = _rss_mb(server.pid)
        finally:
            server.terminate()
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                server.kill()
    return report


@dataclass
class RetentionReport:
    visitors: int
    model: str
    results_bytes: str
    rss_before_mb: float = float("nan")
    rss_after_mb: float = float("nan")
    rss_settled_mb: float = float("nan")
    settle_s: float = 30.0
    freed: int = 0  # results the server said it freed when a session ended
    errors: list[str] = field(default_factory=list)

    def table(self) -> str:
        return (
            f"| visitors | model | results budget | RSS before MB | RSS after MB | RSS {self.settle_s:.0f} s later MB | "
            "kept after settling MB | results freed at session end | errors |\n"
            "|---|---|---|---|---|---|---|---|---|\n"
            f"| {self.visitors} | {self.model} | {self.results_bytes} | {self.rss_before_mb:.0f} | "
            f"{self.rss_after_mb:.0f} | {self.rss_settled_mb:.0f} | {self.rss_settled_mb - self.rss_before_mb:+.0f} | "
            f"{self.freed} | {len(self.errors)} |"
        )


def retention(
    model: str,
    visitors: int = 25,
    settle_s: float = 30.0,
    random_weights: bool = False,
    results_bytes: str | None = None,
    app_dir: Path = REPO,
) -> RetentionReport:
    """One-shot visitors analyse one image each and leave; the server's RSS before, after and ``settle_s`` later."""
    from gradio_client import Client, handle_file

    report = RetentionReport(visitors, model, results_bytes or "default", settle_s=settle_s)
    env = {"VIZAPP_MAX_RESULTS_BYTES": results_bytes} if results_bytes else {}
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="vizapp-retention-") as tmp:
        paths = make_images(Path(tmp), visitors + 1)
        log_path = Path(tmp) / "server.log"
        server = start_server(model, port, 1, log_path=str(log_path), extra_env=env, app_dir=app_dir)
        url = f"http://127.0.0.1:{port}/"

        def visit(path: str) -> None:
            client = Client(url, verbose=False)
            try:
                client.predict(handle_file(path), model, random_weights=random_weights, api_name="/analyze")
            except Exception as e:  # noqa: BLE001 - counted and reported
                report.errors.append(f"{type(e).__name__}: {str(e)[:200]}")
            finally:
                client.close()  # the visitor leaves: the heartbeat stream ends within one heartbeat (15 s)

        try:
            visit(paths[-1])  # warm-up: the model loaded and one visitor come and gone
            time.sleep(settle_s)
            report.rss_before_mb = _rss_mb(server.pid)
            for path in paths[:visitors]:
                visit(path)
            report.rss_after_mb = _rss_mb(server.pid)
            time.sleep(settle_s)
            report.rss_settled_mb = _rss_mb(server.pid)
        finally:
            server.terminate()
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                server.kill()
        freed = re.findall(r"session ended: (\d+) kept result", log_path.read_text(errors="replace"))
        report.freed = sum(int(n) for n in freed)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bundled")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=2, help="the server queue's concurrency limit")
    parser.add_argument("--max-rss-growth-mb", type=float, default=150.0)
    parser.add_argument("--out", default=None, help="also write the table to this markdown file")
    parser.add_argument("--retention", action="store_true", help="the one-shot visitors' retention run instead")
    parser.add_argument("--visitors", type=int, default=25)
    parser.add_argument("--settle", type=float, default=30.0, help="seconds to wait before the last RSS reading")
    parser.add_argument("--random-weights", action="store_true", help="analyse the architecture with random weights")
    parser.add_argument("--results-bytes", default=None, help="the server's VIZAPP_MAX_RESULTS_BYTES")
    parser.add_argument("--app-dir", default=str(REPO), help="the checkout whose app.py is served")
    args = parser.parse_args(argv)
    if args.retention:
        kept = retention(
            args.model, args.visitors, args.settle, args.random_weights, args.results_bytes, Path(args.app_dir)
        )
        print(kept.table())
        for e in kept.errors[:5]:
            print("error:", e)
        if args.out:
            with open(args.out, "a", encoding="utf-8") as f:
                f.write(
                    f"\n`python -m benchmarks.loadtest --retention --model {args.model} --visitors {args.visitors}"
                    f"{' --random-weights' if args.random_weights else ''}` on {os.cpu_count()} cores, "
                    f"{time.strftime('%Y-%m-%d')}:\n\n{kept.table()}\n"
                )
        return 0 if not kept.errors else 1
    report = run(args.model, args.requests, args.clients, args.images, args.concurrency)
    table = report.table()
    print(table)
    for e in report.errors[:5]:
        print("error:", e)
    growth = report.rss_end_mb - report.rss_warm_mb
    ok = not report.errors and report.mismatches == 0 and len(report.latencies) == args.requests
    ok = ok and growth <= args.max_rss_growth_mb
    print(
        f"RSS growth after warm-up: {growth:.0f} MB (bound {args.max_rss_growth_mb:.0f} MB); {'PASS' if ok else 'FAIL'}"
    )
    if args.out:
        Path(args.out).write_text(
            f"# Load test\n\n`python -m benchmarks.loadtest --model {args.model} --requests {args.requests} --clients "
            f"{args.clients}` on {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}.\n\n{table}\n\n"
            f"RSS growth after warm-up: {growth:.0f} MB (bound {args.max_rss_growth_mb:.0f} MB). "
            f"{'PASS' if ok else 'FAIL'}.\n"
        )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
