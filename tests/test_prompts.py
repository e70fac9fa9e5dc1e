"""Text prompts as classes for transformers CLIP and SigLIP: equal to transformers' own zero-shot image classification
pipeline, each prompt explained as a class with exact attention gradients. Random-weight folders written by
``save_pretrained`` with a small byte-level BPE tokenizer built here (no downloads)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import random_image

import vizapp
from vizapp.errors import BadParameterError

transformers = pytest.importorskip("transformers", reason="the hf extra is installed by requirements-dev.txt")

PROMPTS = ["a photo of a dog", "a cat", "a red car", "dog"]
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)


def small_tokenizer() -> object:
    """A CLIP byte-level BPE tokenizer over the 256 byte symbols (with and without the end-of-word mark) and two
    merges: every string encodes, offline."""
    from tokenizers.pre_tokenizers import ByteLevel

    chars = sorted(ByteLevel.alphabet())
    vocab = ["<|startoftext|>", "<|endoftext|>", *chars, *(c + "</w>" for c in chars), "do", "dog</w>"]
    return transformers.CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=[("d", "o"), ("do", "g</w>")])


def save_whole(folder, kind: str, tokenizer: bool = True) -> transformers.PreTrainedModel:
    tok = small_tokenizer()
    text = dict(SMALL, vocab_size=len(tok), bos_token_id=0, eos_token_id=1, pad_token_id=1, max_position_embeddings=64)
    vision = dict(SMALL, patch_size=8, image_size=32)
    if kind == "clip":
        config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)
        whole_cls, proc = transformers.CLIPModel, transformers.CLIPImageProcessor(size=32, crop_size=32)
    else:
        config = transformers.SiglipConfig(text_config=text, vision_config=vision)
        whole_cls = transformers.SiglipModel
        proc = transformers.SiglipImageProcessor(size={"height": 32, "width": 32})
    torch.manual_seed(0)
    whole = whole_cls(config).eval()
    with torch.no_grad():  # away from the init's zeros, so the scale and bias are tested
        whole.logit_scale.fill_(1.5)
        if kind == "siglip":
            whole.logit_bias.fill_(-0.5)
    whole.save_pretrained(folder)
    proc.save_pretrained(folder)
    if tokenizer:
        tok.save_pretrained(folder)
    return whole


@pytest.fixture(scope="module", params=["clip", "siglip"])
def saved(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    whole = save_whole(folder, request.param)
    return request.param, str(folder), whole


def pipeline_scores(folder: str, whole, img) -> dict[str, float]:
    """transformers' own zero-shot image classification pipeline, the prompts used verbatim."""
    pipe = transformers.pipeline(
        "zero-shot-image-classification",
        model=whole,
        tokenizer=transformers.AutoTokenizer.from_pretrained(folder),
        image_processor=transformers.AutoImageProcessor.from_pretrained(folder),
    )
    return {d["label"]: d["score"] for d in pipe(img, candidate_labels=PROMPTS, hypothesis_template="{}")}


def test_top_k_lists_every_prompt_as_transformers_pipeline_scores_it(saved):
    kind, folder, whole = saved
    vm = vizapp.load_model(folder, device="cpu")
    assert vm.text_tower is not None and vm.labels == ()
    img = random_image(1)
    r = vizapp.analyze(vm, img, prompts=PROMPTS)
    expected = pipeline_scores(folder, whole, img)
    assert [p for p, _ in r.top_k] == sorted(PROMPTS, key=lambda p: -expected[p])  # all of them, best first
    for p, prob in r.top_k:
        assert prob == pytest.approx(expected[p], abs=1e-5)
    if kind == "siglip":  # independent sigmoids, not a distribution
        assert abs(sum(p for _, p in r.top_k) - 1) > 1e-3
    np.testing.assert_allclose(r.lens_probs[-1], r.probs, atol=1e-6)  # the logit lens: the same activation


