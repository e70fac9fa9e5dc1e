"""UI handlers called directly, and the /analyze API end to end through gradio_client against a live server."""

from __future__ import annotations

import json
from types import SimpleNamespace

import gradio as gr
import numpy as np
import plotly.graph_objects as go
import pytest

import vizapp
from vizapp import ui


def _noprogress(*args, **kwargs):
    return None


@pytest.fixture(scope="module")
def analysed(card_model, photo):
    out = ui.analyze_image(photo, card_model, progress=_noprogress, trusted_model=card_model)
    return out


def test_analyze_outputs(analysed, card_model, photo):
    state, status, label, summary = analysed.state, analysed.status, analysed.label, analysed.summary
    roll, heads, dist = analysed.rollout, analysed.heads, analysed.distance
    r = state["analysis"]
    assert isinstance(r, vizapp.Analysis) and state["query"] == "cls"
    assert "2 layers x 3 heads" in status and "7x7 patches" in status
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
    np.testing.assert_allclose(summary["mean_distance_px"], np.round(vizapp.analyze(vm, photo).mean_distance, 3))


def test_rerender_without_forward_pass(analysed, monkeypatch):
    state = analysed.state
    monkeypatch.setattr(vizapp.VizModel, "model", property(lambda self: pytest.fail("no forward pass")), raising=False)
    fig = ui.render_map(state, "rollout", None, "max", 0.5, 1, 0.3, progress=_noprogress)
    assert "fusion max, discard 0.50, from layer 1" in fig.layout.title.text
    cls_out = ui.render_heads(state, -1, ui.CLS_QUERY, 0, 0, True, -1, 0.5)
    patch_out = ui.render_heads(state, -1, ui.PATCH_QUERY, 3, 4, True, 2, 0.5)
    st2, heads_cls, focus, img = cls_out.state, cls_out.heads, cls_out.focus, cls_out.query_image
    st3, heads_patch, focus2, img2 = patch_out.state, patch_out.heads, patch_out.focus, patch_out.query_image
    assert st3["query"] == (3, 4) and st2["query"] == "cls"
    assert not np.allclose(np.nan_to_num(heads_cls.data[0].z), np.nan_to_num(heads_patch.data[0].z))
    assert focus is None and isinstance(focus2, go.Figure) and "head 2" in focus2.layout.title.text
    assert not np.array_equal(img, img2)  # the query patch is outlined


def test_class_specific_methods_and_compare(analysed):
    state = analysed.state
    label = state["analysis"].top_k[1][0]
    for method in vizapp.methods.METHODS:
        fig = ui.render_map(state, method, label, "mean", 0.0, 0, 0.6, progress=_noprogress)
        assert fig.data[1].z.shape == (7, 7)
    out = ui.compare_methods(state, label, 8, True, progress=_noprogress)
    deletion, insertion, table = out.deletion, out.insertion, out.auc_table
    names = [row[0] for row in table]
    assert names == ["Attention rollout", "Last-layer CLS attention", "Attention flow", "Gradient rollout",
                     "Chefer relevance", "random"]
    assert all(0.0 <= row[1] <= 1.0 and 0.0 <= row[2] <= 1.0 for row in table)
    assert len(deletion.data) == len(insertion.data) == 6


def test_select_patch_and_click_bridges(analysed):
    state = analysed.state
    s = ui.views.query_image_scale(state["analysis"])  # 28-px view shown 12x larger
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
        assert json.load(f)["grid_size"] == [7, 7]


