"""Votes of the base classifier: last layer + argmax + per-class counts, in one pass.

Randomized smoothing (Cohen et al. 2019) needs only ``counts[c] = #{samples j : f(x + eps_j) = c}``
(CERTIFY's ``n0`` selection and ``n`` estimation draws). These kernels turn the penultimate
features (or the logits) of a batch of noisy samples into those counts without writing the
logits or the predictions to memory and without a host sync: each program computes its rows'
logits tile, takes the row argmax (ties to the lowest index, as ``torch.argmax``), sums a
one-hot tile over its rows and adds the per-class sums to ``counts`` with ``tl.atomic_add``.

* :func:`vote_count`: ``logits = features @ weight.T (+ bias)`` on float features (fp32/fp16/bf16,
  float32 accumulation, IEEE fp32 products unless ``allow_tf32``) or int8 features x int8 weights
  (int32 accumulation, then ``acc * (feature_scale * weight_scale[c]) + bias[c]`` in float32).
* :func:`argmax_count`: counts from given logits ``[B, C]``.

Outline: candidate configs (``configs/votes.json``), kernels, launchers, plain-torch references
:func:`vote_count_reference`, :func:`argmax_count_reference` (same signatures).

Blocked algorithm (one program = BLOCK_B rows; BLOCK_C >= num_classes, a power of two)::

    acc[BLOCK_B, BLOCK_C] = 0
    for f in range(0, F, BLOCK_F): acc += x[rows, f:f+BLOCK_F] @ w[:, f:f+BLOCK_F].T
    logits = epilogue(acc); logits[:, num_classes:] = -inf
    pred = argmax(logits, axis=1)                      # first maximum
    counts[c] += sum_rows(pred == c and row < B)       # BLOCK_C atomics per program
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from arq_kernels._common import as_float32, launch_options, pick_config

MAX_CLASSES = 4096

# ---------------------------------------------------------------------------------------------
# candidate configs (the chosen ones live in configs/votes.json; benchmarks/bench_kernels.py tunes)
# ---------------------------------------------------------------------------------------------

CANDIDATES = [
    {"BLOCK_B": b, "BLOCK_F": f, "num_warps": w, "num_stages": s}
    for b, f, w, s in [(32, 64, 4, 3), (64, 64, 4, 3), (128, 64, 8, 3), (64, 128, 4, 2), (128, 32, 4, 4), (256, 64, 8, 3)]
]

# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _argmax_and_count(logits, rows, cols, num_rows, num_classes, counts_ptr, pred_ptr, WRITE_PRED: tl.constexpr):
    """Row argmax of a [BLOCK_B, BLOCK_C] tile (first maximum), one-hot sum, atomics into counts."""
    col_ok = cols < num_classes
    row_ok = rows < num_rows
    logits = tl.where(col_ok[None, :], logits, float("-inf"))
    pred = tl.argmax(logits, axis=1, tie_break_left=True)
    if WRITE_PRED:
        tl.store(pred_ptr + rows, pred.to(tl.int64), mask=row_ok)
    hits = (pred[:, None] == cols[None, :]) & row_ok[:, None]
    per_class = tl.sum(hits.to(tl.int32), axis=0)
    tl.atomic_add(counts_ptr + cols, per_class.to(tl.int64), mask=col_ok & (per_class > 0))


@triton.jit
def _vote_count_kernel(
    # pointers
    x_ptr, w_ptr, bias_ptr, w_scale_ptr, counts_ptr, pred_ptr,
    # sizes
    num_rows, num_features, num_classes,
    # strides
    stride_xb, stride_xf, stride_wc, stride_wf,
    # int8 path: float32 feature scale
    x_scale,
    # meta-parameters
    INT8: tl.constexpr, HAS_BIAS: tl.constexpr, WRITE_PRED: tl.constexpr, ALLOW_TF32: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_F: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.arange(0, BLOCK_C)
    feats = tl.arange(0, BLOCK_F)
    row_ok = rows < num_rows
    col_ok = cols < num_classes

    # -- logits tile: int32 accumulation for int8 operands, float32 otherwise ---------------------
    if INT8:
        acc = tl.zeros([BLOCK_B, BLOCK_C], dtype=tl.int32)
    else:
        acc = tl.zeros([BLOCK_B, BLOCK_C], dtype=tl.float32)
    for f0 in range(0, num_features, BLOCK_F):
        f = f0 + feats
        f_ok = f < num_features
        x = tl.load(x_ptr + rows[:, None] * stride_xb + f[None, :] * stride_xf,
                    mask=row_ok[:, None] & f_ok[None, :], other=0)
        w = tl.load(w_ptr + cols[None, :] * stride_wc + f[:, None] * stride_wf,
                    mask=col_ok[None, :] & f_ok[:, None], other=0)  # [BLOCK_F, BLOCK_C]: w.T
        if INT8:
            acc = tl.dot(x, w, acc, out_dtype=tl.int32)
        elif ALLOW_TF32:
            acc = tl.dot(x, w.to(x.dtype), acc, input_precision="tf32")
        else:
            acc = tl.dot(x, w.to(x.dtype), acc, input_precision="ieee")

    # -- epilogue: per-class scale and bias, in float32, no fused multiply-add --------------------
    if INT8:
        scale = x_scale * tl.load(w_scale_ptr + cols, mask=col_ok, other=1.0)
        logits = acc.to(tl.float32) * scale[None, :]
    else:
        logits = acc
    if HAS_BIAS:
        logits = logits + tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    _argmax_and_count(logits, rows, cols, num_rows, num_classes, counts_ptr, pred_ptr, WRITE_PRED)


@triton.jit
def _argmax_count_kernel(
    logits_ptr, counts_ptr, pred_ptr,
    num_rows, num_classes, stride_b, stride_c,
    WRITE_PRED: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.arange(0, BLOCK_C)
    mask = (rows < num_rows)[:, None] & (cols < num_classes)[None, :]
    logits = tl.load(logits_ptr + rows[:, None] * stride_b + cols[None, :] * stride_c, mask=mask, other=float("-inf"))
    if logits.dtype != tl.float64:
        logits = logits.to(tl.float32)  # exact for the half types
    _argmax_and_count(logits, rows, cols, num_rows, num_classes, counts_ptr, pred_ptr, WRITE_PRED)


# ---------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------


def _class_block(num_classes: int) -> int:
    if not 1 <= num_classes <= MAX_CLASSES:
        raise ValueError(f"num_classes must be in 1..{MAX_CLASSES}, got {num_classes}")
    return max(16, triton.next_power_of_2(num_classes))


def _row_block(cfg: dict, block_c: int) -> int:
    """Rows per program, shrunk so a [BLOCK_B, BLOCK_C] tile stays at most 16k elements (>= 16 for tl.dot)."""
    return max(16, min(int(cfg["BLOCK_B"]), 16384 // block_c))


def _prepare_outputs(num_rows, num_classes, device, counts, predictions):
    if counts is None:
        counts = torch.zeros(num_classes, dtype=torch.int64, device=device)
    elif counts.shape != (num_classes,) or counts.dtype != torch.int64 or counts.device != device or not counts.is_contiguous():
        raise ValueError(f"counts must be a contiguous int64 [{num_classes}] tensor on {device}")
    if predictions is not None and (
        predictions.shape != (num_rows,) or predictions.dtype != torch.int64 or predictions.device != device
        or not predictions.is_contiguous()
    ):
        raise ValueError(f"predictions must be a contiguous int64 [{num_rows}] tensor on {device}")
    return counts


def _check_last_layer(features, weight, bias, num_classes, feature_scale, weight_scale):
    if features.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"features [B, F] and weight [C, F] must be 2-D, got {tuple(features.shape)}, {tuple(weight.shape)}")
    if weight.shape != (num_classes, features.shape[1]):
        raise ValueError(f"weight must be [{num_classes}, {features.shape[1]}], got {tuple(weight.shape)}")
    if features.device != weight.device:
        raise ValueError("features and weight must be on the same device")
    int8 = features.dtype == torch.int8
    if int8:
        if weight.dtype != torch.int8:
            raise TypeError(f"int8 features need int8 weight, got {weight.dtype}")
        if feature_scale is None or weight_scale is None:
            raise ValueError("int8 features need feature_scale (float) and weight_scale [C] float32")
        if weight_scale.shape != (num_classes,) or weight_scale.dtype != torch.float32:
            raise ValueError(f"weight_scale must be float32 [{num_classes}], got {weight_scale.dtype} {tuple(weight_scale.shape)}")
    else:
        if features.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"features must be int8, float32, float16 or bfloat16, got {features.dtype}")
        if not weight.is_floating_point():
            raise TypeError(f"float features need a float weight, got {weight.dtype}")
    if bias is not None and (bias.shape != (num_classes,) or not bias.is_floating_point()
                             or bias.device != features.device):
        raise ValueError(f"bias must be a float [{num_classes}] tensor on {features.device}")
    if int8 and weight_scale.device != features.device:
        raise ValueError(f"weight_scale must be on {features.device}, got {weight_scale.device}")
    return int8


def vote_count(
    features: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    num_classes: int,
    *,
    feature_scale: float | None = None,
    weight_scale: torch.Tensor | None = None,
    allow_tf32: bool = False,
    counts: torch.Tensor | None = None,
    predictions: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """Per-class vote counts of the last (linear) layer: ``counts[c] = #{b : argmax_c' logits[b, c'] = c}``.

    Args:
        features: ``[B, F]`` penultimate features: float32/float16/bfloat16, or int8 codes with
            ``feature_scale`` (float, rounded to float32).
        weight: ``[num_classes, F]``: float (cast to the features' dtype in the kernel), or int8
            codes with per-class float32 ``weight_scale [num_classes]``.
        bias: float ``[num_classes]`` or None (added in float32).
        num_classes: number of classes, 1..4096.
        allow_tf32: let float32 products use TF32 tensor cores (default: IEEE float32).
        counts: optional int64 ``[num_classes]`` to add into (accumulate batches without a sync).
        predictions: optional int64 ``[B]`` that receives each row's class.
        config: launch config override.

    Returns:
        ``counts`` int64 ``[num_classes]`` on the features' device.
    """
    int8 = _check_last_layer(features, weight, bias, num_classes, feature_scale, weight_scale)
    # the kernel reads bias and weight_scale as dense vectors: a strided view would give other classes' values
    bias = bias.contiguous() if bias is not None else None
    weight_scale = weight_scale.contiguous() if int8 else weight_scale
    num_rows, num_features = features.shape
    counts = _prepare_outputs(num_rows, num_classes, features.device, counts, predictions)
    if num_rows == 0:
        return counts
    cfg = dict(config) if config is not None else pick_config("votes", features.device)
    block_c = _class_block(num_classes)
    block_b = _row_block(cfg, block_c)
    # the [BLOCK_F, BLOCK_C] weight tile is staged in shared memory: at most 32k elements a stage,
    # two stages for wide class counts (ImageNet's 1000 -> BLOCK_C 1024, BLOCK_F 32)
    block_f = max(16, min(int(cfg["BLOCK_F"]), 32768 // block_c))
    if block_c >= 256:
        cfg["num_stages"] = min(int(cfg.get("num_stages", 2)), 2)
    dummy = counts
    _vote_count_kernel[(triton.cdiv(num_rows, block_b),)](
        features, weight,
        bias if bias is not None else dummy,
        weight_scale if int8 else dummy,
        counts,
        predictions if predictions is not None else dummy,
        num_rows, num_features, num_classes,
        features.stride(0), features.stride(1), weight.stride(0), weight.stride(1),
        as_float32(feature_scale) if int8 else 1.0,
        INT8=int8, HAS_BIAS=bias is not None, WRITE_PRED=predictions is not None, ALLOW_TF32=bool(allow_tf32),
        BLOCK_B=block_b, BLOCK_C=block_c, BLOCK_F=block_f,
        **launch_options(cfg),
    )
    return counts


def argmax_count(
    logits: torch.Tensor,
    num_classes: int,
    *,
    counts: torch.Tensor | None = None,
    predictions: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """``counts[c] = #{b : argmax logits[b] = c}`` (first maximum) for float ``logits [B, num_classes]``.

    ``counts`` (int64 ``[num_classes]``) is added into when given; ``predictions`` (int64 ``[B]``)
    receives each row's class when given. Returns ``counts``.
    """
    if logits.dim() != 2 or logits.shape[1] != num_classes or not logits.is_floating_point():
        raise ValueError(f"logits must be a float [B, {num_classes}] tensor, got {logits.dtype} {tuple(logits.shape)}")
    num_rows = logits.shape[0]
    counts = _prepare_outputs(num_rows, num_classes, logits.device, counts, predictions)
    if num_rows == 0:
        return counts
    cfg = dict(config) if config is not None else pick_config("votes", logits.device)
    block_c = _class_block(num_classes)
    block_b = _row_block(cfg, block_c)
    _argmax_count_kernel[(triton.cdiv(num_rows, block_b),)](
        logits, counts, predictions if predictions is not None else counts,
        num_rows, num_classes, logits.stride(0), logits.stride(1),
        WRITE_PRED=predictions is not None, BLOCK_B=block_b, BLOCK_C=block_c,
        **launch_options(cfg),
    )
    return counts


# ---------------------------------------------------------------------------------------------
# plain PyTorch references (same signatures)
# ---------------------------------------------------------------------------------------------


def _reference_counts(logits, num_classes, counts, predictions):
    pred = torch.argmax(logits, dim=1)
    if predictions is not None:
        predictions.copy_(pred)
    result = torch.bincount(pred, minlength=num_classes)
    if counts is not None:
        counts += result
        return counts
    return result


def last_layer_logits_reference(features, weight, bias, *, feature_scale=None, weight_scale=None) -> torch.Tensor:
    """float32 logits as the kernel defines them (int8: exact int64 accumulation, then the float32 epilogue)."""
    if features.dtype == torch.int8:
        acc = features.to(torch.int64) @ weight.to(torch.int64).T
        scale = torch.tensor(float(feature_scale), dtype=torch.float32, device=features.device) * weight_scale
        logits = acc.to(torch.float32) * scale[None, :]
    else:
        logits = features.to(torch.float32) @ weight.to(features.dtype).to(torch.float32).T
    if bias is not None:
        logits = logits + bias.to(torch.float32)[None, :]
    return logits


def vote_count_reference(
    features, weight, bias, num_classes, *, feature_scale=None, weight_scale=None, allow_tf32=False,
    counts=None, predictions=None, config=None,
) -> torch.Tensor:
    """Plain-torch :func:`vote_count` (linear + ``torch.argmax`` + ``torch.bincount``)."""
    _check_last_layer(features, weight, bias, num_classes, feature_scale, weight_scale)
    logits = last_layer_logits_reference(features, weight, bias, feature_scale=feature_scale, weight_scale=weight_scale)
    return _reference_counts(logits, num_classes, counts, predictions)


def argmax_count_reference(logits, num_classes, *, counts=None, predictions=None, config=None) -> torch.Tensor:
    """Plain-torch :func:`argmax_count`."""
    if logits.dim() != 2 or logits.shape[1] != num_classes:
        raise ValueError(f"logits must be [B, {num_classes}], got {tuple(logits.shape)}")
    return _reference_counts(logits, num_classes, counts, predictions)
