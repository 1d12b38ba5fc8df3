import json

import pytest
import torch
from safetensors.torch import save_file

from arq.models import CheckpointError, get_architecture, load_checkpoint, read_metadata, save_model
from arq.models.cifar_resnet import CifarResNet


def _trained_looking(model, seed=0):
    """Give every parameter and BN buffer non-default values, so a lost tensor would show."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
    return model.eval()


def test_save_and_load_round_trip(tmp_path):
    model = _trained_looking(get_architecture("lenet", "mnist"))
    metadata = {"arch": "lenet", "dataset": "mnist", "sigma": 0.5, "clean_accuracy": 0.98, "training": {"epochs": 3}}
    path = save_model(model, tmp_path / "mnist-lenet-sigma0.50", metadata)
    assert path == tmp_path / "mnist-lenet-sigma0.50.safetensors"

    header = read_metadata(path)
    assert header["sigma"] == 0.5 and header["num_classes"] == 10
    assert header["normalization"] == {"mean": [0.1307], "std": [0.3081]}
    assert header["training"] == {"epochs": 3}

    loaded = load_checkpoint(path)
    assert not loaded.training
    assert loaded.arq_metadata["sigma"] == 0.5
    assert loaded.arq_metadata["arch"] == "lenet" and loaded.arq_metadata["dataset"] == "mnist"
    assert loaded.arq_metadata["checkpoint"] == str(path)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_save_requires_metadata_fields(tmp_path):
    model = get_architecture("lenet", "mnist")
    with pytest.raises(ValueError, match="sigma"):
        save_model(model, tmp_path / "m.safetensors", {"arch": "lenet", "dataset": "mnist"})
    with pytest.raises(ValueError, match="JSON"):
        save_model(model, tmp_path / "m.safetensors", {"arch": "lenet", "dataset": "mnist", "sigma": 0.5,
                                                      "when": object()})


def _locuslab_checkpoint(path, net, arch, prefix="1."):
    """What locuslab/smoothing's train.py writes: torch.save of a dict, keys of Sequential(norm, net)."""
    state_dict = {prefix + key: value for key, value in net.state_dict().items()}
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": 90, "arch": arch, "state_dict": state_dict, "optimizer": optimizer.state_dict()}, path)


def test_locuslab_checkpoint_loads_with_sigma_from_path(tmp_path):
    net = _trained_looking(CifarResNet(20))
    path = tmp_path / "models" / "cifar10" / "resnet20" / "noise_0.25" / "checkpoint.pth.tar"
    _locuslab_checkpoint(path, net, "cifar_resnet20")
    model = load_checkpoint(path)
    assert model.arq_metadata["sigma"] == 0.25
    assert model.arq_metadata["dataset"] == "cifar10" and model.arq_metadata["num_classes"] == 10
    assert model.arq_metadata["epoch"] == 90
    x = torch.rand(3, 3, 32, 32)
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
    std = torch.tensor([0.2023, 0.1994, 0.2010]).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(model(x), net((x - mean) / std), atol=1e-5)


def test_locuslab_data_parallel_prefix_and_sigma_override(tmp_path):
    net = _trained_looking(CifarResNet(20), seed=1)
    path = tmp_path / "checkpoint.pth.tar"
    _locuslab_checkpoint(path, net, "cifar_resnet20", prefix="1.module.")  # as its ImageNet ResNet-50
    model = load_checkpoint(path, sigma=1.0)
    assert model.arq_metadata["sigma"] == 1.0
    assert torch.equal(model.state_dict()["1.fc.weight"], net.fc.weight)

    no_sigma = load_checkpoint(path)
    assert no_sigma.arq_metadata["sigma"] is None


def test_locuslab_checkpoint_without_batchnorm_step_counters_loads(tmp_path):
    """Files saved before torch 0.4.1 have no ``num_batches_tracked``; torch's loader starts it at 0."""
    net = _trained_looking(CifarResNet(20), seed=2)
    state_dict = {"1." + key: value for key, value in net.state_dict().items() if not key.endswith("num_batches_tracked")}
    path = tmp_path / "noise_0.50" / "checkpoint.pth.tar"
    path.parent.mkdir()
    torch.save({"arch": "cifar_resnet20", "state_dict": state_dict}, path)
    model = load_checkpoint(path)
    counters = {key: value for key, value in model.state_dict().items() if key.endswith("num_batches_tracked")}
    assert counters and all(int(value) == 0 for value in counters.values())
    assert torch.equal(model.state_dict()["1.layer1.0.bn1.running_var"], net.layer1[0].bn1.running_var)
    x = torch.rand(2, 3, 32, 32)
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
    std = torch.tensor([0.2023, 0.1994, 0.2010]).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(model(x), net((x - mean) / std), atol=1e-5)


