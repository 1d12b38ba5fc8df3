"""arq.quant.to_kernels: a fake-quant model through arq's own packed kernels, against the fake-quant reference.

Tolerance (documented in arq.quant.kernels): one layer given the same input computes the same codes
and agrees to float32 rounding (the integer accumulation is exact): rtol 1e-5 plus 1e-5 of the largest
output. Through a network a rounding difference may move a value across a later quantizer's rounding
boundary, so a small share of codes (<= 0.5 %) differ and top-1 agrees on >= 99 % of the inputs whose
reference top-2 margin exceeds 1e-3 of the largest logit. Measured (2026-11-27, AVX2 CPU, backend "cpp"):
LeNet / the small MNIST net (uniform 8, uniform 4, mixed): no differing code, logits within 1.6e-7 of
the largest, 100 % top-1; ResNet-20 mixed: 0.05 % of codes differ, logits within 1.8 % of the largest,
100 % top-1 (uniform 8: 0.22 %, 0.24 %); certificates of the kernel and fake-quant LeNet identical.
"""
import copy
import os
import pickle
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from torch import nn

import arq
import arq.quant as quant
from arq.models import get_architecture
from arq.quant import LayerBits, Policy, QuantConv2d, QuantLinear
from arq.quant.kernels import PackedConv2d, PackedLinear, resolve_backend, to_kernels
from quant_nets import assert_within_tolerance, cifar_resnet, codes_by_layer, mixed_resnet_policy, mnist_net

needs_cpp = pytest.mark.skipif(resolve_backend("auto", "cpu") != "cpp", reason="needs the compiled ops (arq._C)")


def _calibrated(layer, x):
    quantizer = layer.input_quantizer
    quantizer.start_calibration()
    layer(x)
    quantizer.finish_calibration()
    return layer.eval()


def _inputs(shape, signed, generator):
    x = torch.randn(shape, generator=generator)
    return x if signed else x.relu()


def _check_layer(layer, packed, x):
    quantizer = layer.input_quantizer
    with torch.no_grad():
        reference = layer(x)
        result = packed(x)
    expected_codes = torch.round(quantizer(x) / quantizer.scale).to(torch.int32)
    codes = packed.codes(x)
    assert codes.dtype == (torch.int8 if bool(quantizer.signed) else torch.uint8)
    assert torch.equal(codes.to(torch.int32), expected_codes)
    assert int(codes.max()) <= quantizer.levels[1] and int(codes.min()) >= quantizer.levels[0]
    # a convolution's NCHW result is a channels_last view of its NHWC output (no layout copy)
    layout = torch.channels_last if result.dim() == 4 else torch.contiguous_format
    assert result.dtype == torch.float32 and result.shape == reference.shape and result.is_contiguous(memory_format=layout)
    torch.testing.assert_close(result, reference, rtol=1e-5, atol=1e-5 * float(reference.abs().max()))
    return reference, result


# every (w_bits, a_bits) in 2..8 x 2..8, signed and unsigned inputs
LINEAR_CASES = [(w, a, s) for w in range(2, 9) for a in range(2, 9) for s in (False, True)]


@needs_cpp
@pytest.mark.parametrize("w_bits,a_bits,signed", LINEAR_CASES)
def test_packed_linear_matches_fake_quant_layer(w_bits, a_bits, signed):
    generator = torch.Generator().manual_seed(w_bits * 100 + a_bits * 10 + signed)
    linear = nn.Linear(45, 13, bias=(w_bits + a_bits) % 3 != 0)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(linear.weight.shape, generator=generator))
    x = _inputs((3, 7, 45), signed, generator)  # leading dimensions are kept
    layer = _calibrated(QuantLinear.from_float(linear, LayerBits(w_bits, a_bits)), x)
    packed = PackedLinear(layer)
    assert packed.backend == "cpp" and packed.signed == signed
    _check_layer(layer, packed, x)


