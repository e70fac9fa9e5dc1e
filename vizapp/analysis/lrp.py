"""Transformer Attribution (Chefer, Gur & Wolf, CVPR 2021: "Transformer Interpretability Beyond Attention
Visualization").

The map is computed as the authors' code computes it (hila-chefer/Transformer-Explainability: the LRP layers of
``modules/layers_ours.py``, the ViT of ``baselines/ViT/ViT_LRP.py`` and ``generate_LRP(method="transformer_attribution",
start_layer=1)`` of ``baselines/ViT/ViT_explanation_generator.py``):

1. relevance starts as the one-hot of the explained class at the logits;
2. it is propagated down with their rules: z⁺ on every linear layer (their ``Linear.relprop`` with alpha=1, beta=0:
   only the positive contributions x_i w_ji, biases left out), identity through LayerNorm, GELU, softmax, dropout
   (and timm's LayerScale, an elementwise scaling), the CLS pooling passes relevance to token 0, a residual add splits
   relevance in proportion to each input's contribution and rescales each part so the total is conserved (their
   ``Add.relprop``), the two branches of a residual fork are summed back (``Clone.relprop``), and each attention
   matmul (q kᵀ and A v) splits relevance between its two operands, each part halved (``einsum.relprop``);
3. each block's attention relevance R_A (the relevance at the attention probabilities) is multiplied by the
   gradient of the class logit with respect to that attention, ReLU'd, averaged over heads:
   Ā_l = E_h[(∂y_c/∂A_l ⊙ R_A_l)⁺];
4. rollout from ``start_layer`` (their ``compute_rollout_attention`` of ViT_LRP.py: I + Ā_l, not renormalised,
   multiplied upward); the map is the CLS row over the patches.

Their divisions (``safe_divide``: a / (b + 1e-9), 0 where b == 0) by near-zero activations are ill-conditioned in
float32, so the forward and the propagation run in float64 by default, on a copy of the weights (the model is not
modified; about 700 MB for a ViT-B).
Unlike their code this works on a batch (each image's sums are its own) and on any device. The registry's method
(:func:`vizapp.methods.transformer_attribution_batch`, behind ``r.explain`` and ``vizapp.explain``) takes ∂y_c/∂A
from the same float64 forward: one forward and one backward for a batch.

Models: the rules are written for one block layout, which timm, transformers and torchvision each build their own
way; :mod:`vizapp.analysis.lrp_families` has one adapter per library that reads the pieces (embedding, each block's
norms, q/k/v, output projection, MLP, the final norm and the head), and the forward and the propagation below are
the same for all. Covered: timm ``VisionTransformer`` reading its CLS token, transformers ``ViTForImageClassification``,
``ViTMSNForImageClassification`` and ``DeiTForImageClassification``, torchvision ``vit_*``, and the CLIP vision
towers of transformers and OpenCLIP given text prompts, whose head is the prompts' score read as two linear maps
(vizapp's reading, the authors define none: :class:`~vizapp.analysis.lrp_families.PromptScore`). Every other model is
refused with the reason in one sentence (:func:`unsupported`): no CLS-token readout (mean or attention pooling, the
CLS token beside the patch mean, two averaged heads, CoCa's attentional pooler), RoPE, a relative-position bias, a
gated MLP, another image-text vision tower, a tower given no prompts, no classifier head.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from vizapp.analysis.lrp_families import Block, Net, PromptScore, family_of
from vizapp.transfer import to_device

#: The stabiliser of the authors' ``safe_divide``.
EPS = 1e-9

SUPPORTED = (
    "its LRP rules are written for a ViT block of LayerNorm, q/k/v attention and a two-layer MLP whose head is one "
    "linear layer on the CLS token: timm VisionTransformer (global_pool='token', no distillation head; registers and "
    "LayerScale allowed), transformers ViT/ViT-MSN/DeiT ForImageClassification and torchvision vit_*; the CLIP vision "
    "towers of transformers and OpenCLIP given text prompts"
)
"""The models the rules cover, as the refusals say it (one adapter per library: :mod:`vizapp.analysis.lrp_families`)."""


def safe_divide(a: torch.Tensor, b: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """a / (b + eps), and 0 where b == 0 (the authors' ``safe_divide``: the stabiliser is added whatever b's sign)."""
    den = b + eps
    den = torch.where(den == 0, eps, den)  # a scalar, not a filled tensor: one kernel launch less on a GPU
    return torch.where(b != 0, a / den, 0.0)


def linear_relprop(x: torch.Tensor, weight: torch.Tensor, relevance: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """z⁺ rule of a linear layer y = x Wᵀ + b (their ``Linear.relprop``, alpha=1, beta=0).

    Z_j = Σ_i (x_i⁺ W_ji⁺ + x_i⁻ W_ji⁻) (the positive contributions, no bias); R_i = Σ_j x_i W_ji⁺⁻ R_j / Z_j over the
    same positive terms. Relevance is conserved wherever Z_j ≠ 0.

    Args:
        x: the layer's input [..., in].
        weight: [out, in].
        relevance: [..., out].

    Returns:
        [..., in].
    """
    pw, nw = weight.clamp(min=0), weight.clamp(max=0)
    px, nx = x.clamp(min=0), x.clamp(max=0)
    s = safe_divide(relevance, F.linear(px, pw) + F.linear(nx, nw), eps)  # [..., out]
    return px * (s @ pw) + nx * (s @ nw)


def add_relprop(
    a: torch.Tensor, b: torch.Tensor, relevance: torch.Tensor, eps: float = EPS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add z = a + b (their ``Add.relprop``), per image of the batch (dim 0).

    R_a = a R / z, R_b = b R / z; then each part is rescaled so that its sum is |ΣR_a| / (|ΣR_a| + |ΣR_b|) · ΣR:
    the two parts keep their proportions and together conserve the relevance.
    """
    s = safe_divide(relevance, a + b, eps)
    ra, rb = a * s, b * s
    dims = tuple(range(1, relevance.dim()))
    total = relevance.sum(dim=dims, keepdim=True)
    sa, sb = ra.sum(dim=dims, keepdim=True), rb.sum(dim=dims, keepdim=True)
    fa = safe_divide(sa.abs(), sa.abs() + sb.abs(), eps) * total
    fb = safe_divide(sb.abs(), sa.abs() + sb.abs(), eps) * total
    return ra * safe_divide(fa, sa, eps), rb * safe_divide(fb, sb, eps)


