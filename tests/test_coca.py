"""OpenCLIP's CoCa: its vision tower (OpenCLIP's VisionTransformer pooled by an attentional pooler) captured exactly,
its prompts scored as OpenCLIP's own pipeline scores them, and LeGrad through the pooler's attention (the authors'
``compute_legrad_coca``, WalBouss/LeGrad ``legrad/wrapper.py``) against a reference written here on OpenCLIP's own
modules and hooks, and a case worked out by hand.

Random-weight models only, built small through OpenCLIP's own config overrides (a ``vision_cfg`` override replaces
the whole config, so CoCa's pooler options are given again); the BPE vocabulary ships with the package.
"""

from __future__ import annotations

import copy
import json
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from appdriver import AppDriver, assert_clean, assert_prompts_ranked, heatmap_z, plot_of
from conftest import random_image, start_app
from PIL import Image
from test_legrad_pool import attention_gradient, block_outputs
from test_openclip import explicit_attention
from test_ui_events import EXAMPLES, _every_event

import vizapp
from vizapp import models, views
from vizapp.capture import AttentionCapture
from vizapp.errors import UnsupportedModelError
from vizapp.models.pooling import PooledReadout

open_clip = pytest.importorskip("open_clip", reason="open_clip_torch is installed by requirements.txt")

ARCH = "coca_ViT-B-32"
VISION = dict(
    image_size=64,
    layers=2,
    width=64,
    patch_size=16,
    head_width=16,
    attentional_pool=True,
    attn_pooler_heads=4,
    attn_pooler_queries=8,
    output_tokens=True,
)
TEXT = dict(context_length=16, vocab_size=49408, width=32, heads=2, layers=1, embed_cls=True, output_tokens=True)
MULTIMODAL = dict(context_length=16, vocab_size=49408, width=32, heads=2, layers=1, attn_pooler_heads=2)
SMALL = dict(embed_dim=32, vision_cfg=VISION, text_cfg=TEXT, multimodal_cfg=MULTIMODAL)
#: OpenCLIP's "parallel" pooling: a one-query contrastive pooler beside the captioning one (the widths must agree)
PARALLEL = dict(SMALL, vision_cfg=dict(VISION, width=32, attentional_pool="parallel"))
PROMPTS = ["a photo of a dog", "a photo of a cat", "a red car"]


def coca(seed: int = 0, **cfg) -> vizapp.VizModel:
    torch.manual_seed(seed)
    return vizapp.load_model(f"open_clip:{ARCH}", pretrained=False, device="cpu", **(cfg or SMALL))


@pytest.fixture(scope="module")
def vm():
    return coca()


def whole(vm: vizapp.VizModel) -> torch.nn.Module:
    return vm.text_tower.modules[0]


def tokenize(prompts: list[str]) -> torch.Tensor:
    return open_clip.get_tokenizer(ARCH, context_length=16)(prompts)


