"""CPU throughput of a ResNet-20-shaped network: FP32, fake-quant reference, integer path.

One process measures every variant on the same random inputs (samples/s, median of
``--repeats`` rounds that time every variant once, after warm-up), so the ratios are comparable:

* ``fp32_eager``        the float model (BatchNorm folded, as quantized models have it)
* ``fakequant_eager``   arq.quant.quantize's reference model (policy ``--bits``)
* ``integer_eager``     arq.quant.to_integer: u8 x s8 layers (oneDNN, or arq::lowbit_conv2d for the
                        3x3 ones under the default ``conv_kernel="auto"`` on AVX2 hosts), float glue, epilogues
                        fused (``fuse_epilogues``: a conv feeding the next layer through ReLU
                        writes that layer's uint8 codes; a residual add + ReLU runs in the conv)
* ``integer_compiled``  the same wrapped in torch.compile (Inductor fuses the glue; residual
                        adds left to Inductor, the default when compiling)
* ``integer_compiled_residuals_fused``  compiled with the residual fusion forced on
* ``integer_*_unchained``  eager and compiled without any epilogue fusion (float32 outputs)
* ``pt2e_int8_compiled``  torchao pt2e + X86InductorQuantizer + torch.compile: the stock
                        int8 flow, for speed comparison only (its own 8-bit observers, it does
                        not follow an arq policy)
* ``fx_int8_eager``     torch.ao.quantization FX static int8 (deprecated API), speed only

Run:  PYTHONPATH=. .venv/bin/python benchmarks/bench_quant.py [--out results/x.json]
Under pytest-benchmark:  pytest benchmarks/bench_quant.py --benchmark-only
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn


def resnet20(seed: int = 0) -> nn.Module:
    """arq.models' CIFAR ResNet-20 behind a normalization layer, random weights, eval mode."""
    torch.manual_seed(seed)
    try:
        from arq.models.cifar_resnet import CifarResNet
        from arq.models.normalize import NormalizeLayer

        model = nn.Sequential(NormalizeLayer([0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.2010]), CifarResNet(20))
    except ImportError:  # before arq.models lands: the test helper of the same shape
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "quant"))
        from quant_nets import cifar_resnet

        return cifar_resnet(20, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                c = module.num_features
                module.running_mean.copy_(torch.rand(c, generator=generator) * 0.4 - 0.2)
                module.running_var.copy_(torch.rand(c, generator=generator) * 1.5 + 0.5)
    model.arq_metadata = {"sigma": 0.25, "num_classes": 10, "dataset": "cifar10", "arch": "cifar_resnet20"}
    return model.eval()


def _functional_relu_copy(model: nn.Module) -> nn.Module:
    """A copy whose residual blocks call ``F.relu`` instead of one shared ``self.relu`` module.

    X86InductorQuantizer annotates by source partitions; a ReLU module called twice in a
    block forms one partition with two outputs, which it rejects ("Input partition has more
    than one output node"). Same math, benchmark-only.
    """
    import types

    import torch.nn.functional as F

    def block_forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + shortcut)

    copied = copy.deepcopy(model)
    for module in copied.modules():
        if all(hasattr(module, name) for name in ("conv1", "bn1", "conv2", "bn2", "downsample", "relu")):
            module.forward = types.MethodType(block_forward, module)
        if isinstance(module, nn.ReLU):
            module.inplace = False
    return copied


def round_robin_rates(models: dict, inputs: torch.Tensor, repeats: int) -> dict[str, float]:
    """Samples/s per model: ``repeats`` rounds, each timing every model once, median per model.

    Interleaving the variants spreads the load of a shared machine evenly over them, so
    their ratios stay meaningful when the absolute numbers drift.
    """
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for name, model in models.items():  # warm-up
            model(inputs)
        for _ in range(repeats):
            for name, model in models.items():
                start = time.perf_counter()
                model(inputs)
                times[name].append(time.perf_counter() - start)
    return {name: inputs.shape[0] / statistics.median(values) for name, values in times.items()}


