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

from vizapp import cpu_rows, fused_attention, limits
from vizapp.analysis.distance import BlockDistanceTerms
from vizapp.analysis.headstats import row_entropy, row_entropy_from_scores, token_norm_stats


@dataclass(frozen=True)
class Geometry:
    """What a statistic may need of one layer's tokens, from the model.

    Attributes:
        num_tokens: N, the layer's query rows (every token of the layer, prefix tokens first).
        num_prefix_tokens: tokens before the patches (CLS, registers, distillation token), first among the queries and
            among the keys.
        dist: [P, K] distances in input pixels from each patch query (P = N - prefix tokens) to each patch key of its
            row, on the device the attention arrives on. A plain ViT's row is over every token, so K = P (the patch
            distance matrix); a windowed layer's (Swin) is over the slots of the query's window
            (:mod:`vizapp.statistics_pass`).
    """

    num_tokens: int
    num_prefix_tokens: int
    dist: torch.Tensor

    @property
    def num_keys(self) -> int:
        """The keys of each attention row: the prefix tokens and the K patch keys of :attr:`dist`."""
        return self.num_prefix_tokens + int(self.dist.shape[-1])

    def check(self) -> None:
        """ValueError unless :attr:`dist` has one row per patch query."""
        n, p = self.num_tokens, self.num_prefix_tokens
        if self.dist.dim() != 2 or self.dist.shape[0] != n - p:
            raise ValueError(f"{n} tokens after {p} prefix tokens, but the grid has {self.dist.shape[0]} patches")

    @cached_property
    def distance_terms(self) -> BlockDistanceTerms:
        """The mean-distance sums of a chunk, with one product buffer shared by the chunks of this forward."""
        return BlockDistanceTerms(self.dist, self.num_prefix_tokens)


class Statistic:
    """Base of every registered statistic. ``name`` keys it everywhere (``Analysis.statistics``, the evaluation's
    columns ``{name}.l{layer}.h{head}``); ``column`` names it in dataset mode's CSV (default: ``name``).

    ``windowed`` (class attribute): the statistic is defined for a windowed-attention layer (Swin). A head statistic
    then reads each query's row as a distribution over whichever keys it has (a windowed layer's row is over the real
    slots of the query's window, :mod:`vizapp.statistics_pass`); a block statistic reads the block's tokens whatever
    their number. Left False, a statistic is not computed for windowed models (NaN, with :meth:`undefined`'s reason):
    one that reads key k as token k would be silently wrong there.
    """

    name: ClassVar[str] = ""
    label: ClassVar[str] = ""
    unit: ClassVar[str] = ""
    windowed: ClassVar[bool] = False

    @property
    def column(self) -> str:
        return self.name

    def undefined(self, num_prefix_tokens: int, windowed: bool) -> str:
        """Why the statistic is not defined for a model with ``num_prefix_tokens`` prefix tokens and (``windowed``)
        windowed attention, in one sentence; "" when it is defined."""
        if windowed and not self.windowed:
            return (
                f"{self.name} is not computed for windowed-attention (Swin) models: it does not declare that it is "
                "defined on a windowed layer's rows (windowed = True)."
            )
        return ""


