"""arq::lowbit_conv2d (csrc/cpu/lowbit_conv.cpp) against its torch reference, bit for bit.

The reference computes the integer convolution exactly in float64 and the epilogue in the op's
float32 order, so every output (float32 values or uint8 codes) must be equal, on the AVX-512 VNNI
path (vpdpbusd, int32 sums, 16 output channels a vector), the AVX2 path (int16 accumulation in
chunks) and the portable one (int32).
"""
from __future__ import annotations

import pytest
import torch

from arq import ops
from arq._ext import compiled_ops_available

pytestmark = pytest.mark.skipif(not compiled_ops_available() or not ops._has_kernel("lowbit_conv2d", "CPU"),
                                reason="arq._C with lowbit_conv2d not built")

# (batch, in channels, height, width, out channels, kernel, stride, padding): odd sizes, output
# channels that are not a multiple of 8 (a partial last block), input channels that are not a
# multiple of 4 (padded with zero weights), widths that leave a remainder after the 4-pixel
# register tiles, 1x1 / 3x3 / 5x5 kernels
SHAPES = [(3, 16, 32, 32, 16, 3, 1, 1), (2, 8, 7, 9, 12, 3, 2, 1), (2, 4, 5, 5, 3, 1, 1, 0),
          (2, 64, 8, 8, 64, 3, 1, 1), (2, 16, 9, 9, 32, 1, 2, 0), (1, 12, 6, 6, 40, 3, 1, 1),
          (2, 8, 5, 5, 24, 5, 1, 2), (1, 20, 11, 3, 7, 3, 2, 0), (2, 3, 9, 8, 16, 3, 1, 1),
          (1, 6, 7, 7, 10, 5, 2, 2), (2, 1, 6, 5, 9, 3, 1, 1)]
EPILOGUES = ["float", "float+bias+residual+relu", "codes", "codes+relu", "codes+stream+relu"]
# (activation bits, weight bits) whose vpmaddubsw pair sums fit int16: 2 max_code 2^(w-1) <= 32767
BITS = [(a, w) for a in range(2, 9) for w in range(2, 9) if ops.lowbit_conv_max_chunk((1 << a) - 1, w) >= 1]
# the pairs only the int32 paths (VNNI, portable) take
WIDE_BITS = [(a, w) for a in range(2, 9) for w in range(2, 9) if (a, w) not in BITS]


# the AVX2 path's loops for 3x3 stride-1 layers (ARQ_LOWBIT_WINOGRAD): "avx2" chooses as it does by
# default (Winograd F(2 x 2, 3 x 3) from 32 input channels, else F(2, 3), where the codes fit), the
# others force one loop wherever it fits
AVX2_LOOPS = {"2d": "2d", "row": "row", "direct": "0"}


def _use_isa(monkeypatch, name):
    """Run the op on ISA path `name` ("vnni", "avx2", "scalar"), "avx2-2d" / "avx2-row" /
    "avx2-direct" through one AVX2 loop (AVX2_LOOPS), as 8-bit codes always."""
    isa, _, loop = name.partition("-")
    monkeypatch.setenv("ARQ_CPU_ISA", isa)
    monkeypatch.delenv("ARQ_DISABLE_VNNI", raising=False)
    if loop:
        monkeypatch.setenv("ARQ_LOWBIT_WINOGRAD", AVX2_LOOPS[loop])
    else:
        monkeypatch.delenv("ARQ_LOWBIT_WINOGRAD", raising=False)
    if ops.cpu_isa() != isa:  # ARQ_CPU_ISA never raises the CPU's best
        pytest.skip(f"this CPU has no {isa} path")
    return name


@pytest.fixture(params=["vnni", "avx2", "avx2-2d", "avx2-row", "avx2-direct", "scalar"])
def isa(request, monkeypatch):
    return _use_isa(monkeypatch, request.param)


@pytest.fixture(params=["vnni", "scalar"])
def int32_isa(request, monkeypatch):
    """The paths that add in int32 and so take every bit width up to 8 x 8."""
    return _use_isa(monkeypatch, request.param)


