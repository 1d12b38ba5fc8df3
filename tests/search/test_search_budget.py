"""HAQ's action-to-bits mapping and budget procedure (arq.search.budget)."""
from __future__ import annotations

import random

import pytest

from arq.quant import Policy, bitops
from arq.search.budget import BudgetError, LayerCosts, action_to_bits, bitops_share, fit_to_budget


def test_action_to_bits_gives_each_width_an_equal_share():
    assert action_to_bits(0.0) == 2 and action_to_bits(1.0) == 8
    # 7 widths in 2..8: a in [k/7, (k+1)/7) -> 2 + k
    assert [action_to_bits((k + 0.5) / 7) for k in range(7)] == [2, 3, 4, 5, 6, 7, 8]
    assert action_to_bits(1 / 7 - 1e-9) == 2 and action_to_bits(1 / 7 + 1e-9) == 3
    grid = [action_to_bits(i / 7000) for i in range(7000)]
    assert [grid.count(b) for b in range(2, 9)] == [1000] * 7
    assert action_to_bits(0.5, min_bits=4, max_bits=4) == 4
    assert [action_to_bits(a, 3, 6) for a in (0.0, 0.26, 0.5, 0.74, 0.76, 1.0)] == [3, 4, 5, 5, 6, 6]


def test_action_to_bits_errors_name_the_parameter():
    with pytest.raises(ValueError, match="action"):
        action_to_bits(1.5)
    with pytest.raises(ValueError, match="min_bits"):
        action_to_bits(0.5, min_bits=1)
    with pytest.raises(ValueError, match="max_bits"):
        action_to_bits(0.5, min_bits=2, max_bits=9)


COSTS = LayerCosts(("a", "b", "c"), (100, 300, 600))


def test_bitops_share_matches_arq_quant(tiny_model, tiny):
    costs = LayerCosts.of(tiny_model, tiny.INPUT_SHAPE)
    assert costs.macs == (2304, 576, 192)
    strategy = [[8, 4], [3, 5], [2, 8]]
    report = bitops(tiny_model, Policy.from_haq(tiny_model, strategy), tiny.INPUT_SHAPE)
    assert bitops_share(costs, strategy) == pytest.approx(report.fraction_of_fp32, rel=1e-12)
    assert bitops_share(costs, [[4, 4]] * 3) == 0.015625


def test_fit_lowers_activation_then_weight_from_the_last_layer():
    # share of [[8,8]]*3 is 64/1024; budget 0.05 -> bitops <= 51.2 per MAC on average
    strategy = fit_to_budget(COSTS, [[8, 8], [8, 8], [8, 8]], 0.05)
    # c: a 8->7 (61.75.. no), w 8->7 ...: walk c(a), c(w), b(a), b(w), a(a), a(w) and repeat
    expected = [[8, 8], [8, 8], [8, 8]]
    order = [(2, 1), (2, 0), (1, 1), (1, 0), (0, 1), (0, 0)]
    step = 0
    while bitops_share(COSTS, expected) > 0.05:
        layer, kind = order[step % 6]
        expected[layer][kind] -= 1
        step += 1
    assert strategy == expected
    assert bitops_share(COSTS, strategy) <= 0.05
    assert strategy != [[8, 8]] * 3 and strategy[0] == [8, 8]  # the first layer is reached last


def test_fit_leaves_a_fitting_policy_alone_and_respects_min_bits():
    assert fit_to_budget(COSTS, [[2, 3], [4, 4], [2, 2]], 0.02) == [[2, 3], [4, 4], [2, 2]]
    tight = fit_to_budget(COSTS, [[8, 8]] * 3, 9 / 1024, min_bits=3)
    assert tight == [[3, 3]] * 3


def test_fit_always_fits_random_policies_and_budgets():
    rng = random.Random(0)
    for _ in range(300):
        costs = LayerCosts(tuple("l%d" % i for i in range(5)), tuple(rng.randint(1, 10_000) for _ in range(5)))
        strategy = [[rng.randint(2, 8), rng.randint(2, 8)] for _ in range(5)]
        budget = rng.uniform(4 / 1024, 64 / 1024)
        fitted = fit_to_budget(costs, strategy, budget)
        assert bitops_share(costs, fitted) <= budget
        assert all(2 <= f <= s for fw, sw in zip(fitted, strategy) for f, s in zip(fw, sw))


def test_budget_below_two_bits_everywhere_is_a_clear_error():
    with pytest.raises(BudgetError, match=r"budget 0.003 is below .* \(0.00390625\)"):
        fit_to_budget(COSTS, [[8, 8]] * 3, 0.003)
    with pytest.raises(ValueError, match="budget"):
        fit_to_budget(COSTS, [[8, 8]] * 3, 0.0)


@pytest.mark.parametrize("strategy, message", [
    ([[32, 32], [8, 8], [8, 8]], "weight bits of layer"),
    ([[4, 4], [4, 9], [4, 4]], "activation bits of layer"),
    ([[4, 4], [1, 4], [4, 4]], "weight bits of layer"),
    ([[4, 4], [4.5, 4], [4, 4]], "must be an integer"),
    ([[4, 4], [True, 4], [4, 4]], "must be an integer"),
    ([[4, 4], [4, 4]], "strategy has 2 layers, the model 3"),
])
def test_fit_to_budget_refuses_widths_it_cannot_produce(tiny_model, tiny, strategy, message):
    """The procedure only lowers bits within min_bits..8: anything else is the caller's error, not a
    policy to pass on (32 would come back lowered to 26)."""
    costs = LayerCosts.of(tiny_model, tiny.INPUT_SHAPE)
    with pytest.raises(ValueError, match=message):
        fit_to_budget(costs, strategy, 0.5)
