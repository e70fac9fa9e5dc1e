"""Views of the Features tab: label-free views built from an :class:`~vizapp.pipeline.Analysis` (feature PCA and
similarity, token norms and registers, DINO masks, the logit lens, head importance, the arrays' export). Nothing here
runs a forward pass. :mod:`vizapp.views` names them too."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from vizapp import figures
from vizapp.pipeline import Analysis

if TYPE_CHECKING:  # type hints only: vizapp/figures/ is the one package that imports plotly
    import plotly.graph_objects as go

    from vizapp.models import VizModel


ARTIFACT_K = 10.0  # the default of Analysis.artifact_tokens: median + 10 MAD


def feature_layer(r: Analysis, layer: int) -> tuple[int, str]:
    """The layer whose features are shown for a requested ``layer`` (-1 = last), and a note when it differs: large
    models keep only some blocks' outputs (see ``Analysis.block_outputs``)."""
    want = int(layer) % r.num_layers
    if want in r.block_outputs:
        return want, ""
    got = nearest_kept(r.block_outputs, want)
    return got, f"Layer {want}'s features were not kept for this model (too large); showing layer {got}."


def nearest_kept(kept: Iterable[int], want: int) -> int:
    """The kept layer nearest to ``want`` (the deeper one of two as near): what a view draws in its place."""
    kept = sorted(kept)
    if not kept:
        raise ValueError("this analysis kept no block outputs")
    return min(kept, key=lambda k: (abs(k - want), -k))


def pca_or_unthresholded(
    r: Any, layer: int, foreground_threshold: float | None, note: str, tokens: str
) -> tuple[np.ndarray, float | None, str]:
    """``r.feature_pca(layer, foreground_threshold)``, or without the threshold where it leaves too few ``tokens``
    ("patches on this image") to fit a PCA, so that every threshold the control allows draws a map: (rgb, the
    threshold used, ``note`` with a sentence added when it was dropped)."""
    try:
        return r.feature_pca(layer, foreground_threshold=foreground_threshold), foreground_threshold, note
    except ValueError as e:
        if foreground_threshold is None or "foreground patch" not in str(e):
            raise
    dropped = (
        f"Threshold {foreground_threshold:.2f} leaves fewer than 2 foreground {tokens}, too few to fit a PCA: shown "
        "without the threshold (lower it to mask the background)."
    )
    return r.feature_pca(layer), None, " ".join(filter(None, (note, dropped)))


def feature_pca_view(r: Analysis, layer: int = -1, foreground_threshold: float | None = None) -> go.Figure:
    """Feature PCA as RGB over the image (Oquab et al. 2023, DINOv2 Fig. 1)."""
    lay, note = feature_layer(r, layer)
    rgb, foreground_threshold, note = pca_or_unthresholded(r, lay, foreground_threshold, note, "patches on this image")
    fg = "" if foreground_threshold is None else f", foreground: 1st component > {foreground_threshold:.2f}"
    title = f"Feature PCA after block {lay} (RGB = components 1-3{fg})"
    return figures.pca_rgb_figure(
        r.image, rgb, r.patch_size, title=title + ("<br><sub>" + note + "</sub>" if note else "")
    )


def pca_gallery_view(rgbs: np.ndarray, patch_size: tuple[int, int], names: list[str], layer: int) -> go.Figure:
    """One PCA shared by several images ([B, gh, gw, 3] from :func:`vizapp.pipeline.feature_pca`), side by side."""
    return figures.pca_gallery_figure(
        rgbs, patch_size, names, title=f"One PCA over {len(rgbs)} images' patch features after block {layer}"
    )


