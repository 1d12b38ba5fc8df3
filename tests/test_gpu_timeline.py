"""benchmarks/gpu_timeline.py's arithmetic: the GPU's busy time is the union of the kernels' intervals
(overlapping kernels counted once) and the gaps are the idle time between them."""
from types import SimpleNamespace

import torch

from benchmarks.gpu_timeline import _busy_and_gaps


def _kernel(start, end, device_type=torch.autograd.DeviceType.CUDA):
    return SimpleNamespace(device_type=device_type, time_range=SimpleNamespace(start=start, end=end))


def test_busy_time_is_the_union_of_kernel_intervals_and_gaps_the_idle_time_between():
    events = [_kernel(100, 130), _kernel(10, 40), _kernel(35, 60),  # out of order, two overlapping
              _kernel(60, 70),  # touching: no gap
              _kernel(0, 500, torch.autograd.DeviceType.CPU),  # a host op: not a kernel
              _kernel(200, 200)]  # empty: ignored
    prof = SimpleNamespace(events=lambda: events)
    summary = _busy_and_gaps(prof, wall_us=400.0)
    assert summary["kernels"] == 4
    assert summary["gpu_busy_us"] == (70 - 10) + (130 - 100)
    assert summary["gap_us_total"] == 30 and summary["largest_gaps_us"] == [30]
    assert summary["gaps_over_20us"] == 1
    assert summary["first_to_last_kernel_us"] == 120
    assert summary["gpu_busy_share_of_wall"] == round(90 / 400, 3)


def test_no_kernels_reported_as_none():
    prof = SimpleNamespace(events=lambda: [_kernel(0, 5, torch.autograd.DeviceType.CPU)])
    assert _busy_and_gaps(prof, 10.0) == {"kernels": 0}
