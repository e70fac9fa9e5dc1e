"""UI handlers called directly, and the /analyze API end to end through gradio_client against a live server."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import numpy as np
import plotly.graph_objects as go
import pytest

import vizapp
from vizapp import ui


def _noprogress(*args, **kwargs):
    return None


def _kept(state):
    """A handler's state with its analyses fetched from the results store (the state holds only their key)."""
    return ui.common.analysis_state(state)


@pytest.fixture(scope="module")
def analysed(card_model, photo):
    out = ui.analyze_image(photo, card_model, progress=_noprogress, trusted_model=card_model)
    return out


def test_analyze_outputs(analysed, card_model, photo):
    state, status, label, summary = analysed.state, analysed.status, analysed.label, analysed.summary
    roll, heads, dist = analysed.rollout, analysed.heads, analysed.distance
    r = _kept(state)["analysis"]
    assert isinstance(r, vizapp.Analysis) and state["query"] == "cls"
    assert "2 layers x 3 heads" in status and "7x7 patches" in status and "the output reads the class token" in status
    assert len(label) == 5 and abs(sum(label.values()) - sum(p for _, p in r.top_k)) < 1e-6
    for fig in (roll, heads, dist):
        assert isinstance(fig, go.Figure)
    assert [t.type for t in roll.data] == ["image", "heatmap"]
    assert roll.data[1].z.shape == (7, 7)
    assert "layer" in dist.layout.xaxis.title.text and "pixels" in dist.layout.yaxis.title.text
    assert dist.data[0].y.shape == (6,)  # 2 layers x 3 heads
    assert "head %{customdata[0]" in heads.data[0].hovertemplate
    assert summary["num_prefix_tokens"] == 1 and summary["grid_size"] == [7, 7]
    # The same analysis from the library.
    vm = vizapp.load_model(card_model)
    # The Summary's numbers are rounded to 5 significant digits.
    np.testing.assert_allclose(summary["mean_distance_px"], vizapp.analyze(vm, photo).mean_distance, rtol=1e-4)
    assert all(len(repr(p["probability"]).split(".")[-1]) <= 6 for p in summary["top_k"])


def test_rerender_without_forward_pass(analysed, monkeypatch):
    state = analysed.state
    monkeypatch.setattr(vizapp.VizModel, "model", property(lambda self: pytest.fail("no forward pass")), raising=False)
    fig = ui.render_map(state, "rollout", None, "max", 0.5, 1, 0.3, progress=_noprogress).rollout
    assert "fusion max, discard 0.50, from layer 1" in fig.layout.title.text.replace("<br>", " ")
    cls_out = ui.render_heads(state, -1, ui.CLS_QUERY, 0, 0, True, -1, 0.5)
    patch_out = ui.render_heads(state, -1, ui.PATCH_QUERY, 3, 4, True, 2, 0.5)
    st2, heads_cls, focus, img = cls_out.state, cls_out.heads, cls_out.focus, cls_out.query_image
    st3, heads_patch, focus2, img2 = patch_out.state, patch_out.heads, patch_out.focus, patch_out.query_image
    assert st3["query"] == (3, 4) and st2["query"] == "cls"
    assert not np.allclose(np.nan_to_num(heads_cls.data[0].z), np.nan_to_num(heads_patch.data[0].z))
    assert "mean of its 3 heads" in focus.layout.title.text.replace("<br>", " ")  # "all heads": their mean
    assert isinstance(focus2, go.Figure) and "head 2" in focus2.layout.title.text.replace("<br>", " ")
    assert not np.array_equal(img, img2)  # the query patch is outlined


def test_class_specific_methods_and_compare(analysed):
    state = analysed.state
    label = _kept(state)["analysis"].top_k[1][0]
    for method in vizapp.methods.METHODS:
        fig = ui.render_map(state, method, label, "mean", 0.0, 0, 0.6, progress=_noprogress).rollout
        assert fig.data[1].z.shape == (7, 7)
    out = ui.compare_methods(state, label, 8, True, progress=_noprogress)
    deletion, insertion, table = out.deletion, out.insertion, out.auc_table
    names = [row[0] for row in table]
    assert names == [
        "Attention rollout",
        "Last-layer CLS attention",
        "Attention flow",
        "Gradient rollout",
        "GAE relevance (Chefer et al., ICCV 2021)",
        "Transformer Attribution (Chefer et al., CVPR 2021)",
        "AttnLRP (Achtibat et al., ICML 2024)",
        "LeGrad (Bousselham et al., 2024)",
        "random",
    ]
    assert all(0.0 <= row[1] <= 1.0 and 0.0 <= row[2] <= 1.0 for row in table)
    assert len(deletion.data) == len(insertion.data) == 9


def test_select_patch_and_click_bridges(analysed):
    state = analysed.state
    s = ui.views.query_image_scale(_kept(state)["analysis"])  # 28-px view shown 12x larger
    assert s == 12 and analysed.query_image.shape == (28 * s, 28 * s, 3)
    evt = SimpleNamespace(index=[13 * s, 27 * s])  # x=13 px, y=27 px of the view on 4-px patches -> row 6, col 3
    assert ui.select_patch(state, evt) == (ui.PATCH_QUERY, 6, 3)
    opened = ui.open_head(state, json.dumps({"customdata": [1, 2, 30.5]}))
    layer, head = opened.layer, opened.focus_head
    assert (layer, head) == (1, 2)
    assert ui.open_tile(state, json.dumps({"customdata": [3, 4, 0, 1]})) == (3, 4)
    with pytest.raises(gr.Error, match="out of range|between"):
        ui.open_head(state, json.dumps({"customdata": [9, 0, 1]}))
    with pytest.raises(gr.Error, match="click"):
        ui.open_head(state, "not json")


def test_export(analysed):
    exported = ui.export_files(analysed.state)
    npz, js = exported.npz_file, exported.json_file
    arrays = np.load(npz)
    assert arrays["attention"].shape == (2, 3, 50, 50)
    np.testing.assert_allclose(arrays["attention"].sum(-1), 1.0, atol=1e-5)
    with open(js) as f:
        summary = json.load(f)
    assert summary["grid_size"] == [7, 7] and summary["readout"] == "cls"


