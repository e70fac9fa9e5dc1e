"""benchmarks.bench: the --quick smoke run completes and writes the table (no timing assertions)."""

from __future__ import annotations

import re

import pytest
import torch

from benchmarks import bench
from benchmarks.bench import profiling


def table_rows(markdown: str, heading: str = "## Results") -> tuple[list[str], list[list[str]]]:
    """Header cells and data rows of the first markdown table after ``heading``."""
    lines = markdown.split(heading, 1)[1].strip().splitlines()
    lines = lines[next(i for i, ln in enumerate(lines) if ln.startswith("|")) :]
    table = [ln for ln in lines[: next((i for i, ln in enumerate(lines) if not ln.startswith("|")), len(lines))]]
    cells = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in table]
    return cells[0], cells[2:]


def test_quick_run_writes_every_column_and_a_row_per_model(tmp_path, capsys):
    out = tmp_path / "b.md"
    assert bench.main(["--quick", "--out", str(out)]) == 0
    text = out.read_text(encoding="utf-8")
    header, rows = table_rows(text)
    assert header == list(bench.TABLE_COLUMNS)
    assert [r[0] for r in rows] == list(bench.QUICK_MODELS)
    for row in rows:
        assert len(row) == len(header)
        assert all(cell and cell != "nan" for cell in row), row
        assert int(row[1]) == 17  # 1 CLS + a 4x4 grid at 64 px
    for section in (
        "## Machine",
        "## Cost model",
        "### Predicted vs measured",
        "### Memory decomposition",
        "### Where the time of (b) goes",
        "## Dataset mode",
    ):
        assert section in text
    assert re.search(r"torch threads \| \d+", text)
    assert "| model | tokens N |" in capsys.readouterr().out  # the table is printed too
    ds_header, ds_rows = table_rows(text, "## Dataset mode")
    assert ds_header[0] == "model" and len(ds_rows) == 1
    assert int(ds_rows[0][1]) == 4  # 8 images in batches of 4: the first batch is the warm-up
    assert all(float(c) > 0 for c in ds_rows[0][2:]), ds_rows


def test_the_cost_model_counts_every_pass_and_the_weights_digest_by_hand():
    """A 2-layer, 3-head model of 5 tokens (CLS and a 2x2 grid), width 8: everything fits the CPU's caches, so each
    layer's analysis passes are 3 (scores, softmax, read back) + 5 (entropy) + 1 (head sum) + 2 (max, min) over
    H·N² = 75, 3 (distance) over H·P² = 48 and 1 over N² = 25 (the kept mean): 2 · (11 · 75 + 3 · 48 + 25) = 1,988.
    The digest reads the weights' bytes as given; ``model_shape`` counts them from the model (the same count as the
    parameters flattened into one vector, for a timm ViT, which has no buffers)."""
    from benchmarks.bench.costmodel import Shape, cost_model, model_shape
    from benchmarks.bench.specs import parse_spec

    s = Shape(5, 1, 4, 2, 3, 8, 32, 3, 16 * 16, 10, weight_bytes=12_345)
    c = cost_model(s)
    assert c["extra_elementwise"] == 1_988
    assert c["extra_gemm_macs"] == 0  # the means are kept: no bottom-up rollout
    assert c["digest_bytes"] == 12_345
    vm = parse_spec("vit_tiny_patch16_224@img_size=32,depth=1").load("cpu")
    flat = torch.nn.utils.parameters_to_vector(vm.model.parameters())
    assert not list(vm.model.buffers())
    assert model_shape(vm).weight_bytes == flat.numel() * 4


def test_models_option_gives_one_row_each(tmp_path):
    out = tmp_path / "two.md"
    specs = ["vit_tiny_patch16_224@img_size=32,depth=1", "vit_small_patch14_reg4_dinov2@img_size=28,depth=1"]
    assert (
        bench.main(
            ["--models", *specs, "--repeats", "1", "--warmup", "0", "--no-memory", "--no-profile", "--out", str(out)]
        )
        == 0
    )
    _header, rows = table_rows(out.read_text(encoding="utf-8"))
    assert [r[0] for r in rows] == specs
    assert [int(r[1]) for r in rows] == [1 + 2 * 2, 5 + 2 * 2]  # register model: CLS + 4 registers + patches
    assert [int(r[-1]) for r in rows] == [5, 5]  # models this small get 5 x --repeats: their medians are noisiest


