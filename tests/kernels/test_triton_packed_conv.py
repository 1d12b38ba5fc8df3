"""arq_kernels.packed_conv: NHWC implicit-GEMM convolution with packed weights, fused epilogue."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="Triton is not installed (pip install 'arq[triton]')")

import arq_kernels.packed_conv as packed_conv_module  # noqa: E402
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


class _LaunchCounter:
    """Stands in for a Triton kernel: counts ``kernel[grid](...)`` launches and runs the kernel."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches += 1
            return self.kernel[grid](*args, **kwargs)
        return launch


def _count_launches(monkeypatch) -> dict:
    """Each K loop's kernel behind a :class:`_LaunchCounter`, by loop name."""
    counters = {"im2col": _LaunchCounter(packed_conv_module._packed_conv2d_kernel),
                "rows": _LaunchCounter(packed_conv_module._packed_conv2d_rows_kernel)}
    monkeypatch.setattr(packed_conv_module, "_packed_conv2d_kernel", counters["im2col"])
    monkeypatch.setattr(packed_conv_module, "_packed_conv2d_rows_kernel", counters["rows"])
    return counters


@pytest.fixture(params=["im2col", "rows"])
def conv_loop(request, monkeypatch):
    """Runs a test with each K loop (ARQ_TRITON_CONV_LOOP); yields the loop's launch counters."""
    monkeypatch.setenv("ARQ_TRITON_CONV_LOOP", request.param)
    counters = _count_launches(monkeypatch)
    yield request.param, counters
    # contiguous NHWC inputs (every test using this fixture) run the loop asked for, and only it
    other = "im2col" if request.param == "rows" else "rows"
    assert counters[request.param].launches > 0 and counters[other].launches == 0


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
def test_int32_accumulator_equals_torch_conv(geometry, device, generator, conv_loop):
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
def test_fused_epilogue_matches_reference(geometry, spec, device, generator, conv_loop):
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
def test_codes_also_writes_the_float_output_and_its_codes(geometry, levels, device, generator, conv_loop):
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
def test_gpu_cifar_layer(ks, stride, pad, bits, conv_loop):
    generator = torch.Generator().manual_seed(ks * 10 + bits)
    geometry = (256, 32, 32, 32, 64, ks, stride, pad, bits)
    x, weight, packed = _case(geometry, generator)
    scales = torch.rand(64, generator=generator) * 0.01
    got = packed_conv2d(x.cuda(), packed.cuda(), bits, scales.cuda(), kernel_size=ks, stride=stride, padding=pad,
                        out_dtype=torch.int32)
    expected = F.conv2d(x.permute(0, 3, 1, 2).double(), weight.double(), stride=stride, padding=pad)
    assert torch.equal(got.cpu().to(torch.int64), expected.permute(0, 2, 3, 1).to(torch.int64))


@pytest.mark.parametrize("geometry", [GEOMETRIES[0], GEOMETRIES[1], GEOMETRIES[6]], ids=["k3s1p1b2", "k3s2p1b3", "k3s1p1b8"])
def test_unsigned_8_bit_codes_through_the_zero_point(geometry, device, generator, conv_loop):
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


# (batch, H, W, C, N, kernel, stride, padding, bits, BLOCK_K): the row loop where its span KW * C is
# 16-aligned and BLOCK_K does or does not divide it, 3-bit weights (no word tiles), a 1x1
ROW_SPANS = [
    (2, 9, 7, 16, 16, 3, 1, 1, 4, 32),   # span 48: steps of 32, the second half past the span
    (1, 6, 6, 32, 24, 3, 2, 1, 8, 64),   # span 96 at stride 2: steps of 64, the second half past it
    (2, 5, 6, 32, 8, 3, 1, 1, 3, 32),    # span 96 = 3 steps of 32; 3-bit weights: element-wise unpacking
    (1, 8, 8, 64, 16, 3, 1, 1, 2, 64),   # span 192 = 3 steps of 64
    (2, 7, 5, 48, 16, 1, 2, 0, 7, 32),   # 1x1 stride 2: span 48
]