def test_export_folders_are_private_and_old_ones_are_removed():
    import os
    import time

    from vizapp.ui import handlers

    first, second = handlers.export_folder(), handlers.export_folder()
    assert first != second and first.parent == second.parent and first.is_dir()
    (first / "a.npz").write_bytes(b"x")
    old = time.time() - handlers.EXPORT_MAX_AGE_S - 60
    os.utime(first, (old, old))
    third = handlers.export_folder()
    assert not first.exists() and second.is_dir() and third.is_dir()


def test_pos_views(card_model):
    out = ui.render_pos(card_model, 0, 2, 3, trusted_model=card_model)
    fig, tile = out.pos, out.tile["value"]
    assert (
        out.tile["visible"] is True
        and fig.data[0].z.shape == (7 * 8 - 1, 7 * 8 - 1)
        and "Tile (2, 3)" in tile.layout.title.text.replace("<br>", " ")
    )
    note = ui.render_pos(card_model, 10, 0, 0, trusted_model=card_model).pos_note
    assert "resampled to 10x10" in note
    assert out.pos_show == {"__type__": "update", "visible": False, "value": "position scheme"}  # one scheme only


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda st, m: ui.render_map(None, "rollout", None, "mean", 0, 0, 0.5), "press Analyze"),
        (lambda st, m: ui.render_map(st, "rollout", None, "median", 0, 0, 0.5), "head fusion"),
        (lambda st, m: ui.render_map(st, "rollout", None, "mean", 1.5, 0, 0.5), "discard ratio"),
        (lambda st, m: ui.render_map(st, "rollout", None, "mean", "abc", 0, 0.5), "discard ratio"),
        (lambda st, m: ui.render_map(st, "rollout", None, "mean", 0, 99, 0.5), "start layer"),
        (lambda st, m: ui.render_map(st, "nonsense", None, "mean", 0, 0, 0.5), "method"),
        (lambda st, m: ui.render_map(st, "relevance", "no such class", "mean", 0, 0, 0.5), "unknown class"),
        (lambda st, m: ui.render_heads(st, 7, ui.CLS_QUERY, 0, 0, True, -1, 0.5), "layer"),
        (lambda st, m: ui.render_heads(st, 0, ui.PATCH_QUERY, 7, 0, True, -1, 0.5), "row"),
        (lambda st, m: ui.render_heads(st, 0, ui.PATCH_QUERY, 0, 0, True, 3, 0.5), "head"),
        (lambda st, m: ui.render_heads(st, [1], ui.CLS_QUERY, 0, 0, True, -1, 0.5), "layer"),
        (lambda st, m: ui.analyze_image(None, m, progress=_noprogress, trusted_model=m), "no image"),
        (lambda st, m: ui.analyze_image(b"not an image", m, progress=_noprogress, trusted_model=m), "image"),
        (lambda st, m: ui.analyze_image(b"x", "no_such_model_at_all", progress=_noprogress), "unknown model"),
        (lambda st, m: ui.analyze_image(b"x", m, progress=_noprogress), "local files"),
    ],
)
def test_bad_parameters_get_clear_errors(analysed, card_model, call, message):
    state = analysed.state
    before = _kept(state)["analysis"].rollout().copy()
    with pytest.raises(gr.Error, match=message):
        call(state, card_model)
    np.testing.assert_array_equal(_kept(state)["analysis"].rollout(), before)  # nothing changed


def test_api_end_to_end(live_app, card_model, photo, tmp_path):
    from gradio_client import Client, handle_file

    client = Client(live_app, verbose=False)
    assert "/analyze" in client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    out = ui.outputs.from_api(ui.AnalyzeOutputs, client.predict(handle_file(photo), card_model, api_name="/analyze"))
    status, label, summary = out["status"], out["label"], out["summary"]
    vm = vizapp.load_model(card_model)
    expected = vizapp.analyze(vm, photo)
    assert label["label"] == expected.top_k[0][0]
    np.testing.assert_allclose(summary["rollout_mean"], np.round(expected.rollout(), 6), atol=1e-6)
    assert "Active model" in status
    # A bad file gets a clear message and the server keeps serving.
    bad = tmp_path / "notes.png"
    bad.write_text("this is text, not a picture")
    with pytest.raises(Exception, match="not an image|text|PNG"):
        client.predict(handle_file(str(bad)), card_model, api_name="/analyze")
    out2 = ui.outputs.from_api(ui.AnalyzeOutputs, client.predict(handle_file(photo), card_model, api_name="/analyze"))
    assert out2["label"]["label"] == label["label"]


def test_startup_model_choice(monkeypatch, tmp_path):
    import huggingface_hub.constants as hc

    monkeypatch.delenv("VIZAPP_MODEL", raising=False)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(ui.models, "hub_reachable", lambda *a, **k: False)
    name, note = ui.choose_startup_model(None)
    assert name == "bundled" and "unreachable" in note
    monkeypatch.setattr(ui.models, "hub_reachable", lambda *a, **k: True)
    name, note = ui.choose_startup_model(None)
    assert name == ui.DEFAULT_PRETRAINED and "from the hub" in note
    monkeypatch.setenv("VIZAPP_MODEL", "vit_tiny_patch16_224")
    assert ui.choose_startup_model(None)[0] == "vit_tiny_patch16_224"
    assert ui.choose_startup_model("bundled")[0] == "bundled"
    labels = dict((v, k) for k, v in ui.model_choices())
    assert labels["bundled"].endswith("[offline]") and labels[ui.DEFAULT_PRETRAINED].endswith("[download]")