# (kernel, stride, padding): 1x1, 3x3, 5x5, 7x3 at strides 1 and 2, padding 0, 1, 2
GEOMETRIES = [(1, 1, 0), (1, 2, 0), (3, 1, 1), (3, 2, 1), (3, 1, 0), (3, 2, 2), (5, 1, 2), (5, 2, 0), ((3, 5), 1, 1)]
CONV_BITS = [(2, 2), (3, 5), (4, 4), (5, 7), (6, 3), (7, 8), (8, 6), (8, 8)]
CONV_CASES = [(g, *CONV_BITS[(i + j) % len(CONV_BITS)], s)
              for i, g in enumerate(GEOMETRIES) for j, s in enumerate((False, True))]


@needs_cpp
@pytest.mark.parametrize("geometry,w_bits,a_bits,signed", CONV_CASES)
def test_packed_conv_matches_fake_quant_layer(geometry, w_bits, a_bits, signed):
    kernel, stride, padding = geometry
    generator = torch.Generator().manual_seed(w_bits * 100 + a_bits * 10 + signed + 1000 * stride + 3 * padding)
    conv = nn.Conv2d(10, 12, kernel, stride=stride, padding=padding)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator))
        conv.bias.copy_(torch.randn(12, generator=generator))
    x = _inputs((4, 10, 11, 13), signed, generator)
    layer = _calibrated(QuantConv2d.from_float(conv, LayerBits(w_bits, a_bits)), x)
    packed = PackedConv2d(layer)
    assert packed.backend == "cpp"
    _check_layer(layer, packed, x)


@needs_cpp
@pytest.mark.parametrize("signed", [False, True])
def test_full_range_8_bit_codes_are_exact(signed):
    """Codes at the ends of the 8-bit range (255, or +-127) times weights +-127: no saturation anywhere."""
    conv = nn.Conv2d(16, 4, 3, padding=1)
    with torch.no_grad():
        conv.weight.fill_(1.0)
        conv.weight[1].fill_(-1.0)
        conv.weight[2].copy_(torch.where(torch.arange(16 * 9).view(16, 3, 3) % 2 == 0, 1.0, -1.0))
    layer = QuantConv2d.from_float(conv, LayerBits(8, 8), quant.QuantConfig(weight_clip="max")).eval()
    layer.input_quantizer.set_range(1.0, signed)
    x = torch.full((2, 16, 5, 5), 300.0)
    if signed:
        x[1] = -300.0
    packed = PackedConv2d(layer)
    _, result = _check_layer(layer, packed, x)
    code = 127 if signed else 255
    # an interior pixel of channel 0: 144 taps of code * 127, times x_scale (1) * w_scale (1 / 127)
    acc = (float(result[0, 0, 2, 2]) - float(conv.bias.detach()[0])) / float(layer.weight_scale[0])
    assert abs(acc - code * 127 * 144) <= 1e-5 * code * 127 * 144


@needs_cpp
def test_backends_torch_and_cpp_agree_bit_for_bit():
    generator = torch.Generator().manual_seed(3)
    conv = nn.Conv2d(6, 8, 3, stride=2, padding=1)
    x = _inputs((2, 6, 9, 9), False, generator)
    layer = _calibrated(QuantConv2d.from_float(conv, LayerBits(5, 8)), x)
    cpp, reference = PackedConv2d(layer, "cpp"), PackedConv2d(layer, "torch")
    assert (cpp.backend, reference.backend) == ("cpp", "torch")
    with torch.no_grad():
        assert torch.equal(cpp(x), reference(x))


def _lenet(seed=0, sigma=0.25):
    torch.manual_seed(seed)
    model = get_architecture("lenet", "mnist").eval()
    model.arq_metadata = {"sigma": sigma, "num_classes": 10, "dataset": "mnist", "arch": "lenet"}
    return model


def _mixed_lenet_policy(model):
    names = [name for name, _ in quant.quantizable_layers(model)]
    assert names == ["1.conv1", "1.conv2", "1.fc1", "1.fc2", "1.fc3"]
    return Policy({"1.conv1": LayerBits(8, 8), "1.conv2": LayerBits(3, 5), "1.fc1": LayerBits(5, 3),
                   "1.fc2": LayerBits(32, 4), "1.fc3": LayerBits(2, 7)})


def _mixed_mnist_net_policy(model):
    names = [name for name, _ in quant.quantizable_layers(model)]
    bits = [LayerBits(8, 8), LayerBits(4, 6), LayerBits(6, 4), LayerBits(3, 8)]
    return Policy(dict(zip(names, bits)))


