"""arq.ops' Triton adapters give the ops' results (run under TRITON_INTERPRET=1 without a GPU)."""
import pytest
import torch

from arq import ops
from arq.quant.packing import pack_weights

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.triton
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("bits", [2, 5, 8])
@pytest.mark.parametrize("relu, out_scale", [(False, 0.0), (True, 0.0), (False, 0.37)])
def test_packed_linear_adapter_matches_reference(bits, relu, out_scale):
    generator = torch.Generator().manual_seed(bits)
    m, k, n = 5, 37, 7
    limit = 2 ** (bits - 1) - 1
    x = torch.randint(-60, 61, (m, k), generator=generator, dtype=torch.int8)
    q = torch.randint(-limit, limit + 1, (n, k), generator=generator, dtype=torch.int8)
    scales, bias = torch.rand(n, generator=generator) + 0.5, torch.randn(n, generator=generator)
    args = (pack_weights(q, bits), bits, scales, bias, 0.05, relu, None, out_scale)
    expected = ops.packed_linear_reference(x, *args)
    out = ops._triton_packed_linear(*(t.to(DEVICE) if isinstance(t, torch.Tensor) else t for t in (x, *args)))
    assert out.dtype == expected.dtype and out.shape == expected.shape
    if out_scale > 0:
        assert (out.cpu().int() - expected.int()).abs().max() <= 1  # fp32 epilogue order differs by one rounding
    else:
        torch.testing.assert_close(out.cpu(), expected, rtol=1e-5, atol=1e-5)


def test_packed_conv2d_adapter_matches_reference():
    generator = torch.Generator().manual_seed(3)
    x = torch.randint(-20, 21, (2, 5, 6, 3), generator=generator, dtype=torch.int8)
    q = torch.randint(-7, 8, (7, 27), generator=generator, dtype=torch.int8)
    scales, bias = torch.rand(7, generator=generator) + 0.5, torch.randn(7, generator=generator)
    args = (pack_weights(q, 4), 4, scales, bias, 0.1, 3, 3, 2, 1, True, None, 0.0)
    expected = ops.packed_conv2d_reference(x, *args)
    out = ops._triton_packed_conv2d(*(t.to(DEVICE) if isinstance(t, torch.Tensor) else t for t in (x, *args)))
    torch.testing.assert_close(out.cpu(), expected, rtol=1e-5, atol=1e-5)


def test_vote_count_adapter_counts_exactly_on_integer_data():
    generator = torch.Generator().manual_seed(4)
    features = torch.randint(-3, 4, (50, 16), generator=generator).float()
    weight = torch.randint(-3, 4, (10, 16), generator=generator).float()
    expected = ops.vote_count_reference(features, weight, None, 10)
    assert torch.equal(ops._triton_vote_count(features.to(DEVICE), weight.to(DEVICE), None, 10).cpu(), expected)
