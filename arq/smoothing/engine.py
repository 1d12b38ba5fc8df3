"""Which model ``arq.certify`` / ``arq.predict`` actually run: the certification engine.

``prepare_model(model, backend, device) -> (callable, tag)`` converts a model once
for the chosen noise backend and device and caches the result:

* a **float model** passes through unchanged (tag ``""``);
* a **quantized model** (the fake-quant model of :func:`arq.quant.quantize`, which carries
  ``model.arq_quant = {"policy", ...}``):

  - on CPU with noise backend ``"cpp"`` (what ``"auto"`` picks on CPU when ``arq._C`` is
    built): the **integer model** :func:`arq.quant.to_integer` (oneDNN u8 x s8 -> s32
    layers at the policy's bit widths, float glue), optionally wrapped in
    ``torch.compile``; tag ``"+int8"`` (``"+int8-compiled"``), so a certificate says
    ``backend="cpp+int8"``. If this torch has no oneDNN quantized engine, the fake-quant
    model runs instead (tag ``"+fakequant"``).
  - on CUDA with ``"cuda"`` / ``"triton"``: arq's packed low-bit kernels
    (``arq.quant.kernels.to_kernels(model, backend="triton")``, the same integer semantics and
    tolerance as the CPU integer model), tag ``"+packed"``; where Triton or that module is
    missing or the conversion fails, the fake-quant model (tag ``"+fakequant"``, one warning).
    It enters at its first layer's input codes as the CPU integer model does (below), through
    :func:`arq.quant.kernels.enter_at_input_codes`: int8 codes written by the Triton noise kernel.
  - with ``"torch"`` (the reference): the fake-quant model itself (tag ``""``, so its
    certificate is exactly the reference's).

The integer model's input. Where its forward begins ``[NormalizeLayer ->] integer convolution`` (arq's
models, a ResNet's stem), the engine enters it at that layer's input codes
(:func:`arq.quant.execution.enter_at_input_codes`) and sets ``callable.input_codes`` (an
:class:`arq.smoothing.noise.InputCodes`); :mod:`arq.smoothing.core` then makes each noisy batch
directly in that format (:func:`arq.smoothing.noise.noisy_codes_batch`): the same samples, and the
codes the model would compute from their float images, bit for bit, so votes and certificates are
unchanged. ``ARQ_INPUT_CODES=0`` keeps float images (for comparison); other models have
``input_codes = None``. The packed GPU model is entered the same way (int8 codes, made by the Triton
noise kernel with the normalization fused).

What a ``"cpp+int8"`` certificate certifies. The integer model is what a user deploys on
CPU. Its integer accumulation is exact, while the fake-quant reference sums
``(s_x c)(s_w q)`` in float32, so on a sample near a rounding boundary of some later
activation quantizer the two can pick a different code and the change propagates (the
documented tolerance of :mod:`arq.quant.execution`: <= 1 % of codes, logits within 5 %
of the largest logit, top-1 equal on >= 99 % of non-tied inputs). A ``"cpp+int8"``
certificate is therefore a certificate **of the integer model** (its smoothed classifier
``g_int``), with the full ``1 - alpha`` guarantee for ``g_int``; it is not a certificate of
the fake-quant model, whose votes may differ on a few samples, so counts, ``p_lower`` and
radii may differ slightly from the ``"torch"`` backend's and, for inputs whose top class
is nearly tied, the prediction may too. To certify the fake-quant model itself, pass
``backend="torch"``.

The cache lives in a ``weakref.WeakKeyDictionary`` keyed by the model object (not in an
attribute: the integer model cannot be deep-copied, and ``copy.deepcopy(qmodel)`` must keep
working), one entry per ``(backend, device, compiled, ARQ_CONV_KERNEL, ARQ_INPUT_CODES)``, each stamped with a
fingerprint of the model's policy and its parameters and buffers (storage and in-place version
counters): re-quantizing, calibrating or fine-tuning the model rebuilds the integer model on
next use. Writes that bypass the version counters (through ``.data``, a numpy view) are caught by
comparing the parameters and buffers with a copy taken when the entries were built, on every
use (one pass over the weights): a changed value rebuilds them too.

Compilation (Inductor fuses the activation quantization with the float glue; the first call
per batch shape compiles) is used when the work of one call is large (``compile_threshold``
samples, default 1,000,000), when a compiled entry
was prepared explicitly (``prepare_model(..., compile=True)``), or when ``ARQ_COMPILE=1``;
``ARQ_COMPILE=0`` disables it. ``arq certify`` / ``arq predict`` prepare the model once with
the whole run's work (inputs x samples), so a long run over single inputs compiles once.
Why 10^6: with the 8-bit residual stream at W8A8 (2026-11-28, 2-core AVX-512 host, Inductor's
caches off) compiling took 11 s for ResNet-20 and 20 s for ResNet-110 (first batch shape 9-14 s,
the second 2-7 s) and made the forward pass 0-5 % faster, so it pays from roughly 0.5 million
(ResNet-110) to 3 million (ResNet-20) samples a call; float-stream models gain more from it.

CPU model chunks: on CPU hosts without AVX-512 the model sees at most ``CPU_CHUNK`` (128)
samples per call, unless it is an integer model whose activations are uint8 codes from layer
to layer (:func:`model_batches`, :func:`default_cpu_chunk`; ``ARQ_CPU_CHUNK`` overrides it on any
host, 0 gives the model whole batches). A noisy batch of ``batch_size`` samples is made in one piece and
then split into near-equal chunks, so the noise, the votes and the guarantee are those of the
whole batch: splitting only changes which samples share one call of the model, and every
sample's logits are computed from that sample alone (eval mode). Why: a batch of 400 CIFAR
samples makes 26 MB float32 activations per layer, which glibc maps and unmaps on every call
(page faults) and which overflow the caches. Measured on a 2-core AVX2 host: the compiled W4A4
ResNet-20's forward passes ran 1.3-1.5x faster in chunks of 100-200 (1 and 2 threads), its
certification 1.16x (2 threads), and ResNet-110 changed nothing measurable
(``benchmarks/bench_e2e.py``). On a 2-core AVX-512 VNNI host (AMD EPYC) it is the other way round:
oneDNN's AVX-512 kernels gain from large batches (torchao's pt2e int8 ResNet-20 certifies 1.19x
faster in batches of 400 than of 100), and arq's compiled ResNet-20 certified 1.04x (W4A4) and
1.11x (W4A4, 8-bit residual stream) faster without chunks, paired per round
(``benchmarks/results/cpu-e2e-resnet20-avx512-chunks-2026-11-28.json``); so there the default is
whole batches. On a 2-core AVX2 host (AMD EPYC, Zen 3; 2026-11-29, paired per round) it depends on
the model: whole batches made the compiled W4A4 model with the 8-bit stream, whose activations are
uint8 throughout, 1.12x (ResNet-20) and 1.06x (ResNet-110) faster, but the float-stream W4A4 model
0.86x, the W8A8 one with split 8x8-bit layers (float32 outputs) 0.80x and an FP32 ResNet-20 0.75x
(``cpu-e2e-resnet{20,110}-avx2-zen3-*-2026-11-29.json``; the FP32 one ad hoc). So there only
integer models that write codes from every convolution (``writes_codes_throughout``) get whole
batches. One certify call then compiles one or two chunk shapes. On other devices (CUDA) the model
sees whole batches unless ``ARQ_GPU_CHUNK`` asks for chunks (:func:`gpu_chunk`; an A/B, not yet
measured on a GPU).

CUDA graphs: on CUDA any of the above, float models included, can be replayed from one CUDA graph
per batch shape (:class:`CudaGraphForward`, tag "+graphs"), which removes the per-layer launch cost
of a deep network; the noise and the votes stay outside the graph. On by default for the packed GPU
model ("+packed"), opt-in for the others (``prepare_model(..., cuda_graphs=True)`` or
``ARQ_CUDA_GRAPHS=1``; ``ARQ_CUDA_GRAPHS=0`` turns them off for all). Measured on an H200
(2026-11-29, benchmarks/results/gpu-h200-2026-11-29-session26, paired per round against the same
model without graphs): the packed ResNet-110 certified 1.29x faster at W8A8 and 1.00x at W4A4 (whose
launches were already cheap: each layer keeps its checked Triton launch), ResNet-20 1.02x and 1.03x;
no case was slower. Float models' graphs have not been timed against their eager runs.
"""
from __future__ import annotations

