"""Plotly figures: numpy arrays in, ``go.Figure`` out. Never calls a model. The one package that imports plotly.

Big grids are drawn as one heatmap mosaic (tiles separated by a row/column of NaN), not as hundreds of subplots,
so a figure stays a few hundred kB of JSON and renders quickly. Every public ``*_figure`` is wrapped by
:func:`readable` (titles that fit, numbers without SI suffixes).

- :mod:`._base`: colour scales, title wrapping, PNG images, image axes, mosaics;
- :mod:`.maps`: attention and explanation maps, distances, position views, Compare;
- :mod:`.features`: the label-free views, head importance, the evaluation's curves, the figures .zip.
"""

from vizapp.figures._base import (
    COLOR_SCALES,
    HEAT_SCALE,
    MAX_HOVER_CELLS,
    SIM_SCALE,
    TITLE_CHARS,
    _colormap_lut,
    _wrap,
    readable,
)
from vizapp.figures.features import (
    class_depth_figure,
    figures_zip,
    importance_figure,
    masks_figure,
    norm_grid_figure,
    norm_histogram_figure,
    norms_by_depth_figure,
    pca_gallery_figure,
    pca_rgb_figure,
    perturbation_curves_figure,
    register_attention_figure,
)
from vizapp.figures.maps import (
    annotate_query,
    compare_figure,
    curves_figure,
    distance_figure,
    head_statistic_figure,
    heads_figure,
    overlay_figure,
    pos_embed_figure,
    pos_tile_figure,
    relative_bias_figure,
    topk_figure,
)

__all__ = [
    "COLOR_SCALES",
    "HEAT_SCALE",
    "MAX_HOVER_CELLS",
    "SIM_SCALE",
    "TITLE_CHARS",
    "_colormap_lut",
    "_wrap",
    "annotate_query",
    "class_depth_figure",
    "compare_figure",
    "curves_figure",
    "distance_figure",
    "head_statistic_figure",
    "figures_zip",
    "heads_figure",
    "importance_figure",
    "masks_figure",
    "norm_grid_figure",
    "norm_histogram_figure",
    "norms_by_depth_figure",
    "overlay_figure",
    "pca_gallery_figure",
    "pca_rgb_figure",
    "perturbation_curves_figure",
    "pos_embed_figure",
    "pos_tile_figure",
    "readable",
    "register_attention_figure",
    "relative_bias_figure",
    "topk_figure",
]
