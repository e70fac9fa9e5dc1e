"""Figures a person can read: titles that fit, overlays on the pixels they describe, numbers without SI suffixes."""

from __future__ import annotations

import numpy as np

from vizapp import figures


def test_long_titles_wrap_at_spaces_and_markup_stays_whole():
    text = "Layer 11: attention of patch (3, 4) to every patch, per head, rescaled to each head's own min and max"
    wrapped = figures._wrap(text, 40)
    lines = wrapped.split("<br>")
    assert len(lines) == 3 and all(len(line) <= 40 for line in lines)
    assert " ".join(lines) == text  # only spaces became breaks
    sub = "Feature PCA<br><sub>" + "x " * 50 + "</sub>"
    assert figures._wrap(sub, 12) == sub


def test_every_figure_comes_out_readable():
    maps = np.random.default_rng(0).random((12, 4, 4)).astype(np.float32) * 1e-7  # tiny values: SI would say "100n"
    fig = figures.heads_figure(maps, 3, "a patch with a long description " * 3, per_head_scale=False)
    lines = fig.layout.title.text.split("<br>")
    assert len(lines) > 1 and all(len(line) <= figures.TITLE_CHARS for line in lines)
    assert fig.layout.margin.t >= 28 + 19 * len(lines)  # room for every line
    assert fig.data[0].colorbar.exponentformat == "e"
    # head labels sit inside their own tile (top-left corner), not above it in the tile above
    first = fig.layout.annotations[0]
    assert (first.x, first.y, first.xanchor, first.yanchor) == (-0.5, -0.5, "left", "top")
    public = [n for n in dir(figures) if n.endswith("_figure") and not n.startswith("_")]
    assert public and all(hasattr(getattr(figures, n), "__wrapped__") for n in public)


def test_overlay_image_and_patches_cover_the_same_pixels():
    image = np.zeros((28, 28, 3), dtype=np.uint8)
    heat = np.arange(49, dtype=np.float32).reshape(7, 7)
    fig = figures.overlay_figure(image, heat, (4, 4))
    img, hm = fig.data
    # go.Image centres pixel i at x0 + i, so it spans [x0 - 0.5, x0 + W - 0.5]; the heatmap's cells span [0, 7 * 4].
    assert (img.x0 - 0.5, img.x0 - 0.5 + 28) == (hm.x0 - hm.dx / 2, hm.x0 - hm.dx / 2 + 7 * hm.dx) == (0.0, 28.0)
    assert tuple(fig.layout.xaxis.range) == (0, 28)


def test_a_count_is_drawn_as_a_count():
    image = np.zeros((8, 8, 3), dtype=np.uint8)
    count = np.array([[0, 1], [2, 3]], dtype=np.float32)
    fig = figures.overlay_figure(image, count, (4, 4), value_name="heads", rescale=False)
    assert fig.data[1].colorbar.title.text == "heads"
    np.testing.assert_array_equal(fig.data[1].z, count)
    rescaled = figures.overlay_figure(image, count, (4, 4))
    assert rescaled.data[1].colorbar.title.text == "rescaled" and float(np.max(rescaled.data[1].z)) == 1.0


def test_curve_legends_sit_below_the_plot():
    x = np.linspace(0, 1, 5)
    fig = figures.curves_figure({f"method {i}": (x, x, 0.5) for i in range(5)}, "deletion")
    assert fig.layout.legend.orientation == "h" and fig.layout.legend.y < 0


def test_perturbation_curves_say_what_was_removed():
    panels = (("pred.positive", "positive"),)
    curves = {"rollout": {"pred.positive": ([1.0, 0.5], 50.0)}}
    default = figures.perturbation_curves_figure(curves, panels, [0, 10], set(), "t")
    pixels = figures.perturbation_curves_figure(curves, panels, [0, 10], set(), "t", "pixels removed (%)")
    assert default.layout.xaxis.title.text == "patches removed (%)"
    assert pixels.layout.xaxis.title.text == "pixels removed (%)"


