import json

import pytest
from torch import nn

from arq.quant import LayerBits, Policy, quantizable_layers
from quant_nets import cifar_resnet


def test_quantizable_layers_lists_every_conv_and_linear_in_module_order():
    model = cifar_resnet(20)
    names = [name for name, _ in quantizable_layers(model)]
    # ResNet-20: 1 stem conv + 18 block convs + 2 shortcut convs + fc
    assert len(names) == 22
    assert names[0] == "1.conv1" and names[-1] == "1.fc"
    assert names[1:4] == ["1.layer1.0.conv1", "1.layer1.0.conv2", "1.layer1.1.conv1"]
    assert "1.layer2.0.downsample.0" in names


def test_uniform_policy_and_haq_round_trip():
    model = cifar_resnet(20)
    policy = Policy.uniform(model, 4, 6)
    assert len(policy) == 22 and all(bits == LayerBits(4, 6) for _, bits in policy.items())
    strategy = [[2 + i % 7, 8 - i % 7] for i in range(22)]
    strategy[0] = [8, 32]  # HAQ's float input to the first layer
    converted = Policy.from_haq(model, strategy)
    assert converted["1.conv1"] == LayerBits(8, 32)
    assert converted["1.fc"] == LayerBits(*strategy[-1])
    assert converted.to_haq(model) == strategy


def test_save_load_json_round_trip(tmp_path):
    model = cifar_resnet(20)
    policy = Policy.from_haq(model, [[3 + i % 5, 4 + i % 4] for i in range(22)])
    path = tmp_path / "policy.json"
    policy.save(path)
    data = json.loads(path.read_text())
    assert data["layers"]["1.conv1"] == {"w_bits": 3, "a_bits": 4}
    assert Policy.load(path) == policy
    assert list(Policy.load(path).layers) == list(policy.layers)  # order kept


@pytest.mark.parametrize("w_bits,a_bits,parameter", [(1, 8, "w_bits"), (9, 8, "w_bits"), (8, 16, "a_bits"), (4, 0, "a_bits")])
def test_bits_out_of_range_name_the_parameter(w_bits, a_bits, parameter):
    with pytest.raises(ValueError, match=parameter):
        LayerBits(w_bits, a_bits)


def test_bits_must_be_integers():
    with pytest.raises(TypeError, match="w_bits"):
        LayerBits(4.0, 4)


def test_unknown_and_missing_layers_are_reported():
    model = cifar_resnet(20)
    layers = dict(Policy.uniform(model, 4, 4).layers)
    layers["1.conv_typo"] = LayerBits(4, 4)
    with pytest.raises(ValueError, match="conv_typo"):
        Policy(layers).validate(model)
    del layers["1.conv_typo"], layers["1.fc"]
    with pytest.raises(ValueError, match=r"misses .*1\.fc"):
        Policy(layers).validate(model)
    # a BatchNorm is not a quantizable layer
    layers["1.fc"] = LayerBits(8, 8)
    layers["1.bn1"] = LayerBits(8, 8)
    with pytest.raises(ValueError, match="1.bn1"):
        Policy(layers).validate(model)


def test_from_haq_checks_length_and_values():
    model = cifar_resnet(20)
    with pytest.raises(ValueError, match="22 quantizable layers"):
        Policy.from_haq(model, [[4, 4]] * 21)
    bad = [[4, 4]] * 22
    bad[5] = [4, 1]
    with pytest.raises(ValueError, match=r"strategy\[5\].*a_bits"):
        Policy.from_haq(model, bad)


def test_load_rejects_bad_json(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        Policy.load(path)
    path.write_text(json.dumps({"layers": {"a": {"w_bits": 4, "a_bits": 33}}}))
    with pytest.raises(ValueError, match=r"layers\['a'\].*a_bits"):
        Policy.load(path)


def test_uniform_needs_a_quantizable_layer():
    with pytest.raises(ValueError, match="no Conv2d or Linear"):
        Policy.uniform(nn.Sequential(nn.ReLU()), 4, 4)


def test_from_haq_takes_whole_numbers_and_refuses_the_rest():
    import numpy as np

    model = cifar_resnet(20)
    strategy = [[4, 4]] * 22
    strategy[0] = [8.0, np.int64(6)]  # floats with an integer value (JSON, numpy) and numpy integers
    strategy[1] = np.array([3, 5])  # a numpy row
    policy = Policy.from_haq(model, strategy)
    names = [name for name, _ in quantizable_layers(model)]
    assert policy[names[0]] == LayerBits(8, 6) and policy[names[1]] == LayerBits(3, 5)
    assert all(type(policy[name].w_bits) is int and type(policy[name].a_bits) is int for name in names)
    for index, entry, error, message in [
        (2, [4.7, 4], ValueError, r"strategy\[2\] \(1.layer1.0.conv2\): w_bits must be a whole number of bits, got 4.7"),
        (3, [4, True], TypeError, r"strategy\[3\] .*a_bits must be an int, got a bool \(True\)"),
        (4, [None, 4], TypeError, r"strategy\[4\] .*w_bits must be an int, got NoneType"),
        (5, [4, "4"], TypeError, r"strategy\[5\] .*a_bits must be an int, got str"),
        (6, [4, float("nan")], ValueError, r"strategy\[6\] .*a_bits must be a whole number of bits, got nan"),
        (7, 4, TypeError, r"strategy\[7\] \(.*\) must be a \[w_bit, a_bit\] pair, got 4"),
        (8, [4, 4, 4], ValueError, r"strategy\[8\] \(.*\) must be a \[w_bit, a_bit\] pair"),
        (9, [4.0, 1.0], ValueError, r"strategy\[9\] .*a_bits must be in 2..8 or 32"),
    ]:
        bad = [[4, 4]] * 22
        bad[index] = entry
        with pytest.raises(error, match=message):
            Policy.from_haq(model, bad)



def test_unsupported_format_version_is_quoted():
    with pytest.raises(ValueError, match=r"unsupported policy format_version '1' \(expected 1\)"):
        Policy.from_dict({"format_version": "1", "layers": {}})


def test_from_haq_takes_a_tensor_strategy():
    import torch

    model = cifar_resnet(20)
    count = len(quantizable_layers(model))
    policy = Policy.from_haq(model, torch.full((count, 2), 8))
    assert policy.to_haq(model) == [[8, 8]] * count
