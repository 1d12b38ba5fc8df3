"""The compiled integer ops (torch.ops.arq.packed_linear / packed_conv2d / vote_count) against their references.

Integer and requantized outputs must be equal; float32 outputs too (the reference applies the epilogue in the
same float32 order, see arq/ops.py). Every CPU micro-kernel the machine supports is run (ARQ_CPU_ISA).
"""
from __future__ import annotations

import importlib.util
import itertools
import os
import sys

import pytest
import torch

from arq import _ext, ops
from arq._ext import compiled_ops_available, cuda_ops_available
from arq.quant import packing

pytestmark = pytest.mark.skipif(not compiled_ops_available(), reason="arq._C not built")

ISAS = ("vnni", "avx2", "scalar")


def _supported_isas(monkeypatch):
    monkeypatch.delenv("ARQ_CPU_ISA", raising=False)
    monkeypatch.delenv("ARQ_DISABLE_VNNI", raising=False)
    best = ops.cpu_isa()
    return [isa for isa in ISAS if ISAS.index(best) <= ISAS.index(isa)]


def _set_isa(monkeypatch, isa):
    monkeypatch.setenv("ARQ_CPU_ISA", isa)
    monkeypatch.delenv("ARQ_DISABLE_VNNI", raising=False)
    if ops.cpu_isa() != isa:
        pytest.skip(f"this CPU has no {isa} path (best: {ops.cpu_isa()})")


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    monkeypatch.delenv("ARQ_CPU_ISA", raising=False)
    monkeypatch.delenv("ARQ_DISABLE_VNNI", raising=False)
    _set_isa(monkeypatch, request.param)
    return request.param


def _random_q(n, k, bits, gen, extreme=False):
    qmax = (1 << (bits - 1)) - 1
    if extreme:
        return (torch.randint(0, 2, (n, k), generator=gen) * 2 - 1).to(torch.int8) * qmax
    return torch.randint(-qmax, qmax + 1, (n, k), generator=gen, dtype=torch.int8)


def _random_x(shape, dtype, gen):
    if dtype == torch.uint8:
        return torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)
    return torch.randint(-128, 128, shape, generator=gen, dtype=torch.int8)


def _epilogue_args(n, out_shape, options, gen):
    bias = torch.randn(n, generator=gen) if "bias" in options else None
    residual = torch.randn(out_shape, generator=gen) * 4 if "residual" in options else None
    return dict(
        bias=bias,
        residual=residual,
        relu="relu" in options,
        out_scale=0.37 if "requant" in options else 0.0,
        scales=torch.rand(n, generator=gen) * 0.05 + 0.001,
        x_scale=0.0173,
    )


def _assert_same(actual, expected):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    if actual.is_floating_point():
        assert not torch.isnan(actual).any()
    mismatches = (actual != expected).sum().item()
    assert mismatches == 0, f"{mismatches} of {actual.numel()} elements differ"


EPILOGUES = [(), ("bias",), ("bias", "relu", "requant"), ("bias", "residual", "relu"), ("residual", "requant")]


# ------------------------------------------------------------------------------------------- packing


def test_pack_format_is_the_quantizers():
    assert ops.pack_weights is packing.pack_weights and ops.unpack_weights is packing.unpack_weights
    q = torch.zeros(1, 8, dtype=torch.int8)
    q[0, :8] = torch.tensor([1, -1, 0, 0, 0, 0, 0, 7])
    assert ops.pack_weights(q, 4).item() == 0x700000F1  # docs/design.md example


# ------------------------------------------------------------------------------------------- packed_linear


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("x_dtype", [torch.int8, torch.uint8])
def test_packed_linear_matches_reference(isa, bits, x_dtype):
    gen = torch.Generator().manual_seed(1000 * bits + (x_dtype == torch.uint8))
    m, k, n = 37, 67 + 2 * bits, 45  # odd; K not a multiple of the pack factor nor of 4; N not of 32
    x = _random_x((m, k), x_dtype, gen)
    packed = ops.pack_weights(_random_q(n, k, bits, gen), bits)
    for options in EPILOGUES:
        args = _epilogue_args(n, (m, n), options, gen)
        scales = args.pop("scales")
        out = torch.ops.arq.packed_linear(x, packed, bits, scales, args["bias"], args["x_scale"], args["relu"],
                                          args["residual"], args["out_scale"])
        ref = ops.packed_linear_reference(x, packed, bits, scales, **args)
        _assert_same(out, ref)


