import pickle

import numpy as np
import pytest
import torch

from arq.data import (
    DATA_ROOT_ENV,
    NORMALIZATION,
    dataset_input_shape,
    dataset_normalization,
    dataset_num_classes,
    get_dataset,
)


def _write_fake_cifar(root, images_per_batch=6, protocol=2):
    """A CIFAR-10 python layout (cifar-10-batches-py/) with tiny batches of known content."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(images_per_batch, 3072), dtype=np.uint8)
        labels = [int(label) for label in rng.integers(0, 10, size=images_per_batch)]
        with open(folder / name, "wb") as handle:
            pickle.dump({b"data": data, b"labels": labels, b"batch_label": b"fake"}, handle, protocol=protocol)
        batches[name] = (data, labels)
    return batches


def test_constants():
    assert NORMALIZATION["mnist"] == ((0.1307,), (0.3081,))
    assert dataset_normalization("cifar10") == ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
    assert dataset_normalization("imagenet") == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert [dataset_num_classes(name) for name in ("mnist", "cifar10", "imagenet")] == [10, 10, 1000]
    assert dataset_input_shape("cifar10") == (3, 32, 32)
    assert dataset_input_shape("imagenet") == (3, 224, 224)
    with pytest.raises(ValueError, match="dataset must be one of"):
        dataset_num_classes("svhn")


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar10_test_split_reads_fake_batches(tmp_path, protocol):
    batches = _write_fake_cifar(tmp_path, protocol=protocol)
    test_set = get_dataset("cifar10", "test", root=tmp_path)
    data, labels = batches["test_batch"]
    assert len(test_set) == 6
    image, label = test_set[3]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    # CIFAR rows are 1024 red, 1024 green, 1024 blue values in row-major order
    expected = torch.from_numpy(data[3].reshape(3, 32, 32).astype(np.float32) / 255)
    assert torch.equal(image, expected)
    assert label == labels[3]


def test_cifar10_train_split_concatenates_and_augments(tmp_path, monkeypatch):
    batches = _write_fake_cifar(tmp_path)
    monkeypatch.setenv(DATA_ROOT_ENV, str(tmp_path))  # root from the environment
    train_set = get_dataset("cifar10", "train")
    assert len(train_set) == 30
    assert train_set.labels.tolist() == sum((batches[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    torch.manual_seed(0)
    image, _ = train_set[0]
    assert image.shape == (3, 32, 32)
    # a random crop of the zero-padded image and a flip only move pixels: every value is an
    # original pixel value or the padding's 0
    original = set(batches["data_batch_1"][0][0].tolist()) | {0}
    assert set((image * 255).round().to(torch.int64).flatten().tolist()) <= original


def test_cifar10_train_split_without_augmentation_is_the_same_image_every_time(tmp_path):
    """What certify, predict, calibration and search read (arq.cli.common.load_dataset): a row or a
    search image must not be a fresh random crop at every access."""
    batches = _write_fake_cifar(tmp_path)
    train_set = get_dataset("cifar10", "train", root=tmp_path, augment=False)
    expected = torch.from_numpy(batches["data_batch_1"][0][2].reshape(3, 32, 32).astype(np.float32) / 255)
    for _ in range(5):
        assert torch.equal(train_set[2][0], expected)
    augmented = get_dataset("cifar10", "train", root=tmp_path)
    torch.manual_seed(0)
    assert any(not torch.equal(augmented[2][0], expected) for _ in range(20))


def test_the_cli_reads_every_split_without_augmentation(tmp_path, monkeypatch):
    from arq.cli import common

    _write_fake_cifar(tmp_path)
    train_set = common.load_dataset("cifar10", "train", str(tmp_path))
    assert torch.equal(train_set[4][0], train_set[4][0])
    assert torch.equal(train_set[4][0], get_dataset("cifar10", "train", root=tmp_path, augment=False)[4][0])


def test_cifar10_missing_folder_says_where_and_how(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        get_dataset("cifar10", "test", root=tmp_path)
    message = str(error.value)
    assert str(tmp_path / "cifar-10-batches-py") in message
    assert "cifar-10-python.tar.gz" in message


def test_cifar10_without_root_or_env_names_the_variable(monkeypatch):
    monkeypatch.delenv(DATA_ROOT_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match=DATA_ROOT_ENV):
        get_dataset("cifar10", "test")


def test_cifar10_pickle_with_foreign_global_is_refused(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()

    class Exploit:
        def __reduce__(self):
            return (print, ("this must not run",))

    with open(folder / "test_batch", "wb") as handle:
        pickle.dump({b"data": Exploit(), b"labels": [0]}, handle)
    with pytest.raises(ValueError, match=r"test_batch.*builtins\.print"):
        get_dataset("cifar10", "test", root=tmp_path)


def test_imagenet_folder_test_transform(tmp_path):
    pytest.importorskip("torchvision")
    from PIL import Image

    rng = np.random.default_rng(0)
    for class_index, wnid in enumerate(["n01440764", "n01443537"]):
        class_folder = tmp_path / "imagenet" / "val" / wnid
        class_folder.mkdir(parents=True)
        for image_index in range(2):
            pixels = rng.integers(0, 256, size=(300, 400, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(class_folder / f"{image_index}.png")
    test_set = get_dataset("imagenet", "test", root=tmp_path)
    assert len(test_set) == 4
    assert [label for _, label in test_set.samples] == [0, 0, 1, 1]
    image, label = test_set[2]
    assert image.shape == (3, 224, 224) and label == 1
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    # resize 256 (shorter side 300 -> 256, 400 -> 341) then center crop 224, as locuslab does
    from torchvision.transforms import functional

    expected = functional.to_tensor(functional.center_crop(functional.resize(
        Image.open(test_set.samples[2][0]).convert("RGB"), 256), 224))
    assert torch.equal(image, expected)


def test_imagenet_missing_folder_says_where(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"imagenet.*val.*image-net\.org"):
        get_dataset("imagenet", "test", root=tmp_path)