class HeadStatistic(Statistic):
    """One number per layer and head: the mean over query rows of :meth:`rows`.

    ``patch_queries`` (class attribute): only the patch tokens' rows count (the first ``num_prefix_tokens`` rows are
    not passed to :meth:`rows`), else every row does.
    """

    patch_queries: ClassVar[bool] = False
    #: the row quantity of the fused kernels (a GPU's :mod:`vizapp.fused_attention`, the CPU's :mod:`vizapp.cpu_rows`)
    #: equal to :meth:`rows` (:data:`vizapp.fused_attention.ROW_QUANTITIES`), or None: the attention is then formed
    fused_row: ClassVar[str | None] = None

    def rows(self, attn: torch.Tensor, row: int, geometry: Geometry, out: torch.Tensor, work: torch.Tensor) -> None:
        """Write one value per head and query row of ``attn`` [c, r, N] (query rows ``row .. row + r``; with
        ``patch_queries``, only rows at or after the prefix tokens) into ``out`` [c, r] (float32). ``work`` is a
        [c, r, N] buffer of ``attn``'s dtype the statistic may overwrite."""
        raise NotImplementedError

    def rows_from_scores(
        self, attn: torch.Tensor, scores: torch.Tensor, row: int, geometry: Geometry, out: torch.Tensor
    ) -> bool:
        """Optional: :meth:`rows`, given also the finite scores [c, r, N] whose softmax ``attn`` is (it may overwrite
        them), where the forward has them. Returns False (the default) when the statistic has no such form. The
        reducer offers a chunk's scores to its statistics in order, before any of them runs, and the first that
        takes them is the only one to see them; it calls :meth:`rows` for the others."""
        return False

    def window_rows(self, attn: torch.Tensor, dist: torch.Tensor, out: torch.Tensor, work: torch.Tensor) -> bool:
        """Optional, for a windowed layer without padding: write the value of every row of one image's window
        attention as the library lays it out, ``attn`` [nW, H, w², w²] (window, head, query slot, key slot), into
        ``out`` [nW, H, w²], exactly as :meth:`rows` would write it for that row; ``dist`` [nW, w², w²] holds the
        distances from each window's query slots to its key slots, ``work`` is like ``attn`` and may be overwritten.
        Returns False (the default) when the statistic has no such form: the rows are then gathered in token order
        for :meth:`rows` (:mod:`vizapp.statistics_pass`)."""
        return False


class BlockStatistic(Statistic):
    """One number per layer and image, from the block's output."""

    def of_block(self, tokens: BlockTokens) -> torch.Tensor:
        """[B] float64 for one block's output (see :class:`BlockTokens`)."""
        raise NotImplementedError


class BlockTokens:
    """One block's output [B, N, D] as the block statistics read it; its token norms are computed once for all
    (``norms``: the caller's own [B, N] L2 norms of ``out.float()``'s tokens, when it has them already)."""

    def __init__(self, out: torch.Tensor, num_prefix_tokens: int, norms: torch.Tensor | None = None) -> None:
        self.out = out
        self.num_prefix_tokens = num_prefix_tokens
        self._norms = norms

    @property
    def norms(self) -> torch.Tensor:
        """[B, N] the L2 norm of every token, float32."""
        if self._norms is None:
            self._norms = torch.linalg.vector_norm(self.out.float(), dim=-1)
        return self._norms

    @cached_property
    def norm_summaries(self) -> dict[str, torch.Tensor]:
        """:func:`~vizapp.analysis.headstats.token_norm_stats` of :attr:`norms`, each [B] float64."""
        return token_norm_stats(self.norms, self.num_prefix_tokens)


class MeanDistance(HeadStatistic):
    """Mean attention distance (Dosovitskiy et al., ICLR 2021, Fig. 7 right): per patch query, Σ_j a_ij·d_ij over the
    patch keys, renormalised by Σ_j a_ij, in input pixels (:mod:`vizapp.analysis.distance`)."""

    name, label, unit = "distance", "mean attention distance", "px"
    patch_queries = True
    fused_row = "distance"
    windowed = True  # over a window's real keys: vizapp.analysis.windows.mean_distance
    column = "mean_distance_px"  # type: ignore[assignment]  # dataset mode's column since its first version

    def rows(self, attn: torch.Tensor, row: int, geometry: Geometry, out: torch.Tensor, work: torch.Tensor) -> None:
        # the product a·d in the statistic's working buffer: [c, q, P] of its [c, q, N]
        geometry.distance_terms.query_distances(attn, row, out=out, product=work[..., : geometry.dist.shape[-1]])

    def window_rows(self, attn: torch.Tensor, dist: torch.Tensor, out: torch.Tensor, work: torch.Tensor) -> bool:
        # the operations of query_distances, row by row the same: Σ a·d / max(Σ a, tiny)
        num = torch.mul(attn, dist[:, None], out=work).sum(dim=-1)
        den = attn.sum(dim=-1).clamp_min_(torch.finfo(attn.dtype).tiny)
        torch.div(num, den, out=out)
        return True


