"""LeGrad (Bousselham, Boggust, Chaybouti, Strobelt & Kuehne, 2024: "LeGrad: An Explainability Method for Vision
Transformers via Feature Formation Sensitivity").

For every block l, the class score s_l is read from that block's output z_l through the model's own final norm,
pooling and head (the logit lens: what the output would be if the network stopped there). LeGrad takes the gradient
of s_l with respect to block l's own attention (after the softmax), A_l [H, N, N], keeps its positive part, averages
it over the heads and over the query rows, and keeps the patch columns:

    E_l = mean_rows( mean_heads( ReLU(∂s_l/∂A_l) ) )[patches],   map = minmax( Σ_l E_l ).

Every ∂s_l/∂A_l comes from ONE backward here: each block starts from its input detached (the forward's values are
the model's own), so s_l reaches only block l's attention, and the gradient of Σ_l s_l with respect to A_l is
∂s_l/∂A_l. The attention is vizapp's capture in the graph (:class:`vizapp.capture.AttentionCapture`, ``with_grad``).

A model pooled by an attention-pooling head (SigLIP, OpenCLIP's CoCa) is explained as the authors' code explains it
(:func:`legrad_pooled`): the gradient is taken on the pooling head's own attention, applied to each block's output.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from vizapp.transfer import tensor_on


def min_max(maps: torch.Tensor) -> torch.Tensor:
    """Each map [B, ...] scaled to [0, 1] by its own minimum and maximum; a constant map becomes all zeros."""
    flat = maps.reshape(maps.shape[0], -1)
    lo, hi = flat.min(dim=1, keepdim=True).values, flat.max(dim=1, keepdim=True).values
    span = hi - lo
    scaled = torch.where(span > 0, (flat - lo) / torch.where(span > 0, span, torch.ones_like(span)), 0.0)
    return scaled.reshape(maps.shape)


def layer_relevance(grads: Sequence[torch.Tensor], num_prefix_tokens: int) -> torch.Tensor:
    """E_l for every layer: ∂s_l/∂A_l [B, H, N, N] each -> [B, L, P] (ReLU, mean over heads and query rows, the
    patch columns)."""
    return torch.stack([g.clamp(min=0).mean(dim=1).mean(dim=1)[:, num_prefix_tokens:] for g in grads], dim=1)


@contextmanager
def isolated_blocks(blocks: Sequence[torch.nn.Module], outputs: list[Any]) -> Iterator[None]:
    """For one ``with`` block and the forwards of the thread that opened it (another thread's forward of the same
    cached model is left alone): every block's input is detached (a fresh leaf, values unchanged), and its output, in
    the graph, is put in ``outputs[l]``; hooks removed on exit, also when it raises."""
    owner = threading.get_ident()

    def pre(_m: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if threading.get_ident() != owner:
            return None
        if args:
            return (args[0].detach().requires_grad_(True), *args[1:]), kwargs
        key = next(iter(kwargs))  # transformers layers may be called with hidden_states=...
        return args, {**kwargs, key: kwargs[key].detach().requires_grad_(True)}

    def post(layer: int) -> Callable:
        def hook(_m: torch.nn.Module, _args: tuple, out: Any) -> None:
            if threading.get_ident() == owner:
                outputs[layer] = out[0] if isinstance(out, (tuple, list)) else out

        return hook

    handles = []
    try:
        for i, blk in enumerate(blocks):
            handles.append(blk.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(blk.register_forward_hook(post(i)))
        yield
    finally:
        for h in handles:
            h.remove()


def explained_classes(logits: torch.Tensor, classes: Sequence[int | None]) -> list[int]:
    """The class each image of a batch is explained for: the one given, or (None) its top-1 class in ``logits``."""
    top = logits.detach().argmax(dim=-1)
    return [int(top[i]) if c is None else int(c) for i, c in enumerate(classes)]


def _blocks_checked(model: torch.nn.Module, x: torch.Tensor, classes: list[Any], start_layer: Any) -> tuple[list, int]:
    """The model's encoder blocks and their number, once ``start_layer`` and one class per image are checked."""
    from vizapp.layers import encoder_layers

    blocks, _ = encoder_layers(model)
    depth = len(blocks)
    if isinstance(start_layer, bool) or not isinstance(start_layer, int) or not 0 <= start_layer < depth:
        raise ValueError(f"start_layer must be an integer in [0, {depth - 1}], got {start_layer!r}")
    if len(classes) != x.shape[0]:
        raise ValueError(f"give one class per image ({x.shape[0]}), got {len(classes)}")
    return blocks, depth


