"""benchmarks/gpu_timeline.py's arithmetic: the GPU's busy time is the union of the kernels' intervals
(overlapping kernels counted once) and the gaps are the idle time between them."""
from types import SimpleNamespace

import pytest
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


def test_layer_times_time_each_convolution_and_linear_layer_on_its_own_input():
    from torch import nn

    from benchmarks.gpu_timeline import layer_times

    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 2))
    seen = []
    model[3].register_forward_pre_hook(lambda layer, args: seen.append(args[0].shape))
    times = layer_times(model, torch.rand(6, 3, 5, 5), torch.device("cpu"), repeats=2)
    assert times["count"] == 2 and {layer["name"] for layer in times["by_time"]} == {"0", "3"}
    assert all(layer["us"] > 0 for layer in times["by_time"])
    assert times["by_time"][0]["us"] >= times["by_time"][1]["us"]  # slowest first
    conv = next(layer for layer in times["by_time"] if layer["name"] == "0")
    assert conv["type"] == "Conv2d" and conv["in_channels"] == 3 and conv["kernel_size"] == [3, 3]
    # the linear layer was timed on the flattened activation it got in the forward, not on the input
    assert set(seen) == {torch.Size([6, 100])}
    # the timing hooks are gone (the test's own stays)
    assert not model[0]._forward_pre_hooks and len(model[3]._forward_pre_hooks) == 1


def test_forward_by_batch_times_each_size_per_1000_samples():
    """The sweep runs the model on batches of a quarter, half, one and two batches, each made by the
    caller's function at that size, and reports milliseconds per 1,000 samples (a model that costs the
    same per sample reads the same at every size)."""
    import time

    from benchmarks.gpu_timeline import forward_by_batch

    sizes_made, sizes_run = [], []

    def make_batch(size):
        sizes_made.append(size)
        return torch.zeros(size, 1)

    def model(batch):  # 0.1 ms a sample: 100 ms per 1,000 samples
        sizes_run.append(batch.shape[0])
        time.sleep(batch.shape[0] * 100e-6)

    result = forward_by_batch(model, make_batch, torch.device("cpu"), batch=200, repeats=1)
    assert sorted(sizes_made) == [50, 100, 200, 400] and list(result) == ["50", "100", "200", "400"]
    assert set(sizes_run) == {50, 100, 200, 400}
    for ms in result.values():  # 100 ms per 1,000 samples, plus the sleeps' overshoot (a loaded host's)
        assert 95.0 <= ms <= 400.0
    # every size runs at least 1,000 samples per timed run (20 calls of 50)
    assert sizes_run.count(50) >= 2 * 20


def _two_layer_model():
    from torch import nn

    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 2))


def test_cold_layer_times_are_the_warm_ones_off_cuda():
    """``cold`` flushes a GPU's L2 before each call; on the CPU there is nothing to flush and the layers
    are timed as warm ones, with the same layers reported."""
    from benchmarks.gpu_timeline import layer_times

    times = layer_times(_two_layer_model(), torch.rand(6, 3, 5, 5), torch.device("cpu"), repeats=2, cold=True)
    assert times["count"] == 2 and {layer["name"] for layer in times["by_time"]} == {"0", "3"}
    assert all(layer["us"] > 0 for layer in times["by_time"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_cold_layer_times():
    """On CUDA every layer gets a cold time (CUDA events around the call alone, after the L2 flush), and a
    reduction over 64 MB is not faster cold than warm beyond timing noise (the flush's writes are not
    counted in the call's time)."""
    from benchmarks.gpu_timeline import _cold_us, layer_times

    device = torch.device("cuda")
    model = _two_layer_model().to(device)
    times = layer_times(model, torch.rand(6, 3, 5, 5, device=device), device, repeats=3, cold=True)
    assert times["count"] == 2 and all(layer["us"] > 0 for layer in times["by_time"])
    big = torch.rand(16 << 20, device=device)  # 64 MB of float32
    cold = _cold_us(lambda: big.sum(), device, 5)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    big.sum()
    warm = []
    for _ in range(5):
        start.record()
        big.sum()
        end.record()
        end.synchronize()
        warm.append(start.elapsed_time(end) * 1e3)
    assert cold > 0 and min(warm) > 0
    assert cold >= 0.9 * sorted(warm)[2]  # never faster cold than warm, beyond timing noise


def test_peer_layers_runs_its_parts_on_the_cpu():
    """The FP16 peer's timing (a CUDA step) runs the same code on the CPU on a small batch: its forward,
    the batch sweep and both layer tables, each ResNet-20 convolution and its linear layer."""
    from benchmarks.gpu_timeline import peer_layers

    peer = peer_layers("resnet20", batch=4, repeats=1, device="cpu", sweep_samples=8)
    assert peer["errors"] == {} and peer["ms_per_batch"]["forward"] > 0
    assert list(peer["forward_by_batch_ms_per_1000"]) == ["1", "2", "4", "8"]
    assert all(ms > 0 for ms in peer["forward_by_batch_ms_per_1000"].values())
    # the stem, 18 3x3 convolutions, 2 downsampling 1x1 ones and the linear layer
    assert peer["layers"]["count"] == peer["layers_cold"]["count"] == 22


def test_layer_totals_for_the_console_line():
    from benchmarks.gpu_timeline import _layer_totals

    entry = {"layers": {"total_us": 5600.0, "count": 3}, "layers_cold": {"total_us": 9104.0}, "forward": 1}
    assert _layer_totals(entry) == {"layers_total_ms": 5.6, "layers_cold_total_ms": 9.104}
    assert _layer_totals({"layers": None, "error": "x"}) == {}  # a part that failed: nothing to sum