def clone_relprop(x: torch.Tensor, relevances: Sequence[torch.Tensor], eps: float = EPS) -> torch.Tensor:
    """A tensor used twice (the residual fork; their ``Clone.relprop``): Σ_k x · R_k / x."""
    return x * sum(safe_divide(r, x, eps) for r in relevances)


def matmul_relprop(
    a: torch.Tensor, b: torch.Tensor, relevance: torch.Tensor, eps: float = EPS
) -> tuple[torch.Tensor, torch.Tensor]:
    """z = a @ b (their ``einsum.relprop``): R_a = a ⊙ ((R / z) bᵀ), R_b = b ⊙ (aᵀ (R / z)); each carries the whole
    relevance (the caller halves them, as the authors' attention does)."""
    s = safe_divide(relevance, a @ b, eps)
    return a * (s @ b.transpose(-2, -1)), b * (a.transpose(-2, -1) @ s)


def unsupported(model: torch.nn.Module, num_prefix_tokens: int | None = None, prompted: bool = False) -> str:
    """Why the authors' rules are not defined for ``model`` ("" when they are), in a phrase: see :data:`SUPPORTED`
    and, for each library, :mod:`vizapp.analysis.lrp_families`. ``num_prefix_tokens``: also check the caller's
    count of prefix tokens against the model's. ``prompted``: the model's classes are text prompts (an image-text
    tower's; :class:`~vizapp.analysis.lrp_families.PromptScore`)."""
    family = family_of(model)
    if family is None:
        return f"it is a {type(model).__name__}, not a ViT of timm, transformers or torchvision"
    why = family.unsupported(model, prompted)
    if why or num_prefix_tokens is None:
        return why
    found = family.net(model).num_prefix_tokens
    return f"num_prefix_tokens={num_prefix_tokens} but the model has {found}" if num_prefix_tokens != found else ""


