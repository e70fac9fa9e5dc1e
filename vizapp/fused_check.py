"""The check that each compile of the fused attention kernels (:mod:`vizapp.fused_attention`) computes what they
should on the device that runs them, before their first use there.

The kernels are the default route on any CUDA device, and nothing else would show a compiler or device that gets them
wrong: the analysis would change without a sign. Triton compiles them once per variant (its constexpr flags, the
pointers' dtypes, the integers equal to 1 or divisible by 16), so a bfloat16 model's kernels, a 128-wide head's or a
layer's without the head sum are other programs than the float32 ones most ViTs run. Each is therefore checked at its
first use on a device, on a small layer that the same compile serves, against the attention formed in float64
(:func:`reference`); a miscomputation turns every kernel off for the process (:func:`vizapp.fused_attention.failure`).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch

from vizapp import fused_attention

_passed: dict[tuple, bool] = {}  # (device, CheckLayer) -> that compile of the kernels passed self_check there
_check_lock = threading.Lock()


@dataclass(frozen=True)
class CheckLayer:
    """What one compile of the kernels is specialised on (Triton compiles a kernel for each set of its constexpr
    flags, pointer dtypes, and integers equal to 1 or multiples of 16), which :func:`self_check` mirrors in a small
    layer: a bfloat16 model's kernels, or a 128-wide head's, are other compiles than the float32 64-wide ones."""

    dtype: torch.dtype = torch.float32  # q's, k's and v's
    heads: int = 3  # 1 where the layer has one head, else 3
    head_dim: int = 64
    prefix: int = 1
    aligned: bool = False  # the layer's token count is a multiple of 16
    entropy: bool = True
    distance: bool = True
    head_sum: bool = True
    bias: torch.dtype | None = None  # the bias's dtype; None: no bias
    dist: torch.dtype = torch.float32  # the patch distances'

    @classmethod
    def of(
        cls, q: torch.Tensor, rows: dict[str, torch.Tensor], dist: torch.Tensor | None, prefix: int, head_sum: bool,
        bias: torch.Tensor | None,
    ) -> CheckLayer:  # fmt: skip
        """The check of the compile that a launch for layer ``q`` [B, H, N, d] with these arguments uses."""
        _, h, n, d = q.shape
        return cls(
            q.dtype, 1 if h == 1 else 3, d, prefix, n % 16 == 0, "entropy" in rows, "distance" in rows, head_sum,
            None if bias is None else bias.dtype, torch.float32 if dist is None else dist.dtype,
        )  # fmt: skip

    @property
    def variant(self) -> tuple:
        """The key of :data:`_declined`: (head block, entropy, distance, a bias, head sum)."""
        return (fused_attention.block(self.head_dim), self.entropy, self.distance, self.bias is not None, self.head_sum)

    def __str__(self) -> str:
        heads = f"{self.heads} head{'s' if self.heads != 1 else ''}"
        said = [f"{str(self.dtype).removeprefix('torch.')}, {heads} of {self.head_dim}"]
        said += [name.replace("_", " ") for name in ("entropy", "distance", "head_sum") if getattr(self, name)]
        return ", ".join(said + ([f"a {str(self.bias).removeprefix('torch.')} bias"] if self.bias else []))


def checked(device: torch.device, layer: CheckLayer) -> bool:
    """The compile ``layer`` describes passed :func:`self_check` on ``device`` (run at its first use there, once a
    process); False while a CUDA graph is being recorded before that check (it would wait on the device: the
    attention is then formed; the graph's eager warm-up run has usually checked it already). A compile that fails the
    check turns every kernel off for the process; one that fails to compile or launch in the check is only declined,
    as a real launch's failure is (:func:`vizapp.fused_attention.declined`)."""
    if device.type == "cuda" and torch.cuda.is_available() and not fused_attention.interpreted():
        device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
        if (str(device), layer) not in _passed and torch.cuda.is_current_stream_capturing():
            return False
    else:  # Triton's interpreter, on the host (tests/devicesim's simulated GPU too)
        device = torch.device("cpu")
    key = ("interpret" if device.type == "cpu" else str(device), layer)
    if key in _passed:
        return _passed[key] and not fused_attention.turned_off()
    with _check_lock:
        if key not in _passed:
            try:
                problem = self_check(device, layer)
            except Exception as error:  # noqa: BLE001  (the check itself failed: the attention is formed)
                problem = f"the check raised {type(error).__name__}: {error}"
            if problem is not None and fused_attention.declined(layer.variant):
                return False  # it did not compile or launch there: declined, not miscomputed
            _passed[key] = problem is None
            if problem is not None:
                fused_attention.turn_off(RuntimeError(f"self-check on {key[0]} ({layer}): {problem}"))
    return _passed[key] and not fused_attention.turned_off()


def checked_compiles() -> str:
    """What this process's checks found, for a run's report: how many compiles passed on which devices, and each that
    failed with its layer."""
    passed = sorted({device for (device, _), ok in _passed.items() if ok})
    count = sum(_passed.values())
    said = f"{count} compile{'s' if count != 1 else ''} checked and passed" + (
        f" on {', '.join(passed)}" if passed else ""
    )
    failed = [f"{device} ({layer})" for (device, layer), ok in _passed.items() if not ok]
    return said + (f"; failed: {'; '.join(failed)}" if failed else "")


def self_check(device: torch.device, layer: CheckLayer = CheckLayer()) -> str | None:
    """Run both kernels' compile for ``layer`` on a small layer on ``device`` and compare every result with float64's
    on the host: None where each agrees to 1e-4 (the output to its dtype's rounding besides), else what differed and
    by how much.

    The small layer: 2 images, ``layer.heads`` heads of ``layer.head_dim``, its prefix tokens before a row of patches,
    69 tokens (a last tile of queries and of keys with 5 rows; 80 where the model's count is a multiple of 16; more
    for a long prefix); with a bias when ``layer`` has one, that masks every key but the last 5 for some rows. The
    default is the float32 compile without a bias that most ViTs use. A compiler or device that computes the kernels
    wrongly, which only a GPU run would otherwise show, thus turns them off before an analysis uses them. On a GPU it
    costs the compilation for that layer (Triton keeps it in its on-disk cache; it is usually the one the analysis
    launches next) and a few milliseconds."""
    from vizapp.analysis.distance import patch_distance_matrix

    gen = torch.Generator().manual_seed(20261207)
    b, h, d, prefix = 2, layer.heads, layer.head_dim, layer.prefix
    n = 16 * max(4, -(-(prefix + 5) // 16)) + (0 if layer.aligned else 5)
    q, k, v = ((torch.randn(b, h, n, d, generator=gen) * 1.5).to(layer.dtype) for _ in range(3))
    bias = torch.randn(1, h, n, n, generator=gen)
    dist = patch_distance_matrix((1, n - prefix), 16).to(layer.dist)
    scale = d**-0.5
    output_tolerance = max(1e-4, torch.finfo(layer.dtype).eps)  # the output is rounded to q's dtype
    if layer.bias is None:
        bias = None
    else:
        bias[:, :, 10:20, : n - 5] = float("-inf")  # these rows see only the last 5 keys: whole key tiles masked first
        bias = bias.to(layer.bias)
    rows = {
        name: torch.full(shape, float("nan"), device=device)
        for name, shape in (("entropy", (b, h, n)), ("distance", (b, h, n - prefix)))
        if getattr(layer, name)
    }
    head_sum = torch.full((b, n, n), float("nan"), device=device) if layer.head_sum else None
    moved = [None if t is None else t.to(device) for t in (q, k, v, dist, bias)]
    with torch.autocast(device.type, enabled=False):
        out = fused_attention.launch(*moved[:3], scale, rows, moved[3], prefix, head_sum, moved[4])
    if out is None:
        return f"the kernels did not run ({fused_attention.failure()})"
    got = {"output": out, "head sum": head_sum, **rows}
    for name, want in reference(q, k, v, scale, dist, prefix, bias).items():
        if got.get(name) is not None:
            have = got[name].detach().double().cpu()
            error = (have - want).abs().div(want.abs().clamp(min=1.0)).nan_to_num(nan=math.inf).max().item()
            if not error <= (output_tolerance if name == "output" else 1e-4):
                return f"the {name} differs from float64's by {error:.3g} (relative)"
    return None


def reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    dist: torch.Tensor,
    num_prefix_tokens: int,
    bias: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """What the kernels compute, from the attention formed in float64: "output" [B, H, N, d], "entropy" [B, H, N],
    "distance" [B, H, P] (the patch queries' rows) and "head sum" [B, N, N]."""
    s = q.double() @ k.double().transpose(-1, -2) * scale
    a = torch.softmax(s if bias is None else s + bias.double(), dim=-1)
    patches = a[:, :, num_prefix_tokens:, num_prefix_tokens:]
    return {
        "output": a @ v.double(),
        "entropy": torch.special.entr(a).sum(-1),
        "distance": (patches * dist.double()).sum(-1) / patches.sum(-1),
        "head sum": a.sum(1),
    }