def test_big_pos_embed_grid_is_a_palette_png_with_exact_colours():
    """24x24 grids (ViT-L/16 at 384 px) ship the mosaic as a PNG: under 1 MB even for random embeddings, and each
    cell's colour is the colour scale at its cosine, at the cell the tiled layout puts it."""
    import base64
    import io

    from PIL import Image

    from vizapp import figures

    g = 24
    rng = np.random.default_rng(0)
    e = rng.standard_normal((g * g, 32))
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    sim = (e @ e.T).reshape(g, g, g, g)
    fig = figures.pos_embed_figure(sim)
    assert len(fig.to_json()) < 1e6
    png = base64.b64decode(fig.data[0].source.split(",", 1)[1])
    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    assert rgb.shape == (g * (g + 1) - 1, g * (g + 1) - 1, 3)
    lut = figures._colormap_lut(figures.SIM_SCALE, 255)
    for i, j, k, l_ in [(0, 0, 0, 0), (3, 5, 7, 11), (23, 23, 0, 23), (10, 2, 17, 4)]:
        level = int(round((sim[i, j, k, l_] + 1.0) * 127.0))
        np.testing.assert_array_equal(rgb[i * (g + 1) + k, j * (g + 1) + l_], lut[level])
    assert (rgb[g, :] == 255).all() and (rgb[:, g] == 255).all()  # the gap between tile rows / columns
    np.testing.assert_array_equal(lut[0], [68, 1, 84])  # Viridis' first stop, #440154
    assert fig.layout.meta["tile_grid"] == [g, g]  # the page maps a clicked pixel to its tile with this
    assert fig.data[0].hoverinfo == "none"  # "skip" would drop the click events too


def test_layering_ui_talks_to_views_pipeline_and_methods_only():
    """ui/ reaches analyses and figures only through views, pipeline and methods; only vizapp/figures/ imports plotly and
    only ui/ imports gradio (STYLE.md)."""
    import ast
    from pathlib import Path

    root = Path(vizapp.__file__).parent

    def imports(path: Path) -> set[str]:
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        return names

    for path in sorted((root / "ui").glob("*.py")):
        bad = {n for n in imports(path) if n.startswith(("vizapp.analysis", "vizapp.figures", "plotly"))}
        assert not bad, f"{path.name} imports {bad}"
        assert "vizapp.models._cached_hub_file" not in imports(path)
    for path in sorted(root.rglob("*.py")):
        names = imports(path)
        # the views modules import plotly for type hints only; bench.py is a tool on its way to benchmarks/.
        if (
            path.name not in ("views.py", "feature_views.py", "feature_views_windows.py", "bench.py")
            and path.parent.name != "figures"
        ):
            assert not any(n.startswith("plotly") for n in names), f"{path.relative_to(root)} imports plotly"
        if path.parent.name != "ui":
            assert not any(n.startswith("gradio") for n in names), f"{path.relative_to(root)} imports gradio"


SLOW = [m.name for m in vizapp.methods.METHODS.values() if m.slow]


def test_slow_operations_stop_at_the_deadline(analysed, card_model, photo, monkeypatch):
    """VIZAPP_REQUEST_SECONDS=0 allows no slow work: the flow and the comparison refuse with the operator's setting
    named, instead of running; with the default limit the same calls return figures."""
    fresh = ui.analyze_image(photo, card_model, progress=_noprogress, trusted_model=card_model).state
    label = _kept(fresh)["analysis"].top_k[0][0]
    monkeypatch.setenv("VIZAPP_REQUEST_SECONDS", "0")
    for method in SLOW:
        with pytest.raises(gr.Error, match=r"stopped after 0 s: .* 0 s limit set by VIZAPP_REQUEST_SECONDS"):
            ui.render_map(fresh, method, label, "mean", 0.0, 0, 0.6, progress=_noprogress)
    with pytest.raises(gr.Error, match=r"stopped after 0 s: .*limit set by VIZAPP_REQUEST_SECONDS"):
        ui.compare_methods(fresh, label, 4, False, progress=_noprogress)
    # A fast method is not a long operation: it still renders.
    assert ui.render_map(fresh, "rollout", None, "mean", 0.0, 0, 0.6, progress=_noprogress).rollout.data[1].z.shape == (
        7,
        7,
    )
    monkeypatch.delenv("VIZAPP_REQUEST_SECONDS")
    for method in SLOW:
        assert ui.render_map(fresh, method, label, "mean", 0.0, 0, 0.6, progress=_noprogress).rollout.data[
            1
        ].z.shape == (7, 7)


def test_deadline_trips_between_steps_on_its_clock():
    from vizapp.ui.deadline import Deadline, RequestStopped

    now = [100.0]
    d = Deadline(5.0, clock=lambda: now[0])
    step = d.progress("attention flow")
    now[0] = 104.9
    step(1, 10)  # within the limit
    now[0] = 105.0
    with pytest.raises(RequestStopped, match="stopped after 5 s: attention flow reached the 5 s limit"):
        step(2, 10)


def test_cancel_stops_a_running_flow_and_frees_the_worker(card_model, photo):
    """Cancel from another request of the same session stops the flow at its next max-flow, with a clear message."""
    import threading

    session = SimpleNamespace(session_hash="cancel-test")
    fresh = ui.analyze_image(photo, card_model, progress=_noprogress, request=session, trusted_model=card_model).state
    started, cancelled, outcome, reports = threading.Event(), threading.Event(), {}, []

    def progress(fraction, desc=""):
        reports.append(desc)
        if " of " in desc and not started.is_set():  # the first max-flow is done: let the test press Cancel
            started.set()
            cancelled.wait(30)

    def run():
        try:
            outcome["figure"] = ui.render_map(
                fresh, SLOW[0], None, "mean", 0.0, 0, 0.6, progress=progress, request=session
            )
        except gr.Error as e:
            outcome["error"] = str(e)

    worker = threading.Thread(target=run)
    worker.start()
    assert started.wait(60)
    ui.handlers.cancel_running(SimpleNamespace(session_hash="another-person"))  # someone else's Cancel: no effect
    ui.handlers.cancel_running(session)
    cancelled.set()
    worker.join(60)
    assert not worker.is_alive()
    assert "figure" not in outcome and "cancelled during" in outcome["error"]
    assert len([r for r in reports if " of " in r]) == 1  # stopped at the next step, not at the end
    assert ui.deadline.running_sessions() == []  # nothing left registered


def _downloads(deps: list[dict]) -> set[int]:
    """The ids of the app's three download events (the .npz/.json export, the figures' .zip, the features' .npz)."""
    return {d["id"] for d in deps if d["api_name"] in ("export_files", "export_figures", "export_features")}


