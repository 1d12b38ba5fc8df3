"""arq.certify through the Triton backend gives the reference certificate (CPU: TRITON_INTERPRET=1)."""
import pytest
import torch

import arq
from arq.smoothing.noise import triton_usable

pytestmark = [pytest.mark.triton, pytest.mark.skipif(not triton_usable(torch.device("cuda" if torch.cuda.is_available()
                                                                                   else "cpu")),
                                                     reason="triton not usable here")]


def test_certify_with_triton_backend_matches_the_reference():
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 5 * 7, 4)).eval().to(device)
    x = torch.rand(3, 5, 7)
    kwargs = dict(sigma=0.3, n=500, n0=20, batch_size=256, seed=11, input_index=5)
    reference = arq.certify(model, x, backend="torch", **kwargs)
    triton = arq.certify(model, x, backend="triton", **kwargs)
    assert triton.backend == "triton"
    assert triton._replace(backend="") == reference._replace(backend="")
