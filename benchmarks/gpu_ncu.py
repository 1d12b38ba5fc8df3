"""One packed convolution per ResNet-110 stage, for Nsight Compute (``ncu``) to read its counters.

The H200 profile (benchmarks/results/gpu-h200-2026-11-28-session16) says the packed convolution
is 98 % of the quantized model's GPU time and runs at ~2 % of the card's int8 peak, and that the
64-channel layers are 0.5x cuDNN FP16 although their int8 MMA work per sample equals the 16-channel
layers'. Wall clock cannot say whether such a kernel waits on memory, on issue slots or on
latency; the counters can. This script launches, per 3x3 layer of ResNet-110 (16, 32, 64
channels, 4,096 samples, W4A4 as the engine chains it: int8 codes in, ReLU, int8 codes out), each
of the packed convolution's K loops (im2col, the default, and rows with the unpacked int8
weights) and cuDNN's FP16 NHWC convolution of the same layer, each once to compile (or to pick
cuDNN's algorithm) and once more between ``cudaProfilerStart`` and ``cudaProfilerStop``, which is
what ncu profiles when started with ``--profile-from-start off``:

    ncu --profile-from-start off --section SpeedOfLight ... python -m benchmarks.gpu_ncu

The profiled launches come in the order the script prints (layer by layer: im2col, rows, cuDNN;
cuDNN's call may be more than one kernel, named by ncu). The two packed loops are one Triton
kernel, ``_packed_conv2d_kernel``, compiled twice: ncu's launch order tells them apart.

benchmarks/gpu_check.sh runs it (step ``ncu``). Without a GPU it exits with status 2 and says so.
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

BATCH = 4096
BITS = 4
LAYERS = {  # name: (height = width, channels)
    "stage1_16ch": (32, 16),
    "stage2_32ch": (16, 32),
    "stage3_64ch": (8, 64),
}


def launches(height: int, channels: int, device: str | torch.device = "cuda", batch: int = BATCH) -> dict:
    """The variants of one 3x3, stride-1, padding-1 layer, each a no-argument callable returning its
    output (the packed ones int8 codes, cuDNN's float16 activations before quantization)."""
    from arq_kernels._common import pick_config, width_buckets
    from arq_kernels.packed_conv import packed_conv2d
    from arq_kernels.packed_matmul import pack_weights

    generator = torch.Generator().manual_seed(channels)
    limit = (1 << (BITS - 1)) - 1
    q = torch.randint(-limit, limit + 1, (channels, channels, 3, 3), generator=generator, dtype=torch.int8)
    q_matrix = q.permute(0, 2, 3, 1).reshape(channels, -1).contiguous()  # (kh, kw, c) order
    packed = pack_weights(q_matrix, BITS).to(device)
    scales = (torch.rand(channels, generator=generator) * 0.01).to(device)
    bias = torch.randn(channels, generator=generator).to(device)
    x = torch.randint(-7, 8, (batch, height, height, channels), generator=generator, dtype=torch.int8).to(device)
    rows = {**pick_config("packed_conv", x.device, width_buckets(channels)), "LOOP": "rows"}
    q8 = q_matrix.to(device)
    common = dict(kernel_size=3, stride=1, padding=1, relu=True, x_scale=0.02, out_scale=0.05, qmin=-7, qmax=7)
    x16 = (x.permute(0, 3, 1, 2).half() * 0.02).contiguous(memory_format=torch.channels_last)
    w16 = (q.to(device).float() * scales[:, None, None, None]).half().contiguous(memory_format=torch.channels_last)
    return {
        "packed_im2col": lambda: packed_conv2d(x, packed, BITS, scales, bias, **common),
        "packed_rows": lambda: packed_conv2d(x, packed, BITS, scales, bias, config=rows, int8_weight=q8, **common),
        "cudnn_fp16_nhwc": lambda: torch.relu(F.conv2d(x16, w16, bias.half(), padding=1)),
    }


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu_ncu: no CUDA device; nothing to profile", file=sys.stderr)
        return 2
    torch.backends.cudnn.benchmark = True
    for layer, (height, channels) in LAYERS.items():
        for variant, launch in launches(height, channels).items():
            launch()  # compiles (Triton) or picks an algorithm (cuDNN): not profiled
            torch.cuda.synchronize()
            torch.cuda.profiler.start()
            launch()
            torch.cuda.synchronize()
            torch.cuda.profiler.stop()
            print(f"gpu_ncu: profiled {layer} {variant}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
