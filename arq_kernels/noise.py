"""Fused Gaussian noise for randomized smoothing: ``noisy = x + sigma z`` written straight in the
first layer's input format (Cohen et al. 2019 sample ``x + N(0, sigma^2 I)`` n0 + n times).

The noise is the counter-based construction of :mod:`arq.smoothing.noise` (docs/design.md),
reproduced bit for bit: Philox4x32-10 with key ``(seed mod 2^32, seed >> 32)`` and counter
``(element // 2, sample_index, input_index, draw)``; two 52-bit uniforms
``u = ((hi << 20 | lo >> 12) + 1/2) 2^-52``; Box-Muller in float64 with arq's own polynomial
``log``/``sin``/``cos`` and Newton ``sqrt`` in the same operation order; launched with
``enable_fp_fusion=False`` so no multiply-add is contracted. Float noise never touches memory:
each program draws its pairs in registers, adds them to ``x`` and stores the output dtype.

Outline: candidate configs (``configs/noise.json``), Triton helpers and kernel, launcher
:func:`noisy_input`, plain-torch reference :func:`noisy_input_reference` (same signature).

Blocked algorithm (one program = BLOCK_S samples x BLOCK_P element pairs)::

    for s in samples(pid_s), p in pairs(pid_p):           # a [BLOCK_S, BLOCK_P] tile
        w0..w3 = philox(counter=(p, sample_start + s, input_index, draw), key=seed)
        z0, z1 = box_muller(u52(w1, w0), u52(w3, w2))     # float64
        out[s, place(2p)]     = fmt(x[2p]     + sigma z0)
        out[s, place(2p + 1)] = fmt(x[2p + 1] + sigma z1)

    fmt(v) = [quantize]([(. - mean[c]) / std[c]](cast(v)))    # cast to x's dtype (float32 before
                                                              # normalizing), c the element's channel
"""
from __future__ import annotations

import weakref

import torch
import triton
import triton.language as tl

from arq.smoothing import noise as _ref
from arq_kernels._common import (
    as_float32,
    divide_float32,
    float32_to_bfloat16,
    launch_options,
    pick_config,
    quant_levels,
    quantize_codes,
    quantize_reference,
)

# ---------------------------------------------------------------------------------------------
# constants: the reference's float64 values, as constexpr so Triton builds them in float64 exactly
# ---------------------------------------------------------------------------------------------

_PHILOX_M0 = tl.constexpr(_ref._PHILOX_M0)
_PHILOX_M1 = tl.constexpr(_ref._PHILOX_M1)
_PHILOX_W0 = tl.constexpr(_ref._PHILOX_W0)
_PHILOX_W1 = tl.constexpr(_ref._PHILOX_W1)
_TWO_M52 = tl.constexpr(_ref._TWO_M52)
_LN2 = tl.constexpr(_ref._LN2)
_HALF_PI = tl.constexpr(_ref._HALF_PI)
_SQRT_HALF = tl.constexpr(_ref._SQRT_HALF)
_SQRT_SEED_SLOPE = tl.constexpr(_ref._SQRT_SEED_SLOPE)
_SQRT_SEED_OFFSET = tl.constexpr(_ref._SQRT_SEED_OFFSET)
assert _ref._PHILOX_ROUNDS == 10 and _ref._SQRT_NEWTON_STEPS == 6
assert len(_ref._LOG_COEFFS) == 11 and len(_ref._SIN_COEFFS) == 9 and len(_ref._COS_COEFFS) == 9
_L0, _L1, _L2, _L3, _L4, _L5, _L6, _L7, _L8, _L9, _L10 = (tl.constexpr(c) for c in _ref._LOG_COEFFS)
_S0, _S1, _S2, _S3, _S4, _S5, _S6, _S7, _S8 = (tl.constexpr(c) for c in _ref._SIN_COEFFS)
_C0, _C1, _C2, _C3, _C4, _C5, _C6, _C7, _C8 = (tl.constexpr(c) for c in _ref._COS_COEFFS)

