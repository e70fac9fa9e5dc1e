"""The registry of explanation methods: one entry per method, used by the API, the app, the evaluation and bench.

Adding a method is one analysis function (in :mod:`vizapp.analysis`, or a method on
:class:`~vizapp.pipeline.Analysis`) plus one :class:`Method` entry below. Nothing else lists method names.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from vizapp.errors import BadParameterError

if TYPE_CHECKING:
    from vizapp.models import VizModel
    from vizapp.pipeline import Analysis


@dataclass(frozen=True)
class Cost:
    """What one run of a method costs on one analysis, said before it runs.

    Attributes:
        work: the work in the method's own terms, e.g. "196 max-flow problems on a graph of 13 x 197 nodes".
        seconds: an estimate of the wall time on this server.
        basis: how ``seconds`` was estimated, so nobody mistakes it for a measurement.
    """

    work: str
    seconds: float
    basis: str


@dataclass(frozen=True)
class Method:
    """One explanation method.

    Attributes:
        name: the key used everywhere (API, app, CSV columns).
        label: what a person reads.
        needs_class: the map is for one class (takes ``class_idx``; needs a classifier head).
        slow: costs far more than the others (the app offers it as an opt-in).
        compute: ``compute(analysis, class_idx, **kwargs) -> [gh, gw]`` map.
        controls: keyword arguments of ``compute`` that the app's view controls set (fields of
            :class:`vizapp.views.Controls` with the same names).
        reports_progress: ``compute`` accepts ``progress=callback(done, total)``, called between its steps.
        cost: ``cost(analysis) -> Cost``, an estimate of what ``compute`` will cost (set for slow methods).
        from_output: the map is carried down from the tokens the output reads (``Analysis.output_weights``), not
            from one fixed token.
        options: every keyword argument ``compute`` takes (``controls`` among them): what ``vizapp.explain`` passes
            it of the options it is given.
        unavailable: ``unavailable(analysis) -> str``, why the method is not defined for that analysis's model ("" when
            it is), for a method whose rules hold for some architectures only; None: defined wherever its class is.
        batch: for a method that runs the model itself (its own forward and backward, not the analysis's):
            ``batch(vm, x [B, C, H, W], classes, **options) -> [B, gh, gw]`` for a whole batch at once, each class an
            index or None (the image's top-1); ``vizapp.explain`` calls it once per forward group.
        windowed: for a method a windowed-attention (Swin) model also offers, what it means there in one sentence
            where that differs from the plain ViT's definition (the app says it); "" otherwise.
    """

    name: str
    label: str
    needs_class: bool
    compute: Callable[..., np.ndarray]
    slow: bool = False
    controls: tuple[str, ...] = ()
    reports_progress: bool = False
    cost: Callable[[Analysis], Cost] | None = None
    from_output: bool = True
    options: tuple[str, ...] = ()
    unavailable: Callable[[Analysis], str] | None = None
    batch: Callable[..., np.ndarray] | None = None
    windowed: str = ""


# Calibration graph for the flow estimate: small enough to cost ~20 ms, big enough that per-edge time settles.
_FLOW_CALIBRATION = dict(layers=4, tokens=65, flows=8)


@functools.cache
def _flow_seconds_per_edge() -> float:
    """Median seconds per max-flow per graph edge, measured once per process on random attention."""
    import torch

    from vizapp.analysis.flow import attention_flow

    layers, tokens, flows = (_FLOW_CALIBRATION[k] for k in ("layers", "tokens", "flows"))
    g = torch.Generator().manual_seed(0)
    attn = torch.softmax(2.0 * torch.randn(layers, 1, tokens, tokens, generator=g), dim=-1)  # [L, 1, N, N]
    per_flow = _median_flow_seconds(lambda tick: attention_flow(attn, 1, progress=tick), flows)
    return per_flow / (layers * tokens * tokens)


def _median_flow_seconds(run: Callable[[Callable[[int, int], None]], Any], flows: int) -> float:
    """The median seconds between the progress calls of ``run(progress)``, stopped after ``flows`` max-flows."""
    stamps: list[float] = []

    class _Enough(Exception):
        pass

    def tick(done: int, total: int) -> None:
        stamps.append(time.perf_counter())
        if done > flows:
            raise _Enough

    with contextlib.suppress(_Enough):
        run(tick)
    return float(np.median(np.diff(stamps)))


#: Calibration graph for a windowed model's flow: a 32x32 grid in windows of 8 (2 layers, the second shifted), a
#: merge, 2 layers on 16x16 (~40 ms); its sparse layers cost less per edge than the dense graph's.
_WINDOWED_CALIBRATION = dict(grid=32, window=8, flows=8)


@functools.cache
def _windowed_flow_seconds_per_edge() -> float:
    """Median seconds per max-flow per graph edge of a windowed model's flow, measured once per process on random
    window attention (:data:`_WINDOWED_CALIBRATION`)."""
    import torch

    from vizapp.analysis import windows as W
    from vizapp.analysis.windows_flow import edge_count, windowed_flow

    n, w, flows = (_WINDOWED_CALIBRATION[k] for k in ("grid", "window", "flows"))
    grids = [(n, n)] * 2 + [(n // 2, n // 2)] * 2
    idx = [W.window_index(g, (w, w), (w // 2, w // 2) if i % 2 else (0, 0)) for i, g in enumerate(grids)]
    g = torch.Generator().manual_seed(0)
    wins = [torch.softmax(2.0 * torch.randn(i.shape[0], 1, w * w, w * w, generator=g), dim=-1) for i in idx]
    readout = torch.full(((n // 2) ** 2,), 1.0 / (n // 2) ** 2, dtype=torch.float64)
    per_flow = _median_flow_seconds(lambda tick: windowed_flow(wins, idx, grids, readout, progress=tick), flows)
    return per_flow / edge_count(idx, grids)


def _flow_cost(r: Analysis) -> Cost:
    """Attention flow: one max-flow per patch on the (L+1) x N graph (a windowed model's: each layer's window pairs,
    the mergings and the output node); time scaled from a calibration run by edges."""
    num_patches = r.grid_size[0] * r.grid_size[1]
    if getattr(r, "windows", None) is not None:  # a windowed analysis (vizapp.swin_result)
        from vizapp.analysis.windows_flow import edge_count

        edges = edge_count([r.index(i) for i in range(r.num_layers)], r.layer_grids)
        merges = len(set(r.layer_grids)) - 1
        nodes = f"{r.num_layers} window-attention layers, {merges} patch merging{'s' if merges != 1 else ''} and an output node"
        per_edge = _windowed_flow_seconds_per_edge()
        cal = _WINDOWED_CALIBRATION
        graph = f"random {cal['grid']}x{cal['grid']}-token graph in windows of {cal['window']} with a merge"
    else:
        read = int((r.output_weights() > 0).sum())  # tokens the output reads: more than one adds an output node
        edges = r.num_layers * r.num_tokens**2 + (read if read > 1 else 0)
        nodes = f"{r.num_layers + 1} x {r.num_tokens} nodes" + (" and an output node" if read > 1 else "")
        per_edge = _flow_seconds_per_edge()
        cal = _FLOW_CALIBRATION
        graph = f"random {cal['layers']}-layer, {cal['tokens']}-token graph"
    return Cost(
        work=f"{num_patches} max-flow problems on a graph of {nodes} ({edges:,} edges)",
        seconds=num_patches * edges * per_edge,
        basis=f"estimate: {cal['flows']} max-flows timed on this server on a {graph}, scaled by edge count; real "
        "attention can be 2-3x faster or slower",
    )


def _lrp_unavailable(r: Analysis) -> str:
    """Transformer Attribution's LRP rules are written for one ViT block layout with a linear head on the CLS token:
    timm ``VisionTransformer`` (``global_pool='token'``), transformers ViT/ViT-MSN/DeiT ``ForImageClassification``
    and torchvision ``vit_*`` (see :mod:`vizapp.analysis.lrp_families`); for any other model this says why, in a
    phrase (:func:`vizapp.analysis.lrp.unsupported`). "" while the result's model is gone (computing it then says)."""
    from vizapp.analysis.lrp import unsupported

    vm = r.model_ref() if r.model_ref is not None else None
    return unsupported(vm.model, r.num_prefix_tokens, _prompted(vm)) if vm is not None else ""


def _prompted(vm: VizModel) -> bool:
    """Whether ``vm``'s classes are text prompts read through an image projection (what Transformer Attribution's
    prompt score needs: :class:`vizapp.analysis.lrp_families.PromptScore`)."""
    tower = vm.text_tower
    return bool(vm.prompts) and tower is not None and tower.projection is not None


def _prompt_score(vm: VizModel) -> Any:
    """The prompt score of a prompted image-text model (None for a classifier): its image projection, the prompts'
    unit text embeddings (the ones its logits read) and exp(logit_scale)."""
    if not _prompted(vm):
        return None
    from vizapp.analysis.lrp_families import PromptScore

    tower = vm.text_tower
    projection = tower.projection()
    if projection is None:
        return None
    text = vm.prompt_embeddings.to(vm.device)
    return PromptScore(projection.detach().to(vm.device), text, float(tower.logit_scale().detach()))


def _model_of(r: Analysis) -> VizModel | None:
    """The analysis's model while it is alive (None when it is gone: computing the map then says so)."""
    return r.model_ref() if r.model_ref is not None else None


def _attnlrp_why(vm: VizModel) -> str:
    if vm.windowed:  # Swin: the same rules through windows and patch mergings
        from vizapp.analysis.windows_explain import SUPPORTED, unsupported
    else:
        from vizapp.analysis.attnlrp import SUPPORTED, unsupported

    why = unsupported(vm.model)
    return f"{why}; {SUPPORTED}" if why else ""


def _legrad_why(vm: VizModel) -> str:
    if vm.windowed:
        from vizapp.models.swin import head_lens

        if head_lens(vm.model) is None:
            return "LeGrad reads the class score through the model's own final norm, pooling and head, and it has none"
        return ""
    if vm.lens_fn is None:
        return (
            "LeGrad reads the class score from every block's output through the model's own final norm, pooling and "
            "head, and vizapp has no such readout (logit lens) for this model"
        )
    return ""


def _attnlrp_batch(vm: VizModel, x: Any, classes: list[int | None]) -> np.ndarray:
    """AttnLRP maps of a batch (:func:`vizapp.analysis.attnlrp.attnlrp`): one forward and one backward."""
    from vizapp.analysis.attnlrp import attnlrp

    why = _attnlrp_why(vm)
    if why:
        raise BadParameterError(f"AttnLRP is not defined for {vm.name}: {why}")
    if vm.windowed:  # over the first stage's grid (vizapp.analysis.windows_explain)
        from vizapp.analysis import windows_explain

        maps, _ = windows_explain.attnlrp(vm.model, vm.logits, x, classes, vm.patch_size)
        return maps.cpu().numpy()
    maps, _ = attnlrp(vm.model, vm.logits, x, classes, vm.grid_for(x.shape[-2], x.shape[-1]), vm.patch_size)
    return maps.cpu().numpy()


#: the "empty" prompt of the LeGrad authors' SigLIP correction (WalBouss/LeGrad, legrad/wrapper.py)
EMPTY_PROMPT = "a photo of a"


def _empty_prompt_readout(vm: VizModel) -> Any:
    """For SigLIP prompts (a sigmoid model read through an attention-pooling head): the readout of the empty prompt's
    score, its text embedding computed once per prompted model; None for any other model."""
    from vizapp.models.pooling import PooledReadout
    from vizapp.models.prompts import prompt_logits, text_embeddings

    tower = vm.text_tower
    embed = getattr(tower, "embed_from_tokens", None)
    if not vm.prompts or vm.activation != "sigmoid" or not isinstance(embed, PooledReadout):
        return None
    empty = vm._digest.get("legrad_empty")
    if empty is None:
        empty = vm._digest["legrad_empty"] = text_embeddings(tower, [EMPTY_PROMPT]).to(vm.device)
    return embed.then(lambda e: prompt_logits(tower, e, empty))


def _legrad_batch(
    vm: VizModel, x: Any, classes: list[int | None], start_layer: int = 0, empty_prompt_correction: Any = None
) -> np.ndarray:
    """LeGrad maps of a batch (:func:`vizapp.analysis.legrad.legrad`, or :func:`~vizapp.analysis.legrad.legrad_pooled`
    for an attention-pooling head): one forward and one backward (two with the empty-prompt correction, which is
    on by default for SigLIP prompts, as in the authors' code, and defined for them only)."""
    from vizapp.analysis.legrad import legrad
    from vizapp.models.pooling import PooledReadout

    why = _legrad_why(vm)
    if why:
        raise BadParameterError(f"LeGrad is not available for {vm.name}: {why}")
    if empty_prompt_correction not in (None, True, False):
        raise BadParameterError(
            f"empty_prompt_correction must be True, False or None, got {empty_prompt_correction!r}"[:200]
        )
    empty = _empty_prompt_readout(vm) if empty_prompt_correction is not False else None
    if empty_prompt_correction and empty is None:
        raise BadParameterError(
            f"LeGrad's empty-prompt correction is defined for SigLIP prompts only (a sigmoid model read through an "
            f"attention-pooling head), not for {vm.name}"
        )
    if isinstance(start_layer, bool) or not isinstance(start_layer, (int, np.integer)):
        raise BadParameterError(f"start_layer must be an integer, got {start_layer!r}"[:200])
    if not 0 <= start_layer < vm.num_layers:
        raise BadParameterError(f"start_layer must be in [0, {vm.num_layers - 1}], got {start_layer}")
    if vm.windowed:  # the last stage's blocks, over the first stage's grid (vizapp.analysis.windows_explain)
        from vizapp.analysis import windows_explain
        from vizapp.models.swin import head_lens

        maps, _ = windows_explain.legrad(vm.model, vm.logits, head_lens(vm.model), x, classes, int(start_layer))
        return maps.cpu().numpy()
    grid = vm.grid_for(x.shape[-2], x.shape[-1])
    if isinstance(vm.lens_fn, PooledReadout):  # an attention-pooling head (SigLIP, CoCa): the gradient on its attention
        from vizapp.analysis.legrad import legrad_pooled

        maps, _ = legrad_pooled(vm.model, vm.logits, vm.lens_fn, x, classes, grid, int(start_layer), empty)
        return maps.cpu().numpy()
    maps, _ = legrad(vm.model, vm.logits, vm.lens_fn, x, classes, vm.num_prefix_tokens, grid, int(start_layer))
    return maps.cpu().numpy()


def _unavailable_by(why: Callable[[VizModel], str]) -> Callable[[Analysis], str]:
    def unavailable(r: Analysis) -> str:
        vm = _model_of(r)
        return why(vm) if vm is not None else ""

    return unavailable


@functools.cache
def _multiply_adds_per_second() -> float:
    """Median multiply-adds per second of a ViT-sized matrix product on this server, measured once per process."""
    import torch

    a, b = torch.randn(256, 384), torch.randn(384, 1536)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 256 * 384 * 1536 / float(np.median(times))


def transformer_attribution_batch(vm: VizModel, x: Any, classes: list[int | None], start_layer: int = 1) -> np.ndarray:
    """Transformer Attribution maps of a batch (:func:`vizapp.analysis.lrp.transformer_attribution`, float64): one
    forward and one backward, and the relevance pass, for the whole batch; a None class is the image's top-1 (from
    that forward). Defined for timm ViTs reading their CLS token, transformers ViT/ViT-MSN/DeiT classifiers and
    torchvision ``vit_*``; any other model is refused with the reason (:func:`vizapp.analysis.lrp.unsupported`)."""
    from vizapp.analysis.lrp import SUPPORTED, transformer_attribution, unsupported

    why = unsupported(vm.model, vm.num_prefix_tokens, _prompted(vm))
    if why:
        raise BadParameterError(f"Transformer Attribution is not defined for {vm.name}: {why}; {SUPPORTED}")
    if isinstance(start_layer, bool) or not isinstance(start_layer, (int, np.integer)):
        raise BadParameterError(f"start_layer must be an integer, got {start_layer!r}"[:200])
    if not 0 <= start_layer < vm.num_layers:
        raise BadParameterError(f"start_layer must be in [0, {vm.num_layers - 1}], got {start_layer}")
    grid = vm.grid_for(x.shape[-2], x.shape[-1])
    found = transformer_attribution(
        vm.model, x, vm.num_prefix_tokens, list(classes), grid, start_layer=int(start_layer), prompt=_prompt_score(vm)
    )
    return found.cpu().numpy()


def _windowed_forward(vm: VizModel, r: Any) -> int:
    """A windowed model's forward in multiply-adds: each block's weights once per token of its grid, q kᵀ and A v
    within its windows; the rest (patch embedding, mergings, head: a few percent of Swin-T's) counted at the last
    stage's token count."""
    import torch

    from vizapp.windows import window_sites

    total, in_blocks = 0, 0
    for site, g, n in zip(window_sites(vm.model), r.geometry, r.tokens_per_layer, strict=True):
        p = sum(w.numel() for w in site.block.parameters())
        width = next(m for m in site.block.modules() if isinstance(m, torch.nn.LayerNorm)).normalized_shape[0]
        total += p * n + 2 * g.num_windows * (g.window[0] * g.window[1]) ** 2 * width
        in_blocks += p
    rest = sum(w.numel() for w in vm.model.parameters()) - in_blocks
    return total + rest * r.tokens_per_layer[-1]


def _forward_backward_cost(what: str) -> Callable[[Analysis], Cost]:
    """The cost of one forward and one backward of the analysis's model, said in passes and estimated in seconds."""

    def cost(r: Analysis) -> Cost:
        vm = _model_of(r)
        params = sum(p.numel() for p in vm.model.parameters()) if vm is not None else 0
        if getattr(r, "windowed", False):
            forward = _windowed_forward(vm, r) if vm is not None else 0
        else:
            n, d = r.num_tokens, r.q[0].shape[-1] * r.num_heads
            # a forward's multiply-adds: every weight once per token, q kᵀ and A v per layer; a backward about twice
            forward = params * n + 2 * r.num_layers * n * n * d
        return Cost(
            work=f"one forward and one backward pass of the model ({what}), about 3 forward passes of work",
            seconds=3 * forward / _multiply_adds_per_second(),
            basis="estimate: the model's multiply-adds at this server's measured matrix-product rate; the real time "
            "is often 2-3x more",
        )

    return cost


#: what AttnLRP and LeGrad mean on a windowed (Swin) model (vizapp.analysis.windows_explain), one sentence each
FLOW_WINDOWED = (
    "Attention flow for Swin runs on the graph its rollout multiplies along: each layer's window attention with the "
    "residual, each patch merging as edges of equal shares from a merged token's sources, and the average-pooled "
    "output as the sink; one max-flow from every first-stage patch."
)
ATTNLRP_WINDOWED = (
    "AttnLRP for Swin applies the same rules through the windows, shifts and patch mergings (the identity rule on "
    "every LayerNorm, the mergings' included; no relevance through the window softmax), summed over each first-stage "
    "patch."
)
LEGRAD_WINDOWED = (
    "LeGrad for Swin sums the last stage's blocks only: the head (final norm, average pooling, linear layer) reads "
    "only the last stage's channel width, and each last-stage token is drawn over its 2^k x 2^k first-stage tokens "
    "(k patch mergings)."
)

METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            "rollout",
            "Attention rollout",
            False,
            lambda r, c, **kw: r.rollout(**kw),
            controls=("head_fusion", "discard_ratio", "start_layer", "start_row"),
            options=("head_fusion", "discard_ratio", "start_layer", "start_row"),
        ),
        Method(
            "attention",
            "Last-layer CLS attention",
            False,
            lambda r, c, **kw: r.last_layer_attention(),
            from_output=False,
        ),
        Method(
            "flow",
            "Attention flow",
            False,
            lambda r, c, **kw: r.attention_flow(**kw),
            controls=("start_row",),
            slow=True,
            reports_progress=True,
            cost=_flow_cost,
            options=("head_fusion", "progress", "start_row"),
            windowed=FLOW_WINDOWED,
        ),
        Method(
            "grad_rollout",
            "Gradient rollout",
            True,
            lambda r, c, **kw: r.grad_rollout(c, **kw),
            controls=("start_row",),
            options=("discard_ratio", "start_layer", "start_row"),
        ),
        Method(
            "relevance",
            "GAE relevance (Chefer et al., ICCV 2021)",
            True,
            lambda r, c, **kw: r.relevance(c, **kw),
            controls=("start_row",),
            options=("start_layer", "start_row"),
        ),
        Method(
            "transformer_attribution",
            "Transformer Attribution (Chefer et al., CVPR 2021)",
            True,
            lambda r, c, **kw: r.transformer_attribution(c, **kw),
            from_output=False,
            options=("start_layer",),
            unavailable=_lrp_unavailable,
            batch=transformer_attribution_batch,
        ),
        Method(
            "attnlrp",
            "AttnLRP (Achtibat et al., ICML 2024)",
            True,
            lambda r, c, **kw: r.model_map("attnlrp", c, _attnlrp_batch),  # it takes no options
            from_output=False,
            cost=_forward_backward_cost("LRP rules on LayerNorm, the activation and the attention"),
            unavailable=_unavailable_by(_attnlrp_why),
            batch=_attnlrp_batch,
            windowed=ATTNLRP_WINDOWED,
        ),
        Method(
            "legrad",
            "LeGrad (Bousselham et al., 2024)",
            True,
            lambda r, c, **kw: r.model_map("legrad", c, _legrad_batch, **kw),
            from_output=False,
            options=("start_layer", "empty_prompt_correction"),
            cost=_forward_backward_cost("each block's class score, one backward for all"),
            unavailable=_unavailable_by(_legrad_why),
            batch=_legrad_batch,
            windowed=LEGRAD_WINDOWED,
        ),
    )
}


def get(name: Any) -> Method:
    """The method called ``name``, or a clear error listing the known ones."""
    if not isinstance(name, str) or name not in METHODS:
        raise BadParameterError(f"method must be one of {list(METHODS)}, got {str(name)[:40]!r}")
    return METHODS[name]


def explain(r: Analysis, name: str, class_idx: Any = None, **kwargs: Any) -> np.ndarray:
    """The map of method ``name`` for ``r`` ([gh, gw]); ``class_idx`` is ignored by methods that need no class."""
    m = get(name)
    return m.compute(r, class_idx if m.needs_class else None, **kwargs)


def unavailable(r: Analysis, name: str) -> str:
    """Why method ``name`` is not defined for ``r``'s model, in a phrase ("" when it is; see ``Method.unavailable``)."""
    m = get(name)
    return m.unavailable(r) if m.unavailable is not None else ""


def cost(r: Analysis, name: str) -> Cost | None:
    """What method ``name`` will cost on ``r``, for methods that say (the slow ones); else None."""
    m = get(name)
    return m.cost(r) if m.cost is not None else None
