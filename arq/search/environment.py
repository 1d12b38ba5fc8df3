"""The bit-width search as a gymnasium environment (HAQ, Wang et al., CVPR 2019; ARQ, Yang et al. 2024).

An episode walks the L quantizable layers (every Conv2d and Linear, in
:func:`arq.quant.quantizable_layers` order) with two steps per layer: the weight bits,
then the bits of the activation entering the layer. Step t observes the 10 HAQ features
of its (layer, kind):

    [layer index, in channels, out channels, kernel size, stride, input feature-map size
     (H * W), parameter count, depthwise flag, weight-or-activation flag (1 = weight),
     previous action]

each of the first nine min-max normalized over the 2L rows, ``(v - min) / (max - min)``
(0 when constant), the previous action already in [0, 1] (0 at the first step). The action
``a in [0, 1]`` gives ``bits = round(b_min - 0.5 + a (b_max - b_min + 1))``
(:func:`arq.search.budget.action_to_bits`, default 2..8 bits).

After the last step the strategy is pushed under the BitOPs budget (HAQ's procedure,
:func:`arq.search.budget.fit_to_budget`), and ``evaluate(policy)`` (normally a
:class:`arq.search.reward.CandidateEvaluator`: quantize, fine-tune under noise, measure)
gives the episode's reward. Intermediate steps have reward 0; the episode terminates after
step 2L, with ``info`` holding the policy, its BitOPs share and the evaluation.

Where this differs from HAQ's code (``haq/lib/env/linear_quantize_env.py``), on purpose:

* Previous action. The paper's observation ends with ``a_{k-1}``, the previous step's action;
  here that is the action in [0, 1] the agent took (0 at an episode's first step). HAQ's code
  stores ``bits / max_bits`` instead, starts at 1 and, since it edits its feature table in
  place, carries the last values of one episode into the first observation of the next.
* Constant features (every layer with stride 1, no depthwise layer) are 0; HAQ's code leaves
  such a column unnormalized (a kernel size of 3 stays 3). They carry no information either way.
* Depthwise flag: ``groups == in_channels > 1``; HAQ's code tests ``in_channels == groups``,
  which also flags an ordinary convolution of a one-channel image (MNIST's first layer).
* First and last layers. Every layer is searched, the first and last included, the first
  layer's input (the noisy image, after the model's normalization) quantized at its
  activation bits. HAQ's code pins the first layer to 8-bit weights with a float input and the
  last to 8/8 inside its budget walk (only when the walk runs). ARQ's budget is a BitOPs share of
  every layer, with 1.5 % = uniform W4A4 (:mod:`arq.search.budget`): a float first-layer input
  would cost ``MACs_1 x 8 x 32`` alone, for the MNIST LeNet (conv1 31 % of the MACs) 7.75 % of
  FP32, five times the W4A4 budget.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from torch import nn

from arq.quant.policy import Policy, quantizable_layers
from arq.search.budget import (
    BudgetError,
    LayerCosts,
    action_to_bits,
    bitops_share,
    check_bit_range,
    fit_to_budget,
)

__all__ = ["FEATURES", "QuantizationEnv", "layer_features"]

FEATURES = ("layer_index", "in_channels", "out_channels", "kernel_size", "stride", "feature_map_size",
            "parameters", "depthwise", "is_weight", "previous_action")


def layer_features(model: nn.Module, input_shape: Sequence[int]) -> np.ndarray:
    """Raw features ``float64[2L, 9]`` (all but the previous action), weight row then activation row per layer."""
    layers = quantizable_layers(model)
    if not layers:
        raise ValueError("model has no Conv2d or Linear layer to quantize")
    input_sizes: dict[str, int] = {}

    def hook(name):
        def record(module, inputs, output):
            x = inputs[0]
            input_sizes.setdefault(name, int(x.shape[-2] * x.shape[-1]) if x.dim() == 4 else 1)
        return record

    handles = [module.register_forward_hook(hook(name)) for name, module in layers]
    parameter = next(model.parameters())
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros((1, *input_shape), device=parameter.device, dtype=parameter.dtype))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    rows = []
    for index, (name, module) in enumerate(layers):
        if isinstance(module, nn.Conv2d):
            in_ch, out_ch = module.in_channels, module.out_channels
            kernel, stride = module.kernel_size[0], module.stride[0]
            depthwise = float(module.groups > 1 and module.groups == module.in_channels)
        else:
            in_ch, out_ch, kernel, stride, depthwise = module.in_features, module.out_features, 1, 0, 0.0
        base = [index, in_ch, out_ch, kernel, stride, input_sizes.get(name, 0), module.weight.numel(), depthwise]
        rows.append(base + [1.0])  # weight step
        rows.append(base + [0.0])  # activation step
    return np.asarray(rows, dtype=np.float64)


def _min_max(features: np.ndarray) -> np.ndarray:
    low, high = features.min(axis=0), features.max(axis=0)
    span = np.where(high > low, high - low, 1.0)
    return np.where(high > low, (features - low) / span, 0.0)


class QuantizationEnv(gym.Env):
    """HAQ's mixed-precision environment (module docstring), gymnasium API.

    Args:
        model: the float model f.
        evaluate: ``policy -> mapping`` with at least ``"reward"`` (e.g. a
            :class:`~arq.search.reward.CandidateEvaluator`).
        input_shape: one input's shape ``(C, H, W)``, for the features and the BitOPs.
        budget: the largest BitOPs share of FP32 (0.015625 = uniform 4/4 bits).
        min_bits, max_bits: the bit range of the actions (default 2..8).
    """

    metadata = {"render_modes": []}

    def __init__(
        self,
        model: nn.Module,
        evaluate: Callable[[Policy], Mapping[str, Any]],
        *,
        input_shape: Sequence[int],
        budget: float = 0.015625,
        min_bits: int = 2,
        max_bits: int = 8,
    ) -> None:
        check_bit_range(min_bits, max_bits)
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0.0 < budget <= 1.0:
            raise ValueError(f"budget must be a BitOPs share of FP32 in (0, 1], got {budget!r}")
        self.model = model
        self.evaluate = evaluate
        self.input_shape = tuple(int(s) for s in input_shape)
        self.budget = float(budget)
        self.min_bits, self.max_bits = min_bits, max_bits
        self.layer_names = [name for name, _ in quantizable_layers(model)]
        self.costs = LayerCosts.of(model, self.input_shape)
        floor = bitops_share(self.costs, [[min_bits, min_bits]] * len(self.layer_names))
        if floor > self.budget:
            raise BudgetError(f"budget {self.budget:g} is below the BitOPs share of {min_bits} bits everywhere "
                              f"({floor:g}): raise the budget to at least {floor:g} or lower min_bits")
        self.features = _min_max(layer_features(model, self.input_shape)).astype(np.float32)
        self.num_steps = 2 * len(self.layer_names)
        self.observation_space = spaces.Box(0.0, 1.0, shape=(len(FEATURES),), dtype=np.float32)
        self.action_space = spaces.Box(0.0, 1.0, shape=(1,), dtype=np.float32)
        self._step = 0
        self._previous_action = 0.0
        self._bits: list[int] = []

    def _observation(self) -> np.ndarray:
        row = self.features[min(self._step, self.num_steps - 1)]
        return np.concatenate([row, np.float32([self._previous_action])]).astype(np.float32)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self._step = 0
        self._previous_action = 0.0
        self._bits = []
        return self._observation(), {"layer": self.layer_names[0], "kind": "weight"}

    def step(self, action):
        if self._step >= self.num_steps:
            raise RuntimeError("the episode is over: call reset() before step()")
        value = float(np.asarray(action, dtype=np.float64).reshape(-1)[0])
        if not np.isfinite(value):
            raise ValueError(f"action must be a finite number in [0, 1], got {value}")
        value = min(1.0, max(0.0, value))
        self._bits.append(action_to_bits(value, self.min_bits, self.max_bits))
        self._previous_action = value
        self._step += 1
        if self._step < self.num_steps:
            layer, kind = divmod(self._step, 2)
            info = {"layer": self.layer_names[layer], "kind": "activation" if kind else "weight"}
            return self._observation(), 0.0, False, False, info
        chosen = [self._bits[i:i + 2] for i in range(0, self.num_steps, 2)]
        strategy = fit_to_budget(self.costs, chosen, self.budget, self.min_bits)
        policy = Policy.from_haq(self.model, strategy)
        evaluation = dict(self.evaluate(policy))
        if "reward" not in evaluation:
            raise KeyError("evaluate(policy) must return a mapping with a 'reward' entry")
        info = {
            "policy": policy,
            "strategy": strategy,
            "chosen_strategy": chosen,
            "bitops_share": bitops_share(self.costs, strategy),
            **evaluation,
        }
        return self._observation(), float(evaluation["reward"]), True, False, info
