"""One model, one batch at a time: everything the evaluation records for an image, in a single row.

:class:`Evaluator` is what each engine runs: the local engine holds one, the Ray engine one per actor. The class
scores and per-head statistics of a batch come from one captured forward; the methods run image by image. A row
depends only on the image, its target, the job's settings and its batch (the engines cut every shard into the same
fixed batches), never on which worker or shard ran it, so every engine produces the same rows.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from vizapp.analysis.faithfulness import patch_order, random_order_saliency, step_counts, trapezoid_auc
from vizapp.analysis.perturbation import (
    CHEFER_FRACTIONS,
    DIRECTIONS,
    PROTOCOLS,
    accuracy_auc,
    changed_masks,
    compose,
    patch_fractions,
    patch_perturbed_images,
    pixel_perturbed_images,
)
from vizapp.imageio import decode_image

RANDOM = "random"
"""The random-order baseline's method name (not in the registry: it is not an explanation)."""

CLASS_KINDS = ("pred", "target")
"""Explanations are computed for the predicted class and for the target class (Chefer et al.'s two settings)."""

AUTHORS_ROLLOUT_START_LAYER = 1
"""Chefer et al.'s rollout baseline starts at block 1 (``generate_rollout(data, start_layer=1)`` in their
``generate_visualizations.py``): the ``chefer2021`` protocol's default for ``rollout``."""


def default_rollout_start_layer(protocol: str) -> int:
    """The rollout's first layer under ``protocol``: the authors' 1 for ``chefer2021``, vizapp's 0 for ``patches``."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    return AUTHORS_ROLLOUT_START_LAYER if protocol == "chefer2021" else 0


class ImageTimeout(Exception):
    """An image went over the per-image time limit."""


def _failed(row: dict[str, Any], exc: BaseException) -> dict[str, Any]:
    """``row`` (its id, source and target only) marked as timed out or failed, saying why."""
    if isinstance(exc, ImageTimeout):
        return {**row, "status": "timeout", "message": str(exc)}
    return {**row, "status": "error", "message": f"{type(exc).__name__}: {exc}"[:500]}


def image_seed(seed: int, item_id: str) -> int:
    """The random baseline's seed for one image: depends on the job seed and the image id only (not the shard)."""
    return (zlib.crc32(item_id.encode("utf-8")) ^ (seed * 0x9E3779B1)) & 0x7FFFFFFF


