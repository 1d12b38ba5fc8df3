"""Small networks for the quantization tests (independent of arq.models, which lands separately)."""
from __future__ import annotations

import torch
from torch import nn


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel: the first layer of every arq model."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.downsample = None
        if stride != 1 or in_channels != channels:
            # option B of He et al.: 1x1 convolution shortcut (counts in the MACs)
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride, bias=False), nn.BatchNorm2d(channels)
            )

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + shortcut)


class CifarResNet(nn.Module):
    """CIFAR ResNet of depth 6n + 2 (ResNet-20: n = 3, ResNet-110: n = 18)."""

    def __init__(self, depth: int, num_classes: int = 10):
        super().__init__()
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        blocks = []
        in_channels = 16
        for channels, stride in ((16, 1), (32, 2), (64, 2)):
            stage = []
            for index in range(n):
                stage.append(BasicBlock(in_channels, channels, stride if index == 0 else 1))
                in_channels = channels
            blocks.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3 = blocks
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def randomize_batchnorm(model: nn.Module, generator: torch.Generator) -> None:
    """Give every BatchNorm non-trivial statistics so that folding is really tested."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
                c = module.num_features
                module.running_mean.copy_(torch.rand(c, generator=generator) * 0.4 - 0.2)
                module.running_var.copy_(torch.rand(c, generator=generator) * 1.5 + 0.5)
                module.weight.copy_(torch.rand(c, generator=generator) + 0.5)
                module.bias.copy_(torch.rand(c, generator=generator) * 0.4 - 0.2)


def cifar_resnet(depth: int = 20, seed: int = 0, sigma: float = 0.25) -> nn.Module:
    """``Sequential(Normalize, CifarResNet(depth))`` in eval mode with randomized BN statistics."""
    torch.manual_seed(seed)
    model = nn.Sequential(Normalize([0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.2010]), CifarResNet(depth))
    randomize_batchnorm(model, torch.Generator().manual_seed(seed))
    model.arq_metadata = {"sigma": sigma, "num_classes": 10, "dataset": "cifar10", "arch": f"cifar_resnet{depth}"}
    return model.eval()


class MnistNet(nn.Module):
    """A small LeNet-style MNIST classifier (conv-BN-ReLU x2, pool, two linear layers)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 5, 1, 2), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 5, 1, 2), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(16 * 7 * 7, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x):
        return self.classifier(self.features(x))


def mnist_net(seed: int = 0, sigma: float = 0.5) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(Normalize([0.1307], [0.3081]), MnistNet())
    model.arq_metadata = {"sigma": sigma, "num_classes": 10, "dataset": "mnist", "arch": "mnist_small"}
    return model


def mixed_resnet_policy(model: nn.Module):
    """2-8 bits varying by layer, 8/8 first, one float-weight layer (it stays fake-quant)."""
    from arq.quant import LayerBits, Policy, quantizable_layers

    names = [name for name, _ in quantizable_layers(model)]
    bits = {name: LayerBits(2 + (3 * i) % 7, 2 + (5 * i + 2) % 7) for i, name in enumerate(names)}
    bits[names[0]] = LayerBits(8, 8)
    bits[names[5]] = LayerBits(32, 4)
    return Policy(bits)


