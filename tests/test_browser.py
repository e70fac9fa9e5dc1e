"""A real browser (Debian's chromium driven by Playwright) uses the app the way a person does."""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from scripts.screenshots import FLAGS as SCREENSHOT_FLAGS
from scripts.screenshots import open_tab

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
pytestmark = pytest.mark.skipif(
    not os.path.exists(CHROMIUM), reason="Debian chromium is not installed (make test installs it)"
)
FLAGS = SCREENSHOT_FLAGS  # the launch flags Debian's chromium needs here, as the screenshot script uses


@pytest.fixture(scope="module")
def page(live_app):
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        pg = browser.new_page(viewport={"width": 1400, "height": 1000})
        pg.goto(live_app)
        pg.get_by_role("button", name="Analyze").wait_for(timeout=60_000)
        yield pg
        browser.close()


def _plot_data(page, elem_id: str) -> dict:
    """The data of the plotly graph inside a gr.Plot, read from the browser."""
    handle = page.wait_for_function(
        """(id) => { const gd = document.querySelector(`#${id} .js-plotly-plot`);
                     return gd && gd._fullData && gd._fullData.length ? gd : null; }""",
        arg=elem_id,
        timeout=60_000,
    )
    return json.loads(
        page.evaluate(
            """(gd) => JSON.stringify({n: gd.data.length, types: gd.data.map(t => t.type),
                                 z: gd._fullData.map(t => t.z ? Array.from(t.z).slice(0, 60).map(r => Array.from(r || []).map(v => (v === null || Number.isNaN(v)) ? null : v)) : null),
                                 title: gd.layout.title && gd.layout.title.text.replace(/<br>/g, ' ')})""",
            handle,
        )
    )


