"""HAQ's action-to-bits mapping and BitOPs budget procedure (Wang et al., CVPR 2019).

Action to bits. The actor outputs ``a in [0, 1]``; HAQ maps it to

    bits = round(b_min - 0.5 + a * (b_max - b_min + 1)),

halves rounded up (i.e. ``floor(b_min + a (b_max - b_min + 1))``) and ``a = 1`` mapped to
``b_max``, so each of the ``b_max - b_min + 1`` bit widths gets an equal share of [0, 1].

Budget. The cost of a policy is its BitOPs share of the FP32 model (ARQ, Yang et al. 2024):

    share = sum_l MACs_l * w_l * a_l / (32 * 32 * sum_l MACs_l),

so uniform 4/4 bits is 16 / 1024 = 0.015625. After the last step of an episode, while the
share exceeds the budget, HAQ walks the layers from the last to the first lowering the
activation bits, then the weight bits, of each by one (never below ``b_min``), stopping as
soon as the policy fits (``fit_to_budget``).
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from arq.quant.cost import FP32_BITOPS_PER_MAC, layer_macs
from arq.quant.policy import MAX_BITS, MIN_BITS, Policy

__all__ = ["BudgetError", "LayerCosts", "action_to_bits", "bitops_share", "fit_to_budget"]


class BudgetError(ValueError):
    """The budget cannot be met even with every weight and activation at the minimum bits."""


def check_bit_range(min_bits: int, max_bits: int) -> None:
    for name, value in (("min_bits", min_bits), ("max_bits", max_bits)):
        if isinstance(value, bool) or not isinstance(value, int) or not MIN_BITS <= value <= MAX_BITS:
            raise ValueError(f"{name} must be an integer in {MIN_BITS}..{MAX_BITS}, got {value!r}")
    if min_bits > max_bits:
        raise ValueError(f"min_bits ({min_bits}) must not exceed max_bits ({max_bits})")


def action_to_bits(action: float, min_bits: int = 2, max_bits: int = 8) -> int:
    """``round(b_min - 0.5 + a (b_max - b_min + 1))`` with halves up, clipped to ``[b_min, b_max]``."""
    check_bit_range(min_bits, max_bits)
    action = float(action)
    if not math.isfinite(action) or not 0.0 <= action <= 1.0:
        raise ValueError(f"action must be in [0, 1], got {action}")
    return min(max_bits, min_bits + math.floor(action * (max_bits - min_bits + 1)))


@dataclass(frozen=True)
class LayerCosts:
    """Per-sample MACs of every quantizable layer, in :func:`arq.quant.quantizable_layers` order."""

    names: tuple[str, ...]
    macs: tuple[int, ...]

    @classmethod
    def of(cls, model: nn.Module, input_shape: Sequence[int]) -> "LayerCosts":
        per_layer = layer_macs(model, input_shape)
        return cls(tuple(per_layer), tuple(macs for macs, _ in per_layer.values()))

    @property
    def total_macs(self) -> int:
        return sum(self.macs)


def bitops_share(costs: LayerCosts, strategy: Sequence[Sequence[int]]) -> float:
    """``sum MACs_l w_l a_l / (1024 sum MACs_l)`` of a HAQ strategy ``[[w, a], ...]``."""
    if len(strategy) != len(costs.macs):
        raise ValueError(f"strategy has {len(strategy)} layers, the model {len(costs.macs)}")
    bitops = sum(macs * w * a for macs, (w, a) in zip(costs.macs, strategy))
    return bitops / (FP32_BITOPS_PER_MAC * costs.total_macs)


def fit_to_budget(
    costs: LayerCosts,
    strategy: Sequence[Sequence[int]],
    budget: float,
    min_bits: int = 2,
) -> list[list[int]]:
    """HAQ's budget procedure (module docstring): the strategy lowered until its BitOPs share <= budget.

    Args:
        costs: the model's per-layer MACs.
        strategy: ``[[w_bits, a_bits], ...]`` per layer, as the agent chose them.
        budget: the largest allowed BitOPs share of FP32, in (0, 1].
        min_bits: bits are never lowered below this.

    Raises:
        BudgetError: when even ``min_bits`` everywhere exceeds the budget.
    """
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0.0 < budget <= 1.0:
        raise ValueError(f"budget must be a BitOPs share of FP32 in (0, 1], got {budget!r}")
    check_bit_range(min_bits, MAX_BITS)
    strategy = [[w, a] for w, a in strategy]
    if len(strategy) != len(costs.macs):
        raise ValueError(f"strategy has {len(strategy)} layers, the model {len(costs.macs)} ({', '.join(costs.names)})")
    for layer, pair in zip(costs.names, strategy):
        for kind, bits in zip(("weight", "activation"), pair):
            if isinstance(bits, bool) or not isinstance(bits, numbers.Integral) or not min_bits <= bits <= MAX_BITS:
                raise ValueError(f"strategy: {kind} bits of layer {layer!r} must be an integer in "
                                 f"{min_bits}..{MAX_BITS} (min_bits..8), got {bits!r}")
    strategy = [[int(w), int(a)] for w, a in strategy]
    floor_share = bitops_share(costs, [[min_bits, min_bits]] * len(strategy))
    if floor_share > budget:
        raise BudgetError(
            f"budget {budget:g} is below the BitOPs share of {min_bits} bits everywhere ({floor_share:g}): "
            f"raise the budget to at least {floor_share:g} or lower min_bits"
        )
    share = bitops_share(costs, strategy)
    while share > budget:  # terminates: each pass lowers some bits, and min_bits everywhere fits
        for layer in reversed(range(len(strategy))):
            for kind in (1, 0):  # activation bits first, then weight bits
                if strategy[layer][kind] > min_bits:
                    strategy[layer][kind] -= 1
                    share = bitops_share(costs, strategy)
                    if share <= budget:
                        return strategy
    return strategy


def policy_share(model: nn.Module, policy: Policy, input_shape: Sequence[int]) -> float:
    """BitOPs share of ``policy`` on ``model`` (as :func:`arq.quant.bitops`' ``fraction_of_fp32``)."""
    return bitops_share(LayerCosts.of(model, input_shape), policy.to_haq(model))
