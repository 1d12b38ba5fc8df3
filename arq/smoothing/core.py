"""Randomized smoothing: CERTIFY and PREDICT (Cohen, Rosenfeld and Kolter, ICML 2019).

The smoothed classifier is ``g(x) = argmax_c P(f(x + e) = c)``, ``e ~ N(0, sigma^2 I)``.

CERTIFY(f, sigma, x, n0, n, alpha): pick ``c_A`` as the most frequent class of
f on ``n0`` noisy copies of x; count ``k = #{f(x + e_j) = c_A}`` on ``n`` fresh
copies (an independent noise stream); ``p_A_lower`` is the one-sided
``1 - alpha`` Clopper-Pearson lower bound of ``k / n`` minus the sampler's
noise deviation bound ``delta`` (``arq.smoothing.noise.noise_tv_bound``), every step
rounded towards the safe side (``arq.smoothing.statistics``: the float is never above the
exact real bound, the radius never above ``sigma * Phi^-1`` of it). If
``p_A_lower < 1/2`` abstain (``ABSTAIN``, radius 0), else return ``c_A`` with
radius ``R = sigma * Phi^-1(p_A_lower)``. With probability at least
``1 - alpha`` over the noise, a non-abstained answer is correct: g(x + d) = c_A
for every ``||d||_2 < R``.

PREDICT(f, sigma, x, n, alpha): top two counts ``n_A, n_B`` on n noisy copies;
return ``c_A`` if the two-sided binomial test of ``n_A`` out of ``n_A + n_B`` at
1/2 has p-value ``<= alpha - n delta`` (the p-value rounded up), else ABSTAIN. The probability of
returning a class other than g(x) is at most alpha.

Noise is counter-based (``arq.smoothing.noise``): sample j of draw d for input
i is fixed by ``(seed, i, d, j)``, so results do not depend on ``batch_size``
and the selection (n0) and estimation (n) draws are independent streams.
Memory is bounded by ``batch_size``: votes accumulate on the model's device.

f's vote on a sample is the argmax of the model's logits for it, so the model must give one row
of at least two logits per noisy sample: more rows (a test-time augmentation's), one logit, a
non-tensor output or NaN logits (argmax would call NaN the maximum) are refused with an error,
never counted.
"""
from __future__ import annotations

import math
import numbers
import warnings
import weakref
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from arq.smoothing import statistics
from arq.smoothing.noise import (
    DRAW_ESTIMATE,
    DRAW_PREDICT,
    DRAW_SELECT,
    MAX_COUNTER,
    _choose_backend,
    noise_tv_bound,
    noisy_batch,
    noisy_codes_batch,
)
from arq.smoothing.engine import cpu_chunk, gpu_chunk, model_batches, prepare_model, tensors_version
from arq.smoothing.votes import count_votes

from arq import ABSTAIN  # noqa: E402  (one definition, re-exported by arq)


class Certificate(NamedTuple):
    """The result of CERTIFY for one input.

    prediction: the certified class c_A, or ``ABSTAIN`` (-1).
    radius: ``sigma * Phi^-1(p_lower)``, 0.0 when abstaining.
    p_lower: the lower confidence bound on P(f(x + e) = c_A) actually used, after
        subtracting the sampler's deviation bound.
    count: votes for c_A among the n estimation samples.
    n, n0, sigma, alpha: the parameters it was computed with.
    backend: which noise backend produced the samples ("torch", "cpp", "cuda", ...), followed for a
        quantized model by how it ran (``arq.smoothing.engine``): "cpp+int8" the integer CPU model,
        "cuda+packed" / "triton+packed" arq's packed GPU kernels, "...+fakequant" the fake-quant model;
        "+graphs" when the model was replayed from CUDA graphs (the packed GPU model's default).
    """

    prediction: int
    radius: float
    p_lower: float
    count: int
    n: int
    n0: int
    sigma: float
    alpha: float
    backend: str


