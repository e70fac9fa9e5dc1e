"""Check two ViT-paper observations on the bundled model (``python -m vizapp.bundled.report``), writing docs/bundled-model.md.

Dosovitskiy et al. (ICLR 2021, Fig. 7) report that (1) learned position embeddings become spatially organised
(nearby patches, and patches in the same row or column, get similar embeddings) and (2) mean attention distance
grows with depth. Both are measured here on the trained bundled Fashion-MNIST ViT and, as the control, on the same
architecture at its untrained initialisation (same seed as training), so that any structure the measurement finds
by construction shows up in the control too.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import spearmanr

from vizapp.analysis import mean_attention_distance, patch_pos_embed, pos_embed_similarity, uniform_reference_distance
from vizapp.bundled.data import load_fashion_mnist
from vizapp.capture import AttentionCapture

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "weights"
DEFAULT_OUT = ROOT / "docs" / "bundled-model.md"

# Decision thresholds, fixed before looking at the numbers and printed in the report.
POS_RHO_MIN = 0.3  # Spearman rho(similarity, -distance) the trained model must exceed
ALPHA = 0.01  # significance level for the Spearman tests
LAYER_RHO_MIN = 0.5  # Spearman rho(layer-mean distance, depth) needed to call the growth monotone-ish


def load_bundled(model_dir: Path, name: str = "fmnist_vit") -> tuple[torch.nn.Module, torch.nn.Module, dict[str, Any]]:
    """The trained model, its untrained same-seed initialisation (the control), and the model card."""
    from safetensors.torch import load_file
    from timm.models.vision_transformer import VisionTransformer

    card = json.loads((model_dir / f"{name}.json").read_text())
    trained = VisionTransformer(**card["model_args"])
    trained.load_state_dict(load_file(str(model_dir / f"{name}.safetensors")), strict=True)
    # train.py seeds torch and builds the model before drawing any other random number, so this is its start point.
    torch.manual_seed(int(card["seed"]))
    control = VisionTransformer(**card["model_args"])
    return trained.eval(), control.eval(), card


def _grid(model: torch.nn.Module) -> tuple[int, int]:
    gh, gw = model.patch_embed.grid_size
    return int(gh), int(gw)


def pos_embed_stats(model: torch.nn.Module) -> dict[str, Any]:
    """Spatial organisation of the patch position embeddings.

    Returns:
        rho/p: Spearman correlation between cosine similarity and negative grid distance (in patches) over all
        unordered pairs of distinct positions; same_row/same_col/neither: mean similarity of such pairs;
        sim: the [gh, gw, gh, gw] similarity grid.
    """
    gh, gw = _grid(model)
    pe = patch_pos_embed(model.pos_embed, model.num_prefix_tokens, bool(getattr(model, "no_embed_class", False)))
    sim = pos_embed_similarity(pe, (gh, gw)).double().reshape(gh * gw, gh * gw).numpy()
    rows = np.repeat(np.arange(gh), gw)
    cols = np.tile(np.arange(gw), gh)
    i, j = np.triu_indices(gh * gw, k=1)  # each unordered pair of distinct positions once
    dist = np.hypot(rows[i] - rows[j], cols[i] - cols[j])
    s = sim[i, j]
    rho, p = spearmanr(s, -dist)
    same_row = rows[i] == rows[j]
    same_col = cols[i] == cols[j]
    neither = ~same_row & ~same_col
    return {
        "rho": float(rho),
        "p": float(p),
        "pairs": len(s),
        "same_row": float(s[same_row].mean()),
        "same_col": float(s[same_col].mean()),
        "neither": float(s[neither].mean()),
        "adjacent": float(s[dist == 1].mean()),
        "far": float(s[dist >= 5].mean()),
        "sim": sim.reshape(gh, gw, gh, gw),
    }


@torch.inference_mode()
def attention_distance_stats(
    model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, mean: float, std: float, batch_size: int = 250
) -> dict[str, Any]:
    """Mean attention distance [L, H] over ``images``, its Spearman correlation with depth, and the accuracy."""
    gh, gw = _grid(model)
    ph, pw = model.patch_embed.patch_size
    total = None
    correct = 0
    n = len(images)
    for start in range(0, n, batch_size):
        x = (torch.from_numpy(images[start : start + batch_size]).float().unsqueeze(1) / 255.0 - mean) / std
        with AttentionCapture(model) as cap:
            logits = model(x)
        attn = torch.stack([cap.attention(layer) for layer in range(len(cap))], dim=1)  # [B, L, H, N, N]
        d = mean_attention_distance(attn, (gh, gw), (ph, pw), model.num_prefix_tokens).double() * len(x)
        total = d if total is None else total + d  # batch-size weighted, so the result is the mean over all images
        correct += int((logits.argmax(-1) == torch.from_numpy(labels[start : start + batch_size])).sum())
    mad = (total / n).numpy()  # [L, H]
    layers, heads = mad.shape
    depth = np.repeat(np.arange(1, layers + 1), heads)
    rho_all, p_all = spearmanr(mad.reshape(-1), depth)
    rho_layer, p_layer = spearmanr(mad.mean(axis=1), np.arange(1, layers + 1))
    return {
        "mad": mad,
        "rho_all": float(rho_all),
        "p_all": float(p_all),
        "rho_layer": float(rho_layer),
        "p_layer": float(p_layer),
        "accuracy": correct / n,
        "uniform": uniform_reference_distance((gh, gw), (ph, pw)),
    }


def _fmt(x: float, nd: int = 3) -> str:
    return f"{x:.{nd}f}"


def _p(p: float) -> str:
    return f"{p:.1e}" if p < 1e-3 else f"{p:.3f}"


def render(card: dict[str, Any], pos: dict[str, dict], mad: dict[str, dict], n_images: int) -> str:
    """The markdown report."""
    t, c = pos["trained"], pos["control"]
    mt, mc = mad["trained"], mad["control"]
    pos_holds = (
        t["rho"] > POS_RHO_MIN and t["p"] < ALPHA and t["same_row"] > t["neither"] and t["same_col"] > t["neither"]
    )
    mad_holds = mt["rho_all"] > 0 and mt["p_all"] < ALPHA and mt["rho_layer"] > LAYER_RHO_MIN
    args = card["model_args"]
    lines = [
        "# The bundled model: a ViT trained on Fashion-MNIST",
        "",
        "Generated by `python -m vizapp.bundled.report` (`make report`); edit the code, not this file.",
        "",
        "## Model",
        "",
        (
            f"timm `VisionTransformer`: {args['depth']} pre-norm blocks, width {args['embed_dim']}, {args['num_heads']} "
            f"heads, {args['patch_size']}x{args['patch_size']} patches on a {args['img_size']}x{args['img_size']} "
            f"single-channel image ({args['img_size'] // args['patch_size']}x{args['img_size'] // args['patch_size']} "
            "grid), a CLS token and learned absolute position embeddings."
        ),
        "",
        "| | |",
        "| --- | --- |",
        f"| data | {card['dataset']} |",
        (
            f"| training | {card['epochs']} epochs, batch {card['batch_size']}, AdamW peak lr {card['lr']}, seed "
            f"{card['seed']} |"
        ),
        f"| augmentation | {card['augmentation']} |",
        f"| normalisation | x/255, then (x - {card['mean'][0]:.4f}) / {card['std'][0]:.4f} |",
        f"| test accuracy (card) | {100 * card['test_accuracy']:.2f}% on the 10,000 test images |",
        f"| training time | {card['train_seconds'] / 60:.1f} min on {card['hardware']} |",
        f"| versions | torch {card['torch_version']}, timm {card['timm_version']} (created {card['created']}) |",
        "",
        "Control: the same architecture at its untrained initialisation, rebuilt with the training seed.",
        "",
        "## Claim 1: learned position embeddings are spatially organised",
        "",
        (
            f"Cosine similarity between the {len(t['sim'].reshape(-1)) ** 0.5:.0f} patch position embeddings, over all "
            f"{t['pairs']} pairs of distinct positions. rho is the Spearman correlation between similarity and negative "
            "grid distance (positive: nearer patches are more similar)."
        ),
        "",
        "| model | Spearman rho | p | same row | same column | neither | adjacent (d=1) | far (d>=5) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, s in (("trained", t), ("control (init)", c)):
        lines.append(
            f"| {name} | {_fmt(s['rho'])} | {_p(s['p'])} | {_fmt(s['same_row'])} | {_fmt(s['same_col'])} | "
            f"{_fmt(s['neither'])} | {_fmt(s['adjacent'])} | {_fmt(s['far'])} |"
        )
    lines += [
        "",
        (
            f"**Verdict: {'holds' if pos_holds else 'does not hold'}** for the trained model "
            f"(criterion: rho > {POS_RHO_MIN} with p < {ALPHA}, and same-row and same-column pairs more similar than "
            f"the rest): rho = {_fmt(t['rho'])}, same row {_fmt(t['same_row'])} / same column {_fmt(t['same_col'])} vs "
            f"neither {_fmt(t['neither'])}. The control gives rho = {_fmt(c['rho'])}, so the structure "
            f"{'comes from training' if abs(c['rho']) < POS_RHO_MIN else 'is partly present at initialisation'}. "
            f"By part: row/column structure {'is present' if t['same_row'] > t['neither'] and t['same_col'] > t['neither'] else 'is absent'}; "
            f"monotone decay of similarity with distance {'is strong' if t['rho'] > POS_RHO_MIN else 'is weak'} "
            f"(adjacent pairs {_fmt(t['adjacent'])} vs pairs 5+ patches apart {_fmt(t['far'])})."
        ),
        "",
    ]
    gh, gw = t["sim"].shape[:2]
    ci, cj = gh // 2, gw // 2
    lines += [
        (
            f"Similarity of the centre patch ({ci}, {cj}) to every position, trained model (one tile of the paper's "
            "figure):"
        ),
        "",
        "| row \\ col | " + " | ".join(str(j) for j in range(gw)) + " |",
        "| --- |" + " --- |" * gw,
    ]
    for i in range(gh):
        lines.append(f"| {i} | " + " | ".join(f"{t['sim'][ci, cj, i, j]:+.2f}" for j in range(gw)) + " |")
    lines += [
        "",
        "## Claim 2: attention distance grows with depth",
        "",
        (
            f"Mean attention distance in pixels (attention-weighted distance between query and key patches, prefix token "
            f"dropped and weights renormalised), averaged over the first {n_images} test images. Uniform attention over "
            f"the grid would give {_fmt(mt['uniform'], 2)} px. Accuracy on these images: trained "
            f"{100 * mt['accuracy']:.1f}%, control {100 * mc['accuracy']:.1f}%."
        ),
        "",
    ]
    layers, heads = mt["mad"].shape
    header = "| layer | " + " | ".join(f"head {h}" for h in range(heads)) + " | mean | control mean |"
    lines += [header, "| --- |" + " --- |" * (heads + 2)]
    for layer in range(layers):
        cells = " | ".join(_fmt(v, 2) for v in mt["mad"][layer])
        lines.append(
            f"| {layer + 1} | {cells} | {_fmt(mt['mad'][layer].mean(), 2)} | {_fmt(mc['mad'][layer].mean(), 2)} |"
        )
    lines += [
        "",
        "| model | rho over all layer/head points | p | rho over layer means | p |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, s in (("trained", mt), ("control (init)", mc)):
        lines.append(
            f"| {name} | {_fmt(s['rho_all'])} | {_p(s['p_all'])} | {_fmt(s['rho_layer'])} | {_p(s['p_layer'])} |"
        )
    lines += [
        "",
        (
            f"**Verdict: {'holds' if mad_holds else 'does not hold'}** for the trained model (criterion: rho over the "
            f"{layers * heads} layer/head points > 0 with p < {ALPHA}, and rho over the {layers} layer means > "
            f"{LAYER_RHO_MIN}): rho = {_fmt(mt['rho_all'])} (p = {_p(mt['p_all'])}) over heads, "
            f"{_fmt(mt['rho_layer'])} over layer means. Layer means go from {_fmt(mt['mad'][0].mean(), 2)} px in layer 1 "
            f"to {_fmt(mt['mad'][-1].mean(), 2)} px in layer {layers}; the control stays between "
            f"{_fmt(mc['mad'].mean(axis=1).min(), 2)} and {_fmt(mc['mad'].mean(axis=1).max(), 2)} px."
        ),
        "",
        (
            "Caveat: this is one small model on 28x28 images (a 7x7 grid), not the paper's ImageNet-scale ViTs; with "
            f"{layers} layer means the layer-level p-value is coarse."
        ),
        "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> str:
    """Measure both claims on the bundled model and its control, and write the markdown report.

    Args:
        argv: command-line arguments (None: ``sys.argv[1:]``).

    Returns:
        The markdown text written.
    """
    p = argparse.ArgumentParser(prog="python -m vizapp.bundled.report", description=__doc__.split("\n")[0])
    p.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    p.add_argument("--name", default="fmnist_vit")
    p.add_argument("--images", type=int, default=2000, help="test images to average attention over (>= 1000)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)

    trained, control, card = load_bundled(args.model_dir, args.name)
    images, labels = load_fashion_mnist("test", args.data_dir)
    images, labels = images[: args.images], labels[: args.images]
    mean, std = float(card["mean"][0]), float(card["std"][0])
    pos = {"trained": pos_embed_stats(trained), "control": pos_embed_stats(control)}
    mad = {
        "trained": attention_distance_stats(trained, images, labels, mean, std),
        "control": attention_distance_stats(control, images, labels, mean, std),
    }
    text = render(card, pos, mad, len(images))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}", file=sys.stderr)
    return text


if __name__ == "__main__":
    main()
