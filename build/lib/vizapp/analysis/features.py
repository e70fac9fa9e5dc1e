"""Label-free views of a ViT's tokens: PCA colours, patch similarity, token norms, registers, DINO masks, logit lens.

Pure torch functions: they take token tensors and token metadata (``num_prefix_tokens``, ``num_registers``), never a
model, so every path (one image, several images, recomputed layers) can call them. Token order is timm's:
``[cls?, other prefix tokens (distillation), registers, patches]``; registers are the last ``num_registers`` prefix
tokens, and a model without a CLS token starts directly with its registers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

FOREGROUND_SIDES = ("high", "low", "border")


class FeaturePCA(NamedTuple):
    """What :func:`feature_pca` returns.

    Attributes:
        rgb: [B, P, 3] colours in [0, 1]; background patches are 0 (black) when a foreground mask was used.
        scaled: [B, P, n_components] projections on the components, each min-max scaled to [0, 1] over all images
            jointly (over the foreground patches only when masked).
        components: [n_components, D] unit principal directions, signs fixed (see :func:`feature_pca`).
        explained_variance_ratio: [n_components] share of the total variance of the fitted patches per component.
        foreground: [B, P] bool mask, or None when no threshold was given.
    """

    rgb: torch.Tensor
    scaled: torch.Tensor
    components: torch.Tensor
    explained_variance_ratio: torch.Tensor
    foreground: torch.Tensor | None


def fix_component_signs(components: torch.Tensor) -> torch.Tensor:
    """Flip each row of ``components`` [k, D] so that its entry of largest absolute value is positive.

    Singular vectors are defined up to sign; this convention makes the colours independent of the solver (SVD or
    eigendecomposition) and of tiny changes in the input. Ties in |entry| go to the lowest index.
    """
    idx = components.abs().argmax(dim=-1, keepdim=True)  # [k, 1]
    signs = torch.sign(components.gather(-1, idx))  # [k, 1]
    signs[signs == 0] = 1.0
    return components * signs


def _principal_components(x: torch.Tensor, n_components: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Centre ``x`` [M, D] (float64) and return (mean [D], components [n, D] sign-fixed, variance ratio [n])."""
    if x.shape[0] < 2:
        raise ValueError(f"PCA needs at least 2 patches, got {x.shape[0]}")
    mean = x.mean(dim=0)
    centred = x - mean
    # Full SVD of the centred data (deterministic, unlike the randomised pca_lowrank).
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)  # s [min(M, D)], vh [min(M, D), D]
    if n_components > vh.shape[0]:
        raise ValueError(f"n_components={n_components} exceeds the rank bound {vh.shape[0]} of {tuple(x.shape)} data")
    var = s**2
    total = var.sum()
    ratio = var[:n_components] / total if total > 0 else torch.zeros(n_components, dtype=x.dtype)
    return mean, fix_component_signs(vh[:n_components]), ratio


def _minmax(v: torch.Tensor) -> torch.Tensor:
    """Scale each column of ``v`` [M, k] to [0, 1] (a constant column becomes 0)."""
    lo = v.amin(dim=0, keepdim=True)
    span = v.amax(dim=0, keepdim=True) - lo
    return torch.where(span > 0, (v - lo) / span.clamp_min(torch.finfo(v.dtype).tiny), torch.zeros_like(v))


def _to_rgb(scaled: torch.Tensor) -> torch.Tensor:
    """[..., k] with k in 1..3 -> [..., 3]: one component is grey, two fill red and green, three are RGB."""
    k = scaled.shape[-1]
    if k == 1:
        return scaled.expand(*scaled.shape[:-1], 3).clone()
    if k == 2:
        return torch.cat([scaled, torch.zeros_like(scaled[..., :1])], dim=-1)
    return scaled[..., :3].clone()


def _border_mask(grid_size: tuple[int, int], device: torch.device) -> torch.Tensor:
    gh, gw = grid_size
    border = torch.zeros(gh, gw, dtype=torch.bool, device=device)
    border[0, :] = border[-1, :] = True
    border[:, 0] = border[:, -1] = True
    return border.reshape(-1)  # [P]


