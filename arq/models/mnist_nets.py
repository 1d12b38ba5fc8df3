"""Small networks for 28x28 MNIST, sized to be certified at n = 100,000 samples on a CPU.

Forward throughput at batch 1000, float32, 2 CPU threads (AMD EPYC, shared machine), measured
with ``benchmark_forward`` below: see docs/zoo.md for the numbers.
"""
from __future__ import annotations

import time

import torch
from torch import nn
from torch.nn import functional as F


class LeNet(nn.Module):
    """LeNet-5 (LeCun et al. 1998) for 28x28 inputs: ``[B, 1, 28, 28] -> [B, num_classes]``.

    conv 5x5 (6) -> max-pool 2 -> ReLU -> conv 5x5 (16) -> max-pool 2 -> ReLU -> FC 256->120 ->
    ReLU -> FC 120->84 -> ReLU -> FC 84->K; feature maps 24x24, 12x12, 8x8, 4x4. 44k parameters.
    Max-pool and ReLU commute (both are monotone), so pooling first applies the ReLU to 4x fewer
    values; the widths are the classic (6, 16) because wider convolutions fall off oneDNN's fast
    path on CPU (12/32 channels measured 3x slower).
    """

    def __init__(self, num_classes: int = 10, channels: tuple[int, int] = (6, 16), hidden: tuple[int, int] = (120, 84)):
        super().__init__()
        conv1_channels, conv2_channels = channels
        self.conv1 = nn.Conv2d(1, conv1_channels, kernel_size=5)
        self.conv2 = nn.Conv2d(conv1_channels, conv2_channels, kernel_size=5)
        self.fc1 = nn.Linear(conv2_channels * 4 * 4, hidden[0])
        self.fc2 = nn.Linear(hidden[0], hidden[1])
        self.fc3 = nn.Linear(hidden[1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.conv2(x), 2))
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class MNISTResNet(nn.Module):
    """Small ResNet for 28x28: ``[B, 1, 28, 28] -> [B, num_classes]``.

    Stem conv 3x3 stride 2 (16 channels, 14x14) + BN + ReLU, then ``blocks_per_stage`` basic
    blocks of 16 channels at 14x14 and of 32 channels at 7x7 (the CIFAR ResNet's
    :class:`~arq.models.cifar_resnet.BasicBlock`), global average pooling, FC 32->K. The strided
    stem keeps it affordable on a CPU (full-resolution blocks are 4x the cost).
    """

    def __init__(self, num_classes: int = 10, blocks_per_stage: int = 1):
        super().__init__()
        from arq.models.cifar_resnet import BasicBlock

        if blocks_per_stage < 1:
            raise ValueError(f"blocks_per_stage must be >= 1, got {blocks_per_stage}")
        self.conv1 = nn.Conv2d(1, 16, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(*[BasicBlock(16, 16) for _ in range(blocks_per_stage)])
        self.layer2 = nn.Sequential(
            BasicBlock(16, 32, stride=2), *[BasicBlock(32, 32) for _ in range(blocks_per_stage - 1)]
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def benchmark_forward(model: nn.Module, input_shape: tuple[int, ...], batch_size: int = 1000,
                      repeats: int = 20, rounds: int = 3) -> float:
    """Forward passes per second (samples/s) of ``model`` in eval/inference mode, best of ``rounds``.

    The best round is reported because other processes share the CPU; it estimates what the
    network itself costs.
    """
    model.eval()
    batch = torch.rand(batch_size, *input_shape)
    with torch.inference_mode():
        for _ in range(3):  # warm-up: oneDNN picks its kernels on the first calls
            model(batch)
        best_seconds = float("inf")
        for _ in range(rounds):
            start = time.perf_counter()
            for _ in range(repeats):
                model(batch)
            best_seconds = min(best_seconds, (time.perf_counter() - start) / repeats)
    return batch_size / best_seconds
