"""Swin (windowed attention): exact capture against timm's explicit path, window/shift geometry by hand, per-layer
query maps, mean distance in input pixels, rollout and class maps through windows and patch merging."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import vizapp
from tests.conftest import needs_timm_1_0_31, random_image
from vizapp.analysis import windows as W
from vizapp.errors import BadParameterError
from vizapp.swin_result import WindowAnalysis, analyze_image
from vizapp.windows import WindowCapture

# a 6x10 grid with window 4 (padded to 8x12; shifted blocks wrap), then 3x5 (window clamped to 3 rows)
TINY = dict(img_size=(24, 40), embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=4, num_classes=5)


def _timm_swin(**kw):
    import timm

    torch.manual_seed(0)
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, **{**TINY, **kw}).eval()


@pytest.fixture(scope="module")
def vm():
    torch.manual_seed(0)
    return vizapp.load_model("swin_tiny_patch4_window7_224", pretrained=False, device="cpu", **TINY)


def _explicit(model, x):
    """timm's own explicit attention (fused_attn off): what its attn_drop receives, per layer."""
    seen = []
    hooks = [
        b.attn.attn_drop.register_forward_hook(lambda _m, a, _o: seen.append(a[0].detach().clone()))
        for s in model.layers
        for b in s.blocks
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


@pytest.mark.parametrize("fused", [False, True])
def test_capture_equals_timm_explicit_attention(fused):
    model = _timm_swin()
    x = torch.randn(2, 3, 24, 40)
    ref = _explicit(model, x)
    for s in model.layers:
        for b in s.blocks:
            b.attn.fused_attn = fused  # fused: timm calls SDPA with the bias + shift mask as attn_mask
    with torch.no_grad(), WindowCapture(model) as cap:
        out = model(x)
    assert len(cap) == 4 == len(ref)
    for i in range(4):
        a = cap.attention(i)
        assert a.shape[:3] == (2, cap.geometry[i].num_windows, (2, 2, 4, 4)[i])
        torch.testing.assert_close(a.reshape(ref[i].shape), ref[i], atol=1e-5, rtol=0)
    for s in model.layers:
        for b in s.blocks:
            b.attn.fused_attn = False
    torch.testing.assert_close(out, model(x).detach(), atol=1e-5, rtol=0)  # the forward is unchanged
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())  # hooks removed


def test_geometry_read_from_the_forward():
    model = _timm_swin()
    with torch.no_grad(), WindowCapture(model) as cap:
        model(torch.randn(1, 3, 24, 40))
    g = cap.geometry
    assert [x.grid for x in g] == [(6, 10), (6, 10), (3, 5), (3, 5)]
    assert [x.window for x in g] == [(4, 4), (4, 4), (3, 4), (3, 4)]  # timm clamps the window to a 3-row grid
    assert [x.shift for x in g] == [(0, 0), (2, 2), (0, 0), (0, 2)]
    assert [x.stage for x in g] == [0, 0, 1, 1]


def test_window_index_by_hand_4x4_window2_shift1():
    # roll by -1: canvas[i, j] = token ((i + 1) % 4, (j + 1) % 4); windows row-major over the canvas
    idx = W.window_index((4, 4), (2, 2), (1, 1))
    assert idx.tolist() == [[5, 6, 9, 10], [7, 4, 11, 8], [13, 14, 1, 2], [15, 12, 3, 0]]
    assert W.window_index((4, 4), (2, 2), (0, 0)).tolist() == [
        [0, 1, 4, 5],
        [2, 3, 6, 7],
        [8, 9, 12, 13],
        [10, 11, 14, 15],
    ]
    # a 3x3 grid, window 2: padded to 4x4; timm shifts then pads (canvas rows 4 5 3 / 7 8 6 / 1 2 0 / padding),
    # transformers pads then shifts (canvas rows 4 5 - 3 / 7 8 - 6 / padding / 1 2 - 0)
    assert W.window_index((3, 3), (2, 2), (1, 1), pad_first=False).tolist()[0] == [4, 5, 7, 8]
    assert W.window_index((3, 3), (2, 2), (1, 1), pad_first=False).tolist()[3] == [0, -1, -1, -1]
    assert W.window_index((3, 3), (2, 2), (1, 1), pad_first=True).tolist()[1] == [-1, 3, -1, 6]
    assert W.window_index((3, 3), (2, 2), (1, 1), pad_first=True).tolist()[3] == [-1, -1, -1, 0]


