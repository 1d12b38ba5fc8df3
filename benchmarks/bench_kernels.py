"""arq_kernels against their torch baselines, at certification batch sizes (1k-16k samples).

Every case times one GPU op (``torch.cuda.synchronize`` inside the timed call), grouped so that
pytest-benchmark prints each Triton kernel beside its baselines from the same run:

* ``noise-<n>``: ``x + sigma * randn`` (+ round/clamp to int8) in torch vs ``noisy_input``
  (counter-based float64 Box-Muller, fused add and format, float32 / int8 NHWC output); and a first
  layer's input codes, ``randn`` + add + normalize + quantize + NHWC in torch vs ``noisy_input`` with
  ``mean``/``std``.
* ``linear-<bits>b-<m>``: packed 2-8 bit weights x int8 activations (``packed_linear``, fused
  requantization) vs dequantize + float32 matmul, fp16 matmul, ``torch._int_mm`` (int8, no
  epilogue) on already unpacked weights.
* ``conv-<layer>-<bits>b-<n>``: NHWC implicit GEMM (``packed_conv2d``) vs cuDNN fp16
  channels_last and float32 (TF32) convolution of the dequantized weight.
* ``quantize-<n>``: a packed layer's input codes, torch (divide, round, clamp, cast) vs ``quantize_nhwc``.
* ``votes-<classes>-<n>``: ``vote_count`` (int8 and fp16 features) / ``argmax_count`` vs
  ``F.linear + argmax + bincount``.

Run on a GPU:  ``pytest benchmarks/bench_kernels.py --benchmark-only --benchmark-group-by=group``
Without CUDA every case is skipped (the CPU interpreter's timings mean nothing).
"""
from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="Triton is not installed (pip install 'arq[triton]')")

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

BATCHES = [1024, 4096, 16384]
SIGMA = 0.25


def _run(benchmark, group: str, fn, samples: int, rounds: int = 20):
    """Time ``fn`` (synchronized), record samples/s; returns fn's last result."""
    benchmark.group = group

    def timed():
        result = fn()
        torch.cuda.synchronize()
        return result

    result = benchmark.pedantic(timed, rounds=rounds, warmup_rounds=3, iterations=1)
    if benchmark.stats is not None:
        benchmark.extra_info["samples_per_s"] = samples / benchmark.stats.stats.median
    return result


def _quantize_int8(y, scale):
    return torch.clamp(torch.round(y / scale), -127, 127).to(torch.int8)


# ------------------------------------------------------------------------------------------------
# noise
# ------------------------------------------------------------------------------------------------

NOISE_VARIANTS = ["torch_randn_fp32", "torch_randn_int8", "triton_fp32", "triton_int8_nhwc",
                  "torch_randn_normalize_int8_nhwc", "triton_normalize_int8_nhwc"]
CIFAR_MEAN, CIFAR_STD = [0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.2010]