def feature_similarity_view(
    r: Analysis, query: tuple[int, int], layer: int = -1, other: Analysis | None = None, opacity: float = 0.6
) -> go.Figure:
    """Cosine similarity of the query patch's feature to every patch of this image, or of ``other``."""
    lay, note = feature_layer(r, layer)
    if other is not None:
        lay2, note2 = feature_layer(other, lay)
        if lay2 != lay:
            raise ValueError(f"the second image kept no features at layer {lay}")
    sim = r.feature_similarity(tuple(query), lay, other=other)
    target = other if other is not None else r
    where = "the second image" if other is not None else "this image"
    title = f"Cosine similarity of patch {tuple(int(v) for v in query)}'s feature (block {lay}) to {where}"
    marker = None if other is not None else (int(query[0]), int(query[1]))
    if note:
        title += "<br><sub>" + note + "</sub>"
    return figures.overlay_figure(
        target.image,
        sim,
        target.patch_size,
        opacity,
        title=title,
        value_name="cosine",
        colorscale=figures.SIM_SCALE,
        marker=marker,
    )


def artifact_threshold(norms: np.ndarray, k: float = ARTIFACT_K) -> float:
    """The norm above which :meth:`Analysis.artifact_tokens` flags a token of one layer: median + k·MAD over the
    layer's tokens [N] (torch's lower median; MAD floored at 1e-6·|median|), for drawing the rule."""
    import torch

    n = torch.as_tensor(np.asarray(norms), dtype=torch.float64)
    med = n.median()
    mad = torch.maximum((n - med).abs().median(), 1e-6 * med.abs())
    return float(med + k * mad)


def artifact_sentence(r: Analysis, k: float = ARTIFACT_K) -> str:
    """What the measured norms say about high-norm tokens (Darcet et al. 2024) in this model on this image: which
    layers have patch tokens above their layer's median + k·MAD, and whether any are in the middle-to-late layers
    (from layer L/3 on). Nothing beyond this image's numbers."""
    norms, flags = r.token_norms(), r.artifact_tokens(k)
    p, num_layers = r.num_prefix_tokens, r.num_layers
    patch_flags = flags[:, p:]
    per_layer = patch_flags.sum(1)
    layers = [int(i) for i in np.nonzero(per_layer)[0]]
    mid = num_layers // 3
    rule = f"norm above its layer's median + {k:g}·MAD"
    if not layers:
        return (
            f"On this image no patch token has a {rule} in any of the {num_layers} layers: no high-norm "
            "artifact tokens are measured here (one image; others may differ)."
        )
    worst = max(layers, key=lambda i: norms[i, p:].max() / max(np.median(norms[i, p:]), 1e-12))
    ratio = norms[worst, p:].max() / max(np.median(norms[worst, p:]), 1e-12)
    late = [i for i in layers if i >= mid]
    counts = ", ".join(f"layer {i}: {int(per_layer[i])}" for i in layers[:8]) + (" ..." if len(layers) > 8 else "")
    head = f"Patch tokens with a {rule} ({counts}; up to {ratio:.1f}x the median norm, layer {worst})."
    if late:
        return (
            head + f" So on this image high-norm tokens do appear in the middle-to-late layers (layer {mid} on), "
            f"in {len(late)} of the {num_layers - mid} layers there."
        )
    return head + f" They appear only in the early layers (before layer {mid}), not in the middle-to-late ones."


class TokenNormViews(NamedTuple):
    """The token-norm views of one layer: the patch grid, the histogram with the threshold, prefix tokens across depth,
    attention to registers (None without registers) and the measured sentence."""

    grid: go.Figure
    histogram: go.Figure
    depth: go.Figure
    registers: go.Figure | None
    sentence: str


def prefix_names(r: Analysis) -> list[str]:
    """Names of the prefix tokens in the model's order: CLS, other prefix tokens (e.g. a distillation token), then the
    registers the model declares."""
    p, regs = r.num_prefix_tokens, r.num_registers
    names = ["CLS"] if r.has_class_token else []
    names += [f"prefix token {i}" for i in range(len(names), p - regs)]
    return (names + [f"register {j}" for j in range(regs)])[:p]


