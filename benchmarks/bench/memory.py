"""Peak memory of one stage, each measured in a fresh process (``python -m benchmarks.bench --_measure-mem``).

Relative to the process's memory right after the model was loaded: on the CPU the high-water mark ``VmHWM``, reset
through ``/proc/self/clear_refs`` after loading; on CUDA ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.bench.machine import ROOT, photo
from benchmarks.bench.specs import ModelSpec
from benchmarks.bench.stages import stage_a, stage_b

MEM_MARK = "VIZAPP_MEM "  # the line of the subprocess's stdout that carries its JSON result


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _status_kb(field_name: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak memory above the point this was made: on CUDA the device's allocations (``max_memory_allocated`` above
    ``memory_allocated``, after the device finishes), on the CPU the process's resident high-water mark ``VmHWM``
    above its resident memory, once ``/proc/self/clear_refs`` has reset it (``reset``: whether it could)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.cuda = device, device.type == "cuda"
        if self.cuda:
            torch.cuda.synchronize(device)
            self.base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        else:
            self.base = _rss_bytes()
            self.reset = _reset_peak_rss()

    def bytes(self) -> int | None:
        """The peak so far above the start, or None on the CPU where the high-water mark could not be reset or read."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self.base
        hwm_kb = _status_kb("VmHWM")
        return hwm_kb * 1024 - self.base if hwm_kb is not None and self.reset else None


def _storage_bytes(tensors: Sequence[torch.Tensor | None]) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        if t is not None:
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def measure_memory_here(stage: str, spec: ModelSpec, device: str, dtype: str = "float32") -> dict[str, Any]:
    """Peak memory of one stage ("a", "cap" or "b") above the memory right after the model was loaded."""
    from vizapp.capture import AttentionCapture
    from vizapp.pipeline import analyze  # noqa: F401 - import before the baseline so imports do not count

    img, _ = photo()
    vm = spec.load(device, dtype)
    dev = torch.device(device)
    x = vm.transform(img)  # only to size things; the stages transform again
    del x
    gc.collect()
    peak_from_here = PeakMemory(dev)
    base = peak_from_here.base
    extra: dict[str, Any] = {}
    if stage == "a":
        keep: Any = stage_a(vm, img)
    elif stage == "b":
        keep = stage_b(vm, img)
    elif stage == "cap":
        xin = vm.transform(img)[None].to(device=vm.device, dtype=vm.dtype)
        with torch.no_grad(), AttentionCapture(vm.model) as cap:
            vm.model(xin)
        vm.synchronize()
        extra["qk_storage_bytes"] = _storage_bytes(list(cap.q) + list(cap.k))
        extra["qk_tensor_bytes"] = sum(t.numel() * t.element_size() for t in list(cap.q) + list(cap.k) if t is not None)
        keep = cap
    else:
        raise ValueError(f"unknown stage {stage!r}")
    found = peak_from_here.bytes()
    if peak_from_here.cuda:
        peak = found
        method = "torch.cuda.max_memory_allocated - memory_allocated after load"
    else:
        # VmHWM is this address space's high-water mark, which clear_refs resets. ru_maxrss is max(VmHWM, the
        # signal struct's maxrss), and the latter keeps the high-water mark of the address space replaced by exec,
        # i.e. of the forked parent (the benchmark process, holding other models): clear_refs does not reset it.
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        extra["ru_maxrss_bytes"] = maxrss
        if found is not None:
            peak = found
            method = "VmHWM (reset via /proc/self/clear_refs after load) - RSS after load"
        else:
            peak = maxrss - base
            method = "ru_maxrss - RSS after load (high-water mark NOT reset: may include loading)"
    del keep
    return {
        "stage": stage,
        "model": spec.label,
        "peak_bytes": int(peak),
        "baseline_bytes": int(base),
        "method": method,
        **extra,
    }


def measure_memory(
    spec: ModelSpec, stage: str, device: str, threads: int | None, dtype: str = "float32"
) -> dict[str, Any]:
    """Run :func:`measure_memory_here` in a fresh ``python -m benchmarks.bench --_measure-mem`` subprocess."""
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.bench",
        "--_measure-mem",
        stage,
        spec.label,
        "--device",
        device,
        "--dtype",
        dtype,
    ]
    if threads:
        cmd += ["--threads", str(threads)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(ROOT), env=env, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith(MEM_MARK):
            return json.loads(line[len(MEM_MARK) :])
    raise RuntimeError(f"memory subprocess for {spec.label} ({stage}) failed:\n{proc.stderr[-2000:]}")