def test_cancel_button_cancels_the_long_events(card_model):
    demo = ui.build_demo(card_model)
    deps = demo.config["dependencies"]
    cancel_id = next(c["id"] for c in demo.config["components"] if c["props"].get("elem_id") == "vizapp-cancel")
    rollout_id = next(c["id"] for c in demo.config["components"] if c["props"].get("elem_id") == "vizapp-rollout-plot")
    on_cancel = [d for d in deps if [cancel_id, "click"] in [list(t) for t in d["targets"]]]
    cancels = {i for d in on_cancel for i in d["cancels"]}
    long_events = {d["id"] for d in deps if d["api_name"] in ("analyze", "compare") or rollout_id in d["outputs"]}
    # analyze (from the button and from an example), compare, and the one event the 8 Rollout-tab controls fire
    # (colour map included)
    assert len(long_events) == 3 + 1 and long_events <= cancels
    # not the downloads: a cancelled download's outputs then showed gradio's "Error" in 2 of 8 runs (gradio 6.31)
    assert len(_downloads(deps)) == 3 and not _downloads(deps) & cancels
    [maps] = [d for d in deps if rollout_id in d["outputs"] and any(t[1] == "input" for t in d["targets"])]
    assert len({t[0] for t in maps["targets"] if t[1] == "input"}) == 8
    assert any(getattr(demo.fns[d["id"]].fn, "__wrapped__", None) is ui.handlers.cancel_running for d in on_cancel)


def test_a_new_image_stops_the_last_images_downloads(card_model):
    """Analyze (the button, and a click on an example) cancels the three downloads still running on the last image,
    beside its slow operations: left running, they answered over the new image's page (tests/test_browser.py has the
    figures' case in Chromium)."""
    demo = ui.build_demo(card_model)
    deps = demo.config["dependencies"]
    analyze_id = next(c["id"] for c in demo.config["components"] if c["props"].get("value") == "Analyze")
    exports = _downloads(deps)
    assert len(exports) == 3
    stoppers = [d for d in deps if d["cancels"] and not d["outputs"] and d["id"] not in exports]
    on_click = [d for d in stoppers if [analyze_id, "click"] in [list(t) for t in d["targets"]]]
    assert len(on_click) == 1 and exports <= set(on_click[0]["cancels"])
    on_example = [d for d in stoppers if [list(t) for t in d["targets"]] == [[None, "then"]]]  # after its load
    assert len(on_example) == 1 and exports <= set(on_example[0]["cancels"])


def test_cost_of_slow_operations_is_shown_before_they_run(analysed):
    assert analysed.map_cost == ""  # rollout, the method shown first, is not a slow one
    flow = ui.render_map(analysed.state, "flow", None, "mean", 0.0, 0, 0.6, progress=_noprogress).map_cost
    assert "49 max-flow problems on a graph of 3 x 50 nodes (5,000 edges)" in flow
    assert "estimate" in flow and "VIZAPP_REQUEST_SECONDS" in flow
    # 7 maps (rollout, CLS attention, gradient rollout, GAE, Transformer Attribution, AttnLRP, LeGrad) and random:
    # 2 x 8 x 17
    assert "**Compare** runs 272 images through the model at 16 curve steps" in analysed.compare_cost
    # The Compare note follows its controls: 8 steps, slow methods included (flow: one map more).
    note = ui.handlers.compare_cost(analysed.state, 8, True).compare_cost
    assert "runs 162 images through the model at 8 curve steps" in note and "max-flow" in note  # 2 x 9 maps x 9


# -- other model families in the app, the Features tab, position views per scheme -----------------------------------

DINOV3 = ("vit_small_patch16_dinov3", dict(img_size=64, depth=2))  # RoPE, CLS + 4 registers, no classifier
# NaFlexViT configured at 64 x 48 (12 patches of 16): one image keeps its own aspect ratio within those 12 patches
NAFLEX = (
    "naflexvit_base_patch16_gap",
    dict(depth=2, embed_dim=64, num_heads=4, pretrained_cfg_overlay=dict(input_size=(3, 64, 48))),
)


@pytest.fixture(scope="module")
def random_timm_in_app():
    """The app's model loader, patched to hand out small random-weight timm models by name (no downloads)."""
    from conftest import small_model

    made = {}
    kwargs = {
        DINOV3[0]: DINOV3[1],
        "vit_small_patch14_reg4_dinov2": dict(img_size=56, depth=3),
        "beit_base_patch16_224": dict(img_size=48, depth=2, embed_dim=64, num_heads=4),
        "vit_base_patch16_rope_mixed_224": dict(img_size=48, depth=2, embed_dim=64, num_heads=4),
        NAFLEX[0]: NAFLEX[1],
    }

    original = ui.handlers._load

    def load(name, trusted=None, random_weights=False):
        if name not in kwargs:  # every other model loads as usual
            return original(name, trusted, random_weights)
        if name not in made:
            made[name] = small_model(name, **kwargs[name])
        return made[name]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ui.handlers, "_load", load)
        yield load


@pytest.fixture(scope="module")
def dinov3(random_timm_in_app, photo):
    return ui.analyze_image(photo, DINOV3[0], progress=_noprogress)


@pytest.fixture(scope="module")
def reg4_state(random_timm_in_app, photo):
    return ui.analyze_image(photo, "vit_small_patch14_reg4_dinov2", progress=_noprogress).state


def _features(state, layer=-1, fg=0.0, row=1, col=2, norm_layer=-1, dino=0.6, lens_class=None):
    return ui.render_features(state, layer, fg, row, col, norm_layer, dino, lens_class, 0.6)


