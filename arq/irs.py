"""Incremental randomized smoothing, IRS (Ugare, Singh and Misailovic, ICLR 2024).

Certify a modified base classifier f' (quantized, pruned, fine-tuned) by reusing
the certificate of the original f, with ``n_p << n`` samples instead of n.

Once, for f (:func:`build_cache`): CERTIFY (Cohen et al. 2019) gives per input
``c_A`` and ``p_A_lower`` (at confidence ``1 - alpha``, from the n samples of
draw ``DRAW_ESTIMATE``); the cache keeps them with the noise seed and input
index (the counter-based noise of :mod:`arq.smoothing.noise` makes every
sample replayable), a digest of the input (:func:`input_digest`, checked when f' is certified)
and f's predictions on samples ``0 .. n_p - 1`` of that draw.

Then, for f' (:func:`certify_incremental`), per input:

* ``p_A_lower < gamma``: replay the same samples through f' and count the
  disagreements ``d = #{j < n_p : f(x + e_j) != f'(x + e_j)}``. ``zeta`` is the
  one-sided ``1 - alpha_zeta`` Clopper-Pearson upper bound of ``d / n_p``, an
  upper bound on ``P(f(x + e) != f'(x + e))``. Since

      P(f'(x + e) = c_A) >= P(f(x + e) = c_A) - P(f(x + e) != f'(x + e)) >= p_A_lower - zeta,

  if ``p' = p_A_lower - zeta - delta >= 1/2`` then g' (f' smoothed) is constant
  on the L2 ball of radius ``R = sigma * Phi^-1(p')`` around x; otherwise abstain.
  (Ugare et al., Theorem 1.) ``delta = noise_tv_bound(d)`` accounts for the
  sampler's cut-off tail once more, now in zeta: the cached ``p_A_lower``
  already has it subtracted (see :mod:`arq.smoothing.core`).
* ``p_A_lower >= gamma`` (p_A near 1, where a direct estimate with n_p samples
  is already tight, while ``zeta`` would cost at least ``1 - alpha_zeta^(1/n_p)``):
  standard certification of f' with n_p samples: ``k`` votes for the cached
  ``c_A`` on *fresh* samples ``n .. n + n_p - 1`` of ``DRAW_ESTIMATE`` (never
  used by f's certificate, so independent of the branch decision and of c_A's
  selection on ``DRAW_SELECT``), ``p' = CP_lower(k, n_p, alpha) - delta``.
* f abstained (``p_A_lower < 1/2``): abstain; no sample is drawn.

Guarantee. The first branch gives a wrong certificate only when f's bound or zeta's
fails: ``P(first branch and wrong) <= alpha + alpha_zeta`` (union bound; the same noise
samples may serve both, as the theorem only needs each bound to hold). This is not a
statement given the branch: the branch is chosen from the same samples as p_A_lower.
One of the second branch is correct with probability at least ``1 - alpha`` given
the branch (its samples are fresh, independent of the choice). Before the branch is
known: ``P(wrong) <= alpha + alpha_zeta + alpha P(second branch) <= 2 alpha + alpha_zeta``
(with the defaults, confidence 0.997).

Which models run. f runs as given: its certificate and its replayed predictions through
``model(x)``. For a quantized f, ``arq.certify`` would otherwise run its integer model (the
engine, :mod:`arq.smoothing.engine`), which may classify a few noisy samples differently from the
fake-quant model whose predictions the cache keeps and zeta compares; the inequality above needs
one f in both terms, so :func:`build_cache` certifies a quantized f with ``backend="torch"`` (the
fake-quant model itself; the same noise bit for bit).

f' runs as ``arq.certify`` runs it (:func:`arq.smoothing.engine.prepare_model`): a quantized f'
(``arq.quantize``'s fake-quant model) through its integer model on CPU (``"cpp"``, what ``"auto"``
picks there) or arq's packed kernels on CUDA (on CPU 7-9x faster than its fake-quant form on a CIFAR
ResNet-20 and about 2x on the MNIST LeNet, measured ad hoc through ``arq.certify``). The
inequality holds for any f', so with f'_int in both of its f' terms the certificate is one of the
smoothed integer model, the model deployed and the one ``arq.certify`` certifies; zeta then bounds
``P(f(x + e) != f'_int(x + e))``, estimated on the same samples e_j: the integer model reads the
codes its first layer would compute from the float noisy images f saw, bit for bit
(:func:`arq.smoothing.noise.noisy_codes_batch`). ``execution="as given"`` (or ``backend="torch"``)
runs the fake-quant f' itself; ``IRSCertificate.backend`` says which ran (``"cpp+int8"``,
``"cpp+fakequant"``, ``"torch"``, as ``Certificate.backend``).

Defaults (the paper's): ``alpha = alpha_zeta = 0.001``, ``gamma = 0.99``
(0.995 on ImageNet), ``n_p = 10 %`` of n (the paper varies n_p from 1 % to 50 %).
The paper reports a 4.1x speed-up over full re-certification for int8 CIFAR-10
ResNet-110 at sigma 1 (``benchmarks/bench_irs.py`` measures ours).
"""
from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from arq.smoothing import statistics
from arq.smoothing.core import (
    ABSTAIN,
    _check_positive_int,
    _input_indices,
    _model_device,
    _model_dtype,
    certify,
    sample_predictions,
)
from arq.smoothing.engine import is_quantized, prepare_model
from arq.smoothing.noise import DRAW_ESTIMATE, MAX_COUNTER, _choose_backend, noise_tv_bound