def _net(model: torch.nn.Module, prompt: PromptScore | None = None) -> Net:
    """The pieces the rules read of ``model`` (:class:`~vizapp.analysis.lrp_families.Net`), its head the prompts'
    score when ``prompt`` is given, or ValueError saying why they are not defined for it."""
    why = unsupported(model, prompted=prompt is not None)
    if why:
        raise ValueError(f"Transformer Attribution is not defined for this model: {why}; {SUPPORTED}")
    net = family_of(model).net(model)
    return replace(net, head=prompt, readout=prompt.readout) if prompt is not None else net


@dataclass
class _BlockRecord:
    """What one block's relevance pass reads from the forward (shapes for a batch of B, N tokens, H heads)."""

    x: torch.Tensor  # block input [B, N, D]
    n1: torch.Tensor  # norm1(x) [B, N, D]
    q: torch.Tensor  # [B, H, N, d]
    k: torch.Tensor  # [B, H, N, d]
    v: torch.Tensor  # [B, H, N, d]
    attn: torch.Tensor  # softmax(q kᵀ · scale) [B, H, N, N]
    o: torch.Tensor  # heads merged, the proj's input [B, N, H·d]
    branch1: torch.Tensor  # ls1(proj(o)) [B, N, D]
    mid: torch.Tensor  # x + branch1 [B, N, D]
    n2: torch.Tensor  # norm2(mid) [B, N, D]
    h: torch.Tensor  # act(fc1(n2)), the fc2's input [B, N, hidden]
    branch2: torch.Tensor  # ls2(mlp(n2)) [B, N, D]


