"""A fake-quant model run through arq's own packed low-bit kernels (``arq.ops``).

:func:`to_kernels` copies a fake-quant model (:func:`arq.quant.quantize`) and replaces every
QuantConv2d / QuantLinear whose weight and input activation have at most 8 bits by
:class:`PackedConv2d` / :class:`PackedLinear`. With the input quantizer's scale ``s_x`` and
range ``[q_lo, q_hi]`` (:mod:`arq.quant.quantizers`; zero point 0) and the layer's integer
weight codes ``q`` (per-channel scale ``s_w[n]``, packed once at ``w_bits`` in the format of
docs/design.md, K in ``(kh, kw, c)`` order for a convolution), a packed layer computes

    c      = clamp(round(x / s_x), q_lo, q_hi)       int8 for a signed activation, uint8 for an
                                                     unsigned one; a b-bit activation's codes stay
                                                     on its b-bit grid (the fake-quant codes exactly:
                                                     the same float32 quotient, half-to-even rounding)
    acc[n] = sum_k c_k * q[n, k]                     exact, int32 (the kernel)
    y[n]   = float32(acc[n]) * s_x * s_w[n] + bias[n]  float32 (the ops' fused epilogue)

A convolution runs on NHWC codes and returns its NHWC result as an NCHW float32 tensor in
channels_last layout (a view, no copy; the next packed layer then reads it without a layout
copy), so everything between layers (normalization, ReLU, pooling, residual adds) is the same
float32 code as in the fake-quant model. With the Triton backend, :func:`_chain_convolutions`
moves work between layers into the convolutions' epilogues, with the same float32 values and
codes as the unfused model: a convolution whose output only feeds another packed convolution
(through ReLUs or identities) writes that layer's int8 codes instead of its float output; a
residual add (and the ReLU after it) moves into the convolution before it; and a convolution
whose output feeds a packed convolution and other users writes both its float output and the
consumer's codes, so no separate quantization pass reads it again.

Which kernel runs (``backend``, recorded as each packed layer's ``backend`` attribute):

* ``"cpp"``: ``arq.ops.packed_conv2d`` / ``packed_linear`` with ``backend="cpp"`` (``arq._C``, CPU).
* ``"triton"``: the Triton kernels of ``arq_kernels`` (CUDA, or the CPU under ``TRITON_INTERPRET=1``).
  They are called directly, not through ``arq.ops`` (whose dispatcher refuses CPU tensors for
  Triton and passes its positional epilogue arguments to launchers that take them by keyword).
  A float32 input becomes its codes in one pass (``arq_kernels.quantize_nhwc``: the same
  quotient, rounding and clamp as above, written as int8 NHWC); the kernels take int8 only, so
  8-bit unsigned codes 0..255 travel as ``c - 128`` with zero point -128, which the kernel
  undoes exactly in int32 (``- z * sum_k q[n, k]``, the padding holding ``z``), and the float32
  epilogue above runs inside the kernel.
* ``"torch"``: ``arq.ops``' plain PyTorch reference (exact float64 integer GEMM, same epilogue).
* ``"auto"``: ``"triton"`` for CUDA tensors (``"torch"`` without Triton), ``"cpp"`` on CPU when
  ``arq._C`` is built, else ``"torch"``; resolved per input device.

Layers that keep their fake-quant (float) form: a 32-bit weight or activation, ``groups != 1``,
dilation other than 1, unequal height/width stride or padding, a padding mode other than zeros,
and ``K > 65535`` (the int32 accumulator's range at 8 x 8 bits). ``model.arq_kernels`` lists
what was converted and why the rest was not.

Tolerance against the fake-quant reference (as :mod:`arq.quant.execution` states for the oneDNN
path): the input codes are identical and the integer accumulation is exact; the reference sums
``(s_x c)(s_w q)`` in float32, so one layer given the same input agrees to float32 rounding
(relative ~1e-6 of the output's magnitude; tests/quant/test_quant_kernels.py checks rtol 1e-5
plus 1e-5 of the largest output). Through a network such a rounding difference may move a value
across a rounding boundary of the next activation quantizer (one code step there), and the change
propagates: a small share of the later codes differ, and the logits agree up to that (the tests
check one-step first differences, at most 1 % differing codes and >= 99 % top-1 agreement on
inputs with a clear top-2 margin; measured on noisy random inputs: LeNet 0 % codes and logits
within 2e-7 of the largest, ResNet-20 0.05-0.22 % codes and within 0.2-1.8 %, top-1 100 %). The
backends agree with each other on the accumulators exactly and on the float output up to the epilogue's float32 rounding
order ("cpp" and "torch" bit for bit; Triton's fused epilogue multiplies ``s_x * s_w[n]`` first).
"""
from __future__ import annotations

