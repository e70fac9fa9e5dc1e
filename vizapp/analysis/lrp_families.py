"""The networks Transformer Attribution's rules (:mod:`vizapp.analysis.lrp`) are written for, one adapter per library.

The authors' rules are written for one block (their ``baselines/ViT/ViT_LRP.py``): LayerNorm, a q/k/v projection,
softmax attention, an output projection, a residual add, LayerNorm, an MLP of two linear layers around an
element-wise activation, a residual add; then a final LayerNorm and a linear head on the CLS token. Each adapter
below reads those pieces from a loaded model (:class:`Net`), and the forward and the propagation are written once, in
:mod:`vizapp.analysis.lrp`. The embedding (patches, prefix tokens, position embedding) is the library's own code: no
relevance goes below the first block.

Covered:

- timm ``VisionTransformer`` reading its CLS token (``global_pool='token'``: ViT and DeiT without distillation, with
  or without register tokens or LayerScale) built of timm's standard ``Block``, ``Attention`` and ``Mlp``;
- transformers ``ViTForImageClassification``, ``ViTMSNForImageClassification`` and ``DeiTForImageClassification``
  (the DeiT without teacher: its head reads the CLS token only, and its distillation token is one more prefix token,
  like a register). Their q, k and v are three linear layers: the z⁺ rule is per output unit (each output's
  positive sum Z_j is its own), so the rule on the three apart sums to the rule on their concatenation, timm's fused
  ``qkv``;
- torchvision ``VisionTransformer`` (``vit_b_16`` ...) without the tanh pre-logits layer: ``nn.MultiheadAttention``'s
  ``in_proj_weight`` is the fused q/k/v projection;
- transformers ``CLIPVisionModel`` and OpenCLIP's ``VisionTransformer`` given text prompts (their layers are the
  authors' block; the norm before the blocks is part of the embedding): the head is the prompts' score, read as two
  linear maps (:class:`PromptScore`).

Not defined, each said in one sentence by :func:`unsupported`: models without a CLS-token readout (mean or
attention pooling: BEiT, EVA, SigLIP, I-JEPA, the gap models; DINOv2's classifier, which adds the patch mean to the
CLS token; DeiT's two averaged heads), RoPE models (EVA-02, DINOv3, timm's rope ViTs: q and k are rotated between
the projection and q kᵀ), relative-position-bias models (BEiT, Data2Vec-vision, timm's relpos ViTs: a learned bias
is added to q kᵀ), gated MLPs (DINOv2's SwiGLU), the other image-text vision towers (CLIP's kin in transformers:
their classes are text prompts scored by cosine similarity, not a linear head), OpenCLIP's CoCa (an attentional
pooler), a CLIP tower given no prompts (no classes), and models without a classifier head.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Layer = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Affine:
    """y = x Wᵀ + b from a weight that is not held by an ``nn.Linear`` (torchvision's ``in_proj_weight``)."""

    weight: torch.Tensor  # [out, in]
    bias: torch.Tensor | None  # [out]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


@dataclass(frozen=True)
class Block:
    """One pre-norm block: x + ls1(proj(attention(norm1(x)))), then + ls2(fc2(act(fc1(norm2(·))))).

    Attributes:
        qkv: the q/k/v projection, as one linear layer whose output is [q | k | v] (each head-major, [H·d]) or as
            three (q, k, v); each has ``weight`` [out, in] and is called on the tokens.
        scale: the attention's 1 / sqrt(head_dim).
        proj, fc1, fc2: linear layers (``weight`` [out, in], called on the tokens).
        norm1, norm2, act, ls1, ls2: LayerNorms, the element-wise activation, LayerScale (or identities).
    """

    norm1: Layer
    qkv: tuple
    num_heads: int
    scale: float
    proj: Layer
    ls1: Layer
    norm2: Layer
    fc1: Layer
    act: Layer
    fc2: Layer
    ls2: Layer


@dataclass(frozen=True)
class Net:
    """What the rules read of a model: ``head(pre_head(norm(blocks(embed(x)))[:, 0]))`` is its logits.

    Attributes:
        embed: x [B, C, H, W] -> tokens [B, N, D] (prefix tokens first), the library's own embedding.
        pre_head: between the CLS token and the head (timm's ``fc_norm``); an identity elsewhere.
        head: the pooled token [B, D] -> logits [B, K]: a linear layer, or a :class:`PromptScore`.
        num_prefix_tokens: tokens before the patches (CLS first).
        readout: the linear maps relevance crosses from the logits down to the pooled token, first applied first
            (each with ``weight`` [out, in]); empty: the head alone.
    """

    embed: Layer
    blocks: tuple[Block, ...]
    norm: Layer
    pre_head: Layer
    head: Layer | None
    num_prefix_tokens: int
    readout: tuple = ()


@dataclass(frozen=True)
class PromptScore:
    """An image-text tower's classes as text prompts: logit_k = scale · cos(pooled Pᵀ, t_k), P the image
    projection [E, D], t_k the unit text embeddings [K, E] (CLIP, Radford et al. 2021).

    The authors' rules start from a linear head on the CLS token; here that head is two linear maps, the projection
    and then the dot product with each prompt's text embedding, and relevance crosses both by their z⁺ rule
    (:attr:`readout`). The L2 normalisation of the embedding and the logit scale multiply every weight of the second
    map by one positive number, which the z⁺ rule's ratios cancel: they pass relevance as their LayerNorm rule does.
    This reading of the prompt score is vizapp's (the authors define no rule for it); the attention gradients
    ∂y_c/∂A are those of the model's own logit.
    """

    projection: torch.Tensor  # [E, D]
    text: torch.Tensor  # [K, E], unit rows
    scale: float

    def __call__(self, pooled: torch.Tensor) -> torch.Tensor:
        e = F.linear(pooled, self.projection.to(pooled.dtype))
        return self.scale * F.linear(F.normalize(e, dim=-1), self.text.to(pooled.dtype))

    @property
    def readout(self) -> tuple[Affine, Affine]:
        return Affine(self.projection, None), Affine(self.text, None)


def _is_identity(m: object) -> bool:
    return m is None or isinstance(m, (torch.nn.Identity, torch.nn.Dropout))


def _identity_rule(m: object) -> bool:
    """Modules relevance passes through unchanged: identities, dropout, LayerNorm, LayerScale."""
    return _is_identity(m) or isinstance(m, torch.nn.LayerNorm) or type(m).__name__ == "LayerScale"


def _elementwise(m: object) -> bool:
    """An activation module without parameters (GELU, QuickGELU, ReLU ...): the rules pass relevance through it."""
    return isinstance(m, torch.nn.Module) and not any(True for _ in m.parameters()) and not list(m.children())


def _layers_layout(
    layers: Sequence[torch.nn.Module], attention: str, norms: tuple[str, str], kinds: tuple[str, str, str]
) -> str:
    """Why transformers encoder ``layers`` are not the authors' block layout ("" when they are): each layer, its
    ``attention`` submodule and its ``mlp`` of the classes ``kinds``, its two ``norms`` LayerNorms, and its MLP
    activation element-wise."""
    for i, layer in enumerate(layers):
        found = (type(layer).__name__, type(getattr(layer, attention)).__name__, type(layer.mlp).__name__)
        if found != kinds:
            return f"layer {i} is {found[0]} of {found[1]} and {found[2]}"
        if not all(isinstance(getattr(layer, n), torch.nn.LayerNorm) for n in norms):
            return f"layer {i} normalises with something other than LayerNorm"
        if not _elementwise(layer.mlp.activation_fn):
            return f"layer {i}'s MLP activation is not element-wise"
    return ""


ROPE = (
    "it rotates q and k by a rotary position embedding (RoPE) between the projection and q kᵀ, a step the authors' "
    "rules do not define"
)
RELATIVE_BIAS = (
    "it adds a learned relative-position bias to q kᵀ before the softmax, and the authors' rules, written for q kᵀ "
    "alone, do not say how to split relevance with it"
)
NO_CLS_READOUT = "its head does not read the CLS token ({}), and the authors' rules start from a CLS-token readout"


class TimmViT:
    """timm ``VisionTransformer`` (and what the refusals say of timm's other ViTs)."""

    @staticmethod
    def matches(model: torch.nn.Module) -> bool:
        return type(model).__module__.startswith("timm.")

    @staticmethod
    def unsupported(model: torch.nn.Module, prompted: bool = False) -> str:
        if getattr(model, "rope", None) is not None:
            return ROPE
        attns = [getattr(b, "attn", None) for b in getattr(model, "blocks", ())]
        if getattr(model, "rel_pos_bias", None) is not None or any(
            getattr(a, "relative_position_bias_table", None) is not None or getattr(a, "rel_pos", None) is not None
            for a in attns
        ):
            return RELATIVE_BIAS
        if getattr(model, "shared_rel_pos", None) is not None:
            return RELATIVE_BIAS
        if not all(hasattr(model, a) for a in ("blocks", "patch_embed", "head", "norm", "cls_token")):
            return f"it is a timm {type(model).__name__}, not a VisionTransformer"
        if model.cls_token is None:
            return "it has no CLS token (its head pools the patches)"
        if getattr(model, "dist_token", None) is not None or getattr(model, "head_dist", None) is not None:
            return "its output averages the heads of a CLS and a distillation token"
        if getattr(model, "global_pool", None) != "token" or getattr(model, "attn_pool", None) is not None:
            return NO_CLS_READOUT.format(f"global_pool={getattr(model, 'global_pool', None)!r}")
        if not prompted and not isinstance(model.head, torch.nn.Linear):  # prompts: the head is their score
            return "its head is not one linear layer"
        if not (_identity_rule(model.norm) and _identity_rule(getattr(model, "fc_norm", None))):
            return "its final norm is not a LayerNorm"
        for i, blk in enumerate(model.blocks):
            attn, mlp = getattr(blk, "attn", None), getattr(blk, "mlp", None)
            if type(blk).__name__ != "Block" or type(attn).__name__ != "Attention" or type(mlp).__name__ != "Mlp":
                return f"block {i} is {type(blk).__name__} of {type(attn).__name__} and {type(mlp).__name__}"
            if not all(isinstance(getattr(blk, n, None), torch.nn.LayerNorm) for n in ("norm1", "norm2")):
                return f"block {i} normalises with something other than LayerNorm"
            if not all(_identity_rule(getattr(blk, n, None)) for n in ("ls1", "ls2")):
                return f"block {i} scales its branches with something other than LayerScale"
            if not (_is_identity(attn.q_norm) and _is_identity(attn.k_norm)):
                return f"block {i} normalises q and k (qk_norm)"
            if not _is_identity(getattr(attn, "norm", None)) or getattr(attn, "gate", None) is not None:
                return f"block {i} normalises or gates its attention output"
            if not (isinstance(mlp.fc1, torch.nn.Linear) and isinstance(mlp.fc2, torch.nn.Linear)):
                return f"block {i}'s MLP is not two linear layers"
            if not _is_identity(getattr(mlp, "norm", None)) or not _elementwise(mlp.act):
                return f"block {i}'s MLP has a norm or a learned activation"
        return ""

    @staticmethod
    def net(model: torch.nn.Module) -> Net:
        def embed(x: torch.Tensor) -> torch.Tensor:  # timm's own: position embedding, CLS and register tokens
            return model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))

        blocks = tuple(
            Block(
                b.norm1,
                (b.attn.qkv,),
                b.attn.num_heads,
                b.attn.scale,
                b.attn.proj,
                b.ls1,
                b.norm2,
                b.mlp.fc1,
                b.mlp.act,
                b.mlp.fc2,
                b.ls2,
            )
            for b in model.blocks
        )
        return Net(embed, blocks, model.norm, model.fc_norm, model.head, int(model.num_prefix_tokens))


