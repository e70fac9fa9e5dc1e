"""Every event the app wires, through gradio's real server, queue and postprocessing (tests/appdriver.py plays the
page): on the bundled model and on a model without a CLS token. An event fails the test by erring, by a warning, by a
traceback or error in the server's log, or by leaving an output of the previous image up after a new one."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from appdriver import AppDriver, assert_clean, assert_prompts_ranked, heatmap_z, plot_of, shipped
from conftest import start_app, write_card_model
from PIL import Image

from vizapp import models

EXAMPLES = models.ASSETS_DIR / "examples"
SNEAKER, TROUSER = EXAMPLES / "fmnist_7_sneaker.png", EXAMPLES / "fmnist_1_trouser.png"


@pytest.fixture(scope="module")
def bundled_app():
    demo = start_app(models.BUNDLED)
    yield demo.local_url
    demo.close()


@pytest.fixture(scope="module")
def no_cls_app(tmp_path_factory):
    """A small card model with no CLS token: 4 registers and a mean-pooled head (timm's reg/gap layout)."""
    path = write_card_model(
        tmp_path_factory.mktemp("nocls"), "nocls", depth=2, class_token=False, global_pool="avg", reg_tokens=4
    )
    demo = start_app(path)
    yield demo.local_url
    demo.close()


def _state_readers(d: AppDriver) -> list[int]:
    state = [cid for cid in d.components if d.kind(cid) == "state"]
    return [i for i in d.backend_events() if set(d.deps[i]["inputs"]) & set(state)]


def _shown_per_image(d: AppDriver) -> set[int]:
    """Components that show something computed from the analysis: outputs of events that read the state, which are
    not themselves inputs of any event (controls) nor layout (tabs)."""
    inputs = {cid for i in d.backend_events() for cid in d.deps[i]["inputs"]}
    outs = {cid for i in _state_readers(d) for cid in d.deps[i]["outputs"]}
    return {cid for cid in outs - inputs if d.kind(cid) not in ("state", "tabs")}


def _prepare(d: AppDriver, index: int, second: dict) -> object:
    """Put in the page what a person would have done before event ``index`` fires; returns its event data."""
    dep = d.deps[index]
    target = dep["targets"][0][0]
    elem = d.components.get(target, {}).get("props", {}).get("elem_id") if target is not None else None
    payloads = {
        "vizapp-distance-click": [1, 2, 30.0],
        "vizapp-importance-click": [1, 0],
        "vizapp-pos-click": [2, 3, 0, 0],
    }
    if elem in payloads:
        d.values[target] = json.dumps({"customdata": payloads[elem], "t": index})
    if target is not None and d.kind(target) == "dataset":
        d.values[target] = 0
    if d.by_label("Second image", "image") in dep["inputs"]:
        d.values[d.by_label("Second image", "image")] = second
    if dep["targets"][0][1] == "select":
        return {"index": [40, 90], "value": None, "selected": True}
    return None


def _every_event(d: AppDriver, photo: Path, other: Path) -> None:
    fired = d.analyze(photo)
    assert_clean(fired, "analyze")
    second = d.upload(other)
    unload = [i for i in d.backend_events() if any(t[1] == "unload" for t in d.deps[i]["targets"])]
    assert unload, "the app frees a session's results on unload"
    for i in d.backend_events():
        if i in unload:
            continue  # the session's end: last, below
        fired = d.fire(i, _prepare(d, i, second))
        assert_clean(fired, f"event {i} ({d.deps[i]['targets']}, {d.deps[i].get('api_name')})")

    # A new image: everything shown from the last one is redrawn or cleared by Analyze and what it sets off.
    shown = _shown_per_image(d)
    assert shown, "no per-image outputs found"
    fired = d.analyze(other)
    assert_clean(fired, "analyze a second image")
    stale = sorted(d.components[cid]["props"].get("label") or cid for cid in shown - d.written)
    assert not stale, f"left from the previous image: {stale}"
    for i in _state_readers(d):  # every control still fits (a class of the old image would be refused here)
        assert_clean(d.fire(i, _prepare(d, i, second)), f"event {i} after a new image")

    # The session's end (gradio fires unload when the page's connection drops; tests/test_store.py checks what it
    # frees and what the page says afterwards).
    for i in unload:
        assert_clean(d.fire(i), "unload")
    ran = {f.index for f in d.log}
    assert set(d.backend_events()) <= ran  # enumerated from the served config, every one ran


@pytest.mark.timeout(900)
def test_every_event_runs_through_the_server_on_the_bundled_model(bundled_app, capfd, caplog):
    caplog.set_level(logging.WARNING)
    d = AppDriver(bundled_app)
    assert_clean(d.load(), "page load")  # the page's own load event
    _every_event(d, SNEAKER, TROUSER)
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]


@pytest.mark.timeout(900)
def test_every_event_runs_through_the_server_on_a_model_without_cls(no_cls_app, capfd, caplog, tmp_path):
    caplog.set_level(logging.WARNING)
    d = AppDriver(no_cls_app)
    photo, other = tmp_path / "a.png", tmp_path / "b.png"
    Image.open(SNEAKER).save(photo)
    Image.open(TROUSER).save(other)
    fired = d.analyze(photo)
    assert_clean(fired, "analyze")
    method = d.by_label("Method", "dropdown")
    offered = [c[1] for c in d.props[method]["choices"]]
    assert "attention" not in offered and "rollout" in offered  # the CLS map is not offered
    assert "no CLS token" in d.values[d.by_elem_id("vizapp-methods-note")]
    _every_event(d, photo, other)
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]


