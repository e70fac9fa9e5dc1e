"""The methods' perturbation scores for a batch of images: the evaluation's hot path, batched.

For the images of one engine batch (:meth:`Evaluator.evaluate_batch`):

1. **Maps.** The images go through the model in batched forwards (:func:`vizapp.batch.forward_groups`, cut to the
   memory budget); with a class-specific method, that forward keeps its attention in the autograd graph and ONE
   backward of Σ_b logit_b[predicted_b] gives every image its predicted class's gradient, and one more backward
   (of the images whose target differs) its target's (:func:`vizapp.pipeline.class_gradients`), whatever the number
   of methods. Where the methods on that forward are gradient rollout and relevance, with attention rollout and the
   last layer's CLS attention beside them (the defaults, on a ViT), their maps come straight from that forward's
   graph for the whole group at once, with no analysis of any image, and reach the host in one copy
   (:mod:`vizapp.graph_maps`); otherwise each method's maps come from the registry (:func:`vizapp.methods.explain`),
   image by image (a windowed model's from its own analysis, on its first stage's grid: :meth:`Evaluator.explain`).
2. **Perturbed copies.** Every perturbed copy of every image (the protocol's 2 × 9 per map, vizapp's deletion and
   insertion curves) is formed as it is needed and forwarded in batches of exactly ``batch_size`` copies, across
   images: at most one batch and one image's copies are in memory at once.

Each image has its own clock: its share of the shared forwards and backwards, its own maps, its share of the
perturbation forwards. An image over the per-image limit gets a timeout row. A failure that is not one image's
(a forward of the batch) makes every image of the batch run again alone, so that one bad image costs only its row.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from vizapp.analysis.faithfulness import patch_order, random_order_saliency, step_counts, trapezoid_auc
from vizapp.analysis.perturbation import (
    CHEFER_FRACTIONS,
    DIRECTIONS,
    accuracy_auc,
    changed_masks,
    compose,
    masked_copies,
    patch_fractions,
    patch_perturbed_images,
    pixel_masks,
    upsample_map,
)
from vizapp.transfer import tensor_on, to_device

if TYPE_CHECKING:
    from vizapp.evaluate.worker import Evaluator
    from vizapp.pipeline import Analysis

RANDOM = "random"
"""The random-order baseline's method name (not in the registry: it is not an explanation)."""

CLASS_KINDS = ("pred", "target")
"""Explanations are computed for the predicted class and for the target class (Chefer et al.'s two settings)."""


class ImageTimeout(Exception):
    """An image went over the per-image time limit."""


class Clocks:
    """Seconds spent on each image of a batch, the shared stages split evenly; :meth:`check` raises ImageTimeout."""

    def __init__(self, images: Sequence[int], limit: float) -> None:
        self.spent = dict.fromkeys(images, 0.0)
        self.limit = limit

    def charge(self, images: Sequence[int], seconds: float, weights: Sequence[float] | None = None) -> None:
        """Split ``seconds`` over ``images`` (evenly, or in proportion to ``weights``)."""
        total = float(sum(weights)) if weights is not None else float(len(images))
        for j, i in enumerate(images):
            self.spent[i] += seconds * ((weights[j] if weights is not None else 1.0) / max(total, 1e-12))

    def over(self, image: int, stage: str) -> ImageTimeout | None:
        if self.spent[image] > self.limit:
            return ImageTimeout(f"over the {self.limit:g} s per-image limit after {stage}")
        return None


@dataclass
class _Job:
    """Perturbed copies of one image to classify: what they are for, how many, and how to form them."""

    image: int
    kind: str  # "chefer", "baseline", "curve"
    key: tuple
    count: int
    make: Callable[[], torch.Tensor]


def image_seed(seed: int, item_id: str) -> int:
    """The random baseline's seed for one image: depends on the job seed and the image id only (not the shard)."""
    import zlib

    return (zlib.crc32(item_id.encode("utf-8")) ^ (seed * 0x9E3779B1)) & 0x7FFFFFFF


