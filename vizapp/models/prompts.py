"""Text prompts as classes for CLIP-like models (transformers CLIP/SigLIP, OpenCLIP).

A model with a text tower (:attr:`VizModel.text_tower`) turned towards a list of prompts (:func:`with_prompts`) is
a :class:`VizModel` whose output head maps the image features to one logit per prompt, as the library's own pipeline
does (CLIP, Radford et al. 2021; SigLIP, Zhai et al. 2023)::

    logit_k = exp(logit_scale) · cos(image_embedding, text_embedding_k) (+ logit_bias for SigLIP)

Its labels are the prompts in the order given, so ``class_idx=k`` is the k-th prompt, and every class-specific
method (gradient rollout, relevance, the LRP methods, head importance, the logit lens) explains a prompt exactly as it
explains a class: the text embeddings are computed once per prompt set, without gradients, and the image path stays
in the graph. Probabilities are the softmax over the prompts (CLIP) or each prompt's sigmoid (SigLIP, whose logits
carry a bias).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

from vizapp.errors import BadParameterError

#: how many prompts one analysis takes, and how long one may be (characters)
MAX_PROMPTS = 64
MAX_PROMPT_CHARS = 300
#: prompt sets kept per model (their text embeddings and the prompted model)
PROMPT_CACHE_SIZE = 8
#: the prompts the app starts with
DEFAULT_PROMPTS = (
    "a photo of a dog",
    "a photo of a cat",
    "a photo of a bird",
    "a photo of a car",
    "a photo of a person",
)


@dataclass(frozen=True, eq=False)
class TextTower:
    """What a CLIP-like model's adapter reads from its text side.

    Attributes:
        encode_text: prompts -> their text embeddings [K, E] on the model's device (normalised here), by the
            library's own tokenizer and text encoder.
        image_embed: (vision model, x [B, C, H, W]) -> the image embedding [B, E], unnormalised, in the graph.
        embed_from_tokens: a block's output tokens [B, N, D] -> the image embedding [B, E] through the tower's own
            final norm, pooling and projection (the logit lens), or None.
        logit_scale: () -> exp(logit_scale), a scalar tensor.
        logit_bias: () -> the logit bias (a scalar tensor) of a sigmoid model (SigLIP), or None (softmax, CLIP).
        modules: the modules holding the text side (kept alive with the model).
        projection: () -> the image projection's matrix [E, D] (the embedding is ``pooled @ P.T`` from the tower's
            pooled, normed CLS token), or None where the tower has none or pools otherwise; read by Transformer
            Attribution (:class:`vizapp.analysis.lrp_families.PromptScore`).
    """

    encode_text: Callable[[list[str]], torch.Tensor]
    image_embed: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]
    logit_scale: Callable[[], torch.Tensor]
    embed_from_tokens: Callable[[torch.Tensor], torch.Tensor] | None = None
    logit_bias: Callable[[], torch.Tensor] | None = None
    modules: tuple[torch.nn.Module, ...] = ()
    projection: Callable[[], torch.Tensor | None] | None = None

    @property
    def activation(self) -> str:
        return "sigmoid" if self.logit_bias is not None else "softmax"


def check_prompts(prompts: Any) -> tuple[str, ...]:
    """The prompts as a tuple of stripped, distinct, non-empty strings; BadParameterError otherwise."""
    if isinstance(prompts, str):
        prompts = [line for line in prompts.splitlines()]
    if not isinstance(prompts, Sequence):
        raise BadParameterError(f"prompts must be a list of strings, got {type(prompts).__name__}")
    out = []
    for p in prompts:
        if not isinstance(p, str):
            raise BadParameterError(f"each prompt must be a string, got {type(p).__name__}")
        p = " ".join(p.split())
        if p:
            out.append(p)
    if not out:
        raise BadParameterError("no prompts given; write one prompt a line, e.g. 'a photo of a dog'")
    if len(out) > MAX_PROMPTS:
        raise BadParameterError(f"{len(out)} prompts; at most {MAX_PROMPTS}")
    long = next((p for p in out if len(p) > MAX_PROMPT_CHARS), None)
    if long is not None:
        raise BadParameterError(f"a prompt is {len(long)} characters long; at most {MAX_PROMPT_CHARS}")
    seen: set[str] = set()
    for p in out:
        if p in seen:
            raise BadParameterError(f"the prompt {p!r} is given twice; each prompt is one class")
        seen.add(p)
    return tuple(out)


def text_embeddings(tower: TextTower, prompts: Sequence[str]) -> torch.Tensor:
    """[K, E] float32 unit text embeddings of ``prompts`` (no gradients)."""
    with torch.no_grad():
        return F.normalize(tower.encode_text(list(prompts)).float(), dim=-1)


def prompt_logits(tower: TextTower, image_embedding: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """[B, K] logits: exp(logit_scale) · cos(image, text_k) (+ bias). ``text`` [K, E] unit rows; ``image_embedding``
    [B, E] (in the graph; computed in float32)."""
    img = F.normalize(image_embedding.float(), dim=-1)
    logits = tower.logit_scale().float() * img @ text.T
    if tower.logit_bias is not None:
        logits = logits + tower.logit_bias().float()
    return logits


def probabilities(logits: torch.Tensor, activation: str) -> torch.Tensor:
    """Class probabilities from logits [..., K]: the softmax, or for a sigmoid model (SigLIP) each one's sigmoid."""
    return torch.sigmoid(logits) if activation == "sigmoid" else torch.softmax(logits, dim=-1)