#: transformers classifiers whose layers are the authors' block: model class -> (attribute of the base model, the
#: prefix of its layer classes)
_HF_CLASSIFIERS = {
    "ViTForImageClassification": ("vit", "ViT"),
    "ViTMSNForImageClassification": ("vit", "ViTMSN"),
    "DeiTForImageClassification": ("deit", "DeiT"),
}
TOWER = (
    "it is an image-text model's vision tower: its classes are text prompts scored by cosine similarity to a "
    "projection of its output, not by a linear head on the CLS token, which is where the authors' rules start "
    "(vizapp reads that score as two linear maps for CLIP towers of transformers and OpenCLIP given prompts only)"
)
NO_PROMPTS = (
    "it is an image-text model's vision tower given no text prompts, so it has no classes: analyse it with prompts "
    "(prompts=[...], or the app's prompts box) and each prompt is a class"
)
#: transformers model types the rules are not defined for, and why (see :meth:`HfViT.unsupported` for those whose
#: reason depends on the config)
_HF_UNDEFINED = {
    "dinov3_vit": ROPE,
    "siglip_vision_model": "it has no CLS token: its head pools every token by attention, which the authors' rules "
    "do not define",
    "aimv2_vision_model": "it has no CLS token: its head pools every token by attention, which the authors' rules "
    "do not define",
    "ijepa": "it has no CLS token: its output is the mean of the patch tokens",
    "vit_mae": "it is ViT-MAE's encoder, which has no classifier head (the rules start from a class logit)",
}