def build_variants(bits: tuple[int, int], batch_size: int, include_reference_flows: bool):
    """``{name: (callable, build_seconds)}`` for every variant."""
    import arq.quant as quant
    from arq.quant.execution import IntegerExecutionConfig, to_integer
    from arq.quant.quantize import fold_batchnorm

    model = resnet20()
    calibration = torch.rand(256, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    variants = {}
    float_model = copy.deepcopy(model)
    fold_batchnorm(float_model, calibration[:8])
    variants["fp32_eager"] = (float_model, 0.0)
    start = time.perf_counter()
    qmodel = quant.quantize(model, quant.Policy.uniform(model, *bits), calibration)
    variants["fakequant_eager"] = (qmodel, time.perf_counter() - start)
    start = time.perf_counter()
    variants["integer_eager"] = (to_integer(qmodel), time.perf_counter() - start)
    variants["integer_eager_unchained"] = (to_integer(qmodel, IntegerExecutionConfig(fuse_epilogues=False)), 0.0)
    variants["integer_compiled"] = (to_integer(qmodel, IntegerExecutionConfig(compile=True)), 0.0)
    variants["integer_compiled_residuals_fused"] = (
        to_integer(qmodel, IntegerExecutionConfig(compile=True, fuse_residuals=True)), 0.0)
    variants["integer_compiled_unchained"] = (
        to_integer(qmodel, IntegerExecutionConfig(compile=True, fuse_epilogues=False)), 0.0)
    if include_reference_flows:
        example = torch.rand(batch_size, 3, 32, 32)
        try:
            from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
            import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq

            start = time.perf_counter()
            stock = _functional_relu_copy(model)
            exported = torch.export.export(stock, (example,)).module()
            quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
            prepared = prepare_pt2e(exported, quantizer)
            prepared(calibration)
            converted = convert_pt2e(prepared)
            import torch._inductor.config as inductor_config

            inductor_config.freezing = True  # lets Inductor fold the int8 weights into oneDNN prepacks
            variants["pt2e_int8_compiled"] = (torch.compile(converted), time.perf_counter() - start)
        except Exception as error:  # reported, not hidden
            print(f"pt2e_int8_compiled unavailable: {type(error).__name__}: {error}", file=sys.stderr)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                from torch.ao.quantization import get_default_qconfig_mapping
                from torch.ao.quantization.fx.custom_config import PrepareCustomConfig
                from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

                start = time.perf_counter()
                torch.backends.quantized.engine = "x86"
                # the normalization layer checks shapes in Python: FX cannot trace it, keep it a leaf
                prepare_config = PrepareCustomConfig().set_non_traceable_module_classes([type(model[0])])
                prepared_fx = prepare_fx(
                    copy.deepcopy(model), get_default_qconfig_mapping("x86"), (example,),
                    prepare_custom_config=prepare_config,
                )
                prepared_fx(calibration)
                variants["fx_int8_eager"] = (convert_fx(prepared_fx), time.perf_counter() - start)
        except Exception as error:
            print(f"fx_int8_eager unavailable: {type(error).__name__}: {error}", file=sys.stderr)
    return variants, qmodel


def run(batch_size: int, repeats: int, bits: tuple[int, int], include_reference_flows: bool = True) -> dict:
    torch.manual_seed(0)
    inputs = torch.rand(batch_size, 3, 32, 32) + 0.25 * torch.randn(batch_size, 3, 32, 32)
    variants, qmodel = build_variants(bits, batch_size, include_reference_flows)
    results = {}
    with torch.inference_mode():
        reference = qmodel(inputs)
    for name, (model, build_seconds) in list(variants.items()):
        start = time.perf_counter()
        try:
            with torch.inference_mode():
                out = model(inputs)  # compiles, for compiled variants
        except Exception as error:  # reported in the results, not hidden; the others still run
            print(f"{name}: failed: {type(error).__name__}: {str(error)[:300]}", file=sys.stderr)
            results[name] = {"failed": f"{type(error).__name__}: {str(error)[:300]}"}
            del variants[name]
            continue
        results[name] = {
            "first_call_s": round(time.perf_counter() - start, 2),
            "build_s": round(build_seconds, 2),
            "top1_agreement_with_fakequant": round(float((out.argmax(1) == reference.argmax(1)).float().mean()), 4),
            "max_abs_logit_difference_to_fakequant": float((out - reference).abs().max()),
        }
    rates = round_robin_rates({name: model for name, (model, _) in variants.items()}, inputs, repeats)
    for name, rate in rates.items():
        results[name]["samples_per_s"] = round(rate, 1)
        print(f"{name:>22}: {rate:9.1f} samples/s  (first call {results[name]['first_call_s']:6.2f} s, "
              f"top-1 agreement with fake-quant {results[name]['top1_agreement_with_fakequant']:.3f}, "
              f"max |logit difference| {results[name]['max_abs_logit_difference_to_fakequant']:.3g})", flush=True)
    return {
        "benchmark": "bench_quant",
        "network": "CIFAR ResNet-20 (1x1 conv shortcuts), random weights, NormalizeLayer first",
        "bits_w_a": list(bits),
        "batch_size": batch_size,
        "repeats": repeats,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "machine": platform.machine(),
        "results": results,
    }


# ----------------------------------------------------------------------------- pytest-benchmark
def _bench(benchmark, name):
    variants, _ = build_variants((8, 8), 256, include_reference_flows=False)
    model = variants[name][0]
    inputs = torch.rand(256, 3, 32, 32)
    with torch.inference_mode():
        model(inputs)
        benchmark.pedantic(model, args=(inputs,), rounds=5, warmup_rounds=1)


def test_bench_fp32_eager(benchmark):
    _bench(benchmark, "fp32_eager")


def test_bench_fakequant_eager(benchmark):
    _bench(benchmark, "fakequant_eager")


def test_bench_integer_eager(benchmark):
    _bench(benchmark, "integer_eager")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--bits", type=int, nargs=2, default=(8, 8), metavar=("W", "A"))
    parser.add_argument("--no-reference-flows", action="store_true", help="skip torchao pt2e and FX")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    report = run(args.batch_size, args.repeats, tuple(args.bits), not args.no_reference_flows)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