def test_the_items_that_always_failed(bundled_app, tmp_path):
    """Issue 26's six: PCA across examples, the features export, the class of a new image in Compare, stale figures,
    the PCA threshold at its maximum, and curve steps beyond the patches."""
    d = AppDriver(bundled_app)
    assert_clean(d.analyze(SNEAKER), "analyze")
    # 1. PCA across examples draws one image per example plus the upload.
    assert_clean(d.click(d.by_label("PCA across examples", "button")), "PCA across examples")
    gallery = plot_of(d, "vizapp-gallery-plot")
    assert len([t for t in gallery["data"] if t["type"] == "image"]) == 1 + len(list(EXAMPLES.glob("*.*[gG]")))
    # 2. The features export gives an .npz with the arrays.
    assert_clean(d.click(d.by_label("Export these arrays", "button")), "features export")
    npz = d.values[d.by_label("feature arrays", "file")]
    assert npz["path"].endswith(".npz")
    assert np.load(npz["path"])["token_norms"].shape[0] == 6
    # 3. Compare the sneaker, analyse the trouser, Compare again: the class is the new image's.
    compare = d.by_label("Compare methods", "button")
    assert_clean(d.click(compare), "compare")
    first_class = d.values[d.by_label("Class to explain (type", "dropdown")]
    assert_clean(d.analyze(TROUSER), "analyze the trouser")
    for label in ("Class to explain (type", "Class to explain (gradient", "Class scored"):
        cid = d.by_label(label, "dropdown")
        assert d.values[cid] == d.props[cid]["choices"][0][1], label  # each dropdown got its own value
    assert d.values[d.by_label("Class to explain (type", "dropdown")] != first_class
    # 4. The previous image's Compare maps, curves and exports are gone until asked again.
    for elem in ("vizapp-compare-plot", "vizapp-deletion-plot", "vizapp-insertion-plot", "vizapp-gallery-plot"):
        assert d.values[d.by_elem_id(elem)] is None, elem
    assert d.values[d.by_label("feature arrays", "file")] is None
    assert_clean(d.click(compare), "compare after a new image")
    # 5. The PCA foreground threshold at its maximum gives a map and a sentence, not an error.
    fired = d.set(d.by_label("PCA foreground threshold", "slider"), 0.95)
    assert_clean(fired, "PCA threshold 0.95")
    title = plot_of(d, "vizapp-pca-plot")["layout"]["title"]["text"]
    assert "Feature PCA" in title
    # 6. Curve steps stop at the number of patches (7 x 7), and the page offers no more.
    steps = d.by_label("Curve steps", "slider")
    assert d.props[steps]["maximum"] == 49
    assert_clean(d.set(steps, 49), "49 curve steps")
    assert_clean(d.click(compare), "compare at 49 steps")
    assert "50 images each" in d.values[d.by_elem_id("vizapp-compare-cost")]


def test_a_bad_upload_is_said_once_and_keeps_the_page(bundled_app, tmp_path):
    d = AppDriver(bundled_app)
    assert_clean(d.analyze(SNEAKER), "analyze")
    before = {cid: v for cid, v in d.values.items() if d.kind(cid) in ("plot", "label", "markdown", "image", "json")}
    before.pop(d.by_label("Image", "image"))
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    fired = d.analyze(bad)
    # One event failed, the check, which has no outputs (so no output shows an error state); nothing else ran.
    assert [(f.success, f.outputs) for f in fired] == [(False, [])]
    assert "file" in fired[0].error.lower() and d.deps[fired[0].index]["outputs"] == []
    assert {cid: d.values[cid] for cid in before} == before  # every figure, label and note kept what it showed
    # The model-load error, too, is said once: picking an unknown model says it in the Position tab's note only.
    model = d.by_label("Model", "dropdown")
    fired = d.set(model, "no_such_model_at_all")
    assert all(f.success for f in fired) and "could not be shown" in d.values[d.by_elem_id("vizapp-pos-note")]
    d.set(d.by_label("Image", "image"), d.upload(SNEAKER))
    fired = d.click(d.by_label("Analyze", "button"))
    assert [f.success for f in fired] == [False] and "unknown model" in fired[0].error


def test_model_choices_follow_the_model(no_cls_app, bundled_app):
    """The Heads tab offers no CLS query without a CLS token; the Position tab's tile sliders span the grid."""
    d = AppDriver(no_cls_app)
    assert_clean(d.analyze(SNEAKER), "analyze")
    query = d.by_label("Query", "radio")
    assert d.values[query] == "Clicked patch" and d.props[query]["interactive"] is False  # no CLS: fixed
    d2 = AppDriver(bundled_app)
    assert_clean(d2.load(), "page load")
    assert d2.props[d2.by_label("Tile row", "slider")]["maximum"] == 6  # a 7 x 7 grid
    assert d2.props[d2.by_elem_id("vizapp-pos-resolution")]["visible"] is True  # a learned table: preview offered


FMNIST_TEST = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")