def test_shifted_window_corner_tokens_see_only_themselves():
    """4x4 grid, window 2, shift 1: the last window holds tokens 15, 12, 3, 0, one from each corner; timm's shift
    mask (-100) keeps every one of them apart, so each attends (almost) only to itself."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model(
        "swin_tiny_patch4_window7_224",
        pretrained=False,
        img_size=16,
        embed_dim=8,
        depths=(2,),
        num_heads=(2,),
        window_size=2,
        num_classes=3,
    ).eval()
    with torch.no_grad(), WindowCapture(model) as cap:
        model(torch.randn(1, 3, 16, 16))
    g = cap.geometry[1]
    assert (g.grid, g.window, g.shift) == ((4, 4), (2, 2), (1, 1))
    a = cap.attention(1)[0]  # [nW, H, 4, 4]
    torch.testing.assert_close(a[3], torch.eye(4).expand(2, 4, 4), atol=1e-6, rtol=0)
    # window 1 = tokens 7, 4, 11, 8: columns 3 and 0 of rows 1-2 -> two pairs
    pairs = (a[1] > 1e-6).float()
    assert pairs[0].tolist() == [[1, 0, 1, 0], [0, 1, 0, 1], [1, 0, 1, 0], [0, 1, 0, 1]]


def test_query_map_by_hand():
    idx = W.window_index((4, 4), (2, 2), (1, 1))
    wins = torch.zeros(4, 1, 4, 4)
    wins[3, 0, 3] = torch.tensor([0.1, 0.2, 0.3, 0.4])  # token 0's row in window 3 (keys 15, 12, 3, 0)
    m = W.query_map(wins, idx, (4, 4), 0)[0]
    expect = torch.zeros(16)
    expect[[15, 12, 3, 0]] = torch.tensor([0.1, 0.2, 0.3, 0.4])
    torch.testing.assert_close(m.reshape(-1), expect)
    assert sorted(W.window_cells(idx, 0).tolist()) == [0, 3, 12, 15]


def test_full_attention_matches_dense_scatter():
    idx = W.window_index((3, 5), (2, 2), (1, 1))
    torch.manual_seed(1)
    wins = torch.rand(idx.shape[0], 2, 4, 4)
    full = W.full_attention(wins, idx, 15)
    dense = torch.zeros(2, 15, 15)
    for w in range(idx.shape[0]):
        for i in range(4):
            for j in range(4):
                if idx[w, i] >= 0 and idx[w, j] >= 0:
                    dense[:, idx[w, i], idx[w, j]] = wins[w, :, i, j]
    torch.testing.assert_close(full, dense)
    v = torch.rand(15, dtype=torch.float64)
    torch.testing.assert_close(W.row_times_windows(v, wins[:, 0].double(), idx), v @ dense[0].double())


def test_mean_distance_by_hand():
    # one 2x2 window of 4-px tokens, uniform attention: distances 0, 4, 4, 4√2 from every query
    idx = W.window_index((2, 2), (2, 2), (0, 0))
    wins = torch.full((1, 1, 4, 4), 0.25)
    d = W.mean_distance(wins, idx, (2, 2), (4, 4))
    assert float(d[0]) == pytest.approx((0 + 4 + 4 + 4 * 2**0.5) / 4)
    # attention to self: 0; at stage 1 (8-px spacing) the uniform value doubles
    assert float(W.mean_distance(torch.eye(4)[None, None], idx, (2, 2), (4, 4))[0]) == 0.0
    assert float(W.mean_distance(wins, idx, (2, 2), (8, 8))[0]) == pytest.approx(2 * (8 + 4 * 2**0.5) / 4)


def test_merge_matrix_equal_shares():
    m = W.merge_matrix((3, 3))  # padded to 4x4 -> 2x2; edge tokens merge 2 or 1 real sources
    assert m.shape == (4, 9)
    assert m[0].tolist() == [0.25, 0.25, 0, 0.25, 0.25, 0, 0, 0, 0]
    assert m[1].tolist() == [0, 0, 0.5, 0, 0, 0.5, 0, 0, 0]
    assert m[3].tolist() == [0] * 8 + [1.0]
    torch.testing.assert_close(m.sum(1), torch.ones(4, dtype=torch.float64))
    v = torch.rand(4, dtype=torch.float64)
    torch.testing.assert_close(W.through_merge(v, (3, 3)), v @ m)
    v = torch.rand(15, dtype=torch.float64)
    torch.testing.assert_close(W.through_merge(v, (6, 10)), v @ W.merge_matrix((6, 10)))


def test_rollout_through_merge_by_hand():
    """Two layers: a 2x2 grid (one window, attention A), a merge to 1x1, a 1x1 layer. The pooled output's row is
    [1]; the 1x1 layer's Â = 1; the merge gives [¼, ¼, ¼, ¼]; then · (0.5·A + 0.5·I)."""
    a = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.0, 1.0, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25], [0.5, 0.0, 0.0, 0.5]])
    idx0 = W.window_index((2, 2), (2, 2), (0, 0))
    idx1 = W.window_index((1, 1), (1, 1), (0, 0))
    fused = [a[None].double(), torch.ones(1, 1, 1, dtype=torch.float64)]
    row = W.rollout_through(fused, [idx0, idx1], [(2, 2), (1, 1)], torch.ones(1, dtype=torch.float64))
    expect = torch.full((4,), 0.25, dtype=torch.float64) @ (0.5 * a.double() + 0.5 * torch.eye(4, dtype=torch.float64))
    torch.testing.assert_close(row, expect)
    assert expect.tolist() == pytest.approx([0.30625, 0.29375, 0.16875, 0.23125])
    assert float(row.sum()) == pytest.approx(1.0)


