"""Uniform quantizers for weights and activations, with a straight-through estimator.

Weights (per output channel n, symmetric, b bits):
    q_max = 2^(b-1) - 1,  scale_n = clip_n / q_max,
    q = clamp(round(w / scale_n), -q_max, q_max),  w_hat = q * scale_n.
``clip_n`` is ``max |w_n|`` ("max") or the ``r * max |w_n|``, ``r`` on a grid, that
minimizes ``||w_hat_n - w_n||^2`` ("mse"), the low-bit choice (HAQ clips below 5 bits).

Activations (per tensor, b bits, range calibrated on data):
    unsigned (the calibration data never went below 0, e.g. after ReLU):
        q in [0, 2^b - 1],                 scale = clip / (2^b - 1)
    signed (e.g. the normalized noisy input, a residual sum before ReLU):
        q in [-(2^(b-1)-1), 2^(b-1)-1],    scale = clip / (2^(b-1) - 1)
    x_hat = clamp(round(x / scale), q_lo, q_hi) * scale.
``clip`` comes from the calibration data: the largest magnitude ("minmax"), a
percentile of the magnitudes ("percentile") or the MSE-optimal clip ("mse").
The zero point is always 0, so an integer kernel sees ``x = scale * q`` exactly.

Rounding is ``torch.round`` (half to even) everywhere, the integer path included.
Training uses the straight-through estimator (Bengio et al. 2013): the forward pass
quantizes, the backward pass treats ``round`` as the identity inside the clip
range and passes no gradient outside it. Scales are not learned: a weight scale
follows ``max |w_n|`` at the fixed ratio ``r_n`` (:mod:`arq.quant.modules`), an
activation scale stays as calibrated.

Deliberate deviations from HAQ's code (mit-han-lab/haq, ``lib/utils/quantize_utils.py``),
which are the same linear scheme in other respects (symmetric ``2^(b-1) - 1`` weight levels,
``2^b - 1`` unsigned activation levels, half-to-even rounding, weights clipped below 5 bits):
  * weight scales per output channel, not per tensor (what int8 kernels such as oneDNN's and
    torchao's use; a per-tensor clip lets one channel's range set every channel's step);
  * clips chosen by MSE on a grid, not by HAQ's KL divergence on a sqrt(n)-bin histogram of
    |x|: below 5 bits for weights (``weight_clip="auto"``, ``mse_weight_bits=4``, as HAQ's
    threshold), at every width for activations (``activation_range="mse"``; HAQ takes
    ``min(6, max |x|)`` at 5 bits and above, the KL threshold below, from one batch);
  * activations that the calibration data shows negative get a signed range; HAQ clamps every
    activation to ``[0, range]`` unless a layer is built "full wave";
  * the weight gradient is zero outside the clip (HAQ passes it unchanged everywhere), and the
    activation range is fixed during fine-tuning (HAQ learns it, PACT-style);
  * BatchNorm is folded into the layer before quantizing (:mod:`arq.quant.quantize`); HAQ keeps
    it as a float module after the quantized layer.
The first and last layers are not pinned to 8 bits: see :mod:`arq.quant.policy`.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch import nn

from arq.quant.policy import FLOAT_BITS, MAX_BITS, MIN_BITS

WeightClip = Literal["auto", "max", "mse"]
ActivationRange = Literal["minmax", "percentile", "mse"]


def check_int(config, name: str) -> None:
    """``config.<name>`` must be an int (a numpy integer is turned into one); bools are refused."""
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    setattr(config, name, int(value))


@dataclass
class QuantConfig:
    """How :func:`arq.quant.quantize` picks clipping ranges and calibrates.

    Args:
        weight_clip: "max" (clip at max |w| per channel), "mse" (MSE-optimal clip per
            channel), or "auto": "mse" for ``w_bits <= mse_weight_bits``, else "max".
        mse_weight_bits: the largest weight bit width "auto" searches a clip for.
        activation_range: "minmax", "percentile" or "mse" calibration of activation ranges.
        percentile: the percentile of |x| used by "percentile", in (0, 100] (estimated on the
            subsample; 100 is the exactly observed maximum, as "minmax"; where the percentile is 0,
            more than that share of the values being 0, the range is "minmax"'s).
        clip_search_steps: grid size of the MSE clip searches (ratios k / steps of the max, k = 1..steps).
        calibration_samples: activation values kept per layer for "percentile" and "mse"
            (a uniform random subsample from a generator with a fixed seed, so deterministic;
            the observed min and max are exact).
        calibration_batch_size: batch size when the calibration data is one tensor.
        calibration_sigma: Gaussian noise std added to calibration inputs (in [0, 1] pixel
            space, as the smoothed classifier sees them); ``None`` takes
            ``model.arq_metadata["sigma"]`` when present, else 0.
        seed: seeds the calibration noise.
        residual_bits: bits of the residual stream. At 2..8 every residual block's output
            (a module whose forward returns ``add(a, b)`` or ``relu(add(a, b))``, as a ResNet
            block does) passes through one more activation quantizer,
            ``block.residual_quantizer``, calibrated like the others, so the tensors that run
            between blocks are b-bit codes and the integer CPU model keeps them as uint8
            (``arq.quant.execution``; torchao's pt2e int8 flow quantizes the same tensors).
            32 (default) leaves the residual stream in float32, as HAQ does.
        residual_shortcuts: with ``residual_bits`` < 32, also quantize each block's shortcut
            operand (``block.shortcut_quantizer``: the downsampling shortcut's output, and the
            first block's input), so that every residual add adds two b-bit tensors, as pt2e's
            adds do (:mod:`arq.quant.residual`). Files saved before this option load with False.
    """

    weight_clip: WeightClip = "auto"
    mse_weight_bits: int = 4
    activation_range: ActivationRange = "mse"
    percentile: float = 99.99
    clip_search_steps: int = 100
    calibration_samples: int = 1 << 16
    calibration_batch_size: int = 256
    calibration_sigma: float | None = None
    seed: int = 0
    residual_bits: int = FLOAT_BITS
    residual_shortcuts: bool = True

    def __post_init__(self) -> None:
        for name in ("mse_weight_bits", "clip_search_steps", "calibration_samples", "calibration_batch_size", "seed"):
            check_int(self, name)
        if self.weight_clip not in ("auto", "max", "mse"):
            raise ValueError(f"weight_clip must be 'auto', 'max' or 'mse', got {self.weight_clip!r}")
        if not MIN_BITS <= self.mse_weight_bits <= MAX_BITS:
            raise ValueError(f"mse_weight_bits must be in {MIN_BITS}..{MAX_BITS}, got {self.mse_weight_bits}")
        if self.activation_range not in ("minmax", "percentile", "mse"):
            raise ValueError(
                f"activation_range must be 'minmax', 'percentile' or 'mse', got {self.activation_range!r}"
            )
        if not 0.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile must be in (0, 100], got {self.percentile}")
        if self.clip_search_steps < 1:
            raise ValueError(f"clip_search_steps must be >= 1, got {self.clip_search_steps}")
        if self.calibration_samples < 1:
            raise ValueError(f"calibration_samples must be >= 1, got {self.calibration_samples}")
        if self.calibration_batch_size < 1:
            raise ValueError(f"calibration_batch_size must be >= 1, got {self.calibration_batch_size}")
        if self.calibration_sigma is not None and not (
                isinstance(self.calibration_sigma, numbers.Real) and not isinstance(self.calibration_sigma, bool)
                and math.isfinite(self.calibration_sigma) and self.calibration_sigma >= 0):
            raise ValueError(f"calibration_sigma must be a finite number >= 0 or None, got {self.calibration_sigma!r}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if isinstance(self.residual_bits, bool) or not isinstance(self.residual_bits, int) or not (
                MIN_BITS <= self.residual_bits <= MAX_BITS or self.residual_bits == FLOAT_BITS):
            raise ValueError(f"residual_bits must be an int in {MIN_BITS}..{MAX_BITS} or {FLOAT_BITS} (float), "
                             f"got {self.residual_bits!r}")
        if not isinstance(self.residual_shortcuts, bool):
            raise TypeError(f"residual_shortcuts must be a bool, got {type(self.residual_shortcuts).__name__}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "QuantConfig":
        return cls(**data)

    def weight_clip_for(self, w_bits: int) -> str:
        if self.weight_clip != "auto":
            return self.weight_clip
        return "mse" if w_bits <= self.mse_weight_bits else "max"


def weight_qmax(bits: int) -> int:
    """Largest symmetric integer weight at ``bits``: ``2^(bits-1) - 1``."""
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be in {MIN_BITS}..{MAX_BITS}, got {bits}")
    return (1 << (bits - 1)) - 1


def activation_levels(bits: int, signed: bool) -> tuple[int, int]:
    """Integer range ``(q_lo, q_hi)`` of a ``bits``-bit activation."""
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be in {MIN_BITS}..{MAX_BITS}, got {bits}")
    if signed:
        return -((1 << (bits - 1)) - 1), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def _as_rows(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().reshape(weight.shape[0], -1).float()


def weight_clip_ratio(weight: torch.Tensor, bits: int, method: str, steps: int = 100) -> torch.Tensor:
    """Per-output-channel ratio ``r_n = clip_n / max |w_n|`` in (0, 1] (float32 ``[N]``).

    "max" gives 1. "mse" gives ``argmin_r ||Q(w_n; r max|w_n|) - w_n||^2`` over
    ``r = k / steps``, ``k = 1..steps``.
    """
    if method not in ("max", "mse"):
        raise ValueError(f"method must be 'max' or 'mse', got {method!r}")
    rows = _as_rows(weight)
    ones = torch.ones(rows.shape[0], dtype=torch.float32, device=rows.device)
    if method == "max":
        return ones
    qmax = weight_qmax(bits)
    amax = rows.abs().amax(dim=1)
    best_error = torch.full_like(amax, float("inf"))
    best_ratio = ones.clone()
    safe_amax = torch.where(amax > 0, amax, torch.ones_like(amax))
    for k in range(steps, 0, -1):  # from 1.0 down, so ties keep the larger clip
        ratio = k / steps
        scale = (ratio * safe_amax / qmax)[:, None]
        error = ((torch.clamp(torch.round(rows / scale), -qmax, qmax) * scale - rows) ** 2).sum(dim=1)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_ratio = torch.where(better, torch.full_like(best_ratio, ratio), best_ratio)
    return best_ratio


def weight_scale(weight: torch.Tensor, bits: int, clip_ratio: torch.Tensor) -> torch.Tensor:
    """``scale_n = r_n * max |w_n| / (2^(b-1) - 1)``; 1 for an all-zero channel (then q = 0)."""
    amax = _as_rows(weight).abs().amax(dim=1)
    scale = clip_ratio.to(amax) * amax / weight_qmax(bits)
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def quantize_weight(weight: torch.Tensor, bits: int, scale: torch.Tensor) -> torch.Tensor:
    """Integer weights ``clamp(round(w / scale_n), -q_max, q_max)`` as int8, same shape as ``weight``."""
    qmax = weight_qmax(bits)
    view = scale.reshape(-1, *([1] * (weight.dim() - 1))).to(weight.dtype)
    return torch.clamp(torch.round(weight.detach() / view), -qmax, qmax).to(torch.int8)


def _straight_through(x: torch.Tensor, x_hat: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Value ``x_hat``; gradient 1 where ``low <= x <= high`` (the clip range, ends included), else 0."""
    inside = (x >= low) & (x <= high)
    passed = torch.where(inside, x, x.detach())
    return passed + (x_hat - passed).detach()


def fake_quantize_weight(weight: torch.Tensor, bits: int, scale: torch.Tensor) -> torch.Tensor:
    """``w_hat = q * scale_n``; with a straight-through gradient when ``weight`` requires grad."""
    qmax = weight_qmax(bits)
    view = scale.reshape(-1, *([1] * (weight.dim() - 1))).to(weight.dtype)
    w_hat = torch.clamp(torch.round(weight / view), -qmax, qmax) * view
    if not (torch.is_grad_enabled() and weight.requires_grad):
        return w_hat
    return _straight_through(weight, w_hat, -qmax * view, qmax * view)


def fake_quantize_activation(x: torch.Tensor, scale: torch.Tensor, q_lo: int, q_hi: int) -> torch.Tensor:
    """``x_hat = clamp(round(x / scale), q_lo, q_hi) * scale``, straight-through gradient inside the clip."""
    scale = scale.to(x.dtype)
    x_hat = torch.clamp(torch.round(x / scale), q_lo, q_hi) * scale
    if not (torch.is_grad_enabled() and x.requires_grad):
        return x_hat
    return _straight_through(x, x_hat, q_lo * scale, q_hi * scale)


def _quantile(values: torch.Tensor, q: float) -> float:
    """``torch.quantile(values, q)`` (linear interpolation) of a 1-D tensor of any length.

    torch.quantile refuses inputs of more than 2^24 elements on some torch releases
    (pytorch/pytorch#64947; 2.14.1 accepts them), and the calibration subsample reaches that with
    ``calibration_samples`` above 2^23 (it keeps up to twice that); kthvalue has no such limit and
    needs no full sort. The same rule: rank ``q (n - 1)``, the order statistics just below and
    above it, ``torch.lerp`` between them (equal to torch.quantile's result bit for bit, tested).
    """
    rank = q * (values.numel() - 1)
    below = math.floor(rank)
    above = min(below + 1, values.numel() - 1)
    low = torch.kthvalue(values, below + 1).values
    high = low if above == below else torch.kthvalue(values, above + 1).values
    return float(torch.lerp(low, high, torch.tensor(rank - below, dtype=values.dtype)))


def _mse_clip(values: torch.Tensor, bits: int, signed: bool, steps: int, amax: float | None = None) -> float:
    """The clip ``c = r * amax`` minimizing ``||Q(v; c) - v||^2`` over ``r = k / steps``, k = 1..steps.

    ``amax`` is the top of the grid, by default ``max|v|``. Calibration passes the exactly
    observed largest magnitude: ``values`` is then a subsample that may miss the maximum,
    and the grid must not depend on which values were drawn.

    Coarse to fine: every ``stride``-th ratio first (stride ~ sqrt(steps)), then every ratio
    within one stride of the best coarse one; the error curve is unimodal in practice, so
    this finds the grid minimum in about ``2 sqrt(steps)`` evaluations instead of ``steps``
    (it did in all 170 calibrations of a ResNet-20 at 2, 3, 4, 6 and 8 bits and on 840
    synthetic sets of 5,000 values; on a few dozen values the curve can have a second dip,
    and the clip found was then up to 1.7 % worse in squared error than the grid's best).
    """
    if amax is None:
        amax = float(values.abs().max())
    if amax == 0.0:
        return 0.0
    q_lo, q_hi = activation_levels(bits, signed)

    def error(k: int) -> float:
        scale = amax * k / steps / q_hi
        return float(((torch.clamp(torch.round(values / scale), q_lo, q_hi) * scale - values) ** 2).sum())

    stride = max(1, int(round(steps ** 0.5)))
    coarse = sorted(set(range(steps, 0, -stride)) | {1})
    errors = {k: error(k) for k in coarse}
    best = min(coarse, key=lambda k: (errors[k], -k))
    for k in range(max(1, best - stride + 1), min(steps, best + stride - 1) + 1):
        if k not in errors:
            errors[k] = error(k)
    best = min(errors, key=lambda k: (errors[k], -k))  # ties: the larger clip
    return amax * best / steps


#: Seed of the calibration subsample's generator (a constant: calibration is deterministic
#: and independent of the global RNG and of ``QuantConfig.seed``, which seeds the noise).
SUBSAMPLE_SEED = 0x5EED


class ActivationQuantizer(nn.Module):
    """Fake-quantizes the activation entering a layer (identity at 32 bits).

    Buffers: ``scale`` (float32 scalar, 0 until calibrated) and ``signed`` (bool scalar).
    Call :meth:`start_calibration`, run data through, then :meth:`finish_calibration`.
    """

    def __init__(self, bits: int, config: QuantConfig | None = None):
        super().__init__()
        if not (MIN_BITS <= bits <= MAX_BITS or bits == FLOAT_BITS):
            raise ValueError(f"bits must be in {MIN_BITS}..{MAX_BITS} or {FLOAT_BITS}, got {bits}")
        self.bits = bits
        self.config = config or QuantConfig()
        self.register_buffer("scale", torch.zeros((), dtype=torch.float32))
        self.register_buffer("signed", torch.zeros((), dtype=torch.bool))
        self._observing = False
        self._samples: list[torch.Tensor] = []
        self._sample_count = 0
        self._halvings = 0  # of the subsample since start_calibration (each halves later batches' share)
        self._min = float("inf")
        self._max = float("-inf")
        self._generator: torch.Generator | None = None
        #: the layer's name in error messages (set by :func:`arq.quant.calibrate`)
        self.layer_name = ""
        # Python copies of the buffers, so that forward never syncs with a GPU to read them.
        self._calibrated = False
        self._levels = (0, 0)

    @property
    def enabled(self) -> bool:
        return self.bits != FLOAT_BITS

    @property
    def levels(self) -> tuple[int, int]:
        """``(q_lo, q_hi)`` of the calibrated range."""
        return activation_levels(self.bits, bool(self.signed))

    def set_range(self, scale: float, signed: bool) -> None:
        """Set the calibrated range directly (``x_hat = scale * q``, q signed or not)."""
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        self.scale.fill_(scale)
        self.signed.fill_(signed)
        self._sync_cache()

    def _sync_cache(self) -> None:
        if self.enabled:
            self._calibrated = bool(self.scale > 0)
            self._levels = activation_levels(self.bits, bool(self.signed))

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._sync_cache()

    def start_calibration(self) -> None:
        self._observing = True
        self._samples, self._sample_count, self._halvings = [], 0, 0
        self._min, self._max = float("inf"), float("-inf")
        self._generator = torch.Generator(device="cpu").manual_seed(SUBSAMPLE_SEED)

    def _observe(self, x: torch.Tensor) -> None:
        flat = x.detach().flatten().float()
        low, high = float(flat.min()), float(flat.max())  # min/max propagate NaN
        if not (math.isfinite(low) and math.isfinite(high)):
            where = f" of layer {self.layer_name!r}" if self.layer_name else ""
            raise ValueError(f"the activation quantizer{where} saw non-finite values (NaN or inf) during "
                             "calibration; calibration data and activations must be finite")
        self._min = min(self._min, low)
        self._max = max(self._max, high)
        if self.config.activation_range == "minmax":
            return
        # Keep a bounded, deterministic subsample: at most samples/8 per batch, drawn uniformly
        # (with replacement) by a generator seeded at start_calibration that advances across
        # batches, and halve what is kept whenever it passes 2 x samples, and with it the share of
        # each later batch, so that every batch weighs the same in the subsample (halving alone
        # left an early batch 1/2^k of a late one's weight). Not a fixed stride: a stride over a
        # flattened NCHW tensor is often a multiple of W or H*W, and then keeps only a few
        # spatial positions (one image column, say), whose values are not typical.
        cap = self.config.calibration_samples
        per_batch = max(1, (cap // 8) >> self._halvings)
        if flat.numel() <= per_batch:
            kept = flat.cpu()
        else:
            if self._generator is None:
                self._generator = torch.Generator(device="cpu").manual_seed(SUBSAMPLE_SEED)
            index = torch.randint(flat.numel(), (per_batch,), generator=self._generator)
            kept = flat[index.to(flat.device)].cpu()
        self._samples.append(kept)
        self._sample_count += kept.numel()
        if self._sample_count > 2 * cap:  # a random half: a batch kept whole is in NCHW order, where
            kept_all = torch.cat(self._samples)  # every other value would be a fixed stride again
            half = torch.randperm(kept_all.numel(), generator=self._generator)[: kept_all.numel() // 2]
            self._samples = [kept_all[half]]
            self._sample_count = self._samples[0].numel()
            self._halvings += 1

    @property
    def saw_no_data(self) -> bool:
        """True while nothing was observed since :meth:`start_calibration`."""
        return self._min == float("inf")

    def finish_calibration(self) -> None:
        """Set ``signed`` and ``scale`` from what was observed since :meth:`start_calibration`."""
        self._observing = False
        self._generator = None
        if not self.enabled:
            return
        if self.saw_no_data:
            where = f" of layer {self.layer_name!r}" if self.layer_name else ""
            raise RuntimeError(f"the activation quantizer{where} saw no calibration data (the layer was never called)")
        signed = self._min < 0.0
        q_lo, q_hi = activation_levels(self.bits, signed)
        magnitude = max(abs(self._min), abs(self._max)) if signed else self._max
        method = self.config.activation_range
        if method == "minmax" or magnitude == 0.0:
            clip = magnitude
        else:
            values = torch.cat(self._samples)
            if not signed:
                values = values.clamp_min(0.0)
            if method == "percentile" and self.config.percentile == 100.0:
                clip = magnitude  # observed exactly; the subsample may have missed the largest value
            elif method == "percentile":
                clip = _quantile(values.abs().double(), self.config.percentile / 100.0)
                if clip == 0.0:
                    # more than `percentile` % zeros (a nearly dead ReLU layer): a zero clip has no
                    # scale and would zero every value, so the range falls back to "minmax"
                    clip = magnitude
            else:
                # the grid's top is the observed magnitude, which the subsample may not contain
                clip = _mse_clip(values, self.bits, signed, self.config.clip_search_steps, amax=magnitude)
        self._samples, self._sample_count = [], 0
        scale = clip / q_hi if clip > 0 else 1.0  # an all-zero activation: any scale gives q = 0
        self.set_range(scale, signed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if self._observing:
            self._observe(x)
            return x
        if not self._calibrated:
            raise RuntimeError("activation quantizer is not calibrated; run calibration first")
        q_lo, q_hi = self._levels
        return fake_quantize_activation(x, self.scale, q_lo, q_hi)

    def extra_repr(self) -> str:
        if not self.enabled:
            return "bits=32 (float)"
        return f"bits={self.bits}, signed={bool(self.signed)}, scale={float(self.scale):.6g}"
