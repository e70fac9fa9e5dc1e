"""Benchmark of what vizapp adds on top of a bare ViT forward pass (``python -m benchmarks.bench``).

For each model, in one process and with the repeats of every stage interleaved (so that a change in machine load
hits all stages alike), it measures the median wall time of

* (a) preprocessing (``vm.transform`` on a photo) + the bare timm forward (fused attention, ``torch.no_grad``): the
  floor any app must pay;
* (b) :func:`vizapp.analyze` (forward with capture, top-5, rollout, mean attention distance) + the per-head CLS maps of
  the last layer (``r.attention(last)``);
* (c) building *and* serialising (``fig.to_json()``) every figure :func:`vizapp.views.render_all` returns, plus the
  JSON size of each;
* (d) re-rendering (build + ``to_json``) after one control change, from the cached analysis (no forward pass): other
  head fusion (rollout ``max``), other layer, a query patch;

and the peak memory of (a), of a forward with :class:`~vizapp.capture.AttentionCapture` only, and of (b), each in a
fresh subprocess (``--_measure-mem``), relative to the process's memory right after the model was loaded. A cProfile
run of (b) splits its time into stages (through vizapp's public names only), and a cost model (FLOP and byte counts
from N, L, H, D) is printed beside the measurements. Results go to stdout and to a markdown file (default
``docs/benchmarks.md``).

Modules, one job each: :mod:`.specs` (which models), :mod:`.machine` (machine and input photo), :mod:`.stages` (the
timed stages a-d), :mod:`.profiling` (where the time of b goes), :mod:`.memory` (peak memory in fresh processes),
:mod:`.costmodel` (predicted work and bytes), :mod:`.run` (one model, dataset mode), :mod:`.markdown` (the report),
:mod:`.cli` (the command line).
"""

from benchmarks.bench.cli import build_parser, main
from benchmarks.bench.markdown import TABLE_COLUMNS
from benchmarks.bench.specs import DEFAULT_MODELS, QUICK_MODELS, ModelSpec, parse_spec

__all__ = ["DEFAULT_MODELS", "QUICK_MODELS", "TABLE_COLUMNS", "ModelSpec", "build_parser", "main", "parse_spec"]
