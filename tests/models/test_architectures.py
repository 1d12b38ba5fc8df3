import pytest
import torch
from torch import nn

from arq.models import ARCHITECTURES, NormalizeLayer, get_architecture, num_classes_of
from arq.models.cifar_resnet import CifarResNet

# Parameter counts of the published networks (He et al. 2016 report 0.27M for ResNet-20 and
# 1.7M for ResNet-110; torchvision's ResNet-50 has 25,557,032).
PARAMETER_COUNTS = {
    "cifar_resnet20": 272_474,
    "cifar_resnet32": 466_906,
    "cifar_resnet56": 855_770,
    "cifar_resnet110": 1_730_714,
    "lenet": 44_426,
    "mnist_resnet": 19_706,
}


def _parameter_count(model):
    return sum(parameter.numel() for parameter in model.parameters())


@pytest.mark.parametrize("arch", sorted(PARAMETER_COUNTS))
def test_parameter_counts_and_output_shape(arch):
    dataset = "mnist" if arch in ("lenet", "mnist_resnet") else "cifar10"
    model = get_architecture(arch, dataset).eval()
    assert _parameter_count(model) == PARAMETER_COUNTS[arch]
    shape = (1, 28, 28) if dataset == "mnist" else (3, 32, 32)
    with torch.no_grad():
        logits = model(torch.rand(2, *shape))
    assert logits.shape == (2, 10)
    assert num_classes_of(model) == 10


@pytest.mark.slow  # builds a 25M-parameter network
def test_resnet50_is_torchvisions():
    pytest.importorskip("torchvision")
    model = get_architecture("resnet50", "imagenet")
    assert _parameter_count(model) == 25_557_032
    assert num_classes_of(model) == 1000
    assert "1.layer4.2.conv3.weight" in model.state_dict()


def test_layout_is_normalize_then_net_with_locuslab_keys():
    model = get_architecture("cifar_resnet110", "cifar10")
    assert isinstance(model, nn.Sequential) and isinstance(model[0], NormalizeLayer)
    keys = list(model.state_dict())
    # normalization constants are not state: locuslab checkpoints have only "1." keys
    assert all(key.startswith("1.") for key in keys)
    for key in ("1.conv1.weight", "1.bn1.running_mean", "1.layer1.17.conv2.weight",
                "1.layer2.0.downsample.0.weight", "1.layer2.0.downsample.1.running_var", "1.fc.bias"):
        assert key in keys
    assert sum(1 for key in keys if key.endswith("conv1.weight") or key.endswith("conv2.weight")) == 109


def test_normalize_layer_math():
    layer = NormalizeLayer([0.5, 0.25], [0.5, 2.0])
    x = torch.tensor([1.0, 0.0, 0.5, 0.25]).view(1, 1, 2, 2).repeat(1, 2, 1, 1)
    out = layer(x)
    assert torch.allclose(out[0, 0], torch.tensor([[1.0, -1.0], [0.0, -0.5]]))
    assert torch.allclose(out[0, 1], torch.tensor([[0.375, -0.125], [0.125, 0.0]]))
    assert layer.state_dict() == {}
    with pytest.raises(ValueError, match=r"\[B, 2, H, W\]"):
        layer(torch.rand(1, 3, 2, 2))
    with pytest.raises(ValueError, match="std must be positive"):
        NormalizeLayer([0.0], [0.0])


def test_mnist_normalization_constants_in_first_layer():
    model = get_architecture("lenet", "mnist")
    assert model[0].mean_values == [0.1307] and model[0].std_values == [0.3081]
    x = torch.full((1, 1, 28, 28), 0.1307)
    assert torch.allclose(model[0](x), torch.zeros_like(x), atol=1e-7)


def test_cifar_resnet_depth_rule_and_stage_shapes():
    with pytest.raises(ValueError, match="depth must be 6n"):
        CifarResNet(21)
    net = CifarResNet(20)
    assert [len(stage) for stage in (net.layer1, net.layer2, net.layer3)] == [3, 3, 3]
    features = net.layer3(net.layer2(net.layer1(net.conv1(torch.rand(1, 3, 32, 32)))))
    assert features.shape == (1, 64, 8, 8)


def test_registry_errors_name_the_parameter():
    with pytest.raises(ValueError, match="arch must be one of"):
        get_architecture("vgg16", "cifar10")
    with pytest.raises(ValueError, match=r"'lenet' is built for dataset mnist"):
        get_architecture("lenet", "cifar10")
    with pytest.raises(ValueError, match="num_classes"):
        get_architecture("lenet", "mnist", num_classes=1)
    assert set(ARCHITECTURES) >= {"cifar_resnet20", "cifar_resnet110", "resnet50", "lenet", "mnist_resnet"}


def test_num_classes_of_prefers_metadata_and_fails_clearly():
    model = get_architecture("lenet", "mnist", num_classes=7)
    assert num_classes_of(model) == 7
    model.arq_metadata = {"num_classes": 5}
    assert num_classes_of(model) == 5
    with pytest.raises(ValueError, match="number of classes"):
        num_classes_of(nn.Sequential(nn.Conv2d(1, 2, 3)))
