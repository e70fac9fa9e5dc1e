"""The machine a run measures on (for the report) and the input photo."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]  # the repository: benchmarks/bench/machine.py -> ../../
# The library sources whose cost the benchmark measures; their hashes go into the report.
SOURCES_MEASURED = (
    "vizapp/pipeline.py",
    "vizapp/result.py",
    "vizapp/capture.py",
    "vizapp/streaming.py",
    "vizapp/limits.py",
    "vizapp/analysis/rollout.py",
    "vizapp/analysis/distance.py",
    "vizapp/views.py",
    "vizapp/figures/maps.py",
    "vizapp/figures/_base.py",
)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: str) -> str:
    """The device a table was measured on, in words ("CPU (AMD EPYC)", "CUDA (NVIDIA H200)"): ratios move with it."""
    if torch.device(device).type == "cuda":
        return f"CUDA ({torch.cuda.get_device_name(device)})"
    return f"{device.upper()} ({_cpu_model()})"


def _file_digest(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    except OSError:
        return "missing"


def fused_route(device: str, after: bool = False) -> dict[str, str]:
    """Whether an analysis on ``device`` takes its statistics from the fused kernels (:mod:`vizapp.fused_attention`),
    at the start or (``after``) at the end of a run, when a kernel that failed during it is reported with its error."""
    from vizapp import fused_attention

    try:
        import triton

        version = f"Triton {triton.__version__}"
    except ImportError:
        version = "no Triton"
    used = fused_attention.usable(torch.device(device))  # (each compile is checked at its first launch, in the run)
    failed = fused_attention.failure()
    if failed:
        said = failed[:200]
        route = f"on, but a variant failed and its layers are formed: {said}" if used else f"failed, formed: {said}"
    else:
        route = "on" if used else "off"
    if after:  # each compile's check ran at its first launch, during the run
        from vizapp import fused_check

        route += f"; {fused_check.checked_compiles()}"
    key = "fused attention kernels" + (" at end" if after else "")
    return {key: f"{route} ({version}, VIZAPP_FUSED_ATTENTION={fused_attention.mode()})"}


def machine_info(device: str) -> dict[str, Any]:
    """Machine, library versions, load and the hashes of the source files measured."""
    import plotly
    import timm

    try:
        load = "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    except OSError:
        load = "n/a"
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count() or 0
    info = {
        "date (UTC)": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        "CPU": _cpu_model(),
        "cores (os.cpu_count / usable)": f"{os.cpu_count()} / {affinity}",
        "memory": _mem_total(),
        "load average at start (1/5/15 min)": load,
        "torch threads": torch.get_num_threads(),
        "device": device if device == "cpu" else f"{device} ({torch.cuda.get_device_name(0)})",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "plotly": plotly.__version__,
        "numpy": np.__version__,
    } | fused_route(device)
    info["sources measured (sha256/12)"] = ", ".join(
        f"{f.split('/')[-1]} {_file_digest(ROOT / f)}" for f in SOURCES_MEASURED
    )
    return info


def _mem_total() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) * 1024 / 1e9:.1f} GB"
    except OSError:
        pass
    return "n/a"


def photo() -> tuple[Image.Image, str]:
    """skimage's astronaut (512x512 RGB) when scikit-image is installed, else a seeded random image."""
    spec = importlib.util.find_spec("skimage")
    if spec is not None and spec.submodule_search_locations:
        path = Path(next(iter(spec.submodule_search_locations))) / "data" / "astronaut.png"
        if path.is_file():
            with Image.open(path) as img:
                return img.convert("RGB"), "skimage astronaut.png (512x512 RGB)"
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)), "random 512x512 RGB image (seed 0)"
