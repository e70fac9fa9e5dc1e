"""What vizapp's fused attention kernels ask of a GPU, found without one: ``python -m benchmarks.kernel_resources``.

Triton compiles a kernel for any NVIDIA target on a machine without a GPU: its front end and passes, then ``ptxas``,
which its wheel ships. For each target, head block and kernel, with the launch :mod:`vizapp.fused_attention` chooses
(``ROWS_TILES``, ``SUM_TILES``; ``--candidates``: other tiles too), this reports:

- the shared memory a block takes (Triton's metadata of the compiled kernel);
- the registers a thread uses and the bytes it spills to local memory (``ptxas -v`` on the kernel's PTX);
- how many blocks an SM then holds, by registers, shared memory and warps, against the target's limits.

The limits per compute capability are NVIDIA's (CUDA C++ Programming Guide, "Technical Specifications per Compute
Capability"): 65,536 registers an SM, at most 255 a thread, allocated 256 a warp at a time; the shared memory and
warps in :data:`TARGETS`. Triton must run without its interpreter (``TRITON_INTERPRET`` unset): the tests call this
module in a subprocess.

``--time`` (a CUDA device) times the candidates on the device instead, each kernel alone and the two together, against
torch's ``scaled_dot_product_attention`` (the bare forward's attention) of the same layer, medians of CUDA events.
Writes docs/benchmarks-kernels.md (``--out``), except with ``--time``, which only prints.
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "docs" / "benchmarks-kernels.md"


@dataclass(frozen=True)
class Target:
    """One compute capability: its most shared memory a block may take and an SM holds (KB), its most resident warps
    and blocks an SM, and GPUs of it."""

    cc: int
    block_smem_kb: int
    sm_smem_kb: int
    warps: int
    blocks: int
    gpus: str


TARGETS = (
    Target(75, 64, 64, 32, 16, "T4, RTX 20xx"),
    Target(80, 163, 164, 64, 32, "A100"),
    Target(86, 99, 100, 48, 16, "A10G, A40, RTX 30xx"),
    Target(89, 99, 100, 48, 24, "L4, L40S, RTX 40xx"),
    Target(90, 227, 228, 64, 32, "H100, H200"),
)

#: other launches (BLOCK_M, BLOCK_N, warps, stages) that ``--candidates`` and ``--time`` try beside the chosen ones
CANDIDATES = (
    (64, 64, 8, 3),
    (64, 64, 8, 1),
    (64, 32, 8, 1),
    (64, 32, 8, 2),
    (32, 64, 8, 2),
    (32, 32, 8, 1),
    (32, 32, 4, 1),
)

POINTERS = {"Q", "K", "V", "BIAS", "OUT", "M", "L", "ENT", "DIST", "D", "F"}
ACTIVATIONS = {"Q", "K", "V", "BIAS", "OUT"}  # the layer's own tensors, in the model's dtype


def _kernels():
    """The two kernels as Triton JIT functions (compiled, never interpreted)."""
    from triton.runtime.jit import JITFunction

    from vizapp import fused_attention

    if not fused_attention._triton() or fused_attention.interpreted():
        raise RuntimeError("needs Triton, without its interpreter (unset TRITON_INTERPRET)")
    return {
        "rows": JITFunction(fused_attention._rows_kernel),
        "head sum": JITFunction(fused_attention._head_sum_kernel),
    }


def compile_for(kernel, constexprs: dict, cc: int, warps: int, stages: int, dtype: str = "fp32") -> dict[str, int]:
    """Compile ``kernel`` for sm_``cc`` (32-bit integers; the layer's q, k, v, bias and output of ``dtype``, "fp32" or
    "bf16", the statistics fp32): shared bytes, registers, spilled bytes."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(kernel.arg_names)
    signature = {
        n: "constexpr"
        if n in constexprs
        else _pointer(n, dtype)
        if n in POINTERS
        else "fp32"
        if n == "scale"
        else "i32"
        for n in names
    }
    if "constexprs" in inspect.signature(ASTSource.__init__).parameters:  # Triton 3.3 and later
        source = ASTSource(kernel, signature, constexprs={(names.index(k),): v for k, v in constexprs.items()})
    else:  # Triton 3.2 (the version floors' torch 2.6)
        source = ASTSource(kernel, signature, constants=constexprs)
    compiled = triton.compile(
        source, target=GPUTarget("cuda", cc, 32), options={"num_warps": warps, "num_stages": stages}
    )
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    with tempfile.TemporaryDirectory() as folder:
        ptx = Path(folder) / "kernel.ptx"
        ptx.write_text(compiled.asm["ptx"])
        arch = f"sm_{cc}a" if cc >= 90 else f"sm_{cc}"
        said = subprocess.run([str(ptxas), f"-arch={arch}", "-v", str(ptx), "-o", os.devnull], capture_output=True,
                              text=True, check=True).stderr  # fmt: skip
    registers = re.search(r"Used (\d+) registers", said)
    spilled = re.search(r"(\d+) bytes spill stores", said)
    if registers is None or spilled is None:
        raise RuntimeError(f"ptxas said nothing of registers and spills:\n{said}")
    return {
        "shared": int(compiled.metadata.shared),
        "registers": int(registers.group(1)),
        "spilled": int(spilled.group(1)),
    }