def _assert_feature_figures(f, grid):
    gh, gw = grid
    assert [t.type for t in f.feat_pca.data] == [
        "image",
        "image",
    ] and "Feature PCA after block" in f.feat_pca.layout.title.text.replace("<br>", " ")
    assert [t.type for t in f.feat_sim.data] == ["image", "heatmap"] and f.feat_sim.data[1].z.shape == (gh, gw)
    assert "cosine" in f.feat_sim.data[1].hovertemplate
    assert f.norm_grid.data[0].type == "heatmap" and f.norm_grid.data[0].z.shape == (gh, gw)
    assert [t.type for t in f.norm_hist.data][:1] == ["histogram"]
    assert any("artifact threshold" in (a.text or "") for a in f.norm_hist.layout.annotations)
    assert f.norm_depth.data[-1].name == "patch max" and f.norm_depth.layout.xaxis.title.text == "layer"
    masks, overlay = f.mask_heads["value"], f.mask_overlay["value"]  # gr.update: hidden without a CLS token
    assert f.mask_heads["visible"] and f.mask_overlay["visible"] and f.mask_note == ""
    assert masks.data[0].type == "heatmap" and "CLS attention" in masks.layout.title.text.replace("<br>", " ")
    assert [t.type for t in overlay.data] == ["image", "heatmap"]
    assert f.norm_sentence.startswith(("On this image", "Patch tokens with a norm"))


def test_dinov3_renders_every_tab_and_says_what_needs_classes(dinov3, random_timm_in_app):
    st = dinov3.state
    r = _kept(st)["analysis"]
    assert r.grid_size == (4, 4) and r.num_prefix_tokens == 5 and r.probs is None
    assert dinov3.label is None and "4x4 patches" in dinov3.status and "no classifier head" in dinov3.status
    assert "Compare** needs class probabilities" in dinov3.compare_cost
    assert [t.type for t in dinov3.rollout.data] == ["image", "heatmap"] and dinov3.rollout.data[1].z.shape == (4, 4)
    assert dinov3.heads.data[0].type == "heatmap" and dinov3.distance.data[0].y.shape == (2 * r.num_heads,)
    # Class-specific methods and Compare say clearly that there are no classes, instead of failing.
    for method in ("grad_rollout", "relevance"):
        with pytest.raises(gr.Error, match="no classifier head"):
            ui.render_map(st, method, None, "mean", 0.0, 0, 0.6, progress=_noprogress)
    with pytest.raises(gr.Error, match="no classifier head"):
        ui.compare_methods(st, None, 4, False, progress=_noprogress)
    # Position tab: RoPE, drawn as the same tile mosaic as learned embeddings, with the scheme stated.
    pos = ui.render_pos(DINOV3[0], 0, 1, 2, 0, 0)
    assert "Rotary position embedding" in pos.pos_note and pos.pos.data[0].z.shape == (4 * 5 - 1, 4 * 5 - 1)
    assert (
        "Tile (1, 2)" in pos.tile["value"].layout.title.text.replace("<br>", " ") and pos.pos_layer["visible"] is False
    )
    # Features: every view; the logit lens is hidden with a note; the gradient estimate is refused with the reason,
    # exact ablation runs (the whole model per layer, L·H passes) and scores 1 - cos.
    f = _features(st)
    _assert_feature_figures(f, (4, 4))
    assert f.lens_table["visible"] is False and f.lens_plot["visible"] is False and "no classifier head" in f.lens_note
    assert [t.name for t in f.norm_depth.data][:5] == ["CLS", "register 0", "register 1", "register 2", "register 3"]
    assert "Exact ablation** is not available" not in dinov3.importance_cost
    assert "L·H = 12 forward passes" in dinov3.importance_cost and "1 - cos" in dinov3.importance_cost  # 2 x 6 heads
    assert "Gradient estimate** is not available" in dinov3.importance_cost
    with pytest.raises(gr.Error, match="not available for this model"):
        ui.run_importance(st, "gradient", "zero", None, progress=_noprogress)
    exact = ui.run_importance(st, "exact", "zero", None, progress=_noprogress)
    assert [t.type for t in exact.importance.data] == ["heatmap"] and exact.importance.data[0].z.shape == (2, 6)
    assert exact.state["importance"]["score"] == "1 - cos"


def test_naflex_in_the_app_keeps_the_photo_aspect_ratio(random_timm_in_app, tmp_path):
    from conftest import random_image

    path = tmp_path / "wide.png"
    random_image(8, size=(60, 160)).save(path)  # 60 rows, 160 columns: a wide photo
    out = ui.analyze_image(str(path), NAFLEX[0], progress=_noprogress)
    r = _kept(out.state)["analysis"]
    gh, gw = r.grid_size
    assert gw > gh and gh * gw <= 12 and f"{gh}x{gw} patches" in out.status
    assert out.rollout.data[1].z.shape == (gh, gw)
    assert out.heads.data[0].type == "heatmap"
    # a click on the right edge of the (wide) model view picks the last column
    s = ui.views.query_image_scale(r)
    click = SimpleNamespace(index=[gw * r.patch_size[1] * s - 1, 0])
    picked = ui.select_patch(out.state, click)
    assert (picked[1], picked[2]) == (0, gw - 1)
    heads = ui.render_heads(out.state, 0, picked[0], picked[1], picked[2], True, 1, 0.5)
    assert heads.state["query"] == (0, gw - 1)
    a = r.attention(0, head=1, query=(0, gw - 1))  # [gh, gw], drawn scaled to [0, 1] per head
    np.testing.assert_allclose(heads.focus.data[1].z, (a - a.min()) / (a.max() - a.min()), atol=1e-5)


def test_position_views_per_scheme(random_timm_in_app):
    beit = ui.render_pos("beit_base_patch16_224", 0, 0, 0, 1, 0)
    assert "relative-position bias" in beit.pos_note and beit.tile == {
        "__type__": "update",
        "value": None,
        "visible": False,
    }
    assert beit.pos.data[0].z.shape == (2 * 6 - 1, 2 * 6 - 1)  # 4 heads of (2·3-1)x(2·3-1) offsets, 2x2 mosaic
    assert "Layer 1" in beit.pos.layout.title.text.replace("<br>", " ") and "Δrow" in beit.pos.data[0].hovertemplate
    assert beit.pos_layer == {"visible": True, "maximum": 1, "__type__": "update"}
    mixed = ui.render_pos("vit_base_patch16_rope_mixed_224", 0, 0, 0, 1, 3)
    assert "Mixed rotary" in mixed.pos_note and "layer 1, head 3" in mixed.pos.layout.title.text.replace("<br>", " ")
    assert mixed.pos_head["visible"] and mixed.pos_head["maximum"] == 3
    other = ui.render_pos("vit_base_patch16_rope_mixed_224", 0, 0, 0, 0, 0)
    assert not np.array_equal(np.nan_to_num(other.pos.data[0].z), np.nan_to_num(mixed.pos.data[0].z))


