"""Saving and loading models: arq's safetensors format and locuslab/smoothing checkpoints.

arq's format is one ``<name>.safetensors`` file. Its tensors are the state dict of
``nn.Sequential(NormalizeLayer, net)`` (keys ``1.conv1.weight`` ...); its header's metadata (a
``str -> str`` map, readable without loading the tensors) holds ``"arq"``: a JSON object with at
least ``arch``, ``dataset``, ``sigma``, ``num_classes`` and ``normalization`` (``{"mean": [...],
"std": [...]}``), plus whatever else the writer adds (training arguments, accuracies).

locuslab/smoothing's checkpoints (``checkpoint.pth.tar``) are torch pickles of
``{"arch": "cifar_resnet110" | "resnet50" | ..., "state_dict": ..., "epoch", "optimizer"}``,
read here with ``torch.load(weights_only=True)``, which builds tensors and plain containers only.
Their noise level is not stored; it is taken from a ``noise_<sigma>`` folder in the path
(as in locuslab's ``models/cifar10/resnet110/noise_0.25/checkpoint.pth.tar``) or from ``sigma=``.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from arq.data.datasets import dataset_normalization, dataset_num_classes
from arq.models.normalize import NormalizeLayer
from arq.models.registry import ARCHITECTURES, DEFAULT_DATASET, get_architecture

METADATA_KEY = "arq"
FORMAT_VERSION = 1
REQUIRED_METADATA = ("arch", "dataset", "sigma")
_NORMALIZATION_KEYS = {"mean", "std", "means", "sds"}  # state of a normalization layer, if a writer kept it
_NOISE_FOLDER = re.compile(r"noise_(\d+(?:\.\d+)?)")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or does not fit its architecture."""


def save_model(model: nn.Module, path: str | os.PathLike, metadata: Mapping[str, Any]) -> Path:
    """Write ``model`` to ``path`` (``.safetensors`` is appended if missing) in arq's format.

    ``metadata`` must give ``arch``, ``dataset`` and ``sigma`` and be JSON-serializable;
    ``num_classes`` and ``normalization`` are filled in from the model when absent.
    Returns the path written.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_name(path.name + ".safetensors")
    missing = [key for key in REQUIRED_METADATA if key not in metadata]
    if missing:
        raise ValueError(f"metadata lacks {', '.join(missing)} (needs {', '.join(REQUIRED_METADATA)})")
    model = _unwrap_data_parallel(model)
    full_metadata = dict(metadata)
    full_metadata.setdefault("num_classes", _num_classes_from_model(model))
    if "normalization" not in full_metadata:
        normalize = model[0] if isinstance(model, nn.Sequential) and isinstance(model[0], NormalizeLayer) else None
        if normalize is None:
            raise ValueError("model does not start with a NormalizeLayer; give metadata['normalization']")
        full_metadata["normalization"] = {
            "mean": list(normalize.mean_values),
            "std": list(normalize.std_values),
        }
    full_metadata["format_version"] = FORMAT_VERSION
    try:
        header = json.dumps(full_metadata, sort_keys=True)
    except TypeError as error:
        raise ValueError(f"metadata must be JSON-serializable: {error}") from error
    # safetensors refuses views of shared storage: give it contiguous CPU copies.
    tensors = {key: value.detach().to("cpu").contiguous().clone() for key, value in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={METADATA_KEY: header, "format": "pt"})
    return path


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The ``arq`` metadata of a ``.safetensors`` file, read from its header only (no tensors)."""
    from safetensors import safe_open

    path = _existing_file(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
    except Exception as error:  # safetensors raises its own SafetensorError for corrupt headers
        raise CheckpointError(f"{path} is not a readable safetensors file: {error}") from error
    if METADATA_KEY not in header:
        raise CheckpointError(
            f"{path} has no '{METADATA_KEY}' metadata in its safetensors header; arq files are written by "
            "arq.models.save_model"
        )
    try:
        metadata = json.loads(header[METADATA_KEY])
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}: the '{METADATA_KEY}' metadata is not valid JSON: {error}") from error
    missing = [key for key in REQUIRED_METADATA if key not in metadata]
    if missing:
        raise CheckpointError(f"{path}: metadata lacks {', '.join(missing)}")
    return metadata


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu",
                    sigma: float | None = None) -> nn.Sequential:
    """Load a model from an arq ``.safetensors`` file or a locuslab/smoothing checkpoint.

    Returns ``nn.Sequential(NormalizeLayer, net)`` in eval mode on ``map_location``, mapping
    ``[B, C, H, W]`` in [0, 1] to logits ``[B, K]``, with ``model.arq_metadata`` (at least
    ``arch``, ``dataset``, ``sigma``, ``num_classes``, ``normalization``, ``checkpoint``).
    ``sigma`` overrides the stored noise level (locuslab files store none).
    Raises :class:`CheckpointError` (a ``ValueError``) naming the file for a corrupt file and
    listing missing / unexpected keys and shape mismatches for one that does not fit.
    """
    path = _existing_file(path)
    if _is_safetensors(path):
        metadata = read_metadata(path)
        state_dict = _load_safetensors_tensors(path)
    else:
        metadata, state_dict = _read_torch_checkpoint(path)
    if sigma is not None:
        metadata["sigma"] = float(sigma)
    arch, dataset = metadata["arch"], metadata["dataset"]
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"{path}: unknown architecture {arch!r} (arq knows {', '.join(ARCHITECTURES)})")
    bad = [repr(key) for key, value in state_dict.items() if not isinstance(key, str) or not isinstance(value, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: the state dict must map names to tensors; not so for {', '.join(bad[:5])}")
    state_dict, stored_normalization = _canonical_keys(state_dict)
    normalization = metadata.get("normalization") or stored_normalization
    if normalization is None:
        mean, std = dataset_normalization(dataset)
        normalization = {"mean": list(mean), "std": list(std)}
    metadata["normalization"] = {"mean": list(normalization["mean"]), "std": list(normalization["std"])}
    num_classes = int(metadata.get("num_classes") or dataset_num_classes(dataset))
    metadata["num_classes"] = num_classes
    try:
        model = get_architecture(arch, dataset, num_classes=num_classes,
                                 normalization=(normalization["mean"], normalization["std"]))
    except ValueError as error:
        raise CheckpointError(f"{path}: {error}") from error
    _load_state_dict_strictly(model, state_dict, path, arch)
    metadata["checkpoint"] = str(path)
    model.arq_metadata = metadata
    return model.to(map_location).eval()


# ------------------------------------------------------------------------------------ helpers


def _existing_file(path: str | os.PathLike) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path} does not exist")
    return path


def _is_safetensors(path: Path) -> bool:
    """safetensors files begin with an 8-byte little-endian header length, then a JSON ``{``."""
    if path.suffix == ".safetensors":
        return True
    with open(path, "rb") as handle:
        start = handle.read(9)
    return len(start) == 9 and start[8:9] == b"{"


def _load_safetensors_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as error:  # SafetensorError for truncated or corrupt data
        raise CheckpointError(f"{path} is not a readable safetensors file: {error}") from error


def _read_torch_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any file that is not a torch checkpoint: torch raises many kinds (KeyError too)
        raise CheckpointError(
            f"{path} is neither an arq .safetensors file nor a torch checkpoint that loads with "
            f"weights_only=True: {error}"
        ) from error
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), Mapping):
        raise CheckpointError(f"{path}: expected a dict with 'arch' and 'state_dict' (locuslab/smoothing format)")
    if isinstance(checkpoint.get("arq_metadata"), Mapping):  # arq's own training checkpoints
        metadata = dict(checkpoint["arq_metadata"])
    else:
        arch = checkpoint.get("arch")
        if arch not in DEFAULT_DATASET:
            raise CheckpointError(f"{path}: 'arch' is {arch!r}; arq knows {', '.join(ARCHITECTURES)}")
        metadata = {
            "arch": arch,
            "dataset": DEFAULT_DATASET[arch],
            "sigma": _sigma_from_path(path),
            "source": "locuslab/smoothing",
        }
        if "epoch" in checkpoint:
            metadata["epoch"] = int(checkpoint["epoch"])
    missing = [key for key in ("arch", "dataset") if key not in metadata]
    if missing:
        raise CheckpointError(f"{path}: checkpoint metadata lacks {', '.join(missing)}")
    metadata.setdefault("sigma", None)
    return metadata, dict(checkpoint["state_dict"])


