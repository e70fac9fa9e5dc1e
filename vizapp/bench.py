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
    "model", "tokens N", "layers L", "heads H", "a ms", "b ms", "c ms", "d ms", "d max ms", "b/a", "c/a", "d/a",
    "max fig JSON kB", "peak mem a MB", "peak mem b MB", "added MB", "repeats",
)
FUSED_CACHE_LIMIT_BYTES = 64 * 2**20  # mirrors vizapp.pipeline's limit; read from there when it exists


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


def _fused_limit() -> int:
    try:
        from vizapp import pipeline

        return int(getattr(pipeline, "FUSED_CACHE_LIMIT_BYTES", FUSED_CACHE_LIMIT_BYTES))
    except ImportError:
        return FUSED_CACHE_LIMIT_BYTES


def cost_model(s: Shape, batch: int = 1) -> dict[str, float]:
    """Predicted work (MACs, elementwise passes) and bytes (fp32) of the forward and of the analysis.

    Forward, per layer and image: qkv 3·N·D², q kᵀ N²·D, A v N²·D, proj N·D², MLP 2·N·D·M (M = 4D) -> with M = 4D
    12·N·D² + 2·N²·D; plus the patch embedding P·(C·p²)·D and the head D·K once.

    Analysis, per layer and image: q kᵀ again (N²·D MACs; SDPA never materialises the weights), softmax (~3 passes
    over H·N²), distance weighting over the patches (~4 passes over H·P²), head fusion (F passes over H·N²; F = 3
    fusions while L·N²·4 B fit the fused cache, else 1) and, for the default rollout, one N x N matrix product in
    float64 per layer (N³ MACs at about half the fp32 rate, so counted twice).
    """
    n, p, L, h, d, m = s.tokens, s.patches, s.layers, s.heads, s.width, s.mlp_hidden
    fwd_layer = 4 * n * d * d + 2 * n * d * m + 2 * n * n * d
    fwd = batch * (L * fwd_layer + p * s.in_chans * s.patch_pixels * d + d * s.num_classes)
    n_fusions = 3 if L * n * n * 4 <= _fused_limit() else 1
    gemm_extra = batch * L * (n * n * d + 2 * n**3)  # q kᵀ + float64 rollout product (x2)
    elementwise = batch * L * (3 * h * n * n + 4 * h * p * p + n_fusions * h * n * n)
    f32 = 4
    qk_needed = 2 * L * n * d * f32 * batch
    qkv_retained = 3 * L * n * d * f32 * batch  # what capture's detached views keep alive (the whole qkv output)
    fused = n_fusions * L * n * n * f32
    transient = 3 * h * n * n * f32  # scores + softmax output + distance temporaries, one layer
    loop_peak = qkv_retained + fused + transient
    end_peak = qkv_retained + fused + qk_needed + fused  # + q, k copies + torch.stack of the fused lists
    return {
        "forward_macs": float(fwd),
        "forward_attn_macs": float(batch * L * 2 * n * n * d),
        "extra_gemm_macs": float(gemm_extra),
        "extra_elementwise": float(elementwise),
        "extra_fraction": gemm_extra / fwd,
        "n_fusions": float(n_fusions),
        "qk_needed_bytes": float(qk_needed),
        "qkv_retained_bytes": float(qkv_retained),
        "fused_bytes": float(fused),
        "transient_bytes": float(transient),
        "predicted_added_bytes": float(max(loop_peak, end_peak)),
        "ideal_added_bytes": float(qk_needed + fused + h * n * n * f32 / max(1, h)),
        "forward_activation_bytes": float(batch * n * max(3 * d, m) * f32 * 2),
    }


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
    """(label, profile keys, which callers count) of the stages of (b).

    Callers: "any"; "pipeline" (calls made from vizapp/pipeline.py only, for builtins that timm also uses); or
    "not-row" (any caller but ``Analysis.attention_row``, which belongs to the per-head maps). Functions that do not
    exist in the measured version of the code simply count 0; no stage is nested in another.
    """
    from timm.models.vision_transformer import VisionTransformer

    from vizapp import capture, pipeline

    distance = importlib.import_module("vizapp.analysis.distance")
    rollout = importlib.import_module("vizapp.analysis.rollout")  # the package re-exports a function of that name
    forward = type(vm.model).forward if isinstance(vm.model, VisionTransformer) else vm.model.forward
    fusion = [_code_key(getattr(rollout, "fuse_heads", None))] + [
        _method(m) for m in ("sum", "amax", "amin", "mean")
    ] + [_builtin(f"<built-in method torch.{m}>", f"<built-in method {m} ") for m in ("maximum", "minimum")]
    return [
        ("preprocessing (vm.transform)", [_code_key(vm.transform)], "any"),
        ("forward with capture hooks", [_code_key(forward)], "any"),
        ("attention recompute softmax(q kᵀ)", [_code_key(capture.attention_from_qk)], "not-row"),
        ("mean distance (head_distances)", [_code_key(distance.head_distances)], "any"),
        ("head fusion (mean/max/min over heads)", fusion, "pipeline"),
        ("rollout (rollout_fused / rollout_row / add_residual)",
         [_code_key(getattr(rollout, n, None)) for n in ("rollout_fused", "rollout_row", "add_residual")], "pipeline"),
        ("q/k copies (.contiguous)", [_method("contiguous")], "pipeline"),
        ("torch.stack / torch.cat (fused, distances)",
         [_builtin("<built-in method torch.stack>", "<built-in method stack "),
          _builtin("<built-in method torch.cat>", "<built-in method cat ")], "pipeline"),
        ("model_view (uint8 image)", [_code_key(pipeline.model_view)], "any"),
        ("per-head maps (r.attention)", [_code_key(pipeline.Analysis.attention)], "any"),
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
    for label, keys, who in stages:
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
    out["other (Python glue, top-k, hooks, ...)"] = max(0.0, total - sum(out.values()))
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
    mem: dict[str, dict[str, Any]] = field(default_factory=dict)
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
        return self.mem[stage]["peak_bytes"] / MB if stage in self.mem else float("nan")

    @property
    def added_mb(self) -> float:
        return self.mem_mb("b") - self.mem_mb("a")


def _timed(fn: Callable[..., Any], *args: Any) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t0, out


def _render_json(change: Callable[[Any], Any], r: Any) -> dict[str, int]:
    return _figures_json({"fig": change(r)})


def run_model(
    spec: ModelSpec, img: Image.Image, repeats: int | tuple[int, int], warmup: int, device: str, threads: int | None,
    profile: bool = True, memory: bool = True, log: Callable[[str], None] = print,
) -> ModelResult:
    """Time stages (a)-(d) with interleaved repeats, then profile (b) and measure memory in subprocesses.

    Args:
        repeats: timed repeats, or (repeats, repeats for models over :data:`LARGE_MACS`).
    """
    from vizapp.models import MODEL_CACHE

    vm = spec.load(device)
    shape = model_shape(vm)
    cost = cost_model(shape)
    if isinstance(repeats, tuple):
        repeats = repeats[0] if cost["forward_macs"] <= LARGE_MACS else min(repeats)
    res = ModelResult(spec=spec, shape=shape, repeats=repeats, cost=cost)
    log(f"{spec.label}: N={shape.tokens} tokens ({shape.prefix} prefix + {shape.patches} patches), "
        f"L={shape.layers}, H={shape.heads}, D={shape.width}; {repeats} repeats after {warmup} warm-up")
    t0 = time.perf_counter()
    pos_sim = vm.pos_similarity()
    res.pos_sim_s = time.perf_counter() - t0
    for key in ("a", "b", "c"):
        res.times[key] = []
    r_cache: dict = {}
    r = None
    for i in range(warmup + repeats):
        order = ("a", "b") if i % 2 == 0 else ("b", "a")
        for key in order:
            if key == "a":
                ta, _ = _timed(stage_a, vm, img)
            else:
                tb, r = _timed(stage_b, vm, img)
                r_cache = dict(r._cache)
        tc, sizes = _timed(stage_c, r, pos_sim)
        tds = {}
        for name, fn in control_changes(r).items():
            tds[name], _ = _timed(_render_json, fn, fresh_copy(r, r_cache))
        if i >= warmup:
            res.times["a"].append(ta)
            res.times["b"].append(tb)
            res.times["c"].append(tc)
            for name, t in tds.items():
                res.times.setdefault(f"d:{name}", []).append(t)
            res.fig_json = sizes
        log(f"  {'warm-up' if i < warmup else f'repeat {i - warmup + 1}'}: a {ta * 1e3:.1f} ms, b {tb * 1e3:.1f} ms, "
            f"c {tc * 1e3:.1f} ms, d " + "/".join(f"{t * 1e3:.1f}" for t in tds.values()) + " ms")
    if profile:
        res.profile = profile_b(vm, img)
    del r, vm
    MODEL_CACHE.clear()
    gc.collect()
    if memory:
        for stage in ("a", "cap", "b"):
            res.mem[stage] = measure_memory(spec, stage, device, threads)
        log(f"  peak memory above loaded model: a {res.mem_mb('a'):.1f} MB, capture only {res.mem_mb('cap'):.1f} MB,"
            f" b {res.mem_mb('b'):.1f} MB")
    return res


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
            f"{res.med('b') / a:.3f}", f"{res.med('c') / a:.3f}", f"{res.d_median / a:.3f}",
            f"{max(res.fig_json.values(), default=0) / 1e3:.1f}",
            f"{res.mem_mb('a'):.1f}", f"{res.mem_mb('b'):.1f}", f"{res.added_mb:.1f}", str(res.repeats),
        ])
    return rows


