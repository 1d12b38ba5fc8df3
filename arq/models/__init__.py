"""Architectures, the normalization layer and checkpoints.

Every model maps a float batch ``[B, C, H, W]`` in [0, 1] pixel space to logits ``[B, K]`` and is
``nn.Sequential(NormalizeLayer(mean, std), net)`` (keys ``0.`` / ``1.`` as in locuslab/smoothing).
"""
from arq.models.checkpoint import CheckpointError, load_checkpoint, read_metadata, save_model
from arq.models.normalize import NormalizeLayer
from arq.models.registry import ARCHITECTURES, DEFAULT_DATASET, get_architecture, num_classes_of

__all__ = [
    "ARCHITECTURES",
    "CheckpointError",
    "DEFAULT_DATASET",
    "NormalizeLayer",
    "get_architecture",
    "load_checkpoint",
    "num_classes_of",
    "read_metadata",
    "save_model",
]