@pytest.mark.skipif(not FMNIST_TEST.exists(), reason="Debian's dataset-fashion-mnist is not installed (make test does)")
def test_the_bundled_model_says_when_an_image_is_far_from_what_it_learned(bundled_app):
    import gzip

    from vizapp.models.bundled import input_distribution_note

    card = models.load_model(models.BUNDLED).card
    with gzip.open(FMNIST_TEST) as f:
        test_images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)[:1000]
    flagged = [i for i, a in enumerate(test_images) if input_distribution_note(card, Image.fromarray(a))]
    assert flagged == []  # none of 1,000 Fashion-MNIST test images
    for name in ("astronaut.png", "chelsea.png", "coffee.png", "motorcycle_left.png"):
        assert "far from what the model was trained on" in input_distribution_note(card, Image.open(EXAMPLES / name))
    # In the app: the status line says it for a photo, not for a Fashion-MNIST image, and says how it was resized.
    d = AppDriver(bundled_app)
    assert_clean(d.analyze(EXAMPLES / "astronaut.png"), "analyze a photo")
    status = d.values[d.by_elem_id("vizapp-status")]
    assert "far from what the model was trained on" in status and "as 28x28 pixels in greyscale" in status
    assert "downscaled" in status
    assert_clean(d.analyze(SNEAKER), "analyze a sneaker")
    assert "far from" not in d.values[d.by_elem_id("vizapp-status")]
    seen = d.values[d.by_label("What the model saw", "image")]
    assert seen and seen.get("url")  # the preprocessed input is shown


def test_colour_map_and_every_figure_in_one_download(bundled_app):
    import zipfile

    d = AppDriver(bundled_app)
    assert_clean(d.analyze(SNEAKER), "analyze")
    assert_clean(d.set(d.by_label("Colour map", "dropdown"), "Viridis"), "colour map")
    rollout, heads = plot_of(d, "vizapp-rollout-plot"), plot_of(d, "vizapp-heads-plot")
    for fig in (rollout, heads):
        heat = [t for t in fig["data"] if t["type"] == "heatmap"][0]
        assert heat["colorscale"][-1][1].lower() == "#fde725"  # Viridis' last colour (Inferno's is #fcffa4)
    assert_clean(d.click(d.by_label("Download every figure", "button")), "download figures")
    path = d.values[d.by_label("figures (.zip)", "file")]["path"]
    names = zipfile.ZipFile(path).namelist()
    for tab in ("rollout-", "heads-", "distance-", "position-", "features-"):
        assert any(n.startswith(tab) for n in names), (tab, names)
    assert "plotly.min.js" in names and "rollout-attention.html" in names  # the CLS map, offered for this model
    page = zipfile.ZipFile(path).read("rollout-rollout.html").decode()
    assert 'src="plotly.min.js"' in page and "#fde725" in page.lower()  # offline, in the chosen colours
    assert f"{len(names) - 1} figures" in d.values[d.by_elem_id("vizapp-figures-note")]


def test_random_weights_make_any_timm_entry_usable_offline(bundled_app, monkeypatch):
    """Random weights build the architecture with no download, and the status line says the maps mean structure only;
    a transformers entry says why it cannot (its config is on the hub)."""
    from vizapp.ui import handlers

    monkeypatch.setattr(models, "hub_reachable", lambda *a, **k: False)
    d = AppDriver(bundled_app)
    d.set(d.by_label("Random weights", "checkbox"), True)
    d.values[d.by_label("Model", "dropdown")] = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    assert_clean(d.analyze(SNEAKER), "analyze a random-weight ViT-Ti")
    status = d.values[d.by_elem_id("vizapp-status")]
    assert "random weights" in status and "structure, not learned behaviour" in status
    assert "12 layers x 3 heads" in status and "14x14 patches of 16x16 px" in status

    def offline(name, **kwargs):  # what load_model says for a transformers id with no network and no cached config
        raise models.ModelLoadError(f"cannot load {name!r}: the network is unreachable")

    monkeypatch.setattr(models, "load_model", offline)
    with pytest.raises(models.ModelLoadError, match="config.json, which is on the hub too"):
        handlers._load("hf:google/vit-base-patch16-224", None, True)


def test_clicking_an_example_analyses_it(bundled_app):
    d = AppDriver(bundled_app)
    dataset = next(cid for cid in d.components if d.kind(cid) == "dataset")
    samples = d.props[dataset]["samples"]
    index = next(i for i, s in enumerate(samples) if "fmnist_1_trouser" in json.dumps(s))
    d.values[dataset] = index
    fired = d.click(dataset)
    assert_clean(fired, "click an example")
    analyzed = [
        f for f in fired if d.deps[f.index]["outputs"] and d.by_elem_id("vizapp-status") in d.deps[f.index]["outputs"]
    ]
    assert analyzed, "the example was not analysed"
    assert d.values[d.by_label("Top-5", "label")]["label"] == "Trouser"


def test_every_class_is_reachable_from_the_class_dropdowns(bundled_app):
    d = AppDriver(bundled_app)
    assert_clean(d.analyze(SNEAKER), "analyze")
    labels = set(models.load_model(models.BUNDLED).labels)
    for label in ("Class to explain (type", "Class to explain (gradient", "Class scored", "Class to follow"):
        cid = d.by_label(label, "dropdown")
        assert {c[1] for c in d.props[cid]["choices"]} == labels, label  # all 10, not the top-5
    # a class outside the top-5 explains fine through the server
    probs = sorted(labels - {c[1] for c in d.props[d.by_label("Class to explain (type", "dropdown")]["choices"][:5]})
    assert_clean(d.set(d.by_label("Method", "dropdown"), "relevance"), "relevance")
    assert_clean(d.set(d.by_label("Class to explain (gradient", "dropdown"), probs[0]), "a class outside the top-5")
    assert probs[0] in plot_of(d, "vizapp-rollout-plot")["layout"]["title"]["text"].replace("<br>", " ")


