"""Loads arq's compiled ops (``arq._C``) once, lazily.

Importing ``arq._C`` registers the C++ (and, when built, CUDA) kernels of the
``torch.ops.arq`` operators. When it is missing (a pure-Python install) every
op falls back to its plain PyTorch reference and one warning says so.
"""
from __future__ import annotations

import functools
import logging
import warnings

_log = logging.getLogger("arq")


@functools.lru_cache(maxsize=None)
def compiled_ops_available() -> bool:
    """True when ``arq._C`` imported and registered its ops."""
    import torch  # noqa: F401  (arq._C links against libtorch/libc10, which importing torch loads)

    try:
        from arq import _C  # noqa: F401
    except ImportError as error:
        warnings.warn(
            f"arq: compiled ops (arq._C) not available ({error}); using the pure-PyTorch "
            "fallbacks. Build them with `pip install --no-build-isolation -e .`.",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    return True


@functools.lru_cache(maxsize=None)
def cuda_ops_available() -> bool:
    """True when ``arq._C`` was built with its CUDA kernels."""
    if not compiled_ops_available():
        return False
    import torch

    return bool(torch.ops.arq.built_with_cuda())
