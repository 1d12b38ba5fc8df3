"""arq_kernels.packed_conv: NHWC implicit-GEMM convolution with packed weights, fused epilogue."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="Triton is not installed (pip install 'arq[triton]')")

from arq_kernels.packed_conv import packed_conv2d, packed_conv2d_reference  # noqa: E402
from arq_kernels.packed_matmul import pack_weights  # noqa: E402
from arq_kernels.quantize import quantize_nhwc_reference  # noqa: E402

pytestmark = pytest.mark.triton

MANY_PROGRAMS = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "GROUP_M": 2, "num_warps": 4, "num_stages": 1}

# (batch, H, W, C, N, kernel, stride, padding, bits): odd sizes, C not a multiple of anything useful
GEOMETRIES = [
    (2, 7, 9, 5, 11, 3, 1, 1, 2),
    (1, 8, 7, 6, 13, 3, 2, 1, 3),
    (2, 6, 5, 7, 9, 3, 1, 0, 4),
    (3, 5, 5, 7, 9, 1, 1, 0, 5),
    (2, 9, 6, 3, 17, 1, 2, 0, 6),
    (1, 9, 9, 4, 5, 3, 2, 0, 7),
    (1, 6, 7, 10, 15, 3, 1, 1, 8),
]


def _case(geometry, generator):
    batch, h, w, c, n, ks, stride, pad, bits = geometry
    x = torch.randint(-128, 128, (batch, h, w, c), generator=generator, dtype=torch.int8)
    limit = (1 << (bits - 1)) - 1
    weight = torch.randint(-limit, limit + 1, (n, c, ks, ks), generator=generator, dtype=torch.int8)
    packed = pack_weights(weight.permute(0, 2, 3, 1).reshape(n, -1), bits)  # (kh, kw, c) order
    return x, weight, packed


def _epilogue_case(geometry, generator):
    """``_case``'s codes and packed weight, per-channel scales and a bias, and the output shape."""
    _, _, _, _, n, ks, stride, pad, bits = geometry
    x, _, packed = _case(geometry, generator)
    scales = torch.rand(n, generator=generator) * 0.01 + 0.001
    bias = torch.randn(n, generator=generator)
    shape = packed_conv2d_reference(x, packed, bits, scales, kernel_size=ks, stride=stride, padding=pad,
                                    out_dtype=torch.int32).shape
    return x, packed, scales, bias, shape


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: f"k{g[5]}s{g[6]}p{g[7]}b{g[8]}")
def test_int32_accumulator_equals_torch_conv(geometry, device, generator):
    """Raw int32 output against an exact convolution of the original [N, C, KH, KW] weight."""
    _, _, _, _, n, ks, stride, pad, bits = geometry
    x, weight, packed = _case(geometry, generator)
    expected = F.conv2d(x.permute(0, 3, 1, 2).double(), weight.double(), stride=stride, padding=pad)
    expected = expected.permute(0, 2, 3, 1).to(torch.int64)  # exact: integer sums far below 2^53
    out = torch.full(expected.shape, -(1 << 31), dtype=torch.int32, device=device)
    got = packed_conv2d(x.to(device), packed.to(device), bits, torch.ones(n, device=device),
                        kernel_size=ks, stride=stride, padding=pad, out_dtype=torch.int32, out=out)
    assert got.data_ptr() == out.data_ptr() and got.shape == expected.shape
    assert torch.equal(got.cpu().to(torch.int64), expected)


@pytest.mark.parametrize("word_tiles", [True, False], ids=["word_tiles", "gather"])
@pytest.mark.parametrize("geometry", [GEOMETRIES[0], GEOMETRIES[5]], ids=["k3s1p1b2", "k3s2p0b7"])
def test_tiling_with_many_programs_and_strided_input(geometry, word_tiles, device, generator):
    _, _, _, _, n, ks, stride, pad, bits = geometry
    x, weight, packed = _case(geometry, generator)
    x_strided = x.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)  # NHWC view of an NCHW tensor
    got = packed_conv2d(x_strided.to(device), packed.to(device), bits, torch.ones(n, device=device),
                        kernel_size=ks, stride=stride, padding=pad, out_dtype=torch.int32, config={**MANY_PROGRAMS, "WORD_TILES": word_tiles})
    expected = F.conv2d(x.permute(0, 3, 1, 2).double(), weight.double(), stride=stride, padding=pad)
    assert torch.equal(got.cpu().to(torch.int64), expected.permute(0, 2, 3, 1).to(torch.int64))


