import math

import pytest
import torch
from scipy import stats

from arq._ext import compiled_ops_available, cuda_ops_available
from arq.smoothing import noise

requires_compiled = pytest.mark.skipif(not compiled_ops_available(), reason="arq._C not built")


@pytest.mark.parametrize(
    "counter, key, expected",
    [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ],
)
def test_philox_matches_random123_known_answers(counter, key, expected):
    words = noise.philox4x32_10(*[torch.tensor([c], dtype=torch.int64) for c in counter], *key)
    assert tuple(int(w) for w in words) == expected


def test_polynomial_log_sin_cos_sqrt_are_accurate():
    u = torch.rand(200_000, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * (1 - 1e-12) + 1e-15
    assert torch.allclose(noise._log_unit(u), torch.log(u), rtol=4e-16, atol=1e-15)
    cos_t, sin_t = noise._cos_sin_two_pi(u)
    assert (cos_t - torch.cos(2 * math.pi * u)).abs().max() < 2e-15
    assert (sin_t - torch.sin(2 * math.pi * u)).abs().max() < 2e-15
    positive = u * 80.0
    assert torch.allclose(noise._sqrt_positive(positive), torch.sqrt(positive), rtol=3e-16, atol=0)


def test_reference_noise_is_standard_normal():
    z = noise.gaussian_reference(1000, seed=3, input_index=11, draw=1, sample_start=0, count=200).flatten()
    assert z.shape == (200_000,)
    result = stats.kstest(z.numpy(), "norm")
    assert result.pvalue > 1e-3
    assert abs(float(z.mean())) < 0.01 and abs(float(z.std()) - 1) < 0.01
    # pairs are independent: correlation of neighbours near zero
    pairs = z.reshape(-1, 2)
    assert abs(float(torch.corrcoef(pairs.T)[0, 1])) < 0.01


def test_noise_depends_only_on_its_counter():
    full = noise.gaussian_reference(37, seed=9, input_index=4, draw=1, sample_start=0, count=50)
    part = noise.gaussian_reference(37, seed=9, input_index=4, draw=1, sample_start=20, count=7)
    assert torch.equal(full[20:27], part)
    # a longer input has the same leading elements
    longer = noise.gaussian_reference(40, seed=9, input_index=4, draw=1, sample_start=0, count=50)
    assert torch.equal(longer[:, :37], full)
    for other in (dict(seed=10, input_index=4, draw=1), dict(seed=9, input_index=5, draw=1),
                  dict(seed=9, input_index=4, draw=0)):
        different = noise.gaussian_reference(37, sample_start=0, count=50, **other)
        assert not torch.isclose(different, full).any(dim=1).all()


def test_draws_are_uncorrelated_streams():
    select = noise.gaussian_reference(64, seed=0, input_index=0, draw=noise.DRAW_SELECT, sample_start=0, count=2000)
    estimate = noise.gaussian_reference(64, seed=0, input_index=0, draw=noise.DRAW_ESTIMATE, sample_start=0,
                                        count=2000)
    correlation = torch.corrcoef(torch.stack([select.flatten(), estimate.flatten()]))[0, 1]
    assert abs(float(correlation)) < 0.01


@requires_compiled
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 5, 7), (1,), (2, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_cpp_noise_is_bit_identical_to_reference(shape, dtype):
    generator = torch.Generator().manual_seed(hash((shape, str(dtype))) % 2**31)
    x = torch.rand(shape, generator=generator).to(dtype)
    kwargs = dict(seed=2**40 + 17, input_index=123456, draw=1, sample_start=4_000_000_000, count=29)
    expected = noise.noisy_batch(x, 0.37, backend="torch", **kwargs)
    out = noise.noisy_batch(x, 0.37, backend="cpp", **kwargs)
    assert out.dtype == dtype and out.shape == (29, *shape)
    assert torch.equal(out.view(-1).view(torch.uint8) if dtype.itemsize == 1 else out, expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not cuda_ops_available(), reason="needs CUDA and arq CUDA ops")
@pytest.mark.parametrize("shape", [(3, 32, 32), (3, 5, 7), (1,)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_cuda_noise_is_bit_identical_to_reference(shape, dtype):
    generator = torch.Generator().manual_seed(hash((shape, str(dtype), "cuda")) % 2**31)
    x = torch.rand(shape, generator=generator).to(dtype)
    kwargs = dict(seed=2**40 + 17, input_index=123456, draw=1, sample_start=4_000_000_000, count=1000)
    expected = noise.noisy_batch(x, 0.37, backend="torch", **kwargs)
    out = noise.noisy_batch(x.cuda(), 0.37, backend="cuda", **kwargs)
    assert out.is_cuda and out.dtype == dtype and out.shape == (1000, *shape)
    assert torch.equal(out.cpu(), expected)


def test_noisy_batch_adds_sigma_times_noise():
    x = torch.rand(3, 4, 4, dtype=torch.float64)
    z = noise.gaussian_reference(x.numel(), seed=1, input_index=2, draw=1, sample_start=5, count=6)
    out = noise.noisy_batch(x, 0.5, seed=1, input_index=2, draw=1, sample_start=5, count=6, backend="torch")
    assert torch.equal(out, (x.reshape(1, -1) + z * 0.5).reshape(6, 3, 4, 4))


def test_tail_bound_is_the_cut_off_mass():
    # the largest radius the sampler can produce: u1 = 2^-53
    smallest_u = torch.tensor([2.0**-53], dtype=torch.float64)
    largest_radius = float(noise._sqrt_positive(noise._log_unit(smallest_u) * -2.0))
    assert largest_radius == pytest.approx(math.sqrt(-2 * math.log(2.0**-53)), rel=1e-14)
    # exact Rayleigh tail beyond the next grid point's radius = the mass of the lowest cell, 2^-52
    next_radius = math.sqrt(-2 * math.log(1.5 * 2.0**-52))
    assert math.exp(-next_radius**2 / 2) <= 2.0**-52 * 1.5
    assert noise.noise_tv_bound(784) == 392 * 2.0**-52
    assert noise.noise_tv_bound(3 * 224 * 224) < 2e-11


@pytest.mark.parametrize("bad", [dict(seed=-1), dict(seed=2**63), dict(input_index=2**32), dict(draw=-1),
                                 dict(sample_start=2**32 - 1, count=2)])
def test_counter_fields_out_of_range_are_rejected(bad):
    kwargs = dict(seed=0, input_index=0, draw=0, sample_start=0, count=1) | bad
    with pytest.raises(ValueError, match=next(iter(bad))):
        noise.noisy_batch(torch.zeros(4), 1.0, backend="torch", **kwargs)


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="backend"):
        noise.noisy_batch(torch.zeros(4), 1.0, seed=0, input_index=0, draw=0, sample_start=0, count=1,
                          backend="fast")


# ---------------------------------------------------------------------------------------------
# noise written as a first integer layer's input codes (noisy_codes_batch)
# ---------------------------------------------------------------------------------------------

def _random_format(channels: int, generator: torch.Generator, normalized: bool, bits: int, signed: bool):
    zero_point = (1 << (bits - 1)) if signed else 0
    q_lo, q_hi = (-((1 << (bits - 1)) - 1), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    mean = tuple(torch.rand(channels, generator=generator).tolist()) if normalized else (0.0,) * channels
    std = tuple((torch.rand(channels, generator=generator) * 0.3 + 0.1).tolist()) if normalized else (1.0,) * channels
    # a range narrower than the noisy values', so both clamps are reached
    scale = float(torch.tensor((float(torch.rand(1, generator=generator)) * 0.2 + 0.3) / q_hi, dtype=torch.float32))
    return noise.InputCodes(mean, std, scale, zero_point, q_lo + zero_point, q_hi + zero_point)


@requires_compiled
@pytest.mark.parametrize("shape", [(3, 32, 32), (3, 7, 5), (1, 5, 7), (5, 3, 3), (2, 1, 1), (3, 9, 1)])
@pytest.mark.parametrize("normalized,bits,signed", [(True, 8, True), (False, 8, False), (True, 4, False),
                                                    (True, 2, True)])
def test_cpp_noise_codes_are_the_reference_codes_bit_for_bit(shape, normalized, bits, signed):
    generator = torch.Generator().manual_seed(sum(shape) * 7 + bits)
    x = torch.rand(shape, generator=generator)
    codes = _random_format(shape[0], generator, normalized, bits, signed)
    fields = dict(seed=int(torch.randint(0, 2**40, (1,), generator=generator)), input_index=5, draw=1,
                  sample_start=int(torch.randint(0, 1000, (1,), generator=generator)), count=7)
    # sigma large enough to reach both ends of the code range
    got = noise.noisy_codes_batch(x, 0.9, codes, backend="cpp", **fields)
    expected = noise.noisy_codes_batch_reference(x, 0.9, codes, **fields)
    assert got.dtype == torch.uint8 and got.shape == (7, *shape)
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(got, expected)
    if got.numel() >= 60:
        assert int(got.min()) == codes.code_min and int(got.max()) == codes.code_max
    # and what the float path computes: the noisy batch, its normalization, then the codes
    noisy = noise.noisy_batch(x, 0.9, backend="cpp", **fields)
    mean, std = codes.tensors()
    normalized_batch = (noisy - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
    float_path = torch.ops.arq.quantize_codes(normalized_batch, codes.scale, codes.zero_point, codes.code_min,
                                              codes.code_max)
    assert torch.equal(got, float_path)


@requires_compiled
def test_noise_codes_of_no_sample_and_of_split_ranges():
    x = torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(3))
    codes = noise.InputCodes((0.5, 0.4, 0.3), (0.2, 0.25, 0.3), 0.02, 128, 1, 255)
    fields = dict(seed=11, input_index=2, draw=noise.DRAW_ESTIMATE)
    assert noise.noisy_codes_batch(x, 0.25, codes, sample_start=0, count=0, **fields).shape == (0, 3, 4, 4)
    whole = noise.noisy_codes_batch(x, 0.25, codes, sample_start=10, count=6, **fields)
    tail = noise.noisy_codes_batch(x, 0.25, codes, sample_start=13, count=3, **fields)
    assert torch.equal(whole[3:], tail)


def test_noise_codes_reject_what_has_no_codes():
    codes = noise.InputCodes((0.5,), (0.2,), 0.02, 0, 0, 255)
    fields = dict(seed=1, input_index=0, draw=1, sample_start=0, count=2)
    with pytest.raises(ValueError, match="x must be one float32 input"):
        noise.noisy_codes_batch(torch.rand(1, 3, 3, dtype=torch.float64), 0.5, codes, **fields)
    with pytest.raises(ValueError, match="x must be one float32 input"):
        noise.noisy_codes_batch(torch.rand(2, 3, 3), 0.5, codes, **fields)
    with pytest.raises(ValueError, match="std finite and > 0"):
        noise.InputCodes((0.5,), (0.0,), 0.02, 0, 0, 255)
    with pytest.raises(ValueError, match="scale must be finite and > 0"):
        noise.InputCodes((0.5,), (0.2,), 0.0, 0, 0, 255)
    with pytest.raises(ValueError, match="code_min <= code_max"):
        noise.InputCodes((0.5,), (0.2,), 0.02, 0, 10, 5)
    with pytest.raises(ValueError, match="uint8 codes need 0 <= code_min"):
        noise.InputCodes((0.5,), (0.2,), 0.02, -128, -128, 127)
    with pytest.raises(ValueError, match="int8 codes need -128 <= code_min"):
        noise.InputCodes((0.5,), (0.2,), 0.02, 0, 0, 255, dtype=torch.int8)
    with pytest.raises(ValueError, match="dtype must be torch.uint8 or torch.int8"):
        noise.InputCodes((0.5,), (0.2,), 0.02, 0, 0, 255, dtype=torch.int16)
    if compiled_ops_available():
        with pytest.raises(RuntimeError, match="x must be finite"):
            noise.noisy_codes_batch(torch.full((1, 3, 3), float("nan")), 0.5, codes, backend="cpp", **fields)


def test_int8_codes_off_cpu_kernels_are_the_reference():
    """int8 codes (the packed GPU kernels' format) have no C++ kernel: on CPU every backend but Triton
    gives the reference, which encodes as the formula says (8-bit unsigned codes as c - 128)."""
    x = torch.rand(3, 5, 4, generator=torch.Generator().manual_seed(8))
    codes = noise.InputCodes((0.5, 0.4, 0.3), (0.2, 0.25, 0.3), 0.013, -128, -128, 127, dtype=torch.int8)
    fields = dict(seed=3, input_index=1, draw=noise.DRAW_ESTIMATE, sample_start=0, count=4)
    got = noise.noisy_codes_batch(x, 0.25, codes, **fields)
    assert got.dtype == torch.int8 and got.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(got, noise.noisy_codes_batch_reference(x, 0.25, codes, **fields))
    value = noise.noisy_batch_reference(x, 0.25, **fields)
    unsigned = torch.clamp(torch.round(((value - codes.tensors()[0].view(1, -1, 1, 1))
                                        / codes.tensors()[1].view(1, -1, 1, 1)) / torch.tensor(0.013)), 0, 255)
    assert torch.equal(got.to(torch.int64), unsigned.to(torch.int64) - 128)
