"""The registry of per-layer statistics, and the one reducer every path feeds them through.

A statistic is one class registered once (:func:`register`). :func:`vizapp.analyze` (``Analysis.statistics``),
dataset mode (``python -m vizapp.stats``: one CSV column each) and the evaluation (``python -m vizapp.evaluate``: one
column per layer and head) all take the registered statistics, and all compute them with the same per-chunk code,
:class:`StatisticsReducer`. Two kinds:

- :class:`HeadStatistic`: one number per layer, image and head, the mean over query rows of a value of each row of
  attention (mean attention distance, attention entropy). The reducer sees attention a chunk [c, r, N] at a time
  (c heads, r query rows) while it is in cache and keeps one float per (image, head, query row) of a layer.
- :class:`BlockStatistic`: one number per layer and image, from the block's output tokens [B, N, D] (token norms).

The maths stays in :mod:`vizapp.analysis`; a statistic only says which function of a chunk it is. Adding one::

    class MaxWeight(HeadStatistic):
        name, label, unit = "max_weight", "largest attention weight", ""
        def rows(self, attn, row, geometry, out, work):
            torch.amax(attn, dim=-1, out=out)

    vizapp.statistics.register(MaxWeight())
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar

import torch

from vizapp.analysis.distance import BlockDistanceTerms
from vizapp.analysis.headstats import row_entropy, token_norm_stats


@dataclass(frozen=True)
class Geometry:
    """What a statistic may need of one forward's tokens, from the model.

    Attributes:
        num_tokens: N, every token of a layer.
        num_prefix_tokens: tokens before the patches (CLS, registers, distillation token).
        dist: [P, P] distances between patch centres in input pixels, on the device the attention arrives on.
    """

    num_tokens: int
    num_prefix_tokens: int
    dist: torch.Tensor

    @cached_property
    def distance_terms(self) -> BlockDistanceTerms:
        """The mean-distance sums of a chunk, with one product buffer shared by the chunks of this forward."""
        return BlockDistanceTerms(self.dist, self.num_prefix_tokens)


class Statistic:
    """Base of every registered statistic. ``name`` keys it everywhere (``Analysis.statistics``, the evaluation's
    columns ``{name}.l{layer}.h{head}``); ``column`` names it in dataset mode's CSV (default: ``name``)."""

    name: ClassVar[str] = ""
    label: ClassVar[str] = ""
    unit: ClassVar[str] = ""

    @property
    def column(self) -> str:
        return self.name


class HeadStatistic(Statistic):
    """One number per layer and head: the mean over query rows of :meth:`rows`.

    ``patch_queries`` (class attribute): only the patch tokens' rows count (the first ``num_prefix_tokens`` rows are
    not passed to :meth:`rows`), else every row does.
    """

    patch_queries: ClassVar[bool] = False

    def rows(self, attn: torch.Tensor, row: int, geometry: Geometry, out: torch.Tensor, work: torch.Tensor) -> None:
        """Write one value per head and query row of ``attn`` [c, r, N] (query rows ``row .. row + r``; with
        ``patch_queries``, only rows at or after the prefix tokens) into ``out`` [c, r] (float32). ``work`` is a
        [c, r, N] buffer of ``attn``'s dtype the statistic may overwrite."""
        raise NotImplementedError


class BlockStatistic(Statistic):
    """One number per layer and image, from the block's output."""

    def of_block(self, tokens: BlockTokens) -> torch.Tensor:
        """[B] float64 for one block's output (see :class:`BlockTokens`)."""
        raise NotImplementedError


class BlockTokens:
    """One block's output [B, N, D] as the block statistics read it; its token norms are computed once for all."""

    def __init__(self, out: torch.Tensor, num_prefix_tokens: int) -> None:
        self.out = out
        self.num_prefix_tokens = num_prefix_tokens

    @cached_property
    def norms(self) -> torch.Tensor:
        """[B, N] the L2 norm of every token, float32."""
        return torch.linalg.vector_norm(self.out.float(), dim=-1)

    @cached_property
    def norm_summaries(self) -> dict[str, torch.Tensor]:
        """:func:`~vizapp.analysis.headstats.token_norm_stats` of :attr:`norms`, each [B] float64."""
        return token_norm_stats(self.norms, self.num_prefix_tokens)


