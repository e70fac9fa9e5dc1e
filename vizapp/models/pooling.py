"""Readouts through an attention-pooling head (MAP: a learned query attends over the tokens), with the head's own
attention probabilities kept.

SigLIP's vision tower pools this way (transformers ``SiglipMultiheadAttentionPoolingHead``; timm ViTs with
``global_pool="map"``, :class:`timm.layers.AttentionPoolLatent`), and so does OpenCLIP's CoCa (its
``AttentionalPooler``, :func:`openclip_coca_readout`). Their logit lens reads a block's output through the
model's final norm, this pooling head and what follows it (a classifier, or the prompt score), exactly as the model's
forward ends; LeGrad on such a model takes its gradient on the pooling head's own attention (see
:func:`vizapp.analysis.legrad.legrad_pooled`), so the readout here writes the head's attention out explicitly (the
softmax in the graph) from the head's own weights. The tests hold it equal to each library's forward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

PoolFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True, eq=False)
class PooledReadout:
    """A block's output tokens [B, N, D] -> the final norm -> the attention-pooling head -> ``after``.

    Called, it is a logit lens (tokens -> logits [B, K]); :meth:`with_attention` also gives the pooling head's
    attention probabilities.

    Attributes:
        norm: the model's final norm, applied to every token.
        pool: normalised tokens [B, N, D] -> (the pooled feature [B, D], the head's attention [B, H, Q, M] over the
            M tokens it reads, in the graph).
        after: the pooled feature -> logits [B, K] (the classifier, or the prompt score; the identity for the pooled
            feature itself).
        key_prefix: how many of the M tokens the head reads are prefix tokens (CLS, registers); the rest are patches.
        activation: how the logits become probabilities, "softmax" or "sigmoid" (SigLIP's prompts).
    """

    norm: Callable[[torch.Tensor], torch.Tensor]
    pool: PoolFn
    after: Callable[[torch.Tensor], torch.Tensor]
    key_prefix: int = 0
    activation: str = "softmax"

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.with_attention(tokens)[0]

    def with_attention(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [B, K], the pooling head's attention [B, H, Q, M])."""
        pooled, attn = self.pool(self.norm(tokens))
        return self.after(pooled), attn

    def then(self, f: Callable[[torch.Tensor], torch.Tensor], activation: str | None = None) -> PooledReadout:
        """This readout followed by ``f`` (e.g. the prompt score after the image embedding)."""
        after = self.after
        return replace(self, after=lambda pooled: f(after(pooled)), activation=activation or self.activation)


def _softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, H, Q, d], k and v [B, H, M, d] -> (A v [B, H, Q, d], A [B, H, Q, M]), A = softmax(q kᵀ / √d)."""
    attn = torch.softmax((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1), dim=-1)
    return attn @ v, attn


def timm_latent_pool(pool: torch.nn.Module) -> PoolFn | None:
    """timm's :class:`AttentionPoolLatent` written out (its ``forward`` without a mask, in eval mode), or None when
    ``pool`` is not one."""
    from timm.layers import AttentionPoolLatent

    if not isinstance(pool, AttentionPoolLatent):
        return None

    def run(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, n, _ = x.shape
        if pool.pos_embed is not None:
            x = x + pool.pos_embed.unsqueeze(0).to(x.dtype)
        h, d, q_len = pool.num_heads, pool.head_dim, pool.latent_len
        q = pool.q(pool.latent.expand(b, -1, -1)).reshape(b, q_len, h, d).transpose(1, 2)
        k, v = pool.kv(x).reshape(b, n, 2, h, d).permute(2, 0, 3, 1, 4).unbind(0)
        mixed, attn = _softmax_attention(pool.q_norm(q), pool.k_norm(k), v)
        out = pool.proj_drop(pool.proj(mixed.transpose(1, 2).reshape(b, q_len, h * d)))
        if pool.mlp is not None:
            out = out + pool.mlp(pool.norm(out))
        if pool.pool == "token":
            out = out[:, 0]
        elif pool.pool == "avg":
            out = out.mean(1)
        return out, attn

    return run


def timm_readout(model: torch.nn.Module) -> PooledReadout | None:
    """A timm model pooled by an :class:`AttentionPoolLatent` head (``global_pool="map"``): its final norm, the head
    over the tokens its ``pool`` reads (the patches, or every token with ``pool_include_prefix``), then ``fc_norm``
    and the classifier as ``forward_head`` applies them. None for any other model, or one without a classifier."""
    pool = timm_latent_pool(getattr(model, "attn_pool", None))
    if pool is None or not int(getattr(model, "num_classes", 0) or 0):
        return None
    if not all(isinstance(getattr(model, a, None), torch.nn.Module) for a in ("norm", "fc_norm", "head_drop", "head")):
        return None
    p = int(model.num_prefix_tokens)
    skip = 0 if getattr(model, "pool_include_prefix", True) else p  # Eva's pool reads every token

    def pooled(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return pool(x[:, skip:])

    return PooledReadout(
        norm=model.norm,
        pool=pooled,
        after=lambda f: model.head(model.head_drop(model.fc_norm(f))),
        key_prefix=p - skip,
    )


def mha_supported(mha: object) -> bool:
    """Whether ``mha`` is a batch-first ``nn.MultiheadAttention`` that :func:`mha_attention` writes out exactly (no
    extra key/value bias, no zero attention; in eval mode, its dropout off)."""
    return (
        isinstance(mha, torch.nn.MultiheadAttention)
        and mha.batch_first
        and mha.bias_k is None
        and not mha.add_zero_attn
    )


def mha_attention(
    mha: torch.nn.MultiheadAttention, queries: torch.Tensor, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch-first ``nn.MultiheadAttention`` without a mask, written out from its own weights (packed, or separate
    when the keys' width differs, ``kdim``): queries [B, Q, E] attend over x [B, M, kdim] -> (its output [B, Q, E]
    after ``out_proj``, its attention [B, H, Q, M])."""
    b, n, _ = x.shape
    e, h = mha.embed_dim, mha.num_heads
    d = e // h
    if mha._qkv_same_embed_dim:
        w_q, w_k, w_v = mha.in_proj_weight.chunk(3)
    else:
        w_q, w_k, w_v = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
    b_q, b_k, b_v = mha.in_proj_bias.chunk(3) if mha.in_proj_bias is not None else (None, None, None)
    q = F.linear(queries, w_q, b_q).reshape(b, -1, h, d).transpose(1, 2)
    k = F.linear(x, w_k, b_k).reshape(b, n, h, d).transpose(1, 2)
    v = F.linear(x, w_v, b_v).reshape(b, n, h, d).transpose(1, 2)
    mixed, attn = _softmax_attention(q, k, v)
    return mha.out_proj(mixed.transpose(1, 2).reshape(b, -1, e)), attn


