"""Counter-based Gaussian noise for randomized smoothing.

Every noise value is a pure function of ``(seed, input_index, draw, sample_index, element)``,
so certificates do not depend on ``batch_size``, any sample can be replayed
(incremental certification relies on this), and the torch reference, the C++
op, the CUDA op and the Triton kernel give bit-identical samples.

Construction (see ``docs/design.md``):

* Philox4x32-10 (Salmon et al., SC 2011) with key ``(seed mod 2^32, seed >> 32)``
  and counter ``(element // 2, sample_index, input_index, draw)`` gives four
  32-bit words ``w0..w3``.
* Two 52-bit uniforms ``u1 = ((w1 << 20 | w0 >> 12) + 1/2) 2^-52`` and
  ``u2 = ((w3 << 20 | w2 >> 12) + 1/2) 2^-52``, exact in float64, in
  ``[2^-53, 1 - 2^-53]``.
* Box-Muller in float64: ``r = sqrt(-2 log u1)``,
  ``z[2i] = r cos(2 pi u2)``, ``z[2i+1] = r sin(2 pi u2)``. ``log``, ``cos``,
  ``sin`` and ``sqrt`` are evaluated by fixed polynomials and Newton steps
  using only IEEE-754 correctly rounded ``+ - * /`` and exact exponent
  manipulation (no fused multiply-add, no library calls), which is what
  makes every backend agree to the bit.
* A noisy sample is ``cast(float64(x) + sigma * z, dtype(x))``.
* For an integer model that reads its first layer's codes, :func:`noisy_codes_batch` writes those
  codes of the same samples (:class:`InputCodes`: normalization, then the layer's quantizer, in
  float32), bit for bit what the model would compute from the float samples: the same noise, so the
  same guarantee.

What this costs the guarantee. Exact Box-Muller maps continuous uniforms to
exact N(0, 1) pairs. Ours draws ``u1`` from a grid of step ``2^-52``: couple it
with a continuous ``U1`` by rounding to the centre of its cell. Outside the
lowest cell ``U1 < 2^-52`` the two radii differ by at most a few float64 ulps
of ``r``'s derivative times half a cell; the lowest cell is the whole tail
``r > sqrt(-2 log 2^-52) ~ 8.50`` that our sampler cuts off (it returns
``r ~ 8.57`` there). Its probability is ``2^-52`` per pair, so the total
variation between "our noise" and "exact noise except on a set of probability
``delta``" is bounded by ``delta = ceil(d / 2) * 2^-52`` for an input of ``d``
elements (``noise_tv_bound``). ``arq.certify`` subtracts ``delta`` from every
lower bound p_A, which keeps the ``1 - alpha`` guarantee for the Gaussian
smoothed classifier with respect to that cut-off (about 1.7e-11 for
3x224x224 inputs). Not accounted for, as in every floating-point
implementation (Voracek and Hein, ICLR 2023): the 2^-52 grid of the
uniforms away from the tail, the ~1e-16 relative error of the polynomials,
and the rounding of ``x + sigma z`` to the input's dtype.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from arq._ext import compiled_ops_available

DRAW_SELECT = 0
DRAW_ESTIMATE = 1
DRAW_PREDICT = 2

_MASK32 = 0xFFFFFFFF
_PHILOX_M0 = 0xD2511F53
_PHILOX_M1 = 0xCD9E8D57
_PHILOX_W0 = 0x9E3779B9
_PHILOX_W1 = 0xBB67AE85
_PHILOX_ROUNDS = 10

_TWO_M52 = 2.0**-52
_LN2 = 0.6931471805599453  # float64 nearest log(2)
_HALF_PI = 1.5707963267948966  # float64 nearest pi/2
# log(m) = 2 s (1 + s^2/3 + s^4/5 + ... + s^22/23), s = (m - 1)/(m + 1), |s| <= 0.1716
_LOG_COEFFS = tuple(1.0 / k for k in range(23, 2, -2))  # 1/23, 1/21, ..., 1/3
# sin x = x (1 - x^2/3! + ... - x^18/19!), cos x = 1 - x^2/2! + ... + x^18/18!, 0 <= x <= pi/4
_SIN_COEFFS = tuple((-1.0) ** k / math.factorial(2 * k + 1) for k in range(9, 0, -1))
_COS_COEFFS = tuple((-1.0) ** k / math.factorial(2 * k) for k in range(9, 0, -1))
_SQRT_HALF = 0.7071067811865476
_SQRT_SEED_SLOPE = 0.5
_SQRT_SEED_OFFSET = 0.5
_SQRT_NEWTON_STEPS = 6

MAX_COUNTER = 2**32

_CODE_RANGES = {torch.uint8: (0, 255), torch.int8: (-128, 127)}


def noise_tv_bound(num_elements: int) -> float:
    """Upper bound on the probability mass the sampler moves off N(0, I_d), d = ``num_elements``.

    ``ceil(d/2) * 2^-52``: the Box-Muller radius tail that the 52-bit uniform
    grid cannot produce, once per pair of elements (module docstring).
    """
    return math.ceil(num_elements / 2) * _TWO_M52


def _check_counter(name: str, value: int, limit: int = MAX_COUNTER) -> None:
    if not (0 <= value < limit):
        raise ValueError(f"{name} must be an integer in [0, {limit}), got {value}")


def _mulhilo(a: torch.Tensor, multiplier: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of ``a * multiplier`` for int64 ``a`` < 2^32, without int64 overflow."""
    m_lo, m_hi = multiplier & 0xFFFF, multiplier >> 16
    p_lo = a * m_lo  # < 2^48
    p_hi = a * m_hi  # < 2^48
    mid = p_lo + ((p_hi & 0xFFFF) << 16)  # < 2^49
    return (p_hi >> 16) + (mid >> 32), mid & _MASK32


