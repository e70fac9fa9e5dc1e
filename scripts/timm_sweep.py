"""Which timm architectures vizapp analyses, and whether its attention is timm's own: one random-weight build per
family, into docs/timm-sweep.md.

    python scripts/timm_sweep.py [--out docs/timm-sweep.md] [--names NAME ...]

Each architecture is built by ``vizapp.load_model(name, pretrained=False)`` at two layers where its constructor takes
``depth`` (``depths=(1, 1, 1, 1)`` for the hierarchical ones, else as it is), and either refused, with the message a
user sees, or analysed on one random 150x190 image. For a plain (non-windowed) model the captured attention of every
layer is compared with timm's own: a copy of the model whose attention modules (those with ``fused_attn`` and an
``attn_drop``) compute attention explicitly, read at ``attn_drop``'s input (the reference of tests/test_families.py).
Three maps must come out finite (rollout; gradient rollout and relevance for a model with classes). An exception that
is not one of vizapp's own errors is a bug: the script lists it and exits with 1.

Families: one representative (a small one where the name says so) of every timm model module whose source mentions
attention, and a list of the plain ViT variants whose token bookkeeping differs (registers, no CLS, distillation
token, MAP head, parallel blocks, ...).
"""

from __future__ import annotations

import argparse
import copy
import inspect
import re
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout: the package is not installed

import vizapp  # noqa: E402
from vizapp.errors import VizappError  # noqa: E402
from vizapp.models import MODEL_CACHE  # noqa: E402

#: Plain ViT variants of timm's vision_transformer module (and deit's), whose bookkeeping differs from one another.
VIT_VARIANTS = [
    "vit_tiny_patch16_224",
    "vit_small_patch16_384",
    "vit_small_patch8_224",
    "deit_tiny_distilled_patch16_224",  # distillation token
    "deit3_small_patch16_224",  # no_embed_class
    "vit_small_patch14_dinov2",
    "vit_small_patch14_reg4_dinov2",  # registers
    "vit_base_patch16_clip_224",  # pre-norm
    "vit_base_patch32_clip_quickgelu_224",
    "vit_xsmall_patch16_clip_224",
    "vit_base_patch16_siglip_224",  # MAP head, no CLS
    "vit_base_patch16_siglip_gap_224",
    "vit_so400m_patch14_siglip_gap_224",
    "vit_so150m_patch16_reg4_map_256",
    "vit_medium_patch16_gap_256",  # average pooling, no CLS
    "vit_base_patch16_gap_224",
    "vit_base_patch16_reg4_gap_256",
    "vit_little_patch16_reg1_gap_256",
    "vit_wee_patch16_reg1_gap_256",
    "vit_betwixt_patch16_reg4_gap_256",
    "vit_mediumd_patch16_reg4_gap_256",
    "vit_so150m2_patch16_reg1_gap_256",
    "flexivit_small",
    "vit_small_patch16_36x1_224",  # layer scale
    "vit_base_patch16_plus_240",
    "vit_base_patch32_plus_256",
    "vit_base_patch16_rpn_224",
    "vit_base_patch16_224_miil",
    "vit_intern300m_patch14_448",
    "aimv2_large_patch14_224",
    "beit3_base_patch16_224",
    "eva_large_patch14_196",
    "test_vit",
    "test_vit2",
    "test_vit3",
    "test_vit4",
    "vit_small_patch16_18x2_224",  # two attentions in parallel per block
    "vit_base_patch16_xp_224",  # parallel scaling blocks
    "vit_pwee_patch16_reg1_gap_256",
    "vit_dwee_patch16_reg1_gap_256",  # differential attention
]
#: timm model modules that hold no attention worth trying (convolutional networks whose source mentions attention).
CONVOLUTIONAL = {
    "byobnet",
    "byoanet",
    "cpubone",
    "cspnet",
    "ghostnet",
    "nfnet",
    "res2net",
    "resnest",
    "resnet",
    "sknet",
}
CONVOLUTIONAL |= {"vovnet", "edgenext", "mlp_mixer", "metaformer", "fastvit", "efficientvit_mit", "efficientvit_msra"}
CONVOLUTIONAL |= {"lowformer", "iformer", "csatv2", "swiftformer", "shvit", "nextvit", "efficientformer_v2"}


def representatives() -> list[str]:
    """One architecture per timm model module with attention (the first whose name says small), then the variants."""
    import timm

    modules: dict[str, list[str]] = {}
    for name in timm.list_models():
        modules.setdefault(timm.models.model_entrypoint(name).__module__.rsplit(".", 1)[-1], []).append(name)
    picked = []
    for module, names in sorted(modules.items()):
        if module in CONVOLUTIONAL or module in ("vision_transformer", "deit"):
            continue
        source = inspect.getsource(inspect.getmodule(timm.models.model_entrypoint(names[0])))
        if not re.search(r"attn|Attention", source):
            continue
        small = [n for n in names if re.search(r"tiny|small|xxs|nano|_s\d|_s_|_t_|_b0|_xs", n)]
        picked.append((small or names)[0])
    return picked + [n for n in VIT_VARIANTS if n in modules.get("vision_transformer", []) + modules.get("deit", [])]