class HfViT:
    """transformers ViT, ViT-MSN and DeiT classifiers (and what the refusals say of the other transformers ViTs)."""

    @staticmethod
    def matches(model: torch.nn.Module) -> bool:
        return type(model).__module__.startswith("transformers.")

    @staticmethod
    def unsupported(model: torch.nn.Module, prompted: bool = False) -> str:
        config = getattr(model, "config", None)
        model_type, cls = getattr(config, "model_type", None), type(model).__name__
        if model_type in _HF_UNDEFINED:
            return _HF_UNDEFINED[model_type]
        if model_type == "clip_vision_model":
            return _clip_layout(model) if prompted else NO_PROMPTS
        if str(model_type).endswith("_vision_model"):
            return TOWER
        if model_type in ("beit", "data2vec-vision"):
            if getattr(config, "use_relative_position_bias", 0) or getattr(
                config, "use_shared_relative_position_bias", 0
            ):
                return RELATIVE_BIAS
            if getattr(config, "use_mean_pooling", 0):
                return NO_CLS_READOUT.format("the mean of the patch tokens")
        if model_type in ("dinov2", "dinov2_with_registers") and getattr(config, "use_swiglu_ffn", False):
            return "its MLP is a SwiGLU (a gated product silu(x W₁) ⊙ x W₂), for which the authors have no rule"
        if cls == "DeiTForImageClassificationWithTeacher":
            return "its output averages the heads of a CLS and a distillation token"
        head = getattr(model, "classifier", None)
        if not isinstance(head, torch.nn.Linear):
            return f"it has no classifier head ({cls}), and the rules start from a class logit"
        if cls.startswith("Dinov2"):
            return (
                "its head reads the CLS token beside the mean of the patch tokens (concatenated), and the authors' "
                "rules start from the CLS token alone"
            )
        if cls not in _HF_CLASSIFIERS:
            return f"vizapp's adapter covers {', '.join(_HF_CLASSIFIERS)}, and this is {cls}"
        attr, prefix = _HF_CLASSIFIERS[cls]
        base = getattr(model, attr)
        if not isinstance(base.layernorm, torch.nn.LayerNorm) or getattr(base, "pooler", None) is not None:
            return "its final norm is not a LayerNorm, or it has a pooler"
        kinds = (f"{prefix}Layer", f"{prefix}Attention", f"{prefix}MLP")
        return _layers_layout(base.layers, "attention", ("layernorm_before", "layernorm_after"), kinds)

    @staticmethod
    def net(model: torch.nn.Module) -> Net:
        if getattr(getattr(model, "config", None), "model_type", None) == "clip_vision_model":
            return _clip_net(model)
        attr, _ = _HF_CLASSIFIERS[type(model).__name__]
        base = getattr(model, attr)
        emb = base.embeddings
        prefix = 1 + (getattr(emb, "distillation_token", None) is not None)
        blocks = tuple(
            Block(
                layer.layernorm_before,
                (layer.attention.q_proj, layer.attention.k_proj, layer.attention.v_proj),
                layer.attention.num_attention_heads,
                layer.attention.scaling,
                layer.attention.o_proj,
                layer.dropout,
                layer.layernorm_after,
                layer.mlp.fc1,
                layer.mlp.activation_fn,
                layer.mlp.fc2,
                layer.dropout,
            )
            for layer in base.layers
        )
        return Net(emb, blocks, base.layernorm, torch.nn.Identity(), model.classifier, prefix)


