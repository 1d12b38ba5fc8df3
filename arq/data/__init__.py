"""Data sets for arq: MNIST (shipped with arq), CIFAR-10 and ImageNet (from a folder you name).

Images are float32 ``[C, H, W]`` in [0, 1] pixel space; normalization belongs to the model.
"""
from arq.data.datasets import (
    DATA_ROOT_ENV,
    DATASETS,
    NORMALIZATION,
    CIFAR10Dataset,
    dataset_input_shape,
    dataset_normalization,
    dataset_num_classes,
    get_dataset,
)
from arq.data.mnist import MNIST_SHA256, VENDORED_MNIST_DIR, MNISTDataset, load_mnist, read_idx

__all__ = [
    "DATASETS",
    "DATA_ROOT_ENV",
    "NORMALIZATION",
    "CIFAR10Dataset",
    "MNISTDataset",
    "MNIST_SHA256",
    "VENDORED_MNIST_DIR",
    "dataset_input_shape",
    "dataset_normalization",
    "dataset_num_classes",
    "get_dataset",
    "load_mnist",
    "read_idx",
]