def test_compare_figure_leaves_room_above_for_wrapped_method_names():
    """A method name wrapped over two lines, its scores line and the figure's title all fit above the first row
    (seen overlapping in the app for Swin's long names): the top margin grows with the title lines."""
    from vizapp.figures.maps import compare_figure

    img = np.zeros((16, 16, 3), dtype=np.uint8)
    heat = np.arange(16, dtype=np.float32).reshape(4, 4)
    short = compare_figure(img, {"rollout": heat}, (4, 4), {"rollout": "AUC 0.1"})
    long_name = "GAE relevance (Chefer et al., ICCV 2021; through windows and merges)"
    long = compare_figure(img, {long_name: heat}, (4, 4), {long_name: "AUC 0.1"})
    assert long.layout.margin.t >= short.layout.margin.t + 2 * 18  # two more lines of subplot title
    title_lines = 4  # three lines of name and one of scores
    assert long.layout.margin.t >= 34 + 20 + title_lines * 18  # the figure title below the label chip, then them
    # lines for the app's narrowest column (240 px): the name at most 26 characters a line, each score on its own
    two = compare_figure(img, {long_name: heat}, (4, 4), {long_name: "deletion AUC 0.1<br>insertion AUC 0.2"})
    lines = two.layout.annotations[0].text.split("<br>")
    assert lines == ["GAE relevance (Chefer et", "al., ICCV 2021; through", "windows and merges)",
                     "<sub>deletion AUC 0.1</sub>", "<sub>insertion AUC 0.2</sub>"]  # fmt: skip
    assert two.layout.margin.t == long.layout.margin.t + 18  # room for the second score line
    # with two rows, the gap between them holds the lower row's five title lines (18 px each) too
    rows = compare_figure(img, dict.fromkeys(["a", "b", "c", long_name], heat), (4, 4), {long_name: "d<br>i"})
    area = rows.layout.height - rows.layout.margin.t - rows.layout.margin.b
    # from the first row's bottom to the second's top
    gap = (rows.layout.yaxis.domain[0] - rows.layout.yaxis4.domain[1]) * area
    assert gap >= 5 * 18 and rows.layout.margin.t == two.layout.margin.t


def test_a_head_statistic_is_one_dot_per_head_placed_by_hand():
    """2 layers x 2 heads: heads sit a quarter of a layer apart around their layer (jitter (h - 1/2) / 4); a layer
    whose last head is missing (NaN, a Swin stage with fewer heads) has its one head on its tick; each dot carries
    (layer, head, value) for a click, and the reference is one line."""
    values = np.array([[1.0, 2.0], [3.0, np.nan]])
    fig = figures.head_statistic_figure(
        values, (2.5, "uniform"), title="t", y_title="y (u)", hover="%{customdata[2]} u"
    )
    dots = fig.data[0]
    np.testing.assert_allclose(dots.x, [-0.125, 0.125, 1.0, 1.25])
    np.testing.assert_array_equal(dots.y, [1.0, 2.0, 3.0, np.nan])
    np.testing.assert_array_equal(np.asarray(dots.customdata)[:, :2], [[0, 0], [0, 1], [1, 0], [1, 1]])
    assert dots.hovertemplate.endswith("%{customdata[2]} u<extra></extra>")
    [line] = fig.layout.shapes
    assert (line.y0, line.y1) == (2.5, 2.5) and fig.layout.annotations[0].text == "uniform"
    assert fig.layout.yaxis.title.text == "y (u)"
    assert not figures.head_statistic_figure(values, None, title="t", y_title="y", hover="").layout.shapes
    # Swin-like: 2 heads, then 4 (a quarter of a layer over the widest layer's 4 heads: 1/8 between heads)
    swin = figures.head_statistic_figure(np.array([[1, 2, np.nan, np.nan], [3, 4, 5, 6.0]]), None, "t", "y", "")
    np.testing.assert_allclose(
        swin.data[0].x[[0, 1, 4, 5, 6, 7]], [-1 / 16, 1 / 16, 1 - 3 / 16, 1 - 1 / 16, 1 + 1 / 16, 1 + 3 / 16]
    )
    # the mean distance is this figure with its pixels and its uniform line
    dist = figures.distance_figure(values, 2.0)
    assert dist.layout.shapes[0].y0 == 2.0 and dist.layout.annotations[0].text == "uniform attention (2.0 px)"
