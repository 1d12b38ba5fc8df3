"""Rewards of the bit-width search: how good is a quantized candidate?

At the end of an episode :class:`CandidateEvaluator` quantizes the float model f to the
policy (``arq.quant.quantize``: calibration under Gaussian noise), fine-tunes it briefly
under noise at the model's sigma, measures it on a held-out *search subset* and turns
the measurements into a reward:

* ``"haq"`` (Wang et al., CVPR 2019), clean accuracy, the baseline:

      R_haq = 0.1 * (acc_q - acc_f)      accuracies in percent (HAQ's code),

  ``acc`` the top-1 accuracy of the base classifier on the clean search images (the candidate
  run as in IRS, :class:`IRSSettings`).
* ``"arq"`` (Yang, Ugare, Zhao, Singh and Misailovic, arXiv 2410.24214), certified
  robustness of the smoothed quantized model relative to the float one:

      R_arq = 0.1 * 100 * (ACR_q / ACR_f - 1) + w_acc * 0.1 * (acc_q - acc_f)   (acc in percent),

  ``ACR = (1/N) sum_i R_i [g(x_i) = y_i]`` (Zhai et al. 2020) over the N search images.
  ARQ rewards the candidate's ACR; the form relative to f and its scale are arq's choice. With
  f fixed for a search, R_arq (at ``w_acc = 0``) is an increasing affine function of ``ACR_q``, so
  it ranks candidates and picks the best policy as ACR itself would; the scale puts it on HAQ's
  (one percent of f's ACR weighs as one accuracy point), which sets the size of the critic's
  targets and of the baseline the agent subtracts.
  ``ACR_q`` comes from IRS (:mod:`arq.irs`, n_p samples per image; on CPU the candidate
  runs as its integer model, as ``arq.certify`` runs it, :class:`IRSSettings`) on f's certificates
  (CERTIFY once, n samples); ``ACR_f`` is the same IRS measurement of f itself, so that
  a candidate as good as f scores 0 whatever n_p caps the radius at (IRS radii are at
  most ``sigma Phi^-1(alpha^(1/n_p))`` in its direct branch, and in its other branch f
  itself pays ``zeta = 1 - alpha_zeta^(1/n_p)``). ``w_acc``
  (``accuracy_weight``, default 0) lets clean accuracy enter; both terms are on HAQ's
  scale (a 1 % relative loss of ACR costs as much as one accuracy point, 0.1).
* a callable ``reward(inputs: RewardInputs) -> float``; ``inputs.acr()`` computes the IRS
  ACR on demand (so a callable that does not need it costs no certification).

Costs per episode: the fine-tuning steps, ``N`` clean forward passes and (for ``"arq"``)
``N * n_p`` noisy ones; the one-off float certification costs ``N * (n0 + n)``.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from arq.irs import DEFAULT_ALPHA_ZETA, DEFAULT_GAMMA, EXECUTIONS, IRSCache, build_cache, certify_incremental
from arq.quant import FinetuneConfig, Policy, QuantConfig, quantize
from arq.smoothing.engine import clean_logits, prepare_model

__all__ = [
    "REWARDS",
    "CandidateEvaluator",
    "Evaluation",
    "IRSSettings",
    "RewardInputs",
    "arq_reward",
    "haq_reward",
]

REWARDS = ("arq", "haq")


def haq_reward(accuracy: float, float_accuracy: float) -> float:
    """HAQ: ``0.1 * (acc_q - acc_f)`` with accuracies in percent (fractions in, times 100)."""
    return 0.1 * 100.0 * (accuracy - float_accuracy)


def arq_reward(acr: float, float_acr: float, accuracy: float = 0.0, float_accuracy: float = 0.0,
               accuracy_weight: float = 0.0) -> float:
    """ARQ: ``0.1 * 100 * (ACR_q / ACR_f - 1) + w_acc * 0.1 * 100 * (acc_q - acc_f)`` (module docstring)."""
    if not float_acr > 0:
        raise ValueError(f"float_acr must be > 0 for a reward relative to the float model, got {float_acr}")
    return 0.1 * 100.0 * (acr / float_acr - 1.0) + accuracy_weight * haq_reward(accuracy, float_accuracy)


@dataclass
class IRSSettings:
    """How the ``"arq"`` reward certifies (arq.irs).

    Args:
        n: samples of f's one-off CERTIFY per search image (its ACR is the reference).
        n0: selection samples of that CERTIFY.
        n_p: samples of each candidate f' per search image (IRS), at most n.
        alpha: failure probability of f's certificate.
        alpha_zeta: failure probability of the disagreement bound zeta.
        gamma: above this p_A_lower the candidate is certified directly with n_p samples.
        seed: the noise seed of both.
        batch_size: noisy samples per forward pass.
        candidate_execution: how each candidate runs, in IRS and for its clean accuracy (the
            ``"haq"`` reward, and ``"arq"``'s accuracy term): "auto" as ``arq.certify`` runs it (on
            CPU with ``arq._C``: its integer model, the one ``arq.certify`` certifies and a user
            deploys; 7-9x faster than its fake-quant form on a CIFAR ResNet-20, 2x on the MNIST
            LeNet) or "as given" (the fake-quant model; what searches measured before this setting
            existed; until 2026-11-29 clean accuracy was always measured this way).
    """

    n: int = 10_000
    n0: int = 100
    n_p: int = 1000
    alpha: float = 0.001
    alpha_zeta: float = DEFAULT_ALPHA_ZETA
    gamma: float = DEFAULT_GAMMA
    seed: int = 0
    batch_size: int = 1000
    candidate_execution: str = "auto"

    def __post_init__(self) -> None:
        if self.candidate_execution not in EXECUTIONS:
            raise ValueError(f"candidate_execution must be one of {', '.join(map(repr, EXECUTIONS))}, got "
                             f"{self.candidate_execution!r}")
        for name in ("n", "n0", "n_p", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.n_p > self.n:
            raise ValueError(f"n_p ({self.n_p}) must not exceed n ({self.n}): IRS replays f's samples")
        for name in ("alpha", "alpha_zeta", "gamma"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in (0, 1), got {getattr(self, name)}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")


class Evaluation(dict):
    """What one candidate scored: ``reward``, ``accuracy``, ``acr`` (None when not computed),
    ``float_accuracy``, ``float_acr``, ``seconds`` and any extras (a dict, JSON-ready)."""

    @property
    def reward(self) -> float:
        return self["reward"]


@dataclass
class RewardInputs:
    """What a reward callable sees: the fine-tuned candidate and lazily computed measurements."""

    model: nn.Module
    policy: Policy
    accuracy: float
    float_accuracy: float
    evaluator: "CandidateEvaluator"
    _acr: float | None = field(default=None, repr=False)

    def acr(self) -> float:
        """ACR of the smoothed candidate on the search subset, through IRS (computed once)."""
        if self._acr is None:
            self._acr = self.evaluator.candidate_acr(self.model)
        return self._acr

    @property
    def float_acr(self) -> float:
        return self.evaluator.float_acr()


class CandidateEvaluator:
    """policy -> quantize -> fine-tune under noise -> measure on the search subset -> reward.

    Args:
        model: the float model f (eval mode), with ``arq_metadata["sigma"]`` or ``sigma`` given.
        search_images: ``[N, C, H, W]`` held-out images in [0, 1] (not used for fine-tuning).
        search_labels: ``int64[N]``.
        search_indices: their data set indices, the IRS noise counters (default 0..N-1).
        calibration_images: inputs for the activation ranges (noise is added).
        train_data: ``(images, labels)`` for the fine-tuning; ``None`` with ``finetune=None``.
        reward: ``"arq"``, ``"haq"`` or a callable ``RewardInputs -> float``.
        finetune: :class:`arq.quant.FinetuneConfig` (brief, e.g. ``max_steps=50``) or None.
        quant_config: :class:`arq.quant.QuantConfig` (default settings when None).
        irs: :class:`IRSSettings` of the ``"arq"`` reward.
        accuracy_weight: ``w_acc`` of the ``"arq"`` reward.
        sigma: the noise level; default ``model.arq_metadata["sigma"]``.
        cache: a float certificate cache to reuse (e.g. saved by a previous run).
    """

    def __init__(
        self,
        model: nn.Module,
        search_images: torch.Tensor,
        search_labels: torch.Tensor,
        *,
        calibration_images: torch.Tensor,
        train_data: tuple[torch.Tensor, torch.Tensor] | None = None,
        search_indices: Sequence[int] | None = None,
        reward: str | Callable[[RewardInputs], float] = "arq",
        finetune: FinetuneConfig | None = None,
        quant_config: QuantConfig | None = None,
        irs: IRSSettings | None = None,
        accuracy_weight: float = 0.0,
        sigma: float | None = None,
        cache: IRSCache | None = None,
    ) -> None:
        if not callable(reward) and reward not in REWARDS:
            raise ValueError(f"reward must be one of {', '.join(REWARDS)} or a callable, got {reward!r}")
        if search_images.dim() != 4 or search_images.shape[0] == 0:
            raise ValueError(f"search_images must be a non-empty batch [N, C, H, W], got {tuple(search_images.shape)}")
        if search_labels.shape != search_images.shape[:1]:
            raise ValueError(f"search_labels {tuple(search_labels.shape)} do not match search_images "
                             f"{tuple(search_images.shape)}")
        if finetune is not None and train_data is None:
            raise ValueError("train_data is required when finetune is given")
        metadata = getattr(model, "arq_metadata", None) or {}
        sigma = sigma if sigma is not None else metadata.get("sigma")
        if sigma is None or not float(sigma) > 0:
            raise ValueError("sigma is required: pass sigma=... or give the model arq_metadata['sigma']")
        self.model = model.eval()
        self.sigma = float(sigma)
        self.search_images = search_images
        self.search_labels = search_labels.long()
        self.search_indices = list(range(search_images.shape[0])) if search_indices is None else [
            int(i) for i in search_indices]
        if len(self.search_indices) != search_images.shape[0]:
            raise ValueError(f"search_indices has {len(self.search_indices)} entries for "
                             f"{search_images.shape[0]} search images")
        self.calibration_images = calibration_images
        self.train_data = train_data
        self.reward = reward
        self.finetune = finetune
        self.quant_config = quant_config or QuantConfig()
        self.irs = irs or IRSSettings()
        self.accuracy_weight = float(accuracy_weight)
        if not 0.0 <= self.accuracy_weight < float("inf"):
            raise ValueError(f"accuracy_weight must be a finite number >= 0, got {accuracy_weight!r}")
        self.cache = cache
        self._float_accuracy: float | None = None
        self._float_acr: float | None = None

    # -- the float reference ----------------------------------------------------------
    @property
    def needs_certificates(self) -> bool:
        return self.reward == "arq" or callable(self.reward)

    def float_cache(self) -> IRSCache:
        """f's certificates on the search subset (CERTIFY with ``irs.n`` samples), built once. A cache
        given to the evaluator must come from these settings (sigma, n, n0, alpha, seed, at least n_p
        replayable predictions): its certificates are the reference every reward is measured against."""
        settings = self.irs
        if self.cache is not None:
            wanted = {"sigma": float(self.sigma), "n": settings.n, "n0": settings.n0, "alpha": settings.alpha,
                      "seed": settings.seed}
            held = {name: getattr(self.cache, name) for name in wanted}
            differ = [f"{name} {held[name]!r} (settings: {wanted[name]!r})" for name in wanted if held[name] != wanted[name]]
            if self.cache.entries and self.cache.n_p_cached < settings.n_p:
                differ.append(f"{self.cache.n_p_cached} replayable predictions per input (settings: n_p {settings.n_p})")
            if differ:
                raise ValueError("the IRS cache was built with other settings than the search's: " + ", ".join(differ))
        if self.cache is None or any(i not in self.cache.entries for i in self.search_indices):
            self.cache = build_cache(
                self.model, self.search_images, sigma=self.sigma, n=settings.n, n0=settings.n0,
                alpha=settings.alpha, n_p=settings.n_p, seed=settings.seed, input_index=self.search_indices,
                batch_size=settings.batch_size, cache=self.cache,
            )
        return self.cache

    def certified_float_acr(self) -> float:
        """ACR of f from its full certificates (CERTIFY with ``irs.n`` samples)."""
        cache = self.float_cache()
        radii = [cache[i].radius if cache[i].prediction == int(y) else 0.0
                 for i, y in zip(self.search_indices, self.search_labels)]
        return sum(radii) / len(radii)

    def float_acr(self) -> float:
        """``ACR_f``: f measured like a candidate, through IRS with n_p samples (computed once)."""
        if self._float_acr is None:
            self._float_acr = self.candidate_acr(self.model)
        return self._float_acr

    def float_accuracy(self) -> float:
        if self._float_accuracy is None:
            self._float_accuracy = self.clean_accuracy(self.model)
        return self._float_accuracy

    # -- measurements ----------------------------------------------------------------
    @torch.no_grad()
    def clean_accuracy(self, model: nn.Module, execution: str = "as given") -> float:
        """Top-1 accuracy of the base classifier on the clean search images, run as given or, with
        ``execution="auto"``, as ``arq.certify`` runs it (a quantized model: its integer model on CPU,
        the packed kernels on CUDA; ``arq.smoothing.engine.prepare_model``)."""
        if execution not in EXECUTIONS:
            raise ValueError(f"execution must be one of {', '.join(map(repr, EXECUTIONS))}, got {execution!r}")
        device = next(iter(model.parameters())).device
        runner = model
        if execution == "auto":
            runner, _ = prepare_model(model, "auto", device, work=self.search_images.shape[0])
        correct = 0
        for images, labels in zip(self.search_images.split(256), self.search_labels.split(256)):
            logits = clean_logits(runner, images.to(device))
            correct += int((logits.argmax(dim=1).cpu() == labels).sum())
        return correct / self.search_images.shape[0]

    def candidate_acr(self, model: nn.Module) -> float:
        """ACR of the smoothed candidate through IRS from f's cache (radius 0 when wrong or abstained);
        the candidate runs as ``irs.candidate_execution`` says (:class:`IRSSettings`)."""
        settings = self.irs
        certificates = certify_incremental(
            model, self.search_images, self.float_cache(), n_p=settings.n_p, gamma=settings.gamma,
            alpha_zeta=settings.alpha_zeta, input_index=self.search_indices, batch_size=settings.batch_size,
            execution=settings.candidate_execution,
        )
        radii = [c.radius if c.prediction == int(y) else 0.0 for c, y in zip(certificates, self.search_labels)]
        return sum(radii) / len(radii)

    def quantize(self, policy: Policy) -> nn.Module:
        """The candidate: f quantized to ``policy``, calibrated and fine-tuned under noise."""
        finetune = self.finetune
        if finetune is not None and finetune.sigma is None:
            finetune = replace(finetune, sigma=self.sigma)
        config = self.quant_config
        if config.calibration_sigma is None:
            config = replace(config, calibration_sigma=self.sigma)
        return quantize(self.model, policy, self.calibration_images, finetune=finetune,
                        train_data=self.train_data, config=config)

    # -- the reward ------------------------------------------------------------------
    def __call__(self, policy: Policy) -> Evaluation:
        started = time.perf_counter()
        float_accuracy = self.float_accuracy()
        candidate = self.quantize(policy)
        accuracy = self.clean_accuracy(candidate, self.irs.candidate_execution)
        inputs = RewardInputs(candidate, policy, accuracy, float_accuracy, self)
        if self.reward == "haq":
            reward = haq_reward(accuracy, float_accuracy)
        elif self.reward == "arq":
            reward = arq_reward(inputs.acr(), self.float_acr(), accuracy, float_accuracy, self.accuracy_weight)
        else:
            reward = float(self.reward(inputs))
        if not math.isfinite(reward):  # the agent's replay buffer and the log would carry it silently
            raise ValueError(f"the {self.reward if isinstance(self.reward, str) else 'callable'} reward is "
                             f"{reward}, not a finite number")
        acr = inputs._acr
        return Evaluation(
            reward=float(reward), accuracy=accuracy, acr=acr, float_accuracy=float_accuracy,
            float_acr=self.float_acr() if acr is not None else None,
            seconds=time.perf_counter() - started,
        )

    def reference(self) -> dict[str, Any]:
        """The float model's numbers on the search subset (accuracy, and ACR for certifying rewards)."""
        result: dict[str, Any] = {"float_accuracy": self.float_accuracy()}
        if self.needs_certificates:
            acr = self.float_acr()
            if self.reward == "arq" and not acr > 0:
                raise ValueError(
                    "the float model certifies no search image correctly (ACR 0), so the 'arq' reward "
                    "(relative to it) is undefined: use more or other search images, or a larger irs.n"
                )
            result["float_acr"] = acr
            result["float_certified_acr"] = self.certified_float_acr()
        return result