class Evaluator:
    """Loads the model once and evaluates batches of images (:meth:`evaluate_batch`).

    Args:
        model: a name for :func:`vizapp.load_model`.
        methods: names from :data:`vizapp.methods.METHODS` and/or ``"random"``.
        steps: steps of vizapp's deletion/insertion curves (Petsiuk et al.); 0 skips them.
        seed: job seed for the random baseline.
        time_limit: seconds per image, checked between stages (a stage already running is not interrupted).
        threads: torch CPU threads (fixed so that results do not depend on the machine's core count).
        batch_size: perturbed images per forward.
        device: passed to :func:`vizapp.load_model` (None: CUDA when available).
        pretrained: False builds the model with random weights (timing a large model offline).
        protocol: the perturbation test's protocol, "chefer2021" (the authors' pixel procedure) or "patches"
            (vizapp's whole-patch variant); see :mod:`vizapp.analysis.perturbation`.
        rollout_start_layer: first layer of the ``rollout`` method's maps (used for every score of the row); None:
            :func:`default_rollout_start_layer` of ``protocol``.
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
        pretrained: bool = True,
        protocol: str = "chefer2021",
        rollout_start_layer: int | None = None,
    ) -> None:
        import vizapp
        from vizapp.errors import VizappError

        if protocol not in PROTOCOLS:
            raise VizappError(f"protocol must be one of {list(PROTOCOLS)}, got {protocol!r}")

        torch.set_num_threads(max(1, int(threads)))
        kwargs: dict[str, Any] = {} if device is None else {"device": device}
        if not pretrained:
            kwargs["pretrained"] = False
        self.vm = vizapp.load_model(model, **kwargs)
        if self.vm.windowed:  # its per-image statistics and maps are a plain ViT's record (vizapp.swin_result)
            raise VizappError(
                f"{model}: the dataset evaluation does not run windowed-attention (Swin) models yet; their maps and "
                "deletion/insertion curves come from the Python API (vizapp.analyze(...).faithfulness(...))"
            )
        self.methods = list(methods)
        self.protocol = protocol
        start = default_rollout_start_layer(protocol) if rollout_start_layer is None else int(rollout_start_layer)
        if "rollout" in self.methods and not 0 <= start < self.vm.num_layers:
            raise VizappError(
                f"rollout start layer {start} is outside the model's {self.vm.num_layers} layers; pass "
                f"--rollout-start-layer between 0 and {self.vm.num_layers - 1}"
            )
        self.rollout_start_layer = start
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
        """The row for one image (a batch of one, see :meth:`evaluate_batch`)."""
        return self.evaluate_batch([item], [pixels], [error])[0]

    def evaluate_batch(
        self,
        items: Sequence[dict[str, Any]],
        pixels: Sequence[np.ndarray | None],
        errors: Sequence[str | None] | None = None,
    ) -> list[dict[str, Any]]:
        """The rows of a batch of images, in order; ``errors[i]`` (a decode failure) gives a ``bad_file`` row.

        The class scores and the per-head statistics of the whole batch come from one captured forward
        (:class:`vizapp.streaming.BatchStatistics`); the methods, if any, then run image by image, each within the
        per-image time limit. A row depends on the image, its target, the job's settings and which images share its
        batch (a batched forward may round differently from a single one), so the engines form the same batches.
        Rows always carry id, source, target, status ("ok", "bad_file", "timeout", "error") and message.
        """
        errors = list(errors) if errors is not None else [None] * len(items)
        if not len(items) == len(pixels) == len(errors):
            raise ValueError(f"{len(items)} items, {len(pixels)} images and {len(errors)} errors")
        rows: list[dict[str, Any]] = [
            {
                "id": it["id"],
                "source": it["source"],
                "target": int(it["target"]),
                "status": "ok",
                "message": "",
                "protocol": self.protocol,
            }
            for it in items
        ]
        images: dict[int, Any] = {}  # decoded once, for the batched forward and for the methods' analysis
        inputs: dict[int, torch.Tensor] = {}
        for i, (px, err) in enumerate(zip(pixels, errors, strict=True)):
            if err is not None or px is None:
                rows[i] = {**rows[i], "status": "bad_file", "message": err or "no pixels"}
                continue
            try:
                images[i] = decode_image(px).image
                inputs[i] = self._preprocess(images[i])
            except Exception as exc:  # noqa: BLE001 - one bad image must not end a 50,000-image job; the row says why
                rows[i] = _failed(rows[i], exc)
        for i, result in self._statistics(inputs).items():
            if isinstance(result, Exception):
                rows[i] = _failed(rows[i], result)
                continue
            head = self._head(items[i], *result)
            if self.methods:
                try:
                    head.update(self._methods(items[i], images[i], head))
                except Exception as exc:  # noqa: BLE001 - as above
                    rows[i] = _failed(rows[i], exc)
                    continue
            rows[i].update(head)
        return rows

    def _preprocess(self, image: Any) -> torch.Tensor:
        """The model's input [C, H, W] for a decoded image, exactly as :func:`vizapp.analyze` forms it."""
        x = self.vm.transform(image)
        return x[0] if x.dim() == 4 else x

    def _statistics(
        self, inputs: dict[int, torch.Tensor]
    ) -> dict[int, tuple[np.ndarray, dict[str, np.ndarray]] | Exception]:
        """Class probabilities [K] and per-head statistics of each input, from one forward per input shape; when a
        forward fails, its images are retried one by one so that one bad input costs only its own row."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, x in inputs.items():
            groups.setdefault(tuple(x.shape), []).append(i)
        out: dict[int, tuple[np.ndarray, dict[str, np.ndarray]] | Exception] = {}
        for idx in groups.values():
            try:
                out.update(zip(idx, self.statistics(torch.stack([inputs[i] for i in idx])), strict=True))
            except Exception as exc:  # noqa: BLE001 - retried image by image below
                if len(idx) == 1:
                    out[idx[0]] = exc
                    continue
                for i in idx:
                    try:
                        out[i] = self.statistics(inputs[i][None])[0]
                    except Exception as exc_i:  # noqa: BLE001 - this image's row says why
                        out[i] = exc_i
        return dict(sorted(out.items()))

    def statistics(self, x: torch.Tensor) -> list[tuple[np.ndarray, dict[str, np.ndarray]]]:
        """One captured forward of a batch ``x`` [B, C, H, W]: per image, its class probabilities [K] (float32) and
        {"distance": [L, H], "entropy": [L, H], "norm_patch_mean" / "norm_patch_max" / "norm_prefix_mean": [L]}."""
        from vizapp import BadParameterError
        from vizapp.capture import AttentionCapture
        from vizapp.streaming import BatchStatistics

        vm = self.vm
        grid = vm.grid_for(x.shape[-2], x.shape[-1])
        p = vm.num_prefix_tokens
        red = BatchStatistics(
            vm.num_layers, vm.num_heads, x.shape[0], p + grid[0] * grid[1], vm.patch_distances(grid), p
        )
        with torch.no_grad(), AttentionCapture(vm.model, on_attention=red, on_block=red.block, keep_qk=False):
            logits = vm.logits(x.to(device=vm.device, dtype=vm.dtype))
        if not red.complete():
            raise RuntimeError("the attention of some layer never reached vizapp's statistics")
        if not vm.labels or logits.shape[-1] != len(vm.labels):
            raise BadParameterError("the model has no classifier head: perturbation tests need class scores")
        probs = torch.softmax(logits.float(), dim=-1).cpu().numpy()  # [B, K]
        per = {"distance": red.distance, "entropy": red.entropy} | {f"norm_{k}": v for k, v in red.norms.items()}
        per = {k: v.transpose(0, 1).cpu().numpy() for k, v in per.items()}  # [B, L, H] or [B, L]
        return [(probs[b], {k: v[b] for k, v in per.items()}) for b in range(x.shape[0])]

    def _head(self, item: dict[str, Any], probs: np.ndarray, stats: dict[str, np.ndarray]) -> dict[str, Any]:
        """The row's class and statistics columns."""
        labels = self.labels
        pred = int(np.argmax(probs))
        target = int(item["target"]) if int(item["target"]) >= 0 else pred
        out: dict[str, Any] = {
            "target": target,
            "target_label": labels[target],
            "predicted": pred,
            "predicted_label": labels[pred],
            "correct": int(pred == target),
            "prob_pred": float(probs[pred]),
        }
        for layer, (row, ent) in enumerate(zip(stats["distance"], stats["entropy"], strict=True)):
            for h, (d, e) in enumerate(zip(row, ent, strict=True)):
                out[f"distance.l{layer}.h{h}"] = float(d)
                out[f"entropy.l{layer}.h{h}"] = float(e)
        for layer in range(len(stats["norm_patch_mean"])):
            for key in ("norm_patch_mean", "norm_patch_max", "norm_prefix_mean"):
                out[f"{key}.l{layer}"] = float(stats[key][layer])
        return out

    def _methods(self, item: dict[str, Any], image: Any, head: dict[str, Any]) -> dict[str, Any]:
        """The methods' perturbation scores for one image whose class columns are ``head``."""
        import vizapp
        from vizapp import methods as registry

        t0 = time.perf_counter()

        def check(stage: str) -> None:
            if time.perf_counter() - t0 > self.time_limit:
                raise ImageTimeout(f"over the {self.time_limit:g} s per-image limit after {stage}")

        # q and k of every layer, for the maps; with a class-specific method, the forward keeps its graph so that
        # each class costs one backward instead of another forward and backward
        class_specific = any(name != RANDOM and registry.get(name).needs_class for name in self.methods)
        r = vizapp.analyze(self.vm, image, gradients=class_specific)
        check("the analysis forward")
        pred, target, labels = head["predicted"], head["target"], r.labels
        out: dict[str, Any] = {}

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
                    kw = {"start_layer": self.rollout_start_layer} if name == "rollout" else {}
                    m = registry.explain(r, name, cls, **kw)
                    maps[(name, kind)] = torch.as_tensor(np.asarray(m, dtype=np.float32)).reshape(-1)
                    check(f"method {name!r}")

        # Every perturbed image of this image in one list, one forward (the same batches whatever the engine).
        image = r.input[0].float()  # [C, H, W]
        grid, patch = r.grid_size, r.patch_size
        # x: the nominal fractions, as the authors integrate (chefer2021); the fraction of the patches actually removed
        x = np.asarray(CHEFER_FRACTIONS) if self.protocol == "chefer2021" else patch_fractions(num_patches)
        for k in range(1, len(x)):
            out[f"perturbation_x{k}"] = float(x[k])
        jobs: list[tuple[str, tuple, int]] = []
        parts: list[torch.Tensor] = []
        done: dict[tuple[str, str, str], tuple[str, str, str]] = {}
        for (name, kind), sal in maps.items():
            for direction in DIRECTIONS:
                key = (name, kind, direction)
                if maps[(name, kind)] is maps[(name, "pred")] and kind == "target":
                    done[key] = (name, "pred", direction)
                    continue
                if self.protocol == "chefer2021":
                    imgs = pixel_perturbed_images(image, sal.reshape(grid), patch, direction, self.black)
                else:
                    imgs = patch_perturbed_images(image, sal, grid, patch, direction, self.black)  # [9, C, H, W]
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
                acc = np.concatenate([[head["correct"]], (top[sl] == target).astype(np.int64)])  # [10]
                prefix = f"{name}.{kind}.{direction}"
                for k, a in enumerate(acc[1:], start=1):
                    out[f"{prefix}.acc{k}"] = int(a)
                out[f"{prefix}.auc"] = float(accuracy_auc(acc, x))
            elif kind_of_job == "baseline":
                p_base = float(probs[sl, pred][0])
            else:
                name, mode = key
                inner = probs[sl, pred].double().numpy()
                p_img = head["prob_pred"]  # the batched forward's, like the row's class columns
                ends = (p_img, p_base) if mode == "deletion" else (p_base, p_img)
                y = np.concatenate([[ends[0]], inner, [ends[1]]])  # [S+1]
                out[f"{name}.{mode}_auc"] = trapezoid_auc(counts / num_patches, y)
        for key, src in done.items():
            prefix, src_prefix = ".".join(key), ".".join(src)
            for k in range(1, len(CHEFER_FRACTIONS)):
                out[f"{prefix}.acc{k}"] = out[f"{src_prefix}.acc{k}"]
            out[f"{prefix}.auc"] = out[f"{src_prefix}.auc"]
        return out
