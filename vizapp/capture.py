"""The only hook code in vizapp: exact per-head attention from timm ViTs, with fused attention left on.

timm's ``Attention`` runs ``F.scaled_dot_product_attention`` when ``fused_attn`` is set, so the attention matrix is
never materialised and hooks on ``attn_drop`` or a softmax see nothing. Instead we record what SDPA receives:
``q_norm``'s output (q) and ``k_norm``'s output (k), [B, H, N, head_dim] each, and compute
``softmax(q kᵀ · scale)`` afterwards, one layer at a time, only where a view needs it.

For gradient methods we also record v (from ``qkv``) and the per-head attention output o (the input of
``attn.norm``). Since o = A v, ∂score/∂A = (∂score/∂o) vᵀ exactly, without turning fused attention off.

With ``on_attention`` set, the capture also takes over the attention product itself, so that each layer's attention
is formed once instead of twice (once inside SDPA, once more afterwards from q and k). A thread-local
``TorchFunctionMode`` catches the ``F.scaled_dot_product_attention`` call that follows the recorded q and k, computes
softmax(q kᵀ · scale) in fp32 a few heads at a time (a working set sized to stay in the CPU's cache), hands each
chunk to the consumer while it is hot, and returns chunk @ v as the layer's output. Calls it cannot reproduce
exactly (a mask, dropout, causal attention, gradients) go to SDPA untouched, and the layer is left out of
``inline_layers`` so the caller recomputes it from q and k.

Hooks and the mode live for one ``with`` block, see only calls made by the thread that opened it (so concurrent
analyses of one cached model never see each other's tensors), and are removed on exit even when the block raises.
No model flag is changed.
"""

from __future__ import annotations

import threading
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from vizapp.errors import UnsupportedModelError


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The ``attn`` module of each block, checked to be timm's standard Attention."""
    from timm.layers import Attention

    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise UnsupportedModelError(f"{type(model).__name__} has no transformer blocks vizapp can hook")
    mods = []
    for i, blk in enumerate(blocks):
        attn = getattr(blk, "attn", None)
        if not isinstance(attn, Attention):
            raise UnsupportedModelError(
                f"block {i} uses {type(attn).__name__}, not timm's Attention; its attention cannot be captured exactly"
            )
        mods.append(attn)
    return mods


def attention_from_qk(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q kᵀ · scale) in fp32: q, k [..., N, d] -> [..., N, N] (what SDPA computes internally)."""
    q = q.float()
    k = k.float()
    return torch.softmax((q * scale) @ k.transpose(-2, -1), dim=-1)


def softmax_(x: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dimension, in place on the CPU (no second [c, N, N] buffer to allocate and fault in)."""
    if x.device.type == "cpu":
        return torch.ops.aten._softmax.out(x, -1, False, out=x)
    return torch.softmax(x, dim=-1)


# One head is split into blocks of query rows only when its N x N exceeds this (N > 2,048): on the 2-vCPU EPYC,
# 1,374-token heads took 77 ms for 16 heads whole, 79 ms in 2 blocks and 117 ms in 3 (SDPA: 63 ms).
ROW_BLOCK_BYTES = 16 * 2**20
MIN_CHUNK_ROWS = 128  # smaller blocks cost more in per-call overhead than they save


