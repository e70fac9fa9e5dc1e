"""The CPU kernel (vizapp/cpu_rows.c through vizapp.cpu_rows): a chunk's softmax with each row's entropy and mean
distance in one pass. Hand-computed rows, float64 torch on random chunks (masks, row blocks, several images, strided
targets), analyses with the kernel against analyses with torch's operations, and what happens without a compiler."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAMILIES, random_image, small_model

import vizapp
from vizapp import cpu_rows


@pytest.fixture(autouse=True)
def kernel_on(monkeypatch):
    monkeypatch.setenv("VIZAPP_CPU_KERNEL", "1")
    assert cpu_rows.library() is not None, cpu_rows.why_off()  # the machine has a C compiler (Makefile: debs)


def test_a_row_computed_by_hand():
    """CLS + 2 patches. Query 1 (patch 0) has scores (0, 0, ln 3): weights e = (1, 1, 3) / 5 = (0.2, 0.2, 0.6),
    entropy -(2·0.2 ln 0.2 + 0.6 ln 0.6); over the patch keys the weights renormalise to (0.25, 0.75), and with
    distances (0, 16) px from patch 0 the mean distance is 0.75·16 = 12 px. Query 0 (CLS) has no distance row."""
    scores = torch.tensor([[[5.0, 1.0, 1.0], [0.0, 0.0, math.log(3.0)]]])  # [1 matrix, 2 rows, 3 keys]
    out = torch.empty_like(scores)
    ent, dis = torch.full((1, 1, 2), -1.0), torch.full((1, 1, 2), -1.0)
    dist = torch.tensor([[0.0, 16.0], [16.0, 0.0]])
    assert cpu_rows.softmax_rows(scores, out, 0, 1, 1, dist, (ent, 0), (dis, 1))
    torch.testing.assert_close(out[0, 1], torch.tensor([0.2, 0.2, 0.6]), rtol=1e-6, atol=1e-7)
    assert ent[0, 0, 1].item() == pytest.approx(-(2 * 0.2 * math.log(0.2) + 0.6 * math.log(0.6)), rel=1e-6)
    e0 = torch.tensor([math.exp(4.0), 1.0, 1.0])
    a0 = e0 / e0.sum()
    assert ent[0, 0, 0].item() == pytest.approx(-(a0 * a0.log()).sum().item(), rel=1e-6)
    assert dis[0, 0, 0].item() == pytest.approx(12.0, rel=1e-6)
    assert dis[0, 0, 1].item() == -1.0  # the second patch query is not in this chunk


def test_masked_keys_weigh_nothing_and_a_masked_row_is_nan_as_torch_s():
    scores = torch.tensor([[[1.0, -torch.inf, 1.0, 0.0], [-torch.inf] * 4]])
    out = torch.empty_like(scores)
    ent = torch.zeros((1, 1, 2))
    assert cpu_rows.softmax_rows(scores, out, entropy=(ent, 0))
    want = torch.softmax(scores[0, 0].double(), -1)
    torch.testing.assert_close(out[0, 0].double(), want, rtol=1e-6, atol=1e-7)
    assert out[0, 0, 1].item() == 0.0
    nz = want[want > 0]
    assert ent[0, 0, 0].item() == pytest.approx(-(nz * nz.log()).sum().item(), rel=1e-6)
    assert torch.softmax(scores[0, 1], -1).isnan().all() and out[0, 1].isnan().all() and ent[0, 0, 1].isnan()


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize(
    ("images", "heads", "n", "prefix", "row0", "rows"), [(1, 3, 17, 1, 0, 17), (3, 2, 21, 5, 4, 9)]
)
def test_random_chunks_against_float64(images, heads, n, prefix, row0, rows, threads):
    """Rows ``row0 .. row0 + rows`` of ``images`` images' heads, the targets strided views of larger buffers (the
    reducer's [B, max H, Q] rows), every value to float64's within 1e-5 (relative) and 1e-6; the threads split the
    rows, so every thread count gives the same bits."""
    gen = torch.Generator().manual_seed(n)
    full = torch.randn((images * heads, n, n), generator=gen, dtype=torch.float64) * 5
    full[:, :, n // 2] -= 1e4  # a key far below the others: its weight underflows to 0
    chunk = full[:, row0 : row0 + rows].float().contiguous()
    dist = (torch.rand((n - prefix, n - prefix), generator=gen) * 100).contiguous()
    ent_buf = torch.full((images + 1, heads + 2, n), -7.0)
    dis_buf = torch.full((images + 1, heads + 2, n - prefix), -7.0)
    out = torch.empty_like(chunk)
    taken = cpu_rows.softmax_rows(
        chunk, out, row0, heads, prefix, dist, (ent_buf[1:], 0), (dis_buf[1:], prefix), threads=threads
    )
    assert taken
    a = torch.softmax(chunk.double(), -1)
    torch.testing.assert_close(out.double(), a, rtol=1e-5, atol=1e-7)
    logs = torch.where(a > 0, a.log(), torch.zeros_like(a))
    want_ent = -(a * logs).sum(-1).view(images, heads, rows)
    torch.testing.assert_close(ent_buf[1:, :heads, row0 : row0 + rows].double(), want_ent, rtol=1e-5, atol=1e-6)
    patch = slice(max(row0, prefix) - row0, rows)  # the chunk's patch queries
    ap = a[:, patch, prefix:]
    d = dist[max(row0, prefix) - prefix : row0 + rows - prefix].double()
    want_dis = ((ap * d).sum(-1) / ap.sum(-1)).view(images, heads, -1)
    got_dis = dis_buf[1:, :heads, max(row0, prefix) - prefix : row0 + rows - prefix].double()
    torch.testing.assert_close(got_dis, want_dis, rtol=1e-5, atol=1e-5)
    untouched = torch.ones_like(ent_buf, dtype=torch.bool)
    untouched[1:, :heads, row0 : row0 + rows] = False
    assert (ent_buf[untouched] == -7.0).all()  # nothing outside the chunk's rows written
    assert (dis_buf[0] == -7.0).all() and (dis_buf[:, heads:] == -7.0).all()
    again = torch.empty_like(chunk)
    assert cpu_rows.softmax_rows(chunk, again, row0, heads, prefix, threads=1)
    assert torch.equal(again, out)


@pytest.mark.parametrize("threads", [1, 2])
def test_the_heads_sum_is_written_or_added_per_image(threads):
    """Two images of 3 heads, rows 1..5 of 6 tokens: each image's sum over its heads of the softmax rows, written into
    a strided view of a larger [B, N, N] buffer, or added to what it holds; nothing else of the buffer touched."""
    gen = torch.Generator().manual_seed(3)
    chunk = torch.randn((6, 4, 6), generator=gen)
    want = torch.softmax(chunk.double(), -1).view(2, 3, 4, 6).sum(1)
    for add in (False, True):
        buf = torch.full((3, 6, 6), 0.5)
        out = torch.empty_like(chunk)
        assert cpu_rows.softmax_rows(chunk, out, 1, 3, head_sum=(buf[1:, 1:5], add), threads=threads)
        torch.testing.assert_close(buf[1:, 1:5].double(), want + (0.5 if add else 0.0), rtol=1e-6, atol=1e-6)
        assert (buf[0] == 0.5).all() and (buf[:, [0, 5]] == 0.5).all()
    with pytest.raises(ValueError, match="heads' sum"):
        cpu_rows.softmax_rows(chunk, out, 1, 3, head_sum=(torch.zeros((2, 4, 6))[..., ::2], False))


def test_bad_arguments_are_refused():
    scores = torch.zeros((2, 3, 4))
    with pytest.raises(ValueError, match="contiguous float32"):
        cpu_rows.softmax_rows(scores, torch.empty((2, 3, 5)))
    with pytest.raises(ValueError, match="whole images"):
        cpu_rows.softmax_rows(scores, torch.empty_like(scores), per_image=3)
    with pytest.raises(ValueError, match="patch distances"):
        cpu_rows.softmax_rows(scores, torch.empty_like(scores), distance=(torch.zeros((1, 2, 3)), 1), prefix=1)


@pytest.mark.parametrize(("fid", "name", "kwargs"), FAMILIES + [("beit", "beit_base_patch16_224", {})])
def test_an_analysis_with_the_kernel_equals_one_with_torch_s_operations(fid, name, kwargs, monkeypatch):
    """Statistics, fusions, rollout and the forward's outputs of a 3-image batch and of one image, the kernel against
    torch's softmax and reductions, for every token layout of the test families and BEiT's relative-position bias;
    and the kernel took every layer's chunks."""
    if fid == "beit":
        kwargs = dict(img_size=64, depth=2, embed_dim=96, num_heads=3)
    vm = small_model(name, **kwargs)
    imgs = [random_image(i) for i in range(3)]
    calls = []
    real = cpu_rows.softmax_rows
    monkeypatch.setattr(cpu_rows, "softmax_rows", lambda s, *a, **k: calls.append(s.shape) or real(s, *a, **k))
    with_kernel = vizapp.analyze(vm, imgs) + [vizapp.analyze(vm, imgs[0])]
    assert len(calls) >= 2 * vm.num_layers
    monkeypatch.setenv("VIZAPP_CPU_KERNEL", "0")
    calls.clear()
    with_torch = vizapp.analyze(vm, imgs) + [vizapp.analyze(vm, imgs[0])]
    assert calls == []
    for a, b in zip(with_kernel, with_torch, strict=True):
        for stat in b.statistics:
            np.testing.assert_allclose(a.statistics[stat], b.statistics[stat], rtol=1e-5, atol=1e-6, err_msg=stat)
        np.testing.assert_allclose(a.mean_distance, b.mean_distance, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(a.rollout(), b.rollout(), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(a.block_norms, b.block_norms, rtol=1e-5, atol=1e-5)
        if b.probs is not None:
            np.testing.assert_allclose(a.probs, b.probs, rtol=1e-5, atol=1e-7)


def test_row_blocks_of_a_large_layer_take_the_kernel_too(monkeypatch):
    """Where one head's N x N exceeds the row block (limits.ROW_BLOCK_BYTES), the chunks are blocks of query rows of
    one image: the kernel takes them (the first patch query inside a later block) and the statistics equal torch's."""
    from vizapp import limits

    vm = small_model("vit_tiny_patch16_224", img_size=64, depth=2)
    img = random_image(2)
    monkeypatch.setattr(limits, "MIN_CHUNK_ROWS", 3)
    monkeypatch.setattr(limits, "ROW_BLOCK_BYTES", 1)
    monkeypatch.setattr(limits, "INLINE_CHUNK_BYTES", 1)
    rows = []
    real = cpu_rows.softmax_rows
    monkeypatch.setattr(cpu_rows, "softmax_rows", lambda s, o, r0, *a, **k: rows.append(r0) or real(s, o, r0, *a, **k))
    a = vizapp.analyze(vm, img)
    assert sorted(set(rows)) == list(range(0, 17, 3))
    monkeypatch.setenv("VIZAPP_CPU_KERNEL", "0")
    b = vizapp.analyze(vm, img)
    for stat in b.statistics:
        np.testing.assert_allclose(a.statistics[stat], b.statistics[stat], rtol=1e-5, atol=1e-6, err_msg=stat)
    np.testing.assert_allclose(a.rollout(), b.rollout(), rtol=1e-5, atol=1e-7)


def test_without_a_compiler_the_attention_is_formed_by_torch(monkeypatch, tmp_path, caplog):
    """A C compiler that fails: one warning in the log saying why, the kernel off for the process, and the analysis
    what torch's operations give."""
    vm = small_model("vit_tiny_patch16_224", img_size=64, depth=2)
    img = random_image(4)
    monkeypatch.setenv("VIZAPP_CPU_KERNEL", "0")
    want = vizapp.analyze(vm, img)
    monkeypatch.setenv("VIZAPP_CPU_KERNEL", "1")
    monkeypatch.setattr(cpu_rows, "_state", {})
    monkeypatch.setenv("VIZAPP_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # runs and fails, as a compiler missing its headers would
    with caplog.at_level("WARNING", logger="vizapp.cpu_rows"):
        got = vizapp.analyze(vm, img)
        vizapp.analyze(vm, img)
    assert cpu_rows.library() is None and "could not compile" in cpu_rows.why_off()
    assert [r.message for r in caplog.records].count(caplog.records[0].message) == 1
    assert "the attention is formed by torch" in caplog.records[0].message
    for stat in want.statistics:
        np.testing.assert_array_equal(got.statistics[stat], want.statistics[stat])


def test_a_built_library_is_reused_from_the_cache(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_rows, "_state", {})
    monkeypatch.setenv("VIZAPP_CACHE_DIR", str(tmp_path))
    assert cpu_rows.library() is not None
    (built,) = (tmp_path / "kernels").glob("cpu_rows-*.so")
    stamp = built.stat().st_mtime_ns
    monkeypatch.setattr(cpu_rows, "_state", {})
    assert cpu_rows.library() is not None
    assert list((tmp_path / "kernels").glob("*")) == [built] and built.stat().st_mtime_ns == stamp


def test_an_unwritable_cache_builds_in_a_private_folder(monkeypatch, tmp_path):
    blocker = tmp_path / "a file"
    blocker.write_text("")
    monkeypatch.setattr(cpu_rows, "_state", {})
    monkeypatch.setenv("VIZAPP_CACHE_DIR", str(blocker / "cache"))  # under a file: cannot be made
    lib = cpu_rows.library()
    assert lib is not None and cpu_rows.why_off() is None
    folder = Path(lib._name).parent
    assert folder.name.startswith("vizapp-kernel-") and folder.stat().st_mode & 0o077 == 0  # private


def test_switched_off_it_takes_nothing(monkeypatch):
    monkeypatch.setenv("VIZAPP_CPU_KERNEL", "0")
    scores = torch.zeros((1, 2, 2))
    out = torch.full_like(scores, 5.0)
    assert cpu_rows.library() is None and not cpu_rows.softmax_rows(scores, out)
    assert (out == 5.0).all()


def test_the_kernel_runs_on_torch_s_own_openmp_runtime():
    """Built with OpenMP, the library's libgomp is the one torch loaded (one libgomp mapped in the process): its
    threads are torch's pool, not a second set competing with torch's for the cores."""
    scores = torch.randn((4, 64, 64))
    assert cpu_rows.softmax_rows(scores, torch.empty_like(scores), threads=2)
    with open("/proc/self/maps", encoding="utf-8") as f:
        mapped = {line.split()[-1] for line in f if "libgomp" in line}
    assert len(mapped) == 1, mapped