def own_probabilities(vm: vizapp.VizModel, x: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """OpenCLIP's own pipeline: CoCa's encode_image and encode_text (normalised), softmax of exp(t) · cos."""
    model = whole(vm)
    with torch.no_grad():
        image = model.encode_image(x, normalize=True)
        image = image[:, 0] if image.dim() == 3 else image  # the parallel pooler's [B, 1, E]
        text = model.encode_text(tokenize(prompts), normalize=True)
        return torch.softmax(model.logit_scale.exp() * image @ text.T, dim=-1)


def test_coca_loads_as_an_open_clip_tower_read_through_its_pooler(vm):
    model = whole(vm)
    assert type(model).__name__ == "CoCa" and vm.model is model.visual and vm.family == "open_clip"
    assert (vm.readout, vm.num_prefix_tokens, vm.num_layers, vm.num_heads) == ("tokens", 1, 2, 4)
    assert (vm.grid_size, vm.input_size) == ((4, 4), (3, 64, 64))
    assert isinstance(vm.text_tower.embed_from_tokens, PooledReadout)
    x = torch.stack([vm.transform(random_image(s)) for s in (1, 2)])
    with torch.no_grad():  # the tower returns (embedding, captioning tokens): vizapp's output is the embedding
        embedding, tokens = vm.model(x)
        torch.testing.assert_close(vm.logits(x), embedding, atol=0, rtol=0)
    assert embedding.shape == (2, 32) and tokens.shape == (2, 7, 32)  # 8 queries: the first is the embedding


def test_the_tokenizer_is_open_clips_own_and_offline(vm, monkeypatch):
    """CoCa's text tower appends its CLS token: the tokenizer gives its context length (16), not 17; no network."""
    import socket

    def refuse(*a, **k):
        raise OSError("no network in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    tokens = tokenize(PROMPTS)
    assert tokens.shape == (3, 16) and whole(vm).text.num_pos == 17
    ours = vm.text_tower.encode_text(PROMPTS)
    with torch.no_grad():
        torch.testing.assert_close(ours, whole(vm).encode_text(tokens), atol=0, rtol=0)


class Sink:  # a consumer: the capture then forms each layer's attention inline
    def chunk(self, *a):
        pass

    def layer_done(self, layer):
        pass


def test_capture_equals_the_attention_of_open_clips_own_modules(vm):
    """Every block's attention as its nn.MultiheadAttention gives it (need_weights), and the pooler's own
    nn.MultiheadAttention left alone (two layers captured, not three)."""
    x = torch.stack([vm.transform(random_image(s)) for s in (3, 4)])
    with torch.no_grad():
        ref = explicit_attention(vm.model, x)
        plain = vm.logits(x)
        with AttentionCapture(vm.model, on_attention=Sink()) as cap:
            captured = vm.logits(x)
    assert cap.inline_layers == {0, 1} and not cap.unexact_layers and len(cap.maps) == 2
    torch.testing.assert_close(captured, plain, atol=1e-5, rtol=1e-4)
    for layer, a in enumerate(ref):
        assert cap.attention(layer).shape == (2, 4, 17, 17)
        torch.testing.assert_close(cap.attention(layer), a, atol=1e-5, rtol=0)
    r = vizapp.analyze(vm, random_image(3))  # without prompts: the views of the embedding
    assert r.probs is None and r.top_k == [] and r.rollout().shape == (4, 4)
    torch.testing.assert_close(r.attention_layer(0).float(), cap.attention(0)[0], atol=1e-5, rtol=0)


def test_prompt_probabilities_equal_open_clips_own_pipeline(vm):
    img = random_image(5)
    r = vizapp.analyze(vm, img, prompts=PROMPTS)
    expected = own_probabilities(vm, vm.transform(img)[None], PROMPTS)[0].numpy()
    diff = float(np.abs(r.probs - expected).max())
    print(f"CoCa prompt probabilities vs OpenCLIP's own: max abs diff {diff:.1e}")
    assert diff < 1e-5 and r.labels == tuple(PROMPTS)
    order = np.argsort(-expected, kind="stable")
    assert [p for p, _ in r.top_k] == [PROMPTS[i] for i in order]
    np.testing.assert_allclose(r.lens_probs[-1], r.probs, atol=1e-6)  # the logit lens through the pooler
    assert r.relevance(class_idx=1).shape == (4, 4) and r.grad_rollout(class_idx=2).shape == (4, 4)
    assert views.available_methods(r) == ["rollout", "attention", "flow", "grad_rollout", "relevance", "legrad"]


def test_the_readout_is_open_clips_pooling_and_its_first_query_attention(vm):
    """A block's tokens through the readout: the last block's is the tower's embedding; its attention is the first
    row of the pooler's own nn.MultiheadAttention weights (need_weights), over the CLS token and the patches."""
    x = torch.stack([vm.transform(random_image(s)) for s in (6, 7)])
    readout = vm.text_tower.embed_from_tokens
    pool = vm.model.attn_pool
    with torch.no_grad():
        outs = block_outputs(vm.model.transformer.resblocks, lambda: vm.model(x))
        embedding, attn = readout.with_attention(outs[-1])
        torch.testing.assert_close(embedding, whole(vm).encode_image(x, normalize=False), atol=1e-5, rtol=0)
        for z in outs:
            kv = pool.ln_k(z)
            queries = pool.ln_q(pool.query).unsqueeze(0).expand(2, -1, -1)
            own = pool.attn(queries, kv, kv, need_weights=True, average_attn_weights=False)[1]  # [B, H, 8, 17]
            _, attn = readout.with_attention(z)
            assert attn.shape == (2, 4, 1, 17) and readout.key_prefix == 1
            torch.testing.assert_close(attn, own[:, :, :1], atol=1e-6, rtol=0)


def reference(vm, x: torch.Tensor, text: torch.Tensor, cls: list[int], start: int = 0, authors: bool = False):
    """LeGrad through CoCa's pooler, on a copy of OpenCLIP's own tower: per block l from ``start``, its output (a
    hook) through the tower's own ``_pool`` and ``proj``; s_l the prompt's logit exp(t) · cos. ∂s_l/∂A^pool_l from
    autograd's gradient on the pooler's nn.MultiheadAttention output (a hook) mapped back through out_proj, and its
    values from the module's own weights. The authors' steps: ReLU, the mean over heads, the first query's row, the
    CLS column dropped, summed over layers, min-max per image. ``authors``: their image embedding and score instead
    (``attn_pool(z)[:, 0] @ proj`` without ``ln_post``, its dot product with the unit text embedding)."""
    visual = copy.deepcopy(vm.model)
    pool = visual.attn_pool_contrastive if visual.attn_pool_contrastive is not None else visual.attn_pool
    mha = pool.attn
    seen: dict[str, torch.Tensor] = {}
    mha.register_forward_hook(lambda m, a, out: seen.update(y=out[0], value=a[2]))
    outs = block_outputs(visual.transformer.resblocks, lambda: visual(x))
    w_v = mha.in_proj_weight.chunk(3)[2] if mha._qkv_same_embed_dim else mha.v_proj_weight
    scale = whole(vm).logit_scale.exp()
    rows = torch.arange(x.shape[0])
    total = 0
    for z in outs[start:]:
        if authors:
            s = (pool(z.detach())[:, 0] @ visual.proj) @ text.T
        else:
            pooled, _ = visual._pool(z.detach())
            e = (pooled[:, 0] if pooled.dim() == 3 else pooled) @ visual.proj
            s = scale * F.normalize(e, dim=-1) @ text.T
        (gy,) = torch.autograd.grad(s[rows, torch.tensor(cls)].sum(), seen["y"])  # [B, Q, E]
        v = seen["value"] @ w_v.T + mha.in_proj_bias.chunk(3)[2]
        g = attention_gradient(gy @ mha.out_proj.weight, v, mha.num_heads)  # [B, H, Q, M]
        assert torch.equal(g[:, :, 1:], torch.zeros_like(g[:, :, 1:]))  # the captioning queries: no gradient
        total = total + torch.relu(g).mean(dim=1)[:, 0, 1:]
    scaled = torch.stack([(e - e.min()) / (e.max() - e.min()) for e in total.detach()])
    return scaled.reshape(-1, *vm.grid_size)


def text_embeddings(prompts: list[str], vm) -> torch.Tensor:
    with torch.no_grad():
        return whole(vm).encode_text(tokenize(prompts), normalize=True)


@pytest.mark.parametrize("start", [0, 1])
def test_legrad_equals_the_authors_definition(vm, start):
    images = [random_image(8), random_image(9)]
    x = torch.stack([vm.transform(i) for i in images])
    cls = [2, 0]
    ref = reference(vm, x, text_embeddings(PROMPTS, vm), cls, start)
    found = np.asarray(vizapp.explain(vm, images, "legrad", classes=cls, prompts=PROMPTS, start_layer=start))
    diff = float(np.abs(found - ref.numpy()).max())
    print(f"CoCa LeGrad (start_layer={start}) vs the hooked reference: max abs diff {diff:.1e}")
    assert diff < 1e-5 and float(ref.std()) > 0.05
    for i, (img, c) in enumerate(zip(images, cls, strict=True)):  # one image's map is its row of the batch
        r = vizapp.analyze(vm, img, prompts=PROMPTS)
        np.testing.assert_allclose(r.explain("legrad", PROMPTS[c], start_layer=start), found[i], atol=1e-6)
    # the documented differences from the authors' code (ln_post kept, the logit scored) change the map here
    theirs = reference(vm, x, text_embeddings(PROMPTS, vm), cls, start, authors=True)
    print(
        f"... vs the authors' own score (no ln_post, unnormalised dot product): {float((theirs - ref).abs().max()):.2f}"
    )
    assert float((theirs - ref).abs().max()) > 0.01


def test_legrad_takes_the_pooler_not_the_blocks_self_attention(vm):
    from vizapp.analysis.legrad import legrad

    r = vizapp.analyze(vm, random_image(10), prompts=PROMPTS)
    prompted = r.model_ref()
    own, _ = legrad(prompted.model, prompted.logits, prompted.lens_fn, r.input, [1], 1, vm.grid_size)
    assert float(np.abs(r.explain("legrad", 1) - own[0].numpy()).max()) > 0.1


def test_by_hand_values_alike_at_every_token_give_an_empty_map():
    """With the pooler's values equal at every token (its separate value projection zero, a bias): A v is linear in
    A, so ∂s/∂A[h, q, m] = ⟨∂s/∂(A v)[h, q], v[h]⟩, the same for every token m; every layer's row is constant, and
    the map of any prompt is zero everywhere (with the weights as loaded, it is not)."""
    vm = coca(3)
    mha = vm.model.attn_pool.attn
    assert not mha._qkv_same_embed_dim  # width 64, embedding 32: q, k and v projected apart
    img = random_image(11)
    before = vizapp.analyze(vm, img, prompts=PROMPTS).explain("legrad", 0)
    assert float(before.max()) == 1.0
    with torch.no_grad():
        mha.v_proj_weight.zero_()
        mha.in_proj_bias[64:] = torch.linspace(-1, 1, 32)
    after = vizapp.explain(vm, [img], "legrad", classes=[0], prompts=PROMPTS)
    assert np.array_equal(np.asarray(after), np.zeros((1, 4, 4)))


def test_parallel_pooling_is_read_through_its_contrastive_pooler():
    """OpenCLIP's "parallel" pooling: ln_post on the tokens, then a one-query contrastive pooler; the prompts and
    LeGrad through it, against OpenCLIP's own pipeline and the hooked reference."""
    vm = coca(4, **PARALLEL)
    assert vm.model.attn_pool_type == "parallel"
    images = [random_image(12), random_image(13)]
    x = torch.stack([vm.transform(i) for i in images])
    r = vizapp.analyze(vm, images[0], prompts=PROMPTS)
    np.testing.assert_allclose(r.probs, own_probabilities(vm, x[:1], PROMPTS)[0].numpy(), atol=1e-5)
    np.testing.assert_allclose(r.lens_probs[-1], r.probs, atol=1e-6)
    ref = reference(vm, x, text_embeddings(PROMPTS, vm), [1, 2])
    found = np.asarray(vizapp.explain(vm, images, "legrad", classes=[1, 2], prompts=PROMPTS))
    assert float(np.abs(found - ref.numpy()).max()) < 1e-5 and float(ref.std()) > 0.05


def test_poolers_vizapp_cannot_read_are_refused_in_one_sentence():
    with pytest.raises(UnsupportedModelError, match="'cascade' attentional pooling makes the image embedding from"):
        coca(0, **dict(SMALL, vision_cfg=dict(VISION, attentional_pool="cascade")))
    with pytest.raises(UnsupportedModelError, match="'parallel' attentional pooling needs the tower's width equal"):
        coca(0, **dict(SMALL, vision_cfg=dict(VISION, attentional_pool="parallel")))


def test_the_parameter_count_includes_the_text_decoder(monkeypatch):
    """The limit is checked before building, on CoCa itself (its multimodal text decoder counted), not on CLIP."""
    from vizapp import budget
    from vizapp.errors import ModelLoadError

    cfg = dict(SMALL, init_logit_scale=1.0)  # an argument no other test uses: a cached model is not returned
    built = open_clip.create_model(ARCH, **cfg)
    n = sum(t.numel() for t in (*built.parameters(), *built.buffers()))
    assert n > sum(t.numel() for t in built.visual.parameters()) + sum(t.numel() for t in built.text.parameters())
    monkeypatch.setattr(budget, "BUDGET", budget.Budget(max_params=n - 1))
    with pytest.raises(ModelLoadError, match="parameters"):
        coca(0, **cfg)
    monkeypatch.setattr(budget, "BUDGET", budget.Budget(max_params=n))
    assert coca(0, **cfg).num_layers == 2


def test_head_importance_and_dataset_mode_run_on_coca(vm, tmp_path):
    """Exact head importance of a prompt (one head checked by hand with the capture's own ablation), the
    faithfulness curves' unchanged image, and dataset mode (the mean of each image's analysis)."""
    from vizapp.ablation import head_importance
    from vizapp.stats import collect_stats

    r = vizapp.analyze(vm, random_image(14), prompts=PROMPTS)
    prompted = r.model_ref()
    res = head_importance(prompted, r.input, class_idx="a red car", method="exact")
    with torch.no_grad():
        clean = prompted.logits(r.input).softmax(-1)[0, 2]
        with AttentionCapture(prompted.model, ablate={0: torch.tensor([False, False, True, False])}):
            ablated = prompted.logits(r.input).softmax(-1)[0, 2]
    assert res.drop.shape == (2, 4) and float(res.drop[0, 2]) == pytest.approx(float(clean - ablated), abs=1e-5)
    curves = r.faithfulness({"legrad": r.explain("legrad", 2)}, class_idx=2, steps=2, random_seed=None)
    assert float(curves["legrad"]["deletion"].probs[0]) == pytest.approx(float(r.probs[2]), abs=1e-5)
    paths = []
    for i in range(3):
        paths.append(str(tmp_path / f"{i}.png"))
        random_image(30 + i, size=(64, 64)).save(paths[-1])
    stats = collect_stats(vm, paths, batch_size=2)
    each = np.mean([vizapp.analyze(vm, p).mean_distance for p in paths], axis=0)
    np.testing.assert_allclose(stats.mean_distance, each, rtol=1e-4, atol=1e-3)


def test_the_app_offers_coca_by_a_valid_open_clip_id_and_tag():
    from vizapp.models.openclip import check_name, parse_name
    from vizapp.ui.startup import CURATED_BY_LIBRARY

    ids = [name for name, _ in CURATED_BY_LIBRARY["open_clip"]]
    assert any(parse_name(name)[0].startswith("coca_") for name in ids)
    for name in ids:
        check_name(name)  # an unknown architecture or tag raises


# -- through the app's server ---------------------------------------------------------------------------------------

#: coca_ViT-B-32's config as OpenCLIP ships it (model_configs/coca_ViT-B-32.json), every tower made tiny and its
#: layout kept: the attentional pooler, the text tower's CLS token, the multimodal decoder and custom_text (CoCa).
#: 4 heads of width 16: the every-event test's click on the distance plot opens head 2 of layer 1
TINY = "coca_tiny_test"
TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": dict(VISION, image_size=32, patch_size=8, attn_pooler_heads=2),
    "text_cfg": TEXT,
    "multimodal_cfg": MULTIMODAL,
    "custom_text": True,
}
TINY_ID = f"open_clip:{TINY}"


@pytest.fixture(scope="module")
def tiny_coca_app(tmp_path_factory):
    """The whole app (started on the bundled model) with a tiny CoCa registered in OpenCLIP as its own configs are
    (a config file through ``open_clip.add_model_config``), and a model cache of this module's own; both undone
    afterwards, so no other test sees the name or the model."""
    from open_clip import factory

    path = tmp_path_factory.mktemp("coca") / f"{TINY}.json"
    path.write_text(json.dumps(TINY_CONFIG))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(models, "MODEL_CACHE", models.BudgetedModelCache(3))
        open_clip.add_model_config(path)
        demo = start_app(models.BUNDLED)
        try:
            yield demo.local_url
        finally:
            demo.close()
            factory._MODEL_CONFIG_PATHS.remove(path)
            factory._MODEL_CONFIGS.pop(TINY)
    assert TINY not in open_clip.list_models()


def pick_tiny_coca(d: AppDriver) -> None:
    """What a person does: tick Random weights (the architecture names no pretrained tag) and type the id in the
    Model box; the model loads for the Position tab and shows the prompts box."""
    assert_clean(d.load(), "page load")
    assert d.props[d.by_elem_id("vizapp-prompts")]["visible"] is False  # the bundled model has no text tower
    assert_clean(d.set(d.by_label("Random weights", "checkbox"), True), "random weights")
    assert_clean(d.set(d.by_label("Model", "dropdown"), TINY_ID), "type the CoCa id")
    assert d.props[d.by_elem_id("vizapp-prompts")]["visible"] is True
    assert "could not be shown" not in d.values[d.by_elem_id("vizapp-pos-note")]


@pytest.mark.timeout(900)
def test_every_event_runs_through_the_server_on_a_tiny_coca_typed_in_the_model_box(
    tiny_coca_app, capfd, caplog, tmp_path
):
    caplog.set_level(logging.WARNING)
    d = AppDriver(tiny_coca_app)
    pick_tiny_coca(d)
    d.set(d.by_elem_id("vizapp-prompts"), "\n".join(PROMPTS), fire_change=False)
    photo, other = tmp_path / "a.png", tmp_path / "b.png"
    Image.open(EXAMPLES / "chelsea.png").save(photo)
    Image.open(EXAMPLES / "coffee.png").save(other)
    _every_event(d, photo, other)
    assert "open_clip:coca_tiny_test" in d.values[d.by_elem_id("vizapp-status")]  # the CoCa ran, not the bundled
    assert {c["label"] for c in d.values[d.by_label("Top-5", "label")]["confidences"]} == set(PROMPTS)
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]