class MeanDistance(HeadStatistic):
    """Mean attention distance (Dosovitskiy et al., ICLR 2021, Fig. 7 right): per patch query, Σ_j a_ij·d_ij over the
    patch keys, renormalised by Σ_j a_ij, in input pixels (:mod:`vizapp.analysis.distance`)."""

    name, label, unit = "distance", "mean attention distance", "px"
    patch_queries = True
    column = "mean_distance_px"  # type: ignore[assignment]  # dataset mode's column since its first version

    def rows(self, attn: torch.Tensor, row: int, geometry: Geometry, out: torch.Tensor, work: torch.Tensor) -> None:
        geometry.distance_terms.query_distances(attn, row, out=out)


class AttentionEntropy(HeadStatistic):
    """Shannon entropy of each query's attention row, in nats (:func:`~vizapp.analysis.headstats.row_entropy`; used by
    Zhai et al., ICML 2023, to watch attention collapse)."""

    name, label, unit = "entropy", "attention entropy", "nats"

    def rows(self, attn: torch.Tensor, row: int, geometry: Geometry, out: torch.Tensor, work: torch.Tensor) -> None:
        row_entropy(attn, out=out, work=work)


class TokenNorm(BlockStatistic):
    """A summary of the L2 norms of a block's output tokens (Darcet et al., ICLR 2024: high-norm outlier tokens)."""

    def __init__(self, which: str, label: str) -> None:
        self.which = which
        self.name = f"norm_{which}"  # type: ignore[misc]  # an instance name: three statistics share the class
        self.label = label  # type: ignore[misc]
        self.unit = ""  # type: ignore[misc]

    def of_block(self, tokens: BlockTokens) -> torch.Tensor:
        return tokens.norm_summaries[self.which]


STATISTICS: dict[str, Statistic] = {}
"""Every registered statistic by name, in registration order (the order of CSV columns)."""


def register(statistic: Statistic) -> Statistic:
    """Add ``statistic`` to :data:`STATISTICS`; every path computes it from then on. Returns it."""
    if not isinstance(statistic, (HeadStatistic, BlockStatistic)):
        raise TypeError(f"a statistic is a HeadStatistic or a BlockStatistic, got {type(statistic).__name__}")
    if not statistic.name or not statistic.name.replace("_", "").isalnum():
        raise ValueError(f"a statistic's name is letters, digits and underscores, got {statistic.name!r}")
    if statistic.name in STATISTICS:
        raise ValueError(f"a statistic called {statistic.name!r} is registered already")
    STATISTICS[statistic.name] = statistic
    return statistic


def unregister(name: str) -> Statistic:
    """Remove the statistic called ``name`` (e.g. a user's, after an experiment) and return it."""
    if name not in STATISTICS:
        raise KeyError(f"no statistic called {name!r}; registered: {list(STATISTICS)}")
    return STATISTICS.pop(name)


def head_statistics() -> list[HeadStatistic]:
    """The registered per-head statistics, in order."""
    return [s for s in STATISTICS.values() if isinstance(s, HeadStatistic)]


def block_statistics() -> list[BlockStatistic]:
    """The registered per-block statistics, in order."""
    return [s for s in STATISTICS.values() if isinstance(s, BlockStatistic)]


for _stat in (
    MeanDistance(),
    AttentionEntropy(),
    TokenNorm("patch_mean", "mean norm of the patch tokens"),
    TokenNorm("patch_max", "largest norm of a patch token"),
    TokenNorm("prefix_mean", "mean norm of the prefix tokens"),
):
    register(_stat)


