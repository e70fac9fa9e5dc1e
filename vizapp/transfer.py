"""Copies from the host to a GPU that do not make the host wait for it.

torch synchronises the stream after every copy from the host to a CUDA tensor made without ``non_blocking=True``
(``at::cuda::memcpy_and_sync``: ``cudaMemcpyAsync``, then ``cudaStreamSynchronize``), and ``torch.tensor(data,
device="cuda")`` is such a copy. Each one lets the queue of kernels drain before the host goes on, and the GPU then
idles while the host prepares what comes next. :func:`to_device` stages a host tensor in pinned (page-locked) memory
and copies it asynchronously instead; torch's pinned-memory allocator keeps the staging block until the copy has run.
On the CPU (or for a tensor already on a GPU) it is a plain ``.to``.
"""

from __future__ import annotations

from typing import Any

import torch


def to_device(t: torch.Tensor, device: torch.device | str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``t`` on ``device`` (as ``dtype``, converted on the host), copied from the host to a GPU without a wait.

    A host tensor that is not pinned already is copied into a fresh pinned block first, so the caller may change or
    drop ``t`` at once. One that is pinned already is copied from where it lies: it must not change until the copy
    has run.
    """
    device = torch.device(device)
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device=device, dtype=dtype)
    if dtype is not None:
        t = t.to(dtype)
    try:
        staged = t.pin_memory()
    except RuntimeError:  # no page-locked memory to be had: the plain copy, which waits
        return t.to(device)
    return staged.to(device, non_blocking=True)


def tensor_on(data: Any, device: torch.device | str) -> torch.Tensor:
    """``torch.tensor(data)`` on ``device``: host data (a list, a number) copied there without a wait
    (:func:`to_device`)."""
    return to_device(torch.tensor(data), device)
