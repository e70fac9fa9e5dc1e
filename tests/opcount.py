"""Which ATen operators a piece of code dispatches: a test's count of the operations (a GPU's kernels) it asserts."""

from __future__ import annotations

import collections
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class Ops(TorchDispatchMode):
    """Inside it, every ATen operator dispatched: ``names`` counts them by name ("aten.copy_", "aten.div_", ...), and
    ``written`` lists (name, the data pointer of the storage written) for each in-place one (its first argument)."""

    def __init__(self) -> None:
        super().__init__()
        self.names: collections.Counter[str] = collections.Counter()
        self.written: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        name = str(func.overloadpacket)
        self.names[name] += 1
        if name.endswith("_") and args and isinstance(args[0], torch.Tensor):
            self.written.append((name, args[0].untyped_storage().data_ptr()))
        return func(*args, **(kwargs or {}))
