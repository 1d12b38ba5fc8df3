"""Triton kernels for arq's certification path, one kernel family per module.

* :mod:`arq_kernels.noise`          ``noisy_input``: fused Philox noise + add + format (quantize, NHWC)
* :mod:`arq_kernels.votes`          ``vote_count``, ``argmax_count``: last layer + argmax + class counts
* :mod:`arq_kernels.packed_matmul`  ``packed_linear``: int8 x packed 2-8 bit weights, fused epilogue
* :mod:`arq_kernels.packed_conv`    ``packed_conv2d``: NHWC implicit-GEMM convolution, same epilogue
* :mod:`arq_kernels.quantize`       ``quantize_nhwc``: float32 activations to the int8 NHWC codes above

Each module has the same outline (candidate configs in ``configs/*.json``, kernel, launcher
that checks shapes, allocates and launches) and a plain PyTorch reference of the same
signature beside each launcher (``noisy_input_reference``, ...). Importing this package does
no work: the submodules (and Triton) load on first attribute access.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "noisy_input": "noise",
    "noisy_input_reference": "noise",
    "vote_count": "votes",
    "vote_count_reference": "votes",
    "argmax_count": "votes",
    "argmax_count_reference": "votes",
    "packed_linear": "packed_matmul",
    "packed_linear_reference": "packed_matmul",
    "pack_weights": "packed_matmul",
    "unpack_weights": "packed_matmul",
    "packed_conv2d": "packed_conv",
    "packed_conv2d_reference": "packed_conv",
    "quantize_nhwc": "quantize",
    "quantize_nhwc_reference": "quantize",
}

__all__ = sorted(_EXPORTS) + ["triton_available"]


def triton_available() -> bool:
    """True when ``import triton`` works (the kernels run on CUDA, or on CPU under TRITON_INTERPRET=1)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def __getattr__(name: str):
    if name in _EXPORTS:
        module = importlib.import_module(f"arq_kernels.{_EXPORTS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module 'arq_kernels' has no attribute {name!r}")
