import pytest
import torch

from arq.quant.quantizers import (
    ActivationQuantizer,
    QuantConfig,
    _quantile,
    activation_levels,
    fake_quantize_activation,
    fake_quantize_weight,
    quantize_weight,
    weight_clip_ratio,
    weight_scale,
)

BITS = list(range(2, 9))


def _quantize_weight(weight, bits, method):
    ratio = weight_clip_ratio(weight, bits, method)
    scale = weight_scale(weight, bits, ratio)
    return fake_quantize_weight(weight, bits, scale), scale, ratio


@pytest.mark.parametrize("bits", BITS)
def test_max_clip_weight_error_is_at_most_half_a_step(bits):
    weight = torch.randn(16, 8, 3, 3, generator=torch.Generator().manual_seed(bits))
    w_hat, scale, ratio = _quantize_weight(weight, bits, "max")
    qmax = 2 ** (bits - 1) - 1
    amax = weight.abs().amax(dim=(1, 2, 3))
    assert torch.equal(ratio, torch.ones(16))
    torch.testing.assert_close(scale, amax / qmax)
    step = scale.view(-1, 1, 1, 1)
    assert bool(((w_hat - weight).abs() <= step / 2 * (1 + 1e-5)).all())
    codes = quantize_weight(weight, bits, scale)
    assert int(codes.abs().max()) == qmax  # the largest weight of each channel hits q_max
    assert torch.equal(codes.float() * step, w_hat)


def test_weight_error_halves_per_extra_bit():
    weight = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    errors = [float(((_quantize_weight(weight, b, "max")[0] - weight) ** 2).mean()) for b in BITS]
    ratios = [errors[i + 1] / errors[i] for i in range(len(errors) - 1)]
    # uniform rounding noise step^2 / 12: the step halves (roughly: q_max = 2^(b-1) - 1) per bit
    for bits, ratio in zip(BITS[1:], ratios):
        expected = ((2 ** (bits - 2) - 1) / (2 ** (bits - 1) - 1)) ** 2
        assert ratio == pytest.approx(expected, rel=0.35), (bits, ratio, expected)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_mse_clip_never_worse_than_max_and_better_at_low_bits(bits):
    weight = torch.randn(32, 144, generator=torch.Generator().manual_seed(1))  # heavy-ish tails
    w_max, _, _ = _quantize_weight(weight, bits, "max")
    w_mse, _, ratio = _quantize_weight(weight, bits, "mse")
    per_channel_max = ((w_max - weight) ** 2).sum(1)
    per_channel_mse = ((w_mse - weight) ** 2).sum(1)
    assert bool((per_channel_mse <= per_channel_max + 1e-7).all())
    assert float(per_channel_mse.sum()) < 0.8 * float(per_channel_max.sum())
    assert bool((ratio < 1).all()) and bool((ratio > 0).all())


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("signed", [False, True])
def test_activation_error_within_half_a_step_inside_the_range(bits, signed):
    generator = torch.Generator().manual_seed(bits)
    x = torch.randn(4096, generator=generator)
    if not signed:
        x = x.relu()
    quantizer = ActivationQuantizer(bits, QuantConfig(activation_range="minmax"))
    quantizer.start_calibration()
    quantizer(x)
    quantizer.finish_calibration()
    q_lo, q_hi = activation_levels(bits, signed)
    assert bool(quantizer.signed) == signed
    assert float(quantizer.scale) == pytest.approx(float(x.abs().max()) / q_hi, rel=1e-6)
    x_hat = quantizer(x)
    assert bool(((x_hat - x).abs() <= float(quantizer.scale) / 2 * (1 + 1e-5)).all())
    codes = torch.round(x_hat / quantizer.scale)
    assert int(codes.min()) >= q_lo and int(codes.max()) <= q_hi
    assert len(torch.unique(codes)) <= 2 ** bits