def feature_pca(
    features: torch.Tensor,
    n_components: int = 3,
    foreground_threshold: float | None = None,
    foreground_side: str = "high",
    grid_size: tuple[int, int] | None = None,
) -> FeaturePCA:
    """Patch features coloured by their first principal components (Oquab et al. 2023, DINOv2, Fig. 1).

    One PCA is fitted on the patches of all images together, so that corresponding parts of different images get
    the same colour. Each component's projection is min-max scaled to [0, 1] over all images jointly.

    Sign convention: each principal direction is flipped so that its entry (loading) of largest absolute value is
    positive (:func:`fix_component_signs`), so the picture does not flip between runs or solvers.

    Foreground (DINOv2-style), when ``foreground_threshold`` is given: a first PCA on all patches; its first
    component, min-max scaled to [0, 1] over all images, is thresholded: patches with scaled value
    ``> foreground_threshold`` are the "high" side. ``foreground_side`` says which side is the foreground: "high",
    "low", or "border" (needs ``grid_size``): the side holding fewer of the image-border patches (over all images;
    a tie keeps "high"), since objects rarely fill the border. The PCA is then refitted on the foreground patches only;
    their projections are scaled over the foreground, and background patches are black (0).

    Args:
        features: patch features [B, P, D] or [P, D] (prefix tokens removed; DINOv2 uses the final-norm outputs).
        n_components: 1 to 3 components to fit and show (1: grey, 2: red/green, 3: RGB).
        foreground_threshold: threshold in [0, 1] on the scaled first component, or None for no mask.
        foreground_side: "high", "low" or "border", see above.
        grid_size: (gh, gw) with gh * gw == P, needed for ``foreground_side="border"``.

    Returns:
        :class:`FeaturePCA` with ``rgb`` [B, P, 3] (B = 1 for a [P, D] input), in ``features``' float dtype
        (float32 for integer inputs); computed in float64.
    """
    if features.dim() == 2:
        features = features.unsqueeze(0)
    if features.dim() != 3:
        raise ValueError(f"expected features shaped [B, P, D] or [P, D], got {tuple(features.shape)}")
    if not 1 <= n_components <= 3:
        raise ValueError(f"n_components must be 1, 2 or 3, got {n_components}")
    if foreground_side not in FOREGROUND_SIDES:
        raise ValueError(f"foreground_side must be one of {FOREGROUND_SIDES}, got {foreground_side!r}")
    out_dtype = features.dtype if features.is_floating_point() else torch.float32
    b, p, d = features.shape
    x = features.detach().reshape(b * p, d).to(torch.float64)  # [M, D]

    foreground = None
    if foreground_threshold is not None:
        if not 0.0 <= foreground_threshold <= 1.0:
            raise ValueError(f"foreground_threshold must be in [0, 1], got {foreground_threshold}")
        mean, comps, _ = _principal_components(x, 1)
        first = _minmax((x - mean) @ comps.T)[:, 0]  # [M]
        high = first > foreground_threshold
        if foreground_side == "border":
            if grid_size is None or grid_size[0] * grid_size[1] != p:
                raise ValueError(f"foreground_side='border' needs grid_size with gh * gw == P ({p}), got {grid_size}")
            border = _border_mask(grid_size, x.device).repeat(b)  # [M]
            on_border_high = int((high & border).sum())
            on_border_low = int((~high & border).sum())
            foreground_side = "low" if on_border_high > on_border_low else "high"
        fg = high if foreground_side == "high" else ~high
        if int(fg.sum()) < 2:
            raise ValueError(
                f"only {int(fg.sum())} foreground patch(es) at threshold {foreground_threshold}; lower or raise it"
            )
        foreground = fg.reshape(b, p)
        mean, comps, ratio = _principal_components(x[fg], n_components)
        scaled = torch.zeros(b * p, n_components, dtype=torch.float64, device=x.device)
        scaled[fg] = _minmax((x[fg] - mean) @ comps.T)
    else:
        mean, comps, ratio = _principal_components(x, n_components)
        scaled = _minmax((x - mean) @ comps.T)  # [M, n]

    scaled = scaled.reshape(b, p, n_components)
    return FeaturePCA(
        rgb=_to_rgb(scaled).to(out_dtype),
        scaled=scaled.to(out_dtype),
        components=comps.to(out_dtype),
        explained_variance_ratio=ratio.to(out_dtype),
        foreground=foreground,
    )


def feature_similarity(features: torch.Tensor, query_index: int, other: torch.Tensor | None = None) -> torch.Tensor:
    """Cosine similarity of one patch's feature with every patch of the same or another image (DINO/DINOv2 demos).

    Args:
        features: [P, D] patch features of the image the query patch is in.
        query_index: index of the query patch in ``features`` (0 <= query_index < P).
        other: [P2, D] patch features of another image, or None to compare within ``features``.

    Returns:
        [P] (or [P2] with ``other``) cosines in [-1, 1], float32 or the inputs' float dtype; computed in float64.
        A zero feature vector has cosine 0 with everything.
    """
    if features.dim() != 2:
        raise ValueError(f"expected features shaped [P, D], got {tuple(features.shape)}")
    if not 0 <= query_index < features.shape[0]:
        raise ValueError(f"query_index must be in [0, {features.shape[0] - 1}], got {query_index}")
    keys = features if other is None else other
    if keys.dim() != 2 or keys.shape[-1] != features.shape[-1]:
        raise ValueError(f"other must be [P2, {features.shape[-1]}], got {tuple(keys.shape)}")
    out_dtype = features.dtype if features.is_floating_point() else torch.float32
    q = F.normalize(features[query_index].detach().to(torch.float64), dim=-1)  # [D]
    k = F.normalize(keys.detach().to(torch.float64), dim=-1)  # [P2, D]
    return (k @ q).to(out_dtype)