def philox4x32_10(c0, c1, c2, c3, k0: int, k1: int):
    """Philox4x32-10 on int64 tensors holding 32-bit values; returns four int64 tensors.

    Checked against the Random123 known-answer vectors in the tests.
    """
    for round_index in range(_PHILOX_ROUNDS):
        hi0, lo0 = _mulhilo(c0, _PHILOX_M0)
        hi1, lo1 = _mulhilo(c2, _PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        if round_index + 1 < _PHILOX_ROUNDS:
            k0 = (k0 + _PHILOX_W0) & _MASK32
            k1 = (k1 + _PHILOX_W1) & _MASK32
    return c0, c1, c2, c3


def _log_unit(u: torch.Tensor) -> torch.Tensor:
    """log(u) for float64 u in (0, 1], from + - * / only (see module docstring)."""
    mantissa, exponent = torch.frexp(u)  # u = mantissa 2^exponent, mantissa in [0.5, 1)
    low = mantissa < _SQRT_HALF
    mantissa = torch.where(low, mantissa * 2.0, mantissa)  # exact
    exponent = (exponent - low.to(exponent.dtype)).to(torch.float64)
    s = (mantissa - 1.0) / (mantissa + 1.0)
    s2 = s * s
    poly = torch.full_like(s, _LOG_COEFFS[0])
    for coeff in _LOG_COEFFS[1:]:
        poly = poly * s2 + coeff
    poly = poly * s2 + 1.0
    return exponent * _LN2 + (s * 2.0) * poly


def _sin_cos_small(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sin x, cos x) for float64 x in [0, pi/4]."""
    x2 = x * x
    sin_poly = torch.full_like(x, _SIN_COEFFS[0])
    for coeff in _SIN_COEFFS[1:]:
        sin_poly = sin_poly * x2 + coeff
    sin_x = x + x * (x2 * sin_poly)
    cos_poly = torch.full_like(x, _COS_COEFFS[0])
    for coeff in _COS_COEFFS[1:]:
        cos_poly = cos_poly * x2 + coeff
    cos_x = 1.0 + x2 * cos_poly
    return sin_x, cos_x


def _sqrt_positive(x: torch.Tensor) -> torch.Tensor:
    """sqrt(x) for float64 x > 0 (normal), by range reduction and Newton steps.

    ``torch.sqrt`` on large CPU tensors is not always correctly rounded (it may
    go through a vector math library), so the noise uses this fixed sequence of
    + * / steps, which every backend reproduces exactly. Relative error ~1e-16.
    """
    mantissa, exponent = torch.frexp(x)  # x = mantissa 2^exponent, mantissa in [0.5, 1)
    odd = (exponent & 1).to(torch.bool)
    mantissa = torch.where(odd, mantissa * 2.0, mantissa)  # [0.5, 2), exponent now even
    half_exponent = (exponent - odd.to(exponent.dtype)).to(torch.int64) // 2
    root = mantissa * _SQRT_SEED_SLOPE + _SQRT_SEED_OFFSET  # within 7 % of sqrt on [0.5, 2)
    for _ in range(_SQRT_NEWTON_STEPS):
        root = (root + mantissa / root) * 0.5
    scale = ((half_exponent + 1023) << 52).view(torch.float64)  # 2^(exponent/2), exact
    return root * scale


def _cos_sin_two_pi(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos 2 pi u, sin 2 pi u) for float64 u in [0, 1), with exact quadrant reduction."""
    v = u * 4.0  # exact
    quadrant = torch.floor(v)
    f = v - quadrant  # exact, in [0, 1)
    fold = f > 0.5
    x = torch.where(fold, 1.0 - f, f) * _HALF_PI  # 1 - f exact; x in [0, pi/4]
    sin_x, cos_x = _sin_cos_small(x)
    cos_psi = torch.where(fold, sin_x, cos_x)  # psi = f pi/2
    sin_psi = torch.where(fold, cos_x, sin_x)
    q = quadrant.to(torch.int64)
    cos_theta = torch.where(q == 0, cos_psi, torch.where(q == 1, -sin_psi, torch.where(q == 2, -cos_psi, sin_psi)))
    sin_theta = torch.where(q == 0, sin_psi, torch.where(q == 1, cos_psi, torch.where(q == 2, -sin_psi, -cos_psi)))
    return cos_theta, sin_theta


def _uniform52(hi_word: torch.Tensor, lo_word: torch.Tensor) -> torch.Tensor:
    bits = (hi_word << 20) | (lo_word >> 12)  # 52 bits
    return (bits.to(torch.float64) + 0.5) * _TWO_M52


def gaussian_reference(
    num_elements: int,
    *,
    seed: int,
    input_index: int,
    draw: int,
    sample_start: int,
    count: int,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Plain-torch reference: float64 noise ``z[count, num_elements]`` of samples
    ``sample_start .. sample_start + count - 1`` (module docstring gives the construction)."""
    _check_fields(seed, input_index, draw, sample_start, count)
    if num_elements < 1 or count < 0:
        raise ValueError(f"num_elements must be >= 1 and count >= 0, got {num_elements} and {count}")
    pairs = (num_elements + 1) // 2
    _check_counter("number of element pairs", pairs - 1)
    c0 = torch.arange(pairs, dtype=torch.int64, device=device).unsqueeze(0)
    c1 = torch.arange(sample_start, sample_start + count, dtype=torch.int64, device=device).unsqueeze(1)
    c0, c1 = torch.broadcast_tensors(c0, c1)
    c2 = torch.full_like(c0, input_index)
    c3 = torch.full_like(c0, draw)
    w0, w1, w2, w3 = philox4x32_10(c0, c1, c2, c3, seed & _MASK32, (seed >> 32) & _MASK32)
    u1 = _uniform52(w1, w0)
    u2 = _uniform52(w3, w2)
    radius = _sqrt_positive(_log_unit(u1) * -2.0)
    cos_t, sin_t = _cos_sin_two_pi(u2)
    z = torch.stack((radius * cos_t, radius * sin_t), dim=-1).reshape(count, 2 * pairs)
    return z[:, :num_elements]


def _check_fields(seed: int, input_index: int, draw: int, sample_start: int, count: int) -> None:
    """The Philox key and counter fields of samples ``sample_start .. sample_start + count - 1``."""
    _check_seed(seed)
    _check_counter("input_index", input_index)
    _check_counter("draw", draw)
    _check_counter("sample_start", sample_start)
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count!r}")
    _check_counter("sample_start + count", sample_start + count, MAX_COUNTER + 1)


def _check_seed(seed: int) -> None:
    if not isinstance(seed, int) or isinstance(seed, bool) or not (0 <= seed < 2**63):
        raise ValueError(f"seed must be an integer in [0, 2^63), got {seed!r}")


def noisy_batch_reference(
    x: torch.Tensor, sigma: float, *, seed: int, input_index: int, draw: int, sample_start: int, count: int
) -> torch.Tensor:
    """Plain-torch reference of ``noisy_batch``."""
    z = gaussian_reference(
        x.numel(), seed=seed, input_index=input_index, draw=draw,
        sample_start=sample_start, count=count, device=x.device,
    )
    noisy = x.detach().reshape(1, -1).to(torch.float64) + z * float(sigma)
    return noisy.to(x.dtype).reshape(count, *x.shape)


def noisy_batch(
    x: torch.Tensor,
    sigma: float,
    *,
    seed: int,
    input_index: int,
    draw: int,
    sample_start: int,
    count: int,
    backend: str = "auto",
) -> torch.Tensor:
    """``count`` noisy copies of one input: ``out[j] = cast(x + sigma * z(seed, input_index, draw, sample_start + j))``.

    Args:
        x: one input ``[C, H, W]`` (any shape), float dtype, on any device.
        sigma: noise level, > 0.
        seed, input_index, draw, sample_start, count: the Philox counter fields (module docstring).
        backend: ``"torch"`` (reference), ``"cpp"`` (arq._C on CPU), ``"cuda"`` (arq._C's CUDA
            kernel), ``"triton"`` (``arq_kernels.noise``), or ``"auto"`` (compiled op for the
            device, else Triton on CUDA, else the reference).

    Returns:
        ``[count, *x.shape]`` in ``x.dtype`` on ``x.device``. All backends agree bit for bit.
    """
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    chosen = _choose_backend(backend, x.device)
    if chosen == "torch":
        return noisy_batch_reference(
            x, sigma, seed=seed, input_index=input_index, draw=draw, sample_start=sample_start, count=count
        )
    _check_fields(seed, input_index, draw, sample_start, count)
    if chosen == "triton":
        from arq_kernels.noise import noisy_input

        return noisy_input(x.contiguous(), float(sigma), seed=seed, input_index=input_index, draw=draw,
                           sample_start=sample_start, count=count)
    return torch.ops.arq.noisy_input(x.contiguous(), float(sigma), seed, input_index, draw, sample_start, count)


@dataclass(frozen=True)
class InputCodes:
    """The input format of a model that reads its first integer layer's codes (:mod:`arq.quant.execution`'s
    ``enter_at_input_codes``): the noisy image ``v`` (float32, ``[C, H, W]`` per sample) becomes

        code = clamp(round_half_even(((v - mean[c]) / std[c]) / scale) + zero_point, code_min, code_max),

    each step one float32 operation in that order: what the model's own NormalizeLayer and that layer's
    activation quantizer compute. ``mean``/``std`` are the float32 values (0 and 1 for a model without
    normalization: exact identities), ``scale`` is the quantizer's float32 step. ``dtype`` is the codes'
    type: uint8 for the CPU integer model (oneDNN), int8 for the packed GPU kernels (whose 8-bit unsigned
    codes travel as ``c - 128``: zero point -128); the batch is ``[B, C, H, W]`` in channels_last memory.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    scale: float
    zero_point: int
    code_min: int
    code_max: int
    dtype: torch.dtype = torch.uint8

    def __post_init__(self) -> None:
        if len(self.mean) != len(self.std) or not self.mean:
            raise ValueError(f"mean and std need one value per channel, got {self.mean} and {self.std}")
        if not all(math.isfinite(v) for v in self.mean) or not all(math.isfinite(v) and v > 0 for v in self.std):
            raise ValueError(f"mean must be finite and std finite and > 0, got {self.mean} and {self.std}")
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"scale must be finite and > 0, got {self.scale}")
        if self.dtype not in _CODE_RANGES:
            raise ValueError(f"dtype must be torch.uint8 or torch.int8, got {self.dtype}")
        low, high = _CODE_RANGES[self.dtype]
        if not (low <= self.code_min <= self.code_max <= high and low <= self.zero_point <= high):
            raise ValueError(f"{self.dtype} codes need {low} <= code_min <= code_max <= {high} and zero_point in "
                             f"{low}..{high}, got {self.code_min}, {self.code_max}, {self.zero_point}")

    def accepts(self, x: torch.Tensor) -> bool:
        """Whether ``x`` is one input this format encodes: float32 ``[C, H, W]`` with ``C == len(mean)``."""
        return x.dtype == torch.float32 and x.dim() == 3 and x.shape[0] == len(self.mean)

    def tensors(self, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``mean`` and ``std`` as float32 tensors ``[C]`` (made once per device: certify asks per batch)."""
        device = torch.device("cpu" if device is None else device)
        if device not in self._tensors_by_device:
            # ordinary tensors even when first asked inside inference mode (certify's), so the Triton
            # kernel's check of their values is remembered by version rather than redone per batch
            with torch.inference_mode(False):
                self._tensors_by_device[device] = (torch.tensor(self.mean, dtype=torch.float32, device=device),
                                                   torch.tensor(self.std, dtype=torch.float32, device=device))
        return self._tensors_by_device[device]

    @functools.cached_property
    def _tensors_by_device(self) -> dict:
        return {}

    def encode(self, noisy: torch.Tensor) -> torch.Tensor:
        """The codes of a float32 batch ``[B, C, H, W]`` (channels_last, ``dtype``), by the formula above in torch."""
        from arq.ops import quantize_codes_reference  # here: arq.ops imports arq.quant, which imports this package

        mean, std = self.tensors(noisy.device)
        normalized = (noisy - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
        scale = torch.tensor(self.scale, dtype=torch.float32, device=noisy.device)
        codes = quantize_codes_reference(normalized, scale, self.zero_point, self.code_min, self.code_max,
                                         dtype=self.dtype)
        return codes.contiguous(memory_format=torch.channels_last)


def noisy_codes_batch_reference(x: torch.Tensor, sigma: float, codes: InputCodes, *, seed: int, input_index: int,
                                draw: int, sample_start: int, count: int) -> torch.Tensor:
    """Plain-torch reference of :func:`noisy_codes_batch`: :func:`noisy_batch_reference`, then
    :meth:`InputCodes.encode`."""
    return codes.encode(noisy_batch_reference(x, sigma, seed=seed, input_index=input_index, draw=draw,
                                              sample_start=sample_start, count=count))


def noisy_codes_batch(x: torch.Tensor, sigma: float, codes: InputCodes, *, seed: int, input_index: int, draw: int,
                      sample_start: int, count: int, backend: str = "auto") -> torch.Tensor:
    """``count`` noisy copies of one input written directly in a first integer layer's input format:
    ``codes.encode(noisy_batch(x, sigma, ...))`` bit for bit (the same noise, so the same samples and
    guarantee as the float path), ``[count, C, H, W]`` of ``codes.dtype`` in channels_last memory, made in
    one pass where a kernel exists, so no float32 batch is written or read back:

    * CPU with arq._C (``"cpp"``, or ``"auto"``), uint8 codes: ``arq::noisy_input_codes``;
    * CUDA with Triton (``"cuda"``, ``"triton"`` or ``"auto"``; or ``"triton"`` on CPU under
      ``TRITON_INTERPRET=1``): ``arq_kernels.noise.noisy_input`` with ``mean``/``std``, written NHWC
      (the noise kernels of both backends give the same samples bit for bit);
    * otherwise the reference.

    Args:
        x: one float32 input ``[C, H, W]`` with ``C == len(codes.mean)``.
        sigma, seed, input_index, draw, sample_start, count, backend: as :func:`noisy_batch`.
        codes: the first layer's input format.
    """
    if not codes.accepts(x):
        raise ValueError(f"x must be one float32 input [{len(codes.mean)}, H, W], got {x.dtype} {tuple(x.shape)}")
    chosen = _choose_backend(backend, x.device)
    if chosen in ("cuda", "triton") and triton_usable(x.device):
        from arq_kernels.noise import noisy_input  # checks the counter fields itself

        mean, std = codes.tensors(x.device)
        nhwc = noisy_input(x.contiguous(), float(sigma), seed=seed, input_index=input_index, draw=draw,
                           sample_start=sample_start, count=count, out_dtype=codes.dtype, out_scale=codes.scale,
                           out_zero_point=codes.zero_point, qmin=codes.code_min - codes.zero_point,
                           qmax=codes.code_max - codes.zero_point, layout="nhwc", mean=mean, std=std)
        return nhwc.permute(0, 3, 1, 2)  # [count, C, H, W], channels_last memory: a view
    if chosen != "cpp" or codes.dtype != torch.uint8 or not _has_codes_kernel():
        return noisy_codes_batch_reference(x, sigma, codes, seed=seed, input_index=input_index, draw=draw,
                                           sample_start=sample_start, count=count)
    _check_fields(seed, input_index, draw, sample_start, count)
    mean, std = codes.tensors()
    return torch.ops.arq.noisy_input_codes(x.contiguous(), float(sigma), seed, input_index, draw, sample_start, count,
                                           mean, std, codes.scale, codes.zero_point, codes.code_min, codes.code_max)


@functools.lru_cache(maxsize=None)
def _has_codes_kernel() -> bool:
    """Whether this arq._C has ``arq::noisy_input_codes`` (asked once: certify asks per batch)."""
    from arq.ops import _has_kernel  # here: arq.ops imports arq.quant, which imports this package

    return _has_kernel("noisy_input_codes", "CPU")


def triton_usable(device: torch.device) -> bool:
    """Triton kernels run on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (tests)."""
    import os

    from arq_kernels import triton_available

    if not triton_available():
        return False
    return device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend that ``backend`` ("auto", "torch", "cpp", "cuda" or "triton") runs on ``device``:
    "auto" resolved; ValueError or RuntimeError, naming it, when it cannot run there."""
    return _choose_backend(backend, device)


def _choose_backend(backend: str, device: torch.device) -> str:
    from arq._ext import cuda_ops_available

    if backend not in ("auto", "torch", "cpp", "cuda", "triton"):
        raise ValueError(f"backend must be one of 'auto', 'torch', 'cpp', 'cuda', 'triton', got {backend!r}")
    if backend == "triton":
        if not triton_usable(device):
            raise RuntimeError(
                f"backend='triton' needs triton and a CUDA tensor (or TRITON_INTERPRET=1 on CPU); got {device}"
            )
        return "triton"
    if backend == "auto":
        if device.type == "cpu" and compiled_ops_available():
            return "cpp"
        if device.type == "cuda" and cuda_ops_available():
            return "cuda"
        if device.type == "cuda" and triton_usable(device):
            return "triton"
        return "torch"
    if backend == "cpp":
        if device.type != "cpu":
            raise ValueError(f"backend='cpp' runs on CPU tensors, got a tensor on {device}")
        if not compiled_ops_available():
            raise RuntimeError("backend='cpp' needs the compiled extension arq._C, which is not built")
    if backend == "cuda":
        if device.type != "cuda":
            raise ValueError(f"backend='cuda' runs on CUDA tensors, got a tensor on {device}")
        if not cuda_ops_available():
            raise RuntimeError("backend='cuda' needs arq._C built with CUDA")
    return backend
