"""Analyses of windowed attention (Swin, Liu et al. 2021): window attention placed back on the token grid, per-layer
query maps, mean attention distance in input pixels, rollout and the class-specific maps through windows and patch
merging.

Geometry. A layer's windows tile its token grid after a cyclic shift by (sh, sw) and zero padding to whole windows;
timm shifts then pads, transformers pads then shifts (``pad_first``). :func:`window_index` replays exactly that on
the token ids, so window w's slot i holds the grid token it came from (or -1 for a padded slot).

Patch merging. Stage s+1's token (r, c) is built from stage s's tokens (2r + i, 2c + j), i, j in {0, 1} (timm's and
transformers' ``PatchMerging``: concatenation of the 2x2 block, LayerNorm, a linear map; odd grids are padded by one
row/column, and padded slots are zeros). No attention relates a merged token to its sources, so vizapp DEFINES the
merge as an equal-share map: the merged token's row gives 1/k to each of its k real source tokens (k = 4, or fewer
at a padded edge), which is the rollout's own assumption for a token mixing inputs it has no weights over (Abnar &
Zuidema 2020 treat the residual the same way: equal mixing of identity and attention). See :func:`merge_matrix`.

Padding. Padded slots are keys of every window that holds them (the library attends to them: their features are the
zero-padded input, passed through the attention's linear maps). They have no place in the image, so the maps here
leave them out: the drawn query map omits their mass; the mean distance renormalises each query's row over its real
keys, and rollout and flow spread a row's padded mass over its real keys in proportion (:func:`fuse_windows`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from vizapp.transfer import to_device


def window_index(
    grid: tuple[int, int], window: tuple[int, int], shift: tuple[int, int], pad_first: bool = False
) -> torch.Tensor:
    """[nW, wh*ww] long: the grid token (row-major id r*gw + c) in each slot of each window, -1 for padding.

    Windows are in the library's order (row-major over the shifted, padded grid), slots row-major in the window.
    """
    gh, gw = grid
    wh, ww = window
    sh, sw = shift
    ids = torch.arange(gh * gw).view(gh, gw)
    hp, wp = -(-gh // wh) * wh, -(-gw // ww) * ww

    def pad(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, wp - t.shape[1], 0, hp - t.shape[0]), value=-1)

    def roll(t: torch.Tensor) -> torch.Tensor:
        return torch.roll(t, shifts=(-sh, -sw), dims=(0, 1)) if (sh or sw) else t

    canvas = roll(pad(ids)) if pad_first else pad(roll(ids))  # [Hp, Wp]
    win = canvas.view(hp // wh, wh, wp // ww, ww).permute(0, 2, 1, 3)
    return win.reshape(-1, wh * ww)


def full_attention(windows: torch.Tensor, index: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Window attention on the whole grid: [..., nW, H, w², w²] -> [..., H, N, N], zero outside each query's window
    and without padded slots (rows of queries next to padding then sum to less than 1). N x N per head: for checks
    and small grids; the rollout never forms it (:func:`row_times_windows`)."""
    *lead, nw, h, m, _ = windows.shape
    real = index >= 0  # [nW, w²]
    pair = real[:, :, None] & real[:, None, :]  # [nW, w², w²]
    qi = index[:, :, None].expand(nw, m, m)[pair]
    ki = index[:, None, :].expand(nw, m, m)[pair]
    vals = windows.movedim(-3, -4)[..., pair]  # [..., H, pairs]
    out = windows.new_zeros((*lead, h, num_tokens * num_tokens))
    out[..., qi * num_tokens + ki] = vals
    return out.view(*lead, h, num_tokens, num_tokens)