def token_norm_views(r: Analysis, layer: int = -1, k: float = ARTIFACT_K) -> TokenNormViews:
    norms, flags = r.token_norms(), r.artifact_tokens(k)
    lay = int(layer) % r.num_layers
    p = r.num_prefix_tokens
    row = norms[lay]
    thr = artifact_threshold(row, k)
    n_flag = int(flags[lay].sum())
    grid = figures.norm_grid_figure(
        row[p:].reshape(r.grid_size),
        flags[lay, p:].reshape(r.grid_size),
        lay,
        title=f"Patch-token norms after block {lay} (x: {int(flags[lay, p:].sum())} artifact tokens, norm > {thr:.3g})",
    )
    hist = figures.norm_histogram_figure(
        row[p:],
        row[:p],
        thr,
        lay,
        title=f"Token norms after block {lay}: {n_flag} of {r.num_tokens} tokens above median + {k:g}·MAD",
    )
    lines = {name: norms[:, i] for i, name in enumerate(prefix_names(r))}
    lines["patch median"] = np.median(norms[:, p:], axis=1)
    lines["patch max"] = norms[:, p:].max(axis=1)
    depth = figures.norms_by_depth_figure(lines, title="Prefix tokens' norms across depth, against the patches'")
    registers = None
    if r.num_registers:
        ra = r.register_attention()
        registers = figures.register_attention_figure(
            None if ra["from_cls"] is None else ra["from_cls"].mean(1), ra["from_patches"].mean(1)
        )
    return TokenNormViews(grid, hist, depth, registers, artifact_sentence(r, k))


class MaskViews(NamedTuple):
    per_head: go.Figure
    overlay: go.Figure


def dino_mask_views(r: Analysis, threshold: float = 0.6, opacity: float = 0.6) -> MaskViews:
    """Per head of the last layer, the patches holding ``threshold`` of the CLS attention (Caron et al. 2021), as a
    mosaic and as the number of heads covering each patch over the image."""
    masks = r.dino_masks(threshold)
    lay = r.num_layers - 1
    count = masks.sum(0).astype(np.float32)
    overlay = figures.overlay_figure(
        r.image,
        count,
        r.patch_size,
        opacity,
        value_name="heads",
        title=f"How many of the {r.num_heads} heads' masks cover each patch (threshold {threshold:.2f})",
        rescale=False,  # a count of heads: the colour bar reads it
    )
    return MaskViews(figures.masks_figure(masks, threshold, lay), overlay)


def lens_classes(r: Analysis) -> list[str]:
    """Classes worth following across depth: the final top-5, then each layer's top-1 (no duplicates)."""
    out = [lbl for lbl, _ in r.top_k]
    for row in r.logit_lens(k=1):
        if row and row[0][0] not in out:
            out.append(row[0][0])
    return out


class LensViews(NamedTuple):
    table: list[list[Any]]  # [[layer, "label (p)", ...], ...]
    depth: go.Figure


def logit_lens_views(r: Analysis, label: str | None = None, k: int = 5) -> LensViews:
    """The logit lens (nostalgebraist 2020): top-``k`` per layer and one class's probability across depth. Raises
    BadParameterError for a model without a classifier head."""
    lens = r.logit_lens(k)
    table = [[i] + [f"{lbl} ({p:.3f})" for lbl, p in row] for i, row in enumerate(lens)]
    label = label or (r.top_k[0][0] if r.top_k else r.labels[0])
    if label not in r.labels:
        from vizapp.errors import BadParameterError

        raise BadParameterError(f"unknown class {str(label)[:60]!r}; pick one from the list")
    return LensViews(table, figures.class_depth_figure(r.lens_probs[:, r.labels.index(label)], label))