MNIST = (1, 28, 28)
# name: (model, policy, input shape, number of test inputs)
NETWORKS = {
    "lenet-uniform8": (_lenet, lambda m: Policy.uniform(m, 8, 8), MNIST, 256),
    "lenet-uniform4": (_lenet, lambda m: Policy.uniform(m, 4, 4), MNIST, 256),
    "lenet-mixed": (_lenet, _mixed_lenet_policy, MNIST, 256),
    "mnist_net-mixed": (lambda: mnist_net().eval(), _mixed_mnist_net_policy, MNIST, 256),  # 5x5 pad 2, folded BN
    # deeper: residual adds, 1x1 stride-2 shortcuts; here rounding differences do move later codes
    "cifar_resnet20-mixed": (lambda: cifar_resnet(20), mixed_resnet_policy, (3, 32, 32), 128),
}


@needs_cpp
@pytest.mark.parametrize("network", sorted(NETWORKS))
def test_network_agrees_with_fake_quant_reference(network):
    build, make_policy, shape, count = NETWORKS[network]
    model = build()
    policy = make_policy(model)
    generator = torch.Generator().manual_seed(0)
    qmodel = quant.quantize(model, policy, torch.rand(64, *shape, generator=generator))
    kernel_model = quant.to_kernels(qmodel)
    assert kernel_model.arq_metadata == model.arq_metadata
    expected_packed = [n for n, b in policy.items() if b.w_bits != 32 and b.a_bits != 32]
    assert sorted(kernel_model.arq_kernels["packed"]) == sorted(expected_packed)
    assert kernel_model.arq_kernels["backend"] == "cpp"
    for name, bits in policy.items():
        module = kernel_model.get_submodule(name)
        if bits.w_bits == 32 or bits.a_bits == 32:
            assert isinstance(module, (QuantConv2d, QuantLinear)) and name in kernel_model.arq_kernels["fake_quant"]
        else:
            assert isinstance(module, (PackedConv2d, PackedLinear)) and module.backend == "cpp"
    x = torch.rand(count, *shape, generator=generator) + 0.25 * torch.randn(count, *shape, generator=generator)
    reference, reference_codes = codes_by_layer(qmodel, x)
    result, kernel_codes = codes_by_layer(kernel_model, x, (PackedConv2d, PackedLinear), lambda m, x: m.codes(x))
    assert set(kernel_codes) == set(expected_packed)
    assert_within_tolerance(result, reference, kernel_codes, reference_codes, 0.75 * count)


@needs_cpp
def test_certify_kernel_model_gives_the_fake_quant_prediction():
    model = _lenet()
    generator = torch.Generator().manual_seed(0)
    qmodel = quant.quantize(model, Policy.uniform(model, 4, 4), torch.rand(64, 1, 28, 28, generator=generator))
    kernel_model = quant.to_kernels(qmodel)
    candidates = torch.rand(64, 1, 28, 28, generator=generator)
    with torch.no_grad():
        logits = qmodel(candidates)
    classes, top2 = logits.argmax(1), logits.topk(2, dim=1).values
    # one input of each of the two classes this random net predicts, its closest call and its
    # clearest one (so that some prediction is not ABSTAIN whatever the calibrated ranges)
    picks = [int(torch.nonzero(classes == c)[0]) for c in classes.unique()[:2]]
    margins = top2[:, 0] - top2[:, 1]
    picks += [int(margins.argmin()), int(margins.argmax())]
    x = candidates[picks]
    kwargs = dict(sigma=0.25, n=300, n0=20, batch_size=160)
    reference = arq.certify(qmodel, x, backend="torch", **kwargs)  # the fake-quant model itself
    result = arq.certify(kernel_model, x, **kwargs)
    assert [c.prediction for c in result] == [c.prediction for c in reference]
    assert any(c.prediction != arq.ABSTAIN for c in reference)  # measured: ABSTAIN x 3, 7 (counts 145, 137, 170, 237)
    for ours, theirs in zip(result, reference):
        assert abs(ours.count - theirs.count) <= 3  # a sample's class may flip at a near tie