def test_concurrency_bounds_the_model_work_of_all_events_together(monkeypatch):
    """VIZAPP_CONCURRENCY=1: two different heavy events from two visitors never run at once (gradio's limit is per
    event unless they share a concurrency group)."""
    import threading
    import time

    from vizapp.ui import handlers

    running, most, lock = [0], [0], threading.Lock()

    def slow(name):
        def run(*args, **kwargs):
            with lock:
                running[0] += 1
                most[0] = max(most[0], running[0])
            time.sleep(1.0)
            with lock:
                running[0] -= 1
            raise handlers.BadParameterError(f"{name} stopped by the test")

        return run

    monkeypatch.setenv("VIZAPP_CONCURRENCY", "1")
    monkeypatch.setattr(handlers, "compare_methods", slow("compare"))
    monkeypatch.setattr(handlers, "export_figures", slow("figures"))
    demo = start_app(models.BUNDLED)
    try:
        a, b = AppDriver(demo.local_url), AppDriver(demo.local_url)
        jobs = [
            threading.Thread(target=a.click, args=(a.by_label("Compare methods", "button"),)),
            threading.Thread(target=b.click, args=(b.by_label("Download every figure", "button"),)),
        ]
        for job in jobs:
            job.start()
        for job in jobs:
            job.join(60)
        assert [f.error for f in a.log + b.log] and most[0] == 1
    finally:
        demo.close()


def test_the_rollout_tab_draws_attnlrp_and_legrad_with_their_cost(bundled_app):
    """Both run-the-model-again methods are offered in the Method dropdown, drawn through the server with their
    label in the title, and the tab says what each costs; Compare draws them beside the others."""
    d = AppDriver(bundled_app)
    assert_clean(d.analyze(SNEAKER), "analyze")
    method = d.by_label("Method", "dropdown")
    assert {"attnlrp", "legrad"} <= {c[1] for c in d.props[method]["choices"]}
    for name, label in (("attnlrp", "AttnLRP (Achtibat et al., ICML 2024)"), ("legrad", "LeGrad (Bousselham et al.")):
        assert_clean(d.set(method, name), f"method {name}")
        assert plot_of(d, "vizapp-rollout-plot")["layout"]["title"]["text"].startswith(label)
        assert "one forward and one backward pass" in d.values[d.by_elem_id("vizapp-map-cost")]
    assert_clean(d.click(d.by_label("Compare methods", "button")), "compare")
    titles = json.dumps(plot_of(d, "vizapp-compare-plot")["layout"])
    assert "AttnLRP" in titles and "LeGrad" in titles


@pytest.fixture(scope="module")
def clip_app(tmp_path_factory):
    """A small random-weight transformers CLIP folder saved with its tokenizer (a model with a text tower)."""
    from test_prompts import save_whole

    folder = tmp_path_factory.mktemp("clip")
    save_whole(folder, "clip")
    demo = start_app(str(folder))
    yield demo.local_url, str(folder)
    demo.close()


@pytest.mark.timeout(900)
def test_every_event_runs_through_the_server_on_a_clip_model_with_prompts(clip_app, capfd, caplog, tmp_path):
    caplog.set_level(logging.WARNING)
    d = AppDriver(clip_app[0])
    assert_clean(d.load(), "page load")
    assert d.props[d.by_elem_id("vizapp-prompts")]["visible"] is True  # shown: the model has a text tower
    photo, other = tmp_path / "a.png", tmp_path / "b.png"
    Image.open(EXAMPLES / "chelsea.png").save(photo)
    Image.open(EXAMPLES / "coffee.png").save(other)
    _every_event(d, photo, other)
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]


def test_prompts_are_ranked_and_the_chosen_one_explained(clip_app, bundled_app):
    """The prompts box's prompts are the Prediction tab's ranking (equal to vizapp.analyze with those prompts), and
    Rollout explains the prompt chosen; a model without a text tower hides the box."""
    import vizapp

    url, folder = clip_app
    d = AppDriver(url)
    assert_clean(d.load(), "page load")
    prompts = ["a photo of a cat", "a cup of coffee", "a red car"]
    d.set(d.by_elem_id("vizapp-prompts"), "\n".join(prompts) + "\n\n", fire_change=False)
    assert_clean(d.analyze(EXAMPLES / "chelsea.png"), "analyze with prompts")
    r = vizapp.analyze(vizapp.load_model(folder), Image.open(EXAMPLES / "chelsea.png"), prompts=prompts)
    choice = assert_prompts_ranked(d, r)
    assert_clean(d.set(d.by_label("Method", "dropdown"), "relevance"), "relevance")
    assert_clean(d.set(choice, "a red car"), "explain a prompt")
    fig = plot_of(d, "vizapp-rollout-plot")
    assert "a red car" in fig["layout"]["title"]["text"].replace("<br>", " ")
    z = heatmap_z(next(t for t in fig["data"] if t["type"] == "heatmap"))
    m = r.relevance(class_idx=2)  # the view shows it scaled to [0, 1]
    np.testing.assert_allclose(z, (m - m.min()) / (m.max() - m.min()), atol=1e-5)
    assert not np.allclose(m, r.relevance(class_idx=0))  # another prompt would have drawn another map
    # Transformer Attribution explains the prompt too (its head read as the prompt score: vizapp.analysis.lrp)
    method = d.by_label("Method", "dropdown")
    assert "transformer_attribution" in [c[1] for c in d.props[method]["choices"]]
    assert_clean(d.set(method, "transformer_attribution"), "transformer attribution of a prompt")
    heat = next(t for t in plot_of(d, "vizapp-rollout-plot")["data"] if t["type"] == "heatmap")
    ta = r.explain("transformer_attribution", 2)
    np.testing.assert_allclose(heatmap_z(heat), (ta - ta.min()) / (ta.max() - ta.min()), atol=1e-5)
    d2 = AppDriver(bundled_app)
    assert_clean(d2.load(), "page load")
    assert d2.props[d2.by_elem_id("vizapp-prompts")]["visible"] is False


