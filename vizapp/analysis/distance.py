"""Mean attention distance (Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021, Fig. 7 right, App. D.7).

For each head: the attention-weighted Euclidean distance in pixels between a query patch and the key patches,
summed over keys and averaged over query patches (and over images).

Prefix tokens (CLS, distillation, registers) have no position on the image, so they are dropped from queries and
keys. By default each query's remaining weights are renormalised to sum to 1, so the figure is a distance between
patches. ``renormalize=False`` keeps the raw weights instead (probing-vits' variant), which biases the distance low
by whatever mass the query sent to prefix tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _pair(x: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(x, int):
        return (x, x)
    a, b = x
    return (int(a), int(b))


def patch_distance_matrix(
    grid_size: int | Sequence[int], patch_size: int | Sequence[int], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Euclidean distance in pixels between patch positions, [P, P] with P = gh * gw (row-major patches)."""
    gh, gw = _pair(grid_size)
    ph, pw = _pair(patch_size)
    rows = torch.arange(gh, dtype=torch.float64).repeat_interleave(gw) * ph  # [P]
    cols = torch.arange(gw, dtype=torch.float64).repeat(gh) * pw  # [P]
    d = torch.sqrt((rows[:, None] - rows[None, :]) ** 2 + (cols[:, None] - cols[None, :]) ** 2)
    return d.to(dtype)


