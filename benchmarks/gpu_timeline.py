"""Where one quantized certification call's wall time goes: the model, the noise, the votes, or the host.

Session 26 (H200, benchmarks/results/gpu-h200-2026-11-29-session26): on ResNet-110 the graphed packed
W4A4 and W8A8 paths (and the eager W4A4 one) certified at 93-100k samples/s, with the im2col or the row
loop, although the row loop's tuned configs ran the layers 1.3-3x faster than the shared ones in the
tuning and session 25's profile put W8A8's kernels at 1.4x W4A4's: the kernels' speed did not show end
to end. This times the parts of ``arq.certify`` one by one, on the same model, input and batches, so
the bound is named:

* ``certify``: the whole call (n0 = 100 selection samples, then ``samples - 100``);
* ``prepare``: ``arq.smoothing.engine.prepare_model``'s per-call check (the cache's fingerprint);
* ``loop``: ``sample_counts`` alone (noise, model, NaN flag and votes, batch after batch, no selection);
* ``forward``: the prepared model (its CUDA graph when graphed) on one noisy batch, again and again;
* ``noise``: the noisy batches alone; ``votes``: the vote count of one batch's logits, again and again;
* ``profile``: one certify call under ``torch.profiler``: its wall time, the time some GPU kernel ran
  (the union of the kernels' intervals), the idle gaps between kernels and the host operators with the
  most time of their own;
* ``layers``: every convolution and linear layer of the eager model (the one a CUDA graph replays)
  timed alone on the input it got in one forward of the batch, slowest first: whether one layer (the
  stem, with its 3 input channels, say) costs far more than its share;
* ``peer`` (CUDA): the FP16 channels_last model's forward and its layers timed the same way, so each
  packed layer has its cuDNN counterpart measured in the same run;
* ``layers_cold`` (CUDA, also for the peer): the same layers, each call right after 256 MB of scratch
  writes have flushed L2 (CUDA events around the layer alone): if their sum, not the warm one, comes
  close to ``forward``, the layers' inputs coming from memory is what the warm times leave out;
* ``forward_by_batch`` (also for the peer): the forward at a quarter, half, one and two batches, in
  milliseconds per 1,000 samples. Why: the layers timed alone (above) read inputs that their last run
  left in L2, and a certification batch of 1,000 at ResNet stage 1 does not fit there (the float32
  stream alone is 64 MB against the H200's 50 MB of L2); if the time per sample falls with smaller
  batches, the engine should split GPU batches as it does CPU ones (``model_batches``).

Each time is per batch of ``batch`` samples, the median of ``repeats`` runs, after a warm-up; on
CUDA each run ends with a synchronization. If ``forward`` is close to ``loop``, the model's kernels
bound the call; if ``loop`` is well above ``forward + noise + votes``, the host is the bound.

    python -m benchmarks.gpu_timeline OUT.json [resnet110 resnet20 ...]   (benchmarks/gpu_check.sh: step timeline)
"""
from __future__ import annotations

import functools
import json
import os
import statistics
import sys
import time
from unittest import mock

import torch

import arq
from arq.smoothing.core import _noisy_batches, sample_counts
from arq.smoothing.engine import prepare_model
from arq.smoothing.noise import DRAW_ESTIMATE, resolve_backend
from arq.smoothing.votes import count_votes
from benchmarks.bench_e2e import SIGMA, _quantized, make_model

#: (arch, bits, conv loop) measured by default on CUDA: the issue's network at both bit widths, the
#: row loop beside im2col, and ResNet-20 (a fifth of the layers: what a fixed cost per batch weighs)
CUDA_CASES = (("resnet110", (4, 4), "im2col"), ("resnet110", (4, 4), "rows"), ("resnet110", (8, 8), "im2col"),
              ("resnet20", (4, 4), "im2col"))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up: compiles, captures, settles the allocator
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _busy_and_gaps(prof, wall_us: float) -> dict:
    """The union of the GPU kernels' intervals, and the idle gaps between them."""
    intervals = sorted((event.time_range.start, event.time_range.end) for event in prof.events()
                       if getattr(event, "device_type", None) == torch.autograd.DeviceType.CUDA
                       and event.time_range.end > event.time_range.start)
    if not intervals:
        return {"kernels": 0}
    busy, gaps = 0.0, []
    start, end = intervals[0]
    for lo, hi in intervals[1:]:
        if lo > end:
            busy += end - start
            gaps.append(lo - end)
            start, end = lo, hi
        else:
            end = max(end, hi)
    busy += end - start
    gaps.sort(reverse=True)
    return {"kernels": len(intervals), "gpu_busy_us": round(busy, 1),
            "gpu_busy_share_of_wall": round(busy / wall_us, 3) if wall_us else None,
            "first_to_last_kernel_us": round(end - intervals[0][0], 1),
            "gaps_over_20us": sum(1 for gap in gaps if gap > 20), "gap_us_total": round(sum(gaps), 1),
            "largest_gaps_us": [round(gap, 1) for gap in gaps[:8]]}


