"""arq_kernels.noise.noisy_input against the plain-torch noise of arq.smoothing.noise: bit for bit."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="Triton is not installed (pip install 'arq[triton]')")

from arq.smoothing.noise import DRAW_ESTIMATE, DRAW_PREDICT, DRAW_SELECT, noisy_batch_reference  # noqa: E402
from arq_kernels.noise import noisy_input, noisy_input_reference  # noqa: E402

pytestmark = pytest.mark.triton

# Counter fields near their limits: a seed above 2^32 (both key words), the last samples
# before 2^32, a large input index.
FIELDS = dict(seed=(1 << 40) + 987_654_321, input_index=4_000_000_000, draw=DRAW_ESTIMATE,
              sample_start=(1 << 32) - 7, count=7)
BIG_BLOCKS = {"BLOCK_S": 8, "BLOCK_P": 2048, "num_warps": 4, "num_stages": 1}
# On a GPU, 16,384 Philox lanes over 4 warps made ptxas run for more than 40 s per dtype (an H200,
# 2026-11-29), so there the tests use one of the tuning candidates: several programs, ragged edges.
GPU_BLOCKS = {"BLOCK_S": 4, "BLOCK_P": 256, "num_warps": 8, "num_stages": 1}
SMALL_BLOCKS = {"BLOCK_S": 2, "BLOCK_P": 16, "num_warps": 4, "num_stages": 1}


@pytest.fixture
def big_blocks(device) -> dict:
    """Few programs under the interpreter (its cost is per program); a tuned-size block on a GPU."""
    return BIG_BLOCKS if device.type == "cpu" else GPU_BLOCKS


def _poisoned(shape, dtype, device):
    if dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.full(shape, 77, dtype=dtype, device=device)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_float_output_is_bit_identical_to_arq_reference(dtype, device, generator, big_blocks):
    x = torch.rand(3, 5, 7, generator=generator).to(dtype).to(device)  # 105 elements: an odd last pair
    out = _poisoned((FIELDS["count"], 3, 5, 7), dtype, device)
    got = noisy_input(x, 0.37, out=out, config=big_blocks, **FIELDS)
    assert got.data_ptr() == out.data_ptr()
    expected = noisy_batch_reference(x.cpu(), 0.37, **FIELDS)  # the certification core's own reference
    assert torch.equal(got.cpu(), expected)
    assert not torch.isnan(got).any()


def test_float64_noise_over_many_pairs(device, generator, big_blocks):
    """Zero input and sigma 1 give the noise itself: 8 x 1536 pairs through every branch of log/sqrt/sin/cos."""
    x = torch.zeros(3, 32, 32, dtype=torch.float64, device=device)
    fields = dict(seed=20251127, input_index=11, draw=DRAW_SELECT, sample_start=1000, count=8)
    got = noisy_input(x, 1.0, config=big_blocks, **fields).cpu()
    expected = noisy_batch_reference(x.cpu(), 1.0, **fields)
    assert torch.equal(got, expected)
    assert 0.9 < got.std().item() < 1.1 and got.abs().max().item() < 8.6


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_float_output_dtype_and_layout(layout, device, generator):
    x = torch.rand(3, 6, 5, generator=generator).to(device)
    kwargs = dict(out_dtype=torch.float16, layout=layout, **FIELDS)
    got = noisy_input(x, 0.5, config=SMALL_BLOCKS, **kwargs)  # many programs, ragged edges
    expected = noisy_input_reference(x.cpu(), 0.5, **kwargs)
    assert got.shape == ((7, 6, 5, 3) if layout == "nhwc" else (7, 3, 6, 5))
    assert got.is_contiguous() and torch.equal(got.cpu(), expected)
    if layout == "nhwc":
        nchw = noisy_input_reference(x.cpu(), 0.5, out_dtype=torch.float16, **FIELDS)
        assert torch.equal(got.cpu(), nchw.permute(0, 2, 3, 1))


@pytest.mark.parametrize(
    "out_dtype, scale, zero_point, layout",
    [(torch.int8, 0.013, 0, "nchw"), (torch.int8, 0.004, 0, "nhwc"),
     (torch.uint8, 0.01, 128, "nhwc"), (torch.uint8, 0.003, 0, "nchw")],
)
def test_quantized_output_is_quantize_of_reference(out_dtype, scale, zero_point, layout, device, generator,
                                                    big_blocks):
    x = torch.rand(3, 9, 7, generator=generator).to(device)
    count = 5
    shape = (count, 9, 7, 3) if layout == "nhwc" else (count, 3, 9, 7)
    out = _poisoned(shape, out_dtype, device)
    kwargs = dict(out_dtype=out_dtype, out_scale=scale, out_zero_point=zero_point, layout=layout,
                  seed=3, input_index=2, draw=DRAW_PREDICT, sample_start=0, count=count)
    got = noisy_input(x, 0.5, out=out, config=big_blocks, **kwargs).cpu()
    expected = noisy_input_reference(x.cpu(), 0.5, **kwargs)
    assert torch.equal(got, expected)
    # the definition, spelled out: clamp(round_half_even(float32 value / scale)) + zero point
    value = noisy_batch_reference(x.cpu(), 0.5, seed=3, input_index=2, draw=DRAW_PREDICT, sample_start=0, count=count)
    lo, hi = (-127, 127) if out_dtype == torch.int8 else (-zero_point, 255 - zero_point)
    codes = torch.clamp(torch.round(value / torch.tensor(scale)), lo, hi) + zero_point
    if layout == "nhwc":
        codes = codes.permute(0, 2, 3, 1)
    assert torch.equal(got.to(torch.int64), codes.to(torch.int64))
    assert int(got.to(torch.int64).min()) >= lo + zero_point and int(got.to(torch.int64).max()) <= hi + zero_point


def test_round_half_to_even_on_exact_ties(device):
    """Inputs on exact .5 code boundaries: a tiny sigma keeps x + sigma z on the tie in float32."""
    ties = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, 126.5, 127.5, -127.5], dtype=torch.float32)
    x = ties.to(device)
    kwargs = dict(out_dtype=torch.int8, out_scale=1.0, seed=0, input_index=0, draw=0, sample_start=0, count=2)
    got = noisy_input(x, 1e-30, **kwargs).cpu()
    assert torch.equal(got, noisy_input_reference(x.cpu(), 1e-30, **kwargs))
    assert got[0].tolist() == [0, 2, 2, 0, -2, -2, 4, 126, 127, -127]


def test_counter_fields_select_the_samples(device, generator):
    x = torch.rand(2, 3, 3, generator=generator).to(device)
    base = dict(seed=5, input_index=1, draw=DRAW_ESTIMATE)
    whole = noisy_input(x, 0.25, sample_start=10, count=6, **base)
    tail = noisy_input(x, 0.25, sample_start=13, count=3, **base)
    assert torch.equal(whole[3:], tail)  # a sample depends on its index, not on the batch
    other_draw = noisy_input(x, 0.25, sample_start=10, count=6, seed=5, input_index=1, draw=DRAW_SELECT)
    assert not torch.equal(whole, other_draw)
    assert noisy_input(x, 0.25, sample_start=10, count=0, **base).shape == (0, 2, 3, 3)


def test_rejects_bad_arguments(device):
    x = torch.rand(3, 4, 4, device=device)
    ok = dict(seed=0, input_index=0, draw=0, sample_start=0, count=2)
    with pytest.raises(ValueError):
        noisy_input(x, 0.0, **ok)
    with pytest.raises(ValueError):
        noisy_input(x, 0.5, **{**ok, "sample_start": (1 << 32) - 1})
    with pytest.raises(ValueError):
        noisy_input(x, 0.5, **{**ok, "seed": -1})
    with pytest.raises(ValueError):
        noisy_input(x, 0.5, out_dtype=torch.int8, **ok)  # no out_scale
    with pytest.raises(ValueError):
        noisy_input(x.reshape(48), 0.5, layout="nhwc", **ok)
    with pytest.raises(ValueError):
        noisy_input(x, 0.5, out=torch.empty(2, 3, 4, 4, dtype=torch.float16, device=device), **ok)


CIFAR_MEAN, CIFAR_STD = [0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.2010]


# the packed GPU stem's formats: signed b-bit codes (zero point 0), 8-bit unsigned codes as c - 128
# (zero point -128), low-bit unsigned codes; and the CPU integer model's uint8 with zero point 128
@pytest.mark.parametrize(
    "out_dtype, scale, zero_point, levels, shape, layout",
    [(torch.int8, 0.0213, 0, (-127, 127), (3, 9, 7), "nhwc"),
     (torch.int8, 0.41, 0, (-7, 7), (3, 5, 11), "nhwc"),
     (torch.int8, 0.0119, -128, (0, 255), (1, 13, 5), "nhwc"),
     (torch.int8, 0.09, 0, (0, 15), (2, 7, 7), "nchw"),
     (torch.uint8, 0.0213, 128, (-128, 127), (3, 9, 7), "nhwc")],
)
def test_normalized_codes_are_the_codes_of_the_normalized_reference(out_dtype, scale, zero_point, levels, shape,
                                                                     layout, device, generator):
    """mean/std: the codes of ((x + sigma z) - mean[c]) / std[c] in float32, as the model's NormalizeLayer
    and its first layer's quantizer compute them from the float noisy batch, bit for bit."""
    from arq.ops import quantize_codes_reference

    channels = shape[0]
    x = torch.rand(*shape, generator=generator)
    mean = torch.tensor((CIFAR_MEAN * 2)[:channels])
    std = torch.tensor((CIFAR_STD * 2)[:channels])
    count = 6
    fields = dict(seed=(1 << 33) + 5, input_index=9, draw=DRAW_ESTIMATE, sample_start=(1 << 32) - count, count=count)
    kwargs = dict(out_dtype=out_dtype, out_scale=scale, out_zero_point=zero_point, qmin=levels[0], qmax=levels[1],
                  layout=layout, **fields)
    out_shape = (count, shape[1], shape[2], channels) if layout == "nhwc" else (count, *shape)
    out = _poisoned(out_shape, out_dtype, device)
    got = noisy_input(x.to(device), 0.5, mean=mean.to(device), std=std.to(device), out=out, config=SMALL_BLOCKS,
                      **kwargs).cpu()
    assert torch.equal(got, noisy_input_reference(x, 0.5, mean=mean, std=std, **kwargs))
    # the definition, through the float path: NormalizeLayer's float32 ops, then the quantizer
    value = noisy_batch_reference(x, 0.5, **fields)
    normalized = (value - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
    codes = quantize_codes_reference(normalized, scale, zero_point, levels[0] + zero_point, levels[1] + zero_point,
                                     dtype=out_dtype)
    assert torch.equal(got, codes.permute(0, 2, 3, 1) if layout == "nhwc" else codes)
    spread = got.to(torch.int64)
    assert spread.min() == levels[0] + zero_point or spread.max() == levels[1] + zero_point  # clamps reached
    assert len(spread.unique()) > 5


def test_normalization_ties_round_half_to_even(device):
    """Normalized values on exact .5 code boundaries (a tiny sigma keeps x + sigma z on x in float32)."""
    x = torch.tensor([1.5, 2.5, 0.5, -0.5, 3.5, 6.0], dtype=torch.float32).view(1, 2, 3)
    mean, std = torch.tensor([0.5]), torch.tensor([0.5])  # (v - 0.5) / 0.5: 2, 4, 0, -2, 6, 11 (exact)
    kwargs = dict(out_dtype=torch.int8, out_scale=4.0, seed=0, input_index=0, draw=0, sample_start=0, count=2)
    got = noisy_input(x.to(device), 1e-30, mean=mean.to(device), std=std.to(device), **kwargs).cpu()
    # quotients 0.5, 1, 0, -0.5, 1.5, 2.75
    assert got[0].flatten().tolist() == [0, 1, 0, 0, 2, 3]
    assert torch.equal(got, noisy_input_reference(x, 1e-30, mean=mean, std=std, **kwargs))


def test_normalization_rejects_bad_arguments(device):
    x = torch.rand(3, 4, 4, device=device)
    mean, std = torch.zeros(3, device=device), torch.ones(3, device=device)
    ok = dict(seed=0, input_index=0, draw=0, sample_start=0, count=2, out_dtype=torch.int8, out_scale=0.1)
    with pytest.raises(ValueError, match="mean and std go together"):
        noisy_input(x, 0.5, mean=mean, **ok)
    with pytest.raises(ValueError, match="before quantizing"):
        noisy_input(x, 0.5, mean=mean, std=std, **{**ok, "out_dtype": torch.float32, "out_scale": None})
    with pytest.raises(ValueError, match="before quantizing"):
        noisy_input(x.double(), 0.5, mean=mean, std=std, **ok)
    with pytest.raises(ValueError, match="mean must be a float32 tensor of 3 values"):
        noisy_input(x, 0.5, mean=torch.zeros(2, device=device), std=std, **ok)
    with pytest.raises(ValueError, match="std must be a float32 tensor"):
        noisy_input(x, 0.5, mean=mean, std=std.double(), **ok)
    with pytest.raises(ValueError, match="std finite and > 0"):
        noisy_input(x, 0.5, mean=mean, std=torch.tensor([1.0, 0.0, 1.0], device=device), **ok)
    noisy_input(x, 0.5, mean=mean, std=std, **ok)  # checked once, then remembered per tensor version
    std[1] = float("inf")  # changed in place: checked again
    with pytest.raises(ValueError, match="std finite and > 0"):
        noisy_input(x, 0.5, mean=mean, std=std, **ok)
    with torch.inference_mode():  # as certify runs it: inference tensors have no version, checked each call
        mean, std = torch.zeros(3, device=device), torch.ones(3, device=device)
        noisy_input(x, 0.5, mean=mean, std=std, **ok)
        std[0] = 0.0
        with pytest.raises(ValueError, match="std finite and > 0"):
            noisy_input(x, 0.5, mean=mean, std=std, **ok)


@pytest.mark.parametrize("dtype, zero_point, code_min, code_max",
                         [(torch.int8, 0, -127, 127), (torch.int8, -128, -128, 127), (torch.uint8, 128, 0, 255)])
def test_noisy_codes_batch_on_triton_is_the_reference(dtype, zero_point, code_min, code_max, device, generator):
    """arq.smoothing.noise.noisy_codes_batch through the Triton kernel: InputCodes.encode of the float
    noisy batch, [count, C, H, W] in channels_last memory."""
    from arq.smoothing.noise import InputCodes, noisy_codes_batch, noisy_codes_batch_reference

    codes = InputCodes(tuple(CIFAR_MEAN), tuple(CIFAR_STD), 0.0173, zero_point, code_min, code_max, dtype=dtype)
    x = torch.rand(3, 8, 6, generator=generator)
    fields = dict(seed=42, input_index=3, draw=DRAW_ESTIMATE, sample_start=100, count=5)
    with torch.inference_mode():  # as certify asks for them: the format's tensors are made here first
        got = noisy_codes_batch(x.to(device), 0.25, codes, backend="triton", **fields)
        assert not codes.tensors(device)[0].is_inference()
    assert got.dtype == dtype and got.shape == (5, 3, 8, 6)
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(got.cpu(), noisy_codes_batch_reference(x, 0.25, codes, **fields))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_imagenet_sized_batch_matches_reference():
    generator = torch.Generator().manual_seed(7)
    x = torch.rand(3, 224, 224, generator=generator)
    fields = dict(seed=123456789012, input_index=77, draw=DRAW_ESTIMATE, sample_start=4096, count=16)
    got = noisy_input(x.cuda(), 0.5, **fields).cpu()
    assert torch.equal(got, noisy_batch_reference(x, 0.5, **fields))
    codes = noisy_input(x.cuda(), 0.5, out_dtype=torch.int8, out_scale=0.02, layout="nhwc", **fields).cpu()
    assert torch.equal(codes, noisy_input_reference(x, 0.5, out_dtype=torch.int8, out_scale=0.02, layout="nhwc", **fields))
