"""``packed_linear``: int8 activations x 2-8 bit weights packed in int32 words, int8 ``tl.dot``
with int32 accumulation, fused epilogue (scale, folded-BatchNorm bias, residual, ReLU,
requantization to the next layer's int8/uint8 codes, or float output).

Weight format (docs/design.md, ``arq.quant.packing``): integer weights ``q [N, K]`` in
``[-(2^(b-1) - 1), 2^(b-1) - 1]``; ``v = 32 // b`` values per int32 word, value ``j`` of word
``w`` (column ``k = w v + j``) in bits ``[j b, (j + 1) b)`` as a b-bit two's-complement field;
packed ``[N, ceil(K / v)]``, the last word zero-padded; float32 scales ``[N]``: ``w = q scale``.
The kernel unpacks in registers: shift each field to the top of its int32 word and back
arithmetically (sign extension), cast to int8, ``tl.dot``. When ``32 // b`` divides BLOCK_K
(b = 2, 4, 7, 8) each word is loaded once and expanded along a new axis folded into K
(:func:`unpack_weight_words`); otherwise (b = 3, 5, 6) each value gathers its word
(:func:`unpack_weight_tile`, repeated addresses served by L1). Hopper has
no sub-8-bit tensor-core math, so low bit widths save weight bandwidth and storage, not MACs.

Epilogue, in float32 and in this order (the reference does the same ops, so results are bit-equal
when no multiply-add is contracted, which ``enable_fp_fusion=False`` guarantees)::

    y = float32(acc) * (x_scale * w_scale[n])      # x_scale rounded to float32 first
    y = y + bias[n]                                # folded BatchNorm
    y = y + residual[m, n]                         # float, or codes * residual_scale
    y = max(y, 0)                                  # ReLU
    out = y | quantize(y, out_scale) | acc         # float / int8, uint8 codes / raw int32
    codes = quantize(y, out_scale)                 # with ``codes_also``: float32 y and int8 codes

Outline: candidate configs (``configs/packed_matmul.json``), Triton helpers (shared with
:mod:`arq_kernels.packed_conv`), kernel, launcher :func:`packed_linear`, plain-torch references
:func:`packed_linear_reference`, :func:`pack_weights`, :func:`unpack_weights`.

Blocked algorithm (one program = a BLOCK_M x BLOCK_N tile of ``out = x @ W.T``)::

    acc = 0 (int32)
    for k in range(0, K, BLOCK_K):
        a = x[m, k:k+BLOCK_K]                          # int8
        b = sign_extend(word(n, k) >> field(k))        # int8 [BLOCK_K, BLOCK_N], in registers
        acc += a @ b
    epilogue(acc) -> out[m, n]
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from arq_kernels._common import (
    as_float32,
    launch_options,
    pick_config,
    quant_levels,
    quantize_codes,
    quantize_reference,
    to_float_dtype,
    width_buckets,
)

MIN_BITS = 2
MAX_BITS = 8
#: Largest K: |sum_k (x - z) q| <= 255 * 128 * K must fit the int32 accumulator (as the C++ ops).
MAX_K = 65535

# ---------------------------------------------------------------------------------------------
# candidate configs (chosen ones: configs/packed_matmul.json, also used by packed_conv)
# ---------------------------------------------------------------------------------------------

CANDIDATES = [
    {"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8, "num_warps": w, "num_stages": s}
    for m, n, k, w, s in [
        (64, 64, 64, 4, 3), (128, 64, 64, 4, 3), (128, 128, 64, 8, 3), (128, 128, 128, 8, 3),
        (256, 64, 64, 8, 3), (64, 128, 64, 4, 4), (128, 32, 64, 4, 4), (128, 16, 64, 4, 4),
        # narrow tiles for the n16 / n32 buckets (CIFAR ResNet widths)
        (128, 16, 32, 4, 3), (256, 16, 32, 4, 3), (64, 32, 32, 4, 3), (256, 32, 64, 8, 3),
    ]
]

_OUT_FLOAT = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
_OUT_CODES = {torch.int8: tl.int8, torch.uint8: tl.uint8}

# ---------------------------------------------------------------------------------------------
# torch-side packing (reference of the format)
# ---------------------------------------------------------------------------------------------


def _check_bits(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an int in {MIN_BITS}..{MAX_BITS}, got {bits!r}")
    return 32 // bits


def packed_width(k: int, bits: int) -> int:
    """Words per row, ``ceil(k / (32 // bits))``."""
    return -(-k // _check_bits(bits))


def pack_weights(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer weights ``q [N, K]`` in ``[-(2^(b-1) - 1), 2^(b-1) - 1]`` -> int32 ``[N, ceil(K / (32 // b))]``."""
    values = _check_bits(bits)
    if q.dim() != 2 or q.is_floating_point() or q.dtype == torch.bool:
        raise ValueError(f"q must be an integer [N, K] tensor, got {q.dtype} of shape {tuple(q.shape)}")
    limit = (1 << (bits - 1)) - 1
    if q.numel() and (int(q.min()) < -limit or int(q.max()) > limit):
        raise ValueError(f"q must lie in [{-limit}, {limit}] for {bits} bits")
    n, k = q.shape
    words = packed_width(k, bits)
    fields = torch.zeros(n, words * values, dtype=torch.int64, device=q.device)
    fields[:, :k] = q.to(torch.int64) & ((1 << bits) - 1)
    packed = torch.zeros(n, words, dtype=torch.int64, device=q.device)
    for j in range(values):
        packed |= fields[:, j::values] << (j * bits)
    return (packed - ((packed >> 31) << 32)).to(torch.int32)  # the unsigned word as int32


def unpack_weights(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_weights`: int32 ``[N, words]`` -> int8 ``[N, k]``."""
    values = _check_bits(bits)
    if packed.dim() != 2 or packed.dtype != torch.int32 or packed.shape[1] != packed_width(k, bits):
        raise ValueError(f"packed must be int32 [N, {packed_width(k, bits)}] for k={k}, bits={bits}")
    unsigned = packed.to(torch.int64) & 0xFFFFFFFF
    columns = []
    for j in range(values):
        field = (unsigned >> (j * bits)) & ((1 << bits) - 1)
        columns.append(field - ((field >> (bits - 1)) << bits))
    return torch.stack(columns, dim=2).reshape(packed.shape[0], -1)[:, :k].to(torch.int8)


# ---------------------------------------------------------------------------------------------
# Triton helpers (shared with packed_conv)
# ---------------------------------------------------------------------------------------------


@triton.jit
def unpack_weight_tile(w_ptr, k, n, K, N, stride_wn, BITS: tl.constexpr, VALUES: tl.constexpr):
    """int8 ``[BLOCK_K, BLOCK_N]`` tile ``q[n, k].T`` from the packed int32 words."""
    word = k // VALUES
    top = 32 - BITS - (k % VALUES) * BITS  # left shift that puts the field in the top bits
    ok = (k < K)[:, None] & (n < N)[None, :]
    words = tl.load(w_ptr + n[None, :] * stride_wn + word[:, None], mask=ok, other=0)
    fields = (words << top[:, None]) >> (32 - BITS)  # arithmetic right shift: sign extension
    return fields.to(tl.int8)


@triton.jit
def unpack_weight_words(w_ptr, k0, n, num_words, N, stride_wn,
                        BITS: tl.constexpr, VALUES: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """Same tile as :func:`unpack_weight_tile` when VALUES divides BLOCK_K (b = 2, 4, 7, 8) and
    ``k0`` is a multiple of BLOCK_K: loads each word once (``BLOCK_K / VALUES`` words a column),
    expands it to its VALUES fields along a new axis and folds that axis into K
    (``k = word * VALUES + j``). Fields past K in the last word are zero (the format's padding)."""
    WORDS: tl.constexpr = BLOCK_K // VALUES
    w = k0 // VALUES + tl.arange(0, WORDS)
    ok = (w < num_words)[:, None] & (n < N)[None, :]
    words = tl.load(w_ptr + n[None, :] * stride_wn + w[:, None], mask=ok, other=0)  # [WORDS, BLOCK_N]
    top = 32 - BITS - tl.arange(0, VALUES) * BITS
    fields = (words[:, None, :] << top[None, :, None]) >> (32 - BITS)  # [WORDS, VALUES, BLOCK_N]
    return tl.reshape(fields, [BLOCK_K, BLOCK_N]).to(tl.int8)


@triton.jit
def epilogue_store(
    acc, m, n, M, N,
    w_scale_ptr, bias_ptr, res_ptr, out_ptr, codes_ptr,
    stride_rm, stride_rn, stride_om, stride_on,
    x_scale, res_scale, out_scale, q_lo, q_hi, zero_point,
    HAS_BIAS: tl.constexpr, RELU: tl.constexpr, RES_MODE: tl.constexpr,
    OUT_MODE: tl.constexpr, OUT_DTYPE: tl.constexpr,
):
    """Scale, bias, residual, ReLU, (re)quantize and store an int32 ``[BLOCK_M, BLOCK_N]`` tile.

    RES_MODE: 0 none, 1 float residual, 2 integer codes times ``res_scale``.
    OUT_MODE: 0 raw int32 accumulator, 1 float (OUT_DTYPE), 2 int8/uint8 codes (OUT_DTYPE),
    3 float32 to ``out_ptr`` and its int8 codes to ``codes_ptr`` (same strides): a result that
    feeds both float users and a packed layer.
    """
    m_ok = m < M
    n_ok = n < N
    mask = m_ok[:, None] & n_ok[None, :]
    out_ptrs = out_ptr + m.to(tl.int64)[:, None] * stride_om + n[None, :] * stride_on
    if OUT_MODE == 0:
        tl.store(out_ptrs, acc, mask=mask)
    else:
        scale = x_scale * tl.load(w_scale_ptr + n, mask=n_ok, other=1.0)
        y = acc.to(tl.float32) * scale[None, :]
        if HAS_BIAS:
            y = y + tl.load(bias_ptr + n, mask=n_ok, other=0.0)[None, :]
        if RES_MODE != 0:
            res = tl.load(res_ptr + m.to(tl.int64)[:, None] * stride_rm + n[None, :] * stride_rn, mask=mask, other=0)
            if RES_MODE == 1:
                y = y + res.to(tl.float32)
            else:
                y = y + res.to(tl.float32) * res_scale
        if RELU:
            y = tl.maximum(y, 0.0)
        if OUT_MODE == 2:
            tl.store(out_ptrs, quantize_codes(y, out_scale, q_lo, q_hi, zero_point).to(OUT_DTYPE), mask=mask)
        else:
            tl.store(out_ptrs, to_float_dtype(y, OUT_DTYPE), mask=mask)
        if OUT_MODE == 3:
            codes_ptrs = codes_ptr + m.to(tl.int64)[:, None] * stride_om + n[None, :] * stride_on
            tl.store(codes_ptrs, quantize_codes(y, out_scale, q_lo, q_hi, zero_point).to(tl.int8), mask=mask)


@triton.jit
def tile_indices(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped program order (GROUP_M row blocks share their weight columns in L2)."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group_size = GROUP_M * num_pid_n
    first_m = (pid // group_size) * GROUP_M
    rows_in_group = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % rows_in_group
    pid_n = (pid % group_size) // rows_in_group
    return pid_m, pid_n


# ---------------------------------------------------------------------------------------------
# kernel
# ---------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["q_lo", "q_hi", "zero_point", "x_zero_point"])
def _packed_linear_kernel(
    # pointers (wsum_ptr: int32 [N] sums of each weight row, read when X_ZP; codes_ptr: int8 [M, N]
    # codes of the float output, written when OUT_MODE == 3)
    x_ptr, w_ptr, w_scale_ptr, bias_ptr, res_ptr, out_ptr, codes_ptr, wsum_ptr,
    # sizes
    M, N, K,
    # strides (the packed weight's word stride is 1)
    stride_xm, stride_xk, stride_wn, stride_rm, stride_rn, stride_om, stride_on,
    # the input's zero point z (codes c = x - z), then the epilogue scalars
    x_zero_point, x_scale, res_scale, out_scale, q_lo, q_hi, zero_point,
    # meta-parameters
    X_ZP: tl.constexpr, BITS: tl.constexpr, VALUES: tl.constexpr, WORD_TILES: tl.constexpr,
    HAS_BIAS: tl.constexpr, RELU: tl.constexpr, RES_MODE: tl.constexpr,
    OUT_MODE: tl.constexpr, OUT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = tile_indices(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    num_words = tl.cdiv(K, VALUES)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    m_ok = m < M

    # -- int8 x int8 -> int32: exact, whatever the summation order -------------------------------
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + ks
        a = tl.load(x_ptr + m.to(tl.int64)[:, None] * stride_xm + k[None, :] * stride_xk,
                    mask=m_ok[:, None] & (k < K)[None, :], other=0)
        if WORD_TILES:
            b = unpack_weight_words(w_ptr, k0, n, num_words, N, stride_wn, BITS, VALUES, BLOCK_K, BLOCK_N)
        else:
            b = unpack_weight_tile(w_ptr, k, n, K, N, stride_wn, BITS, VALUES)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
    if X_ZP:  # sum_k (x - z) q = sum_k x q - z sum_k q
        acc = acc - x_zero_point * tl.load(wsum_ptr + n, mask=n < N, other=0)[None, :]

    epilogue_store(acc, m, n, M, N, w_scale_ptr, bias_ptr, res_ptr, out_ptr, codes_ptr,
                   stride_rm, stride_rn, stride_om, stride_on,
                   x_scale, res_scale, out_scale, q_lo, q_hi, zero_point,
                   HAS_BIAS, RELU, RES_MODE, OUT_MODE, OUT_DTYPE)


# ---------------------------------------------------------------------------------------------
# launcher
# ---------------------------------------------------------------------------------------------


class EpilogueArgs:
    """Checked epilogue settings shared by packed_linear and packed_conv2d."""

    def __init__(self, m, n, device, scales, bias, relu, residual, residual_scale, x_scale,
                 out_scale, out_dtype, out_zero_point, qmin, qmax, codes_also=None):
        if scales is None or scales.shape != (n,) or scales.dtype != torch.float32 or scales.device != device:
            raise ValueError(f"scales must be float32 [{n}] on {device}")
        if bias is not None and (bias.shape != (n,) or bias.dtype != torch.float32 or bias.device != device):
            raise ValueError(f"bias must be float32 [{n}] on {device}")
        if out_dtype is None:
            out_dtype = torch.int8 if out_scale is not None else torch.float32
        self.raw = out_dtype == torch.int32
        self.codes = out_dtype in _OUT_CODES
        if not (self.raw or self.codes or out_dtype in _OUT_FLOAT):
            raise TypeError(f"out_dtype must be int32 (raw accumulator), int8/uint8 or float32/16/bf16, got {out_dtype}")
        if self.raw and (bias is not None or relu or residual is not None or out_scale is not None):
            raise ValueError("out_dtype=int32 returns the raw accumulator: no bias, relu, residual or out_scale")
        if self.codes != (out_scale is not None):
            raise ValueError("out_scale is required for (and only for) int8/uint8 outputs")
        if self.codes and not float(out_scale) > 0.0:
            raise ValueError(f"out_scale must be > 0, got {out_scale}")
        self.res_mode = 0
        if residual is not None:
            if residual.shape != (m, n) or residual.device != device:
                raise ValueError(f"residual must be [{m}, {n}] on {device}, got {tuple(residual.shape)}")
            if residual.is_floating_point():
                self.res_mode = 1
                if residual_scale is not None:
                    raise ValueError("residual_scale is for integer residual codes only")
            elif residual.dtype in (torch.int8, torch.uint8):
                self.res_mode = 2
                if residual_scale is None:
                    raise ValueError("integer residual codes need residual_scale")
            else:
                raise TypeError(f"residual must be float, int8 or uint8, got {residual.dtype}")
        self.q_lo, self.q_hi = quant_levels(out_dtype, out_zero_point, qmin, qmax) if self.codes else (0, 0)
        self.out_dtype = out_dtype
        self.out_mode = 0 if self.raw else (2 if self.codes else 1)
        self.tl_out = tl.int32 if self.raw else (_OUT_CODES[out_dtype] if self.codes else _OUT_FLOAT[out_dtype])
        self.codes_also = None
        if codes_also is not None:
            # the codes must be those of the stored float32 value (what the next layer would read)
            if out_dtype != torch.float32:
                raise ValueError(f"codes_also needs a float32 output, got out_dtype={out_dtype}")
            try:
                codes_scale, code_lo, code_hi, codes_zero_point = codes_also
                codes_scale = float(codes_scale)
                code_lo, code_hi, codes_zero_point = int(code_lo), int(code_hi), int(codes_zero_point)
            except (TypeError, ValueError):
                raise ValueError(f"codes_also must be (scale, q_lo, q_hi, zero_point), got {codes_also!r}") from None
            if not codes_scale > 0.0:
                raise ValueError(f"codes_also's scale must be > 0, got {codes_scale}")
            if not -128 <= code_lo + codes_zero_point <= code_hi + codes_zero_point <= 127:
                raise ValueError(f"codes_also's levels [{code_lo}, {code_hi}] + zero point {codes_zero_point} "
                                 "do not fit int8")
            self.codes_also = (codes_scale, code_lo, code_hi, codes_zero_point)
            self.out_mode = 3
            out_scale, out_zero_point, (self.q_lo, self.q_hi) = codes_scale, codes_zero_point, (code_lo, code_hi)
        if not math.isfinite(as_float32(x_scale)):
            raise ValueError(f"x_scale must be finite as a float32, got {x_scale}")
        # the kernels read these as dense vectors: a strided view would give other channels' values
        self.scales = scales.contiguous()
        self.bias = bias.contiguous() if bias is not None else None
        self.scalars = (
            as_float32(x_scale),
            as_float32(residual_scale) if residual_scale is not None else 1.0,
            as_float32(out_scale) if out_scale is not None else 1.0,
            self.q_lo, self.q_hi, int(out_zero_point),
        )

    def codes_output(self, shape, device):
        """The int8 codes tensor of ``codes_also`` (None without it)."""
        return torch.empty(shape, dtype=torch.int8, device=device) if self.codes_also is not None else None

    def output(self, shape, device, out):
        if out is None:
            return torch.empty(shape, dtype=self.out_dtype, device=device)
        if tuple(out.shape) != tuple(shape) or out.dtype != self.out_dtype or out.device != device or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous {self.out_dtype} tensor of shape {tuple(shape)} on {device}")
        return out


def zero_point_weight_sums(x_zero_point: int, weight_sums, packed_weight, w_bits: int, k: int):
    """The int32 ``[N]`` weight row sums the kernels need for a nonzero input zero point, else None."""
    if isinstance(x_zero_point, bool) or not isinstance(x_zero_point, int) or not -128 <= x_zero_point <= 127:
        raise ValueError(f"x_zero_point must be an int in -128..127, got {x_zero_point!r}")
    if x_zero_point == 0:
        return None
    n = packed_weight.shape[0]
    if weight_sums is None:
        weight_sums = unpack_weights(packed_weight, w_bits, k).to(torch.int64).sum(1).to(torch.int32)
    if weight_sums.shape != (n,) or weight_sums.dtype != torch.int32 or weight_sums.device != packed_weight.device:
        raise ValueError(f"weight_sums must be int32 [{n}] on {packed_weight.device}")
    return weight_sums.contiguous()


def word_tiles(values: int, cfg: dict) -> bool:
    """Whether the word-at-a-time unpacking applies (VALUES divides BLOCK_K; config may force it off)."""
    return bool(cfg.get("WORD_TILES", True)) and cfg["BLOCK_K"] % values == 0


def packed_linear(
    x_int8: torch.Tensor,
    packed_weight: torch.Tensor,
    w_bits: int,
    scales: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    x_scale: float = 1.0,
    relu: bool = False,
    residual: torch.Tensor | None = None,
    residual_scale: float | None = None,
    out_scale: float | None = None,
    out_dtype: torch.dtype | None = None,
    out_zero_point: int = 0,
    qmin: int | None = None,
    qmax: int | None = None,
    in_features: int | None = None,
    x_zero_point: int = 0,
    weight_sums: torch.Tensor | None = None,
    codes_also: tuple[float, int, int, int] | None = None,
    out: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``out[m, n] = epilogue(sum_k (x[m, k] - z) q[n, k])`` for int8 ``x [M, K]`` and packed ``q``.

    Args:
        x_int8: int8 ``[M, K]`` activation codes ``x`` holding ``c + z`` (``activation = x_scale * c``;
            ``z = x_zero_point``, 0 by default: 8-bit unsigned codes 0..255 travel as int8 with z = -128).
        packed_weight: int32 ``[N, ceil(K / (32 // w_bits))]`` (``pack_weights``; row-contiguous).
        w_bits: weight bit width, 2..8.
        scales: float32 ``[N]`` per-output-channel weight scales.
        bias: float32 ``[N]`` (folded BatchNorm) or None.
        x_scale: the activations' scale (rounded to float32).
        relu: apply ReLU after the residual add.
        residual: ``[M, N]`` float, or int8/uint8 codes with ``residual_scale``.
        out_scale: requantize to ``out_dtype`` codes (int8 default) with this step; None: float output.
        out_dtype: float32 (default without out_scale), float16, bfloat16, int8, uint8, or int32 for
            the raw accumulator (no epilogue).
        out_zero_point, qmin, qmax: code levels (defaults: int8 [-127, 127], uint8 [-z, 255 - z]).
        in_features: K, when it is not ``x_int8.shape[1]`` (it always is; checked).
        x_zero_point: ``z`` in -128..127. The kernel adds ``-z * sum_k q[n, k]`` to the int32
            accumulator (exact: the true sum is below 2^31 for K <= 65535).
        weight_sums: int32 ``[N]`` row sums of the unpacked weight (computed when None and z != 0;
            layers pass theirs once).
        codes_also: ``(scale, q_lo, q_hi, zero_point)``: with a float32 output, also write the int8
            codes ``clamp(round(y / scale), q_lo, q_hi) + zero_point`` of it (a packed consumer's
            input, bit for bit what quantizing the stored output would give).
        out: optional preallocated contiguous ``[M, N]`` output.
        config: launch config override.

    Returns:
        ``[M, N]`` in ``out_dtype``; with ``codes_also``, ``(out, codes)`` (codes int8 ``[M, N]``).
    """
    values = _check_bits(w_bits)
    if x_int8.dim() != 2 or x_int8.dtype != torch.int8:
        raise TypeError(f"x_int8 must be an int8 [M, K] tensor, got {x_int8.dtype} {tuple(x_int8.shape)}")
    m, k = x_int8.shape
    if in_features is not None and in_features != k:
        raise ValueError(f"in_features={in_features} but x has K={k}")
    if packed_weight.dim() != 2 or packed_weight.dtype != torch.int32 or packed_weight.shape[1] != packed_width(k, w_bits):
        raise ValueError(f"packed_weight must be int32 [N, {packed_width(k, w_bits)}] for K={k}, bits={w_bits}")
    if packed_weight.stride(1) != 1:
        packed_weight = packed_weight.contiguous()
    if packed_weight.device != x_int8.device:
        raise ValueError("x_int8 and packed_weight must be on the same device")
    n = packed_weight.shape[0]
    epi = EpilogueArgs(m, n, x_int8.device, scales, bias, relu, residual, residual_scale, x_scale,
                       out_scale, out_dtype, out_zero_point, qmin, qmax, codes_also)
    out = epi.output((m, n), x_int8.device, out)
    codes = epi.codes_output((m, n), x_int8.device)
    result = out if codes is None else (out, codes)
    if m == 0 or n == 0:
        return result
    if k == 0:
        raise ValueError("K must be >= 1")
    if k > MAX_K:
        raise ValueError(f"K = {k} exceeds {MAX_K}: the int32 accumulator could overflow (|x - z| <= 255, |q| <= 128)")
    cfg = dict(config) if config is not None else pick_config("packed_matmul", x_int8.device, width_buckets(n))
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    res = residual if residual is not None else out
    wsum = zero_point_weight_sums(x_zero_point, weight_sums, packed_weight, w_bits, k)
    _packed_linear_kernel[grid](
        x_int8, packed_weight, epi.scales, epi.bias if epi.bias is not None else epi.scales, res, out,
        codes if codes is not None else out, wsum if wsum is not None else packed_weight,
        m, n, k,
        x_int8.stride(0), x_int8.stride(1), packed_weight.stride(0),
        res.stride(0), res.stride(1), out.stride(0), out.stride(1),
        int(x_zero_point), *epi.scalars,
        X_ZP=wsum is not None, BITS=w_bits, VALUES=values, WORD_TILES=word_tiles(values, cfg),
        HAS_BIAS=bias is not None, RELU=bool(relu), RES_MODE=epi.res_mode,
        OUT_MODE=epi.out_mode, OUT_DTYPE=epi.tl_out,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg.get("GROUP_M", 1),
        **launch_options(cfg),
    )
    return result


# ---------------------------------------------------------------------------------------------
# plain PyTorch reference (same signature)
# ---------------------------------------------------------------------------------------------


def exact_int_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b.T`` of integer tensors as int64, exactly: int64 matmul on CPU; on CUDA (no int64
    matmul) float64, exact because every partial sum is an integer below 2^53 (checked)."""
    if a.device.type == "cpu":
        return a.to(torch.int64) @ b.to(torch.int64).T
    bound = a.shape[1] * a.abs().max().item() * b.abs().max().item() if a.numel() and b.numel() else 0
    if bound >= 2**53:
        raise ValueError("float64 route not exact for these magnitudes")
    return (a.to(torch.float64) @ b.to(torch.float64).T).to(torch.int64)


def epilogue_reference(acc: torch.Tensor, epi: EpilogueArgs, scales, bias, relu, residual) -> torch.Tensor:
    """The kernel's epilogue on an int64 accumulator ``[M, N]``, same float32 ops in the same order."""
    if epi.raw:
        return acc.to(torch.int32)
    x_scale, res_scale, out_scale, q_lo, q_hi, zero_point = epi.scalars
    scale = torch.tensor(x_scale, dtype=torch.float32, device=acc.device) * scales
    y = acc.to(torch.float32) * scale[None, :]
    if bias is not None:
        y = y + bias[None, :]
    if residual is not None:
        if epi.res_mode == 1:
            y = y + residual.to(torch.float32)
        else:
            y = y + residual.to(torch.float32) * torch.tensor(res_scale, dtype=torch.float32, device=acc.device)
    if relu:
        y = torch.clamp_min(y, 0.0)
    if epi.codes:
        return quantize_reference(y, out_scale, q_lo, q_hi, zero_point, epi.out_dtype)
    if epi.codes_also is not None:
        return y, quantize_reference(y, out_scale, q_lo, q_hi, zero_point, torch.int8)
    return y.to(epi.out_dtype)


def packed_linear_reference(
    x_int8, packed_weight, w_bits, scales, bias=None, *, x_scale=1.0, relu=False, residual=None,
    residual_scale=None, out_scale=None, out_dtype=None, out_zero_point=0, qmin=None, qmax=None,
    in_features=None, x_zero_point=0, weight_sums=None, codes_also=None, out=None, config=None,
):
    """Plain-torch :func:`packed_linear`: unpack, exact int64 matmul of ``x - z``, the same float32 epilogue."""
    m, k = x_int8.shape
    q = unpack_weights(packed_weight, w_bits, k)
    epi = EpilogueArgs(m, q.shape[0], x_int8.device, scales, bias, relu, residual, residual_scale, x_scale,
                       out_scale, out_dtype, out_zero_point, qmin, qmax, codes_also)
    codes = x_int8.to(torch.int16) - int(x_zero_point)
    result = epilogue_reference(exact_int_matmul(codes, q), epi, scales, bias, relu, residual)
    if out is not None:
        if isinstance(result, tuple):
            out.copy_(result[0])
            return out, result[1]
        out.copy_(result)
        return out
    return result
