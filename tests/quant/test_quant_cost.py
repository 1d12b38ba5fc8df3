import pytest
from torch import nn

from arq.quant import LayerBits, Policy, bitops
from quant_nets import cifar_resnet

# Hand count for ResNet-20 (1x1 shortcuts), per 32x32 image:
# stem 16*27*1024; stage 1: 6 convs 16*144*1024; stage 2: 32*144*256 + 5 * 32*288*256 + shortcut 32*16*256;
# stage 3: 64*288*64 + 5 * 64*576*64 + shortcut 64*32*64; fc 64*10.
RESNET20_MACS = (
    16 * 27 * 1024 + 6 * 16 * 144 * 1024
    + 32 * 144 * 256 + 5 * 32 * 288 * 256 + 32 * 16 * 256
    + 64 * 288 * 64 + 5 * 64 * 576 * 64 + 64 * 32 * 64
    + 64 * 10
)


def test_resnet20_macs_match_the_hand_count():
    report = bitops(cifar_resnet(20), None, (3, 32, 32))
    assert RESNET20_MACS == 40_813_184
    assert report.total_macs == RESNET20_MACS
    assert report.total_macs / 1e6 == pytest.approx(40.8, abs=0.05)
    assert report.macs_per_layer["1.conv1"] == 16 * 27 * 1024
    assert report.macs_per_layer["1.layer2.0.downsample.0"] == 32 * 16 * 256
    assert report.macs_per_layer["1.fc"] == 640
    assert report.fraction_of_fp32 == 1.0


def test_resnet110_macs():
    report = bitops(cifar_resnet(110), None, (3, 32, 32))
    assert report.total_macs / 1e6 == pytest.approx(253.1, abs=0.05)


def test_arq_models_resnet_if_available():
    registry = pytest.importorskip("arq.models")
    model = registry.get_architecture("cifar_resnet20", "cifar10")
    assert bitops(model, None, (3, 32, 32)).total_macs == RESNET20_MACS


def test_uniform_4_bit_is_1_5625_percent_and_mixed_is_the_weighted_sum():
    model = cifar_resnet(20)
    uniform = bitops(model, Policy.uniform(model, 4, 4), (3, 32, 32))
    assert uniform.fraction_of_fp32 == 16 / 1024 == 0.015625
    assert uniform.total_bitops == RESNET20_MACS * 16
    assert uniform.gbops == pytest.approx(RESNET20_MACS * 16 / 1e9)
    layers = Policy.uniform(model, 4, 4).layers
    layers["1.conv1"] = LayerBits(8, 32)
    layers["1.fc"] = LayerBits(8, 8)
    mixed = bitops(model, Policy(layers), (1, 3, 32, 32))
    expected = (RESNET20_MACS - 16 * 27 * 1024 - 640) * 16 + 16 * 27 * 1024 * 256 + 640 * 64
    assert mixed.total_bitops == expected
    assert mixed.fraction_of_fp32 == pytest.approx(expected / (RESNET20_MACS * 1024))


def test_packed_size_in_bytes():
    model = nn.Sequential(nn.Conv2d(3, 5, 3, bias=False), nn.Flatten(), nn.Linear(5 * 6 * 6, 7))
    policy = Policy({"0": LayerBits(3, 8), "2": LayerBits(32, 32)})
    report = bitops(model, policy, (3, 8, 8))
    conv, linear = report.layers
    # conv: K = 27 values at 3 bits = 10 a word -> 3 words a row, 5 rows; 5 float scales; no bias
    assert conv.packed_bytes == 5 * 3 * 4 + 5 * 4
    # float linear: weight and bias in float32
    assert linear.packed_bytes == 7 * 180 * 4 + 7 * 4
    assert conv.macs == 5 * 36 * 27 and linear.macs == 7 * 180
    assert report.model_bytes == conv.packed_bytes + linear.packed_bytes
    fp32 = bitops(model, None, (3, 8, 8))
    assert fp32.layers[0].packed_bytes == 5 * 27 * 4


def test_bad_input_shape_and_policy():
    model = cifar_resnet(20)
    with pytest.raises(ValueError, match="input_shape"):
        bitops(model, None, (32, 32))
    with pytest.raises(TypeError, match="policy"):
        bitops(model, {"1.conv1": (4, 4)}, (3, 32, 32))


def test_a_linear_models_sample_shape_may_omit_the_batch():
    model = nn.Sequential(nn.Linear(784, 100), nn.ReLU(), nn.Linear(100, 10))
    policy = Policy.uniform(model, 4, 4)
    assert bitops(model, policy, (784,)).total_bitops == bitops(model, policy, (1, 784)).total_bitops
    assert bitops(model, policy, (784,)).fraction_of_fp32 == 16 / 1024


def test_grouped_dilated_strided_convs_and_haq_first_last_bits_match_the_hand_count():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1),                          # 17x17 -> 9x9
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=8),              # depthwise, 9x9 -> 9x9
        nn.Conv2d(8, 12, (1, 3), stride=(1, 2), padding=(0, 1), groups=4),  # 9x9 -> 9x5, 2 inputs a group
        nn.Flatten(), nn.Linear(12 * 9 * 5, 10),
    )
    # MACs = H_out W_out C_out (C_in / groups) KH KW; a Linear out x in
    hand = {"0": 9 * 9 * 8 * 3 * 9, "2": 9 * 9 * 8 * 1 * 9, "3": 9 * 5 * 12 * 2 * 3, "5": 10 * 540}
    assert bitops(model, None, (3, 17, 17)).macs_per_layer == hand
    # HAQ's pinned layers: first 8-bit weights with a float input (8 x 32), last 8/8
    policy = Policy({"0": LayerBits(8, 32), "2": LayerBits(4, 4), "3": LayerBits(4, 4), "5": LayerBits(8, 8)})
    report = bitops(model, policy, (3, 17, 17))
    expected = hand["0"] * 8 * 32 + (hand["2"] + hand["3"]) * 16 + hand["5"] * 64
    assert report.total_bitops == expected
    assert report.fraction_of_fp32 == expected / (sum(hand.values()) * 32 * 32)
