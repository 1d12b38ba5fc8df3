import pytest
import torch


@pytest.fixture(autouse=True)
def one_intra_op_thread():
    """Run the quantization tests on one intra-op thread, restoring the setting afterwards.

    On the shared 2-core development host, OpenMP threads that spin-wait on busy cores made a
    small training step 10x slower with 2 threads than with 1 (0.99 s vs 0.097 s, measured
    2026-11-27). The results the tests check do not depend on the thread count.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