# ---------------------------------------------------------------------------------------------
# candidate configs (the chosen ones live in configs/noise.json; benchmarks/bench_kernels.py tunes)
# ---------------------------------------------------------------------------------------------

CANDIDATES = [
    {"BLOCK_S": s, "BLOCK_P": p, "num_warps": w, "num_stages": 1}
    for s, p, w in [(1, 256, 4), (2, 128, 4), (4, 128, 4), (4, 256, 8), (8, 128, 8), (8, 64, 4), (16, 64, 8)]
]

_FLOAT_DTYPES = {
    torch.float64: tl.float64,
    torch.float32: tl.float32,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
}
_INT_DTYPES = {torch.int8: tl.int8, torch.uint8: tl.uint8}

# ---------------------------------------------------------------------------------------------
# Triton helpers: the same steps as arq/smoothing/noise.py and csrc/noise_math.h
# ---------------------------------------------------------------------------------------------


@triton.jit
def _philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on uint32 blocks (Salmon et al. 2011); returns the four output words."""
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(c0, _PHILOX_M0)
        lo0 = c0 * _PHILOX_M0
        hi1 = tl.umulhi(c2, _PHILOX_M1)
        lo1 = c2 * _PHILOX_M1
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = k0 + _PHILOX_W0
        k1 = k1 + _PHILOX_W1
    return c0, c1, c2, c3


@triton.jit
def _bits52(hi_word, lo_word):
    """``hi << 20 | lo >> 12`` as int64 (52 bits) from two uint32 words."""
    return (hi_word.to(tl.int64) << 20) | (lo_word >> 12).to(tl.int64)


@triton.jit
def _split_exponent(x):
    """``x = mantissa 2^exponent`` for normal positive float64 x: (mantissa in [0.5, 1), int64 exponent)."""
    bits = x.to(tl.int64, bitcast=True)
    exponent = (bits >> 52) - 1022
    mantissa = ((bits & 0xFFFFFFFFFFFFF) | 0x3FE0000000000000).to(tl.float64, bitcast=True)
    return mantissa, exponent


@triton.jit
def _log_unit(u):
    """log(u), float64 u in (0, 1]: reduction to [sqrt(1/2), sqrt(2)) and the atanh series in s^2."""
    mantissa, exponent = _split_exponent(u)
    low = mantissa < _SQRT_HALF
    mantissa = tl.where(low, mantissa * 2.0, mantissa)
    exponent_f = (exponent - low.to(tl.int64)).to(tl.float64)
    s = (mantissa - 1.0) / (mantissa + 1.0)
    s2 = s * s
    poly = s2 * _L0 + _L1
    poly = poly * s2 + _L2
    poly = poly * s2 + _L3
    poly = poly * s2 + _L4
    poly = poly * s2 + _L5
    poly = poly * s2 + _L6
    poly = poly * s2 + _L7
    poly = poly * s2 + _L8
    poly = poly * s2 + _L9
    poly = poly * s2 + _L10
    poly = poly * s2 + 1.0
    return exponent_f * _LN2 + (s * 2.0) * poly


@triton.jit
def _sqrt_positive(x):
    """sqrt(x), normal float64 x > 0: exact reduction to [0.5, 2), linear seed, six Newton steps."""
    mantissa, exponent = _split_exponent(x)
    odd = (exponent & 1) == 1
    mantissa = tl.where(odd, mantissa * 2.0, mantissa)
    half_exponent = (exponent - odd.to(tl.int64)) >> 1  # exponent - odd is even
    root = mantissa * _SQRT_SEED_SLOPE + _SQRT_SEED_OFFSET
    root = (root + mantissa / root) * 0.5
    root = (root + mantissa / root) * 0.5
    root = (root + mantissa / root) * 0.5
    root = (root + mantissa / root) * 0.5
    root = (root + mantissa / root) * 0.5
    root = (root + mantissa / root) * 0.5
    scale = ((half_exponent + 1023) << 52).to(tl.float64, bitcast=True)  # 2^(exponent/2), exact
    return root * scale


@triton.jit
def _cos_sin_two_pi(u, bits):
    """(cos 2 pi u, sin 2 pi u) for ``u = (bits + 1/2) 2^-52``.

    The reference's ``floor(4 u)`` is ``bits >> 50`` exactly (4 u is never an integer), so the
    quadrant comes from the integer bits and no float ``floor`` is needed.
    """
    v = u * 4.0
    quadrant = bits >> 50
    f = v - quadrant.to(tl.float64)  # exact, in (0, 1)
    fold = f > 0.5
    x = tl.where(fold, 1.0 - f, f) * _HALF_PI
    x2 = x * x
    sin_poly = x2 * _S0 + _S1
    sin_poly = sin_poly * x2 + _S2
    sin_poly = sin_poly * x2 + _S3
    sin_poly = sin_poly * x2 + _S4
    sin_poly = sin_poly * x2 + _S5
    sin_poly = sin_poly * x2 + _S6
    sin_poly = sin_poly * x2 + _S7
    sin_poly = sin_poly * x2 + _S8
    sin_x = x + x * (x2 * sin_poly)
    cos_poly = x2 * _C0 + _C1
    cos_poly = cos_poly * x2 + _C2
    cos_poly = cos_poly * x2 + _C3
    cos_poly = cos_poly * x2 + _C4
    cos_poly = cos_poly * x2 + _C5
    cos_poly = cos_poly * x2 + _C6
    cos_poly = cos_poly * x2 + _C7
    cos_poly = cos_poly * x2 + _C8
    cos_x = 1.0 + x2 * cos_poly
    cos_psi = tl.where(fold, sin_x, cos_x)
    sin_psi = tl.where(fold, cos_x, sin_x)
    cos_t = tl.where(quadrant == 0, cos_psi, tl.where(quadrant == 1, -sin_psi, tl.where(quadrant == 2, -cos_psi, sin_psi)))
    sin_t = tl.where(quadrant == 0, sin_psi, tl.where(quadrant == 1, cos_psi, tl.where(quadrant == 2, -sin_psi, -cos_psi)))
    return cos_t, sin_t


@triton.jit
def _gaussian_pairs(c0, c1, c2, c3, k0, k1):
    """The two float64 standard normals of each counter (docs/design.md)."""
    w0, w1, w2, w3 = _philox4x32_10(c0, c1, c2, c3, k0, k1)
    bits1 = _bits52(w1, w0)
    bits2 = _bits52(w3, w2)
    u1 = (bits1.to(tl.float64) + 0.5) * _TWO_M52
    u2 = (bits2.to(tl.float64) + 0.5) * _TWO_M52
    radius = _sqrt_positive(_log_unit(u1) * -2.0)
    cos_t, sin_t = _cos_sin_two_pi(u2, bits2)
    return radius * cos_t, radius * sin_t


@triton.jit
def _format(noisy, shift, divisor, out_scale, q_lo, q_hi, zero_point,
            VALUE_DTYPE: tl.constexpr, OUT_DTYPE: tl.constexpr, QUANTIZE: tl.constexpr, NORMALIZE: tl.constexpr):
    """float64 -> VALUE_DTYPE as torch rounds it (half types through float32), then (float32 values
    only) ``(value - shift) / divisor`` as two IEEE float32 operations, then quantize."""
    if VALUE_DTYPE == tl.float64:
        value = noisy
    else:
        value = noisy.to(tl.float32)
        if VALUE_DTYPE == tl.bfloat16:
            value = float32_to_bfloat16(value)
        elif VALUE_DTYPE != tl.float32:
            value = value.to(VALUE_DTYPE)
    if NORMALIZE:
        value = divide_float32(value - shift, divisor)
    if QUANTIZE:
        return quantize_codes(value.to(tl.float32), out_scale, q_lo, q_hi, zero_point).to(OUT_DTYPE)
    else:
        return value.to(OUT_DTYPE)


# ---------------------------------------------------------------------------------------------
# kernel
# ---------------------------------------------------------------------------------------------


# Scalars that change between launches are not specialized (no recompilation per seed or batch,
# and an argument equal to 1 stays a tensor).
@triton.jit(do_not_specialize=["sigma_bits", "seed_lo", "seed_hi", "input_index", "draw", "sample_start",
                               "q_lo", "q_hi", "zero_point"])
def _noisy_input_kernel(
    # pointers
    x_ptr, out_ptr, mean_ptr, std_ptr,
    # sizes and output placement: element e goes to (e // plane) * stride_c + (e % plane) * stride_hw;
    # its channel (NORMALIZE) is e // channel_plane
    num_elements, num_pairs, count, plane, stride_c, stride_hw, channel_plane,
    # counter fields, sigma as its float64 bits (a Python float argument would be float32)
    sigma_bits, seed_lo, seed_hi, input_index, draw, sample_start,
    # quantization (ignored unless QUANTIZE)
    out_scale, q_lo, q_hi, zero_point,
    # meta-parameters
    VALUE_DTYPE: tl.constexpr, OUT_DTYPE: tl.constexpr, QUANTIZE: tl.constexpr, NORMALIZE: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_P: tl.constexpr,
):
    # one grid axis (CUDA caps the second at 65535): pair blocks vary fastest
    pid = tl.program_id(0)
    pair_blocks = tl.cdiv(num_pairs, BLOCK_P)
    pid_p = pid % pair_blocks
    pid_s = pid // pair_blocks
    pairs = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    rows = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)

    # -- counters (pair, sample_index, input_index, draw) and key, all uint32 -------------------
    zeros = tl.zeros([BLOCK_S, BLOCK_P], dtype=tl.uint32)
    c0 = zeros + pairs[None, :].to(tl.uint32)
    sample = sample_start.to(tl.int64) + rows.to(tl.int64)
    c1 = zeros + sample[:, None].to(tl.uint32)
    c2 = zeros + input_index.to(tl.uint32)
    c3 = zeros + draw.to(tl.uint32)
    k0 = seed_lo.to(tl.uint32)
    k1 = seed_hi.to(tl.uint32)
    z0, z1 = _gaussian_pairs(c0, c1, c2, c3, k0, k1)

    # -- x + sigma z in float64, in the reference's order -----------------------------------------
    sigma = sigma_bits.to(tl.int64).to(tl.float64, bitcast=True)
    even = pairs * 2
    odd = even + 1
    even_ok = even < num_elements
    odd_ok = odd < num_elements
    x0 = tl.load(x_ptr + even, mask=even_ok, other=0.0).to(tl.float64)
    x1 = tl.load(x_ptr + odd, mask=odd_ok, other=0.0).to(tl.float64)
    if NORMALIZE:
        shift0 = tl.load(mean_ptr + even // channel_plane, mask=even_ok, other=0.0)[None, :]
        shift1 = tl.load(mean_ptr + odd // channel_plane, mask=odd_ok, other=0.0)[None, :]
        divisor0 = tl.load(std_ptr + even // channel_plane, mask=even_ok, other=1.0)[None, :]
        divisor1 = tl.load(std_ptr + odd // channel_plane, mask=odd_ok, other=1.0)[None, :]
    else:
        shift0, shift1, divisor0, divisor1 = 0.0, 0.0, 1.0, 1.0
    y0 = _format(x0[None, :] + z0 * sigma, shift0, divisor0, out_scale, q_lo, q_hi, zero_point,
                 VALUE_DTYPE, OUT_DTYPE, QUANTIZE, NORMALIZE)
    y1 = _format(x1[None, :] + z1 * sigma, shift1, divisor1, out_scale, q_lo, q_hi, zero_point,
                 VALUE_DTYPE, OUT_DTYPE, QUANTIZE, NORMALIZE)

    # -- store in the output layout (int64 offsets: count * d may pass 2^31) ----------------------
    row_base = rows.to(tl.int64)[:, None] * num_elements
    place0 = ((even // plane) * stride_c + (even % plane) * stride_hw).to(tl.int64)
    place1 = ((odd // plane) * stride_c + (odd % plane) * stride_hw).to(tl.int64)
    row_ok = (rows < count)[:, None]
    tl.store(out_ptr + row_base + place0[None, :], y0, mask=row_ok & even_ok[None, :])
    tl.store(out_ptr + row_base + place1[None, :], y1, mask=row_ok & odd_ok[None, :])


# ---------------------------------------------------------------------------------------------
# launcher
# ---------------------------------------------------------------------------------------------


def _out_shape(x: torch.Tensor, count: int, layout: str) -> tuple[int, ...]:
    if layout == "nchw":
        return (count, *x.shape)
    if layout == "nhwc":
        if x.dim() != 3:
            raise ValueError(f"layout='nhwc' needs one [C, H, W] input, got shape {tuple(x.shape)}")
        c, h, w = x.shape
        return (count, h, w, c)
    raise ValueError(f"layout must be 'nchw' or 'nhwc', got {layout!r}")


def _check_args(x, sigma, seed, input_index, draw, sample_start, count, out_dtype, out_scale):
    if not x.is_floating_point() or x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x must be float64/32/16 or bfloat16, got {x.dtype}")
    if x.numel() < 1:
        raise ValueError("x must have at least one element")
    if not (0.0 < float(sigma) < float("inf")):
        raise ValueError(f"sigma must be finite and > 0, got {sigma}")
    _ref._check_seed(seed)
    _ref._check_counter("input_index", input_index)
    _ref._check_counter("draw", draw)
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    _ref._check_counter("sample_start", sample_start)
    _ref._check_counter("sample_start + count", sample_start + count, _ref.MAX_COUNTER + 1)
    _ref._check_counter("number of element pairs", (x.numel() + 1) // 2 - 1)
    out_dtype = x.dtype if out_dtype is None else out_dtype
    if out_dtype in _INT_DTYPES:
        if out_scale is None or not (float(out_scale) > 0.0):
            raise ValueError(f"a quantized output ({out_dtype}) needs out_scale > 0, got {out_scale}")
    elif out_dtype not in _FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be a float dtype, int8 or uint8, got {out_dtype}")
    elif out_scale is not None:
        raise ValueError("out_scale is for int8/uint8 outputs only")
    return out_dtype


def _check_normalization(x, out_dtype, mean, std) -> bool:
    """Whether the call normalizes (mean and std given), after checking that it may."""
    if mean is None and std is None:
        return False
    if mean is None or std is None:
        raise ValueError("mean and std go together: pass both or neither")
    if out_dtype not in _INT_DTYPES or x.dtype != torch.float32 or x.dim() != 3:
        raise ValueError(f"mean/std normalize a float32 input [C, H, W] before quantizing it (out_dtype int8 or "
                         f"uint8); got x {x.dtype} {tuple(x.shape)} and out_dtype {out_dtype}")
    for name, tensor in (("mean", mean), ("std", std)):
        if tensor.dtype != torch.float32 or tensor.numel() != x.shape[0] or tensor.device != x.device:
            raise ValueError(f"{name} must be a float32 tensor of {x.shape[0]} values (one per channel) on "
                             f"{x.device}, got {tensor.dtype} {tuple(tensor.shape)} on {tensor.device}")
    # reading the values waits for the GPU: once per tensor version, not per batch (certify passes the
    # same two tensors, InputCodes.tensors, for every batch)
    if not (_values_checked(mean) and _values_checked(std)):
        if not (bool(torch.isfinite(mean).all()) and bool(torch.isfinite(std).all()) and bool((std > 0).all())):
            raise ValueError("mean must be finite and std finite and > 0")
        if len(_VALUES_CHECKED) > 64:
            _VALUES_CHECKED.clear()
        for tensor in (mean, std):
            if not tensor.is_inference():  # an inference tensor has no version counter: checked every call
                _VALUES_CHECKED[id(tensor)] = (weakref.ref(tensor), tensor._version)
    return True


#: id -> (weak reference, version) of the normalization tensors whose values were checked
_VALUES_CHECKED: dict[int, tuple] = {}


def _values_checked(tensor: torch.Tensor) -> bool:
    if tensor.is_inference():
        return False
    entry = _VALUES_CHECKED.get(id(tensor))
    return entry is not None and entry[0]() is tensor and entry[1] == tensor._version


def noisy_input(
    x: torch.Tensor,
    sigma: float,
    *,
    seed: int,
    input_index: int,
    draw: int,
    sample_start: int,
    count: int,
    out_dtype: torch.dtype | None = None,
    out_scale: float | None = None,
    out_zero_point: int = 0,
    qmin: int | None = None,
    qmax: int | None = None,
    layout: str = "nchw",
    mean: torch.Tensor | None = None,
    std: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """``count`` noisy copies of one input, ``x + sigma z(seed, input_index, draw, s)`` for samples
    ``s = sample_start .. sample_start + count - 1``, in the first layer's input format.

    Args:
        x: one input (``[C, H, W]`` or any shape), float64/32/16 or bfloat16, flattened in its
            C-contiguous order to number the noise elements (as the reference does).
        sigma: noise level, > 0.
        seed, input_index, draw, sample_start, count: the Philox counter fields (docs/design.md).
        out_dtype: ``None`` (x.dtype), a float dtype (``cast(x + sigma z, out_dtype)``, half types
            rounded through float32 as torch does), or int8/uint8: the codes
            ``clamp(round_half_even(v / out_scale), qmin, qmax) + out_zero_point`` of the float
            value ``v = cast(x + sigma z, x.dtype)`` (float32 division; defaults: int8 [-127, 127],
            uint8 [-z, 255 - z]).
        out_scale: float32 quantization step (quantized outputs only).
        layout: ``"nchw"`` gives ``[count, *x.shape]``; ``"nhwc"`` (x ``[C, H, W]``) gives a
            contiguous ``[count, H, W, C]`` with the same values (the NHWC convolution's input).
        mean, std: per-channel float32 tensors ``[C]`` (x float32 ``[C, H, W]``, quantized output
            only): the codes are then those of ``(v - mean[c]) / std[c]`` (each one IEEE float32
            operation, the division correctly rounded), the model's input normalization done
            before its first layer's quantizer (:class:`arq.smoothing.noise.InputCodes`).
        out: optional preallocated contiguous output (tests poison it first).
        config: launch config override (``BLOCK_S``, ``BLOCK_P``, ``num_warps``, ``num_stages``).

    Returns:
        The noisy batch, equal (``torch.equal``) to :func:`noisy_input_reference`.
    """
    out_dtype = _check_args(x, sigma, seed, input_index, draw, sample_start, count, out_dtype, out_scale)
    normalize = _check_normalization(x, out_dtype, mean, std)
    shape = _out_shape(x, count, layout)
    quantize = out_dtype in _INT_DTYPES
    q_lo, q_hi = quant_levels(out_dtype, out_zero_point, qmin, qmax) if quantize else (0, 0)

    if out is None:
        out = torch.empty(shape, dtype=out_dtype, device=x.device)
    elif tuple(out.shape) != shape or out.dtype != out_dtype or not out.is_contiguous() or out.device != x.device:
        raise ValueError(f"out must be a contiguous {out_dtype} tensor of shape {shape} on {x.device}")
    if count == 0:
        return out

    x_flat = x.detach().contiguous().reshape(-1)
    d = x_flat.numel()
    if layout == "nhwc":
        c, h, w = x.shape
        plane, stride_c, stride_hw = h * w, 1, c
    else:
        plane, stride_c, stride_hw = d, 0, 1
    cfg = dict(config) if config is not None else pick_config("noise", x.device)
    pairs = (d + 1) // 2
    grid = (triton.cdiv(pairs, cfg["BLOCK_P"]) * triton.cdiv(count, cfg["BLOCK_S"]),)
    sigma_bits = torch.tensor(float(sigma), dtype=torch.float64).view(torch.int64).item()
    value_dtype = x.dtype if quantize else out_dtype
    if normalize:
        mean, std = mean.contiguous(), std.contiguous()
    else:
        mean = std = x_flat  # not read
    _noisy_input_kernel[grid](
        x_flat, out, mean, std,
        d, pairs, count, plane, stride_c, stride_hw, x[0].numel() if normalize else 1,
        sigma_bits, seed & 0xFFFFFFFF, seed >> 32, input_index, draw, sample_start,
        as_float32(out_scale) if quantize else 1.0, q_lo, q_hi, int(out_zero_point),
        VALUE_DTYPE=_FLOAT_DTYPES[value_dtype],
        OUT_DTYPE=_INT_DTYPES[out_dtype] if quantize else _FLOAT_DTYPES[out_dtype],
        QUANTIZE=quantize,
        NORMALIZE=normalize,
        BLOCK_S=cfg["BLOCK_S"], BLOCK_P=cfg["BLOCK_P"],
        **launch_options(cfg),
    )
    return out


# ---------------------------------------------------------------------------------------------
# plain PyTorch reference (same signature)
# ---------------------------------------------------------------------------------------------


def noisy_input_reference(
    x: torch.Tensor,
    sigma: float,
    *,
    seed: int,
    input_index: int,
    draw: int,
    sample_start: int,
    count: int,
    out_dtype: torch.dtype | None = None,
    out_scale: float | None = None,
    out_zero_point: int = 0,
    qmin: int | None = None,
    qmax: int | None = None,
    layout: str = "nchw",
    mean: torch.Tensor | None = None,
    std: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """Plain-torch :func:`noisy_input`, built on ``arq.smoothing.noise.gaussian_reference``
    (``noisy_batch_reference`` when ``out_dtype`` is x.dtype). ``config`` is ignored."""
    out_dtype = _check_args(x, sigma, seed, input_index, draw, sample_start, count, out_dtype, out_scale)
    normalize = _check_normalization(x, out_dtype, mean, std)
    shape = _out_shape(x, count, layout)
    if out_dtype in _INT_DTYPES:
        value = _ref.noisy_batch_reference(
            x, sigma, seed=seed, input_index=input_index, draw=draw, sample_start=sample_start, count=count
        )
        if normalize:
            value = (value - mean.to(value.device).view(1, -1, 1, 1)) / std.to(value.device).view(1, -1, 1, 1)
        q_lo, q_hi = quant_levels(out_dtype, out_zero_point, qmin, qmax)
        result = quantize_reference(value, float(out_scale), q_lo, q_hi, int(out_zero_point), out_dtype)
    else:
        z = _ref.gaussian_reference(
            x.numel(), seed=seed, input_index=input_index, draw=draw,
            sample_start=sample_start, count=count, device=x.device,
        )
        noisy = x.detach().reshape(1, -1).to(torch.float64) + z * float(sigma)
        result = noisy.to(out_dtype).reshape(count, *x.shape)
    if layout == "nhwc":
        result = result.permute(0, 2, 3, 1).contiguous()
    result = result.reshape(shape)
    if out is not None:
        out.copy_(result)
        return out
    return result