def test_pos_views(card_model):
    out = ui.render_pos(card_model, 0, 2, 3, trusted_model=card_model)
    fig, tile = out.pos, out.tile
    assert fig.data[0].z.shape == (7 * 8 - 1, 7 * 8 - 1) and "Tile (2, 3)" in tile.layout.title.text
    note = ui.render_pos(card_model, 10, 0, 0, trusted_model=card_model).pos_note
    assert "resampled to 10x10" in note


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
    before = state["analysis"].rollout().copy()
    with pytest.raises(gr.Error, match=message):
        call(state, card_model)
    np.testing.assert_array_equal(state["analysis"].rollout(), before)  # nothing changed


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
    """ui/ reaches analyses and figures only through views, pipeline and methods; only figures.py imports plotly and
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
        # views.py imports plotly for type hints only; bench.py is a tool on its way to benchmarks/.
        if path.name not in ("figures.py", "views.py", "bench.py"):
            assert not any(n.startswith("plotly") for n in names), f"{path.relative_to(root)} imports plotly"
        if path.parent.name != "ui":
            assert not any(n.startswith("gradio") for n in names), f"{path.relative_to(root)} imports gradio"


SLOW = [m.name for m in vizapp.methods.METHODS.values() if m.slow]


def test_slow_operations_stop_at_the_deadline(analysed, card_model, photo, monkeypatch):
    """VIZAPP_REQUEST_SECONDS=0 allows no slow work: the flow and the comparison refuse with the operator's setting
    named, instead of running; with the default limit the same calls return figures."""
    fresh = ui.analyze_image(photo, card_model, progress=_noprogress, trusted_model=card_model).state
    label = fresh["analysis"].top_k[0][0]
    monkeypatch.setenv("VIZAPP_REQUEST_SECONDS", "0")
    for method in SLOW:
        with pytest.raises(gr.Error, match=r"stopped after 0 s: .* 0 s limit set by VIZAPP_REQUEST_SECONDS"):
            ui.render_map(fresh, method, label, "mean", 0.0, 0, 0.6, progress=_noprogress)
    with pytest.raises(gr.Error, match=r"stopped after 0 s: .*limit set by VIZAPP_REQUEST_SECONDS"):
        ui.compare_methods(fresh, label, 4, False, progress=_noprogress)
    # A fast method is not a long operation: it still renders.
    assert ui.render_map(fresh, "rollout", None, "mean", 0.0, 0, 0.6, progress=_noprogress).data[1].z.shape == (7, 7)
    monkeypatch.delenv("VIZAPP_REQUEST_SECONDS")
    for method in SLOW:
        assert ui.render_map(fresh, method, label, "mean", 0.0, 0, 0.6, progress=_noprogress).data[1].z.shape == (7, 7)


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

    fresh = ui.analyze_image(photo, card_model, progress=_noprogress, trusted_model=card_model).state
    session = SimpleNamespace(session_hash="cancel-test")
    started, cancelled, outcome, reports = threading.Event(), threading.Event(), {}, []

    def progress(fraction, desc=""):
        reports.append(desc)
        if " of " in desc and not started.is_set():  # the first max-flow is done: let the test press Cancel
            started.set()
            cancelled.wait(30)

    def run():
        try:
            outcome["figure"] = ui.render_map(fresh, SLOW[0], None, "mean", 0.0, 0, 0.6, progress=progress,
                                              request=session)
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


def test_cancel_button_cancels_the_long_events(card_model):
    demo = ui.build_demo(card_model)
    deps = demo.config["dependencies"]
    cancel_id = next(c["id"] for c in demo.config["components"] if c["props"].get("elem_id") == "vizapp-cancel")
    rollout_id = next(c["id"] for c in demo.config["components"] if c["props"].get("elem_id") == "vizapp-rollout-plot")
    on_cancel = [d for d in deps if [cancel_id, "click"] in [list(t) for t in d["targets"]]]
    cancels = {i for d in on_cancel for i in d["cancels"]}
    long_events = {d["id"] for d in deps if d["api_name"] in ("analyze", "compare") or rollout_id in d["outputs"]}
    assert len(long_events) == 2 + 6 and long_events <= cancels
    assert any(demo.fns[d["id"]].fn is ui.handlers.cancel_running for d in on_cancel)


def test_cost_of_slow_operations_is_shown_before_they_run(analysed):
    assert "49 max-flow problems on a graph of 3 x 50 nodes (5,000 edges)" in analysed.map_cost
    assert "estimate" in analysed.map_cost and "VIZAPP_REQUEST_SECONDS" in analysed.map_cost
    assert "**Compare** runs 170 images through the model at 16 curve steps" in analysed.compare_cost