@pytest.mark.parametrize("x_dtype", [torch.int8, torch.uint8])
def test_packed_linear_accumulators_exact_at_extremes(isa, x_dtype):
    # |x| and |q| at their maxima over a long K: the int32 accumulator (read back through unit scales as
    # float32, exact below 2^24) must equal the int64 sum.
    gen = torch.Generator().manual_seed(7)
    m, k, n, bits = 13, 1029, 33, 8
    fill = -128 if x_dtype == torch.int8 else 255
    x = torch.full((m, k), fill, dtype=x_dtype)
    x[1::2] = _random_x((m // 2, k), x_dtype, gen)
    q = _random_q(n, k, bits, gen, extreme=True)
    out = torch.ops.arq.packed_linear(x, ops.pack_weights(q, bits), bits, torch.ones(n), None, 1.0, False, None, 0.0)
    exact = x.to(torch.int64) @ q.to(torch.int64).T
    assert torch.equal(out.to(torch.int64), exact)


@pytest.mark.parametrize("bits", [7, 8])
def test_packed_linear_most_negative_field(isa, bits):
    # the format can hold -2^(b-1) (the quantizer never writes it): 255 * -64 pairs still fit maddubs' int16
    per_word = 32 // bits
    k, n = per_word * 41, 3
    word = sum((1 << (bits - 1)) << (j * bits) for j in range(per_word))
    word = word - (1 << 32) if word >= 1 << 31 else word
    packed = torch.full((n, k // per_word), word, dtype=torch.int32)
    x = torch.full((5, k), 255, dtype=torch.uint8)
    out = torch.ops.arq.packed_linear(x, packed, bits, torch.ones(n), None, 1.0, False, None, 0.0)
    assert torch.equal(out, torch.full((5, n), float(255 * k * -(1 << (bits - 1)))))


def test_packed_linear_larger_blocks_and_batch_dims(isa):
    # several row blocks and column panels (both parallel splits), leading batch dims
    gen = torch.Generator().manual_seed(11)
    bits, k, n = 4, 261, 97
    x = _random_x((3, 211, k), torch.int8, gen)
    packed = ops.pack_weights(_random_q(n, k, bits, gen), bits)
    args = _epilogue_args(n, (3, 211, n), ("bias", "residual", "relu", "requant"), gen)
    scales = args.pop("scales")
    out = ops.packed_linear(x, packed, bits, scales, backend="cpp", **args)
    _assert_same(out, ops.packed_linear_reference(x, packed, bits, scales, **args))


def test_all_isas_agree(monkeypatch):
    isas = _supported_isas(monkeypatch)
    if len(isas) < 2:
        pytest.skip("only the portable micro-kernel runs on this CPU")
    gen = torch.Generator().manual_seed(5)
    k, n = 301, 71
    x = _random_x((53, k), torch.int8, gen)
    packed = ops.pack_weights(_random_q(n, k, 3, gen), 3)
    outs = {}
    for isa in isas:
        monkeypatch.setenv("ARQ_CPU_ISA", isa)
        outs[isa] = torch.ops.arq.packed_linear(x, packed, 3, torch.ones(n), None, 1.0, False, None, 0.0)
    for isa in isas:
        assert torch.equal(outs[isa], outs[isas[-1]]), isa
    monkeypatch.delenv("ARQ_CPU_ISA")
    monkeypatch.setenv("ARQ_DISABLE_VNNI", "1")
    assert ops.cpu_isa() != "vnni"


def test_packed_linear_empty_shapes():
    packed = ops.pack_weights(torch.zeros(4, 10, dtype=torch.int8), 4)
    out = torch.ops.arq.packed_linear(torch.zeros(0, 10, dtype=torch.int8), packed, 4, torch.ones(4), None, 1.0,
                                      False, None, 0.0)
    assert out.shape == (0, 4)
    empty_k = torch.zeros(3, 0, dtype=torch.int32)
    out = torch.ops.arq.packed_linear(torch.zeros(2, 0, dtype=torch.uint8), empty_k, 4, torch.ones(3),
                                      torch.full((3,), 2.0), 1.0, False, None, 0.0)
    assert torch.equal(out, torch.full((2, 3), 2.0))


def test_packed_linear_rejects_bad_inputs():
    packed = ops.pack_weights(torch.zeros(4, 10, dtype=torch.int8), 4)
    with pytest.raises(RuntimeError, match="int8 or uint8"):
        torch.ops.arq.packed_linear(torch.zeros(2, 10), packed, 4, torch.ones(4), None, 1.0, False, None, 0.0)
    with pytest.raises(RuntimeError, match="words a row"):
        torch.ops.arq.packed_linear(torch.zeros(2, 17, dtype=torch.int8), packed, 4, torch.ones(4), None, 1.0,
                                    False, None, 0.0)
    with pytest.raises(RuntimeError, match="scales"):
        torch.ops.arq.packed_linear(torch.zeros(2, 10, dtype=torch.int8), packed, 4, torch.ones(3), None, 1.0,
                                    False, None, 0.0)


# ------------------------------------------------------------------------------------------- packed_conv2d

CONV_CASES = list(itertools.product([1, 3], [1, 2], [0, 1], [torch.int8, torch.uint8]))


@pytest.mark.parametrize("case", range(len(CONV_CASES)))
def test_packed_conv2d_matches_reference(isa, case):
    kernel, stride, padding, x_dtype = CONV_CASES[case]
    bits = 2 + case % 7  # every width 2..8 across the cases
    gen = torch.Generator().manual_seed(case)
    b, h, w, c, n = 2, 7, 9, 5, 19  # odd H, W, C, N
    x = _random_x((b, h, w, c), x_dtype, gen)
    q = _random_q(n, kernel * kernel * c, bits, gen)
    packed = ops.pack_weights(q, bits)
    oh, ow = (h + 2 * padding - kernel) // stride + 1, (w + 2 * padding - kernel) // stride + 1
    options = EPILOGUES[case % len(EPILOGUES)]
    args = _epilogue_args(n, (b, oh, ow, n), options, gen)
    scales = args.pop("scales")
    geometry = dict(kernel_h=kernel, kernel_w=kernel, stride=stride, padding=padding)
    out = ops.packed_conv2d(x, packed, bits, scales, backend="cpp", **geometry, **args)
    ref = ops.packed_conv2d_reference(x, packed, bits, scales, **geometry, **args)
    _assert_same(out, ref)


def test_packed_conv2d_agrees_with_float_conv_on_unpacked_weight():
    # independent check of the (kh, kw, c) order: a float NCHW conv of the dequantized weight
    gen = torch.Generator().manual_seed(3)
    q = _random_q(6, 3 * 3 * 4, 5, gen).reshape(6, 3, 3, 4).permute(0, 3, 1, 2).contiguous()  # [N, C, KH, KW]
    packed = packing.pack_layer_weight(q, 5)
    x = _random_x((1, 6, 5, 4), torch.int8, gen)
    out = ops.packed_conv2d(x, packed, 5, torch.ones(6), None, 1.0, 3, 3, 1, 1, backend="cpp")
    expected = torch.nn.functional.conv2d(x.permute(0, 3, 1, 2).double(), q.double(), padding=1).permute(0, 2, 3, 1)
    assert torch.equal(out.double(), expected)


# ------------------------------------------------------------------------------------------- vote_count


@pytest.mark.parametrize("d,classes,with_bias", [(37, 10, True), (64, 3, False), (5, 37, True)])
def test_vote_count_exact_on_integer_data(d, classes, with_bias):
    # small integers: every float32 product and sum is exact, so the logits (and their ties) are the reference's
    gen = torch.Generator().manual_seed(d * classes)
    features = torch.randint(-3, 4, (1001, d), generator=gen).float()
    weight = torch.randint(-2, 3, (classes, d), generator=gen).float()
    bias = torch.randint(-2, 3, (classes,), generator=gen).float() if with_bias else None
    counts = ops.vote_count(features, weight, bias, classes, backend="cpp")
    assert counts.dtype == torch.int64 and counts.shape == (classes,)
    assert torch.equal(counts, ops.vote_count_reference(features, weight, bias, classes))
    assert counts.sum().item() == 1001


def test_vote_count_random_floats_close():
    gen = torch.Generator().manual_seed(0)
    features, weight, bias = torch.randn(4000, 129, generator=gen), torch.randn(10, 129, generator=gen), torch.randn(10)
    counts = ops.vote_count(features, weight, bias, 10, backend="cpp")
    ref = ops.vote_count_reference(features, weight, bias, 10)
    assert counts.sum() == 4000 and (counts - ref).abs().sum() <= 4  # only float32 near-ties may move


def test_vote_count_nan_is_the_maximum():
    features = torch.ones(6, 3)
    weight = torch.tensor([[1.0, 0, 0], [2.0, 0, 0], [2.0, 0, 0], [0, 0, 0]])
    features[1, 0] = float("nan")   # every logit NaN: class 0
    weight_nan = weight.clone()
    counts = ops.vote_count(features, weight, None, 4, backend="cpp")
    assert counts.tolist() == [1, 5, 0, 0]  # tie between classes 1 and 2 goes to 1
    weight_nan[2, 1] = float("nan")     # class 2 NaN for every row
    counts = ops.vote_count(features, weight_nan, None, 4, backend="cpp")
    assert counts.tolist() == [1, 0, 5, 0]
    assert torch.equal(counts, ops.vote_count_reference(features, weight_nan, None, 4))


def test_vote_count_empty_batch():
    counts = ops.vote_count(torch.zeros(0, 4), torch.zeros(3, 4), None, 3, backend="cpp")
    assert counts.tolist() == [0, 0, 0]


# ------------------------------------------------------------------------------------------- requantize_codes, quantize_codes


def _assert_same_codes(result, expected, source, layout):
    """The op's uint8 codes are the reference's, in ``source``'s shape (and channels_last layout)."""
    assert result.dtype == torch.uint8 and result.shape == source.shape
    assert torch.equal(result, expected)
    if layout == "channels_last":
        assert result.is_contiguous(memory_format=torch.channels_last)  # the layout the next conv reads


REQUANT_GRIDS = [  # (in_scale, in_zero, out_scale, out_zero, out_min, out_max)
    (0.025692012, 0, 0.35294077, 0, 0, 15),       # an 8-bit residual stream into a 4-bit layer
    (0.5, 128, 0.25, 128, 0, 255),                 # signed, ties at every other code
    (0.01, 3, 0.0100001, 0, 2, 200),               # near-equal scales, clamped at both ends
    (1.0, 0, 3.0, 0, 0, 255),                      # exact thirds: x.5 ties round to even
    # the AVX2 loop that counts the table's steps (at most 24), and just beyond it
    (0.3, 10, 0.1, 0, 0, 15),                      # each code three steps up: a step listed three times
    (0.05, 128, 0.2, 8, 1, 15),                    # zero points, clamped at out_min: table[0] = 1
    (0.025, 0, 0.2, 0, 0, 24),                     # 24 steps, the most it counts
    (0.025, 0, 0.2, 0, 0, 25),                     # 25: the division loop
]


@pytest.mark.parametrize("grid", REQUANT_GRIDS, ids=range(len(REQUANT_GRIDS)))
@pytest.mark.parametrize("shape, layout", [((256,), "contiguous"), ((3, 5, 7, 11), "channels_last"),
                                           ((2, 3, 9, 13), "contiguous"), ((4, 6, 5), "strided"),
                                           ((3, 17, 33, 35), "channels_last")])
def test_requantize_codes_is_the_reference_bit_for_bit(grid, shape, layout, isa):
    """Every path: the AVX-512 VBMI table ("vnni" where the CPU has VBMI), AVX2's step count (a table
    rising at most 24 times) and its division, scalar."""
    gen = torch.Generator().manual_seed(hash((grid, shape)) % 2**31)
    codes = torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)
    if shape == (256,):
        codes = torch.arange(256, dtype=torch.uint8)  # every code once
    if layout == "channels_last":
        codes = codes.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        codes = torch.randint(0, 256, (4, 12, 5), generator=gen, dtype=torch.uint8)[:, ::2]  # not dense
    expected = ops.requantize_codes_reference(codes, *grid)
    _assert_same_codes(ops.requantize_codes(codes, *grid, backend="cpp"), expected, codes, layout)
    # the reference is the fake-quant chain itself: dequantize, then an activation quantizer's codes
    in_scale, in_zero, out_scale, out_zero, out_min, out_max = grid
    values = (codes.float() - in_zero) * torch.tensor(in_scale)
    quantized = torch.clamp(torch.round(values / torch.tensor(out_scale)), out_min - out_zero, out_max - out_zero)
    assert torch.equal(expected.to(torch.int32) - out_zero, quantized.to(torch.int32))


def test_requantize_codes_rejects_bad_inputs():
    codes = torch.zeros(4, dtype=torch.uint8)
    with pytest.raises(TypeError, match="uint8"):
        ops.requantize_codes(codes.float(), 0.1, 0, 0.2, 0, 0, 15)
    with pytest.raises(ValueError, match="in_scale"):
        ops.requantize_codes(codes, 0.0, 0, 0.2, 0, 0, 15)
    with pytest.raises(ValueError, match="out_scale"):
        ops.requantize_codes(codes, 0.1, 0, float("nan"), 0, 0, 15)
    with pytest.raises(ValueError, match="out_min"):
        ops.requantize_codes(codes, 0.1, 0, 0.2, 0, 16, 15)
    with pytest.raises(ValueError, match="in_zero"):
        ops.requantize_codes(codes, 0.1, 300, 0.2, 0, 0, 15)
    with pytest.raises(RuntimeError, match="uint8"):
        torch.ops.arq.requantize_codes(codes.to(torch.int8), 0.1, 0, 0.2, 0, 0, 15)
    with pytest.raises(ValueError, match="backend"):
        ops.requantize_codes(codes, 0.1, 0, 0.2, 0, 0, 15, backend="triton")


QUANTIZERS = [  # (scale, zero_point, code_min, code_max)
    (0.35294077, 0, 0, 15),        # unsigned 4-bit, after a ReLU
    (0.0371, 8, 1, 15),            # signed 4-bit (zero point 8, levels -7..7)
    (0.0125, 128, 1, 255),         # signed 8-bit
    (0.025692012, 0, 0, 255),      # unsigned 8-bit: a residual stream
]


def _quantize_inputs(scale, shape, layout, gen):
    x = torch.randn(shape, generator=gen) * (40 * scale)
    flat = x.view(-1)
    k = torch.randint(-300, 300, (flat.numel(),), generator=gen).float()
    ties = (k + 0.5) * torch.tensor(scale)  # x / s lands on (or next to) a half: round half to even
    specials = torch.tensor([float("inf"), -float("inf"), 3e38, -3e38, 1e-40, 0.0, -0.0, 255.5 * scale])
    mixed = torch.where(torch.rand(flat.numel(), generator=gen) < 0.5, ties, flat)
    mixed[: min(len(specials), mixed.numel())] = specials[: mixed.numel()]
    x = mixed.view(shape)
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "strided":
        return x[:, ::2]
    return x


@pytest.mark.parametrize("quantizer", QUANTIZERS, ids=range(len(QUANTIZERS)))
@pytest.mark.parametrize("shape, layout", [((1000,), "contiguous"), ((3, 5, 7, 11), "channels_last"),
                                           ((2, 3, 9, 13), "contiguous"), ((4, 6, 5), "strided"), ((7,), "contiguous")])
def test_quantize_codes_is_the_reference_bit_for_bit(quantizer, shape, layout):
    scale, zero_point, code_min, code_max = quantizer
    gen = torch.Generator().manual_seed(hash((quantizer, shape)) % 2**31)
    x = _quantize_inputs(scale, shape, layout, gen)
    expected = ops.quantize_codes_reference(x, *quantizer)
    _assert_same_codes(ops.quantize_codes(x, *quantizer, backend="cpp"), expected, x, layout)
    # the reference is an activation quantizer's codes: its integer level plus the zero point
    from arq.quant.quantizers import ActivationQuantizer

    bits = 8 if code_max > 15 else 4
    aq = ActivationQuantizer(bits)
    aq.set_range(scale, signed=zero_point > 0)
    q_lo, q_hi = aq.levels
    assert (q_lo + zero_point, q_hi + zero_point) == (code_min, code_max)
    finite = torch.isfinite(x)
    levels = torch.round(aq(x)[finite].double() / torch.tensor(scale).double())
    assert torch.equal(expected[finite].to(torch.float64) - zero_point, levels)


def test_quantize_codes_raises_on_nan_and_bad_inputs():
    in_vector, in_tail = torch.zeros(43), torch.zeros(43)
    in_vector[3] = float("nan")  # the AVX2 loop takes 8 at a time: 43 = 5 * 8 + a tail of 3
    in_tail[41] = float("nan")
    for bad in (in_vector, in_tail):
        with pytest.raises(RuntimeError, match="NaN"):
            ops.quantize_codes(bad, 0.1, 0, 0, 15, backend="cpp")
    with pytest.raises(TypeError, match="float32"):
        ops.quantize_codes(torch.zeros(4, dtype=torch.float64), 0.1, 0, 0, 15)
    with pytest.raises(ValueError, match="scale"):
        ops.quantize_codes(torch.zeros(4), 0.0, 0, 0, 15)
    with pytest.raises(ValueError, match="code_min"):
        ops.quantize_codes(torch.zeros(4), 0.1, 0, 16, 15)
    with pytest.raises(ValueError, match="zero_point"):
        ops.quantize_codes(torch.zeros(4), 0.1, 256, 0, 255)
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.arq.quantize_codes(torch.zeros(4, dtype=torch.float16), 0.1, 0, 0, 15)
    with pytest.raises(ValueError, match="backend"):
        ops.quantize_codes(torch.zeros(4), 0.1, 0, 0, 15, backend="cuda")


# ------------------------------------------------------------------------------------------- torch.compile support


def test_fake_implementations():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(5, 7, 30, dtype=torch.uint8)
        packed = torch.empty(11, 4, dtype=torch.int32)
        y = torch.ops.arq.packed_linear(x, packed, 4, torch.empty(11), None, 1.0, True, None, 0.5)
        assert y.shape == (5, 7, 11) and y.dtype == torch.uint8
        xc = torch.empty(2, 9, 7, 3, dtype=torch.int8)
        yc = torch.ops.arq.packed_conv2d(xc, torch.empty(8, 4, dtype=torch.int32), 4, torch.empty(8), None, 1.0,
                                         3, 3, 2, 1, False, None, 0.0)
        assert yc.shape == (2, 5, 4, 8) and yc.dtype == torch.float32
        counts = torch.ops.arq.vote_count(torch.empty(3, 4), torch.empty(10, 4), None, 10)
        assert counts.shape == (10,) and counts.dtype == torch.int64
        stream = torch.empty(2, 16, 8, 8, dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
        codes = torch.ops.arq.requantize_codes(stream, 0.1, 0, 0.3, 0, 0, 15)
        assert codes.shape == stream.shape and codes.dtype == torch.uint8
        assert codes.is_contiguous(memory_format=torch.channels_last)
        activations = torch.empty(2, 16, 8, 8).contiguous(memory_format=torch.channels_last)
        codes = torch.ops.arq.quantize_codes(activations, 0.1, 0, 0, 15)
        assert codes.shape == activations.shape and codes.dtype == torch.uint8
        assert codes.is_contiguous(memory_format=torch.channels_last)
        image = torch.empty(3, 5, 7)
        noisy = torch.ops.arq.noisy_input(image, 0.5, 1, 0, 1, 0, 4)
        assert noisy.shape == (4, 3, 5, 7) and noisy.dtype == torch.float32
        codes = torch.ops.arq.noisy_input_codes(image, 0.5, 1, 0, 1, 0, 4, torch.empty(3), torch.empty(3), 0.1, 128,
                                                1, 255)
        assert codes.shape == (4, 3, 5, 7) and codes.dtype == torch.uint8
        assert codes.is_contiguous(memory_format=torch.channels_last)
        assert torch.ops.arq.argmax_count(torch.empty(6, 10), 10).shape == (10,)


def test_opcheck():
    gen = torch.Generator().manual_seed(2)
    x = _random_x((9, 20), torch.int8, gen)
    packed = ops.pack_weights(_random_q(6, 20, 4, gen), 4)
    torch.library.opcheck(torch.ops.arq.packed_linear, (x, packed, 4, torch.rand(6), torch.randn(6), 0.1, True,
                                                        None, 0.2))
    torch.library.opcheck(torch.ops.arq.vote_count, (torch.randn(9, 20), torch.randn(4, 20), None, 4))
    torch.library.opcheck(torch.ops.arq.requantize_codes,
                          (torch.randint(0, 256, (3, 4, 5, 6), dtype=torch.uint8), 0.1, 2, 0.3, 1, 0, 15))
    torch.library.opcheck(torch.ops.arq.quantize_codes, (torch.randn(3, 4, 5, 6), 0.1, 2, 0, 15))
    image = torch.rand(3, 5, 7, generator=gen)
    torch.library.opcheck(torch.ops.arq.noisy_input, (image, 0.5, 3, 1, 1, 2, 4))
    torch.library.opcheck(torch.ops.arq.noisy_input_codes, (image, 0.5, 3, 1, 1, 2, 4, torch.rand(3, generator=gen),
                                                            torch.rand(3, generator=gen) + 0.1, 0.02, 128, 1, 255))
    torch.library.opcheck(torch.ops.arq.argmax_count, (torch.randn(9, 10, generator=gen), 10))


# ------------------------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not cuda_ops_available(), reason="needs CUDA and arq CUDA ops")
def test_vote_count_cuda_matches_cpu_bit_for_bit():
    gen = torch.Generator().manual_seed(9)
    for d, classes in [(129, 10), (64, 37), (7, 1000)]:
        features, weight, bias = (torch.randn(20000, d, generator=gen), torch.randn(classes, d, generator=gen),
                                  torch.randn(classes, generator=gen))
        cpu = ops.vote_count(features, weight, bias, classes, backend="cpp")
        gpu = ops.vote_count(features.cuda(), weight.cuda(), bias.cuda(), classes, backend="cuda")
        assert torch.equal(gpu.cpu(), cpu)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_packed_ops_dispatch_on_cuda():
    gen = torch.Generator().manual_seed(4)
    x = _random_x((64, 96), torch.int8, gen)
    packed = ops.pack_weights(_random_q(48, 96, 4, gen), 4)
    scales = torch.rand(48, generator=gen)
    ref = ops.packed_linear_reference(x, packed, 4, scales, None, 0.02, True, None, 0.1)
    out = ops.packed_linear(x.cuda(), packed.cuda(), 4, scales.cuda(), None, 0.02, True, None, 0.1)
    assert torch.equal(out.cpu(), ref)


# ------------------------------------------------------------------------------------------- dispatch


def test_dispatcher_backends():
    gen = torch.Generator().manual_seed(8)
    x = _random_x((6, 12), torch.uint8, gen)
    packed = ops.pack_weights(_random_q(5, 12, 6, gen), 6)
    scales = torch.rand(5, generator=gen)
    outs = [ops.packed_linear(x, packed, 6, scales, None, 0.1, True, None, 0.3, backend=b)
            for b in ("auto", "cpp", "torch")]
    assert all(torch.equal(o, outs[0]) for o in outs)
    with pytest.raises(ValueError, match="backend"):
        ops.vote_count(torch.zeros(1, 2), torch.zeros(3, 2), None, 3, backend="fast")
    with pytest.raises(RuntimeError, match="does not run on cpu"):
        ops.vote_count(torch.zeros(1, 2), torch.zeros(3, 2), None, 3, backend="cuda")


# ------------------------------------------------------------------------------------------- the build


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ELF and libstdc++ are Linux's")
def test_extension_uses_the_shared_libstdcxx():
    """A _C with libstdc++ linked in statically crashed on its first integer-formatting error
    (benchmarks/results/gpu-h200-2026-11-27); setup.py links the loaded libstdc++ instead."""
    origin = importlib.util.find_spec("arq._C").origin
    needed = _ext.elf_needed_libraries(origin)
    assert any(name.startswith("libstdc++.so") for name in needed), needed
    assert _ext._private_cxx_runtime() is None


def test_elf_needed_libraries_reads_a_known_library(tmp_path):
    libc10 = os.path.join(os.path.dirname(torch.__file__), "lib", "libc10.so")
    if sys.platform.startswith("linux"):
        assert any(name.startswith("libc.so") for name in _ext.elf_needed_libraries(libc10))
    not_elf = tmp_path / "x.so"
    not_elf.write_bytes(b"not an ELF file")
    assert _ext.elf_needed_libraries(str(not_elf)) is None


def test_a_statically_linked_runtime_is_refused(monkeypatch):
    if not sys.platform.startswith("linux"):
        pytest.skip("Linux only")
    monkeypatch.setattr(_ext, "elf_needed_libraries", lambda path: ["libc10.so", "libc.so.6"])
    problem = _ext._private_cxx_runtime()
    assert problem is not None and "statically" in problem and "rebuild" in problem