@pytest.fixture(scope="module")
def swin_app(tmp_path_factory):
    """A tiny random-weight transformers Swin folder written by save_pretrained (a windowed-attention model: a 9x9
    first grid padded to windows of 4, then 5x5; 3 heads, then 6)."""
    from test_swin import write_swin_folder

    folder = write_swin_folder(tmp_path_factory.mktemp("swin"))
    demo = start_app(folder)
    yield demo.local_url, folder
    demo.close()


def _photos(tmp_path: Path) -> tuple[Path, Path]:
    photo, other = tmp_path / "a.png", tmp_path / "b.png"
    Image.open(EXAMPLES / "chelsea.png").save(photo)
    Image.open(EXAMPLES / "coffee.png").save(other)
    return photo, other


@pytest.mark.timeout(900)
def test_every_event_runs_through_the_server_on_a_swin_model(swin_app, capfd, caplog, tmp_path):
    """Every event on a windowed model runs clean; the Rollout tab offers only the maps Swin defines and says why
    the others are not, the Heads tab offers the clicked token only, the Features tab draws its feature views per
    layer and says why it does not draw DINO masks and why it draws the logit lens for the last stage only, and its head
    importance runs (exact ablation, [L, max H] with empty cells)."""
    from vizapp.swin_result import FEATURES, UNDEFINED

    caplog.set_level(logging.WARNING)
    d = AppDriver(swin_app[0])
    assert_clean(d.load(), "page load")
    assert "relative-position bias" in plot_of(d, "vizapp-pos-plot")["layout"]["title"]["text"].replace("<br>", " ")
    photo, other = _photos(tmp_path)
    assert_clean(d.analyze(photo), "analyze")
    assert "Windowed attention (Swin)" in d.values[d.by_elem_id("vizapp-status")]
    method = d.by_label("Method", "dropdown")
    choices = [c[1] for c in d.props[method]["choices"]]
    assert choices == ["rollout", "flow", "grad_rollout", "relevance", "attnlrp", "legrad", "last_layer"]
    note = d.values[d.by_elem_id("vizapp-methods-note")]
    assert all(why in note for why in (UNDEFINED["cls"], UNDEFINED["transformer_attribution"], UNDEFINED["discard"]))
    assert "LeGrad for Swin sums the last stage's blocks only" in note
    assert "Attention flow for Swin runs on the graph its rollout multiplies along" in note
    _swin_flow(d, swin_app[1], photo)
    for name, label in (("attnlrp", "AttnLRP (input × LRP"), ("legrad", "LeGrad over the last stage's blocks")):
        assert_clean(d.set(method, name), f"method {name}")  # drawn through the server, its cost said
        assert plot_of(d, "vizapp-rollout-plot")["layout"]["title"]["text"].startswith(label)
        assert "one forward and one backward pass" in d.values[d.by_elem_id("vizapp-map-cost")]
    assert_clean(d.click(d.by_label("Compare methods", "button")), "compare")
    titles = json.dumps(plot_of(d, "vizapp-compare-plot")["layout"])
    assert "AttnLRP" in titles and "LeGrad" in titles
    assert_clean(d.set(method, "rollout"), "method rollout")
    query = d.by_label("Query", "radio")
    assert d.values[query] == "Clicked patch" and d.props[query]["interactive"] is False
    features_note = [v for cid, v in d.values.items() if isinstance(v, str) and FEATURES in v]
    assert features_note, "the Features tab says what it draws for Swin"
    assert d.props[d.by_elem_id("vizapp-features-body")]["visible"] is True  # per layer, on its own grid
    assert d.values[d.by_elem_id("vizapp-mask-note")] == UNDEFINED["dino_masks"]
    assert d.values[d.by_elem_id("vizapp-lens-note")].startswith(UNDEFINED["logit_lens"])  # the last stage's only
    _swin_head_importance(d, swin_app[1], photo)
    _every_event(d, photo, other)
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]


def _swin_flow(d: AppDriver, folder: str, photo: Path) -> None:
    """Attention flow on the Swin folder through the server: the Rollout tab draws it over the first stage's 9x9 grid,
    equal to the Python API's, with its cost (81 max-flows) said; Compare includes it when asked, and its cost note
    says so before it runs."""
    import vizapp

    method = d.by_label("Method", "dropdown")
    assert_clean(d.set(method, "flow"), "method flow")
    plot = plot_of(d, "vizapp-rollout-plot")
    title = plot["layout"]["title"]["text"].replace("<br>", " ")
    assert title.startswith("Attention flow through windows and patch merging")
    heat = next(t for t in plot["data"] if t["type"] == "heatmap")
    raw = heat["customdata"]
    raw = heatmap_z({"z": raw}) if isinstance(raw, dict) else np.asarray(raw, dtype=float)
    r = vizapp.analyze(vizapp.load_model(folder), Image.open(photo))
    np.testing.assert_allclose(raw[..., 2], r.attention_flow(), atol=1e-6)
    cost = d.values[d.by_elem_id("vizapp-map-cost")]
    assert "81 max-flow problems" in cost and "Attention flow for Swin" in cost
    slow = d.by_label("Include attention flow (slow on big models)", "checkbox")
    assert "Left out unless included: Attention flow" in d.values[d.by_elem_id("vizapp-compare-cost")]
    assert_clean(d.set(slow, True), "include attention flow")
    assert "81 max-flow problems" in d.values[d.by_elem_id("vizapp-compare-cost")]
    assert_clean(d.click(d.by_label("Compare methods", "button")), "compare with flow")
    assert "Attention flow" in json.dumps(plot_of(d, "vizapp-compare-plot")["layout"])
    assert_clean(d.set(slow, False), "leave attention flow out")


