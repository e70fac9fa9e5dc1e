"""Benchmark of what vizapp adds on top of a bare ViT forward pass (``python -m vizapp.bench``).

For each model, in one process and with the repeats of every stage interleaved (so that a change in machine load
hits all stages alike), it measures the median wall time of

* (a) preprocessing (``vm.transform`` on a photo) + the bare timm forward (fused attention, ``torch.no_grad``): the
  floor any app must pay;
* (b) :func:`vizapp.analyze` (forward with capture, top-5, rollout, mean attention distance) + the per-head CLS maps of
  the last layer (``r.attention(last)``);
* (c) building *and* serialising (``fig.to_json()``) every figure :func:`vizapp.views.render_all` returns, plus the
  JSON size of each;
* (d) re-rendering (build + ``to_json``) after one control change, from the cached analysis (no forward pass): other
  head fusion (rollout ``max``), other layer, a query patch;

and the peak memory of (a), of a forward with :class:`~vizapp.capture.AttentionCapture` only, and of (b), each in a
fresh subprocess (``--_measure-mem``), relative to the process's memory right after the model was loaded: peak RSS
from ``getrusage`` on CPU (the high-water mark is reset through ``/proc/self/clear_refs`` after loading), and
``torch.cuda.max_memory_allocated`` on CUDA. A cProfile run of (b) splits its time into stages, and a cost model
(FLOP and byte counts from N, L, H, D) is printed beside the measurements. Results go to stdout and to a markdown
file (default ``docs/benchmarks.md``).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import cProfile
import dataclasses
import gc
import hashlib
import importlib.util
import json
import math
import os
import platform
import pstats
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from vizapp.capture import chunk_shape
from vizapp.pipeline import FUSED_CACHE_LIMIT_BYTES, INLINE_CHUNK_BYTES, ROLLOUT_STORE_LIMIT_BYTES

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "docs" / "benchmarks.md"
MB = 1e6  # all sizes in this report are decimal: 1 MB = 10^6 bytes, 1 kB = 10^3 bytes
MEM_MARK = "VIZAPP_MEM "
# Everything from this line to the end of an existing report is kept when the benchmark rewrites it.
NOTES_MARKER = "<!-- hand-written notes below: kept when `python -m vizapp.bench` rewrites this file -->"
DEFAULT_MODELS = (
    "vit_tiny_patch16_224",
    "vit_small_patch16_224",
    "vit_base_patch16_224",
    "vit_large_patch16_384",
    "vit_large_patch14_reg4_dinov2@img_size=518",
)
QUICK_MODELS = ("vit_tiny_patch16_224@img_size=64",)
# Models whose predicted forward exceeds this many multiply-accumulates get ``--large-repeats`` repeats.
LARGE_MACS = 50e9
TABLE_COLUMNS = (
    "model", "tokens N", "layers L", "heads H", "a ms", "b ms", "c ms", "d ms", "d max ms", "b/a", "b/a CPU time",
    "c/a", "d/a",
    "max fig JSON kB", "peak mem a MB", "peak mem b MB", "added MB", "repeats",
)


# ----------------------------------------------------------------------------------------------------------------
# Model specs


@dataclass(frozen=True)
class ModelSpec:
    """A timm model name plus ``create_model`` keyword arguments, written ``name@key=value,key=value``."""

    name: str
    kwargs: tuple[tuple[str, Any], ...] = ()

    @property
    def label(self) -> str:
        if not self.kwargs:
            return self.name
        return self.name + "@" + ",".join(f"{k}={v}" for k, v in self.kwargs)

    def load(self, device: str) -> Any:
        """The model via :func:`vizapp.load_model` (random weights, seeded)."""
        from vizapp.models import load_model

        torch.manual_seed(0)
        return load_model(self.name, pretrained=False, device=device, **dict(self.kwargs))


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_spec(text: str) -> ModelSpec:
    """``"vit_large_patch14_reg4_dinov2@img_size=518"`` -> ModelSpec(name, (("img_size", 518),))."""
    name, _, rest = text.strip().partition("@")
    kwargs = []
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"bad model option {item!r} in {text!r}; expected key=value")
        kwargs.append((key.strip(), _literal(value.strip())))
    if not name:
        raise argparse.ArgumentTypeError(f"empty model name in {text!r}")
    return ModelSpec(name, tuple(kwargs))


# ----------------------------------------------------------------------------------------------------------------
# Machine and inputs


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _file_digest(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    except OSError:
        return "missing"


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
        "date (UTC)": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S"),
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
    }
    files = ("vizapp/pipeline.py", "vizapp/capture.py", "vizapp/analysis/rollout.py", "vizapp/analysis/distance.py",
             "vizapp/views.py", "vizapp/figures.py")
    info["sources measured (sha256/12)"] = ", ".join(f"{f.split('/')[-1]} {_file_digest(ROOT / f)}" for f in files)
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


# ----------------------------------------------------------------------------------------------------------------
# The four timed stages


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def stage_a(vm: Any, img: Image.Image) -> torch.Tensor:
    """Preprocessing + bare forward (the model's own fused attention), no capture."""
    x = vm.transform(img)
    if x.dim() == 3:
        x = x[None]
    with torch.no_grad():
        out = vm.model(x.to(device=vm.device, dtype=vm.dtype))
    _sync(vm.device)
    return out


def stage_b(vm: Any, img: Image.Image) -> Any:
    """:func:`vizapp.analyze` plus the last layer's per-head CLS maps."""
    from vizapp.pipeline import analyze

    r = analyze(vm, img)
    r.attention(r.num_layers - 1)
    _sync(vm.device)
    return r


def _figures_json(figs: dict[str, Any]) -> dict[str, int]:
    import plotly.graph_objects as go

    return {k: len(f.to_json()) for k, f in figs.items() if isinstance(f, go.Figure)}


def stage_c(r: Any, pos_sim: np.ndarray | None) -> dict[str, int]:
    """Build and serialise every figure of :func:`vizapp.views.render_all`; JSON size (bytes) per figure."""
    from vizapp.views import Controls, default_query, render_all

    return _figures_json(render_all(r, pos_sim, Controls(query=default_query(r))))


def control_changes(r: Any) -> dict[str, Callable[[Any], Any]]:
    """The re-renders (analysis -> figure) after one control change each; none runs a forward pass."""
    from vizapp.views import Controls, default_query, heads_view, rollout_view

    gh, gw = r.grid_size
    changes: dict[str, Callable[[Any], Any]] = {}
    if r.num_prefix_tokens:
        changes["head fusion max (rollout)"] = lambda a: rollout_view(a, Controls(head_fusion="max"))
    mid = max(0, r.num_layers // 2 - 1)
    changes[f"layer {mid} (heads)"] = lambda a: heads_view(a, Controls(layer=mid, query=default_query(a)))
    changes[f"query patch ({gh // 2}, {gw // 2}) (heads)"] = lambda a: heads_view(
        a, Controls(layer=-1, query=(gh // 2, gw // 2))
    )
    return changes


def fresh_copy(r: Any, cache: dict) -> Any:
    """The analysis with its cache as ``analyze`` left it (so a repeat does not hit what the last one cached)."""
    return dataclasses.replace(r, _cache=dict(cache))


# ----------------------------------------------------------------------------------------------------------------
# Cost model


@dataclass
class Shape:
    """What the cost model needs about one model at one input size."""

    tokens: int  # N, prefix tokens included
    prefix: int
    patches: int  # P = gh * gw
    layers: int  # L
    heads: int  # H
    width: int  # D
    mlp_hidden: int  # usually 4 D
    in_chans: int
    patch_pixels: int  # ph * pw
    num_classes: int


def model_shape(vm: Any) -> Shape:
    """Token and layer counts read from the loaded model."""
    m = vm.model
    gh, gw = vm.grid_size
    fc1 = getattr(m.blocks[0].mlp, "fc1", None)
    width = int(m.embed_dim)
    return Shape(
        tokens=vm.num_prefix_tokens + gh * gw,
        prefix=vm.num_prefix_tokens,
        patches=gh * gw,
        layers=vm.num_layers,
        heads=vm.num_heads,
        width=width,
        mlp_hidden=int(fc1.out_features) if fc1 is not None else 4 * width,
        in_chans=int(vm.input_size[0]),
        patch_pixels=int(vm.patch_size[0] * vm.patch_size[1]),
        num_classes=int(getattr(m, "num_classes", 0) or 0),
    )


def cost_model(s: Shape, batch: int = 1) -> dict[str, float]:
    """Predicted work and bytes (fp32) of the forward and of the analysis as implemented in the measured version.

    Forward, per layer and image: qkv 3·N·D², q kᵀ N²·D, A v N²·D, proj N·D², MLP 2·N·D·M -> with M = 4D
    12·N·D² + 2·N²·D; plus the patch embedding P·(C·p²)·D and the head D·K once.

    Analysis, per layer and image, on the CPU: the capture forms the attention in place of SDPA, c =
    INLINE_CHUNK_BYTES / (4·N²) heads at a time (same MACs as SDPA; the weights are written out, softmaxed in place
    and read back by A·v: ~3 passes over H·N² that SDPA's blocked kernel keeps in registers), then from the hot
    chunk: the distance numerator (attention x pixel distance, then a sum: 2 passes over H·P²), its denominator
    (1 pass over H·P²), the head sum (1 pass over H·N²) and, while the fused cache fits, max and min (2 more).
    Rollout: the mean-fused matrices are kept (L·N² floats, when under ROLLOUT_STORE_LIMIT_BYTES) and the CLS row is
    carried down after the forward (L vector-matrix products, 1 pass over N² each); above the limit the joint
    attention is multiplied up bottom-up, one N x N x N product per layer. Memory: q and k of every layer in one
    block (2·L·N·D floats), one chunk (c·N² + c·P² floats), the kept means (L·N²) or the joint (2·N²), and the
    other two fusions (2·L·N²) while the cache fits, briefly twice while ``torch.stack`` runs.
    """
    n, p, L, h, d, m = s.tokens, s.patches, s.layers, s.heads, s.width, s.mlp_hidden
    f32 = 4
    fwd_layer = 4 * n * d * d + 2 * n * d * m + 2 * n * n * d
    fwd = batch * (L * fwd_layer + p * s.in_chans * s.patch_pixels * d + d * s.num_classes)
    keep_fused = L * n * n * f32 <= FUSED_CACHE_LIMIT_BYTES
    store_mean = L * n * n * f32 <= ROLLOUT_STORE_LIMIT_BYTES
    gemm_extra = 0 if store_mean else batch * L * n**3  # bottom-up rollout
    elementwise = batch * L * ((3 + 1 + (2 if keep_fused else 0)) * h * n * n + 3 * h * p * p
                               + (n * n if store_mean else 0))
    chunk = chunk_shape(h, n, INLINE_CHUNK_BYTES)[0]
    qk = 2 * L * n * d * f32 * batch
    means = L * n * n * f32 if store_mean else 2 * n * n * f32
    fused = (2 * L * n * n * f32 if keep_fused else 0) * batch
    transient = chunk * (n * n + p * p) * f32
    return {
        "forward_macs": float(fwd),
        "forward_attn_macs": float(batch * L * 2 * n * n * d),
        "extra_gemm_macs": float(gemm_extra),
        "extra_elementwise": float(elementwise),
        "chunk_heads": float(chunk),
        "qk_bytes": float(qk),
        "fused_bytes": float(fused + means),
        "transient_bytes": float(transient),
        "predicted_added_bytes": float(qk + means + 2 * fused + transient),
    }


def elementwise_rate(s: Shape, repeats: int = 3) -> float:
    """Measured elements per second of a softmax over one attention chunk [c, N, N] (counted as 3 passes)."""
    chunk = int(cost_model(s)["chunk_heads"])
    x = torch.randn(chunk, s.tokens, s.tokens)
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        torch.softmax(x, dim=-1)
        times.append(time.perf_counter() - t0)
    return 3 * x.numel() / statistics.median(times[1:])


# ----------------------------------------------------------------------------------------------------------------
# Profile of (b)

def _code_key(fn: Any) -> tuple[str, int, str] | None:
    code = getattr(fn, "__code__", None)
    if code is None and callable(fn):
        code = getattr(type(fn).__call__, "__code__", None)
    return (code.co_filename, code.co_firstlineno, code.co_name) if code is not None else None


def _builtin(*names: str) -> tuple[str, int, tuple[str, ...]]:
    """Profile key of a C function, by the name prefixes cProfile gives it (they differ across Python versions)."""
    return ("~", 0, names)


def _method(name: str) -> tuple[str, int, tuple[str, ...]]:
    return _builtin(f"<method '{name}' of 'torch._C.TensorBase' objects>", f"<built-in method {name} ")


def _profile_stages(vm: Any) -> list[tuple[str, list[Any], str]]:
    """(label, profile keys, which callers count, nested) of the stages of (b).

    Callers: "any"; "pipeline" (calls made from vizapp/pipeline.py only, for builtins that timm also uses); or
    "not-row" (any caller but ``Analysis.attention_row``, which belongs to the per-head maps). Functions that do not
    exist in the measured version of the code simply count 0. Nested stages are parts of the forward's time and are
    left out of the sum that gives "other".
    """
    from timm.models.vision_transformer import VisionTransformer

    from vizapp import capture, pipeline

    forward = type(vm.model).forward if isinstance(vm.model, VisionTransformer) else vm.model.forward
    return [
        ("preprocessing (vm.transform)", [_code_key(vm.transform)], "any", False),
        ("forward, attention formed once inside it (all of the next two included)", [_code_key(forward)], "any",
         False),
        ("  of which: attention formed by the capture, q kᵀ, softmax, A·v (AttentionCapture._attend; the next row included)",
         [_code_key(getattr(capture.AttentionCapture, "_attend", None))], "any", True),
        ("    of which: statistics from the hot chunk (distance, head sum, rollout product)",
         [_code_key(getattr(getattr(pipeline, "_InlineStats", None), m, None)) for m in ("chunk", "layer_done")],
         "any", True),
        ("recompute from q and k (only when SDPA kept the attention)",
         [_code_key(getattr(pipeline, "_recompute_stats", None))], "any", False),
        ("rollout row, top-down (rollout_weights)",
         [_code_key(getattr(getattr(pipeline, "_InlineStats", None), "rollout_weights", None))], "any", False),
        ("q/k copies (.contiguous)", [_method("contiguous")], "pipeline", False),
        ("torch.stack / torch.cat (fused, distances)",
         [_builtin("<built-in method torch.stack>", "<built-in method stack "),
          _builtin("<built-in method torch.cat>", "<built-in method cat ")], "pipeline", False),
        ("model_view (uint8 image)", [_code_key(pipeline.model_view)], "any", False),
        ("per-head maps (r.attention)", [_code_key(pipeline.Analysis.attention)], "any", False),
    ]


def _matches(func: tuple[str, int, str], key: Any) -> bool:
    if key is None or func[0] != key[0] or func[1] != key[1]:
        return False
    names = key[2] if isinstance(key[2], tuple) else (key[2],)
    return func[2].startswith(names) if key[0] == "~" else func[2] in names


def profile_b(vm: Any, img: Image.Image) -> dict[str, float]:
    """One cProfile'd run of stage (b): seconds per stage, plus 'other' and 'total'."""
    from vizapp import pipeline

    stages = _profile_stages(vm)
    pipeline_file = pipeline.analyze.__code__.co_filename
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    stage_b(vm, img)
    prof.disable()
    total = time.perf_counter() - t0
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    out: dict[str, float] = {}
    nested_total = 0.0
    for label, keys, who, nested in stages:
        secs = 0.0
        for func, (_cc, _nc, _tt, ct, callers) in stats.items():
            if not any(_matches(func, key) for key in keys):
                continue
            if who == "pipeline":
                # nested calls from a pipeline.py function that is itself counted elsewhere are excluded
                secs += sum(v[3] for caller, v in callers.items()
                            if caller[0] == pipeline_file and caller[2] not in ("attention_row", "model_view"))
            elif who == "not-row":
                secs += ct - sum(v[3] for caller, v in callers.items() if caller[2] == "attention_row")
            else:
                secs += ct
        out[label] = secs
        nested_total += secs if nested else 0.0
    out["other (Python glue, top-k, hooks, ...)"] = max(0.0, total - (sum(out.values()) - nested_total))
    out["total"] = total
    return out


# ----------------------------------------------------------------------------------------------------------------
# Memory, in a fresh subprocess


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


def _storage_bytes(tensors: Sequence[torch.Tensor | None]) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        if t is not None:
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def measure_memory_here(stage: str, spec: ModelSpec, device: str) -> dict[str, Any]:
    """Peak memory of one stage ("a", "cap" or "b") above the memory right after the model was loaded."""
    from vizapp.capture import AttentionCapture
    from vizapp.pipeline import analyze  # noqa: F401 - import before the baseline so imports do not count

    img, _ = photo()
    vm = spec.load(device)
    dev = torch.device(device)
    x = vm.transform(img)  # only to size things; the stages transform again
    del x
    gc.collect()
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.synchronize(dev)
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    else:
        base = _rss_bytes()
        reset_ok = _reset_peak_rss()
    extra: dict[str, Any] = {}
    if stage == "a":
        keep: Any = stage_a(vm, img)
    elif stage == "b":
        keep = stage_b(vm, img)
    elif stage == "cap":
        xin = vm.transform(img)[None].to(device=vm.device, dtype=vm.dtype)
        with torch.no_grad(), AttentionCapture(vm.model) as cap:
            vm.model(xin)
        _sync(dev)
        extra["qk_storage_bytes"] = _storage_bytes(list(cap.q) + list(cap.k))
        extra["qk_tensor_bytes"] = sum(t.numel() * t.element_size() for t in list(cap.q) + list(cap.k) if t is not None)
        keep = cap
    else:
        raise ValueError(f"unknown stage {stage!r}")
    if cuda:
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev) - base
        method = "torch.cuda.max_memory_allocated - memory_allocated after load"
    else:
        # VmHWM is this address space's high-water mark, which clear_refs resets. ru_maxrss is max(VmHWM, the
        # signal struct's maxrss), and the latter keeps the high-water mark of the address space replaced by exec,
        # i.e. of the forked parent (the benchmark process, holding other models): clear_refs does not reset it.
        hwm_kb = _status_kb("VmHWM")
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        extra["ru_maxrss_bytes"] = maxrss
        if hwm_kb is not None and reset_ok:
            peak = hwm_kb * 1024 - base
            method = "VmHWM (reset via /proc/self/clear_refs after load) - RSS after load"
        else:
            peak = maxrss - base
            method = "ru_maxrss - RSS after load (high-water mark NOT reset: may include loading)"
    del keep
    return {"stage": stage, "model": spec.label, "peak_bytes": int(peak), "baseline_bytes": int(base),
            "method": method, **extra}


def measure_memory(spec: ModelSpec, stage: str, device: str, threads: int | None) -> dict[str, Any]:
    """Run :func:`measure_memory_here` in a fresh ``python -m vizapp.bench --_measure-mem`` subprocess."""
    cmd = [sys.executable, "-m", "vizapp.bench", "--_measure-mem", stage, spec.label, "--device", device]
    if threads:
        cmd += ["--threads", str(threads)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(ROOT), env=env, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith(MEM_MARK):
            return json.loads(line[len(MEM_MARK) :])
    raise RuntimeError(f"memory subprocess for {spec.label} ({stage}) failed:\n{proc.stderr[-2000:]}")


# ----------------------------------------------------------------------------------------------------------------
# One model


@dataclass
class ModelResult:
    """Everything measured for one model."""

    spec: ModelSpec
    shape: Shape
    repeats: int
    times: dict[str, list[float]] = field(default_factory=dict)  # seconds per repeat: a, b, c, and one per change
    fig_json: dict[str, int] = field(default_factory=dict)  # bytes per figure of (c)
    pos_sim_s: float = 0.0
    mem: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # one result per fresh subprocess
    elem_rate: float = float("nan")  # elements/s of a softmax pass, measured beside the timings
    profile: dict[str, float] = field(default_factory=dict)
    cost: dict[str, float] = field(default_factory=dict)

    def med(self, key: str) -> float:
        return statistics.median(self.times[key])

    @property
    def change_keys(self) -> list[str]:
        return [k for k in self.times if k.startswith("d:")]

    @property
    def d_median(self) -> float:
        return statistics.median([self.med(k) for k in self.change_keys])

    @property
    def d_max(self) -> float:
        return max(self.med(k) for k in self.change_keys)

    def paired_ratio(self, key: str) -> float:
        return statistics.median([x / a for x, a in zip(self.times[key], self.times["a"], strict=True)])

    def mem_mb(self, stage: str) -> float:
        """Median peak (MB) over the fresh subprocesses of ``stage``."""
        if not self.mem.get(stage):
            return float("nan")
        return statistics.median(m["peak_bytes"] for m in self.mem[stage]) / MB

    def mem_range(self, stage: str) -> str:
        peaks = [m["peak_bytes"] / MB for m in self.mem.get(stage, [])]
        return f"{min(peaks):.0f}–{max(peaks):.0f}" if peaks else "–"

    def mem_field(self, stage: str, key: str) -> float:
        vals = [m[key] for m in self.mem.get(stage, []) if key in m]
        return statistics.median(vals) if vals else float("nan")

    @property
    def added_mb(self) -> float:
        return self.mem_mb("b") - self.mem_mb("a")


def _timed(fn: Callable[..., Any], *args: Any) -> tuple[float, Any]:
    wall, _cpu, out = _timed_cpu(fn, *args)
    return wall, out


def _timed_cpu(fn: Callable[..., Any], *args: Any) -> tuple[float, float, Any]:
    """Wall seconds, CPU seconds of this process (all threads; not counting time other tenants took), result."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn(*args)
    return time.perf_counter() - t0, time.process_time() - c0, out


def _render_json(change: Callable[[Any], Any], r: Any) -> dict[str, int]:
    return _figures_json({"fig": change(r)})


def run_model(
    spec: ModelSpec, img: Image.Image, repeats: int | tuple[int, int], warmup: int, device: str, threads: int | None,
    profile: bool = True, memory: bool = True, log: Callable[[str], None] = print, mem_repeats: int = 3,
) -> ModelResult:
    """Time stages (a)-(d) with interleaved repeats, then profile (b) and measure memory in subprocesses.

    Args:
        repeats: timed repeats, or (repeats, repeats for models over :data:`LARGE_MACS`).
        mem_repeats: fresh subprocesses per memory measurement of (a) and (b) (the median is reported: the peak RSS
            of one run varies with the address-space layout); the capture-only diagnostic runs once.
    """
    from vizapp.models import MODEL_CACHE

    vm = spec.load(device)
    shape = model_shape(vm)
    cost = cost_model(shape)
    if isinstance(repeats, tuple):
        repeats = repeats[0] if cost["forward_macs"] <= LARGE_MACS else repeats[1]
    res = ModelResult(spec=spec, shape=shape, repeats=repeats, cost=cost)
    log(f"{spec.label}: N={shape.tokens} tokens ({shape.prefix} prefix + {shape.patches} patches), "
        f"L={shape.layers}, H={shape.heads}, D={shape.width}; {repeats} repeats after {warmup} warm-up")
    t0 = time.perf_counter()
    pos_sim = vm.pos_similarity()
    res.pos_sim_s = time.perf_counter() - t0
    for key in ("a", "b", "c", "a_cpu", "b_cpu"):
        res.times[key] = []
    r_cache: dict = {}
    r = None
    for i in range(warmup + repeats):
        order = ("a", "b") if i % 2 == 0 else ("b", "a")
        for key in order:
            if key == "a":
                ta, ca, _ = _timed_cpu(stage_a, vm, img)
            else:
                tb, cb, r = _timed_cpu(stage_b, vm, img)
                r_cache = dict(r._cache)
        tc, sizes = _timed(stage_c, r, pos_sim)
        tds = {}
        for name, fn in control_changes(r).items():
            tds[name], _ = _timed(_render_json, fn, fresh_copy(r, r_cache))
        if i >= warmup:
            res.times["a"].append(ta)
            res.times["b"].append(tb)
            res.times["a_cpu"].append(ca)
            res.times["b_cpu"].append(cb)
            res.times["c"].append(tc)
            for name, t in tds.items():
                res.times.setdefault(f"d:{name}", []).append(t)
            res.fig_json = sizes
        log(f"  {'warm-up' if i < warmup else f'repeat {i - warmup + 1}'}: a {ta * 1e3:.1f} ms, b {tb * 1e3:.1f} ms, "
            f"c {tc * 1e3:.1f} ms, d " + "/".join(f"{t * 1e3:.1f}" for t in tds.values()) + " ms")
    if device == "cpu":
        res.elem_rate = elementwise_rate(shape)
    if profile:
        res.profile = profile_b(vm, img)
    del r, vm
    MODEL_CACHE.clear()
    gc.collect()
    if memory:
        for i in range(max(1, mem_repeats)):
            for stage in ("a", "b") if i else ("a", "cap", "b"):
                res.mem.setdefault(stage, []).append(measure_memory(spec, stage, device, threads))
        log(f"  peak memory above loaded model (median of {mem_repeats}): a {res.mem_mb('a'):.1f} MB "
            f"({res.mem_range('a')}), capture only {res.mem_mb('cap'):.1f} MB, b {res.mem_mb('b'):.1f} MB "
            f"({res.mem_range('b')})")
    return res


# ----------------------------------------------------------------------------------------------------------------
# Dataset mode

DATASET_MODEL = "vit_base_patch16_224"
QUICK_DATASET_MODEL = "vit_tiny_patch16_224@img_size=64"


def run_dataset(spec: ModelSpec, img: Image.Image, n_images: int, batch_size: int, device: str,
                log: Callable[[str], None] = print) -> dict[str, Any]:
    """``vizapp.stats.collect_stats`` over ``n_images`` PNG files (the photo, flipped and rotated so that they
    differ), timing every batch's analysis beside a bare batched forward of the same batch (order alternating)."""
    import tempfile

    from vizapp.stats import collect_stats

    vm = spec.load(device)
    variants = [img, img.transpose(Image.Transpose.FLIP_LEFT_RIGHT), img.rotate(90), img.rotate(270)]
    with tempfile.TemporaryDirectory(prefix="vizapp-bench-") as tmp:
        paths = []
        for i in range(n_images):
            path = Path(tmp) / f"img{i:04d}.png"
            variants[i % len(variants)].save(path, compress_level=1)
            paths.append(path)
        st = collect_stats(vm, paths, batch_size, baseline_batches=-1)
    out = {
        "model": spec.label, "images": st.n_images, "timed_images": st.timed_images, "batch_size": batch_size,
        "analysis_ips": st.analysis_throughput, "bare_ips": st.bare_throughput, "ratio": st.throughput_ratio,
        "end_to_end_ips": st.throughput,
    }
    log(f"dataset mode {spec.label}: {st.timed_images} timed images in batches of {batch_size}: analysis "
        f"{st.analysis_throughput:.2f} img/s, bare forward {st.bare_throughput:.2f} img/s, ratio {st.throughput_ratio:.3f}")
    return out


# ----------------------------------------------------------------------------------------------------------------
# Report


def _md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}" if seconds < 10 else f"{seconds * 1e3:.0f}"


def table_rows(results: Sequence[ModelResult]) -> list[list[str]]:
    """One row per model, in :data:`TABLE_COLUMNS` order."""
    rows = []
    for res in results:
        a = res.med("a")
        rows.append([
            res.spec.label, str(res.shape.tokens), str(res.shape.layers), str(res.shape.heads),
            _ms(a), _ms(res.med("b")), _ms(res.med("c")), _ms(res.d_median), _ms(res.d_max),
            f"{res.med('b') / a:.3f}", f"{res.med('b_cpu') / res.med('a_cpu'):.3f}", f"{res.med('c') / a:.3f}",
            f"{res.d_median / a:.3f}",
            f"{max(res.fig_json.values(), default=0) / 1e3:.1f}",
            f"{res.mem_mb('a'):.1f}", f"{res.mem_mb('b'):.1f}", f"{res.added_mb:.1f}", str(res.repeats),
        ])
    return rows


def _find(results: Sequence[ModelResult], name: str, **kwargs: Any) -> ModelResult | None:
    for res in results:
        if res.spec.name == name and all(dict(res.spec.kwargs).get(k) == v for k, v in kwargs.items()):
            return res
    return None


def evaluate_targets(results: Sequence[ModelResult], dataset: dict[str, Any] | None = None) -> list[list[str]]:
    """[target, model, measured, met] for every target of the issue whose model was measured."""
    base = _find(results, "vit_base_patch16_224")
    large = _find(results, "vit_large_patch16_384")
    reg = next((r for r in results if r.spec.name == "vit_large_patch14_reg4_dinov2" and r.shape.tokens >= 1000), None)
    rows: list[list[str]] = []

    def add(target: str, res: ModelResult | None, value: float, limit: float, fmt: str, strict: bool = False) -> None:
        if res is None or math.isnan(value):
            return
        ok = value < limit if strict else value <= limit
        rows.append([target, res.spec.label, fmt.format(value), "met" if ok else "**missed**"])

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
        add(f"{reg.shape.tokens}-token register model adds < 0.5 GB", reg, reg.added_mb / 1e3, 0.5, "{:.2f} GB",
            strict=True)
    if dataset and not math.isnan(dataset["ratio"]):
        ok = dataset["ratio"] >= 0.8
        rows.append(["dataset mode throughput >= 0.8x a bare batched forward", dataset["model"],
                     f"{dataset['ratio']:.3f}", "met" if ok else "**missed**"])
    return rows


COST_MODEL_TEXT = """\
## Cost model

Notation: B images, N tokens (prefix tokens included), P = gh·gw patches, L layers, H heads of width d = D/H,
model width D, MLP hidden width M (= 4D in all models here), patch p×p pixels, C channels, K classes. Counts are
multiply-accumulates (MACs) for matrix products and element passes for elementwise work; memory in fp32 bytes.

**(a) forward, per image.** Per layer: qkv projection 3·N·D², q kᵀ N²·D, A·v N²·D, output projection N·D², MLP
2·N·D·M. With M = 4D:

    forward ≈ B · [ L · (12·N·D² + 2·N²·D) + P·C·p²·D + D·K ]  MACs

The 12·N·D² term (projections and MLP) dominates while N < 6D: it is 96 % of the forward for ViT-B/16 at 224 px
(N = 197, D = 768), 91 % for ViT-L/16 at 384 px (N = 577) and 82 % for the 1,374-token ViT-L/14 at 518 px; the
attention term 2·N²·D takes over only beyond N = 6D (4,608 tokens for ViT-B, 6,144 for ViT-L). Time is linear in B
and L, ~quadratic in D, and between linear and quadratic in N. Memory: with fused SDPA the H·N² weights are never
materialised, so the forward's activations are O(B·N·max(3D, M)) floats per layer, freed layer by layer (a few MB).

**(b) extra analysis work, per image** (what `analyze` adds on top of the same forward, as implemented in the
measured sources, see the hashes above):

* the attention is formed once, inside the forward: the capture catches this thread's SDPA call for each layer
  (a thread-local `TorchFunctionMode`) and computes softmax(q kᵀ·scale) and A·v itself, c heads at a time with
  c = `INLINE_CHUNK_BYTES` / (4·N²) (3 MiB: all 12 heads of ViT-B/224, 2 of ViT-L/384, 1 at 1,374 tokens), so a
  chunk and its distance product stay in the last-level cache. No extra MACs (SDPA does the same products); the
  extra is that the weights are written out, softmaxed in place and read back, ~3 passes over H·N² that SDPA's
  blocked kernel keeps in registers. Before this, `analyze` let SDPA run and then formed every layer's attention
  a second time from q and k (N²·D more MACs per layer and 2 more passes); that path is kept for forwards whose
  attention SDPA keeps (a mask, `fused_attn` off) and measured 1.19–1.25 b/a for ViT-L/384 where this one gives
  1.01–1.04 (same process, same quiet machine, CPU time and wall time alike);
* from the hot chunk: mean attention distance Σ_j a_ij·d_ij over Σ_j a_ij (the renormalisation over the patches):
  ~3 passes over H·P²; the head sum for the mean fusion (1 pass over H·N²); max and min (2 more) only while the
  fused matrices of all layers fit `FUSED_CACHE_LIMIT_BYTES` (16 MiB: ViT-S/B at 224 px yes, the ViT-L models no);
* default rollout: while L·N² floats fit `ROLLOUT_STORE_LIMIT_BYTES` (64 MiB; ViT-L/384: 32 MB), the mean-fused
  matrices are kept and the CLS row is carried from the top layer down after the forward, row ← (row·M_l + row)/2:
  L vector-matrix products. Above it (1,374 tokens: 181 MB) the joint attention is multiplied up during the
  forward, R ← (M_l·R + R)/2: N³ MACs per layer (2.6 GMAC at N = 1,374), which trades time for 174 MB;
* memory: q and k of every layer, 2·L·N·D floats, copied by the capture hooks into one block per forward (kept:
  the per-head views of any layer and query are recomputed from them); one chunk, c·(N² + P²) floats; the kept
  means L·N² (or the joint, 2·N²); the max/min cache 2·L·N² while small, briefly twice (lists + `torch.stack`).

Extra time ≈ [L·N³ without kept means] / R_gemm + L·(4..6·H·N² + 3·H·P²) / R_elem, over forward ≈
L·(12·N·D² + 2·N²·D) / R_gemm. The elementwise part does not use the matrix units, runs at cache or memory
bandwidth (R_elem is one to two orders of magnitude below R_gemm in elements/s vs MAC/s) and grows with H·N², so
it dominates the extra time of ViT-B and ViT-L/384; at 1,374 tokens the bottom-up rollout's N³ GEMM is about as
large. Added memory grows as L·N·D (q/k, linear in N) + L·N² (kept means, only while ≤ 64 MiB) + c·N²: for all
models here the q/k term dominates.

Measured RSS can exceed these tensor-level counts: glibc's dynamic mmap threshold serves blocks up to 32 MB from the
heap, where blocks freed during the forward can stay resident, and the first forward in a process also maps library
code and one-off buffers (in both (a) and (b)). Before q and k were packed into one block per forward and the
per-layer buffers were reused, the same ViT-L/384 analysis measured 238–584 MB above load in six fresh processes
(bimodal, with where the heap's holes fell); after, 197–202 MB in three.
"""


METHOD_TEXT = """\
## Method

* Input: {image}, batch 1, fp32, device `{device}`.
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
  (`python -m vizapp.bench --_measure-mem STAGE MODEL`), peak minus the memory right after the model was loaded
  (CPU: `VmHWM` of `/proc/self/status` after resetting it via `/proc/self/clear_refs`, not `ru_maxrss`, which
  keeps the high-water mark of the forked parent across exec; CUDA:
  `torch.cuda.max_memory_allocated`). `added MB` = peak(b) − peak(a). 1 MB = 10⁶ bytes. The first forward in a
  fresh process also pays one-off allocations (library initialisation), which appear in both (a) and (b).
* Repeats: {repeats} per model, {large_repeats} for models whose forward exceeds {large_gmac:.0f} GMAC (the ViT-L
  models), to keep the run short on this machine.
"""


def render_markdown(
    results: Sequence[ModelResult], info: dict[str, Any], args: argparse.Namespace, image_desc: str, wall_s: float,
    dataset: dict[str, Any] | None = None,
) -> str:
    """The markdown report."""
    lines = ["# vizapp benchmark: what the analysis costs on top of a bare ViT forward", ""]
    cmd = "python -m vizapp.bench " + " ".join(args.argv) if args.argv else "python -m vizapp.bench"
    lines += [
        (f"Generated by `{cmd}` in {wall_s / 60:.1f} min. Random weights (`pretrained=False`): timings and memory do "
        "not depend on the weights' values."),
        "",
    ]
    lines += ["## Machine", ""] + _md_table(["", ""], [[k, v] for k, v in info.items()]) + [""]
    lines += [METHOD_TEXT.format(image=image_desc, device=args.device, warmup=args.warmup, repeats=args.repeats,
                                 large_repeats=args.large_repeats, large_gmac=LARGE_MACS / 1e9,
                                 mem_repeats=getattr(args, "mem_repeats", 1))]
    lines += ["## Results", ""] + _md_table(TABLE_COLUMNS, table_rows(results)) + [""]
    target_rows = evaluate_targets(results, dataset)
    if target_rows:
        lines += ["## Targets from the issue", ""] + _md_table(["target", "model", "measured", ""], target_rows) + [""]
    if dataset:
        lines += [
            "## Dataset mode (`python -m vizapp.stats`)", "",
            (f"`collect_stats` over {dataset['images']} PNG files (the photo and three flips/rotations), batches of "
             f"{dataset['batch_size']} through its DataLoader; every batch is also run through a bare batched forward "
             "(order alternating, the first batch a warm-up). Throughputs are over the forward passes only, "
             "decoding excluded, as the target compares them."), "",
        ] + _md_table(["model", "timed images", "analysis img/s", "bare forward img/s", "ratio", "end to end img/s"], [[
            dataset["model"], str(dataset["timed_images"]), f"{dataset['analysis_ips']:.2f}",
            f"{dataset['bare_ips']:.2f}", f"{dataset['ratio']:.3f}", f"{dataset['end_to_end_ips']:.2f}",
        ]]) + [""]
    lines += ["## Details", "", "### Figure JSON sizes (c), kB", ""]
    fig_names = sorted({k for res in results for k in res.fig_json})
    lines += _md_table(["model", *fig_names, "pos_similarity() once, ms"], [
        [res.spec.label, *(f"{res.fig_json[k] / 1e3:.1f}" if k in res.fig_json else "–" for k in fig_names),
         _ms(res.pos_sim_s)] for res in results
    ]) + [""]
    lines += ["### Control changes (d), median ms", ""]
    change_rows = []
    for res in results:
        for k in res.change_keys:
            change_rows.append([res.spec.label, k[2:], _ms(res.med(k)), _ms(max(res.times[k]))])
    lines += _md_table(["model", "change", "median ms", "max ms"], change_rows) + [""]
    lines += ["### Spread and paired ratios", ""]
    lines += _md_table(["model", "a min–max ms", "b min–max ms", "paired b/a (median)", "paired c/a", "c min–max ms"], [
        [res.spec.label, f"{_ms(min(res.times['a']))}–{_ms(max(res.times['a']))}",
         f"{_ms(min(res.times['b']))}–{_ms(max(res.times['b']))}", f"{res.paired_ratio('b'):.3f}",
         f"{res.paired_ratio('c'):.3f}", f"{_ms(min(res.times['c']))}–{_ms(max(res.times['c']))}"]
        for res in results
    ]) + [""]
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
        lines += _md_table(["model", "peak a MB (range)", "peak b MB (range)", "peak capture-only MB",
                            "q/k storage held MB", "q/k needed MB", "baseline RSS after load MB", "runs"], [
            [res.spec.label, f"{res.mem_mb('a'):.1f} ({res.mem_range('a')})",
             f"{res.mem_mb('b'):.1f} ({res.mem_range('b')})", f"{res.mem_mb('cap'):.1f}",
             f"{res.mem_field('cap', 'qk_storage_bytes') / MB:.1f}",
             f"{res.mem_field('cap', 'qk_tensor_bytes') / MB:.1f}",
             f"{res.mem_field('a', 'baseline_bytes') / MB:.0f}", str(len(res.mem.get("b", [])))]
            for res in results if res.mem
        ]) + [""]
    if any(res.profile for res in results):
        lines += ["### Where the time of (b) goes (one cProfile'd run, cumulative ms per stage)", "",
                  "cProfile adds some overhead to the Python-heavy parts; the stages do not overlap, except the two 'of which' "
                  "rows, which are parts of the forward.", ""]
        stage_names = [k for k in next(res.profile for res in results if res.profile) if k != "total"]
        prof_rows = []
        for name in [*stage_names, "total"]:
            row = [name]
            for res in results:
                if res.profile:
                    v = res.profile.get(name, 0.0)
                    row.append(f"{_ms(v)} ({100 * v / res.profile['total']:.0f} %)")
            prof_rows.append(row)
        lines += _md_table(["stage", *[res.spec.label for res in results if res.profile]], prof_rows) + [""]
    lines += [COST_MODEL_TEXT]
    lines += [
        "### Predicted vs measured",
        "",
        (
            "Predicted extra time of (b) over (a) = extra GEMM MACs / the GEMM rate achieved by (a) + extra "
            "elementwise element-passes / the rate of a softmax over one attention chunk measured in the same "
            "process. Predicted added memory = q/k + kept means (or the joint) + 2 × the max/min cache (lists + "
            "`torch.stack`) + one chunk; "
            "the measured value is the median peak of (b) minus that of (a)."
        ),
        "",
    ]
    cm_rows = []
    for res in results:
        c = res.cost
        gemm_rate = c["forward_macs"] / res.med("a")
        pred_s = c["extra_gemm_macs"] / gemm_rate + c["extra_elementwise"] / res.elem_rate
        cm_rows.append([
            res.spec.label, f"{c['forward_macs'] / 1e9:.2f}", f"{100 * c['forward_attn_macs'] / c['forward_macs']:.1f}",
            f"{gemm_rate / 1e9:.0f}", f"{c['extra_gemm_macs'] / 1e9:.2f}", f"{c['extra_elementwise'] / 1e6:.0f}",
            f"{res.elem_rate / 1e9:.2f}",
            f"{_ms(pred_s)} ms ({100 * pred_s / res.med('a'):.1f} %)",
            f"{_ms(res.med('b') - res.med('a'))} ms ({100 * (res.med('b') / res.med('a') - 1):.1f} %)",
            f"{c['qk_bytes'] / MB:.1f}", f"{c['fused_bytes'] / MB:.1f}", f"{int(c['chunk_heads'])}",
            f"{c['transient_bytes'] / MB:.1f}", f"{c['predicted_added_bytes'] / MB:.0f}", f"{res.added_mb:.0f}",
        ])
    lines += _md_table([
        "model", "forward GMAC", "attention share %", "GEMM GMAC/s (a)", "extra GEMM GMAC", "extra elementwise M",
        "elementwise G/s", "predicted extra time", "measured extra time", "q/k MB (2LND)", "fusions kept MB",
        "chunk heads c", "chunk MB (c(N²+P²))", "predicted added MB", "measured added MB",
    ], cm_rows) + [""]
    lines += findings(results)
    return "\n".join(lines) + "\n"


def findings(results: Sequence[ModelResult]) -> list[str]:
    """Data-driven notes on where time and memory go, from this run's numbers."""
    out = ["## Findings from this run", ""]
    for res in results:
        notes = []
        held, need = res.mem_field("cap", "qk_storage_bytes") / MB, res.mem_field("cap", "qk_tensor_bytes") / MB
        if need > 0 and held > 1.2 * need:  # False for NaN
            notes.append(f"capture keeps {held:.0f} MB of storage alive for {need:.0f} MB of q/k "
                         f"({held / need:.1f}x: the detached q/k views pin each layer's whole qkv output)")
        if res.change_keys and res.d_max > 3 * res.d_median:
            slow = max(res.change_keys, key=res.med)
            notes.append(f"the slowest control change is '{slow[2:]}' ({_ms(res.med(slow))} ms vs a median of "
                         f"{_ms(res.d_median)} ms)")
        if res.profile:
            tot = res.profile["total"]
            top = sorted(((v, k) for k, v in res.profile.items() if k != "total"), reverse=True)[:3]
            notes.append("largest stages of (b): " + ", ".join(f"{k} {100 * v / tot:.0f} %" for v, k in top))
        if notes:
            out.append(f"* **{res.spec.label}**: " + "; ".join(notes) + ".")
    return out + [""]


# ----------------------------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vizapp.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke test: vit_tiny at 64 px, 2 repeats")
    p.add_argument("--models", nargs="+", type=parse_spec, default=None,
                   help="timm names, optionally name@key=value,... (create_model kwargs); default: the issue's five")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per model (default 7; 2 with --quick)")
    p.add_argument("--large-repeats", type=int, default=3, help=f"repeats for models over {LARGE_MACS / 1e9:.0f} GMAC")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds before the repeats")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="markdown report (default docs/benchmarks.md)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    p.add_argument("--mem-repeats", type=int, default=None,
                   help="fresh subprocesses per memory measurement of (a) and (b); the median is reported "
                   "(default 3, 1 with --quick)")
    p.add_argument("--no-profile", action="store_true", help="skip the cProfile run of (b)")
    p.add_argument("--dataset-images", type=int, default=None,
                   help="images for the dataset-mode throughput (default 48; 8 with --quick; none with --models; "
                        "0 skips it)")
    p.add_argument("--_measure-mem", nargs=2, metavar=("STAGE", "MODEL"), dest="measure_mem", help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is available", file=sys.stderr)
        return 2
    if args.measure_mem:
        stage, label = args.measure_mem
        print(MEM_MARK + json.dumps(measure_memory_here(stage, parse_spec(label), args.device)), flush=True)
        return 0
    specs = args.models or [parse_spec(s) for s in (QUICK_MODELS if args.quick else DEFAULT_MODELS)]
    if args.repeats is None:
        args.repeats = 2 if args.quick else 7
    if args.mem_repeats is None:
        args.mem_repeats = 1 if args.quick else 3
    info = machine_info(args.device)
    img, image_desc = photo()
    print("\n".join(f"{k}: {v}" for k, v in info.items()), flush=True)
    t0 = time.perf_counter()
    results = []
    for spec in specs:
        results.append(run_model(spec, img, (args.repeats, args.large_repeats), args.warmup, args.device, args.threads,
                                 profile=not args.no_profile, memory=not args.no_memory,
                                 log=lambda s: print(s, flush=True), mem_repeats=args.mem_repeats))
    dataset = None
    # default: with the default or quick model set (a --models run measures only what it names)
    n_ds = args.dataset_images if args.dataset_images is not None else (
        0 if args.models else 8 if args.quick else 48)
    if n_ds > 0:
        ds_spec = parse_spec(QUICK_DATASET_MODEL if args.quick else DATASET_MODEL)
        dataset = run_dataset(ds_spec, img, n_ds, 4 if args.quick else 8, args.device,
                              log=lambda s: print(s, flush=True))
    wall = time.perf_counter() - t0
    with contextlib.suppress(OSError):
        info["load average at end (1/5/15 min)"] = "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    print()
    print("\n".join(_md_table(TABLE_COLUMNS, table_rows(results))))
    targets = evaluate_targets(results, dataset)
    if targets:
        print()
        print("\n".join(_md_table(["target", "model", "measured", ""], targets)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = render_markdown(results, info, args, image_desc, wall, dataset)
    if args.out.is_file():
        old = args.out.read_text(encoding="utf-8")
        if NOTES_MARKER in old:
            report += "\n" + old[old.index(NOTES_MARKER) :]
    args.out.write_text(report, encoding="utf-8")
    print(f"\nwrote {args.out} ({wall / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
