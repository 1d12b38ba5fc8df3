"""Every GPU path of the end-to-end benchmark once, small, for ``compute-sanitizer --tool memcheck``.

benchmarks/gpu_check.sh runs it under the sanitizer: the FP16 CUDA-graph baseline, ``arq.certify``
on the float model (CUDA noise and votes), on the W4A4 and W8A8 models (packed Triton
kernels, chained codes, the 8-bit zero point) and on W4A4 under the engine's CUDA graphs, then
the graph again. Any out-of-bounds access is reported with the kernel's name.

    python -m benchmarks.gpu_memcheck [resnet20|resnet110]
"""
from __future__ import annotations

import copy
import sys

import torch

import arq
from arq.smoothing.engine import prepare_model
from benchmarks.bench_e2e import _graphed_fp16_loop, _quantized, make_model

BATCH = 100


def main(arch: str) -> None:
    x = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0)).cuda()
    model = make_model(arch)
    graphed = _graphed_fp16_loop(copy.deepcopy(model).cuda().half().to(memory_format=torch.channels_last), x,
                                 BATCH, 10, 0.25)
    print("fp16 graph", graphed(2 * BATCH).tolist(), flush=True)
    print("arq fp32", arq.certify(model.cuda(), x, n=2 * BATCH, n0=BATCH, batch_size=BATCH), flush=True)
    for bits, graphs in (((4, 4), False), ((8, 8), False), ((4, 4), True)):
        quantized = _quantized(make_model(arch), bits).cuda()
        if graphs:
            prepare_model(quantized, "auto", "cuda", cuda_graphs=True)
        certificate = arq.certify(quantized, x, n=2 * BATCH, n0=BATCH, batch_size=BATCH)
        print(f"arq W{bits[0]}A{bits[1]}", certificate, certificate.backend, flush=True)
    print("fp16 graph again", graphed(2 * BATCH).tolist(), flush=True)
    torch.cuda.synchronize()
    print("memcheck script: done", flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "resnet110")
