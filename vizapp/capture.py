"""The only hook code in vizapp: the exact per-head attention of any supported ViT, with fused attention left on.

Every supported attention layer (timm's ``Attention``, ``EvaAttention`` with RoPE, BEiT's and the relpos ViTs'
relative-position attention, Hugging Face transformers' sdpa attention, torch's ``nn.MultiheadAttention``) hands its
q, k and v to ``F.scaled_dot_product_attention`` (torch's MHA to ``F.multi_head_attention_forward``, which we
evaluate ourselves from its own weights). The attention the layer uses is softmax(q kᵀ · scale + bias) of exactly
those arguments: q and k after RoPE and q/k-norm, the relative-position bias or mask passed as ``attn_mask``.

So the capture marks each attention module as running, on the calling thread, from its forward pre-hook to its end
(an ``always_call`` forward hook unmarks it, also when the module raises). While any capture is open,
``F.scaled_dot_product_attention`` is replaced by a function that hands the call to the capture of the innermost
marked module on this thread, and is torch's own function otherwise (one thread-local lookup); the last capture to
close puts torch's function back. torch's ``nn.MultiheadAttention`` is marked with a thread-local
``TorchFunctionMode`` instead, which also turns off torch's fused MHA fast path. At that call the capture:

- records q and k (and the additive bias) of the layer, [B, H, N, d] each;
- with a consumer (``on_attention``), computes the attention itself in fp32, a cache-sized chunk of heads at a time,
  hands each chunk to the consumer while it is hot (or the chunk's scores, for a consumer that forms their softmax
  itself: the CPU kernel), and returns chunk @ v as the layer's output, so the attention is formed once, not twice;
- with ``with_grad``, computes the attention as a tensor in the autograd graph, so ∂score/∂A is exact;
- with ``ablate``, replaces chosen heads' outputs (what the call returns, [B, H, N, d], before the output projection)
  by 0 or by their mean over the tokens, whichever path formed them; with ``record_head_outputs``, keeps those
  outputs (in the graph when gradients are on) as :attr:`AttentionCapture.head_outputs`.

Calls it cannot reproduce exactly (dropout in training, causal attention, grouped-query attention) run untouched
and the layer is listed in :attr:`AttentionCapture.unexact_layers` with the reason; views then refuse it clearly.
timm's ``Attention`` with ``fused_attn`` off never calls SDPA; its q and k are read at ``q_norm``/``k_norm`` and a
consumer is fed from them at the end of the layer (:attr:`AttentionCapture.replayed_layers`).

Hooks and marks live for one ``with`` block, see only the calls of the thread that opened it (so concurrent analyses of
one cached model never see each other's tensors), and go on exit even when the block raises; no model flag changes.
"""

from __future__ import annotations

import functools
import inspect
import threading
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from vizapp import kept, limits
from vizapp.attention import (  # noqa: F401  (named here too, where callers have found them)
    ABLATE_MODES,
    AttentionConsumer,
    ablate_head_output,
    additive_bias,
    attention_chunks,
    attention_from_qk,
    feed,
    group_bias,
    hand_over,
    host_copies,
    image_group,
    offer,
    softmax_by,
)
from vizapp.errors import BadParameterError, UnsupportedModelError, unexact_layer
from vizapp.layers import (  # noqa: F401  (named here too, where callers have found them)
    HF_BASE_ATTRIBUTES,
    SUPPORTED_FAMILIES,
    attention_layers,
    encoder_layers,
)

_SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


class _MHAMode(TorchFunctionMode):
    """On this thread's stack while one ``nn.MultiheadAttention`` runs: routes its ``F.multi_head_attention_forward``
    call to the capture. A mode (not the SDPA route below) because an active mode also turns off torch's fused MHA
    fast path (``torch._native_multi_head_attention``), which would bypass that call in eval mode."""

    def __init__(self, capture: AttentionCapture, layer: int) -> None:
        super().__init__()
        self.capture, self.layer = capture, layer

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.multi_head_attention_forward:
            out = self.capture._mha_call(self.layer, args, kwargs)
            if out is not None:
                return out
        return func(*args, **kwargs)


