"""A GPU simulated on the CPU, so that CI (which has none) checks what code does with tensors on a device.

On a real GPU two mistakes fail at once: ``.numpy()`` of a device tensor (a view must move what it draws to the host
first), and an operation mixing a device tensor with one made on the host (a constant built without ``device=``, or a
result already copied out). On the CPU both pass silently. Inside :func:`simulated_gpu`:

- ``vm.device`` says ``cuda:0``; a tensor moved there (``.to(vm.device)``, ``device=vm.device``) becomes an
  :class:`OnDevice` tensor: a CPU tensor that reports ``cuda:0``, refuses ``.numpy()`` and keeps its kind through
  every operation; ``.cpu()`` (or ``.to("cpu")``) gives a plain tensor again;
- a tensor made on the host (a factory call that names no device, ``from_numpy``, ``.cpu()``) is marked as such,
  and so is what is computed from host tensors alone (a factory given a CPU device is not: in a model that is
  usually a weight's device, which stays the CPU here);
- an operation given both an :class:`OnDevice` tensor and a marked host tensor of one or more dimensions raises, as
  CUDA would (0-d tensors, indexing with host indices and copies into a device tensor are allowed, as on CUDA).

The models' weights become :class:`OnDevice` tensors for the block (the same memory), so the forward runs as it would
on the device. CUDA graphs are turned off and ``torch.cuda.synchronize`` does nothing. It checks where tensors are, not speed or precision:
``tests/test_cuda.py`` still runs the real thing where a GPU is lent.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

FAKE = torch.device("cuda", 0)
_HOST = "_vizapp_on_host"
_ALLOWED_MIXES = {"__getitem__", "__setitem__", "copy_", "index_put_", "index_put"}


class DeviceMixError(RuntimeError):
    """A device tensor met a host tensor in one operation (CUDA would raise here)."""


def _is_device(spec: Any) -> bool | None:
    """True for a CUDA device spec, False for a CPU one, None when ``spec`` names no device."""
    if isinstance(spec, torch.device):
        return spec.type == "cuda"
    if isinstance(spec, str) and spec.split(":")[0] in ("cuda", "cpu"):
        return spec.startswith("cuda")
    if isinstance(spec, OnDevice):  # .to(other_tensor)
        return True
    if isinstance(spec, torch.Tensor):
        return False
    return None


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


def _mark_host(out: Any) -> Any:
    for t in _tensors(out):
        if not isinstance(t, OnDevice):
            with contextlib.suppress(AttributeError, RuntimeError):
                setattr(t, _HOST, True)
    return out


WAITS = {
    "item": "a scalar read",
    "tolist": "a scalar read",
    "__bool__": "a scalar read",
    "__float__": "a scalar read",
    "__int__": "a scalar read",
    "__index__": "a scalar read",
    "equal": "a scalar read",
    "nonzero": "a data-dependent shape",
    "argwhere": "a data-dependent shape",
    "masked_select": "a data-dependent shape",
    "unique": "a data-dependent shape",
    "unique_consecutive": "a data-dependent shape",
}
"""Torch functions of a device tensor after which the host must wait for the device (a real GPU copies the answer
back before the call returns), by name, and why."""

TO_DEVICE = "a copy to the device"
"""Why the host waits on a blocking copy from the host to the device: torch synchronises the stream after every copy
to a CUDA tensor not made with ``non_blocking=True`` (``at::cuda::memcpy_and_sync``: ``cudaMemcpyAsync``, then
``cudaStreamSynchronize``), so the queue of kernels drains first. That covers ``.to(device)`` and ``.cuda()`` of a host
tensor, ``torch.tensor``/``as_tensor`` of host data with a CUDA ``device=``, ``copy_`` of a host tensor into a device
one, and indexing a device tensor with host indices (a list or a host tensor), which torch moves to the device
first."""

_FROM_DATA = {"tensor", "as_tensor", "asarray"}
"""Factories that copy host data (a tensor, an array, a list or a number) to the device they are given."""


def _host_index(obj: Any) -> bool:
    """Whether an index holds host indices that torch copies to the device: a list, or a host tensor of one or more
    dimensions (a 0-d one is read as a number)."""
    if isinstance(obj, list):
        return True
    if isinstance(obj, tuple):
        return any(_host_index(o) for o in obj)
    return _on_host(obj) and obj.dim() > 0


def _on_host(t: Any) -> bool:
    """Whether ``t`` is a tensor made on the host (marked so, see the module's docstring). A plain tensor that is not
    marked is a device tensor whose kind an operator inside C++ dropped (e.g. a Swin block's output): no copy."""
    return isinstance(t, torch.Tensor) and not isinstance(t, OnDevice) and getattr(t, _HOST, False)


class HostCopies:
    """Device-to-host copies seen inside :func:`host_copies`: how many, and their bytes; and how many times the host
    waited for the device (``waits``: a blocking copy to the host or from it (:data:`TO_DEVICE`), a scalar read such
    as ``.item()`` or ``bool()``, an operation whose output shape depends on the values, such as ``nonzero`` or
    indexing with a boolean mask), each a point where a GPU's queue of kernels drains before the host goes on."""

    def __init__(self) -> None:
        self.count = 0
        self.bytes = 0
        self.waits = 0
        self.why: collections.Counter[str] = collections.Counter()  # the waits by kind

    def copied(self, t: torch.Tensor) -> None:
        self.count += 1
        self.bytes += t.numel() * t.element_size()

    def waited(self, why: str) -> None:
        self.waits += 1
        self.why[why] += 1


_RECORDERS: list[Any] = []


@contextlib.contextmanager
def host_copies() -> Iterator[HostCopies]:
    """Count the copies from the simulated device to the host in the block (``.cpu()``, ``.to("cpu")``, and
    ``copy_`` of a device tensor into a host one, as into pinned staging memory): each one a transfer, and on a real
    GPU a wait for the device unless it is asynchronous."""
    with recording(HostCopies()) as rec:
        yield rec


@contextlib.contextmanager
def recording(recorder: Any) -> Iterator[Any]:
    """Tell ``recorder`` of each copy to the host (``recorder.copied(tensor)``) and each wait for the device
    (``recorder.waited(why)``) in the block, as :func:`host_copies` does for its :class:`HostCopies`."""
    _RECORDERS.append(recorder)
    try:
        yield recorder
    finally:
        _RECORDERS.remove(recorder)


def _copied(t: torch.Tensor, blocking: bool = True) -> None:
    for rec in _RECORDERS:
        rec.copied(t)
        if blocking:
            rec.waited("a copy to the host")


def waited(why: str) -> None:
    """Record one wait for the device (e.g. a replayed graph's synchronisation, which a stand-in does not make)."""
    for rec in _RECORDERS:
        rec.waited(why)


def _plain(t: torch.Tensor, blocking: bool = True) -> torch.Tensor:
    with torch._C.DisableTorchFunctionSubclass():
        out = t.as_subclass(torch.Tensor)
    _copied(out, blocking)
    return _mark_host(out)


def _on_device(out: Any) -> Any:
    if isinstance(out, torch.Tensor) and not isinstance(out, OnDevice):
        return out.as_subclass(OnDevice)
    if isinstance(out, tuple):
        return tuple(_on_device(o) for o in out)
    if isinstance(out, list):
        return [_on_device(o) for o in out]
    return out


def _target(func: Any, args: tuple, kwargs: dict) -> bool | None:
    """For ``Tensor.to``: True (to the device), False (to the host) or None (a dtype change only)."""
    if kwargs.get("device") is not None:
        return _is_device(kwargs["device"])
    for a in args[1:]:
        found = _is_device(a)
        if found is not None:
            return found
    return None


def is_device_call(func: Any, args: tuple, kwargs: dict) -> bool:
    """Whether a torch function call runs on the simulated GPU: one of its tensors is an :class:`OnDevice`, it makes a
    tensor there (``device=`` naming CUDA), or it moves one there (``Tensor.to``, ``Tensor.cuda``)."""
    if any(isinstance(t, OnDevice) for t in _tensors((args, kwargs))):
        return True
    if func in (torch.Tensor.to, torch.Tensor.cuda):
        return func is torch.Tensor.cuda or bool(_target(func, args, kwargs))
    return bool(_is_device(kwargs.get("device")))


class OnDevice(torch.Tensor):
    """A CPU tensor standing for one on ``cuda:0`` (see the module's docstring)."""

    def __array__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("can't convert cuda:0 device type tensor to numpy (simulated GPU): call .cpu() first")

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func == torch.Tensor.device.__get__:
            return FAKE
        if func == torch.Tensor.is_cuda.__get__:
            return True
        if func == torch.Tensor.numpy:
            raise TypeError("can't convert cuda:0 device type tensor to numpy (simulated GPU): call .cpu() first")
        if func == torch.Tensor.cpu:
            return _plain(args[0])
        if func == torch.Tensor.to:
            where = _target(func, args, kwargs)
            rest = [a for a in args[1:] if _is_device(a) is None]
            kw = {k: v for k, v in kwargs.items() if k != "device"}
            if where is False:
                with torch._C.DisableTorchFunctionSubclass():
                    moved = args[0].as_subclass(torch.Tensor).to(*rest, **kw)
                return _plain(moved, blocking=not kwargs.get("non_blocking", False))
            with torch._C.DisableTorchFunctionSubclass():
                return _on_device(args[0].as_subclass(torch.Tensor).to(*rest, **kw))
        name = getattr(func, "__name__", "")
        if name == "copy_" and len(args) > 1:
            blocking = not (kwargs.get("non_blocking") or (len(args) > 2 and args[2]))
            into, source = (isinstance(a, OnDevice) for a in args[:2])
            if source and not into:  # to the host
                _copied(args[0], blocking=blocking)
            elif into and _on_host(args[1]) and blocking:  # from the host
                waited(TO_DEVICE)
        if name in WAITS:
            waited(WAITS[name])
        elif name == "__getitem__" and any(
            t.dtype == torch.bool and t.dim() > 0 for t in _tensors(args[1:])
        ):  # a boolean mask: how many elements it selects is read back
            waited("a data-dependent shape")
        elif name in ("__getitem__", "__setitem__", "index_put_", "index_put") and _host_index(args[1:2]):
            waited(TO_DEVICE)
        if name == "__setitem__" and len(args) > 2 and _on_host(args[2]) and args[2].dim() > 0:
            waited(TO_DEVICE)  # a host tensor's values copied in
        if name not in _ALLOWED_MIXES:
            for t in _tensors((args, kwargs)):
                if not isinstance(t, OnDevice) and t.dim() > 0 and getattr(t, _HOST, False):
                    raise DeviceMixError(
                        f"{name or func}: a cuda:0 tensor and a host tensor {tuple(t.shape)} in one operation "
                        "(simulated GPU)"
                    )
        return super().__torch_function__(func, types, args, kwargs)


class _Mode(TorchFunctionMode):
    """Tensors made with ``device=cuda`` or moved there become :class:`OnDevice`; ones made on the host are marked."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = dict(kwargs or {})
        kwargs.pop("pin_memory", None)
        inputs = list(_tensors((args, kwargs)))
        if any(isinstance(t, OnDevice) for t in inputs):
            if getattr(func, "__name__", "") in _FROM_DATA and _is_device(kwargs.get("device")):
                # as_tensor(a device tensor, device=cuda): no copy
                kwargs["device"] = "cpu"
                return _on_device(func(*args, **kwargs))
            return func(*args, **kwargs)  # OnDevice.__torch_function__ decides
        if func == torch.Tensor.to and _target(func, args, kwargs):
            rest = [a for a in args[1:] if _is_device(a) is None]
            kw = {k: v for k, v in kwargs.items() if k != "device"}
            if not kw.get("non_blocking") and _on_host(args[0]):
                waited(TO_DEVICE)
            return _on_device(func(args[0], *rest, **kw))
        if func == torch.Tensor.pin_memory:  # page-locked staging memory: a host copy here (no CUDA to lock it)
            return _mark_host(args[0].clone())
        if func == torch.Tensor.cuda:
            if not kwargs.get("non_blocking") and _on_host(args[0]):
                waited(TO_DEVICE)
            return _on_device(args[0].clone())
        spec = kwargs.get("device")
        if spec is not None and _is_device(spec):
            kwargs["device"] = "cpu"
            if getattr(func, "__name__", "") in _FROM_DATA:
                waited(TO_DEVICE)
            return _on_device(func(*args, **kwargs))
        out = func(*args, **kwargs)
        # made on the host: no device named (a device named as "cpu" is usually a weight's, which stays on the CPU
        # here though it would be on the GPU), or computed from host tensors only
        if (not inputs and spec is None) or any(getattr(t, _HOST, False) for t in inputs):
            _mark_host(out)
        return out


@contextlib.contextmanager
def simulated_gpu(*models: Any) -> Iterator[None]:
    """Run the block as if ``models`` (VizModels) were on ``cuda:0`` (see the module's docstring)."""
    from unittest import mock

    saved = [vm.device for vm in models]
    _forget_digest_constants()  # made for a real device of that name, or left by an earlier simulation
    for vm in models:
        object.__setattr__(vm, "device", FAKE)
        vm._digest.clear()  # constants made for the CPU device
        _convert(vm.model, OnDevice)
    try:
        real_from_numpy = torch.from_numpy  # torch functions' overrides never see it: marked here
        with (
            mock.patch.object(torch, "from_numpy", lambda a: _mark_host(real_from_numpy(a))),
            mock.patch.object(torch.cuda, "synchronize", lambda *a, **k: None),
            mock.patch.dict("os.environ", {"VIZAPP_CUDA_GRAPHS": "0"}),
            _Mode(),
        ):
            yield
    finally:
        for vm, device in zip(models, saved, strict=True):
            object.__setattr__(vm, "device", device)
            vm._digest.clear()
            _convert(vm.model, torch.Tensor)
        _forget_digest_constants()  # host tensors posing as the device's: never for a real GPU in this process


def _forget_digest_constants() -> None:
    """Drop the weights digest's per-device constants and decisions kept for :data:`FAKE` (module-level caches)."""
    from vizapp.models import digest

    for cache in (digest._position_weights, digest._device_constants, digest._device_exact):
        cache.pop(str(FAKE), None)


def _convert(model: torch.nn.Module, kind: type) -> None:
    """Every parameter and buffer of ``model`` as ``kind`` (the same memory; parameters stay parameters)."""
    before = torch.__future__.get_overwrite_module_params_on_conversion()
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        if kind is OnDevice:
            model._apply(lambda t: t.as_subclass(OnDevice))
        else:
            with torch._C.DisableTorchFunctionSubclass():  # else the subclass's own handling keeps its kind
                model._apply(lambda t: t.as_subclass(kind))
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(before)
