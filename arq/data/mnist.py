"""MNIST, vendored with arq and read from its IDX files with numpy (no network, no torchvision).

The four original files (LeCun, Cortes, Burges; CC BY-SA 3.0, see ``mnist/README.md``) ship
gzip-compressed in ``arq/data/mnist/``. IDX format: a big-endian header ``0x00 0x00 dtype ndim``,
then ``ndim`` big-endian uint32 sizes, then the values in C order.
"""
from __future__ import annotations

import gzip
import hashlib
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

VENDORED_MNIST_DIR = Path(__file__).resolve().parent / "mnist"

MNIST_FILES = {
    ("train", "images"): "train-images-idx3-ubyte.gz",
    ("train", "labels"): "train-labels-idx1-ubyte.gz",
    ("test", "images"): "t10k-images-idx3-ubyte.gz",
    ("test", "labels"): "t10k-labels-idx1-ubyte.gz",
}

# sha256 of the gzip files as distributed (checked by tests/data/test_mnist.py).
MNIST_SHA256 = {
    "t10k-images-idx3-ubyte.gz": "038d179cb0444a64476c676204072e928a7955553284d218a547c161aeb04ff7",
    "t10k-labels-idx1-ubyte.gz": "89775d9e861fd6121b616e70308e86d4636cf2376ff22f089c463ec765c40660",
    "train-images-idx3-ubyte.gz": "0ee8b5549c732357195036178cad10ed6e76318bce4012bad033b87ed8418670",
    "train-labels-idx1-ubyte.gz": "ad4c2f43b1d02fd6548c5a1dd98152763df128f7dfa5aface0b79fe8c13ad064",
}

# IDX type byte -> big-endian numpy dtype.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def sha256_of_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (gzip-compressed when the name ends in ``.gz``) into a numpy array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError) as error:
        raise ValueError(f"cannot read IDX file {path}: {error}") from error
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {raw[:4].hex()})")
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    ndim = raw[3]
    header_size = 4 + 4 * ndim
    shape = tuple(int(size) for size in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected_bytes = header_size + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected_bytes:
        raise ValueError(f"{path}: IDX header says shape {shape} ({expected_bytes} bytes), file has {len(raw)} bytes")
    values = np.frombuffer(raw, dtype=dtype, offset=header_size).reshape(shape)
    return values.astype(dtype.newbyteorder("="))


def _find_mnist_file(root: Path, name: str) -> Path:
    """The file ``name`` (``.gz``) or its un-gzipped twin, in ``root`` or torchvision's ``root/MNIST/raw``."""
    for folder in (root, root / "MNIST" / "raw"):
        for candidate in (folder / name, folder / name[: -len(".gz")]):
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(
        f"MNIST file {name} not found in {root} (nor in {root / 'MNIST' / 'raw'}); "
        f"arq ships MNIST in {VENDORED_MNIST_DIR}: call get_dataset('mnist', split) without root to use it"
    )


class MNISTDataset(Dataset):
    """MNIST as a map-style dataset of ``(image float32 [1, 28, 28] in [0, 1], label int)``.

    The whole split stays in memory as uint8 (47 MB for the training set); the division by 255
    happens per item, as torchvision's ToTensor does, so values are exactly ``k / 255``.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, split: str):
        if images.ndim != 3 or images.dtype != torch.uint8:
            raise ValueError(f"images must be uint8 [N, H, W], got {images.dtype} {tuple(images.shape)}")
        if labels.shape != images.shape[:1]:
            raise ValueError(f"labels {tuple(labels.shape)} do not match images {tuple(images.shape)}")
        self.images = images
        self.labels = labels
        self.split = split

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index].unsqueeze(0).to(torch.float32).div_(255.0)
        return image, int(self.labels[index])

    def get_batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Items ``indices`` at once: images float32 ``[len, 1, 28, 28]``, labels int64 ``[len]``.

        Same values as stacking ``self[i]``; one indexing op instead of a Python loop per image,
        which is what makes an MNIST epoch take seconds on a CPU.
        """
        return self.images[indices].unsqueeze(1).to(torch.float32).div_(255.0), self.labels[indices]

    def __repr__(self) -> str:
        return f"MNISTDataset(split={self.split!r}, size={len(self)})"


def load_mnist(split: str, root: str | os.PathLike | None = None) -> MNISTDataset:
    """The MNIST ``split`` ("train": 60,000 images, "test": 10,000) from ``root`` (default: vendored)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    folder = VENDORED_MNIST_DIR if root is None else Path(root).expanduser()
    images = read_idx(_find_mnist_file(folder, MNIST_FILES[(split, "images")]))
    labels = read_idx(_find_mnist_file(folder, MNIST_FILES[(split, "labels")]))
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"MNIST {split} in {folder}: {images.shape[0]} images but {labels.shape[0]} labels")
    return MNISTDataset(torch.from_numpy(images.astype(np.uint8)), torch.from_numpy(labels.astype(np.int64)), split)