def _swin_head_importance(d: AppDriver, folder: str, photo: Path) -> None:
    """The Features tab's exact ablation on the Swin folder (3 heads in the first stage's two layers, 6 in the
    second's): its [4, 6] grid through the server, empty (NaN) where a layer has fewer heads, equals the Python API's
    head_importance for the same image and class."""
    import vizapp
    from vizapp.ablation import head_importance

    cost = d.values[d.by_elem_id("vizapp-importance-cost")]
    assert "18 heads (3, 3, 6, 6 in its 4 layers)" in cost and "ΣH_l = 18 forward passes" in cost
    assert d.props[d.by_label("Exact ablation", "button")].get("visible", True) is not False
    label = d.values[d.by_label("Class scored (none: the top-1, or 1 - cos without a classifier)", "dropdown")]
    assert_clean(d.click(d.by_label("Exact ablation", "button")), "exact head ablation")
    z = heatmap_z(plot_of(d, "vizapp-importance-plot")["data"][0])
    assert z.shape == (4, 6)
    assert np.isnan(z[:2, 3:]).all() and np.isfinite(z[:2, :3]).all() and np.isfinite(z[2:]).all()
    vm = vizapp.load_model(folder)
    r = vizapp.analyze(vm, Image.open(photo))
    want = head_importance(vm, r.input, class_idx=label).drop.numpy()
    np.testing.assert_allclose(z, want, atol=1e-6)
    assert "Empty cells: heads a layer does not have" in d.values[d.by_elem_id("vizapp-importance-note")]


def test_the_heads_tab_draws_a_swin_layer_on_its_grid_with_the_window(swin_app, tmp_path):
    """Through the server: layer 2 (the second stage, 5x5 tokens 8 px apart) for a clicked first-stage patch; the
    heads mosaic has the layer's grid per head, the focus map is on that grid with the query's window outlined, and
    both equal the Python API's maps for the same image and token."""
    import vizapp
    from vizapp.views_windows import layer_query

    url, folder = swin_app
    photo, _ = _photos(tmp_path)
    d = AppDriver(url)
    assert_clean(d.analyze(photo), "analyze")
    rows = [cid for cid in d.components if d.kind(cid) == "slider" and d.props[cid].get("label") == "Patch row"]
    cols = [cid for cid in d.components if d.kind(cid) == "slider" and d.props[cid].get("label") == "Patch column"]
    heads_row, heads_col = rows[0], cols[0]  # the Heads tab's (built before the Features tab's)
    assert_clean(d.set(heads_row, 6), "query row")
    assert_clean(d.set(heads_col, 1), "query column")
    assert_clean(d.set(d.by_label("Layer (-1 = last)", "slider"), 2), "layer 2")
    r = vizapp.analyze(vizapp.load_model(folder), Image.open(photo))
    q = layer_query(r, 2, (6, 1))
    assert q == (3, 0)  # first-stage (6, 1): its centre at (26, 6) px lies in the 8-px token (3, 0)
    heads = plot_of(d, "vizapp-heads-plot")
    z = heatmap_z(heads["data"][0])
    assert z.shape == (2 * 5 + 1, 3 * 5 + 2)  # 6 heads of 5x5 tiles, 2 rows x 3 columns, 1-cell gaps
    custom = heads["data"][0]["customdata"]
    raw = heatmap_z({"z": custom}) if isinstance(custom, dict) else np.asarray(custom, dtype=float)
    np.testing.assert_allclose(raw[:5, :5, 3], r.attention(2, 0, q), atol=1e-5)  # head 0's raw weights
    focus = plot_of(d, "vizapp-focus-plot")
    heat = next(t for t in focus["data"] if t["type"] == "heatmap")
    assert heatmap_z(heat).shape == (5, 5) and heat["dx"] == 8
    m = r.attention(2, None, q).mean(0)  # the mean of the heads, shown scaled to [0, 1]
    np.testing.assert_allclose(heatmap_z(heat), (m - m.min()) / (m.max() - m.min()), atol=1e-5)
    outline = next(t for t in focus["data"] if t.get("name") == "window")
    mask = r.window_mask(2, q)
    rr, cc = np.nonzero(mask)
    xs = [x for x in outline["x"] if x is not None]
    ys = [y for y in outline["y"] if y is not None]
    assert (min(xs), max(xs)) == (cc.min() * 8, (cc.max() + 1) * 8)  # the window's cells, 8 px each
    assert (min(ys), max(ys)) == (rr.min() * 8, (rr.max() + 1) * 8)
    assert "its window outlined" in focus["layout"]["title"]["text"].replace("<br>", " ")