def test_rollout_equals_dense_product(vm):
    """The windowed rollout equals the dense product w · Â_3 · Â_2 · M · Â_1 · Â_0 built from full [N, N] maps."""
    r = analyze_image(vm, random_image(0))
    mats = []
    for layer in range(r.num_layers):
        full = r.full_attention(layer).double().mean(0)
        full = full / full.sum(-1, keepdim=True)
        mats.append(0.5 * full + 0.5 * torch.eye(full.shape[0], dtype=torch.float64))
    n_last = r.tokens_per_layer[-1]
    v = torch.full((n_last,), 1.0 / n_last, dtype=torch.float64)
    v = v @ mats[3] @ mats[2] @ W.merge_matrix((6, 10)) @ mats[1] @ mats[0]
    np.testing.assert_allclose(r.rollout(), v.reshape(6, 10).numpy(), atol=1e-6)


def test_analysis_views(vm):
    r = vizapp.analyze(vm, random_image(0))
    assert isinstance(r, WindowAnalysis)
    assert r.layer_grids == ((6, 10), (6, 10), (3, 5), (3, 5))
    assert r.heads_per_layer == (2, 2, 4, 4)
    m = r.attention(2, query=(1, 3))
    assert m.shape == (4, 3, 5)
    mask = r.window_mask(2, (1, 3))
    assert np.all(m[:, ~mask] == 0) and np.all(m[:, mask] > 0)
    np.testing.assert_allclose(m.sum((1, 2)), 1.0, atol=1e-5)  # no padding in this window's real row mass
    assert r.attention(2, 3, (1, 3)).shape == (3, 5)
    assert r.mean_distance.shape == (4, 4)
    assert np.isnan(r.mean_distance[:2, 2:]).all() and np.isfinite(r.mean_distance[2:]).all()
    assert r.padded_layers == (0, 1, 2, 3)
    with pytest.raises(vizapp.errors.BadParameterError, match="class token"):
        r.attention(0, query="cls")
    with pytest.raises(vizapp.errors.BadParameterError, match="out of range"):
        r.attention(0, head=3)
    with pytest.raises(vizapp.errors.BadParameterError, match="outside"):
        r.attention(2, query=(5, 0))
    with pytest.raises(vizapp.errors.BadParameterError, match="Transformer Attribution"):
        r.explain("transformer_attribution")
    assert r.relative_bias[0].shape == (2, 7, 7) and r.relative_bias[2].shape == (4, 5, 7)
    s = r.summary()
    assert s["layer_grids"] == [[6, 10], [6, 10], [3, 5], [3, 5]]