def test_activation_levels():
    assert activation_levels(4, False) == (0, 15)
    assert activation_levels(4, True) == (-7, 7)
    assert activation_levels(8, True) == (-127, 127)


@pytest.mark.parametrize("method", ["percentile", "mse"])
def test_calibration_methods_clip_outliers(method):
    x = torch.cat([torch.rand(100_000, generator=torch.Generator().manual_seed(0)), torch.tensor([50.0])])
    quantizer = ActivationQuantizer(4, QuantConfig(activation_range=method, percentile=99.9))
    quantizer.start_calibration()
    for batch in x.split(10_000):
        quantizer(batch)
    quantizer.finish_calibration()
    clip = float(quantizer.scale) * 15
    assert 0.5 < clip < 5.0  # the outlier at 50 does not set the range (minmax would give 50)
    mse = float(((quantizer(x[:-1]) - x[:-1]) ** 2).mean())
    assert mse < (50 / 15) ** 2 / 12 / 100


def test_straight_through_gradient():
    x = torch.tensor([-2.0, -0.3, 0.26, 0.9, 3.0], requires_grad=True)
    y = fake_quantize_activation(x, torch.tensor(0.1), -7, 7)
    torch.testing.assert_close(y.detach(), torch.tensor([-0.7, -0.3, 0.3, 0.7, 0.7]))
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([0.0, 1.0, 1.0, 0.0, 0.0]))  # zero outside the clip
    w = torch.tensor([[0.5, -1.0, 0.2]], requires_grad=True)
    fake_quantize_weight(w, 2, torch.tensor([1.0])).sum().backward()
    torch.testing.assert_close(w.grad, torch.ones(1, 3))


def test_uncalibrated_quantizer_refuses_to_run():
    with pytest.raises(RuntimeError, match="not calibrated"):
        ActivationQuantizer(4)(torch.ones(3))
    assert torch.equal(ActivationQuantizer(32)(torch.ones(3)), torch.ones(3))


@pytest.mark.parametrize("field,value", [
    ("weight_clip", "kl"), ("activation_range", "max"), ("percentile", 0.0), ("clip_search_steps", 0),
    ("calibration_sigma", -1.0), ("mse_weight_bits", 9), ("seed", -1),
])
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        QuantConfig(**{field: value})


def test_config_dict_round_trip():
    config = QuantConfig(weight_clip="mse", activation_range="percentile", percentile=99.5, seed=3)
    assert QuantConfig.from_dict(config.to_dict()) == config


def _column_dependent_activations():
    """``[256, 16, 32, 32]`` in [0, 4), small (< 0.4) in image column 0 only, as after zero padding."""
    x = torch.rand(256, 16, 32, 32, generator=torch.Generator().manual_seed(1)) * 4.0
    x[..., 0] *= 0.1
    return x


@pytest.mark.parametrize("method", ["percentile", "mse"])
def test_calibration_samples_every_image_column(method):
    # With a fixed stride over the flattened NCHW tensor (4M values, 8192 kept per batch:
    # stride 512) only column 0 was kept, and the clip came out near 0.4.
    x = _column_dependent_activations()
    quantizer = ActivationQuantizer(8, QuantConfig(activation_range=method, percentile=99.0))
    quantizer.start_calibration()
    quantizer(x)
    quantizer.finish_calibration()
    clip = float(quantizer.scale) * 255
    assert 3.8 < clip <= 4.0


