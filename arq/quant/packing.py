"""Packed low-bit weights: the storage format shared with the GPU kernels (docs/design.md).

A Conv2d weight ``[N, C, KH, KW]`` is flattened to ``[N, K]`` in ``(kh, kw, c)`` order
(NHWC implicit-GEMM order, ``K = KH * KW * C``); a Linear weight is ``[N, K]`` as is.
Integer weights ``q`` lie in ``[-(2^(b-1) - 1), 2^(b-1) - 1]``. Each int32 word holds
``v = 32 // b`` values: value ``j`` of word ``w`` (column ``k = w * v + j``) sits in bits
``[j*b, (j+1)*b)`` as a b-bit two's-complement field. The packed tensor is
``[N, ceil(K / v)]`` int32, the last word's unused fields zero. Scales are float32 ``[N]``
beside it: ``w = q * scale[n]``.

Example, b = 4 (8 values a word): ``q[n, 0:8] = [1, -1, 0, 0, 0, 0, 0, 7]`` packs to
``0x7000_00F1`` (-1 is the field ``0xF``).
"""
from __future__ import annotations

import torch

from arq.quant.policy import MAX_BITS, MIN_BITS


def values_per_word(bits: int) -> int:
    """``32 // bits`` values of ``bits`` bits in one int32 word."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an int in {MIN_BITS}..{MAX_BITS}, got {bits!r}")
    return 32 // bits


def packed_words(k: int, bits: int) -> int:
    """Words per row: ``ceil(k / (32 // bits))``."""
    per_word = values_per_word(bits)
    return -(-k // per_word)


def conv_weight_to_matrix(weight: torch.Tensor) -> torch.Tensor:
    """``[N, C, KH, KW] -> [N, KH*KW*C]`` in (kh, kw, c) order; a 2-D weight is returned as is."""
    if weight.dim() == 2:
        return weight
    if weight.dim() != 4:
        raise ValueError(f"weight must be [N, K] or [N, C, KH, KW], got shape {tuple(weight.shape)}")
    return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)


def matrix_to_conv_weight(matrix: torch.Tensor, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """Inverse of :func:`conv_weight_to_matrix` for a weight of ``shape``."""
    shape = tuple(shape)
    if len(shape) == 2:
        return matrix.reshape(shape)
    if len(shape) != 4:
        raise ValueError(f"shape must have 2 or 4 dims, got {shape}")
    n, c, kh, kw = shape
    if tuple(matrix.shape) != (n, kh * kw * c):
        raise ValueError(f"matrix of shape {tuple(matrix.shape)} does not fit weight shape {shape}")
    return matrix.reshape(n, kh, kw, c).permute(0, 3, 1, 2).contiguous()


def pack_weights(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer weights ``q [N, K]`` (any integer dtype) into int32 ``[N, ceil(K / (32 // bits))]``."""
    per_word = values_per_word(bits)
    if q.dim() != 2:
        raise ValueError(f"q must be [N, K] (flatten convs with conv_weight_to_matrix), got shape {tuple(q.shape)}")
    if q.is_floating_point() or q.is_complex() or q.dtype == torch.bool:
        raise TypeError(f"q must have an integer dtype, got {q.dtype}")
    qmax = (1 << (bits - 1)) - 1
    if q.numel() and (int(q.min()) < -qmax or int(q.max()) > qmax):
        raise ValueError(
            f"q must lie in [{-qmax}, {qmax}] for bits={bits}, got [{int(q.min())}, {int(q.max())}]"
        )
    n, k = q.shape
    words = packed_words(k, bits)
    fields = torch.zeros(n, words * per_word, dtype=torch.int64, device=q.device)
    fields[:, :k] = q.to(torch.int64) & ((1 << bits) - 1)  # two's-complement b-bit field
    shifts = torch.arange(per_word, device=q.device, dtype=torch.int64) * bits
    unsigned = (fields.view(n, words, per_word) << shifts).sum(dim=2)  # fields do not overlap
    # reinterpret the unsigned 32-bit word as int32
    return torch.where(unsigned >= (1 << 31), unsigned - (1 << 32), unsigned).to(torch.int32)


def unpack_weights(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_weights`: int32 ``[N, words]`` -> int8 ``[N, k]``."""
    per_word = values_per_word(bits)
    if packed.dtype != torch.int32 or packed.dim() != 2:
        raise ValueError(f"packed must be a 2-D int32 tensor, got {packed.dtype} of shape {tuple(packed.shape)}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"k must be a non-negative int, got {k!r}")
    if packed.shape[1] != packed_words(k, bits):
        raise ValueError(f"packed has {packed.shape[1]} words a row, k={k} at bits={bits} needs {packed_words(k, bits)}")
    n, words = packed.shape
    unsigned = packed.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(per_word, device=packed.device, dtype=torch.int64) * bits
    fields = (unsigned.unsqueeze(2) >> shifts) & ((1 << bits) - 1)
    signed = fields - ((fields >> (bits - 1)) << bits)  # sign-extend the b-bit field
    return signed.reshape(n, words * per_word)[:, :k].to(torch.int8)


def pack_layer_weight(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack a layer's integer weight (Conv2d ``[N, C, KH, KW]`` or Linear ``[N, K]``)."""
    return pack_weights(conv_weight_to_matrix(q), bits)


def unpack_layer_weight(packed: torch.Tensor, bits: int, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """Inverse of :func:`pack_layer_weight` for a weight of ``shape`` (int8)."""
    shape = tuple(shape)
    k = 1
    for size in shape[1:]:
        k *= size
    return matrix_to_conv_weight(unpack_weights(packed, bits, k), shape)
