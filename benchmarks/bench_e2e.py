"""End-to-end certification throughput (issue 5): noisy samples per second, every variant in one run.

Same input, same sample count, same batch size for every variant of a network; the variants of a
network are timed round robin (each round runs every variant once; median per variant) so that the
load of a shared machine falls on all alike. The ratio to the locuslab/smoothing-style loop is
printed and stored in ``extra_info`` (``speedup_vs_locuslab``, ``ratio_to_best_non_arq``).

CPU variants (``ARQ_E2E_DEVICE=cpu``, the default), CIFAR ResNet-20 and ResNet-110
(``arq.models.get_architecture``, random weights with randomized BatchNorm statistics), batch 400:

* ``locuslab_fp32``        locuslab's ``Smooth._sample_noise`` loop, eager FP32
* ``locuslab_compiled``    the same loop around ``torch.compile(model)``
* ``locuslab_pt2e_int8``   the same loop around torchao's pt2e int8 (X86InductorQuantizer) + compile
                           (its own 8-bit observers: speed comparison only, no arq policy)
* ``arq_w8a8``             ``arq.certify`` on the W8A8 fake-quant model, backend "auto": C++ noise,
                           the integer model (``arq.quant.to_integer``, default ``conv_kernel``), C++ votes
* ``arq_w8a8_compiled``    the same with the integer model compiled (prepared once with
                           ``arq.smoothing.engine.prepare_model(..., compile=True)``)
* ``arq_w4a4``, ``arq_w4a4_compiled``  the same for W4A4
* ``arq_w8a8r8``, ``arq_w8a8r8_compiled``, ``arq_w4a4r8``, ``arq_w4a4r8_compiled``  W8A8 / W4A4 with an 8-bit
                           residual stream (``QuantConfig(residual_bits=8)``, its shortcuts quantized too):
                           uint8 between blocks, every add inside oneDNN's conv (as pt2e does); at W8A8 the
                           stream's codes pass through, the graph pt2e runs
* ``arq_w4a4r8fs``, ``arq_w4a4r8fs_compiled``  the same with float shortcuts (``residual_shortcuts=False``):
                           the first block and the downsampling blocks add in float32, on request
* ``<peer>_b100``          a peer's loop at batch 100 (``locuslab_fp32_b100``, ``locuslab_pt2e_int8_b100``,
                           ...), on request: on hosts without AVX-512 arq's engine splits CPU batches into
                           chunks of at most 128 samples for most models (``arq.smoothing.engine.model_batches``;
                           400 -> 4 x 100), so a peer can also be timed at that batch size
* ``<arq variant>_nochunk`` the arq variant with ``ARQ_CPU_CHUNK=0`` (whole batches of 400), on request
                           (without AVX-512: ``<arq variant>_chunk`` sets ``ARQ_CPU_CHUNK=128``, the other way round
                           for the models that default to whole batches there)
* ``<arq variant>_floatnoise`` the arq variant with ``ARQ_INPUT_CODES=0``: the noise as float32 images that
                           the model normalizes and quantizes itself, rather than written directly as its
                           first layer's codes (``arq.smoothing.noise.noisy_codes_batch``), on request
* ``<arq variant>_lowbit`` the arq variant with ``ARQ_CONV_KERNEL=arq``: every integer convolution
                           through ``arq::lowbit_conv2d`` where it applies (1x1 ones too), on request
* ``<arq variant>_onednn`` the arq variant with ``ARQ_CONV_KERNEL=onednn``: every integer convolution
                           through oneDNN (the default "auto" takes ``arq::lowbit_conv2d`` for the
                           3x3 ones on AVX2 hosts without VNNI or AVX-512), on request
* ``<arq variant>_direct`` the arq variant with ``ARQ_LOWBIT_WINOGRAD=0``: ``arq::lowbit_conv2d``'s direct
                           AVX2 loop for the 3x3 stride-1 layers instead of its Winograd ones, on request
* ``<arq variant>_winorow`` the arq variant with ``ARQ_LOWBIT_WINOGRAD=row``: Winograd F(2, 3) for every
                           3x3 stride-1 layer that fits it (no F(2 x 2, 3 x 3)), on request
* ``<arq variant>_wino2d`` the arq variant with ``ARQ_LOWBIT_WINOGRAD=2d``: F(2 x 2, 3 x 3) wherever it
                           fits, below 32 input channels too, on request

``ARQ_E2E_VARIANTS`` (a comma-separated list) picks variants; ``locuslab_fp32`` is always included.

GPU variants (``ARQ_E2E_DEVICE=cuda``; benchmarks/gpu_check.sh sets it), batch 1000:

* ``locuslab_fp32``        the locuslab loop, eager FP32 (cuDNN TF32)
* ``fp16_cl_cudagraphs``   FP16 channels_last model (cuDNN), one batch of noise, forward, argmax and
                           counts captured as one CUDA graph and replayed; one sync at the end
* ``fp16_cl_cudagraphs_b250``  the same peer in batches of 250 (any ``_b<N>`` dividing the samples): if arq
                           gains from smaller GPU batches (``arq_w4a4_chunk250``), the peer is given the
                           same chance; the ratios to "the best non-arq" take the faster of the two
* ``fp16_cl_compiled``     (on request) the same loop around ``torch.compile(mode="reduce-overhead")``:
                           Inductor's kernels under its CUDA graphs (a minute or more of compile for ResNet-110)
* ``arq_fp32``             ``arq.certify`` on the float model (CUDA/Triton noise and votes)
* ``arq_fp16_cl``          ``arq.certify`` on the FP16 channels_last model
* ``arq_w8a8``, ``arq_w4a4``  ``arq.certify`` on the W8A8 / W4A4 model: the engine runs arq's
                           packed Triton kernels (``arq.quant.kernels``; ``certificate_backend``
                           "...+packed+graphs": replayed from the engine's CUDA graphs, its default for
                           them since 2026-11-29), or the fake-quant model where they are unavailable
* ``arq_w8a8_nographs``, ``arq_w4a4_nographs``  the same with ``ARQ_CUDA_GRAPHS=0`` (eager launches),
                           paired per round with their base (``paired_ratio_to_base``)
* ``arq_fp16_cl_graphs``   ``arq_fp16_cl`` with the engine's CUDA graphs (``prepare_model(...,
                           cuda_graphs=True)``; opt-in for float models), paired with ``arq_fp16_cl``;
                           on request any ``<arq variant>_graphs``
* ``arq_w8a8_rows``, ``arq_w4a4_rows``  ``ARQ_TRITON_CONV_LOOP=rows``: the packed convolution's row loop
                           with the layers' unpacked int8 weights, paired with the base; any
                           ``<arq variant>_rows``
* ``arq_w4a4_autoloop``    (on request) ``ARQ_TRITON_CONV_LOOP=auto``: im2col for the 3x3 layers of 16 channels, rows
                           for the others (``arq_kernels.packed_conv.loop_for_layer``); any
                           ``<arq variant>_autoloop``
* ``arq_w4a4_chunk250``    ``ARQ_GPU_CHUNK=250``: the model sees each batch of 1,000 noisy samples in four
                           calls of 250 (the same samples and votes; ``arq.smoothing.engine.gpu_chunk``),
                           paired with ``arq_w4a4``; any ``<arq variant>_chunk250`` or ``_chunk500``
* ``arq_w4a4_noplans``     (on request) ``arq_w4a4`` with ``ARQ_TRITON_LAUNCH_PLANS=0``: every packed
                           convolution checks and derives its launch afresh each call (as before
                           2026-11-29; with ``_nographs`` the A/B that shows it); any ``<arq variant>_noplans``
* ``arq_w4a4_floatnoise``  (on request) ``arq_w4a4`` with ``ARQ_INPUT_CODES=0``: float32 noisy images
                           that the packed model normalizes and quantizes itself, instead of its stem's
                           int8 codes written by the Triton noise kernel

Run (CPU):  ``OMP_WAIT_POLICY=PASSIVE pytest benchmarks/bench_e2e.py --benchmark-only
--benchmark-json benchmarks/results/cpu-e2e-<date>.json``.  ``ARQ_E2E_ARCHS=resnet20`` limits the
networks, ``ARQ_E2E_ROUNDS`` sets the round-robin rounds (default 3, after one untimed first call that compiles),
``ARQ_E2E_SAMPLES`` the samples per call for every network. Each arq call is one ``arq.certify`` (n0 = 100, then
n = samples - 100, in batches of 400: a short call also runs a batch of 100 and one of 300 and checks the model's
classes once, which a peer's single loop of full batches does not; longer calls weigh those less, as
certification at n = 100,000 does). On the GPU (batch 1000) a call is 100,000 samples on ResNet-20 and 30,000
on ResNet-110 (20,000 and 10,000 before 2026-11-28, so the session-5 figures weigh the fixed costs more).
"""
from __future__ import annotations