def _model_sigma(model: torch.nn.Module, sigma: float | None) -> float:
    stored = (getattr(model, "arq_metadata", None) or {}).get("sigma")
    if sigma is None:
        if stored is None:
            raise ValueError(
                "sigma is required: the model carries no noise level (model.arq_metadata['sigma']); "
                "pass sigma=..., the noise level the base classifier was trained with"
            )
        sigma = stored
    if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real) or not math.isfinite(sigma) or sigma <= 0:
        raise ValueError(f"sigma must be a finite number > 0, got {sigma!r}")
    return float(sigma)


# numbers.Integral / numbers.Real: numpy scalars (np.int64(1000), np.float32(0.5)) are accepted as the
# Python numbers they stand for; bool is not a count or a level.
def _check_positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_alpha(alpha) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not (0.0 < alpha < 1.0):
        raise ValueError(f"alpha must be a number in (0, 1), got {alpha!r}")
    return float(alpha)


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not (0 <= seed < 2**63):
        raise ValueError(f"seed must be an integer in [0, 2^63), got {seed!r}")
    return int(seed)


def _model_device(model: torch.nn.Module, device) -> torch.device:
    if device is not None:
        return torch.device(device)
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.is_floating_point() or tensor.dtype.is_complex:
            return tensor.device
    return torch.device("cpu")


def _model_dtype(model: torch.nn.Module) -> torch.dtype:
    for parameter in model.parameters():
        if parameter.is_floating_point():
            return parameter.dtype
    return torch.float32


def _prepare_inputs(x: torch.Tensor, model: torch.nn.Module, device: torch.device) -> tuple[torch.Tensor, bool]:
    """Validates x and returns it as a batch ``[B, C, H, W]`` plus whether it was a single input."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() not in (3, 4):
        raise ValueError(f"x must have shape [C, H, W] or [B, C, H, W], got {x.dim()} dimensions {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor of pixels, got dtype {x.dtype}")
    if x.shape[0] == 0 or x[0].numel() == 0:
        raise ValueError(f"x holds no input (shape {tuple(x.shape)})")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x contains NaN or inf: a certificate for it would be meaningless")
    single = x.dim() == 3
    batch = x.unsqueeze(0) if single else x
    return batch.detach().to(device=device, dtype=_model_dtype(model)), single


def _input_indices(input_index, batch_size: int) -> list[int]:
    if isinstance(input_index, torch.Tensor) and input_index.dim() == 0:
        input_index = input_index.item()
    if input_index is None:
        indices = list(range(batch_size))
    elif isinstance(input_index, numbers.Integral) and not isinstance(input_index, bool):
        indices = [int(input_index) + i for i in range(batch_size)]
    elif isinstance(input_index, (Sequence, torch.Tensor, np.ndarray)):
        indices = [int(i) for i in input_index]
        if len(indices) != batch_size:
            raise ValueError(f"input_index has {len(indices)} entries for {batch_size} inputs")
    else:
        raise TypeError(f"input_index must be an int or a sequence of ints, got {type(input_index).__name__}")
    for index in indices:
        if not 0 <= index < MAX_COUNTER:
            raise ValueError(f"input_index entries must be in [0, 2^32), got {index}")
    return indices


class _EvalMode:
    """Evaluates a model in eval mode (warning if it was training) and restores its mode."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.was_training = model.training

    def __enter__(self):
        if self.was_training:
            warnings.warn(
                "model is in training mode; certifying it in eval mode (BatchNorm and dropout would make "
                "the base classifier random) and restoring its mode afterwards",
                UserWarning,
                stacklevel=3,
            )
            self.model.eval()
        return self.model

    def __exit__(self, *exc):
        if self.was_training:
            self.model.train()
        return False