def method_scores(
    ev: Evaluator,
    images: Sequence[int],
    items: Sequence[dict[str, Any]],
    inputs: dict[int, torch.Tensor],
    heads: dict[int, dict[str, Any]],
) -> dict[int, dict[str, Any] | Exception]:
    """The score columns of each image in ``images`` (indices into ``items``, ``inputs`` [C, H, W] preprocessed and
    ``heads``, the class columns), or the exception that ended its row. See the module docstring."""
    clocks = Clocks(images, ev.time_limit)
    try:
        maps = _maps(ev, images, items, inputs, heads, clocks)
    except ImageTimeout as exc:  # the shared forward alone took every image over its limit
        return dict.fromkeys(images, exc)
    except Exception as exc:  # noqa: BLE001 - not one image's failure: each image runs alone, so only its row fails
        if len(images) == 1:
            return {images[0]: exc}
        ev.fell_back("the maps", exc, len(images))
        out: dict[int, dict[str, Any] | Exception] = {}
        for i in images:
            out.update(method_scores(ev, [i], items, inputs, heads))
        return out
    found: dict[int, dict[str, Any] | Exception] = {i: m for i, m in maps.items() if isinstance(m, Exception)}
    ready = [i for i in images if i not in found]
    if ready:
        try:
            found.update(_scores(ev, ready, inputs, heads, maps, clocks))  # type: ignore[arg-type]
        except Exception as exc:  # noqa: BLE001 - as above
            if len(ready) == 1:
                return {**found, ready[0]: exc}
            ev.fell_back("the perturbation scores", exc, len(ready))
            for i in ready:
                found.update(method_scores(ev, [i], items, inputs, heads))
    return {i: found[i] for i in images}


def _maps(
    ev: Evaluator,
    images: Sequence[int],
    items: Sequence[dict[str, Any]],
    inputs: dict[int, torch.Tensor],
    heads: dict[int, dict[str, Any]],
    clocks: Clocks,
) -> dict[int, dict[tuple[str, str], torch.Tensor] | Exception]:
    """Every (method, class kind) map [P] of every image, from batched forwards (and backwards)."""
    from vizapp import graph_maps
    from vizapp import methods as registry
    from vizapp.batch import forward_groups
    from vizapp.pipeline import analyze_inputs, class_gradients

    vm = ev.vm
    names = [name for name in ev.methods if name != RANDOM]
    if vm.windowed:  # a windowed model's maps read its analysis (vizapp.swin_result), but AttnLRP and LeGrad,
        # which run the model themselves (Method.batch) as for a plain ViT
        from vizapp.swin_result import MODEL_METHODS
        from vizapp.swin_result import class_gradients as gradients_of

        asked: dict[str, Any] = {name: registry.get(name) for name in names if name in MODEL_METHODS}
        own_run = list(asked)
        class_specific = any(ev.needs_class(name) for name in names if name not in asked)
        on_analysis = any(name not in asked for name in names)
    else:
        gradients_of = class_gradients
        asked = {name: registry.get(name) for name in names}
        # methods that run the model themselves (Method.batch: AttnLRP, LeGrad) take each group in their own forward
        # and backward, per class kind; the others read the analysis forward, which keeps its graph for the
        # class-specific
        own_run = [name for name, m in asked.items() if m.batch is not None]
        class_specific = any(m.needs_class and m.batch is None for m in asked.values())
        on_analysis = any(m.batch is None for m in asked.values())
    # the gradient maps, with rollout and the CLS attention beside them, straight from the forward's graph
    direct = [name for name in names if name not in own_run]
    if not graph_maps.takes(vm, direct):
        direct = []
    out: dict[int, dict[tuple[str, str], torch.Tensor] | Exception] = {}
    graph = bool(direct) and not own_run  # (the maps of an AttentionGraph alone: its own memory estimate)
    for members in forward_groups(vm, [inputs[i][None] for i in images], class_specific or bool(own_run), graph):
        group = [images[j] for j in members]
        t0 = time.perf_counter()
        x = torch.stack([inputs[i] for i in group])
        ready: dict[int, dict[tuple[str, str], torch.Tensor]] = {i: {} for i in group}
        x_dev = to_device(x, vm.device, vm.dtype) if own_run else x  # one copy for the methods that run the model
        for name in own_run:
            _own_run_maps(ev, asked[name], x_dev, group, heads, ready)
        from_graph = bool(direct) and not graph_maps.replayed(vm, x)
        if from_graph:
            _graph_maps(ev, direct, x, group, heads, ready)
        found = (
            analyze_inputs(vm, x, gradients=class_specific) if on_analysis and not from_graph else [None] * len(group)
        )
        if class_specific and not from_graph:
            gradients_of(found, [heads[i]["predicted"] for i in group])  # one backward for the group
            differ = [k for k, i in enumerate(group) if heads[i]["target"] != heads[i]["predicted"]]
            if differ:  # and one more for the targets that are not the prediction
                gradients_of([found[k] for k in differ], [heads[group[k]]["target"] for k in differ])
        clocks.charge(group, time.perf_counter() - t0)
        if all(clocks.over(i, "the analysis forward") for i in group):
            raise clocks.over(group[0], "the analysis forward")  # type: ignore[misc]
        for r, i in zip(found, group, strict=True):
            late = clocks.over(i, "the analysis forward")
            if late is not None:
                out[i] = late
                continue
            try:
                grid, _ = ev.map_grid(x)
                out[i] = _image_maps(ev, r, grid, items[i], heads[i], clocks, i, ready[i])
            except Exception as exc:  # noqa: BLE001 - this image's row says why
                out[i] = exc
        del found  # this forward's graph and analyses go before the next forward
    return out


