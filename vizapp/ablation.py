"""Head importance by ablation (Michel, Levy & Neubig 2019, "Are Sixteen Heads Really Better than One?") and its
first-order estimate, attribution patching (Nanda 2023; Syed, Rager & Conmy 2023, "Attribution Patching Outperforms
Automated Circuit Discovery").

In timm's ``Attention`` the heads' outputs are concatenated before the output projection: ``attn.proj``'s input is
[B, N, H·d] with head h in columns h·d:(h+1)·d (after ``attn.norm`` and the gate, which are identities in standard
ViTs). Ablating head h means replacing those columns:

- ``mode="zero"``: by 0;
- ``mode="mean"``: by their mean over the N tokens (prefix tokens included) of the same image, in that same forward.
  In :func:`head_importance` only one layer is ablated at a time and everything below it is clean, so this is the
  mean of the clean head output over this image's tokens.

Every other family (timm Eva/DINOv3/EVA-02/RoPE ViTs, BEiT and relpos ViTs, Hugging Face and torchvision ViTs) is
ablated at the same place by the capture, ``AttentionCapture(model, ablate={layer: mask}, ablate_mode=mode)``: the
per-head output [B, H, N, d] its attention call returns, before the output projection, with the same two modes
(:func:`vizapp.capture.ablate_head_output`). :func:`head_importance` takes that path (``path="capture"``) for every
model that is not a timm ``VisionTransformer``.

Windowed models (timm and transformers Swin) are ablated by :class:`vizapp.windows.WindowCapture` where each layer
hands its heads to the output projection, with the same two modes; "mean" is the head's mean over the image's real
(unpadded) tokens of that layer, every window together (see :mod:`vizapp.windows`). Their head count differs per stage
(Swin-T: 3, 6, 12, 24), so ``drop`` is [L, max H] with NaN for the heads a layer does not have.

The importance of a head is the drop of a score when it alone is ablated: the chosen class's probability (or logit)
for a model with a classifier head, and for a model without one (DINOv2, CLIP image towers) ``1 - cos`` between the
ablated and the clean pooled feature (what ``forward_head`` returns), which is 0 for the clean run.

The hooks live for one ``with`` block, act only on calls made by the thread that opened it (a cached model may serve
several users at once), and are removed on exit even when the forward raises. No model flag is changed.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from PIL import Image

from vizapp import limits
from vizapp.analysis.windows import window_index
from vizapp.capture import AttentionCapture
from vizapp.errors import BadParameterError, UnsupportedModelError
from vizapp.transfer import to_device
from vizapp.windows import WindowCapture

ABLATION_MODES = ("zero", "mean")
IMPORTANCE_METHODS = ("exact", "gradient")
SCORES = ("probability", "logit")


def head_projections(model: torch.nn.Module) -> list[tuple[torch.nn.Linear, int, int]]:
    """(``attn.proj``, num_heads, head_dim) of each block, checked to have timm's concatenated-heads layout."""
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise UnsupportedModelError(f"{type(model).__name__} has no transformer blocks whose heads vizapp can ablate")
    out = []
    for i, blk in enumerate(blocks):
        attn = getattr(blk, "attn", None)
        proj = getattr(attn, "proj", None)
        num_heads = getattr(attn, "num_heads", None)
        head_dim = getattr(attn, "head_dim", None)
        if not isinstance(proj, torch.nn.Linear) or num_heads is None or head_dim is None:
            raise UnsupportedModelError(
                f"block {i} uses {type(attn).__name__}, which has no per-head output projection vizapp can ablate; "
                "pick a timm ViT/DeiT/DINOv2/CLIP model"
            )
        if proj.in_features != num_heads * head_dim:
            raise UnsupportedModelError(
                f"block {i}: proj takes {proj.in_features} inputs, not num_heads × head_dim = {num_heads * head_dim}"
            )
        out.append((proj, int(num_heads), int(head_dim)))
    return out