def _find(results: Sequence[ModelResult], name: str, **kwargs: Any) -> ModelResult | None:
    for res in results:
        if res.spec.name == name and all(dict(res.spec.kwargs).get(k) == v for k, v in kwargs.items()):
            return res
    return None


def evaluate_targets(results: Sequence[ModelResult]) -> list[list[str]]:
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

**(b) extra analysis work, per image** (what `analyze` adds on top of the same forward):

* recompute the weights, since SDPA never returns them: q kᵀ = H·N²·(D/H) = N²·D MACs per layer (half the forward's
  attention term), then softmax: ~3 passes over H·N² elements;
* mean attention distance: renormalise and weight by the P×P pixel distances: ~4 passes over H·P² elements;
* head fusion: F passes over H·N² (F = 3 fusions, mean/max/min, while L·N²·4 B fits the 64 MiB fused cache, else 1);
* rollout (default settings, computed eagerly): one N×N·N×N product per layer in float64 = N³ MACs per layer at
  about half the fp32 rate, counted here as 2·N³;
* memory: q and k of every layer (2·L·N·D floats) are what the analysis needs to keep, but as implemented the
  capture hooks keep *detached views* of q and k, which share storage with each layer's whole qkv projection output,
  so 3·L·N·D floats stay alive until `analyze` returns, and `analyze` then makes contiguous copies (2·L·N·D more);
  the fused matrices, F·L·N² floats, exist twice at the end (per-layer list + `torch.stack`); the transient of one
  layer is ~3·H·N² floats (scores, softmax output, distance temporaries).