def siglip_head_pool(head: torch.nn.Module) -> PoolFn | None:
    """transformers' ``SiglipMultiheadAttentionPoolingHead`` written out: the probe attends over the tokens through
    its ``nn.MultiheadAttention`` (packed in-projection, no extra key/value bias), then the residual MLP; None when
    the head is laid out otherwise."""
    mha = getattr(head, "attention", None)
    if (
        not mha_supported(mha)
        or not mha._qkv_same_embed_dim
        or not isinstance(getattr(head, "probe", None), torch.Tensor)
    ):
        return None

    def run(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, attn = mha_attention(mha, head.probe.expand(x.shape[0], -1, -1), x)
        out = out + head.mlp(head.layernorm(out))
        return out[:, 0], attn

    return run


def siglip_readout(vision: torch.nn.Module) -> PooledReadout | None:
    """A transformers SigLIP vision tower (``SiglipVisionModel``): ``post_layernorm`` on every token, then its
    attention-pooling ``head`` -> the pooled output (its ``pooler_output``); None without such a head."""
    head = getattr(vision, "head", None) if getattr(vision, "use_head", True) else None
    norm = getattr(vision, "post_layernorm", None)
    pool = siglip_head_pool(head) if head is not None else None
    if pool is None or not isinstance(norm, torch.nn.Module):
        return None
    return PooledReadout(norm=norm, pool=pool, after=lambda f: f)


def _openclip_pooler(pool: torch.nn.Module, first: int | None) -> PoolFn | None:
    """OpenCLIP's ``AttentionalPooler`` written out: ``ln_k`` on the tokens, ``ln_q`` on its learned queries (only the
    first ``first`` of them, or all), one ``nn.MultiheadAttention`` -> (its output [B, Q, E], attention [B, H, Q, M]);
    None when ``pool`` is laid out otherwise."""
    mha = getattr(pool, "attn", None)
    if not mha_supported(mha) or not isinstance(getattr(pool, "query", None), torch.Tensor):
        return None

    def run(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        queries = pool.ln_q(pool.query[:first])  # a norm per query: the first ones alone are the same rows
        return mha_attention(mha, queries.unsqueeze(0).expand(x.shape[0], -1, -1), pool.ln_k(x))

    return run


def openclip_coca_readout(visual: torch.nn.Module) -> PooledReadout | None:
    """OpenCLIP's CoCa vision tower (its ``VisionTransformer`` with an attentional pooler): a block's tokens -> the
    contrastive image embedding, as ``VisionTransformer._pool`` and ``proj`` make it, with the pooler's attention.

    The original OpenCLIP CoCa pooling (``attentional_pool=True``, every released CoCa): no norm before the pooler;
    the pooler's learned queries attend over every token (the CLS token too), then ``ln_post``, and the first query's
    output is the embedding (the contrastive loss trains it; the other queries' outputs are the captioning tokens).
    Only that first query is computed here: ``ln_post`` normalises each query's output alone, so the others never
    reach the embedding. OpenCLIP's "parallel" pooling (a one-query contrastive pooler beside the captioning one, both
    after ``ln_post``) is read the same way through the contrastive pooler. None for any other tower, and for the
    "cascade" pooling, whose contrastive pooler reads the captioning pooler's outputs, not the tokens.
    """
    pool = getattr(visual, "attn_pool", None)
    kind = getattr(visual, "attn_pool_type", "")
    contrastive = getattr(visual, "attn_pool_contrastive", None)
    if pool is None or kind not in ("", "parallel") or (kind == "parallel") != (contrastive is not None):
        return None
    run = _openclip_pooler(pool if kind == "" else contrastive, 1)
    if run is None:
        return None

    def pooled(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, attn = run(x)  # [B, 1, E], [B, H, 1, N]
        return (visual.ln_post(out) if kind == "" else out)[:, 0], attn

    return PooledReadout(
        norm=(lambda t: t) if kind == "" else visual.ln_post,
        pool=pooled,
        after=lambda f: f @ visual.proj if visual.proj is not None else f,
        key_prefix=1,
    )