import copy
import functools
import os

import torch
from torch import nn

from arq.quant.modules import QUANT_LAYER_TYPES, QuantConv2d, QuantLinear
from arq.quant.packing import conv_weight_to_matrix, pack_weights
from arq.quant.policy import FLOAT_BITS, MAX_BITS, quantizable_layers
from arq.quant.quantizers import ActivationQuantizer

__all__ = ["PackedConv2d", "PackedLinear", "to_kernels", "enter_at_input_codes", "resolve_backend", "KERNEL_BACKENDS"]

KERNEL_BACKENDS = ("auto", "cpp", "triton", "torch")

#: Largest K the packed ops accept (csrc/cpu/packed_common.h: 255 * 127 * K stays below 2^31).
MAX_K = 65535


# ---------------------------------------------------------------------------------------------
# backend choice
# ---------------------------------------------------------------------------------------------


def _cpp_available() -> bool:
    from arq._ext import compiled_ops_available

    if not compiled_ops_available():
        return False
    return all(
        torch._C._dispatch_has_kernel_for_dispatch_key(f"arq::{op}", "CPU") for op in ("packed_linear", "packed_conv2d")
    )


def _triton_available() -> bool:
    try:
        import arq_kernels
    except ImportError:
        return False
    return arq_kernels.triton_available()


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """The kernel backend that runs for ``backend`` on ``device`` ("cpp", "triton" or "torch").

    Raises when an explicitly named backend cannot run there.
    """
    if backend not in KERNEL_BACKENDS:
        raise ValueError(f"backend must be one of {KERNEL_BACKENDS}, got {backend!r}")
    device = torch.device(device)
    if backend == "auto":
        if device.type == "cuda":
            return "triton" if _triton_available() else "torch"
        if device.type == "cpu" and _cpp_available():
            return "cpp"
        return "torch"
    if backend == "cpp":
        if device.type != "cpu":
            raise RuntimeError(f"backend 'cpp' runs on CPU only, got a tensor on {device}")
        if not _cpp_available():
            raise RuntimeError("backend 'cpp' needs the compiled ops (arq._C); build them or use 'torch'")
    elif backend == "triton":
        if not _triton_available():
            raise RuntimeError("backend 'triton' needs triton and arq_kernels")
        if device.type != "cuda" and not (device.type == "cpu" and _interpreting()):
            raise RuntimeError(f"backend 'triton' needs a CUDA tensor (or TRITON_INTERPRET=1 on CPU), got {device}")
    return backend


# ---------------------------------------------------------------------------------------------
# packed layers
# ---------------------------------------------------------------------------------------------