def token_norms(block_outputs: torch.Tensor) -> torch.Tensor:
    """L2 norm of every token of every block's output (Darcet et al. 2024, "Vision Transformers Need Registers").

    Args:
        block_outputs: [L, N, D] (or any [..., N, D]): each block's output tokens in the model's order, prefix
            tokens included.

    Returns:
        [L, N] (or [..., N]) float32 norms, computed in float32 or wider.
    """
    x = block_outputs.detach()
    if x.dtype in (torch.float16, torch.bfloat16) or not x.is_floating_point():
        x = x.float()
    return torch.linalg.vector_norm(x, dim=-1).float()


def artifact_tokens(norms: torch.Tensor, k: float = 10.0, threshold: float | None = None) -> torch.Tensor:
    """High-norm "artifact" tokens (Darcet et al. 2024, "Vision Transformers Need Registers").

    Rule: within each layer (the last axis holds the tokens), a token is an artifact when its norm exceeds
    ``median + k * MAD``, MAD being the median absolute deviation from the median (both over that layer's tokens;
    ``torch.median`` takes the lower middle value for an even count). For Gaussian-like norms MAD ≈ 0.67 σ, so the
    default k = 10 flags nothing that is merely a tail of one mode; the artifacts the paper reports (a few percent of
    the tokens, norms several times the rest) are flagged. If MAD is 0 (over half the norms equal), it is floored at
    1e-6 × |median| so that only tokens clearly above the median count. Pass ``threshold`` to use a fixed norm
    instead (the paper flags norm > 150 for DINOv2 ViT-L/14); then ``k`` is ignored.

    Args:
        norms: [..., N] token norms, e.g. [L, N] from :func:`token_norms`. Restrict to patch tokens first
            (``norms[..., num_prefix_tokens:]``) if CLS and registers should not take part.
        k: MAD multiplier.
        threshold: a fixed norm threshold, or None for the median + k·MAD rule.

    Returns:
        bool tensor shaped like ``norms``.
    """
    n = norms.detach().to(torch.float64)
    if threshold is not None:
        return n > threshold
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    med = n.median(dim=-1, keepdim=True).values
    mad = (n - med).abs().median(dim=-1, keepdim=True).values
    mad = torch.maximum(mad, 1e-6 * med.abs())
    return n > med + k * mad


class RegisterAttention(NamedTuple):
    """What :func:`register_attention` returns (R = number of registers).

    Attributes:
        from_cls: [..., H, R] attention the CLS query gives each register, or None for a model without a CLS token.
        from_patches: [..., H, R] attention each register receives, averaged over the patch queries.
    """

    from_cls: torch.Tensor | None
    from_patches: torch.Tensor


def register_attention(
    attn: torch.Tensor, num_prefix_tokens: int, num_registers: int, has_class_token: bool = True
) -> RegisterAttention:
    """How much attention the CLS token and the patches give each register (Darcet et al. 2024).

    Args:
        attn: attention [..., H, N, N] (rows are queries and sum to 1), e.g. one layer [H, N, N] or a stack
            [L, H, N, N] for per-layer figures.
        num_prefix_tokens: tokens before the patches (CLS, distillation token, registers), from the model.
        num_registers: register tokens, the last ``num_registers`` prefix tokens (timm's ``num_reg_tokens``).
        has_class_token: whether token 0 is a CLS token (False for e.g. ``global_pool="avg"`` register models).

    Returns:
        :class:`RegisterAttention`, float32.
    """
    if attn.dim() < 3 or attn.shape[-1] != attn.shape[-2]:
        raise ValueError(f"expected attention shaped [..., H, N, N], got {tuple(attn.shape)}")
    n = attn.shape[-1]
    if num_registers <= 0:
        raise ValueError("this model has no register tokens; pick a register model (e.g. a *_reg4_* ViT)")
    if not num_registers <= num_prefix_tokens < n:
        raise ValueError(f"need num_registers ({num_registers}) <= num_prefix_tokens ({num_prefix_tokens}) < N ({n})")
    regs = slice(num_prefix_tokens - num_registers, num_prefix_tokens)
    a = attn.detach().float()
    from_patches = a[..., num_prefix_tokens:, regs].mean(dim=-2)  # [..., H, R]
    from_cls = a[..., 0, regs] if has_class_token else None  # [..., H, R]
    return RegisterAttention(from_cls=from_cls, from_patches=from_patches)