def distance_terms(
    attn: torch.Tensor,
    dist: torch.Tensor,
    out: torch.Tensor | None = None,
    into: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ_j a_ij·d_ij and Σ_j a_ij over the patch keys j, for patch-to-patch attention ``attn`` [..., Q, P] and
    distances ``dist`` [Q, P] -> ([..., Q], [..., Q]); their ratio is each query's renormalised mean distance.
    ``out`` ([..., Q, P], optional) receives the product a·d so that no buffer is allocated per call; the two sums
    are written into ``into`` ([..., Q] each) when given."""
    product = torch.mul(attn, dist, out=out) if out is not None else attn * dist
    if into is None:
        return product.sum(dim=-1), attn.sum(dim=-1)
    return torch.sum(product, dim=-1, out=into[0]), torch.sum(attn, dim=-1, out=into[1])


#: On the CPU a block of at least this many heads (an image's every head, or several images' at once) takes its sums
#: as the batched product too. 2 CPU threads, [c, 197, 197]: 60 against 77 µs at c = 6, 95 against 164 at c = 12;
#: [16, 577, 577]: 732 against 1,858. Below it the batch of [c, P] x [P, 2] products loses: 52 against 46 µs at
#: c = 3, 2,469 against 827 for one head of 1,370 tokens.
CPU_PRODUCT_MIN_HEADS = 6


class BlockDistanceTerms:
    """The two sums behind each patch query's mean distance, for attention that arrives in blocks.

    For a block [c, r, N] holding query rows ``row .. row + r`` of c heads, :meth:`__call__` returns the block's
    patch queries as patch indices q0..q1 and, for each, Σ_j a_ij·d_ij and Σ_j a_ij over the patch keys j (the
    renormalised mean distance of query i is their ratio), or None when the block holds prefix queries only.

    On a GPU, where each pass over a layer's attention costs its memory traffic, both sums of every query are one
    batched matrix product of its row of each head with [d_i | 1] (its distances and a column of ones): one read of
    the block instead of a read, a write and two more reads (a 1,374-token layer's attention is 121 MB), in one kernel
    instead of three. So are a CPU block's of :data:`CPU_PRODUCT_MIN_HEADS` heads or more; a smaller one's product
    a·d goes through one buffer kept between calls, then two sums: vectorised passes over a cache-sized block.
    """

    def __init__(self, dist: torch.Tensor, num_prefix_tokens: int) -> None:
        self.dist = dist  # [P, P]
        self.p = num_prefix_tokens
        self._product: torch.Tensor | None = None
        self._with_ones: torch.Tensor | None = None  # [P, P, 2]: each query's distances beside a column of ones

    def _sums_by_product(self, a: torch.Tensor, q0: int, q1: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Σ_j a_ij·d_ij and Σ_j a_ij of the block ``a`` [c, q1 - q0, P] as [c, q1 - q0] views of one product."""
        if self._with_ones is None:
            self._with_ones = torch.stack([self.dist, torch.ones_like(self.dist)], dim=-1)
        both = torch.bmm(a.transpose(0, 1), self._with_ones[q0:q1])  # [q, c, 2]: query i's rows @ [d_i | 1]
        return both[..., 0].mT, both[..., 1].mT

    def __call__(
        self,
        attn: torch.Tensor,
        row: int,
        into: tuple[torch.Tensor, torch.Tensor] | None = None,
        product: torch.Tensor | None = None,
    ) -> tuple[int, int, torch.Tensor, torch.Tensor] | None:
        """See the class; ``into`` ([c, P] each, optional): the sums go into their columns q0..q1; ``product`` ([c,
        q1 - q0, P], optional): the buffer for a·d instead of the one kept here."""
        c, r, _ = attn.shape
        p = self.p
        lo = max(row, p)
        if lo >= row + r:
            return None
        q0, q1 = lo - p, row + r - p
        if attn.device.type != "cpu" or c >= CPU_PRODUCT_MIN_HEADS:
            num, den = self._sums_by_product(attn[:, lo - row :, p:], q0, q1)
            if into is not None:
                into[0][:, q0:q1].copy_(num)
                into[1][:, q0:q1].copy_(den)
            return q0, q1, num, den
        buf = self._product
        if product is not None and product.shape == (c, q1 - q0, self.dist.shape[-1]) and product.dtype == attn.dtype:
            buf = product
        elif buf is None or buf.shape[0] < c or buf.shape[1] < q1 - q0:
            shape = (c, q1 - q0) if buf is None else (max(c, buf.shape[0]), max(q1 - q0, buf.shape[1]))
            buf = self._product = torch.empty((*shape, self.dist.shape[-1]), dtype=attn.dtype, device=attn.device)
        sums = None if into is None else (into[0][:, q0:q1], into[1][:, q0:q1])
        num, den = distance_terms(attn[:, lo - row :, p:], self.dist[q0:q1], out=buf[:c, : q1 - q0], into=sums)
        return q0, q1, num, den

    def query_distances(
        self, attn: torch.Tensor, row: int, out: torch.Tensor | None = None, product: torch.Tensor | None = None
    ) -> tuple[int, int, torch.Tensor] | None:
        """The renormalised mean distance of each patch query of the block: (q0, q1, [c, q1 - q0]) (into ``out``
        when given), or None when the block holds prefix queries only; ``product`` as in :meth:`__call__`."""
        terms = self(attn, row, product=product)
        if terms is None:
            return None
        q0, q1, num, den = terms
        den = den.clamp_min_(torch.finfo(den.dtype).tiny)  # a fresh tensor: clamped in place
        return q0, q1, torch.div(num, den, out=out) if out is not None else num / den


def head_distances(
    attn: torch.Tensor, dist: torch.Tensor, num_prefix_tokens: int, renormalize: bool = True
) -> torch.Tensor:
    """Mean distance for attention ``attn`` [..., N, N] given ``dist`` [P, P] -> [...] (mean over query patches)."""
    p = num_prefix_tokens
    a = attn[..., p:, p:].to(dist.dtype)  # [..., P, P]
    if a.shape[-1] != dist.shape[-1]:
        raise ValueError(
            f"attention has {a.shape[-1]} patch tokens after {p} prefix tokens, but the grid has {dist.shape[-1]}"
        )
    num, den = distance_terms(a, dist)
    if renormalize:
        num = num / den.clamp_min(torch.finfo(a.dtype).tiny)
    return num.mean(dim=-1)


def mean_attention_distance(
    attn: torch.Tensor,
    grid_size: int | Sequence[int],
    patch_size: int | Sequence[int],
    num_prefix_tokens: int,
    renormalize: bool = True,
) -> torch.Tensor:
    """Mean attention distance per layer and head, in pixels.

    Args:
        attn: post-softmax attention [L, H, N, N], or [B, L, H, N, N] to average over B images.
        grid_size: patch grid (gh, gw) (or one int for a square grid).
        patch_size: patch size in pixels (ph, pw) (or one int).
        num_prefix_tokens: tokens before the patches (CLS, distillation, registers).
        renormalize: renormalise each query's weights over the patches after dropping prefix tokens (default);
            False reproduces probing-vits' non-renormalised variant.

    Returns:
        [L, H] distances in pixels.
    """
    if attn.dim() not in (4, 5):
        raise ValueError(f"expected attention [L, H, N, N] or [B, L, H, N, N], got {tuple(attn.shape)}")
    dist = patch_distance_matrix(grid_size, patch_size, dtype=torch.float64).to(attn.device)
    d = head_distances(attn, dist, num_prefix_tokens, renormalize)
    if d.dim() == 3:
        d = d.mean(dim=0)
    return d.to(torch.float32)


def uniform_reference_distance(grid_size: int | Sequence[int], patch_size: int | Sequence[int]) -> float:
    """Mean distance of uniform attention over the grid: the reference line of the ViT paper's figure."""
    return float(patch_distance_matrix(grid_size, patch_size, dtype=torch.float64).mean())