@pytest.mark.parametrize("geometry", ROW_SPANS, ids=lambda g: f"c{g[3]}k{g[5]}s{g[6]}b{g[8]}bk{g[9]}")
@pytest.mark.parametrize("zero_point", [0, -128], ids=["signed", "unsigned_zp"])
@pytest.mark.parametrize("int8_weight", [False, True], ids=["packed", "int8_weight"])
def test_row_loop_spans(geometry, zero_point, int8_weight, device, generator, monkeypatch):
    """The row loop (``LOOP: rows``) against the exact convolution where each kernel row's span is
    cut into BLOCK_K steps, a partial last step included (its columns meet the next row's weights
    unless zeroed; with the zero point, the padding's codes z meet them), with and without the
    input's zero point, unpacking the weights or reading them unpacked (``int8_weight``)."""
    batch, h, w, c, n, ks, stride, pad, bits, block_k = geometry
    counter = _LaunchCounter(packed_conv_module._packed_conv2d_rows_kernel)
    monkeypatch.setattr(packed_conv_module, "_packed_conv2d_rows_kernel", counter)
    x, weight, packed = _case((batch, h, w, c, n, ks, stride, pad, bits), generator)
    codes = x.to(torch.int64) - zero_point
    expected = F.conv2d(codes.permute(0, 3, 1, 2).double(), weight.double(), stride=stride, padding=pad)
    expected = expected.permute(0, 2, 3, 1).to(torch.int64)
    config = {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": block_k, "GROUP_M": 2, "num_warps": 4, "num_stages": 1,
              "LOOP": "rows"}
    out = torch.full(expected.shape, -(1 << 31), dtype=torch.int32, device=device)
    unpacked = weight.permute(0, 2, 3, 1).reshape(n, -1).contiguous().to(device) if int8_weight else None
    got = packed_conv2d(x.to(device), packed.to(device), bits, torch.ones(n, device=device), kernel_size=ks,
                        stride=stride, padding=pad, out_dtype=torch.int32, x_zero_point=zero_point, out=out,
                        config=config, int8_weight=unpacked)
    assert counter.launches == 1
    assert torch.equal(got.cpu().to(torch.int64), expected)


def test_row_loop_falls_back_for_strided_rows(device, generator, monkeypatch):
    """An NHWC view of an NCHW tensor has no contiguous kernel rows: ``rows`` runs the im2col loop."""
    counter = _LaunchCounter(packed_conv_module._packed_conv2d_kernel)
    monkeypatch.setattr(packed_conv_module, "_packed_conv2d_kernel", counter)
    monkeypatch.setenv("ARQ_TRITON_CONV_LOOP", "rows")
    _, _, _, _, n, ks, stride, pad, bits = GEOMETRIES[0]
    x, weight, packed = _case(GEOMETRIES[0], generator)
    x_strided = x.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)
    got = packed_conv2d(x_strided.to(device), packed.to(device), bits, torch.ones(n, device=device),
                        kernel_size=ks, stride=stride, padding=pad, out_dtype=torch.int32)
    expected = F.conv2d(x.permute(0, 3, 1, 2).double(), weight.double(), stride=stride, padding=pad)
    assert counter.launches == 1
    assert torch.equal(got.cpu().to(torch.int64), expected.permute(0, 2, 3, 1).to(torch.int64))


def test_conv_loop_setting_is_checked(device, generator, monkeypatch):
    x, _, packed = _case(GEOMETRIES[0], generator)
    ones = torch.ones(GEOMETRIES[0][4], device=device)
    monkeypatch.setenv("ARQ_TRITON_CONV_LOOP", "winograd")
    with pytest.raises(ValueError, match="ARQ_TRITON_CONV_LOOP must be one of"):
        packed_conv2d(x.to(device), packed.to(device), 2, ones, kernel_size=3, padding=1)
    monkeypatch.delenv("ARQ_TRITON_CONV_LOOP")
    with pytest.raises(ValueError, match="config LOOP must be one of"):
        packed_conv2d(x.to(device), packed.to(device), 2, ones, kernel_size=3, padding=1,
                      config={**MANY_PROGRAMS, "LOOP": "taps"})


def test_int8_weight_is_checked(device, generator):
    _, _, _, _, n, ks, stride, pad, bits = GEOMETRIES[0]
    x, weight, packed = _case(GEOMETRIES[0], generator)
    unpacked = weight.permute(0, 2, 3, 1).reshape(n, -1).contiguous()
    common = dict(kernel_size=ks, stride=stride, padding=pad, config={**MANY_PROGRAMS, "LOOP": "rows"})
    ones = torch.ones(n, device=device)
    for bad in (unpacked.to(torch.int32), unpacked[:, :-1].contiguous(), unpacked.t().contiguous().t()):
        with pytest.raises(ValueError, match="int8_weight must be a contiguous int8"):
            packed_conv2d(x.to(device), packed.to(device), bits, ones, int8_weight=bad.to(device), **common)