def dino_masks(cls_attention: torch.Tensor, threshold: float = 0.6) -> torch.Tensor:
    """Per head, the patches holding the top ``threshold`` fraction of the CLS attention mass (Caron et al. 2021, DINO).

    Exact rule (DINO's ``visualize_attention.py``): normalise each head's row to sum 1, sort it ascending, take the
    cumulative sum c, and keep a patch when its c > 1 - threshold. Equivalently, in descending order a patch is kept
    while the mass strictly before it is < threshold, so the patch that crosses the threshold is kept, and the kept
    mass is >= threshold. Ties are ordered by position (stable sort), so among equal values the lower index comes first
    in the ascending order (and is dropped first).

    Args:
        cls_attention: [H, P] (or [..., P]) the CLS query's attention to the patch tokens (prefix columns removed),
            DINO uses the last layer's. A model without a CLS token (``cls_token is None``) has no such row.
        threshold: fraction of the mass to keep, in (0, 1].

    Returns:
        bool [H, P] (same shape as the input).
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    a = cls_attention.detach().to(torch.float64)
    total = a.sum(dim=-1, keepdim=True)
    if bool((total <= 0).any()):
        raise ValueError("every attention row needs a positive sum")
    vals, order = torch.sort(a / total, dim=-1, stable=True)  # ascending
    keep_sorted = vals.cumsum(dim=-1) > (1.0 - threshold)
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def logit_lens(
    per_layer_tokens: torch.Tensor,
    norm: Callable[[torch.Tensor], torch.Tensor],
    head: Callable[[torch.Tensor], torch.Tensor],
    pool: Callable[[torch.Tensor], torch.Tensor] | int | str | None,
    num_prefix_tokens: int | None = None,
    return_logits: bool = False,
) -> torch.Tensor:
    """Read every block's output through the model's own final norm, pooling and classifier (the "logit lens",
    nostalgebraist 2020; applied to ViTs e.g. by Vilas et al. 2023, "Analyzing Vision Transformers for Image
    Classification in Class Embedding Space").

    lens(l) = softmax(head(pool(norm(x_l)))). For the last block this is exactly the model's own output when
    ``norm``, ``pool`` and ``head`` are the model's, so the last row is the model's prediction and the earlier rows
    show when it forms. For a timm ViT pass ``norm=model.norm, head=model.forward_head, pool=None``:
    ``forward_head`` pools by the model's own rule (CLS token, mean of the patches, attention pooling, DeiT's
    CLS/distillation average) and applies ``fc_norm`` and the classifier.

    The callables get batches [B, N, D] (B = 1 for an [L, N, D] input), as the model's own modules expect.

    Args:
        per_layer_tokens: [L, N, D] (or [L, B, N, D]) each block's output tokens, before the final norm.
        norm: the model's final norm, [..., N, D] -> [..., N, D].
        head: the classifier after pooling, [..., D] -> [..., K] (include any norm that follows pooling), or
            [..., N, D] -> [..., K] with ``pool=None``.
        pool: how the model pools tokens: a callable [..., N, D] -> [..., D], a token index (0 for CLS), "avg"
            (mean over the patch tokens, needs ``num_prefix_tokens``), or None when ``head`` pools by itself.
        num_prefix_tokens: tokens before the patches, for ``pool="avg"``.
        return_logits: return logits instead of probabilities.

    Returns:
        [L, K] (or [L, B, K]) probabilities (or logits), float32.
    """
    if pool is None:

        def pool_fn(x: torch.Tensor) -> torch.Tensor:
            return x

    elif callable(pool):
        pool_fn = pool
    elif isinstance(pool, int):

        def pool_fn(x: torch.Tensor) -> torch.Tensor:
            return x[..., pool, :]

    elif pool == "avg":
        if num_prefix_tokens is None:
            raise ValueError("pool='avg' needs num_prefix_tokens")

        def pool_fn(x: torch.Tensor) -> torch.Tensor:
            return x[..., num_prefix_tokens:, :].mean(dim=-2)

    else:
        raise ValueError(f"pool must be a callable, a token index or 'avg', got {pool!r}")
    if per_layer_tokens.dim() not in (3, 4):
        raise ValueError(f"expected per-layer tokens [L, N, D] or [L, B, N, D], got {tuple(per_layer_tokens.shape)}")
    single = per_layer_tokens.dim() == 3
    tokens = per_layer_tokens.unsqueeze(1) if single else per_layer_tokens  # [L, B, N, D]
    with torch.no_grad():
        logits = torch.stack([head(pool_fn(norm(x))) for x in tokens]).float()  # [L, B, K]
    if single:
        logits = logits[:, 0]
    return logits if return_logits else logits.softmax(dim=-1)