def _copy_in(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A copy of ``model`` whose parameters and buffers are ``dtype`` (made from the originals once, without an
    intermediate copy; shared when already ``dtype``) and need no gradient."""
    memo: dict[int, torch.Tensor] = {}
    for p in model.parameters():
        memo[id(p)] = torch.nn.Parameter(p.detach().to(dtype), requires_grad=False)
    for b in model.buffers():
        memo[id(b)] = b.detach().to(dtype) if b.is_floating_point() else b
    return copy.deepcopy(model, memo).eval()


def _forward(net: Net, x: torch.Tensor, track: bool = False, track_from: int = 0) -> tuple[torch.Tensor, list, list]:
    """The eval forward of ``net`` (read from a :func:`_copy_in` copy) through the model's own submodules, the
    attention written out (dropout and drop-path are identities in eval); ``track``: the blocks from ``track_from`` on
    in the autograd graph (for ∂y_c/∂A of those blocks; the ones below keep no graph).

    Returns:
        (logits [B, K], one :class:`_BlockRecord` per block, [pooled input of the head [B, D], normed tokens [B, N, D]])
    """
    with torch.no_grad():  # the embeddings: the library's own code (position embedding, prefix tokens)
        t = net.embed(x)
    records = []
    for i, blk in enumerate(net.blocks):
        if i == track_from:
            t = t.detach().requires_grad_(track)
        b, n, _ = t.shape
        n1 = blk.norm1(t)
        qkv = torch.cat([lin(n1) for lin in blk.qkv], dim=-1)  # [B, N, 3·H·d]: q, k, v, each head-major
        q, k, v = qkv.reshape(b, n, 3, blk.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, N, d]
        a = torch.softmax((q @ k.transpose(-2, -1)) * blk.scale, dim=-1)  # [B, H, N, N]
        o = (a @ v).transpose(1, 2).reshape(b, n, -1)  # [B, N, H·d]
        branch1 = blk.ls1(blk.proj(o))
        mid = t + branch1
        n2 = blk.norm2(mid)
        h = blk.act(blk.fc1(n2))
        branch2 = blk.ls2(blk.fc2(h))
        records.append(_BlockRecord(t, n1, q, k, v, a, o, branch1, mid, n2, h, branch2))
        t = mid + branch2
    tokens = net.norm(t)
    pooled = net.pre_head(tokens[:, 0])  # [B, D]
    return net.head(pooled), records, [pooled, tokens]


def qkv_relprop(n1: torch.Tensor, qkv: Sequence, relevance: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """z⁺ rule of the q/k/v projection, given as one linear layer or as several whose outputs are concatenated
    (transformers' q, k and v): the rule is per output unit, so its sum over the parts is the rule on the whole.

    Args:
        n1: the projection's input [B, N, D].
        qkv: linear layers (``weight`` [out_i, D]); their outputs, concatenated, are ``relevance``'s last dimension.
        relevance: [B, N, Σ out_i].
    """
    parts = relevance.split([lin.weight.shape[0] for lin in qkv], dim=-1)
    return sum(linear_relprop(n1, lin.weight.detach().to(n1.dtype), r, eps) for lin, r in zip(qkv, parts, strict=True))


def _block_relprop(
    blk: Block, rec: _BlockRecord, relevance: torch.Tensor, eps: float, below: bool = True
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """One block's relevance pass (their ``Block.relprop``): (relevance at its input, R_A [B, H, N, N]); ``below``
    False: the pass stops at R_A (the lowest block asked for: nothing reads the relevance at its input, None)."""
    b, h, n, d = rec.q.shape
    r_mid, r_mlp = add_relprop(rec.mid, rec.branch2, relevance, eps)
    r_h = linear_relprop(rec.h, blk.fc2.weight.detach().to(rec.h.dtype), r_mlp, eps)  # LayerScale: identity
    r_n2 = linear_relprop(rec.n2, blk.fc1.weight.detach().to(rec.h.dtype), r_h, eps)  # GELU: identity
    r_mid = clone_relprop(rec.mid, (r_mid, r_n2), eps)  # norm2: identity

    r_x, r_attn = add_relprop(rec.x, rec.branch1, r_mid, eps)
    r_o = linear_relprop(rec.o, blk.proj.weight.detach().to(rec.o.dtype), r_attn, eps)
    r_o = r_o.reshape(b, n, h, d).transpose(1, 2)  # [B, H, N, d]
    r_a, r_v = matmul_relprop(rec.attn, rec.v, r_o, eps)
    r_a, r_v = r_a / 2, r_v / 2  # the relevance of the attention map: the "cam" of the authors' code
    if not below:
        return None, r_a
    # softmax and attention dropout: identity; q kᵀ is unscaled in their einsum (the relevance ratio ignores scale)
    r_q, r_kt = matmul_relprop(rec.q, rec.k.transpose(-2, -1), r_a, eps)
    r_qkv = torch.stack([r_q / 2, r_kt.transpose(-2, -1) / 2, r_v])  # [3, B, H, N, d]
    r_qkv = r_qkv.permute(1, 3, 0, 2, 4).reshape(b, n, 3 * h * d)
    r_n1 = qkv_relprop(rec.n1, blk.qkv, r_qkv, eps)
    return clone_relprop(rec.x, (r_x, r_n1), eps), r_a  # norm1: identity


def _bias(lin: object, dtype: torch.dtype) -> torch.Tensor | None:
    b = getattr(lin, "bias", None)
    return None if b is None else b.detach().to(dtype)


def _classes(
    class_idx: int | Sequence[int | None] | torch.Tensor, batch: int, device: torch.device, logits: torch.Tensor
) -> torch.Tensor:
    """One class per image; a None entry is that image's top-1 class of ``logits`` [B, K] (this forward's)."""
    if isinstance(class_idx, (list, tuple)) and any(c is None for c in class_idx):
        top = logits.argmax(dim=-1).tolist()
        class_idx = [top[i] if c is None else c for i, c in enumerate(class_idx)] if len(class_idx) == batch else None
        if class_idx is None:
            raise ValueError(f"give one class per image ({batch}) when some are None")
    idx = to_device(torch.as_tensor(class_idx, dtype=torch.long), device).reshape(-1)
    if idx.numel() == 1:
        idx = idx.expand(batch)
    if idx.numel() != batch:
        raise ValueError(f"give one class for the batch or one per image ({batch}), got {idx.numel()}")
    return idx


def attention_relevance(
    model: torch.nn.Module,
    x: torch.Tensor,
    class_idx: int | Sequence[int] | torch.Tensor,
    start_layer: int = 0,
    dtype: torch.dtype = torch.float64,
    eps: float = EPS,
    gradients: bool = False,
    prompt: PromptScore | None = None,
) -> tuple[list[torch.Tensor | None], list[torch.Tensor] | None]:
    """Each block's LRP relevance at its attention probabilities, R_A (steps 1-2 of the module docstring).

    Args:
        model: a ViT :func:`unsupported` accepts (timm, transformers or torchvision); its eval forward is run again
            in ``dtype``, on a copy of its weights.
        x: the input [B, C, H, W], normalised as the model expects.
        class_idx: the class explained, one for the batch or one per image (None: the image's top-1 class).
        start_layer: blocks below it are not propagated through (their entries are None).
        dtype: the propagation's precision.
        eps: the stabiliser of :func:`safe_divide`.
        gradients: also return ∂y_c/∂A of every block (from a backward of the same ``dtype`` forward).
        prompt: an image-text tower's prompt score, its head (:class:`~vizapp.analysis.lrp_families.PromptScore`).

    Returns:
        ([R_A [B, H, N, N] per block, None below ``start_layer``], [∂y_c/∂A [B, H, N, N] per block, None below
        ``start_layer``] or None)
    """
    _net(model, prompt)  # refused before the copy when not defined
    net = _net(_copy_in(model, dtype), prompt)
    with torch.enable_grad() if gradients else torch.no_grad():
        logits, records, (pooled, tokens) = _forward(net, x.to(dtype), track=gradients, track_from=start_layer)
        cls = _classes(class_idx, x.shape[0], logits.device, logits)
        grads = None
        if gradients:  # the backward stops at start_layer's attention: the blocks below it are not read
            score = logits.gather(1, cls[:, None]).sum()
            asked = torch.autograd.grad(score, [r.attn for r in records[start_layer:]])
            grads = [None] * start_layer + [g.detach() for g in asked]
    with torch.no_grad():
        one_hot = F.one_hot(cls, logits.shape[-1]).to(dtype)  # [B, K]
        pooled, tokens = pooled.detach(), tokens.detach()
        chain = net.readout or (net.head,)  # the linear maps from the pooled token to the logits
        inputs = [pooled]
        for lin in chain[:-1]:
            inputs.append(F.linear(inputs[-1], lin.weight.detach().to(dtype), _bias(lin, dtype)))
        r_pooled = one_hot
        for lin, seen in zip(reversed(chain), reversed(inputs), strict=True):
            r_pooled = linear_relprop(seen, lin.weight.detach().to(dtype), r_pooled, eps)  # fc_norm: identity
        r = torch.zeros_like(tokens)  # the CLS pooling: relevance to token 0 (their IndexSelect.relprop)
        r[:, 0] = tokens[:, 0] * safe_divide(r_pooled, tokens[:, 0], eps)  # final norm: identity
        cams: list[torch.Tensor | None] = [None] * len(records)
        for layer in range(len(records) - 1, start_layer - 1, -1):
            rec = records[layer]
            rec = _BlockRecord(*(t.detach() for t in vars(rec).values()))
            r, cams[layer] = _block_relprop(net.blocks[layer], rec, r, eps, below=layer > start_layer)
    return cams, grads


def transformer_attribution(
    model: torch.nn.Module,
    x: torch.Tensor,
    num_prefix_tokens: int,
    class_idx: int | Sequence[int] | torch.Tensor,
    grid_size: tuple[int, int],
    *,
    start_layer: int = 1,
    attn_grads: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float64,
    eps: float = EPS,
    prompt: PromptScore | None = None,
) -> torch.Tensor:
    """Transformer Attribution maps (Chefer, Gur & Wolf, CVPR 2021) of a batch, [B, gh, gw] float32.

    Args:
        model: a ViT reading its CLS token, of a layout :func:`unsupported` accepts (see :data:`SUPPORTED`), in eval
            mode.
        x: the input [B, C, H, W], normalised as the model expects, on the model's device.
        num_prefix_tokens: tokens before the patches (CLS first, then any registers); the map skips them.
        class_idx: the class explained: one for the batch, or one per image (None: the image's top-1 class).
        grid_size: (gh, gw) of the patch grid.
        start_layer: the first block of the rollout (the authors run ``start_layer=1``).
        attn_grads: ∂y_c/∂A of every block [B, L, H, N, N] for these classes, when already found (e.g. by the
            analysis's own backward); None: found here from a backward of the ``dtype`` forward.
        dtype: precision of the forward and the relevance pass (float64: their divisions are ill-conditioned in
            float32).
        eps: the stabiliser of the authors' ``safe_divide``.
        prompt: for an image-text tower (transformers CLIP), its classes as text prompts
            (:class:`~vizapp.analysis.lrp_families.PromptScore`): the head the rules start from.

    Returns:
        [B, gh, gw] float32, non-negative (their map is not normalised; ≥ 0 since Ā ≥ 0).

    Raises:
        ValueError: the model is not one the rules are written for (the message says which are), or bad arguments.

    Cost: one forward in ``dtype`` without the model's fused kernels, one backward when ``attn_grads`` is None, and a
    relevance pass of about four times a forward's linear-layer work (each z⁺ rule is four matmuls).
    """
    why = unsupported(model, num_prefix_tokens, prompted=prompt is not None)
    if why:
        raise ValueError(f"Transformer Attribution is not defined for this model: {why}; {SUPPORTED}")
    depth = len(_net(model, prompt).blocks)
    if isinstance(start_layer, bool) or not isinstance(start_layer, int) or not 0 <= start_layer < depth:
        raise ValueError(f"start_layer must be an integer in [0, {depth - 1}], got {start_layer!r}")
    if x.dim() != 4:
        raise ValueError(f"expected x shaped [B, C, H, W], got {tuple(x.shape)}")
    cams, grads = attention_relevance(
        model, x, class_idx, start_layer, dtype, eps, gradients=attn_grads is None, prompt=prompt
    )
    if attn_grads is not None:
        if attn_grads.shape[:2] != (x.shape[0], depth) or attn_grads.shape[2:] != cams[-1].shape[1:]:
            raise ValueError(
                f"attn_grads must be [B, L, H, N, N] = {(x.shape[0], depth, *cams[-1].shape[1:])}, "
                f"got {tuple(attn_grads.shape)}"
            )
        grads = list(attn_grads.to(device=cams[-1].device, dtype=dtype).unbind(1))
    b, n = x.shape[0], cams[-1].shape[-1]
    gh, gw = grid_size
    if gh * gw != n - num_prefix_tokens:
        raise ValueError(f"a {gh}x{gw} grid does not match {n - num_prefix_tokens} patch tokens")
    row = torch.zeros(b, n, dtype=dtype, device=cams[-1].device)
    row[:, 0] = 1.0  # the CLS row of Π_l (I + Ā_l), carried from the top block down to start_layer
    for layer in range(depth - 1, start_layer - 1, -1):
        fused = (grads[layer] * cams[layer]).clamp(min=0).mean(dim=1)  # Ā_l [B, N, N]
        row = row + (row[:, None, :] @ fused)[:, 0]  # row (I + Ā_l)
    return row[:, num_prefix_tokens:].reshape(b, gh, gw).float()