def test_person_analyses_an_image_and_explores(page, photo):
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    # Upload a photo and press Analyze.
    page.locator("input[type=file]").first.set_input_files(photo)
    page.wait_for_timeout(1500)
    page.get_by_role("button", name="Analyze").click()
    page.get_by_text("7x7 patches").wait_for(timeout=60_000)
    page.screenshot(path=str(ARTIFACTS / "01-prediction.png"), full_page=True)
    assert page.get_by_text("class", exact=False).count() > 0  # the top-5 labels rendered

    # Rollout tab: an image with a heatmap over it.
    page.get_by_role("tab", name="Rollout").click()
    roll = _plot_data(page, "vizapp-rollout-plot")
    assert roll["types"] == ["image", "heatmap"] and len(roll["z"][1]) == 7
    page.screenshot(path=str(ARTIFACTS / "02-rollout.png"), full_page=True)

    # Heads tab: CLS query first, then click a patch on the image and see the maps change.
    page.get_by_role("tab", name="Heads").click()
    before = _plot_data(page, "vizapp-heads-plot")
    assert before["types"][0] == "heatmap" and "CLS" in before["title"]
    img = page.locator("#vizapp-query-image img").first
    img.wait_for(timeout=30_000)
    page.screenshot(path=str(ARTIFACTS / "03-heads-cls.png"), full_page=True)
    # A click that lands while the page is still settling (a loaded machine) can be lost: click again, at most 3 times.
    for attempt in range(3):
        box = img.bounding_box()
        page.mouse.click(box["x"] + box["width"] * 0.8, box["y"] + box["height"] * 0.2)
        try:
            page.wait_for_function(
                """() => { const gd = document.querySelector('#vizapp-heads-plot .js-plotly-plot');
                           return gd && gd.layout.title && gd.layout.title.text.replace(/<br>/g, ' ').includes('attention of patch'); }""",
                timeout=30_000,
            )
            break
        except PlaywrightTimeout:
            if attempt == 2:
                raise
    after = _plot_data(page, "vizapp-heads-plot")
    assert "patch (1, 5)" in after["title"]
    assert after["z"] != before["z"]
    page.screenshot(path=str(ARTIFACTS / "03b-heads-patch-query.png"), full_page=True)

    # Attention distance: one dot per head per layer; clicking a dot opens that head in the Heads tab.
    page.get_by_role("tab", name="Attention distance").click()
    dist = _plot_data(page, "vizapp-distance-plot")
    assert dist["types"][0] == "scatter"
    page.screenshot(path=str(ARTIFACTS / "04-distance.png"), full_page=True)
    target = page.evaluate(
        """() => { const gd = document.querySelector('#vizapp-distance-plot .js-plotly-plot');
                   const pt = gd.calcdata[0][4], cd = gd._fullData[0].customdata[4];
                   const fl = gd._fullLayout, r = gd.getBoundingClientRect();
                   return {x: r.left + fl.xaxis._offset + fl.xaxis.l2p(pt.x), y: r.top + fl.yaxis._offset + fl.yaxis.l2p(pt.y),
                           layer: cd[0], head: cd[1]}; }"""
    )
    page.mouse.move(target["x"] - 5, target["y"] - 5)
    page.mouse.move(target["x"], target["y"], steps=5)
    page.wait_for_timeout(500)  # plotly resolves the hovered point on mousemove before a click can select it
    page.mouse.click(target["x"], target["y"])
    page.wait_for_function(
        """() => { const gd = document.querySelector('#vizapp-focus-plot .js-plotly-plot');
                   return gd && gd.layout.title && /, head \\d/.test(gd.layout.title.text.replace(/<br>/g, ' ')); }""",
        timeout=60_000,
    )
    focus = _plot_data(page, "vizapp-focus-plot")
    assert f"Layer {int(target['layer'])}, head {int(target['head'])}" in focus["title"]
    page.screenshot(path=str(ARTIFACTS / "05-head-opened-from-distance.png"), full_page=True)

    # The same tab's other per-head statistic: the attention entropy, with uniform attention's log 50 nats as its line.
    page.get_by_role("tab", name="Attention distance").click()
    page.locator("#vizapp-statistic input").click()
    page.get_by_role("option", name="attention entropy (nats)").click()
    page.wait_for_function(
        """() => { const gd = document.querySelector('#vizapp-distance-plot .js-plotly-plot');
                   return gd && gd.layout.title && gd.layout.title.text.replace(/<br>/g, ' ').includes('entropy'); }""",
        timeout=60_000,
    )
    line = page.evaluate("() => document.querySelector('#vizapp-distance-plot .js-plotly-plot').layout.shapes[0].y0")
    assert abs(line - math.log(50)) < 1e-9  # 1 CLS + 7x7 patches
    page.screenshot(path=str(ARTIFACTS / "05b-entropy.png"), full_page=True)

    # Position embeddings: the tiled cosine grid.
    page.get_by_role("tab", name="Position embeddings").click()
    pos = _plot_data(page, "vizapp-pos-plot")
    assert pos["types"] == ["heatmap"]
    page.screenshot(path=str(ARTIFACTS / "06-position-embeddings.png"), full_page=True)

    # A preview grid of 24x24 is drawn as one image (too many cells for numbers); a click on a tile still opens it.
    page.locator("#vizapp-pos-resolution input").click()
    page.get_by_role("option", name="24 x 24 (interpolated)").click()
    handle = page.wait_for_function(
        """() => { const gd = document.querySelector('#vizapp-pos-plot .js-plotly-plot');
                   return gd && gd.data.length && gd.data[0].type === 'image' ? gd : null; }""",
        timeout=60_000,
    )
    page.wait_for_timeout(700)  # the page binds its click bridge every 0.7 s
    # the centre of cell (2, 3) of tile (5, 17): pixel ((17 * 25 + 3), (5 * 25 + 2)) in the mosaic
    target = page.evaluate(
        """(gd) => { const L = gd._fullLayout, r = gd.getBoundingClientRect();
                     return {x: r.left + L.xaxis._offset + L.xaxis.l2p(17 * 25 + 3),
                             y: r.top + L.yaxis._offset + L.yaxis.l2p(5 * 25 + 2)}; }""",
        handle,
    )
    page.mouse.move(target["x"], target["y"])
    page.wait_for_timeout(300)
    page.mouse.click(target["x"], target["y"])
    page.wait_for_function(
        """() => { const gd = document.querySelector('#vizapp-tile-plot .js-plotly-plot');
                   return gd && gd.layout.title && gd.layout.title.text.replace(/<br>/g, ' ').includes('Tile (5, 17)'); }""",
        timeout=60_000,
    )
    page.screenshot(path=str(ARTIFACTS / "07-position-embeddings-24x24.png"), full_page=True)


