import argparse

import pytest
import torch

import arq.quant as quant
from arq.cli import quantize as quantize_cli
from quant_nets import cifar_resnet


def _parser():
    parser = argparse.ArgumentParser(prog="arq")
    quantize_cli.add_parser(parser.add_subparsers(dest="command"))
    return parser


@pytest.fixture
def tiny_world(monkeypatch):
    """The CLI's model and data set loaders replaced by a ResNet-20 and 40 random images."""
    from arq.cli import common

    model = cifar_resnet(20)
    generator = torch.Generator().manual_seed(0)
    dataset = [(torch.rand(3, 32, 32, generator=generator), i % 10) for i in range(40)]
    monkeypatch.setattr(common, "load_model", lambda spec: model)
    monkeypatch.setattr(common, "load_dataset", lambda name, split, root: dataset)
    return model


def test_cli_quantizes_with_a_policy_and_finetunes(tmp_path, tiny_world, capsys):
    model = tiny_world
    policy = quant.Policy.from_haq(model, [[8, 32]] + [[4, 4]] * 20 + [[8, 8]])
    policy.save(tmp_path / "policy.json")
    out = tmp_path / "q.safetensors"
    args = _parser().parse_args([
        "quantize", "--model", "m", "--policy", str(tmp_path / "policy.json"), "--out", str(out),
        "--calibration-size", "16", "--finetune-epochs", "2", "--batch", "20", "--lr", "0.05", "--device", "cpu",
    ])
    assert args.run(args) == 0
    loaded = quant.load(out, model=cifar_resnet(20))
    assert loaded.arq_quant["policy"] == policy
    assert quant.Policy.load(tmp_path / "q.policy.json") == policy
    printed = capsys.readouterr().out
    report = quant.bitops(model, policy, (3, 32, 32))
    assert f"{100 * report.fraction_of_fp32:.3f} % of FP32" in printed
    # the same run without fine-tuning gives other weights: fine-tuning ran
    plain_out = tmp_path / "plain.safetensors"
    args = _parser().parse_args([
        "quantize", "--model", "m", "--policy", str(tmp_path / "policy.json"), "--out", str(plain_out),
        "--calibration-size", "16", "--device", "cpu",
    ])
    assert args.run(args) == 0
    plain = quant.load(plain_out, model=cifar_resnet(20))
    tuned_layer = dict(quant.quantizable_layers(loaded))["1.layer1.0.conv1"]
    plain_layer = dict(quant.quantizable_layers(plain))["1.layer1.0.conv1"]
    # four SGD steps at lr 0.05 move some 4-bit weight codes
    assert not torch.equal(tuned_layer.integer_weight(), plain_layer.integer_weight())
    # activation ranges come from calibration, which fine-tuning leaves as it was
    assert float(tuned_layer.input_quantizer.scale) == float(plain_layer.input_quantizer.scale) > 0


def test_cli_uniform_bits_and_errors(tmp_path, tiny_world):
    from arq.cli.common import CommandError

    out = tmp_path / "u.safetensors"
    args = _parser().parse_args(["quantize", "--model", "m", "--uniform", "3", "5", "--out", str(out),
                                 "--calibration-size", "8", "--device", "cpu"])
    assert args.run(args) == 0
    assert set(b.to_list() == [3, 5] for _, b in quant.load(out, model=cifar_resnet(20)).arq_quant["policy"].items()) == {True}
    bad = _parser().parse_args(["quantize", "--model", "m", "--uniform", "3", "9", "--out", str(out)])
    with pytest.raises(CommandError, match="a_bits"):
        bad.run(bad)
    missing = _parser().parse_args(["quantize", "--model", "m", "--policy", str(tmp_path / "none.json"), "--out", str(out)])
    with pytest.raises(CommandError, match="none.json"):
        missing.run(missing)


