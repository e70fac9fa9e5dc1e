"""The CPU form of the weights digest (vizapp.models.digest): exact int8 checksums, by hand and against int64
arithmetic, the guarantees its docstring states, and the SHA-256 form it falls back to."""

from __future__ import annotations

import copy

import pytest
import torch

import vizapp.models.digest as digest
from vizapp.models.digest import COLUMNS, ROW, checksum_matrix, cpu_checksums, weights_digest


def _reference(t: torch.Tensor) -> torch.Tensor:
    """The definition in int64: the tensor's bytes as signed rows of ROW bytes, zero-padded, times the matrix."""
    raw = t.detach().reshape(-1).contiguous().view(torch.uint8).to(torch.int64)
    raw = torch.where(raw > 127, raw - 256, raw)
    padded = torch.zeros(-(-raw.numel() // ROW) * ROW, dtype=torch.int64)
    padded[: raw.numel()] = raw
    return padded.view(-1, ROW) @ checksum_matrix().to(torch.int64)


def test_checksums_by_hand():
    w = checksum_matrix().to(torch.int64)
    t = torch.tensor([1, 2, 200], dtype=torch.uint8)  # 200 is -56 as a signed byte
    got = cpu_checksums(t)
    assert got.shape == (1, COLUMNS) and got.dtype == torch.int32
    assert torch.equal(got[0].to(torch.int64), 1 * w[0] + 2 * w[1] - 56 * w[2])
    assert cpu_checksums(torch.zeros(0)).shape == (0, COLUMNS)


@pytest.mark.parametrize(
    "t",
    [
        torch.randn(3 * ROW // 4, generator=torch.Generator().manual_seed(0)),  # whole rows only
        torch.randn(5, 1000, generator=torch.Generator().manual_seed(1)),  # rows and a partial row
        torch.randn(64, 48, generator=torch.Generator().manual_seed(2)).t(),  # not contiguous
        torch.randn(7, dtype=torch.float64),
        torch.arange(-50, 50, dtype=torch.int64),
        torch.randn(300).to(torch.bfloat16),
        torch.tensor([True, False, True]),
    ],
)
def test_checksums_equal_int64_arithmetic(t):
    assert torch.equal(cpu_checksums(t).to(torch.int64), _reference(t))


def test_packed_small_tensors_equal_one_product_each():
    assert digest._gemm_available()  # the form every other test here checks
    g = torch.Generator().manual_seed(3)
    tensors = [torch.randn(n, generator=g) for n in (1, 1023, 1024, 1025, 5000)] + [torch.arange(9)]
    assert torch.equal(digest._packed_checksums(tensors), torch.cat([cpu_checksums(t) for t in tensors]))


def test_the_digest_does_not_depend_on_how_small_tensors_are_packed(monkeypatch):
    """Small tensors go into products of at most about PACK bytes; the rows are the same however they are grouped,
    so a packing of one tensor per product, of several, or of all at once gives the same digest."""
    model = torch.nn.Sequential(*[torch.nn.Linear(40, 30) for _ in range(7)], torch.nn.LayerNorm(30))
    digests = []
    for pack in (1, 6_000, 10**9):  # each tensor alone; a few at a time; every one in one product
        monkeypatch.setattr(digest, "PACK", pack)
        digests.append(weights_digest(model))
    assert digests[0] == digests[1] == digests[2]
    with torch.no_grad():
        model[3].bias[7] += 1.0
    assert weights_digest(model).values != digests[0].values


def test_the_matrix_keeps_every_single_element_change_and_every_float32_swap():
    w = checksum_matrix()
    assert w.shape == (ROW, COLUMNS) and w.dtype == torch.int8 and bool((w != 0).all())
    blocks = w.double().view(ROW // 8, 8, COLUMNS)
    assert bool((torch.linalg.matrix_rank(blocks) == 8).all())  # no change of one 8-byte element maps to zero
    # two float32 elements of one row trade places: the change is d at block i and -d at block j, lost only if
    # d is in the null space of (W_i - W_j); every such 4 x COLUMNS difference has rank 4
    quads = w.double().view(ROW // 4, 4, COLUMNS)
    i, j = torch.triu_indices(ROW // 4, ROW // 4, 1)
    smallest = min(
        torch.linalg.svdvals(quads[i[lo : lo + (1 << 17)]] - quads[j[lo : lo + (1 << 17)]])[:, -1].min().item()
        for lo in range(0, i.numel(), 1 << 17)
    )
    assert smallest > 1.0


def test_a_swap_and_a_one_bit_change_show_in_the_digest():
    g = torch.Generator().manual_seed(4)
    m = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 3))
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    d = weights_digest(m)
    assert weights_digest(copy.deepcopy(m)) == d
    seen = {d.values}
    for a, b in ((0, 1), (5, 4000), (17, 17 + ROW // 4)):  # neighbours, far apart in one row, in two rows
        edited = copy.deepcopy(m)
        flat = edited[0].weight.data.view(-1)
        flat[[a, b]] = flat[[b, a]]
        seen.add(weights_digest(edited).values)
    for bit in (0, 13, 31):  # one bit of one float32
        edited = copy.deepcopy(m)
        bits = edited[1].bias.data.view(torch.int32)
        bits[1] ^= (
            torch.tensor(1 << bit, dtype=torch.int32) if bit < 31 else torch.tensor(-(1 << 31), dtype=torch.int32)
        )
        seen.add(weights_digest(edited).values)
    assert len(seen) == 7


def test_without_the_int8_product_the_raw_bytes_are_hashed(monkeypatch):
    m = torch.nn.Linear(8, 8)
    fast = weights_digest(m)
    monkeypatch.setattr(digest, "_gemm_ok", False)
    slow = weights_digest(m)
    assert slow.layout == fast.layout and slow.values != fast.values  # another form of the values
    with torch.no_grad():
        m.weight.view(-1)[3] += 1e-3
    assert weights_digest(m).values != slow.values


def test_the_digests_walk_lists_what_torchs_named_parameters_and_buffers_list():
    """named_tensors: the same (name, tensor) pairs in the same order as torch's own walks with remove_duplicate=False:
    a module reached twice (tied) listed twice, empty slots (a Linear without bias) skipped, non-persistent buffers
    kept, and a timm ViT's tree."""
    import timm

    from tests.conftest import small_model
    from vizapp.models.digest import named_tensors

    shared = torch.nn.Linear(3, 3, bias=False)
    tied = torch.nn.Sequential(
        shared,
        torch.nn.BatchNorm1d(3),
        torch.nn.Sequential(torch.nn.Identity(), shared, torch.nn.LayerNorm(3)),
    )
    tied.register_buffer("scratch", torch.zeros(2), persistent=False)
    tied.add_module("missing", None)
    models = [
        tied,
        timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2),
        small_model("deit_tiny_distilled_patch16_224", img_size=32, depth=2).model,
    ]
    for model in models:
        params, buffers = named_tensors(model)
        want_p = list(model.named_parameters(remove_duplicate=False))
        want_b = list(model.named_buffers(remove_duplicate=False))
        assert [n for n, _ in params] == [n for n, _ in want_p] and [n for n, _ in buffers] == [n for n, _ in want_b]
        assert all(a is b for (_, a), (_, b) in zip(params + buffers, want_p + want_b, strict=True))
    params, buffers = named_tensors(tied)
    assert [n for n, _ in params].count("0.weight") == 1 and "2.1.weight" in dict(params)  # the tied weight twice
    assert [n for n, _ in buffers] == ["scratch", "1.running_mean", "1.running_var", "1.num_batches_tracked"]


# The device form (device_checksums: the same rows and matrix, folded on the device), run here on the CPU.


def _signed_rows(t: torch.Tensor) -> torch.Tensor:
    """``t``'s bytes as signed int64 [n] (the reference's own conversion, not the module's)."""
    raw = t.detach().reshape(-1).contiguous().view(torch.uint8).to(torch.int64)
    return torch.where(raw > 127, raw - 256, raw)


def _device_reference(tensors: list[torch.Tensor]) -> torch.Tensor:
    """device_checksums' definition in int64 on the host: the large tensors' whole rows in order, then one buffer of
    everything else, each piece padded to whole rows; P = rows @ matrix; Σ_r P[r] and Σ_r (2r + 1) · P[r] (no wrap
    at these sizes)."""
    big, rest = [], []
    for t in tensors:
        b = _signed_rows(t)
        full = b.numel() - b.numel() % ROW if b.numel() >= digest.SMALL else 0
        if full:
            big.append(b[:full].view(-1, ROW))
        if b.numel() > full:
            tail = torch.zeros(-(-(b.numel() - full) // ROW) * ROW, dtype=torch.int64)
            tail[: b.numel() - full] = b[full:]
            rest.append(tail)
    rows = torch.cat(big + ([torch.cat(rest).view(-1, ROW)] if rest else []))
    p = rows @ checksum_matrix().to(torch.int64)
    return torch.stack([p.sum(0), (p * (torch.arange(len(p), dtype=torch.int64) * 2 + 1)[:, None]).sum(0)])


def test_device_checksums_by_hand(monkeypatch):
    monkeypatch.setattr(digest, "SMALL", 2 * ROW)  # a tensor of 2 rows or more gives its whole rows in place
    w = checksum_matrix().to(torch.int64)
    small = torch.tensor([1, -1, 0, 0, 0, 0, 0, 2], dtype=torch.int8)  # packed: row 2, weight 5
    large = torch.zeros(2 * ROW + 3, dtype=torch.int8)  # rows 0 and 1 in place (weights 1, 3), its tail packed
    large[0], large[ROW + 5], large[2 * ROW + 1] = 3, -4, 7
    got = digest.device_checksums([small, large])
    p = [3 * w[0], -4 * w[5], w[0] - w[1] + 2 * w[7], 7 * w[1]]  # rows 0 and 1 of large, small, large's tail
    assert got.dtype == torch.int64 and got.shape == (2, COLUMNS)
    assert torch.equal(got[0], p[0] + p[1] + p[2] + p[3])
    assert torch.equal(got[1], 1 * p[0] + 3 * p[1] + 5 * p[2] + 7 * p[3])
    assert torch.equal(digest.device_checksums([]), torch.zeros(2, COLUMNS, dtype=torch.int64))


def test_device_checksums_equal_int64_arithmetic_in_their_row_order():
    g = torch.Generator().manual_seed(5)
    base = torch.randn(2 * digest.SMALL // 4 + 9, generator=g)
    tensors = [
        torch.randn(digest.SMALL // 4, generator=g),  # whole rows only, in place
        torch.randn(7, 1000, generator=g),  # small
        base[1:],  # large, its data 4 bytes past an aligned address (copied before the product), a partial row
        torch.randn(digest.SMALL // 2, generator=g).to(torch.bfloat16).view(512, -1).t(),  # large, not contiguous
        torch.arange(-50, 50, dtype=torch.int64),
        torch.zeros(0),
        torch.tensor([True, False, True]),
    ]
    assert tensors[2].data_ptr() % 16
    assert torch.equal(digest.device_checksums(tensors), _device_reference(tensors))


def test_device_checksums_see_a_change_a_swap_and_tensors_that_trade_places():
    g = torch.Generator().manual_seed(6)
    large = torch.randn(digest.SMALL // 4 + 100, generator=g)
    a, b = torch.randn(300, generator=g), torch.randn(300, generator=g)
    d = digest.device_checksums([large, a, b])
    seen = {tuple(d.reshape(-1).tolist())}
    ulp = large.clone()
    ulp[12345] = torch.nextafter(ulp[12345], torch.tensor(9.0))  # one ulp of one element
    seen.add(tuple(digest.device_checksums([ulp, a, b]).reshape(-1).tolist()))
    for i, j in ((0, 1), (3, 900), (10, 10 + 5 * ROW // 4), (7, large.numel() - 1)):  # in a row, rows apart, the tail
        s = large.clone()
        s[[i, j]] = large[[j, i]]
        seen.add(tuple(digest.device_checksums([s, a, b]).reshape(-1).tolist()))
    rows = large.clone()  # two whole rows trade places
    rows[: ROW // 4], rows[ROW // 4 : ROW // 2] = large[ROW // 4 : ROW // 2].clone(), large[: ROW // 4].clone()
    seen.add(tuple(digest.device_checksums([rows, a, b]).reshape(-1).tolist()))
    seen.add(tuple(digest.device_checksums([large, b, a]).reshape(-1).tolist()))  # two small tensors trade places
    assert len(seen) == 8
    assert torch.equal(digest.device_checksums([large.clone(), a.clone(), b.clone()]), d)


def test_a_device_that_fails_the_check_digests_by_float64_sums(monkeypatch):
    """The exact form is decided once per device by a check against int64 arithmetic on the host: a device whose int8
    product is wrong (simulated: off by one) uses the float64 sums for the whole process."""
    cpu = torch.device("cpu")
    monkeypatch.setattr(digest, "_device_exact", {})
    assert digest._device_exact_ok(cpu)
    real = torch._int_mm

    def off_by_one(a, b, out=None):
        got = real(a, b) + 1
        if out is None:
            return got
        out.copy_(got)
        return out

    monkeypatch.setattr(digest, "_device_exact", {})
    monkeypatch.setattr(torch, "_int_mm", off_by_one)
    assert not digest._device_exact_ok(cpu)
    monkeypatch.setattr(torch, "_int_mm", real)
    assert not digest._device_exact_ok(cpu)  # decided once: the process keeps one form


def test_a_simulated_gpu_digests_by_the_exact_form_and_sees_an_edit(monkeypatch):
    from devicesim import simulated_gpu

    import vizapp

    vm = vizapp.load_model("vit_tiny_patch16_224", pretrained=False, device="cpu", img_size=32, depth=2)
    asked: list[int] = []
    real = digest.device_checksums
    monkeypatch.setattr(digest, "device_checksums", lambda ts: asked.append(len(ts)) or real(ts))
    with simulated_gpu(vm):
        before = vm.fingerprint()
        with torch.no_grad():
            vm.model.blocks[1].mlp.fc2.weight.data.view(-1)[7] *= 1.5  # through .data: no version counter moves
        after = vm.fingerprint()
    n = sum(1 for _ in vm.model.parameters()) + sum(1 for _ in vm.model.buffers())
    assert asked[-2:] == [n, n]  # every weight, by the exact form (after the device's one check)
    assert before.layout == after.layout and before.values != after.values
    assert before.layout != weights_digest(vm.model).layout  # "cuda:0" in the layout; the CPU's differs


def test_each_fold_catches_a_two_row_change_the_other_misses():
    """Why two folds: +3 on byte 0 of row 0 and -1 on byte 0 of row 1 change P by 3·M[0] and -M[0], which the weighted
    fold (weights 1 and 3) misses and the plain sum sees; two whole rows that trade places are the other way round."""
    t = torch.randint(-100, 100, (digest.SMALL,), generator=torch.Generator().manual_seed(8), dtype=torch.int8)
    d = digest.device_checksums([t])
    edited = t.clone()
    edited[0] += 3
    edited[ROW] -= 1
    e = digest.device_checksums([edited])
    assert not torch.equal(e[0], d[0]) and torch.equal(e[1], d[1])
    swapped = t.clone()
    swapped[:ROW], swapped[ROW : 2 * ROW] = t[ROW : 2 * ROW], t[:ROW]
    e = digest.device_checksums([swapped])
    assert torch.equal(e[0], d[0]) and not torch.equal(e[1], d[1])