def _analyze(pg, photo, patches: str) -> None:
    pg.locator("input[type=file]").first.set_input_files(photo)
    pg.wait_for_timeout(1500)
    pg.get_by_role("button", name="Analyze").click()
    pg.get_by_text(patches).first.wait_for(timeout=60_000)


def _wait_title(pg, elem_id: str, text: str) -> None:
    pg.wait_for_function(
        """([id, text]) => { const gd = document.querySelector(`#${id} .js-plotly-plot`);
                             return gd && gd.layout.title && (gd.layout.title.text || '').replace(/<br>/g, ' ').includes(text); }""",
        arg=[elem_id, text],
        timeout=60_000,
    )


def test_a_person_in_a_half_screen_window_opens_the_tabs_from_the_more_tabs_menu(page, live_app, photo):
    """At 900 px wide, gradio keeps Prediction, Rollout and Heads in the tab row and moves the rest into its "More
    tabs" menu: opened from there, each tab draws its figure across its column, neither at plotly's default size nor
    wider than the column; and the plots that sit in pairs on a wide page stand one above the other across the
    whole tab (they were 184 px each, their titles cut off)."""
    pg = page.context.browser.new_page(viewport={"width": 900, "height": 1000})
    try:
        pg.goto(live_app)
        pg.get_by_role("button", name="Analyze").wait_for(timeout=60_000)
        _analyze(pg, photo, "7x7 patches")
        assert [t.inner_text() for t in pg.get_by_role("tab").all()] == ["Prediction", "Rollout", "Heads"]
        for name, plot, title, pairs in [
            ("Attention distance", "vizapp-distance-plot", "Mean attention distance", []),
            ("Position embeddings", "vizapp-pos-plot", "Position embedding similarity", ["pos", "tile"]),
            (
                "Features",
                "vizapp-pca-plot",
                "Feature PCA after block 1",
                ["pca", "similarity", "norm-grid", "norm-hist"],
            ),
        ]:
            open_tab(pg, name)
            _wait_title(pg, plot, title)
            pg.wait_for_timeout(500)  # plotly's resize to its column
            width, column, tab = pg.evaluate(
                """(id) => { const root = document.getElementById(id), gd = root.querySelector('.js-plotly-plot');
                             return [gd._fullLayout.width, root.clientWidth,
                                     root.closest('[role=tabpanel]').clientWidth]; }""",
                plot,
            )
            assert 0.8 * column <= width <= column and width != 700, (name, width, column)  # 700: plotly's default
            widths = [pg.evaluate("(id) => document.getElementById(id).clientWidth", f"vizapp-{p}-plot") for p in pairs]
            assert all(w >= 0.9 * tab for w in widths), (name, widths, tab)
        # the logit lens table, wider than the tab here, keeps its header on one line: "layer" broke into "la / ye / r"
        heights = pg.evaluate("() => [...document.querySelectorAll('#vizapp-lens-table th')].map(t => t.offsetHeight)")
        assert len(heights) == 6 and max(heights) < 50, heights  # one line: 37 px; three: 79
        pg.screenshot(path=str(ARTIFACTS / "17-narrow-window-features.png"), full_page=True)
        # Compare's maps, three to a row, keep 760 px and scroll sideways in the narrower column, so that no two of
        # their titles (name and score lines) overlap; squeezed to the column, neighbours' titles ran into each other
        open_tab(pg, "Compare")
        # the flow checkbox wraps to a line of its own rather than shrink (66 px, its label cut to "Inclu / atten")
        assert pg.locator("#vizapp-compare-slow").bounding_box()["width"] >= 160
        pg.get_by_role("button", name="Compare methods").click()
        _wait_title(pg, "vizapp-compare-plot", "Explanations compared")
        pg.wait_for_timeout(500)
        width, column, scrolls, boxes = pg.evaluate(
            """() => { const root = document.getElementById('vizapp-compare-plot'),
                             gd = root.querySelector('.js-plotly-plot');
                       const boxes = [...root.querySelectorAll('.annotation-text')].map(a => {
                           const r = a.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; });
                       const scroller = [...root.querySelectorAll('*')].find(e => e.scrollWidth > e.clientWidth + 1
                           && getComputedStyle(e).overflowX === 'auto') || root;
                       return [gd._fullLayout.width, root.clientWidth, scroller.scrollWidth > scroller.clientWidth,
                               boxes]; }"""
        )
        assert width >= 760 > column and scrolls, (width, column)
        assert len(boxes) == 7  # the 7 maps' titles (the figure's own title is not an annotation)
        for i, a in enumerate(boxes):
            for b in boxes[i + 1 :]:
                overlap = min(a[2], b[2]) - max(a[0], b[0]) > 0 and min(a[3], b[3]) - max(a[1], b[1]) > 0
                assert not overlap, (a, b)
        pg.screenshot(path=str(ARTIFACTS / "18-narrow-window-compare.png"), full_page=True)
    finally:
        pg.close()


