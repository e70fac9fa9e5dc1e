"""OpenCLIP: the vision tower captured exactly (torch's nn.MultiheadAttention in OpenCLIP's blocks), its own
preprocessing, its own prompt logits, and its weight loading path (a local file through ``pretrained=<file>``).

Random-weight models only, built small through OpenCLIP's own config overrides; its tokenizer's BPE vocabulary ships
with the package, so everything runs offline.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import all_hooks, random_image

import vizapp
from vizapp.analysis import mean_attention_distance, rollout
from vizapp.capture import AttentionCapture
from vizapp.errors import BadParameterError, ModelLoadError

open_clip = pytest.importorskip("open_clip", reason="open_clip_torch is installed by requirements.txt")

SMALL = dict(
    embed_dim=32,
    vision_cfg=dict(image_size=64, layers=2, width=64, patch_size=16, head_width=16),
    text_cfg=dict(context_length=16, vocab_size=49408, width=32, heads=2, layers=1),
)
PROMPTS = ["a photo of a dog", "a photo of a cat", "a red car"]


def small(seed: int = 0, **extra) -> vizapp.VizModel:
    torch.manual_seed(seed)
    return vizapp.load_model("open_clip:ViT-B-32", pretrained=False, device="cpu", **SMALL, **extra)


@pytest.fixture(scope="module")
def vm():
    return small()


def clip_of(vm: vizapp.VizModel) -> torch.nn.Module:
    return vm.text_tower.modules[0]


def explicit(vm: vizapp.VizModel, x: torch.Tensor, grad: bool = False) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The attention [B, H, N, N] of every block, written out from each nn.MultiheadAttention's own weights (in the
    graph with ``grad``), and the image embedding computed through those maps (OpenCLIP's own pooling and proj)."""
    visual = copy.deepcopy(vm.model)
    maps = []
    h = visual._embeds(x)
    for blk in visual.transformer.resblocks:
        mha = blk.attn
        y = blk.ln_1(h)
        b, n, e = y.shape
        hd = e // mha.num_heads
        q, k, v = (
            t.reshape(b, n, mha.num_heads, hd).transpose(1, 2)
            for t in torch.nn.functional.linear(y, mha.in_proj_weight, mha.in_proj_bias).chunk(3, -1)
        )
        w = torch.softmax(q @ k.transpose(-2, -1) / hd**0.5, dim=-1)
        if grad:
            w.retain_grad()
        maps.append(w)
        h = h + blk.ls_1(mha.out_proj((w @ v).transpose(1, 2).reshape(b, n, e)))
        h = h + blk.ls_2(blk.mlp(blk.ln_2(h)))
    pooled, _ = visual._pool(h)
    return maps, pooled @ visual.proj


def test_bookkeeping_and_preprocessing_are_open_clips_own(vm):
    visual = clip_of(vm).visual
    assert vm.model is visual and vm.family == "open_clip"
    assert (vm.num_prefix_tokens, vm.has_class_token, vm.readout) == (1, True, "cls")
    assert (vm.grid_size, vm.patch_size, vm.input_size) == ((4, 4), (16, 16), (3, 64, 64))
    assert (vm.num_layers, vm.num_heads, vm.position, vm.labels) == (2, 4, "learned", ())
    _, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None, **SMALL)
    img = random_image(1)
    torch.testing.assert_close(vm.transform(img), preprocess(img), atol=0, rtol=0)
    torch.testing.assert_close(vm.patch_pos_embed(), visual.positional_embedding[1:].detach())