def _graph_maps(
    ev: Evaluator,
    names: Sequence[str],
    x: torch.Tensor,
    group: list[int],
    heads: dict[int, dict[str, Any]],
    ready: dict[int, dict[tuple[str, str], torch.Tensor]],
) -> None:
    """The maps of ``names`` (:func:`vizapp.graph_maps.takes`) for a group ``x`` [B, C, H, W] from one forward with
    its attention in the graph: the class maps of every image's predicted class from one backward, of the images
    whose target differs from one more; all of them to the host in one copy."""
    from vizapp import graph_maps

    vm = ev.vm
    asked = {
        name: graph_maps.options(vm, name, **({"start_layer": ev.rollout_start_layer} if name == "rollout" else {}))
        for name in names
    }
    graph = graph_maps.AttentionGraph(vm, x)
    differ = [k for k, i in enumerate(group) if heads[i]["target"] != heads[i]["predicted"]]
    predicted = graph.plain_maps(asked) | graph.class_maps(
        asked, [heads[i]["predicted"] for i in group], retain=bool(differ)
    )
    found = {(name, "pred"): m for name, m in predicted.items()}
    if differ:
        targets = graph.class_maps(asked, [heads[group[k]]["target"] for k in differ], members=differ)
        found |= {(name, "target"): m for name, m in targets.items()}
    for (name, kind), maps in graph_maps.to_host(found, graph.grid).items():
        for j, k in enumerate(range(len(group)) if kind == "pred" else differ):
            ready[group[k]][(name, kind)] = torch.from_numpy(maps[j].reshape(-1))


