"""arq: certified robustness (randomized smoothing) for mixed-precision quantized networks.

Certify: ``arq.certify(model, x, n=100_000)`` (CERTIFY of Cohen et al. 2019),
``arq.predict`` (PREDICT), ``arq.Smooth`` (a drop-in for locuslab/smoothing's
``core.Smooth``). Quantize: ``arq.quantize``, ``arq.quant``. Search:
``arq.search``. Importing arq does no work: no device queries, no compiled
library loads, until a function needs them.
"""
from __future__ import annotations

from arq.smoothing.core import ABSTAIN, Certificate, Smooth, certify, predict

__version__ = "0.1.0"

__all__ = ["ABSTAIN", "Certificate", "Smooth", "certify", "predict", "quantize", "__version__"]


def __getattr__(name):
    if name == "quantize":
        from arq.quant import quantize

        return quantize
    raise AttributeError(f"module 'arq' has no attribute {name!r}")