So the extra time fraction is ≈ (N²·D + 2·N³)/(12·N·D² + 2·N²·D) in GEMM terms (plus memory-bound passes over
H·N²): it grows ~linearly with N/D while N ≪ D and like N²/D² once the N³ rollout term dominates (N > D/2). It does
not depend on L (both sides are per layer) and falls slowly with H only through the elementwise passes. Added memory
grows as L·N·D (q/k) + L·N² (fused) + H·N² (one layer), i.e. quadratically in N: for the 1,374-token model the
L·N·D terms are the largest, for long sequences (N > D) the L·N² fused term takes over.

Measured RSS can exceed these tensor-level counts: glibc's dynamic mmap threshold serves blocks up to 32 MB from the
heap, and blocks freed during the forward that sit between long-lived q/k blocks cannot be returned to the system,
so they stay resident (fragmentation), and the first forward in a process also maps library code and one-off
buffers (in both (a) and (b)).
"""


METHOD_TEXT = """\
## Method

* Input: {image}, batch 1, fp32, device `{device}`.
* All stages of one model run in one process; each repeat runs (a) and (b) (order alternating between repeats),
  then (c) and (d), so load changes hit all stages alike. Times are medians over the repeats after {warmup} warm-up
  round(s); ratios are ratios of those medians (the medians of the per-repeat paired ratios are in the details).
* (a) `vm.transform(photo)` + `vm.model(x)` under `torch.no_grad()`, timm's fused attention (SDPA).
* (b) `vizapp.analyze(vm, photo)` (forward with q/k capture, top-5, mean attention distance, head fusions, rollout)
  + `r.attention(last_layer)` (per-head CLS maps).
* (c) `views.render_all(r, pos_sim, Controls())` and `fig.to_json()` of every figure it returns (the query image is
  a numpy array: built, not serialised). `vm.pos_similarity()` is computed once per model outside the timing (see
  details).
* (d) build + `to_json` of the one figure that changes after a control change, from a copy of the analysis with its
  cache as `analyze` left it: rollout with head fusion `max`, the heads mosaic of another layer, the heads mosaic for
  a query patch. `d ms` is the median over the changes, `d max ms` the slowest change.