def test_person_opens_the_features_tab(page, photo):
    _analyze(page, photo, "7x7 patches")
    # the upload fills its box (a small image is not left at its own size): drawn by object-fit "contain" (not
    # gradio's "scale-down", which never enlarges), at the largest scale its box allows, here more than twice its size
    shown = page.evaluate(
        """() => { const img = document.querySelector('#vizapp-image img'), r = img.getBoundingClientRect();
                   return {w: r.width, h: r.height, nw: img.naturalWidth, nh: img.naturalHeight,
                           fit: getComputedStyle(img).objectFit}; }"""
    )
    assert (shown["nw"], shown["nh"]) == (90, 120) and shown["fit"] == "contain", shown
    assert min(shown["w"] / shown["nw"], shown["h"] / shown["nh"]) > 2, shown
    page.get_by_role("tab", name="Features").click()
    _wait_title(page, "vizapp-pca-plot", "Feature PCA after block 1")
    pca = _plot_data(page, "vizapp-pca-plot")
    assert pca["types"] == ["image", "image"]
    sim = _plot_data(page, "vizapp-similarity-plot")
    assert sim["types"] == ["image", "heatmap"] and len(sim["z"][1]) == 7
    norms = _plot_data(page, "vizapp-norm-grid-plot")
    assert norms["types"][0] == "heatmap" and len(norms["z"][0]) == 7
    assert _plot_data(page, "vizapp-norm-hist-plot")["types"][0] == "histogram"
    assert _plot_data(page, "vizapp-mask-plot")["types"] == ["heatmap"]
    assert _plot_data(page, "vizapp-lens-plot")["types"] == ["scatter"]  # the card model has classes
    page.screenshot(path=str(ARTIFACTS / "08-features.png"), full_page=True)
    # Clicking a patch of the feature image moves the similarity query there.
    img = page.locator("#vizapp-feature-image img").first
    box = img.bounding_box()
    page.mouse.click(box["x"] + box["width"] * 0.9, box["y"] + box["height"] * 0.1)
    _wait_title(page, "vizapp-similarity-plot", "patch (0, 6)")
    # Exact head ablation from the button: a heatmap of 2 layers x 3 heads.
    page.get_by_role("button", name="Exact ablation").click()
    _wait_title(page, "vizapp-importance-plot", "Head importance")
    imp = _plot_data(page, "vizapp-importance-plot")
    assert imp["types"] == ["heatmap"] and len(imp["z"][0]) == 2 and len(imp["z"][0][0]) == 3
    page.screenshot(path=str(ARTIFACTS / "09-head-importance.png"), full_page=True)
    # Clicking a cell (layer 1, head 2) opens that head in the Heads tab, through the page's click bridge.
    page.wait_for_timeout(800)  # the page binds its click bridge every 0.7 s
    page.locator("#vizapp-importance-plot").scroll_into_view_if_needed()  # the tab's last section: maybe below view
    target = page.evaluate(
        """() => { const gd = document.querySelector('#vizapp-importance-plot .js-plotly-plot');
                   const L = gd._fullLayout, r = gd.getBoundingClientRect();
                   return {x: r.left + L.xaxis._offset + L.xaxis.l2p(2), y: r.top + L.yaxis._offset + L.yaxis.l2p(1)}; }"""
    )
    page.mouse.move(target["x"] - 3, target["y"] - 3)
    page.mouse.move(target["x"], target["y"], steps=5)
    page.wait_for_timeout(500)
    page.mouse.click(target["x"], target["y"])
    _wait_title(page, "vizapp-focus-plot", "Layer 1, head 2")


