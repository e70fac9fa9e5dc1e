"""A digest of a network's weights that changes when any of them changes, moves or is permuted: what a result
records so that methods which run the model again can prove they use the very network that made it.

Two parts, so that a refusal can say which changed:

- ``layout``: every parameter's and buffer's name (tied ones under each name), dtype, device and shape, in the
  module tree's order. A ``.double()``, a move to another device (``meta`` included) or a rename changes it.
- ``values``: the contents, position by position. On the CPU (:func:`cpu_checksums`) each tensor's bytes, as rows of
  :data:`ROW` signed bytes, are multiplied by a fixed pseudo-random matrix of :data:`COLUMNS` columns with no zero
  entry (one int8 matrix product, exact in int32), and those products, about 1.6 % of the bytes, go through
  SHA-256 with the layout's order. Integer arithmetic makes every guarantee exact rather than numerical:

  - a change of any single element (of up to 8 bytes) shows, always: each aligned 8-byte block of the matrix has rank 8
    (checked when it is made), so no non-zero change of one element maps to zero;
  - a swap of two float32 elements shows, always: in one row, every difference of two aligned 4-byte blocks of the
    matrix has rank 4 (the tests check all 523,776 pairs; the smallest singular value is 73.6), and across rows
    each row changes in one element; two rows, tensors or blocks that trade places show unless their products
    agree in all :data:`COLUMNS` columns;
  - any other change escapes only if it lies in the matrix's null space in every changed row: a probability of order
    2^-100 for an edit a user makes, but not a cryptographic guarantee (a deliberate collision is easy to build; the
    digest guards results against the user's own edits, not against an adversary who can already write the weights).

  It reads the weights at 5–8 GB/s on two cores (SHA-256 of the raw bytes, which it replaces, ran at 1.8 GB/s per
  core); like every OpenMP kernel it slows down when the cores are shared with other work. Where the int8 matrix
  product is not available the raw bytes go through SHA-256 (decided once per process, so digests within a process
  are always comparable). On another device (a GPU) copying every weight to the host would cost more than the
  analysis, so the same rows and matrix are multiplied there (:func:`device_checksums`: one int8 product per large
  tensor, one for the small ones packed) and folded on the device into two rows of :data:`COLUMNS` int64 sums,
  Σ_r P[r] and Σ_r (2r + 1) · P[r], which keep the guarantees above exactly (any change confined to two rows shows,
  swaps across rows included); only those 256 bytes come to the host. A device uses that form once it has passed a
  check against int64 arithmetic on the host (decided once per device, :func:`_device_exact_ok`); one that fails
  it, or lacks torch's int8 product, sums each chunk of
  :data:`CHUNK` elements in float64 against a fixed pseudo-random weight vector instead (:func:`device_sums`: a
  different weight per position, so a permutation changes the sum; a change of one element by more than about
  1e-13 of its chunk's magnitude shows). On a CUDA device either form's kernels (about 60 for a ViT-B in the exact
  form, 400 in the float64 one) are recorded once as a CUDA graph and replayed with one launch
  (:func:`graphed_sums`), keyed by every tensor's address, shape, stride and dtype: a replay reads the weights'
  current contents, and a replaced or reshaped tensor records a new graph.

It is computed afresh whenever asked: an edit through ``.data`` moves no version counter, so no cheaper test can
prove that the weights are unchanged. ``python -m benchmarks.digest`` times it (docs/benchmarks-digest.md): on the
quiet 2-core CPU, ViT-B/16 (86.6 M values, 346 MB) 41 ms, median of 9, against 112 ms for SHA-256 of the bytes in
the same run, beside a 262 ms forward; Swin-T (114 MB) 21 ms against 44 ms.
"""

from __future__ import annotations

import hashlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import torch

from vizapp.transfer import to_device

#: Elements per device-side chunk (2 MB of float64 weights per device, made once).
CHUNK = 1 << 18
#: Whole chunks converted to float64 together (at most 128 MB of float64 at a time).
GROUP = 64
#: Bytes per row of the CPU checksum: a multiple of 8, and small enough that no int32 sum can overflow
#: (ROW · 128 · 127 < 2^31).
ROW = 4096
#: Columns of the CPU checksum's matrix: the int32 products kept per row.
COLUMNS = 16
#: Tensors under this many bytes are packed together into one product.
SMALL = 1 << 20
#: At most about this many bytes of small tensors go into one packed product (the rows are the same however the tensors
#: are grouped, so the digest is too): ViT-Ti, whose tensors are all small, packed its whole 22 MB into one buffer.
PACK = 4 << 20
#: Rows of the device's int8 product at the least (cuBLAS's needs more than 16): a shorter packed buffer gets zero rows.
MIN_ROWS = 32
_SEED = 20261203
_matrix: torch.Tensor | None = None
_gemm_ok: bool | None = None
_position_weights: dict[str, torch.Tensor] = {}
_device_constants: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # device -> (checksum matrix, MIN_ROWS zero rows)
_device_exact: dict[str, bool] = {}  # device -> whether its int8 product and int64 fold passed the check
_lock = threading.Lock()