* Peak memory: each of (a), a capture-only forward and (b) once in a fresh subprocess
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
                                 large_repeats=args.large_repeats, large_gmac=LARGE_MACS / 1e9)]
    lines += ["## Results", ""] + _md_table(TABLE_COLUMNS, table_rows(results)) + [""]
    target_rows = evaluate_targets(results)
    if target_rows:
        lines += ["## Targets from the issue", ""] + _md_table(["target", "model", "measured", ""], target_rows) + [""]
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
                "`capture only`: a forward inside `AttentionCapture` with the capture kept alive. `q/k storage held` "
                "is the bytes of the distinct storages the captured q and k tensors keep alive, `q/k needed` the bytes "
                "of the q and k tensors themselves."
            ),
            "",
        ]
        lines += _md_table(["model", "peak a MB", "peak capture-only MB", "peak b MB", "q/k storage held MB",
                            "q/k needed MB", "baseline RSS after load MB"], [
            [res.spec.label, f"{res.mem_mb('a'):.1f}", f"{res.mem_mb('cap'):.1f}", f"{res.mem_mb('b'):.1f}",
             f"{res.mem.get('cap', {}).get('qk_storage_bytes', float('nan')) / MB:.1f}",
             f"{res.mem.get('cap', {}).get('qk_tensor_bytes', float('nan')) / MB:.1f}",
             f"{res.mem.get('a', {}).get('baseline_bytes', float('nan')) / MB:.0f}"]
            for res in results if res.mem
        ]) + [""]
    if any(res.profile for res in results):
        lines += ["### Where the time of (b) goes (one cProfile'd run, cumulative ms per stage)", "",
                  "cProfile adds some overhead to the Python-heavy parts; the stages do not overlap.", ""]
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
        ("Predicted extra time = the extra GEMM MACs over the forward's MACs (elementwise passes not counted); "
        "measured = b/a − 1. Predicted added memory = the peak of the analysis as implemented (max of the last "
        "layer's loop state and the end state, see above); `ideal` = q/k (2·L·N·D) + fused matrices once + one "
        "head's transient."),
        "",
    ]
    cm_rows = []
    for res in results:
        c = res.cost
        measured_eff = c["forward_macs"] / res.med("a") / 1e9
        cm_rows.append([
            res.spec.label, f"{c['forward_macs'] / 1e9:.2f}", f"{100 * c['forward_attn_macs'] / c['forward_macs']:.1f}",
            f"{measured_eff:.0f}", f"{c['extra_gemm_macs'] / 1e9:.2f}", f"{c['extra_elementwise'] / 1e6:.1f}",
            f"{100 * c['extra_fraction']:.1f} %", f"{100 * (res.med('b') / res.med('a') - 1):.1f} %",
            f"{c['qk_needed_bytes'] / MB:.1f}", f"{c['fused_bytes'] / MB:.1f}", f"{c['transient_bytes'] / MB:.1f}",
            f"{c['predicted_added_bytes'] / MB:.0f}", f"{res.added_mb:.0f}", f"{c['ideal_added_bytes'] / MB:.0f}",
        ])
    lines += _md_table([
        "model", "forward GMAC", "attention share %", "achieved GMAC/s (a)", "extra GEMM GMAC", "extra elementwise M",
        "predicted extra time", "measured extra time", "q/k MB (2LND)", "fused MB (F·L·N²)", "one layer transient MB",
        "predicted added MB", "measured added MB", "ideal added MB",
    ], cm_rows) + [""]
    lines += findings(results)
    return "\n".join(lines) + "\n"


def findings(results: Sequence[ModelResult]) -> list[str]:
    """Data-driven notes on where time and memory go, from this run's numbers."""
    out = ["## Findings from this run", ""]
    for res in results:
        notes = []
        cap = res.mem.get("cap", {})
        if cap.get("qk_storage_bytes") and cap.get("qk_tensor_bytes"):
            held, need = cap["qk_storage_bytes"] / MB, cap["qk_tensor_bytes"] / MB
            if held > 1.2 * need:
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
    p.add_argument("--no-profile", action="store_true", help="skip the cProfile run of (b)")
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
    info = machine_info(args.device)
    img, image_desc = photo()
    print("\n".join(f"{k}: {v}" for k, v in info.items()), flush=True)
    t0 = time.perf_counter()
    results = []
    for spec in specs:
        results.append(run_model(spec, img, (args.repeats, args.large_repeats), args.warmup, args.device, args.threads,
                                 profile=not args.no_profile, memory=not args.no_memory,
                                 log=lambda s: print(s, flush=True)))
    wall = time.perf_counter() - t0
    print()
    print("\n".join(_md_table(TABLE_COLUMNS, table_rows(results))))
    targets = evaluate_targets(results)
    if targets:
        print()
        print("\n".join(_md_table(["target", "model", "measured", ""], targets)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = render_markdown(results, info, args, image_desc, wall)
    if args.out.is_file():
        old = args.out.read_text(encoding="utf-8")
        if NOTES_MARKER in old:
            report += "\n" + old[old.index(NOTES_MARKER) :]
    args.out.write_text(report, encoding="utf-8")
    print(f"\nwrote {args.out} ({wall / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