def importance_view(exact: np.ndarray | None, gradient: np.ndarray | None, score: str = "") -> tuple[go.Figure, str]:
    """Exact and gradient head importance [L, H] side by side, and their Spearman rank correlation as a sentence."""
    from vizapp.ablation import rank_correlation

    panels = {}
    if exact is not None:
        panels["exact ablation"] = exact
    if gradient is not None:
        panels["gradient estimate"] = gradient
    text = ""
    if exact is not None and gradient is not None:
        import torch

        both = np.isfinite(exact) & np.isfinite(gradient)
        rho = (
            rank_correlation(torch.as_tensor(exact[both]), torch.as_tensor(gradient[both]))
            if both.sum() > 1
            else float("nan")
        )
        text = f"Spearman rank correlation between the two: **{rho:.3f}** over {int(both.sum())} heads."
    title = "Head importance: drop of the " + (score or "score") + " when each head alone is ablated"
    return figures.importance_figure(panels, title=title), text


def feature_arrays(
    r: Analysis,
    layer: int = -1,
    foreground_threshold: float | None = None,
    query: tuple[int, int] | None = None,
    dino_threshold: float = 0.6,
    importance: Mapping[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """The Features tab's arrays for an .npz export (names say the shapes' meaning)."""
    lay, _ = feature_layer(r, layer)
    out: dict[str, np.ndarray] = {
        "feature_layer": np.array(lay),
        "feature_pca_rgb": r.feature_pca(lay, foreground_threshold=foreground_threshold),  # [gh, gw, 3]
        "token_norms": r.token_norms(),  # [L, N], prefix tokens first
        "artifact_tokens": r.artifact_tokens(ARTIFACT_K),  # [L, N] bool
        "num_prefix_tokens": np.array(r.num_prefix_tokens),
        "num_registers": np.array(r.num_registers),
        "grid_size": np.array(r.grid_size),
    }
    if r.has_class_token:  # the masks are drawn from the CLS token's attention
        out["dino_masks"] = r.dino_masks(dino_threshold)  # [H, gh, gw] bool, last layer
        out["dino_threshold"] = np.array(dino_threshold)
    if query is not None:
        out["feature_similarity"] = r.feature_similarity(tuple(query), lay)  # [gh, gw]
        out["feature_similarity_query"] = np.array(query)
    if r.num_registers:
        ra = r.register_attention()
        out["register_attention_from_patches"] = ra["from_patches"]  # [L, H, R]
        if ra["from_cls"] is not None:
            out["register_attention_from_cls"] = ra["from_cls"]
    if r.lens_probs is not None:
        out["logit_lens_probs"] = r.lens_probs  # [L, K]
    for name, arr in (importance or {}).items():
        out[f"head_importance_{name}"] = np.asarray(arr)  # [L, H]
    return out


def importance_support(vm: VizModel) -> dict[str, str]:
    """For each head-importance method ("exact", "gradient"): "" when it runs on this model, else why it does not
    (both run on every family the capture supports; the gradient estimate needs a classifier head)."""
    from vizapp.ablation import head_projections, reuses_blocks
    from vizapp.capture import encoder_layers
    from vizapp.windows import output_projection, window_sites

    why = {"exact": "", "gradient": ""}
    try:
        if reuses_blocks(vm.model):
            head_projections(vm.model)  # the reuse path hooks attn.proj
        elif vm.windowed:
            for site in window_sites(vm.model):  # a windowed model: each layer's output projection is hooked
                output_projection(site)
        else:
            encoder_layers(vm.model)  # the capture path: any family the capture supports
    except Exception as e:  # noqa: BLE001  (any unsupported layout: say why, for both)
        return {"exact": str(e), "gradient": str(e)}
    if not vm.labels:
        why["gradient"] = (
            "the gradient estimate needs a classifier head (without one the score, 1 - cos to the clean "
            "feature, has zero gradient); this model has none"
        )
    return why


def importance_reuses_blocks(vm: VizModel) -> bool:
    """Whether exact head importance re-runs the upper blocks only (timm ViT: H·(L+1)/2 image-forwards) or runs the
    whole model per layer (every other family: L·H image-forwards)."""
    from vizapp.ablation import reuses_blocks

    return reuses_blocks(vm.model)