def test_mse_grid_top_is_the_observed_maximum():
    # one value of 4M sets the maximum; the 8192-value subsample does not contain it
    x = torch.rand(256, 16, 32, 32, generator=torch.Generator().manual_seed(2))
    x.view(-1)[1_234_567] = 7.0
    quantizer = ActivationQuantizer(4, QuantConfig(activation_range="mse", clip_search_steps=1))
    quantizer.start_calibration()
    quantizer(x)
    assert float(torch.cat(quantizer._samples).max()) < 1.0
    quantizer.finish_calibration()
    # one grid point, k = steps: the clip is the grid's top
    assert float(quantizer.scale) * 15 == pytest.approx(7.0, rel=1e-6)
    values = torch.tensor([0.1, -0.5, 0.9])
    from arq.quant.quantizers import _mse_clip
    assert _mse_clip(values, 4, True, 1) == pytest.approx(0.9)
    assert _mse_clip(values, 4, True, 1, amax=2.0) == 2.0
    k = _mse_clip(values, 4, True, 10, amax=2.0) / 0.2  # on the grid k * 2.0 / 10
    assert abs(k - round(k)) < 1e-9 and 1 <= round(k) <= 10


def test_calibration_subsample_is_deterministic():
    x = _column_dependent_activations()[:64]
    scales = []
    for _ in range(2):
        quantizer = ActivationQuantizer(4, QuantConfig(activation_range="percentile", percentile=99.0,
                                                       calibration_samples=4096))
        for _ in range(2):  # a second calibration of the same quantizer starts the draws again
            quantizer.start_calibration()
            for batch in x.split(16):  # the generator advances across batches
                quantizer(batch)
            quantizer.finish_calibration()
            scales.append(float(quantizer.scale))
    assert len(set(scales)) == 1 and scales[0] > 0
    # batches no larger than the per-batch cap are kept whole
    quantizer = ActivationQuantizer(4, QuantConfig(activation_range="mse", calibration_samples=800))
    quantizer.start_calibration()
    quantizer(x[0, 0, :10, :10])
    assert torch.equal(quantizer._samples[0], x[0, 0, :10, :10].flatten())


@pytest.mark.parametrize("field,value", [
    ("seed", 1.5), ("calibration_batch_size", 2.5), ("clip_search_steps", 10.0), ("calibration_samples", "8"),
    ("mse_weight_bits", True),
])
def test_config_integer_fields_must_be_ints(field, value):
    with pytest.raises(TypeError, match=rf"{field} must be an int, got {type(value).__name__}"):
        QuantConfig(**{field: value})


def test_config_takes_numpy_integers_as_ints():
    import numpy as np

    config = QuantConfig(seed=np.int64(3), calibration_batch_size=np.int32(16))
    assert type(config.seed) is int and type(config.calibration_batch_size) is int
    assert QuantConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -0.5, "0.1"])
def test_config_calibration_sigma_must_be_finite_and_non_negative(value):
    with pytest.raises(ValueError, match="calibration_sigma must be a finite number >= 0 or None"):
        QuantConfig(calibration_sigma=value)


def test_calibration_keeps_a_position_unbiased_sample_when_batches_are_small():
    """Small batches are kept whole, in NCHW order; halving them by every other value was a fixed
    stride again (only even features of a [B, F] input). The half is drawn at random."""
    from arq.quant.quantizers import ActivationQuantizer, QuantConfig

    quantizer = ActivationQuantizer(8, QuantConfig(activation_range="percentile", percentile=99.0,
                                                   calibration_samples=512))
    quantizer.start_calibration()
    for _ in range(40):
        batch = torch.ones(4, 16)
        batch[:, 1::2] = 10.0  # odd features are large: half of all values
        quantizer._observe(batch)
    kept = torch.cat(quantizer._samples)
    assert 0.3 < float((kept == 10.0).float().mean()) < 0.7


