"""Data sets by name: MNIST (vendored), CIFAR-10 and ImageNet (from a folder the user names).

Every data set yields ``(image float32 [C, H, W] in [0, 1], label int)``. Images stay in pixel
space: the Gaussian noise of randomized smoothing is added there, and the model's first layer
(:class:`arq.models.NormalizeLayer`) standardizes with the constants below. The transforms are
those of locuslab/smoothing's ``datasets.py`` (Cohen et al. 2019).
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from arq.data.mnist import load_mnist

DATASETS = ("mnist", "cifar10", "imagenet")

#: Environment variable naming the folder that holds CIFAR-10 / ImageNet when no root is given.
DATA_ROOT_ENV = "ARQ_DATA"

#: Per-channel (mean, std) of each data set in [0, 1] pixel space (locuslab/smoothing's values
#: for CIFAR-10 and ImageNet; the usual 0.1307 / 0.3081 for MNIST).
NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "mnist": ((0.1307,), (0.3081,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}

_NUM_CLASSES = {"mnist": 10, "cifar10": 10, "imagenet": 1000}
_INPUT_SHAPES = {"mnist": (1, 28, 28), "cifar10": (3, 32, 32), "imagenet": (3, 224, 224)}

_CIFAR10_FOLDER = "cifar-10-batches-py"
_CIFAR10_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
_IMAGENET_SPLIT_FOLDERS = {"train": "train", "test": "val"}


def _check_dataset(name: str) -> str:
    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {', '.join(DATASETS)}; got {name!r}")
    return name


def _check_split(split: str) -> str:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return split


def dataset_num_classes(name: str) -> int:
    """Number of classes K of data set ``name`` (10, 10, 1000)."""
    return _NUM_CLASSES[_check_dataset(name)]


def dataset_input_shape(name: str) -> tuple[int, int, int]:
    """Shape ``(C, H, W)`` of one (test-transformed) image of data set ``name``."""
    return _INPUT_SHAPES[_check_dataset(name)]


def dataset_normalization(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel ``(mean, std)`` of data set ``name`` in [0, 1] pixel space."""
    return NORMALIZATION[_check_dataset(name)]


def get_dataset(name: str, split: str, root: str | os.PathLike | None = None, *, augment: bool | None = None) -> Dataset:
    """Data set ``name`` ("mnist", "cifar10", "imagenet"), ``split`` "train" or "test".

    MNIST is read from the copy shipped with arq unless ``root`` names another folder.
    CIFAR-10 is read from ``<root>/cifar-10-batches-py/`` (the python version, as torchvision
    downloads it) and ImageNet from ``<root>/imagenet/{train,val}/`` (one folder per class, as
    ``torchvision.datasets.ImageFolder`` reads it); ``root`` may also be those folders themselves.
    Without ``root``, the environment variable ``ARQ_DATA`` gives it.

    Train splits get locuslab's augmentation (CIFAR-10: random crop 32 with padding 4 and
    horizontal flip; ImageNet: random resized crop 224 and flip); test splits get
    CIFAR-10: none, ImageNet: resize 256 then center crop 224. ``augment`` overrides that:
    ``False`` gives a train split the test split's deterministic images (what certifying,
    calibrating on or searching over a train split needs: the same image at every access).
    """
    _check_dataset(name)
    _check_split(split)
    if name == "mnist":
        return load_mnist(split, root)
    data_root = _data_root(name, root)
    augment = (split == "train") if augment is None else bool(augment)
    if name == "cifar10":
        return _cifar10(split, data_root, augment)
    return _imagenet(split, data_root, augment)


def _data_root(name: str, root: str | os.PathLike | None) -> Path:
    if root is None:
        root = os.environ.get(DATA_ROOT_ENV)
    if root is None:
        raise FileNotFoundError(
            f"no folder given for {name}: pass root=... (--data-root on the command line) or set "
            f"the environment variable {DATA_ROOT_ENV}. {_how_to_get(name, Path('<root>'))}"
        )
    return Path(root).expanduser()