def _own_run_maps(
    ev: Evaluator,
    method: Any,
    x: torch.Tensor,
    group: list[int],
    heads: dict[int, dict[str, Any]],
    ready: dict[int, dict[tuple[str, str], torch.Tensor]],
) -> None:
    """The maps of a method that runs the model itself (``Method.batch``) for a group ``x`` [B, C, H, W] on the model's
    device: one call for every image's predicted class, one more for the images whose target differs."""
    vm = ev.vm
    for kind in CLASS_KINDS:
        members = [k for k, i in enumerate(group) if kind == "pred" or heads[i]["target"] != heads[i]["predicted"]]
        if not members:
            continue
        key = "predicted" if kind == "pred" else "target"
        part = x if len(members) == len(group) else x[tensor_on(members, x.device)]
        found = method.batch(vm, part, [heads[group[k]][key] for k in members])  # [b, gh, gw]
        for j, k in enumerate(members):
            ready[group[k]][(method.name, kind)] = torch.as_tensor(np.asarray(found[j], dtype=np.float32)).reshape(-1)


def _image_maps(
    ev: Evaluator,
    r: Analysis | None,
    grid: tuple[int, int],
    item: dict[str, Any],
    head: dict[str, Any],
    clocks: Clocks,
    i: int,
    ready: dict[tuple[str, str], torch.Tensor],
) -> dict[tuple[str, str], torch.Tensor]:
    """One image's maps [P]: one per (method, class kind); methods without a class, or pred == target, share one;
    ``ready`` holds the maps already made for the group (``Method.batch``); ``r`` is None when no method asked reads
    the analysis."""
    pred, target = head["predicted"], head["target"]
    num_patches = grid[0] * grid[1]
    maps: dict[tuple[str, str], torch.Tensor] = {}
    for name in ev.methods:
        for kind in CLASS_KINDS:
            cls = pred if kind == "pred" else target
            same = kind == "target" and (not ev.needs_class(name) or cls == pred)
            if same:
                maps[(name, kind)] = maps[(name, "pred")]
            elif (name, kind) in ready:
                maps[(name, kind)] = ready[(name, kind)]
            elif name == RANDOM:
                g = torch.Generator().manual_seed(image_seed(ev.seed, str(item["id"])))
                maps[(name, kind)] = random_order_saliency(num_patches, g)
            else:
                t0 = time.perf_counter()
                kw = {"start_layer": ev.rollout_start_layer} if name == "rollout" else {}
                m = ev.explain(r, name, cls, **kw)
                maps[(name, kind)] = torch.as_tensor(np.asarray(m, dtype=np.float32)).reshape(-1)
                clocks.charge([i], time.perf_counter() - t0)
                late = clocks.over(i, f"method {name!r}")
                if late is not None:
                    raise late
    return maps


def _jobs(
    ev: Evaluator, i: int, image: torch.Tensor, head: dict[str, Any], maps: dict[tuple[str, str], torch.Tensor]
) -> tuple[list[_Job], dict[tuple[str, str, str], tuple[str, str, str]]]:
    """Image ``i``'s perturbed copies, as jobs formed lazily, and the (method, kind, direction) scores that repeat
    another's (a map shared by both class kinds)."""
    grid, patch = ev.map_grid(image)  # the maps' grid and the pixels of one of its cells, from the model
    num_patches = grid[0] * grid[1]
    jobs: list[_Job] = []
    done: dict[tuple[str, str, str], tuple[str, str, str]] = {}
    pixel = _PixelMasks(grid, patch, image.device) if ev.protocol == "chefer2021" else None
    black = to_device(ev.black, image.device)  # the fill colour where the copies are formed, without a wait
    for (name, kind), sal in maps.items():
        for direction in DIRECTIONS:
            key = (name, kind, direction)
            if kind == "target" and maps[(name, kind)] is maps[(name, "pred")]:
                done[key] = (name, "pred", direction)
                continue
            if pixel is not None:

                def make(j=pixel.add(sal, direction)) -> torch.Tensor:
                    return masked_copies(image, pixel.take(j), black)  # [9, C, H, W]

            else:

                def make(sal=sal, direction=direction) -> torch.Tensor:
                    return patch_perturbed_images(image, sal, grid, patch, direction, black)  # [9, C, H, W]

            jobs.append(_Job(i, "chefer", key, len(CHEFER_FRACTIONS) - 1, make))
    if ev.steps > 0:
        # Inner steps only: step 0 of deletion and step S of insertion are the image (its probabilities come from
        # the statistics forward); the all-baseline end is shared by every method and forwarded once.
        counts = step_counts(num_patches, ev.steps)
        base = torch.zeros_like(image)  # vizapp's deletion/insertion baseline: 0 = the dataset-mean colour
        jobs.append(_Job(i, "baseline", (), 1, lambda: base[None]))
        for name in ev.methods:
            masks = changed_masks(patch_order(maps[(name, "pred")]), counts[1:-1])  # [S-1, P]
            for mode, (changed, unchanged) in (("deletion", (base, image)), ("insertion", (image, base))):

                def make(masks=masks, changed=changed, unchanged=unchanged) -> torch.Tensor:
                    return compose(masks, changed, unchanged, grid, patch)

                jobs.append(_Job(i, "curve", (name, mode), masks.shape[0], make))
    return jobs, done