import collections
import os
import threading
import weakref
from typing import Callable

import torch
from torch import nn

#: samples per certify call (inputs x (n + n0)) above which the integer model is compiled
COMPILE_THRESHOLD = 1_000_000

#: the most samples a CPU model sees per call on hosts without AVX-512 (module docstring);
#: ARQ_CPU_CHUNK overrides it
CPU_CHUNK = 128


def default_cpu_chunk(model: nn.Module | None = None) -> int:
    """0 (whole batches) on AVX-512 hosts, and for an integer ``model`` whose every convolution
    writes uint8 codes (:func:`arq.quant.execution.writes_codes_throughout`); else ``CPU_CHUNK``
    (also under ``ARQ_CPU_ISA=avx2``, which chooses as on an AVX2 host) (module docstring)."""
    # imported here: arq.quant imports this package
    from arq.quant.execution import _cpu_flags, cpu_isa_forced_to_avx2, writes_codes_throughout

    if "avx512f" in _cpu_flags() and not cpu_isa_forced_to_avx2():
        return 0
    return 0 if model is not None and writes_codes_throughout(model) else CPU_CHUNK


def cpu_chunk(model: nn.Module | None = None) -> int:
    """The CPU chunk size in force for ``model``: ``ARQ_CPU_CHUNK`` when set (0 = whole batches),
    else :func:`default_cpu_chunk`."""
    value = _chunk_from_env("ARQ_CPU_CHUNK")
    return default_cpu_chunk(model) if value is None else value