def codes_by_layer(model: nn.Module, x: torch.Tensor, layer_types: tuple = (), layer_codes=None,
                   shortcut_codes=None):
    """``(model(x), {layer name: int32 input codes})``.

    Without ``layer_types``: every enabled fake-quant layer, codes ``round(q(x) / s)``, and with
    ``shortcut_codes=True`` every enabled ``<block>.shortcut_quantizer``'s output codes as
    ``<block>.shortcut``. With them: every layer of those types, codes ``layer_codes(layer, input)``
    (an integer or packed model), and where ``shortcut_codes(name, module, output)`` gives
    ``(block, codes)``, those as ``<block>.shortcut`` (the downsampling shortcut's codes, which no
    layer reads as its input: an integer model's shortcut convolution writes them into the
    residual stream directly).
    """
    from arq.quant import QuantConv2d, QuantLinear

    codes, hooks = {}, []

    def record(name, value):
        codes[name] = value.to(torch.int32)

    def record_shortcut(name, module, output):
        found = shortcut_codes(name, module, output)
        if found is not None:
            record(f"{found[0]}.shortcut", found[1])

    for name, module in model.named_modules():
        if layer_types and shortcut_codes is not None:
            hooks.append(module.register_forward_hook(
                lambda m, args, out, name=name: record_shortcut(name, m, out)))
        if (not layer_types and shortcut_codes and name.endswith(".shortcut_quantizer")
                and getattr(module, "enabled", False)):
            hooks.append(module.register_forward_hook(
                lambda m, args, out, name=name: record(f"{name.rsplit('.', 1)[0]}.shortcut",
                                                       torch.round(out / m.scale))))
        if layer_types and isinstance(module, layer_types):
            hooks.append(module.register_forward_pre_hook(
                lambda m, args, name=name: record(name, layer_codes(m, args[0]))))
        elif not layer_types and isinstance(module, (QuantConv2d, QuantLinear)) and module.input_quantizer.enabled:
            hooks.append(module.register_forward_pre_hook(
                lambda m, args, name=name: record(
                    name, torch.round(m.input_quantizer(args[0]) / m.input_quantizer.scale))))
    with torch.no_grad():
        logits = model(x)
    for hook in hooks:
        hook.remove()
    return logits, codes


def assert_within_tolerance(result, reference, codes: dict, reference_codes: dict, min_clear: float) -> None:
    """The integer paths' documented tolerance against the fake-quant reference (arq.quant.execution).

    ``codes`` in forward order. In each input, the first layer whose codes differ from the
    reference's shows rounding-boundary flips only: one code step each, at most 32 of them (a
    wiring or scale error moves more codes, by more). From there the difference may spread, so
    overall at most 1 % of the codes differ. An input whose codes agree in every layer has the
    reference's logits to float rounding (1e-5 of the largest reference logit); one with a flip
    has no such bound (a single flip moved a random W4A4 ResNet-18's logits by 10.5 % of the
    largest). Top-1 equal on >= 99 % of the inputs whose reference top-2 margin exceeds 1e-3 of
    that logit, of which there must be at least ``min_clear``.
    """
    names = list(codes)
    differs_earlier = torch.zeros(codes[names[0]].shape[0], dtype=torch.bool)
    for name in names:
        delta = (codes[name] - reference_codes[name]).flatten(1)
        first = (delta != 0).any(1) & ~differs_earlier
        if first.any():
            assert int(delta[first].abs().max()) == 1, f"{name}: codes first differ by more than one step"
            assert int((delta[first] != 0).sum(1).max()) <= 32, f"{name}: too many first differences in one input"
        differs_earlier |= (delta != 0).any(1)
    differing = sum(int((c != reference_codes[name]).sum()) for name, c in codes.items())
    assert differing <= 1e-2 * sum(c.numel() for c in codes.values())
    scale = float(reference.abs().max())
    same_codes = ~differs_earlier
    if same_codes.any():
        assert float((result - reference)[same_codes].abs().max()) <= 1e-5 * scale
    top2 = reference.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-3 * scale
    assert int(clear.sum()) >= min_clear
    assert float((result.argmax(1) == reference.argmax(1))[clear].float().mean()) >= 0.99


def assert_compiled_matches_eager(eager, compiled, x) -> None:
    """The compiled model gives the eager model's logits (to 1e-4 of the largest), twice the same."""
    with torch.no_grad():
        expected = eager(x)
        result = compiled(x)
        again = compiled(x)
    torch.testing.assert_close(result, expected, rtol=0, atol=1e-4 * float(expected.abs().max()))
    assert torch.equal(again, result)
