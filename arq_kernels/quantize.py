"""``quantize_nhwc``: float32 activations to the int8 NHWC codes the packed kernels read, in one pass.

A packed layer's input is ``c = clamp(round(x / s), q_lo, q_hi)`` (half to even, the IEEE float32
quotient: the fake-quant reference's codes, :mod:`arq.quant.quantizers`), stored as the int8
``c + z``: ``z = 0`` for signed codes and unsigned codes up to 127, ``z = -128`` for 8-bit unsigned
codes 0..255. The same codes in torch take five passes over the activation (layout copy, divide,
round, clamp, cast); this kernel reads each float once and writes each code once, gathering from
any strides of an NCHW tensor (channels_last makes the reads contiguous) into a contiguous
``[B, H, W, C]`` output. A 2-D ``[M, K]`` input gives ``[M, K]`` codes.

Outline: candidate configs (``configs/quantize.json``), kernel, launcher :func:`quantize_nhwc`,
plain-torch reference :func:`quantize_nhwc_reference`.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from arq_kernels._common import as_float32, launch_options, pick_config, quantize_codes

# ---------------------------------------------------------------------------------------------
# candidate configs (the chosen one: configs/quantize.json)
# ---------------------------------------------------------------------------------------------

CANDIDATES = [{"BLOCK": block, "num_warps": warps} for block in (1024, 2048, 4096) for warps in (4, 8)]

# ---------------------------------------------------------------------------------------------
# kernel
# ---------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["q_lo", "q_hi", "zero_point"])
def _quantize_nhwc_kernel(
    x_ptr, out_ptr,
    total, C, H, W,
    stride_xb, stride_xc, stride_xh, stride_xw,
    scale, q_lo, q_hi, zero_point,
    BLOCK: tl.constexpr,
):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offsets < total
    c = offsets % C
    w = (offsets // C) % W
    h = (offsets // (C * W)) % H
    b = offsets // (C * W * H)
    x = tl.load(x_ptr + b * stride_xb + c * stride_xc + h * stride_xh + w * stride_xw, mask=ok, other=0.0)
    tl.store(out_ptr + offsets, quantize_codes(x, scale, q_lo, q_hi, zero_point).to(tl.int8), mask=ok)


# ---------------------------------------------------------------------------------------------
# launcher
# ---------------------------------------------------------------------------------------------


def _check(x: torch.Tensor, scale: float, q_lo: int, q_hi: int, zero_point: int) -> None:
    if x.dtype != torch.float32 or x.dim() not in (2, 4):
        raise TypeError(f"x must be a float32 [B, C, H, W] or [M, K] tensor, got {x.dtype} {tuple(x.shape)}")
    step = as_float32(scale)
    if not (math.isfinite(step) and step > 0 and math.isfinite(1.0 / step)):
        raise ValueError(f"scale must be a positive float32 with a finite reciprocal, got {scale}")
    if not (q_lo <= q_hi and -128 <= q_lo + zero_point and q_hi + zero_point <= 127):
        raise ValueError(f"codes [{q_lo}, {q_hi}] + zero point {zero_point} do not fit int8")


def quantize_nhwc(x: torch.Tensor, scale: float, q_lo: int, q_hi: int, zero_point: int = 0,
                  out: torch.Tensor | None = None, config: dict | None = None) -> torch.Tensor:
    """int8 ``clamp(round(x / scale), q_lo, q_hi) + zero_point``, NHWC for a 4-D ``x``.

    Args:
        x: float32 ``[B, C, H, W]`` (any strides) or ``[M, K]``.
        scale: the activation step (rounded to float32, as the fake-quant reference holds it).
        q_lo, q_hi: the code range (e.g. 0..255 for 8-bit unsigned, -7..7 for 4-bit signed).
        zero_point: added to every code so that it fits int8 (-128 for 0..255).
        out: optional preallocated contiguous int8 output of the returned shape.
        config: launch config override (``BLOCK``, ``num_warps``).

    Returns:
        int8 ``[B, H, W, C]`` (contiguous) or ``[M, K]``.
    """
    _check(x, scale, q_lo, q_hi, zero_point)
    if x.dim() == 2:
        view = x[:, :, None, None]
        shape = tuple(x.shape)
    else:
        view = x
        shape = (x.shape[0], x.shape[2], x.shape[3], x.shape[1])
    if out is None:
        out = torch.empty(shape, dtype=torch.int8, device=x.device)
    elif tuple(out.shape) != shape or out.dtype != torch.int8 or out.device != x.device or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous int8 tensor of shape {shape} on {x.device}")
    total = out.numel()
    if total == 0:
        return out
    cfg = dict(config) if config is not None else pick_config("quantize", x.device)
    grid = (triton.cdiv(total, cfg["BLOCK"]),)
    batch, channels, height, width = view.shape
    # q_lo / q_hi as tensors would be specialized away if equal to 1: do_not_specialize keeps them
    _quantize_nhwc_kernel[grid](
        view, out, total, channels, height, width,
        view.stride(0), view.stride(1), view.stride(2), view.stride(3),
        as_float32(scale), int(q_lo), int(q_hi), int(zero_point),
        BLOCK=cfg["BLOCK"], **launch_options(cfg),
    )
    return out


# ---------------------------------------------------------------------------------------------
# plain PyTorch reference (same signature)
# ---------------------------------------------------------------------------------------------


def quantize_nhwc_reference(x: torch.Tensor, scale: float, q_lo: int, q_hi: int, zero_point: int = 0,
                            out: torch.Tensor | None = None, config: dict | None = None) -> torch.Tensor:
    """Plain-torch :func:`quantize_nhwc`: float32 divide, round half to even, clamp, shift, permute."""
    _check(x, scale, q_lo, q_hi, zero_point)
    s = torch.tensor(as_float32(scale), dtype=torch.float32, device=x.device)
    codes = (torch.clamp(torch.round(x / s), q_lo, q_hi) + zero_point).to(torch.int8)
    codes = codes.permute(0, 2, 3, 1).contiguous() if x.dim() == 4 else codes.contiguous()
    if out is not None:
        out.copy_(codes)
        return out
    return codes
