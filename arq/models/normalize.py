"""The normalization layer that every arq model starts with."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class NormalizeLayer(nn.Module):
    """Per-channel standardization ``(x - mean[c]) / std[c]`` of a batch ``[B, C, H, W]``.

    It is the model's first layer, not a preprocessing step, so that randomized smoothing adds its
    Gaussian noise in [0, 1] pixel space and certified radii are L2 distances between images
    (Cohen et al. 2019, locuslab/smoothing ``NormalizeLayer``). ``mean`` and ``std`` are
    non-persistent buffers: they follow ``.to(device)`` but are not in the state dict, so the keys
    match locuslab's checkpoints (whose normalization layer has no parameters).
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        mean_values = [float(value) for value in mean]
        std_values = [float(value) for value in std]
        if len(mean_values) != len(std_values) or not mean_values:
            raise ValueError(f"mean and std need one value per channel, got {mean_values} and {std_values}")
        if any(value <= 0 for value in std_values):
            raise ValueError(f"std must be positive, got {std_values}")
        # The exact Python floats, kept for metadata (the float32 buffers round them).
        self.mean_values = mean_values
        self.std_values = std_values
        self.register_buffer("mean", torch.tensor(mean_values).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std_values).view(1, -1, 1, 1), persistent=False)

    @property
    def num_channels(self) -> int:
        return self.mean.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.num_channels:
            raise ValueError(f"expected a batch [B, {self.num_channels}, H, W], got {tuple(x.shape)}")
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def extra_repr(self) -> str:
        return f"mean={self.mean_values}, std={self.std_values}"