@pytest.mark.parametrize(
    "geometry, spec",
    [
        (GEOMETRIES[0], dict(out_scale=0.05, relu=True, residual="int8")),          # block: conv3x3 + skip + ReLU
        (GEOMETRIES[4], dict(out_dtype=torch.float32, residual=None)),               # 1x1 stride-2 shortcut
        (GEOMETRIES[6], dict(out_scale=0.03, out_dtype=torch.uint8, relu=True, residual="float")),
        (GEOMETRIES[2], dict(out_dtype=torch.float16, relu=True, residual="float")),
    ],
    ids=["int8_res_relu", "float32", "uint8_res_relu", "float16"],
)
def test_fused_epilogue_matches_reference(geometry, spec, device, generator):
    spec = dict(spec)
    _, _, _, _, _, ks, stride, pad, bits = geometry
    x, packed, scales, bias, out_shape = _epilogue_case(geometry, generator)
    kind = spec.pop("residual")
    residual, residual_scale = None, None
    if kind == "int8":
        residual = torch.randint(-127, 128, out_shape, generator=generator, dtype=torch.int8)
        residual_scale = 0.04
    elif kind == "float":
        residual = torch.randn(out_shape, generator=generator)
    kwargs = dict(kernel_size=ks, stride=stride, padding=pad, x_scale=0.02, residual_scale=residual_scale, **spec)
    on = lambda t: None if t is None else t.to(device)  # noqa: E731
    got = packed_conv2d(x.to(device), packed.to(device), bits, scales.to(device), bias.to(device),
                        residual=on(residual), **kwargs)
    expected = packed_conv2d_reference(x, packed, bits, scales, bias, residual=residual, **kwargs)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    assert torch.equal(got.cpu(), expected)


@pytest.mark.parametrize(
    "geometry, levels",
    [(GEOMETRIES[0], (-7, 7, 0)), (GEOMETRIES[1], (0, 255, -128)), (GEOMETRIES[6], (0, 15, 0))],
    ids=["signed4", "unsigned8_zp", "unsigned4"],
)
def test_codes_also_writes_the_float_output_and_its_codes(geometry, levels, device, generator):
    """``codes_also``: the float32 result (bias, float residual, ReLU) and, in the same pass, the int8
    codes a packed consumer reads, bit for bit what quantizing the stored float32 output gives."""
    _, _, _, _, _, ks, stride, pad, bits = geometry
    x, packed, scales, bias, shape = _epilogue_case(geometry, generator)
    residual = torch.randn(shape, generator=generator)
    q_lo, q_hi, zero_point = levels
    step = 0.07
    kwargs = dict(kernel_size=ks, stride=stride, padding=pad, x_scale=0.02, relu=True,
                  codes_also=(step, q_lo, q_hi, zero_point))
    out = torch.full(shape, float("nan"), device=device)
    got, codes = packed_conv2d(x.to(device), packed.to(device), bits, scales.to(device), bias.to(device),
                               residual=residual.to(device), out=out, **kwargs)
    assert got.data_ptr() == out.data_ptr() and codes.dtype == torch.int8 and codes.shape == shape
    expected, expected_codes = packed_conv2d_reference(x, packed, bits, scales, bias, residual=residual, **kwargs)
    assert torch.equal(got.cpu(), expected) and torch.equal(codes.cpu(), expected_codes)
    # the consumer's own quantization of the stored output (quantize_nhwc's reference, NCHW in)
    consumer = quantize_nhwc_reference(got.cpu().permute(0, 3, 1, 2), step, q_lo, q_hi, zero_point)
    assert torch.equal(codes.cpu(), consumer)
    assert int(codes.min()) >= q_lo + zero_point and int(codes.max()) <= q_hi + zero_point
    assert len(torch.unique(codes)) > 2  # the codes span a range, not a clamp


def test_codes_also_is_checked(device, generator):
    x, _, packed = _case(GEOMETRIES[0], generator)
    n = GEOMETRIES[0][4]
    common = dict(kernel_size=3, padding=1)
    ones = torch.ones(n, device=device)
    with pytest.raises(ValueError, match="float32 output"):
        packed_conv2d(x.to(device), packed.to(device), 2, ones, out_dtype=torch.float16, codes_also=(0.1, -7, 7, 0),
                      **common)
    with pytest.raises(ValueError, match="do not fit int8"):
        packed_conv2d(x.to(device), packed.to(device), 2, ones, codes_also=(0.1, 0, 255, 0), **common)
    with pytest.raises(ValueError, match="scale must be > 0"):
        packed_conv2d(x.to(device), packed.to(device), 2, ones, codes_also=(0.0, -7, 7, 0), **common)
    with pytest.raises(ValueError, match="codes_also must be"):
        packed_conv2d(x.to(device), packed.to(device), 2, ones, codes_also=(0.1, -7), **common)