def legrad(
    model: torch.nn.Module,
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    lens_fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    classes: Sequence[int | None],
    num_prefix_tokens: int,
    grid_size: tuple[int, int],
    start_layer: int = 0,
) -> tuple[torch.Tensor, list[int]]:
    """LeGrad maps of a batch from one forward and one backward, [B, gh, gw] float32 in [0, 1].

    Args:
        model: a ViT vizapp captures (see :func:`vizapp.layers.encoder_layers`), in eval mode.
        logits_fn: x -> logits [B, K] (the model's own forward).
        lens_fn: a block's output [B, N, D] -> logits [B, K] through the model's final norm, pooling and head.
        x: the input [B, C, H, W], normalised as the model expects, on the model's device.
        classes: one per image: the class explained, or None for the image's top-1 class (from this forward).
        num_prefix_tokens: tokens before the patches (CLS, distillation, registers); their columns are left out.
        grid_size: (gh, gw) of ``x``'s patch grid.
        start_layer: the first block summed (0: every block, as the paper defines it).

    Returns:
        (the maps, the classes explained).
    """
    from vizapp.capture import AttentionCapture

    blocks, depth = _blocks_checked(model, x, classes, start_layer)
    outputs: list[Any] = [None] * depth
    with (
        torch.enable_grad(),
        isolated_blocks(blocks, outputs),
        AttentionCapture(model, with_grad=True, keep_qk=False) as cap,
    ):
        logits = logits_fn(x.detach())
        if any(a is None for a in cap.maps) or cap.unexact_layers or any(o is None for o in outputs):
            raise ValueError(
                "LeGrad needs every layer's attention formed by vizapp's capture (is fused attention off?)"
            )
        cls = explained_classes(logits, classes)
        idx = tensor_on(cls, logits.device)[:, None]
        score = sum(lens_fn(outputs[layer]).gather(1, idx).sum() for layer in range(start_layer, depth))
    grads = torch.autograd.grad(score, cap.maps[start_layer:])  # ∂s_l/∂A_l, [B, H, N, N] each
    per_layer = layer_relevance([g.detach().float() for g in grads], num_prefix_tokens)  # [B, L', P]
    b, (gh, gw) = x.shape[0], grid_size
    if per_layer.shape[-1] != gh * gw:
        raise ValueError(f"a {gh}x{gw} grid does not match {per_layer.shape[-1]} patch tokens")
    return min_max(per_layer.sum(dim=1)).reshape(b, gh, gw), cls