def _clip_layout(model: torch.nn.Module) -> str:
    """Why a transformers CLIP vision tower is not the authors' block layout ("" when it is)."""
    if type(model).__name__ != "CLIPVisionModel":
        return f"vizapp's adapter covers transformers' CLIPVisionModel, and this is {type(model).__name__}"
    if not all(isinstance(getattr(model, n, None), torch.nn.LayerNorm) for n in ("pre_layrnorm", "post_layernorm")):
        return "its norms before the blocks and after the pooling are not LayerNorms"
    kinds = ("CLIPEncoderLayer", "CLIPAttention", "CLIPMLP")
    return _layers_layout(model.encoder.layers, "self_attn", ("layer_norm1", "layer_norm2"), kinds)


def _clip_net(model: torch.nn.Module) -> Net:
    """A transformers CLIP vision tower: its embedding and ``pre_layrnorm``, CLIP's layers, ``post_layernorm`` (on the
    CLS token in CLIP's forward; a per-token norm, so the same on it here); the head is the prompts'
    (:class:`PromptScore`, attached by :func:`vizapp.analysis.lrp.transformer_attribution`)."""

    def embed(x: torch.Tensor) -> torch.Tensor:
        return model.pre_layrnorm(model.embeddings(x))

    blocks = tuple(
        Block(
            layer.layer_norm1,
            (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj),
            layer.self_attn.num_heads,
            layer.self_attn.scale,
            layer.self_attn.out_proj,
            torch.nn.Identity(),
            layer.layer_norm2,
            layer.mlp.fc1,
            layer.mlp.activation_fn,
            layer.mlp.fc2,
            torch.nn.Identity(),
        )
        for layer in model.encoder.layers
    )
    return Net(embed, blocks, model.post_layernorm, torch.nn.Identity(), None, 1)


