"""Where the time of (b) goes: one cProfile'd run of :func:`~benchmarks.bench.stages.stage_b`, split into stages.

Every stage names vizapp functions by their public names (``"vizapp.streaming:LayerStatistics.chunk"``) and is
resolved before the run: a name the library no longer has raises :class:`LookupError` naming it, instead of a stage
that silently measures 0 ms. A stage whose function exists but was not called (the replay path on a model whose
layers all call SDPA) measures 0 ms, correctly.
"""

from __future__ import annotations

import cProfile
import importlib
import pstats
import time
from dataclasses import dataclass
from typing import Any

from PIL import Image

from benchmarks.bench.stages import stage_b

ProfileKey = tuple[str, int, Any]  # (file, first line, name) of a Python function; ("~", 0, name prefixes) of a builtin


@dataclass(frozen=True)
class Stage:
    """One row of the profile table.

    Attributes:
        label: the row's text.
        targets: public vizapp functions, ``"module:Qualified.name"``, whose cumulative time the row counts.
        builtins: name prefixes cProfile gives C functions (they differ across Python versions), counted too.
        called_from: count only calls made from this module's functions (for builtins timm also calls).
        except_from: public functions (as in ``targets``) whose calls are left out, being counted elsewhere.
        nested: part of the forward's time, left out of the sum that gives "other".
    """

    label: str
    targets: tuple[str, ...] = ()
    builtins: tuple[tuple[str, ...], ...] = ()
    called_from: str | None = None
    except_from: tuple[str, ...] = ()
    nested: bool = False


def _function(name: str) -> tuple[str, ...]:
    return (f"<built-in method torch.{name}>", f"<built-in method {name} ")


# The stages of (b) after preprocessing and the forward (which depend on the model, see profile_stages).
STAGES = (
    Stage(
        "  of which: replay from q and k (capture.feed: layers that never call SDPA; its chunks and statistics "
        "are also in the next rows)",
        targets=("vizapp.capture:feed",),
        nested=True,
    ),
    Stage(
        "  of which: attention formed in chunks, q kᵀ and softmax (capture.attention_chunks)",
        targets=("vizapp.capture:attention_chunks",),
        nested=True,
    ),
    Stage(
        "  of which: A·v of each chunk (torch.bmm from capture.py outside attention_chunks)",
        builtins=(_function("bmm"),),
        called_from="vizapp.capture",
        except_from=("vizapp.capture:attention_chunks",),
        nested=True,
    ),
    Stage(
        "  of which: statistics from the hot chunk (distance, head fusions, bottom-up rollout: "
        "LayerStatistics.chunk, layer_done)",
        targets=("vizapp.streaming:LayerStatistics.chunk", "vizapp.streaming:LayerStatistics.layer_done"),
        nested=True,
    ),
    Stage(
        "  of which: q and k kept, one copy a layer (kept.copy_pair)",
        targets=("vizapp.kept:copy_pair",),
        nested=True,
    ),
    Stage(
        "rollout row, top-down (LayerStatistics.rollout_row)", targets=("vizapp.streaming:LayerStatistics.rollout_row",)
    ),
    Stage(
        "weights digest, every parameter and buffer read (VizModel.fingerprint)",
        targets=("vizapp.models.base:VizModel.fingerprint",),
    ),
    Stage("model_view (uint8 image)", targets=("vizapp.pipeline:model_view",)),
    Stage("per-head maps (r.attention)", targets=("vizapp.pipeline:Analysis.attention",)),
)