def _live_hf_app(folder_parent, config_cls: str, model_cls: str, extra: dict):
    """The live app started with a tiny random transformers model folder (the operator's --model): (demo, url)."""
    pytest.importorskip("transformers", reason="the hf extra is installed by requirements-dev.txt")
    from conftest import start_app
    from test_families import save_hf

    return start_app(str(save_hf(folder_parent, config_cls, model_cls, extra)))


@pytest.fixture(scope="module")
def hf_app(tmp_path_factory):
    """The live app with a tiny random transformers ViT."""
    demo = _live_hf_app(
        tmp_path_factory.mktemp("hf_vit_live"),
        "ViTConfig",
        "ViTForImageClassification",
        dict(image_size=32, num_labels=5),
    )
    yield demo.local_url
    demo.close()


@pytest.fixture(scope="module")
def beit_app(tmp_path_factory):
    """The live app with a tiny random transformers BEiT: mean-pooled head, relative bias and a learned table."""
    extra = dict(
        image_size=32,
        num_labels=3,
        use_mean_pooling=True,
        use_relative_position_bias=True,
        use_absolute_position_embeddings=True,
    )
    demo = _live_hf_app(tmp_path_factory.mktemp("hf_beit_live"), "BeitConfig", "BeitForImageClassification", extra)
    yield demo.local_url
    demo.close()


def test_person_uses_a_transformers_model(page, hf_app, photo):
    page.goto(hf_app)
    page.get_by_role("button", name="Analyze").wait_for(timeout=60_000)
    _analyze(page, photo, "4x4 patches")
    page.get_by_role("tab", name="Rollout").click()
    roll = _plot_data(page, "vizapp-rollout-plot")
    assert roll["types"] == ["image", "heatmap"] and len(roll["z"][1]) == 4
    page.get_by_role("tab", name="Position embeddings").click()
    _wait_title(page, "vizapp-pos-plot", "Position embedding similarity (4x4)")
    page.get_by_role("tab", name="Features").click()
    _wait_title(page, "vizapp-pca-plot", "Feature PCA")
    assert _plot_data(page, "vizapp-similarity-plot")["types"] == ["image", "heatmap"]
    assert page.get_by_text("L·H = 8 forward passes").count() >= 1  # exact ablation's cost, said before running
    page.screenshot(path=str(ARTIFACTS / "10-transformers-features.png"), full_page=True)


def test_person_picks_where_a_pooled_models_maps_start_and_which_position_view(page, beit_app, photo):
    """BEiT's head averages its patches: the rollout starts there and says so, and the Start-from choice switches it
    to the CLS row; its Position tab offers the relative bias and, by the View choice, its learned table."""
    page.goto(beit_app)
    page.get_by_role("button", name="Analyze").wait_for(timeout=60_000)
    _analyze(page, photo, "4x4 patches")
    page.get_by_role("tab", name="Rollout").click()
    _wait_title(page, "vizapp-rollout-plot", "the output reads the mean of the patch tokens")
    page.get_by_role("radio", name="the CLS token").check()
    _wait_title(page, "vizapp-rollout-plot", "from the CLS row")
    page.screenshot(path=str(ARTIFACTS / "11-pooled-model-cls-row.png"), full_page=True)
    page.get_by_role("tab", name="Position embeddings").click()
    _wait_title(page, "vizapp-pos-plot", "relative-position bias per head")
    page.get_by_role("radio", name="learned table").check()  # not the Preview grid menu, whose label names it
    _wait_title(page, "vizapp-pos-plot", "Position embedding similarity (4x4)")
    page.screenshot(path=str(ARTIFACTS / "12-learned-table-beside-bias.png"), full_page=True)


@pytest.fixture(scope="module")
def bundled_app():
    from conftest import start_app

    from vizapp import models

    demo = start_app(models.BUNDLED)
    yield demo.local_url
    demo.close()


def _no_error_toast(pg) -> None:
    """No error or warning toast is on the page, and no output shows gradio's error state."""
    pg.wait_for_timeout(300)
    toasts = pg.locator(".toast-body").all_inner_texts()
    assert not toasts, toasts
    assert pg.locator(".error").count() == 0 or not any(pg.locator(".error").all_inner_texts())


