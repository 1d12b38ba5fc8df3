"""Cost of a mixed-precision policy: BitOPs and packed model size.

BitOPs of a layer = MACs x w_bits x a_bits (ARQ, Yang et al. 2024; HAQ's BitOPs);
the FP32 model costs 32 x 32 per MAC, so uniform 4/4 bits is 16 / 1024 = 1.5625 %.
MACs per sample: a Conv2d gives ``H_out * W_out * C_out * (C_in / groups) * KH * KW``,
a Linear ``out_features * in_features`` per row of its input. Output sizes come from
forward hooks on one pass of a zero input, so any architecture built from modules works.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from arq.quant.packing import packed_words
from arq.quant.policy import FLOAT_BITS, LayerBits, Policy, quantizable_layers

FP32_BITOPS_PER_MAC = FLOAT_BITS * FLOAT_BITS


@dataclass(frozen=True)
class LayerCost:
    """One layer's cost. ``bitops = macs * w_bits * a_bits``.

    ``packed_bytes`` counts what the integer layer needs (:func:`packed_layer_bytes`): the packed
    weight words, the float32 per-channel scales and the float layer's float32 bias (at 32 bits,
    the float32 weight and bias). It is not the layer's share of the file that
    ``arq.quant.save`` writes, which also stores the float32 ``weight_clip_ratio`` (4 bytes per
    output channel, for training a loaded model), a bias that BatchNorm folding added to a layer
    without one, at 32 bits ``weight_scale`` and ``weight_clip_ratio`` as well, and the input
    quantizer's scale and sign.
    """

    name: str
    kind: str
    macs: int
    w_bits: int
    a_bits: int
    weight_count: int
    packed_bytes: int

    @property
    def bitops(self) -> int:
        return self.macs * self.w_bits * self.a_bits


@dataclass(frozen=True)
class CostReport:
    """Per-layer and total cost of a model under a policy (per input sample)."""

    layers: list[LayerCost] = field(default_factory=list)
    other_bytes: int = 0

    @property
    def total_macs(self) -> int:
        return sum(layer.macs for layer in self.layers)

    @property
    def total_bitops(self) -> int:
        return sum(layer.bitops for layer in self.layers)

    @property
    def gbops(self) -> float:
        """Total BitOPs in units of 1e9."""
        return self.total_bitops / 1e9

    @property
    def fp32_bitops(self) -> int:
        return self.total_macs * FP32_BITOPS_PER_MAC

    @property
    def fraction_of_fp32(self) -> float:
        """``total_bitops / (32 * 32 * total_macs)``: 0.015625 for uniform 4/4."""
        return self.total_bitops / self.fp32_bitops

    @property
    def packed_layer_bytes(self) -> int:
        return sum(layer.packed_bytes for layer in self.layers)

    @property
    def model_bytes(self) -> int:
        """Packed quantizable layers plus every other parameter and buffer in float32."""
        return self.packed_layer_bytes + self.other_bytes

    @property
    def macs_per_layer(self) -> dict[str, int]:
        return {layer.name: layer.macs for layer in self.layers}


def layer_macs(model: nn.Module, input_shape: Sequence[int]) -> dict[str, tuple[int, nn.Module]]:
    """MACs per sample of every quantizable layer: ``{name: (macs, module)}`` (one forward of zeros)."""
    shape = tuple(int(s) for s in input_shape)
    if len(shape) in (1, 3):  # one sample without its batch dimension: (features,) or (C, H, W)
        shape = (1,) + shape
    if len(shape) not in (2, 4) or shape[0] != 1 or any(s < 1 for s in shape):
        raise ValueError(f"input_shape must be (C, H, W), (1, C, H, W), (features,) or (1, features), got "
                         f"{tuple(input_shape)}")
    batch = shape[0]
    layers = quantizable_layers(model)
    macs: dict[str, int] = {}

    def hook(name):
        def record(module, inputs, output):
            if isinstance(module, nn.Conv2d):
                per_output = (module.in_channels // module.groups) * module.kernel_size[0] * module.kernel_size[1]
            else:
                per_output = module.in_features
            macs[name] = macs.get(name, 0) + output.numel() // batch * per_output
        return record

    handles = [module.register_forward_hook(hook(name)) for name, module in layers]
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    dtype = parameter.dtype if parameter is not None and parameter.is_floating_point() else torch.float32
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            try:
                model(torch.zeros(shape, device=device, dtype=dtype))
            except (RuntimeError, ValueError) as error:
                raise ValueError(f"input_shape {tuple(input_shape)} does not fit the model: {error}") from error
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return {name: (macs.get(name, 0), module) for name, module in layers}


def packed_layer_bytes(weight_shape: Sequence[int], w_bits: int, has_bias: bool) -> int:
    """Bytes of one integer layer: packed int32 words + float32 scales + float32 bias (float32 weight at 32 bits).

    Not the bytes ``arq.quant.save`` writes for it (see :class:`LayerCost`).
    """
    n = int(weight_shape[0])
    k = 1
    for size in weight_shape[1:]:
        k *= int(size)
    bias = 4 * n if has_bias else 0
    if w_bits == FLOAT_BITS:
        return 4 * n * k + bias
    return 4 * n * packed_words(k, w_bits) + 4 * n + bias


def bitops(model: nn.Module, policy: Policy | None, input_shape: Sequence[int]) -> CostReport:
    """BitOPs and packed size of ``model`` under ``policy`` (``None``: every layer 32/32).

    ``input_shape`` is one sample's shape, e.g. ``(3, 32, 32)``. A layer called several
    times in one forward counts every call. BatchNorm that quantization folds away
    still counts in ``other_bytes`` here (an upper bound).
    """
    if policy is not None:
        if not isinstance(policy, Policy):
            raise TypeError(f"policy must be an arq.quant.Policy or None, got {type(policy).__name__}")
        policy.validate(model)
    per_layer = layer_macs(model, input_shape)
    costs = []
    layer_tensors: set[int] = set()
    for name, (macs, module) in per_layer.items():
        bits = policy[name] if policy is not None else LayerBits(FLOAT_BITS, FLOAT_BITS)
        # the layer's weight, bias and (once quantized) its scales are in packed_bytes
        layer_tensors.update(id(t) for t in module.parameters())
        layer_tensors.update(id(t) for t in module.buffers())
        costs.append(LayerCost(
            name=name,
            kind="conv" if isinstance(module, nn.Conv2d) else "linear",
            macs=macs,
            w_bits=bits.w_bits,
            a_bits=bits.a_bits,
            weight_count=module.weight.numel(),
            packed_bytes=packed_layer_bytes(module.weight.shape, bits.w_bits, module.bias is not None),
        ))
    other = 0
    seen: set[int] = set()
    for tensor in list(model.parameters()) + list(model.buffers()):
        if id(tensor) in layer_tensors or id(tensor) in seen or not tensor.is_floating_point():
            continue
        seen.add(id(tensor))
        other += 4 * tensor.numel()
    return CostReport(layers=costs, other_bytes=other)