def resolve_module(name: str) -> Any:
    """The module ``name``; LookupError if it does not exist."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise LookupError(f"profile stage: no module {name!r} ({e})") from e


def resolve(target: str) -> Any:
    """The object named ``"module:Qualified.name"``, public names only.

    Raises:
        ValueError: a part of the name is private (starts with ``_``).
        LookupError: the module or a name in it does not exist (the library changed: update :data:`STAGES`).
    """
    module_name, _, qualname = target.partition(":")
    parts = [*module_name.split("."), *qualname.split(".")]
    if not qualname or any(p.startswith("_") for p in parts):
        raise ValueError(f"profile stage target {target!r}: name a public function as 'module:Qualified.name'")
    obj: Any = resolve_module(module_name)
    for i, name in enumerate(qualname.split(".")):
        if not hasattr(obj, name):
            raise LookupError(
                f"profile stage target {target!r}: {module_name}.{'.'.join(qualname.split('.')[: i + 1])} "
                "does not exist; update STAGES in benchmarks/bench/profiling.py to the library's "
                "public names"
            )
        obj = getattr(obj, name)
    return obj


def code_key(fn: Any, what: str) -> ProfileKey:
    """cProfile's key of a Python function (or of a callable object's ``__call__``); LookupError if it has none."""
    code = getattr(fn, "__code__", None)
    if code is None and callable(fn):
        code = getattr(type(fn).__call__, "__code__", None)
    if code is None:
        raise LookupError(f"profile stage target {what}: {fn!r} is not a Python function cProfile can time")
    return (code.co_filename, code.co_firstlineno, code.co_name)


@dataclass(frozen=True)
class ResolvedStage:
    label: str
    keys: tuple[ProfileKey, ...]
    caller_file: str | None
    except_callers: tuple[ProfileKey, ...]
    nested: bool


def resolve_stage(stage: Stage) -> ResolvedStage:
    """The profile keys of ``stage``; raises (see :func:`resolve`) when a name is missing."""
    keys = [code_key(resolve(t), t) for t in stage.targets] + [("~", 0, names) for names in stage.builtins]
    caller_file = None
    if stage.called_from is not None:
        caller_file = getattr(resolve_module(stage.called_from), "__file__", None)
    return ResolvedStage(
        stage.label, tuple(keys), caller_file, tuple(code_key(resolve(t), t) for t in stage.except_from), stage.nested
    )


def resolve_stages(stages: tuple[Stage, ...] = STAGES) -> list[ResolvedStage]:
    """Every stage of :data:`STAGES` resolved; raises naming the first target the library lacks."""
    return [resolve_stage(s) for s in stages]


def profile_stages(vm: Any) -> list[ResolvedStage]:
    """The stages of (b) for this model: preprocessing, the forward, then :data:`STAGES`."""
    from timm.models.vision_transformer import VisionTransformer

    forward = type(vm.model).forward if isinstance(vm.model, VisionTransformer) else vm.model.forward
    head = [
        ResolvedStage("preprocessing (vm.transform)", (code_key(vm.transform, "vm.transform"),), None, (), False),
        ResolvedStage(
            "forward, attention formed once inside it (the 'of which' rows included)",
            (code_key(forward, "the model's forward"),),
            None,
            (),
            False,
        ),
    ]
    return head + resolve_stages()


def _matches(func: tuple[str, int, str], key: ProfileKey) -> bool:
    if func[0] != key[0] or func[1] != key[1]:
        return False
    names = key[2] if isinstance(key[2], tuple) else (key[2],)
    return func[2].startswith(names) if key[0] == "~" else func[2] in names


def profile_b(vm: Any, img: Image.Image) -> dict[str, float]:
    """One cProfile'd run of stage (b): seconds per stage, plus 'other' and 'total'."""
    stages = profile_stages(vm)  # before the run: a missing name fails here, not after a long forward
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    stage_b(vm, img)
    prof.disable()
    total = time.perf_counter() - t0
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    out: dict[str, float] = {}
    nested_total = 0.0
    for st in stages:
        secs = 0.0
        for func, (_cc, _nc, _tt, ct, callers) in stats.items():
            if not any(_matches(func, key) for key in st.keys):
                continue
            if st.caller_file is None:
                secs += ct
            else:
                secs += sum(
                    v[3]
                    for caller, v in callers.items()
                    if caller[0] == st.caller_file and not any(caller == k for k in st.except_callers)
                )
        out[st.label] = secs
        nested_total += secs if st.nested else 0.0
    out["other (Python glue, top-k, hooks, ...)"] = max(0.0, total - (sum(out.values()) - nested_total))
    out["total"] = total
    return out