__all__ = [
    "DEFAULT_ALPHA_ZETA",
    "DEFAULT_GAMMA",
    "DEFAULT_NP_SHARE",
    "EXECUTIONS",
    "IRSCache",
    "IRSCertificate",
    "IRSEntry",
    "build_cache",
    "certify_incremental",
    "input_digest",
    "replay_predictions",
]

DEFAULT_GAMMA = 0.99
DEFAULT_ALPHA_ZETA = 0.001
DEFAULT_NP_SHARE = 0.1
#: how f' runs (certify_incremental's ``execution``)
EXECUTIONS = ("auto", "as given")
CACHE_FORMAT_VERSION = 2
#: format versions :meth:`IRSCache.load` reads (1: without input digests)
READABLE_CACHE_FORMATS = (1, 2)

MODE_IRS = "irs"
MODE_DIRECT = "direct"
MODE_ABSTAIN = "abstain"


@dataclass
class IRSEntry:
    """What IRS keeps about one input from certifying the original classifier f.

    Args:
        input_index: the Philox input counter the samples were drawn with.
        prediction: c_A, or ``ABSTAIN`` (-1) when f's certificate abstained.
        p_lower: f's lower confidence bound on ``P(f(x + e) = c_A)`` (after the noise bound).
        radius: f's certified radius ``sigma * Phi^-1(p_lower)`` (0 when abstaining).
        count: f's votes for c_A among the n estimation samples.
        predictions: ``int64[m]``: f's class on samples ``0 .. m - 1`` of ``DRAW_ESTIMATE``.
        input_digest: SHA-256 of the input f was certified on (:func:`input_digest`); None in caches
            saved before it was kept (format version 1), which are then not checked.
    """

    input_index: int
    prediction: int
    p_lower: float
    radius: float
    count: int
    predictions: torch.Tensor
    input_digest: str | None = None


