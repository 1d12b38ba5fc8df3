"""Helpers shared by the kernel families: config loading, quantization rounding, checks.

Nothing here runs at import time beyond defining functions (and, on Triton 3.6 only, one fix
of its interpreter: :func:`_fix_interpreter_index`): configs are read from
``arq_kernels/configs/*.json`` on the first launch and cached.

Quantization of a float ``y`` to integer codes (``arq.quant.quantizers``; zero point ``z``):

    q = clamp(round_half_even(y / s), q_lo, q_hi) + z

with ``y`` and ``s`` float32 and ``y / s`` the IEEE float32 quotient. Triton's float32 ``/``
on NVIDIA GPUs is the approximate ``div.full.f32``, so the kernels form that quotient one of two
ways, chosen per process by the environment variable ``ARQ_TRITON_DIVISION`` (read at import):

* ``rn`` (default): ``tl.div_rn(y, s)``, IEEE float32 division rounded to nearest
  (``div.rn.f32``);
* ``f64``: ``float32(float64(y) / float64(s))``, the correctly rounded float32 quotient (double
  rounding is innocuous for ``/`` when 53 >= 2 * 24 + 2).

Both give the same correctly rounded quotient, hence the same codes bit for bit; they differ
only in speed. On an H200 (2026-11-28, benchmarks/results/gpu-h200-2026-11-28-session16),
``rn`` certified W8A8 ResNet-110 13 % faster end to end (float64 division is a long instruction
sequence on GPUs) and W4A4 within 2 %, so it is the default; ``f64`` stays for A/B runs. The
certificate's guarantee does not depend on the choice.
"""
from __future__ import annotations

import functools
import json
import os
import struct
from pathlib import Path

import torch
import triton
import triton.language as tl

_CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def _triton_before(major: int, minor: int) -> bool:
    try:
        found = tuple(int(part) for part in triton.__version__.split(".")[:2])
    except ValueError:  # a development version string: assume a current Triton
        return False
    return found < (major, minor)


def _fix_interpreter_index() -> None:
    """Triton 3.6's interpreter (the one torch 2.11 pins) turns a scalar kernel argument into a
    Python int with ``int(array of shape (1,))``, a TypeError since numpy 2.4, so a loop
    ``range(0, K, BLOCK_K)`` over a runtime ``K`` fails under ``TRITON_INTERPRET=1``; Triton 3.7
    squeezes the array first (triton-lang/triton#9171). This makes 3.6 do the same. Compiled
    kernels (GPUs) never take this path, and on Triton >= 3.7 nothing is changed."""
    if not _triton_before(3, 7):
        return
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    patch = getattr(interpreter, "_patch_lang_tensor", None)
    if patch is None or getattr(patch, "_arq_index_fix", False):
        return

    def patched(tensor, scope, *args, **kwargs):
        patch(tensor, scope, *args, **kwargs)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patched._arq_index_fix = True
    interpreter._patch_lang_tensor = patched


_fix_interpreter_index()

#: How :func:`quantize_codes` divides (module docstring): "f64" or "rn".
QUOTIENT_DIVISION = os.environ.get("ARQ_TRITON_DIVISION", "rn").strip().lower() or "rn"
if QUOTIENT_DIVISION not in ("f64", "rn"):
    raise ValueError(f"ARQ_TRITON_DIVISION must be 'f64' or 'rn', got {os.environ['ARQ_TRITON_DIVISION']!r}")
# a constexpr global: part of every kernel's cache key (and fixed for the process)
_DIVIDE_RN = tl.constexpr(QUOTIENT_DIVISION == "rn")
#: 1.5 * 2^23 (float32 0x4B400000): float32 values in [2^23, 2^24) are integers (quantize_codes)
_ROUNDING_SHIFT = tl.constexpr(12582912.0)

# ---------------------------------------------------------------------------------------------
# configs (data, apart from the kernels)
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _config_table(family: str) -> dict:
    with open(_CONFIG_DIR / f"{family}.json", encoding="utf-8") as handle:
        return json.load(handle)


