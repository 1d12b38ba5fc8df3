"""Where the GPU time of one quantized certification goes, kernel by kernel (torch.profiler).

The H200 runs (benchmarks/results/gpu-h200-2026-11-27) measured the packed W4A4 path at 0.28x
the FP16 CUDA-graph peer on ResNet-110 without saying where the time goes; this names it:
``arq.certify`` of a W4A4 (and W8A8) ResNet-110 at batch 1000, after a warm-up call, under
``torch.profiler``, every CUDA kernel's total time grouped by name, written as JSON with the
share of the whole; each with the packed convolution's two K loops (``ARQ_TRITON_CONV_LOOP``:
im2col, the default, and rows), so the JSON also holds their A/B in kernel time.
benchmarks/gpu_check.sh runs it (step ``profile``).

    python -m benchmarks.gpu_profile OUT.json [resnet110|resnet20]
"""
from __future__ import annotations

import json
import os
import sys
from unittest import mock

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

import arq
from benchmarks.bench_e2e import _quantized, make_model

BATCH = 1000
SAMPLES = 5000


def _is_kernel(event) -> bool:
    """A GPU kernel's row (not an operator's, which repeats its kernels' device time)."""
    device_type = getattr(event, "device_type", None)
    if device_type is not None:
        return device_type == DeviceType.CUDA
    return not event.key.startswith("aten::")


def kernel_table(bits: tuple[int, int], arch: str, conv_loop: str = "im2col") -> dict:
    x = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0)).cuda()
    model = _quantized(make_model(arch), bits).cuda()
    run = lambda: arq.certify(model, x, n=SAMPLES - 100, n0=100, batch_size=BATCH)  # noqa: E731
    with mock.patch.dict(os.environ, {"ARQ_TRITON_CONV_LOOP": conv_loop}):
        run()  # compiles the Triton kernels
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            certificate = run()
            torch.cuda.synchronize()
    rows = []
    for event in prof.key_averages():
        device_us = getattr(event, "self_device_time_total", None)
        if device_us is None:
            device_us = getattr(event, "self_cuda_time_total", 0)
        if device_us > 0:
            rows.append({"name": event.key[:160], "calls": event.count, "device_us": round(device_us, 1),
                         "kind": "kernel" if _is_kernel(event) else "operator"})
    rows.sort(key=lambda row: -row["device_us"])
    # operators (aten::...) carry the device time of the kernels they launch, which have rows of
    # their own: the total and the shares count kernels only
    total = sum(row["device_us"] for row in rows if row["kind"] == "kernel")
    for row in rows:
        row["share"] = round(row["device_us"] / total, 4) if total else None
    return {"bits": list(bits), "arch": arch, "conv_loop": conv_loop, "samples": SAMPLES, "batch": BATCH,
            "backend": certificate.backend, "device_total_us": round(total, 1), "kernels": rows[:40]}


def main(out_path: str, arch: str = "resnet110") -> None:
    torch.backends.cudnn.benchmark = True
    tables = [kernel_table(bits, arch, loop) for bits in ((4, 4), (8, 8)) for loop in ("im2col", "rows")]
    with open(out_path, "w", encoding="utf-8") as handle:
        json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "tables": tables}, handle,
                  indent=1)
    for table in tables:
        print(f"W{table['bits'][0]}A{table['bits'][1]} {arch}, {table['conv_loop']} loop: "
              f"{table['device_total_us'] / 1e3:.1f} ms of kernels for {SAMPLES} samples [{table['backend']}]")
        for row in [row for row in table["kernels"] if row["kind"] == "kernel"][:12]:
            print(f"  {row['share']:6.1%} {row['device_us'] / 1e3:8.2f} ms {row['calls']:6d}x  {row['name'][:90]}")


if __name__ == "__main__":
    main(sys.argv[1], *sys.argv[2:3])