def chunk_shape(heads: int, tokens: int, chunk_bytes: int) -> tuple[int, int]:
    """(heads, query rows) per chunk: as many whole heads as fit ``chunk_bytes`` (at least one), and one head in
    equal blocks of query rows (at least :data:`MIN_CHUNK_ROWS`) once its N x N exceeds :data:`ROW_BLOCK_BYTES`."""
    per_head = tokens * tokens * 4
    if per_head <= chunk_bytes:
        return max(1, min(heads, chunk_bytes // per_head)), tokens
    if per_head <= ROW_BLOCK_BYTES:
        return 1, tokens
    rows = max(MIN_CHUNK_ROWS, ROW_BLOCK_BYTES // (tokens * 4))
    blocks = -(-tokens // rows)
    return 1, -(-tokens // blocks)  # equal blocks


def attention_chunks(
    q: torch.Tensor, k: torch.Tensor, scale: float, heads: int, rows: int, work: torch.Tensor | None = None
):
    """softmax(q kᵀ · scale) of q, k [H, N, d] in chunks of ``heads`` heads x ``rows`` query rows, fp32.

    Yields (first head, first row, attention [c, r, N]); every chunk is written into the one ``work`` buffer
    ([heads, rows, N] or larger; allocated when None) with the softmax in place, so a chunk is valid only until
    the next one.
    """
    h, n, _ = q.shape
    if work is None:
        work = torch.empty((heads, rows, n), dtype=torch.float32, device=q.device)
    qs = q.float() * scale
    kt = k.float().transpose(-2, -1)
    for h0 in range(0, h, heads):
        m = min(heads, h - h0)
        for r0 in range(0, n, rows):
            r = min(rows, n - r0)
            yield h0, r0, softmax_(torch.matmul(qs[h0 : h0 + m, r0 : r0 + r], kt[h0 : h0 + m], out=work[:m, :r]))


class AttentionConsumer(Protocol):
    """What ``AttentionCapture(on_attention=...)`` feeds, layer by layer, in the forward's order."""

    def chunk(self, layer: int, batch: int, head: int, attn: torch.Tensor, row: int) -> None:
        """Attention [c, r, N] fp32 of heads ``head .. head + c`` of image ``batch``, query rows ``row .. row + r``
        (all N rows unless one head's N x N exceeds the chunk size); valid only during the call."""

    def layer_done(self, layer: int) -> None:
        """Every chunk of ``layer`` has been passed."""


class _InlineSDPA(TorchFunctionMode):
    """Routes this thread's SDPA calls of hooked layers to :meth:`AttentionCapture._attend`."""

    def __init__(self, capture: AttentionCapture) -> None:
        super().__init__()
        self.capture = capture

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            out = self.capture._attend(*args, **kwargs)
            if out is not None:
                return out
        return func(*args, **kwargs)


class AttentionCapture:
    """Context manager recording q and k (and optionally v and the attention output) of every layer.

    Example::

        with AttentionCapture(model) as cap:
            logits = model(x)
        attn = cap.attention(0)  # [B, H, N, N] float32

    Args:
        model: a timm VisionTransformer whose blocks use timm's Attention.
        with_grad: also record v and the attention outputs, keeping the autograd graph, so that
            :meth:`attention_grads` can return ∂score/∂A for every layer.
        on_attention: a consumer (see :class:`AttentionConsumer`) that receives each layer's attention during the
            forward, computed once and then used for the layer's output; ignored with ``with_grad``.
        chunk_bytes: at most this much attention per chunk handed to ``on_attention`` (at least one head).
    """

    #: store q and k of all layers in one [2, L, B, H, N, d] block (subclasses that consume each layer at once
    #: set this False)
    pack_qk = True

    def __init__(
        self,
        model: torch.nn.Module,
        with_grad: bool = False,
        on_attention: AttentionConsumer | None = None,
        chunk_bytes: int = 4 * 2**20,
    ) -> None:
        self.modules = attention_modules(model)
        self.with_grad = with_grad
        self.on_attention = None if with_grad else on_attention
        self.chunk_bytes = int(chunk_bytes)
        #: layers whose attention went through ``on_attention`` in the last forward
        self.inline_layers: set[int] = set()
        self._mode: _InlineSDPA | None = None
        self._pending: tuple[int, torch.Tensor, torch.Tensor] | None = None
        self._raw_q: torch.Tensor | None = None
        n = len(self.modules)
        self.q: list[torch.Tensor | None] = [None] * n
        self.k: list[torch.Tensor | None] = [None] * n
        self.v: list[torch.Tensor | None] = [None] * n
        self.out: list[torch.Tensor | None] = [None] * n
        self.scales = [float(m.scale) for m in self.modules]
        self.num_heads = [int(m.num_heads) for m in self.modules]
        self.head_dims = [int(m.head_dim) for m in self.modules]
        self._handles: list[Any] = []
        self._owner: int | None = None
        self._packed: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.modules)

    # -- hooks ---------------------------------------------------------------------------------------------------
    def _mine(self) -> bool:
        return threading.get_ident() == self._owner

    def _store(self, store: list, layer: int, t: torch.Tensor) -> None:
        # Detach unless gradients are wanted, so nothing keeps the autograd graph alive. q and k are views into the
        # layer's whole qkv buffer; a copy lets that buffer (1.5x their size) be freed after the layer.
        if self.with_grad:
            store[layer] = t.contiguous()
            return
        t = t.detach()
        which = 0 if store is self.q else 1
        if self.pack_qk and which == 0 and layer == 0:
            # A new forward begins: one block for every layer's q and k (the heads are uniform across blocks in
            # timm ViTs). One large allocation instead of 2·L small ones interleaved with the forward's own
            # activations keeps the allocator from fragmenting, and is returned whole when the analysis is freed.
            self._packed = torch.empty((2, len(self), *t.shape), dtype=t.dtype, device=t.device)
        packed = self._packed
        if packed is not None and packed.shape[2:] == t.shape and packed.dtype == t.dtype and packed.device == t.device:
            store[layer] = packed[which, layer].copy_(t)
        else:
            store[layer] = t.contiguous()

    def _q_hook(self, layer: int):
        def hook(_mod: torch.nn.Module, _args: tuple, out: torch.Tensor) -> None:
            if self._mine():
                if layer == 0:
                    self.inline_layers.clear()  # a new forward
                self._store(self.q, layer, out)
                self._raw_q = out

        return hook

    def _k_hook(self, layer: int):
        def hook(_mod: torch.nn.Module, _args: tuple, out: torch.Tensor) -> None:
            if self._mine():
                self._store(self.k, layer, out)
                if self._raw_q is not None and self.on_attention is not None:
                    self._pending = (layer, self._raw_q, out)  # the SDPA call that follows gets these
                    self._push_mode()
                self._raw_q = None

        return hook

    def _attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        **extra: Any,
    ) -> torch.Tensor | None:
        """SDPA for the layer whose q and k were just recorded, with its attention passed to the consumer; None
        (let SDPA run) for any call this cannot reproduce exactly."""
        pending, self._pending = self._pending, None
        consumer = self.on_attention
        if consumer is None or pending is None or not self._mine():
            return None
        layer, q_rec, k_rec = pending
        if query is not q_rec or key is not k_rec:
            return None
        if attn_mask is not None or dropout_p or is_causal or any(extra.values()):
            return None
        if query.dim() != 4 or query.shape != key.shape or value.shape[:3] != key.shape[:3]:
            return None
        if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad):
            return None
        b, h, n, d = query.shape
        s = d**-0.5 if scale is None else float(scale)
        c, rows = chunk_shape(h, n, self.chunk_bytes)
        work = torch.empty((c, rows, n), dtype=torch.float32, device=query.device)
        out = torch.empty((b, h, n, value.shape[-1]), dtype=value.dtype, device=value.device)
        for i in range(b):
            v32 = value[i].float()
            for h0, r0, a in attention_chunks(query[i], key[i], s, c, rows, work):
                heads, block = slice(h0, h0 + a.shape[0]), slice(r0, r0 + a.shape[1])
                consumer.chunk(layer, i, h0, a, r0)
                if out.dtype == torch.float32:
                    torch.matmul(a, v32[heads], out=out[i, heads, block])
                else:
                    out[i, heads, block] = torch.matmul(a, v32[heads]).to(out.dtype)
        consumer.layer_done(layer)
        self.inline_layers.add(layer)
        return out

    def _v_hook(self, layer: int):
        h, d = self.num_heads[layer], self.head_dims[layer]

        def hook(_mod: torch.nn.Module, _args: tuple, out: torch.Tensor) -> None:
            if self._mine():
                b, n, _ = out.shape
                self.v[layer] = out.reshape(b, n, 3, h, d)[:, :, 2].transpose(1, 2)  # [B, H, N, d]

        return hook

    def _out_hook(self, layer: int):
        def hook(_mod: torch.nn.Module, args: tuple) -> None:
            if self._mine():
                self.out[layer] = args[0]  # [B, N, H*d], the heads' outputs before norm/proj

        return hook

    # The mode is on this thread's stack only from a layer's k_norm to the end of that attention module, so the
    # rest of the forward's calls do not pass through Python (that cost ViT-Ti/16 a third of its forward).
    def _push_mode(self) -> None:
        if self._mode is None:
            self._mode = _InlineSDPA(self)
            self._mode.__enter__()

    def _pop_mode(self) -> None:
        mode, self._mode = self._mode, None
        if mode is not None:
            mode.__exit__(None, None, None)

    def _attn_done_hook(self, _mod: torch.nn.Module, _args: tuple, _out: Any) -> None:
        if self._mine():
            self._pop_mode()  # also when the module raised (always_call)
            self._pending = None

    def __enter__(self) -> AttentionCapture:
        self._owner = threading.get_ident()
        self.inline_layers = set()
        try:
            for i, m in enumerate(self.modules):
                self._handles.append(m.q_norm.register_forward_hook(self._q_hook(i)))
                self._handles.append(m.k_norm.register_forward_hook(self._k_hook(i)))
                if self.with_grad:
                    self._handles.append(m.qkv.register_forward_hook(self._v_hook(i)))
                    self._handles.append(m.norm.register_forward_pre_hook(self._out_hook(i)))
                if self.on_attention is not None:
                    self._handles.append(m.register_forward_hook(self._attn_done_hook, always_call=True))
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
        if threading.get_ident() == self._owner:
            self._pop_mode()
        self._pending = self._raw_q = None

    # -- results -------------------------------------------------------------------------------------------------
    def _check(self, layer: int) -> None:
        if self.q[layer] is None or self.k[layer] is None:
            raise RuntimeError(f"layer {layer} recorded nothing; run the model's forward inside the `with` block")

    def attention(self, layer: int) -> torch.Tensor:
        """Post-softmax attention of ``layer``, [B, H, N, N] float32, on the model's device."""
        self._check(layer)
        with torch.no_grad():
            return attention_from_qk(self.q[layer], self.k[layer], self.scales[layer])

    def attention_with_graph(self, layer: int) -> torch.Tensor:
        """Like :meth:`attention` but differentiable (needs ``with_grad=True``)."""
        self._check(layer)
        return attention_from_qk(self.q[layer], self.k[layer], self.scales[layer])

    def attention_grads(self, score: torch.Tensor) -> list[torch.Tensor]:
        """∂score/∂A for every layer, [B, H, N, N] float32 each; ``score`` a scalar from the captured forward."""
        if not self.with_grad:
            raise RuntimeError("AttentionCapture(model, with_grad=True) is needed for gradients")
        if any(o is None for o in self.out) or any(v is None for v in self.v):
            raise RuntimeError("no attention outputs recorded; run the forward inside the `with` block")
        grads_o = torch.autograd.grad(score, self.out)  # each [B, N, H*d]
        result = []
        for layer, g in enumerate(grads_o):
            b, n, _ = g.shape
            g = g.reshape(b, n, self.num_heads[layer], self.head_dims[layer]).transpose(1, 2).float()  # [B, H, N, d]
            result.append(g @ self.v[layer].detach().float().transpose(-2, -1))  # [B, H, N, N]
        return result