def test_rejects_bad_arguments(device):
    x = torch.zeros(1, 4, 4, 3, dtype=torch.int8, device=device)
    packed = torch.zeros(2, 7, dtype=torch.int32, device=device)  # 3*3*3 = 27 values at 4 bits -> 4 words
    with pytest.raises(ValueError):
        packed_conv2d(x, packed, 4, torch.ones(2, device=device), kernel_size=3, padding=1)
    with pytest.raises(TypeError):
        packed_conv2d(x.float(), packed, 4, torch.ones(2, device=device), kernel_size=3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("ks, stride, pad, bits", [(3, 1, 1, 4), (3, 2, 1, 2), (1, 2, 0, 8)])
def test_gpu_cifar_layer(ks, stride, pad, bits):
    generator = torch.Generator().manual_seed(ks * 10 + bits)
    geometry = (256, 32, 32, 32, 64, ks, stride, pad, bits)
    x, weight, packed = _case(geometry, generator)
    scales = torch.rand(64, generator=generator) * 0.01
    got = packed_conv2d(x.cuda(), packed.cuda(), bits, scales.cuda(), kernel_size=ks, stride=stride, padding=pad,
                        out_dtype=torch.int32)
    expected = F.conv2d(x.permute(0, 3, 1, 2).double(), weight.double(), stride=stride, padding=pad)
    assert torch.equal(got.cpu().to(torch.int64), expected.permute(0, 2, 3, 1).to(torch.int64))


@pytest.mark.parametrize("geometry", [GEOMETRIES[0], GEOMETRIES[1], GEOMETRIES[6]], ids=["k3s1p1b2", "k3s2p1b3", "k3s1p1b8"])
def test_unsigned_8_bit_codes_through_the_zero_point(geometry, device, generator):
    """Codes 0..255 carried as int8 ``c - 128`` (x_zero_point = -128): the int32 accumulator equals
    the exact convolution of the codes themselves, the padding counting as the activation 0."""
    batch, h, w, c, n, ks, stride, pad, bits = geometry
    _, weight, packed = _case(geometry, generator)
    codes = torch.randint(0, 256, (batch, h, w, c), generator=generator)
    codes.view(-1)[:4] = torch.tensor([0, 255, 128, 127])
    expected = F.conv2d(codes.permute(0, 3, 1, 2).double(), weight.double(), stride=stride, padding=pad)
    expected = expected.permute(0, 2, 3, 1).to(torch.int64)
    shifted = (codes - 128).to(torch.int8)
    out = torch.full(expected.shape, -(1 << 31), dtype=torch.int32, device=device)
    got = packed_conv2d(shifted.to(device), packed.to(device), bits, torch.ones(n, device=device), kernel_size=ks,
                        stride=stride, padding=pad, out_dtype=torch.int32, x_zero_point=-128, out=out)
    assert torch.equal(got.cpu().to(torch.int64), expected)
    # the float epilogue and the reference, with weight sums given or computed
    scales = torch.rand(n, generator=generator) + 0.5
    bias = torch.randn(n, generator=generator)
    weight_sums = weight.to(torch.int64).sum((1, 2, 3)).to(torch.int32)
    common = dict(kernel_size=ks, stride=stride, padding=pad, x_scale=0.013, relu=True, x_zero_point=-128)
    reference = packed_conv2d_reference(shifted, packed, bits, scales, bias, **common)
    for sums in (weight_sums.to(device), None):
        result = packed_conv2d(shifted.to(device), packed.to(device), bits, scales.to(device), bias.to(device),
                               weight_sums=sums, **common)
        assert torch.equal(result.cpu(), reference)
    truth = torch.clamp_min(expected.double() * 0.013 * scales.double() + bias.double(), 0)
    torch.testing.assert_close(reference.double(), truth, rtol=1e-5, atol=1e-5 * float(truth.abs().max()))


def test_zero_point_arguments_are_checked(device, generator):
    x, _, packed = _case(GEOMETRIES[0], generator)
    n = GEOMETRIES[0][4]
    with pytest.raises(ValueError, match="x_zero_point"):
        packed_conv2d(x.to(device), packed.to(device), 2, torch.ones(n, device=device), kernel_size=3, padding=1,
                      x_zero_point=-129)
    with pytest.raises(ValueError, match="weight_sums"):
        packed_conv2d(x.to(device), packed.to(device), 2, torch.ones(n, device=device), kernel_size=3, padding=1,
                      x_zero_point=-128, weight_sums=torch.zeros(n + 1, dtype=torch.int32, device=device))
