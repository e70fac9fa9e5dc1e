"""One model, one image at a time: everything the evaluation records for an image, in a single row.

:class:`Evaluator` is what each engine runs: the local engine holds one, the Ray engine one per actor. A row depends
only on the image, its target and the job's settings (never on which worker or shard ran it), so every engine
produces the same rows.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from vizapp.analysis.faithfulness import patch_order, random_order_saliency, step_counts, trapezoid_auc
from vizapp.analysis.headstats import attention_entropy, token_norm_stats
from vizapp.analysis.perturbation import CHEFER_FRACTIONS, DIRECTIONS, accuracy_auc, changed_masks, compose
from vizapp.analysis.perturbation import perturbed_images as chefer_images

RANDOM = "random"
"""The random-order baseline's method name (not in the registry: it is not an explanation)."""

CLASS_KINDS = ("pred", "target")
"""Explanations are computed for the predicted class and for the target class (Chefer et al.'s two settings)."""


class ImageTimeout(Exception):
    """An image went over the per-image time limit."""


def image_seed(seed: int, item_id: str) -> int:
    """The random baseline's seed for one image: depends on the job seed and the image id only (not the shard)."""
    return (zlib.crc32(item_id.encode("utf-8")) ^ (seed * 0x9E3779B1)) & 0x7FFFFFFF


