"""Integer inference on CPU (oneDNN u8 x s8 -> s32) for a fake-quant model.

Every QuantConv2d / QuantLinear with ``w_bits <= 8`` and ``a_bits <= 8`` becomes an
integer layer computing, with the input codes ``c = clamp(round(x / s_x), q_lo, q_hi) + z``
(uint8, zero point ``z = 2^(a_bits-1)`` for a signed activation, 0 for an unsigned one)
and the weight codes ``q`` (int8, per-channel scale ``s_w[n]``):

    acc[n] = sum_k (c_k - z) * q[n, k]           exact, int32 (oneDNN)
    y[n]   = s_x * s_w[n] * acc[n] + bias[n]      float32 (oneDNN epilogue)

Values stay on the policy's b-bit grid: a 4-bit activation's codes are 4-bit numbers
held in uint8, so the result is that of the fake-quant reference of the same policy.
Everything between layers (normalization, ReLU, residual adds, pooling) stays float32,
except where a convolution's only use is the next integer layer, through nothing but
ReLU or identities (``conv1 -> ReLU -> conv2`` in a ResNet block): there the
convolution writes the next layer's uint8 codes itself (``fuse_epilogues``),

    codes = clamp(round(hardtanh(y, lo, hi) / s_next) + z_next, 0, 255),
    lo = max(0, q_lo s_next) after a ReLU, else q_lo s_next;  hi = q_hi s_next,

the same codes as ``clamp(round(relu(y) / s_next), q_lo, q_hi) + z_next`` (oneDNN scales
by the reciprocal of ``s_next`` where the reference divides, one more float rounding
inside the tolerance below), so no float32 activation travels between the two layers.
Likewise a convolution followed (through identities) by a residual add, and optionally a
ReLU, adds the residual inside oneDNN's epilogue (its ``sum`` post-op, which writes into
the residual's buffer: only done where nothing reads that buffer afterwards). Both are
``fuse_epilogues``.
Layers with a 32-bit weight or activation keep their fake-quant (float) form. Float
activations that do become codes (the input, float residual streams) go through
``arq::quantize_codes`` in eager models (:func:`_quantize`: one pass, the same codes).

A quantized residual stream (``QuantConfig(residual_bits=8)``, :mod:`arq.quant.residual`) stays
uint8 between blocks (also ``fuse_epilogues``, :func:`_quantize_streams`): a block ending in
``conv2 -> add(earlier stream) -> ReLU`` is one oneDNN call that adds the earlier stream's codes
and writes the new stream's codes; the layers that read a stream turn its codes into their own
with ``arq::requantize_codes`` (the reference's float32 formula on each code); other streams are
quantized after a float add. A convolution whose only use (through ReLU or identities) is a stream
quantizer writes that stream's codes itself (:func:`_convs_write_streams`: with
``QuantConfig.residual_shortcuts``, the stem before the first block and the downsampling shortcuts),
so in a ResNet every add is oneDNN's, on two uint8 tensors, as in torchao's pt2e int8 flow.
Where a reader's input quantizer has the stream's grid (equal bits: both are calibrated on the same
tensor, so W8A8 with an 8-bit stream), requantizing is the identity and the codes pass through
(``stream_passes_through``, decided by evaluating the reference on every stream code).
Measured on the 2-core AVX2 development host (docs/performance-log.md), before the
shortcuts were quantized: eager, 1.33x (ResNet-20) and 1.48x (ResNet-110) the float32 stream;
compiled, level with it (the compiled add then worked on a uint8 copy; it now overwrites the
earlier stream where that is dead, through the oneDNN op that Inductor lowers). On the AVX-512 host,
compiled, the shortcuts on the stream ran 1.10x the float shortcuts (ResNet-20, docs/performance-log.md). It is a
modelling choice first: certify it when the deployed network quantizes its adds.

Tolerance against the fake-quant reference: the integer accumulation is exact, the
reference sums ``(s_x c) (s_w q)`` in float32; one layer given the same input computes
the same codes and agrees to float rounding (about 1e-6 of its output). Through a
network such a difference can move a value across a rounding boundary of a later
activation quantizer (one step there), and the change propagates. Tested bounds
(tests/quant/test_quant_execution.py, ResNet-20, noisy random inputs): where an input's codes
first differ, they differ by one step in at most 32 places; at most 1 % of all activation
codes differ; an input whose codes agree in every layer gets the reference's logits to 1e-5 of
the largest logit; top-1 agrees on >= 99 % of inputs whose top-2 margin exceeds 1e-3 of the
largest logit (measured over 8 seeds and 5 policies: 0.002-0.61 % codes, first differences one
step and at most 23 per input, 0-3.5 % logit error, 100 % top-1). Where a code flips, the logits
have no such bound: one flip in a random W4A4 torchvision ResNet-18 moved one input's logits by
10.5 % of the largest (tests/quant/test_residual_stream.py; the other 62 of its 64 inputs had
identical codes and logits within 3e-7).

The input itself: :func:`enter_at_input_codes` makes a model whose forward begins
``[normalization ->] IntegerConv2d`` read that layer's input codes instead of float images, and
the certification engine then has the noise op write them (``arq::noisy_input_codes``, the same
codes bit for bit), so no float32 noisy batch is written, read back and quantized.

With ``IntegerExecutionConfig(conv_kernel="arq")``, and by default (``"auto"``) for the k x k
convolutions (k > 1) on AVX2 CPUs without VNNI or AVX-512 and for those of 16 or 32 output channels
on AVX-512 VNNI ones (:func:`lowbit_conv_preferred`), the
convolutions whose bit widths allow it run ``arq::lowbit_conv2d`` (csrc/cpu/lowbit_conv.cpp):
the same ``acc`` (exact; int16 sums of ``vpmaddubsw`` pairs where
``2 code_max 2^(w_bits-1) <= 32767`` keeps them exact, widened per chunk), the same epilogues
in float32 (scale by ``s_x s_w``, bias, residual, ReLU, codes by the reciprocal of ``s_next``),
written to new tensors rather than in place.

Hardware note: without VNNI (AVX2, AVX-512 without VNNI) oneDNN multiplies u8 x s8 pairs
with ``vpmaddubsw``, which saturates the int16 sum of two products above 32767. That can
only happen when both the activation codes reach 255 (8-bit activations) and the
weights reach +-127 (8-bit weights); such layers then split the codes
``c = min(c, 127) + (c - min(c, 127))`` and add two exact convolutions (``split_8bit``).
"""
from __future__ import annotations

import copy
import functools
import operator
import os
from dataclasses import dataclass, field
from typing import Callable, Literal

import torch
import torch.fx
from torch import nn

from arq.quant.modules import QUANT_LAYER_TYPES, QuantConv2d, QuantLinear
from arq.quant.policy import FLOAT_BITS, quantizable_layers
from arq.quant.quantizers import ActivationQuantizer
from arq.quant.residual import RESIDUAL_QUANTIZER, SHORTCUT_QUANTIZER


#: IntegerExecutionConfig.conv_kernel's choices
CONV_KERNELS = ("auto", "onednn", "arq")


@functools.lru_cache(maxsize=None)
def _cpu_flags() -> frozenset[str]:
    """The CPU feature flags of /proc/cpuinfo (empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_isa_forced_to_avx2() -> bool:
    """``ARQ_CPU_ISA=avx2``: arq's CPU defaults that depend on the host (the convolution kernel,
    the engine's chunks) choose as on an AVX2 CPU, whatever this one has."""
    return os.environ.get("ARQ_CPU_ISA", "").strip().lower() == "avx2"


def writes_codes_throughout(model: nn.Module) -> bool:
    """True for an integer model whose every convolution writes uint8 codes (the next layer's or a
    residual stream's) rather than float32: its activations are bytes from layer to layer (W4A4
    with the 8-bit stream on AVX2, say; not a split 8x8-bit layer, nor a float stream's block)."""
    convs = [m for m in model.modules() if isinstance(m, IntegerConv2d)]
    return bool(convs) and all(m.output_codes is not None or m.stream_output is not None for m in convs)


#: oneDNN's ISA levels (``ONEDNN_MAX_CPU_ISA``) below the first with VNNI: capped there, oneDNN's
#: u8 x s8 kernels add byte-pair products in saturating int16 (``vpmaddubsw``) whatever the CPU has
_ONEDNN_ISAS_WITHOUT_VNNI = frozenset({"SSE41", "AVX", "AVX2", "AVX512_CORE", "AVX512_MIC", "AVX512_MIC_4OPS"})