def test_tap_prefix_sums(device, generator):
    """``tap_prefix_sums`` against direct sums of the [N, C, KH, KW] weight; given to the row loop (as a
    layer does) it gives what the per-call sums give; a wrong shape or dtype is refused."""
    from arq_kernels.packed_conv import tap_prefix_sums

    geometry = (2, 7, 6, 16, 8, 3, 1, 1, 8)
    batch, h, w, c, n, ks, stride, pad, bits = geometry
    x, weight, packed = _case(geometry, generator)
    sums = tap_prefix_sums(packed, bits, (ks, ks), c)
    assert sums.dtype == torch.int32 and sums.shape == ((ks + 1) * (ks + 1), n)
    taps = weight.to(torch.int64).sum(1)  # [N, KH, KW]
    for a in range(ks + 1):
        for b in range(ks + 1):
            assert torch.equal(sums[a * (ks + 1) + b].to(torch.int64), taps[:, :a, :b].sum((1, 2)))
    unpacked = weight.permute(0, 2, 3, 1).reshape(n, -1).contiguous()
    assert torch.equal(tap_prefix_sums(unpacked, bits, (ks, ks), c), sums)
    common = dict(kernel_size=ks, stride=stride, padding=pad, out_dtype=torch.int32, x_zero_point=-128,
                  config={**MANY_PROGRAMS, "LOOP": "rows"})
    ones = torch.ones(n, device=device)
    given = packed_conv2d(x.to(device), packed.to(device), bits, ones, tap_sums=sums.to(device), **common)
    assert torch.equal(given, packed_conv2d(x.to(device), packed.to(device), bits, ones, **common))
    codes = x.to(torch.int64) + 128
    expected = F.conv2d(codes.permute(0, 3, 1, 2).double(), weight.double(), stride=stride, padding=pad)
    assert torch.equal(given.cpu().to(torch.int64), expected.permute(0, 2, 3, 1).to(torch.int64))
    for bad in (sums.to(torch.int64), sums[:-1].contiguous(), sums.t().contiguous()):
        with pytest.raises(ValueError, match="tap_sums must be a contiguous int32"):
            packed_conv2d(x.to(device), packed.to(device), bits, ones, tap_sums=bad.to(device), **common)


@pytest.mark.parametrize("layer", ["stage1_16ch", "stage3_64ch"])
def test_ncu_script_launches_one_layer_three_ways(device, layer):
    """benchmarks/gpu_ncu.py (the GPU check's counter step) profiles the same layer through both K
    loops and cuDNN: the loops give the same codes, and cuDNN's float16 output, quantized as the
    packed epilogue does, is within one code of them (float16 rounding)."""
    from benchmarks.gpu_ncu import LAYERS, launches

    height, channels = LAYERS[layer]
    variants = launches(height, channels, device=device, batch=2)
    im2col, rows = variants["packed_im2col"]().cpu(), variants["packed_rows"]().cpu()
    y16 = variants["cudnn_fp16_nhwc"]().float().cpu().permute(0, 2, 3, 1)
    assert im2col.dtype == torch.int8 and im2col.shape == (2, height, height, channels)
    assert torch.equal(im2col, rows)
    from_fp16 = torch.clamp(torch.round(y16 / 0.05), -7, 7).to(torch.int8)
    assert (im2col.int() - from_fp16.int()).abs().max() <= 1
    assert im2col.float().std() > 0.5  # not all clamped to one code


