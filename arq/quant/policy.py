"""Mixed-precision policies: per-layer weight and activation bit widths.

A policy maps the qualified name of every quantizable layer (each ``nn.Conv2d``
and ``nn.Linear``, first and last included) to ``LayerBits(w_bits, a_bits)``:
``w_bits`` quantizes the layer's weight, ``a_bits`` the activation entering the
layer (its input), as in HAQ (Wang et al., CVPR 2019). For the first layer that
input is the noisy image ``x + e``, ``e ~ N(0, sigma^2 I)``, after the model's
normalization. 32 bits means "left in floating point".

Unlike HAQ's code (``LinearQuantizeEnv._keep_first_last_layer``, which pins the first layer to
8-bit weights with a float input and the last to 8/8 while fitting the budget), a policy and
the search (:mod:`arq.search`) give the first and last layers any width, as every other layer;
HAQ's choice is the policy ``first: LayerBits(8, 32), last: LayerBits(8, 8)``, and its BitOPs
then count 8 x 32 per MAC of the first layer (:mod:`arq.quant.cost`).
"""
from __future__ import annotations

import json
import math
import numbers
import operator
import os
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from torch import nn

#: Bit widths a quantized tensor may have; ``FLOAT_BITS`` keeps it in float32.
MIN_BITS = 2
MAX_BITS = 8
FLOAT_BITS = 32
POLICY_FORMAT_VERSION = 1


def _check_bits(value: int, parameter: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{parameter} must be an int, got {type(value).__name__} ({value!r})")
    if not (MIN_BITS <= value <= MAX_BITS or value == FLOAT_BITS):
        raise ValueError(
            f"{parameter} must be in {MIN_BITS}..{MAX_BITS} or {FLOAT_BITS} (float), got {value}"
        )


def _haq_bits(value, parameter: str) -> int:
    """``value`` as an int: an int (not a bool), a numpy integer, or a float with an integer value."""
    if hasattr(value, "dim") and hasattr(value, "item") and value.dim() == 0:  # a 0-d torch tensor
        value = value.item()
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        raise TypeError(f"{parameter} must be an int, got a bool ({value!r})")
    if isinstance(value, numbers.Integral):
        return operator.index(value)
    if isinstance(value, numbers.Real):
        if math.isfinite(value) and float(value).is_integer():
            return int(value)
        raise ValueError(f"{parameter} must be a whole number of bits, got {value!r}")
    raise TypeError(f"{parameter} must be an int, got {type(value).__name__} ({value!r})")


@dataclass(frozen=True)
class LayerBits:
    """Bit widths of one layer.

    Args:
        w_bits: weight bits, 2..8 (symmetric, per output channel) or 32 (float).
        a_bits: bits of the activation entering the layer, 2..8 or 32 (float).
    """

    w_bits: int
    a_bits: int

    def __post_init__(self) -> None:
        _check_bits(self.w_bits, "w_bits")
        _check_bits(self.a_bits, "a_bits")

    @property
    def is_float(self) -> bool:
        """True when neither the weight nor the input activation is quantized."""
        return self.w_bits == FLOAT_BITS and self.a_bits == FLOAT_BITS

    def to_list(self) -> list[int]:
        return [self.w_bits, self.a_bits]


def quantizable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every ``nn.Conv2d`` and ``nn.Linear`` of ``model`` as ``(qualified_name, module)``.

    The order is ``model.named_modules()`` order (registration order), which is
    stable across runs and Python versions; the HAQ list form of a policy and the
    search's layer index use it. Fake-quant layers made by :func:`arq.quant.quantize`
    subclass Conv2d/Linear, so a quantized model lists the same names.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, (nn.Conv2d, nn.Linear))
    ]


