"""AttnLRP (Achtibat et al., ICML 2024: "AttnLRP: Attention-Aware Layer-Wise Relevance Propagation for Transformers")
as its authors' library ``lxt`` (2.1) applies it to a Vision Transformer.

lxt's ViT rules (``lxt/efficient/models/vit_torch.py``, the ``cp_LRP`` map it patches into torchvision's ViT) are all
input × gradient with modified backward passes, the forward values unchanged:

- LayerNorm: the identity rule, as lxt's ``layer_norm_forward``: y = (x − mean(x)) / sg(std(x)) · w + b, the
  standard deviation detached (its gradient stopped) and the mean kept in the graph;
- the MLP's element-wise activation (GELU): the identity rule, as lxt's ``identity_rule_implicit``: the backward
  multiplies the incoming gradient by the detached ratio f(x) / (x + 1e-10);
- attention: CP-LRP inside the attention mechanism, as lxt's ``cp_multi_head_attention_forward``: q and k are
  detached, so no relevance flows through the softmax; the attention A is a constant and A·v passes the whole
  gradient to v (lxt applies no uniform rule, no halving, on the ViT's value path);
- linear layers, the patch embedding's convolution, residual adds, pooling and the head: the plain gradient (lxt's ViT
  map patches none of them);
- a gated MLP (timm's SwiGLU / GluMlp, as in EVA-02; transformers' DINOv2 with ``use_swiglu_ffn``), which
  torchvision's ViT has not: lxt's rule for gated MLPs (``gated_mlp_forward``, written for its LLMs, whose
  ``gate_proj`` / ``up_proj`` / ``down_proj`` / ``act_fn`` layout DINOv2's SwiGLU shares): the identity rule on the
  activation and the uniform rule on the product act(x_g) · x_v, its gradient halved between the two factors.

OpenCLIP's ViT towers (``open_clip:ARCH``) are torchvision's layout in OpenCLIP's modules: ``ln_pre``, blocks of
``ln_1``, attention (torch's ``nn.MultiheadAttention``, or OpenCLIP's own ``Attention`` in its custom blocks, which
calls SDPA), ``ls_1``, ``ln_2``, the MLP ``c_fc``, activation (GELU or QuickGELU: the identity rule), ``c_proj``,
``ls_2``, then ``ln_post`` and CLS (or mean) pooling; both attentions get CP-LRP through vizapp's capture, and their
LayerNorms (OpenCLIP's subclasses of torch's, the custom blocks' extra ones included) the identity rule. Two parts have
no counterpart in torchvision's ViT, and each gets what the same part of a transformers CLIP tower's prompt readout
gets here: the projection ``proj``, a parameter in a matmul (CLIP's ``visual_projection``, an ``nn.Linear`` without
bias), the plain gradient as every linear layer; and a prompt's score, exp(logit_scale) · cos(image embedding, text
embedding) (:func:`vizapp.models.prompts.prompt_logits`), the plain gradient through the L2 normalisation of the image
embedding, the text embeddings constants. CoCa's attentional pooler is a softmax outside the encoder, as SigLIP's
attention-pooling head, and is refused like it.

The relevance of each input pixel is x · ∂̃y_c/∂x at the normalised input, ∂̃ being that modified gradient: one
forward and one backward. The map sums it over the channels and over each patch's pixels (so the patch embedding's
bias, which adds to every patch, gets none of it); it is signed, [gh, gw].

Here the rules attach to the model for one forward: a forward hook on each LayerNorm and activation module returns its
own output detached plus a term that is zero in value and carries the rule's gradient, and the attention is vizapp's
capture in the graph (:class:`vizapp.capture.AttentionCapture` with ``with_grad``), whose gradient is stopped. So the
forward is the model's own, bit for bit, for any family whose every non-linearity is one of those modules;
:func:`unsupported` names the models with anything else.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch

from vizapp.analysis.legrad import explained_classes
from vizapp.transfer import tensor_on

#: lxt's ``identity_rule_implicit`` stabiliser: the backward of an activation f is f(x) / (x + EPS).
EPS = 1e-10

SUPPORTED = (
    "its rules (lxt's AttnLRP for ViTs) cover ViTs built of linear layers, LayerNorm, an element-wise activation "
    "module or a gated MLP, and softmax attention (timm ViT/DeiT (distilled too)/BEiT/relpos/EVA/EVA-02, transformers "
    "ViT/DeiT/DINOv2 (SwiGLU too)/BEiT/CLIP, torchvision vit_*, OpenCLIP ViT towers without an attentional pooler)"
)
"""The models the rules cover, as the refusals say it."""

# Element-wise activation modules: the identity rule applies to each (called as modules, so a hook reaches them).
_ACTIVATIONS = {
    "torch.nn.modules.activation": ("GELU", "ReLU", "SiLU", "Tanh", "QuickGELU"),
    "transformers.activations": (
        "GELUActivation",
        "QuickGELUActivation",
        "NewGELUActivation",
        "FastGELUActivation",
        "PytorchGELUTanh",
        "GELUTanh",
        "SiLUActivation",
    ),
    "timm.layers.activations": ("GELU", "GELUTanh", "QuickGELU", "Swish", "SiLU"),
    "open_clip.transformer": ("QuickGELU",),
}

# Every other module a supported model may hold, whose forward is linear in its input apart from the attention's
# softmax (detached), the modules above and LayerNorm (both given their rule), or depends on positions only.
_ALLOWED = {
    "torch.nn.modules.container": ("ModuleList", "Sequential", "ModuleDict"),
    "torch.nn.modules.linear": ("Linear", "Identity", "NonDynamicallyQuantizableLinear"),
    "torch.nn.modules.conv": ("Conv2d",),
    "torch.nn.modules.dropout": ("Dropout",),
    "torch.nn.modules.sparse": ("Embedding",),  # CLIP's position table, indexed by position
    "torch.nn.modules.normalization": ("LayerNorm",),
    "torch.nn.modules.activation": ("MultiheadAttention",),
    "timm.layers.norm": ("LayerNorm",),
    "timm.layers.patch_embed": ("PatchEmbed",),
    "timm.layers.layer_scale": ("LayerScale",),
    "timm.layers.mlp": ("Mlp", "GluMlp", "SwiGLU"),  # the gated two: their product gets lxt's uniform rule
    "timm.layers.drop": ("DropPath",),
    "timm.layers.attention": ("Attention", "AttentionRope"),
    "timm.layers.pos_embed_sincos": (
        "RotaryEmbedding",
        "RotaryEmbeddingCat",
        "RotaryEmbeddingMixed",
        "RotaryEmbeddingDinoV3",
    ),
    "timm.layers.pos_embed_rel": ("RelPosMlp", "RelPosBias"),
    "timm.models.vision_transformer": ("VisionTransformer", "Block", "LayerScale"),
    "timm.models.deit": ("VisionTransformerDistilled",),  # its two linear heads averaged
    "timm.models.vision_transformer_relpos": ("VisionTransformerRelPos", "RelPosBlock", "RelPosAttention"),
    "timm.models.beit": ("Beit", "Block", "Attention"),
    "timm.models.eva": ("Eva", "EvaBlock", "EvaAttention"),
    "torchvision.models.vision_transformer": ("VisionTransformer", "Encoder", "EncoderBlock", "MLPBlock"),
    # OpenCLIP's tower: its LayerNorms subclass torch's (they cast dtypes only); PatchDropout is the identity in eval;
    # the custom blocks' Attention scales heads by parameters and its q/k norms act on q and k only (detached)
    "open_clip.transformer": (
        "VisionTransformer",
        "Transformer",
        "CustomTransformer",
        "ResidualAttentionBlock",
        "CustomResidualAttentionBlock",
        "Attention",
        "LayerScale",
        "LayerNorm",
        "LayerNormFp32",
        "PatchDropout",
    ),
}
# transformers models whose modules are all plain (their MLPs: fc1, activation module, fc2) or the gated MLPs below.
_HF_MODELS = ("vit", "vit_msn", "ijepa", "deit", "dinov2", "dinov2_with_registers", "beit", "data2vec", "clip")
#: transformers' gated MLPs, down_proj(act_fn(gate_proj(x)) * up_proj(x)): the activation is a module (it gets the
#: identity rule from its hook); the product is not, so the uniform rule goes on down_proj's input.
_HF_GATED = ("Dinov2SwiGLUFFN", "Dinov2WithRegistersSwiGLUFFN")


def _kind(m: torch.nn.Module) -> tuple[str, str]:
    return type(m).__module__, type(m).__name__


def is_activation(m: torch.nn.Module) -> bool:
    """An element-wise activation module that AttnLRP's identity rule applies to."""
    module, name = _kind(m)
    return name in _ACTIVATIONS.get(module, ())


