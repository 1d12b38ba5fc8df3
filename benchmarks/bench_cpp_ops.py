"""pytest-benchmark: arq's compiled integer ops against their torch baselines, in the same run.

    pytest benchmarks/bench_cpp_ops.py --benchmark-json benchmarks/results/cpp_ops_<machine>.json

Groups (compare within a group only; each group's rows run back to back on the same machine):

* ``linear-M``: ``arq.packed_linear`` (int8 x 4-bit packed, fused scale + bias, float32 out; and requantized
  int8 out) vs dequantize + matmul (float32 activations times a float32 weight dequantized once, outside the
  timing) vs ``torch._int_mm`` (int8 x int8 -> int32, no epilogue), K = 512, N = 256.
* ``conv-M``: ``arq.packed_conv2d`` 3x3, 64 -> 64 channels, 16x16 NHWC images (M = B * 256 rows), 4-bit
  weights, bias + ReLU + requantize to uint8, vs float32 ``conv2d`` (channels_last) + bias + ReLU.
* ``votes-M``: ``arq.vote_count`` (features 64 -> 10 classes) vs ``F.linear`` + ``argmax`` + ``bincount``.
* ``requantize-t<threads>``, ``quantize-t<threads>``: ``arq::requantize_codes`` (uint8 -> uint8 codes) and
  ``arq::quantize_codes`` (float32 -> uint8 codes) vs the same float32 formula, eager and compiled.
* ``noise-<samples>-t<threads>``: ``arq::noisy_input`` (float32) and ``arq::noisy_input_codes`` (the first
  layer's uint8 NHWC codes) vs ``randn`` + add, and + normalize + quantize (eager and compiled), CIFAR images.
* ``lowbit-conv-<layer>-t<threads>``: ``arq::lowbit_conv2d`` vs oneDNN's u8 x s8 convolution on CIFAR
  ResNet layers (W4A4, 100 samples, uint8 codes in and out).

Rows M = 1024, 4096, 16384; 1 and 2 threads (groups ``<op>-<M>-t<threads>``). The CPU micro-kernel is whatever ``arq.ops.cpu_isa()`` reports (recorded in
``extra_info``).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from arq import ops
from arq._ext import compiled_ops_available

pytestmark = pytest.mark.skipif(not compiled_ops_available(), reason="arq._C not built")

ROWS = [1024, 4096, 16384]
BITS = 4
THREADS = [1, 2]  # on a busy shared host, 1 thread gives the steadier ratios


@pytest.fixture(params=THREADS, ids=lambda t: f"t{t}")
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def _quantized_weight(n, k, gen):
    qmax = (1 << (BITS - 1)) - 1
    q = torch.randint(-qmax, qmax + 1, (n, k), generator=gen, dtype=torch.int8)
    scales = torch.rand(n, generator=gen) * 0.01 + 0.001
    return q, scales


def _info(benchmark, **extra):
    benchmark.extra_info.update(cpu_isa=ops.cpu_isa(), threads=torch.get_num_threads(), **extra)


# ------------------------------------------------------------------------------------------- linear

LINEAR_IMPLS = ["arq_float_out", "arq_int8_out", "dequant_matmul", "int_mm"]


@pytest.mark.parametrize("impl", LINEAR_IMPLS)
@pytest.mark.parametrize("rows", ROWS)
def test_linear(benchmark, rows, impl, threads):
    k, n = 512, 256
    benchmark.group = f"linear-{rows}-t{threads}"
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(-128, 128, (rows, k), generator=gen, dtype=torch.int8)
    q, scales = _quantized_weight(n, k, gen)
    bias = torch.randn(n, generator=gen)
    packed = ops.pack_weights(q, BITS)
    x_scale = 0.02
    if impl == "arq_float_out":
        fn = lambda: torch.ops.arq.packed_linear(x, packed, BITS, scales, bias, x_scale, False, None, 0.0)  # noqa: E731
    elif impl == "arq_int8_out":
        fn = lambda: torch.ops.arq.packed_linear(x, packed, BITS, scales, bias, x_scale, False, None, 0.05)  # noqa: E731
    elif impl == "dequant_matmul":
        w = q.float() * scales[:, None]
        fn = lambda: torch.addmm(bias, x.float() * x_scale, w.T)  # noqa: E731
    else:
        fn = lambda: torch._int_mm(x, q.T)  # noqa: E731
    _info(benchmark, rows=rows, k=k, n=n, bits=BITS, macs=rows * k * n)
    benchmark(fn)


# ------------------------------------------------------------------------------------------- conv

CONV_IMPLS = ["arq_conv_uint8_out", "float_conv_channels_last"]


@pytest.mark.parametrize("impl", CONV_IMPLS)
@pytest.mark.parametrize("rows", ROWS)
def test_conv3x3(benchmark, rows, impl, threads):
    c = n = 64
    hw = 16
    batch = rows // (hw * hw)
    benchmark.group = f"conv-{rows}-t{threads}"
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (batch, hw, hw, c), generator=gen, dtype=torch.uint8)
    q, scales = _quantized_weight(n, 9 * c, gen)
    bias = torch.randn(n, generator=gen)
    if impl == "arq_conv_uint8_out":
        packed = ops.pack_weights(q, BITS)
        fn = lambda: torch.ops.arq.packed_conv2d(x, packed, BITS, scales, bias, 0.02, 3, 3, 1, 1, True, None, 0.05)  # noqa: E731
    else:
        w = (ops.matrix_to_conv_weight(q, (n, c, 3, 3)).float() * scales[:, None, None, None]).contiguous(
            memory_format=torch.channels_last)
        xf = x.permute(0, 3, 1, 2).float()  # NCHW view of NHWC memory: channels_last
        fn = lambda: torch.relu(F.conv2d(xf * 0.02, w, bias, padding=1))  # noqa: E731
    _info(benchmark, rows=rows, k=9 * c, n=n, bits=BITS, macs=rows * 9 * c * n)
    benchmark(fn)


# ------------------------------------------------------------------------------------------- votes

VOTE_IMPLS = ["arq_vote_count", "linear_argmax_bincount"]


@pytest.mark.parametrize("impl", VOTE_IMPLS)
@pytest.mark.parametrize("rows", ROWS)
def test_votes(benchmark, rows, impl, threads):
    d, classes = 64, 10
    benchmark.group = f"votes-{rows}-t{threads}"
    gen = torch.Generator().manual_seed(2)
    features, weight, bias = torch.randn(rows, d, generator=gen), torch.randn(classes, d, generator=gen), torch.randn(classes)
    if impl == "arq_vote_count":
        fn = lambda: torch.ops.arq.vote_count(features, weight, bias, classes)  # noqa: E731
    else:
        fn = lambda: torch.bincount(F.linear(features, weight, bias).argmax(1), minlength=classes)  # noqa: E731
    _info(benchmark, rows=rows, d=d, classes=classes)
    benchmark(fn)


# ------------------------------------------------------------------------------------------- requantize, quantize


def _op_or_formula(impl: str, op, formula, x):
    """What ``impl`` times: arq's ``op(x)`` ("arq_*"), or the same torch ``formula`` eager or through
    torch.compile; checked equal to the eager formula first."""
    if impl.startswith("arq_"):
        fn = lambda: op(x)  # noqa: E731
    else:
        run = torch.compile(formula, dynamic=False) if impl == "torch_compiled" else formula
        fn = lambda: run(x)  # noqa: E731
    assert torch.equal(fn(), formula(x))
    return fn


REQUANT_IMPLS = ["arq_requantize_codes", "arq_requantize_codes_avx2", "torch_compiled", "torch_eager"]


@pytest.mark.parametrize("impl", REQUANT_IMPLS)
def test_requantize(benchmark, impl, threads, monkeypatch):
    """A residual stream's uint8 codes into a 4-bit layer's codes ([100, 16, 32, 32] channels_last: one
    CIFAR ResNet stage-1 activation of a 100-sample chunk): arq's op (its best path: the 256-entry
    table on AVX-512 VBMI CPUs; ``_avx2``: its AVX2 division loop) against the same float32 formula
    eager and through torch.compile (what the compiled integer model would otherwise run)."""
    benchmark.group = f"requantize-t{threads}"
    if impl.endswith("_avx2"):
        monkeypatch.setenv("ARQ_CPU_ISA", "avx2")
    gen = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 256, (100, 16, 32, 32), generator=gen, dtype=torch.uint8)
    codes = codes.contiguous(memory_format=torch.channels_last)
    grid = (0.025692012, 0, 0.35294077, 0, 0, 15)
    fn = _op_or_formula(impl, lambda c: torch.ops.arq.requantize_codes(c, *grid),
                        lambda c: ops.requantize_codes_reference(c, *grid), codes)
    _info(benchmark, elements=codes.numel())
    benchmark(fn)


QUANTIZE_IMPLS = ["arq_quantize_codes", "torch_compiled", "torch_eager"]


@pytest.mark.parametrize("impl", QUANTIZE_IMPLS)
def test_quantize(benchmark, impl, threads):
    """Float32 activations into a 4-bit layer's uint8 codes ([100, 16, 32, 32] channels_last, as above):
    arq's one-pass op against the same float32 formula eager (what eager integer models ran before the
    op) and through torch.compile (what compiled integer models run, fused with what comes before)."""
    benchmark.group = f"quantize-t{threads}"
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(100, 16, 32, 32, generator=gen).contiguous(memory_format=torch.channels_last)
    quantizer = (0.35294077, 0, 0, 15)
    fn = _op_or_formula(impl, lambda v: torch.ops.arq.quantize_codes(v, *quantizer),
                        lambda v: ops.quantize_codes_reference(v, *quantizer), x)
    _info(benchmark, elements=x.numel())
    benchmark(fn)


NOISE_IMPLS = ["arq_noisy_input", "arq_noisy_input_codes", "torch_randn_add", "torch_randn_add_quantize",
               "torch_randn_add_quantize_compiled"]
NOISE_SAMPLES = [1024, 4096]
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)


@pytest.mark.parametrize("impl", NOISE_IMPLS)
@pytest.mark.parametrize("samples", NOISE_SAMPLES)
def test_noise(benchmark, samples, impl, threads):
    """Noisy copies of one CIFAR image (sigma 0.25): arq's counter-based sampler (float32 images,
    ``arq::noisy_input``; or the first layer's uint8 NHWC codes with the normalization and quantizer
    fused, ``arq::noisy_input_codes``, what the integer model reads) against torch's ``randn`` + add,
    and + normalize + quantize + channels_last (eager, and through torch.compile). arq's samples are a
    pure function of their counters, bit for bit on every backend; torch's are its generator's."""
    benchmark.group = f"noise-{samples}-t{threads}"
    from arq.smoothing.noise import InputCodes, noisy_codes_batch

    x = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(5))
    codes = InputCodes(CIFAR_MEAN, CIFAR_STD, 0.0213, 128, 0, 255)
    mean, std = (t.view(1, 3, 1, 1) for t in codes.tensors())
    scale = torch.tensor(codes.scale)
    fields = dict(seed=0, input_index=0, draw=1, sample_start=0, count=samples)

    def randn_add_quantize():
        noisy = x + 0.25 * torch.randn(samples, 3, 32, 32)
        codes_ = torch.clamp(torch.round((noisy - mean) / std / scale) + 128, 0, 255).to(torch.uint8)
        return codes_.contiguous(memory_format=torch.channels_last)

    if impl == "arq_noisy_input":
        fn = lambda: torch.ops.arq.noisy_input(x, 0.25, 0, 0, 1, 0, samples)  # noqa: E731
    elif impl == "arq_noisy_input_codes":
        fn = lambda: noisy_codes_batch(x, 0.25, codes, backend="cpp", **fields)  # noqa: E731
    elif impl == "torch_randn_add":
        fn = lambda: x + 0.25 * torch.randn(samples, 3, 32, 32)  # noqa: E731
    elif impl == "torch_randn_add_quantize":
        fn = randn_add_quantize
    else:
        fn = torch.compile(randn_add_quantize, dynamic=False)
    out = fn()
    assert out.shape == (samples, 3, 32, 32)
    _info(benchmark, samples=samples)
    benchmark.pedantic(fn, rounds=15, warmup_rounds=2, iterations=1)
    if benchmark.stats is not None:
        benchmark.extra_info["samples_per_s"] = samples / benchmark.stats.stats.median


LOWBIT_IMPLS = ["arq_lowbit_conv2d", "onednn_qconv2d"]
# CIFAR ResNet convolutions (in, size, out, kernel, stride) at a certification chunk of 100 samples
LOWBIT_LAYERS = [(16, 32, 16, 3, 1), (32, 16, 32, 3, 1), (64, 8, 64, 3, 1), (16, 32, 32, 3, 2), (16, 32, 32, 1, 2)]


@pytest.mark.parametrize("impl", LOWBIT_IMPLS)
@pytest.mark.parametrize("layer", LOWBIT_LAYERS, ids=lambda s: "c{}h{}o{}k{}s{}".format(*s))
def test_lowbit_conv(benchmark, layer, impl, threads):
    """A W4A4 layer, 4-bit uint8 codes in, the next layer's codes out (ReLU folded into the clamp):
    ``arq::lowbit_conv2d`` (int16 accumulation) against oneDNN's u8 x s8 convolution with the same
    epilogue (hardtanh post-op, uint8 out), what ``to_integer`` runs with ``conv_kernel="onednn"``."""
    channels, size, out_channels, kernel, stride = layer
    benchmark.group = "lowbit-conv-c{}h{}o{}k{}s{}-t{}".format(*layer, threads)
    gen = torch.Generator().manual_seed(5)
    x = torch.randint(0, 16, (100, channels, size, size), generator=gen, dtype=torch.uint8)
    x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randint(-8, 8, (out_channels, channels, kernel, kernel), generator=gen, dtype=torch.int8)
    w_scale = torch.rand(out_channels, generator=gen) * 0.01 + 0.01
    x_scale, out_scale, padding = 0.1, 0.2, kernel // 2
    if impl == "arq_lowbit_conv2d":
        tiles, sums = ops.lowbit_conv_weight_tiles(weight)
        scale = (torch.tensor(x_scale) * w_scale).float()
        fn = lambda: torch.ops.arq.lowbit_conv2d(x, tiles, sums, scale, None, out_channels, kernel, stride,  # noqa: E731
                                                 padding, 0, 15, 4, False, None, 0.0, 0, out_scale, 0, 0, 15)
    else:
        packed = torch.ops.onednn.qconv_prepack(weight, w_scale, x_scale, 0, [stride] * 2, [padding] * 2, [1, 1], 1,
                                                None)
        zero_points = torch.zeros(out_channels, dtype=torch.long)
        fn = lambda: torch.ops.onednn.qconv2d_pointwise(  # noqa: E731
            x, x_scale, 0, packed, w_scale, zero_points, None, [stride] * 2, [padding] * 2, [1, 1], 1, out_scale, 0,
            torch.uint8, "hardtanh", [0.0, 15 * out_scale], "")
    _info(benchmark, macs=100 * out_channels * channels * kernel * kernel * ((size + 2 * padding - kernel) // stride + 1) ** 2)
    benchmark(fn)


# CIFAR ResNet 3x3 layers at the end-to-end benchmark's batch of 400 samples (in, size, out, stride)
VNNI_LAYERS = [(16, 32, 16, 1), (32, 16, 32, 1), (64, 8, 64, 1), (16, 32, 32, 2)]


@pytest.mark.parametrize("impl", LOWBIT_IMPLS)
@pytest.mark.parametrize("epilogue", ["codes", "stream"])
@pytest.mark.parametrize("layer", VNNI_LAYERS, ids=lambda s: "c{}h{}o{}s{}".format(*s))
def test_lowbit_conv_w8a8(benchmark, layer, epilogue, impl, threads):
    """A W8A8 3x3 layer on 400 samples, 8-bit codes in, the next layer's codes out: with ``epilogue``
    "codes" plain (ReLU folded into the clamp), with "stream" adding the 8-bit residual stream's codes
    first (a ResNet block's second convolution). ``arq::lowbit_conv2d`` (on AVX-512 VNNI hosts its
    ``vpdpbusd`` path; elsewhere it refuses 8 x 8 bits and the case skips) against the oneDNN call
    ``to_integer`` makes for the same layer: ``qconv2d_pointwise`` with a hardtanh post-op, or
    ``qconv2d_pointwise.binary`` with the sum post-op into the stream's buffer and ReLU."""
    if impl == "arq_lowbit_conv2d" and not ops.lowbit_conv_supported(255, 8):
        pytest.skip("8 x 8 bits need arq::lowbit_conv2d's VNNI path")
    channels, size, out_channels, stride = layer
    benchmark.group = "lowbit-conv-w8a8-{}-c{}h{}o{}s{}-t{}".format(epilogue, *layer, threads)
    gen = torch.Generator().manual_seed(6)
    batch, out_size = 400, size // stride
    x = torch.randint(0, 256, (batch, channels, size, size), generator=gen, dtype=torch.uint8)
    x = x.contiguous(memory_format=torch.channels_last)
    stream = torch.randint(0, 256, (batch, out_channels, out_size, out_size), generator=gen, dtype=torch.uint8)
    stream = stream.contiguous(memory_format=torch.channels_last)
    weight = torch.randint(-127, 128, (out_channels, channels, 3, 3), generator=gen, dtype=torch.int8)
    w_scale = torch.rand(out_channels, generator=gen) * 0.001 + 0.001
    bias = torch.randn(out_channels, generator=gen)
    x_scale, out_scale, stream_scale = 0.02, 0.05, 0.05
    if impl == "arq_lowbit_conv2d":
        tiles, sums = ops.lowbit_conv_weight_tiles(weight)
        scale = (torch.tensor(x_scale) * w_scale).float()
        residual = (stream, stream_scale) if epilogue == "stream" else (None, 0.0)
        fn = lambda: torch.ops.arq.lowbit_conv2d(x, tiles, sums, scale, bias, out_channels, 3, stride, 1,  # noqa: E731
                                                 0, 255, 8, True, residual[0], residual[1], 0, out_scale, 0, 0, 255)
    else:
        packed = torch.ops.onednn.qconv_prepack(weight, w_scale, x_scale, 0, [stride] * 2, [1, 1], [1, 1], 1, None)
        zero_points = torch.zeros(out_channels, dtype=torch.long)
        if epilogue == "stream":
            fn = lambda: torch.ops.onednn.qconv2d_pointwise.binary(  # noqa: E731
                x, x_scale, 0, packed, w_scale, zero_points, stream, bias, [stride] * 2, [1, 1], [1, 1], 1,
                out_scale, 0, torch.uint8, stream_scale, 0, "sum", 1.0, "relu", [], "")
        else:
            fn = lambda: torch.ops.onednn.qconv2d_pointwise(  # noqa: E731
                x, x_scale, 0, packed, w_scale, zero_points, bias, [stride] * 2, [1, 1], [1, 1], 1, out_scale, 0,
                torch.uint8, "hardtanh", [0.0, 255 * out_scale], "")
    _info(benchmark, macs=batch * out_channels * channels * 9 * out_size ** 2)
    benchmark.pedantic(fn, rounds=200, warmup_rounds=5, iterations=1)