class TorchvisionViT:
    """torchvision ``VisionTransformer`` (``vit_b_16``, ``vit_l_32``, ...)."""

    @staticmethod
    def matches(model: torch.nn.Module) -> bool:
        return type(model).__module__.startswith("torchvision.")

    @staticmethod
    def unsupported(model: torch.nn.Module, prompted: bool = False) -> str:
        if type(model).__name__ != "VisionTransformer":
            return f"it is a torchvision {type(model).__name__}, not a VisionTransformer"
        heads = model.heads
        if "pre_logits" in heads._modules or not isinstance(getattr(heads, "head", None), torch.nn.Linear):
            return "its head has a tanh pre-logits layer (representation_size), for which the authors have no rule"
        if not isinstance(model.encoder.ln, torch.nn.LayerNorm):
            return "its final norm is not a LayerNorm"
        for i, layer in enumerate(model.encoder.layers):
            if type(layer).__name__ != "EncoderBlock":
                return f"layer {i} is a {type(layer).__name__}, not an EncoderBlock"
            mha, mlp = layer.self_attention, layer.mlp
            if not (isinstance(layer.ln_1, torch.nn.LayerNorm) and isinstance(layer.ln_2, torch.nn.LayerNorm)):
                return f"layer {i} normalises with something other than LayerNorm"
            if not (mha._qkv_same_embed_dim and mha.batch_first) or mha.bias_k is not None:
                return f"layer {i}'s attention is not one batch-first q/k/v projection without added key biases"
            if not (
                len(mlp) == 5
                and isinstance(mlp[0], torch.nn.Linear)
                and _elementwise(mlp[1])
                and isinstance(mlp[3], torch.nn.Linear)
                and all(isinstance(mlp[j], torch.nn.Dropout) for j in (2, 4))
            ):
                return f"layer {i}'s MLP is not linear, activation, dropout, linear, dropout"
        return ""

    @staticmethod
    def net(model: torch.nn.Module) -> Net:
        def embed(x: torch.Tensor) -> torch.Tensor:  # torchvision's own: patches, CLS token, position embedding
            t = model._process_input(x)
            t = torch.cat([model.class_token.expand(t.shape[0], -1, -1), t], dim=1)
            return model.encoder.dropout(t + model.encoder.pos_embedding)

        blocks = []
        for layer in model.encoder.layers:
            mha = layer.self_attention
            head_dim = mha.embed_dim // mha.num_heads
            qkv = Affine(mha.in_proj_weight, mha.in_proj_bias)
            mlp = layer.mlp
            blocks.append(
                Block(
                    layer.ln_1,
                    (qkv,),
                    mha.num_heads,
                    head_dim**-0.5,
                    mha.out_proj,
                    layer.dropout,
                    layer.ln_2,
                    mlp[0],
                    mlp[1],
                    mlp[3],
                    mlp[4],
                )
            )
        return Net(embed, tuple(blocks), model.encoder.ln, torch.nn.Identity(), model.heads.head, 1)