def test_coca_prompts_are_ranked_and_the_chosen_one_explained_through_the_server(tiny_coca_app):
    """The prompts box's prompts are the Prediction tab's ranking, equal to vizapp.analyze with those prompts on the
    same (cached) model; Rollout's LeGrad (through the pooler) and relevance maps of a chosen prompt equal the API's."""
    d = AppDriver(tiny_coca_app)
    pick_tiny_coca(d)
    d.set(d.by_elem_id("vizapp-prompts"), "\n".join(PROMPTS) + "\n\n", fire_change=False)
    image = EXAMPLES / "chelsea.png"
    assert_clean(d.analyze(image), "analyze with prompts")
    vm = vizapp.load_model(TINY_ID, pretrained=False)  # the app's own: the cache's object, its random weights
    assert type(whole(vm)).__name__ == "CoCa" and vm.model.attn_pool is not None
    assert (vm.grid_size, vm.num_layers, vm.num_heads) == ((4, 4), 2, 4)
    r = vizapp.analyze(vm, Image.open(image), prompts=PROMPTS)
    choice = assert_prompts_ranked(d, r)
    chosen = r.top_k[-1][0]  # the least probable: not the default choice
    k = PROMPTS.index(chosen)
    assert_clean(d.set(choice, chosen), "choose a prompt")
    for method in ("legrad", "relevance"):
        assert_clean(d.set(d.by_label("Method", "dropdown"), method), method)
        fig = plot_of(d, "vizapp-rollout-plot")
        assert chosen in fig["layout"]["title"]["text"].replace("<br>", " ")
        z = heatmap_z(next(t for t in fig["data"] if t["type"] == "heatmap"))
        m = r.explain(method, class_idx=k)  # the view shows it scaled to [0, 1]
        np.testing.assert_allclose(z, (m - m.min()) / (m.max() - m.min()), atol=1e-5, err_msg=method)
        assert not np.allclose(m, r.explain(method, class_idx=(k + 1) % 3))  # another prompt: another map
