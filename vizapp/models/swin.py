"""The Swin adapter: timm ``swin_*`` / ``swinv2_*`` (``SwinTransformer``, ``SwinTransformerV2``) and transformers
Swin / Swinv2 folders. Windowed attention: per-stage token grids, head counts and windows (see :mod:`vizapp.windows`).

What the analyses need is read from the model: the first stage's grid and patch size from its patch embedding; the
layers, their stages and heads from :func:`vizapp.windows.window_sites`; each layer's window, shift and grid from
the forward itself. Swin has no class token: its head averages the last stage's tokens (readout "patches"), and its
position information is the learned relative-position bias inside each window ("relative").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from vizapp.errors import UnsupportedModelError
from vizapp.models.base import VizModel, pair

TIMM_CLASSES = ("SwinTransformer", "SwinTransformerV2")


def is_windowed(model: torch.nn.Module) -> bool:
    """Whether ``model`` is a windowed-attention model this adapter takes."""
    if type(model).__name__ in TIMM_CLASSES:
        return True
    base = next(
        (getattr(model, a) for a in ("swin", "swinv2") if isinstance(getattr(model, a, None), torch.nn.Module)), model
    )
    return type(base).__name__ in ("SwinModel", "Swinv2Model")


def stage_strides(vm: VizModel, stages: int) -> list[tuple[int, int]]:
    """Token spacing in input pixels of each stage: the patch size times 2 per patch merging before it."""
    ph, pw = vm.patch_size
    return [(ph * 2**s, pw * 2**s) for s in range(stages)]


def _timm_meta(model: torch.nn.Module) -> dict[str, Any]:
    pe = model.patch_embed
    grid = pair(pe.grid_size)

    def grid_fn(height: int, width: int) -> tuple[int, int]:
        return grid

    return {"grid_size": grid, "patch_size": pair(pe.patch_size), "grid_fn": grid_fn}


def _forward(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return out.logits if hasattr(out, "logits") else out


def _hf_forward(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(pixel_values=x)
    logits = getattr(out, "logits", None)
    return logits if logits is not None else out.pooler_output


def head_lens(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """A last-stage block's output -> logits [B, K] through the model's own final norm, average pooling and linear
    head (LeGrad's class score); None without a classifier head. timm: ``forward_head(norm(z))`` on [B, H, W, C];
    transformers: ``classifier(pooler(layernorm(z)ᵀ))`` on [B, N, C]. Only the last stage's width fits the head."""
    if type(model).__name__ in TIMM_CLASSES:
        if not int(getattr(model, "num_classes", 0) or 0):
            return None
        return lambda z: model.forward_head(model.norm(z))
    base = next(
        (getattr(model, a) for a in ("swin", "swinv2") if isinstance(getattr(model, a, None), torch.nn.Module)), None
    )
    head = getattr(model, "classifier", None)
    if base is None or not isinstance(head, torch.nn.Linear) or getattr(base, "pooler", None) is None:
        return None
    return lambda z: head(base.pooler(base.layernorm(z).transpose(1, 2)).flatten(1))


def token_lens(model: torch.nn.Module) -> Callable[[torch.Tensor, tuple[int, int]], torch.Tensor] | None:
    """:func:`head_lens` for tokens as the capture gives them: (a last-stage block's output [B, N, C] row-major over
    its grid, the grid (gh, gw)) -> logits [B, K]; None without a classifier head. timm's head reads [B, gh, gw, C],
    so the tokens are put back on their grid; transformers' reads [B, N, C] as it is."""
    lens = head_lens(model)
    if lens is None:
        return None
    if type(model).__name__ in TIMM_CLASSES:
        return lambda z, grid: lens(z.reshape(z.shape[0], int(grid[0]), int(grid[1]), z.shape[-1]))
    return lambda z, grid: lens(z)


def wrap(
    model: torch.nn.Module,
    name: str,
    source: str,
    note: str,
    device: torch.device,
    dtype: torch.dtype,
    transform: Callable,
    labels: tuple[str, ...],
    input_size: tuple[int, int, int],
    mean: Any,
    std: Any,
    library: str,
) -> VizModel:
    """A :class:`VizModel` for a built Swin (timm or transformers)."""
    from vizapp.windows import window_sites

    sites = window_sites(model)  # raises for anything it cannot capture
    model.eval().to(device=device, dtype=dtype)
    if library == "timm":
        meta = _timm_meta(model)
        forward = _forward
    else:
        cfg = model.config
        patch = pair(cfg.patch_size)
        grid = (-(-input_size[1] // patch[0]), -(-input_size[2] // patch[1]))  # transformers pads the last patch

        def grid_fn(height: int, width: int) -> tuple[int, int]:
            return (-(-height // patch[0]), -(-width // patch[1]))

        meta = {"grid_size": grid, "patch_size": patch, "grid_fn": grid_fn}
        forward = _hf_forward
    return VizModel(
        name=name,
        model=model,
        device=device,
        transform=transform,
        labels=labels,
        num_prefix_tokens=0,
        no_embed_class=True,
        input_size=input_size,
        mean=tuple(float(v) for v in mean),
        std=tuple(float(v) for v in std),
        source=source,
        note=note,
        dtype=dtype,
        num_layers=len(sites),
        num_heads=max(s.heads for s in sites),
        forward_fn=forward,
        has_class_token=False,
        readout="patches",
        family=library,
        position="relative",
        windowed=True,
        **meta,
    )


def wrap_timm(model: torch.nn.Module, name: str, source: str, note: str, device: torch.device, dtype: torch.dtype):
    """A timm Swin with timm's preprocessing and labels."""
    from timm.data import create_transform, resolve_data_config

    from vizapp.models.timm import imagenet_labels

    if type(model).__name__ not in TIMM_CLASSES:
        raise UnsupportedModelError(f"{name} ({type(model).__name__}) is not a timm Swin")
    cfg = resolve_data_config(model=model)
    cfg["input_size"] = (int(cfg["input_size"][0]), *pair(model.patch_embed.img_size))
    transform = create_transform(**cfg, is_training=False)
    return wrap(
        model,
        name,
        source,
        note,
        device,
        dtype,
        transform,
        imagenet_labels(model),
        tuple(int(v) for v in cfg["input_size"]),
        cfg["mean"],
        cfg["std"],
        "timm",
    )


#: transformers model types this adapter loads (from a folder written by ``save_pretrained``, or the hub cache)
HF_TYPES = ("swin", "swinv2")


def _hf_transform(folder: str, size: tuple[int, int]) -> tuple[Callable, tuple, tuple]:
    """Resize to the configured size, to tensor, normalise with the folder's processor statistics (ImageNet's when
    it has none, as transformers' Swin processors default to)."""
    import json
    import os

    from torchvision.transforms import v2 as T

    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    path = os.path.join(folder, "preprocessor_config.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            proc = json.load(f)
        mean, std = tuple(proc.get("image_mean", mean)), tuple(proc.get("image_std", std))
    tf = T.Compose(
        [
            T.ToImage(),
            T.Resize(size, interpolation=T.InterpolationMode.BICUBIC, antialias=True),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(mean, std),
        ]
    )

    def transform(img: Any) -> torch.Tensor:
        return tf(img.convert("RGB"))

    return transform, mean, std


def hf_model_class(config: Any) -> Any:
    """The transformers class of a Swin / Swinv2 config: its image classifier when the config names one, else the
    bare model."""
    import transformers

    has_head = bool(getattr(config, "architectures", None)) and any(
        a.endswith("ForImageClassification") for a in config.architectures
    )
    prefix = {"swin": "Swin", "swinv2": "Swinv2"}[config.model_type]
    return getattr(transformers, prefix + ("ForImageClassification" if has_head else "Model"))


def load_hf(
    name: str,
    folder: str,
    pretrained: bool,
    device: torch.device,
    dtype: torch.dtype,
    config: Any = None,
    local: bool = True,
) -> VizModel:
    """A transformers Swin / Swinv2 from a folder (safetensors only): one written by ``save_pretrained``, or the hub
    cache's snapshot of an ``hf:owner/repo`` id (:func:`vizapp.models.hf.load` resolves both and passes the config it
    read, with any overrides). Swin runs with SDPA attention (what the capture catches; ``attn_implementation="eager"``
    with ``output_attentions`` is the second code path in the tests); Swinv2 has no SDPA path in transformers and runs
    its explicit one. ``local``: ``folder`` is the user's own (its weights are a "file"), not a hub snapshot."""
    from transformers import AutoConfig

    from vizapp.errors import ModelLoadError

    if config is None:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
    if config.model_type not in HF_TYPES:
        raise UnsupportedModelError(f"{name}: model type {config.model_type!r} is not a Swin")
    cls = hf_model_class(config)
    has_head = cls.__name__.endswith("ForImageClassification")
    # Swin: SDPA (caught at the call); Swinv2 has only its explicit path (its probabilities are read at its dropout)
    impl = "sdpa" if config.model_type == "swin" else "eager"
    try:
        if pretrained:
            model = cls.from_pretrained(
                folder, config=config, attn_implementation=impl, local_files_only=True, use_safetensors=True
            )
        else:
            model = cls.from_config(config, attn_implementation=impl)
    except OSError as e:
        raise ModelLoadError(f"{name}: weights could not be read ({str(e).splitlines()[0][:200]})") from e
    size = pair(config.image_size)
    transform, mean, std = _hf_transform(folder, size)
    labels: tuple[str, ...] = ()
    if has_head:
        id2label = getattr(config, "id2label", None) or {}
        labels = tuple(str(id2label.get(i, f"class {i}")) for i in range(int(config.num_labels)))
    source = ("file" if local else "pretrained") if pretrained else "random"
    note = "" if pretrained else "Random weights (pretrained=False): predictions and maps are not meaningful."
    return wrap(model, name, source, note, device, dtype, transform, labels, (3, *size), mean, std, "hf")


def analysis_memory(vm: VizModel) -> dict[str, int]:
    """High estimate, in bytes, of what one image's windowed analysis holds at once, term by term (the plain ViT's
    :func:`vizapp.budget.analysis_memory` counts N x N matrices per layer that a windowed analysis never forms):

    - ``record``: every layer's window attention [nW, H, w², w²] float32 (kept in the result);
    - ``working``: the largest layer's attention again, for the mean distance and the rollout's fusion (float64);
    - ``activations``: the first stage's widest activations, 10·N·C (input, q, k, v, output, the MLP's 4·N·C);
    - ``block_outputs``: every layer's block output N_l·C_l for the feature views while their sum fits
      :data:`vizapp.limits.BLOCK_OUTPUT_BYTES`, else the last layer's (:class:`vizapp.swin_features.WindowBlockOutputs`),
      and every token's norm.
    """
    from vizapp import limits
    from vizapp.windows import output_projection, window_sites

    f32 = 4
    gh, gw = vm.grid_size
    width = int(getattr(vm.model, "embed_dim", 0) or getattr(getattr(vm.model, "config", None), "embed_dim", 0) or 96)
    record, largest, outputs, tokens = 0, 0, [], 0
    for site in window_sites(vm.model):
        h, w = -(-gh // 2**site.stage), -(-gw // 2**site.stage)
        wh, ww = (min(a, b) for a, b in zip(_window(site.block.window_size), (h, w), strict=True))
        layer = (-(-h // wh)) * (-(-w // ww)) * site.heads * (wh * ww) ** 2 * f32
        record += layer
        largest = max(largest, layer)
        outputs.append(h * w * output_projection(site).in_features * f32)  # [N_l, C_l]
        tokens += h * w
    kept = sum(outputs) if sum(outputs) <= limits.BLOCK_OUTPUT_BYTES else outputs[-1]
    return {
        "record": record,
        "working": 2 * largest,
        "activations": 10 * gh * gw * width * f32,
        "block_outputs": kept + tokens * f32,
    }


def _window(v: Any) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


def check_analysis_budget(vm: VizModel) -> int:
    """Refuse a windowed model whose analysis at its configured size would hold more than VIZAPP_MAX_ANALYSIS_BYTES
    (:func:`analysis_memory`); returns the estimate."""
    from vizapp import budget
    from vizapp.errors import ModelTooLargeError

    terms = analysis_memory(vm)
    total = sum(terms.values())
    limit = budget.BUDGET.max_analysis_bytes
    if limit is not None and total > limit:
        biggest = max(terms, key=terms.__getitem__)
        raise ModelTooLargeError(
            f"'{vm.name[:80]}' would hold about {total / 2**20:.0f} MB for one analysis ({biggest}: "
            f"{terms[biggest] / 2**20:.0f} MB), over this server's limit of {limit / 2**20:.0f} MB "
            "(VIZAPP_MAX_ANALYSIS_BYTES); pick a smaller input size (img_size) or another model"
        )
    return total
