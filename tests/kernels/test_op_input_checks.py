"""Bad input to the compiled ops and the Triton launchers: a named error, never a crash or garbage.

Each case was found by feeding the ops inputs no model produces (sizes that overflow int64, codes
outside the declared bit width, scales that are 0 or inf as float32, counters past 2^32, strided
vectors, tensors on two devices); before the checks they segfaulted, read uninitialized memory or
returned wrong numbers.
"""
from __future__ import annotations

import pytest
import torch

from arq import ops
from arq._ext import compiled_ops_available

needs_ops = pytest.mark.skipif(not compiled_ops_available(), reason="arq._C not built")


@needs_ops
def test_packed_conv2d_refuses_a_geometry_whose_sizes_overflow():
    """kernel 2^32 x 2^32 made K = kh * kw * C wrap to 0, so a 0-word weight passed and the gather wrote
    far outside its buffer (SIGSEGV)."""
    x = torch.zeros(1, 1, 1, 1, dtype=torch.int8)
    with pytest.raises(RuntimeError, match="packed_conv2d: kernel sizes must be in 1..1048576"):
        torch.ops.arq.packed_conv2d(x, torch.zeros(1, 0, dtype=torch.int32), 4, torch.ones(1), None, 1.0,
                                    2**32, 2**32, 1, 2**31, False, None, 0.0)
    with pytest.raises(RuntimeError, match="padding must be in 0..1048576"):
        torch.ops.arq.packed_conv2d(x, torch.zeros(1, 1, dtype=torch.int32), 4, torch.ones(1), None, 1.0,
                                    1, 1, 1, 2**40, False, None, 0.0)


@needs_ops
def test_lowbit_conv2d_refuses_overflowing_geometry_and_codes_outside_w_bits():
    """The AVX2 path adds byte pairs in int16 chunks sized for the declared w_bits: 8-bit codes declared
    as 2-bit saturated them (462 wrong outputs), so the codes are checked."""
    weight = torch.full((11, 5, 3, 3), 127, dtype=torch.int8)
    tiles, sums = ops.lowbit_conv_weight_tiles(weight)
    # 8-bit codes with 8-bit weights on the int32 paths; the AVX2 path refuses them (int16 pair sums),
    # so there the largest code it takes with 8-bit weights
    max_code = 255 if ops.lowbit_conv_supported(255, 8) else 127
    x = torch.full((1, 5, 6, 7), max_code, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="magnitude 127, outside 2-bit weights' range"):
        torch.ops.arq.lowbit_conv2d(x, tiles, sums, torch.ones(11), torch.zeros(11), 11, 3, 1, 1, 0, max_code, 2,
                                    False, None, 0.0, 0, 0.0, 0, 0, 255)
    with pytest.raises(RuntimeError, match="need kernel_size and stride in 1..1048576"):
        torch.ops.arq.lowbit_conv2d(x, tiles, sums, torch.ones(11), torch.zeros(11), 11, 2**32, 1, 2**31, 0, max_code,
                                    8, False, None, 0.0, 0, 0.0, 0, 0, 255)
    # the same weights at their own width run, and equal the reference
    out = torch.ops.arq.lowbit_conv2d(x, tiles, sums, torch.ones(11), torch.zeros(11), 11, 3, 1, 1, 0, max_code, 8,
                                      False, None, 0.0, 0, 0.0, 0, 0, 255)
    assert torch.equal(out, ops.lowbit_conv2d_reference(x, tiles, sums, torch.ones(11), torch.zeros(11), 11, 3, 1, 1,
                                                        0, max_code, 8))


@needs_ops
@pytest.mark.parametrize("scale", [1e-50, 1e300, 0.0, -1.0, float("nan")])
def test_scales_are_checked_as_the_float32_the_kernels_use(scale):
    """1e-50 passed a double check but is 0 as float32: its NaN quotients became codes outside
    [code_min, code_max], different on each instruction-set path. (The dispatchers refuse 0, negative
    and NaN scales themselves; the ops refuse the rest.)"""
    with pytest.raises((RuntimeError, ValueError), match="scale must be"):
        ops.quantize_codes(torch.zeros(11), scale, 5, 3, 200)
    with pytest.raises(RuntimeError, match="quantize_codes: scale must be a positive float32"):
        torch.ops.arq.quantize_codes(torch.zeros(11), scale, 5, 3, 200)
    codes = torch.full((11,), 5, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="requantize_codes: out_scale must be a positive float32"):
        torch.ops.arq.requantize_codes(codes, 0.1, 5, scale, 9, 3, 200)
    with pytest.raises(RuntimeError, match="requantize_codes: in_scale must be a positive float32"):
        torch.ops.arq.requantize_codes(codes, scale, 5, 0.1, 9, 3, 200)
    mean, std = torch.tensor([0.5]), torch.tensor([0.25])
    with pytest.raises(RuntimeError, match="noisy_input_codes: scale must be a positive float32"):
        torch.ops.arq.noisy_input_codes(torch.full((1, 1, 4), 0.5), 0.1, 0, 0, 0, 0, 1, mean, std, scale, 7, 3, 200)