@contextmanager
def _proj_pre_hooks(model: torch.nn.Module, make_hook: Callable[[int, int, int], Callable]) -> Iterator[None]:
    """Register ``make_hook(layer, num_heads, head_dim)`` as a forward pre-hook on every ``attn.proj`` for one block.

    The hook only runs for the thread that entered the block; every handle is removed on exit, also on error.
    """
    owner = threading.get_ident()
    handles = []
    try:
        for layer, (proj, num_heads, head_dim) in enumerate(head_projections(model)):
            hook = make_hook(layer, num_heads, head_dim)

            def guarded(module: torch.nn.Module, args: tuple[Any, ...], _hook: Callable = hook) -> Any:
                if threading.get_ident() != owner:
                    return None
                return _hook(module, args)

            handles.append(proj.register_forward_pre_hook(guarded))
        yield
    finally:
        for h in handles:
            h.remove()


def ablated_value(heads: torch.Tensor, mode: str) -> torch.Tensor:
    """What replaces each head's output under ``mode``: heads [B, N, H, d] -> [B, N, H, d] (zeros, or the token mean)."""
    if mode == "zero":
        return torch.zeros_like(heads)
    if mode == "mean":
        return heads.mean(dim=1, keepdim=True).expand_as(heads)
    raise BadParameterError(f"ablation mode must be one of {ABLATION_MODES}, got {mode!r}")


@contextmanager
def ablate_heads(
    model: torch.nn.Module, heads: Mapping[int, torch.Tensor], mode: str = "zero", alpha: float = 1.0
) -> Iterator[None]:
    """Ablate chosen heads of chosen layers during the forwards run inside the ``with`` block.

    Args:
        model: a timm ViT (``blocks[i].attn.proj`` fed with the concatenated heads).
        heads: layer index -> bool mask of the heads to ablate, [H] (every batch element) or [B, H] (per element).
        mode: "zero" or "mean" (see the module docstring).
        alpha: how far to move towards the ablated value: output + alpha · (ablated - output); 1 ablates fully,
            small values give the directional derivative that attribution patching estimates.
    """
    if mode not in ABLATION_MODES:
        raise BadParameterError(f"ablation mode must be one of {ABLATION_MODES}, got {mode!r}")
    num_layers = len(getattr(model, "blocks", ()))
    for layer in heads:
        if not 0 <= layer < num_layers:
            raise BadParameterError(f"layer must be in [0, {num_layers - 1}], got {layer}")

    def make_hook(layer: int, num_heads: int, head_dim: int) -> Callable:
        mask = heads.get(layer)

        def hook(module: torch.nn.Module, args: tuple[Any, ...]) -> Any:
            if mask is None:
                return None
            x = args[0]  # [B, N, H*d]
            m = mask.to(device=x.device, dtype=torch.bool)
            if m.shape[-1] != num_heads or m.dim() > 2 or (m.dim() == 2 and m.shape[0] != x.shape[0]):
                raise BadParameterError(
                    f"layer {layer}: head mask {tuple(m.shape)} does not fit [B={x.shape[0]}, H={num_heads}]"
                )
            m = m.reshape(-1, 1, num_heads, 1)  # [B or 1, 1, H, 1]
            xh = x.unflatten(-1, (num_heads, head_dim))  # [B, N, H, d]
            target = xh + alpha * (ablated_value(xh, mode) - xh)
            return (torch.where(m, target, xh).flatten(-2),) + tuple(args[1:])

        return hook

    with _proj_pre_hooks(model, make_hook):
        yield