def gpu_chunk() -> int:
    """The most samples a model on another device than the CPU (CUDA) sees per call: ``ARQ_GPU_CHUNK``,
    default 0 (whole batches). An A/B for now, not measured on a GPU yet: a batch of 1,000 CIFAR samples
    makes a 64 MB float32 residual stream at ResNet stage 1, more than an H200's 50 MB of L2
    (``benchmarks/gpu_timeline.py``'s ``forward_by_batch`` and bench_e2e's ``_chunk250`` measure it)."""
    value = _chunk_from_env("ARQ_GPU_CHUNK")
    return 0 if value is None else value


def _chunk_from_env(name: str) -> int | None:
    """The chunk size set in the environment variable ``name``, or None where it is unset or empty."""
    env = os.environ.get(name, "").strip()
    if not env:
        return None
    try:
        value = int(env)
    except ValueError:
        raise ValueError(f"{name} must be a non-negative integer (0: no chunks), got {env!r}") from None
    if value < 0:
        raise ValueError(f"{name} must be a non-negative integer (0: no chunks), got {env!r}")
    return value


def model_batches(batch: torch.Tensor, chunk: int | None = None) -> tuple[torch.Tensor, ...]:
    """``batch`` as the model is to see it: near-equal chunks (views along dim 0) of at most ``chunk``
    samples (default :func:`cpu_chunk` on CPU, :func:`gpu_chunk` elsewhere; 0: whole batches), in
    order; ``(batch,)`` when it is small enough.

    ``400`` samples give four chunks of 100 and ``1000`` give eight of 125, so a compiled model
    meets one or two shapes per batch size.
    """
    if chunk is None:
        chunk = cpu_chunk() if batch.device.type == "cpu" else gpu_chunk()
    if chunk <= 0 or batch.shape[0] <= chunk:
        return (batch,)
    return batch.tensor_split(-(-batch.shape[0] // chunk))

_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()
#: model -> copies of its parameters and buffers when its cache entries were built
_SNAPSHOTS: "weakref.WeakKeyDictionary[nn.Module, list]" = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def is_quantized(model: nn.Module) -> bool:
    """True for a fake-quant model of :func:`arq.quant.quantize` (``arq_quant`` with a policy and
    at least one QuantConv2d/QuantLinear, not yet converted by ``to_integer`` or ``to_kernels``)."""
    info = getattr(model, "arq_quant", None)
    if not isinstance(info, dict) or info.get("policy") is None:
        return False
    if getattr(model, "arq_kernels", None) is not None:
        return False  # already runs on arq's packed kernels (to_kernels' output)
    from arq.quant.execution import _IntegerLayer
    from arq.quant.modules import QUANT_LAYER_TYPES

    has_quant = False
    for module in model.modules():
        if isinstance(module, _IntegerLayer):
            return False  # already an integer model (to_integer's output)
        has_quant = has_quant or isinstance(module, QUANT_LAYER_TYPES)
    return has_quant


def _fingerprint(model: nn.Module) -> tuple:
    """Changes when the policy or any parameter/buffer is replaced or modified in place."""
    info = getattr(model, "arq_quant", None)
    policy = info.get("policy") if isinstance(info, dict) else None
    try:
        policy_key = policy.to_json() if policy is not None else None
    except Exception:  # not an arq Policy: fall back to identity
        policy_key = id(policy)
    return policy_key, tensors_version(model)


def tensors_version(model: nn.Module) -> tuple:
    """Changes when any parameter or buffer is replaced or modified in place: each one's storage
    (oneDNN's opaque packed weights, which have none, by identity), version counter and shape."""
    def where(tensor: torch.Tensor) -> int:
        try:
            return tensor.data_ptr()
        except RuntimeError:
            return id(tensor)

    return tuple((name, where(tensor), tensor._version, tuple(tensor.shape))
                 for name, tensor in list(model.named_parameters()) + list(model.named_buffers())
                 if tensor is not None)


def _compile_wanted(compile: bool | None, work: int | None, threshold: int) -> bool:
    if compile is not None:
        return bool(compile)
    env = os.environ.get("ARQ_COMPILE")
    if env is not None and env.strip() != "":
        return env.strip().lower() not in ("0", "false", "no", "off")
    return work is not None and work >= threshold


def input_codes_wanted() -> bool:
    """Whether integer models take their first layer's codes from the noise (``ARQ_INPUT_CODES``,
    default on; "0" keeps float noisy batches, for comparison)."""
    return os.environ.get("ARQ_INPUT_CODES", "1").strip().lower() not in ("0", "false", "no", "off")


def _entered_at_codes(build: Callable[[], nn.Module], enter) -> tuple[nn.Module, object]:
    """``(model, input_codes)``: ``build()`` entered at its first layer's codes by ``enter`` (None: not
    entered); where entering fails (an optional speed-up, the same votes either way), a fresh ``build()``
    with its float entry and one warning, rather than no certificate."""
    model = build()
    if enter is None:
        return model, None
    try:
        return model, enter(model)
    except Exception as error:  # noqa: BLE001 - any failure of the optional entry: keep the float one
        import warnings

        warnings.warn(f"arq: the model keeps its float input ({type(error).__name__}: {error}); its noise is "
                      "made as float images", RuntimeWarning, stacklevel=4)
        return build(), None  # entering may have changed the first model before it failed


def _build_integer(model: nn.Module, compiled: bool) -> nn.Module:
    from arq.quant.execution import CompiledIntegerModel, IntegerExecutionConfig, enter_at_input_codes, to_integer
    from arq.smoothing.noise import _has_codes_kernel

    def build():
        return to_integer(model, IntegerExecutionConfig(compile=False, fuse_residuals=not compiled))

    wanted = input_codes_wanted() and _has_codes_kernel()
    integer_model, input_codes = _entered_at_codes(build, enter_at_input_codes if wanted else None)
    if compiled:
        # as to_integer(compile=True), but static shapes: a certify call has at most three
        # batch sizes (batch_size, n0 % batch_size, n % batch_size), each compiled once
        integer_model = CompiledIntegerModel(integer_model, dynamic=False)
    # read by arq.smoothing.core: make the noisy batches in this format (None: float images)
    integer_model.input_codes = input_codes
    return integer_model


def prepare_model(
    model: nn.Module,
    backend: str,
    device: torch.device | str,
    *,
    compile: bool | None = None,
    work: int | None = None,
    compile_threshold: int = COMPILE_THRESHOLD,
    cuda_graphs: bool | None = None,
) -> tuple[Callable[[torch.Tensor], torch.Tensor], str]:
    """What to call for ``model`` under the (already resolved) noise ``backend`` on ``device``.

    Args:
        model: the base classifier (float, or fake-quant from :func:`arq.quant.quantize`).
        backend: the resolved noise backend: "torch", "cpp", "cuda" or "triton"
            ("auto" is resolved as :func:`arq.smoothing.noise.noisy_batch` does).
        device: where the samples live.
        compile: compile the integer model (True / False), or None: reuse a compiled entry
            if one was prepared, else compile when ``work >= compile_threshold`` or
            ``ARQ_COMPILE=1``.
        work: samples the caller is about to evaluate (for the compile heuristic).
        cuda_graphs: on CUDA, replay the model from CUDA graphs (:class:`CudaGraphForward`, tag
            "+graphs") (True / False), or None: ``ARQ_CUDA_GRAPHS`` when set, else reuse a graphed
            entry if one was prepared, else graphs for the packed GPU model only (module docstring).

    Returns:
        ``(callable, tag)``: the callable maps ``[B, C, H, W]`` to logits ``[B, K]``; ``tag`` is
        appended to the backend name in ``Certificate.backend`` ("" when the model runs as
        given, "+int8" / "+int8-compiled" for the integer CPU model, "+packed" for the packed
        GPU kernels, "+fakequant" where a quantized
        model runs in its fake-quant form although a faster path was asked for).
    """
    if backend == "auto":
        from arq.smoothing.noise import _choose_backend

        backend = _choose_backend(backend, torch.device(device))
    device = torch.device(device)
    inner, tag = _prepare_inner(model, backend, device, compile, work, compile_threshold)
    if device.type != "cuda" or not isinstance(model, nn.Module):
        return inner, tag
    return _graphed(model, inner, tag, device, cuda_graphs)


def clean_logits(prepared, images: torch.Tensor) -> torch.Tensor:
    """The logits of a :func:`prepare_model` callable on clean float images ``[B, C, H, W]``: where it reads
    its first layer's codes (``input_codes``), the images are encoded first (:meth:`InputCodes.encode`,
    what its float entry would compute, bit for bit), so the predictions are those of the model
    ``arq.certify`` runs, without noise."""
    codes = getattr(prepared, "input_codes", None)
    if codes is not None and images.shape[0] > 0 and codes.accepts(images[0]):
        images = codes.encode(images)
    return prepared(images)


def execution_of(tag: str) -> str:
    """Which model a :func:`prepare_model` tag runs, for run records: ``"as given"`` (a float model, or a
    fake-quant model run as it is), ``"integer"`` (the integer CPU model; compiled or not, the same layers
    and codes, logits within float32 rounding of each other) or ``"packed"`` (arq's packed GPU kernels).
    CUDA graphs replay the same kernels."""
    base = tag.replace("+graphs", "")
    if base in ("", "+fakequant"):
        return "as given"
    if base in ("+int8", "+int8-compiled"):
        return "integer"
    if base == "+packed":
        return "packed"
    raise ValueError(f"unknown execution tag {tag!r}")


def conv_kernels_of(prepared) -> str | None:
    """Which kernels run a prepared integer model's convolutions, for run records (None for other
    executions): "oneDNN", or how many ``arq::lowbit_conv2d`` runs. The two round their epilogues
    differently, so their codes, and rarely their votes, may differ; which one a layer gets depends on
    the CPU (``lowbit_conv_preferred``) and on ``ARQ_CONV_KERNEL``."""
    from arq.quant.execution import IntegerConv2d  # here: arq.quant imports this package

    inner = getattr(prepared, "model", prepared)  # CompiledIntegerModel keeps the eager model
    if not isinstance(inner, nn.Module):
        return None
    convolutions = [m for m in inner.modules() if isinstance(m, IntegerConv2d)]
    if not convolutions:
        return None
    lowbit = sum(bool(m.lowbit) for m in convolutions)
    if lowbit == 0:
        return "oneDNN"
    return f"arq::lowbit_conv2d on {lowbit} of {len(convolutions)} convolutions, oneDNN on the rest"


def execution_record(prepared, tag: str) -> dict:
    """What run records keep of a :func:`prepare_model` result: ``{"execution": execution_of(tag)}``,
    and for the integer model ``"conv_kernels"`` (:func:`conv_kernels_of`)."""
    record = {"execution": execution_of(tag)}
    kernels = conv_kernels_of(prepared) if record["execution"] == "integer" else None
    return record if kernels is None else {**record, "conv_kernels": kernels}


def _prepare_inner(model, backend: str, device: torch.device, compile, work, compile_threshold):
    """prepare_model without CUDA graphs."""
    if not isinstance(model, nn.Module) or not is_quantized(model):
        return model, ""
    if backend == "torch":
        return model, ""  # the reference: exactly the fake-quant model
    if device.type == "cuda" and backend in ("cuda", "triton"):
        return _prepare_packed_gpu(model, backend, device)
    if device.type != "cpu" or backend != "cpp":
        return model, "+fakequant"
    if "onednn" not in torch.backends.quantized.supported_engines or not torch.backends.mkldnn.is_available():
        return model, "+fakequant"
    if any(p.is_floating_point() and p.dtype != torch.float32 for p in model.parameters()):
        return model, "+fakequant"  # the integer conversion reads float32 weights (a .double() model runs as given)
    fingerprint = _fingerprint(model)
    from arq.quant.execution import cpu_isa_forced_to_avx2, default_conv_kernel  # here: arq.quant imports this package

    # what _build_integer's config will take; ARQ_CPU_ISA=avx2 changes the host-dependent routing
    conv_kernel = (default_conv_kernel(), cpu_isa_forced_to_avx2())
    codes = input_codes_wanted()
    with _LOCK:
        entries = _entries(model, fingerprint)
        if compile is None and os.environ.get("ARQ_COMPILE", "").strip() == "":
            if (backend, str(device), True, conv_kernel, codes) in entries:
                compiled = True
            else:
                compiled = _compile_wanted(None, work, compile_threshold)
        else:
            compiled = _compile_wanted(compile, work, compile_threshold)
        key = (backend, str(device), compiled, conv_kernel, codes)
        if key not in entries:
            _remember(model, entries)
            entries[key] = (fingerprint, _build_integer(model, compiled), "+int8-compiled" if compiled else "+int8")
        _, callable_model, tag = entries[key]
    return callable_model, tag


def _entries(model: nn.Module, fingerprint: tuple, check_values: bool = True) -> dict:
    """The model's cache entries, without those built from an older version of it (lock held).

    The version fingerprint misses writes through ``.data`` or a numpy view (they leave the
    version counters alone), so the values are compared with the snapshot taken when the
    entries were built: any difference drops every entry. ``check_values=False`` where the same
    :func:`prepare_model` call has just compared them."""
    entries = _CACHE.setdefault(model, {})
    for key in [k for k, (stamp, _, _) in entries.items() if stamp != fingerprint]:
        del entries[key]
    if entries and check_values and not _values_unchanged(model):
        entries.clear()
    if not entries:  # held only while entries are: a model with nothing cached keeps no copy
        _SNAPSHOTS.pop(model, None)
    return entries


def _remember(model: nn.Module, entries: dict) -> None:
    """Before an entry is added: the first one of a model takes the snapshot its values are checked
    against (later ones were built from the same, checked, values)."""
    if not entries:
        _SNAPSHOTS[model] = _snapshot(_named_tensors(model))


def _named_tensors(model: nn.Module) -> list:
    return [(name, tensor) for name, tensor in list(model.named_parameters()) + list(model.named_buffers())
            if tensor is not None]


def _layout(named: list) -> list:
    return [(name, tuple(tensor.shape), tensor.dtype, tensor.device) for name, tensor in named]


def _flat_groups(named: list) -> dict:
    """The tensors' values, one flat tensor per (device, dtype): comparing a model then costs a few
    kernels and one host synchronization per device, not a few per tensor (ResNet-110 has 670)."""
    groups: dict = {}
    for _, tensor in named:
        groups.setdefault((tensor.device, tensor.dtype), []).append(tensor.detach().reshape(-1))
    return {key: torch.cat(parts) for key, parts in groups.items()}


def _snapshot(named: list) -> tuple:
    return _layout(named), _flat_groups(named)  # torch.cat copies: the snapshot shares no storage


def _values_unchanged(model: nn.Module) -> bool:
    snapshot = _SNAPSHOTS.get(model)
    current = _named_tensors(model)
    if snapshot is None or snapshot[0] != _layout(current):
        return False
    # exact equality (NaN unequal to itself: such a model is rebuilt every time, never stale)
    flags: dict = {}
    for key, flat in _flat_groups(current).items():
        flags.setdefault(key[0], []).append(torch.eq(flat, snapshot[1][key]).all())
    return all(bool(torch.stack(device_flags).all()) for device_flags in flags.values())


# model -> the fingerprint of the version whose packed conversion failed: a changed model is tried again
_GPU_FAILURES: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _prepare_packed_gpu(model: nn.Module, backend: str, device: torch.device):
    """On CUDA: arq's packed low-bit kernels (``arq.quant.kernels.to_kernels``, Triton), when present.

    Falls back to the fake-quant model (tag "+fakequant", one warning per model) when Triton
    or the packed-kernel module is missing or the conversion fails.
    """
    from arq.smoothing.noise import triton_usable

    if not triton_usable(device):
        return model, "+fakequant"
    fingerprint = _fingerprint(model)
    codes = input_codes_wanted()
    key = ("packed", str(device), False, codes)
    with _LOCK:
        entries = _entries(model, fingerprint)
        if key not in entries:
            if _GPU_FAILURES.get(model) == fingerprint:
                return model, "+fakequant"
            try:
                from arq.quant.kernels import enter_at_input_codes, to_kernels

                def build():
                    return to_kernels(model, backend="triton")

                packed, input_codes = _entered_at_codes(build, enter_at_input_codes if codes else None)
                # read by arq.smoothing.core: make the noisy batches in this format (None: float images)
                packed.input_codes = input_codes
                _remember(model, entries)
                entries[key] = (fingerprint, packed, "+packed")
            except Exception as error:  # a missing or failing optional path: run the reference model
                import warnings

                _GPU_FAILURES[model] = fingerprint
                warnings.warn(f"arq: packed GPU kernels unavailable for this model ({type(error).__name__}: "
                              f"{error}); certifying the fake-quant model", RuntimeWarning, stacklevel=3)
                return model, "+fakequant"
        _, callable_model, tag = entries[key]
    return callable_model, tag


class CudaGraphForward:
    """``model``'s forward replayed from CUDA graphs, one graph per input shape, dtype and strides.

    The first call of a shape runs the model three times on a side stream (Triton compiles,
    cuDNN picks its algorithms, the allocator settles), then captures one call; later calls copy
    the batch into the graph's input tensor and replay. A replay runs the captured kernels on
    the same parameters and buffers, so its logits are the eager model's (up to a cuDNN
    algorithm choice, as between two eager runs); the noise is made outside the graph, so the
    samples, counts and the certificate's guarantee are unchanged.

    The returned logits are a copy of the graph's output, made right after the replay in the
    same stream, so they stay valid whatever is called next (a replay overwrites the graph's
    output). Calls may come from several threads and streams (now that the packed model is
    graphed by default, two certifications of one model must not read each other's batches): one
    lock covers copying the batch in, the replay and the copy out, and each call's stream first
    waits for the previous call's copy out, so no replay overwrites the buffers another is reading.
    At most ``MAX_GRAPHS`` shapes keep a graph (each holds its own memory pool); a new shape beyond
    them drops the least recently used one. A graph holds the storage of the parameters it captured:
    :func:`prepare_model` drops it (fingerprint) when any parameter or buffer is replaced or changed
    in place. A shape whose capture fails runs eagerly from then on, after one warning.
    """

    #: input shapes that keep a graph (a certify call uses up to three: n0, the batch, the remainder)
    MAX_GRAPHS = 8

    def __init__(self, model: Callable[[torch.Tensor], torch.Tensor]):
        self.model = model
        # the replayed model's input format (arq.smoothing.core makes its noisy batches in it)
        self.input_codes = getattr(model, "input_codes", None)
        self._graphs: "collections.OrderedDict[tuple, tuple | None]" = collections.OrderedDict()
        self._lock = threading.Lock()
        self._last_copy_out = None  # the CUDA event recorded after the previous call's copy out

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        key = (tuple(x.shape), x.dtype, x.stride(), x.device)
        with self._lock:
            stream = torch.cuda.current_stream(x.device) if x.device.type == "cuda" else None
            if stream is not None and self._last_copy_out is not None:
                stream.wait_event(self._last_copy_out)
            if key in self._graphs:
                self._graphs.move_to_end(key)
            else:
                if len(self._graphs) >= self.MAX_GRAPHS:
                    if self._last_copy_out is not None:
                        self._last_copy_out.synchronize()  # the dropped graph's last replay has finished
                    self._graphs.popitem(last=False)
                self._graphs[key] = self._capture(x)
            entry = self._graphs[key]
            if entry is None:
                return self.model(x)
            graph, static_input, static_output = entry
            static_input.copy_(x)
            graph.replay()
            logits = static_output.clone()
            if stream is not None:
                self._last_copy_out = torch.cuda.Event()
                self._last_copy_out.record(stream)
            return logits

    def _capture(self, x: torch.Tensor):
        static_input = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
        static_input.copy_(x)
        try:
            side = torch.cuda.Stream(device=x.device)
            side.wait_stream(torch.cuda.current_stream(x.device))
            with torch.cuda.stream(side):
                for _ in range(3):
                    self.model(static_input)
            torch.cuda.current_stream(x.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_output = self.model(static_input)
        except Exception as error:  # a model that cannot be captured still certifies, eagerly
            import warnings

            warnings.warn(f"arq: CUDA graph capture failed for input shape {tuple(x.shape)} "
                          f"({type(error).__name__}: {error}); running eagerly", RuntimeWarning, stacklevel=3)
            return None
        return graph, static_input, static_output


def _cuda_graphs_wanted(cuda_graphs: bool | None, prepared: bool, default: bool = False) -> bool:
    if cuda_graphs is not None:
        return bool(cuda_graphs)
    env = os.environ.get("ARQ_CUDA_GRAPHS", "").strip().lower()
    if env:
        return env not in ("0", "false", "no", "off")
    return prepared or default


def _graphed(model: nn.Module, inner, tag: str, device: torch.device, cuda_graphs: bool | None):
    """``(inner, tag)``, or its :class:`CudaGraphForward` (tag + "+graphs") when graphs are wanted."""
    fingerprint = _fingerprint(model)
    family = ("graphs", str(device), tag)
    # the inner model's identity is part of the key: one tag can name several converted models
    # (ARQ_INPUT_CODES toggled between calls), and a graph replays the one it captured
    key = family + (None if inner is model else id(inner),)
    with _LOCK:
        # a converted inner model came from this model's entries, whose values were just compared
        entries = _entries(model, fingerprint, check_values=inner is model)
        stale = [other for other in entries if other[:3] == family and other != key]
        if not _cuda_graphs_wanted(cuda_graphs, key in entries or bool(stale), default=tag == "+packed"):
            return inner, tag
        if key not in entries:
            for other in stale:  # holds another inner model and its captured graphs
                del entries[other]
            # the cache is keyed weakly by the model: an entry must not hold the model itself
            target = weakref.proxy(inner) if inner is model else inner
            _remember(model, entries)
            entries[key] = (fingerprint, CudaGraphForward(target), tag + "+graphs")
        _, graphed, graphed_tag = entries[key]
    return graphed, graphed_tag


def clear_cache(model: nn.Module | None = None) -> None:
    """Forget the prepared models of ``model`` (all models when None)."""
    with _LOCK:
        if model is None:
            _CACHE.clear()
            _SNAPSHOTS.clear()
        else:
            _CACHE.pop(model, None)
            _SNAPSHOTS.pop(model, None)