@needs_ops
def test_noise_counters_past_2_to_the_32_are_refused_without_overflow():
    """sample_start 2^63 - 1 made sample_start + count wrap negative and pass; its noise was sample
    2^32 - 1's."""
    x = torch.zeros(4)
    with pytest.raises(RuntimeError, match=r"must lie in \[0, 2\^32\)"):
        torch.ops.arq.noisy_input(x, 1.0, 0, 0, 0, 2**63 - 1, 1)
    with pytest.raises(RuntimeError, match=r"must lie in \[0, 2\^32\)"):
        torch.ops.arq.noisy_input_codes(torch.zeros(1, 1, 4), 1.0, 0, 0, 0, 2**63 - 1, 1, torch.zeros(1),
                                        torch.ones(1), 0.05, 128, 0, 255)
    with pytest.raises(RuntimeError, match="sigma must be finite"):
        torch.ops.arq.noisy_input(x, float("inf"), 0, 0, 0, 0, 1)
    last = torch.ops.arq.noisy_input(x, 1.0, 0, 0, 0, 2**32 - 1, 1)  # the last counter is still fine
    assert torch.isfinite(last).all()


def test_the_reference_noise_refuses_a_negative_sample_start():
    from arq.smoothing.noise import noisy_batch

    with pytest.raises(ValueError, match="sample_start must be an integer in"):
        noisy_batch(torch.zeros(1, 2, 2), 0.25, seed=0, input_index=0, draw=0, sample_start=-1, count=1,
                    backend="torch")


@needs_ops
def test_a_call_mixing_cpu_and_meta_tensors_is_refused_not_answered_with_empty_memory():
    """One meta argument sends a CPU call to the fake kernel, whose uninitialized output was returned."""
    x = torch.randint(-8, 8, (64, 10), dtype=torch.int8)
    packed = ops.pack_weights(torch.ones(64, 10, dtype=torch.int8), 4)
    with pytest.raises(RuntimeError, match=r"packed_linear: expected all tensors on one device"):
        torch.ops.arq.packed_linear(x, packed, 4, torch.ones(64, device="meta"), None, 1.0, False, None, 0.0)
    with pytest.raises(RuntimeError, match=r"vote_count: expected all tensors on one device"):
        torch.ops.arq.vote_count(torch.randn(8, 3), torch.randn(5, 3, device="meta"), None, 5)
    with pytest.raises(RuntimeError, match=r"noisy_input_codes: expected all tensors on one device"):
        torch.ops.arq.noisy_input_codes(torch.rand(3, 4, 5), 0.25, 0, 0, 0, 0, 2, torch.zeros(3, device="meta"),
                                        torch.ones(3), 0.05, 10, 0, 255)
    # all on meta: the fakes still give shapes (what torch.compile traces)
    meta = torch.ops.arq.packed_linear(x.to("meta"), packed.to("meta"), 4, torch.ones(64, device="meta"), None, 1.0,
                                       False, None, 0.0)
    assert meta.shape == (64, 64) and meta.device.type == "meta"


# --- the Triton launchers (under TRITON_INTERPRET=1 on CPU, set by this folder's conftest) -----------------


def test_triton_noise_refuses_a_negative_sample_start(device):
    from arq_kernels.noise import noisy_input

    with pytest.raises(ValueError, match="sample_start must be an integer in"):
        noisy_input(torch.zeros(1, 2, 2, device=device), 0.25, seed=0, input_index=0, draw=0, sample_start=-1,
                    count=1)


def test_triton_packed_linear_refuses_a_k_its_accumulator_cannot_hold(device):
    from arq_kernels.packed_matmul import packed_linear

    k = 65536
    x = torch.ones(1, k, dtype=torch.int8, device=device)
    packed = ops.pack_weights(torch.ones(1, k, dtype=torch.int8), 8).to(device)
    with pytest.raises(ValueError, match="K = 65536 exceeds 65535"):
        packed_linear(x, packed, 8, torch.ones(1, device=device))


def test_triton_epilogue_and_votes_read_strided_vectors_as_their_values(device, generator):
    """Strided scales, bias and weight_scale were read as if dense: other channels' values."""
    from arq_kernels.packed_matmul import packed_linear, packed_linear_reference
    from arq_kernels.votes import vote_count, vote_count_reference

    x = torch.randint(-8, 8, (33, 20), dtype=torch.int8, generator=generator).to(device)
    packed = ops.pack_weights(torch.randint(-7, 8, (6, 20), dtype=torch.int8, generator=generator), 4).to(device)
    scales = torch.rand(12, generator=generator).to(device)[::2]
    bias = torch.randn(12, generator=generator).to(device)[::2]
    expected = packed_linear_reference(x, packed, 4, scales.contiguous(), bias.contiguous(), x_scale=0.5)
    out = torch.full_like(expected, float("nan"))
    packed_linear(x, packed, 4, scales, bias, x_scale=0.5, out=out)
    assert torch.equal(out, expected)

    # integer-valued floats: exact sums in any order, so a GPU's products compare exactly too
    features = torch.randint(-4, 5, (40, 7), generator=generator).float().to(device)
    weight = torch.randint(-4, 5, (5, 7), generator=generator).float().to(device)
    strided_bias = (torch.randperm(10, generator=generator).float() * 3).to(device)[::2]
    assert torch.equal(vote_count(features, weight, strided_bias, 5),
                       vote_count_reference(features, weight, strided_bias.contiguous(), 5))