class _PackedLayer(nn.Module):
    """Shared state: input quantization to codes, packed weight, scales, bias, backend."""

    def _init_packed(self, layer: QuantConv2d | QuantLinear, backend: str) -> torch.Tensor:
        quantizer = layer.input_quantizer
        if not quantizer._calibrated:
            raise RuntimeError("the layer's activation quantizer is not calibrated; run arq.quant.quantize first")
        self.w_bits, self.a_bits = int(layer.w_bits), int(layer.a_bits)
        self.signed = bool(quantizer.signed)
        self.code_min, self.code_max = quantizer.levels
        self.code_dtype = torch.int8 if self.signed else torch.uint8
        self.x_scale = float(quantizer.scale)  # a float32 value, exactly
        # the same 0-dim float32 tensor the fake-quant reference divides by, so the codes agree
        self.register_buffer("x_scale_tensor", quantizer.scale.detach().clone().float())
        weight_codes = layer.integer_weight()
        self.out_features = int(weight_codes.shape[0])
        self.k = int(weight_codes[0].numel())
        weight_matrix = conv_weight_to_matrix(weight_codes)
        self.register_buffer("packed_weight", pack_weights(weight_matrix, self.w_bits))
        # Triton takes int8 codes: 0..255 travel as c - 128, undone with the weight row sums
        self.triton_zero_point = -128 if self.code_max > 127 else 0
        self.register_buffer("weight_sums", weight_matrix.to(torch.int64).sum(1).to(torch.int32))
        self.register_buffer("w_scale", layer.weight_scale.detach().float().clone().contiguous())
        bias = layer.bias.detach().float().clone().contiguous() if layer.bias is not None else None
        self.register_buffer("bias", bias)
        self.requested_backend = backend
        self.backend = resolve_backend(backend, self.packed_weight.device)
        self._auto_backends = {self.packed_weight.device.type: self.backend} if backend == "auto" else {}
        return weight_matrix

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """``clamp(round(x / s_x), q_lo, q_hi)`` as int8 (signed) or uint8 (unsigned), ``x``'s layout."""
        return torch.clamp(torch.round(x / self.x_scale_tensor.to(x.dtype)), self.code_min, self.code_max).to(
            self.code_dtype
        )

    def _backend_for(self, device: torch.device) -> str:
        """The backend for an input on ``device``: "auto" follows the device (e.g. after ``.to("cuda")``)."""
        if self.requested_backend == "auto":
            backend = self._auto_backends.get(device.type)
            if backend is None:
                backend = self._auto_backends[device.type] = resolve_backend("auto", device)
            self.backend = backend
        return self.backend

    def _triton_input(self, x: torch.Tensor) -> torch.Tensor:
        """int8 ``c + triton_zero_point`` of a ``[B, C, H, W]`` (as NHWC) or ``[M, K]`` input."""
        import arq_kernels

        if x.dtype == torch.float32:
            return arq_kernels.quantize_nhwc(x, self.x_scale, self.code_min, self.code_max, self.triton_zero_point)
        codes = self.codes(x).to(torch.int16) + self.triton_zero_point
        codes = codes.permute(0, 2, 3, 1) if x.dim() == 4 else codes
        return codes.to(torch.int8).contiguous()

    def _triton_args(self) -> dict:
        return dict(x_scale=self.x_scale, x_zero_point=self.triton_zero_point, weight_sums=self.weight_sums)

    def extra_repr(self) -> str:
        return (f"w_bits={self.w_bits}, a_bits={self.a_bits}, signed={self.signed}, "
                f"x_scale={self.x_scale:.6g}, backend={self.backend!r}")