class AttentionEntropy(HeadStatistic):
    """Shannon entropy of each query's attention row, in nats (:func:`~vizapp.analysis.headstats.row_entropy`; used by
    Zhai et al., ICML 2023, to watch attention collapse)."""

    name, label, unit = "entropy", "attention entropy", "nats"
    fused_row = "entropy"
    windowed = True  # of each row over its keys: a windowed row's real window slots, renormalised

    def rows(self, attn: torch.Tensor, row: int, geometry: Geometry, out: torch.Tensor, work: torch.Tensor) -> None:
        row_entropy(attn, out=out, work=work)

    def rows_from_scores(
        self, attn: torch.Tensor, scores: torch.Tensor, row: int, geometry: Geometry, out: torch.Tensor
    ) -> bool:
        # On the CPU a log per weight is most of the statistic's time (2.5x this form's); on a GPU it costs no more
        # than any other pass, and this form launches two kernels more
        if attn.device.type != "cpu":
            return False
        row_entropy_from_scores(attn, scores, out=out)
        return True

    def window_rows(self, attn: torch.Tensor, dist: torch.Tensor, out: torch.Tensor, work: torch.Tensor) -> bool:
        row_entropy(attn, out=out, work=work)  # of each row alone, in whatever layout
        return True


class TokenNorm(BlockStatistic):
    """A summary of the L2 norms of a block's output tokens (Darcet et al., ICLR 2024: high-norm outlier tokens)."""

    windowed = True  # a windowed block's output tokens are its stage's grid

    def __init__(self, which: str, label: str) -> None:
        self.which = which
        self.name = f"norm_{which}"  # type: ignore[misc]  # an instance name: three statistics share the class
        self.label = label  # type: ignore[misc]
        self.unit = ""  # type: ignore[misc]

    def of_block(self, tokens: BlockTokens) -> torch.Tensor:
        return tokens.norm_summaries[self.which]

    def undefined(self, num_prefix_tokens: int, windowed: bool) -> str:
        if self.which == "prefix_mean" and num_prefix_tokens == 0:
            return (
                f"{self.name} is NaN: the model has no prefix tokens (no class, register or distillation token) "
                "whose norm it would average."
            )
        return super().undefined(num_prefix_tokens, windowed)


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


