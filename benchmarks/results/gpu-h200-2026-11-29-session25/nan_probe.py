"""Where the synthetic ResNet's float logits stop being finite on a GPU (ad hoc probe)."""
import sys

import torch

from arq.smoothing.noise import noisy_batch
from benchmarks.bench_e2e import make_model


def first_nonfinite(model, batch):
    found = []

    def hook(module, inputs, output):
        if not found and isinstance(output, torch.Tensor) and not torch.isfinite(output).all():
            found.append((module.__class__.__name__, name_of[module], float(inputs[0].abs().max())))

    name_of = {m: n for n, m in model.named_modules()}
    handles = [m.register_forward_hook(hook) for m in model.modules()]
    with torch.no_grad():
        out = model(batch)
    for h in handles:
        h.remove()
    return found, float(out.abs().max()), int(torch.isnan(out).sum())


def main(arch):
    x = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))
    cpu_noise = noisy_batch(x, 0.25, seed=0, input_index=0, draw=0, sample_start=0, count=100, backend="torch")
    for backend in ("cuda", "triton", "torch"):
        try:
            noisy = noisy_batch(x.cuda(), 0.25, seed=0, input_index=0, draw=0, sample_start=0, count=100,
                                backend=backend)
            print(backend, "finite", bool(torch.isfinite(noisy).all()), "max|diff| vs cpu torch",
                  float((noisy.cpu() - cpu_noise).abs().max()), flush=True)
        except Exception as error:
            print(backend, "error", repr(error)[:200], flush=True)
    model = make_model(arch)
    with torch.no_grad():
        print("cpu logits max", float(model(cpu_noise).abs().max()), flush=True)
    net = model.cuda()
    for tf32 in (True, False):
        for bench in (False, True):
            torch.backends.cudnn.allow_tf32 = tf32
            torch.backends.cudnn.benchmark = bench
            print(f"tf32={tf32} benchmark={bench}", first_nonfinite(net, cpu_noise.cuda()), flush=True)
    torch.backends.cudnn.enabled = False
    print("cudnn off", first_nonfinite(net, cpu_noise.cuda()), flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "resnet110")