def cpu_has_vnni() -> bool:
    """True when oneDNN's int8 kernels multiply without u8 x s8 saturation: /proc/cpuinfo lists
    AVX-512 VNNI, AVX-VNNI or AMX-INT8, and ``ONEDNN_MAX_CPU_ISA`` (or the older
    ``DNNL_MAX_CPU_ISA``) does not cap oneDNN below them (e.g. ``AVX2``, which makes a VNNI CPU
    saturate as an AVX2 one does: the 8x8-bit layers must then be split)."""
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").strip().upper()
    if cap in _ONEDNN_ISAS_WITHOUT_VNNI:
        return False
    return bool(_cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"})


#: on AVX-512 VNNI CPUs ``conv_kernel="auto"`` takes arq::lowbit_conv2d for k x k layers up to this
#: many output channels (lowbit_conv_preferred)
VNNI_LOWBIT_MAX_CHANNELS = 32


def lowbit_conv_preferred(out_channels: int | None = None) -> bool:
    """Whether ``conv_kernel="auto"`` runs eligible k x k (k > 1) convolutions (of ``out_channels``
    outputs; None: any) through ``arq::lowbit_conv2d``: on CPUs whose best integer path is AVX2 (no
    VNNI, no AVX-512), every one; there oneDNN spends two multiplies per 32 MACs and the op's int16
    sums one. Measured there (docs/performance-log.md), against oneDNN: 3x3 ResNet layers
    0.85-1.08x (median), 1x1 ones 0.64-0.71x (so those stay on oneDNN); end to end 0.98-1.03x on
    ResNet-20 and 0.98-1.11x on ResNet-110 (1.08-1.11x with an 8-bit residual stream).

    With AVX-512 VNNI both multiply with ``vpdpbusd``; there "auto" takes the op for the k x k layers
    of 16 or 32 output channels (multiples of 16 up to ``VNNI_LOWBIT_MAX_CHANNELS``) and leaves the
    others to oneDNN. Since its accumulators stay in registers (2026-11-29) the op's VNNI path
    measured, against oneDNN, W8A8, 400 samples: 1.14-1.25x on 16-channel 3x3 layers, 1.00-1.10x on
    32-channel and stride-2 16 -> 32 ones, 0.92-0.96x on 64-channel ones; end to end, ResNet-110 W8A8
    with the 8-bit stream, compiled, this routing against oneDNN everywhere 1.10x (paired, quartiles
    1.10-1.14), 1.11x pt2e (docs/performance-log.md).

    ``ARQ_CPU_ISA=avx2`` chooses as on an AVX2 CPU whatever this one has, so that the AVX2 host's
    whole path can be measured on a newer CPU (with ``ONEDNN_MAX_CPU_ISA=AVX2`` and
    ``ATEN_CPU_CAPABILITY=avx2`` for oneDNN's and torch's kernels)."""
    from arq.ops import _has_kernel, cpu_isa  # here: arq.ops imports arq.quant

    if not _has_kernel("lowbit_conv2d", "CPU"):
        return False
    isa = cpu_isa()
    if isa == "avx2":
        return cpu_isa_forced_to_avx2() or (not cpu_has_vnni() and not _cpu_flags() & {"avx512f", "avx512bw"})
    # whole 16-channel vectors only: a partial one finishes channel by channel (a 6-channel LeNet
    # layer made MNIST certification 1.55x slower)
    return (isa == "vnni" and out_channels is not None and out_channels % 16 == 0
            and out_channels <= VNNI_LOWBIT_MAX_CHANNELS)


def default_conv_kernel() -> str:
    """``IntegerExecutionConfig.conv_kernel``'s default: ``ARQ_CONV_KERNEL`` when set, else "auto"."""
    return os.environ.get("ARQ_CONV_KERNEL", "").strip() or "auto"


@dataclass
class IntegerExecutionConfig:
    """How :func:`to_integer` builds the integer model.

    Args:
        split_8bit: "auto" splits 8-bit activation codes of 8-bit-weight layers when the
            CPU has no VNNI (see the module docstring), "always" / "never" force it.
        compile: wrap the result in ``torch.compile`` (:class:`CompiledIntegerModel`; Inductor
            fuses the quantization of each activation with the float ops before it). The first call of
            each batch shape compiles (10-20 s for a ResNet on 2 cores; see ``arq.smoothing.engine``).
        fuse_epilogues: let a convolution whose only use is the next integer layer
            (through ReLU or identities) write that layer's uint8 codes, and one followed by
            a residual add (and ReLU) do the add in its epilogue (module docstring). Needs
            the model, or the submodules holding such patterns, to be traceable by
            ``torch.fx``; what is not traceable runs unfused.
        fuse_residuals: the residual part of ``fuse_epilogues``; None (default) does it only
            when not compiling: oneDNN's sum post-op writes into its input, which
            torch.compile's functionalization answers with copies, while Inductor already
            fuses the add and ReLU into the next quantization. Pass True or False to force.
        conv_kernel: which kernel runs the convolutions. "onednn": oneDNN's u8 x s8 kernels.
            "arq": ``arq::lowbit_conv2d`` (csrc/cpu/lowbit_conv.cpp) wherever it applies (a
            square kernel, groups 1, no dilation, and bit widths whose ``vpmaddubsw`` pair sums
            stay exact in int16 so that it can add them in int16:
            ``2 code_max 2^(w_bits-1) <= 32767``, e.g. 4-bit activations with any weights up to
            8 bits, 8-bit ones with up to 7-bit weights; with AVX-512 VNNI any widths up to 8 x 8);
            oneDNN runs the other layers. "auto" (default): "arq" for the eligible k x k
            convolutions with k > 1 where :func:`lowbit_conv_preferred` (every one on AVX2 CPUs
            without VNNI or AVX-512, those of 16 or 32 output channels on AVX-512 VNNI ones),
            else oneDNN. Both
            kernels give the same codes up to the module's tolerance. The environment variable
            ``ARQ_CONV_KERNEL`` sets the default (what ``arq.certify`` uses).
    """

    split_8bit: Literal["auto", "always", "never"] = "auto"
    compile: bool = False
    fuse_epilogues: bool = True
    fuse_residuals: bool | None = None
    conv_kernel: Literal["auto", "onednn", "arq"] = field(
        default_factory=default_conv_kernel)

    def __post_init__(self) -> None:
        if self.split_8bit not in ("auto", "always", "never"):
            raise ValueError(f"split_8bit must be 'auto', 'always' or 'never', got {self.split_8bit!r}")
        if self.conv_kernel not in CONV_KERNELS:
            raise ValueError(f"conv_kernel (or ARQ_CONV_KERNEL) must be one of {CONV_KERNELS}, got "
                             f"{self.conv_kernel!r}")
        for name in ("compile", "fuse_epilogues"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {type(getattr(self, name)).__name__}")
        if self.fuse_residuals is not None and not isinstance(self.fuse_residuals, bool):
            raise TypeError(f"fuse_residuals must be a bool or None, got {type(self.fuse_residuals).__name__}")

    @property
    def residuals_fused(self) -> bool:
        """Whether residual adds move into conv epilogues (default: only in eager models)."""
        if not self.fuse_epilogues:
            return False
        return (not self.compile) if self.fuse_residuals is None else self.fuse_residuals


def _quantize(x: torch.Tensor, scale_tensor: torch.Tensor, scale: float, zero_point: int, code_min: int,
              code_max: int) -> torch.Tensor:
    """An activation quantizer's uint8 codes ``clamp(round(x / s) + z, lo, hi)`` of float ``x``: one pass
    through ``arq::quantize_codes`` in eager float32 CPU models (eager torch makes five passes and four
    temporaries), the same torch ops as the reference otherwise (torch.compile fuses them with what
    comes before). Both give the reference's codes bit for bit (tests/kernels/test_cpp_ops.py)."""
    if (x.dtype == torch.float32 and x.device.type == "cpu" and not torch.compiler.is_compiling()
            and _has_quantize_kernel()):
        return torch.ops.arq.quantize_codes(x, scale, zero_point, code_min, code_max)
    from arq.ops import quantize_codes_reference  # here: arq.ops imports arq.quant

    return quantize_codes_reference(x, scale_tensor, zero_point, code_min, code_max)


@functools.lru_cache(maxsize=None)
def _has_quantize_kernel() -> bool:
    from arq.ops import _has_kernel

    return _has_kernel("quantize_codes", "CPU")


class _IntegerLayer(nn.Module):
    """Input quantization to uint8 codes shared by the integer conv and linear."""

    def _init_input(self, layer: QuantConv2d | QuantLinear, split_8bit: str) -> None:
        quantizer = layer.input_quantizer
        q_lo, q_hi = quantizer.levels
        signed = bool(quantizer.signed)
        self.w_bits, self.a_bits = layer.w_bits, layer.a_bits
        self.zero_point = (1 << (layer.a_bits - 1)) if signed else 0
        self.code_min, self.code_max = q_lo + self.zero_point, q_hi + self.zero_point
        self.x_scale = float(quantizer.scale)
        # the same 0-dim float32 tensor the fake-quant reference divides by, so codes agree
        self.register_buffer("x_scale_tensor", quantizer.scale.detach().clone().float())
        needs_split = self.code_max > 127 and layer.w_bits == 8
        self.split = {"auto": needs_split and not cpu_has_vnni(), "always": self.code_max > 127, "never": False}[split_8bit]
        weight_codes = layer.integer_weight().cpu()
        self.register_buffer("w_scale", layer.weight_scale.detach().float().cpu().clone())
        self.register_buffer("w_zero_point", torch.zeros(weight_codes.shape[0], dtype=torch.long))
        bias = layer.bias.detach().float().cpu().clone() if layer.bias is not None else None
        self.register_buffer("bias", bias)
        return weight_codes

    # set by _fuse_integer_epilogues: the input arrives as this layer's uint8 codes
    takes_codes = False

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """``clamp(round(x / s_x), q_lo, q_hi) + z`` as uint8."""
        return _quantize(x, self.x_scale_tensor, self.x_scale, self.zero_point, self.code_min, self.code_max)

    # set by read_stream: the input arrives as residual-stream codes with this zero point
    stream_zero_point: int | None = None
    # set by read_stream: the stream's codes are already this layer's codes
    stream_passes_through = False

    def read_stream(self, stream: "StreamCodes") -> None:
        """Take ``stream``'s uint8 codes as input (:func:`_quantize_streams`): they become this
        layer's codes through ``arq::requantize_codes``, or its torch reference without arq._C.
        Where that map is the identity on every code the stream can hold (the layer's input
        quantizer has the stream's grid: at equal bits both are calibrated on the same tensor, so
        W8A8 with an 8-bit stream), the codes pass through unchanged, as in pt2e's int8 graph.
        Decided by evaluating the reference on those codes, so it is exact, not a tolerance."""
        from arq.ops import _has_kernel, requantize_codes_reference

        self.stream_zero_point, self.stream_scale = stream.zero_point, stream.scale
        stream_codes = torch.arange(stream.code_min, stream.code_max + 1, dtype=torch.uint8)
        self.stream_passes_through = torch.equal(requantize_codes_reference(
            stream_codes, stream.scale, stream.zero_point, self.x_scale, self.zero_point, self.code_min,
            self.code_max), stream_codes)
        # chosen once here: the dispatcher's checks would run on every call (and in torch.compile's trace)
        self.requantize = (torch.ops.arq.requantize_codes if _has_kernel("requantize_codes", "CPU")
                           else requantize_codes_reference)

    def _stream_repr(self) -> str:
        if self.stream_zero_point is None:
            return ""
        return ", takes residual-stream codes" + (" as they are" if self.stream_passes_through else ", requantized")

    def input_codes(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's input codes, whether ``x`` is a float activation, already its codes, or
        residual-stream codes (their float values, then this layer's codes, as the reference)."""
        if self.takes_codes or self.stream_passes_through:
            return x
        if self.stream_zero_point is not None:
            return self.requantize(x, self.stream_scale, self.stream_zero_point, self.x_scale, self.zero_point,
                                   self.code_min, self.code_max)
        return self.codes(x)


class IntegerConv2d(_IntegerLayer):
    """u8 x s8 convolution by oneDNN or ``arq::lowbit_conv2d`` (``conv_kernel``), float32 output or
    fused epilogues; see the module docstring."""

    def __init__(self, layer: QuantConv2d, split_8bit: str = "auto", conv_kernel: str = "auto"):
        super().__init__()
        if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
            raise ValueError(f"IntegerConv2d needs zero padding given as ints, got {layer.padding_mode}/{layer.padding}")
        weight_codes = self._init_input(layer, split_8bit)
        self.in_channels = layer.in_channels
        self.stride, self.padding = list(layer.stride), list(layer.padding)
        self.dilation, self.groups = list(layer.dilation), layer.groups
        self.kernel_size = weight_codes.shape[2]
        self.lowbit = self._lowbit_applies(weight_codes, conv_kernel)
        if self.lowbit:
            from arq.ops import lowbit_conv_weight_tiles  # here: arq.ops imports arq.quant

            tiles, sums = lowbit_conv_weight_tiles(weight_codes)
            self.register_buffer("lowbit_tiles", tiles, persistent=False)
            self.register_buffer("lowbit_sums", sums, persistent=False)
            # s_x s_w[n] as the float32 product, the scale of the op's epilogue
            self.register_buffer("lowbit_scale", (self.x_scale_tensor * self.w_scale).float(), persistent=False)
        # oneDNN's packed weights are opaque tensors: non-persistent buffers (not in the state
        # dict, no deepcopy), buffers so that torch.compile's freezing makes them graph constants;
        # none where arq::lowbit_conv2d runs the layer (never split)
        self.register_buffer("packed_weight", None if self.lowbit else torch.ops.onednn.qconv_prepack(
            weight_codes, self.w_scale, self.x_scale, self.zero_point,
            self.stride, self.padding, self.dilation, self.groups, None,
        ), persistent=False)
        self.register_buffer("packed_weight_zero_zp", torch.ops.onednn.qconv_prepack(
            weight_codes, self.w_scale, self.x_scale, 0, self.stride, self.padding, self.dilation, self.groups, None
        ) if self.split else None, persistent=False)

    def _lowbit_applies(self, weight_codes: torch.Tensor, conv_kernel: str) -> bool:
        """Whether ``arq::lowbit_conv2d`` runs this layer (``IntegerExecutionConfig.conv_kernel``)."""
        from arq.ops import _has_kernel, lowbit_conv_supported

        if conv_kernel not in CONV_KERNELS:
            raise ValueError(f"conv_kernel must be one of {CONV_KERNELS}, got {conv_kernel!r}")
        kernel_h, kernel_w = weight_codes.shape[2:]
        wanted = conv_kernel == "arq" or (conv_kernel == "auto" and kernel_h > 1
                                          and lowbit_conv_preferred(int(weight_codes.shape[0])))
        return (wanted and kernel_h == kernel_w and self.groups == 1 and self.dilation == [1, 1]
                and self.stride[0] == self.stride[1] and self.padding[0] == self.padding[1]
                and not self.split
                and lowbit_conv_supported(self.code_max, self.w_bits) and _has_kernel("lowbit_conv2d", "CPU"))

    def _lowbit(self, codes, relu=False, residual=None, residual_scale=0.0, residual_zero_point=0, out_scale=0.0,
                out_zero_point=0, out_min=0, out_max=255):
        return torch.ops.arq.lowbit_conv2d(
            codes, self.lowbit_tiles, self.lowbit_sums, self.lowbit_scale, self.bias, self.lowbit_sums.shape[0],
            self.kernel_size, self.stride[0], self.padding[0], self.zero_point, self.code_max, self.w_bits,
            relu, residual, residual_scale, residual_zero_point, out_scale, out_zero_point, out_min, out_max)

    def _conv(self, codes, zero_point, packed, bias):
        return torch.ops.onednn.qconv2d_pointwise(
            codes, self.x_scale, zero_point, packed, self.w_scale, self.w_zero_point, bias,
            self.stride, self.padding, self.dilation, self.groups, 1.0, 0, torch.float32, "none", [], "",
        )

    # set by _fuse_integer_epilogues: (s_next, z_next, lo, hi), the next layer's input codes
    output_codes: tuple[float, int, float, float] | None = None

    # set by _convs_write_streams: output_codes are a residual stream's (the stem, a shortcut)
    writes_stream = False

    # set by _fuse_integer_epilogues: a residual comes in as ``accumulate``; then ReLU or not
    residual_relu: bool | None = None

    # set by _quantize_streams: (residual stream written, residual stream added, in place, nothing
    # reads the added stream after this conv); the add's operand comes in as ``stream_accumulate``
    # (uint8 codes; overwritten when in place, or when dead in a compiled model)
    stream_output: "tuple[StreamCodes, StreamCodes, bool, bool] | None" = None

    def forward(self, x: torch.Tensor, accumulate: torch.Tensor | None = None,
                stream_accumulate: torch.Tensor | None = None) -> torch.Tensor:
        codes = self.input_codes(x).contiguous(memory_format=torch.channels_last)
        if self.lowbit:
            return self._lowbit_forward(codes, accumulate, stream_accumulate)
        if stream_accumulate is not None:
            written, added, in_place, dead = self.stream_output
            if in_place:
                add_stream = _conv_add_stream_in_place
            elif _STREAM_ADD_COMPILES_IN_PLACE and torch.compiler.is_compiling():
                # Inductor lowers oneDNN's in-place op itself (as in pt2e's graphs): into the dead
                # buffer, else into a copy, since functionalization keeps eager semantics and the
                # later readers of a live stream would see what the add wrote
                if not dead:
                    stream_accumulate = stream_accumulate.clone(memory_format=torch.channels_last)
                add_stream = _conv_add_stream_in_place
            else:
                add_stream = _onednn_conv_add_stream
            return add_stream(codes, self.x_scale, self.zero_point, self.packed_weight, self.w_scale,
                              self.w_zero_point, stream_accumulate, self.bias, self.stride, self.padding,
                              self.dilation, self.groups, written.scale, written.zero_point, added.scale,
                              added.zero_point)
        if self.output_codes is not None:
            scale, zero_point, low, high = self.output_codes
            return torch.ops.onednn.qconv2d_pointwise(
                codes, self.x_scale, self.zero_point, self.packed_weight, self.w_scale, self.w_zero_point, self.bias,
                self.stride, self.padding, self.dilation, self.groups, scale, zero_point, torch.uint8,
                "hardtanh", [low, high], "",
            )
        if accumulate is None:
            return self._float_output(codes)
        if (not self.split and accumulate.dtype == torch.float32
                and accumulate.is_contiguous(memory_format=torch.channels_last)):
            # the sum post-op overwrites ``accumulate``; the graph pass only passes dead buffers
            return torch.ops.onednn.qconv2d_pointwise.binary(
                codes, self.x_scale, self.zero_point, self.packed_weight, self.w_scale, self.w_zero_point,
                accumulate, self.bias, self.stride, self.padding, self.dilation, self.groups,
                1.0, 0, torch.float32, 1.0, 0, "sum", 1.0, "relu" if self.residual_relu else "none", [], "",
            )
        out = self._float_output(codes) + accumulate
        return out.relu() if self.residual_relu else out

    def _lowbit_forward(self, codes, accumulate, stream_accumulate):
        """:meth:`forward` through ``arq::lowbit_conv2d``: the same four epilogues, none in place."""
        if stream_accumulate is not None:
            written, added, _, _ = self.stream_output
            return self._lowbit(codes, relu=True, residual=stream_accumulate, residual_scale=added.scale,
                                residual_zero_point=added.zero_point, out_scale=written.scale,
                                out_zero_point=written.zero_point, out_min=written.code_min, out_max=written.code_max)
        if self.output_codes is not None:
            (scale, zero_point, _, _), (low_code, high_code) = self.output_codes, self.output_code_bounds
            return self._lowbit(codes, out_scale=scale, out_zero_point=zero_point, out_min=low_code, out_max=high_code)
        if accumulate is None:
            return self._lowbit(codes)
        return self._lowbit(codes, relu=bool(self.residual_relu), residual=accumulate.float())

    # set by _fuse_integer_epilogues with output_codes: the next layer's (lowest, highest) code,
    # the lowest z_next or above after a ReLU (arq::lowbit_conv2d clamps codes, oneDNN values)
    output_code_bounds: tuple[int, int] | None = None

    def _float_output(self, codes: torch.Tensor) -> torch.Tensor:
        if not self.split:
            return self._conv(codes, self.zero_point, self.packed_weight, self.bias)
        low = torch.clamp_max(codes, 127)
        high = codes - low  # <= 128: 128 * 127 * 2 < 2^15, no saturation
        return self._conv(low, self.zero_point, self.packed_weight, self.bias) + self._conv(
            high, 0, self.packed_weight_zero_zp, None
        )

    def extra_repr(self) -> str:
        chained = "" if self.output_codes is None else (
            ", writes residual-stream codes" if self.writes_stream else ", writes the next layer's codes")
        residual = {None: "", False: ", adds the residual", True: ", adds the residual, then ReLU"}[self.residual_relu]
        stream = ", adds the residual stream, writes its codes" if self.stream_output is not None else ""
        return (f"w_bits={self.w_bits}, a_bits={self.a_bits}, zero_point={self.zero_point}, split={self.split}, "
                f"kernel={'arq' if self.lowbit else 'onednn'}{', takes codes' if self.takes_codes else ''}"
                f"{self._stream_repr()}{chained}{residual}{stream}")


def _conv_add_stream_in_place(codes, x_scale, zero_point, packed_weight, w_scale, w_zero_point, accumulate, bias,
                              stride, padding, dilation, groups, out_scale, out_zero_point, accumulate_scale,
                              accumulate_zero_point):
    """``relu(conv(codes) + s_a (a - z_a))`` as uint8 codes ``(s_r, z_r)``, written into ``accumulate``'s
    buffer (oneDNN's sum post-op) when it is channels_last, else into a channels_last copy."""
    return torch.ops.onednn.qconv2d_pointwise.binary(
        codes, x_scale, zero_point, packed_weight, w_scale, w_zero_point,
        accumulate.contiguous(memory_format=torch.channels_last), bias, stride, padding, dilation, groups,
        out_scale, out_zero_point, torch.uint8, accumulate_scale, accumulate_zero_point, "sum", 1.0, "relu", [], "",
    )


@torch.library.custom_op("arq::onednn_conv_add_stream", mutates_args=())
def _onednn_conv_add_stream(codes: torch.Tensor, x_scale: float, zero_point: int, packed_weight: torch.Tensor,
                            w_scale: torch.Tensor, w_zero_point: torch.Tensor, accumulate: torch.Tensor,
                            bias: torch.Tensor | None, stride: list[int], padding: list[int], dilation: list[int],
                            groups: int, out_scale: float, out_zero_point: int, accumulate_scale: float,
                            accumulate_zero_point: int) -> torch.Tensor:
    """:func:`_conv_add_stream_in_place` on a copy of ``accumulate``, as one opaque op that writes
    nothing it was given: eager models where the earlier stream is read later, and compiled models
    on a torch where :func:`_let_functionalized_ops_take_opaque_tensors` fails (functionalizing
    the in-place oneDNN op then fails under Inductor's freezing), at the cost of one uint8 copy."""
    return _conv_add_stream_in_place(
        codes, x_scale, zero_point, packed_weight, w_scale, w_zero_point,
        accumulate.clone(memory_format=torch.channels_last), bias, stride, padding, dilation, groups,
        out_scale, out_zero_point, accumulate_scale, accumulate_zero_point)


@_onednn_conv_add_stream.register_fake
def _(codes, x_scale, zero_point, packed_weight, w_scale, w_zero_point, accumulate, bias, stride, padding,
      dilation, groups, out_scale, out_zero_point, accumulate_scale, accumulate_zero_point):
    return torch.empty_like(accumulate, memory_format=torch.channels_last)


def _let_functionalized_ops_take_opaque_tensors() -> bool:
    """torch registers autograd fall-throughs of ``auto_functionalized_v2`` (how torch.compile
    runs an op that overwrites an input) for the CPU and CUDA keys only; oneDNN's prepacked
    weights are opaque tensors, dispatched at AutogradOther, where freezing's fake propagation
    then finds no kernel. The same fall-through for that key: inference needs nothing else.
    Returns whether compiled models may call oneDNN's in-place sum op (:func:`_conv_add_stream_in_place`)."""
    try:
        from torch._C import DispatchKey
        from torch._higher_order_ops.auto_functionalize import auto_functionalized_v2

        if auto_functionalized_v2.non_fallthrough_keys.has(DispatchKey.AutogradOther):
            auto_functionalized_v2.fallthrough(DispatchKey.AutogradOther)
    except (ImportError, AttributeError):  # another torch: compiled models keep the copying op
        return False
    return True


#: compiled models add the residual stream through oneDNN's in-place op (IntegerConv2d.forward)
_STREAM_ADD_COMPILES_IN_PLACE = _let_functionalized_ops_take_opaque_tensors()


@torch.library.custom_op("arq::onednn_linear", mutates_args=())
def _onednn_linear(codes: torch.Tensor, x_scale: float, zero_point: int, packed_weight: torch.Tensor,
                   w_scale: torch.Tensor, w_zero_point: torch.Tensor, bias: torch.Tensor | None,
                   out_features: int) -> torch.Tensor:
    """oneDNN's u8 x s8 linear with float32 output, as one opaque op: Inductor lowers
    ``onednn.qlinear_pointwise`` only for weights it prepacked itself, and a graph break
    instead made torch.compile trace every IntegerLinear separately (one frame per layer and
    batch size, past its recompile limit on a LeNet)."""
    return torch.ops.onednn.qlinear_pointwise(
        codes, x_scale, zero_point, packed_weight, w_scale, w_zero_point, bias, 1.0, 0, torch.float32, "none", [], "",
    )


@_onednn_linear.register_fake
def _(codes, x_scale, zero_point, packed_weight, w_scale, w_zero_point, bias, out_features):
    return codes.new_empty((codes.shape[0], out_features), dtype=torch.float32)


class IntegerLinear(_IntegerLayer):
    """oneDNN int8 linear with float32 output; see the module docstring."""

    def __init__(self, layer: QuantLinear, split_8bit: str = "auto"):
        super().__init__()
        weight_codes = self._init_input(layer, split_8bit)
        self.out_features = weight_codes.shape[0]
        self.register_buffer("packed_weight", torch.ops.onednn.qlinear_prepack(weight_codes, None), persistent=False)

    def _linear(self, codes, zero_point, bias):
        return _onednn_linear(codes, self.x_scale, zero_point, self.packed_weight, self.w_scale, self.w_zero_point,
                              bias, self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        leading = x.shape[:-1]
        codes = self.input_codes(x.reshape(-1, x.shape[-1])).contiguous()
        if not self.split:
            out = self._linear(codes, self.zero_point, self.bias)
        else:
            low = torch.clamp_max(codes, 127)
            out = self._linear(low, self.zero_point, self.bias) + self._linear(codes - low, 0, None)
        return out.reshape(*leading, self.out_features)

    def extra_repr(self) -> str:
        return (f"w_bits={self.w_bits}, a_bits={self.a_bits}, zero_point={self.zero_point}, split={self.split}"
                f"{', takes codes' if self.takes_codes else ''}"
                f"{self._stream_repr()}")


def _is_relu(node, modules: dict) -> bool:
    if node.op == "call_module":
        return isinstance(modules.get(node.target), nn.ReLU)
    if node.op == "call_function":
        return node.target in (torch.relu, torch.relu_, torch.nn.functional.relu)
    return node.op == "call_method" and node.target in ("relu", "relu_")


def _is_identity(node, modules: dict) -> bool:
    return node.op == "call_module" and isinstance(modules.get(node.target), nn.Identity)


def _is_add(node) -> bool:
    if node.kwargs or len(node.args) != 2:
        return False
    if node.op == "call_function":
        return node.target in (operator.add, operator.iadd, torch.add)
    return node.op == "call_method" and node.target == "add"


_INPLACE_FUNCTIONS = {"iadd", "isub", "imul", "itruediv", "ifloordiv", "imod", "ipow", "iand", "ior", "ixor",
                      "ilshift", "irshift", "imatmul", "setitem"}


def _may_mutate(node, modules: dict) -> bool:
    """Whether ``node`` may write into one of its inputs (an in-place op or an in-place module)."""
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.endswith("__")
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        return (name in _INPLACE_FUNCTIONS or (name.endswith("_") and not name.endswith("__"))
                or bool(node.kwargs.get("inplace", False)))
    if node.op == "call_module":
        return bool(getattr(modules.get(node.target), "inplace", False))
    return False


class _IntegerTracer(torch.fx.Tracer):
    """Keeps arq's layers whole (their forward holds opaque oneDNN calls)."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, (IntegerConv2d, IntegerLinear, *QUANT_LAYER_TYPES, ActivationQuantizer,
                                   StreamCodes, StreamValues)) or super().is_leaf_module(module, qualified_name)


def _unfused_conv(node, modules: dict, call_sites: dict) -> IntegerConv2d | None:
    """The IntegerConv2d ``node`` calls, when a fusion may rewrite it: called from this one
    place, not split into two convolutions, and not fused yet."""
    conv = modules.get(node.target) if node.op == "call_module" else None
    if (not isinstance(conv, IntegerConv2d) or conv.split or call_sites[node.target] != 1
            or conv.output_codes is not None or conv.residual_relu is not None or conv.stream_output is not None):
        return None
    return conv


def _call_sites(graph) -> dict[str, int]:
    """How many nodes of ``graph`` call each submodule."""
    sites: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            sites[node.target] = sites.get(node.target, 0) + 1
    return sites


def _chain_through_activations(graph, modules: dict, producer_of, consumer_of, link) -> int:
    """Rewire ``producer -> [ReLU / identity]* -> consumer`` chains to pass codes; the number chained.

    For each node whose layer ``producer_of(node)`` returns, follow single users through ReLUs
    and identities; where the next user calls a layer ``consumer_of(user)`` returns, with that
    one input and not yet reading codes, ``link(producer, consumer, relu)`` records the codes the
    producer will write (``relu``: a ReLU was passed), the consumer is marked ``takes_codes`` and
    reads the producer directly, and the nodes passed are erased.
    """
    chained = 0
    for node in list(graph.nodes):
        producer = producer_of(node)
        if producer is None:
            continue
        passed, relu, current = _follow_activations(node, modules)
        if len(current.users) != 1:
            continue
        user = next(iter(current.users))
        consumer = consumer_of(user)
        # the one operand the codes replace (a fused stream add's earlier stream is another)
        if (consumer is not None and not consumer.takes_codes and len(user.args) == 1
                and set(user.kwargs) <= {"stream_accumulate"}):
            link(producer, consumer, relu)
            consumer.takes_codes = True
            user.replace_input_with(current, node)
            for dead in reversed(passed):
                graph.erase_node(dead)
            chained += 1
    return chained


def _follow_activations(node, modules: dict):
    """From ``node``, follow single users through ReLUs and identities: ``(passed, relu, last)``,
    the nodes passed in order, whether one was a ReLU, and the last node reached (``node`` itself
    when none was passed)."""
    passed, relu, current = [], False, node
    while len(current.users) == 1:
        user = next(iter(current.users))
        user_is_relu = _is_relu(user, modules)
        if not (user_is_relu or _is_identity(user, modules)):
            break
        relu = relu or user_is_relu
        passed.append(user)
        current = user
    return passed, relu, current


def _rewrite_by_parts(module: nn.Module, tracer_type: type, rewrite, leaf_types: tuple) -> tuple[nn.Module, dict]:
    """``rewrite(module, graph) -> (module, counts)`` on ``module`` traced by ``tracer_type()``;
    where it cannot be traced as a whole (data-dependent Python, such as an input check), on its
    children one by one (``leaf_types`` skipped), replacing those rewritten and summing counts."""
    try:
        graph = tracer_type().trace(module)
    except Exception:  # not traceable as a whole: the parts
        counts: dict = {}
        for name, child in list(module.named_children()):
            if isinstance(child, leaf_types):
                continue
            new_child, child_counts = _rewrite_by_parts(child, tracer_type, rewrite, leaf_types)
            if new_child is not child:
                setattr(module, name, new_child)
            for key, value in child_counts.items():
                counts[key] = counts.get(key, 0) + value
        return module, counts
    return rewrite(module, graph)


def _rewritten(module: nn.Module, graph) -> torch.fx.GraphModule:
    """``graph`` as a module in place of ``module``, keeping arq's model attributes."""
    rewritten = torch.fx.GraphModule(module, graph, class_name=type(module).__name__)
    for attribute in ("arq_metadata", "arq_quant"):
        if hasattr(module, attribute):
            setattr(rewritten, attribute, getattr(module, attribute))
    return rewritten


def _fuse_integer_epilogues(module: nn.Module, residuals: bool = True) -> nn.Module:
    """``module`` with conv -> [ReLU/identity]* -> integer layer pairs chained and, with
    ``residuals``, residual adds moved into convolutions (module docstring).

    Traces ``module`` with torch.fx; where that fails, its children one by one. Returns the
    rewritten module (``module`` itself when nothing was fused).
    """
    rewritten, _ = _rewrite_by_parts(module, _IntegerTracer, functools.partial(_fuse_traced, residuals=residuals),
                                     (IntegerConv2d, IntegerLinear))
    return rewritten


class StreamCodes(nn.Module):
    """A residual-stream quantizer of the integer model: float in, its uint8 codes out,
    ``c = clamp(round(y / s_r) + z, q_lo + z, q_hi + z)``; :meth:`values` gives back the
    reference's ``(c - z) s_r`` exactly (the same float32 product as ``clamp(...) * s_r``)."""

    def __init__(self, quantizer: ActivationQuantizer):
        super().__init__()
        q_lo, q_hi = quantizer.levels
        self.bits, self.signed = quantizer.bits, bool(quantizer.signed)
        self.zero_point = (1 << (quantizer.bits - 1)) if self.signed else 0
        self.code_min, self.code_max = q_lo + self.zero_point, q_hi + self.zero_point
        self.scale = float(quantizer.scale)
        self.register_buffer("scale_tensor", quantizer.scale.detach().clone().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _quantize(x, self.scale_tensor, self.scale, self.zero_point, self.code_min, self.code_max)

    def values(self, codes: torch.Tensor) -> torch.Tensor:
        return (codes.to(torch.float32) - self.zero_point) * self.scale_tensor

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed={self.signed}, scale={self.scale:.6g}"


class StreamValues(nn.Module):
    """The float values of residual-stream codes, for a consumer that is not an integer layer."""

    def __init__(self, stream: StreamCodes):
        super().__init__()
        self.stream = stream

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return self.stream.values(codes)


def _quantize_streams(root: nn.Module, graph, modules: dict, call_sites: dict, in_place: bool) -> int:
    """Residual-stream quantizers (``arq.quant.residual``) become uint8 tensors; the number done.

    Each enabled ``residual_quantizer`` or ``shortcut_quantizer`` call becomes a :class:`StreamCodes`
    call, or, where it ends ``conv -> add(stream) -> ReLU`` with an 8-bit unsigned stream, the conv's unfused oneDNN
    call itself: ``qconv2d_pointwise.binary`` adds the earlier stream's codes (``sum`` post-op,
    scaled back to floats), applies the ReLU and writes the new stream's codes,

        c = clamp(round(relu(conv(x) + s_a (a - z_a)) / s_r), 0, 255),

    with ``in_place`` (eager models: ``fuse_residuals``) into the earlier stream's buffer, only
    where nothing reads that buffer after the conv; in compiled models, the same oneDNN op, which
    Inductor lowers as it does in pt2e's graphs, into the buffer where it is dead and into a copy
    where it is not; else ``arq::onednn_conv_add_stream`` (a uint8 copy, always). The earlier stream must
    itself be such codes: a block's output or a ``shortcut_quantizer``'s, a stream too
    (``QuantConfig.residual_shortcuts``: the first block's input, a downsampling shortcut; without
    them those blocks add in float and then quantize). Consumers: integer layers read the
    codes (``read_stream``: the float values, then their own codes, exactly as the reference),
    fused convs add them, anything else gets the float values (:class:`StreamValues`).
    oneDNN scales by ``1 / s_r`` where the reference divides: the tolerance of the module docstring.
    """
    streams: dict = {}  # node -> StreamCodes of the codes it produces
    # positions before any rewrite: the pass only erases nodes until every stream is placed
    order = {node: position for position, node in enumerate(graph.nodes)}
    for node in list(graph.nodes):
        quantizer = modules.get(node.target) if node.op == "call_module" else None
        if (not isinstance(quantizer, ActivationQuantizer) or not quantizer.enabled
                or node.target.rpartition(".")[2] not in (RESIDUAL_QUANTIZER, SHORTCUT_QUANTIZER)
                or len(node.args) != 1 or node.kwargs):
            continue
        stream = StreamCodes(quantizer)
        fused = _fuse_stream_add(graph, node, stream, streams, modules, call_sites, in_place, order)
        if fused is None:
            root.set_submodule(node.target, stream)
            streams[node] = stream
        else:
            streams[fused] = stream
    for node, stream in streams.items():
        values = None
        for user in list(node.users):
            layer = modules.get(user.target) if user.op == "call_module" else None
            if (isinstance(layer, (IntegerConv2d, IntegerLinear)) and call_sites.get(user.target) == 1
                    and user.args == (node,) and not user.kwargs and not layer.takes_codes):
                layer.read_stream(stream)
                continue
            if user.kwargs.get("stream_accumulate") is node:
                continue
            if values is None:
                name = f"{node.name}_values"
                root.add_module(name, StreamValues(stream))
                with graph.inserting_after(node):
                    values = graph.call_module(name, (node,))
            user.replace_input_with(node, values)
    return len(streams)


def _fuse_stream_add(graph, node, stream: StreamCodes, streams: dict, modules: dict, call_sites: dict,
                     in_place: bool, order: dict):
    """The conv node now writing ``stream``'s codes in place of quantizer ``node``
    (:func:`_quantize_streams`), or None where the pattern or the buffer rule does not hold."""
    relu = node.args[0]
    if stream.bits != 8 or stream.signed or not isinstance(relu, torch.fx.Node) or len(relu.users) != 1:
        return None
    if not _is_relu(relu, modules) or len(relu.args) < 1 or not isinstance(relu.args[0], torch.fx.Node):
        return None
    add = relu.args[0]
    if not _is_add(add) or len(add.users) != 1:
        return None
    for operand, earlier in (add.args, tuple(reversed(add.args))):
        if earlier not in streams:
            continue
        passed, conv_node = [], operand
        while _is_identity(conv_node, modules) and len(conv_node.users) == 1:  # folded BatchNorms
            passed.append(conv_node)
            conv_node = conv_node.args[0]
        if not isinstance(conv_node, torch.fx.Node) or len(conv_node.users) != 1:
            continue
        conv = _unfused_conv(conv_node, modules, call_sites)
        if conv is None or len(conv_node.args) != 1 or conv_node.kwargs:
            continue
        # where the earlier stream is computed after the conv (torchvision's blocks compute their
        # downsampling shortcut last), the conv moves to just before the add, after it, unless a
        # node in between may write into a tensor (the conv's input)
        position = order[conv_node]
        if order[earlier] > position:
            between = [other for other in order if position < order[other] < order[add]]
            if any(_may_mutate(other, modules) for other in between):
                continue
            position = order[add]
        earlier_dead = not any(order.get(user, float("inf")) > position for user in earlier.users if user is not add)
        if in_place and not earlier_dead:
            continue  # the earlier stream is read after the conv: its buffer is not free
        if position != order[conv_node]:
            add.prepend(conv_node)
            order[conv_node] = position - 0.5
        conv.stream_output = (stream, streams[earlier], in_place, earlier_dead)
        node.replace_all_uses_with(conv_node)
        conv_node.kwargs = {"stream_accumulate": earlier}
        for dead in [node, relu, add] + passed:
            graph.erase_node(dead)
        return conv_node
    return None


def _write_codes(conv: IntegerConv2d, scale: float, zero_point: int, code_min: int, code_max: int,
                 relu: bool) -> None:
    """Let ``conv`` write the codes ``(scale, zero_point, code_min..code_max)`` of its output (after
    a ReLU when ``relu``): oneDNN's hardtanh bounds in values and arq::lowbit_conv2d's in codes."""
    low = (code_min - zero_point) * scale
    conv.output_codes = (scale, zero_point, max(0.0, low) if relu else low, (code_max - zero_point) * scale)
    conv.output_code_bounds = (max(code_min, zero_point) if relu else code_min, code_max)


def _convs_write_streams(graph, modules: dict, call_sites: dict) -> int:
    """``conv -> [ReLU / identity]* -> StreamCodes``: the convolution writes the stream's codes itself
    (``output_codes``, as for a next layer's codes) and the quantizer's call goes; the number done.
    The stem before a network's first block and the downsampling shortcuts
    (``QuantConfig.residual_shortcuts``) then write uint8 codes instead of float32."""
    written = 0
    for node in list(graph.nodes):
        conv = _unfused_conv(node, modules, call_sites)
        if conv is None or len(node.args) != 1 or node.kwargs:
            continue
        passed, relu, current = _follow_activations(node, modules)
        if len(current.users) != 1:
            continue
        user = next(iter(current.users))
        stream = modules.get(user.target) if user.op == "call_module" else None
        if not isinstance(stream, StreamCodes) or len(user.args) != 1 or user.kwargs:
            continue
        _write_codes(conv, stream.scale, stream.zero_point, stream.code_min, stream.code_max, relu)
        conv.writes_stream = True
        user.replace_all_uses_with(node)
        for dead in [user] + list(reversed(passed)):
            graph.erase_node(dead)
        written += 1
    return written


def _fuse_traced(module: nn.Module, graph, residuals: bool) -> tuple[nn.Module, dict]:
    """:func:`_fuse_integer_epilogues` on one traced module: the module (rewritten when anything
    was fused) and ``{"fused": count}``."""
    modules = dict(module.named_modules())
    call_sites = _call_sites(graph)

    streams = _quantize_streams(module, graph, modules, call_sites, in_place=residuals)
    modules = dict(module.named_modules())
    call_sites = _call_sites(graph)
    streams += _convs_write_streams(graph, modules, call_sites)

    def consumer_of(user):
        layer = modules.get(user.target) if user.op == "call_module" else None
        if not isinstance(layer, (IntegerConv2d, IntegerLinear)) or layer.stream_zero_point is not None:
            return None
        return layer if call_sites[user.target] == 1 else None

    def link(producer, consumer, relu):
        _write_codes(producer, consumer.x_scale, consumer.zero_point, consumer.code_min, consumer.code_max, relu)

    chained = _chain_through_activations(graph, modules, lambda node: _unfused_conv(node, modules, call_sites),
                                         consumer_of, link)
    if residuals:
        chained += _fuse_residuals(graph, modules, call_sites)
    if not chained and not streams:
        return module, {"fused": 0}
    return _rewritten(module, graph), {"fused": chained + streams}


_FRESH_OUTPUT_LAYERS = (IntegerConv2d, IntegerLinear, *QUANT_LAYER_TYPES, nn.Conv2d, nn.Linear)


def _shares_input_buffer(node, modules: dict) -> bool | None:
    """True if ``node`` returns (a view of) its first input, False if it returns a fresh tensor,
    None if unknown. Identities and in-place ReLUs alias; layers and out-of-place ReLUs do not."""
    if node.op == "call_module":
        module = modules.get(node.target)
        if isinstance(module, nn.Identity):
            return True
        if isinstance(module, nn.ReLU):
            return bool(module.inplace)
        if isinstance(module, _FRESH_OUTPUT_LAYERS):
            return False
        return None
    if node.op == "call_function" and node.target in (torch.relu, torch.nn.functional.relu):
        return bool(node.kwargs.get("inplace", False)) or (len(node.args) > 1 and bool(node.args[1]))
    if (node.op == "call_function" and node.target is torch.relu_) or (
            node.op == "call_method" and node.target == "relu_"):
        return True
    if node.op == "call_method" and node.target == "relu":
        return False
    return None


def _residual_buffer_is_dead(residual, add, conv, modules: dict, order: dict) -> bool:
    """Whether oneDNN may write ``conv``'s output into ``residual``'s buffer: the buffer belongs to
    a layer's output (not the graph's input or a parameter) and neither ``residual`` nor any node
    sharing its buffer is read after ``conv``, except by ``add``."""
    if order[residual] > order[conv]:
        return False
    chain, node = [], residual
    while True:
        chain.append(node)
        shares = _shares_input_buffer(node, modules)
        if shares is None:
            return False
        if not shares:
            break
        node = node.args[0] if node.args and isinstance(node.args[0], torch.fx.Node) else None
        if node is None:
            return False
    if conv in chain:
        return False
    for position, alias in enumerate(chain):
        allowed = {add} if position == 0 else {chain[position - 1]}
        if any(order[user] > order[conv] for user in alias.users if user not in allowed):
            return False
    return True


def _fuse_residual_adds(graph, modules: dict, producer_of, residual_ok, kwarg: str, mark) -> int:
    """``conv -> [identity]* -> add(residual) -> [ReLU]``: the add and the ReLU move into the conv.

    For each node with one input whose layer ``producer_of(node)`` returns, follow single-user
    identities to a sole add user with one other (tensor) operand ``r``; where
    ``residual_ok(r, add, node, order)`` allows it (``order``: each node's position in the
    graph), the add's (or the ReLU after it) users read the conv instead, the conv's call gets
    ``{kwarg: r}``, ``mark(producer, relu)`` records on the layer whether a ReLU moved too, and
    the add, the ReLU and the identities passed are erased. Returns the number fused.
    """
    order = {node: position for position, node in enumerate(graph.nodes)}
    fused = 0
    for node in list(graph.nodes):
        producer = producer_of(node)
        if producer is None or len(node.args) != 1 or node.kwargs:
            continue
        passed, current = [], node
        while len(current.users) == 1 and _is_identity(next(iter(current.users)), modules):
            current = next(iter(current.users))
            passed.append(current)
        if len(current.users) != 1 or not _is_add(add := next(iter(current.users))):
            continue
        others = [arg for arg in add.args if arg is not current]
        if len(others) != 1 or not isinstance(others[0], torch.fx.Node):
            continue
        residual = others[0]
        if not residual_ok(residual, add, node, order):
            continue
        relu = next(iter(add.users)) if len(add.users) == 1 else None
        relu = relu if relu is not None and _is_relu(relu, modules) else None
        (relu or add).replace_all_uses_with(node)
        node.kwargs = {kwarg: residual}
        for dead in ([relu] if relu is not None else []) + [add] + list(reversed(passed)):
            graph.erase_node(dead)
        mark(producer, relu is not None)
        fused += 1
    return fused


def _fuse_residuals(graph, modules: dict, call_sites: dict) -> int:
    """:func:`_fuse_residual_adds` for the integer CPU path, into oneDNN's sum post-op.

    Only where the residual is computed before the conv and nothing after the conv reads it
    (oneDNN's sum post-op writes into the residual's buffer).
    """
    return _fuse_residual_adds(
        graph, modules, lambda node: _unfused_conv(node, modules, call_sites),
        lambda residual, add, conv, order: _residual_buffer_is_dead(residual, add, conv, modules, order),
        "accumulate", lambda producer, relu: setattr(producer, "residual_relu", relu))


class _LayersKeptTracer(torch.fx.Tracer):
    """Traces a whole integer model with its integer layers, stream modules and normalization kept whole."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        from arq.models.normalize import NormalizeLayer  # here: arq.models imports arq.quant

        return (isinstance(module, (IntegerConv2d, IntegerLinear, StreamCodes, StreamValues, NormalizeLayer,
                                    ActivationQuantizer, *QUANT_LAYER_TYPES))
                or super().is_leaf_module(module, qualified_name))


def normalization_values(module: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """``(mean, std)`` (float32 values, one per channel) when ``module`` computes exactly the per-channel
    standardization ``(x - mean) / std`` of its input, as two float32 operations; else None.

    Recognized: arq's :class:`~arq.models.normalize.NormalizeLayer`, and any module without children whose
    traced forward (torch.fx) is exactly ``sub(x, buffer) -> truediv(., buffer)`` with float32 buffers of
    shape ``[1, C, 1, 1]`` or ``[C, 1, 1]`` (a user's own normalization layer, written the usual way).
    """
    from arq.models.normalize import NormalizeLayer  # here: arq.models imports arq.quant

    if isinstance(module, NormalizeLayer):
        return (tuple(float(v) for v in module.mean.detach().float().flatten()),
                tuple(float(v) for v in module.std.detach().float().flatten()))
    if next(module.children(), None) is not None or type(module).__module__.startswith("torch."):
        return None
    try:
        graph = torch.fx.Tracer().trace(module)
    except Exception:  # data-dependent Python: not the plain standardization
        return None
    nodes = list(graph.nodes)
    if [node.op for node in nodes] != ["placeholder", "get_attr", "call_function", "get_attr", "call_function",
                                       "output"]:
        return None
    placeholder, _, sub, _, div, output = nodes
    if output.args != (div,) or _standardization(module, placeholder) != (sub, div):
        return None
    return _standardization_values(module, sub, div)


def _standardization(model: nn.Module, node) -> tuple | None:
    """``(sub, div)`` where ``node``'s only reader is ``sub(node, buffer)`` and its only reader
    ``truediv(sub, buffer)``, the buffers ``model``'s (get_attr nodes); else None."""
    if len(node.users) != 1:
        return None
    sub = next(iter(node.users))
    if (sub.op != "call_function" or sub.target not in (operator.sub, torch.sub) or len(sub.args) != 2
            or sub.args[0] is not node or sub.kwargs or len(sub.users) != 1):
        return None
    div = next(iter(sub.users))
    if (div.op != "call_function" or div.target not in (operator.truediv, torch.div, torch.true_divide)
            or len(div.args) != 2 or div.args[0] is not sub or div.kwargs):
        return None
    if not all(isinstance(arg, torch.fx.Node) and arg.op == "get_attr" for arg in (sub.args[1], div.args[1])):
        return None
    return sub, div


def _standardization_values(model: nn.Module, sub, div) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """The float32 per-channel ``(mean, std)`` of a :func:`_standardization` pair; None when its buffers
    are not float32 ``[1, C, 1, 1]`` / ``[C, 1, 1]`` tensors of equal C with std > 0."""
    values = []
    for node in (sub.args[1], div.args[1]):
        try:
            tensor = model.get_buffer(node.target)
        except AttributeError:
            return None
        shape = tuple(tensor.shape)
        if tensor.dtype != torch.float32 or shape not in ((1, tensor.numel(), 1, 1), (tensor.numel(), 1, 1)):
            return None
        values.append(tuple(float(v) for v in tensor.detach().flatten()))
    mean, std = values
    if len(mean) != len(std) or not all(v > 0 for v in std):
        return None
    return mean, std


def _first_layer(model: nn.Module, layer_type: type | None = None, tracer: torch.fx.Tracer | None = None):
    """``(layer, normalization, values)``: the convolution (an :class:`IntegerConv2d`, or ``layer_type``)
    that is the only reader of ``model``'s input, possibly through a normalization module
    (:func:`normalization_values`) that is the only reader of the input and whose only reader is the layer
    (``normalization``: its qualified name, or ``(graph, input, sub, div)`` where the standardization is
    traced inline; ``values`` its ``(mean, std)``; else None and None); None where
    the model cannot be traced (by ``tracer``, which keeps the layers whole; normalization modules are kept
    whole too) or its input goes anywhere else first."""
    base = tracer or _LayersKeptTracer()
    normalizations: dict[int, tuple | None] = {}

    def values_of(module: nn.Module):
        if id(module) not in normalizations:
            normalizations[id(module)] = normalization_values(module)
        return normalizations[id(module)]

    class KeepNormalization(type(base)):
        def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
            return super().is_leaf_module(module, qualified_name) or values_of(module) is not None

    try:
        graph = KeepNormalization().trace(model)
    except Exception:  # an untraceable forward keeps its float entry
        return None
    inputs = [node for node in graph.nodes if node.op == "placeholder"]
    if len(inputs) != 1:
        return None
    calls = _call_sites(graph)

    def only_reader(node):
        if len(node.users) != 1:
            return None
        user = next(iter(node.users))
        if user.op != "call_module" or user.args != (node,) or user.kwargs or calls.get(user.target) != 1:
            return None
        return user

    reader = only_reader(inputs[0])
    normalization = values = None
    if reader is not None and values_of(model.get_submodule(reader.target)) is not None:
        normalization = reader.target
        values = values_of(model.get_submodule(normalization))
        reader = only_reader(reader)
    elif (inline := _standardization(model, inputs[0])) is not None:
        # traced into the model's own graph (a GraphModule: to_integer / to_kernels rewrote it whole)
        values = _standardization_values(model, *inline)
        normalization = (graph, inputs[0], *inline) if values is not None else None
        reader = only_reader(inline[1]) if values is not None else None
    if reader is None or not isinstance(model.get_submodule(reader.target), layer_type or IntegerConv2d):
        return None
    return model.get_submodule(reader.target), normalization, values


def _enter_first_layer(model: nn.Module, eligible: Callable[[nn.Module], bool], layer_type: type | None = None,
                       tracer: torch.fx.Tracer | None = None):
    """What :func:`enter_at_input_codes` and its GPU twin share: the first layer (:func:`_first_layer`)
    that ``eligible`` accepts, entered at its codes: its input's normalization is taken out of the model
    (an identity, or out of its graph) and the layer ``takes_codes``. Returns ``(layer, (mean, std))``,
    the normalization's float32 values (zeros and ones without one), or None, with the model unchanged,
    where there is no such layer, it already takes codes or is shared under two names, the
    normalization's channels are not the layer's, or it is inline in a forward that is not a graph."""
    found = _first_layer(model, layer_type, tracer)
    if found is None:
        return None
    layer, normalization, values = found
    if layer.takes_codes or not eligible(layer):
        return None
    if sum(module is layer for _, module in model.named_modules(remove_duplicate=False)) != 1:
        return None  # shared elsewhere: it must keep reading floats there
    if normalization is None:
        values = ((0.0,) * layer.in_channels, (1.0,) * layer.in_channels)  # exact identities in float32
    elif len(values[0]) != layer.in_channels:
        return None
    elif isinstance(normalization, str):
        parent_name, _, attribute = normalization.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attribute, nn.Identity())
    elif not isinstance(model, torch.fx.GraphModule):
        return None  # inline in a forward that is not a graph: it cannot be taken out
    else:
        graph, placeholder, sub, div = normalization
        div.replace_all_uses_with(placeholder)
        buffers = (sub.args[1], div.args[1])
        for node in (div, sub, *buffers):
            if not node.users and node.graph is graph and node in graph.nodes:
                graph.erase_node(node)
        model.graph = graph  # the retraced graph: the same submodules and buffers, by qualified name
        model.recompile()
    layer.takes_codes = True
    return layer, values


def enter_at_input_codes(integer_model: nn.Module):
    """Make an (uncompiled) integer model read its first layer's input codes in place of float images,
    where its forward begins ``[normalization ->] IntegerConv2d`` on the input alone (a ResNet's stem; the
    normalization: arq's NormalizeLayer or a module computing ``(x - mean) / std``, :func:`normalization_values`):
    the normalization becomes an identity and the convolution ``takes_codes``. Returns that layer's
    input format (:class:`arq.smoothing.noise.InputCodes`: the normalization's float32 mean and std,
    then the activation quantizer), or None with the model unchanged.

    The certification engine then makes the noisy batch directly in that format
    (:func:`arq.smoothing.noise.noisy_codes_batch`, one C++ pass): the codes are those the eager model
    computes from the float noisy batch, bit for bit (the same float32 operations in the same order),
    so the model's outputs are unchanged; no float32 batch is written and read back."""
    from arq.smoothing.noise import InputCodes

    entered = _enter_first_layer(integer_model, lambda layer: layer.stream_zero_point is None)
    if entered is None:
        return None
    layer, (mean, std) = entered
    return InputCodes(mean, std, layer.x_scale, layer.zero_point, layer.code_min, layer.code_max)


class CompiledIntegerModel(nn.Module):
    """``torch.compile(model, dynamic=dynamic)`` with freezing (oneDNN's prepacked weights become
    graph constants), traced through a function with a code object of its own.

    Dynamo keeps at most ``torch._dynamo.config.recompile_limit`` (8) compiled variants per code
    object, and compiles every ``nn.Module`` through one wrapper function of torch's: a process that
    certified a few models, each at its batch sizes (``batch_size``, ``n0``, the remainders) and
    grad modes, ran past it, and the later variants then ran eagerly, with only a warning. Each
    instance here counts its own variants."""

    def __init__(self, model: nn.Module, dynamic: bool | None = None):
        super().__init__()
        self.model = model

        def forward(x):
            return model(x)

        forward.__code__ = forward.__code__.replace(co_name=f"arq_integer_forward_{id(self):x}")
        self._compiled = torch.compile(forward, dynamic=dynamic, options={"freezing": True})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._compiled(x)


def to_integer(qmodel: nn.Module, config: IntegerExecutionConfig | None = None) -> nn.Module:
    """The integer-CPU version of a fake-quant model (a new module; ``qmodel`` is unchanged).

    The result maps ``[B, C, H, W]`` float in [0, 1] to float32 logits like ``qmodel``, on
    CPU only, in eval mode, for inference only (it cannot be trained, saved or deep-copied:
    save the fake-quant model with :func:`arq.quant.save` instead).
    """
    config = config or IntegerExecutionConfig()
    if not isinstance(qmodel, nn.Module):
        raise TypeError(f"qmodel must be an nn.Module, got {type(qmodel).__name__}")
    layers = [(name, module) for name, module in quantizable_layers(qmodel) if isinstance(module, QUANT_LAYER_TYPES)]
    if not layers:
        raise ValueError("qmodel has no quantized layer; run arq.quant.quantize first")
    for tensor in list(qmodel.parameters()) + list(qmodel.buffers()):
        if tensor.device.type != "cpu":
            raise ValueError(f"the integer path runs on CPU; qmodel is on {tensor.device}")
    if "onednn" not in torch.backends.quantized.supported_engines or not torch.backends.mkldnn.is_available():
        raise RuntimeError("this torch build has no oneDNN quantized engine; use the fake-quant model")
    integer_model = copy.deepcopy(qmodel).eval()
    for name, layer in layers:
        if layer.w_bits == FLOAT_BITS or layer.a_bits == FLOAT_BITS:
            continue  # a float operand: the fake-quant layer is already what runs
        if isinstance(layer, QuantConv2d):
            if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
                continue
            replacement = IntegerConv2d(layer, config.split_8bit, config.conv_kernel)
        else:
            replacement = IntegerLinear(layer, config.split_8bit)
        parent_name, _, child = name.rpartition(".")
        parent = integer_model.get_submodule(parent_name) if parent_name else integer_model
        setattr(parent, child, replacement)
    for parameter in integer_model.parameters():
        parameter.requires_grad_(False)
    if config.fuse_epilogues:
        integer_model = _fuse_integer_epilogues(integer_model, residuals=config.residuals_fused)
    if config.compile:
        compiled = CompiledIntegerModel(integer_model)
        for attribute in ("arq_metadata", "arq_quant"):
            if hasattr(integer_model, attribute):
                setattr(compiled, attribute, getattr(integer_model, attribute))
        return compiled
    return integer_model
