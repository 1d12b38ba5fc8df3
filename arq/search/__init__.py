"""ARQ: HAQ's reinforcement-learning bit-width search with a certified-robustness reward.

Yang, Ugare, Zhao, Singh and Misailovic (arXiv 2410.24214) search per-layer weight and
activation bits with HAQ's DDPG agent (Wang et al., CVPR 2019) under a BitOPs budget,
rewarding the Average Certified Radius of the smoothed quantized network, measured
cheaply with incremental randomized smoothing (:mod:`arq.irs`). The package follows that
pipeline:

* :mod:`arq.search.budget`: action -> bits, BitOPs share, HAQ's budget procedure;
* :mod:`arq.search.environment`: :class:`QuantizationEnv` (gymnasium API);
* :mod:`arq.search.reward`: :class:`CandidateEvaluator` and the ``arq`` / ``haq`` rewards;
* :mod:`arq.search.agent`: :class:`DDPGAgent` with HAQ's settings;
* :mod:`arq.search.run`: :func:`search`, the loop with its JSONL log, best policy and resume.

Names are imported on first use (gymnasium and scipy load only when needed).
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "BudgetError": "budget", "LayerCosts": "budget", "action_to_bits": "budget", "bitops_share": "budget",
    "fit_to_budget": "budget",
    "QuantizationEnv": "environment", "layer_features": "environment", "FEATURES": "environment",
    "CandidateEvaluator": "reward", "Evaluation": "reward", "IRSSettings": "reward", "RewardInputs": "reward",
    "arq_reward": "reward", "haq_reward": "reward", "REWARDS": "reward",
    "DDPGAgent": "agent", "DDPGConfig": "agent",
    "SearchResult": "run", "search": "run",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"arq.search.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'arq.search' has no attribute {name!r}")