def test_features_rerender_without_forward_pass(reg4_state, monkeypatch):
    r = _kept(reg4_state)["analysis"]
    monkeypatch.setattr(vizapp.VizModel, "model", property(lambda self: pytest.fail("no forward pass")), raising=False)
    a = _features(reg4_state, layer=-1, row=1, col=2)
    b = _features(a.state, layer=0, fg=0.3, row=3, col=0, norm_layer=1, dino=0.3)
    _assert_feature_figures(a, r.grid_size)
    assert a.state["feature_query"] == (1, 2) and b.state["feature_query"] == (3, 0)
    assert a.feat_pca.layout.title.text.replace("<br>", " ") != b.feat_pca.layout.title.text.replace(
        "<br>", " "
    ) and "foreground" in b.feat_pca.layout.title.text.replace("<br>", " ")
    np.testing.assert_allclose(
        np.nan_to_num(a.feat_sim.data[1].customdata[..., 2]), r.feature_similarity((1, 2), -1), atol=1e-6
    )
    assert a.feat_sim.data[1].customdata[1, 2, 2] == pytest.approx(1.0, abs=1e-5)  # the query patch with itself
    masks = r.dino_masks(0.3)
    per_head = b.mask_heads["value"]
    assert np.nansum(per_head.data[0].z) == masks.sum() and "30%" in per_head.layout.title.text.replace("<br>", " ")
    assert b.register_plot["visible"] is True  # 4 registers
    reg = b.register_plot["value"]
    assert [t.type for t in reg.data] == ["heatmap", "heatmap"] and np.asarray(reg.data[0].z).shape == (3, 4)
    np.testing.assert_allclose(np.asarray(reg.data[0].z), r.register_attention()["from_cls"].mean(1), atol=1e-6)
    # The histogram's threshold is the artifact rule's: exactly the tokens above it are flagged.
    norms = r.token_norms()[1]
    thr = ui.views.artifact_threshold(norms)
    np.testing.assert_array_equal(norms > thr, r.artifact_tokens()[1])
    assert f"{thr:.3g}" in b.norm_hist.layout.annotations[0].text
    # Clicking the feature image picks a patch, like the Heads tab.
    s = ui.views.query_image_scale(r)
    assert ui.select_feature_patch(reg4_state, SimpleNamespace(index=[15 * s, 30 * s])) == (2, 1)  # 14-px patches


def test_artifact_sentence_follows_the_numbers(reg4_state):
    import dataclasses

    r = _kept(reg4_state)["analysis"]
    norms = r.token_norms().copy()
    p = r.num_prefix_tokens
    assert ui.views.artifact_sentence(r).startswith("On this image no patch token")
    spiked = norms.copy()
    spiked[2, p + 3] = 100 * norms[2].max()  # one huge patch token in the last layer
    late = ui.views.artifact_sentence(dataclasses.replace(r, block_norms=spiked))
    assert "layer 2: 1" in late and "do appear in the middle-to-late layers" in late
    early = norms.copy()
    early[0, p + 3] = 100 * norms[0].max()
    assert "only in the early layers" in ui.views.artifact_sentence(dataclasses.replace(r, block_norms=early))


def test_logit_lens_and_head_importance_in_the_app(analysed):
    st = analysed.state
    r = _kept(st)["analysis"]
    label = r.top_k[1][0]
    f = _features(st, lens_class=label)
    assert f.lens_table["visible"] and len(f.lens_table["value"]) == r.num_layers
    assert f.lens_table["value"][-1][1] == f"{r.top_k[0][0]} ({r.top_k[0][1]:.3f})"
    np.testing.assert_allclose(f.lens_plot["value"].data[0].y, r.lens_probs[:, r.labels.index(label)])
    assert "H·(L+1)/2 = 4 forward passes" in analysed.importance_cost  # 3 heads x (2 + 1) / 2
    exact = ui.run_importance(f.state, "exact", "zero", None, progress=_noprogress)
    assert [t.type for t in exact.importance.data] == ["heatmap"] and "rank correlation" in exact.importance_note
    both = ui.run_importance(exact.state, "gradient", "zero", None, progress=_noprogress)
    assert [t.type for t in both.importance.data] == ["heatmap", "heatmap"]
    expected = vizapp.ablation.head_importance(vizapp.models.reload(r.load_args), r.input, mode="zero").drop.numpy()
    np.testing.assert_allclose(both.importance.data[0].z, expected, atol=1e-6)
    rho = vizapp.ablation.rank_correlation(
        vizapp.ablation.torch.as_tensor(expected), vizapp.ablation.torch.as_tensor(both.state["importance"]["gradient"])
    )
    assert f"**{rho:.3f}**" in both.importance_note
    # A cell's custom data (layer, head, value) opens that head in the Heads tab through the click bridge.
    cd = both.importance.data[0].customdata[1][2]
    opened = ui.open_head(st, json.dumps({"customdata": list(map(float, cd))}))
    assert (opened.layer, opened.focus_head) == (1, 2)
    # Another ablation mode starts a new pair: the old gradient result is not compared with it.
    mean = ui.run_importance(both.state, "exact", "mean", None, progress=_noprogress)
    assert len(mean.importance.data) == 1
    # The export carries every array of the tab.
    arrays = np.load(ui.export_features(both.state, -1, 0.0, 1, 2, 0.6).features_npz)
    assert arrays["token_norms"].shape == (2, 50) and arrays["feature_pca_rgb"].shape == (7, 7, 3)
    assert arrays["dino_masks"].shape == (3, 7, 7) and arrays["logit_lens_probs"].shape == (2, 10)
    assert arrays["head_importance_exact"].shape == arrays["head_importance_gradient"].shape == (2, 3)
    np.testing.assert_allclose(arrays["feature_similarity"], r.feature_similarity((1, 2)), atol=1e-6)