def test_the_enlarged_head_shows_the_mean_of_the_heads_until_one_is_chosen(bundled_app):
    """Through the server, on the bundled ViT: after Analyze the panel below the mosaic draws the mean of the last
    layer's heads for the CLS query (it was empty before a head was picked); choosing a head draws that head, and
    "mean of the layer's heads" brings the mean back. Every map equals the Python API's for the same image."""
    import vizapp

    d = AppDriver(bundled_app)
    assert_clean(d.analyze(SNEAKER), "analyze")
    r = vizapp.analyze(vizapp.load_model(models.BUNDLED), Image.open(SNEAKER))
    last = r.num_layers - 1

    def shown() -> tuple[np.ndarray, str]:
        focus = plot_of(d, "vizapp-focus-plot")
        heat = next(t for t in focus["data"] if t["type"] == "heatmap")
        return heatmap_z(heat), focus["layout"]["title"]["text"].replace("<br>", " ")

    def scaled(m: np.ndarray) -> np.ndarray:
        return (m - m.min()) / (m.max() - m.min())

    z, title = shown()
    assert f"Layer {last}, mean of its {r.num_heads} heads" in title
    np.testing.assert_allclose(z, scaled(r.attention(last, None, "cls").mean(0)), atol=1e-5)
    head = d.by_label("Overlay on the image (below the mosaic)", "dropdown")
    assert d.props[head]["choices"][0] == ["mean of the layer's heads", -1]
    assert_clean(d.set(head, 1), "head 1")
    z, title = shown()
    assert f"Layer {last}, head 1" in title
    np.testing.assert_allclose(z, scaled(r.attention(last, 1, "cls")), atol=1e-5)
    assert_clean(d.set(head, -1), "the mean again")
    z, title = shown()
    np.testing.assert_allclose(z, scaled(r.attention(last, None, "cls").mean(0)), atol=1e-5)


def test_a_plain_vit_after_a_swin_model_gets_its_views_back(swin_app, tmp_path):
    """Analyse the Swin folder, then the bundled ViT in the same page: the DINO masks, the CLS query and the CLS
    map come back; and the Swin again hides them."""
    d = AppDriver(swin_app[0])
    photo, _ = _photos(tmp_path)
    body, method = d.by_elem_id("vizapp-mask-plot"), d.by_label("Method", "dropdown")
    assert_clean(d.analyze(photo), "analyze the Swin")
    assert d.props[body]["visible"] is False
    model = d.by_label("Model", "dropdown")
    assert_clean(d.set(model, models.BUNDLED), "pick the bundled model")
    assert_clean(d.analyze(SNEAKER), "analyze with the bundled ViT")
    assert d.props[body]["visible"] is True
    assert "attention" in [c[1] for c in d.props[method]["choices"]]
    query = d.by_label("Query", "radio")
    assert [c[1] for c in d.props[query]["choices"]] == ["CLS token", "Clicked patch"] and d.props[query]["interactive"]
    assert_clean(d.set(model, swin_app[1]), "pick the Swin again")
    assert_clean(d.analyze(photo), "analyze the Swin again")
    assert d.props[body]["visible"] is False and "last_layer" in [c[1] for c in d.props[method]["choices"]]


def test_model_work_on_an_analysis_refuses_weights_changed_since(bundled_app):
    """Head importance, PCA across examples and the figures download run the very network the analysis came from:
    after its weights change in memory (through ``.data``, which no version counter sees) each says so through the
    server instead of scoring another network; with the weights restored they run again."""
    import vizapp

    d = AppDriver(bundled_app)
    assert_clean(d.analyze(SNEAKER), "analyze")
    vm = vizapp.load_model("bundled")  # the cache's object, the one the app analysed with
    head = vm.model.head.weight
    original = head.detach().clone()
    head.data.mul_(1.5)
    try:
        for label in ("Exact ablation", "PCA across examples", "Download every figure"):
            fired = d.click(d.by_label(label, "button"))
            assert [f.success for f in fired] == [False], label
            assert "changed since" in fired[0].error, (label, fired[0].error)
    finally:
        head.data.copy_(original)
    assert_clean(d.click(d.by_label("Exact ablation", "button")), "exact ablation with the weights restored")


def _dots(fig: dict) -> np.ndarray:
    """The y values of a figure's first trace, as the page receives them."""
    return shipped(fig["data"][0]["y"])