class _PixelMasks:
    """One image's ``chefer2021`` masks, made together on the host when its first job forms its copies (one bilinear
    upsampling and one topk per step for all of the image's maps: :func:`pixel_masks`), moved to ``device`` in one
    copy that does not wait for it (:func:`vizapp.transfer.to_device`), and let go when its last job has taken them,
    so that the masks of one image at a time are held."""

    def __init__(self, grid: tuple[int, int], patch: int | Sequence[int], device: torch.device) -> None:
        self.grid, self.patch, self.device = grid, patch, device
        self.maps: list[torch.Tensor] = []
        self.directions: list[str] = []
        self.masks: torch.Tensor | None = None  # [J, S, H, W] bool
        self.left = 0

    def add(self, saliency: torch.Tensor, direction: str) -> int:
        """Registers a map [P] and a direction; returns the index its job takes."""
        self.maps.append(saliency.reshape(self.grid))
        self.directions.append(direction)
        self.left += 1
        return len(self.maps) - 1

    def take(self, j: int) -> torch.Tensor:
        """Job ``j``'s masks [S, H, W]."""
        if self.masks is None:
            pix = upsample_map(torch.stack(self.maps), self.patch)  # [J, H, W]
            self.masks = to_device(pixel_masks(pix, self.directions), self.device)
        out = self.masks[j]
        self.left -= 1
        if self.left == 0:
            self.masks = None
            self.maps.clear()
        return out


def _classified(ev: Evaluator, jobs: Sequence[_Job]) -> list[tuple[_Job, torch.Tensor, float]]:
    """Each job with the class probabilities of its copies [n, K] (on the host) and its share (by copies) of the
    seconds of the forwards they were in. Copies are formed job by job and forwarded in batches of exactly
    ``ev.batch_size``, across jobs and images: only one batch and one job's copies are held at a time, and the
    forwards do not depend on how the copies are split into jobs. The probabilities stay on the model's device until
    the last forward and come to the host in one copy: on a GPU the host forms the next batch's copies (their masks
    are made on the host) while the device classifies the last, instead of waiting for each forward; the time of that
    one wait is shared by every copy."""
    parts: list[torch.Tensor] = []
    held = 0
    probs: list[torch.Tensor] = []
    seconds: list[float] = []  # per copy: its share of its forward's time

    def forward(x: torch.Tensor) -> None:
        t0 = time.perf_counter()
        probs.append(ev.classify(x))
        seconds.extend([(time.perf_counter() - t0) / len(x)] * len(x))

    for job in jobs:
        made = job.make()
        if made.shape[0] != job.count:
            raise RuntimeError(f"{made.shape[0]} perturbed copies formed for a job of {job.count}")
        parts.append(made)
        held += job.count
        while held >= ev.batch_size:
            x = torch.cat(parts)
            forward(x[: ev.batch_size])
            rest = x[ev.batch_size :]
            parts, held = ([rest] if len(rest) else []), len(rest)
    if held:
        forward(torch.cat(parts))
    t0 = time.perf_counter()
    every = torch.cat(probs).cpu() if probs else torch.zeros(0, len(ev.labels))  # the one wait for the forwards
    if seconds:
        waited = (time.perf_counter() - t0) / len(seconds)
        seconds = [s + waited for s in seconds]
    out, lo = [], 0
    for job in jobs:
        out.append((job, every[lo : lo + job.count], float(sum(seconds[lo : lo + job.count]))))
        lo += job.count
    return out


