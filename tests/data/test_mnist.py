import gzip

import numpy as np
import pytest
import torch

from arq.data import MNIST_SHA256, VENDORED_MNIST_DIR, dataset_input_shape, get_dataset, read_idx
from arq.data.mnist import sha256_of_file

TEST_CLASS_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.mark.parametrize("file_name", sorted(MNIST_SHA256))
def test_vendored_file_has_published_sha256(file_name):
    assert sha256_of_file(VENDORED_MNIST_DIR / file_name) == MNIST_SHA256[file_name]


def test_licence_note_is_shipped():
    readme = (VENDORED_MNIST_DIR / "README.md").read_text()
    assert "CC BY-SA 3.0" in readme and "LeCun" in readme


def test_test_split_per_class_counts():
    test_set = get_dataset("mnist", "test")
    assert len(test_set) == 10_000
    assert torch.bincount(test_set.labels, minlength=10).tolist() == TEST_CLASS_COUNTS


def test_train_split_size_and_label_range():
    train_set = get_dataset("mnist", "train")
    assert len(train_set) == 60_000
    assert train_set.labels.min() == 0 and train_set.labels.max() == 9
    assert torch.bincount(train_set.labels, minlength=10).sum() == 60_000


def test_items_are_float_chw_in_unit_interval():
    test_set = get_dataset("mnist", "test")
    image, label = test_set[0]
    assert image.shape == dataset_input_shape("mnist") == (1, 28, 28)
    assert image.dtype == torch.float32
    assert label == 7  # the first MNIST test digit is a 7
    assert image.min() == 0.0 and image.max() == 1.0
    # values are k / 255 exactly, as torchvision's ToTensor gives
    assert torch.equal(image * 255, (image * 255).round())
    # MNIST's mean pixel (the normalization constant 0.1307) is reproduced on the test split
    assert abs(float(test_set.images.float().mean() / 255) - 0.1325) < 1e-3


def test_get_batch_equals_stacked_items():
    test_set = get_dataset("mnist", "test")
    indices = torch.tensor([5, 0, 9999, 17])
    images, labels = test_set.get_batch(indices)
    assert images.shape == (4, 1, 28, 28)
    for row, index in enumerate(indices.tolist()):
        image, label = test_set[index]
        assert torch.equal(images[row], image) and int(labels[row]) == label


def test_read_idx_round_trip_and_bad_magic(tmp_path):
    values = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    header = bytes([0, 0, 0x08, 3]) + np.array([2, 3, 4], dtype=">u4").tobytes()
    path = tmp_path / "tiny-idx3-ubyte.gz"
    with gzip.open(path, "wb") as handle:
        handle.write(header + values.tobytes())
    assert np.array_equal(read_idx(path), values)

    bad = tmp_path / "bad-idx"
    bad.write_bytes(b"\x01\x02\x03\x04" + bytes(10))
    with pytest.raises(ValueError, match="bad-idx.*not an IDX file"):
        read_idx(bad)

    truncated = tmp_path / "short-idx"
    truncated.write_bytes(header + values.tobytes()[:-1])
    with pytest.raises(ValueError, match="short-idx.*23 bytes|short-idx"):
        read_idx(truncated)


def test_root_without_files_names_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        get_dataset("mnist", "test", root=tmp_path)


def test_bad_split_is_named():
    with pytest.raises(ValueError, match="split"):
        get_dataset("mnist", "validation")


def test_root_expands_the_home_folder(tmp_path, monkeypatch):
    import shutil

    from arq.data.mnist import VENDORED_MNIST_DIR, load_mnist

    home = tmp_path / "home"
    shutil.copytree(VENDORED_MNIST_DIR, home / "mnist")
    monkeypatch.setenv("HOME", str(home))
    assert len(load_mnist("test", "~/mnist")) == 10_000
