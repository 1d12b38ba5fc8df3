import os

import pytest
import torch


def pytest_configure(config):
    # Keep tests reproducible and polite on a 2-core CI machine.
    torch.set_num_threads(min(2, os.cpu_count() or 1))


def cuda_available() -> bool:
    return torch.cuda.is_available()


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