import copy
import importlib.util
import os
import platform
import statistics
import time
from unittest import mock

import pytest
import torch

import arq
from arq.models import get_architecture
from arq.models.cifar_resnet import BasicBlock
from benchmarks.locuslab_baseline import locuslab_sample_noise

DEVICE = os.environ.get("ARQ_E2E_DEVICE", "cpu")
ROUNDS = int(os.environ.get("ARQ_E2E_ROUNDS", "3"))
SIGMA = 0.25
N0 = 100
if DEVICE == "cuda":
    BATCH = 1000
    # a call's fixed costs (the n0 = 100 batch, the remainder batch, the selection's sync) are a
    # large share of a short call at GPU speed (10,000 ResNet-110 samples took 0.14 s on an H200,
    # 2026-11-27): longer calls, closer to certification at n = 100,000, within gpu_check's budget
    SAMPLES = {"resnet20": 100_000, "resnet110": 30_000}
    # the CUDA graph is captured last, after every other variant's first call has allocated what it
    # needs. The float-noise variant is on request: level with its base on ResNet-110 on an H200
    # (2026-11-28, benchmarks/results/gpu-h200-2026-11-28-session16). The packed paths are graphed by
    # default since session 26 (2026-11-29, ResNet-110: 1.29x at W8A8, 1.00x at W4A4, whose layers keep
    # their launches; never slower), so their A/B is "_nographs". Every graphed packed variant (W4A4 or
    # W8A8, im2col or the tuned row loop) and the eager W4A4 one certified ResNet-110 at 93-100k
    # samples/s there, whatever its kernels' speed (benchmarks/gpu_timeline.py asks why). The auto-loop A/B
    # (1.01x, session 26) is on request now; in its place the model sees each 1,000-sample batch in four
    # chunks of 250 (a stage-1 float32 stream of 16 MB instead of 64: does L2 bound the call?)
    VARIANTS = ["locuslab_fp32", "arq_fp32", "arq_fp16_cl", "arq_fp16_cl_graphs", "arq_w8a8", "arq_w8a8_nographs",
                "arq_w8a8_rows", "arq_w4a4", "arq_w4a4_nographs", "arq_w4a4_rows", "arq_w4a4_chunk250",
                "fp16_cl_cudagraphs", "fp16_cl_cudagraphs_b250"]
    torch.backends.cudnn.benchmark = True  # every variant alike: cuDNN picks its fastest algorithms
