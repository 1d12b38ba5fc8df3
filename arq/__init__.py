"""arq: certified robustness (randomized smoothing) for mixed-precision quantized networks.

Certify: ``arq.certify(model, x, n=100_000)`` (CERTIFY of Cohen et al. 2019),
``arq.predict`` (PREDICT), ``arq.Smooth`` (a drop-in for locuslab/smoothing's
``core.Smooth``). Quantize: ``arq.quantize``, ``arq.quant``. Search:
``arq.search``. Importing arq does no work: torch, the compiled ops and any
device are loaded only when a name that needs them is first used.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

ABSTAIN = -1

_LAZY = {
    "Certificate": "arq.smoothing.core",
    "Smooth": "arq.smoothing.core",
    "certify": "arq.smoothing.core",
    "predict": "arq.smoothing.core",
    "quantize": "arq.quant",
}
_SUBPACKAGES = {"analyze", "data", "models", "quant", "search", "smoothing", "zoo", "irs", "ops"}

__all__ = ["ABSTAIN", "Certificate", "Smooth", "certify", "predict", "quantize", "__version__"]


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if name in _SUBPACKAGES:
        return importlib.import_module(f"arq.{name}")
    raise AttributeError(f"module 'arq' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY) | _SUBPACKAGES)