def test_class_maps_graph_equals_rerun(vm):
    img = random_image(3)
    plain = analyze_image(vm, img)
    kept = analyze_image(vm, img, gradients=True)
    for c in (0, 2):
        np.testing.assert_allclose(plain.relevance(c), kept.relevance(c), atol=1e-6)
        np.testing.assert_allclose(plain.grad_rollout(c), kept.grad_rollout(c), atol=1e-6)
        assert plain.grad_rollout(c).sum() == pytest.approx(1.0)
        assert plain.relevance(c).shape == (6, 10)


def test_weights_read_when_analysing():
    """A model edited in place after loading: the analysis sees the new relative-position bias."""
    torch.manual_seed(0)
    vm = vizapp.load_model("swin_tiny_patch4_window7_224", pretrained=False, device="cpu", **{**TINY, "num_classes": 4})
    img = random_image(1)
    before = analyze_image(vm, img)
    with torch.no_grad():
        vm.model.layers[0].blocks[0].attn.relative_position_bias_table.add_(
            3.0 * torch.randn_like(vm.model.layers[0].blocks[0].attn.relative_position_bias_table)
        )
    after = analyze_image(vm, img)
    assert not torch.allclose(before.windows[0], after.windows[0])
    assert not torch.allclose(before.relative_bias[0], after.relative_bias[0])
    ref = _explicit(vm.model, after.input)
    torch.testing.assert_close(after.windows[0], ref[0].reshape(after.windows[0].shape), atol=1e-5, rtol=0)
    with pytest.raises(vizapp.errors.StaleResultError):
        before.relevance(0)  # its model changed since: refused, not silently recomputed


@pytest.mark.parametrize("kind", ["swin", "swinv2"])
def test_transformers_swin_capture_equals_eager_attention(tmp_path, kind):
    """A transformers Swin / Swinv2 folder (save_pretrained, random weights, a 9x9 grid padded to windows of 4):
    vizapp's capture (SDPA for Swin, the explicit path's probabilities for Swinv2) equals the attention weights of the
    library's eager implementation, layer by layer."""

    model_cls, cfg = hf_swin(kind)
    random_tables(model_cls(cfg)).save_pretrained(tmp_path)
    vm = vizapp.load_model(str(tmp_path), device="cpu")
    r = vizapp.analyze(vm, random_image(0))
    assert isinstance(r, WindowAnalysis) and vm.family == "hf"
    assert r.layer_grids == ((9, 9), (9, 9), (5, 5), (5, 5)) and r.heads_per_layer == (2, 2, 4, 4)
    assert r.padded_layers == (0, 1, 2, 3)
    eager = model_cls.from_pretrained(tmp_path, attn_implementation="eager").eval()
    seen = []  # Swin's eager attention returns (output, weights) from every layer
    blocks = [blk for stage in eager.swin.encoder.layers for blk in stage.blocks] if kind == "swin" else []
    hooks = [b.attention.register_forward_hook(lambda _m, _a, o: seen.append(o[1].detach())) for b in blocks]
    with torch.no_grad():
        out = eager(pixel_values=r.input, output_attentions=True)
    for h in hooks:
        h.remove()
    if kind == "swin":  # every layer's eager weights
        assert len(seen) == 4
        for i in range(4):
            torch.testing.assert_close(r.windows[i], seen[i].reshape(r.windows[i].shape), atol=1e-5, rtol=0)
    # the attentions transformers returns (the last block of each stage)
    for i, a in zip((1, 3), out.attentions, strict=True):
        torch.testing.assert_close(r.windows[i], a.reshape(r.windows[i].shape), atol=1e-5, rtol=0)
    assert r.rollout().shape == (9, 9) and r.rollout().sum() == pytest.approx(1.0)
    assert r.relevance(1).shape == (9, 9)
    # the position view: Swin's table, Swin V2's continuous bias 16·sigmoid(MLP) (values in (0, 16))
    bias = r.relative_bias[2]
    assert bias.shape == (4, 7, 7)
    if kind == "swinv2":
        assert float(bias.min()) > 0 and float(bias.max()) < 16
    else:  # the table as the model indexes it: query p and key k of a window get table[index[p, k]], which the
        # view shows at (Δrow, Δcol) = p - k (the table random: transformers initialises it to zeros)
        site = vm.model.swin.encoder.layers[1].blocks[0].attention.relative_position_bias
        table, index = site.relative_position_bias_table.detach(), site.relative_position_index.view(16, 16)
        assert float(table.abs().min()) > 0
        for p_, k_ in itertools.product(range(16), repeat=2):
            (pr, pc), (kr, kc) = divmod(p_, 4), divmod(k_, 4)
            torch.testing.assert_close(bias[:, pr - kr + 3, pc - kc + 3], table[index[p_, k_]], atol=0, rtol=0)
    # the app's Position tab for the folder: layer 2's bias, the same values; Swin V2 says its bias is computed
    from vizapp import ui

    pos = ui.render_pos(str(tmp_path), 0, 0, 0, 2, 0, trusted_model=str(tmp_path))
    shown = np.asarray(pos.pos.data[0].customdata, dtype=float)[..., 3]
    assert np.nanmax(shown) == pytest.approx(float(bias.max()), abs=1e-6)
    assert np.nanmin(shown) == pytest.approx(float(bias.min()), abs=1e-6)
    assert ("Swin V2 computes it" in pos.pos_note) == (kind == "swinv2")