@dataclass
class Policy:
    """Per-layer bit widths keyed by qualified module name (torchao ``FqnToConfig`` style).

    Args:
        layers: ``{qualified_name: LayerBits}``; plain ``(w_bits, a_bits)`` pairs are
            converted. Insertion order is kept (it is the order of ``to_haq``).
    """

    layers: dict[str, LayerBits] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.layers, Mapping):
            raise TypeError(f"layers must be a mapping name -> LayerBits, got {type(self.layers).__name__}")
        converted: dict[str, LayerBits] = {}
        for name, bits in self.layers.items():
            if not isinstance(name, str):
                raise TypeError(f"layers: layer names must be str, got {name!r}")
            if isinstance(bits, LayerBits):
                converted[name] = bits
            elif isinstance(bits, (list, tuple)) and len(bits) == 2:
                try:
                    converted[name] = LayerBits(*bits)
                except (TypeError, ValueError) as error:
                    raise type(error)(f"layers[{name!r}]: {error}") from None
            elif isinstance(bits, Mapping) and set(bits) == {"w_bits", "a_bits"}:
                try:
                    converted[name] = LayerBits(**bits)
                except (TypeError, ValueError) as error:
                    raise type(error)(f"layers[{name!r}]: {error}") from None
            else:
                raise TypeError(
                    f"layers[{name!r}] must be LayerBits, [w_bits, a_bits] or "
                    f"{{'w_bits', 'a_bits'}}, got {bits!r}"
                )
        self.layers = converted

    # -- mapping-like access -------------------------------------------------
    def __getitem__(self, name: str) -> LayerBits:
        try:
            return self.layers[name]
        except KeyError:
            raise KeyError(f"policy has no layer named {name!r}; it has {list(self.layers)}") from None

    def __contains__(self, name: object) -> bool:
        return name in self.layers

    def __len__(self) -> int:
        return len(self.layers)

    def items(self):
        return self.layers.items()

    # -- construction ----------------------------------------------------------
    @classmethod
    def uniform(cls, model: nn.Module, w_bits: int, a_bits: int) -> "Policy":
        """Every quantizable layer of ``model`` at ``w_bits`` / ``a_bits``."""
        bits = LayerBits(w_bits, a_bits)
        layers = quantizable_layers(model)
        if not layers:
            raise ValueError("model has no Conv2d or Linear layer to quantize")
        return cls({name: bits for name, _ in layers})

    @classmethod
    def from_haq(cls, model: nn.Module, strategy: Sequence[Sequence[int]]) -> "Policy":
        """From HAQ's strategy, a list of ``[w_bit, a_bit]`` in :func:`quantizable_layers` order.

        Bits are ints (numpy integers too) or floats with an integer value (``4.0``, as a
        JSON or numpy round trip may give); ``4.7``, bools and other values are refused,
        not truncated.
        """
        names = [name for name, _ in quantizable_layers(model)]
        strategy = list(strategy)
        if len(strategy) != len(names):
            raise ValueError(
                f"strategy has {len(strategy)} entries but the model has {len(names)} "
                f"quantizable layers ({names})"
            )
        layers = {}
        for index, (name, pair) in enumerate(zip(names, strategy)):
            if isinstance(pair, (str, bytes)) or not hasattr(pair, "__len__"):
                raise TypeError(f"strategy[{index}] ({name}) must be a [w_bit, a_bit] pair, got {pair!r}")
            if len(pair) != 2:
                raise ValueError(f"strategy[{index}] ({name}) must be a [w_bit, a_bit] pair, got {pair!r}")
            try:
                layers[name] = LayerBits(_haq_bits(pair[0], "w_bits"), _haq_bits(pair[1], "a_bits"))
            except (TypeError, ValueError) as error:
                raise type(error)(f"strategy[{index}] ({name}): {error}") from None
        return cls(layers)

    def to_haq(self, model: nn.Module) -> list[list[int]]:
        """HAQ's strategy: ``[[w_bit, a_bit], ...]`` in :func:`quantizable_layers` order."""
        self.validate(model)
        return [self.layers[name].to_list() for name, _ in quantizable_layers(model)]

    def validate(self, model: nn.Module) -> None:
        """Raise ``ValueError`` unless the policy names exactly the quantizable layers of ``model``."""
        names = [name for name, _ in quantizable_layers(model)]
        unknown = [name for name in self.layers if name not in set(names)]
        if unknown:
            raise ValueError(
                f"policy names layers the model does not have (or that are not Conv2d/Linear): "
                f"{unknown}; quantizable layers are {names}"
            )
        missing = [name for name in names if name not in self.layers]
        if missing:
            raise ValueError(f"policy misses quantizable layers {missing}")

    # -- serialization ---------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format_version": POLICY_FORMAT_VERSION,
            "layers": {name: {"w_bits": b.w_bits, "a_bits": b.a_bits} for name, b in self.layers.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> "Policy":
        if not isinstance(data, Mapping) or "layers" not in data:
            raise ValueError("policy data must be a dict with a 'layers' entry")
        version = data.get("format_version", POLICY_FORMAT_VERSION)
        if version != POLICY_FORMAT_VERSION:
            raise ValueError(f"unsupported policy format_version {version!r} (expected {POLICY_FORMAT_VERSION})")
        return cls(dict(data["layers"]))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "Policy":
        return cls.from_dict(json.loads(text))

    def save(self, path: str | os.PathLike) -> None:
        """Write the policy as JSON: ``{"format_version": 1, "layers": {name: {"w_bits", "a_bits"}}}``."""
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Policy":
        """Read a policy written by :meth:`save`."""
        with open(path, encoding="utf-8") as handle:
            try:
                return cls.from_json(handle.read())
            except json.JSONDecodeError as error:
                raise ValueError(f"policy file {os.fspath(path)!r} is not valid JSON: {error}") from None


def average_bits(policy: Policy) -> tuple[float, float]:
    """Mean weight bits and mean activation bits over the policy's layers (unweighted)."""
    if not policy.layers:
        raise ValueError("policy is empty")
    w = [b.w_bits for b in policy.layers.values()]
    a = [b.a_bits for b in policy.layers.values()]
    return sum(w) / len(w), sum(a) / len(a)
