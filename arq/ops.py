"""Integer ops of the quantized certification path: one dispatcher per op, with its plain PyTorch reference.

* :func:`packed_linear`  ``y = epilogue(x @ W.T)``, x int8/uint8 ``[..., K]``, W 2-8 bit packed ``[N, K]``
* :func:`packed_conv2d`  the same on NHWC activations (implicit GEMM, K in ``(kh, kw, c)`` order)
* :func:`vote_count`     last linear layer + argmax + per-class counts, only ``int64[num_classes]`` returned
* :func:`requantize_codes`  uint8 codes of one activation grid -> uint8 codes of another (residual streams)
* :func:`quantize_codes`    float32 activations -> an activation quantizer's uint8 codes (integer CPU layers)

Weights use the packed format of docs/design.md (:mod:`arq.quant.packing`): ``32 // b`` two's-complement
b-bit fields per int32 word along K, shape ``[N, ceil(K / (32 // b))]``; ``w = q * scales[n]``.

The epilogue, in float32 and in this order (the C++ and CUDA ops and the references use it, so their float
outputs agree bit for bit; the integer accumulator ``acc = sum_k x[m, k] q[n, k]`` is exact)::

    y = float32(acc) * float32(x_scale)
    y = y * scales[n]
    y = y + bias[n]                       # if bias is given
    y = y + residual[m, n]                # if residual is given (float32, the output's shape)
    y = relu(y)                           # if relu
    if out_scale > 0:                     # requantize: round half to even, NaN -> 0
        q = clamp(round(y * (1 / float32(out_scale))), -128, 127) as int8    ([0, 255] as uint8 when relu)

The Triton kernels of ``arq_kernels`` (``backend="triton"``, and "auto" on CUDA, where no packed CUDA kernel is
built) keep their own order, ``float32(acc) * (float32(x_scale) * scales[n])``, and requantize by the float32
quotient ``y / out_scale`` (:mod:`arq_kernels.packed_matmul`): their float outputs agree with the above to
float32 rounding, not bit for bit, and a code may differ by one step where ``y / out_scale`` is within that
rounding of a half-integer.

Each dispatcher takes ``backend``: ``"auto"`` (C++ on CPU; on CUDA the CUDA kernel when built, else Triton from
``arq_kernels`` when installed, else torch), ``"cpp"``, ``"cuda"``, ``"triton"`` or ``"torch"`` (the reference).
The compiled ops are ``torch.ops.arq.*``; a ``register_fake`` for each lets ``torch.compile`` trace them.
On CPU, ``ARQ_CPU_ISA=auto|vnni|avx2|scalar`` (read per call) picks the GEMM micro-kernel and
``ARQ_DISABLE_VNNI=1`` rules out AVX-512 VNNI; all give the same int32 accumulators
(:func:`cpu_isa` says which one runs).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from arq._ext import compiled_ops_available, cuda_ops_available
from arq.quant.packing import (  # the packed format's torch side, shared with the quantizer
    conv_weight_to_matrix,
    matrix_to_conv_weight,
    pack_weights,
    packed_words,
    unpack_weights,
)

__all__ = [
    "packed_linear",
    "packed_linear_reference",
    "packed_conv2d",
    "packed_conv2d_reference",
    "vote_count",
    "vote_count_reference",
    "requantize_codes",
    "requantize_codes_reference",
    "quantize_codes",
    "quantize_codes_reference",
    "pack_weights",
    "unpack_weights",
    "conv_weight_to_matrix",
    "matrix_to_conv_weight",
    "cpu_isa",
]

BACKENDS = ("auto", "cpp", "cuda", "triton", "torch")


# ---------------------------------------------------------------------------------------------
# plain PyTorch references
# ---------------------------------------------------------------------------------------------


def _f32(value: float) -> float:
    """``value`` rounded to float32 (kept as a Python float, so torch multiplies by exactly it)."""
    return float(np.float32(value))


def _epilogue_reference(acc, scales, bias, x_scale, relu, residual, out_scale):
    """The float32 epilogue of the module docstring on an exact int64 accumulator ``acc [..., N]``."""
    y = acc.to(torch.int32).to(torch.float32) * _f32(x_scale)
    y = y * scales
    if bias is not None:
        y = y + bias
    if residual is not None:
        y = y + residual
    if relu:
        y = torch.relu(y)
    if out_scale > 0:
        inv = _f32(np.float32(1.0) / np.float32(out_scale))
        q = torch.nan_to_num(torch.round(y * inv), nan=0.0)
        if relu:
            return q.clamp(0, 255).to(torch.uint8)
        return q.clamp(-128, 127).to(torch.int8)
    return y


def _check_codes(op: str, x, rank_ok, shape: str) -> None:
    """``x`` must be int8/uint8 activation codes whose rank ``rank_ok`` accepts (``shape`` names it)."""
    if isinstance(x, torch.Tensor) and not rank_ok(x.dim()):
        raise ValueError(f"{op}: x must be {shape}, got {tuple(x.shape)}")
    if not isinstance(x, torch.Tensor) or x.dtype not in (torch.int8, torch.uint8):
        raise TypeError(f"{op}: x must be int8 or uint8 activation codes, got {getattr(x, 'dtype', type(x).__name__)}")


def _check_packed_arguments(op, x, packed_weight, w_bits, k, leading_shape, scales, bias, residual, x_scale,
                            out_scale) -> int:
    """The argument checks of the C++ ops (csrc/cpu/packed_common.h), for the reference path, once ``x``
    passed :func:`_check_codes`: without them a bad shape surfaced as a raw indexing or broadcast
    error, or broadcast into a wrong result. Returns N, the output channels; the output is
    ``[*leading_shape, N]``."""
    if not 2 <= int(w_bits) <= 8:
        raise ValueError(f"{op}: w_bits must be in 2..8, got {w_bits}")
    if not isinstance(packed_weight, torch.Tensor) or packed_weight.dtype != torch.int32 or packed_weight.dim() != 2:
        raise TypeError(f"{op}: packed_weight must be a 2-D int32 tensor, got "
                        f"{getattr(packed_weight, 'dtype', type(packed_weight).__name__)} "
                        f"{tuple(getattr(packed_weight, 'shape', ()))}")
    words = -(-k // (32 // int(w_bits)))
    if packed_weight.shape[1] != words:
        raise ValueError(f"{op}: packed_weight has {packed_weight.shape[1]} words a row; K = {k} at {w_bits} bits "
                         f"needs {words}")
    n = packed_weight.shape[0]
    for name, tensor in (("scales", scales), ("bias", bias)):
        if tensor is None and name == "bias":
            continue
        if not isinstance(tensor, torch.Tensor) or tensor.dtype != torch.float32 or tuple(tensor.shape) != (n,):
            raise ValueError(f"{op}: {name} must be float32 [{n}], got {getattr(tensor, 'dtype', type(tensor).__name__)} "
                             f"{tuple(getattr(tensor, 'shape', ()))}")
    out_shape = [*leading_shape, n]
    if residual is not None and (not isinstance(residual, torch.Tensor) or residual.dtype != torch.float32
                                 or list(residual.shape) != out_shape):
        raise ValueError(f"{op}: residual must be float32 {out_shape}, got "
                         f"{getattr(residual, 'dtype', type(residual).__name__)} {list(getattr(residual, 'shape', ()))}")
    devices = {t.device for t in (x, packed_weight, scales, bias, residual) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"{op}: expected all tensors on one device, got {sorted(map(str, devices))}")
    float32_max = float(np.finfo(np.float32).max)
    if not (np.isfinite(x_scale) and abs(x_scale) <= float32_max):
        raise ValueError(f"{op}: x_scale must be finite as a float32, got {x_scale}")
    if not np.isfinite(out_scale) or (out_scale > 0 and not (out_scale <= float32_max and np.float32(out_scale) > 0)):
        raise ValueError(f"{op}: out_scale must be finite (and > 0 as a float32 when requantizing), got {out_scale}")
    return n


def packed_linear_reference(x, packed_weight, w_bits, scales, bias=None, x_scale=1.0, relu=False, residual=None,
                            out_scale=0.0):
    """Plain-torch :func:`packed_linear`: unpack, exact integer matmul (float64 holds every partial sum), epilogue."""
    _check_codes("packed_linear", x, lambda rank: rank >= 1, "[..., K] (at least one dimension)")
    k = x.shape[-1]
    _check_packed_arguments("packed_linear", x, packed_weight, w_bits, k, x.shape[:-1], scales, bias, residual,
                            x_scale, out_scale)
    q = unpack_weights(packed_weight, w_bits, k)
    acc = torch.matmul(x.to(torch.float64), q.to(torch.float64).T).round().to(torch.int64)
    return _epilogue_reference(acc, scales, bias, x_scale, relu, residual, out_scale)


def packed_conv2d_reference(x_nhwc, packed_weight, w_bits, scales, bias=None, x_scale=1.0, kernel_h=3, kernel_w=3,
                            stride=1, padding=1, relu=False, residual=None, out_scale=0.0):
    """Plain-torch :func:`packed_conv2d`: unpack, exact float64 ``conv2d`` (zero padding), NHWC epilogue."""
    _check_codes("packed_conv2d", x_nhwc, lambda rank: rank == 4, "NHWC [B, H, W, C]")
    if min(kernel_h, kernel_w, stride) < 1 or padding < 0:
        raise ValueError(f"packed_conv2d: need kernel sizes and stride >= 1, padding >= 0, got {kernel_h}x{kernel_w}, "
                         f"stride {stride}, padding {padding}")
    batch, h, w_in, c = x_nhwc.shape
    if h + 2 * padding < kernel_h or w_in + 2 * padding < kernel_w:
        raise ValueError(f"packed_conv2d: kernel {kernel_h}x{kernel_w} larger than the padded input {h}x{w_in} "
                         f"(padding {padding})")
    k = kernel_h * kernel_w * c
    leading = (batch, (h + 2 * padding - kernel_h) // stride + 1, (w_in + 2 * padding - kernel_w) // stride + 1)
    n = _check_packed_arguments("packed_conv2d", x_nhwc, packed_weight, w_bits, k, leading, scales, bias, residual,
                                x_scale, out_scale)
    q = unpack_weights(packed_weight, w_bits, k)
    w = matrix_to_conv_weight(q, (n, c, kernel_h, kernel_w)).to(torch.float64)
    acc = F.conv2d(x_nhwc.permute(0, 3, 1, 2).to(torch.float64), w, stride=stride, padding=padding)
    acc = acc.permute(0, 2, 3, 1).round().to(torch.int64)
    return _epilogue_reference(acc, scales, bias, x_scale, relu, residual, out_scale)


def vote_count_reference(features, weight, bias, num_classes):
    """Plain-torch :func:`vote_count`: ``bincount(argmax(features @ weight.T + bias), minlength=num_classes)``."""
    if not (isinstance(features, torch.Tensor) and features.dim() == 2):
        raise ValueError(f"vote_count: features must be [B, F], got {tuple(getattr(features, 'shape', ()))}")
    if not (isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.shape[1] == features.shape[1]):
        raise ValueError(f"vote_count: weight must be [num_classes, {features.shape[1]}], got "
                         f"{tuple(getattr(weight, 'shape', ()))}")
    if weight.shape[0] != num_classes or num_classes < 1:
        raise ValueError(f"vote_count: num_classes={num_classes} must be >= 1 and equal weight's {weight.shape[0]} rows")
    if bias is not None and tuple(bias.shape) != (num_classes,):
        raise ValueError(f"vote_count: bias must be [{num_classes}], got {tuple(bias.shape)}")
    logits = F.linear(features.to(torch.float32), weight.to(torch.float32),
                      None if bias is None else bias.to(torch.float32))
    predictions = logits.argmax(dim=1)
    counts = torch.zeros(num_classes, dtype=torch.int64, device=features.device)
    return counts.scatter_add_(0, predictions, torch.ones_like(predictions))


# ---------------------------------------------------------------------------------------------
# dispatch
# ---------------------------------------------------------------------------------------------


def requantize_codes_reference(codes, in_scale, in_zero, out_scale, out_zero, out_min, out_max):
    """``clamp(round(((c - in_zero) * in_scale) / out_scale) + out_zero, out_min, out_max)`` as uint8, in
    float32 in that order (round half to even): the codes an activation quantizer of scale ``out_scale``
    gives the values ``(c - in_zero) * in_scale`` of codes ``c``. The scales are float32 numbers."""
    in_scale = torch.tensor(in_scale, dtype=torch.float32)
    out_scale = torch.tensor(out_scale, dtype=torch.float32)
    values = (codes.to(torch.float32) - in_zero) * in_scale
    return torch.clamp(torch.round(values / out_scale) + out_zero, out_min, out_max).to(torch.uint8)


def quantize_codes_reference(x, scale, zero_point, code_min, code_max, dtype=torch.uint8):
    """``clamp(round(x / scale) + zero_point, code_min, code_max)`` as ``dtype`` (uint8, or int8 for the
    packed GPU kernels' codes), in float32 in that order (round half to even): an activation quantizer's
    codes of float32 ``x``; ``scale`` is a float32 number or 0-dim float32 tensor (taken as it is). NaN has
    no code: the torch conversion of NaN to an integer is undefined, and ``arq::quantize_codes`` raises."""
    scale = torch.as_tensor(scale, dtype=torch.float32)
    return torch.clamp(torch.round(x / scale) + zero_point, code_min, code_max).to(dtype)


def lowbit_conv_max_chunk(max_code: int, w_bits: int) -> int:
    """How many ``vpmaddubsw`` pair sums ``arq::lowbit_conv2d`` may add in int16 and stay exact for
    codes in ``[0, max_code]`` and any ``w_bits``-bit weights: ``floor(32767 / (2 max_code 2^(w_bits-1)))``;
    0 where even one pair sum can overflow (the op refuses such layers; oneDNN runs them). The op
    runs longer chunks where a layer's own weights bound its sums (csrc/cpu/lowbit_conv.cpp)."""
    return 32767 // (2 * int(max_code) * (1 << (int(w_bits) - 1)))


def lowbit_conv_supported(max_code: int, w_bits: int) -> bool:
    """Whether ``arq::lowbit_conv2d`` runs codes in ``[0, max_code]`` with ``w_bits``-bit weights on
    this CPU: its AVX2 path adds in int16 and needs :func:`lowbit_conv_max_chunk` >= 1; its VNNI and
    portable paths add in int32 and take every width up to 8 x 8 (``cpu_isa()``, so ``ARQ_CPU_ISA``)."""
    return cpu_isa() != "avx2" or lowbit_conv_max_chunk(max_code, w_bits) >= 1


def lowbit_conv_weight_tiles(weight_codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``arq::lowbit_conv2d``'s weight layout for int8 weight codes ``[O, C, k, k]``: tiles
    ``[ceil(O / 8), k * k, ceil(C / 4), 8, 4]`` (8 output x 4 input channels per 32 bytes; the channels
    added up to those multiples get zero weights) and the int32 sums ``sum q[o, :]`` ``[O]``."""
    if weight_codes.dtype != torch.int8 or weight_codes.dim() != 4 or weight_codes.shape[2] != weight_codes.shape[3]:
        raise ValueError(f"weight_codes must be int8 [O, C, k, k], got {weight_codes.dtype} {tuple(weight_codes.shape)}")
    out_channels, channels, k, _ = weight_codes.shape
    blocks, groups = -(-out_channels // 8), -(-channels // 4)
    padded = torch.zeros((blocks * 8, groups * 4, k, k), dtype=torch.int8)
    padded[:out_channels, :channels] = weight_codes.cpu()
    tiles = padded.reshape(blocks, 8, groups, 4, k, k).permute(0, 4, 5, 2, 1, 3)
    tiles = tiles.reshape(blocks, k * k, groups, 8, 4).contiguous()
    return tiles, weight_codes.cpu().to(torch.int32).sum(dim=(1, 2, 3)).to(torch.int32)


def lowbit_conv2d_reference(x, weight_tiles, weight_sums, scale, bias, out_channels, kernel_size, stride, padding,
                            zero_point, max_code, w_bits, relu=False, residual=None, residual_scale=0.0,
                            residual_zero_point=0, out_scale=0.0, out_zero_point=0, out_min=0, out_max=255):
    """Plain-torch :func:`lowbit_conv2d`: the exact integer convolution in float64 (padding reads the
    zero point's code), then the op's float32 epilogue in its order (csrc/cpu/lowbit_conv.cpp):
    ``y = float(acc - z sum q) * scale + bias``, plus the residual, ReLU, then float32 ``y`` or the codes
    ``clamp(round(y * (1 / out_scale)) + out_zero_point, out_min, out_max)``; channels_last out."""
    blocks, taps, groups = weight_tiles.shape[:3]
    weight = weight_tiles.reshape(blocks, kernel_size, kernel_size, groups, 8, 4).permute(0, 4, 3, 5, 1, 2)
    weight = weight.reshape(blocks * 8, groups * 4, kernel_size, kernel_size)[:out_channels, :x.shape[1]]
    padded = F.pad(x.to(torch.float64), (padding,) * 4, value=float(zero_point))
    acc = F.conv2d(padded, weight.to(torch.float64), stride=stride).round().to(torch.int64)
    correction = weight_sums.to(torch.int64) * int(zero_point)
    y = (acc - correction[:, None, None]).to(torch.int32).to(torch.float32) * scale[:, None, None]
    if bias is not None:
        y = y + bias[:, None, None]
    if residual is not None:
        if residual.dtype == torch.uint8:
            r_scale = torch.tensor(residual_scale, dtype=torch.float32)
            y = y + (residual.to(torch.float32) - float(residual_zero_point)) * r_scale
        else:
            y = y + residual
    if relu:
        y = torch.relu(y)
    if out_scale > 0:
        inverse = torch.tensor(1.0, dtype=torch.float32) / torch.tensor(out_scale, dtype=torch.float32)
        t = torch.clamp(y * inverse, -1.0e9, 1.0e9)
        y = torch.clamp(torch.round(t) + out_zero_point, out_min, out_max).to(torch.uint8)
    return y.contiguous(memory_format=torch.channels_last)


def _has_kernel(name: str, key: str) -> bool:
    """Whether arq._C has a ``key`` kernel for ``arq::name`` (False for an op an older build lacks:
    the dispatcher raises for an unknown operator)."""
    if not compiled_ops_available():
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"arq::{name}", key)
    except RuntimeError:
        return False


def _requant_kwargs(relu: bool, out_scale: float) -> dict:
    if out_scale > 0:
        dtype, low, high = (torch.uint8, 0, 255) if relu else (torch.int8, -128, 127)
        return dict(out_scale=out_scale, out_dtype=dtype, qmin=low, qmax=high)
    return dict(out_scale=None, out_dtype=torch.float32)


def _triton_packed_linear(x, packed_weight, w_bits, scales, bias, x_scale, relu, residual, out_scale):
    from arq_kernels.packed_matmul import packed_linear as triton_packed_linear

    leading = x.shape[:-1]
    flat_residual = None if residual is None else residual.reshape(-1, residual.shape[-1])
    out = triton_packed_linear(x.reshape(-1, x.shape[-1]), packed_weight, w_bits, scales, bias, x_scale=x_scale,
                               relu=relu, residual=flat_residual, in_features=x.shape[-1],
                               **_requant_kwargs(relu, out_scale))
    return out.reshape(*leading, out.shape[-1])


def _triton_packed_conv2d(x, packed_weight, w_bits, scales, bias, x_scale, kernel_h, kernel_w, stride, padding,
                          relu, residual, out_scale):
    from arq_kernels.packed_conv import packed_conv2d as triton_packed_conv2d

    return triton_packed_conv2d(x, packed_weight, w_bits, scales, bias, kernel_size=(kernel_h, kernel_w),
                                stride=stride, padding=padding, relu=relu, residual=residual, x_scale=x_scale,
                                **_requant_kwargs(relu, out_scale))


def _triton_vote_count(features, weight, bias, num_classes):
    from arq_kernels.votes import vote_count as triton_vote_count

    return triton_vote_count(features, weight, bias, num_classes)


# The Triton launchers take their options by keyword; these adapters give them the ops' signatures.
_TRITON_ADAPTERS = {
    "packed_linear": _triton_packed_linear,
    "packed_conv2d": _triton_packed_conv2d,
    "vote_count": _triton_vote_count,
}


def _triton_op(name: str):
    try:
        import arq_kernels

        if not arq_kernels.triton_available():
            return None
    except ImportError:
        return None
    return _TRITON_ADAPTERS[name]


def _choose(name: str, device: torch.device, backend: str):
    """Returns (backend, callable or None) for op ``name`` on ``device``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch", None
    if device.type == "cpu":
        if backend in ("auto", "cpp") and _has_kernel(name, "CPU"):
            return "cpp", getattr(torch.ops.arq, name)
        if backend == "cpp":
            raise RuntimeError(f"arq::{name}: the C++ op is not available (build arq._C)")
    elif device.type == "cuda":
        if backend in ("auto", "cuda") and cuda_ops_available() and _has_kernel(name, "CUDA"):
            return "cuda", getattr(torch.ops.arq, name)
        if backend == "cuda":
            raise RuntimeError(f"arq::{name}: no CUDA kernel built")
        if backend in ("auto", "triton"):
            fn = _triton_op(name)
            if fn is not None:
                return "triton", fn
        if backend == "triton":
            raise RuntimeError(f"arq::{name}: arq_kernels.{name} (Triton) is not available")
    if backend != "auto":
        raise RuntimeError(f"arq::{name}: backend {backend!r} does not run on {device.type}")
    return "torch", None


def cpu_isa() -> str:
    """The CPU GEMM micro-kernel the packed ops use now: ``"vnni"``, ``"avx2"`` or ``"scalar"``."""
    if not compiled_ops_available():
        return "torch"
    return torch.ops.arq.packed_cpu_isa()


def packed_linear(x, packed_weight, w_bits, scales, bias=None, x_scale=1.0, relu=False, residual=None, out_scale=0.0,
                  *, backend="auto"):
    """Quantized linear layer with a fused epilogue: ``y[m, n] = epilogue(sum_k x[m, k] q[n, k])``.

    Args:
        x: int8 ``[..., K]`` activation codes (uint8 for post-ReLU activations), ``x = x_scale * code``.
        packed_weight: int32 ``[N, ceil(K / (32 // w_bits))]`` (:func:`pack_weights`).
        w_bits: 2..8.
        scales: float32 ``[N]`` per-output-channel weight scales.
        bias: float32 ``[N]`` or None.
        x_scale: the activations' scale.
        relu: apply ReLU (and requantize to uint8 when ``out_scale > 0``).
        residual: float32 ``[..., N]`` added before the ReLU, or None.
        out_scale: ``> 0``: return int8 (uint8 with relu) codes ``round(y / out_scale)``; else float32 ``y``.
        backend: see the module docstring.

    Returns:
        ``[..., N]`` float32, int8 or uint8.
    """
    chosen, fn = _choose("packed_linear", x.device, backend)
    if chosen == "triton" and x.dtype != torch.int8:
        if backend == "triton":
            raise ValueError("packed_linear: the Triton kernel takes int8 activation codes, got uint8")
        chosen, fn = "torch", None
    args = (x, packed_weight, int(w_bits), scales, bias, float(x_scale), bool(relu), residual, float(out_scale))
    if fn is not None:
        return fn(*args)
    return packed_linear_reference(*args)


def packed_conv2d(x_nhwc, packed_weight, w_bits, scales, bias=None, x_scale=1.0, kernel_h=3, kernel_w=3, stride=1,
                  padding=1, relu=False, residual=None, out_scale=0.0, *, backend="auto"):
    """Quantized NHWC convolution (implicit GEMM) with the fused epilogue of :func:`packed_linear`.

    Args:
        x_nhwc: int8/uint8 ``[B, H, W, C]``.
        packed_weight: int32 ``[N, ceil(KH*KW*C / (32 // w_bits))]``, K in ``(kh, kw, c)`` order
            (:func:`conv_weight_to_matrix` then :func:`pack_weights`).
        kernel_h, kernel_w, stride, padding: the convolution's geometry (zero padding: the activations' zero
            point is 0 for symmetric int8 and uint8 codes).
        residual: float32 ``[B, OH, OW, N]`` or None. The rest as :func:`packed_linear`.

    Returns:
        NHWC ``[B, OH, OW, N]``, ``OH = (H + 2 padding - KH) // stride + 1``.
    """
    chosen, fn = _choose("packed_conv2d", x_nhwc.device, backend)
    if chosen == "triton" and x_nhwc.dtype != torch.int8:
        if backend == "triton":
            raise ValueError("packed_conv2d: the Triton kernel takes int8 activation codes, got uint8")
        chosen, fn = "torch", None
    args = (x_nhwc, packed_weight, int(w_bits), scales, bias, float(x_scale), int(kernel_h), int(kernel_w),
            int(stride), int(padding), bool(relu), residual, float(out_scale))
    if fn is not None:
        return fn(*args)
    return packed_conv2d_reference(*args)


def vote_count(features, weight, bias, num_classes, *, backend="auto"):
    """Votes of the last linear layer: ``counts[c] = #{b : argmax_c' (features[b] . weight[c'] + bias[c']) = c}``.

    argmax as ``torch.argmax`` (ties to the lowest index, NaN counts as the maximum); the logits are never
    stored. The C++ and CUDA kernels compute each logit in one fixed float32 order (16 strided partial sums,
    then a pairwise tree; csrc/cpu/vote_count.cpp), so they agree with each other bit for bit and with the
    reference up to float32 rounding (exactly on integer-valued data).

    Args:
        features: float32 ``[B, F]``. weight: float32 ``[num_classes, F]``. bias: float32 ``[num_classes]`` or None.

    Returns:
        int64 ``[num_classes]`` on the features' device (no host synchronization).
    """
    chosen, fn = _choose("vote_count", features.device, backend)
    if fn is not None:
        return fn(features, weight, bias, int(num_classes))
    return vote_count_reference(features, weight, bias, int(num_classes))


# ---------------------------------------------------------------------------------------------
# fake (meta) implementations, for torch.compile
# ---------------------------------------------------------------------------------------------


def requantize_codes(codes, in_scale, in_zero, out_scale, out_zero, out_min, out_max, *, backend="auto"):
    """:func:`requantize_codes_reference` (uint8 ``codes`` of any shape, same shape and memory format
    out), through ``arq::requantize_codes`` on CPU (the same float32 operations in the same order,
    AVX2 or portable, so every backend gives the same codes)."""
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.uint8:
        raise TypeError(f"codes must be a uint8 tensor, got {getattr(codes, 'dtype', type(codes).__name__)}")
    for name, value in (("in_scale", in_scale), ("out_scale", out_scale)):
        if not (np.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be finite and > 0, got {value}")
    if not 0 <= out_min <= out_max <= 255:
        raise ValueError(f"need 0 <= out_min <= out_max <= 255, got out_min={out_min}, out_max={out_max}")
    for name, value in (("in_zero", in_zero), ("out_zero", out_zero)):
        if not 0 <= value <= 255:
            raise ValueError(f"{name} must be in 0..255, got {value}")
    if backend not in ("auto", "cpp", "torch"):
        raise ValueError(f"backend must be 'auto', 'cpp' or 'torch' for requantize_codes, got {backend!r}")
    if backend != "torch" and codes.device.type == "cpu" and _has_kernel("requantize_codes", "CPU"):
        return torch.ops.arq.requantize_codes(codes, in_scale, in_zero, out_scale, out_zero, out_min, out_max)
    if backend == "cpp":
        raise RuntimeError(f"arq::requantize_codes: no C++ kernel for {codes.device.type} (build arq._C)")
    return requantize_codes_reference(codes, in_scale, in_zero, out_scale, out_zero, out_min, out_max)


def quantize_codes(x, scale, zero_point, code_min, code_max, *, backend="auto"):
    """:func:`quantize_codes_reference` (float32 ``x`` of any shape, uint8 of the same shape and memory
    format out), through ``arq::quantize_codes`` on CPU: one pass doing the same float32 operations in
    the same order (AVX2 or portable), so every backend gives the same codes. The C++ op raises on NaN."""
    if not isinstance(x, torch.Tensor) or x.dtype != torch.float32:
        raise TypeError(f"x must be a float32 tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if not (np.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be finite and > 0, got {scale}")
    if not 0 <= code_min <= code_max <= 255:
        raise ValueError(f"need 0 <= code_min <= code_max <= 255, got code_min={code_min}, code_max={code_max}")
    if not 0 <= zero_point <= 255:
        raise ValueError(f"zero_point must be in 0..255, got {zero_point}")
    if backend not in ("auto", "cpp", "torch"):
        raise ValueError(f"backend must be 'auto', 'cpp' or 'torch' for quantize_codes, got {backend!r}")
    if backend != "torch" and x.device.type == "cpu" and _has_kernel("quantize_codes", "CPU"):
        return torch.ops.arq.quantize_codes(x, scale, zero_point, code_min, code_max)
    if backend == "cpp":
        raise RuntimeError(f"arq::quantize_codes: no C++ kernel for {x.device.type} (build arq._C)")
    return quantize_codes_reference(x, scale, zero_point, code_min, code_max)


def lowbit_conv2d(x, weight_tiles, weight_sums, scale, bias, out_channels, kernel_size, stride, padding, zero_point,
                  max_code, w_bits, relu=False, residual=None, residual_scale=0.0, residual_zero_point=0,
                  out_scale=0.0, out_zero_point=0, out_min=0, out_max=255, *, backend="auto"):
    """:func:`lowbit_conv2d_reference` through ``arq::lowbit_conv2d`` on CPU: the convolution of uint8
    activation codes ``x [B, C, H, W]`` (codes in ``[0, max_code]``) with ``w_bits``-bit weight codes
    (:func:`lowbit_conv_weight_tiles`), with the epilogue fused: on AVX2 adding in int16 in chunks of
    at least :func:`lowbit_conv_max_chunk` steps (all of them where the layer's own weights bound the
    int16 sums), 3x3 stride-1 layers through integer Winograd: F(2 x 2, 3 x 3) for 32 input channels or
    more where the codes fit it (``4 max_code <= 255``), else F(2, 3) along the width (``2 max_code <= 255``;
    ``ARQ_LOWBIT_WINOGRAD=2d``/``row``/``0`` forces one or the direct loop), with AVX-512 VNNI (``vpdpbusd``) and on the
    portable path in int32 (any widths, :func:`lowbit_conv_supported`). Same bits as the reference on
    every path (all of them compute the exact integer convolution, then the same float32 epilogue).

    Args:
        scale: float32 ``[O]``, ``s_x s_w[o]``. bias: float32 ``[O]`` or None. zero_point: the codes'
            zero point (padding reads it). residual: ``[B, O, OH, OW]``, float32 (added as is) with
            float32 output, or uint8 codes (added as ``(r - residual_zero_point) residual_scale``)
            with codes output. out_scale: > 0 for uint8 codes out, else float32.
    """
    if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8 or x.dim() != 4:
        raise TypeError(f"x must be uint8 codes [B, C, H, W], got {getattr(x, 'dtype', type(x).__name__)}")
    if backend not in ("auto", "cpp", "torch"):
        raise ValueError(f"backend must be 'auto', 'cpp' or 'torch' for lowbit_conv2d, got {backend!r}")
    if backend != "torch" and not lowbit_conv_supported(max_code, w_bits):
        raise ValueError(f"{w_bits}-bit weights with codes up to max_code={max_code} can overflow int16 on this "
                         "CPU's AVX2 path; lowbit_conv2d needs 2 * max_code * 2^(w_bits-1) <= 32767 there")
    if residual is not None and (residual.dtype == torch.float32) != (out_scale <= 0):
        raise ValueError("lowbit_conv2d: a float32 residual goes with float32 output (out_scale <= 0), uint8 "
                         f"residual codes with codes output (out_scale > 0); got {residual.dtype} and {out_scale}")
    args = (x, weight_tiles, weight_sums, scale, bias, int(out_channels), int(kernel_size), int(stride), int(padding),
            int(zero_point), int(max_code), int(w_bits), bool(relu), residual, float(residual_scale),
            int(residual_zero_point), float(out_scale), int(out_zero_point), int(out_min), int(out_max))
    if backend != "torch" and x.device.type == "cpu" and _has_kernel("lowbit_conv2d", "CPU"):
        return torch.ops.arq.lowbit_conv2d(*args)
    if backend == "cpp":
        raise RuntimeError(f"arq::lowbit_conv2d: no C++ kernel for {x.device.type} (build arq._C)")
    if int(x.max()) > max_code:
        raise ValueError(f"x has a code above max_code={max_code}")
    return lowbit_conv2d_reference(*args)


def _out_dtype(relu: bool, out_scale: float) -> torch.dtype:
    if out_scale > 0:
        return torch.uint8 if relu else torch.int8
    return torch.float32


def _check_fake_arguments(op: str, tensors, *, dims: tuple | None = None, geometry: tuple | None = None) -> None:
    """The checks a fake kernel can make without data: its tensors on one device (a CPU call with
    one meta argument dispatches here, and an empty tensor must not stand in for the real result),
    the first tensor's rank and the convolution geometry (kernel, stride, padding)."""
    present = [t for t in tensors if t is not None]
    devices = {t.device for t in present}
    torch._check(len(devices) <= 1, lambda: f"{op}: expected all tensors on one device, got {sorted(map(str, devices))}")
    if dims is not None:
        torch._check(present[0].dim() in dims, lambda: f"{op}: x must have {' or '.join(map(str, dims))} dimensions, "
                                                      f"got {present[0].dim()}")
    if geometry is not None:
        kernel, stride, padding = geometry
        torch._check(min(kernel) >= 1 and stride >= 1 and padding >= 0,
                     lambda: f"{op}: need kernel sizes and stride >= 1, padding >= 0, got {kernel}, {stride}, {padding}")


def _register_fakes() -> None:
    @torch.library.register_fake("arq::packed_linear")
    def _packed_linear_fake(x, packed_weight, w_bits, scales, bias, x_scale, relu, residual, out_scale):
        _check_fake_arguments("packed_linear", (x, packed_weight, scales, bias, residual))
        torch._check(x.dtype in (torch.int8, torch.uint8), lambda: "packed_linear: x must be int8 or uint8")
        return x.new_empty((*x.shape[:-1], packed_weight.shape[0]), dtype=_out_dtype(relu, out_scale))

    @torch.library.register_fake("arq::packed_conv2d")
    def _packed_conv2d_fake(x, packed_weight, w_bits, scales, bias, x_scale, kernel_h, kernel_w, stride, padding,
                            relu, residual, out_scale):
        _check_fake_arguments("packed_conv2d", (x, packed_weight, scales, bias, residual), dims=(4,),
                              geometry=((kernel_h, kernel_w), stride, padding))
        b, h, w, _ = x.shape
        oh = (h + 2 * padding - kernel_h) // stride + 1
        ow = (w + 2 * padding - kernel_w) // stride + 1
        return x.new_empty((b, oh, ow, packed_weight.shape[0]), dtype=_out_dtype(relu, out_scale))

    @torch.library.register_fake("arq::vote_count")
    def _vote_count_fake(features, weight, bias, num_classes):
        _check_fake_arguments("vote_count", (features, weight, bias))
        torch._check(num_classes >= 1, lambda: f"vote_count: num_classes must be >= 1, got {num_classes}")
        return features.new_empty((num_classes,), dtype=torch.int64)

    @torch.library.register_fake("arq::requantize_codes")
    def _requantize_codes_fake(codes, in_scale, in_zero, out_scale, out_zero, out_min, out_max):
        return torch.empty_like(codes)

    if _has_kernel("quantize_codes", "CPU"):  # an arq._C built before the op has no schema for it
        @torch.library.register_fake("arq::quantize_codes")
        def _quantize_codes_fake(x, scale, zero_point, code_min, code_max):
            return torch.empty_like(x, dtype=torch.uint8)

    @torch.library.register_fake("arq::noisy_input")
    def _noisy_input_fake(x, sigma, seed, input_index, draw, sample_start, count):
        torch._check(count >= 0, lambda: f"noisy_input: count must be >= 0, got {count}")
        return x.new_empty((count, *x.shape))

    @torch.library.register_fake("arq::argmax_count")
    def _argmax_count_fake(logits, num_classes):
        torch._check(num_classes >= 1, lambda: f"argmax_count: num_classes must be >= 1, got {num_classes}")
        return logits.new_empty((num_classes,), dtype=torch.int64)

    if _has_kernel("noisy_input_codes", "CPU"):
        @torch.library.register_fake("arq::noisy_input_codes")
        def _noisy_input_codes_fake(x, sigma, seed, input_index, draw, sample_start, count, mean, std, scale,
                                    zero_point, code_min, code_max):
            _check_fake_arguments("noisy_input_codes", (x, mean, std), dims=(3,))
            torch._check(count >= 0, lambda: f"noisy_input_codes: count must be >= 0, got {count}")
            return torch.empty((count, *x.shape), dtype=torch.uint8, device=x.device,
                               memory_format=torch.channels_last)

    if _has_kernel("lowbit_conv2d", "CPU"):
        @torch.library.register_fake("arq::lowbit_conv2d")
        def _lowbit_conv2d_fake(x, weight_tiles, weight_sums, scale, bias, out_channels, kernel_size, stride, padding,
                                zero_point, max_code, w_bits, relu, residual, residual_scale, residual_zero_point,
                                out_scale, out_zero_point, out_min, out_max):
            _check_fake_arguments("lowbit_conv2d", (x, weight_tiles, weight_sums, scale, bias, residual), dims=(4,),
                                  geometry=((kernel_size,), stride, padding))
            b, _, h, w = x.shape
            oh = (h + 2 * padding - kernel_size) // stride + 1
            ow = (w + 2 * padding - kernel_size) // stride + 1
            return torch.empty((b, out_channels, oh, ow), dtype=torch.uint8 if out_scale > 0 else torch.float32,
                               device=x.device, memory_format=torch.channels_last)


if compiled_ops_available():
    try:
        _register_fakes()
    except RuntimeError as error:  # already registered (module reloaded)
        if "already" not in str(error):
            raise