def _how_to_get(name: str, root: Path) -> str:
    if name == "cifar10":
        return (
            f"CIFAR-10 must be in {root / _CIFAR10_FOLDER}/ (data_batch_1..5, test_batch): download "
            "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz and extract it in "
            f"{root}, or run torchvision.datasets.CIFAR10({str(root)!r}, download=True)."
        )
    return (
        f"ImageNet must be in {root / 'imagenet'}/train/<wnid>/*.JPEG and {root / 'imagenet'}/val/<wnid>/*.JPEG "
        "(ILSVRC2012 from https://image-net.org, validation images sorted into class folders, "
        "e.g. with https://raw.githubusercontent.com/soumith/imagenetloader.torch/master/valprep.sh)."
    )


# ----------------------------------------------------------------------------------- CIFAR-10


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler for the CIFAR-10 batches that builds numpy arrays and nothing else.

    The CIFAR-10 python files are pickles; refusing every other global means a tampered
    file cannot run code when it is read.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"CIFAR-10 batch refers to {module}.{name}, which arq does not load")


def _read_cifar10_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch: images uint8 [N, 3, 32, 32] and labels int64 [N]."""
    try:
        with open(path, "rb") as handle:
            batch = _NumpyOnlyUnpickler(handle, encoding="bytes").load()
        data = batch.get(b"data", batch.get("data"))
        labels = batch.get(b"labels", batch.get("labels"))
        images = np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(labels, dtype=np.int64)
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError) as error:
        raise ValueError(f"{path} is not a CIFAR-10 python batch: {error}") from error
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{path}: {images.shape[0]} images but {labels.shape[0]} labels")
    return images, labels


class CIFAR10Dataset(Dataset):
    """CIFAR-10 in memory (uint8 [N, 3, 32, 32]); items ``(float32 [3, 32, 32] in [0, 1], label)``.

    ``augment`` applies locuslab's training augmentation (RandomCrop(32, padding=4),
    RandomHorizontalFlip) with torch's global RNG, as torchvision does.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, split: str, augment: bool):
        self.images = images
        self.labels = labels
        self.split = split
        self.transform = None
        if augment:
            from torchvision import transforms  # optional dependency, only needed for training

            self.transform = transforms.Compose(
                [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()]
            )

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)  # on uint8, so values stay exact multiples of 1/255
        return image.to(torch.float32).div_(255.0), int(self.labels[index])

    def __repr__(self) -> str:
        return f"CIFAR10Dataset(split={self.split!r}, size={len(self)})"


def _cifar10(split: str, root: Path, augment: bool) -> CIFAR10Dataset:
    folder = root if (root / _CIFAR10_FILES["test"][0]).is_file() else root / _CIFAR10_FOLDER
    paths = [folder / file_name for file_name in _CIFAR10_FILES[split]]
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"CIFAR-10 {split} files missing: {', '.join(missing)}. {_how_to_get('cifar10', root)}")
    batches = [_read_cifar10_batch(path) for path in paths]
    images = torch.from_numpy(np.concatenate([images for images, _ in batches]))
    labels = torch.from_numpy(np.concatenate([labels for _, labels in batches]))
    return CIFAR10Dataset(images, labels, split, augment=augment)


# ----------------------------------------------------------------------------------- ImageNet


def _imagenet(split: str, root: Path, augment: bool) -> Dataset:
    split_folder = _IMAGENET_SPLIT_FOLDERS[split]
    folder = root / split_folder if (root / split_folder).is_dir() else root / "imagenet" / split_folder
    if not folder.is_dir():
        raise FileNotFoundError(f"ImageNet {split} folder {folder} not found. {_how_to_get('imagenet', root)}")
    from torchvision import datasets, transforms  # optional dependency

    if augment:
        transform = transforms.Compose(
            [transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(), transforms.ToTensor()]
        )
    else:
        transform = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor()])
    return datasets.ImageFolder(str(folder), transform)