def test_each_prompt_is_a_class_with_exact_attention_gradients(saved):
    """∂logit_k/∂A equals autograd through the eager (explicit) attention of the whole model, with the model's own
    ``logits_per_image`` as the score."""
    kind, folder, whole = saved
    vm = vizapp.load_model(folder, device="cpu")
    img = random_image(2)
    eager = type(whole).from_pretrained(folder, attn_implementation="eager").eval()
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    pad = dict(padding="max_length", max_length=64, truncation=True) if kind == "siglip" else dict(padding=True)
    inputs = tok(PROMPTS, return_tensors="pt", **pad)
    x = vm.transform(img)[None]
    out = eager(pixel_values=x, **inputs, output_attentions=True)
    maps = out.vision_model_output.attentions
    for a in maps:
        a.retain_grad()
    k = 2
    out.logits_per_image[0, k].backward()
    for gradients in (False, True):
        r = vizapp.analyze(vm, img, prompts=PROMPTS, gradients=gradients)
        torch.testing.assert_close(
            torch.from_numpy(r.probs).float(),
            (torch.sigmoid if kind == "siglip" else lambda t: t.softmax(-1))(out.logits_per_image[0].detach()),
            atol=1e-5,
            rtol=0,
        )
        grads = r.attention_gradients(class_idx=k)
        for layer, a in enumerate(maps):
            torch.testing.assert_close(grads[layer], a.grad[0], atol=1e-5, rtol=1e-4)
    assert r.relevance(class_idx="a red car").tolist() == r.relevance(class_idx=k).tolist()


def test_the_vision_tower_shares_the_whole_models_weights(saved):
    _, folder, whole = saved
    vm = vizapp.load_model(folder, device="cpu")
    assert type(vm.model).__name__ in ("CLIPVisionModel", "SiglipVisionModel")
    assert vm.model is vm.text_tower.modules[0].vision_model
    x = vm.transform(random_image(3))[None]
    with torch.no_grad():
        torch.testing.assert_close(vm.logits(x), whole.vision_model(pixel_values=x).pooler_output)


def test_a_folder_without_a_tokenizer_says_so(tmp_path):
    save_whole(tmp_path, "clip", tokenizer=False)
    vm = vizapp.load_model(str(tmp_path), device="cpu")
    with pytest.raises(BadParameterError, match="no tokenizer"):
        vizapp.analyze(vm, random_image(0), prompts=PROMPTS)
    r = vizapp.analyze(vm, random_image(0))  # the image side works as before
    assert r.probs is None


def test_a_result_explains_its_prompts_after_the_prompted_model_is_reloaded(saved):
    """The prompts travel in the result's load arguments: a reload from the cache explains the same prompt."""
    _, folder, _ = saved
    vm = vizapp.load_model(folder, device="cpu")
    r = vizapp.analyze(vm, random_image(4), prompts=PROMPTS)
    assert dict(r.load_args)["prompts"] == tuple(PROMPTS)
    again = vizapp.models.reload(r.load_args)
    assert again is r.model_ref() and again.labels == tuple(PROMPTS)


def test_evaluation_scores_the_prompts_as_classes(saved, tmp_path):
    """vizapp.evaluate with prompts: class folders named as the prompts, each image's predicted prompt and its
    probability those of vizapp.analyze with the same prompts (softmax for CLIP, the sigmoid for SigLIP)."""
    import csv

    from vizapp.evaluate import evaluate

    _, folder, _ = saved
    prompts = ["a cat", "a red car"]
    images = {}
    for c, prompt in enumerate(prompts):
        (tmp_path / "data" / prompt).mkdir(parents=True)
        for i in range(2):
            path = tmp_path / "data" / prompt / f"{i}.png"
            random_image(10 * c + i, size=(40, 48)).save(path)
            images[str(path)] = prompt
    evaluate(
        str(tmp_path / "data"),
        tmp_path / "out",
        model=folder,
        methods=["relevance"],
        steps=2,
        progress=False,
        prompts=prompts,
    )
    with open(tmp_path / "out" / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4
    vm = vizapp.load_model(folder, device="cpu")
    for row in rows:
        path = row["source"]
        assert row["status"] == "ok" and row["target_label"] == images[path]
        r = vizapp.analyze(vm, path, prompts=prompts)
        assert row["predicted_label"] == r.top_k[0][0]
        assert float(row["prob_pred"]) == pytest.approx(r.top_k[0][1], abs=1e-5)