def undefined_statistics(num_prefix_tokens: int, windowed: bool) -> dict[str, str]:
    """name -> the sentence saying why, for every registered statistic not defined for such a model (see
    :meth:`Statistic.undefined`); what every output prints beside its NaN."""
    found = {name: s.undefined(num_prefix_tokens, windowed) for name, s in STATISTICS.items()}
    return {name: why for name, why in found.items() if why}


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
    layer, and averages them over the query rows when the layer is done; where every layer's rows fit
    :data:`vizapp.limits.STATISTIC_ROWS_BYTES` (layers of one geometry and head count), each layer keeps its own and the
    averages are taken for all at once after the last. Nothing of a layer's attention outlives its chunk. Layers may
    differ in head count (a layer's missing heads stay NaN) and in tokens: each layer has its own :class:`Geometry` (a
    windowed model's layers differ in grid and window), given here or by :meth:`set_geometry` before the layer's first
    chunk.

    Args:
        heads: heads of each layer (its length is L).
        batch: B, images in the forward.
        geometry: the tokens of every layer (one :class:`Geometry`), or one per layer (None: set later).
        statistics: which ones; default every registered statistic.
        device: where the values live; default the device of the first geometry's distances.

    Attributes (after the forward; float64 on the attention's device):
        values: name -> [L, B, max H] for head statistics, [L, B] for block statistics (NaN where never computed).
    """

    def __init__(
        self,
        heads: Sequence[int],
        batch: int,
        geometry: Geometry | Sequence[Geometry | None] | None,
        statistics: Sequence[Statistic] | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        chosen = list(STATISTICS.values()) if statistics is None else list(statistics)
        self.head_stats = [s for s in chosen if isinstance(s, HeadStatistic)]
        self.block_stats = [s for s in chosen if isinstance(s, BlockStatistic)]
        self.heads, self.batch = list(heads), int(batch)
        n_layers, h_max = len(self.heads), max(self.heads, default=0)
        if geometry is None or isinstance(geometry, Geometry):
            self.geometry: list[Geometry | None] = [geometry] * n_layers
        else:
            self.geometry = list(geometry)
            if len(self.geometry) != n_layers:
                raise ValueError(f"{len(self.geometry)} geometries for {n_layers} layers")
        for g in self.geometry:
            if g is not None:
                g.check()
        if device is None:
            given = [g for g in self.geometry if g is not None]
            if not given:
                raise ValueError("without a geometry, say the device the attention arrives on")
            device = given[0].dist.device
        dev = torch.device(device)
        nan = float("nan")
        self.values: dict[str, torch.Tensor] = {
            s.name: torch.full((n_layers, self.batch, h_max), nan, dtype=torch.float64, device=dev)
            for s in self.head_stats
        } | {s.name: torch.full((n_layers, self.batch), nan, dtype=torch.float64, device=dev) for s in self.block_stats}
        self._h_max, self._device = h_max, dev
        # Each head statistic's rows (see the class's docstring): [B, max H, Q] shared by the layers (Q: the layer's
        # patch queries or every query; grown for a layer with more), or [L, B, H, Q] with _by_layer, a slice a layer
        # averaged for all at once after the last: one operation a statistic instead of one a layer (a GPU's kernels).
        self._rows: dict[str, torch.Tensor] = {}
        self._by_layer = self._rows_fit_by_layer()
        self._waiting: set[int] = set()  # with _by_layer: the layers done, whose means wait for the last
        self._work: torch.Tensor | None = None
        self._cells = [0] * n_layers  # (image, head, query row) cells seen per layer
        self._blocks = [False] * n_layers

    def set_geometry(self, layer: int, geometry: Geometry) -> None:
        """The tokens of ``layer`` (before its first chunk), for a forward whose layers are known only as it runs."""
        geometry.check()
        if self._by_layer and geometry is not self.geometry[layer]:  # rows shared by the layers from now on
            for done in sorted(self._waiting):
                self._layer_means(done)
            self._by_layer, self._rows = False, {}
        self.geometry[layer] = geometry

    def _rows_fit_by_layer(self) -> bool:
        g = self.geometry[0] if self.geometry else None
        if g is None or any(other is not g for other in self.geometry) or len(set(self.heads)) != 1:
            return False
        rows = sum(self._queries(s, g) for s in self.head_stats) * self.batch * self._h_max
        return limits.statistic_rows_by_layer(len(self.heads), rows * 4)

    @staticmethod
    def _queries(s: HeadStatistic, g: Geometry) -> int:
        return g.num_tokens - g.num_prefix_tokens if s.patch_queries else g.num_tokens

    def _layer_geometry(self, layer: int) -> Geometry:
        g = self.geometry[layer]
        if g is None:
            raise ValueError(f"layer {layer} has no geometry; call set_geometry before its attention")
        return g

    def _row_buffer(self, s: HeadStatistic, g: Geometry, layer: int) -> torch.Tensor:
        """[B, max H, Q] for statistic ``s`` on ``layer``, of geometry ``g``: a view of a buffer shared by the layers,
        or of the layer's own slice (see ``_rows`` in ``__init__``)."""
        q = self._queries(s, g)
        buf = self._rows.get(s.name)
        if self._by_layer:
            if buf is None:
                shape = (len(self.heads), self.batch, self._h_max, q)
                buf = self._rows[s.name] = torch.zeros(shape, device=self._device)
            return buf[layer]
        if buf is None or buf.shape[-1] < q:
            buf = self._rows[s.name] = torch.zeros((self.batch, self._h_max, q), device=self._device)
        return buf[..., :q]

    # AttentionConsumer
    #: takes chunks of several whole images, and a scratch buffer with each (:class:`~vizapp.attention.AttentionConsumer`)
    image_groups = True
    takes_scratch = True
    takes_scores = True  # and is told when the scratch holds the chunk's scores

    def chunk(
        self,
        layer: int,
        batch: int,
        head: int,
        attn: torch.Tensor,
        row: int,
        scratch: torch.Tensor | None = None,
        scores_in_scratch: bool = False,
    ) -> None:
        if attn.dim() == 4:  # [g, H, N, N]: every head and row of images batch .. batch + g
            self.chunk_images(layer, batch, attn, scratch, scores_in_scratch)
            return
        c, r, n = attn.shape
        g = self._layer_geometry(layer)
        if n != g.num_keys:
            raise ValueError(f"attention over {n} tokens, expected {g.num_keys}")
        if not 0 <= batch < self.batch:
            raise ValueError(f"attention of image {batch}, but the forward has {self.batch} images")
        work = scratch if scratch is not None and scratch.shape == attn.shape and scratch.dtype == attn.dtype else None
        scores = work if scores_in_scratch else None
        work = self._working(work, c, r, attn)
        heads, p = slice(head, head + c), g.num_prefix_tokens
        lo = max(row, p)  # the chunk's first patch query
        jobs = []
        for s in self.head_stats:
            rows = self._row_buffer(s, g, layer)
            if s.patch_queries:
                if lo < row + r:
                    jobs.append((s, rows[batch, heads, lo - p : row + r - p], work[:c, : row + r - lo]))
            else:
                jobs.append((s, rows[batch, heads, row : row + r], work[:c, :r]))
        self._reduce(jobs, attn, row, g, scores)
        self._cells[layer] += c * r

    def _working(self, work: torch.Tensor | None, c: int, r: int, attn: torch.Tensor) -> torch.Tensor:
        """``work`` (a scratch that fits), else the reducer's own buffer for [c, r, N] chunks like ``attn``, grown."""
        work = self._work if work is None else work
        n = attn.shape[-1]
        if work is None or work.shape[0] < c or work.shape[1] < r or work.shape[2] != n or work.dtype != attn.dtype:
            work = self._work = torch.empty((c, r, n), dtype=attn.dtype, device=attn.device)
        return work

    @staticmethod
    def _reduce(
        jobs: list[tuple[HeadStatistic, torch.Tensor, torch.Tensor]],
        attn: torch.Tensor,
        row: int,
        g: Geometry,
        scores: torch.Tensor | None,
    ) -> None:
        """Each (statistic, its output rows, a working buffer) of ``jobs`` on one chunk. With the chunk's ``scores``,
        the first statistic that takes them (:meth:`HeadStatistic.rows_from_scores`) runs first, before any working
        buffer (which may be the scores' own) is written; the others from the attention alone."""
        if scores is not None:
            for i, (s, out, _) in enumerate(jobs):
                if s.rows_from_scores(attn, scores, row, g, out):
                    jobs = jobs[:i] + jobs[i + 1 :]
                    break
        for s, out, work in jobs:
            s.rows(attn, row, g, out, work)

    def chunk_images(
        self,
        layer: int,
        batch: int,
        attn: torch.Tensor,
        scratch: torch.Tensor | None = None,
        scores_in_scratch: bool = False,
    ) -> None:
        """Every head and query row of the images ``batch .. batch + g``: attention [g, H, N, N] (``scratch``, optional:
        a buffer like it that may be overwritten, holding the attention's scores with ``scores_in_scratch``). Where
        the layer has every head the buffers hold, the g images' heads are reduced as one chunk of g·H heads (each
        statistic is per head and row), else image by image."""
        if scratch is not None and (scratch.shape != attn.shape or scratch.dtype != attn.dtype):
            scratch = None
        images, h, r, n = attn.shape
        g = self._layer_geometry(layer)
        if batch < 0 or batch + images > self.batch:
            raise ValueError(f"attention of images {batch}..{batch + images - 1}, but the forward has {self.batch}")
        buffers = [self._row_buffer(s, g, layer) for s in self.head_stats]
        whole = all(b.shape[1] == h and b.is_contiguous() for b in buffers)  # the images' rows are one block
        if images == 1 or r != g.num_tokens or not whole or not attn.is_contiguous():
            for j, one in enumerate(attn):
                one_scratch = None if scratch is None else scratch[j]
                self.chunk(layer, batch + j, 0, one, 0, scratch=one_scratch, scores_in_scratch=scores_in_scratch)
            return
        if n != g.num_keys:
            raise ValueError(f"attention over {n} tokens, expected {g.num_keys}")
        flat = attn.view(images * h, r, n)
        scratch_ok = scratch is not None and scratch.is_contiguous()
        work = scratch.view(images * h, r, n) if scratch_ok else None
        scores = work if scratch_ok and scores_in_scratch else None
        work = self._working(work, images * h, r, attn)
        p = g.num_prefix_tokens
        jobs = []
        for s, rows in zip(self.head_stats, buffers, strict=True):
            out = rows[batch : batch + images].view(images * h, -1)  # [g·H, queries]: a view of the buffer
            if s.patch_queries:
                if p < r:
                    jobs.append((s, out[:, : r - p], work[: images * h, : r - p]))
            else:
                jobs.append((s, out[:, :r], work[: images * h, :r]))
        self._reduce(jobs, flat, 0, g, scores)
        self._cells[layer] += images * h * r

    def put_rows(self, layer: int, batch: int, values: dict[str, torch.Tensor]) -> None:
        """Every query row of image ``batch`` in ``layer`` at once, reduced elsewhere: ``values`` maps each head
        statistic's name to its value per head and query row, [H, Q] (Q the layer's patch queries or every query, as
        for :meth:`chunk`); a windowed layer's rows reduced in the library's layout (:meth:`HeadStatistic.window_rows`)."""
        if not 0 <= batch < self.batch:
            raise ValueError(f"rows of image {batch}, but the forward has {self.batch} images")
        for name, rows in self.row_buffers(layer, self.heads[layer]).items():
            if values[name].shape != rows.shape[1:]:
                h, q = rows.shape[1:]
                raise ValueError(f"{name}: {tuple(values[name].shape)} values for {h} heads x {q} rows")
            rows[batch] = values[name]
        self.rows_filled(layer, 1)

    def row_buffers(self, layer: int, heads: int) -> dict[str, torch.Tensor]:
        """Each head statistic's rows of ``layer``'s first ``heads`` heads, name -> [B, heads, Q], for a caller that
        computes them itself (:meth:`put_rows`, the fused kernel); :meth:`rows_filled` then counts them."""
        g = self._layer_geometry(layer)
        return {s.name: self._row_buffer(s, g, layer)[:, :heads] for s in self.head_stats}

    def rows_filled(self, layer: int, images: int | None = None, cells: int | None = None) -> None:
        """``images`` images' rows of ``layer`` (default: all), or ``cells`` (image, head, query row) cells of them,
        were written into :meth:`row_buffers`."""
        whole = (self.batch if images is None else images) * self.heads[layer] * self._layer_geometry(layer).num_tokens
        self._cells[layer] += whole if cells is None else cells

    #: ``attend(layer, q, k, v, scale, bias)``: the output, its rows from the fused kernel, or None (AttentionConsumer)
    attend = fused_attention.reduce_layer
    #: ``softmax_rows(layer, batch, head, scores, row, out, head_sum=None)``: a chunk's softmax and rows by the CPU kernel
    softmax_rows = cpu_rows.reduce_chunk

    def layer_done(self, layer: int) -> None:
        h, g = self.heads[layer], self._layer_geometry(layer)
        expected = self.batch * h * g.num_tokens
        if self._cells[layer] != expected:
            raise RuntimeError(
                f"layer {layer}: attention of {self._cells[layer]} (head, query) pairs reached the statistics, "
                f"expected {expected} ({self.batch} images x {h} heads x {g.num_tokens} queries)"
            )
        if not self._by_layer:
            self._layer_means(layer)
            return
        self._waiting.add(layer)
        if len(self._waiting) == len(self.heads):  # every layer's means in one operation a statistic
            for s in self.head_stats:
                torch.mean(self._rows[s.name], dim=-1, dtype=torch.float64, out=self.values[s.name])

    def _layer_means(self, layer: int) -> None:
        """Layer ``layer``'s rows averaged over the queries into :attr:`values`."""
        h, g = self.heads[layer], self._layer_geometry(layer)
        for s in self.head_stats:
            # the mean in float64 straight into the values (one kernel on a GPU, not a copy, a mean and a copy back)
            rows = self._row_buffer(s, g, layer)[:, :h]
            torch.mean(rows, dim=-1, dtype=torch.float64, out=self.values[s.name][layer, :, :h])

    def block(self, layer: int, out: torch.Tensor, norms: torch.Tensor | None = None) -> None:
        """``on_block``: the block statistics of block ``layer``'s output [B, N, D] (``norms``: its tokens' L2 norms
        [B, N] float32 when the caller has them, see :class:`BlockTokens`)."""
        tokens = BlockTokens(out, self._layer_geometry(layer).num_prefix_tokens, norms)
        for s in self.block_stats:
            self.values[s.name][layer] = s.of_block(tokens).to(torch.float64)
        self._blocks[layer] = True

    def blocks(self, outputs: torch.Tensor, norms: torch.Tensor | None = None) -> None:
        """The block statistics of every layer at once, from the block outputs stacked [L, B, N, D] after the forward
        (``norms``: their [L, B, N] token norms when the caller has them): each statistic reads the L·B outputs as one
        block of L·B images, so it runs once instead of once per layer (a GPU launches its kernels once). The layers
        must share one geometry's prefix tokens."""
        n_layers, b = outputs.shape[:2]
        if n_layers != len(self.heads) or b != self.batch:
            raise ValueError(f"outputs of {n_layers} layers x {b} images, expected {len(self.heads)} x {self.batch}")
        prefix = {self._layer_geometry(i).num_prefix_tokens for i in range(n_layers)}
        if len(prefix) != 1:
            raise ValueError("the layers differ in prefix tokens: give each block to block()")
        flat_norms = None if norms is None else norms.flatten(0, 1)
        tokens = BlockTokens(outputs.flatten(0, 1), prefix.pop(), flat_norms)
        for s in self.block_stats:
            self.values[s.name].copy_(s.of_block(tokens).view(n_layers, b))
        self._blocks = [True] * n_layers

    def complete(self) -> bool:
        """Every layer's attention (and, with block statistics, every block's output) reached the reducer."""
        full = all(
            g is not None and c == self.batch * h * g.num_tokens
            for c, h, g in zip(self._cells, self.heads, self.geometry, strict=True)
        )
        return full and (not self.block_stats or all(self._blocks))

    def per_image(self, image: int) -> dict[str, torch.Tensor]:
        """Image ``image``'s statistics: name -> [L, max H] or [L] (views)."""
        return {name: v[:, image] for name, v in self.values.items()}
