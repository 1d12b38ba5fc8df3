"""Save and load quantized models: safetensors (packed weights) plus the policy JSON.

File layout of ``arq.quant.save(qmodel, "model.safetensors")``:

* ``model.safetensors`` tensors, for each quantized layer ``L``:
  ``L.weight_packed`` int32 ``[N, ceil(K / (32 // b))]`` (docs/design.md format),
  ``L.weight_scale`` float32 ``[N]``, ``L.weight_clip_ratio`` float32 ``[N]``,
  ``L.bias`` float32 ``[N]`` (if any), ``L.input_quantizer.scale`` float32 ``[]``,
  ``L.input_quantizer.signed`` bool ``[]``; a 32-bit weight is stored as ``L.weight``.
  Every other state-dict entry (normalization, unfolded BatchNorm) as is.
* its metadata (strings): ``arq_quant_format`` (version), ``policy`` (JSON),
  ``quant_config`` (JSON), ``folded_batchnorm`` (JSON list), ``weight_shapes`` (JSON),
  ``arq_metadata`` (JSON, the model's metadata when it has one).
* ``model.policy.json`` beside it: the same policy, for people and the search.

Loading rebuilds the float architecture (given, or from ``arq_metadata`` through
``arq.models.get_architecture``), replaces folded BatchNorms by Identity, swaps in the fake-quant
layers and sets their weights to ``q * scale``: outputs are bit-identical to the saved model's.
The float weights are not stored, so the clip ratio that the saved model's training mode would
use (``scale_n = r_n max|w_n| / q_max``, :mod:`arq.quant.modules`) is replaced by the one that
gives the stored scale back from ``w = q * scale``: ``r_n = q_max / max|q_n|`` (1 in practice, the
largest code of a channel being ``+-q_max``; 1 for an all-zero channel). Training or fine-tuning
a loaded model then starts from the saved model's scales (to float32 rounding: a scale may come
back one ulp off, which changes no integer code; see :func:`_reproducing_clip_ratio`).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from arq.quant.modules import QUANT_LAYER_TYPES, QuantConv2d, QuantLinear
from arq.quant.packing import pack_layer_weight, unpack_layer_weight
from arq.quant.policy import FLOAT_BITS, Policy, quantizable_layers
from arq.quant.quantizers import QuantConfig, weight_qmax
from arq.quant.residual import quantize_residual_stream

FORMAT_VERSION = "1"


def policy_sidecar_path(path: str | os.PathLike) -> Path:
    """``dir/name.safetensors -> dir/name.policy.json``."""
    path = Path(path)
    return path.with_name(path.name.removesuffix(".safetensors") + ".policy.json")


def save(qmodel: nn.Module, path: str | os.PathLike) -> None:
    """Write a model returned by :func:`arq.quant.quantize` (see the module docstring)."""
    from safetensors.torch import save_file

    info = getattr(qmodel, "arq_quant", None)
    if not isinstance(info, dict) or "policy" not in info:
        raise ValueError("qmodel must come from arq.quant.quantize (it has no arq_quant policy)")
    policy: Policy = info["policy"]
    tensors: dict[str, torch.Tensor] = {}
    handled: set[str] = set()
    shapes: dict[str, list[int]] = {}
    for name, layer in quantizable_layers(qmodel):
        if not isinstance(layer, QUANT_LAYER_TYPES):
            raise ValueError(f"layer {name!r} is not quantized ({type(layer).__name__})")
        prefix = f"{name}."
        shapes[name] = list(layer.weight.shape)
        for key in layer.state_dict():
            handled.add(prefix + key)
        if layer.w_bits == FLOAT_BITS:
            tensors[prefix + "weight"] = layer.weight.detach().float().cpu()
        else:
            tensors[prefix + "weight_packed"] = pack_layer_weight(layer.integer_weight().cpu(), layer.w_bits)
        tensors[prefix + "weight_scale"] = layer.weight_scale.detach().float().cpu()
        tensors[prefix + "weight_clip_ratio"] = layer.weight_clip_ratio.detach().float().cpu()
        if layer.bias is not None:
            tensors[prefix + "bias"] = layer.bias.detach().float().cpu()
        tensors[prefix + "input_quantizer.scale"] = layer.input_quantizer.scale.detach().cpu()
        tensors[prefix + "input_quantizer.signed"] = layer.input_quantizer.signed.detach().cpu()
    for key, value in qmodel.state_dict().items():
        if key not in handled:
            tensors[key] = value.detach().cpu()
    metadata = {
        "arq_quant_format": FORMAT_VERSION,
        "policy": policy.to_json(),
        "quant_config": json.dumps(info["config"].to_dict()),
        "folded_batchnorm": json.dumps(list(info.get("folded_batchnorm", []))),
        "weight_shapes": json.dumps(shapes),
    }
    model_metadata = getattr(qmodel, "arq_metadata", None)
    if isinstance(model_metadata, dict):
        metadata["arq_metadata"] = json.dumps(model_metadata)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.fspath(path), metadata=metadata)
    policy.save(policy_sidecar_path(path))


def _build_from_metadata(metadata: dict) -> nn.Module:
    """The float architecture named by ``arq_metadata`` (``arch``, ``dataset``), through arq.models."""
    if "arch" not in metadata or "dataset" not in metadata:
        raise ValueError("load: no model given and the file's arq_metadata names no 'arch' and 'dataset'; pass model=")
    try:
        from arq.models import get_architecture
    except ImportError as error:
        raise ValueError(f"load: no model given and arq.models is unavailable ({error}); pass model=") from None
    normalization = metadata.get("normalization")
    return get_architecture(
        metadata["arch"], metadata["dataset"], num_classes=metadata.get("num_classes"),
        normalization=(normalization["mean"], normalization["std"]) if normalization else None,
    )


def load(path: str | os.PathLike, model: nn.Module | None = None, *, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a quantized model saved by :func:`save` (eval mode, on ``device``).

    Args:
        path: the ``.safetensors`` file.
        model: an instance of the float architecture (weights are ignored); ``None``
            builds it from the saved ``arq_metadata["arch"]`` with ``arq.models``.
        device: where the returned model lives.
    """
    import copy

    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="pt", device="cpu") as handle:
        metadata = handle.metadata() or {}
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    if metadata.get("arq_quant_format") != FORMAT_VERSION:
        raise ValueError(
            f"{os.fspath(path)!r} is not an arq quantized model (format {metadata.get('arq_quant_format')!r}, "
            f"expected {FORMAT_VERSION!r})"
        )
    policy = Policy.from_json(metadata["policy"])
    stored_config = json.loads(metadata["quant_config"])
    stored_config.setdefault("residual_shortcuts", False)  # files saved before the option had none
    config = QuantConfig.from_dict(stored_config)
    folded = json.loads(metadata["folded_batchnorm"])
    shapes = json.loads(metadata["weight_shapes"])
    model_metadata = json.loads(metadata["arq_metadata"]) if "arq_metadata" in metadata else None

    if model is None:
        qmodel = _build_from_metadata(model_metadata or {})
    else:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module or None, got {type(model).__name__}")
        qmodel = copy.deepcopy(model)
    qmodel = qmodel.to("cpu").float().eval()
    policy.validate(qmodel)
    for bn_name in folded:
        _replace(qmodel, bn_name, nn.Identity())
    for name, layer in quantizable_layers(qmodel):
        if list(layer.weight.shape) != shapes[name]:
            raise ValueError(f"layer {name!r}: model weight {list(layer.weight.shape)} != saved {shapes[name]}")
        if layer.bias is None and f"{name}.bias" in tensors:  # BN folding added a bias
            layer.bias = nn.Parameter(torch.zeros(layer.weight.shape[0]))
        bits = policy[name]
        # a 32-bit layer keeps weight_clip_ratio; quantized ones get theirs from the file below
        config_no_search = QuantConfig(**{**config.to_dict(), "weight_clip": "max"})
        cls = QuantConv2d if isinstance(layer, nn.Conv2d) else QuantLinear
        quant_layer = cls.from_float(layer, bits, config_no_search)
        quant_layer.input_quantizer.config = config
        prefix = f"{name}."
        with torch.no_grad():
            scale = tensors.pop(prefix + "weight_scale")
            quant_layer.weight_scale.copy_(scale)
            saved_ratio = tensors.pop(prefix + "weight_clip_ratio")
            if bits.w_bits == FLOAT_BITS:
                quant_layer.weight_clip_ratio.copy_(saved_ratio)
                quant_layer.weight.copy_(tensors.pop(prefix + "weight"))
            else:
                q = unpack_layer_weight(tensors.pop(prefix + "weight_packed"), bits.w_bits, layer.weight.shape)
                view = scale.reshape(-1, *([1] * (q.dim() - 1)))
                quant_layer.weight.copy_(q.float() * view)
                # not the saved ratio: it applied to the float weights, and max|q * scale| is smaller
                quant_layer.weight_clip_ratio.copy_(_reproducing_clip_ratio(q, bits.w_bits))
            if prefix + "bias" in tensors:
                quant_layer.bias.copy_(tensors.pop(prefix + "bias"))
            input_scale = tensors.pop(prefix + "input_quantizer.scale")
            input_signed = tensors.pop(prefix + "input_quantizer.signed")
            if quant_layer.input_quantizer.enabled:
                quant_layer.input_quantizer.set_range(float(input_scale), bool(input_signed))
        _replace(qmodel, name, quant_layer)
    if config.residual_bits != FLOAT_BITS:
        quantize_residual_stream(qmodel, config.residual_bits, config)
    missing, unexpected = qmodel.load_state_dict(tensors, strict=False)
    quant_keys = {k for k in qmodel.state_dict() if any(k.startswith(n + ".") for n, _ in quantizable_layers(qmodel))}
    missing = [k for k in missing if k not in quant_keys]
    if missing or unexpected:
        raise ValueError(f"{os.fspath(path)!r} does not fit the model: missing {missing}, unexpected {unexpected}")
    if model_metadata is not None:
        qmodel.arq_metadata = model_metadata
    qmodel.arq_quant = {"policy": policy, "config": config, "folded_batchnorm": folded}
    return qmodel.to(device).eval()


def _reproducing_clip_ratio(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Per channel, ``r_n = q_max / max|q_n|`` (1 for an all-zero channel), so that
    ``weight_scale(q * scale, bits, r)`` gives ``scale`` back, up to float32 rounding.

    ``fl(fl(r max|w_n|) / q_max)`` with ``max|w_n| = fl(max|q_n| scale_n)`` can be one ulp off
    ``scale_n`` (measured: none of 140,000 channels quantized by this module at 2..8 bits, but an
    eighth to a quarter of random scales at 3-4 bits): no float32 ``B`` need exist with
    ``fl(B / q_max) = scale_n``, so no other ratio does better. One ulp of the scale moves no code
    (``round(q (1 +- 2^-23))`` is ``q``); ``w_hat = q * scale`` moves by about one ulp.
    """
    qmax = weight_qmax(bits)
    peak = q.reshape(q.shape[0], -1).abs().amax(dim=1).float()
    return torch.where(peak > 0, qmax / peak.clamp_min(1.0), torch.ones_like(peak))


def _replace(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)