class PackedConv2d(_PackedLayer):
    """A QuantConv2d through ``arq.ops.packed_conv2d`` (NHWC implicit GEMM); see the module docstring."""

    def __init__(self, layer: QuantConv2d, backend: str = "auto"):
        super().__init__()
        reason = conv_fallback_reason(layer)
        if reason is not None:
            raise ValueError(f"PackedConv2d cannot run this convolution: {reason}")
        self.in_channels, self.out_channels = layer.in_channels, layer.out_channels
        self.kernel_size = tuple(layer.kernel_size)
        self.stride = int(layer.stride[0])
        self.padding = _symmetric_padding(layer)
        weight_matrix = self._init_packed(layer, backend)
        # the weight codes kept unpacked, int8 [N, KH*KW*C]: the Triton row loop (ARQ_TRITON_CONV_LOOP=rows)
        # loads its tiles as stored instead of unpacking them in every program; not saved, the
        # packed weight is the stored form
        self.register_buffer("int8_weight", weight_matrix.to(torch.int8).contiguous(), persistent=False)
        # where the codes carry a zero point, the taps' weight sums as 2-D prefix sums: the row loop's
        # correction for the padding (arq_kernels.packed_conv.tap_prefix_sums, which the launcher would
        # otherwise compute every call; written here too so that a layer needs no Triton to be built)
        tap_sums = None
        if self.triton_zero_point:
            kh, kw = self.kernel_size
            taps = self.int8_weight.reshape(self.out_features, kh, kw, -1).to(torch.int32).sum(3, dtype=torch.int32)
            prefix = torch.zeros(self.out_features, kh + 1, kw + 1, dtype=torch.int32, device=taps.device)
            prefix[:, 1:, 1:] = taps.cumsum(1, dtype=torch.int32).cumsum(2, dtype=torch.int32)
            tap_sums = prefix.reshape(self.out_features, -1).t().contiguous()
        self.register_buffer("tap_sums", tap_sums, persistent=False)
        # set by to_kernels' fusion (Triton only, _chain_convolutions): this layer writes the next
        # one's int8 NHWC codes instead of its float output (scale, q_lo, q_hi, zero point, ReLU
        # before them), or its float output and such codes (codes_also: the same minus the ReLU,
        # which epilogue_relu covers); reads such codes (takes_codes); adds a float residual
        # (forward's ``residual``) and applies a ReLU in its epilogue (epilogue_relu)
        self.output_codes: tuple[float, int, int, int, bool] | None = None
        self.codes_also: tuple[float, int, int, int] | None = None
        self.takes_codes = False
        self.epilogue_relu = False
        # set by enter_at_input_codes: the codes come as the model's input, [B, C, H, W] channels_last
        self.reads_input_codes = False
        # the Triton launches checked and derived once per input shape (arq_kernels.packed_conv2d's
        # ``plans``): on a GPU the per-call checks cost as much host time as the kernel's device time
        self._launch_plans: dict = {}

    def __getstate__(self):
        # launches hold closures (not picklable) over this layer's tensors (stale in a copy)
        state = dict(self.__dict__)
        state["_launch_plans"] = {}
        return state

    def _plans(self) -> dict | None:
        """This layer's kept launches; None (every call checked and derived afresh) with
        ``ARQ_TRITON_LAUNCH_PLANS=0``, for A/Bs (bench_e2e's ``*_noplans`` variants)."""
        if os.environ.get("ARQ_TRITON_LAUNCH_PLANS", "1").strip() == "0":
            return None
        return self.__dict__.setdefault("_launch_plans", {})

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        backend = self._backend_for(x.device)
        if backend == "triton":
            return self._triton(x, residual)
        if (self.output_codes is not None or self.codes_also is not None or self.takes_codes
                or self.epilogue_relu or residual is not None):
            raise RuntimeError("a fused PackedConv2d (to_kernels with backend='triton') runs on the Triton "
                               "backend only")
        from arq import ops

        # channels_last codes: the NHWC permute is then a contiguous view
        codes = self.codes(x.contiguous(memory_format=torch.channels_last)).permute(0, 2, 3, 1)
        kh, kw = self.kernel_size
        out = ops.packed_conv2d(codes, self.packed_weight, self.w_bits, self.w_scale, self.bias, self.x_scale,
                                kh, kw, self.stride, self.padding, backend=backend)
        return out.permute(0, 3, 1, 2)  # NCHW in channels_last layout: a view of the NHWC result

    def _triton(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """The float32 NCHW (channels_last) result ``relu?(conv(x) + residual?)``; when fused, the next
        layer's int8 NHWC codes instead, or ``(result, codes)``; reading ``x`` as such codes when
        ``takes_codes``."""
        import arq_kernels

        if not self.takes_codes:
            codes = self._triton_input(x)
        elif self.reads_input_codes:
            if x.dtype != torch.int8 or x.dim() != 4 or x.shape[1] != self.in_channels:
                raise ValueError(f"this model reads its first layer's int8 input codes [B, {self.in_channels}, H, W] "
                                 f"(model.input_codes); got {x.dtype} {tuple(x.shape)}")
            codes = x.permute(0, 2, 3, 1).contiguous()  # a view for channels_last codes
        else:
            codes = x
        common = dict(kernel_size=self.kernel_size, stride=self.stride, padding=self.padding,
                      relu=self.epilogue_relu, int8_weight=self.int8_weight, tap_sums=self.tap_sums,
                      plans=self._plans(), **self._triton_args())
        if residual is not None:
            if residual.dtype not in (torch.float32, torch.float16, torch.bfloat16):
                raise TypeError(f"the fused residual must be a float32/16 or bfloat16 tensor, got {residual.dtype}")
            # exact widening, as torch's float32 + float16 promotion does; NCHW -> NHWC (a view
            # for channels_last, the layout the packed layers return)
            common["residual"] = residual.to(torch.float32).permute(0, 2, 3, 1)
        if self.output_codes is not None:
            scale, q_lo, q_hi, zero_point, relu = self.output_codes
            common["relu"] = common["relu"] or relu
            return arq_kernels.packed_conv2d(codes, self.packed_weight, self.w_bits, self.w_scale, self.bias,
                                             out_scale=scale, out_dtype=torch.int8, out_zero_point=zero_point,
                                             qmin=q_lo, qmax=q_hi, **common)
        if self.codes_also is not None:
            out, next_codes = arq_kernels.packed_conv2d(codes, self.packed_weight, self.w_bits, self.w_scale,
                                                        self.bias, codes_also=self.codes_also, **common)
            return out.permute(0, 3, 1, 2), next_codes
        out = arq_kernels.packed_conv2d(codes, self.packed_weight, self.w_bits, self.w_scale, self.bias, **common)
        return out.permute(0, 3, 1, 2)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, " + super().extra_repr())


class PackedLinear(_PackedLayer):
    """A QuantLinear through ``arq.ops.packed_linear``; see the module docstring."""

    def __init__(self, layer: QuantLinear, backend: str = "auto"):
        super().__init__()
        if layer.in_features > MAX_K:
            raise ValueError(f"PackedLinear: K = {layer.in_features} exceeds {MAX_K}")
        self.in_features = layer.in_features
        self._init_packed(layer, backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        leading = x.shape[:-1]
        rows = x.reshape(-1, x.shape[-1])
        backend = self._backend_for(rows.device)
        if backend == "triton":
            import arq_kernels

            out = arq_kernels.packed_linear(self._triton_input(rows), self.packed_weight, self.w_bits, self.w_scale,
                                            self.bias, **self._triton_args())
        else:
            from arq import ops

            out = ops.packed_linear(self.codes(rows).contiguous(), self.packed_weight, self.w_bits, self.w_scale,
                                    self.bias, self.x_scale, backend=backend)
        return out.reshape(*leading, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " + super().extra_repr()


PACKED_LAYER_TYPES = (PackedConv2d, PackedLinear)


# ---------------------------------------------------------------------------------------------
# conversion
# ---------------------------------------------------------------------------------------------


def _symmetric_padding(layer: nn.Conv2d) -> int:
    padding = layer.padding
    if padding == "valid":
        return 0
    if padding == "same":  # stride 1 (torch requires it); odd kernels pad (k - 1) / 2 on each side
        return (layer.kernel_size[0] - 1) // 2
    return int(padding[0])


def conv_fallback_reason(layer: QuantConv2d) -> str | None:
    """Why ``layer`` cannot run as a :class:`PackedConv2d` (None when it can)."""
    if layer.groups != 1:
        return f"groups={layer.groups} (the packed conv has groups=1)"
    if tuple(layer.dilation) != (1, 1):
        return f"dilation={tuple(layer.dilation)}"
    if layer.padding_mode != "zeros":
        return f"padding_mode={layer.padding_mode!r}"
    if layer.stride[0] != layer.stride[1]:
        return f"stride={tuple(layer.stride)} (one stride for both axes)"
    kh, kw = layer.kernel_size
    if layer.padding == "same":
        if kh != kw or kh % 2 == 0:
            return f"padding='same' with kernel {kh}x{kw} (asymmetric padding)"
    elif layer.padding != "valid" and layer.padding[0] != layer.padding[1]:
        return f"padding={tuple(layer.padding)} (one padding for both axes)"
    if kh * kw * layer.in_channels > MAX_K:
        return f"K = {kh * kw * layer.in_channels} exceeds {MAX_K}"
    return None


def _fallback_reason(layer: nn.Module) -> str | None:
    if layer.w_bits > MAX_BITS or layer.a_bits > MAX_BITS:
        return f"w_bits={layer.w_bits}, a_bits={layer.a_bits} (a {FLOAT_BITS}-bit operand stays float)"
    if isinstance(layer, QuantConv2d):
        return conv_fallback_reason(layer)
    if layer.in_features > MAX_K:
        return f"K = {layer.in_features} exceeds {MAX_K}"
    return None


class _PackedTracer(torch.fx.Tracer):
    """Keeps the packed layers (and any fake-quant layer left) whole."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, (*PACKED_LAYER_TYPES, *QUANT_LAYER_TYPES, ActivationQuantizer)) or \
            super().is_leaf_module(module, qualified_name)


def _chain_convolutions(model: nn.Module) -> tuple[nn.Module, dict[str, int]]:
    """Triton: move the work between packed convolutions into their epilogues (traced with torch.fx).

    Three rewrites, each giving the unfused model's float32 values and codes bit for bit (the
    epilogue computes the same float32 value, then the same exact quotient and rounding):

    1. ``conv -> [ReLU / Identity]* -> conv``, each node between with one user: the producer
       applies the ReLU and writes the consumer's int8 NHWC codes (``out_scale`` = its step, its
       levels and zero point); the consumer reads them as they are ("chained").
    2. ``conv -> [Identity]* -> add(residual) -> [ReLU]``: the add and the ReLU move into the
       convolution's epilogue, which reads the float residual (computed before it in the graph)
       ("residuals").
    3. A convolution whose output (after rewrite 2, through single-user ReLUs / identities) feeds
       a packed convolution and other users: it writes its float32 output and, in the same pass,
       that consumer's codes (``codes_also``); the consumer reads the codes ("chained").

    Only layers called once and not shared under two names take part. Where the model cannot be
    traced as a whole (data-dependent Python, such as an input check), its children are
    rewritten one by one. Returns the model (a GraphModule where rewritten) and the counts.
    """
    from arq.quant.execution import _rewrite_by_parts

    seen: dict[int, int] = {}
    for _, module in model.named_modules(remove_duplicate=False):
        seen[id(module)] = seen.get(id(module), 0) + 1
    shared = {key for key, count in seen.items() if count > 1}
    model, counts = _rewrite_by_parts(model, _PackedTracer, functools.partial(_chain_traced, shared=shared),
                                      PACKED_LAYER_TYPES)
    return model, {"chained": 0, "residuals": 0, **counts}


def _chain_traced(model: nn.Module, graph, shared: set[int]) -> tuple[nn.Module, dict[str, int]]:
    """:func:`_chain_convolutions` on one traced module (``shared``: ids of layers under two names)."""
    from arq.quant.execution import _call_sites, _chain_through_activations, _rewritten

    modules = dict(model.named_modules())
    call_sites = _call_sites(graph)

    def single_conv(node) -> PackedConv2d | None:
        layer = modules.get(node.target) if node.op == "call_module" else None
        if isinstance(layer, PackedConv2d) and call_sites[node.target] == 1 and id(layer) not in shared:
            return layer
        return None

    def unchained_conv(node) -> PackedConv2d | None:
        layer = single_conv(node)
        return layer if layer is not None and layer.output_codes is None and layer.codes_also is None else None

    def link(producer, consumer, relu):
        producer.output_codes = (consumer.x_scale, consumer.code_min, consumer.code_max,
                                 consumer.triton_zero_point, relu)

    counts = {"chained": _chain_through_activations(graph, modules, unchained_conv, single_conv, link)}
    counts["residuals"] = _fuse_packed_residuals(graph, modules, unchained_conv)
    counts["chained"] += _write_codes_also(graph, modules, unchained_conv, single_conv)
    if counts["chained"] or counts["residuals"]:
        graph.lint()
        model = _rewritten(model, graph)
    return model, counts


def _fuse_packed_residuals(graph, modules: dict, unchained_conv) -> int:
    """Rewrite 2 of :func:`_chain_convolutions` (:func:`arq.quant.execution._fuse_residual_adds`):
    ``conv -> [Identity]* -> add(r) -> [ReLU]`` becomes ``conv(x, residual=r)`` with the ReLU in its
    epilogue; the number fused."""
    from arq.quant.execution import _fuse_residual_adds, _may_mutate

    def producer_of(node) -> PackedConv2d | None:
        layer = unchained_conv(node)
        return layer if layer is not None and not layer.epilogue_relu else None

    def residual_ok(residual, add, conv, order) -> bool:
        # the residual must exist before the convolution runs (graph order) and hold the same
        # value then as at the add: nothing after the conv may write into it, nor the add itself
        # (``r += conv(x)`` changes r for its other readers)
        if order[residual] > order[conv]:
            return False
        if _may_mutate(add, modules) and add.args[0] is residual:
            return False
        return not any(_may_mutate(user, modules) for user in residual.users
                       if user is not add and order[user] > order[conv])

    def mark(producer: PackedConv2d, relu: bool) -> None:
        producer.epilogue_relu = relu

    return _fuse_residual_adds(graph, modules, producer_of, residual_ok, "residual", mark)


def _write_codes_also(graph, modules: dict, unchained_conv, single_conv) -> int:
    """Rewrite 3 of :func:`_chain_convolutions` (and rewrite 1 for a convolution that rewrite 2
    left with a single packed consumer); the number of consumers now reading codes."""
    import operator

    from arq.quant.execution import _follow_activations, _may_mutate

    linked = 0
    for node in list(graph.nodes):
        producer = unchained_conv(node)
        if producer is None:
            continue
        passed, relu, current = _follow_activations(node, modules)
        consumers = [user for user in current.users
                     if user.args == (current,) and current not in user.kwargs.values()
                     and (layer := single_conv(user)) is not None and not layer.takes_codes]
        # the codes are those of the value the epilogue stored: no reader may change it in place
        if not consumers or any(_may_mutate(user, modules) for user in current.users):
            continue
        consumer_node = consumers[0]
        consumer = modules[consumer_node.target]
        target = (consumer.x_scale, consumer.code_min, consumer.code_max, consumer.triton_zero_point)
        if len(current.users) == 1:  # the consumer is the only reader: codes instead of floats
            producer.output_codes = (*target, relu)
            consumer_node.args = (node,)
        else:
            producer.codes_also = target
            producer.epilogue_relu = producer.epilogue_relu or relu
            with graph.inserting_after(node):
                values = graph.call_function(operator.getitem, (node, 0))
            with graph.inserting_after(values):
                codes = graph.call_function(operator.getitem, (node, 1))
            current.replace_all_uses_with(values, delete_user_cb=lambda user: user not in (values, codes))
            consumer_node.args = (codes,)
        for dead in reversed(passed):
            graph.erase_node(dead)
        consumer.takes_codes = True
        linked += 1
    return linked


@torch.no_grad()
def to_kernels(qmodel: nn.Module, *, backend: str = "auto", chain: bool = True) -> nn.Module:
    """A copy of the fake-quant ``qmodel`` whose quantized layers run arq's packed kernels.

    Every QuantConv2d / QuantLinear with ``w_bits <= 8`` and ``a_bits <= 8`` becomes a
    :class:`PackedConv2d` / :class:`PackedLinear` (weights packed once, on the model's device);
    the rest keep their fake-quant form (see the module docstring for the math, the backends
    and the tolerance). ``qmodel`` is unchanged. The result is in eval mode, for inference only
    (no gradients through the integer kernels), maps ``[B, C, H, W]`` to float32 logits like
    ``qmodel``, keeps ``arq_metadata`` / ``arq_quant``, and has ``arq_kernels = {"backend",
    "packed": [names], "fake_quant": {name: reason}, "chained": pairs passing codes, "residuals":
    residual adds fused}``.

    Args:
        qmodel: the output of :func:`arq.quant.quantize` (calibrated).
        backend: "auto", "cpp", "triton" or "torch" (the module docstring says where each runs).
        chain: with backend "triton", fuse the work between convolutions into their epilogues
            (:func:`_chain_convolutions`: codes passed between layers, residual adds; the same
            values and codes, fewer passes). The result then runs on Triton only.
    """
    if not isinstance(qmodel, nn.Module):
        raise TypeError(f"qmodel must be an nn.Module, got {type(qmodel).__name__}")
    if backend not in KERNEL_BACKENDS:
        raise ValueError(f"backend must be one of {KERNEL_BACKENDS}, got {backend!r}")
    layers = [(name, module) for name, module in quantizable_layers(qmodel) if isinstance(module, QUANT_LAYER_TYPES)]
    if not layers:
        raise ValueError("qmodel has no quantized layer; run arq.quant.quantize first")
    devices = {tensor.device for tensor in list(qmodel.parameters()) + list(qmodel.buffers())}
    if len(devices) > 1:
        raise ValueError(f"qmodel's tensors are on several devices: {sorted(map(str, devices))}")
    device = devices.pop() if devices else torch.device("cpu")
    chosen = resolve_backend(backend, device)  # fail early when the backend cannot run here
    model = copy.deepcopy(qmodel).eval()
    packed, fake_quant = [], {}
    for name, layer in layers:
        reason = _fallback_reason(layer)
        if reason is not None:
            fake_quant[name] = reason
            continue
        replacement = (PackedConv2d if isinstance(layer, QuantConv2d) else PackedLinear)(layer, backend)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, replacement)
        packed.append(name)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    fused = {"chained": 0, "residuals": 0}
    if backend == "triton" and chain:  # codes between layers: the Triton kernels' int8 NHWC format
        model, fused = _chain_convolutions(model)
    model.arq_kernels = {"backend": chosen, "packed": packed, "fake_quant": fake_quant, **fused}
    return model


def enter_at_input_codes(packed_model: nn.Module):
    """Make a Triton packed model (:func:`to_kernels` with ``backend="triton"``) read its first layer's int8
    input codes in place of float images, where its forward begins ``[normalization ->] PackedConv2d`` on
    the input alone (a ResNet's stem): the normalization becomes an identity and the convolution reads the
    codes, ``[B, C, H, W]`` int8 in channels_last memory. Returns their format
    (:class:`arq.smoothing.noise.InputCodes`, dtype int8: the normalization's float32 mean and std, then
    the layer's quantizer with the Triton zero point), or None with the model unchanged. The GPU twin of
    :func:`arq.quant.execution.enter_at_input_codes`.

    The certification engine then has the Triton noise kernel write the noisy batch in that format
    (:func:`arq.smoothing.noise.noisy_codes_batch`): the codes the layer would compute from the float noisy
    batch, bit for bit (the same float32 subtraction and correctly rounded divisions, the same rounding),
    so the logits and certificates are unchanged; no float32 batch is written, normalized and quantized
    in separate passes."""
    from arq.quant.execution import _enter_first_layer
    from arq.smoothing.noise import InputCodes

    entered = _enter_first_layer(packed_model, lambda layer: layer.backend == "triton", PackedConv2d,
                                 _PackedTracer())
    if entered is None:
        return None
    layer, (mean, std) = entered
    layer.reads_input_codes = True
    zero_point = layer.triton_zero_point
    return InputCodes(mean, std, layer.x_scale, zero_point, layer.code_min + zero_point, layer.code_max + zero_point,
                      dtype=torch.int8)