class _Route(threading.local):
    """Per thread: (capture, layer) of each attention module running, innermost last; ``top``: the level handling a
    call now (calls made inside the handler go to the levels below it)."""

    def __init__(self) -> None:
        self.stack: list[tuple[AttentionCapture, int]] = []
        self.top: int | None = None


_ROUTE, _MHA_SIGNATURE = _Route(), inspect.signature(F.multi_head_attention_forward)  # the signature: built once
_ORIGINAL_SDPA = F.scaled_dot_product_attention
_INSTALL_LOCK = threading.Lock()


def _route_sdpa(args: tuple, kwargs: dict, level: int | None = None) -> Any:
    r = _ROUTE
    if level is None:
        level = (len(r.stack) if r.top is None else r.top) - 1
    if level < 0:
        return _ORIGINAL_SDPA(*args, **kwargs)
    capture, layer = r.stack[level]
    outer, r.top = r.top, level
    try:
        call = dict(zip(_SDPA_PARAMS, args, strict=False), **kwargs)
        return capture._attention_call(layer, call, lambda: _route_sdpa(args, kwargs, level - 1))
    finally:
        r.top = outer


@functools.wraps(_ORIGINAL_SDPA)
def _scaled_dot_product_attention(*args: Any, **kwargs: Any) -> Any:
    # the capture point (module docstring): torch's own function when no capture runs a module on this thread
    if not _ROUTE.stack:
        return _ORIGINAL_SDPA(*args, **kwargs)
    return _route_sdpa(args, kwargs)


_users = 0  # captures open now, on any thread


def _acquire() -> None:
    """Route ``F.scaled_dot_product_attention`` through vizapp while any capture is open (any thread).

    Every supported attention module calls it as ``F.scaled_dot_product_attention`` /
    ``torch.nn.functional.scaled_dot_product_attention``, so replacing the module attribute reaches them all. Catching
    the call this way costs nothing per other op, where a TorchFunctionMode held over the attention module's forward
    sees every op in it (DINOv3-B on 2 CPU threads: 6.8 ms of a 266 ms forward, mostly its RoPE ops). Other threads'
    calls meanwhile reach torch's function after one thread-local lookup; when the last capture closes, torch's own
    function is put back.
    """
    global _users
    with _INSTALL_LOCK:
        _users += 1
        F.scaled_dot_product_attention = _scaled_dot_product_attention


def _release() -> None:
    global _users
    with _INSTALL_LOCK:
        _users -= 1
        if _users == 0:
            F.scaled_dot_product_attention = _ORIGINAL_SDPA


