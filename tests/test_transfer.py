"""vizapp.transfer: copies from the host to a GPU that do not make the host wait (simulated GPU on the CPU; the real
copy in tests/test_cuda.py)."""

from __future__ import annotations

import torch

from tests.devicesim import FAKE, OnDevice, host_copies, simulated_gpu
from vizapp.transfer import tensor_on, to_device


def test_to_device_copies_a_host_tensor_to_the_gpu_without_a_wait_and_from_a_copy_of_its_own():
    with simulated_gpu():
        host = torch.arange(6, dtype=torch.float32).reshape(2, 3)  # made on the host, as the simulator marks it
        with host_copies() as plain:
            host.to(FAKE)
        assert plain.why == {"a copy to the device": 1}  # what a plain .to(device) costs, for contrast
        with host_copies() as rec:
            dev = to_device(host, FAKE)
            half = to_device(host, FAKE, torch.float16)
            idx = tensor_on([2, 0], FAKE)
            again = to_device(dev, FAKE)  # already there: no copy
        assert rec.waits == 0
        assert isinstance(dev, OnDevice) and isinstance(half, OnDevice) and isinstance(idx, OnDevice)
        assert again.data_ptr() == dev.data_ptr()
        host[0, 0] = 100.0  # the caller's tensor may change at once: the copy was staged from a block of its own
        assert dev.cpu().tolist() == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
        assert half.dtype == torch.float16 and half.cpu().tolist() == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
        assert idx.dtype == torch.int64 and idx.cpu().tolist() == [2, 0]


def test_to_device_on_the_cpu_is_a_plain_to():
    t = torch.arange(4, dtype=torch.float32)
    assert to_device(t, "cpu") is t  # nothing moved, nothing copied
    assert to_device(t, torch.device("cpu"), torch.float64).dtype == torch.float64
    assert tensor_on([1, 2], "cpu").tolist() == [1, 2]


def test_to_device_falls_back_to_the_plain_copy_where_no_memory_can_be_pinned(monkeypatch):
    def refuse(self):  # noqa: ANN001, ANN202
        raise RuntimeError("cudaHostAlloc failed")

    with simulated_gpu():
        host = torch.arange(3.0)
        monkeypatch.setattr(torch.Tensor, "pin_memory", refuse)
        with host_copies() as rec:
            dev = to_device(host, FAKE)
        assert isinstance(dev, OnDevice) and dev.cpu().tolist() == [0.0, 1.0, 2.0]
        assert rec.why == {"a copy to the device": 1}  # the plain copy's wait