def test_second_image_and_pca_across_examples(analysed, photo, tmp_path):
    from conftest import random_image

    st = analysed.state
    r = _kept(st)["analysis"]
    path = tmp_path / "second.png"
    random_image(5, size=(64, 64)).save(path)
    out = ui.analyze_second_image(st, str(path), 2, 3, -1, progress=_noprogress)
    other = _kept(out.state)["other"]
    assert "second" in out.feat_sim.layout.title.text.replace("<br>", " ")
    np.testing.assert_allclose(
        out.feat_sim.data[1].customdata[..., 2], r.feature_similarity((2, 3), other=other), atol=1e-6
    )
    assert not np.array_equal(out.feat_sim.data[0].source, analysed.rollout.data[0].source)  # drawn on the other
    cleared = ui.analyze_second_image(out.state, None, 2, 3, -1, progress=_noprogress)
    assert "other" not in cleared.state and "other" not in _kept(cleared.state)
    gallery = ui.pca_across_examples(st, -1, progress=_noprogress).pca_gallery
    n = 1 + len(ui.handlers.example_images())
    assert [t.type for t in gallery.data] == [
        "image"
    ] * n and f"One PCA over {n} images" in gallery.layout.title.text.replace("<br>", " ")


def test_head_importance_honours_the_deadline(analysed, monkeypatch):
    monkeypatch.setenv("VIZAPP_REQUEST_SECONDS", "0")
    for method in ("exact", "gradient"):
        with pytest.raises(gr.Error, match=r"stopped after 0 s: .*head .*limit set by VIZAPP_REQUEST_SECONDS"):
            ui.run_importance(analysed.state, method, "zero", None, progress=_noprogress)
    with pytest.raises(gr.Error, match="limit set by VIZAPP_REQUEST_SECONDS"):
        ui.pca_across_examples(analysed.state, -1, progress=_noprogress)


def test_head_importance_stops_between_layers_on_cancel(card_model, photo):
    """Cancel during the exact ablation stops it before the next layer."""
    session = SimpleNamespace(session_hash="importance-cancel")
    seen = []

    def progress(fraction, desc=""):
        seen.append(desc)
        if " of " in desc:  # the first layer is done: press Cancel
            ui.handlers.cancel_running(session)

    state = ui.analyze_image(photo, card_model, progress=_noprogress, request=session, trusted_model=card_model).state
    with pytest.raises(gr.Error, match="cancelled during exact head ablation"):
        ui.run_importance(state, "exact", "zero", None, progress=progress, request=session)
    assert [d for d in seen if " of " in d] == ["exact head ablation: 1 of 2"]
    assert ui.deadline.running_sessions() == []


def test_cancel_button_cancels_the_feature_events(card_model):
    demo = ui.build_demo(card_model)
    deps = demo.config["dependencies"]
    cancel_id = next(c["id"] for c in demo.config["components"] if c["props"].get("elem_id") == "vizapp-cancel")
    cancels = {i for d in deps if [cancel_id, "click"] in [list(t) for t in d["targets"]] for i in d["cancels"]}
    importance = {d["id"] for d in deps if str(d["api_name"]).startswith("head_importance_")}
    assert len(importance) == 2 and importance <= cancels


def test_weights_available_offline_per_family(monkeypatch, tmp_path):
    import huggingface_hub.constants as hc
    import torch

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torchhub"))
    assert vizapp.models.weights_available_offline("bundled")
    assert not vizapp.models.weights_available_offline("vit_tiny_patch16_224.augreg_in21k_ft_in1k")
    assert not vizapp.models.weights_available_offline("hf:google/vit-base-patch16-224")
    assert not vizapp.models.weights_available_offline("no_such_model_anywhere")
    if "torchvision" in vizapp.models.available_libraries():
        import torchvision

        assert not vizapp.models.weights_available_offline("torchvision:vit_b_16")
        url = torchvision.models.get_model_weights("vit_b_16").DEFAULT.url
        (tmp_path / "torchhub" / "checkpoints").mkdir(parents=True)
        (tmp_path / "torchhub" / "checkpoints" / Path(url).name).write_bytes(b"x")
        assert vizapp.models.weights_available_offline("torchvision:vit_b_16")
    ids = [v for _, v in ui.model_choices()]
    assert "vit_small_patch16_dinov3.lvd1689m" in ids
    for lib, expected in (("transformers", "hf:facebook/dinov2-small"), ("torchvision", "torchvision:vit_b_16")):
        assert (expected in ids) == (lib in vizapp.models.available_libraries())