def test_cli_quantizes_the_residual_stream(tmp_path, tiny_world):
    from arq.cli.common import CommandError

    out = tmp_path / "r.safetensors"
    args = _parser().parse_args(["quantize", "--model", "m", "--uniform", "4", "4", "--residual-bits", "8",
                                 "--out", str(out), "--calibration-size", "8", "--device", "cpu"])
    assert args.run(args) == 0
    loaded = quant.load(out, model=cifar_resnet(20))
    assert loaded.arq_quant["config"].residual_bits == 8
    assert sum(name.endswith("residual_quantizer") for name, _ in loaded.named_modules()) == 9
    assert sum(name.endswith("shortcut_quantizer") for name, _ in loaded.named_modules()) == 3
    floats = tmp_path / "f.safetensors"
    args = _parser().parse_args(["quantize", "--model", "m", "--uniform", "4", "4", "--residual-bits", "8",
                                 "--float-shortcuts", "--out", str(floats), "--calibration-size", "8",
                                 "--device", "cpu"])
    assert args.run(args) == 0
    loaded = quant.load(floats, model=cifar_resnet(20))
    assert not loaded.arq_quant["config"].residual_shortcuts
    assert not any(name.endswith("shortcut_quantizer") for name, _ in loaded.named_modules())
    bad = _parser().parse_args(["quantize", "--model", "m", "--uniform", "4", "4", "--residual-bits", "9",
                                "--out", str(out), "--device", "cpu"])
    with pytest.raises(CommandError, match="residual_bits"):
        bad.run(bad)


@pytest.fixture
def plain_world(monkeypatch):
    """A conv net without residual blocks; the data set loader records that it was called."""
    from arq.cli import common

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 6 * 6, 10)).eval()
    model.arq_metadata = {"sigma": 0.25, "dataset": "cifar10"}
    generator = torch.Generator().manual_seed(0)
    dataset = [(torch.rand(3, 8, 8, generator=generator), i % 10) for i in range(16)]
    calls = []
    state = {"model": model}
    monkeypatch.setattr(common, "load_model", lambda spec: state["model"])
    monkeypatch.setattr(common, "load_dataset", lambda name, split, root: calls.append(name) or dataset)
    return state, calls


def test_cli_refuses_residual_bits_without_residual_blocks_before_any_work(tmp_path, plain_world):
    from arq.cli.common import CommandError

    _, calls = plain_world
    args = _parser().parse_args(["quantize", "--model", "m", "--uniform", "4", "4", "--residual-bits", "5",
                                 "--out", str(tmp_path / "q.safetensors"), "--device", "cpu"])
    with pytest.raises(CommandError, match=r"--residual-bits 5: the model has no residual block"):
        args.run(args)
    assert calls == []  # refused before the data set was loaded


def test_cli_refuses_an_already_quantized_model(tmp_path, plain_world):
    from arq.cli.common import CommandError

    state, calls = plain_world
    state["model"] = quant.quantize(state["model"], quant.Policy.uniform(state["model"], 4, 4), torch.rand(4, 3, 8, 8))
    args = _parser().parse_args(["quantize", "--model", "q.safetensors", "--uniform", "4", "4",
                                 "--out", str(tmp_path / "q.safetensors"), "--device", "cpu"])
    with pytest.raises(CommandError, match="--model q.safetensors is already quantized"):
        args.run(args)
    assert calls == []


def test_cli_out_folder_is_created_or_refused_before_any_work(tmp_path, plain_world):
    from arq.cli.common import CommandError

    _, calls = plain_world
    out = tmp_path / "new" / "sub" / "q.safetensors"
    args = _parser().parse_args(["quantize", "--model", "m", "--uniform", "4", "4", "--out", str(out),
                                 "--calibration-size", "8", "--device", "cpu"])
    assert args.run(args) == 0
    assert out.is_file() and (tmp_path / "new" / "sub" / "q.policy.json").is_file()
    calls.clear()
    (tmp_path / "file").write_text("not a folder")
    for bad, message in [(tmp_path / "file" / "q.safetensors", "cannot create its folder"),
                         (tmp_path / "new", "is a directory")]:
        args = _parser().parse_args(["quantize", "--model", "m", "--uniform", "4", "4", "--out", str(bad),
                                     "--device", "cpu"])
        with pytest.raises(CommandError, match=message):
            args.run(args)
    assert calls == []


def test_cli_reports_quantize_and_save_errors_as_command_errors(tmp_path, plain_world, monkeypatch):
    from arq.cli.common import CommandError

    def failing_save(qmodel, path):
        from safetensors import SafetensorError
        raise SafetensorError("Error while serializing: I/O error")

    monkeypatch.setattr(quant, "save", failing_save)
    args = _parser().parse_args(["quantize", "--model", "m", "--uniform", "4", "4", "--calibration-size", "8",
                                 "--out", str(tmp_path / "q.safetensors"), "--device", "cpu"])
    with pytest.raises(CommandError, match="--out .*q.safetensors: cannot write it: Error while serializing"):
        args.run(args)

    def failing_quantize(*args, **kwargs):
        raise ValueError("layer 'aux' was never called")

    monkeypatch.setattr(quant, "quantize", failing_quantize)
    with pytest.raises(CommandError, match="quantize: layer 'aux' was never called"):
        args.run(args)
