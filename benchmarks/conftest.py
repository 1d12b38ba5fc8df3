import os

import torch


def pytest_configure(config):
    torch.set_num_threads(int(os.environ.get("ARQ_BENCH_THREADS", os.cpu_count() or 1)))