else:
    BATCH = 400
    # 10,000 samples a call: shorter calls weigh arq's n0 and remainder batches more than certification
    # at n = 100,000 does (the README's figures use 10,000); the default list is the README's table:
    # the three peers, arq's fastest CPU model compiled and not, and W4A4 compiled
    SAMPLES = {"resnet20": 10_000, "resnet110": 10_000}
    VARIANTS = ["locuslab_fp32", "locuslab_compiled", "locuslab_pt2e_int8", "arq_w8a8r8", "arq_w8a8r8_compiled",
                "arq_w4a4r8_compiled", "arq_w4a4_compiled"]
if os.environ.get("ARQ_E2E_SAMPLES"):  # e.g. "10000": longer runs, where per-call costs weigh less
    SAMPLES = {arch: int(os.environ["ARQ_E2E_SAMPLES"]) for arch in SAMPLES}
if os.environ.get("ARQ_E2E_VARIANTS"):  # e.g. "locuslab_fp32,arq_w4a4,arq_w4a4_compiled"
    VARIANTS = ["locuslab_fp32"] + [v for v in os.environ["ARQ_E2E_VARIANTS"].split(",") if v and v != "locuslab_fp32"]
ARCHS = [a for a in os.environ.get("ARQ_E2E_ARCHS", "resnet20,resnet110").split(",") if a]

pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device")


def host_info() -> dict:
    info = {"device": DEVICE, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "machine": platform.machine(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        info["loadavg"] = list(os.getloadavg())
    except OSError:
        pass
    if DEVICE == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def make_model(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = get_architecture(f"cifar_{arch}", "cifar10")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # BatchNorm statistics of a trained-looking network (as bench_quant.py)
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                c = module.num_features
                module.running_mean.copy_(torch.rand(c, generator=generator) * 0.4 - 0.2)
                module.running_var.copy_(torch.rand(c, generator=generator) * 1.5 + 0.5)
        # the residual branches' last BatchNorm scaled down, as in a trained ResNet (and as zero-init
        # residual training starts): with unit scales the stream grows with every block, and ResNet-110's
        # logits reached ~5e7, beyond float16's 65,504, so the FP16 peer counted NaN votes (2026-11-29, H200)
        for module in model.modules():
            if isinstance(module, BasicBlock):
                c = module.bn2.num_features
                module.bn2.weight.copy_(torch.rand(c, generator=generator) * 0.2 + 0.1)
    model.arq_metadata = {"sigma": SIGMA, "num_classes": 10, "dataset": "cifar10", "arch": f"cifar_{arch}"}
    return model.eval()


def _calibration() -> torch.Tensor:
    return torch.rand(128, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _pt2e_int8(model: torch.nn.Module, batch: int = BATCH) -> torch.nn.Module:
    """torchao pt2e static int8 with X86InductorQuantizer, compiled with freezing (as bench_quant.py)."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq

    from benchmarks.bench_quant import _functional_relu_copy

    stock = _functional_relu_copy(model)
    exported = torch.export.export(stock, (torch.rand(batch, 3, 32, 32),)).module()
    quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(exported, quantizer)
    # export specializes the batch size: calibrate with one batch of noisy images
    generator = torch.Generator().manual_seed(2)
    calibration = torch.rand(batch, 3, 32, 32, generator=generator)
    prepared(calibration + SIGMA * torch.randn(batch, 3, 32, 32, generator=generator))
    converted = convert_pt2e(prepared)
    return torch.compile(converted, dynamic=False)  # freezing: set globally in prepared()


def _quantized(model: torch.nn.Module, bits: tuple[int, int], residual_bits: int = 32,
               shortcuts: bool = True) -> torch.nn.Module:
    return arq.quantize(model, arq.quant.Policy.uniform(model, *bits), _calibration(),
                        config=arq.quant.QuantConfig(residual_bits=residual_bits, residual_shortcuts=shortcuts))


def _lean_gpu_loop(model, x, num, batch_size, num_classes, sigma):
    """Noise, forward, argmax and counts on the GPU; one host sync at the end."""
    counts = torch.zeros(num_classes, dtype=torch.int64, device=x.device)
    with torch.inference_mode():
        remaining = num
        while remaining:
            this_batch = min(batch_size, remaining)
            remaining -= this_batch
            batch = x.repeat((this_batch, 1, 1, 1))
            batch = (batch + sigma * torch.randn_like(batch)).contiguous(memory_format=torch.channels_last)
            predictions = model(batch).argmax(1)
            counts += torch.bincount(predictions, minlength=num_classes)
        return counts.cpu()


def _graphed_fp16_loop(model, x, batch_size, num_classes, sigma):
    """``run(num)``: one batch (noise, forward, argmax, counts) captured as a CUDA graph, replayed.

    The PyTorch peer of the issue's GPU target: FP16 channels_last, CUDA graphs, no host sync
    until the counts are read. ``num`` must be a multiple of ``batch_size``.
    """
    base = x.half().unsqueeze(0).expand(batch_size, -1, -1, -1).contiguous(memory_format=torch.channels_last)
    counts = torch.zeros(num_classes, dtype=torch.int64, device=x.device)
    ones = torch.ones(batch_size, dtype=torch.int64, device=x.device)

    def one_batch():
        noisy = base + sigma * torch.randn_like(base)
        counts.scatter_add_(0, model(noisy).argmax(1), ones)  # bincount syncs; scatter_add_ is capturable

    with torch.inference_mode():
        # a peer timed on inf/NaN logits would be timing a meaningless loop (session 16's ResNet-110 was)
        logits = model(base + sigma * torch.randn_like(base))
        if not torch.isfinite(logits).all():
            raise ValueError("the FP16 peer's logits are not finite on noisy samples: the network overflows float16")
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture: cuDNN autotuning, workspaces
            for _ in range(3):
                one_batch()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            one_batch()

    def run(num):
        if num % batch_size:
            raise ValueError(f"num must be a multiple of batch_size={batch_size}, got {num}")
        counts.zero_()
        for _ in range(num // batch_size):
            graph.replay()
        return counts.cpu()

    return run


def macs_per_sample(arch: str) -> int:
    from arq.quant.cost import bitops

    return bitops(make_model(arch), None, (1, 3, 32, 32)).total_macs


# dense int8 tensor-core peak (datasheet, SXM parts; a lead, not a measurement) in ops/s
INT8_PEAK_OPS = {"H100": 1979e12, "H200": 1979e12}


def int8_peak_ops() -> float | None:
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    return next((peak for key, peak in INT8_PEAK_OPS.items() if key in name), None)


# an arq variant's suffix -> the environment setting its build and calls run under (an A/B
# against the variant without the suffix, paired per round)
ENV_VARIANTS = {
    "_nochunk": ("ARQ_CPU_CHUNK", "0"),
    "_chunk": ("ARQ_CPU_CHUNK", "128"),
    "_floatnoise": ("ARQ_INPUT_CODES", "0"),
    "_lowbit": ("ARQ_CONV_KERNEL", "arq"),
    "_onednn": ("ARQ_CONV_KERNEL", "onednn"),
    "_rows": ("ARQ_TRITON_CONV_LOOP", "rows"),
    "_autoloop": ("ARQ_TRITON_CONV_LOOP", "auto"),
    "_noplans": ("ARQ_TRITON_LAUNCH_PLANS", "0"),
    "_chunk250": ("ARQ_GPU_CHUNK", "250"),
    "_chunk500": ("ARQ_GPU_CHUNK", "500"),
    "_nographs": ("ARQ_CUDA_GRAPHS", "0"),
    "_direct": ("ARQ_LOWBIT_WINOGRAD", "0"),
    "_winorow": ("ARQ_LOWBIT_WINOGRAD", "row"),
    "_wino2d": ("ARQ_LOWBIT_WINOGRAD", "2d"),
}


def graphed_peer_batch(variant: str, samples: int) -> int:
    """The batch of the graphed FP16 peer ``fp16_cl_cudagraphs[_b<N>]``: ``N``, or ``BATCH`` without it;
    ValueError unless it divides ``samples`` (the graph replays whole batches)."""
    _, marker, size = variant.partition("fp16_cl_cudagraphs_b")
    batch = BATCH
    if marker:
        if not size.isdigit() or int(size) < 1:
            raise ValueError(f"{variant}: the peer's batch must be a positive integer, got {size!r}")
        batch = int(size)
    if samples % batch:
        raise ValueError(f"{variant}: the batch {batch} does not divide the {samples} samples of a call")
    return batch


def build(arch: str, variant: str, image: torch.Tensor):
    """``(zero-argument callable running SAMPLES[arch] samples, build seconds, note)``."""
    suffix = next((suffix for suffix in ENV_VARIANTS if variant.endswith(suffix)), None)
    if suffix is not None:
        name, value = ENV_VARIANTS[suffix]
        with mock.patch.dict(os.environ, {name: value}):  # some are read when the model is prepared
            base, build_s, note = build(arch, variant[:-len(suffix)], image)
        return (lambda run: lambda: _with_env(run, name, value))(base), build_s, note
    samples = SAMPLES[arch]
    model = make_model(arch)
    start = time.perf_counter()
    note = ""
    if DEVICE == "cuda":
        x = image.cuda()
        if variant == "locuslab_fp32":
            net = model.cuda()
            fn = lambda: locuslab_sample_noise(net, x, samples, BATCH, 10, SIGMA)  # noqa: E731
        elif variant == "fp16_cl_cudagraphs" or variant.startswith("fp16_cl_cudagraphs_b"):
            net = copy.deepcopy(model).cuda().half().to(memory_format=torch.channels_last)
            fn = _graphed_fp16_loop(net, x, graphed_peer_batch(variant, samples), 10, SIGMA)
            fn = (lambda run: lambda: run(samples))(fn)
        elif variant == "fp16_cl_compiled":
            net = torch.compile(copy.deepcopy(model).cuda().half().to(memory_format=torch.channels_last),
                                mode="reduce-overhead", dynamic=False)
            xh = x.half()
            fn = lambda: _lean_gpu_loop(net, xh, samples, BATCH, 10, SIGMA)  # noqa: E731
        elif variant in ("arq_fp32", "arq_fp16_cl", "arq_w8a8", "arq_w4a4", "arq_fp16_cl_graphs", "arq_w8a8_graphs",
                         "arq_w4a4_graphs"):
            if variant == "arq_fp32":
                net = model.cuda()
            elif variant.startswith("arq_fp16_cl"):
                net = copy.deepcopy(model).cuda().half().to(memory_format=torch.channels_last)
                net.arq_metadata = model.arq_metadata
            else:  # arq.quant.kernels' packed Triton kernels when present ("+packed"), else fake-quant
                net = _quantized(model, (8, 8) if variant == "arq_w8a8" else (4, 4)).cuda()
            if variant.endswith("_graphs"):
                from arq.smoothing.engine import prepare_model

                prepare_model(net, "auto", "cuda", cuda_graphs=True)  # certify then reuses the graphed entry
            fn = lambda: arq.certify(net, x, n=samples - N0, n0=N0, batch_size=BATCH, backend="auto")  # noqa: E731
        else:
            raise ValueError(variant)
        return fn, time.perf_counter() - start, note
    peer, _, small = variant.partition("_b")
    batch = int(small) if small else BATCH
    if peer == "locuslab_fp32":
        fn = lambda: locuslab_sample_noise(model, image, samples, batch, 10, SIGMA)  # noqa: E731
    elif peer == "locuslab_compiled":
        net = torch.compile(model, dynamic=False)
        fn = lambda: locuslab_sample_noise(net, image, samples, batch, 10, SIGMA)  # noqa: E731
    elif peer == "locuslab_pt2e_int8":
        net = _pt2e_int8(model, batch)
        fn = lambda: locuslab_sample_noise(net, image, samples, batch, 10, SIGMA)  # noqa: E731
    elif variant.startswith("arq_w"):
        bits = (8, 8) if variant.startswith("arq_w8a8") else (4, 4)
        stream = variant.split("_")[1][4:]  # "", "r8" or "r8fs"
        qmodel = _quantized(model, bits, 8 if stream.startswith("r8") else 32, shortcuts=stream != "r8fs")
        if variant.endswith("_compiled"):
            from arq.smoothing.engine import prepare_model

            prepare_model(qmodel, "cpp", "cpu", compile=True)  # certify then reuses the compiled entry
        fn = lambda: arq.certify(qmodel, image, n=samples - N0, n0=N0, batch_size=BATCH,  # noqa: E731
                                 backend="auto")
    else:
        raise ValueError(variant)
    return fn, time.perf_counter() - start, note


def _with_env(run, name: str, value: str):
    """``run()`` with the environment variable ``name`` set to ``value`` (read when the model is
    prepared, inside the first call, and on every call after)."""
    with mock.patch.dict(os.environ, {name: value}):
        return run()


@pytest.fixture(scope="module")
def image():
    return torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))


_prepared: dict[str, dict] = {}


def _sync(variant: str) -> None:
    """Wait for the GPU after each call, so an asynchronous CUDA error names the variant that caused it."""
    if DEVICE == "cuda":
        try:
            torch.cuda.synchronize()
        except Exception as error:
            raise RuntimeError(f"CUDA error after variant {variant!r}") from error


def prepared(arch: str, image: torch.Tensor) -> dict:
    """Every variant of ``arch``, built, called once (compiling), then timed round robin.

    ``ROUNDS`` rounds each time every variant once, so a shared machine's changing load falls
    on all variants alike; the ratios use the median per variant. pytest-benchmark then times
    each variant once more on its own (``rounds=1``) for its JSON.
    """
    if arch in _prepared:
        return _prepared[arch]
    if any("pt2e" in variant for variant in VARIANTS) and importlib.util.find_spec("torchao") is None:
        # before building anything: each test would otherwise rebuild every variant up to this one
        pytest.fail("the pt2e peer (locuslab_pt2e_int8) needs torchao, which the test stack does not install: "
                    ".venv/bin/pip install torchao==0.18.0 (the version measured), or leave it out of "
                    "ARQ_E2E_VARIANTS", pytrace=False)
    if DEVICE == "cpu":
        import torch._inductor.config as inductor_config

        # Inductor folds pt2e's int8 weights into oneDNN prepacks only with the global freezing
        # flag (options={"freezing": True} leaves onednn.qconv_prepack in the graph, which it cannot
        # lower), as bench_quant.py; set before any compile, so the FP32 compiled baseline is
        # frozen too (a faster baseline; arq's compiled integer model uses freezing as well).
        inductor_config.freezing = True
    entries, failed = {}, {}
    for variant in VARIANTS:
        try:
            fn, build_s, note = build(arch, variant, image)
            first = time.perf_counter()
            result = fn()  # compiles where there is something to compile
            _sync(variant)
        except (ValueError, RuntimeError) as error:
            # that variant's test fails with this error; the others are still measured (one variant's
            # refusal, e.g. NaN logits, used to fail every test of the network)
            failed[variant] = f"{type(error).__name__}: {error}"
            print(f"\n{arch} {variant}: FAILED at its first call: {failed[variant]}", flush=True)
            continue
        entries[variant] = {"fn": fn, "build_s": build_s, "first_call_s": time.perf_counter() - first,
                            "result": result, "times": []}
        print(f"\n{arch} {variant}: built in {build_s:.0f} s, first call {entries[variant]['first_call_s']:.0f} s",
              flush=True)
    load_before = host_info().get("loadavg")
    for _ in range(ROUNDS):
        for variant, entry in entries.items():
            start = time.perf_counter()
            entry["fn"]()
            _sync(variant)
            entry["times"].append(time.perf_counter() - start)
    for entry in entries.values():
        entry["rate"] = SAMPLES[arch] / statistics.median(entry["times"])
    _prepared[arch] = {"entries": entries, "failed": failed, "loadavg_before": load_before,
                       "loadavg_after": host_info().get("loadavg")}
    return _prepared[arch]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("arch", ARCHS)
def test_e2e(benchmark, arch, variant, image):
    samples = SAMPLES[arch]
    benchmark.group = f"e2e-{DEVICE}-{arch}-batch{BATCH}"
    state = prepared(arch, image)
    entries = state["entries"]
    if variant in state["failed"]:
        pytest.fail(f"{arch} {variant} failed at its first call: {state['failed'][variant]}", pytrace=False)
    if "locuslab_fp32" not in entries:
        pytest.fail(f"{arch}: the locuslab baseline failed, so no ratio can be formed", pytrace=False)
    entry = entries[variant]
    benchmark.pedantic(entry["fn"], rounds=1, warmup_rounds=0)
    rate = entry["rate"]
    baseline = entries["locuslab_fp32"]["rate"]
    others = [e["rate"] for v, e in entries.items() if not v.startswith("arq_")]
    info = benchmark.extra_info
    info.update(host_info())
    info.update(samples=samples, batch_size=BATCH, n0=N0, rounds_round_robin=ROUNDS,
                samples_per_s=round(rate, 1), samples_per_s_this_test=round(samples / benchmark.stats.stats.mean, 1),
                round_times_s=[round(t, 3) for t in entry["times"]], build_s=round(entry["build_s"], 2),
                first_call_s=round(entry["first_call_s"], 2), speedup_vs_locuslab=round(rate / baseline, 3),
                loadavg_round_robin=[state["loadavg_before"], state["loadavg_after"]])
    if isinstance(entry["result"], arq.Certificate):
        info["certificate_backend"] = entry["result"].backend
    if DEVICE == "cuda":
        macs = macs_per_sample(arch)
        info["macs_per_sample"] = macs
        peak = int8_peak_ops()
        if peak:  # 2 ops per MAC; what share of the card's int8 limit this rate would use
            info["share_of_int8_peak"] = round(rate * macs * 2 / peak, 5)
            info["int8_peak_ops_datasheet"] = peak
    paired = ""
    if variant.startswith("arq_"):
        info["ratio_to_best_non_arq"] = round(rate / max(others), 3)
        best_peer = max((v for v in entries if not v.startswith("arq_")), key=lambda v: entries[v]["rate"])
        median, low, high = paired_ratio(entries[best_peer]["times"], entry["times"])
        info.update(best_non_arq=best_peer, paired_ratio_to_best_non_arq=[round(x, 3) for x in (median, low, high)])
        paired = f", paired per round {median:.2f} (quartiles {low:.2f}-{high:.2f})"
        base = variant.rpartition("_")[0]
        # an A/B against the variant it modifies
        if variant.endswith(tuple(ENV_VARIANTS) + ("_graphs",)) and base in entries:
            median, low, high = paired_ratio(entries[base]["times"], entry["times"])
            info.update(paired_ratio_to_base=[round(x, 3) for x in (median, low, high)], base_variant=base)
            paired += f"; {median:.2f} (quartiles {low:.2f}-{high:.2f}) x {base}"
    print(f"\n{DEVICE} {arch} {variant:>20}: {rate:9.1f} samples/s (median of {ROUNDS} round-robin rounds), "
          f"{rate / baseline:5.2f}x locuslab"
          + (f", {rate / max(others):4.2f}x best non-arq [{info.get('certificate_backend')}]{paired}"
             if variant.startswith("arq_") else ""), flush=True)


def paired_ratio(peer_times: list[float], times: list[float]) -> tuple[float, float, float]:
    """Median and quartiles of the per-round speed ratios ``peer time / variant time``: each round
    ran both back to back, so a load change between rounds cancels out of each ratio (the ratio of
    medians does not); the quartiles show what this shared host's noise leaves."""
    ratios = [peer / own for peer, own in zip(peer_times, times)]
    if len(ratios) < 2:
        return ratios[0], ratios[0], ratios[0]
    low, median, high = statistics.quantiles(ratios, n=4, method="inclusive")
    return median, low, high