@pytest.mark.parametrize("count", BATCHES)
@pytest.mark.parametrize("variant", NOISE_VARIANTS)
def test_noise(benchmark, variant, count):
    from arq_kernels.noise import noisy_input

    x = torch.rand(3, 32, 32, device="cuda")
    fields = dict(seed=0, input_index=0, draw=1, sample_start=0, count=count)
    if variant == "torch_randn_fp32":
        fn = lambda: x + SIGMA * torch.randn(count, *x.shape, device="cuda")  # noqa: E731
    elif variant == "torch_randn_int8":
        fn = lambda: _quantize_int8(x + SIGMA * torch.randn(count, *x.shape, device="cuda"), 0.02)  # noqa: E731
    elif variant == "triton_fp32":
        fn = lambda: noisy_input(x, SIGMA, **fields)  # noqa: E731
    elif variant == "triton_int8_nhwc":
        fn = lambda: noisy_input(x, SIGMA, out_dtype=torch.int8, out_scale=0.02, layout="nhwc", **fields)  # noqa: E731
    else:
        # a first layer's input codes: noise, the model's normalization, its quantizer, NHWC
        mean = torch.tensor(CIFAR_MEAN, device="cuda")
        std = torch.tensor(CIFAR_STD, device="cuda")
        if variant == "torch_randn_normalize_int8_nhwc":
            def fn():
                noisy = x + SIGMA * torch.randn(count, *x.shape, device="cuda")
                normalized = (noisy - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
                return _quantize_int8(normalized, 0.02).permute(0, 2, 3, 1).contiguous()
        else:
            fn = lambda: noisy_input(x, SIGMA, out_dtype=torch.int8, out_scale=0.02, layout="nhwc",  # noqa: E731
                                     mean=mean, std=std, **fields)
    _run(benchmark, f"noise-{count}", fn, count)


# ------------------------------------------------------------------------------------------------
# packed linear
# ------------------------------------------------------------------------------------------------

LINEAR_VARIANTS = ["dequant_matmul_fp32", "matmul_fp16", "torch_int_mm", "triton_packed"]


@pytest.mark.parametrize("m", [1024, 16384])
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("variant", LINEAR_VARIANTS)
def test_packed_linear(benchmark, variant, bits, m):
    from arq_kernels.packed_matmul import pack_weights, packed_linear, unpack_weights

    k, n = 1024, 512
    generator = torch.Generator().manual_seed(bits)
    limit = (1 << (bits - 1)) - 1
    q = torch.randint(-limit, limit + 1, (n, k), generator=generator, dtype=torch.int8)
    packed = pack_weights(q, bits).cuda()
    scales = (torch.rand(n, generator=generator) * 0.01).cuda()
    bias = torch.randn(n, generator=generator).cuda()
    x = torch.randint(-127, 128, (m, k), generator=generator, dtype=torch.int8).cuda()
    x_scale = 0.02
    if variant == "dequant_matmul_fp32":
        def fn():
            w = unpack_weights(packed, bits, k).float() * scales[:, None]
            return torch.relu((x.float() * x_scale) @ w.T + bias)
    elif variant == "matmul_fp16":
        w16 = (q.cuda().half() * scales[:, None].half())
        x16 = x.half() * x_scale
        fn = lambda: torch.relu(x16 @ w16.T + bias.half())  # noqa: E731
    elif variant == "torch_int_mm":
        q_cuda = q.cuda()
        fn = lambda: torch._int_mm(x, q_cuda.T)  # noqa: E731 - [K, N] column-major, as cuBLASLt wants
    else:
        fn = lambda: packed_linear(x, packed, bits, scales, bias, x_scale=x_scale, relu=True, out_scale=0.05)  # noqa: E731
    _run(benchmark, f"linear-{bits}b-{m}", fn, m)


# ------------------------------------------------------------------------------------------------
# packed conv (ResNet-20 layers, CIFAR-10)
# ------------------------------------------------------------------------------------------------

CONV_LAYERS = {  # name: (H, W, C, N, kernel, stride, padding)
    "stage1_3x3": (32, 32, 16, 16, 3, 1, 1),
    "stage3_3x3": (8, 8, 64, 64, 3, 1, 1),
    "down_1x1": (16, 16, 32, 64, 1, 2, 0),
}
# triton_packed: int8 codes out (ReLU, requantized: the epilogue divides by the output scale); the
# next two time the same kernel without that division, to show what the requantization costs on the
# card: triton_packed_f16out writes float16 (scale, bias, ReLU), triton_packed_raw the int32
# accumulator alone (no epilogue arithmetic, four bytes an output). The _rows variants run the same
# two through the row loop with the unpacked int8 weights (ARQ_TRITON_CONV_LOOP=rows, the A/B of
# arq_kernels.packed_conv's two K loops)
CONV_VARIANTS = ["cudnn_fp16_nhwc", "cudnn_fp32_dequant", "triton_packed", "triton_packed_f16out", "triton_packed_raw",
                 "triton_packed_rows", "triton_packed_rows_raw"]


@pytest.mark.parametrize("batch", [1024, 4096])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("layer", list(CONV_LAYERS))
@pytest.mark.parametrize("variant", CONV_VARIANTS)
def test_packed_conv(benchmark, variant, layer, bits, batch):
    from arq_kernels._common import pick_config, width_buckets
    from arq_kernels.packed_conv import packed_conv2d
    from arq_kernels.packed_matmul import pack_weights

    h, w, c, n, ks, stride, pad = CONV_LAYERS[layer]
    generator = torch.Generator().manual_seed(bits)
    limit = (1 << (bits - 1)) - 1
    q = torch.randint(-limit, limit + 1, (n, c, ks, ks), generator=generator, dtype=torch.int8)
    q_matrix = q.permute(0, 2, 3, 1).reshape(n, -1).contiguous()  # (kh, kw, c) order
    packed = pack_weights(q_matrix, bits).cuda()
    scales = (torch.rand(n, generator=generator) * 0.01).cuda()
    bias = torch.randn(n, generator=generator).cuda()
    x = torch.randint(-127, 128, (batch, h, w, c), generator=generator, dtype=torch.int8).cuda()
    weight = q.cuda().float() * scales[:, None, None, None]
    if variant == "cudnn_fp16_nhwc":
        x16 = (x.permute(0, 3, 1, 2).half() * 0.02).contiguous(memory_format=torch.channels_last)
        w16 = weight.half().contiguous(memory_format=torch.channels_last)
        fn = lambda: torch.relu(F.conv2d(x16, w16, bias.half(), stride=stride, padding=pad))  # noqa: E731
    elif variant == "cudnn_fp32_dequant":
        def fn():
            xf = x.permute(0, 3, 1, 2).float() * 0.02
            return _quantize_int8(torch.relu(F.conv2d(xf, weight, bias, stride=stride, padding=pad)), 0.05)
    elif variant == "triton_packed_f16out":
        fn = lambda: packed_conv2d(x, packed, bits, scales, bias, kernel_size=ks, stride=stride,  # noqa: E731
                                   padding=pad, relu=True, x_scale=0.02, out_dtype=torch.float16)
    elif variant == "triton_packed_raw":
        fn = lambda: packed_conv2d(x, packed, bits, scales, kernel_size=ks, stride=stride,  # noqa: E731
                                   padding=pad, out_dtype=torch.int32)
    elif variant.startswith("triton_packed_rows"):
        rows = {**pick_config("packed_conv", x.device, width_buckets(n)), "LOOP": "rows"}
        q8 = q_matrix.cuda()
        if variant == "triton_packed_rows_raw":
            fn = lambda: packed_conv2d(x, packed, bits, scales, kernel_size=ks, stride=stride,  # noqa: E731
                                       padding=pad, out_dtype=torch.int32, config=rows, int8_weight=q8)
        else:
            fn = lambda: packed_conv2d(x, packed, bits, scales, bias, kernel_size=ks, stride=stride,  # noqa: E731
                                       padding=pad, relu=True, x_scale=0.02, out_scale=0.05, config=rows,
                                       int8_weight=q8)
    else:
        fn = lambda: packed_conv2d(x, packed, bits, scales, bias, kernel_size=ks, stride=stride,  # noqa: E731
                                   padding=pad, relu=True, x_scale=0.02, out_scale=0.05)
    _run(benchmark, f"conv-{layer}-{bits}b-{batch}", fn, batch)


# ------------------------------------------------------------------------------------------------
# quantize: a packed layer's input codes
# ------------------------------------------------------------------------------------------------

QUANTIZE_VARIANTS = ["torch_codes_nhwc", "triton_quantize_nhwc"]


@pytest.mark.parametrize("batch", [1024, 4096])
@pytest.mark.parametrize("variant", QUANTIZE_VARIANTS)
def test_quantize(benchmark, variant, batch):
    """A stage-1 ResNet activation (16 x 32 x 32, channels_last float32) to 8-bit unsigned codes as
    int8 NHWC (zero point -128): torch's divide, round, clamp, shift, cast vs one Triton pass."""
    from arq_kernels.quantize import quantize_nhwc

    x = torch.rand(batch, 16, 32, 32, device="cuda").contiguous(memory_format=torch.channels_last) * 4
    scale = torch.tensor(4 / 255, device="cuda")
    if variant == "torch_codes_nhwc":
        fn = lambda: (torch.clamp(torch.round(x / scale), 0, 255) - 128).to(torch.int8).permute(0, 2, 3, 1)  # noqa: E731
    else:
        fn = lambda: quantize_nhwc(x, 4 / 255, 0, 255, -128)  # noqa: E731
    _run(benchmark, f"quantize-{batch}", fn, batch)


# ------------------------------------------------------------------------------------------------
# votes
# ------------------------------------------------------------------------------------------------

VOTE_VARIANTS = ["torch_linear_argmax_bincount", "triton_vote_count_int8", "triton_vote_count_fp16", "triton_argmax_count"]


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("classes, features", [(10, 64), (1000, 2048)])
@pytest.mark.parametrize("variant", VOTE_VARIANTS)
def test_votes(benchmark, variant, classes, features, batch):
    from arq_kernels.votes import argmax_count, vote_count

    generator = torch.Generator().manual_seed(classes)
    x8 = torch.randint(-127, 128, (batch, features), generator=generator, dtype=torch.int8).cuda()
    w8 = torch.randint(-127, 128, (classes, features), generator=generator, dtype=torch.int8).cuda()
    w_scale = (torch.rand(classes, generator=generator) * 0.01).cuda()
    bias = torch.randn(classes, generator=generator).cuda()
    x16 = x8.half() * 0.02
    w16 = (w8.float() * w_scale[:, None]).half()
    if variant == "torch_linear_argmax_bincount":
        fn = lambda: torch.bincount(F.linear(x16, w16, bias.half()).argmax(1), minlength=classes)  # noqa: E731
    elif variant == "triton_vote_count_int8":
        fn = lambda: vote_count(x8, w8, bias, classes, feature_scale=0.02, weight_scale=w_scale)  # noqa: E731
    elif variant == "triton_vote_count_fp16":
        fn = lambda: vote_count(x16, w16, bias, classes)  # noqa: E731
    else:
        logits = F.linear(x16, w16, bias.half())
        fn = lambda: argmax_count(logits, classes)  # noqa: E731
    _run(benchmark, f"votes-{classes}-{batch}", fn, batch)


# ------------------------------------------------------------------------------------------------
# tuning: time each module's CANDIDATES on this GPU, print the best as configs/*.json entries
# ------------------------------------------------------------------------------------------------


def tune(batch: int = 4096, which: str = "all") -> dict:
    """``{family: {device_name: {bucket: best_config}}}`` measured with triton.testing.do_bench.

    The packed convolution is tuned per width bucket on the CIFAR ResNet layer of that width
    (``arq_kernels._common.width_buckets``: n16 = stage 1, n32 = stage 2, small_n = stage 3, each
    3x3 over ``batch // 4`` images, 4-bit weights, chained int8 output). Merge the entries into
    ``arq_kernels/configs/<family>.json`` (the kernels read them by ``torch.cuda.get_device_name()``).
    ``which="rows"`` tunes only the row loop (``packed_conv.ROWS_CANDIDATES`` with the layers' int8
    weights, as ``PackedConv2d`` runs it), as ``rows_<bucket>`` entries.
    """
    from triton.testing import do_bench

    from arq_kernels import noise, packed_conv, packed_matmul, quantize, votes

    generator = torch.Generator().manual_seed(0)
    x = torch.rand(3, 32, 32, device="cuda")
    x8 = torch.randint(-127, 128, (batch, 1024), generator=generator, dtype=torch.int8).cuda()
    q = torch.randint(-7, 8, (512, 1024), generator=generator, dtype=torch.int8)
    packed4 = packed_matmul.pack_weights(q, 4).cuda()
    scales = torch.rand(512, generator=generator).cuda() * 0.01
    feats = torch.randint(-127, 128, (batch, 64), generator=generator, dtype=torch.int8).cuda()
    w_last = torch.randint(-127, 128, (10, 64), generator=generator, dtype=torch.int8).cuda()
    activations = torch.rand(batch // 4, 16, 32, 32, device="cuda").contiguous(memory_format=torch.channels_last)

    def conv_case(size, channels, rows=False):
        xc = torch.randint(-127, 128, (batch // 4, size, size, channels), generator=generator, dtype=torch.int8).cuda()
        qc = torch.randint(-7, 8, (channels, 9 * channels), generator=generator, dtype=torch.int8)
        packed_c = packed_matmul.pack_weights(qc, 4).cuda()
        int8_weight = qc.cuda() if rows else None
        return lambda cfg: packed_conv.packed_conv2d(xc, packed_c, 4, scales[:channels], kernel_size=3, padding=1,
                                                     relu=True, out_scale=0.05, config=cfg, int8_weight=int8_weight)

    cases = {
        ("noise", "default"): (noise.CANDIDATES, lambda cfg: noise.noisy_input(
            x, SIGMA, seed=0, input_index=0, draw=1, sample_start=0, count=batch, out_dtype=torch.int8,
            out_scale=0.02, layout="nhwc", config=cfg)),
        ("packed_matmul", "default"): (packed_matmul.CANDIDATES, lambda cfg: packed_matmul.packed_linear(
            x8, packed4, 4, scales, relu=True, out_scale=0.05, config=cfg)),
        ("packed_conv", "n16"): (packed_conv.CANDIDATES, conv_case(32, 16)),
        ("packed_conv", "n32"): (packed_conv.CANDIDATES, conv_case(16, 32)),
        ("packed_conv", "small_n"): (packed_conv.CANDIDATES, conv_case(8, 64)),
        ("quantize", "default"): (quantize.CANDIDATES, lambda cfg: quantize.quantize_nhwc(
            activations, 4 / 255, 0, 255, -128, config=cfg)),
        ("votes", "default"): (votes.CANDIDATES, lambda cfg: votes.vote_count(
            feats, w_last, None, 10, feature_scale=0.02, weight_scale=scales[:10], config=cfg)),
    }
    rows_cases = {("packed_conv", f"rows_{bucket}"): (packed_conv.ROWS_CANDIDATES, conv_case(size, channels, rows=True))
                  for bucket, size, channels in (("n16", 32, 16), ("n32", 16, 32), ("small_n", 8, 64))}
    cases = rows_cases if which == "rows" else {**cases, **rows_cases} if which == "all" else cases
    name = torch.cuda.get_device_name()
    best: dict = {}
    for (family, bucket), (candidates, run) in cases.items():
        timings = []
        for cfg in candidates:
            try:
                timings.append((do_bench(lambda: run(cfg)), cfg))
            except Exception as error:  # noqa: BLE001 - a config may not fit this GPU
                print(f"{family}/{bucket} {cfg}: {type(error).__name__}", file=sys.stderr)
        timings.sort(key=lambda item: item[0])
        for ms, cfg in timings:
            print(f"{family:14s} {bucket:8s} {ms * 1e3:9.1f} us  {cfg}", file=sys.stderr)
        if timings:
            best.setdefault(family, {name: {}})[name][bucket] = {**timings[0][1], "measured_us": round(timings[0][0] * 1e3, 2)}
    return best


if __name__ == "__main__":  # python -m benchmarks.bench_kernels OUT.json [all|rows|shared]  (progress on stderr)
    import json

    if not torch.cuda.is_available():
        sys.exit("tuning needs a CUDA device")
    result = tune(which=sys.argv[2] if len(sys.argv) > 2 else "all")  # "all", "rows" or "shared"
    with open(sys.argv[1], "w", encoding="utf-8") if len(sys.argv) > 1 else sys.stdout as handle:
        json.dump(result, handle, indent=1)
