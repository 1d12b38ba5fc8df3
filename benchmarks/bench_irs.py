"""IRS (Ugare et al., ICLR 2024) against full re-certification of a quantized model.

For a noise-trained MNIST model f and its quantized copies f' (uniform W8A8 and W4A4,
calibrated under noise), on ``--images`` test images:

* ``cache``: CERTIFY f once (n, n0) and keep its predictions on n_p samples (one-off);
* ``full``:  CERTIFY f' from scratch (n0 + n forward passes per image);
* ``irs``:   :func:`arq.irs.certify_incremental` (n_p forward passes per image).

Reports wall-clock seconds, the speed-up ``full / irs``, the mean disagreement bound
zeta, how many images took each branch, and certified accuracy / ACR of both (IRS trades
a little radius for the speed). The paper reports 4.1x for int8 CIFAR-10 ResNet-110 at
sigma 1 with a GPU; on MNIST LeNet the forward pass is cheap, so fixed costs weigh more.

Run:  PYTHONPATH=. .venv/bin/python benchmarks/bench_irs.py [--model mnist-lenet-sigma0.25]
      [--images 20] [--n 10000] [--n-p 1000] [--out benchmarks/results/irs_cpu.json]
Under pytest-benchmark:  pytest benchmarks/bench_irs.py --benchmark-only
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import pytest
import torch
from torch import nn


def noise_trained_lenet(sigma: float = 0.25, steps: int = 300, seed: int = 0) -> nn.Module:
    """A LeNet trained briefly under noise, for when the zoo's models are not available."""
    from arq.data import get_dataset
    from arq.models.registry import get_architecture

    torch.manual_seed(seed)
    model = get_architecture("lenet", "mnist")
    train = get_dataset("mnist", "train")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        images, labels = train.get_batch(torch.randint(0, len(train), (128,), generator=generator))
        loss = nn.functional.cross_entropy(model(images + sigma * torch.randn(images.shape, generator=generator)),
                                           labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    model.arq_metadata = {"sigma": sigma, "num_classes": 10, "dataset": "mnist", "arch": "lenet"}
    return model


def load_model(name: str) -> tuple[nn.Module, str]:
    try:
        from arq.zoo import load

        return load(name).eval(), name
    except Exception as error:  # zoo not built yet: train a stand-in
        print(f"zoo model {name!r} unavailable ({error}); training a LeNet for 300 steps instead")
        return noise_trained_lenet(), "lenet-300-steps-sigma0.25"


def measure(model: nn.Module, *, images: int, n: int, n0: int, n_p: int, bits=((8, 8), (4, 4)),
            batch_size: int = 1000, seed: int = 0) -> dict:
    from arq.data import get_dataset
    from arq.irs import build_cache, certify_incremental
    from arq.quant import Policy, quantize
    from arq.smoothing.core import ABSTAIN, certify

    test = get_dataset("mnist", "test")
    indices = list(range(0, len(test), len(test) // images))[:images]
    x, labels = test.get_batch(torch.tensor(indices))
    calibration, _ = get_dataset("mnist", "train").get_batch(torch.arange(512))

    started = time.perf_counter()
    cache = build_cache(model, x, n=n, n0=n0, n_p=n_p, seed=seed, input_index=indices, batch_size=batch_size)
    cache_seconds = time.perf_counter() - started
    result = {"images": images, "n": n, "n0": n0, "n_p": n_p, "sigma": cache.sigma, "cache_seconds": cache_seconds,
              "float_acr": sum(cache[i].radius for i, y in zip(indices, labels.tolist())
                               if cache[i].prediction == y) / images}

    def summary(certificates):
        correct = [c.prediction == y and c.prediction != ABSTAIN for c, y in zip(certificates, labels.tolist())]
        return {"certified_accuracy": sum(correct) / images,
                "acr": sum(c.radius for c, ok in zip(certificates, correct) if ok) / images}

    for w, a in bits:
        quantized = quantize(model, Policy.uniform(model, w, a), calibration)
        started = time.perf_counter()
        full = certify(quantized, x, n=n, n0=n0, seed=seed, input_index=indices, batch_size=batch_size)
        full_seconds = time.perf_counter() - started
        started = time.perf_counter()
        fast = certify_incremental(quantized, x, cache, n_p=n_p, input_index=indices, batch_size=batch_size)
        irs_seconds = time.perf_counter() - started
        zetas = [c.zeta for c in fast if c.mode == "irs"]
        result[f"W{w}A{a}"] = {
            "full_seconds": full_seconds, "irs_seconds": irs_seconds, "speedup": full_seconds / irs_seconds,
            "mean_zeta": sum(zetas) / len(zetas) if zetas else None,
            "branches": {mode: [c.mode for c in fast].count(mode) for mode in ("irs", "direct", "abstain")},
            "full": summary(full), "irs": summary(fast),
            # how f' ran: "cpp+int8" is its integer model (IRS runs f' as arq.certify does)
            "full_backend": full[0].backend, "irs_backend": fast[0].backend,
        }
    return result


@pytest.fixture(scope="module")
def resnet20_candidate():
    """A CIFAR ResNet-20 (random weights; sigma 0.25), its W4A4 fake-quant copy and f's IRS cache on four
    random images (n = 1,000): the shapes of a CIFAR search's candidate, no data set needed."""
    from arq.irs import build_cache
    from arq.models.registry import get_architecture
    from arq.quant import Policy, quantize

    torch.manual_seed(0)
    model = get_architecture("cifar_resnet20", "cifar10").eval()
    model.arq_metadata = {"sigma": 0.25, "num_classes": 10}
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(4, 3, 32, 32, generator=generator)
    candidate = quantize(model, Policy.uniform(model, 4, 4), torch.rand(256, 3, 32, 32, generator=generator))
    return candidate, images, build_cache(model, images, n=1000, n0=50, n_p=500, batch_size=500)


@pytest.mark.parametrize("execution", ["as given", "auto"])
def test_irs_candidate_execution(benchmark, resnet20_candidate, execution):
    """IRS of a search candidate (4 images x n_p = 500), group ``irs-candidate-resnet20-w4a4``: the
    fake-quant model ("as given", what IRS ran before) against its integer model ("auto", as
    ``arq.certify`` runs it). Each round certifies a fresh copy of the candidate, so the integer model's
    conversion is timed too, as in a search where every episode brings a new candidate."""
    import copy

    from arq.irs import certify_incremental

    candidate, images, cache = resnet20_candidate
    benchmark.group = "irs-candidate-resnet20-w4a4"
    run = lambda model: certify_incremental(model, images, cache, n_p=500, batch_size=500,  # noqa: E731
                                            execution=execution)
    results = benchmark.pedantic(run, setup=lambda: ((copy.deepcopy(candidate),), {}), rounds=3, iterations=1)
    benchmark.extra_info["backend"] = results[0].backend
    assert len(results) == 4 and all(r.n_p in (0, 500) for r in results)


def test_irs_speedup(benchmark):
    torch.set_num_threads(1)
    model, _ = load_model("mnist-lenet-sigma0.25")
    result = benchmark.pedantic(measure, args=(model,), kwargs=dict(images=5, n=5000, n0=100, n_p=500, bits=((8, 8),)),
                                rounds=1, iterations=1)
    assert result["W8A8"]["speedup"] > 2.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="mnist-lenet-sigma0.25", help="arq zoo model name")
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--n0", type=int, default=100)
    parser.add_argument("--n-p", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--out", default=None, help="write the result as JSON here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, name = load_model(args.model)
    result = measure(model, images=args.images, n=args.n, n0=args.n0, n_p=args.n_p, batch_size=args.batch)
    result.update(model=name, torch=torch.__version__, machine=platform.processor() or platform.machine(),
                  threads=torch.get_num_threads())
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