#: model -> (its version and the input's shape, dtype and device, the classes it produced)
_PRODUCED_CLASSES: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _produced_classes(model: torch.nn.Module, x: torch.Tensor) -> int:
    """The number of logits the model gives one clean input like ``x[0]``; kept per model until a
    parameter or buffer changes, so that repeated calls do not run the model (a fake-quant one: in
    its slow form) once more each. Every batch's votes check the logits' shape again
    (``count_votes``)."""
    key = (tensors_version(model), tuple(x.shape[1:]), x.dtype, x.device)
    cached = _PRODUCED_CLASSES.get(model)
    if cached is not None and cached[0] == key:
        return cached[1]
    with torch.inference_mode():
        logits = model_logits(model, x[:1])
    if logits.shape[1] < 2:
        raise ValueError(f"the model gives {logits.shape[1]} logit per input; votes need one logit per class, "
                         "at least 2 (wrap a one-logit binary classifier to return [0, logit])")
    _PRODUCED_CLASSES[model] = (key, logits.shape[1])
    return logits.shape[1]


def check_logits(logits, rows: int) -> torch.Tensor:
    """``logits`` as a model's output for ``rows`` inputs must be: a tensor ``[rows, classes]``, one row
    per noisy sample, or every extra row (a test-time augmentation's, say) would be counted as a vote."""
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"the model must return a logits tensor [batch, classes], got {type(logits).__name__} "
                        "(wrap a model with several outputs to return its logits only)")
    if logits.dim() != 2:
        raise ValueError(f"the model must return logits [batch, classes], got shape {tuple(logits.shape)}")
    if logits.shape[0] != rows:
        raise ValueError(f"the model returned {logits.shape[0]} rows of logits for {rows} inputs: "
                         "each noisy sample must give exactly one row (one vote)")
    return logits


