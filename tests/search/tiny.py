"""A tiny noise-trained classifier and data set for the search tests (trains in about a second)."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

SIGMA = 0.25
INPUT_SHAPE = (1, 8, 8)
NUM_CLASSES = 3


class TinyNet(nn.Module):
    """conv 3x3 (1->4) -> ReLU -> depthwise conv 3x3 stride 2 (4) -> ReLU -> FC 64 -> 3."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=4)
        self.fc = nn.Linear(4 * 4 * 4, NUM_CLASSES)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        return self.fc(torch.flatten(x, 1))


def tiny_data(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Class k: a bright horizontal band in rows 3k .. 3k + 1, plus pixel noise, in [0, 1]."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(count) % NUM_CLASSES
    images = 0.1 * torch.rand(count, *INPUT_SHAPE, generator=generator)
    for k in range(NUM_CLASSES):
        images[labels == k, :, 3 * k:3 * k + 2, :] += 0.8
    return images.clamp(0, 1), labels


def trained_tiny_net(seed: int = 0) -> TinyNet:
    """TinyNet trained under Gaussian noise at SIGMA (deterministic given the seed)."""
    images, labels = tiny_data(300, seed + 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TinyNet()
        optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
        generator = torch.Generator().manual_seed(seed)
        for _ in range(60):
            noisy = images + SIGMA * torch.randn(images.shape, generator=generator)
            loss = F.cross_entropy(model(noisy), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    model.arq_metadata = {"sigma": SIGMA, "num_classes": NUM_CLASSES, "dataset": "tiny", "arch": "tiny"}
    return model
