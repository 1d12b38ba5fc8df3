"""Builds arq's compiled ops, ``arq._C``.

The C++ sources in ``csrc/cpu`` are always built. The CUDA sources in
``csrc/cuda`` are added when torch was built with CUDA and nvcc is found
(``CUDA_HOME``), unless ``ARQ_SKIP_CUDA=1``; ``ARQ_FORCE_CUDA=1`` makes a
missing toolkit an error instead of a silent CPU-only build. Without a GPU,
``TORCH_CUDA_ARCH_LIST`` picks the architectures (default "8.0;9.0").
Install with ``pip install --no-build-isolation -e .`` (this file imports torch).
"""
import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _loaded_libstdcxx():
    """Path of the libstdc++ this process (Python with torch imported) has loaded, or None.

    arq._C must use that same C++ runtime. A compiler that links libstdc++ statically
    (seen on a GPU image whose setuptools compiler is /opt/gcc/bin/g++; Python's own
    ``-Wl,-Bsymbolic-functions`` then binds the copy locally) puts a second runtime with
    its own locale facet ids in the process, and the first integer formatted into one of
    torch's error messages crashes it (benchmarks/results/gpu-h200-2026-11-27/README.md).
    Naming the loaded shared library on the link line resolves libstdc++ from it first.
    """
    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:
            paths = {line.split()[-1] for line in maps if "/libstdc++.so" in line}
    except OSError:  # not Linux
        return None
    return sorted(paths)[0] if len(paths) == 1 else None


def _extensions():
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:  # metadata-only builds (sdist inspection) still work
        print("arq setup: torch not importable, building without arq._C", file=sys.stderr)
        return [], {}

    cpu_sources = sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    skip_cuda, force_cuda = _flag("ARQ_SKIP_CUDA"), _flag("ARQ_FORCE_CUDA")
    nvcc_found = cpp_extension.CUDA_HOME is not None and (
        os.path.exists(os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")) or shutil.which("nvcc")
    )
    with_cuda = torch.version.cuda is not None and nvcc_found and not skip_cuda and bool(cuda_sources)
    if force_cuda and not with_cuda:
        raise RuntimeError(
            "ARQ_FORCE_CUDA=1 but the CUDA sources cannot be built: "
            f"torch.version.cuda={torch.version.cuda!r}, CUDA_HOME={cpp_extension.CUDA_HOME!r}, "
            f"ARQ_SKIP_CUDA={skip_cuda}"
        )
    if with_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"

    # -ffp-contract=off / -fmad=false: the noise transform must round every
    # + and * separately so that all backends give bit-identical samples.
    cxx = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-fast-math", "-fno-trapping-math"]
    nvcc = ["-O3", "--fmad=false", "-prec-div=true", "-prec-sqrt=true"]
    macros = [("ARQ_WITH_CUDA", "1")] if with_cuda else []
    include_dirs = [os.path.join(ROOT, "csrc")]
    if with_cuda:
        # pip's CUDA builds of torch keep some toolkit headers (cusparse.h, ...) in
        # site-packages/nvidia/*/include rather than under CUDA_HOME.
        nvidia_root = os.path.join(os.path.dirname(os.path.dirname(torch.__file__)), "nvidia")
        include_dirs += sorted(glob.glob(os.path.join(nvidia_root, "*", "include")))
    libstdcxx = _loaded_libstdcxx()
    kwargs = dict(
        name="arq._C",
        sources=cpu_sources + (cuda_sources if with_cuda else []),
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx, "nvcc": nvcc} if with_cuda else {"cxx": cxx},
        extra_link_args=["-fopenmp"] + ([libstdcxx] if libstdcxx else []),
        define_macros=macros,
        py_limited_api=False,
    )
    ext = cpp_extension.CUDAExtension(**kwargs) if with_cuda else cpp_extension.CppExtension(**kwargs)
    print(f"arq setup: building arq._C with{'' if with_cuda else 'out'} CUDA", file=sys.stderr)
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