@needs_cpp
def test_layers_the_kernels_cannot_run_stay_fake_quant():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(4, 8, 3, padding=1, groups=2), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=2, dilation=2), nn.ReLU(),
        nn.Conv2d(8, 8, (3, 1), padding=(1, 0)), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding="same"), nn.ReLU(),
        nn.Conv2d(8, 4, 1, bias=False), nn.Flatten(), nn.Linear(4 * 6 * 6, 3),
    ).eval()
    x = torch.rand(8, 4, 6, 6)
    qmodel = quant.quantize(model, Policy.uniform(model, 6, 6), x)
    kernel_model = to_kernels(qmodel)
    assert sorted(kernel_model.arq_kernels["fake_quant"]) == ["0", "2", "4"]
    assert kernel_model.arq_kernels["packed"] == ["6", "8", "10"]
    assert isinstance(kernel_model[0], QuantConv2d) and isinstance(kernel_model[6], PackedConv2d)
    assert kernel_model[6].padding == 1
    assert isinstance(qmodel[6], QuantConv2d)  # the input model is unchanged
    with torch.no_grad():
        reference, result = qmodel(x), kernel_model(x)
    torch.testing.assert_close(result, reference, rtol=1e-4, atol=1e-4 * float(reference.abs().max()))


def test_to_kernels_rejects_bad_input():
    with pytest.raises(ValueError, match="no quantized layer"):
        to_kernels(_lenet())
    model = _lenet()
    qmodel = quant.quantize(model, Policy.uniform(model, 8, 8), torch.rand(8, 1, 28, 28))
    with pytest.raises(ValueError, match="backend"):
        to_kernels(qmodel, backend="fast")
    with pytest.raises(RuntimeError, match="cpp"):
        resolve_backend("cpp", "meta")
    torch_model = to_kernels(qmodel, backend="torch")
    assert torch_model.arq_kernels["backend"] == "torch" and torch_model[1].conv1.backend == "torch"


def _tiny_net():
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(4, 4, 1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 3 * 3, 5), nn.ReLU(), nn.Linear(5, 3),
    ).eval()
    # signed 5-bit input codes, unsigned 8-bit codes (int8 with zero point -128 on Triton), unsigned 6 and 3 bits
    policy = Policy({"0": LayerBits(4, 5), "2": LayerBits(8, 8), "5": LayerBits(3, 6), "7": LayerBits(2, 3)})
    return model, policy


def _compare_triton_with_cpp(device: str) -> None:
    """Every comparison of backend "triton" on ``device`` with backend "cpp" on the CPU."""
    for compare in _TRITON_CPP_PARTS.values():
        compare(device)