def test_analyze_a_batch_equals_each_image():
    torch.manual_seed(0)
    vm = vizapp.load_model("swin_tiny_patch4_window7_224", pretrained=False, device="cpu", **{**TINY, "num_classes": 3})
    both = vizapp.analyze(vm, [random_image(0), random_image(1)])
    one = vizapp.analyze(vm, random_image(1))
    assert all(isinstance(r, WindowAnalysis) for r in both)
    for a, b in zip(both[1].windows, one.windows, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    np.testing.assert_allclose(both[1].rollout(), one.rollout(), atol=1e-6)
    np.testing.assert_allclose(both[1].mean_distance, one.mean_distance, atol=1e-5)


def hf_swin(kind: str, **overrides) -> tuple:
    """(model class, config) of a tiny transformers Swin ("swin") or Swinv2 ("swinv2") classifier: 36 px, 4-px
    patches, a 9x9 first grid padded to windows of 4, then 5x5 (``overrides``: more config fields); the torch seed
    set for its random weights."""
    import transformers as tf

    cfg_cls, model_cls = {
        "swin": (tf.SwinConfig, tf.SwinForImageClassification),
        "swinv2": (tf.Swinv2Config, tf.Swinv2ForImageClassification),
    }[kind]
    torch.manual_seed(0)
    cfg = cfg_cls(
        image_size=36,
        patch_size=4,
        embed_dim=16,
        depths=[2, 2],
        num_heads=[2, 4],
        window_size=4,
        num_labels=5,
        **overrides,
    )
    return model_cls, cfg


def random_tables(model: torch.nn.Module, seed: int = 0, std: float = 1.0) -> torch.nn.Module:
    """``model`` with every relative-position bias table filled with N(0, std²) values. transformers initialises
    Swin's tables to zeros, and a zero table hides any mistake in how the bias is read, indexed or added (a capture
    that dropped it, a view that transposed it, would pass every comparison)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("relative_position_bias_table"):
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def write_swin_folder(folder, heads=(3, 6), seed=0) -> str:
    """A tiny random-weight transformers Swin classifier saved as a user brings one (``save_pretrained``: config +
    safetensors): 36 px, 4-px patches, a 9x9 first grid padded to windows of 4, then 5x5; ``heads`` per stage."""
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.SwinConfig(
        image_size=36, patch_size=4, embed_dim=24, depths=[2, 2], num_heads=list(heads), window_size=4, num_labels=5
    )
    random_tables(tf.SwinForImageClassification(cfg), seed).save_pretrained(folder)
    return str(folder)


def test_the_app_analyses_a_swin_model(vm, monkeypatch):
    """The picker's Swin entry with random weights (the tiny Swin stands in for Swin-T): Analyze draws every tab
    from the windowed record, the Heads tab at the chosen layer's grid with the query's window outlined, and the
    Position tab reads each layer's bias from the weights."""
    import plotly.graph_objects as go

    from vizapp import ui
    from vizapp.ui import handlers, startup
    from vizapp.views_windows import layer_query

    name = "swin_tiny_patch4_window7_224.ms_in1k"
    assert name in dict(startup.CURATED)
    monkeypatch.setattr(handlers, "_load", lambda *a, **k: vm)  # the tiny Swin, not a 28M-parameter Swin-T
    out = ui.analyze_image(random_image(0), name, random_weights=True, progress=lambda *a, **k: None)
    assert "Windowed attention (Swin)" in out.status and "random weights" in out.status
    assert [c[1] for c in out.method["choices"]] == [
        "rollout",
        "flow",
        "grad_rollout",
        "relevance",
        "attnlrp",
        "legrad",
        "last_layer",
    ]
    assert "Transformer Attribution" in out.methods_note and "no class token" in out.methods_note
    assert "Attention flow for Swin runs on the graph its rollout multiplies along" in out.methods_note
    assert out.query_mode["value"] == "Clicked patch" and out.query_mode["interactive"] is False
    assert out.imp_exact_button["visible"] is True and out.imp_gradient_button["visible"] is True
    assert "12 heads (2, 2, 4, 4 in its 4 layers)" in out.importance_cost
    r = vizapp.analyze(vm, random_image(0))
    # head importance: the gradient estimate, [L, max H] with NaN where the first stage has 2 heads, as the API's
    imp = ui.run_importance(out.state, "gradient", "mean", None, progress=lambda *a, **k: None)
    z = np.asarray(imp.importance.data[0].z, dtype=float)
    # the app scores the very network its analysis came from (pinned), `vm`, whatever the cache holds now
    want = vizapp.ablation.head_importance(vm, r.input, mode="mean", method="gradient").drop.numpy()
    assert z.shape == (4, 4) and np.isnan(z[:2, 2:]).all() and np.isfinite(z[2:]).all()
    np.testing.assert_allclose(z, want, atol=1e-6)
    # the Heads tab: layer 3 (3x5 grid, 4 heads), first-grid token (5, 9) -> (2, 4) on layer 3
    heads = ui.render_heads(out.state, 3, "Clicked patch", 5, 9, False, 1, 0.6)
    assert heads.state["query"] == (5, 9)
    z = np.asarray(heads.heads.data[0].z, dtype=float)
    np.testing.assert_allclose(z[:3, :5], r.attention(3, 0, (2, 4)), atol=1e-6)  # head 0's tile, raw weights
    focus = heads.focus
    heat = next(t for t in focus.data if isinstance(t, go.Heatmap))
    assert np.asarray(heat.z).shape == (3, 5) and heat.dx == 8
    mask = r.window_mask(3, layer_query(r, 3, (5, 9)))
    assert ((np.asarray(heat.z, dtype=float) > 0) <= mask).all()  # nothing outside the query's window
    assert any(isinstance(t, go.Scatter) and t.name == "window" for t in focus.data)
    # a head the layer does not have (layer 0 has 2): the mean of its heads, said in the title
    low = ui.render_heads(out.state, 0, "Clicked patch", 1, 1, True, 3, 0.6).focus
    assert "heads 0..1 only" in low.layout.title.text
    # the Position tab: layer 2's table, read from the weights
    pos = ui.render_pos(name, 0, 0, 0, 2, 0)
    bias = next(t for t in pos.pos.data if isinstance(t, go.Heatmap))
    assert "relative-position bias" in pos.pos.layout.title.text and pos.pos_layer["maximum"] == 3
    table = vm.model.layers[1].blocks[0].attn.relative_position_bias_table.detach()  # [(2w-1)², H] for layer 2
    custom = np.asarray(bias.customdata, dtype=float)
    assert np.nanmax(custom[..., 3]) == pytest.approx(float(table.max()), abs=1e-6)
    # the export holds each layer's window attention as the forward used it
    npz = np.load(ui.export_files(out.state).npz_file)
    for i, w in enumerate(r.windows):
        np.testing.assert_allclose(npz[f"layer{i}_windows"], w.numpy(), atol=1e-6)


def test_views_draw_each_layer_on_its_grid_with_the_window(vm):
    import plotly.graph_objects as go

    from vizapp import views_windows as V

    r = vizapp.analyze(vm, random_image(2))
    figs = V.render_all(r, layer=3, query=(1, 2), head=1)
    assert {"topk", "rollout", "heads", "focus", "distance", "pos"} <= set(figs)
    focus = figs["focus"]
    heat = next(t for t in focus.data if isinstance(t, go.Heatmap))
    assert np.asarray(heat.z).shape == (3, 5) and heat.dx == 8 and heat.dy == 8  # stage 1: 8-px tokens
    outline = next(t for t in focus.data if isinstance(t, go.Scatter) and t.name == "window")
    xs = [x for x in outline.x if x is not None]
    ys = [y for y in outline.y if y is not None]
    # query (1, 2) on layer 3 (window 3x4, shift (0, 2)): its window holds columns 2, 3, 4 and 0 (wrapped)
    assert r.window_mask(3, (1, 2))[0].tolist() == [True, False, True, True, True]
    assert min(xs) == 0 and max(xs) == 40 and min(ys) == 0 and max(ys) == 24
    assert "padded tokens are not drawn" in focus.layout.title.text
    assert np.asarray(next(t for t in figs["rollout"].data if isinstance(t, go.Heatmap)).z).shape == (6, 10)
    dist = figs["distance"].data[0]
    assert np.isnan(np.asarray(dist.y, dtype=float)).sum() == 4  # 2 heads missing on each of layers 0 and 1
    pos = figs["pos"].data[0]
    assert isinstance(pos, go.Heatmap) and "Δrow" in pos.hovertemplate
    grad = V.map_view(r, "relevance", 1)
    assert f"for '{r.labels[1]}'" in grad.layout.title.text
    assert V.layer_query(r, 3, (5, 9)) == (2, 4) and V.layer_query(r, 0, (5, 9)) == (5, 9)
    assert "padded" in V.padded_tokens_note(r)
    flow = V.map_view(r, "flow")  # over the first stage's grid, drawn 4 px apart
    heat = next(t for t in flow.data if isinstance(t, go.Heatmap))
    assert flow.layout.title.text.replace("<br>", " ").startswith("Attention flow through windows and patch merging")
    np.testing.assert_allclose(np.asarray(heat.customdata, dtype=float)[..., 2], r.attention_flow(), atol=1e-6)
    with pytest.raises(vizapp.errors.BadParameterError, match="Transformer Attribution"):
        V.map_view(r, "transformer_attribution")


def test_faithfulness_over_the_first_grid(vm):
    r = analyze_image(vm, random_image(4))
    out = r.faithfulness({"rollout": r.rollout()}, class_idx=0, steps=4)
    assert set(out) == {"rollout", "random"}
    dele = out["rollout"]["deletion"]
    assert len(dele.fractions) == 5 and dele.fractions[0] == 0 and dele.fractions[-1] == 1
    with torch.no_grad():
        p0 = torch.softmax(vm.logits(r.input), -1)[0, 0].item()
    assert dele.probs[0] == pytest.approx(p0, abs=1e-5)  # nothing removed yet: the model's own probability
    # a map on the last stage's grid is refused, and the message says which grid the maps must be on
    with pytest.raises(BadParameterError, match=r"\(the first stage's\)$"):
        r.faithfulness({"last": r.last_layer_attention()}, class_idx=0, steps=4)


def _observed_window_index(site, block_in, attn_in, grid, post_norm):
    """Which grid token the library put in each window slot, read from its own forward: the attention module's input
    rows (image 0) matched against the block's tokens (normalised first, except in Swin V2's post-norm blocks); a
    zero row is padding (-1)."""
    norm = getattr(site.block, "norm1", None) or getattr(site.block, "layernorm_before", None)
    with torch.no_grad():
        tokens = (block_in if post_norm else norm(block_in)).reshape(-1, grid[0] * grid[1], block_in.shape[-1])[0]
    nw = attn_in.shape[0] // block_in.shape[0]
    rows = attn_in[:nw]  # [nW, w², C]
    dist = torch.cdist(rows.reshape(-1, rows.shape[-1]), tokens, compute_mode="donot_use_mm_for_euclid_dist")
    found = dist.argmin(-1)
    found[rows.reshape(-1, rows.shape[-1]).abs().sum(-1) == 0] = -1
    assert torch.all((dist.min(-1).values < 1e-4) | (found == -1))
    return found.view(nw, -1)


@pytest.mark.parametrize(
    "family", ["timm_swin", pytest.param("timm_swinv2", marks=needs_timm_1_0_31), "hf_swin", "hf_swinv2"]
)
def test_window_index_matches_the_library_forward(family, tmp_path):
    """The geometry vizapp replays (window_index from the grid, window, shift and padding order it read) equals the
    token in every window slot of the library's own forward, for timm (shift, then pad) and transformers (pad, then
    shift), on grids that need padding."""
    from vizapp.windows import window_sites

    if family.startswith("timm"):
        import timm

        name = "swin_tiny_patch4_window7_224" if family == "timm_swin" else "swinv2_tiny_window8_256"
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False, **TINY).eval()
        x = torch.randn(1, 3, 24, 40)
        run = lambda: model(x)  # noqa: E731
    else:
        import transformers as tf

        cfg_cls, model_cls = (tf.SwinConfig, tf.SwinModel) if family == "hf_swin" else (tf.Swinv2Config, tf.Swinv2Model)
        torch.manual_seed(0)
        model = model_cls(
            cfg_cls(image_size=36, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=4)
        ).eval()
        x = torch.randn(1, 3, 36, 36)
        run = lambda: model(pixel_values=x)  # noqa: E731
    sites = window_sites(model)
    seen: dict[int, list] = {}
    hooks = []
    for i, site in enumerate(sites):
        hooks.append(
            site.block.register_forward_pre_hook(
                lambda _m, a, i=i: seen.setdefault(i, []).append(a[0].detach()), with_kwargs=False
            )
        )
        hooks.append(site.attn.register_forward_pre_hook(lambda _m, a, i=i: seen[i].append(a[0].detach())))
    with torch.no_grad(), WindowCapture(model) as cap:
        run()
    for h in hooks:
        h.remove()
    for i, site in enumerate(sites):
        g = cap.geometry[i]
        observed = _observed_window_index(site, seen[i][0], seen[i][1], g.grid, family.endswith("v2"))
        assert torch.equal(observed, W.window_index(g.grid, g.window, g.shift, g.pad_first)), (i, g)


