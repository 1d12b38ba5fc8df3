"""Kernel tests run Triton on a GPU when there is one, else through Triton's CPU interpreter.

``TRITON_INTERPRET=1`` must be set before ``triton.jit`` decorates the kernels, i.e. before the
test modules import ``arq_kernels``; this conftest is imported first. It is set only when no
CUDA device is visible (and is left alone when the caller already set it).
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@pytest.fixture(scope="session")
def device() -> torch.device:
    """Where the kernels run: CUDA, or the CPU under the interpreter."""
    if torch.cuda.is_available() and not _interpreting():
        return torch.device("cuda")
    return torch.device("cpu")


@pytest.fixture
def generator() -> torch.Generator:
    """A fresh seeded CPU generator (inputs are drawn on the CPU, then moved)."""
    return torch.Generator().manual_seed(1234)
