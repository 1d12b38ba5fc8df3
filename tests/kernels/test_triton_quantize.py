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


def _hard_quotients(scale: float, generator) -> torch.Tensor:
    """float32 values whose quotient by ``scale`` lies next to a rounding boundary: each tie
    ``(k + 1/2) * scale`` rounded to float32 and its float32 neighbours, subnormals, zeros, large
    values, and random values."""
    s = torch.tensor(scale, dtype=torch.float32)
    k = torch.arange(-300, 300, dtype=torch.float32)
    ties = (k + 0.5) * s
    near = torch.cat([ties, torch.nextafter(ties, torch.tensor(float("inf"))),
                      torch.nextafter(ties, torch.tensor(float("-inf")))])
    special = torch.tensor([0.0, -0.0, 1e-45, -1e-45, 1e-39, 3.4e38, -3.4e38, 1e-30, 5e6])
    noise = torch.randn(3000, generator=generator) * 300 * scale
    return torch.cat([near, special, noise])


# 3.4e38 / 0.1 overflows to inf on purpose (then clamps to q_hi): numpy says so while interpreting
@pytest.mark.filterwarnings("ignore:overflow encountered in (cast|divide):RuntimeWarning")
@pytest.mark.parametrize("division", ["f64", "rn"])
def test_both_divisions_give_the_reference_codes(division, device, generator, monkeypatch):
    """ARQ_TRITON_DIVISION's two quotients (float64 then float32, or tl.div_rn) are the correctly
    rounded float32 quotient: the codes equal torch's IEEE division, next to every rounding
    boundary too. (On a GPU the choice is fixed per process: the gpu test below.)"""
    if device.type != "cpu":
        pytest.skip("switches the division inside this process: interpreter only")
    import triton.language as tl

    import arq_kernels._common as common

    monkeypatch.setattr(common, "_DIVIDE_RN", tl.constexpr(division == "rn"))
    for scale in (0.037, 1 / 3, 0.1, 7.3e-3, 2.5):
        x = _hard_quotients(scale, generator).reshape(-1, 3)  # [M, K] rows
        for q_lo, q_hi, zero_point in ((-127, 127, 0), (0, 255, -128), (-7, 7, 0)):
            expected = quantize_nhwc_reference(x, scale, q_lo, q_hi, zero_point)
            got = quantize_nhwc(x, scale, q_lo, q_hi, zero_point, config={"BLOCK": 8192, "num_warps": 4})
            assert torch.equal(got, expected), (division, scale, q_lo, q_hi)


def test_division_setting_is_checked():
    import subprocess
    import sys

    env = dict(__import__("os").environ, ARQ_TRITON_DIVISION="fast")
    done = subprocess.run([sys.executable, "-c", "import arq_kernels._common"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode != 0 and "ARQ_TRITON_DIVISION must be 'f64' or 'rn'" in done.stderr


_GPU_DIVISION_CHECK = """
import torch
from arq_kernels._common import QUOTIENT_DIVISION
from arq_kernels.quantize import quantize_nhwc, quantize_nhwc_reference
import os
import tests.kernels.test_triton_quantize as t
assert QUOTIENT_DIVISION == os.environ["ARQ_TRITON_DIVISION"], QUOTIENT_DIVISION
generator = torch.Generator().manual_seed(11)
for scale in (0.037, 1 / 3, 0.1, 7.3e-3, 2.5):
    x = t._hard_quotients(scale, generator).reshape(-1, 3).cuda()
    for q_lo, q_hi, zero_point in ((-127, 127, 0), (0, 255, -128), (-7, 7, 0)):
        expected = quantize_nhwc_reference(x.cpu(), scale, q_lo, q_hi, zero_point)
        assert torch.equal(quantize_nhwc(x, scale, q_lo, q_hi, zero_point).cpu(), expected), (scale, q_lo)
print(QUOTIENT_DIVISION, "ok")
"""


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("division", ["rn", "f64"])
def test_gpu_divisions_give_the_reference_codes(division, tmp_path):
    """Each ARQ_TRITON_DIVISION on the GPU (a fresh process and Triton cache each): div.rn.f32
    (the default) and the float64 quotient give the reference's codes next to every rounding
    boundary."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    env = dict(os.environ, ARQ_TRITON_DIVISION=division, TRITON_CACHE_DIR=str(tmp_path / "cache"),
               PYTHONPATH=os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", _GPU_DIVISION_CHECK], env=env, cwd=repo, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and f"{division} ok" in done.stdout, done.stdout[-2000:] + done.stderr[-2000:]