def test_parse_spec():
    spec = bench.parse_spec("vit_large_patch14_reg4_dinov2@img_size=518,dynamic_img_size=True")
    assert spec.name == "vit_large_patch14_reg4_dinov2"
    assert dict(spec.kwargs) == {"img_size": 518, "dynamic_img_size": True}
    assert bench.parse_spec(spec.label) == spec


def test_every_profile_stage_resolves_to_a_public_library_function():
    stages = profiling.resolve_stages()
    assert len(stages) == len(profiling.STAGES)
    assert all(st.keys for st in stages)


def test_a_missing_profile_stage_name_raises_naming_it(monkeypatch):
    from vizapp import streaming

    monkeypatch.delattr(streaming.LayerStatistics, "rollout_row")
    with pytest.raises(LookupError, match=r"vizapp\.streaming\.LayerStatistics\.rollout_row does not exist"):
        profiling.resolve_stages()
    with pytest.raises(LookupError, match="no_such_function"):
        profiling.resolve("vizapp.capture:no_such_function")
    with pytest.raises(ValueError, match="public"):
        profiling.resolve("vizapp.capture:AttentionCapture._inline")


def test_rewriting_the_report_keeps_the_notes_under_the_old_marker(tmp_path):
    from benchmarks.bench import markdown

    out = tmp_path / "b.md"
    out.write_text("old table\n" + markdown.OLD_NOTES_MARKERS[0] + "\nmy notes\n", encoding="utf-8")
    markdown.write_report(out, "new table\n")
    assert out.read_text(encoding="utf-8") == "new table\n\n" + markdown.NOTES_MARKER + "\nmy notes\n"


def test_the_evaluation_benchmark_splits_its_time_into_phases_that_add_up(tmp_path, capsys):
    # benchmarks.evaluation on the bundled model, two images: its table, and the phase table whose parts (the
    # statistics forward, maps, forming and classifying copies, the rest) each took time and were restored after;
    # the maps phase split by method; and with --profile, cProfile's table
    from benchmarks import evaluation
    from vizapp.evaluate import scores

    out = tmp_path / "e.md"
    before = (scores._maps, scores._classified, scores._own_run_maps, scores._graph_maps)
    argv = ["--models", "bundled", "--images", "2", "--repeats", "1", "--methods", "rollout,relevance,attnlrp,random"]
    assert evaluation.main([*argv, "--out", str(out), "--profile", "5", "--torch-profile", "5"]) == 0
    assert (scores._maps, scores._classified, scores._own_run_maps, scores._graph_maps) == before
    text = out.read_text(encoding="utf-8")
    header, rows = table_rows(text, "# The evaluation's rate against its floor")
    assert rows[0][:3] == ["bundled (fmnist-test)", "2", str(2 * 4 * 2 * 9)]  # 2 images x 4 maps x 2 directions x 9
    assert rows[0][-1] == "16"  # copies per forward: the CPU's (vizapp.limits.perturbation_batch)
    header, rows = table_rows(text, "Where one more batched evaluation's time went")
    assert header == ["model", "B", "statistics", "maps", "forming copies", "classifying copies", "rest"]
    # the batch, then its images one at a time (the phases summed over them, per image)
    assert [r[:2] for r in rows] == [["bundled (fmnist-test)", "2"], ["bundled (fmnist-test), one at a time", "1"]]
    assert all(float(c) > 0 for r in rows for c in r[2:6]), rows
    header, rows = table_rows(text, "The maps phase of that run by method")
    # AttnLRP's own forward and backward; rollout and relevance from one forward's attention graph, no analysis
    assert header == ["model", "B", "attnlrp", evaluation.GRAPH_MAPS, evaluation.REST_OF_MAPS]
    assert [r[1] for r in rows] == ["2", "1"]
    # the last part is the phase less the others: negative if a call were counted twice
    assert all(float(c) >= 0 for r in rows for c in r[2:]) and all(float(c) > 0 for r in rows for c in r[2:4]), rows
    assert "- bundled: never fell back to one image at a time" in text  # the batched path ran in every timed row
    printed = capsys.readouterr().out
    assert "Ordered by: internal time" in printed  # --profile: cProfile's table of one more run
    # --torch-profile: the wall time against the device's busy time (none on the CPU) and torch.profiler's table
    found = re.search(r"under torch.profiler: wall ([0-9.]+) s; device busy ([0-9.]+) s", printed)
    assert found and float(found[1]) > 0 and float(found[2]) == 0 and "Self CPU time total" in printed