def row_times_windows(v: torch.Tensor, windows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """v [N] @ the full map of head-fused windows [nW, w², w²] (see :func:`full_attention`), without forming it:
    each window's rows are weighted by v at its query tokens and summed into its key tokens; padded slots count
    neither as queries nor as keys."""
    real = index >= 0
    safe = index.clamp(min=0)
    vq = v[safe] * real.to(v.dtype)  # [nW, w²]
    contrib = torch.einsum("wq,wqk->wk", vq, windows.to(v.dtype)) * real.to(v.dtype)  # [nW, w²]
    out = torch.zeros_like(v)
    return out.index_add_(0, safe.reshape(-1), contrib.reshape(-1))


def query_map(windows: torch.Tensor, index: torch.Tensor, grid: tuple[int, int], token: int) -> torch.Tensor:
    """One query token's attention over the whole grid: windows [nW, H, w², w²] -> [H, gh, gw], zero outside its
    window; padded keys are not drawn."""
    where = (index == int(token)).nonzero()
    if where.shape[0] != 1:
        raise ValueError(f"token {token} is not in exactly one window")
    w, slot = int(where[0, 0]), int(where[0, 1])
    row = windows[w, :, slot, :]  # [H, w²]
    keys = index[w]
    real = keys >= 0
    out = windows.new_zeros((windows.shape[1], grid[0] * grid[1]))
    out[:, keys[real]] = row[:, real]
    return out.view(-1, *grid)


def window_cells(index: torch.Tensor, token: int) -> torch.Tensor:
    """The grid tokens in ``token``'s window (its key set), [k] long."""
    w = int((index == int(token)).nonzero()[0, 0])
    keys = index[w]
    return keys[keys >= 0]


def token_centres(grid: tuple[int, int], stride: tuple[float, float]) -> torch.Tensor:
    """[N, 2] float64: each token's centre (y, x) in input pixels; a token of a stage whose tokens are ``stride``
    pixels apart covers pixels [r·sy, (r+1)·sy)."""
    r, c = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    return torch.stack([(r.reshape(-1) + 0.5) * stride[0], (c.reshape(-1) + 0.5) * stride[1]], -1).double()


def mean_distance(windows: torch.Tensor, index: torch.Tensor, grid: tuple[int, int], stride: tuple[float, float]):
    """Mean attention distance per head in input pixels (Dosovitskiy et al. 2021, Fig. 7 right): for each query, the
    attention-weighted Euclidean distance to its keys, averaged over the layer's real query tokens. Each query's row
    is renormalised over its real keys (padded slots have no place in the image).

    Args:
        windows: [nW, H, w², w²] one image's window attention.
        index: :func:`window_index` of the layer.
        grid: the layer's token grid.
        stride: token spacing of the layer's stage in input pixels (patch size x 2^merges).

    Returns:
        [H] float64.
    """
    real = index >= 0
    pos = token_centres(grid, stride).to(windows.device)[index.clamp(min=0)]  # [nW, w², 2]
    keep = real[:, None, :].to(windows.dtype)  # [nW, 1, w²]: padded keys count neither as mass nor distance
    d = torch.cdist(pos, pos).to(windows.dtype) * keep  # [nW, w², w²]
    # per query: Σ_k a·d / Σ_k a over real keys, formed window by window without a [nW, H, w², w²] temporary
    weighted = torch.einsum("whqk,wqk->whq", windows, d).double()
    mass = torch.einsum("whqk,wk->whq", windows, real.to(windows.dtype)).double().clamp_min(1e-300)
    per_query = weighted / mass  # [nW, H, w²]
    return (per_query * real[:, None, :]).sum((0, 2)) / real.sum()


def token_slots(index: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """[N] long: where each grid token sits in the layer's windows, as a flat slot id w·w² + slot (see
    :func:`window_index`). ValueError unless every token is in exactly one window."""
    m = index.shape[1]
    real = index >= 0
    tokens = index[real]
    if tokens.numel() != num_tokens or torch.unique(tokens).numel() != num_tokens:
        raise ValueError(f"the windows hold {tokens.numel()} token slots for a grid of {num_tokens} tokens")
    flat = torch.arange(index.numel(), device=index.device).view(-1, m)[real]
    out = torch.empty(num_tokens, dtype=torch.long, device=index.device)
    out[tokens] = flat
    return out


def token_row_gather(slots: torch.Tensor, heads: int, window_slots: int) -> torch.Tensor:
    """[H·N] long: where head h of grid token t finds its attention row among a layer's window rows as the windows
    hold them, [nW·H·w², w²] (window, head, slot): row (window(t)·H + h)·w² + slot(t), heads first, tokens row-major.
    ``slots``: :func:`token_slots` [N]; ``window_slots``: w²."""
    window, slot = slots // window_slots, slots % window_slots
    h = torch.arange(heads, device=slots.device)[:, None]  # [H, 1]
    return ((window[None, :] * heads + h) * window_slots + slot[None, :]).reshape(-1)


def token_rows(
    windows: torch.Tensor,
    index: torch.Tensor,
    num_tokens: int,
    slots: torch.Tensor | None = None,
    gather: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Each real token's attention row over the slots of its window, [..., nW, H, w², w²] -> [..., H, N, w²] (tokens
    row-major on the grid, contiguous): padded slots zeroed and the row renormalised over the real keys, as
    :func:`mean_distance` takes it (padded slots have no place in the image). Key k of token t's row is slot k of t's
    window. ``slots``: :func:`token_slots` of ``index``, and ``gather``: :func:`token_row_gather` of them, when the
    caller has them (the rows are taken in one gather, with no other copy); ``out``: a flat buffer of ``windows``'
    dtype and device with room for the rows (``windows.numel()`` elements always suffice), which they are a view of."""
    *lead, nw, h, m, _ = windows.shape
    where = (token_slots(index, num_tokens) if slots is None else slots).to(windows.device)  # [N]
    if gather is None:
        gather = token_row_gather(where, h, m)
    src, gather = windows.reshape(*lead, nw * h * m, m), gather.to(windows.device)
    if out is None:
        rows = src.index_select(len(lead), gather)
    else:
        count = math.prod(lead) * gather.numel() * m
        if out.numel() < count or out.dtype != windows.dtype or out.device != windows.device:
            raise ValueError(f"a buffer of {out.numel()} {out.dtype} for {count} {windows.dtype} on {windows.device}")
        rows = torch.index_select(src, len(lead), gather, out=out[:count].view(*lead, -1, m))
    rows = rows.view(*lead, h, num_tokens, m)  # a tensor of its own (or the caller's buffer): changed in place below
    if bool((index < 0).any()):  # padding: its slots out, each row renormalised over its real keys
        keys = to_device(index >= 0, windows.device)[where // m]  # [N, w²]: the real slots of each token's window
        rows.mul_(keys.to(rows.dtype))
        rows.div_(rows.sum(-1, keepdim=True).clamp_min(torch.finfo(rows.dtype).tiny))
    return rows


def token_key_distances(index: torch.Tensor, grid: tuple[int, int], stride: tuple[float, float]) -> torch.Tensor:
    """[N, w²] float64: the distance in input pixels from each grid token to each slot of its window (0 for a
    padded slot, which carries no weight in :func:`token_rows`); the keys of :func:`token_rows`' rows."""
    m = index.shape[1]
    n = grid[0] * grid[1]
    where = token_slots(index, n)
    pos = token_centres(grid, stride).to(index.device)[index.clamp(min=0)]  # [nW, w², 2]
    query = pos.reshape(-1, 2)[where]  # [N, 2]
    keys = pos[where // m]  # [N, w², 2]
    d = torch.linalg.vector_norm(keys - query[:, None, :], dim=-1)
    return d * (index >= 0)[where // m].double()


def repeat_to_grid(values: np.ndarray, grid: tuple[int, int], merges: int) -> np.ndarray:
    """A map on the grid of a stage ``merges`` patch mergings down, [⌈gh/2^m⌉, ⌈gw/2^m⌉], on the first stage's
    ``grid`` [gh, gw]: each first-stage token (r, c) takes the value of the token it was merged into, (r >> m, c >> m)
    (merging pads odd grids at the bottom and right, so the last row or column merges fewer tokens)."""
    values = np.asarray(values)
    f = 2 ** int(merges)
    want = (-(-grid[0] // f), -(-grid[1] // f))
    if values.shape != want:
        raise ValueError(f"a map {values.shape} is not the {want} grid {merges} merges below {tuple(grid)}")
    rows, cols = np.arange(grid[0]) >> merges, np.arange(grid[1]) >> merges
    return values[np.ix_(rows, cols)]


def merge_matrix(grid: tuple[int, int]) -> torch.Tensor:
    """[N', N] float64 equal-share patch merging from a (gh, gw) grid to ((gh+1)//2, (gw+1)//2): row j has 1/k at
    each of its k real source tokens (see the module docstring)."""
    gh, gw = grid
    mh, mw = (gh + 1) // 2, (gw + 1) // 2
    m = torch.zeros(mh * mw, gh * gw, dtype=torch.float64)
    for r in range(gh):
        for c in range(gw):
            m[(r // 2) * mw + c // 2, r * gw + c] = 1.0
    return m / m.sum(1, keepdim=True)


def merge_parents(grid: tuple[int, int]) -> torch.Tensor:
    """[N] long: the token of the merged grid ((gh+1)//2, (gw+1)//2) that each token of the (gh, gw) grid is merged
    into, row-major on both grids (a token's real source count is how often it appears here)."""
    gh, gw = grid
    r, c = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    return ((r // 2) * ((gw + 1) // 2) + c // 2).reshape(-1)


def merges_after(grids: Sequence[tuple[int, int]], layer: int) -> bool:
    """Whether a patch merging sits between ``layer`` and the next one (their grids differ)."""
    return layer + 1 < len(grids) and tuple(grids[layer + 1]) != tuple(grids[layer])


def through_merge(v: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """v [N'] over the merged grid -> v @ :func:`merge_matrix` (``grid``) [N] over the source grid, without forming
    the matrix: each source token gets its merged token's value divided by that token's real source count."""
    parent = to_device(merge_parents(grid), v.device)  # [N], made on the host
    count = torch.zeros(v.shape[0], dtype=v.dtype, device=v.device).index_add_(
        0, parent, torch.ones_like(parent, dtype=v.dtype)
    )
    return v[parent] / count[parent]


def fuse_windows(windows: torch.Tensor, index: torch.Tensor, head_fusion: str = "mean", renorm: bool = True):
    """Head-fused window maps [nW, w², w²] float64 from [nW, H, w², w²]: padded keys zeroed and, with ``renorm``
    (attention rollout and flow), each row's mass on padded keys spread over its real keys in proportion, so the row
    keeps its total: 1 for "mean", the fused heads' own sum for "max" and "min", whose rows the residual step then
    renormalises with the identity as a plain ViT's (:func:`vizapp.analysis.rollout.add_residual`); a window without
    padding is left exactly as fused. Without ``renorm`` (gradient-weighted maps) as they are."""
    a = windows.double()
    if head_fusion == "mean":
        f = a.mean(1)
    elif head_fusion == "max":
        f = a.amax(1)
    elif head_fusion == "min":
        f = a.amin(1)
    else:
        raise ValueError(f"head_fusion must be 'mean', 'max' or 'min', got {head_fusion!r}")
    total = f.sum(-1, keepdim=True)
    f = f * (index >= 0)[:, None, :].double()
    if renorm:
        s = f.sum(-1, keepdim=True)
        f = torch.where((s > 0) & (s != total), f * (total / s.clamp_min(1e-300)), f)
    return f


def token_row_sums(windows: torch.Tensor, index: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """[N] float64: each query token's row sum of head-fused window maps [nW, w², w²] over its real keys."""
    real = index >= 0
    sums = (windows.double() * real[:, None, :].double()).sum(-1)  # [nW, w²]
    # every slot added, a padding slot's as 0 at token 0 (x + 0.0 is x): selecting the real slots with a mask would
    # make the host wait for the device to learn how many there are
    sums = torch.where(real, sums, 0.0).reshape(-1)
    out = torch.zeros(num_tokens, dtype=torch.float64, device=sums.device)
    return out.index_add_(0, index.clamp(min=0).reshape(-1), sums)


def rollout_through(
    fused: Sequence[torch.Tensor],
    indices: Sequence[torch.Tensor],
    grids: Sequence[tuple[int, int]],
    weights: torch.Tensor,
    step: str = "rollout",
    start_layer: int = 0,
) -> torch.Tensor:
    """The row ``weights`` [N_last] carried from the top layer down through every layer and patch merging, to the
    first stage's tokens: ``weights`` · Â_{L-1} · ... · M · ... · Â_{start}.

    Args:
        fused: per layer, head-fused window maps [nW, w², w²] (:func:`fuse_windows`).
        indices: per layer, its :func:`window_index`.
        grids: per layer, its token grid; where it changes from one layer to the next, a :func:`merge_matrix` sits
            between them.
        weights: the output's readout row over the last layer's tokens (uniform for Swin's average pooling).
        step: "rollout": Â = (A + I) with rows renormalised (Abnar & Zuidema 2020; 0.5·A + 0.5·I for "mean" fusion),
            A's padded mass spread over the real keys (:func:`fuse_windows`);
            "grad_rollout": Â = (Ā + I) with rows renormalised (vizapp's gradient rollout, Ā the gradient-weighted
            heads); "relevance": Â = I + Ā (Chefer et al. ICCV 2021's R ← R + Ā·R).
        start_layer: layers below it are left out (their Â is the identity; merges are still applied).

    Returns:
        [N_first] float64 over the first stage's grid (row-major).
    """
    if step not in ("rollout", "grad_rollout", "relevance"):
        raise ValueError(f"step must be 'rollout', 'grad_rollout' or 'relevance', got {step!r}")
    v = weights.double()
    for layer in range(len(fused) - 1, -1, -1):
        if layer >= start_layer:
            a, idx = fused[layer].double(), indices[layer]
            if step == "relevance":
                v = v + row_times_windows(v, a, idx)
            else:  # rows of (A + I) / (row sum + 1); the row sums are 1 for renormalised attention
                u = v / (token_row_sums(a, idx, v.shape[0]) + 1.0)
                v = u + row_times_windows(u, a, idx)
        if layer > 0 and merges_after(grids, layer - 1):
            v = through_merge(v, grids[layer - 1])
    return v