def unsupported(model: torch.nn.Module) -> str:
    """Why AttnLRP's rules are not defined for ``model`` ("" when they are): it holds a module whose forward is
    non-linear in a way none of the rules covers (a gated MLP, an attention-pooling head, RMSNorm ...)."""
    for name, m in model.named_modules():
        module, cls = _kind(m)
        if is_activation(m) or cls in _ALLOWED.get(module, ()) or _is_hf_gated_mlp(m):
            continue
        if module.startswith("transformers.models."):
            family = module.split(".")[2]
            if family in _HF_MODELS and "SwiGLU" not in cls:
                continue
        if "SwiGLU" in cls or "Glu" in cls:
            return (
                f"its MLP is gated ({name or 'model'} is {cls}) in a layout vizapp's AttnLRP has no hook for (the "
                "identity rule on its activation, lxt's uniform rule on its product)"
            )
        if "AttentionPool" in cls or "AttentionalPool" in cls:  # SigLIP's MAP head, CoCa's AttentionalPooler
            return f"its head pools by attention ({cls}), a softmax outside the encoder that the rules do not cover"
        if isinstance(m, torch.nn.LayerNorm) or "RmsNorm" in cls or "RMSNorm" in cls:
            return f"{name} is a {cls}, not the LayerNorm the rules are written for"
        return f"{name or 'the model'} is {cls}, for which vizapp's AttnLRP has no rule"
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.LayerNorm) and len(m.normalized_shape) != 1:
            return f"{name} normalises over {len(m.normalized_shape)} dimensions"
        if _kind(m)[1] == "Attention" and getattr(m, "gate", None) is not None:
            return f"{name} gates its attention output"
        if _is_gated_mlp(m) and not isinstance(getattr(m, "drop1", None), torch.nn.Dropout):
            return f"{name} ({_kind(m)[1]}) has no dropout module after its gate's product to carry the uniform rule"
    return ""