def test_the_evaluation_benchmark_takes_an_architecture_with_create_model_arguments(tmp_path, monkeypatch):
    # name@key=value (gpu.sh's shape-only ViT-B row): that architecture built with those arguments, evaluated as
    # loaded (the Evaluator takes a loaded model), its row labelled as written
    from benchmarks import evaluation
    from vizapp.evaluate.worker import Evaluator

    seen = []
    real = Evaluator.__init__

    def init(self, model, *args, **kwargs):
        real(self, model, *args, **kwargs)
        seen.append(model if isinstance(model, str) else (model is self.vm, self.vm.num_layers, self.vm.grid_size))

    monkeypatch.setattr(Evaluator, "__init__", init)
    spec = "vit_tiny_patch16_224@img_size=32,depth=2"
    out = tmp_path / "e.md"
    argv = ["--models", "bundled", spec, "--images", "2", "--repeats", "1", "--methods", "rollout,random"]
    assert evaluation.main([*argv, "--out", str(out)]) == 0
    assert seen == ["bundled", (True, 2, (2, 2))]  # depth 2; 32 px in patches of 16
    _, rows = table_rows(out.read_text(encoding="utf-8"), "# The evaluation's rate against its floor")
    # 2 images x 2 maps (rollout's of the top-1 class, which is the target; the random order) x 2 directions x 9
    assert [r[:3] for r in rows] == [["bundled (fmnist-test)", "2", "72"], [f"{spec} (random)", "2", "72"]]


def test_the_copies_benchmark_times_each_batch_size_per_copy(tmp_path, monkeypatch):
    # benchmarks.copies_batch: every size forwards every input once a round, and the table gives ms per copy with the
    # speed against the largest size
    from benchmarks import copies_batch

    batches: list[int] = []
    real = copies_batch.per_copy_ms

    def spy(forward, x, sizes, rounds):
        return real(lambda b: batches.append(len(b)) or forward(b), x, sizes, rounds)

    monkeypatch.setattr(copies_batch, "per_copy_ms", spy)
    out = tmp_path / "c.md"
    copies_batch.main(["--models", "bundled", "--sizes", "2", "4", "--copies", "6", "--rounds", "1", "--out", str(out)])
    assert batches == [2, 4, 2, 2, 2, 2]  # a warm-up of the smallest size, then 6 inputs in batches of 4, then of 2
    header, rows = table_rows(out.read_text(encoding="utf-8"), "# Perturbed copies per forward")
    assert header == ["model", "4", "2"] and rows[0][0] == "bundled" and rows[0][1].endswith("(1.00x)")
    ms, speed = rows[0][2].split()
    assert float(ms) > 0 and speed.startswith("(") and speed.endswith("x)")


