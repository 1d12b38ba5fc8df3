"""Fake-quant Conv2d and Linear: the reference semantics of a quantized layer.

``y = layer(x_hat; w_hat, bias)`` with ``x_hat`` the ``a_bits`` activation quantizer's
output and ``w_hat = q * scale_n`` the ``w_bits`` per-channel symmetric weight (see
:mod:`arq.quant.quantizers`). The bias stays float32 (it is added to the int32
accumulator times ``scale_x * scale_n`` by integer kernels). They subclass
``nn.Conv2d`` / ``nn.Linear`` so a quantized model keeps its layer names and
:func:`arq.quant.quantizable_layers` lists the same layers.

In training mode the weight scale follows the weights (``scale_n = r_n max|w_n| /
q_max`` with the clip ratio ``r_n`` found at quantization time) and the gradient is
straight-through; in eval mode the stored ``weight_scale`` buffer is used, so a
saved and reloaded model gives bit-identical outputs.
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from arq.quant.policy import FLOAT_BITS, LayerBits
from arq.quant.quantizers import (
    ActivationQuantizer,
    QuantConfig,
    fake_quantize_weight,
    quantize_weight,
    weight_clip_ratio,
    weight_scale,
)


class _QuantLayerMixin:
    """Shared weight-quantization state of QuantConv2d and QuantLinear."""

    w_bits: int
    a_bits: int

    def _adopt(self, source: nn.Module, bits: LayerBits, config: QuantConfig | None):
        """Copies the float layer's weight and bias, sets up quantization and its train/eval mode."""
        with torch.no_grad():
            self.weight.copy_(source.weight)
            if source.bias is not None:
                self.bias.copy_(source.bias)
        self._init_quant(bits, config or QuantConfig())
        self.train(source.training)
        return self

    def _init_quant(self, bits: LayerBits, config: QuantConfig) -> None:
        self.w_bits = bits.w_bits
        self.a_bits = bits.a_bits
        self.input_quantizer = ActivationQuantizer(bits.a_bits, config)
        out_channels = self.weight.shape[0]
        device = self.weight.device
        self.register_buffer("weight_scale", torch.ones(out_channels, dtype=torch.float32, device=device))
        self.register_buffer("weight_clip_ratio", torch.ones(out_channels, dtype=torch.float32, device=device))
        if self.w_bits != FLOAT_BITS:
            method = config.weight_clip_for(self.w_bits)
            self.weight_clip_ratio.copy_(
                weight_clip_ratio(self.weight, self.w_bits, method, config.clip_search_steps)
            )
            self.refresh_weight_scale()

    @property
    def bits(self) -> LayerBits:
        return LayerBits(self.w_bits, self.a_bits)

    @torch.no_grad()
    def refresh_weight_scale(self) -> None:
        """``scale_n = r_n * max|w_n| / q_max`` from the current weights."""
        if self.w_bits != FLOAT_BITS:
            self.weight_scale.copy_(weight_scale(self.weight, self.w_bits, self.weight_clip_ratio))

    def quantized_weight(self) -> torch.Tensor:
        """``w_hat`` (the float weight itself at 32 bits)."""
        if self.w_bits == FLOAT_BITS:
            return self.weight
        if self.training and torch.is_grad_enabled():
            self.refresh_weight_scale()
        return fake_quantize_weight(self.weight, self.w_bits, self.weight_scale)

    def integer_weight(self) -> torch.Tensor:
        """The int8 codes ``q`` of ``w_hat = q * scale_n`` (same shape as the weight)."""
        if self.w_bits == FLOAT_BITS:
            raise ValueError("a 32-bit (float) weight has no integer codes")
        return quantize_weight(self.weight, self.w_bits, self.weight_scale)


class QuantConv2d(_QuantLayerMixin, nn.Conv2d):
    """``conv2d(Q_a(x), Q_w(W)) + b``; see the module docstring."""

    @classmethod
    def from_float(cls, conv: nn.Conv2d, bits: LayerBits, config: QuantConfig | None = None) -> "QuantConv2d":
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
        # skip_init: the float layer's weights replace the initial ones, so drawing them would
        # only consume the caller's random generator
        layer = nn.utils.skip_init(
            cls, conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
            padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
            bias=conv.bias is not None, padding_mode=conv.padding_mode,
            device=conv.weight.device, dtype=conv.weight.dtype,
        )
        return layer._adopt(conv, bits, config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.input_quantizer(x), self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", w_bits={self.w_bits}, a_bits={self.a_bits}"


class QuantLinear(_QuantLayerMixin, nn.Linear):
    """``Q_a(x) @ Q_w(W)^T + b``; see the module docstring."""

    @classmethod
    def from_float(cls, linear: nn.Linear, bits: LayerBits, config: QuantConfig | None = None) -> "QuantLinear":
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        layer = nn.utils.skip_init(
            cls, linear.in_features, linear.out_features, bias=linear.bias is not None,
            device=linear.weight.device, dtype=linear.weight.dtype,
        )
        return layer._adopt(linear, bits, config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.input_quantizer(x), self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", w_bits={self.w_bits}, a_bits={self.a_bits}"


QUANT_LAYER_TYPES = (QuantConv2d, QuantLinear)
