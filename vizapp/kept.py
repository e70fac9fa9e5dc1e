"""Host memory for what an analysis keeps (q and k of every layer, the mean fusions, block outputs), handed out again
once the analysis that held it is gone.

On a CPU, glibc serves blocks this large with ``mmap`` and gives them back to the kernel when they are freed, so
every analysis writes into fresh pages and takes a page fault per 4 KiB: 16 ViT-S/16 images keep about 200 MB
(42,000-93,000 faults a call were measured without this pool), 64 keep 816 MB, and their analysis took 1.52 times a
bare forward without the pool against 1.11 with it (docs/benchmarks-batch-parts.md). :func:`empty` hands out a block
that was written before, when one is free, so analyses that follow one another (a batch after a batch, the app's
next upload) fault nothing in for what they keep.

A block is free when nothing but this pool refers to its memory: no tensor or view of it, no numpy array or DLPack
capsule made from one, no storage object taken from one (the storage has one C++ holder, its Python object, and that
object no reference but the pool's). A block in use is never handed out; a reused block's old contents are never
read, since every caller writes all of a block before reading it, as it must with ``torch.empty``. Under
``torch.use_deterministic_algorithms(True)`` a block handed out is filled with NaN, as ``torch.empty``'s are (the
tests check with it that an analysis in reused blocks is the same).

The pool holds at most :data:`vizapp.limits.KEPT_POOL_BYTES`, in use and free together: to make room for a new block
it drops free ones, the least recently handed out first; a block that still does not fit is an ordinary allocation,
not remembered. A free block that none of the last :data:`vizapp.limits.KEPT_POOL_RECENT` requests took is dropped
too (an analysis asks for about three), so blocks of sizes no longer asked for do not stay. At most the budget stays
held once every analysis is gone; :func:`release` gives it back. CUDA memory is left to
torch's caching allocator, which reuses its blocks already.
"""

from __future__ import annotations

import math
import sys
import threading

import torch

from vizapp import limits

_lock = threading.Lock()
_pool: list[torch.UntypedStorage] = []  # every block the pool holds, in use or free, least recently handed out first
# The count of C++ holders of a storage; without it (a torch that lacks it) nothing is pooled.
_use_count = getattr(torch._C, "_storage_Use_Count", None)


def _refs(block: torch.UntypedStorage) -> int:
    return sys.getrefcount(block)


# What _refs says of a block that only _pool refers to, called the same way (``_refs(_pool[i])``)
_probe = [torch.UntypedStorage(1)]
_FREE_REFS = _refs(_probe[0])
del _probe


def _is_free(i: int) -> bool:
    """Nothing but :data:`_pool` refers to block ``i`` (a caller must hold no other name for it while asking)."""
    return _use_count is not None and _use_count(_pool[i]._cdata) == 1 and _refs(_pool[i]) == _FREE_REFS


def empty(
    shape: tuple[int, ...], dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """A contiguous tensor like ``torch.empty(shape, dtype=dtype, device=device)``. On the CPU, for a block of at
    least :data:`vizapp.limits.KEPT_POOL_MIN_BYTES`: in the smallest free block of the pool that holds it and is at
    most twice its size, else in a new block the pool remembers while it has room (see the module)."""
    device = torch.device(device)
    nbytes = math.prod(shape) * dtype.itemsize
    if device.type != "cpu" or nbytes < limits.KEPT_POOL_MIN_BYTES or _use_count is None:
        return torch.empty(shape, dtype=dtype, device=device)
    with _lock:
        free = [i for i in range(len(_pool)) if _is_free(i)]
        fits = [i for i in free if nbytes <= _pool[i].nbytes() <= 2 * nbytes]
        if fits:
            block = _pool.pop(min(fits, key=lambda i: _pool[i].nbytes()))
        else:
            _drop_free(limits.KEPT_POOL_BYTES - nbytes)
            if sum(b.nbytes() for b in _pool) + nbytes > limits.KEPT_POOL_BYTES:
                return torch.empty(shape, dtype=dtype, device=device)
            block = torch.UntypedStorage(nbytes)
        _pool.append(block)
        _drop_stale()
        out = torch.empty(0, dtype=dtype).set_(block, 0, shape)
    if torch.are_deterministic_algorithms_enabled() and torch.utils.deterministic.fill_uninitialized_memory:
        _fill_uninitialized(out)  # as torch.empty does in that mode
    return out


def _fill_uninitialized(t: torch.Tensor) -> None:
    """What ``torch.empty`` writes into new memory under ``torch.use_deterministic_algorithms(True)``: NaN for
    floating point, the largest value for integers."""
    if t.is_floating_point() or t.is_complex():
        t.fill_(float("nan"))
    elif t.dtype != torch.bool:
        t.fill_(torch.iinfo(t.dtype).max)


def _drop_free(room: int) -> int:
    """Drop free blocks, the least recently handed out first, until the pool holds at most ``room`` bytes or none is
    free; returns the bytes dropped. Call with the lock held."""
    held = sum(b.nbytes() for b in _pool)
    free = [i for i in range(len(_pool)) if _is_free(i)]
    drop = set()
    for i in free:
        if held <= room:
            break
        held -= _pool[i].nbytes()
        drop.add(i)
    dropped = sum(_pool[i].nbytes() for i in drop)
    _pool[:] = [b for i, b in enumerate(_pool) if i not in drop]
    return dropped


def _drop_stale() -> None:
    """Drop the free blocks not handed out by the last :data:`vizapp.limits.KEPT_POOL_RECENT` requests (those
    before the last that many in :data:`_pool`): analyses of another size or model left them. Call with the lock
    held."""
    stale = {i for i in range(len(_pool) - limits.KEPT_POOL_RECENT) if _is_free(i)}  # no other name for a block
    if stale:
        _pool[:] = [b for i, b in enumerate(_pool) if i not in stale]


def release() -> int:
    """Give every free block back to the system; returns the bytes given back."""
    with _lock:
        return _drop_free(0)


def held() -> tuple[int, int]:
    """(bytes of the pool's blocks in use, bytes of its free blocks)."""
    with _lock:
        free = [i for i in range(len(_pool)) if _is_free(i)]
        idle = sum(_pool[i].nbytes() for i in free)
        return sum(b.nbytes() for b in _pool) - idle, idle


def as_pair(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
    """``a`` and ``b`` as one tensor [2, *a.shape] that views both (index 0 is ``a``, 1 is ``b``), when ``b`` lies in
    ``a``'s storage at a fixed distance after it with the same shape and strides (q and k unbound from one qkv
    projection, as timm's and torchvision's attention make them): one copy then keeps both (one kernel on a GPU, not
    two). None otherwise (transformers' q and k come from separate projections)."""
    if a.shape != b.shape or a.stride() != b.stride() or a.dtype != b.dtype or a.device != b.device:
        return None
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return None
    step = b.storage_offset() - a.storage_offset()
    if step <= 0:
        return None
    return a.as_strided((2, *a.shape), (step, *a.stride()), a.storage_offset())


def copy_pair(a: torch.Tensor, b: torch.Tensor, into: torch.Tensor, a_into: torch.Tensor, b_into: torch.Tensor) -> None:
    """``a`` into ``a_into`` and ``b`` into ``b_into``, the two halves of ``into`` [2, ...] (views the caller made
    once, so none is made per call): one copy where :func:`as_pair` views both, else one each."""
    pair = as_pair(a, b)
    if pair is not None:
        into.copy_(pair)
    else:
        a_into.copy_(a)
        b_into.copy_(b)