class AttentionCapture:
    """Context manager recording q and k (and, with ``with_grad``, the attention in the graph) of every layer.

    Example::

        with AttentionCapture(model) as cap:
            logits = model(x)
        attn = cap.attention(0)  # [B, H, N, N] float32

    Args:
        model: a supported ViT (see :func:`attention_layers`).
        with_grad: form each layer's attention as a tensor in the autograd graph, so that :meth:`attention_grads`
            returns ∂score/∂A exactly; ``on_attention`` then receives each layer's attention (detached) whole.
        on_attention: a consumer (see :class:`AttentionConsumer`) that receives each layer's attention during the
            forward, computed once and then used for the layer's output.
        chunk_bytes: at most this much attention per chunk handed to ``on_attention`` (at least one head); default
            :func:`vizapp.limits.chunk_bytes` of the model's device.
        keep_qk: keep every layer's q and k after the forward (False: each is dropped once consumed).
        layers: the attention modules (default: :func:`attention_layers` of ``model``).
        inline: form the attention in place of SDPA (default); False lets the model's own SDPA compute each layer's
            output and feeds ``on_attention`` from q and k at the end of the layer (a second code path, for checks).
        on_block: called as ``on_block(layer, output)`` with each encoder block's output (the residual stream after
            it), [B, N, D] detached, during the forward: the feature views take what they need from it there.
        ablate: layer -> bool mask [B, H] (or [H] for every image): head h of image b is ablated in that layer's
            output (what its attention call returns, [B, H, N, d], before the output projection), on whichever path
            formed it (the model's SDPA, inline, ``with_grad``, torch's MHA). The layer must call SDPA (or MHA).
        ablate_mode: "zero" (multiply by 0) or "mean" (each ablated head's mean over the N tokens of its image), see
            :func:`ablate_head_output`.
        record_head_outputs: keep every layer's heads' output [B, H, N, d] (after ``ablate``) as
            :attr:`head_outputs`; with gradients on, these are the tensors the rest of the forward uses, so
            ``torch.autograd.grad(score, cap.head_outputs)`` is ∂score/∂(head outputs).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        with_grad: bool = False,
        on_attention: AttentionConsumer | None = None,
        chunk_bytes: int | None = None,
        keep_qk: bool = True,
        layers: list[torch.nn.Module] | None = None,
        inline: bool = True,
        on_block: Callable[[int, torch.Tensor], None] | None = None,
        ablate: Mapping[int, torch.Tensor] | None = None,
        ablate_mode: str = "zero",
        record_head_outputs: bool = False,
    ) -> None:
        blocks, found = encoder_layers(model) if layers is None or on_block is not None else ([], [])
        self.modules = list(layers) if layers is not None else found
        self.blocks = blocks if on_block is not None else []
        self.on_block = on_block
        self.with_grad = with_grad
        self.on_attention = on_attention
        self.chunk_bytes = chunk_bytes
        self.keep_qk = keep_qk
        self.inline = inline
        n = len(self.modules)
        if ablate_mode not in ABLATE_MODES:
            raise BadParameterError(f"ablation mode must be one of {ABLATE_MODES}, got {ablate_mode!r}")
        self.ablate = dict(ablate or {})
        for layer in self.ablate:
            if not 0 <= layer < n:
                raise BadParameterError(f"ablated layer must be in [0, {n - 1}], got {layer}")
        self.ablate_mode = ablate_mode
        self.record_head_outputs = record_head_outputs
        #: with ``record_head_outputs``: each layer's heads' output [B, H, N, d] (after ``ablate``), or None
        self.head_outputs: list[torch.Tensor | None] = [None] * n
        self._shaped: set[int] = set()  # layers whose output went through ``_head_output`` in this forward
        self.q: list[torch.Tensor | None] = [None] * n  # and k: [B, H, N, d] each
        self.k: list[torch.Tensor | None] = [None] * n
        self.bias: list[torch.Tensor | None] = [None] * n  # additive [B or 1, H or 1, N, N], or None
        self.scales: list[float] = [0.0] * n
        self.maps: list[torch.Tensor | None] = [None] * n  # with_grad: the attention in the graph
        self.inline_layers: set[int] = set()  #: layers whose attention reached ``on_attention`` inside the forward
        #: layers fed to ``on_attention`` from q and k at the end of the layer (timm Attention, fused_attn off)
        self.replayed_layers: set[int] = set()
        #: layer -> why its attention was left to SDPA and is not exact (dropout, causal, ...)
        self.unexact_layers: dict[int, str] = {}
        self._called: set[int] = set()
        self._packed: torch.Tensor | None = None  # every layer's q and k, [2, L, B, H, N, d]
        self._slots: tuple[tuple[torch.Tensor, ...], ...] = ((), (), ())  # its q, k and (q, k) views of each layer
        self._work: torch.Tensor | None = None  # the inline chunk buffer, shared by the layers
        self._modes: list[_MHAMode] = []
        self._routing = False  # this capture holds the SDPA route open (see _acquire)
        self._handles: list[Any] = []
        self._owner: int | None = None

    #: with ``with_grad``: ``recompute(capture, layer, q, k, v, scale, bias)`` gives a layer's output in the graph
    #: instead of the attention formed there (and sets ``maps[layer]``), e.g. one that forms it again in the backward
    recompute: Callable[..., torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.modules)

    def _mine(self) -> bool:
        return threading.get_ident() == self._owner

    def _budget(self, device: torch.device, group: bool = False) -> int:
        return limits.chunk_bytes(device, group) if self.chunk_bytes is None else int(self.chunk_bytes)

    # -- the call ------------------------------------------------------------------------------------------------
    def _record(self, layer: int, q: torch.Tensor, k: torch.Tensor, scale: float, bias: torch.Tensor | None) -> None:
        self._called.add(layer)
        if self.with_grad:
            self.q[layer], self.k[layer] = q, k
        elif self.keep_qk:
            # A copy lets the layer's qkv buffer (q and k are often views into it) be freed. Every layer's copies go
            # into one block made when a forward begins, with every layer's views: small allocations made layer by
            # layer among the forward's own activations fragment the heap (ViT-L/384: the capture added 178 MB with
            # per-layer copies, against the 113 MB of q and k, and the heap grew by 100 MB with per-layer views).
            packed = self._packed
            if layer == 0 or packed is None:
                packed = self._packed = kept.empty((2, len(self), *q.shape), q.dtype, q.device)
                self._slots = (packed[0].unbind(0), packed[1].unbind(0), packed.unbind(1))
            if packed.shape[2:] == q.shape == k.shape and packed.dtype == q.dtype and packed.device == q.device:
                qs, ks, pairs = self._slots
                with torch.no_grad():  # a record, never in a graph (unbind's views refuse in-place copies with grad)
                    kept.copy_pair(q, k, pairs[layer], qs[layer], ks[layer])  # one copy if one qkv made both
                self.q[layer], self.k[layer] = qs[layer], ks[layer]
            else:  # layers of different shapes: one copy each
                self.q[layer], self.k[layer] = q.detach().contiguous(), k.detach().contiguous()
        else:
            self.q[layer], self.k[layer] = q.detach(), k.detach()
        self.scales[layer], self.bias[layer] = scale, bias

    def _head_output(self, layer: int, out: torch.Tensor) -> torch.Tensor:
        """The layer's heads' output [B, H, N, d] as the forward will use it: ablated, recorded."""
        self._shaped.add(layer)
        mask = self.ablate.get(layer)
        if mask is not None:
            out = ablate_head_output(out, mask, self.ablate_mode)
        if self.record_head_outputs:
            self.head_outputs[layer] = out if torch.is_grad_enabled() else out.detach()
        return out

    def _attention_call(self, layer: int, call: dict[str, Any], run: Any) -> torch.Tensor:
        q, k = call["query"], call["key"]
        if not self._mine() or layer in self._called or q.dim() != 4 or k.shape != q.shape:
            return run()
        return self._head_output(layer, self._formed(layer, call, run))

    def _formed(self, layer: int, call: dict[str, Any], run: Any) -> torch.Tensor:
        q, k, v = call["query"], call["key"], call["value"]
        d = q.shape[-1]
        scale = d**-0.5 if call.get("scale") is None else float(call["scale"])
        bias = additive_bias(call.get("attn_mask"), q.shape[-2])
        self._record(layer, q, k, scale, bias)
        why = (
            "dropout"
            if call.get("dropout_p")
            else "causal attention"
            if call.get("is_causal")
            else "grouped-query attention"
            if call.get("enable_gqa") or v.shape[:3] != k.shape[:3]
            else None
        )
        if why is not None:
            self.unexact_layers[layer] = why
            return run()
        if self.with_grad and torch.is_grad_enabled():
            if self.recompute is not None:  # the attention formed again in the backward (vizapp.graph_maps)
                return self.recompute(self, layer, q, k, v, scale, bias)
            a = attention_from_qk(q, k, scale, bias)  # [B, H, N, N] in the graph
            self.maps[layer] = a
            if self.on_attention is not None:
                # as many whole images at once as fit the chunk size (cache-sized on the CPU), else image by image
                step = image_group(self.on_attention, a.shape[0], a.shape[1], a.shape[-1], self._budget(a.device, True))
                for i0 in range(0, a.shape[0], step):
                    self.on_attention.chunk(layer, i0, 0, (a[i0 : i0 + step] if step > 1 else a[i0]).detach(), 0)
                self.on_attention.layer_done(layer)
                self.inline_layers.add(layer)
            return (a @ v.float()).to(v.dtype)
        if self.on_attention is None or not self.inline:
            return run()
        return self._inline(layer, self.q[layer], self.k[layer], v, scale, bias)  # kept ones: contiguous, view freely

    def _inline(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, bias: torch.Tensor | None
    ) -> torch.Tensor:
        with torch.no_grad():
            fused = offer(self.on_attention, layer, q, k, v, scale, bias)  # the statistics without the attention
        if fused is not None:
            self._layer_formed(layer)
            return fused
        b, h, n, _ = q.shape
        budget = self._budget(q.device)
        c, rows = limits.chunk_shape(h, n, budget)
        group = image_group(self.on_attention, b, h, n, self._budget(q.device, True)) if (c, rows) == (h, n) else 1
        if group > 1:
            return self._inline_images(layer, q, k, v, scale, bias, group)
        work = self._work
        if work is None or work.shape != (2, c, rows, n) or work.device != q.device:
            # one buffer for every layer of the forward (its layers' attention shapes are nearly always equal):
            # a fresh one per layer is allocated and faulted in each time (ViT-Ti/16: 40 µs of a 280 µs layer)
            work = self._work = torch.empty((2, c, rows, n), dtype=torch.float32, device=q.device)
        out = torch.empty((b, h, n, v.shape[-1]), dtype=v.dtype, device=v.device)
        fp32 = out.dtype == torch.float32
        with torch.no_grad():
            for i in range(b):
                v32, out_i = v[i].float(), out[i]
                bi = None if bias is None else bias[i if bias.shape[0] > 1 else 0]
                take = softmax_by(self.on_attention, layer, i)
                for h0, r0, a, taken in attention_chunks(q[i], k[i], scale, c, rows, work, bias=bi, softmax=take):
                    m, r = a.shape[0], a.shape[1]
                    if not taken:
                        hand_over(self.on_attention, layer, i, h0, a, r0, work[0, :m, :r], scores=bi is None)
                    vc, target = v32[h0 : h0 + m], out_i[h0 : h0 + m, r0 : r0 + r]
                    if fp32:
                        torch.bmm(a, vc, out=target)
                    else:
                        target.copy_(torch.bmm(a, vc))
        self._layer_formed(layer)
        return out

    def _layer_formed(self, layer: int) -> None:
        """Close a layer formed inline; after the model's last one the chunk buffer goes, before that layer's MLP (a
        new forward makes it again): ViT-L/384's peak is there, with every layer's q, k and fusion kept."""
        self.on_attention.layer_done(layer)
        self.inline_layers.add(layer)
        if layer == len(self) - 1:
            self._work = None

    def _inline_images(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        scale: float,
        bias: torch.Tensor | None,
        group: int,
    ) -> torch.Tensor:
        """:meth:`_inline` with ``group`` whole images per chunk: each chunk's heads of all its images are formed,
        handed over as [g, H, N, N] and multiplied by v as one batch of g·H matrices, into the output (contiguous)."""
        b, h, n, d = q.shape
        work = self._work
        if work is None or work.shape != (2, group * h, n, n) or work.device != q.device:
            work = self._work = torch.empty((2, group * h, n, n), dtype=torch.float32, device=q.device)
        out = torch.empty((b, h, n, v.shape[-1]), dtype=v.dtype, device=v.device)
        with torch.no_grad():
            for i0 in range(0, b, group):
                g = min(group, b - i0)
                flat = slice(i0, i0 + g)
                gb = group_bias(bias, i0, g, h, n)
                qs, ks = q[flat].reshape(g * h, n, d), k[flat].reshape(g * h, n, d)
                whole = softmax_by(self.on_attention, layer, i0, images=g)  # the scores offered as [g, H, N, N]
                ((_, _, a, taken),) = attention_chunks(qs, ks, scale, g * h, n, work, bias=gb, softmax=whole)
                if not taken:  # the scores are the scratch once their softmax is formed
                    spent = work[0, : g * h].view(g, h, n, n)
                    hand_over(self.on_attention, layer, i0, 0, a.view(g, h, n, n), 0, spent, scores=gb is None)
                vs, target = v[flat].float().reshape(g * h, n, -1), out[flat].view(g * h, n, -1)
                if target.dtype == torch.float32:
                    torch.bmm(a, vs, out=target)
                else:
                    target.copy_(torch.bmm(a, vs))
        self._layer_formed(layer)
        return out

    def _mha_call(self, layer: int, args: tuple, kwargs: dict) -> tuple[torch.Tensor, None] | None:
        """torch's ``F.multi_head_attention_forward`` for plain self-attention, evaluated from the module's own
        weights with the attention formed here; None (let torch run it) for anything else."""
        bound = _MHA_SIGNATURE.bind(*args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        plain = (
            a["query"] is a["key"] is a["value"]
            and a["use_separate_proj_weight"] is False
            and all(
                a[arg] is None for arg in ("bias_k", "bias_v", "key_padding_mask", "attn_mask", "static_k", "static_v")
            )
            and not (a["add_zero_attn"] or a["is_causal"] or a["need_weights"])
            and not (a["training"] and a["dropout_p"])
            and a["query"].dim() == 3
        )
        if not plain or not self._mine():
            return None
        x = a["query"]  # [N, B, E] (MHA transposes batch_first inputs before this call)
        n, b, e = x.shape
        h = int(a["num_heads"])
        qkv = F.linear(x, a["in_proj_weight"], a["in_proj_bias"])  # [N, B, 3E]
        q, k, v = (t.reshape(n, b * h, e // h).transpose(0, 1).reshape(b, h, n, e // h) for t in qkv.chunk(3, dim=-1))
        o = self._attention_call(
            layer, {"query": q, "key": k, "value": v}, lambda: F.scaled_dot_product_attention(q, k, v)
        )  # [B, H, N, d]
        o = o.permute(2, 0, 1, 3).reshape(n * b, e)
        out = F.linear(o, a["out_proj_weight"], a["out_proj_bias"]).view(n, b, e)
        return out, None

    # -- hooks ---------------------------------------------------------------------------------------------------
    def _pre_hook(self, layer: int):
        def hook(_mod: torch.nn.Module, _args: tuple) -> None:
            if self._mine():
                if layer == 0:  # a new forward
                    self.inline_layers.clear()
                    self.replayed_layers.clear()
                    self.unexact_layers.clear()
                self._called.discard(layer)
                self._shaped.discard(layer)
                self.q[layer] = self.k[layer] = self.maps[layer] = self.head_outputs[layer] = None
                if isinstance(_mod, torch.nn.MultiheadAttention):
                    mode = _MHAMode(self, layer)
                    mode.__enter__()
                    self._modes.append(mode)
                else:
                    _ROUTE.stack.append((self, layer))

        return hook

    def _post_hook(self, layer: int):
        def hook(mod: torch.nn.Module, _args: tuple, _out: Any) -> None:  # also when the module raised (always_call)
            if not self._mine():
                return
            if isinstance(mod, torch.nn.MultiheadAttention):
                if self._modes:
                    self._modes.pop().__exit__(None, None, None)
            else:
                self._unroute(layer)
            if layer not in self._called:
                if self.q[layer] is None or self.k[layer] is None:
                    raise UnsupportedModelError(
                        f"layer {layer} ({type(mod).__name__}) computed its attention without "
                        "scaled_dot_product_attention, so vizapp cannot capture it exactly (is fused attention off?)"
                    )
                self._called.add(layer)
            if layer not in self._shaped and (layer in self.ablate or self.record_head_outputs):
                raise UnsupportedModelError(
                    f"layer {layer} ({type(mod).__name__}) formed its heads' output without "
                    "scaled_dot_product_attention, so vizapp cannot ablate or record it (is fused attention off?)"
                )
            if self.on_attention is not None and layer not in self.inline_layers and layer not in self.unexact_layers:
                feed(
                    self.on_attention,
                    layer,
                    self.q[layer],
                    self.k[layer],
                    self.scales[layer],
                    self.bias[layer],
                    self._budget(self.q[layer].device),
                )
                self.replayed_layers.add(layer)
            if not self.keep_qk:
                self.q[layer] = self.k[layer] = None

        return hook

    def _unroute(self, layer: int | None = None) -> None:
        """Take this capture's entry for ``layer`` (every entry when None) off this thread's route stack."""
        stack = _ROUTE.stack
        for i in range(len(stack) - 1, -1, -1):
            if stack[i][0] is self and (layer is None or stack[i][1] == layer):
                del stack[i]
                if layer is not None:
                    return

    def _block_hook(self, layer: int):
        def hook(_mod: torch.nn.Module, _args: tuple, out: Any) -> None:
            if self._mine():
                self.on_block(layer, (out[0] if isinstance(out, (tuple, list)) else out).detach())  # [B, N, D]

        return hook

    def _norm_hook(self, layer: int, store: list):
        def hook(mod: torch.nn.Module, _args: tuple, out: torch.Tensor) -> None:
            if self._mine():
                store[layer] = out if self.with_grad else out.detach()
                self.scales[layer] = float(self.modules[layer].scale)
                self.bias[layer] = None

        return hook

    def __enter__(self) -> AttentionCapture:
        from timm.layers import Attention

        self._owner = threading.get_ident()
        if not self._routing:
            _acquire()
            self._routing = True
        self.inline_layers, self.replayed_layers, self.unexact_layers = set(), set(), {}
        try:
            for i, m in enumerate(self.modules):
                self._handles.append(m.register_forward_pre_hook(self._pre_hook(i)))
                self._handles.append(m.register_forward_hook(self._post_hook(i), always_call=True))
                if i < len(self.blocks):
                    self._handles.append(self.blocks[i].register_forward_hook(self._block_hook(i)))
                if type(m) is Attention and not getattr(m, "fused_attn", True):
                    # no SDPA call to catch: q and k as timm's own explicit path uses them
                    self._handles.append(m.q_norm.register_forward_hook(self._norm_hook(i, self.q)))
                    self._handles.append(m.k_norm.register_forward_hook(self._norm_hook(i, self.k)))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._routing:
            self._routing = False
            _release()
        if threading.get_ident() == self._owner:
            while self._modes:
                self._modes.pop().__exit__(None, None, None)
            self._unroute()

    # -- results -------------------------------------------------------------------------------------------------
    def _check(self, layer: int) -> None:
        if self.q[layer] is None or self.k[layer] is None:
            raise RuntimeError(f"layer {layer} recorded nothing; run the model's forward inside the `with` block")
        if layer in self.unexact_layers:
            raise unexact_layer(layer, self.unexact_layers[layer])

    def qk_on_device(self, image: int = 0) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """q and k of every layer for one image of the batch, float32 [H, N, d] each, on the model's device (views of
        the packed block when the capture packed them: contiguous, nothing copied in float32)."""
        if any(t is None for t in (*self.q, *self.k)):
            raise RuntimeError("some layer recorded no q and k; run the model's forward inside the `with` block")
        q = tuple(t[image].detach().float() for t in self.q)
        k = tuple(t[image].detach().float() for t in self.k)
        return q, k

    def qk_on_cpu(self, image: int = 0) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """q and k of every layer for one image of the batch, [H, N, d] float32 each, contiguous, on the CPU: nothing
        copied on the CPU; from a GPU layer by layer, faster there than one copy of the packed block (docs/gpu.md: the
        H200's eager ViT-L/384, 53.8 against 139.7 ms); the fast path on a GPU is :mod:`vizapp.cudagraph`'s staging."""
        return tuple(map(host_copies, self.qk_on_device(image)))

    def attention(self, layer: int) -> torch.Tensor:
        """Post-softmax attention of ``layer``, [B, H, N, N] float32, on the model's device."""
        self._check(layer)
        with torch.no_grad():
            return attention_from_qk(self.q[layer], self.k[layer], self.scales[layer], self.bias[layer])

    def attention_grads(self, score: torch.Tensor) -> list[torch.Tensor]:
        """∂score/∂A for every layer, [B, H, N, N] float32 each; ``score`` a scalar from the captured forward."""
        if not self.with_grad:
            raise RuntimeError("AttentionCapture(model, with_grad=True) is needed for gradients")
        if any(a is None for a in self.maps):
            raise RuntimeError(
                "no attention recorded with its graph; run the forward inside the `with` block with gradients enabled"
            )
        return [g.float() for g in torch.autograd.grad(score, self.maps)]