def forward_by_batch(run_model, make_batch, device: torch.device, batch: int, repeats: int = 3,
                     samples: int = 1000) -> dict:
    """``run_model`` on batches of ``batch`` // 4, // 2, x 1 and x 2 samples (``make_batch(size)``), in
    milliseconds per 1,000 samples (the median of ``repeats`` runs of ``samples`` samples or more each)."""
    result = {}
    for size in sorted({max(1, batch // 4), max(1, batch // 2), batch, 2 * batch}):
        inputs = make_batch(size)
        calls = max(1, -(-samples // size))
        seconds = _median_seconds(lambda: [run_model(inputs) for _ in range(calls)], device, repeats)
        result[str(size)] = round(seconds / (calls * size) * 1e6, 3)
    return result


#: bytes written before each cold call of a layer: several times the L2 of the cards arq is measured on
#: (H100 and H200: 50 MB), so the layer's inputs and weights are read from memory, as in a forward
EVICT_BYTES = 256 << 20


def _cold_us(call, device: torch.device, repeats: int) -> float:
    """The median GPU time (CUDA events around the call alone) of ``call`` right after writing
    ``EVICT_BYTES`` of scratch memory, which leaves none of its inputs in L2."""
    scratch = torch.empty(EVICT_BYTES, dtype=torch.uint8, device=device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    call()  # warm-up: compiles, captures, settles the allocator
    times = []
    for _ in range(repeats):
        scratch.fill_(len(times) % 251)
        start.record()
        call()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def layer_times(prepared, batch: torch.Tensor, device: torch.device, repeats: int = 10, cold: bool = False) -> dict:
    """Each convolution or linear layer of ``prepared`` (unwrapped from its CUDA graph) timed alone, in
    microseconds a call, on the arguments it received in one forward of ``batch``. Warm (default): a
    run of ``repeats`` calls, so each reads what the one before left in L2; ``cold`` (CUDA only): each
    call after L2 is flushed (:func:`_cold_us`), as in a forward where the previous layers' outputs
    and the stream have passed through L2 since."""
    from arq.smoothing.engine import CudaGraphForward

    model = prepared.model if isinstance(prepared, CudaGraphForward) else prepared
    calls, hooks = [], []
    for name, module in model.named_modules():
        if next(module.children(), None) is None and any(kind in type(module).__name__ for kind in ("Conv", "Linear")):
            hooks.append(module.register_forward_pre_hook(
                lambda layer, args, kwargs, name=name: calls.append((name, layer, args, kwargs)), with_kwargs=True))
    try:
        with torch.inference_mode():
            model(batch)
    finally:
        for hook in hooks:
            hook.remove()
    layers = []
    with torch.inference_mode():
        for name, layer, args, kwargs in calls:
            if cold and device.type == "cuda":
                us = _cold_us(lambda: layer(*args, **kwargs), device, repeats)
            else:
                us = _median_seconds(lambda: [layer(*args, **kwargs) for _ in range(repeats)], device, 3) / repeats * 1e6
            layers.append({"name": name, "type": type(layer).__name__, "us": round(us, 1),
                           **{key: getattr(layer, key) for key in ("in_channels", "out_channels") if hasattr(layer, key)},
                           **{key: list(value) if isinstance(value, (tuple, list)) else value
                              for key in ("kernel_size", "stride") if (value := getattr(layer, key, None)) is not None}})
    total = sum(layer["us"] for layer in layers)
    return {"count": len(layers), "total_us": round(total, 1),
            "by_time": sorted(layers, key=lambda layer: -layer["us"])}


def _fail_soft(errors: dict, name: str, fn):
    """``fn()``, or None with its error recorded as ``errors[name]``: a failing part must not cost the others."""
    try:
        return fn()
    except Exception as error:  # noqa: BLE001
        errors[name] = _error_text(error)
        return None


def measure(arch: str, bits: tuple[int, int], conv_loop: str, *, device: str = "cuda", graphs: bool = True,
            samples: int = 10_000, batch: int = 1000, repeats: int = 3, profile: bool = True) -> dict:
    """One case's times (module docstring), per batch, in milliseconds; a part that fails is named
    in ``errors`` and the others are still measured."""
    device = torch.device(device)
    env = {"ARQ_TRITON_CONV_LOOP": conv_loop} if device.type == "cuda" else {}
    errors: dict[str, str] = {}
    part = functools.partial(_fail_soft, errors)

    with mock.patch.dict(os.environ, env):
        x = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0)).to(device)
        model = _quantized(make_model(arch), bits).to(device).eval()
        backend = resolve_backend("auto", device)
        graphed = graphs and device.type == "cuda"
        run_model, tag = prepare_model(model, backend, device, cuda_graphs=graphed)
        batches = max(1, samples // batch)
        common = dict(sigma=SIGMA, seed=0, input_index=0, batch_size=batch, num_classes=10, backend=backend)
        result = {"arch": arch, "bits": list(bits), "conv_loop": conv_loop if env else None, "device": str(device),
                  "graphs": graphed, "backend": backend + tag, "samples": samples, "batch": batch,
                  "batches": batches, "repeats": repeats}

        def certify():
            arq.certify(model, x, n=samples - 100, n0=100, batch_size=batch, backend="auto")

        def timed(fn):
            return lambda: _median_seconds(fn, device, repeats) / batches

        def noisy_batch(size):
            return next(_noisy_batches(x, sigma=SIGMA, num=size, draw=DRAW_ESTIMATE, seed=0, input_index=0,
                                       batch_size=size, backend=backend, model=run_model))

        per_batch = {"certify": part("certify", timed(certify))}
        with torch.inference_mode():
            noisy = noisy_batch(batch)
            logits = run_model(noisy).clone()

            def forward():
                for _ in range(batches):
                    run_model(noisy)

            def noise():
                for _ in _noisy_batches(x, sigma=SIGMA, num=batches * batch, draw=DRAW_ESTIMATE, seed=0,
                                        input_index=0, batch_size=batch, backend=backend, model=run_model):
                    pass

            def votes():
                for _ in range(batches):
                    count_votes(logits, 10, backend=backend)

            per_batch["forward"] = part("forward", timed(forward))
            result["forward_by_batch_ms_per_1000"] = part(
                "forward_by_batch", lambda: forward_by_batch(run_model, noisy_batch, device, batch))
            per_batch["loop"] = part("loop", timed(lambda: sample_counts(
                run_model, x, num=batches * batch, draw=DRAW_ESTIMATE, **common)))
            per_batch["noise"] = part("noise", timed(noise))
            per_batch["votes"] = part("votes", timed(votes))
        per_batch["prepare"] = part("prepare", timed(lambda: prepare_model(model, backend, device, cuda_graphs=graphed)))
        per_batch = {name: seconds for name, seconds in per_batch.items() if seconds is not None}
        result["ms_per_batch"] = {name: round(seconds * 1e3, 3) for name, seconds in per_batch.items()}
        result["samples_per_s"] = {name: round(batch / seconds) for name, seconds in per_batch.items()
                                   if name in ("certify", "loop", "forward")}
        result["layers"] = part("layers", lambda: layer_times(run_model, noisy, device))
        if device.type == "cuda":
            result["layers_cold"] = part("layers_cold", lambda: layer_times(run_model, noisy, device, cold=True))
        if profile:
            result["profile"] = part("profile", lambda: _profiled(certify, device))
    result["errors"] = errors
    return result


def _error_text(error: Exception) -> str:
    return f"{type(error).__name__}: {error}"[:300]


def _save(results: dict, out_path: str) -> None:
    with open(out_path, "w", encoding="utf-8") as handle:  # after each case: a cut run keeps what it did
        json.dump(results, handle, indent=1)


def _profiled(call, device: torch.device) -> dict:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        start = time.perf_counter()
        call()
        _sync(device)
        wall_us = (time.perf_counter() - start) * 1e6
    return {"wall_us": round(wall_us, 1), **_busy_and_gaps(prof, wall_us),
            "host_ops_by_self_time_us": [[event.key[:80], event.count, round(event.self_cpu_time_total, 1)]
                                         for event in sorted(prof.key_averages(),
                                                             key=lambda e: -e.self_cpu_time_total)[:15]]}


def peer_layers(arch: str, batch: int = 1000, repeats: int = 3, device: str = "cuda", sweep_samples: int = 1000) -> dict:
    """The FP16 channels_last peer (cuDNN) beside the packed cases: its forward alone per batch and its
    layers timed alone, so each packed layer has its cuDNN counterpart in the same run (on CUDA; another
    device runs the same code, for a check)."""
    device = torch.device(device)
    model = make_model(arch).to(device).half().to(memory_format=torch.channels_last)
    x = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0)).to(device)

    def noisy_batch(size):
        return (x + SIGMA * torch.randn(size, 3, 32, 32, device=device)).half().contiguous(
            memory_format=torch.channels_last)

    noisy = noisy_batch(batch)
    result = {"arch": arch, "peer": "fp16_channels_last_cudnn_eager", "batch": batch}
    errors = {}
    with torch.inference_mode():
        result["ms_per_batch"] = {"forward": round(_median_seconds(lambda: model(noisy), device, repeats) * 1e3, 3)}
        result["layers"] = layer_times(model, noisy, device)
        # the newer parts fail alone (None, their error named), as a case's parts do
        result["forward_by_batch_ms_per_1000"] = _fail_soft(
            errors, "forward_by_batch", lambda: forward_by_batch(model, noisy_batch, device, batch, samples=sweep_samples))
        result["layers_cold"] = _fail_soft(errors, "layers_cold", lambda: layer_times(model, noisy, device, cold=True))
    result["errors"] = errors
    return result


def _layer_totals(entry: dict) -> dict:
    """The sums of the warm and cold layer tables, in milliseconds a batch (for the console line)."""
    return {f"{part}_total_ms": round(table["total_us"] / 1e3, 3) for part in ("layers", "layers_cold")
            if isinstance(table := entry.get(part), dict) and "total_us" in table}


def main(out_path: str, archs: list[str]) -> None:
    results = {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
               "torch": torch.__version__, "cases": []}
    if torch.cuda.is_available():
        cases = [case for case in CUDA_CASES if not archs or case[0] in archs]
        kwargs = {}
    else:  # the CPU's integer model, without graphs: the script's own check on a CPU-only machine
        cases = [(arch, (4, 4), "im2col") for arch in (archs or ["resnet20"])]
        kwargs = dict(device="cpu", samples=800, batch=400, repeats=1)
    for arch, bits, loop in cases:
        try:
            case = measure(arch, bits, loop, **kwargs)
        except Exception as error:  # noqa: BLE001 - one failing case must not cost the others
            case = {"arch": arch, "bits": list(bits), "conv_loop": loop, "error": _error_text(error)}
        results["cases"].append(case)
        print(json.dumps({**{k: case.get(k) for k in ("arch", "bits", "conv_loop", "backend", "ms_per_batch",
                                                        "forward_by_batch_ms_per_1000", "samples_per_s", "error",
                                                        "errors")}, **_layer_totals(case)}), flush=True)
        _save(results, out_path)
    if torch.cuda.is_available():
        results["peer"] = []
        for arch in sorted({case[0] for case in cases}):
            try:
                peer = peer_layers(arch)
            except Exception as error:  # noqa: BLE001
                peer = {"arch": arch, "error": _error_text(error)}
            results["peer"].append(peer)
            print(json.dumps({**{k: peer.get(k) for k in ("arch", "ms_per_batch", "forward_by_batch_ms_per_1000",
                                                          "error", "errors")}, **_layer_totals(peer)}), flush=True)
            _save(results, out_path)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "timeline.json", sys.argv[2:])