def _load(name: str) -> tuple[vizapp.VizModel | None, str]:
    """The model at two layers (or as it is), or None and the refusal's message."""
    refusal = ""
    for kwargs in ({"depth": 2}, {"depths": (1, 1, 1, 1)}, {}):
        try:
            return vizapp.load_model(name, pretrained=False, device="cpu", **kwargs), str(kwargs or "as built")
        except VizappError as e:
            refusal = str(e)
            if "cannot build" not in refusal:  # refused for what it is, not because the trial argument broke it
                return None, refusal
    return None, refusal


def _reference_attention(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """timm's own attention maps: a copy whose attention modules compute it explicitly, read at attn_drop's input."""
    ref = copy.deepcopy(model)
    maps: list[torch.Tensor] = []
    for module in ref.modules():
        if hasattr(module, "fused_attn") and isinstance(getattr(module, "attn_drop", None), torch.nn.Module):
            module.fused_attn = False
            module.attn_drop.register_forward_hook(lambda m, args, out: maps.append(args[0].detach().clone()))
    with torch.no_grad():
        ref(x)
    return maps


def check(name: str) -> dict[str, str]:
    """One architecture's row."""
    row = {"name": name, "built": "", "outcome": "", "layers x heads, tokens": "", "max |A - timm's A|": "", "maps": ""}
    try:
        vm, row["built"] = _load(name)
        if vm is None:
            row["outcome"] = "refused: " + row["built"].split("; supported")[0]
            row["built"] = ""
            return row
        image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (150, 190, 3), dtype=np.uint8))
        r = vizapp.analyze(vm, image)
        methods = ["rollout"] + (["grad_rollout", "relevance"] if vm.labels else [])
        bad = [m for m in methods if not np.isfinite(np.asarray(r.explain(m))).all()]
        row["maps"] = ", ".join(methods) + (f" (not finite: {', '.join(bad)})" if bad else ": finite")
        if not hasattr(r, "attention_layer"):  # windowed (Swin): tests/test_swin.py checks its windows
            row["outcome"] = "analysed (windowed)"
            return row
        row["layers x heads, tokens"] = f"{r.num_layers} x {r.num_heads}, {r.num_tokens}"
        maps = _reference_attention(vm.model, r.input)
        if len(maps) != r.num_layers:
            row["outcome"] = f"analysed; {len(maps)} reference maps for {r.num_layers} layers, not compared"
            return row
        err = max(
            float((m.reshape(r.attention_layer(i).shape) - r.attention_layer(i)).abs().max())
            for i, m in enumerate(maps)
        )
        row["max |A - timm's A|"] = f"{err:.1e}"
        row["outcome"] = "analysed" if err <= 1e-5 and not bad else "MISMATCH"
    except VizappError as e:
        row["outcome"] = f"refused at analysis: {e}"
    except Exception as e:  # noqa: BLE001 - what the sweep is for: listed, and the script fails
        row["outcome"] = f"BUG: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    finally:
        MODEL_CACHE.clear()
    return row


def main(argv: list[str] | None = None) -> int:
    import timm

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "docs" / "timm-sweep.md"))
    p.add_argument("--names", nargs="*", help="these architectures only (default: the families above)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    rows = [check(n) for n in (args.names or representatives())]
    for r in rows:
        print(f"{r['name']:<42} {r['outcome'][:110]}", flush=True)
    analysed = sum(r["outcome"].startswith("analysed") for r in rows)
    refused = sum(r["outcome"].startswith("refused") for r in rows)
    bugs = [r for r in rows if r["outcome"].startswith(("BUG", "MISMATCH"))]
    command = "python scripts/timm_sweep.py" + (f" --names {' '.join(args.names)}" if args.names else "")
    lines = [
        "# timm architectures: analysed or refused",
        "",
        f"Generated by `{command}` with timm {timm.__version__} and torch {torch.__version__} on the CPU (random "
        "weights, two layers where the constructor takes `depth`); edit the script, not this file. Outcome: "
        "`analysed` (its attention compared with timm's own explicit attention, every layer, and its maps finite), "
        "`refused` (the message `vizapp.load_model` gives), or `BUG` / `MISMATCH` (none is expected). "
        f"**{analysed} analysed, {refused} refused, {len(bugs)} bugs or mismatches** of {len(rows)}.",
        "",
        "| architecture | built | outcome | layers x heads, tokens | max abs A - timm's A | maps |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [r["name"], r["built"], r["outcome"], r["layers x heads, tokens"], r["max |A - timm's A|"], r["maps"]]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}: {analysed} analysed, {refused} refused, {len(bugs)} bugs or mismatches")
    return 1 if bugs else 0


if __name__ == "__main__":
    raise SystemExit(main())
