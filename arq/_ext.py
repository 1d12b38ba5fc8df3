"""Loads arq's compiled ops (``arq._C``) once, lazily.

Importing ``arq._C`` registers the C++ (and, when built, CUDA) kernels of the
``torch.ops.arq`` operators. When it is missing (a pure-Python install) every
op falls back to its plain PyTorch reference and one warning says so.
"""
from __future__ import annotations

import functools
import importlib.util
import logging
import mmap
import os
import struct
import sys
import warnings

_log = logging.getLogger("arq")


def elf_needed_libraries(path: str) -> list[str] | None:
    """The ``DT_NEEDED`` entries of a little-endian ELF64 shared object, or None if it is not one.

    Mapped, not read: only the headers and the dynamic section are touched, not the megabytes
    of code (this runs when the compiled ops are first used)."""
    with open(path, "rb") as handle:
        if os.fstat(handle.fileno()).st_size < 64:
            return None
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return _needed_from_elf(data)


def _needed_from_elf(data) -> list[str] | None:
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return None
    (section_offset,) = struct.unpack_from("<Q", data, 0x28)
    entry_size, count = struct.unpack_from("<HH", data, 0x3A)
    # Elf64_Shdr: name, type, flags, addr, offset, size, link, info, addralign, entsize
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, section_offset + i * entry_size) for i in range(count)]
    needed = []
    for section in sections:
        if section[1] != 6:  # SHT_DYNAMIC
            continue
        strings = sections[section[6]][4]
        for j in range(section[5] // 16):
            tag, value = struct.unpack_from("<qQ", data, section[4] + 16 * j)
            if tag == 1:  # DT_NEEDED
                start = strings + value
                end = data.find(b"\0", start)
                if end < 0:
                    raise ValueError(f"unterminated DT_NEEDED name at offset {start}")
                needed.append(data[start:end].decode())
    return needed


def _private_cxx_runtime() -> str | None:
    """Why arq._C must not be loaded, if it carries its own copy of libstdc++ (Linux), else None.

    Such a build (a compiler that links libstdc++ statically) puts a second C++ runtime in the
    process beside the one torch loaded; the two disagree on locale facets and the first
    integer formatted into an error message crashes the interpreter. setup.py links the loaded
    libstdc++ explicitly to prevent it; this catches a build made some other way.
    """
    if not sys.platform.startswith("linux"):
        return None
    spec = importlib.util.find_spec("arq._C")
    if spec is None or not spec.origin or not os.path.exists(spec.origin):
        return None
    needed = elf_needed_libraries(spec.origin)
    if needed is None or any(name.startswith("libstdc++") for name in needed):
        return None
    return (f"{spec.origin} links libstdc++ statically (no libstdc++.so among {needed}), so it would run "
            "a second C++ runtime beside torch's; rebuild with `pip install --no-build-isolation -e .` "
            "using this setup.py")


@functools.lru_cache(maxsize=None)
def compiled_ops_available() -> bool:
    """True when ``arq._C`` imported and registered its ops."""
    import torch  # noqa: F401  (arq._C links against libtorch/libc10, which importing torch loads)

    problem = _private_cxx_runtime()
    if problem:
        warnings.warn(f"arq: not loading compiled ops (arq._C): {problem}; using the pure-PyTorch fallbacks.",
                      RuntimeWarning, stacklevel=3)
        return False
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
