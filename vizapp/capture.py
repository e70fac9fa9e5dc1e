"""The only hook code in vizapp: exact per-head attention from timm ViTs, with fused attention left on.

timm's ``Attention`` runs ``F.scaled_dot_product_attention`` when ``fused_attn`` is set, so the attention matrix is
never materialised and hooks on ``attn_drop`` or a softmax see nothing. Instead we record what SDPA receives:
``q_norm``'s output (q) and ``k_norm``'s output (k), [B, H, N, head_dim] each, and compute
``softmax(q kᵀ · scale)`` afterwards, one layer at a time, only where a view needs it.

For gradient methods we also record v (from ``qkv``) and the per-head attention output o (the input of
``attn.norm``). Since o = A v, ∂score/∂A = (∂score/∂o) vᵀ exactly, without turning fused attention off.

Hooks live for one ``with`` block, record only calls made by the thread that opened it (so concurrent analyses of
one cached model never see each other's tensors), and are removed on exit even when the block raises. No model
flag is changed.
"""

from __future__ import annotations

import threading
from typing import Any

import torch

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
    """

    #: store q and k of all layers in one [2, L, B, H, N, d] block (subclasses that consume each layer at once
    #: set this False)
    pack_qk = True

    def __init__(self, model: torch.nn.Module, with_grad: bool = False) -> None:
        self.modules = attention_modules(model)
        self.with_grad = with_grad
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
                self._store(self.q, layer, out)

        return hook

    def _k_hook(self, layer: int):
        def hook(_mod: torch.nn.Module, _args: tuple, out: torch.Tensor) -> None:
            if self._mine():
                self._store(self.k, layer, out)

        return hook

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

    def __enter__(self) -> AttentionCapture:
        self._owner = threading.get_ident()
        try:
            for i, m in enumerate(self.modules):
                self._handles.append(m.q_norm.register_forward_hook(self._q_hook(i)))
                self._handles.append(m.k_norm.register_forward_hook(self._k_hook(i)))
                if self.with_grad:
                    self._handles.append(m.qkv.register_forward_hook(self._v_hook(i)))
                    self._handles.append(m.norm.register_forward_pre_hook(self._out_hook(i)))
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