def test_person_uses_the_controls_that_always_failed(page, bundled_app):
    """Issue 26's six, in Chromium on the bundled model: PCA across examples, the features export, Compare after a
    new image (its class, its stale maps), the PCA threshold at its maximum, and curve steps that stop at the patches."""
    from vizapp import models

    examples = models.ASSETS_DIR / "examples"
    page.goto(bundled_app)
    page.get_by_role("button", name="Analyze").wait_for(timeout=60_000)
    _analyze(page, str(examples / "fmnist_7_sneaker.png"), "7x7 patches")
    page.get_by_role("tab", name="Compare").click()
    page.get_by_role("button", name="Compare methods").click()
    _wait_title(page, "vizapp-deletion-plot", "Deletion")
    _no_error_toast(page)
    # 6. Curve steps: the slider stops at the 49 patches.
    steps = page.locator("input[type=number][aria-label*='Curve steps']")
    assert steps.get_attribute("max") == "49"
    # 3 and 4. A new image: the old Compare maps are gone, and Compare runs with the new image's class.
    _analyze(page, str(examples / "fmnist_1_trouser.png"), "7x7 patches")
    page.wait_for_timeout(1000)
    assert page.locator("#vizapp-compare-plot .js-plotly-plot").count() == 0
    page.get_by_role("button", name="Compare methods").click()
    _wait_title(page, "vizapp-deletion-plot", "Deletion")
    _no_error_toast(page)
    page.screenshot(path=str(ARTIFACTS / "13-compare-after-a-new-image.png"), full_page=True)
    # 1. PCA across examples: one image per example and the upload.
    page.get_by_role("tab", name="Features").click()
    page.get_by_role("button", name="PCA across examples").click()
    _wait_title(page, "vizapp-gallery-plot", "One PCA over")
    gallery = _plot_data(page, "vizapp-gallery-plot")
    assert gallery["types"] == ["image"] * (1 + len(list(examples.glob("*.*[gG]"))))
    # 2. Export these arrays: a file appears to download.
    page.get_by_role("button", name="Export these arrays").click()
    page.locator("#vizapp-features-npz a").first.wait_for(timeout=60_000)
    assert "vizapp_features" in page.locator("#vizapp-features-npz").inner_text()
    # 5. The PCA foreground threshold at its maximum: a map and a sentence, no error.
    thr = page.locator("input[type=number][aria-label*='PCA foreground threshold']")
    thr.fill("0.95")
    thr.press("Enter")
    _wait_title(page, "vizapp-pca-plot", "0.95")
    _no_error_toast(page)
    page.screenshot(path=str(ARTIFACTS / "14-features-after-fixes.png"), full_page=True)


@contextmanager
def _visitor_of_a_slowed_app(page, monkeypatch, model: str, handler: str, delay):
    """A page of its own on a fresh app for ``model`` whose handler ``handler`` (a name in vizapp.ui.handlers, looked
    up when the app is built) first sleeps ``delay(*args)`` seconds, as on a loaded server. Yields (page, calls): the
    positional arguments of every call, in order (the handlers' own order: state first)."""
    from conftest import start_app

    from vizapp.ui import handlers

    real, calls = getattr(handlers, handler), []

    @functools.wraps(real)
    def slowed(*args, **kwargs):
        calls.append(args)
        time.sleep(delay(*args))
        return real(*args, **kwargs)

    monkeypatch.setattr(handlers, handler, slowed)
    demo = start_app(model)
    pg = page.context.browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        pg.goto(demo.local_url)
        pg.get_by_role("button", name="Analyze").wait_for(timeout=60_000)
        yield pg, calls
    finally:
        pg.close()
        demo.close()


def _click_patch(pg, elem_id: str, fx: float, fy: float) -> None:
    """Click the point (fx, fy) (fractions of its width and height) of the square view in the image ``elem_id``,
    which the page draws centred in its box ("contain")."""
    box = pg.locator(f"#{elem_id} img").first.bounding_box()
    side = min(box["width"], box["height"])
    top, left = box["y"] + (box["height"] - side) / 2, box["x"] + (box["width"] - side) / 2
    pg.mouse.click(left + side * fx, top + side * fy)


def _sliders(pg, *labels: str) -> list[str]:
    return [pg.locator(f"input[type=number][aria-label*='{label}']").input_value() for label in labels]


def _heads(*args) -> tuple[int, int, int]:
    """(layer, row, column) of a render_heads call's arguments."""
    return int(args[1]), int(args[3]), int(args[4])