def with_prompts(vm: Any, prompts: Any) -> Any:
    """``vm`` (a :class:`VizModel` with a text tower) with the prompts as its classes: labels, logits and logit lens
    over the prompts. Made once per prompt set and kept with the model (the last :data:`PROMPT_CACHE_SIZE` sets).

    Raises:
        BadParameterError: the model has no text tower, or the prompts are not usable.
    """
    from vizapp.cudagraph import GraphCache

    prompts = check_prompts(prompts)
    tower = vm.text_tower
    if tower is None:
        raise BadParameterError(
            f"{vm.name} has no text tower, so prompts cannot be its classes; pick a CLIP-like model (open_clip:..., "
            "or a transformers CLIP/SigLIP model saved with its text model and tokenizer)"
        )
    if vm.prompts:
        raise BadParameterError(f"{vm.name} already has prompts; give them to the model it was made from")
    cache = vm._digest.setdefault("prompted", {})
    found = cache.get(prompts)
    if found is not None:
        return found
    text = text_embeddings(tower, prompts).to(vm.device)  # [K, E]
    image_embed = tower.image_embed

    def forward(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        return prompt_logits(tower, image_embed(model, x), text)

    from vizapp.models.pooling import PooledReadout

    embed = tower.embed_from_tokens
    lens: Any = None
    if isinstance(embed, PooledReadout):  # an attention-pooling head (SigLIP): its attention kept for LeGrad
        lens = embed.then(lambda e: prompt_logits(tower, e, text), activation=tower.activation)
    elif embed is not None:

        def lens(tokens: torch.Tensor) -> torch.Tensor:
            return prompt_logits(tower, embed(tokens), text)

        lens.activation = tower.activation  # the logit lens's probabilities (vizapp.streaming.BlockFeatures)

    prompted = replace(
        vm,
        labels=prompts,
        forward_fn=forward,
        lens_fn=lens,
        prompts=prompts,
        prompt_embeddings=text,
        load_args=vm.load_args + (("prompts", prompts),),
        _digest={},
        graphs=GraphCache(),
    )
    if len(cache) >= PROMPT_CACHE_SIZE:
        cache.pop(next(iter(cache)))
    cache[prompts] = prompted
    return prompted