@pytest.mark.parametrize("loop", ["im2col", "rows"])
def test_launch_plans_are_reused_only_for_the_same_launch(loop, device, generator, monkeypatch):
    """``plans``: a later call with new contents in the same shapes reuses the checked launch and gives
    the reference result; a new batch size, another weight tensor or another K loop builds a new one;
    a scale changed in place is read (the launch holds the layer's tensors, not copies)."""
    monkeypatch.setenv("ARQ_TRITON_CONV_LOOP", loop)
    geometry = GEOMETRIES[0]
    _, _, _, _, _, ks, stride, pad, bits = geometry
    x, packed, scales, bias, out_shape = _epilogue_case(geometry, generator)
    kwargs = dict(kernel_size=ks, stride=stride, padding=pad, x_scale=0.02, out_scale=0.05, relu=True,
                  residual_scale=0.04)
    packed, scales, bias = packed.to(device), scales.to(device), bias.to(device)
    plans = {}

    def check(x, residual, weight=packed, plans_expected=None):
        settings = dict(kwargs) if residual is not None else dict(kwargs, residual_scale=None)
        got = packed_conv2d(x.to(device), weight, bits, scales, bias,
                            residual=None if residual is None else residual.to(device), plans=plans, **settings)
        expected = packed_conv2d_reference(x, weight.cpu(), bits, scales.cpu(), bias.cpu(), residual=residual,
                                           **settings)
        assert torch.equal(got.cpu(), expected)
        assert len(plans) == plans_expected

    def fresh(shape):
        return (torch.randint(-128, 128, shape, generator=generator, dtype=torch.int8),
                torch.randint(-127, 128, (shape[0],) + tuple(out_shape[1:]), generator=generator,
                              dtype=torch.int8))

    check(*fresh(x.shape), plans_expected=1)
    check(*fresh(x.shape), plans_expected=1)  # new contents, same launch
    check(*fresh((x.shape[0] + 1,) + x.shape[1:]), plans_expected=2)  # another batch size
    _, _, other = _case(geometry, generator)
    check(*fresh(x.shape), weight=other.to(device), plans_expected=3)  # another weight tensor
    scales.mul_(1.5)  # in place: the launch reads the tensor it holds
    check(*fresh(x.shape), plans_expected=3)
    monkeypatch.setenv("ARQ_TRITON_CONV_LOOP", "im2col" if loop == "rows" else "rows")
    check(*fresh(x.shape), plans_expected=4)  # the other K loop
    plans.clear()
    check(fresh(x.shape)[0], None, plans_expected=1)
    check(fresh((x.shape[0] + 2,) + x.shape[1:])[0], None, plans_expected=2)  # the input's shape alone differs


@pytest.mark.parametrize("channels, ks, expected_loop", [(16, 3, "im2col"), (17, 3, "rows"), (7, 1, "rows")])
def test_auto_loop_picks_per_layer(channels, ks, expected_loop, device, generator, monkeypatch):
    """``ARQ_TRITON_CONV_LOOP=auto``: im2col for 3x3 layers of at most 16 input channels, rows otherwise;
    the same result either way."""
    monkeypatch.setenv("ARQ_TRITON_CONV_LOOP", "auto")
    counters = _count_launches(monkeypatch)
    geometry = (2, 5, 6, channels, 9, ks, 1, ks // 2, 4)
    x, weight, packed = _case(geometry, generator)
    got = packed_conv2d(x.to(device), packed.to(device), 4, torch.ones(9, device=device), kernel_size=ks,
                        padding=ks // 2, out_dtype=torch.int32)
    expected = F.conv2d(x.permute(0, 3, 1, 2).double(), weight.double(), padding=ks // 2).permute(0, 2, 3, 1)
    assert torch.equal(got.cpu().double(), expected)
    other = "rows" if expected_loop == "im2col" else "im2col"
    assert counters[expected_loop].launches == 1 and counters[other].launches == 0


@pytest.mark.parametrize("loop", ["im2col", "rows"])
def test_row_loop_reads_its_own_config_entries_first(loop, device, generator, monkeypatch):
    """The row loop asks the config table for the ``rows_<bucket>`` entry of each width before the shared
    one (what bench_kernels' "rows" tuning writes); the im2col loop for the shared ones only."""
    monkeypatch.setenv("ARQ_TRITON_CONV_LOOP", loop)
    asked = []
    real = packed_conv_module.pick_config

    def recording(family, device, bucket="default"):
        asked.append(bucket)
        return real(family, device, bucket)

    monkeypatch.setattr(packed_conv_module, "pick_config", recording)
    x, weight, packed = _case((1, 5, 5, 16, 9, 3, 1, 1, 4), generator)
    packed_conv2d(x.to(device), packed.to(device), 4, torch.ones(9, device=device), kernel_size=3, padding=1)
    shared = ("n16", "n32", "small_n", "default")
    rows_first = ("rows_n16", "n16", "rows_n32", "n32", "rows_small_n", "small_n", "rows_default", "default")
    assert asked == [rows_first if loop == "rows" else shared]
