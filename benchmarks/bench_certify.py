"""Noisy samples per second of ``arq.certify`` against a locuslab/smoothing-style loop (issue 2).

Same model (a CIFAR-10 ResNet-20), same input, same run, on CPU, at batch 400
and 1000. Run: ``pytest benchmarks/bench_certify.py --benchmark-only``; the
ratio is printed and stored in the benchmark's ``extra_info``.
"""
import pytest
import torch

import arq
from arq.models import get_architecture
from benchmarks.locuslab_baseline import locuslab_sample_noise

SAMPLES = 2000


@pytest.fixture(scope="module")
def resnet20():
    torch.manual_seed(0)
    return get_architecture("cifar_resnet20", "cifar10").eval()


@pytest.fixture(scope="module")
def image():
    return torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))


_results = {}


@pytest.mark.parametrize("batch_size", [400, 1000])
def test_locuslab_loop(benchmark, resnet20, image, batch_size):
    benchmark.group = f"certify-resnet20-batch{batch_size}"
    benchmark.pedantic(locuslab_sample_noise, args=(resnet20, image, SAMPLES, batch_size, 10, 0.25),
                       rounds=3, warmup_rounds=1)
    _results[("locuslab", batch_size)] = benchmark.stats.stats.mean
    benchmark.extra_info["samples_per_s"] = SAMPLES / benchmark.stats.stats.mean


@pytest.mark.parametrize("batch_size", [400, 1000])
def test_arq_certify(benchmark, resnet20, image, batch_size):
    benchmark.group = f"certify-resnet20-batch{batch_size}"
    # n0 + n = SAMPLES noisy forward passes, as in the baseline
    benchmark.pedantic(lambda: arq.certify(resnet20, image, sigma=0.25, n=SAMPLES - 100, n0=100,
                                           batch_size=batch_size), rounds=3, warmup_rounds=1)
    mean = benchmark.stats.stats.mean
    benchmark.extra_info["samples_per_s"] = SAMPLES / mean
    baseline = _results.get(("locuslab", batch_size))
    if baseline is not None:
        benchmark.extra_info["speedup_vs_locuslab"] = baseline / mean
        print(f"\nbatch {batch_size}: arq.certify {SAMPLES / mean:.0f} samples/s, "
              f"locuslab loop {SAMPLES / baseline:.0f} samples/s, ratio {baseline / mean:.2f}x")
