"""Noise-trained MNIST models shipped with arq, named ``<dataset>-<arch>-sigma<sigma:.2f>``.

Each is one ``arq/zoo/weights/<name>.safetensors`` in arq's format (metadata: sigma, accuracies,
the training arguments). How they were trained: ``docs/zoo.md`` and ``arq/zoo/logs/``.

>>> import arq.zoo
>>> arq.zoo.names()
['mnist-lenet-sigma0.25', 'mnist-lenet-sigma0.50', 'mnist-lenet-sigma1.00']
>>> model = arq.zoo.load("mnist-lenet-sigma0.50")   # model.arq_metadata["sigma"] == 0.5
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
POLICY_SUFFIX = ".arq-policy.json"


def names() -> list[str]:
    """Names of the shipped models, sorted."""
    return sorted(path.stem for path in WEIGHTS_DIR.glob("*.safetensors"))


def path_of(name: str) -> Path:
    """The ``.safetensors`` file of zoo model ``name``."""
    path = WEIGHTS_DIR / f"{name}.safetensors"
    if not isinstance(name, str) or "/" in name or not path.is_file():
        raise ValueError(f"no zoo model named {name!r}; the zoo has: {', '.join(names()) or '(none)'}")
    return path


def info(name: str) -> dict[str, Any]:
    """Metadata of zoo model ``name`` (arch, dataset, sigma, num_classes, clean_accuracy,
    noisy_accuracy, training, ...), read from the file header without loading the weights."""
    from arq.models import read_metadata

    return read_metadata(path_of(name))


def load(name: str, map_location: str | torch.device = "cpu") -> nn.Module:
    """Zoo model ``name`` in eval mode: ``[B, 1, 28, 28]`` in [0, 1] -> logits ``[B, 10]``,
    with ``model.arq_metadata["sigma"]`` the noise level it was trained at. A shipped file's sha256
    must be the one in ``weights/SHA256SUMS``: a changed file is refused (its metadata would still
    describe the shipped model's accuracy)."""
    from arq.models import load_checkpoint

    path = path_of(name)
    check_sha256(path)
    return load_checkpoint(path, map_location=map_location)


def check_sha256(path: Path) -> None:
    """Raise ValueError when ``weights/SHA256SUMS`` lists ``path`` with another sha256 (a file the
    list does not name, one a user added, is not checked)."""
    import hashlib

    sums = WEIGHTS_DIR / "SHA256SUMS"
    expected = {}
    if sums.is_file():
        for line in sums.read_text(encoding="utf-8").splitlines():
            if line.strip():
                digest, file_name = line.split(maxsplit=1)
                expected[file_name.strip().lstrip("*")] = digest
    if path.name not in expected:
        return
    actual = hashlib.sha256(path.read_bytes()).hexdigest()
    if actual != expected[path.name]:
        raise ValueError(f"{path} has sha256 {actual}, not the shipped {expected[path.name]}: the zoo file was "
                         "changed; reinstall arq")


def arq_policy(name: str):
    """The mixed-precision policy found by ARQ's search for zoo model ``name``, or None.

    Read from ``weights/<name>.arq-policy.json`` (``arq.quant.Policy.save``'s format) when the zoo
    ships one (mnist-lenet-sigma0.25 does: a 150-episode search at the W4A4 budget, whose log is
    ``benchmarks/results/search/mnist-lenet-sigma0.25-arq.jsonl``); None otherwise.
    """
    policy_path = path_of(name).with_name(f"{name}{POLICY_SUFFIX}")
    if not policy_path.is_file():
        return None
    from arq.quant import Policy

    return Policy.load(policy_path)


__all__ = ["POLICY_SUFFIX", "WEIGHTS_DIR", "arq_policy", "check_sha256", "info", "load", "names", "path_of"]