class OpenClipTower:
    """OpenCLIP's ``VisionTransformer`` given text prompts: ``ResidualAttentionBlock`` of ``nn.MultiheadAttention``
    (its ``in_proj_weight`` the fused q/k/v projection, as torchvision's), the CLS token pooled, ``ln_post``, and the
    prompts' score as the head (:class:`PromptScore`, its projection ``proj``ᵀ)."""

    @staticmethod
    def matches(model: torch.nn.Module) -> bool:
        return type(model).__module__.startswith("open_clip.")

    @staticmethod
    def unsupported(model: torch.nn.Module, prompted: bool = False) -> str:
        if type(model).__name__ != "VisionTransformer":
            return f"it is OpenCLIP's {type(model).__name__}, not its VisionTransformer"
        if getattr(model, "attn_pool", None) is not None:
            return "its attentional pooler (CoCa) reads the tokens by attention, for which the authors have no rule"
        if getattr(model, "pool_type", None) != "tok":
            return NO_CLS_READOUT.format(f"pool_type={getattr(model, 'pool_type', None)!r}")
        if not prompted:
            return NO_PROMPTS
        if getattr(model, "proj", None) is None:
            return "it has no image projection, which the prompt score reads"
        if not all(isinstance(getattr(model, n, None), torch.nn.LayerNorm) for n in ("ln_pre", "ln_post")):
            return "its norms before the blocks and after them are not LayerNorms"
        for i, blk in enumerate(model.transformer.resblocks):
            if type(blk).__name__ != "ResidualAttentionBlock" or not isinstance(blk.attn, torch.nn.MultiheadAttention):
                return f"block {i} is {type(blk).__name__}, not a ResidualAttentionBlock of nn.MultiheadAttention"
            mha = blk.attn
            if not mha._qkv_same_embed_dim or mha.bias_k is not None:
                return f"block {i}'s attention is not one q/k/v projection without added key biases"
            if not all(isinstance(getattr(blk, n, None), torch.nn.LayerNorm) for n in ("ln_1", "ln_2")):
                return f"block {i} normalises with something other than LayerNorm"
            if not all(_identity_rule(getattr(blk, n, None)) for n in ("ls_1", "ls_2")):
                return f"block {i} scales its branches with something other than LayerScale"
            mlp = blk.mlp
            if list(mlp._modules) != ["c_fc", "gelu", "c_proj"] or not _elementwise(mlp.gelu):
                return f"block {i}'s MLP is not a linear layer, an element-wise activation and a linear layer"
        return ""

    @staticmethod
    def net(model: torch.nn.Module) -> Net:
        blocks = []
        for blk in model.transformer.resblocks:
            mha = blk.attn
            blocks.append(
                Block(
                    blk.ln_1,
                    (Affine(mha.in_proj_weight, mha.in_proj_bias),),
                    mha.num_heads,
                    (mha.embed_dim // mha.num_heads) ** -0.5,
                    mha.out_proj,
                    blk.ls_1,
                    blk.ln_2,
                    blk.mlp.c_fc,
                    blk.mlp.gelu,
                    blk.mlp.c_proj,
                    blk.ls_2,
                )
            )
        # OpenCLIP's own embedding (patches, CLS token, position embedding, ln_pre); ln_post is per token, so the
        # same on the CLS token whether applied before or after the pooling (final_ln_after_pool)
        return Net(model._embeds, tuple(blocks), model.ln_post, torch.nn.Identity(), None, 1)


FAMILIES = (TimmViT, HfViT, TorchvisionViT, OpenClipTower)


def family_of(model: torch.nn.Module) -> type | None:
    """The adapter whose library built ``model``, or None."""
    return next((f for f in FAMILIES if f.matches(model)), None)