class WeightsDigest(NamedTuple):
    """Hex digests of the tensors' names, dtypes, devices and shapes (``layout``) and of their contents (``values``)."""

    layout: str
    values: str


def _weights_on(device: torch.device) -> torch.Tensor:
    """The fixed position weights [CHUNK] float64 in [1, 2) on ``device`` (the same numbers on every device)."""
    key = str(device)
    with _lock:
        w = _position_weights.get(key)
        if w is None:
            g = torch.Generator().manual_seed(_SEED)
            w = _position_weights[key] = to_device(torch.rand(CHUNK, dtype=torch.float64, generator=g) + 1.0, device)
    return w


def _flat_bytes(t: torch.Tensor) -> torch.Tensor:
    """The tensor's elements in order as bytes [numel * element size] uint8 (a copy only if not contiguous)."""
    return t.detach().reshape(-1).contiguous().view(torch.uint8)


def device_sums(t: torch.Tensor) -> torch.Tensor:
    """Position-weighted float64 sums of ``t``'s elements, one per chunk of :data:`CHUNK`, on ``t``'s device [C]
    (complex tensors as their real and imaginary parts; integer and bool tensors as numbers).

    A few kernels per tensor, whatever its size: up to :data:`GROUP` whole chunks are converted to float64 at once
    and summed by one matrix-vector product, the last partial chunk by one dot product (a ViT-B/16's weights, 86.6 M
    values in about 150 tensors: about 400 kernels; one dot product per chunk was about 450 and one Python step each).
    """
    flat = t.detach().reshape(-1)
    if flat.is_complex():
        flat = torch.view_as_real(flat).reshape(-1)
    w = _weights_on(flat.device)
    n = flat.numel()
    full = n - n % CHUNK
    sums = [
        flat[lo : min(full, lo + GROUP * CHUNK)].to(torch.float64).view(-1, CHUNK) @ w
        for lo in range(0, full, GROUP * CHUNK)
    ]
    if n > full:
        sums.append((flat[full:].to(torch.float64) @ w[: n - full]).reshape(1))
    if not sums:
        return torch.zeros(0, dtype=torch.float64, device=flat.device)
    return sums[0] if len(sums) == 1 else torch.cat(sums)