def _compare_tiny_net(device: str) -> None:
    """The tiny net through backend "triton" on ``device`` against backend "cpp" on the CPU."""
    model, policy = _tiny_net()
    x = torch.rand(3, 2, 6, 6, generator=torch.Generator().manual_seed(5)) - 0.3
    qmodel = quant.quantize(model, policy, x)
    cpp = to_kernels(qmodel, backend="cpp")
    assert cpp[0].signed and not cpp[2].signed and cpp[2].code_max == 255  # int8, and 8-bit uint8 codes
    with torch.no_grad():
        assert int(cpp[2].codes(torch.relu(cpp[0](x))).max()) > 127  # codes the zero point must carry
    triton_model = to_kernels(qmodel.to(device), backend="triton")
    assert triton_model.arq_kernels["backend"] == "triton" and triton_model.arq_kernels["chained"] == 1
    assert all(m.backend == "triton" for m in triton_model.modules() if isinstance(m, (PackedConv2d, PackedLinear)))
    with torch.no_grad():
        expected = cpp(x)
        result = triton_model(x.to(device)).cpu()
        # the row loop, the 8-bit unsigned layer through its zero point's prefix-sum correction
        rows_result, launches = _with_row_loop(lambda: triton_model(x.to(device)).cpu())
    assert torch.equal(rows_result, result) and any(x_zp for _, x_zp in launches), launches
    # the layers keep their checked launches (one per K loop here) and drop them when copied or pickled
    convs = [m for m in triton_model.modules() if isinstance(m, PackedConv2d)]
    assert all(len(m._launch_plans) == 2 for m in convs)
    copied = copy.deepcopy(triton_model)
    assert all(not m._launch_plans for m in copied.modules() if isinstance(m, PackedConv2d))
    assert not pickle.loads(pickle.dumps(convs[0]))._launch_plans
    with torch.no_grad():
        assert torch.equal(copied(x.to(device)).cpu(), result)
        with mock.patch.dict(os.environ, {"ARQ_TRITON_LAUNCH_PLANS": "0"}):  # the A/B switch: none kept
            fresh = copy.deepcopy(triton_model)
            assert torch.equal(fresh(x.to(device)).cpu(), result)
            assert all(not m._launch_plans for m in fresh.modules() if isinstance(m, PackedConv2d))
    torch.testing.assert_close(result, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    # "auto": "triton" for CUDA tensors, "cpp" on the CPU
    assert to_kernels(qmodel, backend="auto").arq_kernels["backend"] == ("triton" if device == "cuda" else "cpp")
    # conv -> ReLU -> conv passing int8 codes (unsigned 8-bit: zero point -128) gives the
    # unchained Triton model's output bit for bit
    unchained = to_kernels(qmodel.to(device), backend="triton", chain=False)
    assert unchained.arq_kernels["chained"] == 0
    with torch.no_grad():
        assert torch.equal(unchained(x.to(device)).cpu(), result)


def _compare_chained_residual_net(device: str) -> None:
    """A residual block (conv1 -> ReLU -> conv2, + shortcut, ReLU): conv1 -> conv2 chains; the
    stem's output (two users: conv1 and the add) is written as floats and conv1's codes; the
    add and the last ReLU move into conv2; fused, unfused and cpp agree."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 6, 3, padding=1)
            self.conv1 = nn.Conv2d(6, 6, 3, padding=1)
            self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
            self.head = nn.Linear(6, 4)

        def forward(self, x):
            out = torch.relu(self.stem(x))
            y = self.conv2(torch.relu(self.conv1(out)))
            out = torch.relu(y + out)
            return self.head(out.mean((2, 3)))

    torch.manual_seed(3)
    model = Block().eval()
    policy = Policy({"stem": LayerBits(6, 8), "conv1": LayerBits(4, 8), "conv2": LayerBits(3, 5),
                     "head": LayerBits(8, 8)})
    x = torch.rand(2, 3, 7, 9, generator=torch.Generator().manual_seed(6))
    qmodel = quant.quantize(model, policy, x)
    chained = to_kernels(qmodel.to(device), backend="triton")
    assert chained.arq_kernels["chained"] == 2 and chained.arq_kernels["residuals"] == 1
    assert chained.conv1.output_codes is not None and chained.conv2.takes_codes
    assert chained.stem.output_codes is None and chained.stem.codes_also is not None and chained.conv1.takes_codes
    assert chained.conv2.epilogue_relu and chained.conv2.output_codes is None and chained.conv2.codes_also is None
    unchained = to_kernels(qmodel.to(device), backend="triton", chain=False)
    with torch.no_grad():
        result = chained(x.to(device)).cpu()
        assert torch.equal(result, unchained(x.to(device)).cpu())
        expected = to_kernels(qmodel.cpu(), backend="cpp")(x)
    torch.testing.assert_close(result, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def _compare_in_place_writes_block_fusion(device: str) -> None:
    """Fusion reads the residual when the convolution runs and writes codes of the stored output:
    a residual written in place after the convolution (``s.mul_``) keeps its add in torch, and an
    output that a reader changes in place gets no codes_also. (``s += y`` is no such write: torch.fx
    records Python's in-place operators on traced values as out-of-place ones, so that add fuses.)
    The logits equal the unfused model's in every case."""

    class Block(nn.Module):
        def __init__(self, mode: str):
            super().__init__()
            self.mode = mode
            self.stem = nn.Conv2d(3, 5, 3, padding=1)
            self.conv = nn.Conv2d(5, 5, 3, padding=1)
            self.head = nn.Conv2d(5, 5, 1)

        def forward(self, x):
            s = torch.relu(self.stem(x))
            if self.mode == "mutated_output":  # changed in place before the packed conv reads it
                s.add_(1.0)
            y = self.conv(s)
            if self.mode == "mutated_residual":
                s.mul_(2.0)
                out = torch.relu(y + s)
            elif self.mode == "iadd_into_residual":
                s += y
                out = s + 0.5 * s
            else:  # y scaled first: no residual fusion, so the conv is a consumer of s alone
                out = 2.0 * y + s
            return self.head(out).mean((2, 3))

    generator = torch.Generator().manual_seed(8)
    x = torch.rand(2, 3, 6, 7, generator=generator)
    for mode in ("mutated_residual", "iadd_into_residual", "mutated_output"):
        torch.manual_seed(9)
        model = Block(mode).eval()
        policy = Policy({"stem": LayerBits(4, 6), "conv": LayerBits(4, 4), "head": LayerBits(6, 6)})
        qmodel = quant.quantize(model, policy, torch.rand(4, 3, 6, 7, generator=generator)).to(device)
        fused = to_kernels(qmodel, backend="triton")
        assert fused.arq_kernels["residuals"] == (1 if mode == "iadd_into_residual" else 0), mode
        assert fused.stem.codes_also is None, mode  # written in place, or read as the residual too
        with torch.no_grad():
            assert torch.equal(fused(x.to(device)), to_kernels(qmodel, backend="triton", chain=False)(x.to(device)))


def _with_row_loop(run):
    """``(run(), launches)`` with ARQ_TRITON_CONV_LOOP=rows: checks that the row-loop kernel ran, each
    launch with its layer's int8 weights; ``launches`` lists each one's ``(W_INT8, X_ZP)``."""
    import arq_kernels.packed_conv as packed_conv_module

    real, launches = packed_conv_module._packed_conv2d_rows_kernel, []

    class Counting:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append((kwargs["W_INT8"], kwargs["X_ZP"]))
                return real[grid](*args, **kwargs)
            return launch

    with mock.patch.dict(os.environ, {"ARQ_TRITON_CONV_LOOP": "rows"}), \
            mock.patch.object(packed_conv_module, "_packed_conv2d_rows_kernel", Counting()):
        result = run()
    assert launches and all(w_int8 for w_int8, _ in launches), launches  # every conv with its int8 weights
    return result, launches


def _compare_fused_resnet(device: str) -> None:
    """arq's CIFAR ResNet behind its input normalization (whose input check keeps torch.fx from
    tracing the whole model: the ResNet is rewritten on its own). Uniform 4 bits: every block's
    conv1 -> conv2 chains, every residual add + ReLU moves into conv2, and the stem and each
    block output write the codes of one packed consumer (conv1, or the downsampling shortcut);
    mixed bits (a fake-quant layer, 8-bit unsigned codes): whatever is fused; uniform 4 bits with
    an 8-bit residual stream (``QuantConfig.residual_bits``): the adds still fuse, and each block
    output and shortcut goes through its stream quantizer (torch) instead of writing codes (so the
    stem, whose output the first block's shortcut quantizer reads, writes float). Fused and unfused
    give the same logits bit for bit."""
    generator = torch.Generator().manual_seed(7)
    x = torch.rand(2, 3, 12, 12, generator=generator)
    uniform4 = lambda m: Policy.uniform(m, 4, 4)  # noqa: E731
    for policy_of, residual_bits in ((uniform4, 32), (mixed_resnet_policy, 32), (uniform4, 8)):
        model = cifar_resnet(depth=8, seed=4)
        qmodel = quant.quantize(model, policy_of(model), torch.rand(6, 3, 12, 12, generator=generator),
                                config=quant.QuantConfig(residual_bits=residual_bits)).to(device)
        fused = to_kernels(qmodel, backend="triton")
        unfused = to_kernels(qmodel, backend="triton", chain=False)
        counts = fused.arq_kernels
        if residual_bits != 32:
            assert (counts["chained"], counts["residuals"]) == (3, 3)  # conv1 -> conv2 pairs
            # 3 block outputs, 3 shortcuts (the first block's input and the 2 downsampling convs)
            assert sum(m.bits == 8 for m in fused.modules() if isinstance(m, quant.ActivationQuantizer)) == 6
        elif counts["fake_quant"]:
            assert counts["residuals"] >= 1 and counts["chained"] >= 1
        else:  # 3 blocks: 3 conv1 -> conv2 pairs, 3 residuals, stem and 2 block outputs with codes_also
            assert (counts["chained"], counts["residuals"]) == (6, 3)
            assert sum(m.codes_also is not None for m in fused.modules() if isinstance(m, PackedConv2d)) == 3
        with torch.no_grad():
            logits = fused(x.to(device))
            assert torch.equal(logits, unfused(x.to(device)))
            if policy_of is mixed_resnet_policy:  # (one policy: each one compiles its own kernels on a GPU)
                # the row loop (the layers' unpacked int8 weights) gives the same logits
                assert torch.equal(_with_row_loop(lambda: fused(x.to(device)))[0], logits)
        assert logits.shape == (2, 10) and torch.isfinite(logits).all()


def _compare_input_codes_entry(device: str) -> None:
    """arq.quant.kernels.enter_at_input_codes: the packed stem reads int8 codes made by the Triton noise
    kernel (normalization fused), and the logits are those of the float entry on the float noisy batch,
    bit for bit. Formats: a CIFAR ResNet behind a normalization module of its own (traced inline; signed
    4- and 8-bit stems, mixed bits) and behind arq's NormalizeLayer (kept whole); a model without
    normalization whose first layer has 8-bit unsigned codes (zero point -128).
    The votes through arq.smoothing.core follow the codes; a model whose input has two readers, or whose
    first layer stayed fake-quant, keeps its float entry."""
    from quant_nets import CifarResNet, randomize_batchnorm

    from arq.models.normalize import NormalizeLayer
    from arq.quant.kernels import enter_at_input_codes
    from arq.smoothing.core import sample_counts
    from arq.smoothing.noise import noisy_batch_reference, noisy_codes_batch

    generator = torch.Generator().manual_seed(11)
    calibration = torch.rand(6, 3, 10, 10, generator=generator)
    unsigned_stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(400, 3)).eval()
    unsigned_stem.arq_metadata = {"num_classes": 3}
    cases = []
    for bits in (4, 8):
        model = cifar_resnet(depth=8, seed=bits)
        cases.append((f"resnet W{bits}A{bits}", model, Policy.uniform(model, bits, bits)))
    model = cifar_resnet(depth=8, seed=3)
    cases.append(("resnet mixed", model, mixed_resnet_policy(model)))
    model = nn.Sequential(NormalizeLayer([0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.2010]), CifarResNet(8))
    randomize_batchnorm(model, torch.Generator().manual_seed(5))
    model.arq_metadata = {"num_classes": 10}
    cases.append(("resnet behind arq's NormalizeLayer", model.eval(), Policy.uniform(model, 8, 8)))
    cases.append(("unsigned 8-bit stem", unsigned_stem, Policy({"0": LayerBits(4, 8), "3": LayerBits(4, 8)})))
    fields = dict(seed=77, input_index=4, draw=1, sample_start=30, count=5)
    x = torch.rand(3, 10, 10, generator=generator).to(device)
    for name, model, policy in cases:
        qmodel = quant.quantize(model, policy, calibration).to(device)
        float_entry = to_kernels(qmodel, backend="triton")
        entered = to_kernels(qmodel, backend="triton")
        codes = enter_at_input_codes(entered)
        assert codes is not None and codes.dtype == torch.int8, name
        stem = next(m for m in entered.modules() if isinstance(m, PackedConv2d))
        assert stem.takes_codes and stem.reads_input_codes, name
        assert (codes.code_min, codes.code_max) == (stem.code_min + stem.triton_zero_point,
                                                    stem.code_max + stem.triton_zero_point), name
        if name.startswith("unsigned"):
            assert (codes.zero_point, codes.code_min, codes.code_max) == (-128, -128, 127)
            assert codes.mean == (0.0,) * 3 and codes.std == (1.0,) * 3
        else:
            assert stem.signed and not any(isinstance(m, NormalizeLayer) for m in entered.modules()), name
        noisy = noisy_batch_reference(x, 0.5, **fields)
        noisy_codes = noisy_codes_batch(x, 0.5, codes, backend="triton", **fields)
        assert torch.equal(noisy_codes, codes.encode(noisy)), name
        with torch.no_grad():
            assert torch.equal(entered(noisy_codes), float_entry(noisy)), name
        with pytest.raises(ValueError, match="int8 input codes"):
            entered(noisy)
        entered.input_codes = codes  # as the engine sets it
        common = dict(sigma=0.5, num=9, draw=1, seed=5, input_index=2, batch_size=4, backend="triton")
        counts = sample_counts(entered, x, num_classes=qmodel.arq_metadata["num_classes"], **common)
        assert torch.equal(counts, sample_counts(float_entry, x, num_classes=qmodel.arq_metadata["num_classes"],
                                                 **common)), name
        assert int(counts.sum()) == 9

    class TwoReaders(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 4, 3, padding=1)
            self.head = nn.Linear(400 + 300, 3)

        def forward(self, x):
            return self.head(torch.cat([self.stem(x).flatten(1), x.flatten(1)], 1))

    # the engine's packed path (arq.smoothing.engine, CUDA there; here the device the kernels run on)
    from arq.smoothing import engine

    qmodel = quant.quantize(cases[0][1], cases[0][2], calibration).to(device)
    if device == "cpu":
        prepared, tag = engine._prepare_packed_gpu(qmodel, "triton", torch.device(device))
        os.environ["ARQ_INPUT_CODES"] = "0"
        try:
            floats, _ = engine._prepare_packed_gpu(qmodel, "triton", torch.device(device))
        finally:
            del os.environ["ARQ_INPUT_CODES"]
    else:
        prepared, tag = engine.prepare_model(qmodel, "triton", device, cuda_graphs=False)
        floats = None
    assert tag == "+packed" and prepared.input_codes is not None and prepared.input_codes.dtype == torch.int8
    if floats is not None:
        assert floats.input_codes is None
        common = dict(sigma=0.5, num=9, draw=1, seed=5, input_index=2, batch_size=4, backend="triton", num_classes=10)
        assert torch.equal(sample_counts(prepared, x, **common), sample_counts(floats, x, **common))

    qmodel = quant.quantize(TwoReaders().eval(), Policy({"stem": LayerBits(4, 8), "head": LayerBits(4, 8)}),
                            calibration).to(device)
    packed = to_kernels(qmodel, backend="triton")
    assert enter_at_input_codes(packed) is None and not packed.stem.takes_codes
    float_stem = quant.quantize(unsigned_stem, Policy({"0": LayerBits(32, 32), "3": LayerBits(4, 8)}),
                                calibration).to(device)
    assert enter_at_input_codes(to_kernels(float_stem, backend="triton")) is None


_TRITON_CPP_PARTS = {"tiny_net": _compare_tiny_net, "chained_residual_net": _compare_chained_residual_net,
                     "fused_resnet": _compare_fused_resnet,
                     "in_place_writes_block_fusion": _compare_in_place_writes_block_fusion,
                     "input_codes_entry": _compare_input_codes_entry}


@pytest.mark.triton
@pytest.mark.gpu
@needs_cpp
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("part", list(_TRITON_CPP_PARTS))
def test_gpu_triton_backend_matches_cpp(part):
    """On the card one test per comparison, so that gpu_check.sh's workers share them (all five in one
    test took 87 s of its 105 s GPU-test step on an H200, 2026-11-29)."""
    pytest.importorskip("triton")
    _TRITON_CPP_PARTS[part]("cuda")


@pytest.mark.triton
@needs_cpp
def test_triton_backend_matches_cpp():
    """All five comparisons on the CPU, under the interpreter (on a GPU machine:
    test_gpu_triton_backend_matches_cpp)."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device: test_gpu_triton_backend_matches_cpp runs these on it")
    # On the CPU Triton runs through its interpreter, which must be chosen before triton is imported
    # (torch._dynamo imports it early): a fresh process with TRITON_INTERPRET=1.
    here = Path(__file__).resolve().parent
    code = (f"import sys; sys.path.insert(0, {str(here)!r}); import torch; torch.set_num_threads(1); "
            f"import {Path(__file__).stem} as t; t._compare_triton_with_cpp('cpu')")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_WAIT_POLICY="PASSIVE")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                          cwd=here.parent.parent)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