def legrad_pooled(
    model: torch.nn.Module,
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    readout: Any,
    x: torch.Tensor,
    classes: Sequence[int | None],
    grid_size: tuple[int, int],
    start_layer: int = 0,
    empty: Any = None,
    threshold: float = 0.8,
) -> tuple[torch.Tensor, list[int]]:
    """LeGrad of a model pooled by an attention-pooling head (MAP: SigLIP), as the authors' code defines it for such
    models (``compute_legrad_siglip`` in WalBouss/LeGrad ``legrad/wrapper.py``): for every block l the pooling head
    is applied to that block's output and s_l is the class score read through it; the gradient is taken on the pooling
    head's own attention over block l's tokens, A^pool_l [H, Q, M] (Q learned queries, one for SigLIP), not on the
    block's self-attention:

        E_l = mean_rows( mean_heads( ReLU(∂s_l/∂A^pool_l) ) )[patches],   map = minmax( Σ_l E_l ).

    Unlike the authors' code, block l's output goes through the model's final norm before the head, as the model's own
    forward does (the last block then reads the model's output); and s_l is the logit (for prompts exp(t)·cos + b,
    a positive multiple of their cosine plus a constant, so the map is the same). They keep the first query's row,
    the mean over the rows here (the same for SigLIP's one query); their wrapper's default ``layer_index=-2`` sums the
    last two blocks, ``start_layer`` chooses here (0: every block, the paper's sum).

    OpenCLIP's CoCa (their ``compute_legrad_coca``; ``readout`` from
    :func:`vizapp.models.pooling.openclip_coca_readout`): the head is CoCa's attentional pooler, whose first query's
    output, projected, is the contrastive image embedding; its attention row over block l's tokens (the CLS column
    left out) is differentiated, as theirs. Unlike their code, the pooler's output goes through ``ln_post`` before the
    projection, as the model's own forward does (they skip it, so their last block does not read the model's
    embedding), and s_l is the prompt's logit exp(t)·cos(image, text), the model's own score, where they take the
    dot product of the text embedding with the unnormalised image embedding (the normalisation depends on the
    attention, so these maps differ in general). Only the first query is computed (the captioning queries do not
    reach the embedding); they keep its row of the whole pooler's attention, the same numbers.

    With ``empty`` (their SigLIP correction, on by default in their code): the same map for the score of an "empty"
    prompt ("a photo of a"), min-max scaled; the patches where it exceeds ``threshold`` are set to zero before the
    final scaling (they mark the tokens every prompt's map weighs, whatever the prompt).

    Every layer's readout runs in one batched call on the block outputs (detached: s_l reaches only A^pool_l), and
    one backward gives every ∂s_l/∂A^pool_l.

    Args:
        model: a ViT vizapp captures (see :func:`vizapp.layers.encoder_layers`), in eval mode.
        logits_fn: x -> logits [B, K] (the model's own forward).
        readout: a :class:`vizapp.models.pooling.PooledReadout` (tokens -> logits, and the head's attention).
        x: the input [B, C, H, W], normalised as the model expects, on the model's device.
        classes: one per image: the class explained, or None for the image's top-1 class (from this forward).
        grid_size: (gh, gw) of ``x``'s patch grid.
        start_layer: the first block summed (0: every block).
        empty: a readout like ``readout`` whose one logit is the empty prompt's score, or None (no correction).
        threshold: the correction's threshold on the empty prompt's scaled map.

    Returns:
        (the maps [B, gh, gw] float32 in [0, 1], the classes explained).
    """
    blocks, depth = _blocks_checked(model, x, classes, start_layer)
    outputs: list[Any] = [None] * depth
    with torch.no_grad(), isolated_blocks(blocks, outputs):
        logits = logits_fn(x.detach())
    if any(o is None for o in outputs):
        raise ValueError("LeGrad needs every block's output, and a block gave none")
    cls = explained_classes(logits, classes)
    b, used = x.shape[0], depth - start_layer
    tokens = torch.cat([outputs[layer].detach() for layer in range(start_layer, depth)]).requires_grad_(True)
    idx = tensor_on(cls, tokens.device).repeat(used)[:, None]  # [l·B, 1]: layer-major, as ``tokens``
    total = _pooled_relevance(readout, tokens, idx, (used, b))
    gh, gw = grid_size
    if total.shape[-1] != gh * gw:
        raise ValueError(f"a {gh}x{gw} grid does not match {total.shape[-1]} patch tokens")
    if empty is not None:
        background = min_max(_pooled_relevance(empty, tokens, torch.zeros_like(idx), (used, b)))
        total = torch.where(background > threshold, 0.0, total)
    return min_max(total).reshape(b, gh, gw), cls


def _pooled_relevance(readout: Any, tokens: torch.Tensor, idx: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Σ_l E_l [B, P] from every layer's tokens [l·B, N, D] (``shape`` = (l, B)), the score of class ``idx`` [l·B, 1]
    read through ``readout``, and one backward on the pooling head's attention."""
    with torch.enable_grad():
        scores, attn = readout.with_attention(tokens)  # [l·B, K], [l·B, H, Q, M]
        (grad,) = torch.autograd.grad(scores.gather(1, idx).sum(), attn)
    per_layer = grad.detach().float().clamp(min=0).mean(dim=1).mean(dim=1)[:, readout.key_prefix :]  # [l·B, P]
    return per_layer.unflatten(0, shape).sum(dim=0)