@contextmanager
def record_head_outputs(model: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """Record each layer's concatenated head outputs (``attn.proj``'s input, [B, N, H·d]) in forward order.

    The list yielded is filled by the forwards run inside the ``with`` block; the tensors keep their autograd graph,
    so ``torch.autograd.grad(score, outputs)`` gives the gradient with respect to every head's output.
    """
    outputs: list[torch.Tensor] = []

    def make_hook(layer: int, num_heads: int, head_dim: int) -> Callable:
        def hook(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
            outputs.append(args[0])

        return hook

    with _proj_pre_hooks(model, make_hook):
        yield outputs


@contextmanager
def _record_block_inputs(model: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """Record the input tokens of every block, [B, N, D] each, in forward order (this thread only, removed on exit)."""
    owner = threading.get_ident()
    inputs: list[torch.Tensor] = []

    def hook(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        if threading.get_ident() == owner:
            inputs.append(args[0])

    handles = []
    try:
        for blk in model.blocks:
            handles.append(blk.register_forward_pre_hook(hook))
        yield inputs
    finally:
        for h in handles:
            h.remove()


def attribution_drops(
    outputs: list[torch.Tensor], grads: list[torch.Tensor], num_heads: int, mode: str
) -> torch.Tensor:
    """First-order estimate of each head's score drop: -Σ grad · (ablated - clean) over tokens and head dims.

    The score after ablating head h is ≈ score + ⟨∂score/∂o_h, o_h' - o_h⟩, so the drop (clean - ablated) is
    ``-⟨g_h, o_h' - o_h⟩``; for zero-ablation o_h' = 0 and the drop is ⟨g_h, o_h⟩.

    Args:
        outputs: per layer, the clean concatenated head outputs [1, N, H·d] (or [N, H·d]).
        grads: per layer, ∂score/∂outputs, same shapes.
        num_heads: H.
        mode: "zero" or "mean".

    Returns:
        [L, H] float32 estimated drops (computed in float64).
    """
    rows = []
    for o, g in zip(outputs, grads, strict=True):
        o = o.detach().to(torch.float64).reshape(1, -1, num_heads, o.shape[-1] // num_heads)  # [1, N, H, d]
        g = g.detach().to(torch.float64).reshape(o.shape)
        rows.append(-(g * (ablated_value(o, mode) - o)).sum(dim=(0, 1, 3)))  # [H]
    return torch.stack(rows).float()


def rank_correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation of two same-shaped tensors (flattened), ties given their average rank.

    Returns NaN when either input is constant (its ranks have no spread).
    """
    x = a.detach().reshape(-1).to(torch.float64)
    y = b.detach().reshape(-1).to(torch.float64)
    if x.shape != y.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    if x.numel() < 2:
        raise ValueError("rank correlation needs at least 2 values")

    def ranks(v: torch.Tensor) -> torch.Tensor:
        # rank = 1 + #smaller + (#equal - 1) / 2: the average of the positions the ties share
        less = (v[None, :] < v[:, None]).sum(dim=1).to(torch.float64)
        equal = (v[None, :] == v[:, None]).sum(dim=1).to(torch.float64)
        return 1.0 + less + (equal - 1.0) / 2.0

    rx, ry = ranks(x), ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = torch.sqrt((rx * rx).sum() * (ry * ry).sum())
    return float((rx * ry).sum() / denom) if denom > 0 else float("nan")


class HeadImportance(NamedTuple):
    """What :func:`head_importance` returns.

    Attributes:
        drop: [L, H] float32 drop of the score when each head alone is ablated (NaN rows for layers not reached when
            stopped early). Positive: the head supports the score.
        score: "probability", "logit" or "1 - cos" (no classifier head: the drop is 1 - cos(ablated, clean feature)).
        class_idx: the class scored, or None for "1 - cos".
        clean_score: the clean score (probability or logit; 1.0 for the cosine with itself).
        method: "exact" or "gradient".
        mode: "zero" or "mean".
        layers_done: layers computed (L unless ``should_stop`` ended it early).
    """

    drop: torch.Tensor
    score: str
    class_idx: int | None
    clean_score: float
    method: str
    mode: str
    layers_done: int


def _input_tensor(vm: Any, image: Image.Image | torch.Tensor) -> torch.Tensor:
    x = vm.transform(image) if isinstance(image, Image.Image) else image
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4 or x.shape[0] != 1:
        raise BadParameterError(f"expected one image (PIL, or a [C, H, W] input tensor), got {tuple(x.shape)}")
    return to_device(x, vm.device, vm.dtype)


def _has_classifier(vm: Any) -> bool:
    model = vm.model
    if hasattr(model, "num_classes"):  # timm
        return int(model.num_classes or 0) > 0 and not isinstance(getattr(model, "head", None), torch.nn.Identity)
    return bool(getattr(vm, "labels", ()))  # the other adapters name a label per output only with a head


def _forward(vm: Any, x: torch.Tensor) -> torch.Tensor:
    """The adapter's forward (logits [B, K] or the pooled feature [B, D]); the bare module for a minimal ``vm``."""
    logits = getattr(vm, "logits", None)
    return logits(x) if callable(logits) else vm.model(x)


def reuses_blocks(model: torch.nn.Module) -> bool:
    """True when :func:`head_importance` takes the reuse path by default (timm ``VisionTransformer``: its blocks are
    re-run from a cached input, H·(L+1)/2 image-forwards); False: the capture path, L·H image-forwards."""
    from timm.models.vision_transformer import VisionTransformer

    return isinstance(model, VisionTransformer)


def _real_slots(capture: WindowCapture, layer: int) -> torch.Tensor:
    """[nW·w²] bool: the slots of ``layer``'s windows that hold a token of the image (not padding)."""
    g = capture.geometry[layer]
    return (window_index(g.grid, g.window, g.shift, g.pad_first) >= 0).reshape(-1)


def exact_forward_passes(num_layers: int, num_heads: int, reuse: bool) -> float:
    """Image-forwards the exact method costs: H·(L+1)/2 on the reuse path, L·H on the capture path."""
    return num_heads * (num_layers + 1) / 2 if reuse else float(num_layers * num_heads)


def _resolve_class(vm: Any, logits: torch.Tensor, class_idx: int | str | None) -> int:
    k = logits.shape[-1]
    if class_idx is None:
        return int(logits[0].argmax())
    if isinstance(class_idx, str):
        if class_idx not in vm.labels:
            raise BadParameterError(f"unknown class {class_idx!r}; pick one of the model's labels")
        return vm.labels.index(class_idx)
    if not 0 <= int(class_idx) < k:
        raise BadParameterError(f"class_idx must be in [0, {k - 1}], got {class_idx}")
    return int(class_idx)


IMPORTANCE_PATHS = ("auto", "reuse", "capture")


def head_importance(
    vm: Any,
    image: Image.Image | torch.Tensor,
    class_idx: int | str | None = None,
    mode: str = "zero",
    method: str = "exact",
    score: str = "probability",
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    path: str = "auto",
) -> HeadImportance:
    """Drop of a score when each attention head alone is ablated, for every layer and head.

    ``method="exact"`` has two paths with the same result:

    - ``path="reuse"`` (timm ``VisionTransformer``, the default there): runs the model once, keeping each block's
      input, then for each layer l runs ``blocks[l:]``, the final norm and ``forward_head`` on a batch of H copies of
      block l's input, head i ablated in copy i (hooks on ``attn.proj``): about H·(L+1)/2 image-forwards.
    - ``path="capture"`` (every family vizapp loads, the default for all but timm ``VisionTransformer``): for each
      layer l, ONE forward of the adapter (``vm.logits``) on a batch of H copies of the image inside
      ``AttentionCapture(ablate={l: eye(H)})``, so head i is ablated in copy i where the layer's attention call
      returns it. Nothing below layer l is reused, so this costs L forwards of batch H, L·H image-forwards (against
      H·(L+1)/2 on the reuse path); the H copies run in sub-batches within :data:`vizapp.limits.ABLATION_BATCH_BYTES`.
      Windowed models (Swin) take this path with :class:`vizapp.windows.WindowCapture` (``ablate={l: eye(H_l)}``,
      H_l copies for layer l); their ``drop`` is [L, max H], NaN where a layer has fewer heads.

    ``should_stop()`` is checked before each layer (then the remaining rows are NaN) and ``progress(layers_done, L)``
    is called after each.

    ``method="gradient"`` (attribution patching) runs one forward and one backward and returns the first-order
    estimate of every drop (:func:`attribution_drops`), with ∂score/∂(head outputs) read at ``attn.proj``'s input
    (reuse path) or at the attention call's output (``AttentionCapture(record_head_outputs=True)``, capture path). It
    needs a classifier head: ``1 - cos`` is minimal (0) at the clean run, so its gradient is 0 and the first-order
    estimate says nothing; use ``method="exact"`` there.

    Args:
        vm: a :class:`vizapp.models.VizModel` (uses ``model``, ``logits``, ``transform``, ``device``, ``dtype``,
            ``labels``; ``windowed`` when it is a Swin).
        image: a PIL image, or the model's input tensor [C, H, W] / [1, C, H, W] (already transformed).
        class_idx: class to score (index or label); default the clean top-1. Ignored without a classifier head.
        mode: "zero" or "mean" ablation (see the module docstring).
        method: "exact" or "gradient".
        score: "probability" (softmax of the class) or "logit", for models with a classifier head.
        progress: called as ``progress(done, total)``.
        should_stop: polled between layers; True ends the exact method early.
        path: "auto" (reuse for timm ``VisionTransformer``, capture otherwise), "reuse" or "capture".

    Returns:
        :class:`HeadImportance` with ``drop`` [L, H].
    """
    if mode not in ABLATION_MODES:
        raise BadParameterError(f"ablation mode must be one of {ABLATION_MODES}, got {mode!r}")
    if method not in IMPORTANCE_METHODS:
        raise BadParameterError(f"method must be one of {IMPORTANCE_METHODS}, got {method!r}")
    if score not in SCORES:
        raise BadParameterError(f"score must be one of {SCORES}, got {score!r}")
    if path not in IMPORTANCE_PATHS:
        raise BadParameterError(f"path must be one of {IMPORTANCE_PATHS}, got {path!r}")
    model = vm.model
    if path == "auto":
        path = "reuse" if reuses_blocks(model) else "capture"
    elif path == "reuse" and not reuses_blocks(model):
        raise UnsupportedModelError(
            f"{type(model).__name__} is not a timm VisionTransformer, whose blocks vizapp can re-run from a cached "
            "input; use path='capture' (or 'auto')"
        )
    x = _input_tensor(vm, image)
    classifier = _has_classifier(vm)
    if not classifier:
        score = "1 - cos"
        if method == "gradient":
            raise BadParameterError(
                "this model has no classifier head: its score, 1 - cos(ablated, clean feature), has zero gradient at "
                "the clean run, so the gradient estimate is always 0; use method='exact'"
            )

    def class_score(out: torch.Tensor, cls: int) -> torch.Tensor:  # out [B, K] -> [B]
        out = out.float()
        if score != "probability":
            return out[:, cls]
        # a SigLIP model's prompts: each one's sigmoid (vizapp.models.prompts); every other model: the softmax
        return (out.sigmoid() if getattr(vm, "activation", "softmax") == "sigmoid" else out.softmax(dim=-1))[:, cls]

    def drops(out: torch.Tensor, clean: torch.Tensor, cls: int | None, clean_score: float) -> torch.Tensor:
        if cls is not None:
            return (clean_score - class_score(out, cls)).cpu()
        return (1.0 - F.cosine_similarity(out.float(), clean.float(), dim=-1)).cpu()

    if method == "gradient":
        xg = x.detach().clone().requires_grad_(True)  # so that every head output is in the graph, frozen or not
        if path == "reuse":
            num_heads = head_projections(model)[0][1]
            with torch.enable_grad(), record_head_outputs(model) as outputs:
                logits = model(xg)
                cls = _resolve_class(vm, logits, class_idx)
                s = class_score(logits, cls)[0]
                grads = list(torch.autograd.grad(s, outputs))
        elif getattr(vm, "windowed", False):
            with torch.enable_grad(), WindowCapture(model, record_head_outputs=True, maps=False) as wc:
                logits = _forward(vm, xg)
                cls = _resolve_class(vm, logits, class_idx)
                s = class_score(logits, cls)[0]
                grads = torch.autograd.grad(s, wc.head_outputs)  # [1, nW·w², H_l·d] each
            drop = torch.full((len(wc), max(site.heads for site in wc.sites)), float("nan"))
            for layer, (o, g) in enumerate(zip(wc.head_outputs, grads, strict=True)):
                real = _real_slots(wc, layer).to(o.device)  # padded slots are cropped: zero gradient, not averaged
                heads = wc.sites[layer].heads
                drop[layer, :heads] = attribution_drops([o[:, real]], [g[:, real]], heads, mode)[0].cpu()
            if progress is not None:
                progress(len(wc), len(wc))
            return HeadImportance(drop, score, cls, float(s.detach()), method, mode, len(wc))
        else:
            with torch.enable_grad(), AttentionCapture(model, keep_qk=False, record_head_outputs=True) as cap:
                logits = _forward(vm, xg)
                cls = _resolve_class(vm, logits, class_idx)
                s = class_score(logits, cls)[0]
                heads = list(cap.head_outputs)  # [1, H, N, d] each
                grads = [g.transpose(1, 2).flatten(-2) for g in torch.autograd.grad(s, heads)]
            num_heads = heads[0].shape[1]
            outputs = [o.transpose(1, 2).flatten(-2) for o in heads]  # [1, N, H·d], heads concatenated
        drop = attribution_drops(outputs, grads, num_heads, mode).cpu()  # [L, H] on the CPU, as the exact path
        if progress is not None:
            progress(len(outputs), len(outputs))
        return HeadImportance(drop, score, cls, float(s.detach()), method, mode, len(outputs))

    windowed = path == "capture" and getattr(vm, "windowed", False)
    with torch.no_grad():
        if path == "reuse":
            with _record_block_inputs(model) as block_inputs:
                clean = model(x)  # [1, K] logits, or [1, D] pooled features
            layer_heads = [head_projections(model)[0][1]] * len(model.blocks)
        elif windowed:
            with WindowCapture(model, record_head_outputs=True, maps=False) as wc:
                clean = _forward(vm, x)
            layer_heads = [site.heads for site in wc.sites]
            batch = min(  # the copies' peak is at the layer with the most activations, whichever layer is ablated
                limits.ablation_batch(
                    max(layer_heads),
                    o.shape[1],
                    o.shape[2],
                    site.heads,
                    x.element_size(),
                    keys=g.window[0] * g.window[1],
                )
                for o, site, g in zip(wc.head_outputs, wc.sites, wc.geometry, strict=True)
            )
        else:
            with AttentionCapture(model, keep_qk=False, record_head_outputs=True) as cap:
                clean = _forward(vm, x)
            shapes = {tuple(o.shape[1:]) for o in cap.head_outputs}  # (H, N, d)
            if len(shapes) != 1:
                raise UnsupportedModelError(
                    f"the layers' heads differ in shape {sorted(shapes)}; vizapp ablates "
                    "one head per copy of the image and needs the same H in every layer"
                )
            (num_heads, tokens, head_dim) = shapes.pop()
            layer_heads = [num_heads] * len(cap)
            batch = limits.ablation_batch(num_heads, tokens, num_heads * head_dim, num_heads, x.element_size())
        if classifier:
            cls: int | None = _resolve_class(vm, clean, class_idx)
            clean_score = float(class_score(clean, cls)[0])
        else:
            cls, clean_score = None, 1.0
        num_layers = len(layer_heads)
        drop = torch.full((num_layers, max(layer_heads)), float("nan"))
        done = 0
        for layer in range(num_layers):
            if should_stop is not None and should_stop():
                break
            num_heads = layer_heads[layer]
            one_hot = torch.eye(num_heads, dtype=torch.bool, device=x.device)  # copy i ablates head i
            if path == "reuse":
                h = block_inputs[layer].expand(num_heads, -1, -1)  # [H, N, D]
                with ablate_heads(model, {layer: one_hot}, mode=mode):
                    for blk in model.blocks[layer:]:
                        h = blk(h)
                out = model.forward_head(model.norm(h))  # [H, K] or [H, D]
            else:
                outs = []
                for h0 in range(0, num_heads, batch):
                    mask = one_hot[h0 : h0 + batch]  # [b, H]
                    ablating = (
                        WindowCapture(model, ablate={layer: mask}, ablate_mode=mode, maps=False)
                        if windowed
                        else AttentionCapture(model, keep_qk=False, ablate={layer: mask}, ablate_mode=mode)
                    )
                    with ablating:
                        outs.append(_forward(vm, x.expand(mask.shape[0], -1, -1, -1).contiguous()))
                out = torch.cat(outs)  # [H, K] or [H, D]
            drop[layer, :num_heads] = drops(out, clean, cls, clean_score)
            done = layer + 1
            if progress is not None:
                progress(done, num_layers)
    return HeadImportance(drop, score, cls, clean_score, method, mode, done)
