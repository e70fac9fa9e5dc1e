"""Every figure of a windowed-attention (Swin) analysis, from a :class:`vizapp.swin_result.WindowAnalysis`.

Per-layer maps are drawn on that layer's own grid over the image, each token covering its stage's spacing in input
pixels (patch size x 2 per patch merging), with the query's (shifted) window outlined; rollout and the class maps
over the first stage's grid; mean distance with a dot only for the heads a layer has; the learned relative-position
bias per layer and head over (Δrow, Δcol). Views that are not defined for Swin say why in one sentence
(:data:`vizapp.swin_result.UNDEFINED`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vizapp import figures, methods, views
from vizapp.errors import BadParameterError
from vizapp.figures.windows import add_cell_outline, window_heads_figure
from vizapp.swin_result import CLASS_METHODS, METHODS, MODEL_METHODS, NOT_OFFERED, UNDEFINED, WindowAnalysis

#: method -> title
TITLES = {
    "rollout": "Attention rollout through windows and patch merging",
    "flow": "Attention flow through windows and patch merging",
    "grad_rollout": "Gradient rollout through windows and patch merging",
    "relevance": "Chefer et al. relevance through windows and patch merging",
    "attnlrp": "AttnLRP (input × LRP-modified gradient, signed) over the first stage's patches",
    "legrad": "LeGrad over the last stage's blocks",
    "last_layer": "Attention each last-stage token receives (mean over queries and heads)",
}
MERGE_NOTE = "a merged token is carried to its 2x2 sources in equal shares"
#: method -> the label the app's method choice shows
LABELS = {
    "rollout": "Attention rollout (through windows and merges)",
    "flow": "Attention flow (through windows and merges; slow)",
    "grad_rollout": "Gradient rollout (through windows and merges)",
    "relevance": "GAE relevance (Chefer et al., ICCV 2021; through windows and merges)",
    "attnlrp": "AttnLRP (Achtibat et al., ICML 2024)",
    "legrad": "LeGrad (Bousselham et al., 2024; the last stage's blocks)",
    "last_layer": "Attention each last-stage token receives",
}
#: the maps over the first stage's grid: the ones the deletion / insertion curves can follow
COMPARE_METHODS = ("rollout", "flow", "grad_rollout", "relevance", "attnlrp", "legrad")
#: the maps that cost far more than the others (Compare includes them only when asked; the Rollout tab's cost says)
SLOW_METHODS = ("flow",)


def _rules_missing(r: WindowAnalysis, method: str) -> str:
    """Why a method that runs the model with its own rules is not defined for this model ("" when it is)."""
    return methods.unavailable(r, method) if method in MODEL_METHODS else ""


def offered_methods(r: WindowAnalysis) -> list[str]:
    """The maps this analysis draws (the class maps only with a classifier head, AttnLRP and LeGrad where their rules
    hold for the model), in :data:`METHODS` order."""
    return [m for m in METHODS if (r.probs is not None or m not in CLASS_METHODS) and not _rules_missing(r, m)]


def methods_note(r: WindowAnalysis) -> str:
    """Markdown naming, once, the app's methods a windowed model does not offer and why, what attention flow, AttnLRP
    and LeGrad mean on it, and the unused control."""
    lines = [f"**{label}**: {why}" for label, why in NOT_OFFERED.values()]
    if r.probs is None:
        lines.append(
            "**Gradient rollout, GAE relevance, AttnLRP, LeGrad**: this model has no classifier head, so there is no "
            "class."
        )
    else:
        lines += [f"**{LABELS[m]}**: {_rules_missing(r, m)}." for m in MODEL_METHODS if _rules_missing(r, m)]
    note = "Not offered for this windowed-attention (Swin) model: " + " ".join(lines) + " " + UNDEFINED["discard"]
    defined = [methods.get(m).windowed for m in ("flow", *MODEL_METHODS) if m in offered_methods(r)]
    return note + ("\n\n" + " ".join(defined) if defined else "")


def default_query(r: WindowAnalysis, layer: int) -> tuple[int, int]:
    """The centre token of ``layer``'s grid."""
    gh, gw = r.layer_grids[layer]
    return (gh // 2, gw // 2)


def layer_query(r: WindowAnalysis, layer: int, query: Any) -> tuple[int, int]:
    """A query given on the first stage's grid (what a click on the image gives) moved onto ``layer``'s grid: the
    token whose pixels hold the clicked token's centre."""
    (g0h, g0w), (gh, gw) = r.layer_grids[0], r.layer_grids[layer]
    s0, s = r.strides[0], r.strides[layer]
    row = min(int((int(query[0]) + 0.5) * s0[0] // s[0]), gh - 1)
    col = min(int((int(query[1]) + 0.5) * s0[1] // s[1]), gw - 1)
    if not (0 <= int(query[0]) < g0h and 0 <= int(query[1]) < g0w):
        raise BadParameterError(f"token {tuple(query)} is outside the first stage's {g0h}x{g0w} grid")
    return row, col


def _padding_note(r: WindowAnalysis, layer: int) -> str:
    g = r.geometry[layer]
    if g.padded == g.grid:
        return ""
    return f"; grid {g.grid[0]}x{g.grid[1]} padded to {g.padded[0]}x{g.padded[1]} for its windows: padded tokens are not drawn"


def heads_view(
    r: WindowAnalysis, layer: int, query: Any, per_head_scale: bool = True, colorscale: str = figures.HEAT_SCALE
):
    """Every head of ``layer``: the query token's attention over the layer's grid (zero outside its window)."""
    layer = r._layer(layer)
    maps = r.attention(layer, None, query)
    g = r.geometry[layer]
    label = (
        f"token {tuple(int(v) for v in query)} of its {g.grid[0]}x{g.grid[1]} grid (window {g.window[0]}x"
        f"{g.window[1]}, shift {g.shift})"
    )
    return window_heads_figure(
        maps, layer, label, _padding_note(r, layer), per_head_scale, (int(query[0]), int(query[1])), colorscale
    )


def focus_view(
    r: WindowAnalysis,
    layer: int,
    head: int | None,
    query: Any,
    opacity: float = 0.6,
    colorscale: str = figures.HEAT_SCALE,
) -> Any:
    """One head's map (``head`` None: the mean of the layer's heads) over the image at ``layer``'s stage resolution,
    the query marked and its window outlined."""
    layer = r._layer(layer)
    if head is None:
        heat = r.attention(layer, None, query).mean(0)
        head_text = f"mean of its {r.heads_per_layer[layer]} heads"
    else:
        heat = r.attention(layer, head, query)
        head_text = f"head {head}"
    stride = r.strides[layer]
    fig = figures.overlay_figure(
        r.image,
        heat,
        stride,
        opacity,
        marker=(int(query[0]), int(query[1])),
        value_name="weight",
        title=f"Layer {layer} (stage {r.geometry[layer].stage}, tokens {stride[0]} px apart), {head_text}: "
        f"token {tuple(int(v) for v in query)}, its window outlined" + _padding_note(r, layer),
        colorscale=colorscale,
    )
    return add_cell_outline(fig, r.window_mask(layer, query), stride)


def map_view(
    r: WindowAnalysis,
    method: str = "rollout",
    class_idx: Any = None,
    opacity: float = 0.6,
    colorscale: str = figures.HEAT_SCALE,
    **kwargs: Any,
) -> Any:
    """A map of :data:`vizapp.swin_result.METHODS` over the image: rollout and the class maps on the first stage's
    grid, "last_layer" on the last stage's."""
    if method not in METHODS:
        r.explain(method)  # raises with the reason
    heat = r.explain(method, class_idx, **kwargs)
    layer = 0 if method != "last_layer" else r.num_layers - 1
    title = TITLES[method]
    said = [f"fusion {kwargs['head_fusion']}"] if "head_fusion" in kwargs else []
    said += [f"from layer {kwargs['start_layer']}"] if kwargs.get("start_layer") else []
    title += f" ({', '.join(said)})" if said else ""
    if method in CLASS_METHODS:
        title += f" for '{r.labels[r._class(class_idx)]}'" if r.labels else ""
    if method == "legrad":  # the registry's sentence is in the cost note; here the merge factor of this model
        s = 2 ** r.geometry[-1].stage
        title += f"; each last-stage token drawn over its {s}x{s} first-stage tokens"
    elif method in ("rollout", "flow", "grad_rollout", "relevance"):
        title += f"; the output averages the last stage's tokens; {MERGE_NOTE}"
    return figures.overlay_figure(
        r.image, heat, r.strides[layer], opacity, title=title, value_name=method, colorscale=colorscale
    )


def distance_view(r: WindowAnalysis) -> Any:
    """Mean attention distance in input pixels, one dot per head a layer has (Swin's head count grows by stage)."""
    spacing = ", ".join(
        f"stage {s}: {r.strides[i][0]} px"
        for s, i in sorted({g.stage: i for i, g in reversed(list(enumerate(r.geometry)))}.items())
    )
    return figures.distance_figure(
        r.mean_distance,
        None,
        title=f"Mean attention distance within windows, in input pixels (token spacing {spacing})",
    )


def head_statistic_view(r: WindowAnalysis, name: str) -> Any:
    """The Attention distance tab's plot of one registered per-head statistic: the mean distance as
    :func:`distance_view` draws it; any other over each layer's windows, without a reference line (a windowed row
    spans its window's real slots, whose number varies where a window is padded)."""
    if name == "distance":
        return distance_view(r)
    return views.statistic_view(r, name, None, " (each query's row over the slots of its window)", windowed=True)


def bias_view(r: WindowAnalysis, layer: int) -> Any:
    """The learned relative-position bias of ``layer`` per head over (Δrow, Δcol) = query − key, read from the weights
    when the image was analysed; None when the model computes its bias otherwise (Swin V2's continuous bias)."""
    layer = r._layer(layer)
    bias = r.relative_bias[layer] if r.relative_bias else None
    if bias is None:
        return None
    g = r.geometry[layer]
    return figures.relative_bias_figure(
        bias.numpy(),
        layer,
        title=f"Layer {layer} (stage {g.stage}, window {g.window[0]}x{g.window[1]}): learned relative-position bias "
        "per head over (Δrow, Δcol); centre = 0",
    )


def render_all(r: WindowAnalysis, layer: int = -1, query: Any = None, head: int = 0) -> dict[str, Any]:
    """Every figure for one windowed analysis: top-k, rollout, heads, focus, distance, position (bias)."""
    layer = r._layer(layer)
    q = default_query(r, layer) if query is None else tuple(query)
    return {
        "topk": figures.topk_figure(r.top_k) if r.top_k else None,
        "rollout": map_view(r, "rollout"),
        "heads": heads_view(r, layer, q),
        "focus": focus_view(r, layer, head, q),
        "distance": distance_view(r),
        "pos": bias_view(r, layer),
    }


def model_bias_views(vm: Any, layer: int = 0) -> Any:
    """The Position tab for a windowed model, read from its weights (no image needed): ``layer``'s learned
    relative-position bias per head over (Δrow, Δcol), one layer at a time (a layer selector over every attention
    layer), as a :class:`vizapp.views.PosEmbedViews`."""
    from vizapp.views import PosEmbedViews
    from vizapp.windows import read_relative_bias, window_sites

    sites = window_sites(vm.model)
    lay = min(max(int(layer), 0), len(sites) - 1)
    bias = read_relative_bias(sites[lay])
    head = (
        f"**Position scheme of `{vm.name}`**: no learned absolute position embedding; each attention layer adds a "
        "learned bias, per head, for the offset (Δrow, Δcol) between query and key inside a window."
    )
    if bias is None:
        return PosEmbedViews(None, None, head + f" Layer {lay}'s bias could not be read from its weights.", len(sites))
    wh, ww = (bias.shape[1] + 1) // 2, (bias.shape[2] + 1) // 2
    title = (
        f"Layer {lay} (stage {sites[lay].stage}, window {wh}x{ww}): learned relative-position bias per head over "
        "(Δrow, Δcol); centre = 0"
    )
    fig = figures.relative_bias_figure(bias.numpy(), lay, title=title)
    attn = sites[lay].attn
    if getattr(attn, "cpb_mlp", None) is not None or getattr(attn, "continuous_position_bias_mlp", None) is not None:
        head += " Swin V2 computes it from the offset with a small learned MLP, 16·sigmoid(MLP(log-spaced offset))."
    note = head + (
        f" Layer {lay} of {len(sites)} (layer selector); each tile is one of its {bias.shape[0]} heads, the centre "
        "being the same token. Read from the weights as they are now."
    )
    return PosEmbedViews(fig, None, note, layers=len(sites), kind="relative", title="Relative-position bias per head")


def tab_figures(
    r: WindowAnalysis,
    layer: int,
    query: Any,
    head: int | None = None,
    opacity: float = 0.6,
    colorscale: str = figures.HEAT_SCALE,
    vm: Any = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Every figure the app's tabs show for a windowed analysis, named "tab-what" (for one download): the maps that
    need no class, the chosen layer's heads and its focus map for ``query`` (given on the first stage's grid), the
    distances, the chosen layer's relative bias, its feature PCA, similarity to ``query`` and token norms, and the
    last stage's logit lens. ``extra``: figures already drawn (e.g. head importance)."""
    from vizapp import feature_views_windows as FV

    layer = r._layer(layer)
    q = layer_query(r, layer, query)
    out: dict[str, Any] = {
        "rollout-rollout": map_view(r, "rollout", opacity=opacity, colorscale=colorscale),
        "rollout-last-layer": map_view(r, "last_layer", opacity=opacity, colorscale=colorscale),
        "heads-all-heads": heads_view(r, layer, q, colorscale=colorscale),
        "heads-enlarged-head": focus_view(r, layer, head, q, opacity, colorscale),
        "distance-mean-attention-distance": distance_view(r),
    }
    out.update(views.other_statistic_figures(r, head_statistic_view))
    pos = bias_view(r, layer) if vm is None else model_bias_views(vm, layer).figure
    if pos is not None:
        out["position-relative"] = pos
    norms = FV.token_norm_views(r, layer)
    out["features-pca"] = FV.feature_pca_view(r, layer)
    out["features-similarity"] = FV.feature_similarity_view(r, query, layer, None, opacity)
    out.update({"features-norm-grid": norms.grid, "features-norm-histogram": norms.histogram})
    out["features-norms-by-depth"] = norms.depth
    if r.lens_probs is not None and r.top_k:
        out["features-logit-lens"] = FV.logit_lens_views(r).depth
    out.update({k: v for k, v in (extra or {}).items() if v is not None})
    return out


def padded_tokens_note(r: WindowAnalysis) -> str:
    """One sentence for the views of a model whose grids are not multiples of its windows ("" otherwise)."""
    if not r.padded_layers:
        return ""
    return (
        f"Layers {list(r.padded_layers)} pad their token grid to whole windows, as the library does; the padded tokens "
        "take part in the attention but have no place in the image, so they are not drawn."
    )


__all__ = [
    "CLASS_METHODS",
    "COMPARE_METHODS",
    "SLOW_METHODS",
    "LABELS",
    "bias_view",
    "default_query",
    "distance_view",
    "head_statistic_view",
    "focus_view",
    "heads_view",
    "layer_query",
    "map_view",
    "methods_note",
    "model_bias_views",
    "offered_methods",
    "padded_tokens_note",
    "render_all",
    "tab_figures",
]