def _case(shape, a_bits, w_bits, epilogue, gen, signed=False):
    batch, channels, height, width, out_channels, kernel, stride, padding = shape
    max_code = (1 << a_bits) - 1
    zero_point = 1 << (a_bits - 1) if signed else 0
    x = torch.randint(0, max_code + 1, (batch, channels, height, width), generator=gen, dtype=torch.uint8)
    x = x.contiguous(memory_format=torch.channels_last)
    half = 1 << (w_bits - 1)
    weight = torch.randint(-half, half, (out_channels, channels, kernel, kernel), generator=gen, dtype=torch.int8)
    tiles, sums = ops.lowbit_conv_weight_tiles(weight)
    scale = torch.rand(out_channels, generator=gen) * 0.01 + 1e-3
    out_h, out_w = (height + 2 * padding - kernel) // stride + 1, (width + 2 * padding - kernel) // stride + 1
    kwargs = dict(relu="relu" in epilogue)
    bias = torch.randn(out_channels, generator=gen) * 0.1 if epilogue != "float" else None
    if "residual" in epilogue:
        kwargs["residual"] = torch.randn(batch, out_channels, out_h, out_w, generator=gen)
    if "stream" in epilogue:
        kwargs.update(residual=torch.randint(0, 256, (batch, out_channels, out_h, out_w), generator=gen,
                                             dtype=torch.uint8), residual_scale=0.013, residual_zero_point=5)
    if "codes" in epilogue:
        kwargs.update(out_scale=0.05, out_zero_point=3, out_min=1, out_max=250)
    args = (x, tiles, sums, scale, bias, out_channels, kernel, stride, padding, zero_point, max_code, w_bits)
    return args, kwargs, weight


def _run_poisoned(args, kwargs, backend):
    """The op after freeing a buffer of 0xFF bytes the size of its output: an output element it
    failed to write would likely keep that garbage and differ from the reference."""
    torch.full((1 << 22,), 255, dtype=torch.uint8)
    return ops.lowbit_conv2d(*args, **kwargs, backend=backend)


def _assert_same(result, expected):
    assert result.dtype == expected.dtype and result.shape == expected.shape
    assert result.is_contiguous(memory_format=torch.channels_last)
    if result.is_floating_point():
        assert not torch.isnan(result).any()
    mismatches = int((result != expected).sum())
    assert mismatches == 0, f"{mismatches} of {result.numel()} outputs differ"


@pytest.mark.parametrize("epilogue", EPILOGUES)
@pytest.mark.parametrize("shape", SHAPES, ids=range(len(SHAPES)))
def test_matches_reference_bit_for_bit(isa, shape, epilogue):
    gen = torch.Generator().manual_seed(hash((shape, epilogue)) % 2**31)
    args, kwargs, _ = _case(shape, 4, 4, epilogue, gen)
    _assert_same(_run_poisoned(args, kwargs, "cpp"), ops.lowbit_conv2d(*args, **kwargs, backend="torch"))


@pytest.mark.parametrize("a_bits,w_bits", BITS)
@pytest.mark.parametrize("signed", [False, True])
def test_every_eligible_bit_width(a_bits, w_bits, signed):
    gen = torch.Generator().manual_seed(a_bits * 16 + w_bits + 100 * signed)
    args, kwargs, _ = _case((2, 32, 9, 10, 20, 3, 1, 1), a_bits, w_bits, "codes+relu", gen, signed)
    _assert_same(_run_poisoned(args, kwargs, "cpp"), ops.lowbit_conv2d(*args, **kwargs, backend="torch"))


@pytest.mark.parametrize("a_bits,w_bits", WIDE_BITS[::3] + [(8, 8)])
@pytest.mark.parametrize("shape", [(3, 16, 32, 32, 16, 3, 1, 1), (2, 12, 9, 10, 40, 3, 1, 1), (1, 20, 11, 3, 7, 3, 2, 0)])
def test_int32_paths_take_every_bit_width(int32_isa, a_bits, w_bits, shape):
    """8 x 8-bit (and every pair past the int16 bound) on the VNNI and portable paths: with an
    unsigned stream (zero point 0) and signed codes (the zero point in the padding), the stream
    add and codes out, bit for bit; odd channel counts (a partial last vector of 16)."""
    gen = torch.Generator().manual_seed(a_bits * 16 + w_bits + shape[1])
    for signed in (False, True):
        args, kwargs, _ = _case(shape, a_bits, w_bits, "codes+stream+relu", gen, signed)
        _assert_same(_run_poisoned(args, kwargs, "cpp"), ops.lowbit_conv2d(*args, **kwargs, backend="torch"))
        args, kwargs, _ = _case(shape, a_bits, w_bits, "float+bias+residual+relu", gen, signed)
        _assert_same(_run_poisoned(args, kwargs, "cpp"), ops.lowbit_conv2d(*args, **kwargs, backend="torch"))