def _pointer(name: str, dtype: str) -> str:
    return f"*{dtype}" if name in ACTIVATIONS else "*fp32"


def blocks_per_sm(target: Target, shared: int, registers: int, warps: int) -> int:
    """Resident blocks an SM holds of a kernel: the least of what its registers, shared memory and warps allow."""
    per_warp = -(-registers * 32 // 256) * 256
    by_registers = 65_536 // (per_warp * warps)
    by_shared = target.sm_smem_kb * 1024 // (shared + 1024) if shared else target.blocks  # 1 KB a block is reserved
    return min(by_registers, by_shared, target.warps // warps, target.blocks)


def resources(targets=TARGETS, candidates: bool = False, widths=None, dtype: str = "fp32") -> list[dict]:
    """One row per (kernel, head block, bias, launch, target), in that order."""
    from vizapp import fused_attention

    kernels = _kernels()
    tiles = {"rows": fused_attention.ROWS_TILES, "head sum": fused_attention.SUM_TILES}
    rows = []
    for block_d, name, bias in itertools.product(widths or sorted(tiles["rows"]), tiles, (False, True)):
        chosen = tiles[name][block_d]
        launches = [chosen] + ([c for c in CANDIDATES if c != chosen] if candidates else [])
        for launch, target in itertools.product(launches, targets):
            m, n, warps, stages = launch
            constexprs = {"BLOCK_M": m, "BLOCK_N": n, "BLOCK_D": block_d, "HAS_BIAS": bias}
            if name == "rows":
                constexprs |= {"ENTROPY": True, "DISTANCE": True}
            got = compile_for(kernels[name], constexprs, target.cc, warps, stages, dtype)
            fits = got["shared"] <= target.block_smem_kb * 1024
            blocks = blocks_per_sm(target, got["shared"], got["registers"], warps) if fits else 0
            rows.append({"kernel": name, "block_d": block_d, "bias": bias, "launch": launch, "chosen": launch == chosen,
                         "cc": target.cc, **got, "fits": fits, "blocks": blocks, "dtype": dtype})  # fmt: skip
    return rows


def markdown(rows: list[dict], argv: list[str], seconds: float) -> str:
    import triton

    lines = [
        "# The fused attention kernels' resources on each GPU target",
        "",
        f"Generated by `python -m benchmarks.kernel_resources {' '.join(argv)}`".rstrip() + f" on a machine without a "
        f"GPU (Triton {triton.__version__}, {seconds:.0f} s); edit the code, not this file.",
        "",
        "Each kernel of `vizapp/fused_attention.py` compiled by Triton for each target, the layer's tensors of "
        f"{'bfloat16' if rows and rows[0]['dtype'] == 'bf16' else 'float32'} and the statistics float32, the rows "
        "kernel with the entropy and the distance. Launch: BLOCK_M x BLOCK_N tiles, warps, pipeline stages (chosen: "
        "`ROWS_TILES` and `SUM_TILES`). Shared: Triton's metadata. Registers a thread and bytes spilled to local "
        "memory: `ptxas -v`. Blocks an SM: the least of what the registers (65,536 an SM, allocated 256 a warp), "
        "the shared memory (with 1 KB reserved a block) and the warps allow, 0 where the block's shared memory "
        "exceeds the target's most (CUDA C++ Programming Guide, technical specifications per compute capability).",
        "",
        "Targets: " + "; ".join(f"sm_{t.cc} ({t.gpus}): {t.block_smem_kb} KB a block" for t in TARGETS) + ".",
        "",
        "| kernel | head block | bias | launch | chosen | target | shared KB | registers | spilled bytes | blocks an SM |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        m, n, warps, stages = r["launch"]
        lines.append(
            f"| {r['kernel']} | {r['block_d']} | {'yes' if r['bias'] else 'no'} | {m} x {n}, {warps} warps, "
            f"{stages} stage{'s' if stages > 1 else ''} | {'yes' if r['chosen'] else ''} | sm_{r['cc']} | "
            f"{r['shared'] / 1024:.0f} | {r['registers']} | {r['spilled']} | {r['blocks'] if r['fits'] else 'does not fit'} |"
        )
    return "\n".join(lines) + "\n"


LAYOUTS = {  # name: images, heads, grid side, prefix tokens, patch size
    "ViT-B/16 at 224 px": (1, 12, 14, 1, 16),
    "ViT-B/16 at 224 px, 16 images": (16, 12, 14, 1, 16),
    "ViT-L/16 at 384 px": (1, 16, 24, 1, 16),
    "DINOv2-L/14 at 518 px (registers)": (1, 16, 37, 5, 14),
}


def time_on_device(repeats: int = 20, device: str = "cuda", layouts=None, launches=None) -> str:
    """The candidates' device time on this CUDA device, per layer, against torch's attention of the same layer
    (``device="cpu"``: wall time through Triton's interpreter, for the tests)."""
    import torch
    import torch.nn.functional as F

    from vizapp import fused_attention
    from vizapp.analysis.distance import patch_distance_matrix

    layouts = LAYOUTS if layouts is None else layouts
    cuda = device == "cuda"
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)] if cuda else []

    def timed(fn) -> float:
        for _ in range(3):
            fn()
        times = []
        for _ in range(repeats):
            if cuda:
                ev[0].record()
                fn()
                ev[1].record()
                torch.cuda.synchronize()
                times.append(ev[0].elapsed_time(ev[1]))
            else:
                t0 = time.perf_counter()
                fn()
                times.append(1e3 * (time.perf_counter() - t0))
        return statistics.median(times)

    name_of_device = torch.cuda.get_device_name(0) if cuda else "the CPU (Triton's interpreter)"
    lines = [
        f"Fused kernels against torch's attention on {name_of_device} (float32, medians of {repeats} "
        f"CUDA-event timings; Triton {__import__('triton').__version__}); 'both' is the rows and head-sum kernels of "
        "one layer, as an analysis launches them.",
        "",
        "| layer | launch (rows and head sum alike) | SDPA ms | rows ms | head sum ms | both ms | both / SDPA |",
        "|---|---|---|---|---|---|---|",
    ]
    saved = dict(fused_attention.ROWS_TILES), dict(fused_attention.SUM_TILES)
    try:
        for name, (b, h, g, p, patch) in layouts.items():
            n = p + g * g
            q, k, v = (torch.randn(b, n, 3, h, 64, device=device) * 1.5).permute(2, 0, 3, 1, 4)
            dist = patch_distance_matrix(g, patch).to(device)
            ent, dst = torch.empty(b, h, n, device=device), torch.empty(b, h, n - p, device=device)
            head_sum = torch.empty(b, n, n, device=device)
            sdpa = timed(lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v))
            for launch in dict.fromkeys((saved[0][64], *(CANDIDATES if launches is None else launches))):
                fused_attention.ROWS_TILES[64] = fused_attention.SUM_TILES[64] = launch
                rows = {"entropy": ent, "distance": dst}
                args = (q, k, v, 0.125, rows, dist, p)
                if fused_attention.attention(*args) is None or fused_attention.attention(*args, head_sum) is None:
                    lines.append(f"| {name} | {launch} | {sdpa:.3f} | failed: {fused_attention.failure()} | | | |")
                    fused_attention._declined.clear()
                    continue
                alone = timed(lambda args=args: fused_attention.attention(*args))
                both = timed(lambda args=args, hs=head_sum: fused_attention.attention(*args, hs))
                lines.append(
                    f"| {name} | {launch} | {sdpa:.3f} | {alone:.3f} | {both - alone:.3f} | {both:.3f} | "
                    f"{both / sdpa:.2f} |"
                )
    finally:
        fused_attention.ROWS_TILES.update(saved[0])
        fused_attention.SUM_TILES.update(saved[1])
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m benchmarks.kernel_resources", description=__doc__.split("\n")[0])
    p.add_argument("--targets", nargs="+", type=int, default=[t.cc for t in TARGETS], help="compute capabilities")
    p.add_argument("--widths", nargs="+", type=int, default=None, help="head blocks (default: every chosen one)")
    p.add_argument("--candidates", action="store_true", help="compile the other candidate launches too")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="the layer's q, k, v and output")
    p.add_argument("--check", action="store_true", help="exit 1 where a chosen launch spills or does not fit")
    p.add_argument("--time", action="store_true", help="time the candidates on this CUDA device (prints only)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    if args.time:
        print(time_on_device(args.repeats))
        return 0
    targets = [t for t in TARGETS if t.cc in args.targets]
    t0 = time.perf_counter()
    rows = resources(targets, args.candidates, args.widths, args.dtype)
    text = markdown(rows, argv, time.perf_counter() - t0)
    print(text)
    bad = [r for r in rows if r["chosen"] and (r["spilled"] or not r["fits"])]
    if args.check:
        for r in bad:
            print(f"chosen launch {r['launch']} of the {r['kernel']} kernel, head block {r['block_d']}, bias "
                  f"{r['bias']}, sm_{r['cc']}: {r['spilled']} bytes spilled, {r['shared']} shared", file=sys.stderr)  # fmt: skip
        return 1 if bad else 0
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