def test_checkpoint_that_does_not_fit_lists_keys(tmp_path):
    net = CifarResNet(20)
    state_dict = {"1." + key: value for key, value in net.state_dict().items() if not key.startswith("fc.")}
    state_dict["1.extra.weight"] = torch.zeros(3)
    state_dict["1.conv1.weight"] = torch.zeros(16, 3, 5, 5)
    path = tmp_path / "checkpoint.pth.tar"
    torch.save({"arch": "cifar_resnet20", "state_dict": state_dict}, path)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    message = str(error.value)
    assert str(path) in message
    assert "missing keys: 1.fc.bias, 1.fc.weight" in message
    assert "unexpected keys: 1.extra.weight" in message
    assert "1.conv1.weight: file (16, 3, 5, 5) vs model (16, 3, 3, 3)" in message


def test_safetensors_of_wrong_architecture_lists_keys(tmp_path):
    model = get_architecture("mnist_resnet", "mnist")
    path = save_model(model, tmp_path / "m", {"arch": "lenet", "dataset": "mnist", "sigma": 0.25})
    with pytest.raises(CheckpointError, match=r"m\.safetensors does not fit architecture 'lenet': missing keys: 1\.conv1\.bias"):
        load_checkpoint(path)


def test_corrupt_files_are_named(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="garbage.pth"):
        load_checkpoint(garbage)

    truncated = tmp_path / "truncated.safetensors"
    good = save_model(get_architecture("lenet", "mnist"), tmp_path / "good", {"arch": "lenet", "dataset": "mnist", "sigma": 0.25})
    truncated.write_bytes(good.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="truncated.safetensors"):
        load_checkpoint(truncated)

    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(CheckpointError, match="plain.safetensors has no 'arq' metadata"):
        load_checkpoint(plain)

    with pytest.raises(FileNotFoundError, match="nothing.pt"):
        load_checkpoint(tmp_path / "nothing.pt")


class _NotATensor:
    pass


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pth.tar"
    torch.save({"arch": "lenet", "state_dict": {}, "payload": _NotATensor()}, path)
    with pytest.raises(CheckpointError, match="evil.pth.tar.*weights_only=True"):
        load_checkpoint(path)


def test_unknown_arch_is_named(tmp_path):
    path = tmp_path / "checkpoint.pth.tar"
    torch.save({"arch": "wide_resnet", "state_dict": {}}, path)
    with pytest.raises(CheckpointError, match="'wide_resnet'"):
        load_checkpoint(path)


def test_metadata_header_is_plain_json(tmp_path):
    from safetensors import safe_open

    path = save_model(get_architecture("lenet", "mnist"), tmp_path / "m",
                      {"arch": "lenet", "dataset": "mnist", "sigma": 1.0})
    with safe_open(str(path), framework="pt") as handle:
        header = handle.metadata()
    assert json.loads(header["arq"])["sigma"] == 1.0
    assert json.loads(header["arq"])["format_version"] == 1


def test_files_that_are_not_checkpoints_are_named(tmp_path):
    """A text file made torch.load raise KeyError, and a state dict holding a number an AttributeError."""
    notes = tmp_path / "notes.txt"
    notes.write_text("hello world\n")
    with pytest.raises(CheckpointError, match="notes.txt is neither"):
        load_checkpoint(notes)
    odd = tmp_path / "odd.pth"
    state = get_architecture("lenet", "mnist").state_dict()
    state["fc3.bias"] = 5
    torch.save({"arch": "lenet", "state_dict": state, "arq_metadata": {"arch": "lenet", "dataset": "mnist"}}, odd)
    with pytest.raises(CheckpointError, match="odd.pth: the state dict must map names to tensors; not so for 'fc3.bias'"):
        load_checkpoint(odd)
