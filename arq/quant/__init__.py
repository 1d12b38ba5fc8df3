"""Mixed-precision quantization for randomized smoothing (issue 4).

policy (Policy, LayerBits, quantizable_layers) -> quantizers (QuantConfig, weight and
activation quantizers) -> modules (QuantConv2d, QuantLinear) -> quantize (BN folding,
calibration, fine-tuning under noise) -> cost (BitOPs, size) -> packing and
serialization (packed int32 weights, safetensors) -> execution (integer CPU path).

Importing this package does no work beyond importing torch.
"""
from arq.quant.cost import CostReport, LayerCost, bitops, layer_macs
from arq.quant.modules import QuantConv2d, QuantLinear
from arq.quant.packing import pack_weights, unpack_weights
from arq.quant.policy import LayerBits, Policy, quantizable_layers
from arq.quant.quantize import FinetuneConfig, calibrate, finetune_model, fold_batchnorm, quantize
from arq.quant.quantizers import ActivationQuantizer, QuantConfig
from arq.quant.serialization import load, save

__all__ = [
    "ActivationQuantizer", "CostReport", "FinetuneConfig", "LayerBits", "LayerCost", "Policy",
    "QuantConfig", "QuantConv2d", "QuantLinear", "bitops", "calibrate", "finetune_model",
    "fold_batchnorm", "layer_macs", "load", "pack_weights", "quantizable_layers", "quantize",
    "save", "unpack_weights", "to_integer", "IntegerExecutionConfig",
]


def __getattr__(name):
    # the integer CPU path imports oneDNN op wrappers only when asked for
    if name in ("to_integer", "IntegerExecutionConfig"):
        from arq.quant import execution

        return getattr(execution, name)
    if name == "to_kernels":  # arq's own packed kernels (arq.ops), imported only when asked for
        from arq.quant.kernels import to_kernels

        return to_kernels
    raise AttributeError(f"module 'arq.quant' has no attribute {name!r}")
