"""Votes: the base classifier's class on each noisy sample, counted per class.

``count_votes(logits, num_classes)`` returns int64 counts on the logits'
device: row-wise argmax (ties to the lowest index, NaN counts as the
maximum, exactly as ``torch.argmax``) then per-class counts, with no host
synchronization, so counting overlaps the next batch on a GPU.
"""
from __future__ import annotations

import torch

from arq._ext import compiled_ops_available, cuda_ops_available


def count_votes_reference(logits: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Plain-torch reference: ``bincount(argmax(logits, 1), minlength=num_classes)`` without a sync."""
    predictions = logits.argmax(dim=1)
    counts = torch.zeros(num_classes, dtype=torch.int64, device=logits.device)
    return counts.scatter_add_(0, predictions, torch.ones_like(predictions))


def count_votes(logits: torch.Tensor, num_classes: int, backend: str = "auto") -> torch.Tensor:
    """Per-class counts ``int64[num_classes]`` of the argmax of ``logits[batch, classes]``."""
    if logits.dim() != 2:
        raise ValueError(f"logits must have shape [batch, classes], got {tuple(logits.shape)}")
    if logits.shape[1] != num_classes:
        raise ValueError(
            f"num_classes={num_classes} disagrees with the model's output, which has {logits.shape[1]} classes"
        )
    if not logits.is_floating_point():
        if logits.dtype not in (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64):
            raise TypeError(f"logits must be a real-valued tensor (float or integer), got dtype {logits.dtype}")
        return count_votes_reference(logits, num_classes)  # integer logits (codes): the kernels read floats
    device_type = logits.device.type
    if backend == "triton":
        from arq_kernels.votes import argmax_count

        return argmax_count(logits, num_classes)
    use_compiled = backend in ("auto", "cpp", "cuda") and (
        (device_type == "cpu" and compiled_ops_available())
        or (device_type == "cuda" and cuda_ops_available() and logits.dtype != torch.float64)
    )
    if use_compiled:
        return torch.ops.arq.argmax_count(logits, num_classes)
    return count_votes_reference(logits, num_classes)