@pytest.mark.parametrize("bits,signed", [(2, False), (4, True), (8, False)])
def test_percentile_clip_of_a_sparse_activation_falls_back_to_the_observed_magnitude(bits, signed):
    # 99.995 % zeros (a nearly dead ReLU layer): the 99.99th percentile of |x| is 0. The range
    # used to become the unit scale 1.0, unrelated to the data (values clipped at q_hi, whatever
    # their size); a percentile clip of 0 would zero every value, so the observed magnitude is kept.
    x = torch.zeros(200_000)
    x[:10] = torch.linspace(0.5, 40.0, 10) * (-1 if signed else 1)
    x[10] = 40.0
    quantizer = ActivationQuantizer(bits, QuantConfig(activation_range="percentile", percentile=99.99))
    quantizer.start_calibration()
    quantizer(x)
    quantizer.finish_calibration()
    q_lo, q_hi = activation_levels(bits, signed)
    assert bool(quantizer.signed) == signed
    assert float(quantizer.scale) == pytest.approx(40.0 / q_hi, rel=1e-6)
    assert float(quantizer(torch.tensor([40.0]))) == pytest.approx(40.0, rel=1e-6)


def test_percentile_100_clips_at_the_exact_observed_maximum():
    # the subsample (8 values a batch here) misses the single largest value; the 100th percentile
    # of the activation is that value, which calibration observes exactly, as "minmax" does
    x = torch.rand(64, 4, 16, 16, generator=torch.Generator().manual_seed(4))
    x.view(-1)[12_345] = 9.0
    results = {}
    for method in ("percentile", "minmax"):
        quantizer = ActivationQuantizer(6, QuantConfig(activation_range=method, percentile=100.0,
                                                       calibration_samples=64))
        quantizer.start_calibration()
        quantizer(x)
        if method == "percentile":
            assert float(torch.cat(quantizer._samples).max()) < 1.0
        quantizer.finish_calibration()
        results[method] = float(quantizer.scale)
    assert results["percentile"] == results["minmax"] == pytest.approx(9.0 / 63, rel=1e-6)


def test_calibration_subsample_weighs_every_batch_alike():
    """Halving the kept values whenever they pass 2 x calibration_samples left an early batch with
    1/2^k of a late batch's weight (k halvings since); later batches now keep a halved share too."""
    quantizer = ActivationQuantizer(8, QuantConfig(activation_range="mse", calibration_samples=512))
    quantizer.start_calibration()
    for index in range(64):
        quantizer._observe(torch.full((1000,), float(index)))
    kept = torch.cat(quantizer._samples).long()
    per_batch = torch.bincount(kept, minlength=64).double()
    assert kept.numel() < 64 * 64 / 2  # the kept values were halved at least twice
    first, last = float(per_batch[:16].sum()), float(per_batch[-16:].sum())
    assert 0.7 < first / last < 1.4, (first, last)


@pytest.mark.parametrize("size", [1, 2, 3, 7, 100, 1001, 4096])
def test_quantile_is_torch_quantile_bit_for_bit(size):
    generator = torch.Generator().manual_seed(size)
    values = torch.randn(size, dtype=torch.float64, generator=generator).abs()
    values[: size // 3] = values[size // 2]  # repeated values, as a ReLU's zeros
    for q in (0.0, 0.001, 0.25, 0.5, 0.9, 0.99, 0.999, 0.9999, 1.0):
        assert _quantile(values, q) == float(torch.quantile(values, q)), (size, q)


def test_percentile_calibration_past_torch_quantiles_size_limit():
    # calibration_samples above 2^23: the subsample grows to 2 x that before it is halved, past
    # the 2^24 elements some torch releases' torch.quantile refuses; the clip is the subsample's
    # percentile
    cap = (1 << 23) + 8
    quantizer = ActivationQuantizer(8, QuantConfig(activation_range="percentile", percentile=99.0,
                                                   calibration_samples=cap))
    quantizer.start_calibration()
    generator = torch.Generator().manual_seed(0)
    for _ in range(16):  # batches of cap // 8 values are kept whole: 2 x cap values, not halved
        quantizer(torch.rand(cap // 8, generator=generator))
    kept = torch.cat(quantizer._samples).double()
    assert kept.numel() > 1 << 24
    expected = _quantile(kept, 0.99)
    quantizer.finish_calibration()
    assert float(quantizer.scale) == pytest.approx(expected / 255, rel=1e-6)
    assert 0.98 < expected < 1.0
