"""``packed_conv2d``: NHWC implicit-GEMM convolution, int8 activations x packed 2-8 bit weights,
int32 accumulation, the fused epilogue of :mod:`arq_kernels.packed_matmul`.

The convolution is the GEMM ``out[m, n] = sum_k A[m, k] q[n, k]`` with
``m = (b, oh, ow)`` (``M = B * OH * OW``, the NHWC output rows), ``n`` the output channel and
``k = (kh, kw, c)`` in that order (``K = KH * KW * C``, docs/design.md's packed conv weight
order, ``arq.quant.packing.conv_weight_to_matrix``). ``A`` is never built: each K tile's
activations are gathered from ``x[b, oh * sh - ph + kh, ow * sw - pw + kw, c]``, zero outside
the image: the input's zero point ``z`` (0 for symmetric codes; -128 for 8-bit unsigned codes
carried as int8), so that padding contributes the real value 0 after the ``-z * sum q`` correction
of :func:`arq_kernels.packed_matmul.packed_linear`. Any KH x KW (1x1 and 3x3 are the ResNet
cases), any stride and padding; dilation 1, groups 1.

Outline: candidate configs (``configs/packed_conv.json``), kernel, launcher
:func:`packed_conv2d` (checks, allocates, launches), plain-torch reference
:func:`packed_conv2d_reference` (float64 convolution of the integer codes: exact).

Two K loops, the same sums (``ARQ_TRITON_CONV_LOOP`` or a config's ``"LOOP"`` picks one):

* ``im2col`` (default): K in steps of BLOCK_K over the flattened ``(kh, kw, c)``; every step
  recomputes each element's ``(kh, kw, c)`` (division by the runtime C) and its bounds. Any
  input strides.
* ``rows``: for contiguous NHWC rows (channel stride 1, pixel stride C), the ``KW * C`` codes
  of one kernel row of a window are contiguous in memory and in K (the weight order is
  ``(kh, kw, c)``), so the loop runs over the KH kernel rows and, inside one, over that span in
  steps of BLOCK_K. C is a compile-time constant there, so each column's tap ``kw = col // C``
  is a constant vector, the row's bounds are checked once per row, and the gather is one
  pointer per output pixel plus the column. Columns past the span (the last step of a row
  when BLOCK_K does not divide ``KW * C``) meet zeroed weights. With a zero point z the
  padding is read as 0 and ``z * (weight sum of the taps inside the image)`` is subtracted
  once per tile (four entries of :func:`tap_prefix_sums`), instead of a per-byte select every
  step. Specialized per C (a few values in a network). On an H200 (2026-11-29) its kernels took
  0.87x (W4A4) / 0.79x (W8A8) ``im2col``'s time on ResNet-110 (0.66x on 64 channels, level on
  16, at a quarter occupancy: shared memory), but the end to end was host-bound and read
  0.95x / 0.97x; bench_e2e's ``*_graphs_rows`` variants A/B it without the host launches.

Launches: :func:`packed_conv2d` checks its arguments and derives the launch every call; with
``plans`` (a dict the caller keeps, as each ``arq.quant.kernels.PackedConv2d`` does) it does so
once per distinct key and then only allocates the outputs and launches.

Blocked algorithm, ``im2col`` (one program = BLOCK_M output pixels x BLOCK_N output channels)::

    (b, oh, ow) = split(m)
    for k in range(0, K, BLOCK_K):
        (kh, kw, c) = split(k)
        a = x[b, oh*sh - ph + kh, ow*sw - pw + kw, c]   # int8 gather, z in the padding
        w = sign_extend(field(packed[n, k]))            # int8 [BLOCK_K, BLOCK_N]
        acc += a @ w                                    # int32
    epilogue(acc - z * sum_k w) -> out[b, oh, ow, n]
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from arq_kernels._common import launch_options, pick_config, width_buckets
from arq_kernels.packed_matmul import CANDIDATES as CANDIDATES_GEMM
from arq_kernels.packed_matmul import (
    MAX_K,
    EpilogueArgs,
    _check_bits,
    epilogue_reference,
    epilogue_store,
    packed_width,
    tile_indices,
    unpack_weight_tile,
    unpack_weight_words,
    word_tiles,
    unpack_weights,
    zero_point_weight_sums,
)

# ---------------------------------------------------------------------------------------------
# candidate configs (chosen ones: configs/packed_conv.json): the GEMM tiles of packed_linear
# ---------------------------------------------------------------------------------------------

CANDIDATES = CANDIDATES_GEMM

# The row loop's own candidates (benchmarks/bench_kernels.py tune, "rows"; merged into the tables as
# "rows_<bucket>" entries, which the row loop reads before the shared ones): on an H200 (2026-11-29) it ran
# at 18-25 % occupancy with the im2col loop's configs, held back by the shared memory of three pipeline
# stages of its int8 weight tiles (52-111 KB a block), so fewer stages and narrower K steps (32 at least:
# a K step of 16 does not compile for the int8 dot on sm_90, Triton 3.8)
ROWS_CANDIDATES = [
    {"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8, "num_warps": w, "num_stages": s, "LOOP": "rows"}
    for m, n, k, w, s in [
        (64, 16, 32, 4, 2), (128, 16, 32, 4, 1), (128, 16, 32, 4, 2), (256, 16, 32, 4, 2), (256, 16, 32, 8, 1),
        (64, 32, 32, 4, 2), (128, 32, 32, 4, 2), (128, 32, 64, 4, 2), (256, 32, 32, 8, 2),
        (64, 64, 32, 4, 2), (64, 64, 64, 4, 1), (64, 64, 64, 4, 2), (128, 64, 32, 4, 2), (128, 64, 64, 8, 2),
    ]
]

# ---------------------------------------------------------------------------------------------
# kernel
# ---------------------------------------------------------------------------------------------


@triton.jit
def window_origins(m, OH, OW, stride_h, stride_w, pad_h, pad_w):
    """For output rows ``m = (b, oh, ow)``: the image ``b`` and the top-left input pixel
    ``(ih0, iw0)`` of each one's window (negative where the window overhangs the padding)."""
    ow = m % OW
    oh = (m // OW) % OH
    return m // (OW * OH), oh * stride_h - pad_h, ow * stride_w - pad_w


@triton.jit(do_not_specialize=["q_lo", "q_hi", "zero_point", "x_zero_point"])
def _packed_conv2d_kernel(
    # pointers (wsum_ptr: int32 [N] weight row sums, read when X_ZP; codes_ptr: the int8 codes of
    # the float output, written when OUT_MODE == 3)
    x_ptr, w_ptr, w_scale_ptr, bias_ptr, res_ptr, out_ptr, codes_ptr, wsum_ptr,
    # sizes: input [B, H, W, C], output [B, OH, OW, N] seen as [M, N], K = KH * KW * C
    H, W, C, OH, OW, M, N, K,
    # geometry
    stride_h, stride_w, pad_h, pad_w,
    # strides of x (NHWC) and of the packed weight rows; residual and out are contiguous [M, N]
    stride_xb, stride_xh, stride_xw, stride_xc, stride_wn,
    # the input's zero point z (codes c = x - z), then the epilogue scalars
    x_zero_point, x_scale, res_scale, out_scale, q_lo, q_hi, zero_point,
    # meta-parameters
    X_ZP: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, BITS: tl.constexpr, VALUES: tl.constexpr, WORD_TILES: tl.constexpr,
    HAS_BIAS: tl.constexpr, RELU: tl.constexpr, RES_MODE: tl.constexpr,
    OUT_MODE: tl.constexpr, OUT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = tile_indices(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    m_ok = m < M

    b, ih0, iw0 = window_origins(m, OH, OW, stride_h, stride_w, pad_h, pad_w)
    row_base = b.to(tl.int64) * stride_xb
    num_words = tl.cdiv(K, VALUES)

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        # -- k = (kh, kw, c): gather the activations of this K tile (implicit im2col) ------------
        k = k0 + ks
        c = k % C
        kw = (k // C) % KW
        kh = k // (C * KW)
        ih = ih0[:, None] + kh[None, :]
        iw = iw0[:, None] + kw[None, :]
        inside = (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        ok = m_ok[:, None] & (k < K)[None, :] & inside
        a = tl.load(x_ptr + row_base[:, None] + ih * stride_xh + iw * stride_xw + c[None, :] * stride_xc,
                    mask=ok, other=0)
        if X_ZP:  # the padding holds the real 0, i.e. the code z (k >= K meets zero weights)
            a = tl.where(inside, a, x_zero_point).to(tl.int8)
        if WORD_TILES:
            w = unpack_weight_words(w_ptr, k0, n, num_words, N, stride_wn, BITS, VALUES, BLOCK_K, BLOCK_N)
        else:
            w = unpack_weight_tile(w_ptr, k, n, K, N, stride_wn, BITS, VALUES)
        acc = tl.dot(a, w, acc, out_dtype=tl.int32)
    if X_ZP:
        acc = acc - x_zero_point * tl.load(wsum_ptr + n, mask=n < N, other=0)[None, :]

    epilogue_store(acc, m, n, M, N, w_scale_ptr, bias_ptr, res_ptr, out_ptr, codes_ptr,
                   N, 1, N, 1,
                   x_scale, res_scale, out_scale, q_lo, q_hi, zero_point,
                   HAS_BIAS, RELU, RES_MODE, OUT_MODE, OUT_DTYPE)


@triton.jit(do_not_specialize=["q_lo", "q_hi", "zero_point", "x_zero_point"])
def _packed_conv2d_rows_kernel(
    # as _packed_conv2d_kernel; x has contiguous rows (channel stride 1, pixel stride C); w8_ptr:
    # the same weights unpacked, int8 [N, K] contiguous, read instead of w_ptr when W_INT8; psum_ptr:
    # int32 [(KH + 1) * (KW + 1), N], the taps' weight sums as 2-D prefix sums (read when X_ZP)
    x_ptr, w_ptr, w8_ptr, w_scale_ptr, bias_ptr, res_ptr, out_ptr, codes_ptr, wsum_ptr, psum_ptr,
    H, W, OH, OW, M, N, K,
    stride_h, stride_w, pad_h, pad_w,
    stride_xb, stride_xh, stride_wn,
    x_zero_point, x_scale, res_scale, out_scale, q_lo, q_hi, zero_point,
    X_ZP: tl.constexpr, C: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, BITS: tl.constexpr,
    VALUES: tl.constexpr, WORD_TILES: tl.constexpr, W_INT8: tl.constexpr,
    HAS_BIAS: tl.constexpr, RELU: tl.constexpr, RES_MODE: tl.constexpr,
    OUT_MODE: tl.constexpr, OUT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    SPAN: tl.constexpr = KW * C  # one kernel row of a window: contiguous codes, contiguous K
    pid_m, pid_n = tile_indices(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_K)
    m_ok = m < M

    b, ih0, iw0 = window_origins(m, OH, OW, stride_h, stride_w, pad_h, pad_w)
    # the window's first code (outside the image where the window overhangs: read only under the mask)
    window = b.to(tl.int64) * stride_xb + ih0.to(tl.int64) * stride_xh + iw0 * C
    num_words = tl.cdiv(K, VALUES)

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    for kh in range(KH):
        ih = ih0 + kh
        row_ok = m_ok & (ih >= 0) & (ih < H)
        row = window + kh * stride_xh
        for start in tl.static_range(0, SPAN, BLOCK_K):
            col = start + cols  # place in the span: tap col // C, channel col % C
            iw = iw0[:, None] + (col // C)[None, :]
            inside = row_ok[:, None] & (iw >= 0) & (iw < W)
            # the padding reads as 0 (with a zero point z, the real 0 is the code z: corrected
            # after the loop, which is cheaper than selecting z byte by byte here)
            a = tl.load(x_ptr + row[:, None] + col[None, :], mask=inside & (col < SPAN)[None, :], other=0)
            k0 = kh * SPAN + start
            if W_INT8:  # no unpacking: the tile goes to shared memory as loaded
                w = tl.load(w8_ptr + n[None, :].to(tl.int64) * K + (k0 + cols)[:, None],
                            mask=(col < SPAN)[:, None] & (n < N)[None, :], other=0)
            else:
                if WORD_TILES:  # VALUES divides BLOCK_K and SPAN, so k0 starts a word
                    w = unpack_weight_words(w_ptr, k0, n, num_words, N, stride_wn, BITS, VALUES, BLOCK_K, BLOCK_N)
                else:
                    w = unpack_weight_tile(w_ptr, k0 + cols, n, K, N, stride_wn, BITS, VALUES)
                if start + BLOCK_K > SPAN:  # the next kernel row's weights (or the format's padding)
                    w = tl.where((col < SPAN)[:, None], w, 0).to(tl.int8)
            acc = tl.dot(a, w, acc, out_dtype=tl.int32)
    if X_ZP:
        # sum over the image of (x - z) w = acc - z * (the weight sum of the taps inside the
        # image). Those taps are a rectangle, rows [r1, r2) and columns [c1, c2) of the kernel, so
        # their sum is four entries of the 2-D prefix sums P[a, b] = sum_{kh < a, kw < b} w_tap
        r1 = tl.minimum(tl.maximum(-ih0, 0), KH)
        r2 = tl.maximum(tl.minimum(tl.maximum(H - ih0, 0), KH), r1)
        c1 = tl.minimum(tl.maximum(-iw0, 0), KW)
        c2 = tl.maximum(tl.minimum(tl.maximum(W - iw0, 0), KW), c1)
        n_ok = (n < N)[None, :]
        prefix = psum_ptr + n[None, :]
        inside_sum = (tl.load(prefix + (r2 * (KW + 1) + c2)[:, None] * N, mask=n_ok, other=0)
                      - tl.load(prefix + (r1 * (KW + 1) + c2)[:, None] * N, mask=n_ok, other=0)
                      - tl.load(prefix + (r2 * (KW + 1) + c1)[:, None] * N, mask=n_ok, other=0)
                      + tl.load(prefix + (r1 * (KW + 1) + c1)[:, None] * N, mask=n_ok, other=0))
        acc = acc - x_zero_point * inside_sum

    epilogue_store(acc, m, n, M, N, w_scale_ptr, bias_ptr, res_ptr, out_ptr, codes_ptr,
                   N, 1, N, 1,
                   x_scale, res_scale, out_scale, q_lo, q_hi, zero_point,
                   HAS_BIAS, RELU, RES_MODE, OUT_MODE, OUT_DTYPE)


# ---------------------------------------------------------------------------------------------
# launcher
# ---------------------------------------------------------------------------------------------

CONV_LOOPS = ("im2col", "rows", "auto")


def loop_for_layer(loop: str, kernel_hw: tuple[int, int], channels: int) -> str:
    """The K loop that ``loop`` means for a layer: "auto" picks ``im2col`` for 3x3 layers of at most 16
    input channels and ``rows`` for the rest. Why, per layer on an H200 (2026-11-29,
    benchmarks/results/gpu-h200-2026-11-29-session25, ResNet-110's W4A4 layers at 4,096 samples):
    16-channel 3x3, rows 447 us against im2col's 433 by Nsight Compute and 478 against 411 wall clock;
    32 channels 233 / 247; 64 channels 144 / 219; the 1x1 downsampling from 16 channels 131 / 151 wall
    clock. Not yet measured end to end (bench_e2e's ``*_autoloop`` variants)."""
    if loop != "auto":
        return loop
    return "im2col" if tuple(kernel_hw) == (3, 3) and channels <= 16 else "rows"


def tap_prefix_sums(weight: torch.Tensor, w_bits: int, kernel_hw: tuple[int, int], channels: int) -> torch.Tensor:
    """int32 ``[(KH+1)*(KW+1), N]``: ``P[a * (KW+1) + b, n] = sum_{kh < a, kw < b, c} q[n, kh, kw, c]``,
    from the packed int32 ``[N, words]`` or the unpacked int8 ``[N, KH*KW*C]`` weight. With a zero
    point z the row loop reads the padding as 0 and subtracts z times the weight sum of the taps
    inside the image, a rectangle of the kernel: four entries of P."""
    kh, kw = kernel_hw
    q = weight if weight.dtype == torch.int8 else unpack_weights(weight, w_bits, kh * kw * channels)
    taps = q.reshape(q.shape[0], kh, kw, channels).to(torch.int32).sum(3, dtype=torch.int32)
    prefix = torch.zeros(q.shape[0], kh + 1, kw + 1, dtype=torch.int32, device=q.device)
    prefix[:, 1:, 1:] = taps.cumsum(1, dtype=torch.int32).cumsum(2, dtype=torch.int32)
    return prefix.reshape(q.shape[0], -1).t().contiguous()


def default_conv_loop() -> str:
    """The K loop ``packed_conv2d`` uses where a config names none: ``ARQ_TRITON_CONV_LOOP``
    (``"im2col"``, the default, ``"rows"``, or ``"auto"``: :func:`loop_for_layer`; module docstring)."""
    loop = os.environ.get("ARQ_TRITON_CONV_LOOP", "im2col").strip().lower() or "im2col"
    if loop not in CONV_LOOPS:
        raise ValueError(f"ARQ_TRITON_CONV_LOOP must be one of {CONV_LOOPS}, got {loop!r}")
    return loop


def _pair(value, name: str) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return value, value
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return int(value[0]), int(value[1])
    raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")


def _geometry(x, packed_weight, w_bits, kernel_size, stride, padding):
    values = _check_bits(w_bits)
    if x.dim() != 4 or x.dtype != torch.int8:
        raise TypeError(f"x_nhwc_int8 must be an int8 [B, H, W, C] tensor, got {x.dtype} {tuple(x.shape)}")
    kh, kw = _pair(kernel_size, "kernel_size")
    sh, sw = _pair(stride, "stride")
    ph, pw = _pair(padding, "padding")
    if kh < 1 or kw < 1 or sh < 1 or sw < 1 or ph < 0 or pw < 0:
        raise ValueError("kernel_size and stride must be >= 1, padding >= 0")
    batch, h, w, c = x.shape
    k = kh * kw * c
    if k > MAX_K:
        raise ValueError(f"K = {kh}*{kw}*{c} = {k} exceeds {MAX_K}: the int32 accumulator could overflow")
    if packed_weight.dim() != 2 or packed_weight.dtype != torch.int32 or packed_weight.shape[1] != packed_width(k, w_bits):
        raise ValueError(
            f"packed_weight must be int32 [N, {packed_width(k, w_bits)}] for K = {kh}*{kw}*{c}, bits={w_bits}"
        )
    oh = (h + 2 * ph - kh) // sh + 1
    ow = (w + 2 * pw - kw) // sw + 1
    if oh < 1 or ow < 1:
        raise ValueError(f"empty output for input {h}x{w}, kernel {kh}x{kw}, padding {ph},{pw}")
    return values, (kh, kw), (sh, sw), (ph, pw), (batch, h, w, c), (oh, ow), k


def packed_conv2d(
    x_nhwc_int8: torch.Tensor,
    packed_weight: torch.Tensor,
    w_bits: int,
    scales: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    kernel_size,
    stride=1,
    padding=0,
    relu: bool = False,
    residual: torch.Tensor | None = None,
    out_scale: float | None = None,
    x_scale: float = 1.0,
    residual_scale: float | None = None,
    out_dtype: torch.dtype | None = None,
    out_zero_point: int = 0,
    qmin: int | None = None,
    qmax: int | None = None,
    x_zero_point: int = 0,
    weight_sums: torch.Tensor | None = None,
    codes_also: tuple[float, int, int, int] | None = None,
    out: torch.Tensor | None = None,
    config: dict | None = None,
    int8_weight: torch.Tensor | None = None,
    tap_sums: torch.Tensor | None = None,
    plans: dict | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """2-D convolution of int8 NHWC codes with packed 2-8 bit weights, fused epilogue.

    Args:
        x_nhwc_int8: int8 ``[B, H, W, C]`` codes holding ``c + z`` (any strides; ``activation = x_scale * c``,
            ``z = x_zero_point``; the padding is the activation 0).
        packed_weight: int32 ``[N, ceil(KH*KW*C / (32 // w_bits))]``, rows in ``(kh, kw, c)`` order
            (``arq.quant.packing.pack_layer_weight`` of a ``[N, C, KH, KW]`` weight).
        w_bits: 2..8. scales: float32 ``[N]``. bias: float32 ``[N]`` or None.
        kernel_size, stride, padding: ints or (h, w) pairs (dilation 1, groups 1).
        relu, residual, residual_scale, out_scale, out_dtype, out_zero_point, qmin, qmax: the epilogue of
            :func:`arq_kernels.packed_matmul.packed_linear`; ``residual`` is ``[B, OH, OW, N]``.
        x_zero_point, weight_sums, codes_also: as :func:`arq_kernels.packed_matmul.packed_linear`.
        out: optional preallocated contiguous ``[B, OH, OW, N]`` output.
        config: launch config override (``"LOOP"`` may pick the K loop: module docstring).
        int8_weight: optional int8 ``[N, KH*KW*C]``, the packed weight unpacked
            (:func:`arq_kernels.packed_matmul.unpack_weights`; a layer keeps it beside the packed
            one): the row loop then loads weight tiles as they are instead of unpacking them in
            every program. Must hold the same codes (not checked); ignored by the im2col loop.
        tap_sums: optional int32 ``[(KH+1)*(KW+1), N]`` (:func:`tap_prefix_sums`), read by the row
            loop with a zero point (computed per call when not given; a layer keeps it).
        plans: optional dict kept by the caller across calls (a layer keeps one): the checked launch
            that these arguments give is stored there and reused by calls that differ only in the
            contents of ``x``, ``residual`` and ``out``. The key holds everything else the launch
            depends on (shapes, strides, dtypes, devices and storage of every tensor argument, every
            scalar, the config and the ``ARQ_TRITON_*`` settings read here), so a reused launch is the
            one a fresh call would build. It reads the tensors it holds at every launch (a scale changed
            in place is seen), but what it derives from them once, the weight sums and tap prefix sums
            when they are not given and a contiguous copy of a strided weight, is not: after changing
            weights in place, pass those or a fresh dict. On a GPU the Python checks and arithmetic otherwise cost
            about as much host time per layer as the kernel takes on the device at certification
            batch sizes (benchmarks/results/gpu-h200-2026-11-29-session25).

    Returns:
        ``[B, OH, OW, N]`` (NHWC, contiguous) in ``out_dtype``: the next layer's input as is; with
        ``codes_also``, ``(out, codes)``, codes int8 ``[B, OH, OW, N]`` (a packed layer's input).
    """
    arguments = (x_nhwc_int8, packed_weight, w_bits, scales, bias, kernel_size, stride, padding, relu, residual,
                 out_scale, x_scale, residual_scale, out_dtype, out_zero_point, qmin, qmax, x_zero_point, weight_sums,
                 codes_also, out, config, int8_weight, tap_sums)
    if plans is None:
        return _conv_launch(*arguments)(x_nhwc_int8, residual, out)
    # everything the launch is derived from except the contents of x, residual and out, spelled out (a
    # loop over the arguments cost as much host time as the checks it saves)
    key = (
        x_nhwc_int8.shape, x_nhwc_int8.stride(), x_nhwc_int8.dtype, x_nhwc_int8.device,
        None if residual is None else (residual.shape, residual.stride(), residual.dtype, residual.device),
        out is None, _stored(packed_weight), _stored(scales), _stored(bias), _stored(weight_sums),
        _stored(int8_weight), _stored(tap_sums),
        w_bits, _hashable(kernel_size), _hashable(stride), _hashable(padding), relu, _value(out_scale),
        _value(x_scale), _value(residual_scale), out_dtype, out_zero_point, qmin, qmax, x_zero_point, codes_also,
        None if config is None else tuple(sorted(config.items())),
        os.environ.get("ARQ_TRITON_CONV_LOOP"), os.environ.get("ARQ_TRITON_TUNED"), os.environ.get("TRITON_INTERPRET"),
    )
    launch = plans.get(key)
    if launch is None:
        if len(plans) >= _MAX_PLANS:  # a caller that keeps changing shapes or tensors: start over
            plans.clear()
        launch = plans[key] = _conv_launch(*arguments)
    return launch(x_nhwc_int8, residual, out)


_MAX_PLANS = 16


def _stored(t: torch.Tensor | None):
    """A tensor the launch holds: where it is stored and how it is laid out."""
    return None if t is None else (t.data_ptr(), t.shape, t.stride(), t.dtype, t.device)


def _hashable(value):
    return tuple(value) if isinstance(value, list) else value


def _value(scalar):
    """A scale as its value (a tensor given as a scale is read, as the launch reads it)."""
    return float(scalar) if isinstance(scalar, torch.Tensor) else scalar


def _conv_launch(x_nhwc_int8, packed_weight, w_bits, scales, bias, kernel_size, stride, padding, relu, residual,
                 out_scale, x_scale, residual_scale, out_dtype, out_zero_point, qmin, qmax, x_zero_point, weight_sums,
                 codes_also, out, config, int8_weight, tap_sums):
    """:func:`packed_conv2d`'s checks and launch arithmetic for these arguments; returns
    ``launch(x, residual, out)``, which allocates the outputs and launches the kernel for inputs with the
    same metadata as the ones given here."""
    values, (kh, kw), (sh, sw), (ph, pw), (batch, h, w, c), (oh, ow), k = _geometry(
        x_nhwc_int8, packed_weight, w_bits, kernel_size, stride, padding
    )
    device = x_nhwc_int8.device
    if packed_weight.device != device:
        raise ValueError("x_nhwc_int8 and packed_weight must be on the same device")
    if packed_weight.stride(1) != 1:
        packed_weight = packed_weight.contiguous()
    n = packed_weight.shape[0]
    m = batch * oh * ow
    if residual is not None and tuple(residual.shape) != (batch, oh, ow, n):
        raise ValueError(f"residual must be [{batch}, {oh}, {ow}, {n}], got {tuple(residual.shape)}")
    epi = EpilogueArgs(m, n, device, scales, bias, relu,
                       residual.reshape(m, n) if residual is not None else None, residual_scale, x_scale,
                       out_scale, out_dtype, out_zero_point, qmin, qmax, codes_also)
    out_shape = (batch, oh, ow, n)
    if out is not None:
        epi.output(out_shape, device, out)  # a given one is checked now, and again by every launch
    if m == 0 or n == 0:
        return _launch(epi, out_shape, device, None, (), (), {})
    x = x_nhwc_int8
    loop = (config or {}).get("LOOP") or default_conv_loop()
    if loop not in CONV_LOOPS:
        raise ValueError(f"config LOOP must be one of {CONV_LOOPS}, got {loop!r}")
    loop = loop_for_layer(loop, (kh, kw), c)
    if config is not None:
        cfg = dict(config)
    else:
        buckets = width_buckets(n)
        # the row loop's own entry of a width where the table has one (ROWS_CANDIDATES), else the shared one,
        # narrowest width first
        cfg = pick_config("packed_conv", device,
                          tuple(name for b in buckets for name in (f"rows_{b}", b)) if loop == "rows" else buckets)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    wsum = zero_point_weight_sums(x_zero_point, weight_sums, packed_weight, w_bits, k)
    if int8_weight is not None and (int8_weight.dtype != torch.int8 or tuple(int8_weight.shape) != (n, k)
                                    or not int8_weight.is_contiguous() or int8_weight.device != device):
        raise ValueError(f"int8_weight must be a contiguous int8 [{n}, {k}] tensor on {device} (the unpacked "
                         f"packed_weight), got {int8_weight.dtype} {tuple(int8_weight.shape)} on {int8_weight.device}")
    if loop == "rows" and x.stride(3) == 1 and x.stride(2) == c:
        prefix_shape = ((kh + 1) * (kw + 1), n)
        if wsum is not None and tap_sums is None:
            tap_sums = tap_prefix_sums(int8_weight if int8_weight is not None else packed_weight, w_bits, (kh, kw), c)
        if tap_sums is not None and (tap_sums.dtype != torch.int32 or tuple(tap_sums.shape) != prefix_shape
                                     or not tap_sums.is_contiguous() or tap_sums.device != device):
            raise ValueError(f"tap_sums must be a contiguous int32 {list(prefix_shape)} tensor on {device} "
                             f"(tap_prefix_sums), got {tap_sums.dtype} {tuple(tap_sums.shape)}")
        kernel = _packed_conv2d_rows_kernel
        before = (packed_weight, int8_weight if int8_weight is not None else packed_weight,
                  epi.scales, epi.bias if epi.bias is not None else epi.scales)
        after = (wsum if wsum is not None else packed_weight, tap_sums if wsum is not None else packed_weight,
                 h, w, oh, ow, m, n, k,
                 sh, sw, ph, pw,
                 x.stride(0), x.stride(1), packed_weight.stride(0),
                 int(x_zero_point), *epi.scalars)
        loop_constants = dict(C=c, WORD_TILES=word_tiles(values, cfg) and (kw * c) % values == 0,
                              W_INT8=int8_weight is not None)
    else:
        kernel = _packed_conv2d_kernel
        before = (packed_weight, epi.scales, epi.bias if epi.bias is not None else epi.scales)
        after = (wsum if wsum is not None else packed_weight,
                 h, w, c, oh, ow, m, n, k,
                 sh, sw, ph, pw,
                 x.stride(0), x.stride(1), x.stride(2), x.stride(3), packed_weight.stride(0),
                 int(x_zero_point), *epi.scalars)
        loop_constants = dict(WORD_TILES=word_tiles(values, cfg))
    constants = dict(
        X_ZP=wsum is not None, KH=kh, KW=kw, BITS=w_bits, VALUES=values,
        HAS_BIAS=bias is not None, RELU=bool(relu), RES_MODE=epi.res_mode,
        OUT_MODE=epi.out_mode, OUT_DTYPE=epi.tl_out,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg.get("GROUP_M", 1),
        **loop_constants, **launch_options(cfg),
    )
    return _launch(epi, out_shape, device, kernel[grid], before, after, constants)


def _launch(epi, out_shape, device, launcher, before, after, constants):
    """``launch(x, residual, out)``: allocates (or checks) the outputs and, unless ``launcher`` is None (an
    empty output), runs ``launcher(x, *before, residual, out, codes, *after, **constants)``."""
    def launch(x, residual, out):
        out = epi.output(out_shape, device, out)
        codes = epi.codes_output(out_shape, device)
        if launcher is not None:
            launcher(x, *before, residual.contiguous() if residual is not None else out, out,
                     codes if codes is not None else out, *after, **constants)
        return out if codes is None else (out, codes)

    return launch


# ---------------------------------------------------------------------------------------------
# plain PyTorch reference (same signature)
# ---------------------------------------------------------------------------------------------


def exact_int_conv2d_nhwc(x_nhwc: torch.Tensor, q: torch.Tensor, kernel_hw, stride, padding) -> torch.Tensor:
    """int64 ``[B, OH, OW, N]`` convolution of integer codes with integer weights ``q [N, KH*KW*C]``.

    Computed as a float64 convolution: exact, because every product and partial sum is an
    integer of magnitude below 2^53 (checked).
    """
    kh, kw = kernel_hw
    c = x_nhwc.shape[3]
    bound = kh * kw * c * 255 * 128
    if bound >= 2**53:
        raise ValueError("float64 route not exact for this K")
    weight = q.reshape(q.shape[0], kh, kw, c).permute(0, 3, 1, 2).to(torch.float64)
    y = F.conv2d(x_nhwc.permute(0, 3, 1, 2).to(torch.float64), weight, stride=stride, padding=padding)
    return y.permute(0, 2, 3, 1).to(torch.int64)


def packed_conv2d_reference(
    x_nhwc_int8, packed_weight, w_bits, scales, bias=None, *, kernel_size, stride=1, padding=0, relu=False,
    residual=None, out_scale=None, x_scale=1.0, residual_scale=None, out_dtype=None, out_zero_point=0,
    qmin=None, qmax=None, x_zero_point=0, weight_sums=None, codes_also=None, out=None, config=None,
    int8_weight=None, tap_sums=None,
):
    """Plain-torch :func:`packed_conv2d`: unpack, exact convolution of ``x - z`` (zero padding), the
    same float32 epilogue."""
    _, kernel_hw, strides, pads, (batch, _, _, _), (oh, ow), k = _geometry(
        x_nhwc_int8, packed_weight, w_bits, kernel_size, stride, padding
    )
    q = unpack_weights(packed_weight, w_bits, k)
    n = q.shape[0]
    m = batch * oh * ow
    res2d = residual.reshape(m, n) if residual is not None else None
    epi = EpilogueArgs(m, n, x_nhwc_int8.device, scales, bias, relu, res2d, residual_scale, x_scale,
                       out_scale, out_dtype, out_zero_point, qmin, qmax, codes_also)
    codes = x_nhwc_int8.to(torch.int16) - int(x_zero_point)
    acc = exact_int_conv2d_nhwc(codes, q, kernel_hw, strides, pads).reshape(m, n)
    result = epilogue_reference(acc, epi, scales, bias, relu, res2d)
    if isinstance(result, tuple):
        y, y_codes = (part.reshape(batch, oh, ow, n) for part in result)
        if out is not None:
            out.copy_(y)
            y = out
        return y, y_codes
    result = result.reshape(batch, oh, ow, n)
    if out is not None:
        out.copy_(result)
        return out
    return result
