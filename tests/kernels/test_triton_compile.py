"""The kernels compile for a real GPU (sm_90: H100/H200), checked on a machine without one.

The other kernel tests run under Triton's CPU interpreter, which proves what the kernels compute
but not that Triton's GPU pipeline accepts them. ``arq_kernels.compile_check`` runs that pipeline
(TTIR -> PTX -> ptxas cubin) ahead of time for a GPU target and checks the PTX for the
properties the exactness contracts rely on (no FMA contraction, ``div.rn.f64``, no
``div.full.f32``). It must run with ``TRITON_INTERPRET=0``, hence a subprocess.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="Triton is not installed (pip install 'arq[triton]')")

pytestmark = [pytest.mark.triton, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
# one variant of each kernel family, the 3x3 conv also with its narrow n16 tiles (int8 codes out;
# float32 and codes out) (the full list: python -m arq_kernels.compile_check)
SUBSET = ("noisy_input[fp32];noisy_input[int8;vote_count[int8];argmax_count;packed_linear[b3;packed_conv2d[3x3, b4;"
          "quantize_nhwc;packed_conv2d_rows[3x3, b4, int8 weights, int8+res+relu, as launched: 16 ch, H200;"
          "packed_conv2d_rows[3x3, b8, int8 weights, int8+res+relu, as launched: 64 ch, H200")


def _ptxas_available() -> bool:
    import triton

    return (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()


@pytest.mark.skipif(not _ptxas_available(), reason="this Triton build ships no ptxas")
def test_kernels_compile_for_sm90_without_fma_contraction(tmp_path):
    """The default build: no FMA contraction, and the quantizing kernels divide with ``div.rn.f32``
    (ARQ_TRITON_DIVISION's default, rn)."""
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path / "triton-cache"),
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    env.pop("ARQ_TRITON_DIVISION", None)
    result = subprocess.run(
        [sys.executable, "-m", "arq_kernels.compile_check", "--arch", "90", "--only", SUBSET],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    report = result.stdout + result.stderr
    assert result.returncode == 0, report
    # noise fp32, int8, int8 normalized and the latter as launched; vote_count; argmax_count;
    # packed_linear b3; eighteen 3x3 b4 convs (one of the bit-width sweep, two narrow, three tuned
    # tiles, and twelve as launched on ResNet-110's layers, whose activation loads must be
    # vectorized); quantize_nhwc; the row loop with int8 weights as launched, W4A4 on a 16-channel
    # layer and W8A8 (the zero point's prefix-sum correction) on a 64-channel one
    assert report.count(" ok") == 28, report
    assert report.count("as launched") == 15, report


@pytest.mark.skipif(not _ptxas_available(), reason="this Triton build ships no ptxas")
def test_quantizing_kernels_divide_in_float64_when_asked(tmp_path):
    """ARQ_TRITON_DIVISION=f64 (the A/B choice; the default is rn, checked by the test above): the
    quantizing kernels compile with ``div.rn.f64`` (checked in their PTX by compile_check) and
    still without FMA contraction."""
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path / "triton-cache"),
               ARQ_TRITON_DIVISION="f64", PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run(
        [sys.executable, "-m", "arq_kernels.compile_check", "--arch", "90", "--only",
         "quantize_nhwc;noisy_input[int8;packed_conv2d[3x3, b4, fp32+codes"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    report = result.stdout + result.stderr
    assert result.returncode == 0, report
    # quantize_nhwc, 3 noise (plain, normalized, normalized as launched), 3 convs and 6 as launched
    assert report.count(" ok") == 13, report
