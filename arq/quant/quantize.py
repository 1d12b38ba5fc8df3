"""``arq.quant.quantize``: float model + policy + calibration data -> fake-quant model.

Steps, in order:
1. fold every BatchNorm that directly follows a Conv2d/Linear, or directly precedes
   one without padding, into that layer (eval statistics; a pair whose folding would
   change the output stays unfolded, the BN a float module beside the quantized layer):
   follows:  W' = W * a[n],  b' = (b - mu) * a + beta,     a = gamma / sqrt(var + eps)
   precedes: W' = W * a[c],  b' = b + sum_{c,kh,kw} W[n,c,kh,kw] (beta - mu a)[c];
2. replace each Conv2d/Linear by QuantConv2d/QuantLinear at the policy's bits;
3. with ``config.residual_bits`` < 32, quantize the residual stream (``arq.quant.residual``);
   then calibrate activation ranges on the calibration inputs plus Gaussian noise;
4. optionally fine-tune under Gaussian noise augmentation at the model's sigma
   (Cohen et al. 2019 train under the noise they certify with), SGD as in HAQ.
"""
from __future__ import annotations

import copy
import math
import numbers
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Iterator

import torch
from torch import nn
import torch.nn.functional as F

from arq.quant.modules import QUANT_LAYER_TYPES, QuantConv2d, QuantLinear
from arq.quant.policy import FLOAT_BITS, Policy, quantizable_layers
from arq.quant.quantizers import ActivationQuantizer, QuantConfig, check_int
from arq.quant.residual import quantize_residual_stream

#: Relative tolerance of the check that BatchNorm folding did not change the model.
FOLD_CHECK_RTOL = 1e-3