def test_the_devices_busy_time_sums_the_kernels_not_the_operators_that_launched_them():
    """torch.profiler gives a kernel's time on its own row and again on the row of the operator that launched it:
    two kernels of 1 ms and 2 ms under one operator are 3 ms of device time, not 6; a user annotation is left out."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    from benchmarks.evaluation import device_microseconds

    def event(kind, us, annotation=False):
        return SimpleNamespace(device_type=kind, self_device_time_total=us, is_user_annotation=annotation)

    events = [
        event(DeviceType.CPU, 3000),
        event(DeviceType.CUDA, 1000),
        event(DeviceType.CUDA, 2000),
        event(DeviceType.CUDA, 500, annotation=True),
    ]
    assert device_microseconds(events) == 3000


def test_the_operator_counter_counts_computing_operators_and_their_sources_by_hand():
    from benchmarks.launches import Counter, source
    from tests.devicesim import OnDevice

    for x, on_device in ((torch.randn(4, 4), False), (torch.randn(4, 4).as_subclass(OnDevice), True)):
        c = Counter()
        with c:
            y = x + 1  # computes: a kernel on the device, a host op on the host
            z = y.view(16)  # a view
            z.sum()  # computes
            torch.empty(3)  # an allocation
        assert (c.kernels, c.host, c.other) == ((2, 0, 2) if on_device else (0, 2, 2))
        assert c.by_source == ({"other": 2} if on_device else {})  # kernels called from no vizapp file
        assert (c.host_seconds > 0) == (not on_device)  # only host ops are timed
        assert c.in_graphs == 0
    # a composite operator: a 3-D matmul reshapes its input inside C++ and dispatches mm on tensors that no longer
    # carry the simulated device (3 computing operators here: mm, and the copies of the reshape and of the result);
    # a dtype cast is dispatched before the simulated device wraps its result
    for x, w, on_device in (
        (torch.randn(2, 3, 4), torch.randn(4, 5), False),
        (torch.randn(2, 3, 4).as_subclass(OnDevice), torch.randn(4, 5).as_subclass(OnDevice), True),
    ):
        c = Counter()
        with c:
            x.transpose(0, 1) @ w
            x.double()
        assert c.kernels + c.host >= 2
        assert (c.kernels if on_device else c.host) == c.kernels + c.host, (on_device, c.kernels, c.host)
    # a Python number in a device operator is wrapped as a 0-d host tensor and handed to the kernel as an argument:
    # one launch; a filled tensor to select from is a launch of its own
    x = torch.randn(4).as_subclass(OnDevice)
    for select, launches in ((lambda: torch.where(x > 0, x, 0.0), 2), (lambda: torch.where(x > 0, x, x * 0), 3)):
        c = Counter()
        with c:
            select()
        assert (c.kernels, c.host) == (launches, 1 if launches == 2 else 0), (c.kernels, c.host)
    leaf = torch.randn(3, requires_grad=True)
    c = Counter()
    with c:
        torch.autograd.grad((leaf * 2).sum(), leaf)  # the backward's kernels count as the device's
    # on host tensors: the forward's mul and sum, and the seed gradient autograd makes before the backward runs
    assert c.kernels >= 1 and c.host == 3
    # waits for the device: a blocking copy to the host, a scalar read, a boolean mask and nonzero wait; an
    # asynchronous copy, a view and arithmetic do not; nothing on host tensors waits
    for x, on_device in ((torch.randn(4), False), (torch.randn(4).as_subclass(OnDevice), True)):
        c = Counter()
        with c:
            x.cpu()  # 1
            x.to("cpu", non_blocking=True)
            float(x.sum())  # 1
            x[x > 0]  # 1
            torch.nonzero(x)  # 1
            (x * 2).view(2, 2)
        assert sum(c.waits.values()) == (4 if on_device else 0), c.waits
        assert c.why == (
            {"a copy to the host": 1, "a scalar read": 1, "a data-dependent shape": 2} if on_device else {}
        )
    # a blocking copy from the host to the device waits too (torch synchronises the stream after it): .to(device),
    # .cuda(), torch.tensor with a CUDA device, copy_ from a host tensor, indexing with a list or a host index
    # tensor, and setting from a host tensor; a non_blocking copy, a factory that copies nothing (zeros, arange), an
    # index on the device, a 0-d host index and a number set in do not
    from tests.devicesim import FAKE, simulated_gpu

    with simulated_gpu():
        host = torch.arange(4.0)
        c = Counter()
        with c:
            dev = torch.zeros(4, device=FAKE)
            host.to(FAKE)  # 1
            host.cuda()  # 1
            torch.tensor([1.0, 2.0], device=FAKE)  # 1
            dev.copy_(host)  # 1
            dev[[0, 2]]  # 1
            dev[torch.tensor([1, 3])]  # 1
            dev[1:3] = host[:2]  # 1
            host.to(FAKE, non_blocking=True)
            where = torch.arange(2, device=FAKE)
            dev[where]
            dev[torch.tensor(2)]
            dev[0] = 5.0
            dev.copy_(host, non_blocking=True)
        assert c.why == {"a copy to the device": 7}, c.why
    # device work by hand: [2, 3] @ [3, 4] is 2·3·4 multiply-adds, 48 FLOPs, reading 6 + 12 and writing 8 elements;
    # the same product in float64 counts as float64 and moves twice the bytes; nothing on the host counts
    for dtype, size in ((torch.float32, 4), (torch.float64, 8)):
        a, b = torch.ones(2, 3, dtype=dtype), torch.ones(3, 4, dtype=dtype)
        for on_device in (False, True):
            c = Counter()
            with c:
                (a.as_subclass(OnDevice) @ b.as_subclass(OnDevice)) if on_device else a @ b
            assert (c.flops, c.bytes) == ((48, 26 * size) if on_device else (0, 0))
            assert c.flops64 == (48 if on_device and dtype == torch.float64 else 0)
    import traceback

    frame = traceback.FrameSummary("/somewhere/vizapp/analysis/rollout.py", 3, "rollout")
    assert source([frame]) == "analysis/rollout.py"


def test_the_operator_count_takes_a_model_spec_and_a_subset_of_the_calls(tmp_path):
    """``--calls`` keeps the named calls, in that order (the first is the rows' bare forward: "x bare" is 1.0 there),
    a ``name@key=value`` model is built with those arguments, and a call it does not have is named in the refusal."""
    from benchmarks import launches

    out = tmp_path / "l.md"
    args = ["--models", "vit_tiny_patch16_224@img_size=32,depth=2", "--calls", "bare", "analyze", "--out", str(out)]
    assert launches.main(args) == 0
    _, rows = table_rows(out.read_text(encoding="utf-8"), "# Kernel launches per call")
    assert [r[:2] for r in rows] == [["vit_tiny_patch16_224@img_size=32,depth=2", c] for c in ("bare", "analyze")]
    assert rows[0][3] == "1.0" and float(rows[1][3]) > 1.0
    with pytest.raises(SystemExit, match=r"no call named \['anlyze'\]"):
        launches.main([*args[:3], "anlyze", "--out", str(out)])


def test_a_bare_forwards_flops_by_hand_its_fused_attention_included():
    """ViT-Ti/16 at 64 px, 2 blocks, by hand: the patch embedding, each block's four linear layers and its attention
    (q kᵀ and A·v, which the CPU's SDPA computes in a kernel torch's FLOP counter has no rule for: counted with the
    GPU kernels' rule), and the head; 2 FLOPs a multiply-add."""
    from benchmarks import launches

    n, d, heads, width, hidden = 17, 64, 3, 192, 768
    embed = 2 * 16 * (3 * 16 * 16) * width
    linear = 2 * n * width * (3 * width) + 2 * n * width * width + 2 * (2 * n * width * hidden)
    attention = 2 * (2 * heads * n * n * d)
    head = 2 * width * 1000
    got = dict(launches.measure("vit_tiny_patch16_224@img_size=64,depth=2", 2, only=["bare"]))
    assert got["bare"].flops == embed + 2 * (linear + attention) + head


def test_the_fused_kernels_rows_count_two_kernels_a_layer_in_place_of_the_formed_attentions_passes():
    """With vizapp's fused kernels (stood in for: benchmarks.launches.stand_in_kernels), an analysis launches two
    kernels a layer from vizapp/fused_attention.py and none of the formed route's per-chunk work (the chunks'
    softmax, the distance and entropy passes), inside the analysis's graph; its device bytes drop and its FLOPs grow
    by one q kᵀ a layer."""
    from benchmarks import launches

    spec = "vit_tiny_patch16_224@img_size=64,depth=3"
    got = dict(launches.measure(spec, 2, only=["bare", "analyze", "analyze, fused kernels"]))
    formed, fused = got["analyze"], got["analyze, fused kernels"]
    assert fused.by_source["fused_attention.py"] == 2 * 3 and formed.by_source["fused_attention.py"] == 0
    for where in ("attention.py", "analysis/distance.py"):
        assert formed.by_source[where] > 0 and fused.by_source[where] == 0, where
    # headstats.py: the entropy's kernels go; the token norms' summaries (block statistics) stay
    assert fused.by_source["analysis/headstats.py"] < formed.by_source["analysis/headstats.py"]
    assert fused.kernels < formed.kernels and fused.bytes < formed.bytes
    # every layer: the head sum's second q kᵀ, less the distance sums' product [H, P, P] x [P, 2] of the formed route
    # on a device (the kernel's sums are elementwise); 64 px in 16 px patches and CLS, ViT-Ti's heads 64 wide
    p, d, heads = 4 * 4, 64, 3
    n = 1 + p
    assert fused.flops - formed.flops == 3 * (2 * heads * n * n * d - 2 * heads * p * p * 2)
    assert fused.kernels - fused.in_graphs == formed.kernels - formed.in_graphs  # the kernels replay in the graph


def test_the_operator_count_of_an_analysis_splits_into_its_parts(tmp_path):
    # vit_tiny, batch 2, vizapp's graphs stood in for: the bare forward's kernels are the model's own; an analysis adds
    # the digest and its device pass, and what a GPU would still launch outside their graphs is a remainder at most
    from benchmarks import launches

    out = tmp_path / "l.md"
    args = ["--models", "vit_tiny_patch16_224", "--batch", "2", "--evaluation", "--out", str(out)]
    assert launches.main(args) == 0
    header, rows = table_rows(out.read_text(encoding="utf-8"), "# Kernel launches per call")
    got = {r[1]: r for r in rows}
    assert list(got) == [
        "bare",
        "analyze",
        "class maps",
        "class maps, analyze() first",
        "bare, 2 images",
        "batch analyze, 2 images",
        "batch class maps, 2 images",
        "analyze, fused kernels",
        "batch analyze, 2 images, fused kernels",
        "evaluation, 2 images",
    ]
    # the evaluation: its statistics forward, the maps of every method, and the forwards of its perturbed copies
    # (8 methods x 2 directions x 9 steps for each image, in batches of 256); the masks are made on the host
    evaluation = got["evaluation, 2 images"]
    assert int(evaluation[2]) > int(got["batch class maps, 2 images"][2]) + 2 * int(got["bare, 2 images"][2])
    assert int(evaluation[5]) > 0
    bare, analyze, maps = (int(got[k][2]) for k in ("bare", "analyze", "class maps"))
    assert 0 < bare < analyze < maps
    assert int(got["bare"][4]) == bare  # nothing of a bare forward is graphed
    assert int(got["analyze"][4]) < 10  # the digest and the device pass are replays: a remainder at most
    # one image's class maps: the analysis and the gradient passes are replays, the maps from the gradients are not
    for row in (got["class maps"], got["class maps, analyze() first"]):
        assert 0 < int(row[4]) < bare < int(row[2]), row
    batch = got["batch analyze, 2 images"]
    assert int(batch[4]) < 10 and int(got["bare, 2 images"][2]) < int(batch[2])  # its shape came before: graphed
    maps = got["batch class maps, 2 images"]
    assert int(maps[4]) == int(maps[2])  # the batch's gradient pass is not graphed
    # waits for the device: a bare forward's one is its input's blocking copy (``x.to(device)``, as a user writes
    # it); an analysis waits once for its graph's staged results and once for the digest's; the evaluation a few
    # times an image (its maps and class scores to the host); none of vizapp's calls waits on a copy to the device
    waits = {k: int(r[9]) for k, r in got.items()}
    assert waits["bare"] == waits["bare, 2 images"] == 1
    assert got["bare"][10] == "other 1 (a copy to the device 1)", got["bare"][10]
    assert not [k for k, r in got.items() if "a copy to the device" in r[10] and not k.startswith("bare")], got
    assert 0 < waits["analyze"] <= 2 and 0 < waits["batch analyze, 2 images"] <= 2, waits
    assert 0 < waits["evaluation, 2 images"] < 40, waits
    assert "a copy to the host" in got["evaluation, 2 images"][10]
    # device work: the evaluation classifies 8 maps x 2 directions x 9 steps = 144 copies of each image, so more than
    # 100 times a bare forward of the two; Transformer Attribution's part runs in float64
    flops = {k: [float(v) for v in r[11].replace("(", "").replace(")", "").split()] for k, r in got.items()}
    assert flops["evaluation, 2 images"][0] > 100 * flops["bare, 2 images"][0] > 0
    assert flops["evaluation, 2 images"][1] > 0 == flops["bare, 2 images"][1]
    assert float(got["evaluation, 2 images"][12]) > float(got["bare, 2 images"][12]) > 0
    assert float(got["evaluation, 2 images"][13]) > 0  # the host's own work: the authors' masks, made on the host


def test_the_gpu_profile_runs_on_the_cpu_and_names_every_part(capsys):
    """benchmarks.gpu_profile (run on the GPU machine by gpu.sh) is device-agnostic: on the CPU it prints every timed
    part, class maps included, each a positive time, and a profile of each path (no CUDA rows or events here)."""
    import re

    from benchmarks import gpu_profile

    argv = ["--device", "cpu", "--model", "vit_tiny_patch16_224", "--repeats", "1", "--batch", "3"]
    assert gpu_profile.main(argv) == 0
    out = capsys.readouterr().out
    assert "vit_tiny_patch16_224 on the CPU, batch 1, medians of 1" in out
    single = (
        "bare forward",
        "analyze (preprocessing included)",
        "of which the weights fingerprint (the digest)",
        "class maps: analyze(gradients) + relevance + grad rollout",
        "of which analyze(gradients=True)",
        "a further class: one backward + both maps",
        "a class of analyze()'s result: forward + backward + both maps",
        "class maps by vizapp.explain, one image",
    )
    batch = out[out.index("batch of 3 images") :]
    batched = (
        "preprocessing the list (decode, transform, threads)",
        "bare forward of the preprocessed batch",
        "device pass: forward in capture + statistics",
        "device pass + settle (the one copy to the host)",
        "weights fingerprint (the digest)",
        "analyze (preprocessing included)",
        "class maps by vizapp.explain",
    )
    for text, parts in ((out, single), (batch, batched)):  # each part with a positive time
        for part in parts:
            found = re.search(re.escape(part) + r"\s+([0-9.]+) ms", text)
            assert found and float(found.group(1)) > 0, part
    assert "analyze of 3 images: cProfile over 5 calls" in batch and "ncalls  tottime" in batch
    assert "CUDA graph" not in out
    assert out.count("torch.profiler over 5 calls") == 3 and out.count("kernel launches per call: 0") == 3


def test_the_parts_benchmark_switches_each_mechanism_off_and_back(tmp_path):
    """benchmarks.batch_parts: each mechanism is really off inside its configuration and on again after it, and the
    run writes a row per configuration for each case."""
    from benchmarks import batch_parts
    from vizapp import kept, limits
    from vizapp import statistics as vstats

    entropy = vstats.STATISTICS["entropy"]
    a = torch.softmax(torch.randn(2, 3, 4), dim=-1)

    def takes_scores() -> bool:
        return entropy.rows_from_scores(a, torch.randn(2, 3, 4), 0, None, torch.empty(2, 3))

    def pooled() -> bool:
        before = kept.held()
        t = kept.empty((2**19,))  # 2 MiB
        return kept.held() != before and t.numel() == 2**19

    from vizapp import cpu_rows

    def kernel() -> bool:
        return cpu_rows.softmax_rows(a.clone(), torch.empty_like(a))

    on = (takes_scores(), limits.IMAGE_GROUP_BYTES, pooled(), kernel())
    assert on == (True, 6 * 2**20, True, True)
    with batch_parts._off("kept pool"):
        assert not pooled() and takes_scores() and kernel()
    with batch_parts._off("CPU kernel"):
        assert not kernel() and takes_scores() and pooled()
    with batch_parts._off("entropy from scores"):
        assert not takes_scores() and not kernel() and pooled()
    with batch_parts._off("image groups"):
        assert limits.IMAGE_GROUP_BYTES == limits.INLINE_CHUNK_BYTES and takes_scores() and kernel()
    assert (takes_scores(), limits.IMAGE_GROUP_BYTES, pooled(), kernel()) == on
    out = tmp_path / "parts.md"
    spec = "vit_tiny_patch16_224@img_size=32,depth=1"
    assert batch_parts.main(["--cases", f"{spec}:2", "--repeats", "1", "--warmup", "0", "--out", str(out)]) == 0
    header, rows = table_rows(out.read_text(encoding="utf-8"), f"## {spec}, 2 images")
    assert [r[0] for r in rows] == [
        "bare forward",
        "every mechanism on",
        "CPU kernel off",
        "entropy from scores off",
        "image groups off",
        "bare forward (own process)",
        "kept pool off",
    ]
    assert all(float(r[1]) > 0 and float(r[2]) > 0 for r in rows) and rows[1][3] == "1.000"
    assert rows[-1][3] == ""  # not paired: another process


def test_the_host_share_benchmark_times_each_part_where_analyze_calls_it(tmp_path):
    """benchmarks.host_share's timers sit where analyze calls its parts: each part of one image's analysis took time
    (a timer that missed its call would read 0), the digest's walk is inside the digest, and the rest is b less the
    parts; the table has a row per model."""
    from benchmarks import host_share

    m = host_share.measure("vit_tiny_patch16_224@img_size=32,depth=2", rounds=2, warmup=1)
    assert all(m[k] > 0 for k in host_share.PARTS), m
    assert m["walk"] < m["digest"] and m["pass"] + m["digest"] < m["b"], m
    assert m["rest"] == pytest.approx(m["b"] - m["preprocessing"] - m["pass"] - m["digest"])
    out = tmp_path / "t.md"
    host_share.main(["--models", "vit_tiny_patch16_224@img_size=32,depth=1", "--rounds", "1", "--out", str(out)])
    rows = [line for line in out.read_text().splitlines() if line.startswith("| vit_tiny")]
    assert len(rows) == 1 and len(rows[0].split("|")) == 11


def test_the_gpu_profile_times_both_forms_of_the_device_digest_on_the_simulated_gpu():
    """gpu_profile's CUDA-only rows for the digest's two device forms (the exact int8 checksums and the float64
    sums), run here on the simulated GPU with a stand-in for each CUDA graph: both timed, the check's outcome named."""
    from unittest import mock

    from devicesim import simulated_gpu

    import vizapp
    from benchmarks import gpu_profile
    from benchmarks.launches import StandInGraph
    from vizapp import cudagraph

    vm = vizapp.load_model("vit_tiny_patch16_224", pretrained=False, device="cpu", img_size=32, depth=2)
    with simulated_gpu(vm), mock.patch.object(cudagraph, "GraphedPass", StandInGraph):
        with mock.patch.dict("os.environ", {"VIZAPP_CUDA_GRAPHS": "1"}):
            rows = gpu_profile._digest_forms(vm, 2)
    names = [name for name, _ in rows]
    assert names == [
        "  device checksums, exact int8 form (this GPU passed its check: True)",
        "  device sums, float64 form",
    ]
    assert all(t > 0 for _, t in rows)


def test_the_graph_memory_benchmark_measures_both_routes_in_their_own_processes(tmp_path):
    """benchmarks.graph_memory on a tiny ViT: both routes' peaks (each process's own, above its baseline) and times,
    and the ratios between them; then explain's time with the two routes alternating in one process."""
    from benchmarks import graph_memory

    out = tmp_path / "graph.md"
    args = ["--case", "vit_tiny_patch16_224:2", "--interleave", "vit_tiny_patch16_224:2", "--repeats", "1"]
    graph_memory.main([*args, "--threads", "1", "--out", str(out)])
    row, alternating = [line for line in out.read_text().splitlines() if line.startswith("| vit_tiny")]
    cells = [c.strip().replace(",", "") for c in row.strip("|").split("|")]
    assert cells[1] == "2"
    kept, again, ratio = float(cells[2]), float(cells[3]), float(cells[4])
    assert kept >= 1 and again >= 1  # (MiB, rounded: the ratio is of the unrounded bytes)
    assert (again - 0.5) / (kept + 0.5) - 0.005 <= ratio <= (again + 0.5) / (kept - 0.5) + 0.005
    assert float(cells[5]) > 0 and float(cells[6]) > 0
    images, kept_s, again_s, ratio_s = (float(c) for c in alternating.strip("|").split("|")[1:])
    assert images == 2 and kept_s > 0 and again_s > 0 and ratio_s > 0  # explain timed with both routes, alternating


def test_the_cpu_kernel_benchmark_times_both_routes_per_layer(tmp_path, monkeypatch):
    """benchmarks.cpu_rows: a row per model and thread count, both routes timed (a route that did not run would read
    about 0 or less once the copy is taken off), and the environment's switch as it was."""
    import os

    from benchmarks import cpu_rows as bench

    monkeypatch.delenv("VIZAPP_CPU_KERNEL", raising=False)
    out = tmp_path / "rows.md"
    assert bench.main(["--batch", "2", "--rounds", "1", "--threads", "1", "--out", str(out)]) == 0
    rows = [ln.strip("|").split("|") for ln in out.read_text(encoding="utf-8").splitlines() if ln.startswith("| ViT")]
    assert [r[0].strip() for r in rows] == ["ViT-S/16", "ViT-B/16"]
    assert all(float(r[3]) > 0 and float(r[4]) > 0 and r[2].strip() == "2" for r in rows)
    assert "VIZAPP_CPU_KERNEL" not in os.environ