def test_the_heads_figure_follows_the_controls_as_they_were_last_set(page, card_model, photo, monkeypatch):
    """Two Heads controls set one after the other while the first one's redraw is slow (3 s): the figure left on the
    page is the one for both values, as the sliders show, not the first redraw's late answer (each control fired an
    event of its own, run beside the others, so the slow first answer came last and stayed)."""

    def row_alone(*args) -> float:  # the row's new value beside the column's old one
        return 3.0 if _heads(*args)[1:] == (1, 3) else 0.0

    with _visitor_of_a_slowed_app(page, monkeypatch, card_model, "render_heads", row_alone) as (pg, calls):
        _analyze(pg, photo, "7x7 patches")
        pg.get_by_role("tab", name="Heads").click()
        pg.get_by_role("radio", name="Clicked patch").check()
        _wait_title(pg, "vizapp-heads-plot", "attention of patch (0, 0)")
        col = pg.locator("input[type=number][aria-label*='Patch column']")
        col.fill("3")
        col.press("Enter")
        _wait_title(pg, "vizapp-heads-plot", "attention of patch (0, 3)")
        for label, value in (("Patch row", "1"), ("Patch column", "5")):
            box = pg.locator(f"input[type=number][aria-label*='{label}']")
            box.fill(value)
            box.press("Enter")
        _wait_title(pg, "vizapp-heads-plot", "patch (1, 5)")
        pg.wait_for_timeout(5000)  # the row's slow redraw (3 s) has answered by now
        assert (1, 1, 3) in [_heads(*c) for c in calls]  # it ran: the case this tests
        assert "patch (1, 5)" in _plot_data(pg, "vizapp-heads-plot")["title"]
        _no_error_toast(pg)


def test_an_analysis_draws_the_heads_once_and_redraws_answer_in_order(page, tmp_path, photo, monkeypatch):
    """A model without a class token. Analyze sets the query sliders to the centre patch and draws the Heads tab
    itself: no redraw runs after it (the redraw listened to every change of its controls, so an analysis set off one
    per control it set, and one of them, reading the row's new value beside the column's old one, answered last with
    the wrong patch). Then a click on a patch, whose redraw (slowed to 3 s) is still running when the layer is
    changed: the layer's redraw answers first, and the click's, which read the old layer, is not shown over it."""
    from conftest import write_card_model

    def old_layer(*args) -> float:  # the clicked patch at the old layer
        return 3.0 if _heads(*args) == (1, 0, 6) else 0.0

    model = write_card_model(tmp_path, class_token=False, global_pool="avg")
    with _visitor_of_a_slowed_app(page, monkeypatch, model, "render_heads", old_layer) as (pg, calls):
        _analyze(pg, photo, "7x7 patches")
        pg.get_by_role("tab", name="Heads").click()
        _wait_title(pg, "vizapp-heads-plot", "Layer 1: attention of patch (3, 3)")
        pg.wait_for_timeout(1500)
        assert _sliders(pg, "Patch row", "Patch column") == ["3", "3"]
        assert calls == []  # the analysis drew the tab: no redraw ran after it
        _click_patch(pg, "vizapp-query-image", 0.95, 0.05)  # patch (0, 6)
        pg.wait_for_function(
            """() => ['Patch row', 'Patch column'].map(l =>
                 document.querySelector(`input[type=number][aria-label*='${l}']`).value).join() === '0,6'"""
        )
        layer = pg.locator("input[type=number][aria-label*='Layer (-1 = last)']")
        layer.fill("0")
        layer.press("Enter")
        _wait_title(pg, "vizapp-heads-plot", "Layer 0: attention of patch (0, 6)")
        pg.wait_for_timeout(5000)  # the click's slow redraw (3 s) has answered by now
        ran = [_heads(*c) for c in calls]
        assert ran[0] == (1, 0, 6) and ran[-1] == (0, 0, 6), ran  # both ran: the case this tests
        assert "Layer 0: attention of patch (0, 6)" in _plot_data(pg, "vizapp-heads-plot")["title"]
        _no_error_toast(pg)


