import json

import pytest
import torch

from arq import zoo
from arq.cli import zoo as zoo_cli
from arq.data import get_dataset
from arq.models import get_architecture, save_model

SHIPPED = ["mnist-lenet-sigma0.25", "mnist-lenet-sigma0.50", "mnist-lenet-sigma1.00"]
# Lowest noisy test accuracy each shipped model must keep (docs/zoo.md has the measured values).
NOISY_ACCURACY_FLOOR = {"mnist-lenet-sigma0.25": 0.97, "mnist-lenet-sigma0.50": 0.94, "mnist-lenet-sigma1.00": 0.80}


def test_names_are_the_shipped_models():
    assert zoo.names() == SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_model_metadata_and_size(name):
    metadata = zoo.info(name)
    assert metadata["sigma"] == float(name.split("sigma")[1])
    assert metadata["arch"] == "lenet" and metadata["dataset"] == "mnist" and metadata["num_classes"] == 10
    assert metadata["training"]["sigma"] == metadata["sigma"]
    assert metadata["noisy_accuracy"] >= NOISY_ACCURACY_FLOOR[name]
    assert metadata["clean_accuracy"] >= metadata["noisy_accuracy"] - 0.01
    assert zoo.path_of(name).stat().st_size < 300_000  # small enough to ship in the wheel


@pytest.mark.slow  # 20,000 forward passes per model
@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_model_reproduces_its_accuracies(name):
    """Recompute the recorded test accuracies the way arq.train measured them."""
    model = zoo.load(name)
    metadata = model.arq_metadata
    assert not model.training
    test_set = get_dataset("mnist", "test")
    noise = torch.Generator().manual_seed(metadata["training"]["seed"] + 2)
    batch = max(metadata["training"]["batch_size"], 500)
    clean_correct = noisy_correct = 0
    with torch.no_grad():
        for start in range(0, len(test_set), batch):
            images, labels = test_set.get_batch(torch.arange(start, min(start + batch, len(test_set))))
            clean_correct += int((model(images).argmax(1) == labels).sum())
            noisy = images + metadata["sigma"] * torch.randn(images.shape, generator=noise)
            noisy_correct += int((model(noisy).argmax(1) == labels).sum())
    # a few borderline logits may round differently with another thread count or CPU
    assert abs(clean_correct / len(test_set) - metadata["clean_accuracy"]) <= 0.002
    assert abs(noisy_correct / len(test_set) - metadata["noisy_accuracy"]) <= 0.002


def test_unknown_name_lists_the_zoo():
    with pytest.raises(ValueError, match=r"no zoo model named 'mnist-lenet-sigma0.12'; the zoo has: mnist-lenet-sigma0.25"):
        zoo.load("mnist-lenet-sigma0.12")


def test_zoo_reads_whatever_weights_folder_holds(tmp_path, monkeypatch):
    monkeypatch.setattr(zoo, "WEIGHTS_DIR", tmp_path)
    assert zoo.names() == []
    model = get_architecture("mnist_resnet", "mnist")
    save_model(model, tmp_path / "mnist-mnist_resnet-sigma0.12", {"arch": "mnist_resnet", "dataset": "mnist",
                                                                  "sigma": 0.12, "clean_accuracy": 0.5})
    assert zoo.names() == ["mnist-mnist_resnet-sigma0.12"]
    assert zoo.load("mnist-mnist_resnet-sigma0.12").arq_metadata["sigma"] == 0.12