def interpreting() -> bool:
    """True when Triton runs kernels through its numpy interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@functools.lru_cache(maxsize=None)
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def width_buckets(n: int) -> tuple[str, ...]:
    """The GEMM config buckets for ``n`` output columns, narrowest first: a tile as wide as the
    layer (N = 16 or 32 in CIFAR ResNets) instead of a 64- or 128-wide one that is mostly padding."""
    buckets = ("n16", "n32", "small_n", "default")
    return buckets[0 if n <= 16 else 1 if n <= 32 else 2 if n <= 64 else 3:]


def pick_config(family: str, device: torch.device, bucket: str | tuple[str, ...] = "default") -> dict:
    """The tuned launch config of ``family`` for ``device`` (``configs/<family>.json``).

    The JSON maps a device key (``"interpreter"``, a CUDA device name such as
    ``"NVIDIA H200"``, or ``"cuda"`` for any other GPU, and for every GPU when
    ``ARQ_TRITON_TUNED=0``) to ``{bucket: config}``;
    a config is a dict of block sizes plus ``num_warps`` and ``num_stages``. ``bucket`` may be
    a sequence: the first one the device's table has wins, else ``"default"``.
    """
    table = _config_table(family)
    if interpreting() or device.type != "cuda":
        key = "interpreter"
    elif os.environ.get("ARQ_TRITON_TUNED", "1").strip() == "0":
        key = "cuda"  # the generic entries on every card (an A/B against the tuned ones)
    else:
        name = _device_name(device.index if device.index is not None else torch.cuda.current_device())
        key = name if name in table else "cuda"
    configs = table[key]
    for name in (bucket,) if isinstance(bucket, str) else bucket:
        if name in configs:
            return dict(configs[name])
    return dict(configs["default"])


def launch_options(config: dict) -> dict:
    """The Triton launch keywords of a config (interpreter ignores them)."""
    return {
        "num_warps": int(config.get("num_warps", 4)),
        "num_stages": int(config.get("num_stages", 2)),
        "enable_fp_fusion": False,
    }


# ---------------------------------------------------------------------------------------------
# quantization
# ---------------------------------------------------------------------------------------------

_DEFAULT_LEVELS = {torch.int8: (-127, 127), torch.uint8: (0, 255)}
_DTYPE_RANGE = {torch.int8: (-128, 127), torch.uint8: (0, 255)}


def as_float32(value: float) -> float:
    """``value`` rounded to the nearest float32, as a Python float (what a GPU kernel receives)."""
    return struct.unpack("f", struct.pack("f", float(value)))[0]


def quant_levels(out_dtype: torch.dtype, zero_point: int, qmin: int | None, qmax: int | None) -> tuple[int, int]:
    """``(q_lo, q_hi)`` before the zero point: int8 defaults to the symmetric [-127, 127]
    (``arq.quant``'s signed activations), uint8 to ``[-z, 255 - z]``; checked to fit the dtype."""
    if out_dtype not in _DTYPE_RANGE:
        raise TypeError(f"quantized output must be int8 or uint8, got {out_dtype}")
    lo_d, hi_d = _DTYPE_RANGE[out_dtype]
    if out_dtype == torch.int8 and zero_point == 0:
        default_lo, default_hi = _DEFAULT_LEVELS[torch.int8]
    else:
        default_lo, default_hi = lo_d - zero_point, hi_d - zero_point
    q_lo = default_lo if qmin is None else int(qmin)
    q_hi = default_hi if qmax is None else int(qmax)
    if not (lo_d <= q_lo + zero_point <= q_hi + zero_point <= hi_d):
        raise ValueError(
            f"levels [{q_lo}, {q_hi}] + zero point {zero_point} do not fit {out_dtype} [{lo_d}, {hi_d}]"
        )
    return q_lo, q_hi


def quantize_reference(y: torch.Tensor, scale: float, q_lo: int, q_hi: int, zero_point: int, dtype: torch.dtype):
    """``clamp(round(float32(y) / float32(scale)), q_lo, q_hi) + z`` in ``dtype`` (torch.round: half to even)."""
    s = torch.tensor(scale, dtype=torch.float32, device=y.device)
    return (torch.clamp(torch.round(y.to(torch.float32) / s), q_lo, q_hi) + zero_point).to(dtype)


@triton.jit
def divide_float32(y, divisor):
    """The IEEE float32 quotient ``y / divisor`` (correctly rounded), formed as
    ``ARQ_TRITON_DIVISION`` says (module docstring); ``y`` float32, ``divisor`` float32 or a
    float scalar holding a float32 value."""
    if _DIVIDE_RN:
        return tl.div_rn(y, divisor)
    else:
        return (y.to(tl.float64) / divisor).to(tl.float32)


@triton.jit
def quantize_codes(y, scale, q_lo, q_hi, zero_point):
    """int32 codes ``clamp(round_half_even(y / scale), q_lo, q_hi) + zero_point`` of float32 ``y``.

    ``scale`` is a float32 scalar; the quotient is the IEEE float32 one, formed as
    ``ARQ_TRITON_DIVISION`` says (module docstring); the clamp comes first, so
    ``|quotient| <= 2^22``, and the rounding is then ``(quotient + 1.5 * 2^23) - 1.5 * 2^23``
    in float32: the sum has no fraction bits left, so the adder's round-to-nearest-even
    rounds the quotient half to even, and the subtraction is exact (no libdevice ``rint``,
    so the interpreter's numpy float32 and the GPU agree; ``compile_check`` checks that the
    constant survives compilation, i.e. that nothing folded the two adds).
    ``q_lo`` and ``q_hi`` must be tensors: kernels list them in ``do_not_specialize`` (an int
    argument equal to 1 would otherwise become a constexpr). ``scale`` is a float32 kernel
    argument on the GPU but a Python float under the interpreter: launchers pass
    :func:`as_float32` values, so both widen to the same float64.
    """
    quotient = divide_float32(y, scale)
    lo = q_lo.to(tl.float32)
    hi = q_hi.to(tl.float32)
    quotient = tl.minimum(tl.maximum(quotient, lo), hi)  # integer bounds: commutes with rounding
    rounded = (quotient + _ROUNDING_SHIFT) - _ROUNDING_SHIFT
    return rounded.to(tl.int32) + zero_point


@triton.jit
def float32_to_bfloat16(value):
    """Round-to-nearest-even float32 -> bfloat16 from the bits (finite values), as torch's
    ``c10::BFloat16`` rounds; the interpreter's own cast does not round to even."""
    bits = value.to(tl.uint32, bitcast=True)
    rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def to_float_dtype(value, OUT_DTYPE: tl.constexpr):
    """float32 ``value`` rounded to OUT_DTYPE (float32, float16 or bfloat16) to nearest even."""
    if OUT_DTYPE == tl.bfloat16:
        return float32_to_bfloat16(value)
    else:
        return value.to(OUT_DTYPE)
