"""Train the bundled offline model: a small ViT on Fashion-MNIST (``python -m vizapp.bundled.train``).

The model is timm's ``VisionTransformer`` with a CLS token, learned absolute position embeddings and standard pre-norm
blocks on a 7x7 grid of 4x4 patches, so every analysis the app offers (attention maps, rollout, position-embedding
similarity, mean attention distance) applies to it unchanged. Outputs, in ``--out``:

* ``<name>.safetensors``: ``model.state_dict()``;
* ``<name>.json``: the model card (architecture, normalisation, classes, data checksums, accuracy, provenance);
* ``<name>.ckpt.pt``: a resumable checkpoint written after each epoch (tensors and plain containers only, loaded
  with ``weights_only=True``; kept out of git).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from vizapp.bundled.data import CLASS_NAMES, dataset_checksums, load_fashion_mnist, resolve_folder

AUGMENTATION = (
    "random crop 28x28 from the image padded by 2 px of background, horizontal flip p=0.5, random erasing p={erase_p}"
)
DATASET = "Fashion-MNIST (Debian package dataset-fashion-mnist)"


def build_model_args(embed_dim: int, depth: int, num_heads: int) -> dict[str, Any]:
    """Keyword arguments for ``VisionTransformer``; they go verbatim into the card so the loader can rebuild it."""
    return {
        "img_size": 28,
        "patch_size": 4,
        "in_chans": 1,
        "num_classes": len(CLASS_NAMES),
        "embed_dim": embed_dim,
        "depth": depth,
        "num_heads": num_heads,
        "mlp_ratio": 4.0,
        "class_token": True,
        "global_pool": "token",
    }


def build_model(model_args: dict[str, Any]) -> torch.nn.Module:
    """A timm ``VisionTransformer`` from the card's ``model_args``."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(**model_args)


def normalize(images: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """uint8 [n, 28, 28] -> float32 [n, 1, 28, 28]: /255 then (x - mean) / std, as the card documents."""
    return ((images.float() / 255.0 - mean) / std).unsqueeze(1)


def augment(x: torch.Tensor, gen: torch.Generator, erase_p: float = 0.1) -> torch.Tensor:
    """Batched augmentation on normalised images [B, 1, H, W], done in tensors because per-sample PIL is too slow.

    Padding uses the normalised value of a black pixel so that shifted-in borders look like the dark background.
    """
    b, _, h, w = x.shape
    pad = 2
    bg = x.amin()  # normalised black, the background of every Fashion-MNIST image
    padded = F.pad(x, (pad, pad, pad, pad), value=float(bg))
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, :, None].expand(b, h, w)
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, :].expand(b, h, w)
    batch = torch.arange(b)[:, None, None].expand(b, h, w)
    out = padded[batch, 0, rows, cols].unsqueeze(1)
    flip = torch.rand(b, generator=gen) < 0.5
    out = torch.where(flip[:, None, None, None], out.flip(-1), out)
    if erase_p > 0:
        # Random erasing (Zhong et al. 2020), light: one rectangle of 2-25% of the area, filled with background.
        erase = torch.rand(b, generator=gen) < erase_p
        area = torch.empty(b).uniform_(0.02, 0.25, generator=gen) * h * w
        aspect = torch.exp(torch.empty(b).uniform_(math.log(0.3), math.log(3.3), generator=gen))
        eh = torch.sqrt(area * aspect).round().clamp(1, h).long()
        ew = torch.sqrt(area / aspect).round().clamp(1, w).long()
        y0 = (torch.rand(b, generator=gen) * (h - eh + 1)).long()
        x0 = (torch.rand(b, generator=gen) * (w - ew + 1)).long()
        yy = torch.arange(h)[None, :, None]
        xx = torch.arange(w)[None, None, :]
        mask = (
            (yy >= y0[:, None, None])
            & (yy < (y0 + eh)[:, None, None])
            & (xx >= x0[:, None, None])
            & (xx < (x0 + ew)[:, None, None])
            & erase[:, None, None]
        )
        out = out.masked_fill(mask.unsqueeze(1), float(bg))
    return out