def test_a_redraw_still_running_from_the_last_image_does_not_land_on_the_new_one(page, card_model, photo, monkeypatch):
    """A patch clicked in the Heads tab (its redraw slowed to 4 s), then another image analysed while that redraw
    runs: the analysis answers first and shows the new image from its CLS token; the redraw, started from the last
    image's analysis (which the new one replaced in the session's store), answers after it and is not shown, its
    error neither (it was: a toast "this result was dropped to keep the server within its memory budget ... press
    Analyze again" over the new, complete analysis)."""
    from vizapp import models

    def clicked(*args) -> float:
        return 4.0 if _heads(*args)[1:] == (0, 6) else 0.0

    with _visitor_of_a_slowed_app(page, monkeypatch, card_model, "render_heads", clicked) as (pg, calls):
        _analyze(pg, photo, "7x7 patches")
        pg.get_by_role("tab", name="Heads").click()
        _wait_title(pg, "vizapp-heads-plot", "attention of CLS")
        _click_patch(pg, "vizapp-query-image", 0.95, 0.05)  # patch (0, 6): its redraw takes 4 s
        pg.wait_for_timeout(300)
        _analyze(pg, str(models.ASSETS_DIR / "examples" / "fmnist_1_trouser.png"), "7x7 patches")
        _wait_title(pg, "vizapp-heads-plot", "attention of CLS")  # the new analysis, from its CLS token
        pg.wait_for_timeout(6000)  # the slow redraw (4 s) has answered by now
        assert calls and _heads(*calls[0])[1:] == (0, 6), calls  # it ran: the case this tests
        assert "attention of CLS" in _plot_data(pg, "vizapp-heads-plot")["title"]
        _no_error_toast(pg)


def test_a_new_analysis_stops_the_last_images_compare(page, card_model, photo, monkeypatch):
    """Compare started (slowed to 4 s), then another image analysed while it runs: the analysis clears the Compare
    tab and stops the last image's Compare, which says nothing on the new image's page (it answered a few seconds
    after the analysis, with the last image's curves or, as here, a toast saying its result was dropped)."""
    from vizapp import models

    with _visitor_of_a_slowed_app(page, monkeypatch, card_model, "compare_methods", lambda *a: 4.0) as (pg, calls):
        _analyze(pg, photo, "7x7 patches")
        pg.get_by_role("tab", name="Compare").click()
        pg.get_by_role("button", name="Compare methods").click()
        pg.wait_for_timeout(500)
        assert calls  # the Compare is under way
        trouser = models.ASSETS_DIR / "examples" / "fmnist_1_trouser.png"
        pg.locator("input[type=file]").first.set_input_files(str(trouser))
        pg.wait_for_timeout(1500)
        pg.get_by_role("button", name="Analyze").click()
        pg.wait_for_timeout(7000)  # the slow Compare (4 s) would have answered by now
        assert pg.locator("#vizapp-compare-plot .js-plotly-plot").count() == 0
        assert pg.locator("#vizapp-deletion-plot .js-plotly-plot").count() == 0
        _no_error_toast(pg)


def test_a_new_analysis_stops_the_last_images_figure_download(page, card_model, photo, monkeypatch):
    """The figures' download asked for (its second time slowed to 4 s), then another image analysed while it runs:
    the new analysis clears the download, and the last image's .zip does not come back over the new image's page (it
    answered after the analysis with the last image's figures or, as here, a toast that its analysis was replaced).
    The first, unslowed download shows the file, so the check below can see one."""
    from vizapp import models

    asked: list[int] = []

    def second_time(*args) -> float:
        asked.append(1)
        return 4.0 if len(asked) == 2 else 0.0

    link = "#vizapp-figures-zip a[download]"
    with _visitor_of_a_slowed_app(page, monkeypatch, card_model, "export_figures", second_time) as (pg, calls):
        _analyze(pg, photo, "7x7 patches")
        download = pg.get_by_role("button", name="Download every figure (.zip of HTML pages)")
        download.click()
        pg.locator(link).first.wait_for(timeout=60_000)
        assert "vizapp_figures" in pg.locator("#vizapp-figures-zip").inner_text()
        download.click()
        pg.wait_for_timeout(500)
        assert len(calls) == 2  # the slow download is under way
        trouser = models.ASSETS_DIR / "examples" / "fmnist_1_trouser.png"
        pg.locator("input[type=file]").first.set_input_files(str(trouser))
        pg.wait_for_timeout(1500)
        pg.get_by_role("button", name="Analyze").click()
        pg.wait_for_timeout(7000)  # the slow download (4 s) would have answered by now
        assert pg.locator(link).count() == 0
        _no_error_toast(pg)
