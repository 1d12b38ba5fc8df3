"""Ahead-of-time compilation of every arq_kernels kernel for an NVIDIA target, without a GPU.

The CPU interpreter (``TRITON_INTERPRET=1``) checks what the kernels compute, not that they
compile. This module runs Triton's real pipeline (TTIR, TTGIR, LLVM, PTX and ``ptxas`` to a
cubin) for a GPU architecture on a machine with no GPU, for each kernel in the variants the
launchers use, and checks properties of the PTX that the bit-exactness contracts rely on:

* no fused multiply-add in float64 or float32 (``enable_fp_fusion=False``), so the noise is the
  reference's sequence of correctly rounded operations and the epilogues match torch;
* float64 division is the correctly rounded ``div.rn.f64``; no ``div.full.f32`` (the
  approximate float32 division Triton emits for ``/``) in any kernel; every kernel that
  quantizes divides with ``div.rn.f32`` (``ARQ_TRITON_DIVISION=rn``, the default) or
  ``div.rn.f64`` (``ARQ_TRITON_DIVISION=f64``), and rounds half to even with two rounded float32
  adds of +-1.5 * 2^23 that no compiler pass folded (``quantize_codes``).

Run: ``TRITON_INTERPRET=0 python -m arq_kernels.compile_check [--arch 90] [--arch 80] [--only ...]
[--sass]`` (exit status 1 when a kernel fails; ``--sass`` also prints SASS instruction counts).
``tests/kernels/test_triton_compile.py`` runs it in a subprocess. It checks the installed Triton
only (3.8 here; the GPU machine has 3.6, under which every variant passed it too on 2026-11-29:
``benchmarks/results/triton36-compile-check-2026-11-29``).
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time


def _signature(kernel, types: dict, constexprs: dict) -> dict:
    """Every argument: its type from ``types`` (pointers, floats, i64), ``constexpr``, or i32."""
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        else:
            signature[name] = types.get(name, "i32")
    return signature


def _as_launched(kernel, signature: dict, constexprs: dict, specimen: dict) -> tuple[dict, dict, dict]:
    """The signature, constexprs and attributes Triton's JIT compiles for a launch with the integer
    arguments ``specimen`` (values of a real launch) and 16-byte aligned tensors.

    The JIT specializes what the generic variants leave open: an integer argument equal to 1
    becomes a constant, one divisible by 16 is marked so (``tt.divisibility``), and so is every
    16-byte aligned pointer; the code it then generates differs (e.g. vectorized loads where
    contiguity can be proven), so the properties checked here must hold for it too.
    """
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import native_specialize_impl

    kept = {kernel.arg_names[i] if isinstance(i, int) else i for i in kernel.do_not_specialize}
    signature, constexprs, attrs = dict(signature), dict(constexprs), {}
    for index, name in enumerate(kernel.arg_names):
        kind = signature[name]
        if kind == "constexpr":
            continue
        if kind.startswith("*"):
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif name in specimen and name not in kept:
            kind, key = native_specialize_impl(BaseBackend, specimen[name], False, True, True)
            if kind == "constexpr":
                constexprs[name] = key
                signature[name] = "constexpr"
                continue
            signature[name] = kind
            if key == "D":
                attrs[(index,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


def _conv_specimen(batch: int, size: int, channels: int, bits: int) -> dict:
    """Integer arguments of a stride-1, padding-1 3x3 ``packed_conv2d`` launch on a contiguous NHWC
    ``[batch, size, size, channels]`` input with as many output channels (a CIFAR ResNet block)."""
    k = 9 * channels
    return {"H": size, "W": size, "C": channels, "OH": size, "OW": size, "M": batch * size * size,
            "N": channels, "K": k, "stride_h": 1, "stride_w": 1, "pad_h": 1, "pad_w": 1,
            "stride_xb": size * size * channels, "stride_xh": size * channels, "stride_xw": channels,
            "stride_xc": 1, "stride_wn": -(-k // (32 // bits))}


# ResNet-110's 3x3 layers at batch 1000 as launched: (channels, image size, (BLOCK_M, BLOCK_N,
# BLOCK_K, num_warps) of the card's configs/packed_conv.json entry, which entry)
LAUNCHED_LAYERS = [
    (16, 32, (256, 16, 32, 4), "H200"), (32, 16, (256, 32, 64, 8), "H200"), (64, 8, (64, 64, 64, 4), "H200"),
    (16, 32, (128, 16, 32, 4), "cuda"), (32, 16, (128, 32, 64, 4), "cuda"), (64, 8, (128, 64, 64, 4), "cuda"),
]


def _variants():
    """(label, kernel, pointer/float types, constexprs, launch options[, specimen]) for each variant
    to compile; a ``specimen`` (integer arguments of a real launch) compiles the variant as the JIT
    specializes it for that launch (:func:`_as_launched`), labelled "as launched".

    Labels containing ``fp32-dot`` may hold ``fma.rn.f32``: an IEEE float32 ``tl.dot`` is made of
    FMAs (the sum of products is not reproducible in any order anyway; only its epilogue is).
    """
    import triton.language as tl

    from arq_kernels import noise, packed_conv, packed_matmul, votes
    from arq_kernels import quantize as quantize_family

    fused = {"enable_fp_fusion": False}
    variants = []

    # -- noise: the float64 Box-Muller; float32 and fp16/bf16 outputs, quantized int8/uint8, and
    #    int8/uint8 codes of the normalized values (the first layer's input codes) ----------------
    noise_types = {"x_ptr": "*fp32", "mean_ptr": "*fp32", "std_ptr": "*fp32", "sigma_bits": "i64",
                   "out_scale": "fp32"}
    for value, out, quantize, normalize, out_ptr in [
        (tl.float32, tl.float32, False, False, "*fp32"),
        (tl.float16, tl.float16, False, False, "*fp16"),
        (tl.bfloat16, tl.bfloat16, False, False, "*bf16"),
        (tl.float32, tl.int8, True, False, "*i8"),
        (tl.float32, tl.uint8, True, False, "*u8"),
        (tl.float32, tl.int8, True, True, "*i8"),
        (tl.float32, tl.uint8, True, True, "*u8"),
    ]:
        variants.append((
            f"noisy_input[{out}{', normalized' if normalize else ''}]", noise._noisy_input_kernel,
            {**noise_types, "out_ptr": out_ptr},
            {"VALUE_DTYPE": value, "OUT_DTYPE": out, "QUANTIZE": quantize, "NORMALIZE": normalize,
             "BLOCK_S": 4, "BLOCK_P": 128},
            {"num_warps": 4, "num_stages": 1, **fused},
        ))

    # as launched for 1,000 CIFAR samples: float32 NCHW, and the first layer's int8 NHWC codes
    cifar = {"num_elements": 3072, "num_pairs": 1536, "count": 1000}
    for label, value, out, normalize, out_ptr, specimen in [
        ("noisy_input[fp32, as launched: CIFAR x 1000, NCHW]", tl.float32, tl.float32, False, "*fp32",
         {**cifar, "plane": 3072, "stride_c": 0, "stride_hw": 1, "channel_plane": 1}),
        ("noisy_input[int8, normalized, as launched: CIFAR x 1000, NHWC]", tl.float32, tl.int8, True, "*i8",
         {**cifar, "plane": 1024, "stride_c": 1, "stride_hw": 3, "channel_plane": 1024}),
    ]:
        variants.append((
            label, noise._noisy_input_kernel, {**noise_types, "out_ptr": out_ptr},
            {"VALUE_DTYPE": value, "OUT_DTYPE": out, "QUANTIZE": out == tl.int8, "NORMALIZE": normalize,
             "BLOCK_S": 4, "BLOCK_P": 128},
            {"num_warps": 4, "num_stages": 1, **fused}, specimen,
        ))

    # -- votes ------------------------------------------------------------------------------------
    count_ptrs = {"counts_ptr": "*i64", "pred_ptr": "*i64", "bias_ptr": "*fp32", "w_scale_ptr": "*fp32", "x_scale": "fp32"}
    for label, x_ty, w_ty, int8, tf32 in [
        ("int8", "*i8", "*i8", True, False),
        ("fp32-dot", "*fp32", "*fp32", False, False),
        ("fp16", "*fp16", "*fp32", False, False),
        ("bf16", "*bf16", "*fp32", False, True),
    ]:
        variants.append((
            f"vote_count[{label}]", votes._vote_count_kernel, {**count_ptrs, "x_ptr": x_ty, "w_ptr": w_ty},
            {"INT8": int8, "HAS_BIAS": True, "WRITE_PRED": True, "ALLOW_TF32": tf32,
             "BLOCK_B": 64, "BLOCK_C": 16, "BLOCK_F": 64},
            {"num_warps": 4, "num_stages": 3, **fused},
        ))
    variants.append((
        "argmax_count[fp32, 1024 classes]", votes._argmax_count_kernel,
        {"logits_ptr": "*fp32", "counts_ptr": "*i64", "pred_ptr": "*i64"},
        {"WRITE_PRED": False, "BLOCK_B": 16, "BLOCK_C": 1024}, {"num_warps": 8, "num_stages": 1, **fused},
    ))

    # -- packed linear / conv: every bit width, each epilogue kind --------------------------------
    gemm_types = {"x_ptr": "*i8", "w_ptr": "*i32", "w_scale_ptr": "*fp32", "bias_ptr": "*fp32", "wsum_ptr": "*i32",
                  "codes_ptr": "*i8", "x_scale": "fp32", "res_scale": "fp32", "out_scale": "fp32"}
    epilogues = [
        ("raw", {"res_ptr": "*i32", "out_ptr": "*i32"}, dict(HAS_BIAS=False, RELU=False, RES_MODE=0, OUT_MODE=0, OUT_DTYPE=tl.int32)),
        ("int8+res+relu", {"res_ptr": "*i8", "out_ptr": "*i8"}, dict(HAS_BIAS=True, RELU=True, RES_MODE=2, OUT_MODE=2, OUT_DTYPE=tl.int8)),
        ("fp16+res", {"res_ptr": "*fp32", "out_ptr": "*fp16"}, dict(HAS_BIAS=True, RELU=False, RES_MODE=1, OUT_MODE=1, OUT_DTYPE=tl.float16)),
        ("bf16", {"res_ptr": "*bf16", "out_ptr": "*bf16"}, dict(HAS_BIAS=True, RELU=True, RES_MODE=0, OUT_MODE=1, OUT_DTYPE=tl.bfloat16)),
        # float32 and its int8 codes (codes_also): a fused ResNet block output
        ("fp32+codes+res+relu", {"res_ptr": "*fp32", "out_ptr": "*fp32"},
         dict(HAS_BIAS=True, RELU=True, RES_MODE=1, OUT_MODE=3, OUT_DTYPE=tl.float32)),
    ]
    blocks = {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}
    for bits in range(2, 9):
        label, ptrs, epi = epilogues[bits % len(epilogues)]
        variants.append((
            f"packed_linear[b{bits}, {label}]", packed_matmul._packed_linear_kernel, {**gemm_types, **ptrs},
            {"X_ZP": bits == 8, "BITS": bits, "VALUES": 32 // bits, "WORD_TILES": 64 % (32 // bits) == 0, **epi,
             **blocks},
            {"num_warps": 4, "num_stages": 3, **fused},
        ))
    for kh, bits in [(3, 4), (1, 8), (3, 2)]:
        label, ptrs, epi = epilogues[(kh + bits) % len(epilogues)]
        variants.append((
            f"packed_conv2d[{kh}x{kh}, b{bits}, {label}]", packed_conv._packed_conv2d_kernel, {**gemm_types, **ptrs},
            {"X_ZP": bits == 8, "KH": kh, "KW": kh, "BITS": bits, "VALUES": 32 // bits,
             "WORD_TILES": 64 % (32 // bits) == 0, **epi, **blocks},
            {"num_warps": 4, "num_stages": 3, **fused},
        ))
    # -- the narrow tiles of the n16 / n32 buckets (CIFAR ResNet widths), as configs/*.json hold them
    for block_n, block_k, bits, which in [(16, 32, 4, 1), (32, 64, 8, 1), (16, 32, 4, 4), (64, 64, 8, 4)]:
        narrow = {"BLOCK_M": 128, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": 8}
        # int8 codes out (a chained conv1), or float and codes with the residual (a block's conv2)
        label, ptrs, epi = epilogues[which]
        variants.append((
            f"packed_conv2d[3x3, b{bits}, {label}, n{block_n}]", packed_conv._packed_conv2d_kernel,
            {**gemm_types, **ptrs},
            {"X_ZP": bits == 8, "KH": 3, "KW": 3, "BITS": bits, "VALUES": 32 // bits,
             "WORD_TILES": block_k % (32 // bits) == 0, **epi, **narrow},
            {"num_warps": 4, "num_stages": 3, **fused},
        ))
    # -- the tiles measured on an H200 (configs/*.json "NVIDIA H200"), with the fused epilogues
    for block_m, block_n, block_k, warps, which in [(256, 16, 32, 4, 1), (256, 32, 64, 8, 4), (64, 64, 64, 4, 4)]:
        tuned = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": 8}
        label, ptrs, epi = epilogues[which]
        variants.append((
            f"packed_conv2d[3x3, b4, {label}, {block_m}x{block_n}x{block_k} w{warps}]", packed_conv._packed_conv2d_kernel,
            {**gemm_types, **ptrs},
            {"X_ZP": False, "KH": 3, "KW": 3, "BITS": 4, "VALUES": 8, "WORD_TILES": True, **epi, **tuned},
            {"num_warps": warps, "num_stages": 3, **fused},
        ))
    # -- as launched: the ResNet-110 3x3 layers at batch 1000 (16, 32 and 64 channels, 4-bit weights,
    #    chained int8 codes out, or float32 + codes with the residual), with each card's tiles
    for channels, size, (block_m, block_n, block_k, warps), tiles in LAUNCHED_LAYERS:
        for which in (1, 4):
            label, ptrs, epi = epilogues[which]
            variants.append((
                f"packed_conv2d[3x3, b4, {label}, as launched: {channels} ch, {tiles} tiles]",
                packed_conv._packed_conv2d_kernel, {**gemm_types, **ptrs},
                {"X_ZP": False, "KH": 3, "KW": 3, "BITS": 4, "VALUES": 8, "WORD_TILES": True, **epi,
                 "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": 8},
                {"num_warps": warps, "num_stages": 3, **fused}, _conv_specimen(1000, size, channels, 4),
            ))
    # -- the same layers through the row loop (ARQ_TRITON_CONV_LOOP=rows; C is a constexpr there),
    #    and W8A8 (8-bit weights, unsigned 8-bit codes through the zero point) on the H200 tiles
    for channels, size, (block_m, block_n, block_k, warps), tiles in LAUNCHED_LAYERS:
        for which, bits, int8_weight in ((1, 4, False), (4, 4, False)) + (
                ((1, 8, False), (1, 8, True), (1, 4, True), (4, 4, True)) if tiles == "H200" else ()):
            label, ptrs, epi = epilogues[which]
            variants.append((
                f"packed_conv2d_rows[3x3, b{bits}{', int8 weights' if int8_weight else ''}, {label}, "
                f"as launched: {channels} ch, {tiles} tiles]",
                packed_conv._packed_conv2d_rows_kernel, {**gemm_types, **ptrs, "w8_ptr": "*i8", "psum_ptr": "*i32"},
                {"X_ZP": bits == 8, "C": channels, "KH": 3, "KW": 3, "BITS": bits, "VALUES": 32 // bits,
                 "WORD_TILES": block_k % (32 // bits) == 0 and (3 * channels) % (32 // bits) == 0,
                 "W_INT8": int8_weight, **epi,
                 "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": 8},
                {"num_warps": warps, "num_stages": 3, **fused}, _conv_specimen(1000, size, channels, bits),
            ))
    # -- the row loop's tuning candidates (packed_conv.ROWS_CANDIDATES), each on the layer of its width,
    #    W4A4 with int8 weights and chained codes: what bench_kernels' "rows" tuning launches on a card
    for candidate in packed_conv.ROWS_CANDIDATES:
        channels, size = {16: (16, 32), 32: (32, 16), 64: (64, 8)}[candidate["BLOCK_N"]]
        label, ptrs, epi = epilogues[1]
        tile = {key: candidate[key] for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")}
        variants.append((
            f"packed_conv2d_rows[tune candidate, {channels} ch, {label}, "
            f"{tile['BLOCK_M']}x{tile['BLOCK_N']}x{tile['BLOCK_K']} w{candidate['num_warps']} s{candidate['num_stages']}]",
            packed_conv._packed_conv2d_rows_kernel, {**gemm_types, **ptrs, "w8_ptr": "*i8", "psum_ptr": "*i32"},
            {"X_ZP": False, "C": channels, "KH": 3, "KW": 3, "BITS": 4, "VALUES": 8,
             "WORD_TILES": tile["BLOCK_K"] % 8 == 0 and (3 * channels) % 8 == 0, "W_INT8": True, **epi, **tile},
            {"num_warps": candidate["num_warps"], "num_stages": candidate["num_stages"], **fused},
            _conv_specimen(1000, size, channels, 4),
        ))
    variants.append((
        "packed_linear[b4, fp16+res, n16]", packed_matmul._packed_linear_kernel, {**gemm_types, **epilogues[2][1]},
        {"X_ZP": False, "BITS": 4, "VALUES": 8, "WORD_TILES": True, **epilogues[2][2],
         "BLOCK_M": 128, "BLOCK_N": 16, "BLOCK_K": 32, "GROUP_M": 8},
        {"num_warps": 4, "num_stages": 3, **fused},
    ))

    # -- quantize: float32 activations to int8 NHWC codes -------------------------------------------
    variants.append((
        "quantize_nhwc", quantize_family._quantize_nhwc_kernel, {"x_ptr": "*fp32", "out_ptr": "*i8", "scale": "fp32"},
        {"BLOCK": 2048}, {"num_warps": 8, "num_stages": 1, **fused},
    ))
    return variants


_FORBIDDEN = {
    "fma.rn.f64": re.compile(r"\bfma\.rn\.f64\b"),
    "fma.rn.f32": re.compile(r"\bfma\.rn(\.ftz)?\.f32\b"),
    "div.full.f32": re.compile(r"\bdiv\.full\.f32\b"),
}


# quantize_codes' half-to-even rounding: + 1.5 * 2^23 then - 1.5 * 2^23, each a rounded float32 add
_ROUND_ADD = re.compile(r"\badd\.rn\.f32\s+%\w+, %\w+, 0f4B400000;")
_ROUND_SUB = re.compile(r"\b(add\.rn\.f32\s+%\w+, %\w+, 0fCB400000|sub\.rn\.f32\s+%\w+, %\w+, 0f4B400000);")
_BYTE_LOAD = re.compile(r"\bld\.global(\.\w+)*\.[bsu]8\b")
_VECTOR_LOAD = re.compile(r"\bcp\.async\.cg\.shared\.global(\.\w+)* \[[^]]+\], \[[^]]+\], 0x10\b|"
                          r"\bld\.global(\.\w+)*\.v4\.b32\b")


def _quantizes(label: str) -> bool:
    """Whether the variant writes integer codes (and so divides by a quantization step)."""
    return any(part in label for part in ("quantize_nhwc", "noisy_input[int8", "noisy_input[uint8", "int8+", "codes"))


_SASS_LINE = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(.*)$")


def sass_stats(cubin: bytes) -> str:
    """Instruction counts of a kernel's SASS (``cuobjdump`` from Triton's package): the static
    total, each loop's body (a backward branch's span) and what follows the last tensor-core
    MMA (the epilogue). Executed counts are the static ones plus each body times its extra trips;
    the trips are the launch's (e.g. K / BLOCK_K), not known here."""
    import subprocess
    import tempfile

    import triton

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        sass = subprocess.run([cuobjdump, "--dump-sass", handle.name], capture_output=True, text=True, check=True).stdout
    code = [(int(m.group(1), 16), m.group(2)) for m in map(_SASS_LINE.match, sass.splitlines()) if m]
    loops = []
    for address, text in code:
        target = re.search(r"\bBRA (0x[0-9a-f]+)", text)
        if target and int(target.group(1), 16) < address:
            loops.append((address - int(target.group(1), 16)) // 16 + 1)
    mma = [i for i, (_, text) in enumerate(code) if re.search(r"\b[IH]GMMA\b|\bI?MMA\.", text)]
    after = len(code) - mma[-1] - 1 if mma else None
    return (f"sass: {len(code)} instructions, loop bodies {loops}, {len(mma)} MMA, "
            f"{after} after the last MMA")


def check(arch: int, verbose: bool = True, only: str | None = None, sass: bool = False) -> list[str]:
    """Compile every variant (whose label contains ``only``, when given) for ``sm_<arch>``;
    returns the failures (empty when all pass). ``sass``: also print :func:`sass_stats`."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from arq_kernels._common import QUOTIENT_DIVISION

    target = GPUTarget("cuda", arch, 32)
    failures = []
    for label, kernel, types, constexprs, options, *specimen in _variants():
        if only is not None and not any(part in label for part in only.split(";")):
            continue
        start = time.perf_counter()
        try:
            signature, attrs = _signature(kernel, types, constexprs), None
            if specimen:
                signature, constexprs, attrs = _as_launched(kernel, signature, constexprs, specimen[0])
            source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
            compiled = triton.compile(source, target=target, options=options)
            ptx = compiled.asm["ptx"]
            problems = [
                name for name, pattern in _FORBIDDEN.items()
                if pattern.search(ptx) and not (name == "fma.rn.f32" and "fp32-dot" in label)
            ]
            # channels a multiple of 16, contiguous: the implicit-GEMM gather must load 16 bytes at
            # a time (the generic variants, whose C may be any value, load bytes)
            if "packed_conv2d" in label and "as launched" in label and (
                    _BYTE_LOAD.search(ptx) or not _VECTOR_LOAD.search(ptx)):
                problems.append("activation gather not vectorized (byte loads)")
            if "cubin" not in compiled.asm:
                problems.append("no cubin")
            if "noisy_input" in label and "div.rn.f64" not in ptx:
                problems.append("no div.rn.f64")
            if QUOTIENT_DIVISION == "rn" and _quantizes(label) and not re.search(r"\bdiv\.rn(\.ftz)?\.f32\b", ptx):
                problems.append("no div.rn.f32 (ARQ_TRITON_DIVISION=rn)")
            if QUOTIENT_DIVISION == "f64" and _quantizes(label) and "div.rn.f64" not in ptx:
                problems.append("no div.rn.f64 (ARQ_TRITON_DIVISION=f64)")
            if _quantizes(label) and not (_ROUND_ADD.search(ptx) and _ROUND_SUB.search(ptx)):
                problems.append("rounding's two float32 adds of 1.5 * 2^23 folded or missing")
        except Exception as error:  # noqa: BLE001 - report every kernel, then fail
            problems = [f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"]
        seconds = time.perf_counter() - start
        status = "ok" if not problems else "FAIL " + "; ".join(problems)
        if verbose:
            print(f"sm_{arch} {label:42s} {seconds:6.1f} s  {status}", flush=True)
            if sass and not problems:
                print(f"    {sass_stats(compiled.asm['cubin'])}", flush=True)
        if problems:
            failures.append(f"sm_{arch} {label}: {'; '.join(problems)}")
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, action="append", help="compute capability x10 (default 90)")
    parser.add_argument("--only", help="semicolon-separated label substrings: compile just those variants")
    parser.add_argument("--sass", action="store_true", help="print each kernel's SASS instruction counts")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("0", ""):
        print("run with TRITON_INTERPRET=0: the interpreter replaces the kernels", file=sys.stderr)
        return 2
    failures = []
    for arch in args.arch or [90]:
        failures += check(arch, only=args.only, sass=args.sass)
    for failure in failures:
        print("FAILED", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