def lr_at(step: int, total: int, warmup: int, base_lr: float, min_lr: float) -> float:
    """Linear warm-up then cosine decay to ``min_lr``."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * min(1.0, t)))


@torch.inference_mode()
def evaluate(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    mean: float,
    std: float,
    device: torch.device,
    batch_size: int = 1000,
) -> float:
    """Top-1 accuracy on uint8 images [n, 28, 28] with the card's normalisation."""
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(images), batch_size):
        x = normalize(images[i : i + batch_size], mean, std).to(device)
        correct += int((model(x).argmax(-1).cpu() == labels[i : i + batch_size]).sum())
    model.train(was_training)
    return correct / max(1, len(images))


def _hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA)"
    cpu = platform.processor() or platform.machine()
    try:
        # platform.processor() is often empty on Linux; /proc/cpuinfo has the marketing name.
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    n = torch.get_num_threads()
    return f"CPU: {cpu}, {n} thread{'' if n == 1 else 's'}"


def _progress(epoch: int, epochs: int, done: int, total: int, loss: float, t0: float) -> None:
    # Plain stderr lines (no tqdm) so the log file stays readable when run under nohup.
    rate = done / max(1e-9, time.time() - t0)
    print(f"epoch {epoch + 1}/{epochs} {done}/{total} loss {loss:.4f} ({rate:.0f} img/s)", file=sys.stderr, flush=True)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(prog="python -m vizapp.bundled.train", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="vizapp/bundled/weights", help="output folder (default: vizapp/bundled/weights)")
    p.add_argument("--name", default="fmnist_vit", help="file stem of the outputs (default: fmnist_vit)")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1.5e-3, help="peak AdamW learning rate")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-epochs", type=float, default=1.0)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--erase-p", type=float, default=0.1, help="random-erasing probability (0 turns it off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--embed-dim", type=int, default=96)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--num-heads", type=int, default=3)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads (default: all cores; 1 can be faster when other processes share the cores)",
    )
    p.add_argument("--resume", action="store_true", help="continue from <out>/<name>.ckpt.pt if it exists")
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST folder (default: $VIZAPP_FMNIST_DIR or Debian's)")
    p.add_argument(
        "--limit",
        type=int,
        default=None,
        help="smoke run: use only the first N training and N test images (the card's accuracy is then on N)",
    )
    p.add_argument("--eval-images", type=int, default=2000, help="test images scored after each epoch")
    p.add_argument("--log-every", type=int, default=50, help="progress line every N steps")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train, checkpoint each epoch, then write the safetensors weights and the JSON model card.

    Args:
        argv: command-line arguments (None: ``sys.argv[1:]``).

    Returns:
        The model card written to ``<out>/<name>.json``.
    """
    args = parse_args(argv)
    import timm
    from safetensors.torch import save_file

    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    torch.set_num_threads(args.threads or max(1, os.cpu_count() or 1))
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / f"{args.name}.ckpt.pt"

    folder = resolve_folder(args.data_dir)
    train_x, train_y = load_fashion_mnist("train", folder)
    test_x, test_y = load_fashion_mnist("test", folder)
    # Normalisation statistics come from the full training split, whatever --limit says, so smoke runs match.
    mean = float(train_x.astype(np.float64).mean() / 255.0)
    std = float(train_x.astype(np.float64).std() / 255.0)
    if args.limit is not None:
        train_x, train_y = train_x[: args.limit], train_y[: args.limit]
        test_x, test_y = test_x[: args.limit], test_y[: args.limit]
    train_x_t, train_y_t = torch.from_numpy(train_x), torch.from_numpy(train_y)
    test_x_t, test_y_t = torch.from_numpy(test_x), torch.from_numpy(test_y)

    model_args = build_model_args(args.embed_dim, args.depth, args.num_heads)
    model = build_model(model_args).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    # No weight decay on biases, norms, position embedding and CLS token (the usual ViT recipe).
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or n in ("pos_embed", "cls_token") else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.999),
    )
    steps_per_epoch = math.ceil(len(train_x_t) / args.batch_size)
    total_steps = steps_per_epoch * args.epochs
    warmup = max(1, int(args.warmup_epochs * steps_per_epoch))

    start_epoch, train_seconds, history = 0, 0.0, []
    if args.resume and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=True)
        if ckpt["model_args"] != model_args:
            raise SystemExit(f"{ckpt_path} was trained with {ckpt['model_args']}, not {model_args}")
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        start_epoch, train_seconds, history = ckpt["epoch"], float(ckpt["train_seconds"]), list(ckpt["history"])
        print(f"resumed from {ckpt_path} after epoch {start_epoch}", file=sys.stderr, flush=True)

    print(
        f"ViT {model_args} ({n_params / 1e6:.2f} M params) on {device}, {len(train_x_t)} train / {len(test_x_t)} test "
        f"images, {args.epochs} epochs x {steps_per_epoch} steps, mean {mean:.4f} std {std:.4f}",
        file=sys.stderr,
        flush=True,
    )
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    acc = history[-1]["test_accuracy"] if history else float("nan")
    for epoch in range(start_epoch, args.epochs):
        t0 = time.time()
        model.train()
        # One generator per epoch, seeded from (seed, epoch): a resumed run sees the same order and augmentations.
        gen = torch.Generator().manual_seed(args.seed * 1000 + epoch)
        perm = torch.randperm(len(train_x_t), generator=gen)
        running, seen = 0.0, 0
        for i in range(steps_per_epoch):
            step = epoch * steps_per_epoch + i
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total_steps, warmup, args.lr, args.lr * 0.01)
            idx = perm[i * args.batch_size : (i + 1) * args.batch_size]
            x = augment(normalize(train_x_t[idx], mean, std), gen, args.erase_p).to(device, non_blocking=True)
            y = train_y_t[idx].to(device, non_blocking=True)
            loss = criterion(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            running += loss.item() * len(idx)
            seen += len(idx)
            if (i + 1) % args.log_every == 0 or i + 1 == steps_per_epoch:
                _progress(epoch, args.epochs, seen, len(train_x_t), running / seen, t0)
        epoch_seconds = time.time() - t0
        train_seconds += epoch_seconds
        # A 2,000-image test subset tracks progress cheaply; the full test split is scored once at the end.
        acc = evaluate(model, test_x_t[: args.eval_images], test_y_t[: args.eval_images], mean, std, device)
        history.append(
            {"epoch": epoch + 1, "train_loss": running / max(1, seen), "test_accuracy": acc, "seconds": epoch_seconds}
        )
        print(
            f"epoch {epoch + 1}/{args.epochs} done in {epoch_seconds:.0f}s: train loss {running / max(1, seen):.4f}, "
            f"test acc {acc:.4f} (first {min(args.eval_images, len(test_x_t))} test images)",
            file=sys.stderr,
            flush=True,
        )
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save(
            {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "epoch": epoch + 1,
                "train_seconds": train_seconds,
                "history": history,
                "model_args": model_args,
            },
            tmp,
        )
        os.replace(tmp, ckpt_path)  # atomic: a kill mid-save never leaves a broken checkpoint

    if not history:
        raise SystemExit("nothing trained: --epochs is not above the checkpoint's epoch")
    acc = evaluate(model, test_x_t, test_y_t, mean, std, device)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / f"{args.name}.safetensors"), metadata={"format": "pt"})
    card = {
        "name": args.name,
        "architecture": "VisionTransformer",
        "model_args": model_args,
        "input_size": [1, 28, 28],
        "mean": [mean],
        "std": [std],
        "polarity": "light_on_dark",
        "interpolation": "bilinear",
        "class_names": list(CLASS_NAMES),
        "dataset": DATASET,
        "dataset_sha256": dataset_checksums(folder),
        "epochs": args.epochs,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "augmentation": AUGMENTATION.format(erase_p=args.erase_p),
        "test_accuracy": acc,
        "train_seconds": round(train_seconds, 1),
        "hardware": _hardware(device),
        "torch_version": torch.__version__,
        "timm_version": timm.__version__,
        "created": _dt.datetime.now(_dt.timezone.utc).date().isoformat(),
    }
    (out / f"{args.name}.json").write_text(json.dumps(card, indent=2) + "\n")
    print(
        f"wrote {out / args.name}.safetensors and .json: test accuracy {acc:.4f} on {len(test_x_t)} images, "
        f"{train_seconds:.0f}s training",
        file=sys.stderr,
        flush=True,
    )
    return card


if __name__ == "__main__":
    main()