def test_startup_does_not_import_timm():
    import ast

    tree = ast.parse((Path(vizapp.__file__).parent / "ui" / "startup.py").read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert "timm" not in names


@pytest.fixture(scope="module")
def hf_vit_folder(tmp_path_factory):
    pytest.importorskip("transformers", reason="the hf extra is installed by requirements-dev.txt")
    from test_families import save_hf

    return str(
        save_hf(
            tmp_path_factory.mktemp("hf_vit"),
            "ViTConfig",
            "ViTForImageClassification",
            dict(image_size=32, num_labels=5),
        )
    )


def test_transformers_model_renders_every_tab(hf_vit_folder, photo):
    out = ui.analyze_image(photo, hf_vit_folder, progress=_noprogress, trusted_model=hf_vit_folder)
    st = out.state
    r = _kept(st)["analysis"]
    assert r.grid_size == (4, 4) and len(out.label) == 5 and "4x4 patches" in out.status
    assert [t.type for t in out.rollout.data] == ["image", "heatmap"] and out.rollout.data[1].z.shape == (4, 4)
    assert out.heads.data[0].type == "heatmap" and out.distance.data[0].y.shape == (2 * 4,)
    label = r.top_k[0][0]
    assert ui.render_map(st, "relevance", label, "mean", 0.0, 0, 0.6, progress=_noprogress).rollout.data[1].z.shape == (
        4,
        4,
    )
    pos = ui.render_pos(hf_vit_folder, 0, 0, 1, 0, 0, trusted_model=hf_vit_folder)
    assert "Learned position embeddings" in pos.pos_note and pos.pos.data[0].z.shape == (4 * 5 - 1, 4 * 5 - 1)
    f = _features(st)
    _assert_feature_figures(f, (4, 4))
    assert f.lens_table["visible"] and len(f.lens_table["value"]) == 2
    assert "is not available" not in out.importance_cost and "L·H = 8 forward passes" in out.importance_cost
    exact = ui.run_importance(st, "exact", "zero", label, progress=_noprogress)
    both = ui.run_importance(exact.state, "gradient", "zero", label, progress=_noprogress)
    assert [t.type for t in both.importance.data] == [
        "heatmap",
        "heatmap",
    ] and "rank correlation" in both.importance_note
    assert both.importance.data[0].z.shape == (2, 4)


@pytest.mark.parametrize(
    "fid, scheme", [("hf_dinov3", "axial 2-D RoPE"), ("hf_beit", "relative-position bias")], ids=["dinov3", "beit"]
)
def test_transformers_rope_and_bias_models_analyse_and_show_their_position_scheme(tmp_path_factory, photo, fid, scheme):
    """transformers' DINOv3 (RoPE, registers, no head) and BEiT (relative bias, a head) through the app's handlers:
    the analysis renders, and the Position tab shows the model's own scheme rather than 'read from timm models only'."""
    pytest.importorskip("transformers", reason="the hf extra is installed by requirements-dev.txt")
    from test_families import HF, save_hf

    _, config_cls, model_cls, extra = next(h for h in HF if h[0] == fid)
    folder = str(save_hf(tmp_path_factory.mktemp(fid), config_cls, model_cls, extra))
    out = ui.analyze_image(photo, folder, progress=_noprogress, trusted_model=folder)
    r = _kept(out.state)["analysis"]
    assert r.grid_size == (4, 4) and out.rollout.data[1].z.shape == (4, 4)
    assert r.num_registers == (4 if fid == "hf_dinov3" else 0)
    pos = ui.render_pos(folder, 0, 1, 2, 1, 0, trusted_model=folder)
    assert scheme in pos.pos_note and "timm models only" not in pos.pos_note
    assert pos.pos is not None and pos.pos.data[0].type == "heatmap"


def test_position_tab_offers_the_learned_table_beside_a_relative_bias(tmp_path, photo):
    """A BEiT with a learned absolute table beside its relative bias: the Position tab's view choice is shown, and
    picking the table draws its cosine grid; a model with one scheme hides the choice."""
    pytest.importorskip("transformers", reason="the hf extra is installed by requirements-dev.txt")
    from test_families import save_hf

    from vizapp.views import POS_SHOWS

    extra = dict(image_size=32, use_relative_position_bias=True, use_absolute_position_embeddings=True)
    folder = str(save_hf(tmp_path / "beit", "BeitConfig", "BeitModel", extra))
    bias = ui.render_pos(folder, 0, 1, 2, 1, 0, POS_SHOWS[0], trusted_model=folder)
    assert bias.pos_show["visible"] and "relative-position bias" in bias.pos_note
    table = ui.render_pos(folder, 0, 1, 2, 1, 0, POS_SHOWS[1], trusted_model=folder)
    assert table.pos_show["visible"] and "learned position embeddings" in table.pos_note.lower()
    assert table.pos.data[0].z.shape == (4 * 5 - 1, 4 * 5 - 1)  # the 4x4 mosaic of 4x4 tiles
    with pytest.raises(gr.Error, match="position view must be one of"):
        ui.render_pos(folder, 0, 1, 2, 1, 0, "both", trusted_model=folder)


def test_rollout_tab_offers_the_cls_row_for_a_model_whose_output_reads_its_patches(tmp_path, photo, analysed):
    """A mean-pooled BEiT: the Rollout tab's start-row choice is shown, and "cls" draws the CLS row; a model that
    reads its CLS token (the card model) hides the choice."""
    pytest.importorskip("transformers", reason="the hf extra is installed by requirements-dev.txt")
    from test_families import save_hf

    extra = dict(image_size=32, use_relative_position_bias=True, use_mean_pooling=True, num_labels=3)
    folder = str(save_hf(tmp_path / "beit", "BeitConfig", "BeitForImageClassification", extra))
    out = ui.analyze_image(photo, folder, progress=_noprogress, trusted_model=folder)
    assert out.start_row["visible"] and out.start_row["value"] == "output"
    assert "the output reads the mean of the patch tokens" in out.rollout.layout.title.text.replace("<br>", " ")
    r = _kept(out.state)["analysis"]
    fig = ui.render_map(out.state, "rollout", None, "mean", 0.0, 0, 0.6, "cls", progress=_noprogress).rollout
    assert "from the CLS row" in fig.layout.title.text.replace("<br>", " ")
    cls_row = r.rollout(start_row="cls")
    rescaled = (cls_row - cls_row.min()) / (cls_row.max() - cls_row.min())  # the overlay shows the map rescaled
    np.testing.assert_allclose(fig.data[1].z, rescaled, atol=1e-6)
    with pytest.raises(gr.Error, match="start row must be one of"):
        ui.render_map(out.state, "rollout", None, "mean", 0.0, 0, 0.6, "middle", progress=_noprogress)
    assert not analysed.start_row["visible"]


def test_redraw_answers_are_shown_in_the_order_their_runs_started():
    """wiring._Answers, by hand: runs 1 and 2 of a session's event start; 2 answers first and is shown, 1 answers
    after it and is not; run 3 is shown; another session and another event count on their own."""
    from vizapp.ui.wiring import _Answers

    answers = _Answers(keep=2)
    a, b = ("s1", 0), ("s2", 0)
    assert (answers.start(a), answers.start(a)) == (1, 2)
    assert answers.shown(a, 2) and not answers.shown(a, 1)
    assert answers.start(a) == 3 and answers.shown(a, 3)
    assert answers.start(b) == 1 and answers.shown(b, 1)  # s1's runs do not hold s2's answers back
    assert answers.start(("s1", 1)) == 1  # a third key: the oldest (s1, 0) is forgotten, kept to 2
    assert answers.start(a) == 1
    # a new analysis of s1: its redraws started so far are not shown; s2's are; the next run of s1 is
    answers = _Answers()
    assert (answers.start(a), answers.start(("s1", 1)), answers.start(b)) == (1, 1, 1)
    answers.supersede("s1")
    assert not answers.shown(a, 1) and not answers.shown(("s1", 1), 1)
    assert answers.shown(b, 1)
    assert answers.start(a) == 2 and answers.shown(a, 2)