@dataclass
class FinetuneConfig:
    """Fine-tuning of a quantized model under Gaussian noise (HAQ's defaults).

    Args:
        epochs: passes over the training data.
        lr: SGD learning rate (HAQ: 1e-3).
        momentum: SGD momentum (HAQ: 0.9).
        weight_decay: SGD weight decay (HAQ: 4e-5; 0 by default here: over 50 steps at lr 1e-3 it would shrink weights by ~2e-6).
        sigma: std of the Gaussian noise added to every training input in [0, 1] pixel
            space; ``None`` takes ``model.arq_metadata["sigma"]``.
        batch_size: batch size when the training data is an ``(inputs, labels)`` tensor pair.
        max_steps: stop after this many optimizer steps (``None``: run all epochs).
        seed: seeds the noise, the shuffling of a tensor pair and torch's global RNG
            (dropout) inside fine-tuning, so the result is deterministic.
    """

    epochs: int = 1
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    sigma: float | None = None
    batch_size: int = 128
    max_steps: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "seed") + (("max_steps",) if self.max_steps is not None else ()):
            check_int(self, name)
        for name in ("lr", "momentum", "weight_decay") + (("sigma",) if self.sigma is not None else ()):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.sigma is not None and self.sigma < 0:
            raise ValueError(f"sigma must be >= 0 or None, got {self.sigma}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 or None, got {self.max_steps}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- helpers
def _model_sigma(model: nn.Module) -> float | None:
    metadata = getattr(model, "arq_metadata", None)
    if isinstance(metadata, dict) and metadata.get("sigma") is not None:
        return float(metadata["sigma"])
    return None


def _model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def iter_input_batches(data: Any, batch_size: int, parameter: str = "calibration_data") -> Iterator[torch.Tensor]:
    """Input batches from a tensor ``[N, ...]`` or an iterable of tensors / ``(inputs, labels, ...)``."""
    if isinstance(data, torch.Tensor):
        if data.dim() < 2 or data.shape[0] == 0:
            raise ValueError(f"{parameter} must be a non-empty batch [N, ...], got shape {tuple(data.shape)}")
        yield from data.split(batch_size)
        return
    if not isinstance(data, Iterable):
        raise TypeError(f"{parameter} must be a tensor or an iterable of batches, got {type(data).__name__}")
    count = 0
    for item in data:
        batch = item[0] if isinstance(item, (tuple, list)) else item
        if not isinstance(batch, torch.Tensor):
            raise TypeError(f"{parameter}: batches must be tensors or (inputs, labels) tuples, got {type(item).__name__}")
        count += 1
        yield batch
    if count == 0:
        raise ValueError(f"{parameter} gave no batch")


# ----------------------------------------------------------------------------- BN folding
def _bn_affine(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """``BN(x) = a * x + shift`` per channel in eval mode."""
    a = torch.rsqrt(bn.running_var.float() + bn.eps)
    if bn.weight is not None:
        a = a * bn.weight.float()
    shift = -bn.running_mean.float() * a
    if bn.bias is not None:
        shift = shift + bn.bias.float()
    return a, shift


@torch.no_grad()
def _fold_following(layer: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> None:
    a, shift = _bn_affine(bn)
    view = (-1,) + (1,) * (layer.weight.dim() - 1)
    bias = layer.bias.float() if layer.bias is not None else torch.zeros_like(a)
    layer.weight.mul_(a.view(view).to(layer.weight.dtype))
    new_bias = (bias * a + shift).to(layer.weight.dtype)
    if layer.bias is None:
        layer.bias = nn.Parameter(new_bias)
    else:
        layer.bias.copy_(new_bias)


@torch.no_grad()
def _fold_preceding(layer: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> None:
    a, shift = _bn_affine(bn)
    weight = layer.weight.float()
    bias = layer.bias.float() if layer.bias is not None else torch.zeros(weight.shape[0], device=weight.device)
    if weight.dim() == 4:  # conv: input channel is dim 1
        new_bias = bias + (weight * shift.view(1, -1, 1, 1)).sum(dim=(1, 2, 3))
        layer.weight.mul_(a.view(1, -1, 1, 1).to(layer.weight.dtype))
    else:
        new_bias = bias + weight @ shift
        layer.weight.mul_(a.view(1, -1).to(layer.weight.dtype))
    if layer.bias is None:
        layer.bias = nn.Parameter(new_bias.to(layer.weight.dtype))
    else:
        layer.bias.copy_(new_bias)


def _dataflow_pairs(model: nn.Module, example: torch.Tensor) -> list[tuple[str, str, str]]:
    """``(kind, layer_name, bn_name)`` for BN modules fed directly by, or feeding directly, a layer.

    Found with forward hooks: a tensor's producer is the last module whose output it
    was (an in-place ReLU returning its input becomes the producer), so a BN whose
    input was produced by a Conv2d follows it. A pair is only listed when the BN's
    channels are the layer's output (follows) or input (precedes) features: same count,
    and a BatchNorm1d sees a 2-D ``[N, C]`` input (on ``[N, C, L]`` it normalizes dim 1,
    while a Linear acts on the last dim). Whether the producer's output has other users
    cannot be seen this way; :func:`fold_batchnorm` checks the folded model against the
    original instead.
    """
    producer: dict[int, str] = {}
    keep_alive: list[torch.Tensor] = []
    calls: list[tuple[str, int, int]] = []
    kinds: dict[str, nn.Module] = {}
    input_dims: dict[str, int] = {}

    def hook(name):
        def record(module, inputs, output):
            if inputs and isinstance(inputs[0], torch.Tensor) and isinstance(output, torch.Tensor):
                calls.append((name, id(inputs[0]), id(output)))
                input_dims[name] = inputs[0].dim()
                keep_alive.extend([inputs[0], output])
        return record

    handles = []
    for name, module in model.named_modules():
        if len(list(module.children())) == 0:  # leaves only
            kinds[name] = module
            handles.append(module.register_forward_hook(hook(name)))
    try:
        with torch.no_grad():
            model(example)
    finally:
        for handle in handles:
            handle.remove()

    input_of: dict[str, set[str]] = {}
    for name, in_id, out_id in calls:
        input_of.setdefault(name, set()).add(producer.get(in_id, ""))
        producer[out_id] = name
    called_count: dict[str, int] = {}
    for name, _, _ in calls:
        called_count[name] = called_count.get(name, 0) + 1

    def channels_match(bn: nn.Module, bn_name: str, features: int) -> bool:
        if isinstance(bn, nn.BatchNorm1d) and input_dims.get(bn_name) != 2:
            return False  # [N, C, L]: the BN's channels are not a Linear's features
        return bn.num_features == features

    pairs = []
    bn_types = (nn.BatchNorm1d, nn.BatchNorm2d)
    for bn_name, module in kinds.items():
        if not isinstance(module, bn_types) or called_count.get(bn_name) != 1:
            continue
        (source,) = tuple(input_of[bn_name]) if len(input_of[bn_name]) == 1 else ("",)
        layer = kinds.get(source)
        if called_count.get(source) == 1 and (
            (isinstance(layer, nn.Conv2d) and isinstance(module, nn.BatchNorm2d))
            or (isinstance(layer, nn.Linear) and isinstance(module, nn.BatchNorm1d))
        ) and channels_match(module, bn_name, layer.weight.shape[0]):
            pairs.append(("follows", source, bn_name))
    for layer_name, module in kinds.items():
        if not isinstance(module, (nn.Conv2d, nn.Linear)) or called_count.get(layer_name) != 1:
            continue
        sources = input_of.get(layer_name, set())
        if len(sources) != 1:
            continue
        (source,) = tuple(sources)
        bn = kinds.get(source)
        if not isinstance(bn, bn_types) or called_count.get(source) != 1:
            continue
        if any(bn_name == source for _, _, bn_name in pairs):
            continue
        if isinstance(module, nn.Conv2d) and (
            not isinstance(bn, nn.BatchNorm2d) or any(p != 0 for p in module.padding)
            or module.groups != 1
        ):
            continue  # zero padding of BN(x) is not BN of padded x: folding would be wrong at borders
        if isinstance(module, nn.Linear) and not isinstance(bn, nn.BatchNorm1d):
            continue
        if not channels_match(bn, source, module.weight.shape[1]):  # groups == 1: dim 1 is the input
            continue
        pairs.append(("precedes", layer_name, source))
    return pairs


@torch.no_grad()
def fold_batchnorm(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Fold BatchNorms adjacent to a Conv2d/Linear into it, in place; return the folded BN names.

    A folded BN becomes ``nn.Identity`` (names of other modules do not change). The
    model must be in eval mode. The result is checked on ``example``: outputs must
    agree to ``FOLD_CHECK_RTOL`` of their magnitude. When folding every pair at once fails
    that check (a layer's output has another user than its BN, say ``bn(conv(x)) + conv(x)``),
    the pairs are folded and checked one at a time, and a pair that changes the output is
    left as it was: its BN stays a float module beside the layer (a UserWarning names it).
    """
    if model.training:
        raise ValueError("fold_batchnorm needs the model in eval mode (it uses running statistics)")
    reference = model(example)
    tolerance = FOLD_CHECK_RTOL * max(1.0, float(reference.abs().max()))
    pairs = _dataflow_pairs(model, example)

    def fold(pair):
        kind, layer_name, bn_name = pair
        layer = model.get_submodule(layer_name)
        bn = model.get_submodule(bn_name)
        undo = (layer_name, copy.deepcopy(layer), bn_name, bn)
        (_fold_following if kind == "follows" else _fold_preceding)(layer, bn)
        _set_submodule(model, bn_name, nn.Identity())
        return undo

    def restore(undo):
        layer_name, layer, bn_name, bn = undo
        _set_submodule(model, layer_name, layer)
        _set_submodule(model, bn_name, bn)

    def error() -> float:
        return float((model(example) - reference).abs().max())

    undos = [fold(pair) for pair in pairs]
    if not pairs or error() <= tolerance:
        return [bn_name for _, _, bn_name in pairs]
    for undo in reversed(undos):  # reversed: a layer in two pairs gets its state from before both
        restore(undo)
    folded, left = [], []
    for pair in pairs:
        undo = fold(pair)
        change = error()
        if change <= tolerance:
            folded.append(pair[2])
        else:
            restore(undo)
            left.append(f"{pair[2]!r} ({pair[0]} {pair[1]!r}: folding changed the output by {change:.3g})")
    if left:
        warnings.warn(
            "BatchNorm folding left these BatchNorms as float modules, since folding them changed the "
            "model's output (their layer's output or input has another user): " + "; ".join(left),
            stacklevel=3,  # the caller of fold_batchnorm (through torch.no_grad's wrapper)
        )
    return folded


# ----------------------------------------------------------------------------- calibration
def quantizers_of(model: nn.Module) -> list[ActivationQuantizer]:
    return [module for module in model.modules() if isinstance(module, ActivationQuantizer)]


@torch.no_grad()
def calibrate(model: nn.Module, calibration_data: Any, config: QuantConfig, sigma: float) -> int:
    """Set every activation quantizer's range from ``calibration_data + N(0, sigma^2)``; returns inputs seen.

    Raises ValueError for a batch with NaN or inf values (the ranges would be meaningless), and,
    naming them, for quantized layers that the model never called on the data (defined but
    unused, or used through their weights only, as ``nn.MultiheadAttention`` uses
    ``out_proj``): they have no range to calibrate, and set to 32/32 bits they need none.
    """
    device = _model_device(model)
    generator = torch.Generator(device="cpu").manual_seed(config.seed)
    named = [(name, module) for name, module in model.named_modules() if isinstance(module, ActivationQuantizer)]
    quantizers = [quantizer for _, quantizer in named]
    for name, quantizer in named:
        quantizer.layer_name = name.removesuffix(".input_quantizer")
    # every quantized layer must run its own forward: one whose weights another module reads
    # directly (nn.MultiheadAttention's out_proj) would compute with its float weights
    called: set[str] = set()
    layers = [(name, module) for name, module in model.named_modules()
              if isinstance(module, QUANT_LAYER_TYPES) and (module.w_bits, module.a_bits) != (FLOAT_BITS, FLOAT_BITS)]
    hooks = [module.register_forward_pre_hook(lambda module, args, name=name: called.add(name))
             for name, module in layers]
    was_training = model.training
    model.eval()
    for quantizer in quantizers:
        quantizer.start_calibration()
    seen = 0
    try:
        for index, batch in enumerate(iter_input_batches(calibration_data, config.calibration_batch_size)):
            batch = batch.float()
            if not bool(torch.isfinite(batch).all()):
                raise ValueError(f"calibration_data: batch {index} has non-finite values (NaN or inf)")
            if sigma > 0:
                batch = batch + sigma * torch.randn(batch.shape, generator=generator)
            model(batch.to(device))
            seen += batch.shape[0]
        unused = sorted({name for name, _ in layers if name not in called}
                        | {quantizer.layer_name for quantizer in quantizers if quantizer.enabled and quantizer.saw_no_data})
        if unused:
            raise ValueError(
                f"layers {unused} were never called during calibration (defined but not used in forward, or "
                "used through their weights only, as nn.MultiheadAttention uses out_proj), so their activation "
                "ranges cannot be calibrated and their quantized weights would not be used; set them to 32/32 bits "
                "in the policy"
            )
    except BaseException:
        for quantizer in quantizers:
            quantizer._observing = False
        model.train(was_training)
        raise
    finally:
        for hook in hooks:
            hook.remove()
    for quantizer in quantizers:
        quantizer.finish_calibration()
    model.train(was_training)
    return seen


# ----------------------------------------------------------------------------- fine-tuning
def _training_batches(train_data: Any, config: FinetuneConfig, generator: torch.Generator):
    if isinstance(train_data, (tuple, list)) and len(train_data) == 2 and all(
        isinstance(t, torch.Tensor) for t in train_data
    ):
        inputs, labels = train_data
        if inputs.shape[0] != labels.shape[0] or inputs.shape[0] == 0:
            raise ValueError(
                f"train_data: inputs and labels need the same non-zero length, got "
                f"{tuple(inputs.shape)} and {tuple(labels.shape)}"
            )
        order = torch.randperm(inputs.shape[0], generator=generator)
        for start in range(0, inputs.shape[0], config.batch_size):
            index = order[start:start + config.batch_size]
            yield inputs[index], labels[index]
        return
    if not isinstance(train_data, Iterable):
        raise TypeError(f"train_data must be an (inputs, labels) tensor pair or an iterable of batches, got {type(train_data).__name__}")
    for item in train_data:
        if not (isinstance(item, (tuple, list)) and len(item) >= 2):
            raise TypeError("train_data: each batch must be an (inputs, labels) pair")
        yield item[0], item[1]


def finetune_model(model: nn.Module, train_data: Any, config: FinetuneConfig) -> list[float]:
    """Fine-tune a quantized model on ``x + N(0, sigma^2 I)`` with cross-entropy; returns per-step losses.

    SGD(lr, momentum, weight_decay) for ``config.epochs`` passes (or ``max_steps``),
    straight-through gradients through the quantizers; activation ranges stay as
    calibrated. Deterministic given ``config.seed`` and deterministic ``train_data``.
    """
    sigma = config.sigma if config.sigma is not None else _model_sigma(model)
    if sigma is None:
        raise ValueError("finetune: sigma is not set and the model has no arq_metadata['sigma']")
    device = _model_device(model)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(parameters, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    generator = torch.Generator(device="cpu").manual_seed(config.seed)
    losses: list[float] = []
    with torch.random.fork_rng(devices=[] if device.type != "cuda" else [device]):
        # only the generators fork_rng restores: torch.manual_seed would reseed every CUDA
        # device too and leave the caller's CUDA random state changed
        torch.default_generator.manual_seed(config.seed)
        if device.type == "cuda":
            with torch.cuda.device(device):
                torch.cuda.manual_seed(config.seed)
        model.train()
        for _ in range(config.epochs):
            for inputs, labels in _training_batches(train_data, config, generator):
                inputs = inputs.float()
                noisy = inputs + sigma * torch.randn(inputs.shape, generator=generator)
                logits = model(noisy.to(device))
                loss = F.cross_entropy(logits, labels.to(device).long())
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
                if config.max_steps is not None and len(losses) >= config.max_steps:
                    break
            if config.max_steps is not None and len(losses) >= config.max_steps:
                break
    model.eval()
    for module in model.modules():
        if isinstance(module, QUANT_LAYER_TYPES):
            module.refresh_weight_scale()
    if not losses:
        raise ValueError("train_data gave no batch")
    return losses


# ----------------------------------------------------------------------------- quantize
def quantize(
    model: nn.Module,
    policy: Policy,
    calibration_data: Any,
    *,
    finetune: FinetuneConfig | None = None,
    train_data: Any = None,
    config: QuantConfig | None = None,
    inplace: bool = False,
) -> nn.Module:
    """Quantize ``model`` to ``policy``; returns the fake-quant model (eval mode).

    Args:
        model: float model mapping ``[B, C, H, W]`` in [0, 1] to logits.
        policy: bits of every Conv2d/Linear (:meth:`Policy.validate` must pass).
        calibration_data: input tensor ``[N, C, H, W]`` or an iterable of batches
            (tensors or ``(inputs, labels)``); Gaussian noise at the config's sigma is added.
        finetune: fine-tuning settings, or ``None`` for calibration only.
        train_data: ``(inputs, labels)`` tensors or an iterable of ``(inputs, labels)``
            batches (re-iterable per epoch); required with ``finetune``.
        config: clipping/calibration settings (default :class:`QuantConfig`).
        inplace: modify ``model`` itself instead of a deep copy.

    The returned model has ``arq_quant = {"policy", "config", "folded_batchnorm"}`` and
    keeps ``arq_metadata``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(policy, Policy):
        raise TypeError(f"policy must be an arq.quant.Policy, got {type(policy).__name__}")
    config = config or QuantConfig()
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a QuantConfig, got {type(config).__name__}")
    if finetune is not None and not isinstance(finetune, FinetuneConfig):
        raise TypeError(f"finetune must be a FinetuneConfig or None, got {type(finetune).__name__}")
    if finetune is not None and train_data is None:
        raise ValueError("train_data is required when finetune is given")
    # calibration reads the data twice (BN-fold check, then calibration); fine-tuning once per epoch
    if not isinstance(calibration_data, torch.Tensor) and isinstance(calibration_data, Iterator):
        raise TypeError("calibration_data must be re-iterable (a tensor, a list of batches or a DataLoader), "
                        "not a one-shot iterator")
    if finetune is not None and finetune.epochs > 1 and isinstance(train_data, Iterator):
        raise TypeError("train_data must be re-iterable (tensors, a list of batches or a DataLoader) for epochs > 1")
    if any(isinstance(m, QUANT_LAYER_TYPES) for m in model.modules()):
        raise ValueError("model is already quantized")
    policy.validate(model)

    qmodel = model if inplace else copy.deepcopy(model)
    qmodel.eval()
    device = _model_device(qmodel)
    example = next(iter_input_batches(calibration_data, config.calibration_batch_size))[:8].float().to(device)
    folded = fold_batchnorm(qmodel, example)

    for name, layer in quantizable_layers(qmodel):
        cls = QuantConv2d if isinstance(layer, nn.Conv2d) else QuantLinear
        _set_submodule(qmodel, name, cls.from_float(layer, policy[name], config))
    if config.residual_bits != FLOAT_BITS and not quantize_residual_stream(qmodel, config.residual_bits, config):
        raise ValueError(f"config.residual_bits={config.residual_bits} but the model has no residual block "
                         "(a module returning add(a, b) or relu(add(a, b)) that torch.fx can trace)")

    sigma = config.calibration_sigma
    if sigma is None:
        sigma = _model_sigma(model) or 0.0
    calibrate(qmodel, calibration_data, config, sigma)
    if finetune is not None:
        finetune_model(qmodel, train_data, finetune)
    qmodel.eval()
    qmodel.arq_quant = {"policy": policy, "config": config, "folded_batchnorm": folded}
    return qmodel