class StatisticsReducer:
    """Every registered statistic of every layer and image of one captured forward: an
    :class:`~vizapp.capture.AttentionConsumer` (:meth:`chunk`, :meth:`layer_done`) and an ``on_block`` callback
    (:meth:`block`).

    Per layer it keeps one float32 per (image, head, query row) for each head statistic, in buffers reused by every
    layer, and averages them over the query rows when the layer is done; nothing of a layer's attention outlives its
    chunk. Layers may differ in head count: a layer's missing heads stay NaN.

    Args:
        heads: heads of each layer (its length is L).
        batch: B, images in the forward.
        geometry: the forward's tokens (:class:`Geometry`).
        statistics: which ones; default every registered statistic.

    Attributes (after the forward; float64 on the attention's device):
        values: name -> [L, B, max H] for head statistics, [L, B] for block statistics (NaN where never computed).
    """

    def __init__(
        self,
        heads: Sequence[int],
        batch: int,
        geometry: Geometry,
        statistics: Sequence[Statistic] | None = None,
    ) -> None:
        chosen = list(STATISTICS.values()) if statistics is None else list(statistics)
        self.head_stats = [s for s in chosen if isinstance(s, HeadStatistic)]
        self.block_stats = [s for s in chosen if isinstance(s, BlockStatistic)]
        self.heads, self.batch, self.geometry = list(heads), int(batch), geometry
        n_layers, h_max, dev = len(self.heads), max(self.heads, default=0), geometry.dist.device
        nan = float("nan")
        self.values: dict[str, torch.Tensor] = {
            s.name: torch.full((n_layers, self.batch, h_max), nan, dtype=torch.float64, device=dev)
            for s in self.head_stats
        } | {s.name: torch.full((n_layers, self.batch), nan, dtype=torch.float64, device=dev) for s in self.block_stats}
        n, p = geometry.num_tokens, geometry.num_prefix_tokens
        if geometry.dist.shape[-1] != n - p:
            raise ValueError(f"{n} tokens after {p} prefix tokens, but the grid has {geometry.dist.shape[-1]} patches")
        # [B, H, Q] per head statistic: Q = the patch queries or every query
        self._rows = {
            s.name: torch.zeros((self.batch, h_max, n - p if s.patch_queries else n), device=dev)
            for s in self.head_stats
        }
        self._work: torch.Tensor | None = None
        self._cells = [0] * n_layers  # (image, head, query row) cells seen per layer
        self._blocks = [False] * n_layers

    # AttentionConsumer
    def chunk(self, layer: int, batch: int, head: int, attn: torch.Tensor, row: int) -> None:
        c, r, n = attn.shape
        g = self.geometry
        if n != g.num_tokens:
            raise ValueError(f"attention over {n} tokens, expected {g.num_tokens}")
        if not 0 <= batch < self.batch:
            raise ValueError(f"attention of image {batch}, but the forward has {self.batch} images")
        work = self._work
        if work is None or work.shape[0] < c or work.shape[1] < r or work.dtype != attn.dtype:
            work = self._work = torch.empty((c, r, n), dtype=attn.dtype, device=attn.device)
        heads, p = slice(head, head + c), g.num_prefix_tokens
        lo = max(row, p)  # the chunk's first patch query
        for s in self.head_stats:
            if s.patch_queries:
                if lo < row + r:
                    out = self._rows[s.name][batch, heads, lo - p : row + r - p]
                    s.rows(attn, row, g, out, work[:c, : row + r - lo])
            else:
                s.rows(attn, row, g, self._rows[s.name][batch, heads, row : row + r], work[:c, :r])
        self._cells[layer] += c * r

    def chunk_images(self, layer: int, batch: int, attn: torch.Tensor) -> None:
        """Every head and query row of the images ``batch .. batch + g``: attention [g, H, N, N]."""
        for j, one in enumerate(attn):
            self.chunk(layer, batch + j, 0, one, 0)

    def layer_done(self, layer: int) -> None:
        h = self.heads[layer]
        expected = self.batch * h * self.geometry.num_tokens
        if self._cells[layer] != expected:
            raise RuntimeError(
                f"layer {layer}: attention of {self._cells[layer]} (head, query) pairs reached the statistics, "
                f"expected {expected} ({self.batch} images x {h} heads x {self.geometry.num_tokens} queries)"
            )
        for s in self.head_stats:
            self.values[s.name][layer, :, :h] = self._rows[s.name][:, :h].double().mean(dim=-1)

    def block(self, layer: int, out: torch.Tensor) -> None:
        """``on_block``: the block statistics of block ``layer``'s output [B, N, D]."""
        tokens = BlockTokens(out, self.geometry.num_prefix_tokens)
        for s in self.block_stats:
            self.values[s.name][layer] = s.of_block(tokens).to(torch.float64)
        self._blocks[layer] = True

    def complete(self) -> bool:
        """Every layer's attention (and, with block statistics, every block's output) reached the reducer."""
        full = all(c == self.batch * h * self.geometry.num_tokens for c, h in zip(self._cells, self.heads, strict=True))
        return full and (not self.block_stats or all(self._blocks))

    def per_image(self, image: int) -> dict[str, torch.Tensor]:
        """Image ``image``'s statistics: name -> [L, max H] or [L] (views)."""
        return {name: v[:, image] for name, v in self.values.items()}