class Evaluator:
    """Loads the model once and evaluates images one by one.

    Args:
        model: a name for :func:`vizapp.load_model`.
        methods: names from :data:`vizapp.methods.METHODS` and/or ``"random"``.
        steps: steps of vizapp's deletion/insertion curves (Petsiuk et al.); 0 skips them.
        seed: job seed for the random baseline.
        time_limit: seconds per image, checked between stages (a stage already running is not interrupted).
        threads: torch CPU threads (fixed so that results do not depend on the machine's core count).
        batch_size: perturbed images per forward.
        device: passed to :func:`vizapp.load_model` (None: CUDA when available).
    """

    def __init__(
        self,
        model: str,
        methods: Sequence[str],
        steps: int = 10,
        seed: int = 0,
        time_limit: float = 60.0,
        threads: int = 1,
        batch_size: int = 256,
        device: str | None = None,
    ) -> None:
        import vizapp

        torch.set_num_threads(max(1, int(threads)))
        kwargs = {} if device is None else {"device": device}
        self.vm = vizapp.load_model(model, **kwargs)
        self.methods = list(methods)
        self.steps = int(steps)
        self.seed = int(seed)
        self.time_limit = float(time_limit)
        self.batch_size = int(batch_size)
        mean = torch.as_tensor(self.vm.mean, dtype=torch.float32)
        std = torch.as_tensor(self.vm.std, dtype=torch.float32)
        #: Chefer et al. zero the removed pixels before normalising: black, in the model's input space, [C, 1, 1]
        self.black = ((0.0 - mean) / std)[:, None, None]

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(self.vm.labels)

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        vm = self.vm
        out = []
        with torch.no_grad():
            for lo in range(0, batch.shape[0], self.batch_size):
                x = batch[lo : lo + self.batch_size].to(device=vm.device, dtype=vm.dtype)
                out.append(torch.softmax(vm.logits(x).float(), dim=-1).cpu())
        return torch.cat(out)  # [B, K]

    def evaluate(self, item: dict[str, Any], pixels: np.ndarray | None, error: str | None = None) -> dict[str, Any]:
        """The row for one image; ``error`` (a decode failure) gives a ``bad_file`` row instead.

        Rows always carry id, source, target, status ("ok", "bad_file", "timeout", "error") and message.
        """
        row: dict[str, Any] = {
            "id": item["id"],
            "source": item["source"],
            "target": int(item["target"]),
            "status": "ok",
            "message": "",
        }
        if error is not None or pixels is None:
            return {**row, "status": "bad_file", "message": error or "no pixels"}
        try:
            row.update(self._evaluate(item, pixels))
        except ImageTimeout as exc:
            return {**row, "status": "timeout", "message": str(exc)}
        except Exception as exc:  # noqa: BLE001 - one bad image must not end a 50,000-image job; the row says why
            return {**row, "status": "error", "message": f"{type(exc).__name__}: {exc}"[:500]}
        return row

    def _evaluate(self, item: dict[str, Any], pixels: np.ndarray) -> dict[str, Any]:
        import vizapp
        from vizapp import methods as registry

        t0 = time.perf_counter()

        def check(stage: str) -> None:
            if time.perf_counter() - t0 > self.time_limit:
                raise ImageTimeout(f"over the {self.time_limit:g} s per-image limit after {stage}")

        vm = self.vm
        r = vizapp.analyze(vm, pixels)
        if r.probs is None:
            raise vizapp.BadParameterError("the model has no classifier head: perturbation tests need class scores")
        pred = int(np.argmax(r.probs))
        target = int(item["target"]) if int(item["target"]) >= 0 else pred
        labels = r.labels
        out: dict[str, Any] = {
            "target": target,
            "target_label": labels[target],
            "predicted": pred,
            "predicted_label": labels[pred],
            "correct": int(pred == target),
            "prob_pred": float(r.probs[pred]),
        }
        # Per-head statistics from the same forward.
        p = r.num_prefix_tokens
        for layer, row in enumerate(np.asarray(r.mean_distance)):
            ent = attention_entropy(r.attention_layer(layer)).numpy()  # [H]
            for h, (d, e) in enumerate(zip(row, ent, strict=True)):
                out[f"distance.l{layer}.h{h}"] = float(d)
                out[f"entropy.l{layer}.h{h}"] = float(e)
        for layer, norms in enumerate(r.token_norms()):  # recorded during analyze's one forward
            st = token_norm_stats(torch.from_numpy(norms), p)
            out[f"norm_patch_mean.l{layer}"] = float(st["patch_mean"])
            out[f"norm_patch_max.l{layer}"] = float(st["patch_max"])
            out[f"norm_prefix_mean.l{layer}"] = float(st["prefix_mean"])
        check("the forward pass")

        # Maps: one per (method, class kind); methods without a class, or pred == target, share one map.
        num_patches = r.grid_size[0] * r.grid_size[1]
        maps: dict[tuple[str, str], torch.Tensor] = {}
        for name in self.methods:
            for kind in CLASS_KINDS:
                cls = pred if kind == "pred" else target
                same = kind == "target" and (name == RANDOM or not registry.get(name).needs_class or cls == pred)
                if same:
                    maps[(name, kind)] = maps[(name, "pred")]
                elif name == RANDOM:
                    g = torch.Generator().manual_seed(image_seed(self.seed, str(item["id"])))
                    maps[(name, kind)] = random_order_saliency(num_patches, g)
                else:
                    m = registry.explain(r, name, cls)
                    maps[(name, kind)] = torch.as_tensor(np.asarray(m, dtype=np.float32)).reshape(-1)
                    check(f"method {name!r}")

        # Every perturbed image of this image in one list, one forward (the same batches whatever the engine).
        image = r.input[0].float()  # [C, H, W]
        grid, patch = r.grid_size, r.patch_size
        jobs: list[tuple[str, tuple, int]] = []
        parts: list[torch.Tensor] = []
        done: dict[tuple[str, str, str], tuple[str, str, str]] = {}
        for (name, kind), sal in maps.items():
            for direction in DIRECTIONS:
                key = (name, kind, direction)
                if maps[(name, kind)] is maps[(name, "pred")] and kind == "target":
                    done[key] = (name, "pred", direction)
                    continue
                imgs = chefer_images(image, sal, grid, patch, direction, self.black)  # [9, C, H, W]
                jobs.append(("chefer", key, imgs.shape[0]))
                parts.append(imgs)
        counts = step_counts(num_patches, self.steps) if self.steps > 0 else None
        if counts is not None:
            # Inner steps only: step 0 of deletion and step S of insertion are the image (its probabilities come from
            # the analysis forward); the all-baseline end is shared by every method and forwarded once.
            base = torch.zeros_like(image)  # vizapp's deletion/insertion baseline: 0 = the dataset-mean colour
            jobs.append(("baseline", (), 1))
            parts.append(base[None])
            for name in self.methods:
                masks = changed_masks(patch_order(maps[(name, "pred")]), counts[1:-1])  # [S-1, P]
                for mode, (changed, unchanged) in (("deletion", (base, image)), ("insertion", (image, base))):
                    jobs.append(("curve", (name, mode), masks.shape[0]))
                    parts.append(compose(masks, changed, unchanged, grid, patch))
        probs = self._forward(torch.cat(parts)) if parts else torch.zeros(0, len(labels))  # [B, K]
        check("the perturbation forwards")

        top = probs.argmax(dim=-1).numpy()
        lo = 0
        p_base = float("nan")
        for kind_of_job, key, n in jobs:
            sl = slice(lo, lo + n)
            lo += n
            if kind_of_job == "chefer":
                name, kind, direction = key
                acc = np.concatenate([[out["correct"]], (top[sl] == target).astype(np.int64)])  # [10]
                prefix = f"{name}.{kind}.{direction}"
                for k, a in enumerate(acc[1:], start=1):
                    out[f"{prefix}.acc{k}"] = int(a)
                out[f"{prefix}.auc"] = float(accuracy_auc(acc, CHEFER_FRACTIONS))
            elif kind_of_job == "baseline":
                p_base = float(probs[sl, pred][0])
            else:
                name, mode = key
                inner = probs[sl, pred].double().numpy()
                p_img = float(r.probs[pred])
                ends = (p_img, p_base) if mode == "deletion" else (p_base, p_img)
                y = np.concatenate([[ends[0]], inner, [ends[1]]])  # [S+1]
                out[f"{name}.{mode}_auc"] = trapezoid_auc(counts / num_patches, y)
        for key, src in done.items():
            prefix, src_prefix = ".".join(key), ".".join(src)
            for k in range(1, len(CHEFER_FRACTIONS)):
                out[f"{prefix}.acc{k}"] = out[f"{src_prefix}.acc{k}"]
            out[f"{prefix}.auc"] = out[f"{src_prefix}.auc"]
        return out