@dataclass
class IRSCache:
    """f's certificates and replayable predictions for a set of inputs (:func:`build_cache`).

    Args:
        sigma, n, n0, alpha, seed: the CERTIFY parameters f was certified with.
        entries: ``{input_index: IRSEntry}``.
    """

    sigma: float
    n: int
    n0: int
    alpha: float
    seed: int
    entries: dict[int, IRSEntry] = field(default_factory=dict)

    def __getitem__(self, input_index: int) -> IRSEntry:
        try:
            return self.entries[int(input_index)]
        except KeyError:
            raise KeyError(
                f"the IRS cache has no entry for input_index {input_index}; it holds "
                f"{len(self.entries)} inputs (build_cache with that input_index first)"
            ) from None

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def n_p_cached(self) -> int:
        """The number of replayable predictions every entry holds."""
        return min((entry.predictions.numel() for entry in self.entries.values()), default=0)

    def to_dict(self) -> dict:
        return {
            "format_version": CACHE_FORMAT_VERSION,
            "sigma": self.sigma, "n": self.n, "n0": self.n0, "alpha": self.alpha, "seed": self.seed,
            "input_index": torch.tensor([e.input_index for e in self.entries.values()], dtype=torch.int64),
            "prediction": torch.tensor([e.prediction for e in self.entries.values()], dtype=torch.int64),
            "p_lower": torch.tensor([e.p_lower for e in self.entries.values()], dtype=torch.float64),
            "radius": torch.tensor([e.radius for e in self.entries.values()], dtype=torch.float64),
            "count": torch.tensor([e.count for e in self.entries.values()], dtype=torch.int64),
            "predictions": [e.predictions.cpu() for e in self.entries.values()],
            "input_digest": [e.input_digest for e in self.entries.values()],
        }

    @classmethod
    def from_dict(cls, data: dict) -> "IRSCache":
        version = data.get("format_version")
        if version not in READABLE_CACHE_FORMATS:
            raise ValueError(f"unsupported IRS cache format_version {version!r} (expected one of "
                             f"{READABLE_CACHE_FORMATS})")
        cache = cls(float(data["sigma"]), int(data["n"]), int(data["n0"]), float(data["alpha"]), int(data["seed"]))
        digests = data.get("input_digest") or [None] * len(data["input_index"])
        for i, index in enumerate(data["input_index"].tolist()):
            cache.entries[index] = IRSEntry(
                index, int(data["prediction"][i]), float(data["p_lower"][i]), float(data["radius"][i]),
                int(data["count"][i]), data["predictions"][i], digests[i],
            )
        return cache

    def save(self, path: str | os.PathLike) -> None:
        """Write the cache with ``torch.save`` (tensors and plain values only), through a temporary
        file in the same folder and an atomic rename: an interrupted save leaves the old file or none."""
        path = os.fspath(path)
        partial = f"{path}.partial"
        torch.save(self.to_dict(), partial)
        os.replace(partial, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "IRSCache":
        """Read a cache written by :meth:`save` (``weights_only`` loading)."""
        return cls.from_dict(torch.load(path, map_location="cpu", weights_only=True))


class IRSCertificate(NamedTuple):
    """The result of :func:`certify_incremental` for one input.

    prediction: c_A (taken from f's certificate), or ``ABSTAIN`` (-1).
    radius: ``sigma * Phi^-1(p_lower)``, 0.0 when abstaining.
    p_lower: the lower bound on ``P(f'(x + e) = c_A)`` used (``p_A_lower - zeta - delta`` or the direct bound).
    zeta: the upper bound on the disagreement ``P(f(x + e) != f'(x + e))`` (nan outside the IRS branch).
    disagreements: ``#{f != f'}`` among the n_p replayed samples (-1 outside the IRS branch).
    mode: ``"irs"``, ``"direct"`` (p_A_lower >= gamma) or ``"abstain"`` (f abstained).
    n_p: the number of f' forward passes spent.
    sigma, alpha, alpha_zeta: the parameters.
    backend: the noise backend and f''s execution, as in ``arq.certify``'s ``Certificate.backend``
        (``"cpp+int8"``: f''s integer model; ``"cpp+fakequant"`` / ``"torch"``: a quantized f' as given).
    """

    prediction: int
    radius: float
    p_lower: float
    zeta: float
    disagreements: int
    mode: str
    n_p: int
    sigma: float
    alpha: float
    alpha_zeta: float
    backend: str = ""


# ----------------------------------------------------------------------------- helpers
def _as_batch(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point torch.Tensor, got {type(x).__name__}")
    if x.dim() not in (3, 4):
        raise ValueError(f"x must have shape [C, H, W] or [B, C, H, W], got {tuple(x.shape)}")
    return (x.unsqueeze(0), True) if x.dim() == 3 else (x, False)


def input_digest(x: torch.Tensor) -> str:
    """SHA-256 of one input ``[C, H, W]`` as float32 values (with its shape), wherever it lives: what ties
    a cache entry to the image it certified (:func:`certify_incremental` checks it)."""
    values = x.detach().to(device="cpu", dtype=torch.float32).contiguous()
    digest = hashlib.sha256(repr(tuple(values.shape)).encode())
    digest.update(values.numpy().tobytes())
    return digest.hexdigest()


def _check_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _check_probability(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
        raise ValueError(f"{name} must be a number in (0, 1), got {value!r}")
    return float(value)


def resolve_n_p(n: int, n_p: int | None = None, n_p_share: float | None = None) -> int:
    """``n_p`` itself, or ``max(1, round(n_p_share * n))`` (default share 10 %)."""
    if n_p is not None:
        if n_p_share is not None:
            raise ValueError("give n_p or n_p_share, not both")
        return _check_int("n_p", n_p)
    share = DEFAULT_NP_SHARE if n_p_share is None else n_p_share
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0.0 < share <= 1.0:
        raise ValueError(f"n_p_share must be in (0, 1], got {share!r}")
    return max(1, round(share * n))


def replay_predictions(
    model: torch.nn.Module,
    x: torch.Tensor,
    *,
    sigma: float,
    seed: int,
    input_index: int,
    start: int,
    count: int,
    batch_size: int = 1000,
    backend: str = "auto",
) -> torch.Tensor:
    """f's class ``int64[count]`` on samples ``start .. start + count - 1`` of ``DRAW_ESTIMATE``
    (:func:`arq.smoothing.core.sample_predictions`).

    A non-zero ``start`` reaches samples that CERTIFY with ``n <= start`` never drew. ``x`` is
    ``[C, H, W]`` on the model's device and the model is in eval mode; a prepared integer model
    that reads its input codes gets the codes of the same samples.
    """
    if start + count > MAX_COUNTER:
        raise ValueError(f"samples up to {start + count} exceed the noise counter range 2^32")
    return sample_predictions(model, x, sigma=sigma, num=count, draw=DRAW_ESTIMATE, seed=seed,
                              input_index=input_index, batch_size=batch_size, backend=backend, start=start)


def _check_replays_cache(reference: torch.Tensor, cached: torch.Tensor, index: int) -> None:
    """Refuse an ``original`` whose predictions on the cached samples differ from the cache's.

    zeta bounds ``P(original(x + e) != f'(x + e))``, and p_A_lower is about the model the cache was
    built from: subtracting the one from the other is sound only when the two are the same model.
    The cached prefix (samples ``0 .. m - 1``) is recomputed anyway, so comparing it costs nothing;
    a deterministic f reproduces it exactly, so any difference means another model (or weights
    changed since, or an execution that is not repeatable).
    """
    cached = cached.cpu()
    differing = int((reference[: cached.numel()] != cached).sum().item())
    if differing:
        raise ValueError(
            f"original disagrees with the cache on {differing} of the {cached.numel()} cached samples of input "
            f"{index}: it is not the model the cache was built from (or its weights changed, or its execution is "
            "not repeatable), and zeta would bound the disagreement with another model than the one p_A_lower "
            "is about; pass the cache's model, or rebuild the cache with a larger n_p")


class _Eval:
    def __init__(self, model: torch.nn.Module):
        self.model, self.was_training = model, model.training

    def __enter__(self):
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was_training)
        return False


# ----------------------------------------------------------------------------- IRS
def build_cache(
    model: torch.nn.Module,
    x: torch.Tensor,
    *,
    sigma: float | None = None,
    n: int = 100_000,
    n0: int = 100,
    alpha: float = 0.001,
    n_p: int | None = None,
    n_p_share: float | None = None,
    seed: int = 0,
    input_index: int | Sequence[int] | None = None,
    batch_size: int = 1000,
    backend: str = "auto",
    device: torch.device | str | None = None,
    cache: IRSCache | None = None,
) -> IRSCache:
    """Certify the original classifier f on ``x`` ``[C, H, W]`` or ``[B, C, H, W]`` and cache it for IRS.

    Runs ``arq.certify(f, x, n=n, n0=n0, alpha=alpha, seed=seed, input_index=...)`` (so
    ``p_A_lower`` holds with probability ``1 - alpha``) and stores f's predictions on the
    first ``n_p`` estimation samples (``n_p`` or ``n_p_share * n``, default 10 % of n), the
    largest n_p a later :func:`certify_incremental` may use without rerunning f.
    Adds to ``cache`` when given (its parameters must match). A quantized f is certified as the
    fake-quant model it is, the model its predictions come from (``backend="torch"``; module
    docstring), not as the integer model ``arq.certify`` would otherwise run.
    """
    sigma = float(sigma if sigma is not None else (getattr(model, "arq_metadata", None) or {}).get("sigma") or 0.0)
    if not sigma > 0:
        raise ValueError("sigma is required: pass sigma=... or give the model arq_metadata['sigma']")
    _check_positive_int("n", n)
    _check_positive_int("n0", n0)
    n_keep = resolve_n_p(n, n_p, n_p_share)
    if n_keep > n:
        raise ValueError(f"n_p={n_keep} must not exceed n={n}: IRS replays f's estimation samples")
    if cache is None:
        cache = IRSCache(sigma, n, n0, alpha, seed)
    elif (cache.sigma, cache.n, cache.n0, cache.alpha, cache.seed) != (sigma, n, n0, alpha, seed):
        raise ValueError("cache was built with other sigma/n/n0/alpha/seed than this call's")
    run_device = _model_device(model, device)
    batch, _ = _as_batch(x)
    batch = batch.detach().to(device=run_device, dtype=_model_dtype(model))
    indices = _input_indices(input_index, batch.shape[0])
    certify_backend = "torch" if is_quantized(model) else backend
    certificates = certify(model, batch, sigma=sigma, n=n, n0=n0, alpha=alpha, batch_size=batch_size, seed=seed,
                           device=run_device, backend=certify_backend, input_index=indices)
    with _Eval(model):
        for one, index, certificate in zip(batch, indices, certificates):
            predictions = replay_predictions(model, one, sigma=sigma, seed=seed, input_index=index, start=0,
                                             count=n_keep, batch_size=batch_size, backend=backend)
            cache.entries[index] = IRSEntry(index, int(certificate.prediction), float(certificate.p_lower),
                                            float(certificate.radius), int(certificate.count), predictions.cpu(),
                                            input_digest(one))
    return cache


def certify_incremental(
    model: torch.nn.Module,
    x: torch.Tensor,
    cache: IRSCache,
    *,
    n_p: int | None = None,
    n_p_share: float | None = None,
    gamma: float = DEFAULT_GAMMA,
    alpha_zeta: float = DEFAULT_ALPHA_ZETA,
    input_index: int | Sequence[int] | None = None,
    original: torch.nn.Module | None = None,
    batch_size: int = 1000,
    backend: str = "auto",
    device: torch.device | str | None = None,
    execution: str = "auto",
) -> IRSCertificate | list[IRSCertificate]:
    """IRS certification (module docstring) of the modified classifier f' = ``model``.

    Args:
        model: f', mapping ``[B, C, H, W]`` pixels to logits (e.g. a quantized copy of f).
        x: the same input(s) f was certified on, ``[C, H, W]`` or ``[B, C, H, W]``, with the same
            ``input_index``: each is checked against the digest its cache entry keeps (ValueError
            otherwise). With another image under an entry's index, the ``original`` path below would
            bound ``P(f(x' + e) != f'(x' + e))`` and subtract it from the other image's p_A_lower,
            certifying radii the smoothed f' does not have.
        cache: f's certificates (:func:`build_cache`); gives sigma, seed, n and alpha.
        n_p: f' samples per input; default ``n_p_share * cache.n`` (``n_p_share`` default 0.1).
        gamma: above this cached ``p_A_lower`` certify f' directly with n_p fresh samples.
        alpha_zeta: failure probability of the disagreement bound zeta.
        input_index: the inputs' counters (as for ``build_cache``); default 0..B-1.
        original: f, only needed when n_p exceeds the predictions the cache holds (they are
            then recomputed from the seed); it must be the model the cache was built from, or
            zeta bounds the disagreement with another model than the one p_A_lower is about:
            its predictions on the cached samples must equal the cache's (ValueError otherwise).
        batch_size, backend, device: as for :func:`arq.certify`.
        execution: "auto": f' runs as ``arq.certify`` runs it under ``backend`` (a quantized f' on
            CPU with "cpp", what "auto" picks there: its integer model; with "torch": as given);
            "as given": ``model(x)`` itself, a quantized f' as its fake-quant model whatever the
            noise backend (what IRS did before the engine ran it).

    Returns:
        One ``IRSCertificate`` for ``[C, H, W]``, a list for ``[B, C, H, W]``. A certificate
        from the IRS branch holds with probability ``>= 1 - (alpha + alpha_zeta)``, from the
        direct branch with ``>= 1 - alpha``.
    """
    if not isinstance(cache, IRSCache):
        raise TypeError(f"cache must be an arq.irs.IRSCache, got {type(cache).__name__}")
    gamma = _check_probability("gamma", gamma)
    alpha_zeta = _check_probability("alpha_zeta", alpha_zeta)
    _check_int("batch_size", batch_size)
    if execution not in EXECUTIONS:
        raise ValueError(f"execution must be one of {', '.join(map(repr, EXECUTIONS))}, got {execution!r}")
    num = resolve_n_p(cache.n, n_p, n_p_share)
    sigma, alpha = cache.sigma, cache.alpha
    run_device = _model_device(model, device)
    batch, single = _as_batch(x)
    batch = batch.detach().to(device=run_device, dtype=_model_dtype(model))
    indices = _input_indices(input_index, batch.shape[0])
    delta = noise_tv_bound(batch[0].numel())
    chosen_backend = _choose_backend(backend, run_device)
    results = []
    with _Eval(model):
        if execution == "auto":  # f' as arq.certify runs it (module docstring)
            candidate, tag = prepare_model(model, chosen_backend, run_device, work=batch.shape[0] * num)
        else:
            candidate, tag = model, ("+fakequant" if is_quantized(model) and chosen_backend != "torch" else "")
        used = chosen_backend + tag
        for one, index in zip(batch, indices):
            entry = cache[index]
            if entry.input_digest is not None and entry.input_digest != input_digest(one):
                raise ValueError(
                    f"x for input_index {index} is not the input the cache certified under that index: pass "
                    "the inputs build_cache got with their input_index (p_A_lower and c_A belong to that image)")
            common = dict(sigma=sigma, seed=cache.seed, input_index=index, batch_size=batch_size,
                          backend=chosen_backend)
            if entry.prediction == ABSTAIN or entry.p_lower < 0.5:
                results.append(IRSCertificate(ABSTAIN, 0.0, entry.p_lower, math.nan, -1, MODE_ABSTAIN, 0,
                                              sigma, alpha, alpha_zeta, used))
                continue
            c_a = entry.prediction
            if entry.p_lower >= gamma:
                # fresh samples n .. n + n_p - 1: independent of f's certificate and of the branch choice
                votes = replay_predictions(candidate, one, start=cache.n, count=num, **common)
                k = int((votes == c_a).sum().item())
                p_lower = statistics.subtract_rounding_down(statistics.clopper_pearson_lower(k, num, alpha), delta)
                mode, zeta, disagreements = MODE_DIRECT, math.nan, -1
            else:
                reference = entry.predictions
                if reference.numel() < num:
                    if original is None:
                        raise ValueError(
                            f"n_p={num} exceeds the {reference.numel()} predictions of f the cache holds for "
                            f"input {index}: pass original=f to recompute them, or a smaller n_p"
                        )
                    with _Eval(original):
                        reference = replay_predictions(original, one.to(_model_device(original, None)), start=0,
                                                       count=num, **common).cpu()
                    _check_replays_cache(reference, entry.predictions, index)
                replayed = replay_predictions(candidate, one, start=0, count=num, **common)
                disagreements = int((replayed.cpu() != reference[:num].cpu()).sum().item())
                zeta = statistics.clopper_pearson_upper(disagreements, num, alpha_zeta)
                # rounded down: p_A_lower - zeta - delta in round-to-nearest could land half an ulp above
                p_lower = statistics.subtract_rounding_down(entry.p_lower, zeta, delta)
                mode = MODE_IRS
            if p_lower >= 0.5:
                results.append(IRSCertificate(c_a, statistics.radius(sigma, p_lower), p_lower, zeta, disagreements,
                                              mode, num, sigma, alpha, alpha_zeta, used))
            else:
                results.append(IRSCertificate(ABSTAIN, 0.0, max(p_lower, 0.0), zeta, disagreements, mode, num,
                                              sigma, alpha, alpha_zeta, used))
    return results[0] if single else results