def test_arq_policy_is_read_when_shipped(tmp_path, monkeypatch):
    shipped = zoo.arq_policy("mnist-lenet-sigma0.25")
    assert shipped is not None and shipped.to_haq(zoo.load("mnist-lenet-sigma0.25")) == [
        [3, 4], [4, 3], [6, 6], [7, 7], [4, 4]]
    assert zoo.arq_policy("mnist-lenet-sigma0.50") is None  # none searched for it yet
    monkeypatch.setattr(zoo, "WEIGHTS_DIR", tmp_path)
    save_model(get_architecture("lenet", "mnist"), tmp_path / "mnist-lenet-sigma0.25",
               {"arch": "lenet", "dataset": "mnist", "sigma": 0.25})
    layers = {"1.conv1": {"w_bits": 8, "a_bits": 32}, "1.fc3": {"w_bits": 4, "a_bits": 6}}
    (tmp_path / "mnist-lenet-sigma0.25.arq-policy.json").write_text(json.dumps({"format_version": 1, "layers": layers}))
    policy = zoo.arq_policy("mnist-lenet-sigma0.25")
    assert policy.to_dict()["layers"] == layers
    assert zoo.names() == ["mnist-lenet-sigma0.25"]  # the policy file is not a model


def test_cli_table_and_json(capsys):
    assert zoo_cli.main([]) == 0
    table = capsys.readouterr().out
    for name in SHIPPED:
        metadata = zoo.info(name)
        assert name in table
        assert f"{100 * metadata['noisy_accuracy']:.2f}%" in table
    assert zoo_cli.main(["--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [row["name"] for row in rows] == SHIPPED
    assert [row["sigma"] for row in rows] == [0.25, 0.5, 1.0]


def test_cli_parser_wiring():
    import argparse

    parser = argparse.ArgumentParser(prog="arq")
    subparsers = parser.add_subparsers(dest="command")
    zoo_cli.add_parser(subparsers)
    from arq.cli import train as train_cli

    train_cli.add_parser(subparsers)
    args = parser.parse_args(["train", "--dataset", "mnist", "--arch", "lenet", "--sigma", "0.5", "--out", "x",
                              "--lr-schedule", "cosine", "--resume"])
    assert args.run is train_cli.run and args.sigma == 0.5 and args.resume and args.lr_schedule == "cosine"
    assert parser.parse_args(["zoo", "--json"]).run is zoo_cli.run


def test_a_changed_zoo_file_is_refused(tmp_path, monkeypatch):
    """Its metadata would still claim the shipped model's accuracies: the shipped sha256 is checked."""
    import shutil

    for file_name in ("SHA256SUMS", "mnist-lenet-sigma0.25.safetensors"):
        shutil.copy(zoo.WEIGHTS_DIR / file_name, tmp_path / file_name)
    monkeypatch.setattr(zoo, "WEIGHTS_DIR", tmp_path)
    assert zoo.load("mnist-lenet-sigma0.25").arq_metadata["sigma"] == 0.25
    path = tmp_path / "mnist-lenet-sigma0.25.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # one bit of the last weight
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="the zoo file was changed"):
        zoo.load("mnist-lenet-sigma0.25")


def test_the_shipped_sha256_list_covers_every_shipped_model():
    import hashlib

    listed = dict(reversed(line.split()) for line in (zoo.WEIGHTS_DIR / "SHA256SUMS").read_text().splitlines())
    assert sorted(name.removesuffix(".safetensors") for name in listed) == zoo.names()
    for name, digest in listed.items():
        assert hashlib.sha256((zoo.WEIGHTS_DIR / name).read_bytes()).hexdigest() == digest


def test_the_cli_names_a_changed_zoo_file_without_a_traceback(tmp_path, monkeypatch, capsys):
    import shutil

    from arq.cli.main import main

    for file_name in ("SHA256SUMS", "mnist-lenet-sigma0.25.safetensors"):
        shutil.copy(zoo.WEIGHTS_DIR / file_name, tmp_path / file_name)
    path = tmp_path / "mnist-lenet-sigma0.25.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    monkeypatch.setattr(zoo, "WEIGHTS_DIR", tmp_path)
    assert main(["certify", "mnist", "mnist-lenet-sigma0.25", str(tmp_path / "out.tsv"), "--N", "10", "--N0", "5",
                 "--max", "1"]) == 2
    assert "MODEL mnist-lenet-sigma0.25:" in capsys.readouterr().err and not (tmp_path / "out.tsv").exists()