def test_windowed_memory_budget(vm, monkeypatch):
    """The windowed estimate's record term is the record an analysis keeps; a limit below the estimate refuses the
    model at load (the plain ViT's N x N estimate refused Swin-B at 384 px, 2.8 GB, where this one says 0.24 GB)."""
    from dataclasses import replace

    from vizapp import budget
    from vizapp.models import MODEL_CACHE, swin

    r = vizapp.analyze(vm, random_image(0))
    terms = swin.analysis_memory(vm)
    assert terms["record"] == sum(w.numel() * 4 for w in r.windows)
    monkeypatch.setattr(budget, "BUDGET", replace(budget.BUDGET, max_analysis_bytes=sum(terms.values()) - 1))
    MODEL_CACHE.clear()
    with pytest.raises(vizapp.errors.ModelTooLargeError, match="VIZAPP_MAX_ANALYSIS_BYTES"):
        vizapp.load_model("swin_tiny_patch4_window7_224", pretrained=False, device="cpu", **TINY)


def test_the_batch_api_gives_each_images_own_class_maps(vm):
    """``vizapp.explain`` of a Swin batch: the class maps come from one forward and one backward of the batch (a
    Swin batch's windows never mix images) and equal each image's own analysis, for one class per image."""
    imgs = [random_image(40 + i) for i in range(3)]
    names = ["grad_rollout", "relevance", "rollout"]
    maps = vizapp.explain(vm, imgs, names, classes=[1, 3, 0])
    for i, (img, c) in enumerate(zip(imgs, [1, 3, 0], strict=True)):
        r = vizapp.analyze(vm, img)
        for name in names:
            want = r.explain(name, None if name == "rollout" else c)
            np.testing.assert_allclose(maps[name][i], want, rtol=1e-5, atol=1e-7, err_msg=f"{name} {i}")
    assert not np.allclose(maps["relevance"][0], vizapp.analyze(vm, imgs[0]).explain("relevance", 3))
