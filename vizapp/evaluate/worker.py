"""One model, one batch at a time: everything the evaluation records for an image, in a single row.

:class:`Evaluator` is what each engine runs: the local engine holds one, the Ray engine one per actor. The class
scores and per-head statistics of a batch come from one captured forward; the methods run image by image. A row
depends only on the image, its target, the job's settings and its batch (the engines cut every shard into the same
fixed batches), never on which worker or shard ran it, so every engine produces the same rows.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from vizapp import limits
from vizapp.analysis.perturbation import PROTOCOLS
from vizapp.errors import raised_at
from vizapp.evaluate.scores import CLASS_KINDS, RANDOM, ImageTimeout, image_seed, method_scores
from vizapp.imageio import decode_image
from vizapp.models.base import VizModel
from vizapp.models.prompts import probabilities

log = logging.getLogger(__name__)

__all__ = ["CLASS_KINDS", "RANDOM", "Evaluator", "ImageTimeout", "default_rollout_start_layer", "image_seed"]

AUTHORS_ROLLOUT_START_LAYER = 1
"""Chefer et al.'s rollout baseline starts at block 1 (``generate_rollout(data, start_layer=1)`` in their
``generate_visualizations.py``): the ``chefer2021`` protocol's default for ``rollout``."""


def default_rollout_start_layer(protocol: str) -> int:
    """The rollout's first layer under ``protocol``: the authors' 1 for ``chefer2021``, vizapp's 0 for ``patches``."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    return AUTHORS_ROLLOUT_START_LAYER if protocol == "chefer2021" else 0


def _failed(row: dict[str, Any], exc: BaseException) -> dict[str, Any]:
    """``row`` (its id, source and target only) marked as timed out or failed, saying why."""
    if isinstance(exc, ImageTimeout):
        return {**row, "status": "timeout", "message": str(exc)}
    return {**row, "status": "error", "message": f"{type(exc).__name__}: {exc}"[:500]}


class Evaluator:
    """Loads the model once and evaluates batches of images (:meth:`evaluate_batch`).

    Args:
        model: a name for :func:`vizapp.load_model`, or a model it loaded (:class:`vizapp.models.base.VizModel`; then
            ``device`` and ``pretrained`` are not read).
        methods: names from :data:`vizapp.methods.METHODS` and/or ``"random"``.
        steps: steps of vizapp's deletion/insertion curves (Petsiuk et al.); 0 skips them.
        seed: job seed for the random baseline.
        time_limit: seconds per image, checked between stages (a stage already running is not interrupted).
        threads: torch CPU threads (fixed so that results do not depend on the machine's core count).
        batch_size: perturbed images per forward (None: :func:`vizapp.limits.perturbation_batch` of the model's
            device, 16 on the CPU and 256 on a GPU).
        device: passed to :func:`vizapp.load_model` (None: CUDA when available).
        pretrained: False builds the model with random weights (timing a large model offline).
        protocol: the perturbation test's protocol, "chefer2021" (the authors' pixel procedure) or "patches"
            (vizapp's whole-patch variant); see :mod:`vizapp.analysis.perturbation`.
        rollout_start_layer: first layer of the ``rollout`` method's maps (used for every score of the row); None:
            :func:`default_rollout_start_layer` of ``protocol``.
    """

    def __init__(
        self,
        model: str | VizModel,
        methods: Sequence[str],
        steps: int = 10,
        seed: int = 0,
        time_limit: float = 60.0,
        threads: int = 1,
        batch_size: int | None = None,
        device: str | None = None,
        pretrained: bool = True,
        protocol: str = "chefer2021",
        rollout_start_layer: int | None = None,
        prompts: Sequence[str] | None = None,
    ) -> None:
        import vizapp
        from vizapp.errors import VizappError

        if protocol not in PROTOCOLS:
            raise VizappError(f"protocol must be one of {list(PROTOCOLS)}, got {protocol!r}")

        torch.set_num_threads(max(1, int(threads)))
        kwargs: dict[str, Any] = {} if device is None else {"device": device}
        if not pretrained:
            kwargs["pretrained"] = False
        self.vm = model if isinstance(model, VizModel) else vizapp.load_model(model, **kwargs)
        if prompts:  # a CLIP-like model's classes: its text prompts (vizapp.models.prompts)
            from vizapp.models.prompts import with_prompts

            self.vm = with_prompts(self.vm, prompts)
        _check_methods(self.vm, methods)
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
        self.batch_size = int(batch_size) if batch_size is not None else limits.perturbation_batch(self.vm.device)
        mean = torch.as_tensor(self.vm.mean, dtype=torch.float32)
        std = torch.as_tensor(self.vm.std, dtype=torch.float32)
        #: Chefer et al. zero the removed pixels before normalising: black, in the model's input space, [C, 1, 1]
        self.black = ((0.0 - mean) / std)[:, None, None]
        #: "stage: error" -> how many times a batch's shared work failed there and its images ran again one at a time
        #: (:meth:`fell_back`): the rows are still right, but each image then costs what it costs alone
        self.fallbacks: collections.Counter[str] = collections.Counter()
        #: each cause of :attr:`fallbacks` -> where vizapp's code met it the first time (:func:`raised_at`)
        self.fallback_sites: dict[str, str] = {}

    def fell_back(self, stage: str, exc: BaseException, images: int) -> None:
        """Records (:attr:`fallbacks`) and logs that the shared work of a batch of ``images`` failed at ``stage``, so
        that its images run again one at a time: a failure that is one image's costs only that image's row, and a
        failure of the batched path itself is not silent (it would make every batch as slow as its images alone).
        The first time a cause comes, its site is kept (:attr:`fallback_sites`) and the log has its traceback, so
        that one run (on a lent GPU, say) is enough to find the bug; later times log one line."""
        why = f"{stage}: {type(exc).__name__}: {exc}"[:300]
        self.fallbacks[why] += 1
        first = why not in self.fallback_sites
        if first:
            self.fallback_sites[why] = raised_at(exc)
        log.warning(
            "a batch of %d images ran again one at a time after %s (raised at %s)",
            images,
            why,
            self.fallback_sites[why],
            exc_info=exc if first else None,
        )

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(self.vm.labels)

    @property
    def heads(self) -> list[int]:
        """The heads of each layer (a windowed model's differ by stage)."""
        from vizapp.statistics_pass import layer_heads

        return layer_heads(self.vm)

    @property
    def undefined(self) -> dict[str, str]:
        """Statistic -> why it is NaN in every row (not defined for this model)."""
        from vizapp.statistics import undefined_statistics

        return undefined_statistics(self.vm.num_prefix_tokens, self.vm.windowed)

    def map_grid(self, image: torch.Tensor) -> tuple[tuple[int, int], tuple[int, int]]:
        """The grid the methods' maps of ``image`` [..., H, W] lie on, and the size in input pixels of one of its
        cells (the ``chefer2021`` protocol's upsampling factor, the ``patches`` protocol's patch): a plain ViT's patch
        grid and patch size; a windowed model's first stage, its tokens as far apart as its patch embedding's
        patches (:func:`vizapp.models.swin.stage_strides`)."""
        vm = self.vm
        grid = vm.grid_for(image.shape[-2], image.shape[-1])
        if vm.windowed:
            from vizapp.models.swin import stage_strides

            return grid, stage_strides(vm, 1)[0]
        return grid, (int(vm.patch_size[0]), int(vm.patch_size[1]))

    def notes(self) -> list[str]:
        """Sentences the report repeats about this model: where a windowed model's maps lie, and why a statistic is
        NaN in every row."""
        out = []
        if self.vm.windowed:
            (gh, gw), (sh, sw) = self.map_grid(torch.zeros(self.vm.input_size))
            out.append(
                f"{self.vm.name} attends within windows (Swin): its maps lie on its first stage's {gh}x{gw} grid of "
                f"tokens {sh}x{sw} px apart (the `chefer2021` protocol upsamples them by that), rollout and the class "
                "maps carried down through windows and patch merging (a merged token to its 2x2 sources in equal "
                "shares), attention flow as max-flows on that graph, `last_layer` brought there from the last stage by repetition; its per-head statistics are "
                "each token's attention over its window, and a layer's columns are the heads it has."
            )
        return out + list(self.undefined.values())

    def needs_class(self, method: str) -> bool:
        """Whether ``method``'s map is for one class (computed for the prediction and, where it differs, the target)."""
        if method == RANDOM:
            return False
        if self.vm.windowed:
            from vizapp.swin_result import CLASS_METHODS

            return method in CLASS_METHODS
        from vizapp import methods as registry

        return registry.get(method).needs_class

    def explain(self, r: Any, method: str, class_idx: int, **kwargs: Any) -> np.ndarray:
        """``method``'s map of analysis ``r`` on :meth:`map_grid`'s grid: the registry's for a plain ViT, the
        windowed analysis's own on its first stage's grid (:meth:`vizapp.swin_result.WindowAnalysis.first_grid_map`)."""
        if self.vm.windowed:
            return r.first_grid_map(method, class_idx if self.needs_class(method) else None, **kwargs)
        from vizapp import methods as registry

        return registry.explain(r, method, class_idx, **kwargs)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """Class probabilities [B, K] (float32, on the model's device: the caller copies them to the host when it
        needs them, so that on a GPU the host does not wait for each forward) of inputs ``x`` [B, C, H, W], in one
        forward."""
        vm = self.vm
        with torch.no_grad():
            logits = vm.logits(x.to(device=vm.device, dtype=vm.dtype))
        return probabilities(logits.float(), vm.activation)

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
        (:class:`vizapp.statistics.StatisticsReducer`); the methods' maps and perturbation scores of the whole batch
        are then computed batched (:func:`vizapp.evaluate.scores.method_scores`), each image within the per-image
        time limit. A row depends on the image, its target, the job's settings and which images share its
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
        heads: dict[int, dict[str, Any]] = {}
        for i, result in self._statistics(inputs).items():
            if isinstance(result, Exception):
                rows[i] = _failed(rows[i], result)
            else:
                heads[i] = self._head(items[i], *result)
        if self.methods and heads:
            for i, scores in method_scores(self, list(heads), items, inputs, heads).items():
                if isinstance(scores, Exception):
                    rows[i] = _failed(rows[i], scores)
                    del heads[i]
                else:
                    heads[i].update(scores)
        for i, head in heads.items():
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
                self.fell_back("the statistics forward", exc, len(idx))
                for i in idx:
                    try:
                        out[i] = self.statistics(inputs[i][None])[0]
                    except Exception as exc_i:  # noqa: BLE001 - this image's row says why
                        out[i] = exc_i
        return dict(sorted(out.items()))

    def statistics(self, x: torch.Tensor) -> list[tuple[np.ndarray, dict[str, np.ndarray]]]:
        """One captured forward of a batch ``x`` [B, C, H, W]: per image, its class probabilities [K] (float32) and
        every registered statistic (:mod:`vizapp.statistics`), name -> [L, H] (per head) or [L] (per block)
        (:func:`vizapp.statistics_pass.forward_statistics`)."""
        from vizapp import BadParameterError
        from vizapp.statistics_pass import forward_statistics

        vm = self.vm
        found = forward_statistics(vm, x)
        if not vm.labels or found.logits.shape[-1] != len(vm.labels):
            raise BadParameterError("the model has no classifier head: perturbation tests need class scores")
        probs = probabilities(found.logits.float(), vm.activation).cpu().numpy()  # [B, K]
        return list(zip(probs, found.per_image(), strict=True))

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
        heads = self.heads
        for name, values in stats.items():  # every registered statistic: [L, H] per head, [L] per block
            for layer, row in enumerate(values):
                if np.ndim(row) == 0:
                    out[f"{name}.l{layer}"] = float(row)
                else:
                    for h, v in enumerate(row[: heads[layer]]):  # the heads the layer has
                        out[f"{name}.l{layer}.h{h}"] = float(v)
        return out


def _check_methods(vm: Any, methods: Sequence[str]) -> None:
    """Refuse, one sentence each, the methods ``vm``'s family does not offer: a windowed model (Swin) has its own
    maps (:data:`vizapp.swin_result.METHODS`), a plain ViT the registry's."""
    from vizapp.errors import VizappError
    from vizapp.swin_result import METHODS, refusal

    if vm.windowed:
        refused = [refusal(m) for m in methods if m != RANDOM and m not in METHODS]
    else:
        from vizapp import methods as registry

        refused = [
            f"{m!r} is a windowed (Swin) model's map; for {vm.name} the last layer's class-token attention is 'attention'."
            for m in methods
            if m not in registry.METHODS and m in METHODS
        ]
    if refused:
        raise VizappError(f"{vm.name}: " + " ".join(refused))