def test_the_distance_tab_draws_every_registered_head_statistic(bundled_app, swin_app, tmp_path):
    """The Attention distance tab's per-head statistic, through the server: the attention entropy of each head against
    the entropy of every row of the layer's attention computed here in float64, with uniform attention's log N as its
    line; the choice kept for the next image and in the figures download; back to the mean distance; a Swin model's
    entropy over its windows, NaN where a layer has no such head (and its Position tab without the empty tile box)."""
    import zipfile

    import torch

    import vizapp

    d = AppDriver(bundled_app)
    assert_clean(d.analyze(SNEAKER), "analyze")
    choice = d.by_elem_id("vizapp-statistic")
    assert [c[1] for c in d.props[choice]["choices"]] == ["distance", "entropy"]
    assert "Mean attention distance" in plot_of(d, "vizapp-distance-plot")["layout"]["title"]["text"]
    assert_clean(d.set(choice, "entropy"), "the entropy")
    fig = plot_of(d, "vizapp-distance-plot")
    vm = models.load_model(models.BUNDLED)
    r = vizapp.analyze(vm, Image.open(SNEAKER))
    by_hand = []
    for layer in range(r.num_layers):
        a = r.attention_layer(layer).double()  # [H, N, N]
        by_hand.append(-(a * torch.log(a)).nan_to_num().sum(-1).mean(-1).numpy())  # 0 log 0 = 0
    np.testing.assert_allclose(_dots(fig), np.ravel(by_hand), rtol=1e-5)
    assert fig["layout"]["shapes"][0]["y0"] == pytest.approx(np.log(50))  # 50 tokens: 1 CLS + 7x7 patches
    assert "log 50 = 3.91 nats" in fig["layout"]["annotations"][0]["text"]
    assert "Attention entropy per head" in fig["layout"]["title"]["text"].replace("<br>", " ")

    assert_clean(d.analyze(TROUSER), "a new image")  # the choice stays
    assert d.values[choice] == "entropy"
    again = vizapp.analyze(vm, Image.open(TROUSER)).statistics["entropy"]
    np.testing.assert_allclose(_dots(plot_of(d, "vizapp-distance-plot")), again.ravel(), rtol=1e-6)
    assert_clean(d.click(d.by_label("Download every figure", "button")), "download figures")
    names = zipfile.ZipFile(d.values[d.by_label("figures (.zip)", "file")]["path"]).namelist()
    assert {"distance-mean-attention-distance.html", "distance-entropy.html"} <= set(names)
    assert_clean(d.set(choice, "distance"), "back to the distance")
    distance = vizapp.analyze(vm, Image.open(TROUSER)).mean_distance
    np.testing.assert_allclose(_dots(plot_of(d, "vizapp-distance-plot")), distance.ravel(), rtol=1e-6)

    # the Position tab's enlarged tile: shown for a learned table, hidden (not an empty box) for Swin's relative bias
    assert d.props[d.by_elem_id("vizapp-tile-plot")].get("visible", True) is not False
    s = AppDriver(swin_app[0])
    assert_clean(s.load(), "page load")
    assert s.props[s.by_elem_id("vizapp-tile-plot")]["visible"] is False
    photo, _ = _photos(tmp_path)
    s.set(s.by_elem_id("vizapp-statistic"), "entropy", fire_change=False)  # chosen before any image: Analyze draws it
    assert_clean(s.analyze(photo), "analyze a Swin")
    swin = vizapp.analyze(vizapp.load_model(swin_app[1]), Image.open(photo)).statistics["entropy"]  # [L, max H]
    assert np.isnan(swin).any() and not np.isnan(swin).all()  # 3 heads, then 6: empty cells in the first layers
    np.testing.assert_allclose(_dots(plot_of(s, "vizapp-distance-plot")), swin.ravel(), rtol=1e-6)
    assert "window" in plot_of(s, "vizapp-distance-plot")["layout"]["title"]["text"].replace("<br>", " ")


def test_controls_touched_before_any_analysis_wait_for_it(bundled_app):
    """Before the first Analyze, a view control's change leaves the page as it is, with no error (there is nothing to
    redraw yet), and the next Analyze draws with the values it reads: the entropy in the Attention distance tab, the
    Viridis colour map, layer 2 in the Heads tab (one control of each redraw: Rollout, Heads, statistic, Compare's
    cost, Features)."""
    d = AppDriver(bundled_app)
    assert_clean(d.load(), "page load")
    d.reset_written()
    redraws = {
        "vizapp-statistic": "entropy",
        d.by_label("Colour map", "dropdown"): "Viridis",
        d.by_label("Layer (-1 = last)", "slider"): 2,
        d.by_label("Head fusion", "radio"): "max",
        d.by_label("Curve steps", "slider"): 8,
        d.by_label("Feature layer (-1 = last)", "slider"): 1,
    }
    for control, value in redraws.items():
        cid = d.by_elem_id(control) if isinstance(control, str) else control
        fired = d.set(cid, value)
        assert fired, f"{control}: no event ran"  # its redraw ran, and did nothing
        assert_clean(fired, f"{control} before any analysis")
    plots = [cid for cid in d.written if d.kind(cid) == "plot"]
    assert not plots, f"drawn before any analysis: {plots}"
    assert_clean(d.analyze(SNEAKER), "analyze")
    assert "Attention entropy per head" in plot_of(d, "vizapp-distance-plot")["layout"]["title"]["text"].replace(
        "<br>", " "
    )
    heads = plot_of(d, "vizapp-heads-plot")
    assert heads["layout"]["title"]["text"].startswith("Layer 2")
    heat = [t for t in heads["data"] if t["type"] == "heatmap"][0]
    assert heat["colorscale"][-1][1].lower() == "#fde725"  # Viridis' last colour


def test_the_compare_note_after_a_new_analysis_follows_its_box(bundled_app):
    """Attention flow ticked in the Compare tab, then another image analysed: the cost note still counts the flow
    maps (the analysis resets the curve steps, not the box; its own note left the flow out)."""
    d = AppDriver(bundled_app)
    assert_clean(d.load(), "page load")
    assert_clean(d.analyze(SNEAKER), "analyze")
    note = d.by_elem_id("vizapp-compare-cost")
    assert "Not included: attention flow" in d.values[note]
    assert_clean(d.set(d.by_label("Include attention flow", "checkbox"), True), "include attention flow")
    assert "max-flow problems" in d.values[note] and "Not included" not in d.values[note]
    assert_clean(d.analyze(TROUSER), "analyze the trouser")
    assert "max-flow problems" in d.values[note] and "Not included" not in d.values[note]