def _sigma_from_path(path: Path) -> float | None:
    for part in reversed(path.resolve().parts):
        match = _NOISE_FOLDER.fullmatch(part)
        if match:
            return float(match.group(1))
    return None


def _canonical_keys(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict | None]:
    """Keys of ``Sequential(NormalizeLayer, net)``: drop DataParallel's ``module.`` components
    (locuslab's ResNet-50 has ``1.module.conv1.weight``), prefix a bare network's keys with
    ``1.``, and take any stored normalization (``0.means``/``0.sds``) out of the state dict."""
    stripped = {".".join(part for part in key.split(".") if part != "module"): value for key, value in state_dict.items()}
    if not any(key.startswith(("0.", "1.")) for key in stripped):
        stripped = {f"1.{key}": value for key, value in stripped.items()}
    stored = {key[2:]: value for key, value in stripped.items() if key.startswith("0.") and key[2:] in _NORMALIZATION_KEYS}
    normalization = None
    if stored:
        mean = stored.get("mean", stored.get("means"))
        std = stored.get("std", stored.get("sds"))
        if mean is not None and std is not None:
            normalization = {"mean": mean.flatten().tolist(), "std": std.flatten().tolist()}
    kept = {key: value for key, value in stripped.items() if not (key.startswith("0.") and key[2:] in _NORMALIZATION_KEYS)}
    return kept, normalization


def _load_state_dict_strictly(model: nn.Module, state_dict: dict[str, torch.Tensor], path: Path, arch: str) -> None:
    expected = model.state_dict()
    # checkpoints saved before torch 0.4.1 have no BatchNorm step counter; it only matters for
    # momentum=None training, so it starts at 0 as torch's own loader does for such files
    state_dict = dict(state_dict)
    for key in set(expected) - set(state_dict):
        if key.endswith(".num_batches_tracked"):
            state_dict[key] = torch.zeros_like(expected[key])
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = sorted(
        f"{key}: file {tuple(state_dict[key].shape)} vs model {tuple(expected[key].shape)}"
        for key in set(expected) & set(state_dict)
        if tuple(state_dict[key].shape) != tuple(expected[key].shape)
    )
    if missing or unexpected or mismatched:
        problems = []
        for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)):
            if keys:
                shown = ", ".join(keys[:10]) + (f", ... ({len(keys)} in all)" if len(keys) > 10 else "")
                problems.append(f"{label}: {shown}")
        raise CheckpointError(f"{path} does not fit architecture {arch!r}: " + "; ".join(problems))
    model.load_state_dict(state_dict, strict=True)


def _unwrap_data_parallel(model: nn.Module) -> nn.Module:
    while isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        model = model.module
    return model


def _num_classes_from_model(model: nn.Module) -> int:
    from arq.models.registry import num_classes_of

    return num_classes_of(model)