def checksum_matrix() -> torch.Tensor:
    """The fixed CPU checksum matrix [ROW, COLUMNS] int8 (the same numbers in every process): entries in ±1 … ±127,
    every aligned block of 8 rows of rank 8, so that no non-zero change of one element of up to 8 bytes is lost."""
    global _matrix
    with _lock:
        if _matrix is None:
            g = torch.Generator().manual_seed(_SEED)
            size = torch.randint(1, 128, (ROW, COLUMNS), generator=g, dtype=torch.int16)
            sign = torch.randint(0, 2, (ROW, COLUMNS), generator=g, dtype=torch.int16) * 2 - 1
            m = (size * sign).to(torch.int8)
            ranks = torch.linalg.matrix_rank(m.view(ROW // 8, 8, COLUMNS).double())
            if not bool((ranks == 8).all()):  # fixed numbers: a test sees this first
                raise RuntimeError("the digest's checksum matrix lost rank; change its seed")
            _matrix = m
    return _matrix


def _gemm_available() -> bool:
    """Whether torch's exact int8 matrix product runs here and agrees with int64 arithmetic (decided once per
    process: a process never mixes the two CPU forms of the digest)."""
    global _gemm_ok
    if _gemm_ok is None:
        w = checksum_matrix()
        a = (torch.arange(32 * ROW, dtype=torch.int64) * 7919 % 256 - 128).to(torch.int8).view(32, ROW)
        try:
            ok = torch.equal(torch._int_mm(a, w).to(torch.int64), a.to(torch.int64) @ w.to(torch.int64))
        except (RuntimeError, AttributeError, NotImplementedError):
            ok = False
        _gemm_ok = ok
    return _gemm_ok


def cpu_checksums(t: torch.Tensor) -> torch.Tensor:
    """The CPU tensor ``t``'s bytes as rows of :data:`ROW` signed bytes (the last row padded with zeros) times
    :func:`checksum_matrix`: [ceil(bytes / ROW), COLUMNS] int32, exact (the layout, hashed beside it, fixes the
    length, so the padding is unambiguous)."""
    flat = _flat_bytes(t).view(torch.int8)
    full = flat.numel() - flat.numel() % ROW
    if not full:  # under one row: padded, as a packed tensor is
        return _packed_checksums([flat])
    whole = torch._int_mm(flat[:full].view(-1, ROW), checksum_matrix())  # the rows in place, no copy
    return whole if full == flat.numel() else torch.cat([whole, _packed_checksums([flat[full:]])])


def _packed_checksums(tensors: list[torch.Tensor]) -> torch.Tensor:
    """:func:`cpu_checksums` of small tensors, in order and concatenated, by one matrix product over their rows
    packed into one buffer (the same rows, so the same numbers; a product per small tensor cost about 50 µs)."""
    pieces: list[torch.Tensor] = []
    for t in tensors:
        flat = _flat_bytes(t).view(torch.int8)
        pieces.append(flat)
        if flat.numel() % ROW:
            pieces.append(torch.zeros(ROW - flat.numel() % ROW, dtype=torch.int8))
    if not pieces:
        return torch.zeros(0, COLUMNS, dtype=torch.int32)
    return torch._int_mm(torch.cat(pieces).view(-1, ROW), checksum_matrix())


def _constants_on(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`checksum_matrix` on ``device``, and :data:`MIN_ROWS` zero rows of it [MIN_ROWS · ROW] int8 (made once per
    device, then only read: a CUDA graph may read them on every replay). The matrix is stored column by column: the
    layout of a linear layer's transposed weight, which is how int8 products on GPUs are usually called."""
    key = str(device)
    with _lock:
        found = _device_constants.get(key)
    if found is None:
        m = to_device(checksum_matrix().t().contiguous(), device).t()
        zeros = torch.zeros(MIN_ROWS * ROW, dtype=torch.int8, device=device)
        with _lock:
            found = _device_constants.setdefault(key, (m, zeros))
    return found


def device_checksums(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The exact checksum of tensors on one device, folded there: [2, COLUMNS] int64 on their device.

    Every tensor's bytes are cut into rows of :data:`ROW` signed bytes, as :func:`cpu_checksums` cuts them: a tensor
    of :data:`SMALL` bytes or more gives its whole rows in place, in order; everything else (the small tensors, and
    each large one's last partial row), each padded with zeros to whole rows, follows in one packed buffer, in order.
    Row r of all of them, times :func:`checksum_matrix`, is P[r] (int32, exact: one int8 matrix product per large
    tensor and one for the buffer), and the result is two folds of the rows, Σ_r P[r] and Σ_r (2r + 1) · P[r], in
    int64 modulo 2^64 (exact, and the same in any order of summation).

    Any change confined to one or two rows, each of which changes, always shows, as no such change reaches 2^63:
    if a row r alone changes (by d ≠ 0, for one element of up to 8 bytes a vector of entries under 2^18 in size, by
    the matrix's rank), the first fold changes by d; if rows r and s change by d and e, both folds stay put only if
    e = -d and (2r + 1) · d + (2s + 1) · e = 2 (r - s) · d = 0, that is only if d = 0. So a change of one element,
    a swap of two elements anywhere (in one row as on the CPU; in two rows, one element each), and two whole rows
    that trade places (unless their P agree, as on the CPU, which hashes every P) always show. A change in three
    rows or more escapes only if it vanishes in both folds in all :data:`COLUMNS` columns. About 60 kernels for a
    ViT-B/16, reading each weight once as bytes (the float64 sums, :func:`device_sums`, made a float64 copy of every
    weight and read it again: about 400 kernels and five times the bytes)."""
    if not tensors:
        return torch.zeros(2, COLUMNS, dtype=torch.int64)
    device = tensors[0].device
    matrix, zeros = _constants_on(device)
    blocks: list[torch.Tensor] = []  # [m, ROW] int8 each, in place
    packed: list[torch.Tensor] = []  # what goes into the packed buffer, with its padding
    for t in tensors:
        flat = _flat_bytes(t).view(torch.int8)
        full = flat.numel() - flat.numel() % ROW if flat.numel() >= SMALL else 0
        if full:
            if flat.data_ptr() % 16:  # an unaligned view: copied, as the int8 product may need aligned rows
                flat = flat.clone()
            blocks.append(flat[:full].view(-1, ROW))
        rest = flat[full:]
        if rest.numel():
            packed.append(rest)
            if rest.numel() % ROW:
                packed.append(zeros[: ROW - rest.numel() % ROW])
    packed_rows = sum(p.numel() for p in packed) // ROW
    if packed_rows:  # the packed buffer has at least MIN_ROWS rows: zero rows add zero to the fold
        packed.append(zeros[: max(0, MIN_ROWS - packed_rows) * ROW])
        blocks.append(torch.cat(packed).view(-1, ROW))
    rows = sum(b.shape[0] for b in blocks)
    products = torch.empty(rows, COLUMNS, dtype=torch.int32, device=device)
    lo = 0
    for b in blocks:  # each product written in place into its rows of one buffer
        torch._int_mm(b, matrix, out=products[lo : lo + b.shape[0]])
        lo += b.shape[0]
    wide = products.to(torch.int64)
    # the weights 2r + 1 made here, not kept between calls: a CUDA graph must not read a constant that a later,
    # longer call would replace (and free)
    odd = torch.arange(1, 2 * rows, 2, dtype=torch.int64, device=device)
    return torch.stack([wide.sum(0), (wide * odd[:, None]).sum(0)])


def _device_exact_ok(device: torch.device) -> bool:
    """Whether :func:`device_checksums` runs on ``device`` and gives there what int64 arithmetic on the host gives
    (the int8 product, written into rows of a larger buffer, and the fold's wrap-around modulo 2^64), decided once
    per device: a device that fails (or lacks the product) digests by :func:`device_sums` for the whole process, so
    that digests within a process are always comparable. Waits for the device: call it outside a CUDA graph."""
    key = str(device)
    with _lock:
        found = _device_exact.get(key)
    if found is not None:
        return found
    g = torch.Generator().manual_seed(_SEED + 1)
    big = torch.randint(-128, 128, (SMALL + 3 * ROW + 5,), generator=g, dtype=torch.int16).to(torch.int8)
    big[:16] = torch.tensor([-128, 127] * 8, dtype=torch.int8)  # the extremes of a byte
    small = torch.randint(-128, 128, (ROW + 7,), generator=g, dtype=torch.int16).to(torch.int8)
    pieces = [big, small]
    rows = [big[: SMALL + 3 * ROW].view(-1, ROW)]
    rows += [torch.cat([big[SMALL + 3 * ROW :], torch.zeros(ROW - 5, dtype=torch.int8)]).view(1, ROW)]
    rows += [torch.cat([small, torch.zeros(ROW - 7, dtype=torch.int8)]).view(2, ROW)]
    p = torch.cat(rows).to(torch.int64) @ checksum_matrix().to(torch.int64)
    r = torch.arange(p.shape[0], dtype=torch.int64)[:, None] * 2 + 1
    want = torch.stack([p.sum(0), (p * r).sum(0)]) * (1 << 40)  # scaled until it wraps around 2^64, as the device must
    try:
        with torch.no_grad():
            got = device_checksums([to_device(t, device) for t in pieces])
            got = (got * (1 << 40)).cpu()
        ok = torch.equal(got, want)
    except (RuntimeError, AttributeError, NotImplementedError, TypeError):
        ok = False
    with _lock:
        return _device_exact.setdefault(key, ok)


def _sha256(t: torch.Tensor) -> bytes:
    return hashlib.sha256(memoryview(_flat_bytes(t).numpy())).digest()


_executor: tuple[int, ThreadPoolExecutor] | None = None


def _pool() -> ThreadPoolExecutor:
    """Threads for hashing, as many as torch's intra-op threads (made once per process: a forked child gets its own,
    its parent's threads do not exist there)."""
    global _executor
    with _lock:
        if _executor is None or _executor[0] != os.getpid():
            workers = max(1, torch.get_num_threads())
            _executor = (os.getpid(), ThreadPoolExecutor(max_workers=workers, thread_name_prefix="digest"))
    return _executor[1]


def _sums(tensors: list[torch.Tensor]) -> torch.Tensor:
    """:func:`device_sums` of every tensor, in order, in one tensor [C] float64 on their device."""
    return torch.cat([device_sums(t) for t in tensors])


def _device_values(tensors: list[torch.Tensor], exact: bool) -> torch.Tensor:
    """The device part of the digest, on the tensors' device: :func:`device_checksums` where ``exact``, else
    :func:`_sums`."""
    return device_checksums(tensors) if exact else _sums(tensors)


def graphed_sums(tensors: list[torch.Tensor], graphs: Any, exact: bool = False) -> torch.Tensor | None:
    """The device part of the digest of tensors on one CUDA device, by a replayed CUDA graph
    (:class:`vizapp.cudagraph.GraphCache` ``graphs``), on the host: :func:`device_checksums` [2, COLUMNS] int64 where
    ``exact``, else :func:`_sums` [C] float64; None where graphs are off or the recording failed (the caller computes
    it eagerly).

    The graph reads the weights where they are when it replays, so its key is what it read them as: each tensor's
    address, shape, stride and dtype. The same kernels run as eagerly, so the numbers are the same; they come to the
    host as float32 pairs (the staging copy's type) with their bits unchanged."""
    from vizapp import cudagraph

    if not cudagraph.enabled():
        return None
    device = tensors[0].device
    key = ("weights digest", str(device), exact) + tuple(
        (t.data_ptr(), t.dtype, tuple(t.shape), t.stride(), t.storage_offset()) for t in tensors
    )

    # the graph's input is unused: what it reads are the weights, at the addresses in the key
    graph = graphs.get(
        key,
        lambda _: _device_values(tensors, exact).view(torch.float32),
        torch.zeros(1, device=device),
        stage=lambda out: [out],
    )
    if graph is None:
        return None
    with graph.run(graph.input) as (_, staged):
        if staged is None:  # recorded without host staging
            return None
        return staged[0].view(torch.int64 if exact else torch.float64)


def named_tensors(model: torch.nn.Module) -> tuple[list[tuple[str, torch.Tensor]], list[tuple[str, torch.Tensor]]]:
    """(parameters, buffers) of ``model`` as (name, tensor) pairs: exactly ``named_parameters(remove_duplicate=False)``
    and ``named_buffers(remove_duplicate=False)`` (the module tree in preorder, a module or tensor reached twice
    listed twice, empty slots skipped), from one walk of the tree that reads each module's own dicts. The digest
    walks the tree at every analysis: torch's two generic walks took 257 µs for a ViT-B/16, this one 148."""
    params: list[tuple[str, torch.Tensor]] = []
    buffers: list[tuple[str, torch.Tensor]] = []
    stack: list[tuple[str, torch.nn.Module]] = [("", model)]
    while stack:
        prefix, module = stack.pop()
        params += [(prefix + name, p) for name, p in module._parameters.items() if p is not None]
        buffers += [(prefix + name, b) for name, b in module._buffers.items() if b is not None]
        stack += reversed([(f"{prefix}{name}.", child) for name, child in module._modules.items() if child is not None])
    return params, buffers


def weights_digest(model: torch.nn.Module, graphs: Any = None) -> WeightsDigest:
    """The digest of every parameter and buffer of ``model`` (see the module's docstring); ``graphs``, a
    :class:`vizapp.cudagraph.GraphCache`, replays the device sums as a CUDA graph (:func:`graphed_sums`)."""
    layout, values = hashlib.sha256(), hashlib.sha256()
    device_tensors: dict[torch.device, list[torch.Tensor]] = {}
    cpu_parts: list[torch.Tensor] = []
    with torch.no_grad():
        for kind, named in zip(("parameter", "buffer"), named_tensors(model), strict=True):
            for name, t in named:
                layout.update(f"{kind} {name} {t.dtype} {t.device} {tuple(t.shape)}\n".encode())
                if t.device.type == "meta":
                    continue  # no contents; the layout says where it went
                if t.device.type == "cpu":
                    cpu_parts.append(t)
                else:
                    device_tensors.setdefault(t.device, []).append(t)
    if _gemm_available():  # each tensor's checksums, in order (the products run on torch's threads)
        run: list[torch.Tensor] = []  # consecutive small tensors, packed into one product of at most about PACK bytes
        packed = 0

        def flush() -> None:
            nonlocal packed
            if run:
                values.update(_packed_checksums(run).numpy().tobytes())
                run.clear()
                packed = 0

        for t in cpu_parts:
            size = t.numel() * t.element_size()
            if size >= SMALL:
                flush()
                values.update(cpu_checksums(t).numpy().tobytes())
                continue
            run.append(t)
            packed += size
            if packed >= PACK:
                flush()
        flush()
    else:  # each CPU tensor's SHA-256 on its own (hashlib releases the GIL: the tensors are hashed on every core)
        for found in _pool().map(_sha256, cpu_parts):
            values.update(found)
    for device, tensors in device_tensors.items():  # one copy to the host per device
        exact = _device_exact_ok(device)
        sums = graphed_sums(tensors, graphs, exact) if graphs is not None and device.type == "cuda" else None
        if sums is None:
            with torch.no_grad():
                sums = _device_values(tensors, exact).cpu()
        values.update(sums.numpy().tobytes())
    return WeightsDigest(layout.hexdigest(), values.hexdigest())
