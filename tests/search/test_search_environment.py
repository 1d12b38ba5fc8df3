"""The quantization environment's gymnasium API (arq.search.environment)."""
from __future__ import annotations

import numpy as np
import pytest

from arq.search.budget import BudgetError, bitops_share
from arq.search.environment import FEATURES, QuantizationEnv, layer_features


def share_evaluator(env_holder):
    def evaluate(policy):
        share = bitops_share(env_holder[0].costs, policy.to_haq(env_holder[0].model))
        return {"reward": -share, "accuracy": 0.5, "acr": None}
    return evaluate


def make_env(model, tiny, budget=0.015625, **kwargs):
    holder = []
    env = QuantizationEnv(model, share_evaluator(holder), input_shape=tiny.INPUT_SHAPE, budget=budget, **kwargs)
    holder.append(env)
    return env


def test_raw_features_follow_haq(tiny_model, tiny):
    raw = layer_features(tiny_model, tiny.INPUT_SHAPE)
    # index, in, out, kernel, stride, feature-map size, parameters, depthwise, is_weight
    assert raw.tolist() == [
        [0, 1, 4, 3, 1, 64, 36, 0, 1], [0, 1, 4, 3, 1, 64, 36, 0, 0],
        [1, 4, 4, 3, 2, 64, 36, 1, 1], [1, 4, 4, 3, 2, 64, 36, 1, 0],
        [2, 64, 3, 1, 0, 1, 192, 0, 1], [2, 64, 3, 1, 0, 1, 192, 0, 0],
    ]


def test_episode_observations_and_final_info(tiny_model, tiny):
    env = make_env(tiny_model, tiny)
    assert env.observation_space.shape == (len(FEATURES),) == (10,)
    observation, info = env.reset(seed=0)
    assert info == {"layer": "conv1", "kind": "weight"}
    observations = [observation]
    actions = [1.0, 0.9, 0.0, 0.5, 0.3, 1.0]
    for t, action in enumerate(actions):
        observation, reward, terminated, truncated, info = env.step(np.float32([action]))
        observations.append(observation)
        assert env.observation_space.contains(observation)
        assert terminated == (t == 5) and not truncated
        if t < 5:
            assert reward == 0.0
            assert observation[-1] == pytest.approx(action)  # previous action
    obs = np.stack(observations[:6])
    assert obs[:, 0].tolist() == [0, 0, 0.5, 0.5, 1, 1]  # layer index, min-max normalized
    np.testing.assert_allclose(obs[:, 1], [0, 0, 3 / 63, 3 / 63, 1, 1], rtol=1e-6)  # in channels
    assert obs[:, 7].tolist() == [0, 0, 1, 1, 0, 0]  # depthwise
    assert obs[:, 8].tolist() == [1, 0, 1, 0, 1, 0]  # weight or activation
    assert obs[0, 9] == 0.0
    # chosen [[8, 8], [2, 5], [4, 8]] has share 0.0442 > 0.015625: pushed under the budget
    assert info["chosen_strategy"] == [[8, 8], [2, 5], [4, 8]]
    assert info["bitops_share"] <= 0.015625
    assert reward == pytest.approx(-info["bitops_share"])
    assert info["policy"].to_haq(tiny_model) == info["strategy"]
    with pytest.raises(RuntimeError, match="reset"):
        env.step([0.5])


def test_gymnasium_env_checker_accepts_it(tiny_model, tiny):
    from gymnasium.utils.env_checker import check_env

    check_env(make_env(tiny_model, tiny, budget=0.1), skip_render_check=True)


def test_bit_range_and_budget_errors(tiny_model, tiny):
    env = make_env(tiny_model, tiny, budget=1.0, min_bits=3, max_bits=5)
    env.reset()
    for _ in range(6):
        _, _, terminated, _, info = env.step([1.0])
    assert info["strategy"] == [[5, 5]] * 3
    with pytest.raises(BudgetError, match="budget 0.001"):
        make_env(tiny_model, tiny, budget=0.001)
    with pytest.raises(ValueError, match="min_bits"):
        make_env(tiny_model, tiny, min_bits=9)
    env.reset()
    with pytest.raises(ValueError, match="action"):
        env.step([float("nan")])