@pytest.mark.parametrize("sign", [-1, 1])
def test_int32_sums_exact_at_the_extremes(int32_isa, sign):
    """Every code 255 and every weight -128 (or 127) over 576-term dot products: the largest int32
    sums 8 x 8 bits reach in a 64-channel 3x3 layer, exact in the float32 output."""
    x = torch.full((2, 64, 6, 7), 255, dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    weight = torch.full((48, 64, 3, 3), -128 if sign < 0 else 127, dtype=torch.int8)
    tiles, sums = ops.lowbit_conv_weight_tiles(weight)
    result = ops.lowbit_conv2d(x, tiles, sums, torch.ones(48), None, 48, 3, 1, 0, 0, 255, 8, backend="cpp")
    exact = torch.nn.functional.conv2d(x.to(torch.float64), weight.to(torch.float64)).round().to(torch.int64)
    assert int(exact.abs().max()) == 576 * 255 * (128 if sign < 0 else 127)
    assert torch.equal(result.to(torch.int64), exact)


@pytest.mark.parametrize("a_bits,w_bits", [(8, 7), (8, 6), (7, 8), (4, 8), (4, 4), (2, 2)])
@pytest.mark.parametrize("sign", [-1, 1])
def test_int16_chunks_exact_at_the_bound(isa, a_bits, w_bits, sign):
    """Every code at max_code and every weight at -2^(w-1) (or its largest positive value): each
    vpmaddubsw pair sum and each chunk reach the largest magnitudes the bound allows, over 576-term
    dot products (several chunks); the float32 outputs must be the exact integer sums."""
    max_code = (1 << a_bits) - 1
    x = torch.full((2, 64, 6, 7), max_code, dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    value = -(1 << (w_bits - 1)) if sign < 0 else (1 << (w_bits - 1)) - 1
    weight = torch.full((16, 64, 3, 3), value, dtype=torch.int8)
    tiles, sums = ops.lowbit_conv_weight_tiles(weight)
    result = ops.lowbit_conv2d(x, tiles, sums, torch.ones(16), None, 16, 3, 1, 0, 0, max_code, w_bits,
                               backend="cpp")
    exact = torch.nn.functional.conv2d(x.to(torch.float64), weight.to(torch.float64)).round().to(torch.int64)
    assert int(exact.abs().max()) < 2**24  # float32 holds it exactly
    assert torch.equal(result.to(torch.int64), exact)


@pytest.mark.parametrize("extra", [0, 1])
def test_int16_chunk_from_the_weights_exact_at_its_bound(isa, extra):
    """The AVX2 path runs all steps as one int16 chunk where max_code times the largest sum of |q|
    one accumulator lane collects is <= 32767 (csrc/cpu/lowbit_conv.cpp). Every code 15 and 4-bit
    weights whose lane sums are exactly 2184 (15 x 2184 = 32760, one chunk where the worst-case
    bound would take two) or one term more (32775: the worst-case chunks); the sums must be exact."""
    weight = torch.full((16, 64, 3, 3), -7, dtype=torch.int8)
    # lane (o, h) collects input channels c with c % 4 in (2h, 2h + 1) over (group c // 4, tap):
    # 144 (group, tap) pairs x 2 channels; -8 on 84 of the pairs: 168 x 8 + 120 x 7 = 2184
    order = (torch.arange(64).view(64, 1, 1) // 4) * 9 + torch.arange(9).view(1, 3, 3)
    weight[:, order < 84] = -8
    if extra:
        weight[:, 62, 2, 2] = -8  # group 15, tap 8 (pair 143, a -7): lane (o, 1) collects 2185
    x = torch.full((2, 64, 6, 7), 15, dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    tiles, sums = ops.lowbit_conv_weight_tiles(weight)
    lane = weight.abs().to(torch.int64).view(16, 16, 4, 9)[:, :, 2:, :].sum(dim=(1, 2, 3))
    assert int(lane.max()) == 2184 + extra
    result = ops.lowbit_conv2d(x, tiles, sums, torch.ones(16), None, 16, 3, 1, 0, 0, 15, 4, backend="cpp")
    exact = torch.nn.functional.conv2d(x.to(torch.float64), weight.to(torch.float64)).round().to(torch.int64)
    assert torch.equal(result.to(torch.int64), exact)


@pytest.mark.parametrize("extra", [0, 1])
def test_winograd2d_one_chunk_exact_at_its_bound(monkeypatch, extra):
    """F(2 x 2, 3 x 3) runs all channel groups as one int16 chunk where 4 max_code times the largest sum
    of |U| one accumulator lane collects is <= 32767 (csrc/cpu/lowbit_conv.cpp, winograd2d_weights).
    Every code 15 (so the transformed input at position (1, 1) is 4 * 15 = 60 in every interior block)
    and 4-bit weights whose transform U = (2G) g (2G)^T has lane sums of exactly 546 at that position
    (60 x 546 = 32760: one chunk, the int16 sums at their largest) or 547 (two chunks); exact either way."""
    _use_isa(monkeypatch, "avx2-2d")
    channels, groups = 128, 32
    weight = torch.ones((16, channels, 3, 3), dtype=torch.int8)
    # lane (o, h) collects channels 4 g + c with c in (2h, 2h + 1): 64 terms; U[1][1] is the sum of the 9
    # taps: 34 terms of 9 and 30 of 8 (one tap 0) give 546
    term = (torch.arange(channels) // 4) * 2 + torch.arange(channels) % 2
    weight[:, term >= 34, 2, 2] = 0
    if extra:
        weight[:, 126, 2, 2] = 1  # group 31, c = 2 (term 62): lane (o, 1) collects 547
    g2 = torch.tensor([[2, 0, 0], [1, 1, 1], [1, -1, 1], [0, 0, 2]], dtype=torch.int64)
    u = torch.einsum("ia,ocab,jb->ocij", g2, weight.to(torch.int64), g2)  # [o, c, 4, 4]
    lanes = u.abs().view(16, groups, 2, 2, 4, 4).sum(dim=(1, 3))  # [o, h, i, j]
    assert int(lanes.max()) == 546 + extra and int(u.abs().max()) <= 127
    x = torch.full((1, channels, 6, 6), 15, dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    tiles, sums = ops.lowbit_conv_weight_tiles(weight)
    result = ops.lowbit_conv2d(x, tiles, sums, torch.ones(16), None, 16, 3, 1, 0, 0, 15, 4, backend="cpp")
    exact = torch.nn.functional.conv2d(x.to(torch.float64), weight.to(torch.float64)).round().to(torch.int64)
    assert torch.equal(result.to(torch.int64), exact)


@pytest.mark.parametrize("loop", ["2d", "row"])
def test_kept_winograd_transforms_follow_the_weights(monkeypatch, loop):
    """The Winograd paths keep each layer's transformed weights across calls (keyed by the tiles' bytes):
    other weights of the same shape, the same tensor changed in place, and weights outside the path's
    bounds (8-bit, run directly) each give the reference's result, in any order and repeated."""
    _use_isa(monkeypatch, "avx2")
    monkeypatch.setenv("ARQ_LOWBIT_WINOGRAD", loop)
    gen = torch.Generator().manual_seed(11 + len(loop))
    x = torch.randint(0, 16, (2, 40, 6, 7), generator=gen, dtype=torch.uint8).contiguous(memory_format=torch.channels_last)

    def run(tiles, sums, backend, w_bits=4):
        return ops.lowbit_conv2d(x, tiles, sums, torch.ones(24), None, 24, 3, 1, 1, 0, 15, w_bits, backend=backend)

    def weights(limit):
        return torch.randint(-limit, limit + 1, (24, 40, 3, 3), generator=gen, dtype=torch.int8)

    first, second = ops.lowbit_conv_weight_tiles(weights(7)), ops.lowbit_conv_weight_tiles(weights(7))
    wide = ops.lowbit_conv_weight_tiles(weights(127))  # |U| > 127: outside both Winograd paths
    layers = {"first": (first, 4), "second": (second, 4), "wide": (wide, 8)}
    expected = {name: run(*pair, "torch", w_bits) for name, (pair, w_bits) in layers.items()}
    for name in ("first", "second", "wide", "first", "wide"):
        pair, w_bits = layers[name]
        assert torch.equal(run(*pair, "cpp", w_bits), expected[name]), name
    changed = weights(7)
    tiles, sums = ops.lowbit_conv_weight_tiles(changed)
    first[0].copy_(tiles)  # the same tensor, other contents
    first[1].copy_(sums)
    assert torch.equal(run(*first, "cpp"), run(*first, "torch"))
    assert torch.equal(run(*second, "cpp"), expected["second"])


@pytest.mark.parametrize("loop", ["2d", "row"])
def test_kept_winograd_transforms_past_the_cache_bound(monkeypatch, loop):
    """More layers than the transform cache keeps (512 entries): whatever it drops, a layer met again
    after 529 others, or met last, still gets its own transform (the reference's result). What this
    does not show: that the memory stays bounded (the cache has no introspection)."""
    _use_isa(monkeypatch, "avx2")
    monkeypatch.setenv("ARQ_LOWBIT_WINOGRAD", loop)
    gen = torch.Generator().manual_seed(5 + len(loop))
    x = torch.randint(0, 16, (1, 32, 4, 5), generator=gen, dtype=torch.uint8).contiguous(memory_format=torch.channels_last)

    def run(tiles, sums, backend):
        return ops.lowbit_conv2d(x, tiles, sums, torch.ones(8), None, 8, 3, 1, 1, 0, 15, 4, backend=backend)

    layers = [ops.lowbit_conv_weight_tiles(torch.randint(-7, 8, (8, 32, 3, 3), generator=gen, dtype=torch.int8))
              for _ in range(530)]
    expected = {index: run(*layers[index], "torch") for index in (0, 1, 529)}
    for index, pair in enumerate(layers):
        result = run(*pair, "cpp")
        if index in expected:
            assert torch.equal(result, expected[index]), index
    for index in (0, 529, 1, 0):
        assert torch.equal(run(*layers[index], "cpp"), expected[index]), index


@pytest.mark.parametrize("width", [2, 3, 4, 5, 9, 12])
@pytest.mark.parametrize("signed", [False, True])
def test_winograd_and_direct_loops_agree(monkeypatch, width, signed):
    """The AVX2 path's loops for 3x3 stride-1 layers, Winograd F(2 x 2, 3 x 3), F(2, 3) and direct, and
    its default choice among them give the same bits as the reference on fresh random inputs: output
    rows of every width parity (an odd last column runs directly), odd and even heights (F(2 x 2, 3 x 3)
    takes row pairs, an odd last row runs directly), a single output row (too short for it), blocks
    left after the register tiles, partial channel blocks, the zero point in the padding (signed codes)
    or not, with and without padding."""
    _use_isa(monkeypatch, "avx2")
    gen = torch.Generator().manual_seed(width * 2 + signed)
    for shape in [(2, 13, 5, width, 21, 3, 1, 1), (1, 36, 3, width + 2, 16, 3, 1, 0), (2, 36, 6, width, 19, 3, 1, 1),
                  (1, 8, 4, width + 1, 8, 3, 1, 0)]:
        for epilogue in ("codes+stream+relu", "float+bias+residual+relu"):
            args, kwargs, _ = _case(shape, 4, 4, epilogue, gen, signed)
            expected = ops.lowbit_conv2d(*args, **kwargs, backend="torch")
            for loop in [None, *AVX2_LOOPS.values()]:
                if loop is None:
                    monkeypatch.delenv("ARQ_LOWBIT_WINOGRAD", raising=False)
                else:
                    monkeypatch.setenv("ARQ_LOWBIT_WINOGRAD", loop)
                _assert_same(_run_poisoned(args, kwargs, "cpp"), expected)


def test_weight_tiles_round_trip_and_sums():
    gen = torch.Generator().manual_seed(0)
    weight = torch.randint(-8, 8, (13, 12, 3, 3), generator=gen, dtype=torch.int8)
    tiles, sums = ops.lowbit_conv_weight_tiles(weight)
    odd_tiles, _ = ops.lowbit_conv_weight_tiles(weight[:, :7])  # 7 input channels: the 8th weight is 0
    assert odd_tiles.shape == (2, 9, 2, 8, 4) and int(odd_tiles[:, :, 1, :, 3].abs().sum()) == 0
    assert torch.equal(odd_tiles[:, :, :, :, :3], tiles[:, :, :2, :, :3])
    assert tiles.shape == (2, 9, 3, 8, 4) and tiles.dtype == torch.int8 and tiles.is_contiguous()
    assert torch.equal(sums, weight.to(torch.int32).sum(dim=(1, 2, 3)))
    # tile [block, tap, group, j, i] is weight[8 block + j, 4 group + i, tap // 3, tap % 3]; padding zeros
    assert int(tiles[0, 5, 2, 3, 1]) == int(weight[3, 9, 1, 2])
    assert int(tiles[1, 0, 0, 4, 0]) == int(weight[12, 0, 0, 0])
    assert int(tiles[1, :, :, 5:].abs().sum()) == 0


def test_rejects_bad_inputs(monkeypatch):
    _use_isa(monkeypatch, "avx2")  # where 8 x 8 bits can overflow the int16 sums
    gen = torch.Generator().manual_seed(1)
    args, kwargs, _ = _case((1, 8, 5, 5, 8, 3, 1, 1), 4, 4, "codes", gen)
    x = args[0].clone()
    x[0, 0, 0, 0] = 16  # above max_code 15: int16 exactness no longer holds
    with pytest.raises(RuntimeError, match="max_code"):
        ops.lowbit_conv2d(x, *args[1:], **kwargs, backend="cpp")
    with pytest.raises(ValueError, match="max_code"):
        ops.lowbit_conv2d(x, *args[1:], **kwargs, backend="torch")
    with pytest.raises(ValueError, match="overflow int16"):
        ops.lowbit_conv2d(*args[:10], 255, 8, backend="cpp")
    with pytest.raises(RuntimeError, match="overflow int16"):
        torch.ops.arq.lowbit_conv2d(*args[:10], 255, 8, False, None, 0.0, 0, 0.0, 0, 0, 255)
    with pytest.raises(TypeError, match="uint8"):
        ops.lowbit_conv2d(args[0].float(), *args[1:], backend="cpp")
    with pytest.raises(RuntimeError, match="weight_tiles"):
        ops.lowbit_conv2d(args[0], args[1][:, :4].contiguous(), *args[2:], backend="cpp")
    wider = torch.zeros(1, 12, 5, 5, dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    with pytest.raises(RuntimeError, match="weight_tiles"):  # 12 input channels need 3 groups of 4, not 2
        ops.lowbit_conv2d(wider, *args[1:], backend="cpp")
    with pytest.raises(RuntimeError, match="residual"):
        ops.lowbit_conv2d(*args, residual=torch.zeros(1, 8, 4, 4), backend="cpp")
    for backend in ("cpp", "torch"):
        with pytest.raises(ValueError, match="float32 residual goes with float32 output"):
            ops.lowbit_conv2d(*args, **kwargs, residual=torch.zeros(1, 8, 5, 5), backend=backend)
    with pytest.raises(RuntimeError, match="uint8 residual codes with codes output"):  # the op checks it too
        torch.ops.arq.lowbit_conv2d(*args, False, torch.zeros(1, 8, 5, 5, dtype=torch.uint8), 0.1, 0, 0.0, 0, 0, 255)
    with pytest.raises(ValueError, match="int8"):
        ops.lowbit_conv_weight_tiles(torch.zeros(8, 6, 3, 3))
    assert not ops.lowbit_conv_supported(255, 8) and ops.lowbit_conv_supported(15, 4)
    # the int32 paths take 8 x 8 bits (the op's own check), and bound K instead
    monkeypatch.setenv("ARQ_CPU_ISA", "scalar")
    assert ops.lowbit_conv_supported(255, 8)
    assert ops.lowbit_conv2d(*args[:10], 255, 8, backend="cpp").shape == (1, 8, 5, 5)
    huge = torch.zeros(1, 8192, 3, 3, dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    huge_tiles, huge_sums = ops.lowbit_conv_weight_tiles(torch.zeros(8, 8192, 3, 3, dtype=torch.int8))
    with pytest.raises(RuntimeError, match="overflow the int32 sums"):
        ops.lowbit_conv2d(huge, huge_tiles, huge_sums, args[3], None, 8, 3, 1, 1, 0, 255, 8, backend="cpp")


def test_fake_and_opcheck():
    from torch._subclasses.fake_tensor import FakeTensorMode

    gen = torch.Generator().manual_seed(2)
    args, kwargs, _ = _case((2, 8, 7, 9, 12, 3, 2, 1), 4, 4, "codes+stream+relu", gen)
    flat = (*args, kwargs["relu"], kwargs["residual"], kwargs["residual_scale"], kwargs["residual_zero_point"],
            kwargs["out_scale"], kwargs["out_zero_point"], kwargs["out_min"], kwargs["out_max"])
    torch.library.opcheck(torch.ops.arq.lowbit_conv2d, flat)
    with FakeTensorMode() as mode:
        fake = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in flat)
        out = torch.ops.arq.lowbit_conv2d(*fake)
        assert out.shape == (2, 12, 4, 5) and out.dtype == torch.uint8
        assert out.is_contiguous(memory_format=torch.channels_last)