def _is_gated_mlp(m: torch.nn.Module) -> bool:
    """timm's gated MLPs: act(x_g) · x_v (SwiGLU) or one half of fc1 gating the other (GluMlp)."""
    return _kind(m) in (("timm.layers.mlp", "GluMlp"), ("timm.layers.mlp", "SwiGLU"))


def _is_hf_gated_mlp(m: torch.nn.Module) -> bool:
    """transformers' gated MLPs (:data:`_HF_GATED`) whose pieces are the modules their forward calls."""
    module, cls = _kind(m)
    return (
        module.startswith("transformers.models.")
        and cls in _HF_GATED
        and all(isinstance(getattr(m, n, None), torch.nn.Linear) for n in ("gate_proj", "up_proj", "down_proj"))
        and is_activation(getattr(m, "act_fn", None))
    )


def _uniform_rule_on_input(_m: torch.nn.Module, args: tuple) -> tuple:
    """The uniform rule on the product act(x_g) · x_v that a transformers gated MLP hands its ``down_proj`` (a forward
    pre-hook there): the same value, its gradient halved (lxt's ``divide_gradient(weighted, 2)``)."""
    x = args[0]
    return (x.detach() + 0.5 * (x - x.detach()), *args[1:])


def _uniform_rule(_m: torch.nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
    """lxt's uniform rule on an element-wise product (``divide_gradient(product, 2)`` of its ``gated_mlp_forward``):
    the gradient reaching the product is halved, so each factor gets half its relevance. Hooked on the module that
    takes the product (timm's ``drop1``, an identity in eval); the same value as its output."""
    x = args[0]
    return out.detach() + 0.5 * (x - x.detach())


def _layer_norm_rule(m: torch.nn.LayerNorm, args: tuple, out: torch.Tensor) -> torch.Tensor:
    """lxt's ``layer_norm_forward``: the standard deviation detached; the same value as the module's own output."""
    x = args[0]
    mean = x.mean(dim=-1, keepdim=True)
    std = ((x - mean) ** 2).mean(dim=-1, keepdim=True).add(m.eps).sqrt()
    y = (x - mean) / std.detach()
    if m.weight is not None:
        y = y * m.weight
    if m.bias is not None:
        y = y + m.bias
    return out.detach() + (y - y.detach())  # value: the module's output; gradient: the rule's


def _activation_rule(_m: torch.nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
    """lxt's ``identity_rule_implicit``: the backward multiplies by the detached f(x) / (x + EPS)."""
    x = args[0]
    ratio = (out / (x + EPS)).detach()
    ratio = torch.where(torch.isfinite(ratio), ratio, torch.zeros_like(ratio))  # x = -EPS exactly: no relevance
    return out.detach() + ratio * (x - x.detach())


@contextmanager
def relevance_rules(model: torch.nn.Module) -> Iterator[None]:
    """AttnLRP's LayerNorm, activation and gate rules on ``model`` for one ``with`` block, for forwards run by the
    thread that opened it only (another thread's forward of the same cached model keeps its true gradients); hooks
    removed on exit, also when it raises; the forward's values are unchanged. The attention rule is the caller's (see
    :func:`attnlrp`)."""
    owner = threading.get_ident()

    def mine(rule: Callable) -> Callable:
        def hook(m: torch.nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
            return rule(m, args, out) if threading.get_ident() == owner else None

        return hook

    def mine_pre(rule: Callable) -> Callable:
        def hook(m: torch.nn.Module, args: tuple) -> tuple | None:
            return rule(m, args) if threading.get_ident() == owner else None

        return hook

    handles = []
    try:
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                handles.append(m.register_forward_hook(mine(_layer_norm_rule)))
            elif is_activation(m):
                handles.append(m.register_forward_hook(mine(_activation_rule)))
            if _is_gated_mlp(m):
                handles.append(m.drop1.register_forward_hook(mine(_uniform_rule)))
            elif _is_hf_gated_mlp(m):
                handles.append(m.down_proj.register_forward_pre_hook(mine_pre(_uniform_rule_on_input)))
        yield
    finally:
        for h in handles:
            h.remove()


def patch_sums(relevance: torch.Tensor, grid_size: tuple[int, int], patch_size: tuple[int, int]) -> torch.Tensor:
    """Pixel relevance [B, C, H, W] summed over the channels and over each patch's pixels: [B, gh, gw]; an image the
    library pads to whole patches (transformers) is padded with zeros here too (the padding is no input)."""
    (gh, gw), (ph, pw) = grid_size, patch_size
    b, c, h, w = relevance.shape
    r = torch.nn.functional.pad(relevance, (0, max(0, gw * pw - w), 0, max(0, gh * ph - h)))
    r = r[:, :, : gh * ph, : gw * pw].reshape(b, c, gh, ph, gw, pw)
    return r.sum(dim=(1, 3, 5))


def explained_input(why: str, supported: str, classes: Sequence[int | None], x: torch.Tensor) -> torch.Tensor:
    """``x`` as the leaf whose gradient AttnLRP takes, once the model (``why``: :func:`unsupported`'s answer, or the
    windowed one's; ``supported``: what the rules cover) and the classes are checked."""
    if why:
        raise ValueError(f"AttnLRP is not defined for this model: {why}; {supported}")
    if len(classes) != x.shape[0]:
        raise ValueError(f"give one class per image ({x.shape[0]}), got {len(classes)}")
    return x.detach().requires_grad_(True)


def input_times_gradient(
    logits: torch.Tensor,
    maps: Sequence[torch.Tensor],
    x: torch.Tensor,
    classes: Sequence[int | None],
    grid_size: tuple[int, int],
    patch_size: tuple[int, int],
) -> tuple[torch.Tensor, list[int]]:
    """AttnLRP's last steps, after a forward under :func:`relevance_rules`: no relevance through any softmax (the
    gradient into every attention map in ``maps`` is zeroed: q and k detached, as lxt does), each image's class
    (None: its top-1), one backward of their summed scores, and x · ∂score/∂x summed per patch -> ([B, gh, gw] float32,
    the classes)."""
    for a in maps:
        a.register_hook(torch.zeros_like)
    cls = explained_classes(logits, classes)
    score = logits.gather(1, tensor_on(cls, logits.device)[:, None]).sum()
    (grad,) = torch.autograd.grad(score, x)
    return patch_sums((x * grad).detach(), grid_size, patch_size).float(), cls


def attnlrp(
    model: torch.nn.Module,
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    classes: Sequence[int | None],
    grid_size: tuple[int, int],
    patch_size: tuple[int, int],
) -> tuple[torch.Tensor, list[int]]:
    """AttnLRP maps of a batch from one forward and one backward, [B, gh, gw] float32, signed.

    Args:
        model: a ViT :func:`unsupported` accepts, in eval mode.
        logits_fn: x -> logits [B, K] (the model's own forward).
        x: the input [B, C, H, W], normalised as the model expects, on the model's device.
        classes: one per image: the class explained, or None for the image's top-1 class (from this forward).
        grid_size, patch_size: the patch grid (gh, gw) of ``x`` and the patch size in pixels.

    Returns:
        (the maps, the classes explained).

    Raises:
        ValueError: the model is not one the rules cover (the message says which are), or bad arguments.
    """
    from vizapp.capture import AttentionCapture

    x = explained_input(unsupported(model), SUPPORTED, classes, x)
    with torch.enable_grad(), relevance_rules(model), AttentionCapture(model, with_grad=True, keep_qk=False) as cap:
        logits = logits_fn(x)
    if any(a is None for a in cap.maps) or cap.unexact_layers:
        raise ValueError("AttnLRP needs every layer's attention formed by vizapp's capture (is fused attention off?)")
    return input_times_gradient(logits, cap.maps, x, classes, grid_size, patch_size)