def _scores(
    ev: Evaluator,
    images: Sequence[int],
    inputs: dict[int, torch.Tensor],
    heads: dict[int, dict[str, Any]],
    maps: dict[int, dict[tuple[str, str], torch.Tensor]],
    clocks: Clocks,
) -> dict[int, dict[str, Any] | Exception]:
    """The score columns of each image from its maps: every perturbed copy of every image classified in shared
    batches (:func:`_classified`)."""
    jobs: list[_Job] = []
    repeats: dict[int, dict[tuple[str, str, str], tuple[str, str, str]]] = {}
    x_nominal = np.asarray(CHEFER_FRACTIONS)
    out: dict[int, dict[str, Any]] = {}
    for i in images:
        # [C, H, W] on the model's device: the perturbed copies are formed there from masks made on the host (each
        # mask, bool [S, H, W], is a 12th of the copies it selects between)
        image = to_device(inputs[i], ev.vm.device, torch.float32)
        grid, _ = ev.map_grid(image)
        num_patches = grid[0] * grid[1]
        x = x_nominal if ev.protocol == "chefer2021" else patch_fractions(num_patches)
        out[i] = {f"perturbation_x{k}": float(x[k]) for k in range(1, len(x))}
        out[i]["_x"] = x
        found, repeats[i] = _jobs(ev, i, image, heads[i], maps[i])
        jobs += found
    curves: dict[int, dict[tuple[str, str], np.ndarray]] = {i: {} for i in images}
    base_prob: dict[int, float] = {}
    for job, probs, seconds in _classified(ev, jobs):
        i, head = job.image, heads[job.image]
        clocks.charge([i], seconds)
        if job.kind == "chefer":
            name, kind, direction = job.key
            top = probs.argmax(dim=-1).numpy()
            acc = np.concatenate([[head["correct"]], (top == head["target"]).astype(np.int64)])  # [10]
            prefix = f"{name}.{kind}.{direction}"
            for k, a in enumerate(acc[1:], start=1):
                out[i][f"{prefix}.acc{k}"] = int(a)
            out[i][f"{prefix}.auc"] = float(accuracy_auc(acc, out[i]["_x"]))
        elif job.kind == "baseline":
            base_prob[i] = float(probs[0, head["predicted"]])
        else:
            curves[i][job.key] = probs[:, head["predicted"]].double().numpy()
    result: dict[int, dict[str, Any] | Exception] = {}
    for i in images:
        late = clocks.over(i, "the perturbation forwards")
        if late is not None:
            result[i] = late
            continue
        row = out[i]
        del row["_x"]
        if curves[i]:
            grid, _ = ev.map_grid(inputs[i])
            num_patches = grid[0] * grid[1]
            counts = step_counts(num_patches, ev.steps)
            p_img = heads[i]["prob_pred"]  # the batched forward's, like the row's class columns
            for (name, mode), inner in curves[i].items():
                ends = (p_img, base_prob[i]) if mode == "deletion" else (base_prob[i], p_img)
                y = np.concatenate([[ends[0]], inner, [ends[1]]])  # [S+1]
                row[f"{name}.{mode}_auc"] = trapezoid_auc(counts / num_patches, y)
        for key, src in repeats[i].items():
            prefix, src_prefix = ".".join(key), ".".join(src)
            for k in range(1, len(CHEFER_FRACTIONS)):
                row[f"{prefix}.acc{k}"] = row[f"{src_prefix}.acc{k}"]
            row[f"{prefix}.auc"] = row[f"{src_prefix}.auc"]
        result[i] = row
    return result