@pytest.mark.parametrize("scale", [0.0, -0.5, float("nan"), 1e-50])
def test_triton_quantize_refuses_a_scale_that_is_not_a_positive_float32(device, scale):
    from arq_kernels.quantize import quantize_nhwc

    with pytest.raises(ValueError, match="scale must be a positive float32"):
        quantize_nhwc(torch.zeros(1, 2, 2, 2, device=device), scale, -7, 7)


def _packed_case():
    x = torch.randint(-8, 8, (5, 3, 4, 6), dtype=torch.int8)  # NHWC, C = 6
    weight = torch.randint(-7, 8, (7, 3 * 3 * 6), dtype=torch.int8)
    return x, ops.pack_weights(weight, 4), torch.rand(7), torch.rand(7)


_BAD_PACKED = [
    # (what is wrong, the keyword arguments changed, the message expected)
    ("scales of the wrong length", {"scales": torch.rand(6)}, r"scales must be float32 \[7\]"),
    ("float64 bias", {"bias": torch.rand(7, dtype=torch.float64)}, r"bias must be float32 \[7\]"),
    ("residual of the wrong shape", {"residual": torch.rand(5, 3, 4, 6)}, r"residual must be float32 \[5, 3, 4, 7\]"),
    ("weights packed for another K", {"packed_weight": ops.pack_weights(torch.zeros(7, 60, dtype=torch.int8), 4)},
     "packed_weight has 8 words a row; K = 54 at 4 bits needs 7"),
    ("w_bits out of range", {"w_bits": 9}, "w_bits must be in 2..8"),
    ("x_scale overflowing float32", {"x_scale": 1e300}, "x_scale must be finite as a float32"),
]


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpp", marks=needs_ops)])
@pytest.mark.parametrize("case, changes, message", _BAD_PACKED, ids=[case[0] for case in _BAD_PACKED])
def test_packed_conv2d_refuses_bad_arguments_on_every_cpu_backend(backend, case, changes, message):
    """The reference path (backend="torch", and "auto" without arq._C) checked nothing: a residual of
    the wrong shape broadcast into a result, scales of the wrong length raised a raw broadcast error."""
    x, packed, scales, bias = _packed_case()
    arguments = dict(x_nhwc=x, packed_weight=packed, w_bits=4, scales=scales, bias=bias, x_scale=0.5)
    arguments.update(changes)
    with pytest.raises((ValueError, TypeError, RuntimeError), match=message):
        ops.packed_conv2d(**arguments, backend=backend)


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpp", marks=needs_ops)])
def test_packed_linear_and_vote_count_refuse_bad_arguments_on_every_cpu_backend(backend):
    x = torch.randint(-8, 8, (4, 10), dtype=torch.int8)
    packed = ops.pack_weights(torch.randint(-7, 8, (3, 10), dtype=torch.int8), 4)
    with pytest.raises((ValueError, RuntimeError), match=r"scales must be float32 \[3\]"):
        ops.packed_linear(x, packed, 4, torch.rand(4), backend=backend)
    with pytest.raises((TypeError, RuntimeError), match="x must be int8 or uint8"):
        ops.packed_linear(x.float(), packed, 4, torch.rand(3), backend=backend)
    with pytest.raises((ValueError, RuntimeError), match=r"residual must be float32 \[4, 3\]"):
        ops.packed_linear(x, packed, 4, torch.rand(3), residual=torch.rand(1, 3), backend=backend)
    features, weight = torch.rand(6, 5), torch.rand(3, 5)
    with pytest.raises((ValueError, RuntimeError), match=r"vote_count: (.*num_classes|weight must be \[4, 5\])"):
        ops.vote_count(features, weight, None, 4, backend=backend)
    with pytest.raises((ValueError, RuntimeError), match="vote_count: .*bias"):
        ops.vote_count(features, weight, torch.rand(2), 3, backend=backend)


def test_the_packed_references_still_equal_the_good_calls():
    x = torch.randint(-8, 8, (2, 5, 5, 3), dtype=torch.int8)
    weight = torch.randint(-1, 2, (4, 27), dtype=torch.int8)
    packed = ops.pack_weights(weight, 2)
    out = ops.packed_conv2d(x, packed, 2, torch.ones(4), backend="torch")
    expected = torch.nn.functional.conv2d(x.permute(0, 3, 1, 2).double(),
                                          ops.matrix_to_conv_weight(weight, (4, 3, 3, 3)).double(), padding=1)
    assert torch.equal(out, expected.permute(0, 2, 3, 1).float())