def explicit_attention(visual: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """torch's own explicit path: each block's nn.MultiheadAttention asked for its per-head weights, [B, H, N, N]
    per block, through an OpenCLIP vision tower."""
    h = visual._embeds(x)
    ref = []
    for blk in visual.transformer.resblocks:
        y = blk.ln_1(h)
        ref.append(blk.attn(y, y, y, need_weights=True, average_attn_weights=False)[1])
        h = blk(h)
    return ref


def test_capture_equals_the_explicit_attention_of_its_multihead_attention(vm):
    x = torch.stack([vm.transform(random_image(i)) for i in (1, 2)])
    with torch.no_grad():
        ref = explicit_attention(vm.model, x)
        plain = vm.logits(x)

    class Sink:
        def chunk(self, *a):
            pass

        def layer_done(self, layer):
            pass

    hooks = all_hooks(vm.model)
    with torch.no_grad(), AttentionCapture(vm.model, on_attention=Sink()) as cap:
        captured = vm.logits(x)
    assert all_hooks(vm.model) == hooks
    assert cap.inline_layers == {0, 1} and not cap.unexact_layers
    torch.testing.assert_close(captured, plain, atol=1e-5, rtol=1e-4)
    for layer, a in enumerate(ref):
        assert cap.attention(layer).shape == (2, 4, 17, 17)
        torch.testing.assert_close(cap.attention(layer), a, atol=1e-5, rtol=0)


@pytest.mark.parametrize("inline", [True, False], ids=["inline", "from_qk"])
def test_analyze_equals_analyses_of_the_explicit_attention(vm, inline):
    r = vizapp.analyze(vm, random_image(3), inline=inline)
    assert r.recomputed_layers == (() if inline else (0, 1))
    with torch.no_grad():
        maps, _ = explicit(vm, r.input)
    attn = torch.stack([m[0] for m in maps]).float()
    np.testing.assert_allclose(
        r.mean_distance, mean_attention_distance(attn, r.grid_size, r.patch_size, 1).numpy(), rtol=1e-4, atol=1e-3
    )
    np.testing.assert_allclose(r.rollout(), rollout(attn, 1)[0, 1:].reshape(4, 4).numpy(), atol=1e-5)
    assert r.probs is None and r.top_k == []


def test_prompt_probabilities_equal_open_clips_own_pipeline(vm):
    clip = clip_of(vm)
    tokenizer = open_clip.get_tokenizer("ViT-B-32", context_length=16)
    img = random_image(4)
    r = vizapp.analyze(vm, img, prompts=PROMPTS)
    with torch.no_grad():
        image = clip.encode_image(vm.transform(img)[None], normalize=True)
        text = clip.encode_text(tokenizer(PROMPTS), normalize=True)
        expected = torch.softmax(clip.logit_scale.exp() * image @ text.T, dim=-1)[0].numpy()
    assert r.labels == tuple(PROMPTS)
    np.testing.assert_allclose(r.probs, expected, atol=1e-5)
    order = np.argsort(-expected, kind="stable")
    assert [p for p, _ in r.top_k] == [PROMPTS[i] for i in order]  # every prompt, best first
    np.testing.assert_allclose([p for _, p in r.top_k], expected[order], atol=1e-5)
    # the logit lens of the last block is the model's own prediction over the prompts
    np.testing.assert_allclose(r.lens_probs[-1], r.probs, atol=1e-6)
    # the text embeddings are computed once per prompt set: the same prompted model each time
    assert vizapp.analyze(vm, img, prompts=PROMPTS).model_ref() is r.model_ref()


@pytest.mark.parametrize("k", [0, 2])
def test_a_prompt_is_explained_as_a_class_with_exact_attention_gradients(vm, k):
    """∂logit_k/∂A equals autograd through the explicit attention with OpenCLIP's own prompt logit as the score, on
    both paths (a fresh forward, and the graph analyze kept)."""
    clip = clip_of(vm)
    img = random_image(5)
    x = vm.transform(img)[None]
    maps, image = explicit(vm, x, grad=True)
    with torch.no_grad():
        text = clip.encode_text(open_clip.get_tokenizer("ViT-B-32", context_length=16)(PROMPTS), normalize=True)
    logits = clip.logit_scale.exp() * torch.nn.functional.normalize(image, dim=-1) @ text.T
    logits[0, k].backward()
    for gradients in (False, True):
        r = vizapp.analyze(vm, img, prompts=PROMPTS, gradients=gradients)
        grads = r.attention_gradients(class_idx=k)
        for layer, a in enumerate(maps):
            torch.testing.assert_close(grads[layer], a.grad[0], atol=1e-5, rtol=1e-4)
    assert r.relevance(class_idx=k).shape == (4, 4) and r.grad_rollout(class_idx=k).shape == (4, 4)
    assert r.relevance(class_idx=PROMPTS[k]).tolist() == r.relevance(class_idx=k).tolist()
    assert not np.allclose(r.relevance(class_idx=0), r.relevance(class_idx=2))


def test_explain_of_a_batch_with_prompts_equals_each_images_analysis(vm):
    images = [random_image(6), random_image(7)]
    maps = vizapp.explain(vm, images, ["relevance", "grad_rollout"], classes=[1, "a red car"], prompts=PROMPTS)
    for i, (img, cls) in enumerate(zip(images, [1, 2], strict=True)):
        r = vizapp.analyze(vm, img, prompts=PROMPTS)
        np.testing.assert_allclose(maps["relevance"][i], r.relevance(class_idx=cls), atol=1e-5)
        np.testing.assert_allclose(maps["grad_rollout"][i], r.grad_rollout(class_idx=cls), atol=1e-5)
    batch = vizapp.analyze(vm, images, prompts=PROMPTS)
    np.testing.assert_allclose(batch[1].probs, vizapp.analyze(vm, images[1], prompts=PROMPTS).probs, atol=1e-6)


def test_a_sigmoid_model_reports_each_prompts_sigmoid():
    """With a logit bias (OpenCLIP's SigLIP-style models) the probabilities are sigmoid(scale·cos + bias), as its
    loss defines them; the logit lens gives the same sigmoids from each block's output (the last block's equal to
    the model's)."""
    vm = small(1, init_logit_bias=-2.0)
    clip = clip_of(vm)
    img = random_image(8)
    r = vizapp.analyze(vm, img, prompts=PROMPTS)
    with torch.no_grad():
        image = clip.encode_image(vm.transform(img)[None], normalize=True)
        text = clip.encode_text(open_clip.get_tokenizer("ViT-B-32", context_length=16)(PROMPTS), normalize=True)
        expected = torch.sigmoid(clip.logit_scale.exp() * image @ text.T + clip.logit_bias)[0].numpy()
    np.testing.assert_allclose(r.probs, expected, atol=1e-5)
    np.testing.assert_allclose(r.lens_probs[-1], expected, atol=1e-5)
    assert abs(r.lens_probs[0].sum() - 1) > 1e-3  # sigmoids, not a softmax
    # the faithfulness curves track the same probability: the unchanged image's is the prompt's sigmoid
    curves = r.faithfulness({"relevance": r.relevance(class_idx=1)}, class_idx=1, steps=2, random_seed=None)
    assert float(curves["relevance"]["deletion"].probs[0]) == pytest.approx(float(expected[1]), abs=1e-5)


def test_prompts_are_checked(vm):
    with pytest.raises(BadParameterError, match="no prompts"):
        vizapp.analyze(vm, random_image(0), prompts=["  ", ""])
    with pytest.raises(BadParameterError, match="twice"):
        vizapp.analyze(vm, random_image(0), prompts=["a dog", "a  dog"])
    with pytest.raises(BadParameterError, match="no text tower"):
        vizapp.analyze(vizapp.load_model("bundled", device="cpu"), random_image(0), prompts=["a dog"])
    r = vizapp.analyze(vm, random_image(0), prompts="a dog\n\na cat\n")  # one prompt a line
    assert r.labels == ("a dog", "a cat")


def test_weights_load_through_open_clips_pretrained_file_path(vm, tmp_path):
    """The pretrained path (OpenCLIP's create_model_and_transforms with pretrained=<weights>) run on a local file:
    safetensors, or a torch file read with weights_only=True; a pickle with code in it is refused by torch."""
    from safetensors.torch import save_file

    clip = clip_of(vm)
    state = {k: v.contiguous() for k, v in clip.state_dict().items()}
    save_file(state, str(tmp_path / "w.safetensors"))
    torch.save(state, tmp_path / "w.bin")
    for name in ("w.safetensors", "w.bin"):
        loaded = small(seed=5, checkpoint=str(tmp_path / name))  # another seed: only the file can make them equal
        assert loaded.source == "file"
        for key, value in clip_of(loaded).state_dict().items():
            assert torch.equal(value, state[key]), key
        r = vizapp.analyze(loaded, random_image(9), prompts=PROMPTS)
        np.testing.assert_allclose(r.probs, vizapp.analyze(vm, random_image(9), prompts=PROMPTS).probs, atol=1e-6)

    class Evil:
        def __reduce__(self):
            return (print, ("unpickled",))

    torch.save({"x": Evil()}, tmp_path / "evil.bin")
    with pytest.raises(ModelLoadError):
        small(checkpoint=str(tmp_path / "evil.bin"))
    with pytest.raises(BadParameterError, match="disabled"):
        vizapp.load_model(
            "open_clip:ViT-B-32", pretrained=False, allow_files=False, checkpoint=str(tmp_path / "w.safetensors")
        )
    with pytest.raises(BadParameterError, match="safetensors"):
        small(checkpoint=str(tmp_path / "w.txt"))


def test_ids_are_checked_before_anything_loads(monkeypatch):
    with pytest.raises(BadParameterError, match="unknown OpenCLIP model"):
        vizapp.load_model("open_clip:ViT-B-33", pretrained=False)
    with pytest.raises(BadParameterError, match="not a pretrained tag"):
        vizapp.load_model("open_clip:ViT-B-32/nope")
    with pytest.raises(BadParameterError, match="names no pretrained weights") as err:
        vizapp.load_model("open_clip:ViT-B-32")
    assert "the Random weights box in the app" in str(err.value)  # the page's way, beside the API's
    from vizapp.models import openclip

    monkeypatch.setattr(openclip, "hub_reachable", lambda *a, **k: False)
    monkeypatch.setattr(openclip, "cached_hub_file", lambda *a, **k: None)
    with pytest.raises(ModelLoadError, match="network is unreachable"):
        vizapp.load_model("open_clip:ViT-B-32/laion2b_s34b_b79k", device="cpu")
    assert not vizapp.models.weights_available_offline("open_clip:ViT-B-32/laion2b_s34b_b79k")


def test_dataset_mode_equals_the_mean_of_each_images_analysis(vm, tmp_path):
    """collect_stats (dataset mode: batched, label-free) over OpenCLIP's tower: the mean of the per-image analyses."""
    from vizapp.stats import collect_stats

    paths = []
    for i in range(3):
        paths.append(str(tmp_path / f"{i}.png"))
        random_image(20 + i, size=(64, 64)).save(paths[-1])
    stats = collect_stats(vm, paths, batch_size=2)
    assert stats.n_images == 3 and stats.mean_distance.shape == (2, 4)
    each = np.mean([vizapp.analyze(vm, p).mean_distance for p in paths], axis=0)
    np.testing.assert_allclose(stats.mean_distance, each, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("bias", [None, -2.0], ids=["softmax", "sigmoid"])
def test_head_importance_scores_the_chosen_prompt(bias):
    """Exact head importance of a prompt: the drop of that prompt's probability (softmax, or SigLIP-style sigmoid)
    when one head is ablated, checked by hand for one head with the capture's own ablation."""
    from vizapp.ablation import head_importance

    vm = small(2) if bias is None else small(2, init_logit_bias=bias)
    r = vizapp.analyze(vm, random_image(11), prompts=PROMPTS)
    prompted = r.model_ref()
    res = head_importance(prompted, r.input, class_idx="a red car", method="exact")
    assert res.class_idx == 2 and res.drop.shape == (2, 4)
    probs = (lambda t: t.sigmoid()) if bias is not None else (lambda t: t.softmax(-1))
    with torch.no_grad():
        clean = probs(prompted.logits(r.input))[0, 2]
        mask = torch.tensor([False, True, False, False])
        with AttentionCapture(prompted.model, ablate={1: mask}):
            ablated = probs(prompted.logits(r.input))[0, 2]
    assert float(res.drop[1, 1]) == pytest.approx(float(clean - ablated), abs=1e-5)
    grad = head_importance(prompted, r.input, class_idx=2, method="gradient")  # the estimate runs on prompts too
    assert grad.drop.shape == (2, 4) and torch.isfinite(grad.drop).all()


def test_open_clips_own_attention_class_is_captured_exactly():
    """A tower of CustomResidualAttentionBlocks (OpenCLIP's own Attention, here with q/k layer norms): the capture
    equals softmax(q kᵀ · scale) of the q and k its own ``ln_q``/``ln_k`` hand on (its ``use_fsdpa=False`` branch
    cannot serve as the reference: it calls ``bmm`` on [B, H, N, d] tensors and raises)."""
    torch.manual_seed(3)
    vision = dict(SMALL["vision_cfg"], qk_norm=True)
    vm = vizapp.load_model("open_clip:ViT-B-32", pretrained=False, device="cpu", **dict(SMALL, vision_cfg=vision))
    assert type(vm.model.transformer.resblocks[0]).__name__ == "CustomResidualAttentionBlock"
    x = vm.transform(random_image(12))[None]
    ref = copy.deepcopy(vm.model)
    qs, ks = [], []
    for blk in ref.transformer.resblocks:
        blk.attn.ln_q.register_forward_hook(lambda m, args, out: qs.append(out.detach().clone()))
        blk.attn.ln_k.register_forward_hook(lambda m, args, out: ks.append(out.detach().clone()))
    with torch.no_grad():
        expected = ref(x)
        with AttentionCapture(vm.model) as cap:
            got = vm.logits(x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert len(qs) == len(ks) == 2
    for layer, (q, k) in enumerate(zip(qs, ks, strict=True)):
        a = torch.softmax(q @ k.transpose(-2, -1) * ref.transformer.resblocks[layer].attn.scale, dim=-1)
        torch.testing.assert_close(cap.attention(layer), a, atol=1e-5, rtol=0)
    r = vizapp.analyze(vm, random_image(12), prompts=PROMPTS)
    assert r.relevance(class_idx=1).shape == (4, 4)


def test_scaled_cosine_attention_is_refused_in_one_sentence():
    from vizapp.errors import UnsupportedModelError

    vision = dict(SMALL["vision_cfg"], scaled_cosine_attn=True)
    with pytest.raises(UnsupportedModelError, match="scaled-cosine attention"):
        vizapp.load_model("open_clip:ViT-B-32", pretrained=False, device="cpu", **dict(SMALL, vision_cfg=vision))


def test_other_towers_and_oversized_models_are_refused_before_building(monkeypatch):
    from vizapp import budget
    from vizapp.errors import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match="a timm model"):
        vizapp.load_model("open_clip:ViT-B-16-SigLIP", pretrained=False, device="cpu")
    with pytest.raises(UnsupportedModelError, match="a ResNet"):
        vizapp.load_model("open_clip:RN50", pretrained=False, device="cpu")
    monkeypatch.setattr(budget, "BUDGET", budget.Budget(max_params=1_000_000))
    with pytest.raises(ModelLoadError, match="parameters"):  # the small tower and its 49408-token text embedding
        # (an argument no other test uses: a cached model would be returned without loading)
        vizapp.load_model("open_clip:ViT-B-32", pretrained=False, device="cpu", init_logit_scale=1.0, **SMALL)
