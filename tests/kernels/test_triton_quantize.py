"""arq_kernels.quantize: float32 activations to the packed kernels' int8 NHWC codes, in one pass."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="Triton is not installed (pip install 'arq[triton]')")

from arq_kernels.quantize import quantize_nhwc, quantize_nhwc_reference  # noqa: E402

pytestmark = pytest.mark.triton


def _levels(bits: int, signed: bool) -> tuple[int, int, int]:
    """(q_lo, q_hi, zero point) of arq.quant's b-bit activation codes as the packed layers send them."""
    if signed:
        limit = (1 << (bits - 1)) - 1
        return -limit, limit, 0
    top = (1 << bits) - 1
    return 0, top, -128 if top > 127 else 0


def _activations(shape, scale, generator):
    """Random values, exact ties k + 1/2 on the code grid (half to even), and values beyond the range."""
    x = torch.randn(shape, generator=generator) * 40 * scale
    flat = x.view(-1)
    ties = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, 126.5, 127.5, 254.5, 1e4, -1e4])[: flat.numel()]
    flat[: ties.numel()] = ties * scale
    return x


@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
@pytest.mark.parametrize("bits", range(2, 9))
def test_codes_equal_the_reference_and_the_fake_quant_grid(bits, signed, device, generator):
    q_lo, q_hi, zero_point = _levels(bits, signed)
    scale = 0.037
    x = _activations((2, 5, 3, 7), scale, generator)  # odd C, H, W
    layouts = [x, x.contiguous(memory_format=torch.channels_last), x[:, 1:4]]  # NCHW, NHWC, a strided view
    for view in layouts:
        expected = quantize_nhwc_reference(view, scale, q_lo, q_hi, zero_point)
        out = torch.full(expected.shape, 99, dtype=torch.int8, device=device)  # poisoned
        got = quantize_nhwc(view.to(device), scale, q_lo, q_hi, zero_point, out=out)
        assert got.data_ptr() == out.data_ptr()
        assert torch.equal(got.cpu(), expected)
    # the codes themselves: torch.round (half to even) of the float32 quotient, clamped
    s = torch.tensor(scale, dtype=torch.float32)
    codes = torch.clamp(torch.round(x / s), q_lo, q_hi).permute(0, 2, 3, 1)
    assert torch.equal(quantize_nhwc(x.to(device), scale, q_lo, q_hi, zero_point).cpu().to(torch.int64),
                       codes.to(torch.int64) + zero_point)


def test_rows_and_empty_and_bad_input(device, generator):
    x = _activations((13, 37), 0.1, generator)
    assert torch.equal(quantize_nhwc(x.to(device), 0.1, 0, 255, -128).cpu(), quantize_nhwc_reference(x, 0.1, 0, 255, -128))
    assert quantize_nhwc(torch.zeros(0, 3, 4, 4, device=device), 0.1, -7, 7).shape == (0, 4, 4, 3)
    with pytest.raises(TypeError, match="float32"):
        quantize_nhwc(torch.zeros(2, 3, 4, 4, dtype=torch.float16, device=device), 0.1, -7, 7)
    with pytest.raises(ValueError, match="fit int8"):
        quantize_nhwc(torch.zeros(2, 3, device=device), 0.1, 0, 255)  # 0..255 needs zero point -128
    with pytest.raises(ValueError, match="out must be"):
        quantize_nhwc(torch.zeros(2, 3, device=device), 0.1, -7, 7, out=torch.empty(3, 2, dtype=torch.int8))