def model_logits(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """``model(batch)``, checked by :func:`check_logits`."""
    return check_logits(model(batch), batch.shape[0])


def predict_test_level(alpha: float, n: int, elements: int) -> float:
    """PREDICT's test level ``alpha - n * delta``: the n samples' joint law is within ``n * delta`` of
    Gaussian in total variation (``delta = noise_tv_bound(elements)``). At or below 0 PREDICT could
    only abstain: ValueError."""
    level = alpha - n * noise_tv_bound(elements)
    if level <= 0:
        raise ValueError(f"alpha={alpha:g} is not above n * delta = {n * noise_tv_bound(elements):.3g}, the "
                         f"sampler's deviation bound for n={n} samples of {elements} values: PREDICT "
                         "could only abstain; raise alpha or lower n")
    return level


def _num_classes(model: torch.nn.Module, x: torch.Tensor, num_classes: int | None) -> int:
    """The number of classes: checked against the model's output on one clean input."""
    produced = _produced_classes(model, x)
    if num_classes is None:
        stored = (getattr(model, "arq_metadata", None) or {}).get("num_classes")
        num_classes = stored if stored is not None else produced
        if num_classes != produced:
            raise ValueError(
                f"model.arq_metadata['num_classes']={num_classes} disagrees with the model's output ({produced})"
            )
        return int(num_classes)
    _check_positive_int("num_classes", num_classes, 2)
    if num_classes != produced:
        raise ValueError(f"num_classes={num_classes} disagrees with the model's output, which has {produced} classes")
    return num_classes


def _noisy_batches(x, *, sigma, num, draw, seed, input_index, batch_size, backend, model=None, start=0):
    """Yields the noisy copies of samples ``start .. start + num - 1`` of ``draw``, ``batch_size`` at a time: float
    images, or where ``model`` (a prepared integer model, ``arq.smoothing.engine``) reads its first
    layer's codes, those codes of the same samples (``noisy_codes_batch``: what the model would compute
    from the float images, bit for bit)."""
    codes = getattr(model, "input_codes", None)
    if codes is not None and not codes.accepts(x):
        codes = None  # not the format's input: the model's float entry would reject it with its own error
    for offset in range(0, num, batch_size):
        count = min(batch_size, num - offset)
        if codes is not None:
            yield noisy_codes_batch(x, sigma, codes, seed=seed, input_index=input_index, draw=draw,
                                    sample_start=start + offset, count=count, backend=backend)
        else:
            yield noisy_batch(x, sigma, seed=seed, input_index=input_index, draw=draw, sample_start=start + offset,
                              count=count, backend=backend)


def _sample_logits(model, x, *, sigma, num, draw, seed, input_index, batch_size, backend, start=0):
    """Yields f's logits on samples ``start .. start + num - 1`` of ``draw``, in order, each chunk checked by
    :func:`model_logits`; after the last, ValueError if any was NaN (one flag kept on the device, so
    no host synchronization per chunk)."""
    seen_nan = None
    chunk = cpu_chunk(model) if x.device.type == "cpu" else gpu_chunk()
    for batch in _noisy_batches(x, sigma=sigma, num=num, draw=draw, seed=seed, input_index=input_index,
                                batch_size=batch_size, backend=backend, model=model, start=start):
        for part in model_batches(batch, chunk):
            logits = model_logits(model, part)
            nan_here = torch.isnan(logits).any()
            seen_nan = nan_here if seen_nan is None else seen_nan | nan_here
            yield logits
    if seen_nan is not None and bool(seen_nan):
        raise ValueError(f"the model returned NaN logits on noisy samples of input {input_index}: argmax would "
                         "count each such sample as a vote for the first NaN class, a meaningless certificate "
                         "(check the model's numerics, e.g. float16 overflow)")


def sample_counts(
    model: torch.nn.Module,
    x: torch.Tensor,
    *,
    sigma: float,
    num: int,
    draw: int,
    seed: int,
    input_index: int,
    batch_size: int,
    num_classes: int,
    backend: str = "auto",
    progress: bool = False,
) -> torch.Tensor:
    """Votes ``int64[num_classes]`` of f on samples ``0 .. num - 1`` of ``draw`` for one input ``x[C, H, W]``.

    The model must be in eval mode and x on its device; counts stay on that device.
    """
    counts = torch.zeros(num_classes, dtype=torch.int64, device=x.device)
    bar = tqdm(total=num, disable=not progress, unit="sample", leave=False)
    with torch.inference_mode():
        for logits in _sample_logits(model, x, sigma=sigma, num=num, draw=draw, seed=seed, input_index=input_index,
                                     batch_size=batch_size, backend=backend):
            counts += count_votes(logits, num_classes, backend=backend)
            bar.update(logits.shape[0])
    bar.close()
    return counts


def sample_predictions(
    model: torch.nn.Module,
    x: torch.Tensor,
    *,
    sigma: float,
    num: int,
    draw: int,
    seed: int,
    input_index: int,
    batch_size: int,
    backend: str = "auto",
    start: int = 0,
) -> torch.Tensor:
    """The class ``int64[num]`` f gives each of samples ``start .. start + num - 1`` of ``draw``, in
    sample order.

    The same samples as ``sample_counts`` (IRS replays them to compare two models). ``model`` may be
    a prepared integer model that reads its input codes (``arq.smoothing.engine``): it then gets the
    codes of the same samples.
    """
    with torch.inference_mode():
        predictions = [logits.argmax(dim=1) for logits in _sample_logits(
            model, x, sigma=sigma, num=num, draw=draw, seed=seed, input_index=input_index, batch_size=batch_size,
            backend=backend, start=start)]
    return torch.cat(predictions) if predictions else torch.zeros(0, dtype=torch.int64, device=x.device)


def certify(
    model: torch.nn.Module,
    x: torch.Tensor,
    *,
    sigma: float | None = None,
    n: int = 100_000,
    n0: int = 100,
    alpha: float = 0.001,
    batch_size: int = 1000,
    seed: int = 0,
    num_classes: int | None = None,
    device: torch.device | str | None = None,
    backend: str = "auto",
    progress: bool = False,
    input_index: int | Sequence[int] | None = None,
) -> Certificate | list[Certificate]:
    """CERTIFY (module docstring) for one input ``[C, H, W]`` or each of a batch ``[B, C, H, W]``.

    Args:
        model: the base classifier f, mapping ``[B, C, H, W]`` pixels in [0, 1] to logits.
        x: the input(s), finite floats.
        sigma: the noise level; defaults to ``model.arq_metadata['sigma']``.
        n, n0: estimation and selection sample counts. alpha: failure probability.
        batch_size: noisy samples made at a time (bounds memory; does not change results). On
            CPU hosts without AVX-512 most models see them in chunks of at most 128
            (``arq.smoothing.engine.model_batches``).
        seed: the noise seed. input_index: the Philox input counter(s), default 0..B-1
            (the CLI uses the data set index so that certificates do not depend on ``--skip``).
        num_classes: checked against the model's output. device: where to run (default: the model's).
        backend: noise and vote backend: "auto", "torch", "cpp", "cuda" or "triton". For a
            quantized model (``arq.quantize``'s fake-quant model) it also picks the model's
            execution (``arq.smoothing.engine.prepare_model``): on CPU "cpp" ("auto" with
            ``arq._C`` built) runs the integer model ``arq.quant.to_integer(model)``, converted
            once and cached, and ``Certificate.backend`` reads "cpp+int8"; such a certificate
            is a certificate of the integer model (the one deployed on CPU), which agrees with
            the fake-quant model only up to arq.quant.execution's rounding tolerance, so its
            counts and radius may differ slightly from the reference's (on CUDA: arq's packed
            kernels, "+packed", with the same caveat). "torch" runs the fake-quant model with
            the reference noise and votes (exactly its certificate).
        progress: show a progress bar.

    Returns:
        A ``Certificate`` for ``[C, H, W]``, a list of them (in order) for ``[B, C, H, W]``.
        With probability >= 1 - alpha each non-abstained certificate is correct.
    """
    sigma = _model_sigma(model, sigma)
    n = _check_positive_int("n", n)
    n0 = _check_positive_int("n0", n0)
    batch_size = _check_positive_int("batch_size", batch_size)
    alpha = _check_alpha(alpha)
    seed = _check_seed(seed)
    if n > MAX_COUNTER or n0 > MAX_COUNTER:
        raise ValueError(f"n and n0 must be <= 2^32, got n={n}, n0={n0}")
    run_device = _model_device(model, device)
    batch, single = _prepare_inputs(x, model, run_device)
    indices = _input_indices(input_index, batch.shape[0])
    chosen_backend = _choose_backend(backend, run_device)
    delta = noise_tv_bound(batch[0].numel())
    certificates = []
    with _EvalMode(model):
        classes = _num_classes(model, batch, num_classes)
        # a quantized model runs through the fastest execution for the backend (arq.smoothing.engine)
        run_model, model_tag = prepare_model(model, chosen_backend, run_device, work=batch.shape[0] * (n + n0))
        inputs = tqdm(list(zip(batch, indices)), disable=not progress or single, unit="input")
        for one, index in inputs:
            common = dict(sigma=sigma, seed=seed, input_index=index, batch_size=batch_size,
                          num_classes=classes, backend=chosen_backend, progress=progress)
            selection = sample_counts(run_model, one, num=n0, draw=DRAW_SELECT, **common)
            candidate = int(selection.argmax().item())
            estimation = sample_counts(run_model, one, num=n, draw=DRAW_ESTIMATE, **common)
            count = int(estimation[candidate].item())
            # rounded down: the float stays a lower bound (exact in practice: delta is a multiple of 2^-52)
            p_lower = statistics.subtract_rounding_down(statistics.clopper_pearson_lower(count, n, alpha), delta)
            if p_lower < 0.5:
                certificates.append(Certificate(ABSTAIN, 0.0, max(p_lower, 0.0), count, n, n0, sigma, alpha,
                                                chosen_backend + model_tag))
            else:
                certificates.append(Certificate(candidate, statistics.radius(sigma, p_lower), p_lower, count, n, n0,
                                                sigma, alpha, chosen_backend + model_tag))
    return certificates[0] if single else certificates


def predict(
    model: torch.nn.Module,
    x: torch.Tensor,
    *,
    sigma: float | None = None,
    n: int = 100_000,
    alpha: float = 0.001,
    batch_size: int = 1000,
    seed: int = 0,
    num_classes: int | None = None,
    device: torch.device | str | None = None,
    backend: str = "auto",
    progress: bool = False,
    input_index: int | Sequence[int] | None = None,
) -> int | list[int]:
    """PREDICT (module docstring): the smoothed classifier's class, or ``ABSTAIN``.

    The probability of returning a class other than g(x) is at most alpha.
    One int for ``[C, H, W]``, a list for ``[B, C, H, W]``.
    """
    sigma = _model_sigma(model, sigma)
    n = _check_positive_int("n", n)
    batch_size = _check_positive_int("batch_size", batch_size)
    alpha = _check_alpha(alpha)
    seed = _check_seed(seed)
    run_device = _model_device(model, device)
    batch, single = _prepare_inputs(x, model, run_device)
    indices = _input_indices(input_index, batch.shape[0])
    chosen_backend = _choose_backend(backend, run_device)
    test_level = predict_test_level(alpha, n, batch[0].numel())
    predictions = []
    with _EvalMode(model):
        classes = _num_classes(model, batch, num_classes)
        run_model, _ = prepare_model(model, chosen_backend, run_device, work=batch.shape[0] * n)
        for one, index in zip(batch, indices):
            counts = sample_counts(run_model, one, sigma=sigma, num=n, draw=DRAW_PREDICT, seed=seed, input_index=index,
                                   batch_size=batch_size, num_classes=classes, backend=chosen_backend,
                                   progress=progress)
            top2 = torch.topk(counts, 2)
            count_a, count_b = int(top2.values[0]), int(top2.values[1])
            if count_a + count_b == 0 or statistics.binomial_test_pvalue(count_a, count_a + count_b) > test_level:
                predictions.append(ABSTAIN)
            else:
                predictions.append(int(top2.indices[0]))
    return predictions[0] if single else predictions


class Smooth:
    """A smoothed classifier g, drop-in for locuslab/smoothing's ``core.Smooth``.

    ``certify(x, n0, n, alpha, batch_size) -> (class, radius)`` and
    ``predict(x, n, alpha, batch_size) -> class`` with ``Smooth.ABSTAIN = -1``.
    Each call uses the next input counter of a seeded stream, so repeated calls
    draw fresh noise (as locuslab's do) and a run is reproducible from ``seed``.
    """

    ABSTAIN = ABSTAIN

    def __init__(self, base_classifier: torch.nn.Module, num_classes: int, sigma: float, *, seed: int = 0,
                 backend: str = "auto"):
        self.base_classifier = base_classifier
        self.num_classes = _check_positive_int("num_classes", num_classes, 2)
        self.sigma = _model_sigma(base_classifier, sigma)
        self.seed = _check_seed(seed)
        self.backend = backend
        self._calls = 0

    def _next_index(self) -> int:
        index = self._calls
        self._calls += 1
        return index

    def certify(self, x: torch.Tensor, n0: int, n: int, alpha: float, batch_size: int) -> tuple[int, float]:
        """CERTIFY: ``(c_A, radius)``, or ``(Smooth.ABSTAIN, 0.0)``; correct with probability >= 1 - alpha."""
        certificate = certify(self.base_classifier, x, sigma=self.sigma, n=n, n0=n0, alpha=alpha,
                              batch_size=batch_size, seed=self.seed, num_classes=self.num_classes,
                              backend=self.backend, input_index=self._next_index())
        return certificate.prediction, certificate.radius

    def predict(self, x: torch.Tensor, n: int, alpha: float, batch_size: int) -> int:
        """PREDICT: the class, or ``Smooth.ABSTAIN``; wrong with probability at most alpha."""
        return predict(self.base_classifier, x, sigma=self.sigma, n=n, alpha=alpha, batch_size=batch_size,
                       seed=self.seed, num_classes=self.num_classes, backend=self.backend,
                       input_index=self._next_index())
