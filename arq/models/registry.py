"""Architectures by name, each wrapped as ``nn.Sequential(NormalizeLayer, net)``.

The wrapper's children are named ``0`` (normalization) and ``1`` (the network), so state-dict
keys read ``1.conv1.weight`` etc., as in locuslab/smoothing's checkpoints.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from arq.data.datasets import dataset_input_shape, dataset_normalization, dataset_num_classes
from arq.models.normalize import NormalizeLayer


def _cifar_resnet(depth: int) -> Callable[[int, int], nn.Module]:
    def build(num_classes: int, in_channels: int) -> nn.Module:
        from arq.models.cifar_resnet import CifarResNet

        return CifarResNet(depth, num_classes=num_classes, in_channels=in_channels)

    return build


def _resnet50(num_classes: int, in_channels: int) -> nn.Module:
    from torchvision.models import resnet50  # optional dependency, only for ImageNet

    return resnet50(weights=None, num_classes=num_classes)


def _lenet(num_classes: int, in_channels: int) -> nn.Module:
    from arq.models.mnist_nets import LeNet

    return LeNet(num_classes=num_classes)


def _mnist_resnet(num_classes: int, in_channels: int) -> nn.Module:
    from arq.models.mnist_nets import MNISTResNet

    return MNISTResNet(num_classes=num_classes)


#: name -> (builder(num_classes, in_channels), data sets whose input size it is built for)
ARCHITECTURES: dict[str, tuple[Callable[[int, int], nn.Module], tuple[str, ...]]] = {
    "cifar_resnet20": (_cifar_resnet(20), ("cifar10",)),
    "cifar_resnet32": (_cifar_resnet(32), ("cifar10",)),
    "cifar_resnet56": (_cifar_resnet(56), ("cifar10",)),
    "cifar_resnet110": (_cifar_resnet(110), ("cifar10",)),
    "resnet50": (_resnet50, ("imagenet",)),
    "lenet": (_lenet, ("mnist",)),
    "mnist_resnet": (_mnist_resnet, ("mnist",)),
}

#: The data set each architecture is for (used to read locuslab checkpoints, which name only the arch).
DEFAULT_DATASET = {name: datasets[0] for name, (_, datasets) in ARCHITECTURES.items()}


def get_architecture(name: str, dataset: str, num_classes: int | None = None,
                     normalization: tuple[list[float], list[float]] | None = None) -> nn.Sequential:
    """A randomly initialized ``nn.Sequential(NormalizeLayer(mean, std), net)`` in train mode.

    Maps ``[B, C, H, W]`` in [0, 1] to logits ``[B, num_classes]``. ``num_classes`` defaults to the
    data set's; ``normalization`` = ``(mean, std)`` defaults to the data set's constants.
    """
    if name not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {', '.join(ARCHITECTURES)}; got {name!r}")
    builder, datasets = ARCHITECTURES[name]
    if dataset not in datasets:
        raise ValueError(f"arch {name!r} is built for dataset {' or '.join(datasets)}, not dataset={dataset!r}")
    if num_classes is None:
        num_classes = dataset_num_classes(dataset)
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    mean, std = normalization if normalization is not None else dataset_normalization(dataset)
    in_channels = dataset_input_shape(dataset)[0]
    if len(mean) != in_channels:
        raise ValueError(f"normalization has {len(mean)} channels but dataset {dataset!r} images have {in_channels}")
    return nn.Sequential(NormalizeLayer(mean, std), builder(num_classes, in_channels))


def num_classes_of(model: nn.Module) -> int:
    """Number of classes K of ``model``: ``model.arq_metadata["num_classes"]`` if set, else the
    ``out_features`` of its last ``nn.Linear``."""
    metadata = getattr(model, "arq_metadata", None)
    if isinstance(metadata, dict) and metadata.get("num_classes") is not None:
        return int(metadata["num_classes"])
    last_linear = None
    for module in model.modules():
        if isinstance(module, nn.Linear):
            last_linear = module
    if last_linear is None:
        raise ValueError(
            "cannot tell the number of classes of this model: it has no arq_metadata['num_classes'] "
            "and no nn.Linear layer; pass num_classes explicitly"
        )
    return last_linear.out_features
